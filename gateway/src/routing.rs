//! Routing in the live gateway: feeds the sans-IO engine (`crate::router`) with this
//! gateway's view of each cluster — gateway liveness from the tunnel, service health from
//! the catalog, path health from connection outcomes — and keeps one router per imported
//! service. Listeners ask it for a plan per connection and report each attempt's outcome.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strait_common::config::routing::{RoutePolicy, Routing as RoutingConfig};
use tokio::sync::watch;

use crate::desired::Desired;
use crate::metrics::{Desc, Registry};
use crate::router::{Candidate, Considered, Locality, Out, Outcome, ServiceRouter};
use crate::tunnel::peers::PeerSet;

const FAILOVERS: Desc = Desc::counter(
    "strait_route_failovers_total",
    &["service", "from", "to"],
    "Times the best eligible cluster of a service changed (failover or failback).",
);
const EJECTIONS: Desc = Desc::counter(
    "strait_route_ejections_total",
    &["service", "cluster"],
    "Paths (service, cluster) ejected after repeated connect failures.",
);
const RETRIES: Desc = Desc::counter(
    "strait_route_retries_total",
    &["service", "result"],
    "Connection attempts retried on another cluster, by result (peer-down, failed, budget-exhausted).",
);
const SATURATED: Desc = Desc::counter(
    "strait_route_saturated_total",
    &["service", "cluster"],
    "Plans that skipped a cluster at its max_connections_per_cluster limit.",
);
const ELIGIBLE: Desc = Desc::gauge(
    "strait_route_cluster_eligible",
    &["service", "cluster"],
    "1 while the cluster takes new connections for the service.",
);
/// Routing's metrics.
pub(crate) const METRICS: &[Desc] = &[FAILOVERS, EJECTIONS, RETRIES, SATURATED, ELIGIBLE];

/// What routing counts.
#[derive(Clone)]
pub struct RoutingMetrics(Registry);

impl RoutingMetrics {
    /// The routing metrics in `registry`.
    pub fn new(registry: &Registry) -> Self {
        registry.describe(METRICS);
        Self(registry.clone())
    }

    fn failover(&self, service: &str, from: &str, to: &str) {
        self.0
            .counter(&FAILOVERS, &[service, from, to])
            .increment(1);
    }

    fn ejection(&self, service: &str, cluster: &str) {
        self.0.counter(&EJECTIONS, &[service, cluster]).increment(1);
    }

    fn retry(&self, service: &str, result: &str) {
        self.0.counter(&RETRIES, &[service, result]).increment(1);
    }

    fn saturated(&self, service: &str, cluster: &str) {
        self.0.counter(&SATURATED, &[service, cluster]).increment(1);
    }

    fn eligible(&self, service: &str, cluster: &str, eligible: bool) {
        self.0
            .gauge(&ELIGIBLE, &[service, cluster])
            .set(if eligible { 1.0 } else { 0.0 });
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

/// The routers, and the policies new ones start with. One lock: a router made while the
/// policies change gets the new ones, never a stale copy.
struct Routers {
    by_service: BTreeMap<String, ServiceState>,
    config: Arc<RoutingConfig>,
}

/// Proxied connections per (service, cluster), for spill protection and metrics.
type Active = BTreeMap<(String, String), Arc<AtomicUsize>>;

/// Routing state of a gateway. Cheap to clone: clones share it.
#[derive(Clone)]
pub struct Routing(Arc<Inner>);

struct Inner {
    me: Locality,
    /// Imported services, the catalog and the policies.
    desired: watch::Receiver<Arc<Desired>>,
    /// Gateway liveness.
    peers: Arc<dyn PeerSet>,
    /// Per-attempt timeout when the policy sets none (`tunnel.connect_timeout`).
    connect_timeout: Duration,
    services: Mutex<Routers>,
    active: Mutex<Active>,
    metrics: RoutingMetrics,
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
pub use strait_common::api::{Route as RouteReport, RouteCluster as ClusterReport};

impl Routing {
    /// This gateway's cluster.
    pub fn me(&self) -> &str {
        &self.0.me.cluster
    }

    /// Routing for a gateway at `me`: imported services, catalog facts and policies come
    /// from `desired`, gateway liveness from `peers`.
    pub fn new(
        me: Locality,
        desired: watch::Receiver<Arc<Desired>>,
        peers: Arc<dyn PeerSet>,
        connect_timeout: Duration,
        metrics: RoutingMetrics,
    ) -> Self {
        let config = desired.borrow().routing.clone();
        Routing(Arc::new(Inner {
            me,
            desired,
            peers,
            connect_timeout,
            services: Mutex::new(Routers {
                by_service: BTreeMap::new(),
                config,
            }),
            active: Mutex::new(BTreeMap::new()),
            metrics,
        }))
    }

    fn desired(&self) -> Arc<Desired> {
        self.0.desired.borrow().clone()
    }

    /// Applies changed policies; routers keep their health state.
    fn set_config(&self, config: Arc<RoutingConfig>) {
        let mut services = lock(&self.0.services);
        for (name, s) in services.by_service.iter_mut() {
            let p = config.policy_for(name);
            if *s.router.policy() != p {
                tracing::info!(service = %name, "routing policy changed");
                s.router.set_policy(p);
            }
        }
        services.config = config;
    }

    /// A plan for one new connection to `service` among `clusters` (the import's list);
    /// counts it as a first attempt for the retry budget.
    pub fn plan(&self, service: &str, clusters: &[String]) -> Plan {
        let now = Instant::now();
        let desired = self.desired();
        let mut services = lock(&self.0.services);
        let state = self.state(&mut services, service);
        let candidates = self.candidates(&desired, service, clusters, state.router.policy());
        state.router.first_attempt(now);
        let decision = state.router.decide(&self.0.me, &candidates, now);
        self.note_primary(service, state, &decision.considered);
        for c in &decision.considered {
            if c.out == Some(Out::Saturated) {
                self.0.metrics.saturated(service, &c.cluster);
            }
        }
        let timeout = state
            .router
            .policy()
            .connect_timeout
            .unwrap_or(self.0.connect_timeout);
        Plan {
            attempts: decision.attempts,
            timeout,
            early_data: state.router.policy().early_data,
        }
    }

    /// Whether a retry of `service` may be made now (rerouting away from a dead peer
    /// always may; other retries spend the retry budget).
    pub fn may_retry(&self, service: &str, reason: RetryReason) -> bool {
        let allowed = match reason {
            RetryReason::PeerDown => true,
            RetryReason::Failed => {
                let mut services = lock(&self.0.services);
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
        self.0.metrics.retry(service, label);
        allowed
    }

    /// Records an attempt's outcome; repeated failures eject the path.
    pub fn record(&self, service: &str, cluster: &str, outcome: Outcome) {
        let mut services = lock(&self.0.services);
        let state = self.state(&mut services, service);
        if outcome == Outcome::Success {
            *state.served.entry(cluster.to_owned()).or_default() += 1;
        }
        if let Some(time) = state.router.record(cluster, outcome, Instant::now()) {
            tracing::warn!(%service, %cluster, ejected_for = ?time, "path ejected after repeated failures");
            self.0.metrics.ejection(service, cluster);
        }
    }

    /// Whether new connections may be sent to `cluster`'s gateway now (see
    /// [`crate::tunnel::peers::PeerState::routable`]).
    pub fn peer_routable(&self, cluster: &str) -> bool {
        cluster == self.0.me.cluster || self.0.peers.liveness(cluster).is_some_and(|l| l.routable)
    }

    /// Counts a connection to `cluster` until the guard is dropped.
    pub fn hold(&self, service: &str, cluster: &str) -> ActiveGuard {
        let counter = lock(&self.0.active)
            .entry((service.to_owned(), cluster.to_owned()))
            .or_default()
            .clone();
        counter.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(counter)
    }

    /// Re-judges every imported service (keeps dwell timers and the primary current while
    /// no connection arrives) and publishes per-cluster eligibility.
    pub fn observe_all(&self) {
        let desired = self.desired();
        for (service, clusters) in desired.services() {
            let mut services = lock(&self.0.services);
            let state = self.state(&mut services, &service);
            let candidates = self.candidates(&desired, &service, &clusters, state.router.policy());
            let considered = state
                .router
                .observe(&self.0.me, &candidates, Instant::now());
            self.note_primary(&service, state, &considered);
            for c in &considered {
                self.0
                    .metrics
                    .eligible(&service, &c.cluster, c.out.is_none());
            }
        }
    }

    /// Explains the routing of every imported service, or of `only`.
    pub fn report(&self, only: Option<&str>) -> Vec<RouteReport> {
        let desired = self.desired();
        let mut out = Vec::new();
        for (service, clusters) in desired.services() {
            if only.is_some_and(|o| o != service) {
                continue;
            }
            let mut services = lock(&self.0.services);
            let state = self.state(&mut services, &service);
            let candidates = self.candidates(&desired, &service, &clusters, state.router.policy());
            let considered = state
                .router
                .observe(&self.0.me, &candidates, Instant::now());
            self.note_primary(&service, state, &considered);
            let rows = considered
                .iter()
                .filter_map(|c| {
                    let cand = candidates.iter().find(|x| x.cluster == c.cluster)?;
                    let replicas = self.0.peers.replicas(&c.cluster);
                    let peer = self.0.peers.liveness(&c.cluster);
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
                        peer: peer.as_ref().map(|p| p.status),
                        responsive: peer.as_ref().is_some_and(|p| p.responsive),
                        replicas: peer.as_ref().map_or(0, |p| p.replicas),
                        routable_replicas: peer.as_ref().map_or(0, |p| p.routable_replicas),
                        rtt: replicas
                            .iter()
                            .filter(|p| p.liveness().routable)
                            .chain(&replicas)
                            .find_map(|p| p.rtt_summary()),
                        ready_endpoints: desired
                            .catalog
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

    /// Keeps routing current until the gateway stops: applies changed policies, and
    /// re-judges every service every 250 ms (dwell timers start when a cluster recovers
    /// even if no connection arrives).
    pub async fn run(self) {
        let mut desired = self.0.desired.clone();
        let mut applied = desired.borrow_and_update().routing.clone();
        // Routers made before this loop started may predate the policies now in force.
        self.set_config(applied.clone());
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.observe_all(),
                r = desired.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let routing = desired.borrow_and_update().routing.clone();
                    if routing != applied {
                        self.set_config(routing.clone());
                        applied = routing;
                    }
                }
            }
        }
    }

    fn state<'a>(&self, services: &'a mut Routers, service: &str) -> &'a mut ServiceState {
        let config = &services.config;
        services
            .by_service
            .entry(service.to_owned())
            .or_insert_with(|| {
                let policy = config.policy_for(service);
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
        desired: &Desired,
        service: &str,
        clusters: &[String],
        policy: &RoutePolicy,
    ) -> Vec<Candidate> {
        let catalog = &desired.catalog;
        let offers = catalog.offers.get(service);
        let active = lock(&self.0.active);
        clusters
            .iter()
            .map(|cluster| {
                let (region, zone) = catalog.members.get(cluster).cloned().unwrap_or_default();
                let offer = offers.and_then(|o| o.get(cluster));
                let peer = self.0.peers.liveness(cluster);
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
                    rtt: peer.as_ref().and_then(|p| p.rtt),
                    weight: policy
                        .weights
                        .get(cluster)
                        .copied()
                        .or(offer.map(|o| o.weight))
                        .unwrap_or(1),
                    // This cluster needs no tunnel: its own endpoints are dialled directly.
                    peer_up: *cluster == self.0.me.cluster
                        || peer.as_ref().is_some_and(|p| p.routable),
                    // A static import without a catalog entry: assume it serves.
                    ready_endpoints: offer.map_or(1, |o| o.ready_endpoints),
                    active: active
                        .get(&(service.to_owned(), cluster.clone()))
                        .map_or(0, |a| a.load(Ordering::Relaxed)),
                    selector: desired
                        .selection
                        .get(service)
                        .and_then(|m| m.get(cluster).copied()),
                }
            })
            .collect()
    }
}

impl Routing {
    fn note_primary(&self, service: &str, state: &mut ServiceState, considered: &[Considered]) {
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
            self.0.metrics.failover(service, &from, &to);
        }
        state.primary = primary;
    }
}

fn explain(out: Option<&Out>) -> (Option<String>, Option<String>) {
    let (reason, detail) = match out {
        None => return (None, None),
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
    };
    (reason.map(str::to_owned), detail)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use strait_common::api::PeerStatus;
    use strait_common::config::routing::{Mode, PolicyFields};

    use super::*;
    use crate::desired::{CatalogView, Import, ImportPort, Offer, PeerTarget};
    use crate::tunnel::peers::PeerHandle;

    /// A peer set whose liveness the test decides.
    #[derive(Default)]
    pub(crate) struct FakePeers(Mutex<BTreeMap<(String, String), Arc<PeerHandle>>>);

    impl FakePeers {
        /// `cluster`'s tunnel (its only gateway) is up (and answering probes) or down from
        /// now on.
        pub(crate) fn set(&self, cluster: &str, up: bool) {
            self.set_replica(cluster, "", up);
        }

        /// The tunnel to `replica` of `cluster` is up or down from now on; its handle.
        pub(crate) fn set_replica(
            &self,
            cluster: &str,
            replica: &str,
            up: bool,
        ) -> Arc<PeerHandle> {
            let handle = self
                .0
                .lock()
                .unwrap()
                .entry((cluster.to_owned(), replica.to_owned()))
                .or_insert_with(|| {
                    Arc::new(PeerHandle::new(PeerTarget {
                        replica: replica.into(),
                        ..PeerTarget::single(cluster, "127.0.0.1:9".parse().unwrap())
                    }))
                })
                .clone();
            let status = if up { PeerStatus::Up } else { PeerStatus::Down };
            handle.set(status, None, None);
            handle
        }
    }

    impl PeerSet for FakePeers {
        fn replicas(&self, cluster: &str) -> Vec<Arc<PeerHandle>> {
            let map = self.0.lock().unwrap();
            map.iter()
                .filter(|((c, _), _)| c == cluster)
                .map(|(_, h)| h.clone())
                .collect()
        }
    }

    pub(crate) fn import(name: &str, clusters: &[&str]) -> Import {
        Import {
            namespace: "shop".into(),
            name: name.into(),
            address: "127.0.0.1".parse().unwrap(),
            listen_on: "127.0.0.1".parse().unwrap(),
            ports: vec![ImportPort {
                name: "http".into(),
                port: 80,
                listen: 0,
            }],
            clusters: clusters.iter().map(|c| c.to_string()).collect(),
            endpoint: None,
            session_affinity: None,
        }
    }

    fn clusters(v: &[&str]) -> Vec<String> {
        v.iter().map(|c| c.to_string()).collect()
    }

    struct Setup {
        routing: Routing,
        peers: Arc<FakePeers>,
        desired: watch::Sender<Arc<Desired>>,
        registry: Registry,
    }

    /// Routing at `here` (region r0) importing `shop/web` from east then north, both up.
    fn setup() -> Setup {
        let peers = Arc::new(FakePeers::default());
        peers.set("east", true);
        peers.set("north", true);
        let (desired, rx) = watch::channel(Arc::new(Desired {
            imports: vec![import("web", &["east", "north"])],
            ..Default::default()
        }));
        let registry = Registry::new();
        let routing = Routing::new(
            Locality {
                cluster: "here".into(),
                region: "r0".into(),
                zone: String::new(),
            },
            rx,
            peers.clone(),
            Duration::from_secs(2),
            RoutingMetrics::new(&registry),
        );
        Setup {
            routing,
            peers,
            desired,
            registry,
        }
    }

    /// One cluster's row of a route report.
    fn row<'a>(report: &'a RouteReport, cluster: &str) -> &'a ClusterReport {
        report
            .clusters
            .iter()
            .find(|c| c.cluster == cluster)
            .unwrap()
    }

    /// A connection plan, then three failures on east: the path is ejected.
    fn eject_east(s: &Setup) {
        s.routing.plan("shop/web", &clusters(&["east", "north"]));
        for _ in 0..3 {
            s.routing.record("shop/web", "east", Outcome::Failure);
        }
    }

    #[test]
    fn the_services_routed_are_the_desired_imports() {
        let s = setup();
        let names = |r: &Routing| -> Vec<String> {
            r.report(None).into_iter().map(|r| r.service).collect()
        };
        assert_eq!(names(&s.routing), vec!["shop/web"]);
        s.desired.send_modify(|d| {
            Arc::make_mut(d).imports.push(import("db", &["north"]));
        });
        assert_eq!(names(&s.routing), vec!["shop/db", "shop/web"]);
        s.desired.send_modify(|d| Arc::make_mut(d).imports.clear());
        assert!(names(&s.routing).is_empty(), "withdrawn: not routed");
        assert!(s.routing.report(Some("shop/web")).is_empty());
    }

    #[test]
    fn a_dead_peer_is_routed_around_and_the_report_says_why() {
        let s = setup();
        let plan = s.routing.plan("shop/web", &clusters(&["east", "north"]));
        assert_eq!(plan.attempts[0], "east", "static order first");
        assert_eq!(
            plan.timeout,
            Duration::from_secs(2),
            "tunnel.connect_timeout"
        );

        s.peers.set("east", false);
        assert!(!s.routing.peer_routable("east"));
        let plan = s.routing.plan("shop/web", &clusters(&["east", "north"]));
        assert_eq!(plan.attempts[0], "north");
        let report = s.routing.report(Some("shop/web")).pop().unwrap();
        assert_eq!(report.primary.as_deref(), Some("north"));
        let east = row(&report, "east");
        assert!(!east.eligible);
        assert_eq!(east.reason.as_deref(), Some("peer-down"));
        assert_eq!(east.peer, Some(PeerStatus::Down));
        let text = s.registry.render();
        assert!(
            text.contains(
                "strait_route_failovers_total{service=\"shop/web\",from=\"east\",to=\"north\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_dead_or_draining_replica_is_routed_around_inside_its_cluster() {
        let s = setup();
        // East runs two gateways; north one.
        s.peers.0.lock().unwrap().clear();
        let east_a = s.peers.set_replica("east", "a", true);
        let east_b = s.peers.set_replica("east", "b", true);
        s.peers.set("north", true);
        let primary = |s: &Setup| {
            s.routing
                .report(Some("shop/web"))
                .pop()
                .unwrap()
                .primary
                .unwrap()
        };
        assert_eq!(primary(&s), "east");
        // One replica dies: the cluster still serves through its sibling.
        east_a.set(PeerStatus::Down, None, Some("killed".into()));
        let plan = s.routing.plan("shop/web", &clusters(&["east", "north"]));
        assert_eq!(plan.attempts[0], "east", "traffic stays in the cluster");
        assert_eq!(primary(&s), "east");
        let live = s.peers.liveness("east").unwrap();
        assert_eq!((live.replicas, live.routable_replicas), (2, 1));
        // The sibling drains too: now, and only now, traffic leaves the cluster.
        east_b.going_away();
        assert!(!s.routing.peer_routable("east"));
        let plan = s.routing.plan("shop/web", &clusters(&["east", "north"]));
        assert_eq!(plan.attempts[0], "north");
        // A fresh connection to the restarted replica brings the cluster back.
        east_a.set(PeerStatus::Up, None, None);
        assert!(s.routing.peer_routable("east"));
    }

    #[test]
    fn catalog_locality_and_readiness_order_the_clusters() {
        let s = setup();
        s.desired.send_modify(|d| {
            let d = Arc::make_mut(d);
            d.catalog = CatalogView {
                members: [
                    ("east".to_owned(), ("r9".to_owned(), String::new())),
                    ("north".to_owned(), ("r0".to_owned(), String::new())),
                ]
                .into(),
                offers: [(
                    "shop/web".to_owned(),
                    [
                        (
                            "east".to_owned(),
                            Offer {
                                ready_endpoints: 1,
                                endpoints: 1,
                                weight: 1,
                            },
                        ),
                        (
                            "north".to_owned(),
                            Offer {
                                ready_endpoints: 2,
                                endpoints: 2,
                                weight: 1,
                            },
                        ),
                    ]
                    .into(),
                )]
                .into(),
            };
        });
        let plan = s.routing.plan("shop/web", &clusters(&["east", "north"]));
        assert_eq!(
            plan.attempts,
            clusters(&["north", "east"]),
            "same region first"
        );
        let report = s.routing.report(Some("shop/web")).pop().unwrap();
        assert_eq!(report.clusters[0].ready_endpoints, Some(2));

        s.desired.send_modify(|d| {
            let offers = Arc::make_mut(d).catalog.offers.get_mut("shop/web").unwrap();
            offers.get_mut("north").unwrap().ready_endpoints = 0;
        });
        let plan = s.routing.plan("shop/web", &clusters(&["east", "north"]));
        assert_eq!(plan.attempts[0], "east", "no ready endpoint in north");
    }

    #[test]
    fn failures_eject_the_path_and_retries_spend_the_budget() {
        let s = setup();
        eject_east(&s);
        let report = s.routing.report(Some("shop/web")).pop().unwrap();
        let east = row(&report, "east");
        assert_eq!(east.reason.as_deref(), Some("ejected"));
        assert!(
            s.registry
                .render()
                .contains("strait_route_ejections_total{service=\"shop/web\",cluster=\"east\"} 1")
        );

        assert!(
            (0..1000).all(|_| s.routing.may_retry("shop/web", RetryReason::PeerDown)),
            "rerouting away from a dead peer is always allowed"
        );
        let allowed = (0..1000)
            .filter(|_| s.routing.may_retry("shop/web", RetryReason::Failed))
            .count();
        assert!(
            (1..1000).contains(&allowed),
            "the budget allows some retries, not all: {allowed}"
        );
        let text = s.registry.render();
        assert!(
            text.contains(
                "strait_route_retries_total{service=\"shop/web\",result=\"budget-exhausted\"}"
            ),
            "{text}"
        );
    }

    #[test]
    fn held_connections_count_until_released() {
        let s = setup();
        let a = s.routing.hold("shop/web", "east");
        let _b = s.routing.hold("shop/web", "east");
        let active =
            |s: &Setup| row(&s.routing.report(Some("shop/web")).pop().unwrap(), "east").active;
        assert_eq!(active(&s), 2);
        drop(a);
        assert_eq!(active(&s), 1);
    }

    #[test]
    fn a_router_made_while_the_policies_change_gets_the_new_ones() {
        // What `run` applies wins over the snapshot a connection's plan started from.
        let s = setup();
        let priority = Arc::new(RoutingConfig {
            default: PolicyFields {
                mode: Some(Mode::Priority),
                priority: Some(clusters(&["north", "east"])),
                ..Default::default()
            },
            services: vec![],
        });
        s.routing.set_config(priority);
        let plan = s.routing.plan("shop/web", &clusters(&["east", "north"]));
        assert_eq!(plan.attempts[0], "north");
        let report = s.routing.report(Some("shop/web")).pop().unwrap();
        assert_eq!(report.mode, Mode::Priority);
    }

    #[tokio::test]
    async fn policy_changes_apply_to_live_routers_without_losing_health() {
        let s = setup();
        eject_east(&s);
        tokio::spawn(s.routing.clone().run());
        s.desired.send_modify(|d| {
            Arc::make_mut(d).routing = Arc::new(RoutingConfig {
                default: PolicyFields {
                    mode: Some(Mode::Priority),
                    priority: Some(clusters(&["east", "north"])),
                    ..Default::default()
                },
                services: vec![],
            });
        });
        strait_tests::eventually(Duration::from_secs(5), "policy applied", async || {
            s.routing.report(Some("shop/web")).pop().unwrap().mode == Mode::Priority
        })
        .await;
        let report = s.routing.report(Some("shop/web")).pop().unwrap();
        let east = row(&report, "east");
        assert_eq!(east.reason.as_deref(), Some("ejected"), "health state kept");
    }
}
