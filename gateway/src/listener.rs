//! Service listeners: a local TCP address per imported service port, forwarding each
//! accepted connection through the tunnel to a cluster that serves the service.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::Instrument;

use crate::desired::{Desired, Exports, Import};
use crate::lifetime::Lifetime;
use crate::metrics::{Desc, Registry};
use crate::router::Outcome;
use crate::routing::{RetryReason, Routing};
use crate::tunnel::StreamMetrics;
use crate::tunnel::header::{Status, StreamRequest};
use crate::tunnel::outbound::{OpenError, open_stream_until};
use crate::tunnel::peers::{OpenGuard, PeerHandle, PeerSet, attempt_order};
use crate::tunnel::splice::{self, Side};

const CONNECT_DURATION: Desc = Desc::histogram(
    "strait_connect_duration_seconds",
    &["peer"],
    "Time from accepting a client connection to the remote gateway's ok, by peer cluster.",
);
const ROUTED: Desc = Desc::counter(
    "strait_route_connections_total",
    &["service", "cluster"],
    "Client connections served, by service and the cluster that served them.",
);
const UNSERVED: Desc = Desc::counter(
    "strait_route_unserved_total",
    &["service"],
    "Client connections no cluster could serve (the client was reset).",
);
/// The listeners' metrics (besides the stream metrics they share with inbound).
pub(crate) const METRICS: &[Desc] = &[CONNECT_DURATION, ROUTED, UNSERVED];

/// What the listeners count.
#[derive(Clone)]
pub struct ListenerMetrics {
    registry: Registry,
    streams: StreamMetrics,
}

impl ListenerMetrics {
    /// The listener metrics in `registry`; `streams` are shared with the inbound side.
    pub fn new(registry: &Registry, streams: StreamMetrics) -> Self {
        registry.describe(METRICS);
        Self {
            registry: registry.clone(),
            streams,
        }
    }

    fn served(&self, service: &str, cluster: &str, took: Duration) {
        self.registry
            .histogram(&CONNECT_DURATION, &[cluster])
            .record(took.as_secs_f64());
        self.registry
            .counter(&ROUTED, &[service, cluster])
            .increment(1);
    }

    fn unserved(&self, service: &str) {
        self.registry.counter(&UNSERVED, &[service]).increment(1);
    }
}

/// What forwarding a client connection needs: where to route it, how to reach peers, and
/// what to count.
pub struct Forwarding {
    /// Per-connection plans and outcomes.
    pub routing: Routing,
    /// Tunnels to peer gateways.
    pub peers: Arc<dyn PeerSet>,
    /// What to count.
    pub metrics: ListenerMetrics,
    /// Largest read from the client per write to the stream (`tunnel.copy_buffer`).
    pub copy_buffer: usize,
    /// This cluster's exports, for connections routed to this cluster itself (Kubernetes
    /// mode imports a cluster's own services too, as the MCS API does).
    pub local: Exports,
    /// How long dialling a local endpoint may take.
    pub connect_timeout: Duration,
    /// Listeners are shared with this cluster's other replicas on the host
    /// (`SO_REUSEPORT`): each import's address is served by whichever replica the kernel
    /// picks.
    pub shared_ports: bool,
    /// Client connections accepted and not yet finished (a drain waits for them).
    pub open: Arc<std::sync::atomic::AtomicUsize>,
}

/// A TCP listener on `addr`; `shared` with other replicas on this host (`SO_REUSEPORT`).
pub(crate) fn bind_tcp(addr: SocketAddr, shared: bool) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if shared {
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// One bound listener, as reported by the admin API.
pub use strait_common::api::Listener as BoundListener;

/// A listener's identity: service, port, and for headless services the endpoint.
type Key = (String, u16, Option<String>);

/// The service listeners of a gateway, keyed by (service, port, endpoint). The set
/// follows the desired imports: new imports are bound, withdrawn ones closed, and the
/// cluster order of existing ones updated in place. Cheap to clone: clones share it.
#[derive(Clone)]
pub struct Listeners(Arc<Inner>);

struct Inner {
    bound: Mutex<BTreeMap<Key, Active>>,
    forwarding: Arc<Forwarding>,
    life: Lifetime,
    /// Closed for good (a drain): nothing is bound again.
    closed: std::sync::atomic::AtomicBool,
}

struct Active {
    address: SocketAddr,
    import: Arc<ArcSwap<Import>>,
    life: Lifetime,
}

impl Listeners {
    /// No listeners yet; each one bound later accepts within `life`.
    pub fn new(forwarding: Forwarding, life: Lifetime) -> Self {
        Listeners(Arc::new(Inner {
            bound: Mutex::new(BTreeMap::new()),
            forwarding: Arc::new(forwarding),
            life,
            closed: Default::default(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Active>> {
        self.0.bound.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What is bound now.
    pub fn snapshot(&self) -> Vec<BoundListener> {
        self.lock()
            .iter()
            .map(|((service, port, endpoint), a)| BoundListener {
                service: service.clone(),
                port: *port,
                address: a.address,
                clusters: a.import.load().clusters.clone(),
                endpoint: endpoint.clone(),
            })
            .collect()
    }

    /// The local address of an imported service port (the ClusterSetIP listener).
    pub fn address(&self, service: &str, port: u16) -> Option<SocketAddr> {
        self.lock()
            .get(&(service.to_owned(), port, None))
            .map(|a| a.address)
    }

    /// Stops accepting on every listener, for good (a drain): connections already
    /// accepted go on. How many were open.
    pub fn close(&self) -> usize {
        self.0
            .closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut bound = self.lock();
        for a in bound.values() {
            a.life.stop();
        }
        let n = bound.len();
        tracing::info!(listeners = n, "service listeners closed");
        bound.clear();
        n
    }

    /// Client connections accepted and not yet finished, every listener together.
    pub fn open_connections(&self) -> usize {
        self.0
            .forwarding
            .open
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Listeners bound now.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Makes the bound set equal to `desired`. Returns the listeners that could not be
    /// bound (the rest are serving).
    pub async fn reconcile(&self, desired: &[Import]) -> Vec<anyhow::Error> {
        if self.0.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return Vec::new();
        }
        let mut wanted: BTreeMap<Key, (&Import, u16)> = BTreeMap::new();
        for imp in desired {
            let endpoint = imp
                .endpoint
                .map(|e| format!("{}/{e}", imp.clusters.join(",")));
            for p in &imp.ports {
                wanted.insert(
                    (
                        format!("{}/{}", imp.namespace, imp.name),
                        p.port,
                        endpoint.clone(),
                    ),
                    (imp, p.listen),
                );
            }
        }
        let mut to_bind = Vec::new();
        {
            let mut active = self.lock();
            active.retain(|key, a| {
                // Rebound when its address or (a fixed) port changes.
                let keep = wanted.get(key).is_some_and(|(imp, port)| {
                    imp.listen_on == a.address.ip() && (*port == 0 || *port == a.address.port())
                });
                if !keep {
                    a.life.stop();
                    tracing::info!(service = %key.0, port = key.1, "listener closed");
                }
                keep
            });
            for (key, (imp, local_port)) in &wanted {
                match active.get(key) {
                    Some(a) => {
                        if **a.import.load() != **imp {
                            a.import.store(Arc::new((*imp).clone()));
                        }
                    }
                    None => to_bind.push((key.clone(), (*imp).clone(), *local_port)),
                }
            }
        }
        let mut errors = Vec::new();
        for ((service, port, endpoint), imp, local_port) in to_bind {
            let addr = SocketAddr::new(imp.listen_on, local_port);
            let listener = match bind_tcp(addr, self.0.forwarding.shared_ports) {
                Ok(l) => l,
                Err(e) => {
                    errors.push(anyhow::anyhow!(
                        "binding listener {addr} for imported service {service}: {e}; fix: {}",
                        strait_common::config::bind_fix(&e)
                    ));
                    continue;
                }
            };
            let Ok(address) = listener.local_addr() else {
                continue;
            };
            tracing::info!(%service, port, %address, clusters = ?imp.clusters, "listener open");
            let import = Arc::new(ArcSwap::from_pointee(imp));
            let info = Arc::new(BoundListener {
                service: service.clone(),
                port,
                address,
                clusters: Vec::new(),
                endpoint: endpoint.clone(),
            });
            let mut bound = self.lock();
            if self.0.closed.load(std::sync::atomic::Ordering::Relaxed) {
                // Closed while it was being bound.
                return errors;
            }
            let life = self.0.life.child();
            life.spawn(serve(
                self.0.forwarding.clone(),
                info,
                listener,
                import.clone(),
            ));
            bound.insert(
                (service, port, endpoint),
                Active {
                    address,
                    import,
                    life,
                },
            );
        }
        errors
    }

    /// Keeps the bound set equal to the desired imports until the gateway stops. A
    /// listener that could not bind (its address still in use, say) is retried every
    /// second rather than at the next change, which may never come.
    pub async fn follow(self, mut desired: watch::Receiver<Arc<Desired>>) {
        loop {
            let d = desired.borrow_and_update().clone();
            let errors = self.reconcile(&d.imports).await;
            for e in &errors {
                tracing::error!(error = %e, "listener not opened; retrying");
            }
            let retry = !errors.is_empty();
            tokio::select! {
                r = desired.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
            }
        }
    }
}

/// Accepts connections on one listener until it is closed.
async fn serve(
    fwd: Arc<Forwarding>,
    info: Arc<BoundListener>,
    listener: TcpListener,
    import: Arc<ArcSwap<Import>>,
) {
    loop {
        match listener.accept().await {
            Ok((tcp, client)) => {
                let span = tracing::info_span!("outbound", service = %info.service, port = info.port, %client);
                // Counted from the accept to the end of forwarding: a drain waits for it.
                let open = OpenGuard::count(&fwd.open);
                let forwarded = forward(fwd.clone(), info.clone(), import.load_full(), tcp);
                tokio::spawn(
                    async move {
                        forwarded.await;
                        drop(open);
                    }
                    .instrument(span),
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
    fwd: Arc<Forwarding>,
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
        endpoint: import.endpoint.map(|e| e.to_string()),
    };
    let service = info.service.as_str();
    let routing = &fwd.routing;
    let plan = routing.plan(service, &import.clusters);
    let early = early_bytes(&tcp);
    // Bytes the client already sent ride with the request only when no retry can follow
    // (or the policy allows replays): an attempt that times out may have delivered them.
    // A cluster of several replicas is a retry too (its next replica).
    let retries = plan.attempts.len() > 1
        || plan
            .attempts
            .first()
            .is_some_and(|c| fwd.peers.replicas(c).len() > 1);
    let eager = !retries || plan.early_data;
    let with_request: &[u8] = if eager { &early } else { &[] };
    let mut retry = None;
    for cluster in &plan.attempts {
        if let Some(reason) = retry
            && !routing.may_retry(service, reason)
        {
            break;
        }
        let held = routing.hold(service, cluster);
        if cluster == routing.me() {
            match dial_local(&fwd, &import, info.port, &early).await {
                Ok(endpoint) => {
                    routing.record(service, cluster, Outcome::Success);
                    fwd.metrics.served(service, cluster, started.elapsed());
                    let mut tcp = tcp;
                    let mut endpoint = endpoint;
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut endpoint).await;
                    drop(held);
                    return;
                }
                Err(e) => {
                    drop(held);
                    routing.record(service, cluster, Outcome::Failure);
                    tracing::info!(%service, error = %e, "no local endpoint answered");
                    retry = Some(RetryReason::Failed);
                    continue;
                }
            }
        }
        let replay_ok = with_request.is_empty() || plan.early_data;
        let opened = open_on(
            &*fwd.peers,
            cluster,
            &req,
            with_request,
            plan.timeout,
            replay_ok,
        )
        .await;
        match opened {
            Ok((mut send, recv, _on_replica)) => {
                routing.record(service, cluster, Outcome::Success);
                fwd.metrics.served(service, cluster, started.elapsed());
                if !eager && !early.is_empty() && send.write_all(&early).await.is_err() {
                    splice::abort_on_close(&tcp);
                    return;
                }
                splice::splice_counted(
                    &fwd.metrics.streams,
                    service,
                    cluster,
                    splice::Side::Outbound,
                    (tcp, send, recv),
                    fwd.copy_buffer,
                    early.len() as u64,
                )
                .await;
                drop(held);
                return;
            }
            Err(e) => {
                drop(held);
                let peer_down = matches!(e, OpenError::PeerDown | OpenError::Abandoned)
                    || !routing.peer_routable(cluster);
                // A dead gateway is gateway liveness, not this path's fault: it does not
                // count towards ejecting the path.
                if !peer_down {
                    routing.record(service, cluster, Outcome::Failure);
                }
                fwd.metrics
                    .streams
                    .failed(service, cluster, Side::Outbound, e.label());
                tracing::info!(peer = %cluster, error = %e, "stream to peer failed");
                // Never replay: bytes that may have been delivered end the connection here.
                let replay = e.ambiguous() && !with_request.is_empty() && !plan.early_data;
                if !e.retryable() || replay {
                    break;
                }
                retry = Some(if peer_down {
                    RetryReason::PeerDown
                } else {
                    RetryReason::Failed
                });
            }
        }
    }
    fwd.metrics.unserved(service);
    // Nothing could serve the connection: reset it so the client fails fast, not on a timeout.
    splice::abort_on_close(&tcp);
}

/// Connects to a ready endpoint of this cluster's own export of `import` on service port
/// `port` (a random one), and sends it the bytes the client already sent.
async fn dial_local(
    fwd: &Forwarding,
    import: &Import,
    port: u16,
    early: &[u8],
) -> std::io::Result<TcpStream> {
    use rand::seq::IndexedRandom;
    use tokio::io::AsyncWriteExt;
    let exports = fwd.local.now();
    let unavailable =
        |what: &str| std::io::Error::new(std::io::ErrorKind::NotFound, what.to_owned());
    let export = exports
        .iter()
        .find(|e| e.namespace == import.namespace && e.name == import.name)
        .ok_or_else(|| unavailable("not exported here"))?;
    let target = export
        .port(port)
        .ok_or_else(|| unavailable("no such port"))?
        .target();
    let ready: Vec<_> = export.endpoints.iter().filter(|e| e.ready).collect();
    let endpoint = ready
        .choose(&mut rand::rng())
        .ok_or_else(|| unavailable("no ready endpoint"))?;
    let addr = SocketAddr::new(endpoint.address, target);
    let mut s = tokio::time::timeout(fwd.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connecting {addr}"))
        })??;
    let _ = s.set_nodelay(true);
    s.write_all(early).await?;
    Ok(s)
}

/// A stream opened to a peer cluster, and the count of it on the replica it went to.
type Opened = (quinn::SendStream, quinn::RecvStream, OpenGuard);

/// Least time a replica with siblings left to try is given to show it is alive (echo a
/// liveness probe) while a stream waits for its answer.
const SIBLING_AFTER: Duration = Duration::from_millis(250);

/// How long a replica may stay silent before a stream waiting on it tries its sibling:
/// [`SIBLING_AFTER`], or four round trips on a slow path (probes go every keep-alive, so a
/// live replica echoes several in that time).
fn sibling_after(peer: &PeerHandle) -> Duration {
    let rtt = peer.liveness().rtt.unwrap_or_default();
    SIBLING_AFTER.max(rtt * 4)
}

/// Opens a stream on one of `cluster`'s replicas, tried in [`attempt_order`]: the next
/// one when a replica is down, stops answering while we wait, or is draining, so the
/// connection leaves the cluster only when no replica of it can take it. While a sibling is
/// still to try and nothing sent can be replayed wrongly, a replica that has echoed no
/// probe [`sibling_after`] the request went out is given up on: a replica killed a moment
/// ago costs a connection that long, not the probes' verdict, and a live one with a slow
/// endpoint is waited for. All attempts together take at most `timeout`. Bytes sent with
/// the request that may have been delivered are never sent again (`replay_ok` false).
async fn open_on(
    peers: &dyn PeerSet,
    cluster: &str,
    req: &StreamRequest,
    early: &[u8],
    timeout: Duration,
    replay_ok: bool,
) -> Result<Opened, OpenError> {
    use rand::Rng;
    let replicas = peers.replicas(cluster);
    if replicas.is_empty() {
        return Err(OpenError::PeerDown);
    }
    let tiebreak = rand::rng().random_range(0..replicas.len());
    let mut last = OpenError::PeerDown;
    let order = attempt_order(&replicas, tiebreak);
    let n = order.len();
    let deadline = tokio::time::Instant::now() + timeout;
    for (k, peer) in order.into_iter().enumerate() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        // Counted from the first byte: a replica that stopped answering collects the
        // streams waiting on it, and new connections go to its siblings meanwhile.
        let counted = peer.count_open();
        let silent_after =
            (k + 1 < n && replay_ok && peer.liveness().routable).then(|| sibling_after(&peer));
        let pending = peer.asked();
        let opened = open_on_replica(&peer, req, early, left, silent_after).await;
        drop(pending);
        match opened {
            Ok((send, recv)) => return Ok((send, recv, counted)),
            Err(e) => {
                let draining = matches!(
                    &e,
                    OpenError::Refused {
                        status: Status::Draining,
                        ..
                    }
                );
                if draining {
                    peer.going_away();
                }
                // The replica, not the service, failed: down, gone quiet, draining, at its
                // stream limit, or its connection lost or silent while opening. (Other
                // refusals are the service's answer, the same from every replica.)
                let replica_down = draining
                    || matches!(
                        e,
                        OpenError::PeerDown
                            | OpenError::Abandoned
                            | OpenError::Timeout(_)
                            | OpenError::Stream(_)
                            | OpenError::Refused {
                                status: Status::Overloaded,
                                ..
                            }
                    );
                if !replica_down || (e.ambiguous() && !replay_ok) {
                    return Err(e);
                }
                if replicas.len() > 1 {
                    tracing::debug!(peer = %peer.target.name(), error = %e, "replica cannot take the stream; trying its siblings");
                }
                last = e;
            }
        }
    }
    Err(last)
}

/// Opens a stream on one replica's tunnel; gives up early, as `Abandoned`, when the peer
/// stops answering probes (or starts draining) while we wait, or, with `silent_after`,
/// when it has echoed no probe that long after the request went out.
async fn open_on_replica(
    peer: &PeerHandle,
    req: &StreamRequest,
    early: &[u8],
    timeout: Duration,
    silent_after: Option<Duration>,
) -> Result<(quinn::SendStream, quinn::RecvStream), OpenError> {
    let mut state = peer.subscribe();
    let Some(conn) = peer.ready_connection(timeout).await else {
        return Err(OpenError::PeerDown);
    };
    let asked = std::time::Instant::now();
    let unresponsive = async move {
        let down = state.wait_for(|s| !s.routable() || peer.is_draining());
        let silent = async {
            match silent_after {
                Some(after) => {
                    tokio::time::sleep(after).await;
                    if peer.heard_since(asked) {
                        // Alive: its endpoint is slow. Wait for the answer.
                        std::future::pending::<()>().await;
                    }
                    peer.went_silent(asked);
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = down => {}
            () = silent => {}
        }
    };
    open_stream_until(&conn, req, early, timeout, unresponsive).await
}

/// Most bytes read ahead of the stream header.
const EARLY_MAX: usize = 16 << 10;

/// Whatever the client has already sent, read without waiting (a server-speaks-first
/// protocol sends nothing, and must not be delayed). These bytes ride in the same packet
/// as the stream header when no retry can follow. Resending them after a refusal is safe:
/// a remote that refuses never connects an endpoint, so they were delivered nowhere.
/// Read on the stack and kept at their own size: the connection holds them as long as it
/// lives, and most are a short request.
fn early_bytes(tcp: &TcpStream) -> Bytes {
    let mut buf = [0u8; EARLY_MAX];
    match tcp.try_read(&mut buf) {
        Ok(n) => Bytes::copy_from_slice(&buf[..n]),
        // WouldBlock (nothing yet) or an error the splice will meet again on its first read.
        Err(_) => Bytes::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::router::Locality;
    use crate::routing::RoutingMetrics;
    use crate::routing::tests::{FakePeers, import};

    struct Setup {
        listeners: Listeners,
        desired: watch::Sender<Arc<Desired>>,
        peers: Arc<FakePeers>,
        registry: Registry,
        life: Lifetime,
    }

    impl Drop for Setup {
        fn drop(&mut self) {
            self.life.stop();
        }
    }

    /// Listeners for `imports`, with peers whose tunnels the test decides (none at first).
    fn setup(imports: Vec<Import>) -> Setup {
        let peers = Arc::new(FakePeers::default());
        let (desired, rx) = watch::channel(Arc::new(Desired {
            imports,
            ..Default::default()
        }));
        let registry = Registry::new();
        let local = Exports::new(rx.clone());
        let routing = Routing::new(
            Locality::default(),
            rx,
            peers.clone(),
            Duration::from_millis(200),
            RoutingMetrics::new(&registry),
        );
        let life = Lifetime::new();
        let listeners = Listeners::new(
            Forwarding {
                routing,
                peers: peers.clone(),
                metrics: ListenerMetrics::new(&registry, StreamMetrics::new(&registry)),
                copy_buffer: 16 << 10,
                local,
                connect_timeout: Duration::from_millis(200),
                shared_ports: false,
                open: Default::default(),
            },
            life.clone(),
        );
        Setup {
            listeners,
            desired,
            peers,
            registry,
            life,
        }
    }

    fn current(s: &Setup) -> Vec<Import> {
        s.desired.borrow().imports.clone()
    }

    #[tokio::test]
    async fn replicas_on_one_host_share_a_listener_address_and_others_do_not() {
        let first = bind_tcp("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = first.local_addr().unwrap();
        let sibling = bind_tcp(addr, true).expect("a sibling replica shares the address");
        assert_eq!(sibling.local_addr().unwrap(), addr);
        let lone = bind_tcp("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let taken = bind_tcp(lone.local_addr().unwrap(), false).unwrap_err();
        assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
    }

    #[tokio::test]
    async fn imports_are_bound_updated_in_place_and_closed_when_withdrawn() {
        let s = setup(vec![import("web", &["east", "north"])]);
        assert!(s.listeners.reconcile(&current(&s)).await.is_empty());
        let addr = s.listeners.address("shop/web", 80).expect("bound");
        assert_ne!(addr.port(), 0, "an ephemeral port was chosen");
        TcpStream::connect(addr).await.expect("accepting");

        // A new cluster order is taken in place: same socket, new order.
        let reordered = vec![import("web", &["north", "east"])];
        assert!(s.listeners.reconcile(&reordered).await.is_empty());
        let now = s.listeners.snapshot();
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].address, addr, "not rebound");
        assert_eq!(now[0].clusters, vec!["north", "east"]);

        // Withdrawn: the port stops accepting.
        assert!(s.listeners.reconcile(&[]).await.is_empty());
        assert!(s.listeners.address("shop/web", 80).is_none());
        strait_tests::eventually(Duration::from_secs(5), "listener closed", async || {
            std::net::TcpStream::connect(addr).is_err()
        })
        .await;
    }

    #[tokio::test]
    async fn a_connection_no_cluster_can_serve_is_reset_and_counted() {
        let s = setup(vec![import("web", &["east"])]);
        s.peers.set("east", false);
        assert!(s.listeners.reconcile(&current(&s)).await.is_empty());
        let addr = s.listeners.address("shop/web", 80).unwrap();
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("the listener answers at once");
        assert!(
            matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "reset, not a clean end: {read:?}"
        );
        let text = s.registry.render();
        assert!(
            text.contains("strait_route_unserved_total{service=\"shop/web\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_listener_that_cannot_bind_is_retried_until_it_can() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let mut imp = import("web", &["east"]);
        imp.ports[0].listen = port;
        let s = setup(vec![imp.clone()]);
        let errors = s.listeners.reconcile(&current(&s)).await;
        assert_eq!(errors.len(), 1, "the port is taken");
        assert!(errors[0].to_string().contains("shop/web"), "{}", errors[0]);
        assert!(s.listeners.address("shop/web", 80).is_none());

        tokio::spawn(s.listeners.clone().follow(s.desired.subscribe()));
        // On this single-threaded runtime a yield lets `follow` try once and fail.
        tokio::task::yield_now().await;
        drop(taken);
        tokio::task::yield_now().await;
        assert!(
            s.listeners.address("shop/web", 80).is_none(),
            "not at once: on the retry timer"
        );
        strait_tests::eventually(Duration::from_secs(10), "bound once free", async || {
            s.listeners.address("shop/web", 80).map(|a| a.port()) == Some(port)
        })
        .await;
    }
}
