//! Fault injection for failover drills, driven through the admin API (`/v1/faults`).
//!
//! Packet faults (kill, blackhole, delay, loss) act in the tunnel's own UDP socket
//! ([`socket::FaultSocket`]), so they look to peers exactly like the network or the process
//! failing. Catalog faults (drain, unready) change what this gateway publishes to
//! discovery; `cut-discovery` silences its gossip. Every fault has a duration the gateway
//! enforces itself: a drill that dies cannot leave a fault behind.
//!
//! [`FaultTable`] holds the decisions (what is active, what expires when, what the active
//! set means for packets and the catalog) without I/O; [`Faults`] applies them.

pub mod api;
pub mod socket;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use serde::{Deserialize, Serialize};
use strait_common::units::HumanDuration;
use tokio::sync::{Notify, watch};

use crate::gateway::Shared;
use crate::tunnel::codes;
pub use socket::{PacketRules, Verdict};

/// One fault a gateway can inject into itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Fault {
    /// The tunnel stops as in a crash: every connection is dropped without a word to the
    /// peer and every packet in or out is discarded until the fault ends.
    KillTunnel,
    /// Packets to and/or from one peer cluster (every peer when `peer` is absent) vanish.
    Blackhole {
        /// Peer cluster; absent: all of them.
        #[serde(default)]
        peer: Option<String>,
        /// Which way packets are lost.
        #[serde(default)]
        direction: Direction,
    },
    /// Packets this gateway sends (to one peer, or all) leave `latency` late.
    Delay {
        /// Peer cluster; absent: all of them.
        #[serde(default)]
        peer: Option<String>,
        /// Added one-way delay (round trips grow by the same).
        latency: HumanDuration,
    },
    /// A random `fraction` of packets to and/or from a peer is dropped.
    Loss {
        /// Peer cluster; absent: all of them.
        #[serde(default)]
        peer: Option<String>,
        /// Share of packets dropped, above 0 and at most 1.
        fraction: f64,
        /// Which way packets are lost.
        #[serde(default)]
        direction: Direction,
    },
    /// Every exported service is published as having no ready endpoint, so peers send new
    /// connections elsewhere; connections already open (and late arrivals) are still served.
    Drain,
    /// One exported service (`namespace/name`) is published as having no ready endpoint.
    Unready {
        /// `namespace/name` of an exported service.
        service: String,
    },
    /// Gossip stops both ways; the data plane serves on the last view it had.
    CutDiscovery,
}

impl Fault {
    /// The kind's name, as in the API and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::KillTunnel => "kill-tunnel",
            Fault::Blackhole { .. } => "blackhole",
            Fault::Delay { .. } => "delay",
            Fault::Loss { .. } => "loss",
            Fault::Drain => "drain",
            Fault::Unready { .. } => "unready",
            Fault::CutDiscovery => "cut-discovery",
        }
    }

    /// The peer cluster a packet fault is limited to.
    pub fn peer(&self) -> Option<&str> {
        match self {
            Fault::Blackhole { peer, .. }
            | Fault::Delay { peer, .. }
            | Fault::Loss { peer, .. } => peer.as_deref(),
            _ => None,
        }
    }

    /// Problems with the fault's own fields: (field, problem, fix).
    pub fn check(&self) -> Option<(&'static str, String, &'static str)> {
        match self {
            Fault::Delay { latency, .. }
                if latency.0.is_zero() || latency.0 > Duration::from_secs(10) =>
            {
                Some((
                    "latency",
                    format!("{latency} is outside 1ms..10s"),
                    "give a one-way delay such as `200ms`",
                ))
            }
            Fault::Loss { fraction, .. } if !(*fraction > 0.0 && *fraction <= 1.0) => Some((
                "fraction",
                format!("{fraction} is not above 0 and at most 1"),
                "give the share of packets to drop, e.g. `0.3`",
            )),
            Fault::Unready { service } if service.split_once('/').is_none() => Some((
                "service",
                format!("`{service}` is not `namespace/name`"),
                "name an exported service as `namespace/name`",
            )),
            _ => None,
        }
    }
}

/// Which packets a fault drops, seen from the gateway that injects it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Both ways.
    #[default]
    Both,
    /// Packets sent to the peer.
    To,
    /// Packets received from the peer.
    From,
}

/// A request to inject a fault for a while.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultRequest {
    /// What to break.
    pub fault: Fault,
    /// How long; the gateway undoes the fault by itself after that.
    pub duration: HumanDuration,
}

/// An injected fault, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ActiveFault {
    /// Id to undo it with (`DELETE /v1/faults/{id}`).
    pub id: u64,
    /// The fault.
    pub fault: Fault,
    /// When it was injected (Unix milliseconds).
    pub started_unix_ms: u64,
    /// Seconds until the gateway undoes it by itself.
    pub expires_in_seconds: f64,
}

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

/// A gateway's fault state: the table, and the levers it pulls.
pub struct Faults {
    table: Mutex<FaultTable>,
    /// Read by the tunnel socket on every packet.
    packets: Arc<ArcSwapOption<PacketRules>>,
    effects: watch::Sender<Effects>,
    changed: Notify,
    /// The admin token; `None`: fault injection is off.
    pub(crate) token: Option<String>,
    max_duration: Duration,
}

impl Faults {
    /// Fault state for a gateway; `token` from the config's `faults.token_file`.
    pub fn new(
        token: Option<String>,
        max_duration: Duration,
        packets: Arc<ArcSwapOption<PacketRules>>,
    ) -> Self {
        Faults {
            table: Mutex::new(FaultTable::default()),
            packets,
            effects: watch::channel(Effects::default()).0,
            changed: Notify::new(),
            token,
            max_duration,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, FaultTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `presented` is the admin token (constant time in its length).
    pub fn authorized(&self, presented: &str) -> Result<bool, FaultError> {
        let token = self.token.as_deref().ok_or(FaultError::Disabled)?;
        let (a, b) = (token.as_bytes(), presented.as_bytes());
        let diff = a
            .iter()
            .zip(b)
            .fold(a.len() ^ b.len(), |d, (x, y)| d | usize::from(x ^ y));
        Ok(diff == 0)
    }

    /// What the active faults mean now; changes are announced on the receiver.
    pub fn subscribe(&self) -> watch::Receiver<Effects> {
        self.effects.subscribe()
    }

    /// The active faults.
    pub fn list(&self) -> Vec<ActiveFault> {
        self.table().list(Instant::now())
    }

    /// Checks and injects a fault.
    pub fn inject(&self, shared: &Shared, req: FaultRequest) -> Result<ActiveFault, FaultError> {
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
            Some(p) => peer_addresses(shared, p)?,
            None => Vec::new(),
        };
        match &req.fault {
            Fault::Drain | Fault::Unready { .. } | Fault::CutDiscovery
                if shared.discovery.is_none() =>
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
            Fault::Unready { service } if !exports(shared, service) => {
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
        shared
            .metrics
            .counter("strait_faults_injected_total", &[("kind", kind)])
            .increment(1);
        self.apply(shared);
        Ok(active)
    }

    /// Undoes one fault; whether it was active.
    pub fn undo(&self, shared: &Shared, id: u64) -> bool {
        let found = self.table().remove(id);
        if found {
            tracing::warn!(id, "drill fault undone");
            self.apply(shared);
        }
        found
    }

    /// Undoes every fault; their ids.
    pub fn undo_all(&self, shared: &Shared) -> Vec<u64> {
        let ids = self.table().clear();
        if !ids.is_empty() {
            tracing::warn!(?ids, "drill faults undone");
            self.apply(shared);
        }
        ids
    }

    /// Makes the table's effects real.
    fn apply(&self, shared: &Shared) {
        // The table stays locked until the effects are in place: two changes applied at
        // once (an undo and an expiry) must not land in the wrong order.
        let table = self.table();
        let fx = table.effects();
        self.packets.store(fx.packets.clone().map(Arc::new));
        if let Some(node) = &shared.discovery {
            node.set_cut(fx.cut_discovery);
        }
        let was_killed = self.effects.borrow().killed;
        if fx.killed && !was_killed {
            // The socket already drops everything, so these closes reach no one: to the peers
            // the gateway simply went silent, and afterwards every connection starts afresh.
            for p in shared.peers.all() {
                if let Some(c) = p.connection() {
                    c.close(codes::SHUTDOWN, b"tunnel killed by a drill");
                }
            }
        }
        let mut kinds: std::collections::BTreeMap<&str, f64> = Default::default();
        for a in table.list(Instant::now()) {
            *kinds.entry(a.fault.kind()).or_default() += 1.0;
        }
        for kind in [
            "kill-tunnel",
            "blackhole",
            "delay",
            "loss",
            "drain",
            "unready",
            "cut-discovery",
        ] {
            shared
                .metrics
                .gauge("strait_faults_active", &[("kind", kind)])
                .set(kinds.get(kind).copied().unwrap_or(0.0));
        }
        self.effects.send_if_modified(|old| {
            let changed = *old != fx;
            *old = fx;
            changed
        });
        drop(table);
        self.changed.notify_one();
    }
}

/// Tunnel addresses of a peer cluster: its configured address and, with discovery, the
/// one it advertises.
fn peer_addresses(shared: &Shared, cluster: &str) -> Result<Vec<SocketAddr>, FaultError> {
    let mut addrs: Vec<SocketAddr> = shared
        .peers
        .get(cluster)
        .map(|p| p.config.address)
        .into_iter()
        .collect();
    if let Some(node) = &shared.discovery {
        addrs.extend(
            node.view()
                .members
                .iter()
                .filter(|m| m.info.cluster == cluster)
                .map(|m| m.info.tunnel_addr),
        );
    }
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        let known: Vec<String> = shared
            .peers
            .all()
            .iter()
            .map(|p| p.config.cluster.clone())
            .collect();
        return Err(FaultError::invalid(
            "fault.peer",
            format!("`{cluster}` is not a peer of this gateway"),
            format!("name one of: {}", known.join(", ")),
        ));
    }
    Ok(addrs)
}

fn exports(shared: &Shared, service: &str) -> bool {
    shared
        .exports
        .load()
        .iter()
        .any(|e| format!("{}/{}", e.namespace, e.name) == service)
}

/// Undoes faults when their time is up, until the gateway stops.
pub async fn expire(shared: Arc<Shared>) {
    let faults = &shared.faults;
    loop {
        let next = faults.table().next_expiry();
        let wake = faults.changed.notified();
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
        let done = faults.table().expire(Instant::now());
        if !done.is_empty() {
            for (id, kind) in &done {
                tracing::warn!(id, kind, "drill fault ended (its duration is up)");
            }
            faults.apply(&shared);
        }
    }
}

/// Publishes `services` as the fault state says: drained or unready services keep their
/// entries (so peers know why) with every endpoint not ready.
pub fn shape_catalog(
    fx: &Effects,
    services: &mut std::collections::BTreeMap<
        strait_discovery::model::ServiceKey,
        strait_discovery::model::Service,
    >,
) {
    for (key, svc) in services.iter_mut() {
        if fx.drain || fx.unready.contains(&key.to_string()) {
            for e in &mut svc.endpoints {
                e.ready = false;
            }
        }
    }
}

#[cfg(test)]
mod tests;
