//! The Kubernetes importer: for every service this cluster imports, a `ServiceImport`
//! plus what makes it reachable from pods.
//!
//! A pod has one address, so each imported (service, port) gets its own port on the
//! gateway pods (from `kubernetes.import_ports`). A *derived* Service (ClusterIP, no
//! selector) carries that mapping: its ports are the service's ports, each with
//! `targetPort` = the gateway port, and its EndpointSlices (one per source cluster,
//! labelled `multicluster.kubernetes.io/source-cluster`) list the ready gateway pods.
//! kube-proxy then sends `clusterIP:port` to a gateway pod on the allocated port, and the
//! gateway forwards it to a healthy cluster. The derived Service's cluster IP is the
//! `ServiceImport`'s `ips` and what the gateway's DNS answers.
//!
//! A headless service has no shared address: each remote endpoint gets its own derived
//! Service (and ports), so `<hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local`
//! answers that Service's cluster IP, which reaches exactly that endpoint.
//!
//! The derived Services are also the record of the port allocation ([`Placement`]):
//! every replica reads it back and binds the same ports, and a restarted gateway keeps
//! them. Everything strait writes is labelled `app.kubernetes.io/managed-by: strait`
//! and owned by its `ServiceImport`, so deleting one deletes the rest; objects without
//! the label are never touched. Only the replica holding the Lease writes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::core::v1::{ClientIPConfig, SessionAffinityConfig};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};

use crate::mcs::{label, v1beta1};
use crate::watch::{Health, next_change, reflect};

/// The label on everything strait writes.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Annotation on a derived Service: the import (allocation key) it serves.
pub const IMPORT_KEY: &str = "strait.dev/import-key";
/// Annotation on written objects: a digest of what was written, to skip equal writes.
const DIGEST: &str = "strait.dev/digest";
/// Field manager for server-side apply.
const MANAGER: &str = "strait";
/// How often everything is re-checked even without a change (failed writes retry then).
const RESYNC: Duration = Duration::from_secs(30);

/// The labels on every object strait creates.
pub fn owned_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(MANAGED_BY.to_owned(), "strait".to_owned())])
}

/// One imported service as this cluster should see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `Headless` rather than `ClusterSetIP`.
    pub headless: bool,
    /// The service's ports (the union over the exporting clusters).
    pub ports: Vec<(String, u16)>,
    /// The exporting clusters.
    pub clusters: Vec<String>,
    /// Client-IP session affinity timeout (seconds), as the clusterset resolved it.
    pub session_affinity: Option<u32>,
    /// What gets a derived Service: the whole service, or (headless) each remote endpoint.
    pub units: Vec<Unit>,
}

/// What one derived Service serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// Allocation key: `ns/name`, or `ns/name@cluster/address` for a headless endpoint.
    pub key: String,
    /// Source clusters (one EndpointSlice each).
    pub clusters: Vec<String>,
    /// (port name, service port, gateway port).
    pub ports: Vec<(String, u16, u16)>,
}

/// Where each import is served, as recorded in the derived Services: the gateway port of
/// each service port, and the derived Service's cluster IP once assigned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement(pub BTreeMap<String, Placed>);

/// The record of one derived Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placed {
    /// Service port → gateway port.
    pub ports: BTreeMap<u16, u16>,
    /// The derived Service's cluster IP.
    pub cluster_ip: Option<IpAddr>,
}

impl Placement {
    /// The record in `services` (derived Services carry [`IMPORT_KEY`]).
    pub fn from_services(services: &[Arc<Service>]) -> Placement {
        let mut out = BTreeMap::new();
        for s in services {
            let Some(key) = s.annotations().get(IMPORT_KEY) else {
                continue;
            };
            let spec = s.spec.clone().unwrap_or_default();
            let ports = spec
                .ports
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| {
                    let port = u16::try_from(p.port).ok()?;
                    match p.target_port? {
                        IntOrString::Int(t) => Some((port, u16::try_from(t).ok()?)),
                        IntOrString::String(_) => None,
                    }
                })
                .collect();
            let cluster_ip = spec.cluster_ip.and_then(|ip| ip.parse().ok());
            out.insert(key.clone(), Placed { ports, cluster_ip });
        }
        Placement(out)
    }
}

/// The name of the derived Service for allocation key `key` of service `name`: readable,
/// unique (a digest of the key), and a valid DNS label.
pub fn derived_name(name: &str, key: &str) -> String {
    let readable: String = name.chars().take(40).collect();
    format!("{}-{}", readable.trim_end_matches('-'), digest(key, 10))
}

fn digest(s: &str, len: usize) -> String {
    let d = Sha256::digest(s.as_bytes());
    d.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .chars()
        .take(len)
        .collect()
}

/// One object to write, as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The whole object (server-side apply body).
    pub body: Value,
}

/// The ServiceImport for `w` (spec only; the status is written separately).
pub fn service_import(w: &Wanted, placement: &Placement) -> Object {
    let ips: Vec<String> = if w.headless {
        Vec::new()
    } else {
        w.units
            .iter()
            .filter_map(|u| placement.0.get(&u.key)?.cluster_ip)
            .map(|ip| ip.to_string())
            .collect()
    };
    let spec = v1beta1::ServiceImportSpec {
        ports: w
            .ports
            .iter()
            .map(|(name, port)| v1beta1::ServicePort {
                name: name.clone(),
                protocol: Some("TCP".into()),
                app_protocol: None,
                port: i32::from(*port),
            })
            .collect(),
        ips,
        type_: if w.headless {
            v1beta1::ImportType::Headless
        } else {
            v1beta1::ImportType::ClusterSetIP
        },
        session_affinity: Some(
            if affinity(w).is_some() {
                "ClientIP"
            } else {
                "None"
            }
            .into(),
        ),
        session_affinity_config: affinity(w).map(|timeout| SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(timeout),
            }),
        }),
    };
    object(
        &w.namespace,
        &w.name,
        json!({
            "apiVersion": "multicluster.x-k8s.io/v1beta1",
            "kind": "ServiceImport",
            "metadata": { "labels": owned_labels() },
            "spec": spec,
        }),
    )
}

/// The session affinity timeout of `w`, if it has affinity (a headless import has none).
fn affinity(w: &Wanted) -> Option<i32> {
    w.session_affinity
        .filter(|_| !w.headless)
        .map(|t| i32::try_from(t).unwrap_or(i32::MAX))
}

/// The derived Service and its EndpointSlices for one unit of `w`, owned by the
/// ServiceImport `owner`, pointing at `gateways`.
pub fn derived(
    w: &Wanted,
    unit: &Unit,
    owner: &OwnerReference,
    gateways: &[IpAddr],
) -> Vec<Object> {
    let name = derived_name(&w.name, &unit.key);
    let mut labels = owned_labels();
    labels.insert(label::SERVICE_NAME.into(), w.name.clone());
    let ports: Vec<Value> = unit
        .ports
        .iter()
        .map(|(pname, port, listen)| {
            let mut p = json!({ "port": port, "targetPort": listen, "protocol": "TCP" });
            if !pname.is_empty() {
                p["name"] = json!(pname);
            }
            p
        })
        .collect();
    let mut out = vec![object(
        &w.namespace,
        &name,
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "labels": labels,
                "annotations": { IMPORT_KEY: unit.key },
                "ownerReferences": [owner],
            },
            "spec": service_spec(w, ports),
        }),
    )];
    let family = |ip: &IpAddr| if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let address_type = gateways.first().map_or("IPv4", family);
    let endpoints: Vec<Value> = gateways
        .iter()
        .filter(|ip| family(ip) == address_type)
        .map(|ip| json!({ "addresses": [ip.to_string()], "conditions": { "ready": true } }))
        .collect();
    let slice_ports: Vec<Value> = unit
        .ports
        .iter()
        .map(|(pname, _, listen)| json!({ "name": pname, "port": listen, "protocol": "TCP" }))
        .collect();
    for cluster in &unit.clusters {
        let mut labels = labels.clone();
        labels.insert("kubernetes.io/service-name".into(), name.clone());
        labels.insert(label::MANAGED_BY.into(), "strait".into());
        labels.insert(label::SOURCE_CLUSTER.into(), cluster.clone());
        out.push(object(
            &w.namespace,
            &format!("{name}-{}", digest(cluster, 5)),
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": { "labels": labels, "ownerReferences": [owner] },
                "addressType": address_type,
                "endpoints": endpoints,
                "ports": slice_ports,
            }),
        ));
    }
    out
}

/// A derived Service's spec: the import's ports on the gateway's, and its session
/// affinity (so kube-proxy keeps a client on one gateway pod).
fn service_spec(w: &Wanted, ports: Vec<Value>) -> Value {
    let mut spec = json!({ "type": "ClusterIP", "ports": ports });
    if let Some(timeout) = affinity(w) {
        spec["sessionAffinity"] = json!("ClientIP");
        spec["sessionAffinityConfig"] = json!({ "clientIP": { "timeoutSeconds": timeout } });
    }
    spec
}

/// Sets name, namespace and the digest annotation on `body`.
fn object(namespace: &str, name: &str, mut body: Value) -> Object {
    body["metadata"]["name"] = json!(name);
    body["metadata"]["namespace"] = json!(namespace);
    let d = digest(&body.to_string(), 16);
    body["metadata"]["annotations"][DIGEST] = json!(d);
    Object {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        body,
    }
}

/// The importer: keeps the imported objects equal to `wanted` (while this replica holds
/// the Lease), and publishes the [`Placement`] recorded in the derived Services.
pub struct Importer {
    placement: watch::Receiver<Arc<Placement>>,
}

impl Importer {
    /// The importer, and the future that runs it. `gateway` names the namespace and
    /// Service of the gateway pods, whose ready addresses the derived slices list.
    pub fn start(
        client: Client,
        gateway: (String, String),
        wanted: watch::Receiver<Arc<Vec<Wanted>>>,
        leader: watch::Receiver<bool>,
        health: Health,
    ) -> (Importer, impl Future<Output = ()> + Send + 'static) {
        let (tx, placement) = watch::channel(Arc::new(Placement::default()));
        let run = run(client, gateway, wanted, leader, health, tx);
        (Importer { placement }, run)
    }

    /// The recorded placement; the receiver sees every change.
    pub fn placement(&self) -> watch::Receiver<Arc<Placement>> {
        self.placement.clone()
    }
}

async fn run(
    client: Client,
    (gw_namespace, gw_service): (String, String),
    mut wanted: watch::Receiver<Arc<Vec<Wanted>>>,
    mut leader: watch::Receiver<bool>,
    health: Health,
    placement: watch::Sender<Arc<Placement>>,
) {
    let changed = Arc::new(Notify::new());
    let owned = watcher::Config::default().labels(&format!("{MANAGED_BY}=strait"));
    let (imports, watch_imports) = reflect(
        Api::<v1beta1::ServiceImport>::all(client.clone()),
        owned.clone(),
        (),
        "serviceimports",
        health.clone(),
        changed.clone(),
    );
    let (services, watch_services) = reflect(
        Api::<Service>::all(client.clone()),
        owned.clone(),
        (),
        "derived services",
        health.clone(),
        changed.clone(),
    );
    let (slices, watch_slices) = reflect(
        Api::<EndpointSlice>::all(client.clone()),
        owned,
        (),
        "derived endpointslices",
        health.clone(),
        changed.clone(),
    );
    let (gateways, watch_gateways) = reflect(
        Api::<EndpointSlice>::namespaced(client.clone(), &gw_namespace),
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={gw_service}")),
        (),
        "gateway endpointslices",
        health.clone(),
        changed.clone(),
    );
    let write = async move {
        let mut resync = tokio::time::interval(RESYNC);
        loop {
            tokio::select! {
                _ = changed.notified() => {}
                _ = next_change(&mut wanted) => {}
                _ = next_change(&mut leader) => {}
                _ = resync.tick() => {}
            }
            let now = Placement::from_services(&services.state());
            placement.send_if_modified(|cur| {
                let changed = **cur != now;
                if changed {
                    *cur = Arc::new(now.clone());
                }
                changed
            });
            if !*leader.borrow() || !health.now().synced {
                continue;
            }
            let want = wanted.borrow().clone();
            let stores = Stores {
                imports: &imports,
                services: &services,
                slices: &slices,
            };
            let gw = ready_addresses(&gateways.state());
            reconcile(&client, &want, &now, &gw, &stores, &health).await;
        }
    };
    tokio::join!(
        watch_imports,
        watch_services,
        watch_slices,
        watch_gateways,
        write
    );
}

struct Stores<'a> {
    imports: &'a Store<v1beta1::ServiceImport>,
    services: &'a Store<Service>,
    slices: &'a Store<EndpointSlice>,
}

/// The ready addresses in the gateway Service's EndpointSlices.
fn ready_addresses(slices: &[Arc<EndpointSlice>]) -> Vec<IpAddr> {
    let mut out: BTreeSet<IpAddr> = BTreeSet::new();
    for s in slices {
        for e in &s.endpoints {
            let c = e.conditions.clone().unwrap_or_default();
            if c.ready.unwrap_or(true) && !c.terminating.unwrap_or(false) {
                out.extend(e.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()));
            }
        }
    }
    out.into_iter().collect()
}

/// Writes what differs between `want` and the stores, and deletes what strait wrote
/// that is no longer wanted.
async fn reconcile(
    client: &Client,
    want: &[Wanted],
    placement: &Placement,
    gateways: &[IpAddr],
    stores: &Stores<'_>,
    health: &Health,
) {
    let mut keep: BTreeSet<(String, String, String)> = BTreeSet::new();
    for w in want {
        let si = service_import(w, placement);
        keep.insert((
            "ServiceImport".into(),
            si.namespace.clone(),
            si.name.clone(),
        ));
        let api = Api::<v1beta1::ServiceImport>::namespaced(client.clone(), &w.namespace);
        let current = stores
            .imports
            .state()
            .into_iter()
            .find(|o| o.namespace().as_deref() == Some(&w.namespace) && o.name_any() == w.name);
        let owner = match current.as_deref() {
            Some(cur) if digest_of(cur.annotations()) == digest_of_value(&si.body) => {
                cur.controller_owner_ref(&())
            }
            _ => apply(&api, &si, health)
                .await
                .and_then(|o| o.controller_owner_ref(&())),
        };
        // Without its ServiceImport nothing else of this import can be written.
        let Some(owner) = owner else { continue };
        let status = json!({ "status": { "clusters": w.clusters.iter().map(|c| json!({"cluster": c})).collect::<Vec<_>>() } });
        let current_status = current.as_ref().and_then(|c| c.status.as_ref()).map(|s| {
            s.clusters
                .iter()
                .map(|c| c.cluster.clone())
                .collect::<Vec<_>>()
        });
        if current_status.as_ref() != Some(&w.clusters) {
            let r = api
                .patch_status(&w.name, &PatchParams::default(), &Patch::Merge(&status))
                .await;
            health.wrote(
                r.map(|_| ())
                    .map_err(|e| format!("ServiceImport {}/{} status: {e}", w.namespace, w.name)),
            );
        }
        for unit in &w.units {
            for o in derived(w, unit, &owner, gateways) {
                let kind = o.body["kind"].as_str().unwrap_or_default().to_owned();
                keep.insert((kind.clone(), o.namespace.clone(), o.name.clone()));
                let same = match kind.as_str() {
                    "Service" => find(stores.services, &o)
                        .is_some_and(|c| digest_of(c.annotations()) == digest_of_value(&o.body)),
                    _ => find(stores.slices, &o)
                        .is_some_and(|c| digest_of(c.annotations()) == digest_of_value(&o.body)),
                };
                if same {
                    continue;
                }
                if kind == "Service" {
                    apply(
                        &Api::<Service>::namespaced(client.clone(), &o.namespace),
                        &o,
                        health,
                    )
                    .await;
                } else {
                    apply(
                        &Api::<EndpointSlice>::namespaced(client.clone(), &o.namespace),
                        &o,
                        health,
                    )
                    .await;
                }
            }
        }
    }
    // Withdrawn: everything labelled as strait's that is not wanted.
    for o in stores.imports.state() {
        delete_unless(
            &keep,
            "ServiceImport",
            o.as_ref(),
            Api::namespaced(client.clone(), &o.namespace().unwrap_or_default()),
            health,
        )
        .await;
    }
    for o in stores.services.state() {
        delete_unless(
            &keep,
            "Service",
            o.as_ref(),
            Api::namespaced(client.clone(), &o.namespace().unwrap_or_default()),
            health,
        )
        .await;
    }
    for o in stores.slices.state() {
        delete_unless(
            &keep,
            "EndpointSlice",
            o.as_ref(),
            Api::namespaced(client.clone(), &o.namespace().unwrap_or_default()),
            health,
        )
        .await;
    }
}

fn find<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>, o: &Object) -> Option<Arc<K>> {
    store.state().into_iter().find(|c| {
        c.meta().namespace.as_deref() == Some(&o.namespace)
            && c.meta().name.as_deref() == Some(&o.name)
    })
}

fn digest_of(annotations: &BTreeMap<String, String>) -> Option<&str> {
    annotations.get(DIGEST).map(String::as_str)
}

fn digest_of_value(body: &Value) -> Option<&str> {
    body["metadata"]["annotations"][DIGEST].as_str()
}

/// Server-side applies `o`; the object as written, or `None` (reported) on failure.
async fn apply<K>(api: &Api<K>, o: &Object, health: &Health) -> Option<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = PatchParams::apply(MANAGER).force();
    match api.patch(&o.name, &params, &Patch::Apply(&o.body)).await {
        Ok(obj) => {
            health.wrote(Ok(()));
            Some(obj)
        }
        Err(e) => {
            let kind = o.body["kind"].as_str().unwrap_or("object");
            tracing::warn!(%kind, object = %format!("{}/{}", o.namespace, o.name), error = %e, "writing an imported object failed; retrying later");
            health.wrote(Err(format!(
                "writing {kind} {}/{}: {e}",
                o.namespace, o.name
            )));
            None
        }
    }
}

async fn delete_unless<K>(
    keep: &BTreeSet<(String, String, String)>,
    kind: &str,
    o: &K,
    api: Api<K>,
    health: &Health,
) where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let ns = o.meta().namespace.clone().unwrap_or_default();
    let name = o.meta().name.clone().unwrap_or_default();
    if keep.contains(&(kind.to_owned(), ns.clone(), name.clone())) {
        return;
    }
    tracing::info!(%kind, object = %format!("{ns}/{name}"), "import withdrawn; deleting");
    match api.delete(&name, &DeleteParams::background()).await {
        Ok(_) => health.wrote(Ok(())),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => health.wrote(Err(format!("deleting {kind} {ns}/{name}: {e}"))),
    }
}
