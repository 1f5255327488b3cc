//! Outbound tunnel connections: one per desired peer (configured, or a discovery member),
//! kept up with reconnect backoff, each judged alive by probes of its own.

use std::collections::{BTreeMap, VecDeque};
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
            target,
            state: watch::channel(state).0,
            rtt: Mutex::new(VecDeque::with_capacity(RTT_SAMPLES)),
        }
    }

    /// What routing needs to know of this peer now (cheap: read for every new connection).
    pub fn liveness(&self) -> Liveness {
        let s = self.state.borrow();
        Liveness {
            status: s.status,
            routable: s.routable(),
            responsive: s.status == PeerStatus::Up && s.responsive,
            rtt: s.connection.as_ref().map(Connection::rtt),
        }
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
    &["peer"],
    "1 while the tunnel connection to the peer cluster is established.",
);
const RTT: Desc = Desc::gauge(
    "strait_peer_rtt_seconds",
    &["peer"],
    "Smoothed QUIC RTT to the peer cluster.",
);
const RTT_QUANTILE: Desc = Desc::gauge(
    "strait_peer_rtt_quantile_seconds",
    &["peer", "quantile"],
    "RTT to the peer cluster over the last minute (quantile 0.5, 0.99).",
);
const RESPONSIVE: Desc = Desc::gauge(
    "strait_peer_responsive",
    &["peer"],
    "1 while the peer answers liveness probes (only then does it get new connections).",
);
const CONNECTS: Desc = Desc::counter(
    "strait_peer_connects_total",
    &["peer", "result"],
    "Tunnel connection attempts to the peer cluster, by result (ok, error).",
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

    fn gauges(&self, peer: &str) -> Gauges {
        Gauges {
            up: self.0.gauge(&UP, &[peer]),
            rtt: self.0.gauge(&RTT, &[peer]),
            responsive: self.0.gauge(&RESPONSIVE, &[peer]),
            p50: self.0.gauge(&RTT_QUANTILE, &[peer, "0.5"]),
            p99: self.0.gauge(&RTT_QUANTILE, &[peer, "0.99"]),
        }
    }

    fn connect(&self, peer: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.0.counter(&CONNECTS, &[peer, result]).increment(1);
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

/// What routing needs to know of one peer's tunnel now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Liveness {
    /// Tunnel state.
    pub status: PeerStatus,
    /// New connections may go there (see [`PeerState::routable`]).
    pub routable: bool,
    /// Up and answering probes.
    pub responsive: bool,
    /// Smoothed RTT of the live connection.
    pub rtt: Option<Duration>,
}

/// The peers as routing and the listeners read them: the tunnel's [`Peers`], or a fake in
/// tests.
pub(crate) trait PeerSet: Send + Sync + 'static {
    /// One peer, if this gateway keeps a tunnel to it.
    fn get(&self, cluster: &str) -> Option<Arc<PeerHandle>>;

    /// What is known of `cluster`'s tunnel now; `None` when there is none.
    fn liveness(&self, cluster: &str) -> Option<Liveness> {
        self.get(cluster).map(|p| p.liveness())
    }
}

/// The peers this gateway keeps tunnels to, by cluster id. Each has a task keeping its
/// connection up. Cheap to clone: clones share the set.
#[derive(Clone)]
pub(crate) struct Peers(Arc<Inner>);

struct Inner {
    map: RwLock<BTreeMap<String, Running>>,
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

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Running>> {
        self.0.map.read().unwrap_or_else(|p| p.into_inner())
    }

    /// One peer.
    pub fn get(&self, cluster: &str) -> Option<Arc<PeerHandle>> {
        self.read().get(cluster).map(|r| r.handle.clone())
    }

    /// Every peer in cluster-id order.
    pub fn all(&self) -> Vec<Arc<PeerHandle>> {
        self.read().values().map(|r| r.handle.clone()).collect()
    }

    /// Makes the set equal to `desired`: new peers get a connection task, peers whose
    /// address changed are restarted, peers no longer desired are no longer reconnected
    /// (their connection lives on while streams use it).
    pub fn reconcile(&self, desired: &[PeerTarget]) {
        let mut map = self.0.map.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|cluster, r| {
            let keep = desired
                .iter()
                .any(|p| &p.cluster == cluster && p.address == r.handle.target.address);
            if !keep {
                // Only the reconnecting stops: streams still open on the connection keep it
                // (and the client connections they carry) until they end.
                tracing::info!(peer = %cluster, "peer removed");
                r.life.stop();
            }
            keep
        });
        for p in desired {
            if map.contains_key(&p.cluster) {
                continue;
            }
            tracing::info!(peer = %p.cluster, address = %p.address, "peer added");
            let handle = Arc::new(PeerHandle::new(p.clone()));
            let life = self.0.life.child();
            life.spawn(maintain(
                self.0.dialer.clone(),
                self.0.metrics.clone(),
                handle.clone(),
            ));
            map.insert(p.cluster.clone(), Running { handle, life });
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
    fn get(&self, cluster: &str) -> Option<Arc<PeerHandle>> {
        Peers::get(self, cluster)
    }
}

const INITIAL_BACKOFF: Duration = Duration::from_millis(50);

/// Keeps the connection to `peer` up until its lifetime ends.
async fn maintain(dialer: Dialer, metrics: PeerMetrics, peer: Arc<PeerHandle>) {
    let cluster = peer.target.cluster.clone();
    let gauges = metrics.gauges(&cluster);
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
                metrics.connect(&cluster, true);
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
                metrics.connect(&cluster, false);
                unanswered += 1;
                if unanswered == 1 {
                    tracing::warn!(peer = %cluster, address = %peer.target.address, error = %e, "tunnel connect failed; dialling on");
                } else {
                    tracing::debug!(peer = %cluster, rounds = unanswered, error = %e, "tunnel connect failed");
                }
                peer.set(PeerStatus::Down, None, Some(e));
            }
            Err(Dial::Refused(e)) => {
                metrics.connect(&cluster, false);
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
        let stats = conn.stats();
        let rtt = stats.path.rtt;
        let limit = t.unresponsive_after.0.max(rtt * 4 + t.keep_alive.0);
        let silent = now.saturating_duration_since(heard);
        let responsive = silent < limit;
        if responsive != peer.state().responsive {
            if responsive {
                tracing::info!(peer = %peer.target.cluster, "peer answers again");
            } else {
                tracing::warn!(peer = %peer.target.cluster, silent = ?silent, "peer unresponsive; routing around it");
            }
            peer.set_responsive(responsive);
            gauges.responsive.set(if responsive { 1.0 } else { 0.0 });
        }
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
        PeerHandle::new(PeerTarget {
            cluster: "east".into(),
            address: "127.0.0.1:9".parse().unwrap(),
        })
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
}
