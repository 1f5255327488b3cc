//! Serving peers: accept tunnel connections, read each stream's header, authorize it
//! against this cluster's exports, connect to an endpoint, then splice.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use quinn::{Connection, Incoming, RecvStream, SendStream, VarInt};
use strait_common::config::Export;
use strait_common::pki::peer_id;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tracing::Instrument;

use super::header::{Status, StreamRequest, StreamResponse};
use super::limits::{Admitted, CallerLimiter, Limited};
use super::outbound::{read_frame, respond};
use super::splice::Side;
use super::{StreamMetrics, codes, splice};
use crate::desired::Exports;
use crate::lifetime::Lifetime;
use crate::metrics::{Desc, Registry};

const HANDSHAKES_REJECTED: Desc = Desc::counter(
    "strait_handshakes_rejected_total",
    &[],
    "Inbound tunnel handshakes refused (bad or missing certificate, wrong identity, timeout).",
);
const HEADERS_REJECTED: Desc = Desc::counter(
    "strait_stream_headers_rejected_total",
    &["peer"],
    "Inbound streams whose header was malformed or late, by peer cluster.",
);
const SHED: Desc = Desc::counter(
    "strait_handshakes_shed_total",
    &["action"],
    "Inbound handshakes met under load: retry (asked to prove their address first, above tunnel.retry_above handshakes in progress) or refuse (beyond tunnel.max_handshakes).",
);
const LIMITED: Desc = Desc::counter(
    "strait_inbound_limited_total",
    &["caller", "service", "limit"],
    "Inbound streams refused as overloaded because the calling cluster was over its configured limit (limit: rate or concurrency), by caller cluster and service.",
);
/// The inbound side's metrics (besides the stream metrics it shares with the listeners).
pub(crate) const METRICS: &[Desc] = &[HANDSHAKES_REJECTED, HEADERS_REJECTED, SHED, LIMITED];

/// What the inbound side counts.
#[derive(Clone)]
pub struct InboundMetrics {
    registry: Registry,
    handshakes_rejected: metrics::Counter,
    streams: StreamMetrics,
}

impl InboundMetrics {
    /// The inbound metrics in `registry`; `streams` are shared with the listeners.
    pub fn new(registry: &Registry, streams: StreamMetrics) -> Self {
        registry.describe(METRICS);
        Self {
            registry: registry.clone(),
            handshakes_rejected: registry.counter(&HANDSHAKES_REJECTED, &[]),
            streams,
        }
    }

    fn shed(&self, action: &str) {
        self.registry.counter(&SHED, &[action]).increment(1);
    }

    fn limited(&self, caller: &str, service: &str, limit: Limited) {
        self.registry
            .counter(&LIMITED, &[caller, service, limit.label()])
            .increment(1);
    }

    fn header_rejected(&self, peer: &str) {
        self.registry
            .counter(&HEADERS_REJECTED, &[peer])
            .increment(1);
    }
}

/// Limits of the inbound side.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Handshake and stream-header deadline (`tunnel.connect_timeout`).
    pub handshake_timeout: Duration,
    /// Deadline for connecting one endpoint (`tunnel.endpoint_connect_timeout`).
    pub endpoint_connect_timeout: Duration,
    /// Largest read from the endpoint per write to the stream (`tunnel.copy_buffer`).
    pub copy_buffer: usize,
    /// Handshakes in progress above which new ones must prove their address first.
    pub retry_above: usize,
    /// Handshakes in progress at most.
    pub max_handshakes: usize,
    /// Streams a peer may have open on one connection (`tunnel.max_concurrent_streams`):
    /// the most its [stream credit](raised_credit) grows to.
    pub max_concurrent_streams: u32,
}

/// The serving side of the tunnel: authorizes each peer stream against this cluster's
/// exports (from the desired state) and connects it to an endpoint.
pub struct Inbound {
    exports: Exports,
    /// Bounds inbound streams; beyond it peers are told `overloaded`.
    streams: Arc<Semaphore>,
    /// Round-robin cursor over endpoints.
    next_endpoint: AtomicUsize,
    limits: Limits,
    metrics: InboundMetrics,
    /// Whether a drill has killed the tunnel (connections are dropped at once).
    killed: watch::Receiver<bool>,
    /// Whether the gateway drains: peers are told to go away, new streams refused.
    draining: watch::Receiver<bool>,
    /// The stream limit (the semaphore's size).
    max_streams: usize,
    /// Per calling cluster budgets (`limits:`).
    callers: CallerLimiter,
    /// Handshakes in progress.
    handshaking: Arc<AtomicUsize>,
}

impl Inbound {
    /// The inbound side: `max_streams` concurrent streams at most.
    pub fn new(
        exports: Exports,
        max_streams: usize,
        limits: Limits,
        metrics: InboundMetrics,
        killed: watch::Receiver<bool>,
        draining: watch::Receiver<bool>,
    ) -> Self {
        Self {
            exports,
            streams: Arc::new(Semaphore::new(max_streams)),
            max_streams,
            draining,
            next_endpoint: AtomicUsize::new(0),
            limits,
            metrics,
            killed,
            callers: CallerLimiter::default(),
            handshaking: Arc::default(),
        }
    }

    /// Peer streams connected to an endpoint now.
    pub fn open_streams(&self) -> usize {
        self.max_streams
            .saturating_sub(self.streams.available_permits())
    }

    /// Accepts tunnel connections until the endpoint closes or `life` ends.
    pub async fn accept_loop(self: Arc<Self>, endpoint: quinn::Endpoint, life: Lifetime) {
        while let Some(incoming) = endpoint.accept().await {
            let Some(incoming) = self.admit_handshake(incoming) else {
                continue;
            };
            let me = self.clone();
            let counted = Handshaking::new(&self.handshaking);
            life.spawn(async move { me.serve_connection(incoming, counted).await });
        }
    }

    /// Under a handshake flood: above `retry_above` handshakes in progress a new one must
    /// first prove its source address (a stateless QUIC retry), beyond `max_handshakes` it
    /// is refused. The handshake to serve, if any.
    fn admit_handshake(&self, incoming: Incoming) -> Option<Incoming> {
        let now = self.handshaking.load(Ordering::Relaxed);
        if now >= self.limits.max_handshakes {
            self.metrics.shed("refuse");
            incoming.refuse();
            return None;
        }
        if now >= self.limits.retry_above && !incoming.remote_address_validated() {
            self.metrics.shed("retry");
            // A client that cannot be asked again (it already answered a retry) is served.
            if incoming.may_retry() {
                let _ = incoming.retry();
                return None;
            }
        }
        Some(incoming)
    }

    async fn serve_connection(self: Arc<Self>, incoming: Incoming, counted: Handshaking) {
        let remote = incoming.remote_address();
        let conn = match tokio::time::timeout(self.limits.handshake_timeout, incoming).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return self.reject_handshake(remote, &e.to_string()),
            Err(_) => return self.reject_handshake(remote, "handshake timed out"),
        };
        drop(counted);
        let Some(peer) = peer_cluster(&conn) else {
            conn.close(codes::BAD_IDENTITY, b"no gateway identity");
            return self
                .reject_handshake(remote, "verified certificate carries no gateway identity");
        };
        let span = tracing::info_span!("inbound", peer = %peer, %remote);
        let mut killed = self.killed.clone();
        let mut draining = self.draining.clone();
        let mut told = false;
        let max = self.limits.max_concurrent_streams;
        let mut credit = super::initial_stream_credit(max);
        // One reference per stream being served.
        let open = Arc::new(());
        let streams = async {
            tracing::debug!("peer connected");
            loop {
                let accepted = tokio::select! {
                    a = conn.accept_bi() => a,
                    // A killed tunnel drops its connections; the socket is already silent, so
                    // the peer is not told.
                    _ = killed.wait_for(|k| *k) => {
                        conn.close(codes::SHUTDOWN, b"tunnel killed by a drill");
                        return;
                    }
                    // Draining: the peer is told to open no new streams here (those open
                    // finish); it is told on connections made during the drain too.
                    Ok(_) = draining.wait_for(|d| *d), if !told => {
                        told = true;
                        tokio::spawn(go_away(conn.clone()).in_current_span());
                        continue;
                    }
                };
                match accepted {
                    Ok((send, recv)) => {
                        // Counted until the peer's credit for it comes back: once the
                        // peer has all of it (our FIN or reset acknowledged). A few round
                        // trips after it ends stand for that: quinn reports no reset's
                        // acknowledgement, and a `stopped()` waiter on a reset stream
                        // stays in its map as long as the connection lives.
                        let serving = open.clone();
                        let ack_wait = conn.rtt() * 3 + ACK_WAIT;
                        // This stream included.
                        let now_open =
                            u32::try_from(Arc::strong_count(&open) - 1).unwrap_or(u32::MAX);
                        if let Some(more) = raised_credit(credit, now_open, max) {
                            credit = more;
                            conn.set_max_concurrent_bi_streams(VarInt::from_u32(more));
                        }
                        let me = self.clone();
                        let peer = peer.clone();
                        tokio::spawn(
                            async move {
                                me.serve_stream(peer, send, recv).await;
                                tokio::time::sleep(ack_wait).await;
                                drop(serving);
                            }
                            .in_current_span(),
                        );
                    }
                    Err(e) => {
                        tracing::debug!(reason = %e, "peer connection ended");
                        return;
                    }
                }
            }
        };
        // Liveness probes ride along: the peer sends small datagrams and expects each one
        // back, for as long as the connection is served.
        let echo = async {
            echo_probes(conn.clone()).await;
            // The connection decides when serving ends, not the probes.
            std::future::pending::<()>().await
        };
        async {
            tokio::select! {
                () = streams => {}
                () = echo => {}
            }
        }
        .instrument(span)
        .await
    }

    fn reject_handshake(&self, remote: SocketAddr, reason: &str) {
        self.metrics.handshakes_rejected.increment(1);
        tracing::warn!(%remote, %reason, "tunnel handshake refused");
    }

    async fn serve_stream(&self, peer: String, mut send: SendStream, mut recv: RecvStream) {
        let req: StreamRequest = match tokio::time::timeout(
            self.limits.handshake_timeout,
            read_frame(&mut recv),
        )
        .await
        {
            Ok(Ok(req)) => req,
            Ok(Err(e)) => return self.reject_header(&peer, &e.to_string(), send, recv),
            Err(_) => return self.reject_header(&peer, "no header in time", send, recv),
        };
        let service = format!("{}/{}", req.namespace, req.service);
        let connected = if *self.draining.borrow() {
            // A stream that crossed the GOAWAY: the peer tries a sibling or elsewhere.
            Err(StreamResponse::new(Status::Draining, "gateway draining"))
        } else {
            self.connect_endpoint(&peer, &req).await
        };
        let (tcp, _permit, _admitted) = match connected {
            Ok(ok) => ok,
            Err(resp) => {
                tracing::info!(%service, status = resp.status().label(), detail = %resp.detail, "stream refused");
                // The name is the caller's: one this cluster does not export is not a label
                // value (the series would be unbounded).
                let exported = self
                    .exports
                    .now()
                    .iter()
                    .any(|e| e.name == req.service && e.namespace == req.namespace);
                let label = if exported {
                    service.as_str()
                } else {
                    "(unknown)"
                };
                self.metrics
                    .streams
                    .failed(label, &peer, Side::Inbound, resp.status().label());
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
            &self.metrics.streams,
            &service,
            &peer,
            splice::Side::Inbound,
            (tcp, send, recv),
            self.limits.copy_buffer,
            0,
        )
        .await;
    }

    fn reject_header(&self, peer: &str, reason: &str, mut send: SendStream, mut recv: RecvStream) {
        self.metrics.header_rejected(peer);
        tracing::warn!(%reason, "stream header rejected");
        let _ = send.reset(codes::BAD_HEADER);
        let _ = recv.stop(codes::BAD_HEADER);
    }

    /// Authorizes the request and connects to an endpoint; the answer to send on refusal.
    async fn connect_endpoint(
        &self,
        peer: &str,
        req: &StreamRequest,
    ) -> Result<(TcpStream, tokio::sync::OwnedSemaphorePermit, Admitted), StreamResponse> {
        // The exports as they are now (they change with the config file or the cluster).
        let exports = self.exports.now();
        let (export, target) = authorize(&exports, peer, req)?;
        let service = format!("{}/{}", req.namespace, req.service);
        let limit = self.exports.limits().for_caller(peer, &service);
        let admitted = self
            .callers
            .admit(peer, &service, limit, std::time::Instant::now())
            .map_err(|l| {
                self.metrics.limited(peer, &service, l);
                StreamResponse::new(
                    Status::Overloaded,
                    format!("{peer} is over its {} limit for {service}", l.label()),
                )
            })?;
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            StreamResponse::new(Status::Overloaded, "gateway at its inbound stream limit")
        })?;
        let candidates = candidates(export, req.endpoint.as_deref(), &self.next_endpoint);
        if candidates.is_empty() {
            return Err(StreamResponse::new(
                Status::NoEndpoints,
                format!("{}/{} has no ready endpoint", req.namespace, req.service),
            ));
        }
        let timeout = self.limits.endpoint_connect_timeout;
        let mut last = String::new();
        for ip in candidates {
            let addr = SocketAddr::new(ip, target);
            match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    return Ok((tcp, permit, admitted));
                }
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: timed out after {timeout:?}"),
            }
            tracing::debug!(endpoint = %addr, error = %last, "endpoint connect failed");
        }
        Err(StreamResponse::new(Status::ConnectFailed, last))
    }
}

/// The export a stream asks for and the endpoints' target port, if `peer` may have it.
/// An unknown service and one not exported to the caller look the same, so peers cannot
/// probe for names they are not allowed to see.
fn authorize<'a>(
    exports: &'a [Export],
    peer: &str,
    req: &StreamRequest,
) -> Result<(&'a Export, u16), StreamResponse> {
    let export = exports
        .iter()
        .find(|e| e.name == req.service && e.namespace == req.namespace)
        .filter(|e| e.exported_to(peer))
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
    Ok((export, port.target()))
}

/// Besides three round trips, how long a served stream stays counted after it ended: the
/// peer acknowledging its end (quinn delays acknowledgements up to 25 ms).
const ACK_WAIT: Duration = Duration::from_millis(50);

/// The stream credit of a peer's connection once a stream was accepted with `open` in use
/// (this one included; a stream counts until a little after the peer has all of it), if
/// it grows: doubled, up to `max`, when half of `granted` is in use. The peer has the other
/// half while the new limit travels to it; a burst beyond that waits about a round trip
/// for it (within `tunnel.connect_timeout`, like any stream being opened).
fn raised_credit(granted: u32, open: u32, max: u32) -> Option<u32> {
    (open.saturating_mul(2) >= granted && granted < max).then(|| granted.saturating_mul(2).min(max))
}

/// One handshake in progress, counted until dropped.
struct Handshaking(Arc<AtomicUsize>);

impl Handshaking {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Handshaking(count.clone())
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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

/// The cluster id from the peer's verified certificate.
fn peer_cluster(conn: &Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    peer_id(certs.first()?).ok().map(|id| id.cluster)
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

/// Tells the peer on `conn` that this gateway is draining: a unidirectional stream with
/// [`super::GOAWAY`].
async fn go_away(conn: quinn::Connection) {
    let sent = async {
        // Bounded: a peer that allows no stream (an older version) is told nothing here
        // (it learns from the `draining` answer, or gossip).
        let mut s = tokio::time::timeout(Duration::from_secs(2), conn.open_uni()).await??;
        s.write_all(super::GOAWAY).await?;
        s.finish()?;
        anyhow::Ok(())
    };
    if let Err(e) = sent.await {
        tracing::debug!(error = %e, "could not tell the peer this gateway drains");
    }
}

#[cfg(test)]
mod tests {
    use strait_common::config::{Endpoint, Protocol, ServicePort};
    use tokio::net::TcpListener;

    use super::*;

    fn export(name: &str, export_to: &[&str], endpoints: Vec<Endpoint>, target: u16) -> Export {
        Export {
            name: name.into(),
            namespace: "shop".into(),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                target_port: Some(target),
                protocol: Protocol::default(),
            }],
            endpoints,
            export_to: export_to.iter().map(|c| c.to_string()).collect(),
            weight: 1,
            headless: false,
            session_affinity: None,
            exported_at_ms: 0,
            selection: Default::default(),
        }
    }

    fn endpoint(address: &str, hostname: Option<&str>, ready: bool) -> Endpoint {
        Endpoint {
            address: address.parse().unwrap(),
            hostname: hostname.map(str::to_owned),
            ready,
        }
    }

    fn request(name: &str, port: u32, endpoint: Option<&str>) -> StreamRequest {
        StreamRequest {
            service: name.into(),
            namespace: "shop".into(),
            port,
            endpoint: endpoint.map(str::to_owned),
        }
    }

    fn desired(exports: Vec<Export>) -> crate::desired::Desired {
        crate::desired::Desired {
            exports: Arc::new(exports),
            ..Default::default()
        }
    }

    fn status(r: Result<impl Sized, StreamResponse>) -> Status {
        match r {
            Ok(_) => Status::Ok,
            Err(resp) => resp.status(),
        }
    }

    #[test]
    fn only_callers_a_service_is_exported_to_get_it_and_unknown_names_look_the_same() {
        let d = vec![export("web", &["west"], vec![], 8080)];
        let (e, target) = authorize(&d, "west", &request("web", 80, None)).unwrap();
        assert_eq!((e.name.as_str(), target), ("web", 8080));
        let refused = authorize(&d, "east", &request("web", 80, None)).unwrap_err();
        let unknown = authorize(&d, "east", &request("nope", 80, None)).unwrap_err();
        assert_eq!(refused.status(), Status::Forbidden);
        assert_eq!(unknown.status(), Status::Forbidden);
        assert_eq!(
            status(authorize(&d, "west", &request("web", 81, None))),
            Status::NoEndpoints,
            "no such port"
        );
        assert_eq!(
            status(authorize(&d, "west", &request("web", 1 << 20, None))),
            Status::NoEndpoints,
            "a port number beyond u16 is no port"
        );
    }

    /// An inbound side serving `exports`, at most `max` streams.
    fn inbound(
        exports: Vec<Export>,
        max: usize,
    ) -> (Inbound, watch::Sender<Arc<crate::desired::Desired>>) {
        let (tx, rx) = watch::channel(Arc::new(desired(exports)));
        let registry = Registry::new();
        let inbound = Inbound::new(
            Exports::new(rx),
            max,
            Limits {
                handshake_timeout: Duration::from_secs(1),
                endpoint_connect_timeout: Duration::from_secs(1),
                copy_buffer: 16 << 10,
                retry_above: 64,
                max_handshakes: 1024,
                max_concurrent_streams: 16,
            },
            InboundMetrics::new(&registry, StreamMetrics::new(&registry)),
            watch::channel(false).1,
            watch::channel(false).1,
        );
        (inbound, tx)
    }

    /// Which backend a connection reached: the port of its local end as the server saw it.
    async fn reached(listeners: &[TcpListener], tcp: &TcpStream) -> usize {
        let mine = tcp.local_addr().unwrap();
        for (i, l) in listeners.iter().enumerate() {
            if let Ok(Ok((_, peer))) =
                tokio::time::timeout(Duration::from_millis(200), l.accept()).await
                && peer == mine
            {
                return i;
            }
        }
        panic!("no backend accepted {mine}");
    }

    #[tokio::test]
    async fn streams_reach_ready_endpoints_in_turn_and_fail_over_between_them() {
        // Two backends on one port number: 127.0.0.2 and 127.0.0.3 (loopback aliases).
        let a = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = a.local_addr().unwrap().port();
        let b = TcpListener::bind(("127.0.0.3", port)).await.unwrap();
        let endpoints = vec![
            endpoint("127.0.0.2", Some("pod-a"), true),
            endpoint("127.0.0.3", Some("pod-b"), true),
            endpoint("127.0.0.4", Some("pod-c"), false),
        ];
        let (inbound, exports) = inbound(vec![export("web", &["*"], endpoints, port)], 4);
        let backends = [a, b];
        let mut seen = Vec::new();
        for _ in 0..2 {
            let (tcp, _permit, _admitted) = inbound
                .connect_endpoint("west", &request("web", 80, None))
                .await
                .unwrap();
            seen.push(reached(&backends, &tcp).await);
        }
        seen.sort();
        assert_eq!(seen, vec![0, 1], "round robin over the ready endpoints");

        // A headless request names its endpoint, by hostname or address, and gets only it.
        for name in ["pod-b", "127.0.0.3"] {
            let (tcp, _permit, _admitted) = inbound
                .connect_endpoint("west", &request("web", 80, Some(name)))
                .await
                .unwrap();
            assert_eq!(reached(&backends, &tcp).await, 1);
        }
        let unready = inbound
            .connect_endpoint("west", &request("web", 80, Some("pod-c")))
            .await;
        assert_eq!(
            status(unready),
            Status::NoEndpoints,
            "unready endpoints are never used"
        );

        // One backend gone: the next one answers; both gone: connect-failed.
        let [a, b] = backends;
        drop(a);
        for _ in 0..2 {
            let (tcp, _permit, _admitted) = inbound
                .connect_endpoint("west", &request("web", 80, None))
                .await
                .unwrap();
            assert_eq!(reached(std::slice::from_ref(&b), &tcp).await, 0);
        }
        drop(b);
        let failed = inbound
            .connect_endpoint("west", &request("web", 80, None))
            .await;
        assert_eq!(status(failed), Status::ConnectFailed);

        // The exports follow the desired state.
        exports.send_replace(Arc::new(desired(vec![])));
        let gone = inbound
            .connect_endpoint("west", &request("web", 80, None))
            .await;
        assert_eq!(status(gone), Status::Forbidden, "withdrawn");
    }

    #[test]
    fn stream_credit_doubles_at_half_use_up_to_the_limit() {
        assert_eq!(
            raised_credit(256, 127, 16_384),
            None,
            "less than half in use"
        );
        assert_eq!(raised_credit(256, 128, 16_384), Some(512));
        assert_eq!(raised_credit(512, 300, 16_384), Some(1024));
        assert_eq!(raised_credit(8192, 4096, 10_000), Some(10_000), "capped");
        assert_eq!(raised_credit(10_000, 9_999, 10_000), None, "at the limit");
        assert_eq!(
            raised_credit(16, 16, 16),
            None,
            "a low limit is granted whole"
        );
        assert_eq!(
            raised_credit(u32::MAX / 2 + 1, u32::MAX, u32::MAX),
            Some(u32::MAX)
        );
    }

    #[tokio::test]
    async fn beyond_the_stream_limit_callers_are_told_overloaded() {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = backend.local_addr().unwrap().port();
        let endpoints = vec![endpoint("127.0.0.1", None, true)];
        let (inbound, _exports) = inbound(vec![export("web", &["*"], endpoints, port)], 1);
        let held = inbound
            .connect_endpoint("west", &request("web", 80, None))
            .await
            .unwrap();
        let over = inbound
            .connect_endpoint("west", &request("web", 80, None))
            .await;
        assert_eq!(status(over), Status::Overloaded);
        drop(held);
        assert!(
            inbound
                .connect_endpoint("west", &request("web", 80, None))
                .await
                .is_ok(),
            "the permit is returned with the stream"
        );
    }
}
