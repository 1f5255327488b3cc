//! Service listeners: a local TCP address per imported service port, forwarding each
//! accepted connection through the tunnel to a cluster that serves the service.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use strait_common::config::Import;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::gateway::Shared;
use crate::tunnel::header::StreamRequest;
use crate::tunnel::outbound::{OpenError, open_stream};
use crate::tunnel::splice;

/// One bound listener, as reported by the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct BoundListener {
    /// `namespace/name` of the imported service.
    pub service: String,
    /// Service port.
    pub port: u16,
    /// Local address accepting connections.
    pub address: SocketAddr,
    /// Clusters tried, in order.
    pub clusters: Vec<String>,
}

/// A bound listener with the import it serves, ready for [`serve`].
pub struct Bound {
    /// What the admin API reports.
    pub info: BoundListener,
    /// The socket.
    pub listener: TcpListener,
    /// The import it serves.
    pub import: Import,
}

/// Binds every import's ports; fails on the first address that cannot be bound.
pub async fn bind_all(imports: &[Import]) -> anyhow::Result<Vec<Bound>> {
    use anyhow::Context;
    let mut out = Vec::new();
    for imp in imports {
        for p in &imp.ports {
            let addr = SocketAddr::new(imp.address, p.local_port());
            let listener = TcpListener::bind(addr).await.with_context(|| {
                format!(
                    "binding listener {addr} for imported service {}/{}",
                    imp.namespace, imp.name
                )
            })?;
            let info = BoundListener {
                service: format!("{}/{}", imp.namespace, imp.name),
                port: p.port,
                address: listener.local_addr()?,
                clusters: imp.clusters.clone(),
            };
            out.push(Bound {
                info,
                listener,
                import: imp.clone(),
            });
        }
    }
    Ok(out)
}

/// Accepts connections on one listener until the gateway shuts down.
pub async fn serve(shared: Arc<Shared>, bound: Bound) {
    let Bound {
        info,
        listener,
        import,
    } = bound;
    let import = Arc::new(import);
    let info = Arc::new(info);
    loop {
        match listener.accept().await {
            Ok((tcp, client)) => {
                let span = tracing::info_span!("outbound", service = %info.service, port = info.port, %client);
                tokio::spawn(
                    forward(shared.clone(), info.clone(), import.clone(), tcp).instrument(span),
                );
            }
            Err(e) => {
                // Out of file descriptors and similar are transient: report and keep serving.
                tracing::warn!(error = %e, address = %info.address, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

async fn forward(
    shared: Arc<Shared>,
    info: Arc<BoundListener>,
    import: Arc<Import>,
    tcp: TcpStream,
) {
    let started = Instant::now();
    let _ = tcp.set_nodelay(true);
    let req = StreamRequest {
        service: import.name.clone(),
        namespace: import.namespace.clone(),
        port: info.port.into(),
        endpoint: None,
    };
    let timeout = shared.config.tunnel.connect_timeout.0;
    let early = early_bytes(&tcp);
    for cluster in &import.clusters {
        let labels = [
            ("service", info.service.as_str()),
            ("peer", cluster.as_str()),
        ];
        let opened = match shared.peers.get(cluster).and_then(|p| p.connection()) {
            Some(conn) => open_stream(&conn, &req, &early, timeout).await,
            None => Err(OpenError::PeerDown),
        };
        match opened {
            Ok((send, recv)) => {
                shared
                    .metrics
                    .histogram("strait_connect_duration_seconds", &[("peer", cluster)])
                    .record(started.elapsed().as_secs_f64());
                splice::splice_counted(
                    &shared.metrics,
                    &info.service,
                    cluster,
                    splice::Side::Outbound,
                    (tcp, send, recv),
                    shared.config.tunnel.copy_buffer.0 as usize,
                    early.len() as u64,
                )
                .await;
                return;
            }
            Err(e) => {
                shared
                    .metrics
                    .counter(
                        "strait_streams_failed_total",
                        &[labels[0], labels[1], ("reason", e.label())],
                    )
                    .increment(1);
                tracing::info!(peer = %cluster, error = %e, "stream to peer failed");
                if !e.retryable() {
                    break;
                }
            }
        }
    }
    // Nothing could serve the connection: reset it so the client fails fast, not on a timeout.
    splice::abort_on_close(&tcp);
}

/// Most bytes read ahead of the stream header.
const EARLY_MAX: usize = 16 << 10;

/// Whatever the client has already sent, read without waiting (a server-speaks-first
/// protocol sends nothing, and must not be delayed). These bytes ride in the same packet
/// as the stream header. Resending them to the next cluster after a refusal is safe: a
/// remote that refuses never connects an endpoint, so they were delivered nowhere.
fn early_bytes(tcp: &TcpStream) -> Bytes {
    let mut buf = BytesMut::with_capacity(EARLY_MAX);
    match tcp.try_read_buf(&mut buf) {
        Ok(_) => buf.freeze(),
        // WouldBlock (nothing yet) or an error the splice will meet again on its first read.
        Err(_) => Bytes::new(),
    }
}
