//! The Kubernetes export source: reflectors of `ServiceExport`s, Services and
//! EndpointSlices, turned into this cluster's exports by [`exports_from`] whenever one of
//! them changes, and the `ServiceExport` conditions written back by the replica that holds
//! the Lease.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use strait_common::config::Export;
use strait_discovery::source::ExportSource;
use tokio::sync::{Notify, watch};

use crate::exports::{Clusterset, Cond, ExportObject, Verdict, conflict, exports_from};
use crate::mcs::GROUP;
use crate::mcs::about::ClusterProperty;
use crate::watch::{Health, bounded, next_change, publish, reflect};
use strait_discovery::wire::MAX_SELECTION;

/// How often everything is re-checked even without a change (a failed status write is
/// retried then).
const RESYNC: Duration = Duration::from_secs(30);

/// This cluster's exports from its `ServiceExport`s, and its `ClusterProperty` values.
pub struct KubeExports {
    rx: watch::Receiver<Arc<Vec<Export>>>,
    properties: watch::Receiver<Arc<BTreeMap<String, String>>>,
}

impl ExportSource for KubeExports {
    fn watch(&self) -> watch::Receiver<Arc<Vec<Export>>> {
        self.rx.clone()
    }
}

/// The `ServiceExport` resource at `version`.
pub fn export_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, version, "ServiceExport"),
        "serviceexports",
    )
}

impl KubeExports {
    /// The source, and the future that runs it (its watches and the status writer). The
    /// exports start empty and are published once every watch has listed. Conditions are
    /// written only while `leader` is true.
    ///
    /// `me` is this cluster; `clusterset` what the other clusters export, from which the
    /// `Conflict` condition is computed.
    pub fn start(
        client: Client,
        me: String,
        clusterset: watch::Receiver<Arc<Clusterset>>,
        leader: watch::Receiver<bool>,
        filter: EndpointFilter,
        health: Health,
    ) -> (KubeExports, impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = watch::channel(Arc::new(Vec::new()));
        let (properties_tx, properties) = watch::channel(Arc::new(BTreeMap::new()));
        // Registered now, so `synced` waits for them even before the version is known.
        for w in WATCHES {
            health.watching(w);
        }
        let inputs = Inputs {
            me,
            clusterset,
            leader,
            filter,
        };
        let run = run(client, inputs, health, (tx, properties_tx));
        (KubeExports { rx, properties }, run)
    }

    /// This cluster's `ClusterProperty` values (KEP-5939 matches selectors against
    /// them); the receiver sees every change.
    pub fn properties(&self) -> watch::Receiver<Arc<BTreeMap<String, String>>> {
        self.properties.clone()
    }
}

/// The watches of the export source.
const WATCHES: [&str; 3] = ["serviceexports", "services", "endpointslices"];

/// Where the export source publishes: the exports, and this cluster's properties.
type Outputs = (
    watch::Sender<Arc<Vec<Export>>>,
    watch::Sender<Arc<BTreeMap<String, String>>>,
);

/// What the export source reads besides the API.
struct Inputs {
    me: String,
    clusterset: watch::Receiver<Arc<Clusterset>>,
    leader: watch::Receiver<bool>,
    filter: EndpointFilter,
}

/// Which endpoint addresses are never exported.
#[derive(Debug, Clone)]
pub struct EndpointFilter {
    /// Let loopback, link-local, multicast and unspecified addresses through.
    pub allow_local: bool,
    /// The gateway's namespace and Service: its pods are never endpoints (an
    /// EndpointSlice naming them would loop traffic or reach the admin port).
    pub gateway: (String, String),
}

async fn run(
    client: Client,
    Inputs {
        me,
        mut clusterset,
        mut leader,
        filter,
    }: Inputs,
    health: Health,
    (tx, properties_tx): Outputs,
) {
    let version = served_version(&client, &health).await;
    tracing::info!(version, "reading ServiceExports");
    let resource = export_resource(version);
    let changed = Arc::new(Notify::new());
    let (exports, watch_exports) = reflect(
        Api::<DynamicObject>::all_with(client.clone(), &resource),
        watcher::Config::default(),
        resource.clone(),
        WATCHES[0],
        health.clone(),
        changed.clone(),
    );
    let (services, watch_services) = reflect(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        (),
        WATCHES[1],
        health.clone(),
        changed.clone(),
    );
    // Derived slices (strait's own, for imports) never feed exports.
    let (slices, watch_slices) = reflect(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(&format!("{}!=strait", crate::mcs::label::MANAGED_BY)),
        (),
        WATCHES[2],
        health.clone(),
        changed.clone(),
    );
    // ClusterProperties are optional (the About API may not be installed): their watch
    // is not part of `synced`, and without them selectors match nothing.
    let (properties, watch_properties) = reflect(
        Api::<ClusterProperty>::all(client.clone()),
        watcher::Config::default(),
        (),
        "clusterproperties",
        Health::default(),
        changed.clone(),
    );
    let (gateways, watch_gateways) = reflect(
        Api::<EndpointSlice>::namespaced(client.clone(), &filter.gateway.0),
        watcher::Config::default()
            .labels(&format!("kubernetes.io/service-name={}", filter.gateway.1)),
        (),
        "gateway pods",
        Health::default(),
        changed.clone(),
    );
    let write = async move {
        let mut resync = tokio::time::interval(RESYNC);
        loop {
            tokio::select! {
                _ = changed.notified() => {}
                _ = next_change(&mut leader) => {}
                _ = next_change(&mut clusterset) => {}
                _ = resync.tick() => {}
            }
            if !health.now().synced {
                continue;
            }
            let parsed: Vec<ExportObject> = exports
                .state()
                .iter()
                .filter_map(|o| ExportObject::from_dynamic(o))
                .collect();
            let mine = published_properties(&properties.state());
            let (mut now, mut verdicts) = exports_from(
                &parsed,
                &services.state(),
                &slices.state(),
                filter.allow_local,
                &gateways_now(&gateways.state()),
            );
            for e in &mut now {
                e.selection.properties = mine.clone();
            }
            publish(&properties_tx, mine);
            let others = clusterset.borrow().clone();
            for v in verdicts.iter_mut().filter(|v| v.valid()) {
                if let Some(e) = now
                    .iter()
                    .find(|e| e.namespace == v.namespace && e.name == v.name)
                {
                    v.conditions.push(conflict(&me, e, &others));
                }
            }
            let count = now.len();
            if publish(&tx, now) {
                tracing::info!(exports = count, "exports read from ServiceExports");
            }
            if *leader.borrow() {
                write_statuses(&client, &resource, &exports, &verdicts, &leader, &health).await;
            }
        }
    };
    tokio::join!(
        watch_exports,
        watch_services,
        watch_slices,
        watch_properties,
        watch_gateways,
        write
    );
}

/// The gateway pods' addresses (every one listed, ready or not) and this pod's own.
fn gateways_now(slices: &[Arc<EndpointSlice>]) -> BTreeSet<IpAddr> {
    let listed = slices
        .iter()
        .flat_map(|s| s.endpoints.iter().flat_map(|e| e.addresses.iter()))
        .filter_map(|a| a.parse().ok());
    let own = std::env::var("POD_IP").ok().and_then(|ip| ip.parse().ok());
    listed.chain(own).collect()
}

/// This cluster's properties as the catalog carries them: at most
/// [`MAX_SELECTION`], each name and value at most 253 bytes (peers refuse more; the rest
/// is left out, with a warning).
fn published_properties(all: &[Arc<ClusterProperty>]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for p in all {
        let (name, value) = (p.name_any(), p.spec.value.clone());
        if name.len() > 253 || value.len() > 253 || out.len() == MAX_SELECTION {
            tracing::warn!(property = %name, "ClusterProperty not published for cluster selectors (at most {MAX_SELECTION}, names and values at most 253 bytes)");
            continue;
        }
        out.insert(name, value);
    }
    out
}

/// The newest `ServiceExport` version the API server serves: v1beta1, else v1alpha1.
/// Retries until the API server answers.
async fn served_version(client: &Client, health: &Health) -> &'static str {
    let mut backoff = Duration::from_millis(200);
    loop {
        let api = Api::<DynamicObject>::all_with(client.clone(), &export_resource("v1beta1"));
        let version = match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => "v1beta1",
            Err(kube::Error::Api(e)) if e.code == 404 => "v1alpha1",
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the Kubernetes API server; retrying");
                health.report("api", vec![format!("reaching the API server: {e}")]);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        health.report("api", Vec::new());
        return version;
    }
}

/// Writes each verdict whose conditions differ from the object's, through the `status`
/// subresource. A condition keeps its `lastTransitionTime` while its status stays.
async fn write_statuses(
    client: &Client,
    resource: &ApiResource,
    store: &Store<DynamicObject>,
    verdicts: &[Verdict],
    leader: &watch::Receiver<bool>,
    health: &Health,
) {
    let mut errors = Vec::new();
    for v in verdicts {
        // The Lease may have moved on during the pass.
        if !*leader.borrow() {
            break;
        }
        let Some(current) = store.state().into_iter().find(|o| {
            o.metadata.namespace.as_deref() == Some(&v.namespace)
                && o.metadata.name.as_deref() == Some(&v.name)
        }) else {
            continue;
        };
        let before: Vec<Condition> = current
            .data
            .pointer("/status/conditions")
            .and_then(|c| serde_json::from_value(c.clone()).ok())
            .unwrap_or_default();
        let after = conditions(&before, &v.conditions, v.generation);
        if same(&before, &after) {
            continue;
        }
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), &v.namespace, resource);
        let patch = serde_json::json!({ "status": { "conditions": after } });
        let result =
            bounded(api.patch_status(&v.name, &PatchParams::default(), &Patch::Merge(&patch)))
                .await;
        if let Err(e) = result {
            tracing::warn!(export = %format!("{}/{}", v.namespace, v.name), error = %e, "writing ServiceExport status failed; retrying later");
            errors.push(format!(
                "writing the status of ServiceExport {}/{}: {e}",
                v.namespace, v.name
            ));
        }
    }
    health.report("status", errors);
}

/// The conditions to write: `wanted`, with the transition times of `before` kept where
/// the status did not change.
fn conditions(before: &[Condition], wanted: &[Cond], generation: Option<i64>) -> Vec<Condition> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    wanted
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let since = before
                .iter()
                .find(|b| b.type_ == c.type_ && b.status == status)
                .map_or_else(|| now.clone(), |b| b.last_transition_time.clone());
            Condition {
                type_: c.type_.to_owned(),
                status: status.to_owned(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// Whether two condition lists say the same (ignoring order and transition times).
fn same(a: &[Condition], b: &[Condition]) -> bool {
    let key = |c: &Condition| {
        (
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
            c.observed_generation,
        )
    };
    let mut a: Vec<_> = a.iter().map(key).collect();
    let mut b: Vec<_> = b.iter().map(key).collect();
    a.sort();
    b.sort();
    a == b
}
