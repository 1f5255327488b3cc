//! Serving peers: accept tunnel connections, read each stream's header, authorize it
//! against this cluster's exports, connect to an endpoint, then splice.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use quinn::{Connection, Incoming, RecvStream, SendStream};
use strait_common::config::Export;
use strait_common::pki::peer_id;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::header::{Status, StreamRequest, StreamResponse};
use super::outbound::{read_frame, respond};
use super::{codes, splice};
use crate::gateway::Shared;

/// Accepts tunnel connections until the endpoint closes.
pub async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move { serve_connection(shared, incoming).await });
    }
}

async fn serve_connection(shared: Arc<Shared>, incoming: Incoming) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(shared.config.tunnel.connect_timeout.0, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return reject_handshake(&shared, remote, &e.to_string()),
        Err(_) => return reject_handshake(&shared, remote, "handshake timed out"),
    };
    let Some(peer) = peer_cluster(&conn) else {
        conn.close(codes::BAD_IDENTITY, b"no gateway identity");
        return reject_handshake(
            &shared,
            remote,
            "verified certificate carries no gateway identity",
        );
    };
    let span = tracing::info_span!("inbound", peer = %peer, %remote);
    // Liveness probes: the peer sends small datagrams and expects each one back.
    let echo = tokio::spawn(echo_probes(conn.clone()));
    let _echo = AbortOnDrop(echo);
    let mut faults = shared.faults.subscribe();
    async {
        tracing::debug!("peer connected");
        loop {
            let accepted = tokio::select! {
                a = conn.accept_bi() => a,
                // A killed tunnel drops its connections; the socket is already silent, so
                // the peer is not told.
                _ = faults.wait_for(|f| f.killed) => {
                    conn.close(codes::SHUTDOWN, b"tunnel killed by a drill");
                    return;
                }
            };
            match accepted {
                Ok((send, recv)) => {
                    let shared = shared.clone();
                    let peer = peer.clone();
                    tokio::spawn(
                        async move { serve_stream(shared, peer, send, recv).await }
                            .in_current_span(),
                    );
                }
                Err(e) => {
                    tracing::debug!(reason = %e, "peer connection ended");
                    return;
                }
            }
        }
    }
    .instrument(span)
    .await
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Most bytes a probe may carry; larger datagrams are not echoed (no amplification, and
/// nothing else uses datagrams).
pub const PROBE_MAX: usize = 16;

/// Sends every probe datagram back on the same connection, unchanged.
async fn echo_probes(conn: Connection) {
    while let Ok(d) = conn.read_datagram().await {
        if d.len() <= PROBE_MAX {
            let _ = conn.send_datagram(d);
        }
    }
}

fn reject_handshake(shared: &Shared, remote: SocketAddr, reason: &str) {
    shared
        .metrics
        .counter("strait_handshakes_rejected_total", &[])
        .increment(1);
    tracing::warn!(%remote, %reason, "tunnel handshake refused");
}

/// The cluster id from the peer's verified certificate.
fn peer_cluster(conn: &Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    peer_id(certs.first()?).ok().map(|id| id.cluster)
}

async fn serve_stream(
    shared: Arc<Shared>,
    peer: String,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let req: StreamRequest = match tokio::time::timeout(
        shared.config.tunnel.connect_timeout.0,
        read_frame(&mut recv),
    )
    .await
    {
        Ok(Ok(req)) => req,
        Ok(Err(e)) => return reject_header(&shared, &peer, &e.to_string(), send, recv),
        Err(_) => return reject_header(&shared, &peer, "no header in time", send, recv),
    };
    let service = format!("{}/{}", req.namespace, req.service);
    let labels = [("service", service.as_str()), ("peer", peer.as_str())];
    let (tcp, _permit) = match connect_endpoint(&shared, &peer, &req).await {
        Ok(ok) => ok,
        Err(resp) => {
            tracing::info!(%service, status = resp.status().label(), detail = %resp.detail, "stream refused");
            shared
                .metrics
                .counter(
                    "strait_streams_failed_total",
                    &[labels[0], labels[1], ("reason", resp.status().label())],
                )
                .increment(1);
            let _ = respond(&mut send, &resp).await;
            return;
        }
    };
    if respond(&mut send, &StreamResponse::new(Status::Ok, ""))
        .await
        .is_err()
    {
        return;
    }
    splice::splice_counted(
        &shared.metrics,
        &service,
        &peer,
        splice::Side::Inbound,
        (tcp, send, recv),
        shared.config.tunnel.copy_buffer.0 as usize,
        0,
    )
    .await;
}

fn reject_header(
    shared: &Shared,
    peer: &str,
    reason: &str,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    shared
        .metrics
        .counter("strait_stream_headers_rejected_total", &[("peer", peer)])
        .increment(1);
    tracing::warn!(%reason, "stream header rejected");
    let _ = send.reset(codes::BAD_HEADER);
    let _ = recv.stop(codes::BAD_HEADER);
}

/// Authorizes the request and connects to an endpoint; the answer to send on refusal.
async fn connect_endpoint(
    shared: &Shared,
    peer: &str,
    req: &StreamRequest,
) -> Result<(TcpStream, tokio::sync::OwnedSemaphorePermit), StreamResponse> {
    // The exports as they are now (they change with the config file under discovery).
    let exports = shared.exports.load_full();
    let export = exports
        .iter()
        .find(|e| e.name == req.service && e.namespace == req.namespace)
        .filter(|e| e.exported_to(peer))
        // An unknown service and one not exported to the caller look the same, so peers
        // cannot probe for names they are not allowed to see.
        .ok_or_else(|| {
            StreamResponse::new(
                Status::Forbidden,
                format!(
                    "{}/{} is not exported to {peer}",
                    req.namespace, req.service
                ),
            )
        })?;
    let port = u16::try_from(req.port)
        .ok()
        .and_then(|p| export.port(p))
        .ok_or_else(|| {
            StreamResponse::new(
                Status::NoEndpoints,
                format!("{}/{} has no port {}", req.namespace, req.service, req.port),
            )
        })?;
    let permit = shared
        .inbound_streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            StreamResponse::new(Status::Overloaded, "gateway at its inbound stream limit")
        })?;
    let candidates = candidates(export, req.endpoint.as_deref(), &shared.next_endpoint);
    if candidates.is_empty() {
        return Err(StreamResponse::new(
            Status::NoEndpoints,
            format!("{}/{} has no ready endpoint", req.namespace, req.service),
        ));
    }
    let timeout = shared.config.tunnel.endpoint_connect_timeout.0;
    let mut last = String::new();
    for ip in candidates {
        let addr = SocketAddr::new(ip, port.target());
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                return Ok((tcp, permit));
            }
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: timed out after {timeout:?}"),
        }
        tracing::debug!(endpoint = %addr, error = %last, "endpoint connect failed");
    }
    Err(StreamResponse::new(Status::ConnectFailed, last))
}

/// Ready endpoints to try, in order: the named one only, or all, rotated round-robin.
fn candidates(export: &Export, named: Option<&str>, next: &AtomicUsize) -> Vec<std::net::IpAddr> {
    let ready: Vec<_> = export.endpoints.iter().filter(|e| e.ready).collect();
    if let Some(name) = named {
        return ready
            .iter()
            .filter(|e| e.address.to_string() == name || e.hostname.as_deref() == Some(name))
            .map(|e| e.address)
            .collect();
    }
    if ready.is_empty() {
        return Vec::new();
    }
    let start = next.fetch_add(1, Ordering::Relaxed) % ready.len();
    ready
        .iter()
        .cycle()
        .skip(start)
        .take(ready.len())
        .map(|e| e.address)
        .collect()
}
