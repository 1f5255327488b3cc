//! Outbound tunnel connections: one per desired peer (configured, or a discovery member;
//! for a cluster that runs several gateways, one per replica), kept up with reconnect
//! backoff, each judged alive by probes of its own. A peer cluster is the set of its
//! replicas: routing sees the cluster (routable while any replica is), and a new
//! connection tries the least loaded replica first ([`attempt_order`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use quinn::Connection;
use rand::Rng;
use strait_common::config::TunnelTuning;
use tokio::sync::watch;

use crate::desired::{Desired, PeerTarget};
use crate::lifetime::Lifetime;
use crate::metrics::{Desc, Registry};
use crate::tunnel::CurrentIdentity;

pub use strait_common::api::{PeerStatus, RttSummary};

/// What is known about one peer right now.
#[derive(Debug, Clone)]
pub struct PeerState {
    /// Current status.
    pub status: PeerStatus,
    /// The live connection while up.
    pub connection: Option<Connection>,
    /// When the status last changed.
    pub since: SystemTime,
    /// Why the last attempt or connection ended.
    pub last_error: Option<String>,
    /// Successful handshakes so far.
    pub connects: u64,
    /// While up: the peer acknowledged our probes recently (`tunnel.unresponsive_after`).
    /// An up but unresponsive peer gets no new connections.
    pub responsive: bool,
}

impl PeerState {
    /// Whether new connections may be sent to this peer: up and answering probes, or not
    /// yet connected for the first time (a peer just learned from discovery: worth a wait
    /// during its first dial; after that, [`PeerHandle::ready_connection`] gives up on it
    /// at once and the connection moves on, as from any peer that is down).
    pub fn routable(&self) -> bool {
        match self.status {
            PeerStatus::Up => self.responsive,
            PeerStatus::Connecting => self.connects == 0,
            PeerStatus::Down => false,
        }
    }
}

/// RTT samples of the last minute of the current connection, for p50/p99.
const RTT_SAMPLES: usize = 240;
const RTT_SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// A peer and its live state.
pub(crate) struct PeerHandle {
    /// Who and where it is.
    pub target: PeerTarget,
    state: watch::Sender<PeerState>,
    rtt: Mutex<VecDeque<Duration>>,
    /// Proxied connections open through it now (the load the replica choice compares).
    open: Arc<AtomicUsize>,
    /// Streams asked of it and not answered yet.
    unanswered: Arc<Unanswered>,
    /// Its record says it is draining.
    announced_draining: AtomicBool,
    /// Its current connection said it is going away (a fresh connection clears it).
    going_away: AtomicBool,
    /// When it last echoed a liveness probe on its current connection, and since when a
    /// stream gave up on it for silence.
    heard: Mutex<Heard>,
}

/// What was last heard of a peer's transport.
#[derive(Default)]
struct Heard {
    /// Its last probe echo.
    last: Option<Instant>,
    /// A stream gave up on it for silence after asking at this instant, and no echo has
    /// come since.
    silent_since: Option<Instant>,
}

/// Least mean wait of a replica's unanswered streams that makes it stalled.
const UNANSWERED_AFTER: Duration = Duration::from_millis(25);

/// Streams asked of a peer and not answered yet: how many, and the sum of when they were
/// asked (µs from a process-wide epoch), so their mean age is two loads.
#[derive(Default)]
struct Unanswered {
    count: AtomicUsize,
    asked_sum: std::sync::atomic::AtomicU64,
}

/// The instant ask times count from (an hour before first use, so any recent instant
/// is after it).
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(Duration::from_secs(3600)).unwrap_or(now)
    })
}

/// `at` in µs from [`epoch`].
fn micros(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_micros()).unwrap_or(u64::MAX / 2)
}

impl Unanswered {
    /// Their mean age; zero when none waits. (The sum is added before the count and taken
    /// away after it, so a racing read errs towards younger.)
    fn mean_age(&self, now: Instant) -> Duration {
        let n = self.count.load(Ordering::SeqCst) as u64;
        if n == 0 {
            return Duration::ZERO;
        }
        let mean = self.asked_sum.load(Ordering::SeqCst) / n;
        Duration::from_micros(micros(now).saturating_sub(mean))
    }
}

/// One stream counted as unanswered on a peer until dropped.
pub(crate) struct AskedGuard {
    on: Arc<Unanswered>,
    at: u64,
}

impl AskedGuard {
    fn new(on: &Arc<Unanswered>, at: Instant) -> Self {
        let at = micros(at);
        on.asked_sum.fetch_add(at, Ordering::SeqCst);
        on.count.fetch_add(1, Ordering::SeqCst);
        AskedGuard { on: on.clone(), at }
    }
}

impl Drop for AskedGuard {
    fn drop(&mut self) {
        self.on.count.fetch_sub(1, Ordering::SeqCst);
        self.on.asked_sum.fetch_sub(self.at, Ordering::SeqCst);
    }
}

/// Counts one proxied connection (through a peer, or on the listeners) while it lives.
pub(crate) struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    /// Counts one on `counter` until dropped.
    pub(crate) fn count(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        OpenGuard(counter.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PeerHandle {
    pub(crate) fn new(target: PeerTarget) -> Self {
        let state = PeerState {
            status: PeerStatus::Connecting,
            connection: None,
            since: SystemTime::now(),
            last_error: None,
            connects: 0,
            responsive: false,
        };
        Self {
            announced_draining: AtomicBool::new(target.draining),
            going_away: AtomicBool::new(false),
            heard: Mutex::default(),
            target,
            state: watch::channel(state).0,
            rtt: Mutex::new(VecDeque::with_capacity(RTT_SAMPLES)),
            open: Arc::default(),
            unanswered: Arc::default(),
        }
    }

    /// What routing needs to know of this peer now (cheap: read for every new connection).
    pub fn liveness(&self) -> Liveness {
        let s = self.state.borrow();
        let draining = self.is_draining();
        Liveness {
            status: s.status,
            routable: s.routable() && !draining,
            responsive: s.status == PeerStatus::Up && s.responsive,
            rtt: s.connection.as_ref().map(Connection::rtt),
            replicas: 1,
            routable_replicas: usize::from(s.routable() && !draining),
        }
    }

    /// Whether it is draining: its record says so, or its connection did.
    pub fn is_draining(&self) -> bool {
        self.announced_draining.load(Ordering::Relaxed) || self.going_away.load(Ordering::Relaxed)
    }

    /// Follows what its record says (a new incarnation's record clears it).
    pub fn set_draining(&self, draining: bool) {
        if self.announced_draining.swap(draining, Ordering::Relaxed) != draining {
            tracing::info!(peer = %self.target.name(), draining, "peer announced its drain state");
            // Wakes whoever waits on its state: streams opening there give up on it.
            self.state.send_modify(|_| {});
        }
    }

    /// Its connection said it is going away (a drain): no new connections until a fresh
    /// connection is made (its next incarnation).
    pub fn going_away(&self) {
        if !self.going_away.swap(true, Ordering::Relaxed) {
            tracing::info!(peer = %self.target.name(), "peer is draining; new connections go to its siblings or elsewhere");
            self.state.send_modify(|_| {});
        }
    }

    /// Whether it echoed a liveness probe after `t` (the transport answers, whatever the
    /// streams are waiting for).
    pub fn heard_since(&self, t: Instant) -> bool {
        self.heard().last.is_some_and(|h| h > t)
    }

    fn heard(&self) -> std::sync::MutexGuard<'_, Heard> {
        self.heard.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note_heard(&self, at: Instant) {
        let mut h = self.heard();
        h.last = Some(at);
        h.silent_since = None;
    }

    /// A stream that asked at `asked` gave up on it: nothing echoed since. Until it echoes
    /// a probe again it is tried after its siblings ([`attempt_order`]), so the next
    /// connections do not wait on it too while its probes are still out.
    pub fn went_silent(&self, asked: Instant) {
        let mut h = self.heard();
        if h.last.is_none_or(|l| l <= asked) {
            h.silent_since.get_or_insert(asked);
        }
    }

    /// Whether a stream gave up on it for silence and it has echoed nothing since.
    pub fn is_silent(&self) -> bool {
        self.heard().silent_since.is_some()
    }

    /// Proxied connections open through it now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a stream asked of it as unanswered until the guard drops.
    pub fn asked(&self) -> AskedGuard {
        AskedGuard::new(&self.unanswered, Instant::now())
    }

    /// Whether the streams asked of it and not answered yet have waited, on average,
    /// longer than a live replica takes to answer ([`UNANSWERED_AFTER`], or four round
    /// trips): it is slow or gone, and its siblings are tried first.
    pub fn is_stalled(&self) -> bool {
        let rtt = self.state.borrow().connection.as_ref().map(Connection::rtt);
        let limit = UNANSWERED_AFTER.max(rtt.unwrap_or_default() * 4);
        self.unanswered.mean_age(Instant::now()) > limit
    }

    /// Counts a proxied connection through it until the guard drops.
    pub fn count_open(&self) -> OpenGuard {
        OpenGuard::count(&self.open)
    }

    /// RTT percentiles over the last minute; `None` before the first sample.
    pub fn rtt_summary(&self) -> Option<RttSummary> {
        let mut v: Vec<Duration> = self
            .rtt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort();
        let at = |q: f64| {
            let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
            v[i].as_secs_f64() * 1000.0
        };
        Some(RttSummary {
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            samples: v.len(),
        })
    }

    fn clear_rtt(&self) {
        self.rtt.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn sample_rtt(&self, rtt: Duration) {
        let mut v = self.rtt.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() == RTT_SAMPLES {
            v.pop_front();
        }
        v.push_back(rtt);
    }

    fn set_responsive(&self, responsive: bool) {
        self.state.send_if_modified(|s| {
            let changed = s.responsive != responsive;
            s.responsive = responsive;
            changed
        });
    }

    /// The live connection, if the peer is up.
    pub fn connection(&self) -> Option<Connection> {
        self.state.borrow().connection.clone()
    }

    /// The connection once usable: waits while the first dial is under way (a peer just
    /// learned from discovery), at most `timeout`; `None` as soon as a dial failed (the
    /// next one begins at once, so `Down` may not be seen in between).
    pub async fn ready_connection(&self, timeout: Duration) -> Option<Connection> {
        let mut rx = self.state.subscribe();
        let settled = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| s.status != PeerStatus::Connecting || s.last_error.is_some()),
        )
        .await;
        match settled {
            Ok(Ok(s)) => s.connection.clone(),
            _ => None,
        }
    }

    /// A snapshot of the state.
    pub fn state(&self) -> PeerState {
        self.state.borrow().clone()
    }

    /// Watches state changes.
    pub fn subscribe(&self) -> watch::Receiver<PeerState> {
        self.state.subscribe()
    }

    pub(crate) fn set(
        &self,
        status: PeerStatus,
        connection: Option<Connection>,
        error: Option<String>,
    ) {
        if status == PeerStatus::Up {
            self.going_away.store(false, Ordering::Relaxed);
        }
        self.state.send_modify(|s| {
            if s.status != status {
                s.since = SystemTime::now();
            }
            if status == PeerStatus::Up {
                s.connects += 1;
            }
            s.status = status;
            // A fresh connection has just proven the peer answers.
            s.responsive = status == PeerStatus::Up;
            s.connection = connection;
            if error.is_some() {
                s.last_error = error;
            }
        });
    }
}

const UP: Desc = Desc::gauge(
    "strait_peer_up",
    &["peer", "replica"],
    "1 while the tunnel connection to the peer cluster's gateway is established (replica: its name when the cluster runs several, else empty).",
);
const RTT: Desc = Desc::gauge(
    "strait_peer_rtt_seconds",
    &["peer", "replica"],
    "Smoothed QUIC RTT to the peer cluster's gateway.",
);
const RTT_QUANTILE: Desc = Desc::gauge(
    "strait_peer_rtt_quantile_seconds",
    &["peer", "replica", "quantile"],
    "RTT to the peer cluster's gateway over the last minute (quantile 0.5, 0.99).",
);
const RESPONSIVE: Desc = Desc::gauge(
    "strait_peer_responsive",
    &["peer", "replica"],
    "1 while the peer's gateway answers liveness probes and is not draining (only then does it get new connections).",
);
const CONNECTS: Desc = Desc::counter(
    "strait_peer_connects_total",
    &["peer", "replica", "result"],
    "Tunnel connection attempts to the peer cluster's gateway, by result (ok, error).",
);
/// The outbound tunnels' metrics.
pub(crate) const METRICS: &[Desc] = &[UP, RTT, RTT_QUANTILE, RESPONSIVE, CONNECTS];

/// What the outbound tunnels count, per peer.
#[derive(Clone)]
pub(crate) struct PeerMetrics(Registry);

impl PeerMetrics {
    /// The peer metrics in `registry`.
    pub fn new(registry: &Registry) -> Self {
        registry.describe(METRICS);
        Self(registry.clone())
    }

    fn gauges(&self, peer: &PeerTarget) -> Gauges {
        let (c, r) = (peer.cluster.as_str(), peer.replica.as_str());
        Gauges {
            up: self.0.gauge(&UP, &[c, r]),
            rtt: self.0.gauge(&RTT, &[c, r]),
            responsive: self.0.gauge(&RESPONSIVE, &[c, r]),
            p50: self.0.gauge(&RTT_QUANTILE, &[c, r, "0.5"]),
            p99: self.0.gauge(&RTT_QUANTILE, &[c, r, "0.99"]),
        }
    }

    fn connect(&self, peer: &PeerTarget, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.0
            .counter(&CONNECTS, &[&peer.cluster, &peer.replica, result])
            .increment(1);
    }
}

/// How a peer is dialled: the endpoint, the identity presented, the tuning.
#[derive(Clone)]
pub(crate) struct Dialer {
    /// The tunnel's QUIC endpoint.
    pub endpoint: quinn::Endpoint,
    /// The certificate presented (swapped by rotation).
    pub identity: CurrentIdentity,
    /// Timeouts, backoff, probing, windows.
    pub tuning: TunnelTuning,
}

/// What routing needs to know of one peer cluster's tunnels now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Liveness {
    /// Tunnel state: the best of its replicas'.
    pub status: PeerStatus,
    /// New connections may go there: to at least one replica (see
    /// [`PeerState::routable`]; a draining replica is not).
    pub routable: bool,
    /// A replica is up and answering probes.
    pub responsive: bool,
    /// Smoothed RTT of the live connection (the lowest of the routable replicas').
    pub rtt: Option<Duration>,
    /// Replicas this gateway keeps tunnels to (1 for a cluster's only gateway).
    pub replicas: usize,
    /// Of those, the ones new connections may go to.
    pub routable_replicas: usize,
}

impl Liveness {
    /// A cluster's liveness from its replicas'; `None` without any.
    fn of(replicas: &[Arc<PeerHandle>]) -> Option<Liveness> {
        let each: Vec<Liveness> = replicas.iter().map(|p| p.liveness()).collect();
        let rank = |s: PeerStatus| match s {
            PeerStatus::Up => 2,
            PeerStatus::Connecting => 1,
            PeerStatus::Down => 0,
        };
        let status = each.iter().map(|l| l.status).max_by_key(|s| rank(*s))?;
        let rtt = |routable: bool| {
            each.iter()
                .filter(|l| l.routable || !routable)
                .filter_map(|l| l.rtt)
                .min()
        };
        Some(Liveness {
            status,
            routable: each.iter().any(|l| l.routable),
            responsive: each.iter().any(|l| l.responsive),
            rtt: rtt(true).or_else(|| rtt(false)),
            replicas: each.len(),
            routable_replicas: each.iter().filter(|l| l.routable).count(),
        })
    }
}

/// The order in which a new connection tries `cluster`'s replicas: the routable ones,
/// least loaded first (connections open through each, and those still opening: a replica
/// that stopped answering collects opening streams and drops out of favour before its
/// probes find it dead), ties in an order rotated by `tiebreak`; before the load, a
/// replica a stream gave up on for silence comes after its siblings until it echoes a
/// probe again, and a stalled one ([`PeerHandle::is_stalled`]) after those that answer;
/// then the rest (which fail at once unless they just came back). Deterministic for a
/// given `tiebreak` and clock.
pub(crate) fn attempt_order(replicas: &[Arc<PeerHandle>], tiebreak: usize) -> Vec<Arc<PeerHandle>> {
    let n = replicas.len().max(1);
    type Indexed<'a> = Vec<(usize, &'a Arc<PeerHandle>)>;
    let (mut routable, rest): (Indexed, Indexed) = replicas
        .iter()
        .enumerate()
        .partition(|(_, p)| p.liveness().routable);
    routable.sort_by_key(|(i, p)| {
        (
            p.is_silent(),
            p.is_stalled(),
            p.open_connections(),
            (i + n - tiebreak % n) % n,
        )
    });
    routable
        .into_iter()
        .chain(rest)
        .map(|(_, p)| p.clone())
        .collect()
}

/// The peers as routing and the listeners read them: the tunnel's [`Peers`], or a fake in
/// tests.
pub(crate) trait PeerSet: Send + Sync + 'static {
    /// The replicas of `cluster` this gateway keeps tunnels to (one for a cluster's only
    /// gateway), in replica-name order; empty when it is not a peer.
    fn replicas(&self, cluster: &str) -> Vec<Arc<PeerHandle>>;

    /// What is known of `cluster`'s tunnels now; `None` when there is none.
    fn liveness(&self, cluster: &str) -> Option<Liveness> {
        Liveness::of(&self.replicas(cluster))
    }
}

/// The peers this gateway keeps tunnels to, by cluster id and replica name. Each has a
/// task keeping its connection up. Cheap to clone: clones share the set.
#[derive(Clone)]
pub(crate) struct Peers(Arc<Inner>);

/// A peer's key: (cluster, replica name; empty for a cluster's only gateway).
type Key = (String, String);

struct Inner {
    map: RwLock<BTreeMap<Key, Running>>,
    dialer: Dialer,
    metrics: PeerMetrics,
    life: Lifetime,
}

struct Running {
    handle: Arc<PeerHandle>,
    life: Lifetime,
}

impl Peers {
    /// An empty set; connection tasks run within `life`.
    pub fn new(dialer: Dialer, metrics: PeerMetrics, life: Lifetime) -> Self {
        Peers(Arc::new(Inner {
            map: RwLock::new(BTreeMap::new()),
            dialer,
            metrics,
            life,
        }))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<Key, Running>> {
        self.0.map.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A peer cluster's first replica (its only gateway, usually).
    pub fn get(&self, cluster: &str) -> Option<Arc<PeerHandle>> {
        self.replicas(cluster).into_iter().next()
    }

    /// A peer cluster's replicas, in replica-name order.
    pub fn replicas(&self, cluster: &str) -> Vec<Arc<PeerHandle>> {
        let from = (cluster.to_owned(), String::new());
        self.read()
            .range(from..)
            .take_while(|((c, _), _)| c == cluster)
            .map(|(_, r)| r.handle.clone())
            .collect()
    }

    /// Every peer in cluster-id order.
    pub fn all(&self) -> Vec<Arc<PeerHandle>> {
        self.read().values().map(|r| r.handle.clone()).collect()
    }

    /// Makes the set equal to `desired`: new peers get a connection task, peers whose
    /// address changed are restarted, peers no longer desired are no longer reconnected
    /// (their connection lives on while streams use it); each peer's drain state follows
    /// what it announced.
    pub fn reconcile(&self, desired: &[PeerTarget]) {
        let mut map = self.0.map.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|(cluster, replica), r| {
            let wanted = desired.iter().find(|p| {
                &p.cluster == cluster
                    && &p.replica == replica
                    && p.address == r.handle.target.address
            });
            match wanted {
                Some(p) => r.handle.set_draining(p.draining),
                None => {
                    // Only the reconnecting stops: streams still open on the connection
                    // keep it (and the client connections they carry) until they end.
                    tracing::info!(peer = %r.handle.target.name(), "peer removed");
                    r.life.stop();
                }
            }
            wanted.is_some()
        });
        for p in desired {
            let key = (p.cluster.clone(), p.replica.clone());
            if map.contains_key(&key) {
                continue;
            }
            tracing::info!(peer = %p.name(), address = %p.address, "peer added");
            let handle = Arc::new(PeerHandle::new(p.clone()));
            let life = self.0.life.child();
            life.spawn(maintain(
                self.0.dialer.clone(),
                self.0.metrics.clone(),
                handle.clone(),
            ));
            map.insert(key, Running { handle, life });
        }
    }

    /// Keeps the set equal to the desired peers until the gateway stops.
    pub async fn follow(self, mut desired: watch::Receiver<Arc<Desired>>) {
        loop {
            let d = desired.borrow_and_update().clone();
            self.reconcile(&d.peers);
            if desired.changed().await.is_err() {
                return;
            }
        }
    }

    /// Closes every live connection (the peers' tasks reconnect).
    pub fn close_all(&self, reason: &'static [u8]) {
        for p in self.all() {
            if let Some(c) = p.connection() {
                c.close(super::codes::SHUTDOWN, reason);
            }
        }
    }
}

impl PeerSet for Peers {
    fn replicas(&self, cluster: &str) -> Vec<Arc<PeerHandle>> {
        Peers::replicas(self, cluster)
    }
}

const INITIAL_BACKOFF: Duration = Duration::from_millis(50);

/// Keeps the connection to `peer` up until its lifetime ends.
async fn maintain(dialer: Dialer, metrics: PeerMetrics, peer: Arc<PeerHandle>) {
    let cluster = peer.target.name();
    let gauges = metrics.gauges(&peer.target);
    let _ended = Ended {
        peer: peer.clone(),
        gauges: gauges.clone(),
    };
    let mut backoff = INITIAL_BACKOFF;
    let mut rtt = None;
    // Unanswered rounds in a row: the first is a warning, the rest are expected.
    let mut unanswered = 0u32;
    loop {
        peer.set(PeerStatus::Connecting, None, None);
        match dial(&dialer, &peer.target, rtt).await {
            Ok(conn) => {
                tracing::info!(peer = %cluster, address = %peer.target.address, "tunnel up");
                metrics.connect(&peer.target, true);
                backoff = INITIAL_BACKOFF;
                unanswered = 0;
                gauges.up.set(1.0);
                peer.set(PeerStatus::Up, Some(conn.clone()), None);
                let reason = watch_connection(&dialer.tuning, &peer, &conn, &gauges).await;
                rtt = Some(conn.rtt());
                gauges.up.set(0.0);
                gauges.responsive.set(0.0);
                tracing::warn!(peer = %cluster, %reason, "tunnel down");
                peer.set(PeerStatus::Down, None, Some(reason));
            }
            Err(Dial::Unanswered(e)) => {
                // The round itself waited `connect_timeout`, sending a fresh handshake
                // every few hundred milliseconds: dial again at once.
                metrics.connect(&peer.target, false);
                unanswered += 1;
                if unanswered == 1 {
                    tracing::warn!(peer = %cluster, address = %peer.target.address, error = %e, "tunnel connect failed; dialling on");
                } else {
                    tracing::debug!(peer = %cluster, rounds = unanswered, error = %e, "tunnel connect failed");
                }
                peer.set(PeerStatus::Down, None, Some(e));
            }
            Err(Dial::Refused(e)) => {
                metrics.connect(&peer.target, false);
                tracing::warn!(peer = %cluster, address = %peer.target.address, error = %e, retry_in = ?backoff, "tunnel connect failed");
                peer.set(PeerStatus::Down, None, Some(e));
                // Jitter keeps a federation that lost a peer from reconnecting in lockstep.
                let jitter = rand::rng().random_range(0.5..1.0);
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(dialer.tuning.max_backoff.0);
            }
        }
    }
}

/// What a peer's state says once its task is stopped (the peer was removed, or the
/// gateway stops): down, with no connection of its own. Waiters for a handshake stop
/// waiting, the gauges stop claiming the tunnel is up, and the connection lives only as
/// long as streams still use it.
struct Ended {
    peer: Arc<PeerHandle>,
    gauges: Gauges,
}

impl Drop for Ended {
    fn drop(&mut self) {
        self.gauges.up.set(0.0);
        self.gauges.responsive.set(0.0);
        self.peer
            .set(PeerStatus::Down, None, Some("no longer a peer".to_owned()));
    }
}

/// Why a dial round ended without a connection.
enum Dial {
    /// Nothing answered within `connect_timeout` (the peer is dead, restarting or cut
    /// off): worth dialling again at once.
    Unanswered(String),
    /// The peer (or this gateway) refused: a certificate, a closed endpoint. Dialled again
    /// after a backoff.
    Refused(String),
}

/// Least time between two handshakes of one dial round.
const REDIAL_EVERY: Duration = Duration::from_millis(250);
/// Time between handshakes of a round while the peer's RTT is unknown.
const UNKNOWN_RTT_REDIAL: Duration = Duration::from_secs(1);

/// One dial round of at most `connect_timeout`: a fresh handshake every
/// max(250 ms, 3 RTT) (1 s while the RTT is unknown) until one completes. A peer that comes back mid-round is reached
/// by the next fresh Initial, instead of by a retransmission of the first one that
/// quinn's exponential backoff may put past the deadline. `rtt` is the last connection's
/// (a slow path gets fewer duplicate handshakes); the handshakes that lose are dropped,
/// which closes them.
async fn dial(
    dialer: &Dialer,
    peer: &PeerTarget,
    rtt: Option<Duration>,
) -> Result<Connection, Dial> {
    let identity = dialer.identity.load();
    let cfg = super::client_config(&identity, &peer.cluster, &dialer.tuning)
        .map_err(|e| Dial::Refused(e.to_string()))?;
    let window = dialer.tuning.connect_timeout.0;
    let deadline = tokio::time::sleep(window);
    tokio::pin!(deadline);
    // Without a measured RTT, three times quinn's initial estimate: a distant peer is not
    // sent a second handshake before the first could have completed.
    let spacing = rtt.map_or(UNKNOWN_RTT_REDIAL, |r| REDIAL_EVERY.max(r * 3));
    let mut fresh = tokio::time::interval(spacing);
    fresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut attempts = tokio::task::JoinSet::new();
    // A refusal stops new handshakes; those under way may still succeed.
    let mut refused = None;
    loop {
        tokio::select! {
            // A handshake completing as the deadline passes wins.
            biased;
            Some(done) = attempts.join_next() => match done {
                Ok(Ok(conn)) => return Ok(conn),
                // Unanswered for the transport's idle timeout: the later ones may still be.
                Ok(Err(quinn::ConnectionError::TimedOut)) => {}
                Ok(Err(e)) => refused = Some(e.to_string()),
                Err(e) => refused = Some(e.to_string()),
            },
            () = &mut deadline => {
                return Err(match refused {
                    Some(e) => Dial::Refused(e),
                    None => Dial::Unanswered(format!("handshake timed out after {window:?}")),
                });
            }
            _ = fresh.tick(), if refused.is_none() => {
                let connecting = dialer
                    .endpoint
                    .connect_with(cfg.clone(), peer.address, &peer.cluster)
                    .map_err(|e| Dial::Refused(e.to_string()))?;
                attempts.spawn(connecting);
            }
        }
        if let Some(e) = &refused
            && attempts.is_empty()
        {
            return Err(Dial::Refused(e.clone()));
        }
    }
}

#[derive(Clone)]
struct Gauges {
    up: metrics::Gauge,
    rtt: metrics::Gauge,
    responsive: metrics::Gauge,
    p50: metrics::Gauge,
    p99: metrics::Gauge,
}

/// Waits until the connection closes; returns why. Meanwhile it judges liveness: every
/// keep-alive interval it sends a small probe datagram that the peer echoes back. A
/// connection with no echo for `unresponsive_after` (or 4 RTT + keep-alive on a slow path)
/// has a peer that is dead, partitioned or blackholed — in either direction, which packet
/// counters alone cannot tell: with only our direction lost, the peer's own keep-alives
/// (and repeated old ACKs) keep arriving. That is known long before the idle timeout
/// closes the connection, and routing stops sending new connections there at once.
async fn watch_connection(
    t: &TunnelTuning,
    peer: &PeerHandle,
    conn: &Connection,
    gauges: &Gauges,
) -> String {
    let period = (t.keep_alive.0 / 2).max(Duration::from_millis(5));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = Instant::now();
    let mut sampled = Instant::now() - RTT_SAMPLE_EVERY;
    let mut probed = Instant::now() - t.keep_alive.0;
    let mut seq: u64 = 0;
    peer.clear_rtt();
    gauges.responsive.set(1.0);
    loop {
        let due = tokio::select! {
            reason = conn.closed() => return reason.to_string(),
            echo = conn.read_datagram() => {
                if echo.is_ok_and(|d| d.len() == 8) {
                    heard = Instant::now();
                    peer.note_heard(heard);
                }
                continue;
            }
            uni = conn.accept_uni() => {
                // The only unidirectional stream a gateway opens: it is draining.
                if let Ok(mut r) = uni
                    && let Ok(Ok(said)) = tokio::time::timeout(t.keep_alive.0, r.read_to_end(64)).await
                    && said == super::GOAWAY
                {
                    peer.going_away();
                }
                continue;
            }
            due = tick.tick() => due,
        };
        let now = Instant::now();
        if now.saturating_duration_since(probed) >= t.keep_alive.0 {
            probed = now;
            seq += 1;
            let _ = conn.send_datagram(bytes::Bytes::copy_from_slice(&seq.to_be_bytes()));
        }
        // A tick that ran late means this process stalled (the echoes were not read
        // either): that is no evidence against the peer. Nor is silence from a peer that
        // does not take datagrams (then the idle timeout is the only judge).
        let stalled = now.saturating_duration_since(due.into_std()) > t.keep_alive.0;
        if stalled || conn.max_datagram_size().is_none() {
            heard = now;
        }
        // Evidence of life for a stream deciding whether to try a sibling: an echo, or a
        // peer that takes no datagrams (the idle timeout judges it). A stall here is none.
        if conn.max_datagram_size().is_none() {
            peer.note_heard(now);
        }
        let stats = conn.stats();
        let rtt = stats.path.rtt;
        let limit = t.unresponsive_after.0.max(rtt * 4 + t.keep_alive.0);
        let silent = now.saturating_duration_since(heard);
        let responsive = silent < limit;
        if responsive != peer.state().responsive {
            if responsive {
                tracing::info!(peer = %peer.target.name(), "peer answers again");
            } else {
                tracing::warn!(peer = %peer.target.name(), silent = ?silent, "peer unresponsive; routing around it");
            }
            peer.set_responsive(responsive);
        }
        gauges.responsive.set(if responsive && !peer.is_draining() {
            1.0
        } else {
            0.0
        });
        if responsive && now.saturating_duration_since(sampled) >= RTT_SAMPLE_EVERY {
            sampled = now;
            peer.sample_rtt(rtt);
            gauges.rtt.set(rtt.as_secs_f64());
            if let Some(s) = peer.rtt_summary() {
                gauges.p50.set(s.p50_ms / 1000.0);
                gauges.p99.set(s.p99_ms / 1000.0);
            }
        }
    }
}

/// Seconds since `t`, for the admin API.
pub fn age(t: SystemTime) -> f64 {
    SystemTime::now()
        .duration_since(t)
        .unwrap_or_default()
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> PeerHandle {
        PeerHandle::new(PeerTarget::single("east", "127.0.0.1:9".parse().unwrap()))
    }

    #[tokio::test]
    async fn a_peer_whose_first_dial_failed_is_not_waited_for() {
        let p = handle();
        assert!(p.state().routable(), "the first dial is worth a wait");
        // A failed round is followed by the next at once: waiters may never see `Down`.
        p.set(PeerStatus::Down, None, Some("handshake timed out".into()));
        p.set(PeerStatus::Connecting, None, None);
        let waited = tokio::time::timeout(
            Duration::from_secs(5),
            p.ready_connection(Duration::from_secs(60)),
        )
        .await
        .expect("returns at once, not after its timeout");
        assert!(waited.is_none());
    }

    fn replica(name: &str, up: bool, open: usize) -> Arc<PeerHandle> {
        let p = Arc::new(PeerHandle::new(PeerTarget {
            replica: name.into(),
            ..PeerTarget::single("east", "127.0.0.1:9".parse().unwrap())
        }));
        p.set(
            if up { PeerStatus::Up } else { PeerStatus::Down },
            None,
            None,
        );
        for _ in 0..open {
            std::mem::forget(p.count_open());
        }
        p
    }

    fn names(order: &[Arc<PeerHandle>]) -> Vec<&str> {
        order.iter().map(|p| p.target.replica.as_str()).collect()
    }

    #[test]
    fn the_least_loaded_replica_goes_first_and_dead_ones_last() {
        let set = [
            replica("a", true, 5),
            replica("b", true, 1),
            replica("c", false, 0),
            replica("d", true, 3),
        ];
        assert_eq!(names(&attempt_order(&set, 0)), ["b", "d", "a", "c"]);
        // Equal loads: the tiebreak rotates which goes first.
        let even = [
            replica("a", true, 2),
            replica("b", true, 2),
            replica("c", true, 2),
        ];
        assert_eq!(names(&attempt_order(&even, 0)), ["a", "b", "c"]);
        assert_eq!(names(&attempt_order(&even, 1)), ["b", "c", "a"]);
        assert_eq!(names(&attempt_order(&even, 5)), ["c", "a", "b"]);
        // A connection still opening counts: the replica it waits on is not chosen next.
        let opening = even[0].count_open();
        assert_eq!(names(&attempt_order(&even, 0)), ["b", "c", "a"]);
        drop(opening);
        // A replica whose streams wait unanswered longer than a live one takes goes after
        // a busier one that answers; a stream just asked does not count against it.
        let busy = [replica("a", true, 0), replica("b", true, 4)];
        let fresh = busy[0].asked();
        assert_eq!(names(&attempt_order(&busy, 0)), ["a", "b"]);
        let stuck = AskedGuard::new(&busy[0].unanswered, Instant::now() - UNANSWERED_AFTER * 4);
        assert!(busy[0].is_stalled(), "mean wait 2x the limit");
        assert_eq!(names(&attempt_order(&busy, 0)), ["b", "a"]);
        drop(stuck);
        assert!(!busy[0].is_stalled());
        drop(fresh);
        assert_eq!(names(&attempt_order(&busy, 0)), ["a", "b"]);
        // A draining replica is tried only after every live one.
        set[1].going_away();
        assert_eq!(names(&attempt_order(&set, 0)), ["d", "a", "b", "c"]);
        // A replica a stream gave up on for silence goes after its siblings, however
        // lightly loaded, until it echoes a probe again.
        let asked = Instant::now();
        even[0].went_silent(asked);
        assert_eq!(names(&attempt_order(&even, 0)), ["b", "c", "a"]);
        even[0].note_heard(asked + Duration::from_millis(1));
        assert_eq!(names(&attempt_order(&even, 0)), ["a", "b", "c"]);
        // An echo that came after the stream asked means it was not silent after all.
        even[1].note_heard(asked + Duration::from_millis(1));
        even[1].went_silent(asked);
        assert_eq!(names(&attempt_order(&even, 0)), ["a", "b", "c"]);
        // A connection counted on a replica is released with its guard.
        let before = set[3].open_connections();
        drop(set[3].count_open());
        assert_eq!(set[3].open_connections(), before);
    }

    #[test]
    fn a_cluster_is_routable_while_any_replica_is() {
        let set = [replica("a", false, 0), replica("b", true, 0)];
        let l = Liveness::of(&set).unwrap();
        assert!(l.routable && l.responsive);
        assert_eq!(
            (l.status, l.replicas, l.routable_replicas),
            (PeerStatus::Up, 2, 1)
        );
        set[1].set_draining(true);
        let l = Liveness::of(&set).unwrap();
        assert!(!l.routable, "a draining replica takes no new connections");
        assert_eq!(l.routable_replicas, 0);
        set[1].set_draining(false);
        set[1].going_away();
        assert!(!Liveness::of(&set).unwrap().routable);
        // Its next incarnation's connection clears what the last one said.
        set[1].set(PeerStatus::Up, None, None);
        assert!(Liveness::of(&set).unwrap().routable);
        assert_eq!(Liveness::of(&[]), None);
    }
}
