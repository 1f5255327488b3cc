//! Fault injection for failover drills, driven through the admin API (`/v1/faults`).
//!
//! Packet faults (kill, blackhole, delay, loss) act in the tunnel's own UDP socket
//! ([`crate::tunnel::socket::FaultSocket`]), so they look to peers exactly like the network or the process
//! failing. Catalog faults (drain, unready) change what this gateway publishes to
//! discovery; `cut-discovery` silences its gossip. Every fault has a duration the gateway
//! enforces itself: a drill that dies cannot leave a fault behind.
//!
//! [`FaultTable`] holds the decisions (what is active, what expires when, what the active
//! set means for packets and the catalog) without I/O; [`Faults`] applies them.

pub mod api;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use strait_common::units::HumanDuration;
use strait_discovery::node::Node;
use tokio::sync::{Notify, watch};

use crate::desired::{CatalogFaults, Exports};
use crate::metrics::{Desc, Registry};
use crate::tunnel::peers::Peers;
use crate::tunnel::socket::PacketRules;
pub use strait_common::api::{ActiveFault, Direction, Fault, FaultRequest};

struct Entry {
    id: u64,
    fault: Fault,
    /// Tunnel addresses of the fault's peer (packet faults limited to one peer).
    peer_addrs: Vec<SocketAddr>,
    started: SystemTime,
    expires: Instant,
}

/// What the active faults mean, for whoever applies them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effects {
    /// Packet rules for the tunnel socket; `None` when no packet fault is active.
    pub packets: Option<PacketRules>,
    /// The tunnel is killed.
    pub killed: bool,
    /// Every export is published unready.
    pub drain: bool,
    /// These exports are published unready.
    pub unready: BTreeSet<String>,
    /// Gossip is cut.
    pub cut_discovery: bool,
}

impl Effects {
    /// What they change in the published catalog.
    pub fn catalog(&self) -> CatalogFaults {
        CatalogFaults {
            drain: self.drain,
            unready: self.unready.clone(),
        }
    }
}

/// The active faults and their expiry; no I/O, explicit time.
#[derive(Default)]
pub struct FaultTable {
    next_id: u64,
    active: Vec<Entry>,
}

impl FaultTable {
    /// Adds a fault lasting `duration` from `now`; its id.
    pub fn add(
        &mut self,
        fault: Fault,
        peer_addrs: Vec<SocketAddr>,
        now: Instant,
        duration: Duration,
    ) -> u64 {
        self.next_id += 1;
        self.active.push(Entry {
            id: self.next_id,
            fault,
            peer_addrs,
            started: SystemTime::now(),
            expires: now + duration,
        });
        self.next_id
    }

    /// Removes one fault; whether it was active.
    pub fn remove(&mut self, id: u64) -> bool {
        let before = self.active.len();
        self.active.retain(|e| e.id != id);
        self.active.len() != before
    }

    /// Removes every fault; their ids.
    pub fn clear(&mut self) -> Vec<u64> {
        self.active.drain(..).map(|e| e.id).collect()
    }

    /// Removes the faults whose time is up; their ids and kinds.
    pub fn expire(&mut self, now: Instant) -> Vec<(u64, &'static str)> {
        let (done, keep) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|e| e.expires <= now);
        self.active = keep;
        done.into_iter()
            .map(|e: Entry| (e.id, e.fault.kind()))
            .collect()
    }

    /// When the next fault ends.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.active.iter().map(|e| e.expires).min()
    }

    /// The active faults, as of `now`.
    pub fn list(&self, now: Instant) -> Vec<ActiveFault> {
        self.active
            .iter()
            .map(|e| ActiveFault {
                id: e.id,
                fault: e.fault.clone(),
                started_unix_ms: e
                    .started
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis() as u64,
                expires_in_seconds: e.expires.saturating_duration_since(now).as_secs_f64(),
            })
            .collect()
    }

    /// What the active faults add up to.
    pub fn effects(&self) -> Effects {
        let mut fx = Effects::default();
        let mut rules = PacketRules::default();
        for e in &self.active {
            let peers = e.fault.peer().map(|_| e.peer_addrs.clone());
            match &e.fault {
                Fault::KillTunnel => {
                    fx.killed = true;
                    rules.drop(None, Direction::Both);
                }
                Fault::Blackhole { direction, .. } => rules.drop(peers, *direction),
                Fault::Delay { latency, .. } => rules.delay(peers, latency.0),
                Fault::Loss {
                    fraction,
                    direction,
                    ..
                } => rules.lose(peers, *fraction, *direction),
                Fault::Drain => fx.drain = true,
                Fault::Unready { service } => {
                    fx.unready.insert(service.clone());
                }
                Fault::CutDiscovery => fx.cut_discovery = true,
            }
        }
        fx.packets = (!rules.is_empty()).then_some(rules);
        fx
    }
}

/// Why a fault was not injected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FaultError {
    /// Fault injection is not configured on this gateway.
    #[error("fault injection is off on this gateway")]
    Disabled,
    /// A field of the request is wrong.
    #[error("field `{field}`: {problem}")]
    Invalid {
        /// The field path in the request.
        field: String,
        /// What is wrong.
        problem: String,
        /// What to do.
        fix: String,
    },
}

impl FaultError {
    fn invalid(field: &str, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        FaultError::Invalid {
            field: field.to_owned(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// The admin token that guards `/v1/faults`; none: fault injection is off.
#[derive(Debug, Clone, Default)]
pub struct Token(Option<String>);

impl Token {
    /// The token from `faults.token_file`, if fault injection is on.
    pub fn new(token: Option<String>) -> Self {
        Token(token)
    }

    /// Whether fault injection is on.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Whether `presented` is the admin token (constant time in its length).
    pub fn authorized(&self, presented: &str) -> Result<bool, FaultError> {
        let token = self.0.as_deref().ok_or(FaultError::Disabled)?;
        let (a, b) = (token.as_bytes(), presented.as_bytes());
        let diff = a
            .iter()
            .zip(b)
            .fold(a.len() ^ b.len(), |d, (x, y)| d | usize::from(x ^ y));
        Ok(diff == 0)
    }
}

const ACTIVE: Desc = Desc::gauge(
    "strait_faults_active",
    &["kind"],
    "Drill faults in force now, by kind.",
);
const INJECTED: Desc = Desc::counter(
    "strait_faults_injected_total",
    &["kind"],
    "Drill faults injected through the admin API, by kind.",
);
/// Fault injection's metrics.
pub(crate) const METRICS: &[Desc] = &[ACTIVE, INJECTED];

/// What fault injection counts.
#[derive(Clone)]
pub struct FaultMetrics(Registry);

impl FaultMetrics {
    /// The fault metrics in `registry`.
    pub fn new(registry: &Registry) -> Self {
        registry.describe(METRICS);
        Self(registry.clone())
    }
}

/// What faults act on.
pub struct Targets {
    /// The rules the tunnel socket follows for every packet.
    pub packets: Arc<ArcSwapOption<PacketRules>>,
    /// The outbound tunnels (a kill closes them; packet faults name peers).
    pub peers: Peers,
    /// The discovery member (cut; its members' tunnel addresses).
    pub discovery: Option<Arc<Node>>,
    /// Which services this gateway exports.
    pub exports: Exports,
}

/// A gateway's fault state: the table, and the levers it pulls.
pub struct Faults {
    table: Mutex<FaultTable>,
    targets: Targets,
    catalog: watch::Sender<CatalogFaults>,
    killed: watch::Sender<bool>,
    changed: Notify,
    /// The admin token.
    pub(crate) token: Token,
    max_duration: Duration,
    metrics: FaultMetrics,
}

impl Faults {
    /// Fault state for a gateway; `token` from the config's `faults.token_file`.
    pub fn new(
        token: Token,
        max_duration: Duration,
        targets: Targets,
        metrics: FaultMetrics,
    ) -> Self {
        Faults {
            table: Mutex::new(FaultTable::default()),
            targets,
            catalog: watch::channel(CatalogFaults::default()).0,
            killed: watch::channel(false).0,
            changed: Notify::new(),
            token,
            max_duration,
            metrics,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, FaultTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The catalog faults in force; the receiver sees every change.
    pub fn catalog(&self) -> watch::Receiver<CatalogFaults> {
        self.catalog.subscribe()
    }

    /// Whether the tunnel is killed; the receiver sees every change.
    pub fn killed(&self) -> watch::Receiver<bool> {
        self.killed.subscribe()
    }

    /// The active faults.
    pub fn list(&self) -> Vec<ActiveFault> {
        self.table().list(Instant::now())
    }

    /// Checks and injects a fault.
    pub fn inject(&self, req: FaultRequest) -> Result<ActiveFault, FaultError> {
        if let Some((field, problem, fix)) = req.fault.check() {
            return Err(FaultError::invalid(&format!("fault.{field}"), problem, fix));
        }
        let d = req.duration.0;
        if d.is_zero() || d > self.max_duration {
            return Err(FaultError::invalid(
                "duration",
                format!(
                    "{} is outside 1ms..{} (faults.max_duration)",
                    req.duration,
                    HumanDuration(self.max_duration)
                ),
                "give a shorter duration, or raise faults.max_duration in the gateway config",
            ));
        }
        let peer_addrs = match req.fault.peer() {
            Some(p) => self.peer_addresses(p)?,
            None => Vec::new(),
        };
        match &req.fault {
            Fault::Drain | Fault::Unready { .. } | Fault::CutDiscovery
                if self.targets.discovery.is_none() =>
            {
                return Err(FaultError::invalid(
                    "fault.kind",
                    format!(
                        "`{}` acts through discovery, which this gateway does not run",
                        req.fault.kind()
                    ),
                    "use it on a gateway with a `discovery:` block, or blackhole the peer instead",
                ));
            }
            Fault::Unready { service } if !self.exports(service) => {
                return Err(FaultError::invalid(
                    "fault.service",
                    format!("`{service}` is not exported by this gateway"),
                    "name one of this gateway's exports (GET /v1/services)",
                ));
            }
            _ => {}
        }
        let kind = req.fault.kind();
        let now = Instant::now();
        let active = {
            let mut t = self.table();
            let id = t.add(req.fault, peer_addrs, now, d);
            t.list(now).into_iter().find(|a| a.id == id)
        }
        .expect("just added");
        tracing::warn!(id = active.id, kind, duration = %req.duration, fault = ?active.fault, "drill fault injected");
        self.metrics.0.counter(&INJECTED, &[kind]).increment(1);
        self.apply();
        Ok(active)
    }

    /// Undoes one fault; whether it was active.
    pub fn undo(&self, id: u64) -> bool {
        let found = self.table().remove(id);
        if found {
            tracing::warn!(id, "drill fault undone");
            self.apply();
        }
        found
    }

    /// Undoes every fault; their ids.
    pub fn undo_all(&self) -> Vec<u64> {
        let ids = self.table().clear();
        if !ids.is_empty() {
            tracing::warn!(?ids, "drill faults undone");
            self.apply();
        }
        ids
    }

    /// Makes the table's effects real.
    fn apply(&self) {
        // The table stays locked until the effects are in place: two changes applied at
        // once (an undo and an expiry) must not land in the wrong order.
        let table = self.table();
        let fx = table.effects();
        self.targets.packets.store(fx.packets.clone().map(Arc::new));
        if let Some(node) = &self.targets.discovery {
            node.set_cut(fx.cut_discovery);
        }
        let was_killed = *self.killed.borrow();
        if fx.killed && !was_killed {
            // The socket already drops everything, so these closes reach no one: to the peers
            // the gateway simply went silent, and afterwards every connection starts afresh.
            self.targets.peers.close_all(b"tunnel killed by a drill");
        }
        let mut kinds: std::collections::BTreeMap<&str, f64> = Default::default();
        for a in table.list(Instant::now()) {
            *kinds.entry(a.fault.kind()).or_default() += 1.0;
        }
        for kind in Fault::KINDS {
            self.metrics
                .0
                .gauge(&ACTIVE, &[kind])
                .set(kinds.get(kind).copied().unwrap_or(0.0));
        }
        self.killed
            .send_if_modified(|k| std::mem::replace(k, fx.killed) != fx.killed);
        let catalog = fx.catalog();
        self.catalog
            .send_if_modified(|c| std::mem::replace(c, catalog.clone()) != catalog);
        drop(table);
        self.changed.notify_one();
    }

    /// Tunnel addresses of a peer cluster: the address of each of its replicas this
    /// gateway has a tunnel to and, with discovery, every one it advertises (its origin's,
    /// and each replica record's).
    fn peer_addresses(&self, cluster: &str) -> Result<Vec<SocketAddr>, FaultError> {
        let peers = &self.targets.peers;
        let mut addrs: Vec<SocketAddr> = peers
            .replicas(cluster)
            .iter()
            .map(|p| p.target.address)
            .collect();
        if let Some(node) = &self.targets.discovery {
            let view = node.view();
            let members = view.members.iter().filter(|m| m.info.cluster == cluster);
            let replicas = view.replicas.iter().filter(|r| r.info.cluster == cluster);
            addrs.extend(members.map(|m| m.info.tunnel_addr));
            addrs.extend(replicas.map(|r| r.info.tunnel_addr));
        }
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            let known: Vec<String> = peers
                .all()
                .iter()
                .map(|p| p.target.cluster.clone())
                .collect();
            return Err(FaultError::invalid(
                "fault.peer",
                format!("`{cluster}` is not a peer of this gateway"),
                format!("name one of: {}", known.join(", ")),
            ));
        }
        Ok(addrs)
    }

    fn exports(&self, service: &str) -> bool {
        self.targets
            .exports
            .now()
            .iter()
            .any(|e| format!("{}/{}", e.namespace, e.name) == service)
    }

    /// Undoes faults when their time is up, until the gateway stops.
    pub async fn expire(self: Arc<Self>) {
        loop {
            let next = self.table().next_expiry();
            let wake = self.changed.notified();
            tokio::pin!(wake);
            match next {
                Some(at) => tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = &mut wake => continue,
                },
                None => {
                    wake.await;
                    continue;
                }
            }
            let done = self.table().expire(Instant::now());
            if !done.is_empty() {
                for (id, kind) in &done {
                    tracing::warn!(id, kind, "drill fault ended (its duration is up)");
                }
                self.apply();
            }
        }
    }
}

#[cfg(test)]
mod tests;
