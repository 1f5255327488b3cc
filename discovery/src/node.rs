//! A discovery member on the network: the [`Catalog`] state machine behind a gRPC service
//! on mutually authenticated TLS, and a loop that does push-pull rounds with a few random
//! members (or the seeds, to join).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use rand::seq::IndexedRandom;
use strait_common::pki::{Identity, peer_id};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::model::{MemberInfo, Service, ServiceKey};
use crate::seal::Sealing;
use crate::state::{Catalog, CatalogConfig, CatalogEntry, Digest, MemberView, ReplicaView, Voice};
use crate::wire::{self, pb};

/// Settings of a discovery member.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Time between gossip rounds (also the heartbeat period).
    pub interval: Duration,
    /// Members contacted per round.
    pub fanout: usize,
    /// Addresses to join through.
    pub seeds: Vec<SocketAddr>,
    /// Deadline of one RPC.
    pub rpc_timeout: Duration,
    /// Largest gossip message accepted (bytes).
    pub max_message_bytes: usize,
    /// Catalog tunables.
    pub catalog: CatalogConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            fanout: 3,
            seeds: Vec::new(),
            rpc_timeout: Duration::from_millis(500),
            max_message_bytes: 1 << 20,
            catalog: CatalogConfig::default(),
        }
    }
}

/// What consumers see: members and the services of every origin with a valid lease.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    /// Every member, this one first.
    pub members: Vec<MemberView>,
    /// Every live service (this member's own included).
    pub services: Vec<CatalogEntry>,
    /// Every gateway replica announced (this member's own first, when it is one).
    pub replicas: Vec<ReplicaView>,
}

/// Traffic and error counters of a member.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Gossip bytes sent (encoded messages, requests and responses).
    pub bytes_sent: AtomicU64,
    /// Gossip bytes received.
    pub bytes_received: AtomicU64,
    /// Gossip messages sent.
    pub messages_sent: AtomicU64,
    /// Gossip messages received.
    pub messages_received: AtomicU64,
    /// Messages refused as malformed or oversized.
    pub rejected_messages: AtomicU64,
    /// TLS handshakes refused on the gossip port.
    pub rejected_handshakes: AtomicU64,
    /// Origin updates refused: not what that cluster signed, or without a valid
    /// certificate of it (a member that forges, alters or withdraws another's services).
    pub rejected_origins: AtomicU64,
    /// Rounds in which a contacted member did not answer.
    pub failed_exchanges: AtomicU64,
}

/// A member's state, held by its tasks and its handle.
struct Inner {
    catalog: Mutex<Catalog>,
    config: NodeConfig,
    /// Swapped when the gateway's certificate is rotated on disk.
    identity: ArcSwap<Identity>,
    acceptor: ArcSwap<tokio_rustls::TlsAcceptor>,
    view: watch::Sender<Arc<View>>,
    stats: NodeStats,
    channels: Mutex<HashMap<PeerKey, Channel>>,
    /// Peers with an exchange under way. At most one each: a request to a member that stopped
    /// answering is cancelled (RST_STREAM) on its timeout, and without this limit every
    /// round would add another, all delivered to the member at once when the network heals
    /// (h2 answers more than 20 reset-before-accepted streams with GOAWAY ENHANCE_YOUR_CALM).
    in_flight: Mutex<HashSet<PeerKey>>,
    /// Members whose certificate this member refused, with the warning logged: a bad
    /// certificate is worth a warning once, not every round (cleared by a good exchange).
    refused: Mutex<HashMap<PeerKey, String>>,
    /// How far each member's clock is from ours, from the last exchange with it.
    clocks: Mutex<HashMap<String, ClockOffset>>,
    /// Set when the member stops; the gRPC server drains and closes its connections.
    stopped: watch::Sender<bool>,
    /// Gossip cut (a drill fault): no exchanges out, every request in refused.
    cut: AtomicBool,
}

/// A gossip target: its address and the cluster it must prove (`None`: a seed).
type PeerKey = (SocketAddr, Option<String>);

/// Marks an exchange with a peer as under way until dropped.
struct InFlight {
    shared: Arc<Inner>,
    key: PeerKey,
}

impl InFlight {
    fn claim(shared: &Arc<Inner>, key: PeerKey) -> Option<InFlight> {
        let mut busy = shared.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        busy.insert(key.clone()).then(|| InFlight {
            shared: shared.clone(),
            key,
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// How far a member's wall clock is from this one's, as one exchange measured it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClockOffset {
    /// Its clock minus ours, in milliseconds (positive: it is ahead).
    pub offset_ms: f64,
    /// Half the exchange's round trip: the offset is known to within this.
    pub uncertainty_ms: f64,
}

impl ClockOffset {
    /// From a request sent at `asked` and answered at `answered` (our clock) by a member
    /// whose clock read `theirs_ms` (Unix ms) in between: their reading minus our midpoint.
    /// `None` when the member sent no time.
    pub fn estimate(
        asked: SystemTime,
        answered: SystemTime,
        theirs_ms: i64,
    ) -> Option<ClockOffset> {
        if theirs_ms == 0 {
            return None;
        }
        let (a, b) = (unix_ms(asked) as f64, unix_ms(answered) as f64);
        Some(ClockOffset {
            offset_ms: theirs_ms as f64 - (a + b) / 2.0,
            uncertainty_ms: (b - a).max(0.0) / 2.0,
        })
    }
}

/// Milliseconds since the Unix epoch (negative before it).
fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// Why an exchange failed.
#[derive(Debug)]
struct Failure {
    message: String,
    /// Failed on our side of the wire (deadline, connect, reset, GOAWAY) rather than with a
    /// status the member sent: the cached connection may be dead.
    transport: bool,
}

impl From<Status> for Failure {
    fn from(e: Status) -> Self {
        Failure {
            // tonic attaches the underlying error as the source of statuses it makes up
            // locally (TimeoutExpired, ConnectError, hyper/h2 errors); decoded ones have none.
            transport: std::error::Error::source(&e).is_some()
                || matches!(
                    e.code(),
                    tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
                ),
            message: e.message().to_owned(),
        }
    }
}

/// When `error` says the member's certificate was refused: what to do about it.
fn certificate_fix(error: &str, trust_domain: &str) -> Option<String> {
    // The verifier's words (`expected ..., peer presented ...`), inside rustls' error.
    if error.contains("peer presented") {
        Some(format!(
            "it is not a gateway of this federation (trust domain {trust_domain}) or not the cluster it claims: point discovery.seeds at gateways of this federation"
        ))
    } else if error.contains("invalid peer certificate") {
        Some(
            "its certificate is not from this federation's CA: every gateway needs a certificate from the CA in tls.ca (`strait pki issue`), or tls.ca must hold its root too"
                .to_owned(),
        )
    } else {
        None
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Failure {
            message: message.to_owned(),
            transport: false,
        }
    }
}

/// A certificate checked by [`Node::prepare_identity`], ready to present.
pub struct PreparedIdentity {
    identity: Arc<Identity>,
    acceptor: tokio_rustls::TlsAcceptor,
    sealing: Arc<Sealing>,
}

/// A running discovery member; dropping it stops it.
pub struct Node {
    shared: Arc<Inner>,
    addr: SocketAddr,
    tasks: JoinSet<()>,
    gossip: tokio::task::AbortHandle,
}

impl Node {
    /// Starts a member serving gossip on `listener`. `me.gossip_addr` is what others are
    /// told to dial; `generation` must grow across restarts (start time in ms works).
    pub fn start(
        me: MemberInfo,
        generation: u64,
        identity: Arc<Identity>,
        listener: TcpListener,
        config: NodeConfig,
    ) -> std::io::Result<Node> {
        Self::start_with(me, generation, identity, listener, config, BTreeMap::new())
    }

    /// [`Node::start`] with this member's services in its catalog from the first round (a
    /// restarted member never tells its peers that its new incarnation has none).
    pub fn start_with(
        me: MemberInfo,
        generation: u64,
        identity: Arc<Identity>,
        listener: TcpListener,
        config: NodeConfig,
        local: BTreeMap<ServiceKey, Service>,
    ) -> std::io::Result<Node> {
        let addr = listener.local_addr()?;
        let sealing = Sealing::new(&identity).map_err(std::io::Error::other)?;
        let catalog_config = CatalogConfig {
            max_message_bytes: config.max_message_bytes,
            ..config.catalog.clone()
        };
        let mut catalog = Catalog::sealed(me, generation, catalog_config, Arc::new(sealing));
        catalog.set_local(local);
        let shared = Arc::new(Inner {
            view: watch::channel(Arc::new(View::default())).0,
            catalog: Mutex::new(catalog),
            config,
            acceptor: ArcSwap::from_pointee(acceptor(&identity)?),
            identity: ArcSwap::new(identity),
            stats: NodeStats::default(),
            channels: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashSet::new()),
            refused: Mutex::new(HashMap::new()),
            clocks: Mutex::new(HashMap::new()),
            stopped: watch::channel(false).0,
            cut: AtomicBool::new(false),
        });
        shared.publish(Instant::now());
        let mut tasks = JoinSet::new();
        tasks.spawn(serve(shared.clone(), listener));
        let gossip = tasks.spawn(gossip_loop(shared.clone()));
        Ok(Node {
            shared,
            addr,
            tasks,
            gossip,
        })
    }

    /// The bound gossip address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces this member's exports.
    pub fn set_local(&self, services: BTreeMap<ServiceKey, Service>) {
        let (changed, size) = {
            let mut c = self.shared.lock();
            let changed = c.set_local(services);
            // The whole origin must fit one gossip message (it is signed whole).
            let size = changed.then(|| {
                let me = c.me().cluster.clone();
                let mut d = c.delta_for(&Digest::new());
                d.origins.retain(|o| o.cluster == me);
                prost::Message::encoded_len(&wire::delta_to_pb(&d))
            });
            (changed, size)
        };
        let limit = self.shared.config.max_message_bytes;
        if let Some(size) = size.filter(|s| *s > limit) {
            tracing::error!(
                size,
                limit,
                "this cluster's exports encode to more than one gossip message: new members cannot learn them; export fewer services or endpoints, or raise the message limit"
            );
        }
        if changed {
            self.shared.publish(Instant::now());
        }
    }

    /// Whether this replica speaks for its cluster in gossip (see [`Voice`]).
    pub fn set_voice(&self, voice: Voice) {
        self.shared.lock().set_voice(voice, Instant::now());
    }

    /// Marks this replica draining in its record (peers stop sending it new connections);
    /// nothing for a cluster's only gateway.
    pub fn set_draining(&self, draining: bool) {
        let changed = self.shared.lock().set_draining(draining);
        if changed {
            self.shared.publish(Instant::now());
        }
    }

    /// Watches the view.
    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.shared.view.subscribe()
    }

    /// The current view.
    pub fn view(&self) -> Arc<View> {
        self.shared.view.borrow().clone()
    }

    /// How far each member's clock is from ours (members exchanged with so far).
    pub fn clock_offsets(&self) -> BTreeMap<String, ClockOffset> {
        let clocks = self.shared.clocks.lock().unwrap_or_else(|p| p.into_inner());
        clocks.iter().map(|(c, o)| (c.clone(), *o)).collect()
    }

    /// Counters.
    pub fn stats(&self) -> &NodeStats {
        &self.shared.stats
    }

    /// Stops gossiping and serving, waiting (briefly) for connections to close.
    pub async fn shutdown(mut self) {
        self.stop();
        let drained = async { while self.tasks.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(Duration::from_secs(1), drained).await;
        self.tasks.shutdown().await;
    }

    /// Switches to a rotated certificate: new connections (both ways) use it, established
    /// ones keep their TLS session until they close.
    pub fn set_identity(&self, identity: Arc<Identity>) -> std::io::Result<()> {
        self.use_identity(Self::prepare_identity(identity)?);
        Ok(())
    }

    /// Checks that `identity` can be presented on the gossip port; nothing changes yet.
    pub fn prepare_identity(identity: Arc<Identity>) -> std::io::Result<PreparedIdentity> {
        Ok(PreparedIdentity {
            acceptor: acceptor(&identity)?,
            sealing: Arc::new(Sealing::new(&identity).map_err(std::io::Error::other)?),
            identity,
        })
    }

    /// Presents a prepared identity from now on (see [`Node::set_identity`]).
    pub fn use_identity(&self, prepared: PreparedIdentity) {
        let PreparedIdentity {
            identity,
            acceptor,
            sealing,
        } = prepared;
        self.shared.acceptor.store(Arc::new(acceptor));
        self.shared.identity.store(identity);
        // The origin is signed with the new key from now on, and its certificate sent along.
        self.shared.lock().set_sealing(sealing);
        // Cached client channels were dialled with the old certificate.
        self.shared
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Cuts gossip (both ways) or restores it. While cut the member keeps its view and its
    /// own heartbeat, and others see it fall silent.
    pub fn set_cut(&self, cut: bool) {
        self.shared.cut.store(cut, Ordering::Relaxed);
    }

    /// Stops serving and gossiping without waiting (for owners that only hold a reference).
    pub fn stop(&self) {
        self.shared.stopped.send_replace(true);
        // The gossip loop stops at once; the server drains its connections and ends.
        self.gossip.abort();
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Catalog> {
        // A panic while holding the lock leaves a consistent catalog (every mutation is a
        // complete step), so a poisoned lock is still usable.
        self.catalog.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, now: Instant) {
        let view = {
            let c = self.lock();
            View {
                members: c.members(now),
                services: c.services(now),
                replicas: c.replicas(now),
            }
        };
        self.view.send_if_modified(|old| {
            // Ages and phi move every round; consumers care about membership and content.
            let same = old.services.len() == view.services.len()
                && old.services.iter().zip(&view.services).all(|(a, b)| {
                    a.key == b.key
                        && a.origin == b.origin
                        && a.version == b.version
                        && a.origin_alive == b.origin_alive
                })
                && old.members.len() == view.members.len()
                && old.members.iter().zip(&view.members).all(|(a, b)| {
                    a.info == b.info
                        && a.alive == b.alive
                        && a.digest.generation == b.digest.generation
                })
                && old.replicas.len() == view.replicas.len()
                && old.replicas.iter().zip(&view.replicas).all(|(a, b)| {
                    a.replica == b.replica
                        && a.info == b.info
                        && a.alive == b.alive
                        && a.draining == b.draining
                });
            *old = Arc::new(view);
            !same
        });
    }

    fn refuse_if_cut(&self) -> Result<(), Status> {
        if self.cut.load(Ordering::Relaxed) {
            return Err(Status::unavailable(
                "gossip is cut on this member (drill fault)",
            ));
        }
        Ok(())
    }

    fn count_rejected(&self, origins: usize) {
        if origins > 0 {
            self.stats
                .rejected_origins
                .fetch_add(origins as u64, Ordering::Relaxed);
            tracing::warn!(
                origins,
                "gossip carried origin updates their clusters did not sign; refused"
            );
        }
    }

    fn count_in(&self, bytes: usize) {
        self.stats
            .bytes_received
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.stats.messages_received.fetch_add(1, Ordering::Relaxed);
    }

    fn count_out(&self, bytes: usize) {
        self.stats
            .bytes_sent
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.stats.messages_sent.fetch_add(1, Ordering::Relaxed);
    }

    fn reject(&self, e: wire::WireError) -> Status {
        self.stats.rejected_messages.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "gossip message rejected");
        Status::invalid_argument(e.to_string())
    }
}

struct GossipService(Arc<Inner>);

/// The caller's cluster, from its verified client certificate.
fn caller<T>(req: &Request<T>) -> Option<String> {
    let info = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    peer_id(certs.first()?).ok().map(|id| id.cluster)
}

#[tonic::async_trait]
impl pb::gossip_server::Gossip for GossipService {
    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncResponse>, Status> {
        let s = &self.0;
        s.refuse_if_cut()?;
        let from = caller(&req).ok_or_else(|| Status::unauthenticated("no gateway identity"))?;
        let msg = req.into_inner();
        s.count_in(prost::Message::encoded_len(&msg));
        let theirs =
            wire::digest_from_pb(msg.digest.unwrap_or_default()).map_err(|e| s.reject(e))?;
        let (delta, mine) = {
            let mut c = s.lock();
            c.note_digest(&theirs, Instant::now());
            (c.delta_to(&theirs, Some(&from)), c.digest())
        };
        let resp = pb::SyncResponse {
            delta: Some(wire::delta_to_pb(&delta)),
            digest: Some(wire::digest_to_pb(&mine)),
            unix_ms: unix_ms(SystemTime::now()),
        };
        s.count_out(prost::Message::encoded_len(&resp));
        Ok(Response::new(resp))
    }

    async fn push(
        &self,
        req: Request<pb::PushRequest>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let s = &self.0;
        s.refuse_if_cut()?;
        caller(&req).ok_or_else(|| Status::unauthenticated("no gateway identity"))?;
        let msg = req.into_inner();
        s.count_in(prost::Message::encoded_len(&msg));
        let delta = wire::delta_from_pb(msg.delta.unwrap_or_default()).map_err(|e| s.reject(e))?;
        let now = Instant::now();
        let applied = s.lock().apply(delta, now);
        s.count_rejected(applied.rejected);
        let changed = applied.changed;
        if changed {
            s.publish(now);
        }
        Ok(Response::new(pb::PushResponse {}))
    }
}

/// The server side of gossip TLS: a verified gateway client certificate is required.
fn acceptor(identity: &Identity) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    let mut tls = identity.server_config().map_err(std::io::Error::other)?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}

/// Accepts TLS connections (verified gateway certificates only) and serves gRPC on them.
async fn serve(shared: Arc<Inner>, listener: TcpListener) {
    let (tx, rx) = tokio::sync::mpsc::channel::<
        std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>,
    >(64);
    let handshakes = shared.clone();
    let accept = async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "gossip accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let acceptor = handshakes.acceptor.load_full();
            let tx = tx.clone();
            let shared = handshakes.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        shared
                            .stats
                            .rejected_handshakes
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%remote, error = %e, "gossip handshake refused");
                    }
                    Err(_) => {
                        shared
                            .stats
                            .rejected_handshakes
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    };
    let svc = pb::gossip_server::GossipServer::new(GossipService(shared.clone()))
        .max_decoding_message_size(shared.config.max_message_bytes)
        .max_encoding_message_size(shared.config.max_message_bytes);
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut stopped = shared.stopped.subscribe();
    // With a shutdown signal tonic also closes established connections (gracefully), so a
    // stopped member stops answering instead of serving a frozen catalog.
    let shutdown = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown);
    tokio::select! {
        _ = accept => {}
        r = server => {
            if let Err(e) = r {
                tracing::error!(error = %e, "gossip server stopped");
            }
        }
    }
}

/// A cached gRPC channel to `addr` over our mTLS, expecting `cluster`'s identity when known.
fn channel(shared: &Inner, addr: SocketAddr, cluster: Option<&str>) -> Option<Channel> {
    let key = (addr, cluster.map(str::to_owned));
    let mut channels = shared.channels.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = channels.get(&key) {
        return Some(c.clone());
    }
    let ch = connect(
        &shared.identity.load(),
        addr,
        cluster,
        shared.config.rpc_timeout,
    )
    .ok()?;
    channels.insert(key, ch.clone());
    Some(ch)
}

/// A lazily connecting gRPC channel to a gossip address over mTLS with `identity`; the
/// server must be `cluster`'s gateway, or any gateway of the trust domain when `None`.
pub fn connect(
    identity: &Identity,
    addr: SocketAddr,
    cluster: Option<&str>,
    timeout: Duration,
) -> Result<Channel, strait_common::pki::PkiError> {
    let mut tls = identity.client_config_for(cluster)?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let dial = tower::service_fn(move |_: tonic::transport::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from("strait-gossip")
                .map_err(std::io::Error::other)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Ok(Endpoint::from_static("http://strait-gossip")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector_lazy(dial))
}

/// One push-pull exchange with a member.
async fn exchange(shared: &Inner, addr: SocketAddr, cluster: Option<&str>) -> Result<(), Failure> {
    let ch = channel(shared, addr, cluster).ok_or("no TLS configuration")?;
    let limit = shared.config.max_message_bytes;
    let mut client = pb::gossip_client::GossipClient::new(ch)
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let req = pb::SyncRequest {
        digest: Some(wire::digest_to_pb(&shared.lock().digest())),
    };
    shared.count_out(prost::Message::encoded_len(&req));
    let asked = SystemTime::now();
    let resp = client.sync(req).await?.into_inner();
    let answered = SystemTime::now();
    shared.count_in(prost::Message::encoded_len(&resp));
    if let Some(c) = cluster
        && let Some(offset) = ClockOffset::estimate(asked, answered, resp.unix_ms)
    {
        shared
            .clocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(c.to_owned(), offset);
    }
    let delta =
        wire::delta_from_pb(resp.delta.unwrap_or_default()).map_err(|e| shared.reject(e))?;
    let theirs =
        wire::digest_from_pb(resp.digest.unwrap_or_default()).map_err(|e| shared.reject(e))?;
    let now = Instant::now();
    let back = {
        let mut c = shared.lock();
        c.note_digest(&theirs, now);
        let applied = c.apply(delta, now);
        shared.count_rejected(applied.rejected);
        if applied.changed {
            drop(c);
            shared.publish(now);
            c = shared.lock();
        }
        c.delta_to(&theirs, cluster)
    };
    if !back.is_empty() {
        let req = pb::PushRequest {
            delta: Some(wire::delta_to_pb(&back)),
        };
        shared.count_out(prost::Message::encoded_len(&req));
        client.push(req).await?;
    }
    Ok(())
}

async fn gossip_loop(shared: Arc<Inner>) {
    let mut tick = tokio::time::interval(shared.config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut round: u64 = 0;
    loop {
        tick.tick().await;
        round += 1;
        let now = Instant::now();
        let targets = {
            let mut c = shared.lock();
            c.tick(now);
            let me = c.me().cluster.clone();
            let others: Vec<(SocketAddr, String)> = c
                .members(now)
                .into_iter()
                .filter(|m| m.info.cluster != me && !m.expired)
                .map(|m| (m.info.gossip_addr, m.info.cluster))
                .collect();
            others
        };
        // Channels to members that left or moved are dropped (their workers with them).
        shared
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(addr, cluster), _| match cluster {
                Some(c) => targets.iter().any(|(a, t)| a == addr && t == c),
                None => shared.config.seeds.contains(addr),
            });
        // Members still busy with an earlier exchange are not picked (nor take a slot).
        let mut picks: Vec<PeerKey> = {
            let busy = shared.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            let free: Vec<PeerKey> = targets
                .iter()
                .map(|(a, c)| (*a, Some(c.clone())))
                .filter(|k| !busy.contains(k))
                .collect();
            free.choose_multiple(&mut rand::rng(), shared.config.fanout)
                .cloned()
                .collect()
        };
        // Seeds: to join, and now and then to heal a partitioned view.
        if (targets.is_empty() || round.is_multiple_of(50)) && !shared.config.seeds.is_empty() {
            let seed = *shared
                .config
                .seeds
                .choose(&mut rand::rng())
                .expect("non-empty");
            picks.push((seed, None));
        }
        if shared.cut.load(Ordering::Relaxed) {
            picks.clear();
        }
        // Exchanges run detached, each with its own deadline: waiting for a dead member
        // would delay our own heartbeat and make us look suspect.
        for key in picks {
            // A seed may be busy (it is not filtered above).
            let Some(guard) = InFlight::claim(&shared, key.clone()) else {
                continue;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let _busy = guard;
                let (addr, cluster) = &key;
                let addr = *addr;
                let res = tokio::time::timeout(
                    shared.config.rpc_timeout * 2,
                    exchange(&shared, addr, cluster.as_deref()),
                )
                .await;
                // A dead connection is not reused: the next exchange dials afresh (and
                // fails at connect while the member is unreachable), so the old one carries
                // at most this exchange's cancelled stream(s) when the network heals.
                if matches!(
                    &res,
                    Err(_)
                        | Ok(Err(Failure {
                            transport: true,
                            ..
                        }))
                ) {
                    shared
                        .channels
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&key);
                }
                let error = match res {
                    Ok(Ok(())) => {
                        shared
                            .refused
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&key);
                        return;
                    }
                    Ok(Err(f)) => f.message,
                    Err(_) => "timed out".to_owned(),
                };
                shared
                    .stats
                    .failed_exchanges
                    .fetch_add(1, Ordering::Relaxed);
                let trust_domain = &shared.identity.load().id.trust_domain;
                match certificate_fix(&error, trust_domain) {
                    Some(fix)
                        if shared
                            .refused
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(key.clone(), error.clone())
                            .as_ref()
                            != Some(&error) =>
                    {
                        let seed = key.1.is_none();
                        tracing::warn!(%addr, seed, %error, %fix, "gossip peer's certificate refused");
                    }
                    _ => tracing::debug!(%addr, %error, "gossip exchange failed"),
                }
            });
        }
        // Suspicion and leases change with time alone, so the view is refreshed every round.
        shared.publish(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_offset_is_their_reading_minus_our_midpoint() {
        let at = |ms: u64| std::time::UNIX_EPOCH + Duration::from_millis(ms);
        let o = ClockOffset::estimate(at(10_000), at(10_040), 12_020).unwrap();
        assert_eq!(o.offset_ms, 2_000.0);
        assert_eq!(o.uncertainty_ms, 20.0);
        let behind = ClockOffset::estimate(at(10_000), at(10_000), 9_500).unwrap();
        assert_eq!(behind.offset_ms, -500.0);
        assert_eq!(ClockOffset::estimate(at(1), at(2), 0), None, "no time sent");
    }
}
