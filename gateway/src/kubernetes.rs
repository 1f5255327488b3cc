//! Kubernetes mode in the gateway: connecting to the API server, checking the cluster's
//! identity against its `ClusterProperty`, and the two ends of the integration: the
//! export source and the importer, which reads the desired state's imports.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use strait_common::config::Kubernetes;
use strait_discovery::node::{Node, View};
use strait_discovery::state::Voice;
use strait_kubernetes::exports::Clusterset;
use strait_kubernetes::imports::{ImportedService, Importer, ImporterConfig, Placement, Unit};
use strait_kubernetes::lease::Holder;
use strait_kubernetes::mcs::about::{CLUSTER_ID, ClusterProperty};
use strait_kubernetes::source::{EndpointFilter, KubeExports};
use strait_kubernetes::watch::{Health, HealthReport, publish};
use tokio::sync::watch;

use crate::desired::{Desired, endpoint_key};
use crate::metrics::{Desc, Registry};

/// A future the gateway runs for its whole life.
pub(crate) type Task = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The running integration.
pub(crate) struct Kube {
    /// This cluster's exports.
    pub exports: KubeExports,
    /// The placement recorded in the derived Services.
    pub placement: watch::Receiver<Arc<Placement>>,
    /// What an operator sees of it.
    pub health: Health,
    /// Its tasks: the Lease, the export source, the importer, and the one that feeds the
    /// importer from `desired`.
    pub tasks: Vec<Task>,
}

/// A kube-rs client for `k`: its `api_server`, else in-cluster or `KUBECONFIG`.
pub(crate) async fn client(k: &Kubernetes) -> anyhow::Result<kube::Client> {
    let mut config = match &k.api_server {
        Some(url) => kube::Config::new(
            url.parse()
                .with_context(|| format!("kubernetes.api_server `{url}` is not a URL"))?,
        ),
        None => kube::Config::infer()
            .await
            .context("finding the Kubernetes API server (no service account, no KUBECONFIG); set kubernetes.api_server")?,
    };
    // A stalled connection fails instead of hanging a writer forever; longer than the
    // server's watch timeout (290 s), so idle watches are not cut.
    config.read_timeout = Some(Duration::from_secs(300));
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// Fails when the cluster's `ClusterProperty` `cluster.clusterset.k8s.io` names another
/// cluster than `cluster`. An API server that does not answer in time is logged and
/// skipped: the gateway must start without it.
pub(crate) async fn check_cluster_id(client: &kube::Client, cluster: &str) -> anyhow::Result<()> {
    let api = kube::Api::<ClusterProperty>::all(client.clone());
    match tokio::time::timeout(Duration::from_secs(5), api.get_opt(CLUSTER_ID)).await {
        Ok(Ok(Some(p))) if p.spec.value != cluster => anyhow::bail!(
            "this cluster's ClusterProperty {CLUSTER_ID} is `{}` but the gateway is configured (and certified) as `{cluster}`; set `cluster: {}` and issue its certificate, or fix the ClusterProperty",
            p.spec.value,
            p.spec.value
        ),
        Ok(Ok(_)) => Ok(()),
        // No About API installed: nothing to disagree with.
        Ok(Err(kube::Error::Api(e))) if e.code == 404 => Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read ClusterProperty {CLUSTER_ID}; starting without the check");
            Ok(())
        }
        Err(_) => {
            tracing::warn!(
                "the Kubernetes API server did not answer within 5s; starting without the ClusterProperty check"
            );
            Ok(())
        }
    }
}

/// The address other clusters reach this gateway on: the gateway Service's load
/// balancer address, else (no load balancer yet) this pod's `POD_IP`.
pub(crate) async fn advertise_address(
    client: &kube::Client,
    k: &Kubernetes,
) -> anyhow::Result<std::net::IpAddr> {
    let api =
        kube::Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), &k.namespace);
    let lb = tokio::time::timeout(Duration::from_secs(5), api.get_opt(&k.gateway_service))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
        .and_then(|s| {
            s.status?
                .load_balancer?
                .ingress?
                .into_iter()
                .find_map(|i| i.ip?.parse().ok())
        });
    if let Some(ip) = lb {
        return Ok(ip);
    }
    let pod = std::env::var("POD_IP").ok().and_then(|ip| ip.parse().ok());
    match pod {
        Some(ip) => {
            tracing::warn!(%ip, service = %k.gateway_service, "the gateway Service has no load balancer address yet; advertising the pod address");
            Ok(ip)
        }
        None => anyhow::bail!(
            "no address to advertise: Service {}/{} has no load balancer address and POD_IP is unset; set discovery.advertise",
            k.namespace,
            k.gateway_service
        ),
    }
}

/// Starts the integration: the writer Lease, the export source and the importer, fed
/// from `desired`.
pub(crate) fn start(
    client: kube::Client,
    cluster: &str,
    k: &Kubernetes,
    settle: Duration,
    desired: watch::Receiver<Arc<Desired>>,
    node: Option<Arc<Node>>,
    metrics: &Registry,
) -> Kube {
    let view = node.as_ref().map(|n| n.subscribe());
    let health = Health::default();
    let (holder_tx, holder) = watch::channel(Holder::Unknown);
    let (leader_tx, leader) = watch::channel(false);
    let me = replica_name(k);
    let lease = strait_kubernetes::lease::run(
        client.clone(),
        k.namespace.clone(),
        me,
        k.lease.0,
        holder_tx,
        health.clone(),
    );
    let speak = follow_holder(holder, health.subscribe(), leader_tx, node);
    let (clusterset_tx, clusterset) = watch::channel(Arc::new(Clusterset::new()));
    let (exports, run_exports) = KubeExports::start(
        client.clone(),
        cluster.to_owned(),
        clusterset,
        leader.clone(),
        EndpointFilter {
            allow_local: k.allow_local_endpoints,
            gateway: (k.namespace.clone(), k.gateway_service.clone()),
        },
        health.clone(),
    );
    let (wanted_tx, wanted) = watch::channel(Arc::new(Vec::new()));
    let (importer, run_importer) = Importer::start(
        client,
        ImporterConfig {
            namespace: k.namespace.clone(),
            gateway_service: k.gateway_service.clone(),
            settle,
        },
        wanted,
        leader,
        health.clone(),
    );
    let feed = feed(desired, wanted_tx);
    let others = follow_clusterset(view, clusterset_tx);
    let report = KubeMetrics::new(metrics).follow(health.subscribe());
    Kube {
        exports,
        placement: importer.placement(),
        health,
        tasks: vec![
            Box::pin(lease),
            Box::pin(speak),
            Box::pin(run_exports),
            Box::pin(run_importer),
            Box::pin(feed),
            Box::pin(others),
            Box::pin(report),
        ],
    }
}

/// Keeps the importer's input equal to the desired state's imports.
async fn feed(
    mut desired: watch::Receiver<Arc<Desired>>,
    wanted: watch::Sender<Arc<Vec<ImportedService>>>,
) {
    loop {
        publish(&wanted, wanted_of(&desired.borrow_and_update()));
        if desired.changed().await.is_err() {
            return;
        }
    }
}

/// Follows the writer Lease: this replica writes while it holds it, and its discovery
/// member speaks for the cluster only then, and only once the exports have been read (a
/// replica that has read nothing would publish an empty catalog). When nobody knows the
/// holder (the API server is away) the replicas settle on one voice by themselves
/// (`Voice::Auto`), so the cluster stays in the federation.
async fn follow_holder(
    mut holder: watch::Receiver<Holder>,
    mut health: watch::Receiver<HealthReport>,
    leader: watch::Sender<bool>,
    node: Option<Arc<Node>>,
) {
    loop {
        let h = *holder.borrow_and_update();
        let synced = health.borrow_and_update().synced;
        publish_bool(&leader, h == Holder::Me);
        if let Some(n) = &node {
            n.set_voice(match (h, synced) {
                (_, false) | (Holder::Other, _) => Voice::Quiet,
                (Holder::Me, true) => Voice::Speak,
                (Holder::Unknown, true) => Voice::Auto,
            });
        }
        tokio::select! {
            r = holder.changed() => if r.is_err() { return },
            r = health.changed() => if r.is_err() { return },
        }
    }
}

fn publish_bool(tx: &watch::Sender<bool>, now: bool) {
    tx.send_if_modified(|cur| std::mem::replace(cur, now) != now);
}

/// Keeps `clusterset` equal to what the discovery view says each cluster exports.
async fn follow_clusterset(
    view: Option<watch::Receiver<Arc<View>>>,
    clusterset: watch::Sender<Arc<Clusterset>>,
) {
    let Some(mut view) = view else { return };
    loop {
        let mut now = Clusterset::new();
        for e in &view.borrow_and_update().services {
            now.entry(e.key.to_string())
                .or_default()
                .push((e.origin.cluster.clone(), e.service.clone()));
        }
        publish(&clusterset, now);
        if view.changed().await.is_err() {
            return;
        }
    }
}

/// The imports of `d` as the importer needs them: one entry per imported service (what
/// its ServiceImport says), with one unit per derived Service: the service, or each
/// remote endpoint of a headless one.
pub(crate) fn wanted_of(d: &Desired) -> Vec<ImportedService> {
    d.clusterset
        .iter()
        .map(|s| {
            let service = format!("{}/{}", s.namespace, s.name);
            let units = d
                .imports
                .iter()
                .filter(|imp| imp.namespace == s.namespace && imp.name == s.name)
                .map(|imp| Unit {
                    key: match (imp.endpoint, imp.clusters.first()) {
                        (Some(address), Some(cluster)) => endpoint_key(&service, cluster, address),
                        _ => service.clone(),
                    },
                    clusters: imp.clusters.clone(),
                    ports: imp
                        .ports
                        .iter()
                        .map(|p| (p.name.clone(), p.port, p.listen))
                        .collect(),
                })
                .collect();
            ImportedService {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                headless: s.headless,
                ports: s.ports.clone(),
                clusters: s.clusters.clone(),
                session_affinity: s.session_affinity,
                selector_results: s.selector_results.clone(),
                units,
            }
        })
        .collect()
}

/// This replica's name: `kubernetes.replica`, else `$POD_NAME`, else the hostname.
pub fn replica_name(k: &Kubernetes) -> String {
    k.replica
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .unwrap_or_else(hostname)
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "strait-gateway".into())
}

const SYNCED: Desc = Desc::gauge(
    "strait_kubernetes_synced",
    &[],
    "1 once every Kubernetes watch has listed (exports and imports reflect the API server), else 0",
);
const LEADER: Desc = Desc::gauge(
    "strait_kubernetes_leader",
    &[],
    "1 while this replica holds the writer Lease (writes ServiceExport status and imports), else 0",
);
const WATCH_ERRORS: Desc = Desc::counter(
    "strait_kubernetes_watch_errors_total",
    &[],
    "Kubernetes list or watch requests that failed (retried with backoff; the last known state keeps serving)",
);
const WRITE_ERRORS: Desc = Desc::counter(
    "strait_kubernetes_write_errors_total",
    &[],
    "Kubernetes writes (status, ServiceImports, derived Services and EndpointSlices, the Lease) that failed",
);
/// The Kubernetes integration's metrics (recorded in Kubernetes mode only).
pub(crate) const METRICS: &[Desc] = &[SYNCED, LEADER, WATCH_ERRORS, WRITE_ERRORS];

/// The integration's health as metrics.
struct KubeMetrics {
    synced: metrics::Gauge,
    leader: metrics::Gauge,
    watch_errors: metrics::Counter,
    write_errors: metrics::Counter,
}

impl KubeMetrics {
    fn new(r: &Registry) -> Self {
        r.describe(METRICS);
        KubeMetrics {
            synced: r.gauge(&SYNCED, &[]),
            leader: r.gauge(&LEADER, &[]),
            watch_errors: r.counter(&WATCH_ERRORS, &[]),
            write_errors: r.counter(&WRITE_ERRORS, &[]),
        }
    }

    async fn follow(self, mut health: watch::Receiver<HealthReport>) {
        loop {
            let h = health.borrow_and_update().clone();
            self.synced.set(if h.synced { 1.0 } else { 0.0 });
            self.leader.set(if h.leader { 1.0 } else { 0.0 });
            self.watch_errors.absolute(h.watch_errors);
            self.write_errors.absolute(h.write_errors);
            if health.changed().await.is_err() {
                return;
            }
        }
    }
}
