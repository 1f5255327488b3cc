//! Routing in the live gateway: feeds the sans-IO engine (`crate::router`) with this
//! gateway's view of each cluster — gateway liveness from the tunnel, service health from
//! the catalog, path health from connection outcomes — and keeps one router per imported
//! service. Listeners ask it for a plan per connection and report each attempt's outcome.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;
use strait_common::config::routing::{Mode, RoutePolicy, Routing as RoutingConfig};
use strait_discovery::node::View;

use crate::gateway::Shared;
use crate::router::{Candidate, Considered, Locality, Out, Outcome, ServiceRouter};
use crate::tunnel::peers::{PeerStatus, RttSummary};

/// What the catalog says about one cluster for one service.
#[derive(Debug, Clone, PartialEq)]
pub struct Offer {
    /// Ready endpoints there.
    pub ready_endpoints: usize,
    /// All endpoints there.
    pub endpoints: usize,
    /// The weight that cluster exports.
    pub weight: u32,
}

/// The catalog as routing needs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CatalogView {
    /// Region and zone of each member.
    pub members: BTreeMap<String, (String, String)>,
    /// `namespace/name` → cluster → offer.
    pub offers: BTreeMap<String, BTreeMap<String, Offer>>,
}

impl CatalogView {
    /// Extracts the routing inputs from a discovery view.
    pub fn from_view(view: &View) -> Self {
        let members = view
            .members
            .iter()
            .map(|m| {
                (
                    m.info.cluster.clone(),
                    (m.info.region.clone(), m.info.zone.clone()),
                )
            })
            .collect();
        let mut offers: BTreeMap<String, BTreeMap<String, Offer>> = BTreeMap::new();
        for e in &view.services {
            offers.entry(e.key.to_string()).or_default().insert(
                e.origin.cluster.clone(),
                Offer {
                    ready_endpoints: e.service.ready_endpoints(),
                    endpoints: e.service.endpoints.len(),
                    weight: e.service.weight,
                },
            );
        }
        Self { members, offers }
    }
}

/// Priority offset of a static import's list order (after any policy priority).
const STATIC_ORDER: usize = 500;

struct ServiceState {
    router: ServiceRouter,
    /// The best usable cluster last seen; a change is a failover (or failback).
    primary: Option<String>,
    /// Connections each cluster took since the gateway started.
    served: BTreeMap<String, u64>,
}

/// Proxied connections per (service, cluster), for spill protection and metrics.
type Active = BTreeMap<(String, String), Arc<AtomicUsize>>;

/// Routing state of a gateway.
pub struct Routing {
    me: Locality,
    config: ArcSwap<RoutingConfig>,
    catalog: ArcSwap<CatalogView>,
    services: Mutex<BTreeMap<String, ServiceState>>,
    active: Mutex<Active>,
}

/// One connection's plan: clusters in order, and the time each attempt may take.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Clusters to try, best first.
    pub attempts: Vec<String>,
    /// Per-attempt stream-open timeout.
    pub timeout: Duration,
    /// Early bytes may ride with the request although a retry is possible.
    pub early_data: bool,
}

/// Holds one proxied connection's place in its cluster's count.
pub struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a retry was made (metric label).
#[derive(Debug, Clone, Copy)]
pub enum RetryReason {
    /// The peer was found dead or unresponsive: rerouting, not charged to the budget.
    PeerDown,
    /// The attempt failed on a live peer: charged to the retry budget.
    Failed,
}

/// The admin API's explanation of one service's routing.
#[derive(Debug, Clone, Serialize)]
pub struct RouteReport {
    /// `namespace/name`.
    pub service: String,
    /// Ordering mode in force.
    pub mode: Mode,
    /// The cluster new connections go to first now (`null`: none usable).
    pub primary: Option<String>,
    /// Candidates, best first, with why each is in or out.
    pub clusters: Vec<ClusterReport>,
    /// The resolved policy.
    pub policy: RoutePolicy,
}

/// One candidate cluster in a [`RouteReport`].
#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    /// Cluster id.
    pub cluster: String,
    /// Locality tier (lower is preferred).
    pub tier: u32,
    /// Whether it takes new connections.
    pub eligible: bool,
    /// Why not, when it does not (`peer-down`, `no-ready-endpoints`, `ejected`,
    /// `recovering`, `saturated`).
    pub reason: Option<&'static str>,
    /// Human detail for the reason.
    pub detail: Option<String>,
    /// Share of its traffic while ramping up after a recovery (1 = full).
    pub share: f64,
    /// Region and zone.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Gateway liveness: tunnel status.
    pub peer: Option<PeerStatus>,
    /// Gateway liveness: probes answered.
    pub responsive: bool,
    /// RTT percentiles over the last minute.
    pub rtt: Option<RttSummary>,
    /// Service health: ready endpoints there (`null`: unknown, a static import).
    pub ready_endpoints: Option<usize>,
    /// Weight used.
    pub weight: u32,
    /// Proxied connections there now.
    pub active: usize,
    /// Connections it took since the gateway started (drills chart the share from this).
    pub served: u64,
}

impl Routing {
    /// Routing for a gateway at `me`, with the configured policies.
    pub fn new(me: Locality, config: RoutingConfig) -> Self {
        Self {
            me,
            config: ArcSwap::from_pointee(config),
            catalog: ArcSwap::default(),
            services: Mutex::new(BTreeMap::new()),
            active: Mutex::new(BTreeMap::new()),
        }
    }

    /// Applies reloaded policies; routers keep their health state.
    pub fn set_config(&self, config: RoutingConfig) {
        let mut services = lock(&self.services);
        for (name, s) in services.iter_mut() {
            let p = config.policy_for(name);
            if *s.router.policy() != p {
                tracing::info!(service = %name, "routing policy changed");
                s.router.set_policy(p);
            }
        }
        self.config.store(Arc::new(config));
    }

    /// Takes new catalog facts (ready endpoints, localities, weights).
    pub fn set_catalog(&self, catalog: CatalogView) {
        if **self.catalog.load() != catalog {
            self.catalog.store(Arc::new(catalog));
        }
    }

    /// A plan for one new connection to `service` among `clusters` (the import's list);
    /// counts it as a first attempt for the retry budget.
    pub fn plan(&self, shared: &Shared, service: &str, clusters: &[String]) -> Plan {
        let now = Instant::now();
        let mut services = lock(&self.services);
        let state = self.state(&mut services, service);
        let candidates = self.candidates(shared, service, clusters, state.router.policy());
        state.router.first_attempt(now);
        let decision = state.router.decide(&self.me, &candidates, now);
        note_primary(shared, service, state, &decision.considered);
        for c in &decision.considered {
            if c.out == Some(Out::Saturated) {
                shared
                    .metrics
                    .counter(
                        "strait_route_saturated_total",
                        &[("service", service), ("cluster", &c.cluster)],
                    )
                    .increment(1);
            }
        }
        let timeout = state
            .router
            .policy()
            .connect_timeout
            .unwrap_or(shared.config.tunnel.connect_timeout.0);
        Plan {
            attempts: decision.attempts,
            timeout,
            early_data: state.router.policy().early_data,
        }
    }

    /// Whether a retry of `service` may be made now (rerouting away from a dead peer
    /// always may; other retries spend the retry budget).
    pub fn may_retry(&self, shared: &Shared, service: &str, reason: RetryReason) -> bool {
        let allowed = match reason {
            RetryReason::PeerDown => true,
            RetryReason::Failed => {
                let mut services = lock(&self.services);
                self.state(&mut services, service)
                    .router
                    .try_retry(Instant::now())
            }
        };
        let label = match (reason, allowed) {
            (RetryReason::PeerDown, _) => "peer-down",
            (RetryReason::Failed, true) => "failed",
            (RetryReason::Failed, false) => "budget-exhausted",
        };
        shared
            .metrics
            .counter(
                "strait_route_retries_total",
                &[("service", service), ("result", label)],
            )
            .increment(1);
        allowed
    }

    /// Records an attempt's outcome; repeated failures eject the path.
    pub fn record(&self, shared: &Shared, service: &str, cluster: &str, outcome: Outcome) {
        let mut services = lock(&self.services);
        let state = self.state(&mut services, service);
        if outcome == Outcome::Success {
            *state.served.entry(cluster.to_owned()).or_default() += 1;
        }
        if let Some(time) = state.router.record(cluster, outcome, Instant::now()) {
            tracing::warn!(%service, %cluster, ejected_for = ?time, "path ejected after repeated failures");
            shared
                .metrics
                .counter(
                    "strait_route_ejections_total",
                    &[("service", service), ("cluster", cluster)],
                )
                .increment(1);
        }
    }

    /// Counts a connection to `cluster` until the guard is dropped.
    pub fn hold(&self, service: &str, cluster: &str) -> ActiveGuard {
        let counter = lock(&self.active)
            .entry((service.to_owned(), cluster.to_owned()))
            .or_default()
            .clone();
        counter.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(counter)
    }

    /// Re-judges every imported service (keeps dwell timers and the primary current while
    /// no connection arrives) and publishes per-cluster eligibility.
    pub fn observe_all(&self, shared: &Shared) {
        for (service, clusters) in imported(shared) {
            let mut services = lock(&self.services);
            let state = self.state(&mut services, &service);
            let candidates = self.candidates(shared, &service, &clusters, state.router.policy());
            let considered = state.router.observe(&self.me, &candidates, Instant::now());
            note_primary(shared, &service, state, &considered);
            for c in &considered {
                shared
                    .metrics
                    .gauge(
                        "strait_route_cluster_eligible",
                        &[("service", &service), ("cluster", &c.cluster)],
                    )
                    .set(if c.out.is_none() { 1.0 } else { 0.0 });
            }
        }
    }

    /// Explains the routing of every imported service, or of `only`.
    pub fn report(&self, shared: &Shared, only: Option<&str>) -> Vec<RouteReport> {
        let mut out = Vec::new();
        for (service, clusters) in imported(shared) {
            if only.is_some_and(|o| o != service) {
                continue;
            }
            let mut services = lock(&self.services);
            let state = self.state(&mut services, &service);
            let candidates = self.candidates(shared, &service, &clusters, state.router.policy());
            let considered = state.router.observe(&self.me, &candidates, Instant::now());
            note_primary(shared, &service, state, &considered);
            let catalog = self.catalog.load();
            let rows = considered
                .iter()
                .filter_map(|c| {
                    let cand = candidates.iter().find(|x| x.cluster == c.cluster)?;
                    let peer = shared.peers.get(&c.cluster);
                    let st = peer.as_ref().map(|p| p.state());
                    let (reason, detail) = explain(c.out.as_ref());
                    Some(ClusterReport {
                        cluster: c.cluster.clone(),
                        tier: c.tier,
                        eligible: c.out.is_none(),
                        reason,
                        detail,
                        share: if c.out.is_none() { c.share } else { 0.0 },
                        region: cand.region.clone(),
                        zone: cand.zone.clone(),
                        peer: st.as_ref().map(|s| s.status),
                        responsive: st
                            .as_ref()
                            .is_some_and(|s| s.status == PeerStatus::Up && s.responsive),
                        rtt: peer.and_then(|p| p.rtt_summary()),
                        ready_endpoints: catalog
                            .offers
                            .get(&service)
                            .and_then(|o| o.get(&c.cluster))
                            .map(|o| o.ready_endpoints),
                        weight: cand.weight,
                        active: cand.active,
                        served: state.served.get(&c.cluster).copied().unwrap_or(0),
                    })
                })
                .collect();
            out.push(RouteReport {
                service: service.clone(),
                mode: state.router.policy().mode,
                primary: state.primary.clone(),
                clusters: rows,
                policy: state.router.policy().clone(),
            });
        }
        out
    }

    fn state<'a>(
        &self,
        services: &'a mut BTreeMap<String, ServiceState>,
        service: &str,
    ) -> &'a mut ServiceState {
        services.entry(service.to_owned()).or_insert_with(|| {
            let policy = self.config.load().policy_for(service);
            // Per-service seeds keep weighted choices independent between services.
            let seed = service.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
            ServiceState {
                router: ServiceRouter::new(policy, seed ^ rand::random::<u64>()),
                primary: None,
                served: BTreeMap::new(),
            }
        })
    }

    /// What is known of each cluster serving `service`. Called with the services lock
    /// held (lock order: services, then active).
    fn candidates(
        &self,
        shared: &Shared,
        service: &str,
        clusters: &[String],
        policy: &RoutePolicy,
    ) -> Vec<Candidate> {
        let catalog = self.catalog.load();
        let offers = catalog.offers.get(service);
        let active = lock(&self.active);
        clusters
            .iter()
            .map(|cluster| {
                let (region, zone) = catalog.members.get(cluster).cloned().unwrap_or_default();
                let offer = offers.and_then(|o| o.get(cluster));
                let peer = shared.peers.get(cluster);
                let state = peer.as_ref().map(|p| p.state());
                Candidate {
                    cluster: cluster.clone(),
                    region,
                    zone,
                    // The policy's list first; a cluster whose locality nobody told us (a
                    // static import) keeps its place in the import's list, after those.
                    priority: policy
                        .priority
                        .iter()
                        .position(|c| c == cluster)
                        .or_else(|| {
                            (!catalog.members.contains_key(cluster))
                                .then(|| clusters.iter().position(|c| c == cluster))
                                .flatten()
                                .map(|i| STATIC_ORDER + i)
                        })
                        .map(|p| p as u32),
                    rtt: state
                        .as_ref()
                        .and_then(|s| s.connection.as_ref())
                        .map(quinn::Connection::rtt),
                    weight: policy
                        .weights
                        .get(cluster)
                        .copied()
                        .or(offer.map(|o| o.weight))
                        .unwrap_or(1),
                    peer_up: state.as_ref().is_some_and(|s| s.routable()),
                    // A static import without a catalog entry: assume it serves.
                    ready_endpoints: offer.map_or(1, |o| o.ready_endpoints),
                    active: active
                        .get(&(service.to_owned(), cluster.clone()))
                        .map_or(0, |a| a.load(Ordering::Relaxed)),
                }
            })
            .collect()
    }
}

/// Imported services and their cluster lists, from the bound listeners.
fn imported(shared: &Shared) -> BTreeMap<String, Vec<String>> {
    shared
        .listeners
        .snapshot()
        .into_iter()
        .map(|l| (l.service, l.clusters))
        .collect()
}

fn note_primary(
    shared: &Shared,
    service: &str,
    state: &mut ServiceState,
    considered: &[Considered],
) {
    let primary = considered
        .iter()
        .find(|c| c.out.is_none())
        .map(|c| c.cluster.clone());
    if primary == state.primary {
        return;
    }
    let from = state.primary.clone().unwrap_or_default();
    let to = primary.clone().unwrap_or_else(|| "none".to_owned());
    if state.primary.is_some() {
        tracing::warn!(%service, %from, %to, "traffic moved");
        shared
            .metrics
            .counter(
                "strait_route_failovers_total",
                &[("service", service), ("from", &from), ("to", &to)],
            )
            .increment(1);
    }
    state.primary = primary;
}

fn explain(out: Option<&Out>) -> (Option<&'static str>, Option<String>) {
    match out {
        None => (None, None),
        Some(Out::PeerDown) => (
            Some("peer-down"),
            Some("its gateway is not connected or stopped answering probes".into()),
        ),
        Some(Out::NoReadyEndpoints) => (
            Some("no-ready-endpoints"),
            Some("the catalog lists no ready endpoint there".into()),
        ),
        Some(Out::Ejected { remaining, count }) => (
            Some("ejected"),
            Some(format!(
                "repeated connect failures; back in {:.1}s (ejection #{count})",
                remaining.as_secs_f64()
            )),
        ),
        Some(Out::Recovering { healthy_for }) => (
            Some("recovering"),
            Some(format!(
                "healthy for {:.1}s, waiting out the dwell time",
                healthy_for.as_secs_f64()
            )),
        ),
        Some(Out::Saturated) => (
            Some("saturated"),
            Some("at max_connections_per_cluster".into()),
        ),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps routing state current until the gateway stops.
pub async fn watch(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        shared.routing.observe_all(&shared);
    }
}
