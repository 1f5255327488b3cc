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
use crate::watch::{Health, bounded, next_change, publish, reflect};

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
pub struct ImportedService {
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
    /// KEP-5939: for each cluster selector (by index), the clusters it selects.
    pub selector_results: Vec<(u32, Vec<String>)>,
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
///
/// Only the writer gives out ports the record does not have yet (`allocate`): the other
/// replicas bind recorded ports only, so a pod never receives one import's traffic on a
/// port another replica gave to another import.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Allocation key → its record.
    pub records: BTreeMap<String, Placed>,
    /// This replica writes, and may give out ports not recorded yet.
    pub allocate: bool,
}

/// The record of one derived Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placed {
    /// Service port → gateway port.
    pub ports: BTreeMap<u16, u16>,
    /// The derived Service's cluster IP.
    pub cluster_ip: Option<IpAddr>,
}

impl Placement {
    /// The record in `services`. Only what strait wrote counts: a Service in the key's
    /// namespace, under the name derived from the key, owned by a ServiceImport (anyone
    /// can label and annotate a Service; this keeps a forged record from steering an
    /// import's traffic).
    pub fn from_services(services: &[Arc<Service>], allocate: bool) -> Placement {
        let mut out = BTreeMap::new();
        for s in services {
            let Some(key) = s.annotations().get(IMPORT_KEY) else {
                continue;
            };
            if !written_by_strait(s, key) {
                tracing::warn!(service = %format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()), %key, "ignoring a Service that claims an import it was not derived for");
                continue;
            }
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
        Placement {
            records: out,
            allocate,
        }
    }
}

/// Whether `s` is the derived Service strait writes for allocation key `key`.
fn written_by_strait(s: &Service, key: &str) -> bool {
    // `ns/name` or `ns/name@cluster/address`.
    let Some((namespace, rest)) = key.split_once('/') else {
        return false;
    };
    let name = rest.split('@').next().unwrap_or_default();
    s.namespace().as_deref() == Some(namespace)
        && s.name_any() == derived_name(name, key)
        && s.owner_references()
            .iter()
            .any(|o| o.kind == "ServiceImport" && o.name == name && o.controller == Some(true))
}

/// The name of the derived Service for allocation key `key` of service `name`: readable,
/// unique (a digest of the key), and a valid DNS label.
pub fn derived_name(name: &str, key: &str) -> String {
    let readable: String = name.chars().take(40).collect();
    format!("{}-{}", readable.trim_end_matches('-'), digest(key, 10))
}

/// The name of the derived EndpointSlice of derived Service `service` for `cluster`.
fn slice_name(service: &str, cluster: &str) -> String {
    format!("{service}-{}", digest(cluster, 5))
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
pub fn service_import(w: &ImportedService, placement: &Placement) -> Object {
    let ips: Vec<String> = if w.headless {
        Vec::new()
    } else {
        w.units
            .iter()
            .filter_map(|u| placement.records.get(&u.key)?.cluster_ip)
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
/// The status of `w`'s ServiceImport: its clusters, and the KEP-5939 selector results.
fn import_status(w: &ImportedService) -> v1beta1::ServiceImportStatus {
    v1beta1::ServiceImportStatus {
        clusters: w
            .clusters
            .iter()
            .map(|c| v1beta1::ClusterStatus { cluster: c.clone() })
            .collect(),
        cluster_selector_results: w
            .selector_results
            .iter()
            .map(|(i, clusters)| v1beta1::ClusterSelectorResult {
                selector: *i,
                clusters: clusters.clone(),
            })
            .collect(),
        conditions: Vec::new(),
    }
}

/// Kubernetes accepts 1 second to 1 day.
fn affinity(w: &ImportedService) -> Option<i32> {
    w.session_affinity
        .filter(|_| !w.headless)
        .map(|t| t.clamp(1, 86_400) as i32)
}

/// The derived Service and its EndpointSlices for one unit of `w`, owned by the
/// ServiceImport `owner`, pointing at `gateways`.
pub fn derived(
    w: &ImportedService,
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
            &slice_name(&name, cluster),
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
fn service_spec(w: &ImportedService, ports: Vec<Value>) -> Value {
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

/// Where the importer finds the gateway pods, and how long a new writer waits before it
/// deletes anything.
#[derive(Debug, Clone)]
pub struct ImporterConfig {
    /// The gateway's namespace.
    pub namespace: String,
    /// The Service selecting the gateway pods.
    pub gateway_service: String,
    /// A new writer deletes withdrawn imports only after this long (the discovery lease):
    /// until then its view of the federation may still be filling, and what is missing
    /// from it is not withdrawn.
    pub settle: Duration,
}

impl Importer {
    /// The importer, and the future that runs it.
    pub fn start(
        client: Client,
        config: ImporterConfig,
        wanted: watch::Receiver<Arc<Vec<ImportedService>>>,
        leader: watch::Receiver<bool>,
        health: Health,
    ) -> (Importer, impl Future<Output = ()> + Send + 'static) {
        let (tx, placement) = watch::channel(Arc::new(Placement::default()));
        let run = run(client, config, wanted, leader, health, tx);
        (Importer { placement }, run)
    }

    /// The recorded placement; the receiver sees every change.
    pub fn placement(&self) -> watch::Receiver<Arc<Placement>> {
        self.placement.clone()
    }
}

async fn run(
    client: Client,
    config: ImporterConfig,
    mut wanted: watch::Receiver<Arc<Vec<ImportedService>>>,
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
        Api::<EndpointSlice>::namespaced(client.clone(), &config.namespace),
        watcher::Config::default().labels(&format!(
            "kubernetes.io/service-name={}",
            config.gateway_service
        )),
        (),
        "gateway endpointslices",
        health.clone(),
        changed.clone(),
    );
    let write = async move {
        let mut resync = tokio::time::interval(RESYNC);
        // When this replica became the writer, and whether it has waited out `settle`.
        let mut settles_at: Option<tokio::time::Instant> = None;
        let mut settled = false;
        loop {
            tokio::select! {
                _ = changed.notified() => {}
                _ = next_change(&mut wanted) => {}
                _ = next_change(&mut leader) => {}
                _ = resync.tick() => {}
                _ = async {
                    match settles_at {
                        Some(at) if !settled => tokio::time::sleep_until(at).await,
                        _ => std::future::pending().await,
                    }
                } => settled = true,
            }
            let writer = *leader.borrow();
            match (writer, settles_at) {
                (true, None) => settles_at = Some(tokio::time::Instant::now() + config.settle),
                (false, _) => (settles_at, settled) = (None, false),
                _ => {}
            }
            // The writer gives out new ports only once it has read the record: with an
            // empty store it would hand out ports other imports already have.
            let allocate = writer && health.now().synced;
            publish(
                &placement,
                Placement::from_services(&services.state(), allocate),
            );
            if !writer || !health.now().synced {
                continue;
            }
            let pass = Pass {
                client: &client,
                stores: Stores {
                    imports: &imports,
                    services: &services,
                    slices: &slices,
                },
                leader: &leader,
                errors: Vec::new(),
            };
            let want = wanted.borrow().clone();
            let now = placement.borrow().clone();
            let gw = ready_addresses(&gateways.state());
            let errors = pass.run(&want, &now, &gw, settled).await;
            health.report("imports", errors);
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

/// The kinds of object the importer writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    ServiceImport,
    Service,
    EndpointSlice,
}

/// One object: kind, namespace, name.
type Id = (Kind, String, String);

/// What strait has written, as its reflectors see it.
struct Stores<'a> {
    imports: &'a Store<v1beta1::ServiceImport>,
    services: &'a Store<Service>,
    slices: &'a Store<EndpointSlice>,
}

/// One reconcile pass of the writer.
struct Pass<'a> {
    client: &'a Client,
    stores: Stores<'a>,
    leader: &'a watch::Receiver<bool>,
    /// What failed in this pass.
    errors: Vec<String>,
}

impl Pass<'_> {
    /// Writes what differs between `want` and the stores; when `delete` (the writer has
    /// settled), deletes what strait wrote that is no longer wanted. Returns the errors.
    async fn run(
        mut self,
        want: &[ImportedService],
        placement: &Placement,
        gateways: &[IpAddr],
        delete: bool,
    ) -> Vec<String> {
        let mut keep: BTreeSet<Id> = BTreeSet::new();
        for w in want {
            // Every name this import owns is kept, whether or not its writes go through:
            // a failed write must never delete what already serves.
            keep.insert((Kind::ServiceImport, w.namespace.clone(), w.name.clone()));
            for unit in &w.units {
                let service = derived_name(&w.name, &unit.key);
                for cluster in &unit.clusters {
                    keep.insert((
                        Kind::EndpointSlice,
                        w.namespace.clone(),
                        slice_name(&service, cluster),
                    ));
                }
                keep.insert((Kind::Service, w.namespace.clone(), service));
            }
            self.import(w, placement, gateways).await;
        }
        if delete {
            self.withdraw(&keep).await;
        }
        self.errors
    }

    /// Writes one import: its ServiceImport, status, derived Services and slices.
    async fn import(&mut self, w: &ImportedService, placement: &Placement, gateways: &[IpAddr]) {
        let si = service_import(w, placement);
        let api = Api::<v1beta1::ServiceImport>::namespaced(self.client.clone(), &w.namespace);
        let current = find(self.stores.imports, &si);
        let owner = match current.as_deref() {
            Some(cur) if digest_of(cur.annotations()) == digest_of_value(&si.body) => {
                cur.controller_owner_ref(&())
            }
            _ => self
                .apply(&api, &si, current.is_some())
                .await
                .and_then(|o| o.controller_owner_ref(&())),
        };
        // Without its ServiceImport nothing else of this import can be written.
        let Some(owner) = owner else { return };
        let status = import_status(w);
        let written = current.as_ref().and_then(|c| c.status.as_ref());
        if written != Some(&status) && self.still_writer() {
            // A merge patch leaves out what it does not name: say "none" explicitly.
            let mut body = serde_json::to_value(&status).unwrap_or_default();
            if status.cluster_selector_results.is_empty() {
                body["clusterSelectorResults"] = Value::Null;
            }
            let patch = json!({ "status": body });
            if let Err(e) =
                bounded(api.patch_status(&w.name, &PatchParams::default(), &Patch::Merge(&patch)))
                    .await
            {
                self.errors.push(format!(
                    "ServiceImport {}/{} status: {e}",
                    w.namespace, w.name
                ));
            }
        }
        for unit in &w.units {
            // A unit without ports yet (computed before the writer could allocate) waits
            // for the next pass; one whose ports another import records is refused.
            if unit.ports.is_empty() {
                continue;
            }
            if let Some(clash) = clashing(unit, placement) {
                self.errors.push(format!(
                    "{}/{}: gateway port {clash} is recorded for another import; waiting for a new one",
                    w.namespace, w.name
                ));
                continue;
            }
            // The Service (the record) first, then the slices that send traffic to it.
            for o in derived(w, unit, &owner, gateways) {
                let ns = o.namespace.clone();
                // Unchanged: the same digest, and no hand edit of what carries traffic.
                if o.body["kind"] == "Service" {
                    let cur = find(self.stores.services, &o);
                    let unchanged = cur.as_deref().is_some_and(|c| {
                        same(c.annotations(), &o) && ports_of(c) == ports_in(&o.body)
                    });
                    if !unchanged {
                        let api = Api::<Service>::namespaced(self.client.clone(), &ns);
                        self.apply(&api, &o, cur.is_some()).await;
                    }
                } else {
                    let cur = find(self.stores.slices, &o);
                    let unchanged = cur.as_deref().is_some_and(|c| {
                        same(c.annotations(), &o) && slice_of(c) == slice_in(&o.body)
                    });
                    if !unchanged {
                        let api = Api::<EndpointSlice>::namespaced(self.client.clone(), &ns);
                        self.apply(&api, &o, cur.is_some()).await;
                    }
                }
            }
        }
    }

    /// Deletes everything labelled as strait's that `keep` does not name.
    async fn withdraw(&mut self, keep: &BTreeSet<Id>) {
        for o in self.stores.imports.state() {
            self.delete_unless(keep, Kind::ServiceImport, o.as_ref())
                .await;
        }
        for o in self.stores.services.state() {
            self.delete_unless(keep, Kind::Service, o.as_ref()).await;
        }
        for o in self.stores.slices.state() {
            self.delete_unless(keep, Kind::EndpointSlice, o.as_ref())
                .await;
        }
    }

    /// Whether this replica still holds the Lease (it may move on during a pass).
    fn still_writer(&self) -> bool {
        *self.leader.borrow()
    }

    /// Server-side applies `o`; the object as written, or `None` (reported) on failure.
    /// An object of that name that strait did not write (`ours` false and found without
    /// the label) is left alone and reported.
    async fn apply<K>(&mut self, api: &Api<K>, o: &Object, ours: bool) -> Option<K>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        if !self.still_writer() {
            return None;
        }
        let kind = o.body["kind"].as_str().unwrap_or("object");
        let at = format!("{kind} {}/{}", o.namespace, o.name);
        if !ours {
            match bounded(api.get_opt(&o.name)).await {
                Ok(Some(foreign))
                    if foreign.labels().get(MANAGED_BY).map(String::as_str) != Some("strait") =>
                {
                    self.errors.push(format!("{at} exists and was not written by strait; strait leaves it alone (delete or rename it to import here)"));
                    return None;
                }
                Ok(_) => {}
                Err(e) => {
                    self.errors.push(format!("reading {at}: {e}"));
                    return None;
                }
            }
        }
        let params = PatchParams::apply(MANAGER).force();
        match bounded(api.patch(&o.name, &params, &Patch::Apply(&o.body))).await {
            Ok(obj) => Some(obj),
            Err(e) => {
                tracing::warn!(object = %at, error = %e, "writing an imported object failed; retrying later");
                self.errors.push(format!("writing {at}: {e}"));
                None
            }
        }
    }

    async fn delete_unless<K>(&mut self, keep: &BTreeSet<Id>, kind: Kind, o: &K)
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let ns = o.meta().namespace.clone().unwrap_or_default();
        let name = o.meta().name.clone().unwrap_or_default();
        if keep.contains(&(kind, ns.clone(), name.clone())) || !self.still_writer() {
            return;
        }
        tracing::info!(?kind, object = %format!("{ns}/{name}"), "import withdrawn; deleting");
        let api = Api::<K>::namespaced(self.client.clone(), &ns);
        match bounded(api.delete(&name, &DeleteParams::background())).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => self
                .errors
                .push(format!("deleting {kind:?} {ns}/{name}: {e}")),
        }
    }
}

/// A gateway port of `unit` that the record gives to another import.
fn clashing(unit: &Unit, placement: &Placement) -> Option<u16> {
    unit.ports.iter().map(|(_, _, gp)| *gp).find(|gp| {
        placement
            .records
            .iter()
            .any(|(key, p)| *key != unit.key && p.ports.values().any(|q| q == gp))
    })
}

/// (port, target port) of a Service as it is: edits that the digest does not see (a
/// `targetPort` changed by hand) are rewritten.
fn ports_of(s: &Service) -> BTreeSet<(i64, String)> {
    let ports = s
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    ports
        .into_iter()
        .map(|p| {
            let target = match p.target_port {
                Some(IntOrString::Int(t)) => t.to_string(),
                Some(IntOrString::String(t)) => t,
                None => String::new(),
            };
            (i64::from(p.port), target)
        })
        .collect()
}

/// (port, target port) of the Service strait would write.
fn ports_in(body: &Value) -> BTreeSet<(i64, String)> {
    body["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let port = p["port"].as_i64().unwrap_or_default();
            (port, p["targetPort"].to_string())
        })
        .collect()
}

/// The addresses and ports of an EndpointSlice as it is.
fn slice_of(s: &EndpointSlice) -> (BTreeSet<String>, BTreeSet<i64>) {
    let addresses = s
        .endpoints
        .iter()
        .flat_map(|e| e.addresses.clone())
        .collect();
    let ports = s
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.port.map(i64::from))
        .collect();
    (addresses, ports)
}

/// The addresses and ports of the EndpointSlice strait would write.
fn slice_in(body: &Value) -> (BTreeSet<String>, BTreeSet<i64>) {
    let addresses = body["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    let ports = body["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    (addresses, ports)
}

fn find<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>, o: &Object) -> Option<Arc<K>> {
    store.state().into_iter().find(|c| {
        c.meta().namespace.as_deref() == Some(&o.namespace)
            && c.meta().name.as_deref() == Some(&o.name)
    })
}

/// Whether the object with `annotations` already is what `o` would write.
fn same(annotations: &BTreeMap<String, String>, o: &Object) -> bool {
    digest_of(annotations) == digest_of_value(&o.body)
}

fn digest_of(annotations: &BTreeMap<String, String>) -> Option<&str> {
    annotations.get(DIGEST).map(String::as_str)
}

fn digest_of_value(body: &Value) -> Option<&str> {
    body["metadata"]["annotations"][DIGEST].as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(
        namespace: &str,
        name: &str,
        key: &str,
        owner: Option<&str>,
        target: u16,
    ) -> Arc<Service> {
        let mut o = json!({
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": owned_labels(),
                "annotations": { IMPORT_KEY: key },
            },
            "spec": { "clusterIP": "10.96.0.9", "ports": [{ "port": 80, "targetPort": target }] },
        });
        if let Some(owner) = owner {
            o["metadata"]["ownerReferences"] = json!([{
                "apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImport",
                "name": owner, "uid": "u1", "controller": true,
            }]);
        }
        Arc::new(serde_json::from_value(o).unwrap())
    }

    #[test]
    fn only_services_strait_derived_count_as_the_port_record() {
        let real = service(
            "prod",
            &derived_name("payments", "prod/payments"),
            "prod/payments",
            Some("payments"),
            20_001,
        );
        // A tenant's Service claiming the same import: another namespace, another name,
        // or no ServiceImport owner.
        let forged = [
            service(
                "tenant",
                &derived_name("payments", "prod/payments"),
                "prod/payments",
                Some("payments"),
                20_666,
            ),
            service(
                "prod",
                "payments-lookalike",
                "prod/payments",
                Some("payments"),
                20_666,
            ),
            service(
                "prod",
                &derived_name("payments", "prod/payments"),
                "prod/payments",
                None,
                20_666,
            ),
        ];
        for f in &forged {
            let p = Placement::from_services(std::slice::from_ref(f), false);
            assert!(p.records.is_empty(), "forged record accepted: {f:?}");
        }
        let p = Placement::from_services(&[real], true);
        let placed = &p.records["prod/payments"];
        assert_eq!(placed.ports.get(&80), Some(&20_001));
        assert_eq!(placed.cluster_ip, Some("10.96.0.9".parse().unwrap()));
        assert!(p.allocate);
    }

    #[test]
    fn derived_names_are_dns_labels_and_differ_per_key() {
        let long = "a".repeat(63);
        let a = derived_name(&long, "ns/x");
        let b = derived_name(&long, "ns/x@c/10.0.0.1");
        assert_ne!(a, b);
        for n in [&a, &b, &slice_name(&a, "us-east")] {
            assert!(
                n.len() <= 63 && strait_common::identity::is_dns_label(n),
                "{n}"
            );
        }
    }
}
