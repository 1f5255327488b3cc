//! Outbound tunnel connections: one per configured peer, kept up with reconnect backoff.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

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
}

/// A configured peer and its live state.
pub struct PeerHandle {
    /// The peer's configuration.
    pub config: Peer,
    state: watch::Sender<PeerState>,
}

impl PeerHandle {
    fn new(config: Peer) -> Self {
        let state = PeerState {
            status: PeerStatus::Connecting,
            connection: None,
            since: SystemTime::now(),
            last_error: None,
            connects: 0,
        };
        Self {
            config,
            state: watch::channel(state).0,
        }
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
    let rtt = shared
        .metrics
        .gauge("strait_peer_rtt_seconds", &[("peer", &cluster)]);
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
                let reason = watch_connection(&conn, &rtt).await;
                up.set(0.0);
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

/// Waits until the connection closes, publishing its RTT meanwhile; returns why it closed.
async fn watch_connection(conn: &Connection, rtt: &metrics::Gauge) -> String {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            reason = conn.closed() => return reason.to_string(),
            _ = tick.tick() => rtt.set(conn.rtt().as_secs_f64()),
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
