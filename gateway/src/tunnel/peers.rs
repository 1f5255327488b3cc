//! Outbound tunnel connections: one per configured peer, kept up with reconnect backoff.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use quinn::Connection;
use rand::Rng;
use serde::Serialize;
use strait_common::config::Peer;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::Instrument;

use crate::gateway::Shared;

/// Connection state of one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerStatus {
    /// A handshake is under way.
    Connecting,
    /// The tunnel connection is established.
    Up,
    /// The last attempt failed or the connection was lost; retrying with backoff.
    Down,
}

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
    /// yet connected for the first time (a peer just learned from discovery, worth a wait).
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

/// RTT percentiles over the last minute.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RttSummary {
    /// Median, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, in milliseconds.
    pub p99_ms: f64,
    /// Samples behind the figures.
    pub samples: usize,
}

/// A configured peer and its live state.
pub struct PeerHandle {
    /// The peer's configuration.
    pub config: Peer,
    state: watch::Sender<PeerState>,
    rtt: Mutex<VecDeque<Duration>>,
}

impl PeerHandle {
    fn new(config: Peer) -> Self {
        let state = PeerState {
            status: PeerStatus::Connecting,
            connection: None,
            since: SystemTime::now(),
            last_error: None,
            connects: 0,
            responsive: false,
        };
        Self {
            config,
            state: watch::channel(state).0,
            rtt: Mutex::new(VecDeque::with_capacity(RTT_SAMPLES)),
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

    /// The connection once usable: waits while a handshake is under way (a peer just
    /// learned from discovery), at most `timeout`; `None` at once if the peer is down.
    pub async fn ready_connection(&self, timeout: Duration) -> Option<Connection> {
        let mut rx = self.state.subscribe();
        let settled =
            tokio::time::timeout(timeout, rx.wait_for(|s| s.status != PeerStatus::Connecting))
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

    fn set(&self, status: PeerStatus, connection: Option<Connection>, error: Option<String>) {
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

/// The peers this gateway keeps tunnels to, by cluster id: the configured ones plus, with
/// discovery, every member of the federation. Each has a task keeping its connection up.
#[derive(Default)]
pub struct Peers(RwLock<BTreeMap<String, Running>>);

struct Running {
    handle: Arc<PeerHandle>,
    task: AbortHandle,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Peers {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Running>> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
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
    /// address changed are restarted, peers no longer desired are dropped (their
    /// connection closes).
    pub fn reconcile(&self, shared: &Arc<Shared>, desired: &[Peer]) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|cluster, r| {
            desired
                .iter()
                .any(|p| &p.cluster == cluster && p.address == r.handle.config.address)
        });
        for p in desired {
            if map.contains_key(&p.cluster) {
                continue;
            }
            tracing::info!(peer = %p.cluster, address = %p.address, "peer added");
            let handle = Arc::new(PeerHandle::new(p.clone()));
            let task = tokio::spawn(maintain(shared.clone(), handle.clone()).in_current_span())
                .abort_handle();
            map.insert(p.cluster.clone(), Running { handle, task });
        }
    }

    /// Stops every connection task.
    pub fn clear(&self) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

const INITIAL_BACKOFF: Duration = Duration::from_millis(50);

/// Keeps the connection to `peer` up until the gateway shuts down.
pub async fn maintain(shared: Arc<Shared>, peer: Arc<PeerHandle>) {
    let cluster = peer.config.cluster.clone();
    let up = shared
        .metrics
        .gauge("strait_peer_up", &[("peer", &cluster)]);
    let gauges = Gauges {
        rtt: shared
            .metrics
            .gauge("strait_peer_rtt_seconds", &[("peer", &cluster)]),
        responsive: shared
            .metrics
            .gauge("strait_peer_responsive", &[("peer", &cluster)]),
        p50: shared.metrics.gauge(
            "strait_peer_rtt_quantile_seconds",
            &[("peer", &cluster), ("quantile", "0.5")],
        ),
        p99: shared.metrics.gauge(
            "strait_peer_rtt_quantile_seconds",
            &[("peer", &cluster), ("quantile", "0.99")],
        ),
    };
    let mut backoff = INITIAL_BACKOFF;
    loop {
        peer.set(PeerStatus::Connecting, None, None);
        match connect(&shared, &peer).await {
            Ok(conn) => {
                tracing::info!(peer = %cluster, address = %peer.config.address, "tunnel up");
                shared
                    .metrics
                    .counter(
                        "strait_peer_connects_total",
                        &[("peer", &cluster), ("result", "ok")],
                    )
                    .increment(1);
                backoff = INITIAL_BACKOFF;
                up.set(1.0);
                peer.set(PeerStatus::Up, Some(conn.clone()), None);
                let reason = watch_connection(&shared, &peer, &conn, &gauges).await;
                up.set(0.0);
                gauges.responsive.set(0.0);
                tracing::warn!(peer = %cluster, %reason, "tunnel down");
                peer.set(PeerStatus::Down, None, Some(reason));
            }
            Err(e) => {
                shared
                    .metrics
                    .counter(
                        "strait_peer_connects_total",
                        &[("peer", &cluster), ("result", "error")],
                    )
                    .increment(1);
                tracing::warn!(peer = %cluster, address = %peer.config.address, error = %e, retry_in = ?backoff, "tunnel connect failed");
                peer.set(PeerStatus::Down, None, Some(e));
                // Jitter keeps a federation that lost a peer from reconnecting in lockstep.
                let jitter = rand::rng().random_range(0.5..1.0);
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(shared.config.tunnel.max_backoff.0);
            }
        }
    }
}

async fn connect(shared: &Shared, peer: &PeerHandle) -> Result<Connection, String> {
    let identity = shared.identity.load();
    let cfg = super::client_config(&identity, &peer.config.cluster, &shared.config.tunnel)
        .map_err(|e| e.to_string())?;
    let connecting = shared
        .endpoint
        .connect_with(cfg, peer.config.address, &peer.config.cluster)
        .map_err(|e| e.to_string())?;
    let timeout = shared.config.tunnel.connect_timeout.0;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("handshake timed out after {timeout:?}")),
    }
}

struct Gauges {
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
    shared: &Shared,
    peer: &PeerHandle,
    conn: &Connection,
    gauges: &Gauges,
) -> String {
    let t = &shared.config.tunnel;
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
                tracing::info!(peer = %peer.config.cluster, "peer answers again");
            } else {
                tracing::warn!(peer = %peer.config.cluster, silent = ?silent, "peer unresponsive; routing around it");
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
