//! The gateway's desired state: which peers it keeps tunnels to, which services it imports
//! (and on which addresses), what it exports and publishes, what routing knows of the
//! catalog, and what DNS answers. One pure function, [`compute`], derives it from the
//! inputs (the config, the local exports, the discovery view if any, the catalog faults
//! in force, the address allocation); one loop, [`run`], recomputes it whenever an input
//! changes and publishes it on one `watch` channel. Every component that acts on it
//! (peers, listeners, routing, DNS, inbound authorization, the discovery member) reads
//! that channel; none writes it.
//!
//! Without discovery the view is simply absent: static and discovered services go
//! through the same code, so a static config and a discovery view carrying the same
//! services give the same desired state (a property test checks this).

pub(crate) mod dns;
mod imports;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use strait_common::Config;
use strait_common::config::routing::Routing as RoutingConfig;
use strait_common::config::{CallerLimits, Export, PortRange};
use strait_discovery::model::{Service, ServiceKey};
use strait_discovery::node::View;
use strait_discovery::source::to_catalog;
use strait_kubernetes::imports::Placement;
use tokio::sync::watch;

use dns::ServiceEntry;
pub(crate) use imports::{Allocation, endpoint_key};

/// A peer gateway to keep one tunnel connection to: a cluster's only gateway, or one
/// replica of a cluster that runs several.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTarget {
    /// Its cluster id (its certificate must name it).
    pub cluster: String,
    /// Its replica name (empty for a cluster's only gateway, or one configured by hand).
    pub replica: String,
    /// Its tunnel address.
    pub address: SocketAddr,
    /// It announced that it is draining: no new connections go there.
    pub draining: bool,
}

impl PeerTarget {
    /// A cluster's only gateway at `address`.
    pub fn single(cluster: &str, address: SocketAddr) -> Self {
        PeerTarget {
            cluster: cluster.to_owned(),
            replica: String::new(),
            address,
            draining: false,
        }
    }

    /// `cluster/replica`, or the cluster alone for its only gateway (logs and the API).
    pub fn name(&self) -> String {
        if self.replica.is_empty() {
            self.cluster.clone()
        } else {
            format!("{}/{}", self.cluster, self.replica)
        }
    }
}

/// One imported service as this gateway serves it: a local address with one listener per
/// port. For a headless service, one import per remote endpoint, reaching only that one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The address clients use (what DNS answers): the listeners' own, or in Kubernetes
    /// mode the derived Service's cluster IP (unspecified until the API has assigned it).
    pub address: IpAddr,
    /// Local address the listeners bind: `address`, or in Kubernetes mode
    /// `kubernetes.listen` (the pod's addresses).
    pub listen_on: IpAddr,
    /// Ports.
    pub ports: Vec<ImportPort>,
    /// Clusters serving it, in the order they are tried when no policy says otherwise.
    pub clusters: Vec<String>,
    /// For one endpoint of a headless service: its address in its cluster.
    pub endpoint: Option<IpAddr>,
    /// Client-IP session affinity timeout (seconds), as the clusterset resolved it.
    pub session_affinity: Option<u32>,
}

impl Import {
    /// `namespace/name`.
    pub fn service(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The port clients dial for `p`: the listener's own, or in Kubernetes mode (where
    /// kube-proxy maps the cluster IP's service port to the gateway port) the service port.
    pub fn client_port(&self, p: &ImportPort) -> u16 {
        if self.address == self.listen_on {
            p.listen
        } else {
            p.port
        }
    }
}

/// One port of an [`Import`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportPort {
    /// Port name (SRV records).
    pub name: String,
    /// The service port, as the exporting cluster knows it.
    pub port: u16,
    /// The local port the listener binds (0: any free one, for tests); in Kubernetes mode
    /// one from `kubernetes.import_ports`, the derived Service's target port.
    pub listen: u16,
}

impl From<&strait_common::config::Import> for Import {
    fn from(i: &strait_common::config::Import) -> Self {
        Import {
            namespace: i.namespace.clone(),
            name: i.name.clone(),
            address: i.address,
            listen_on: i.address,
            ports: i
                .ports
                .iter()
                .map(|p| ImportPort {
                    name: p.name.clone(),
                    port: p.port,
                    listen: p.local_port(),
                })
                .collect(),
            clusters: i.clusters.clone(),
            endpoint: None,
            session_affinity: None,
        }
    }
}

/// One service this cluster imports, as the clusterset resolved it (the MCS rule: the
/// oldest export decides what differs): what its `ServiceImport` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClustersetService {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// No clusterset IP: each endpoint is addressed.
    pub headless: bool,
    /// The union of the exports' ports: (name, port).
    pub ports: Vec<(String, u16)>,
    /// The exporting clusters, in the import's order.
    pub clusters: Vec<String>,
    /// Client-IP session affinity timeout (seconds).
    pub session_affinity: Option<u32>,
    /// KEP-5939: for each of the service's cluster selectors (by index), the exporting
    /// clusters it selects; empty without selectors.
    pub selector_results: Vec<(u32, Vec<String>)>,
}

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

/// Drill faults that change what this cluster publishes: drained or unready exports keep
/// their entries (so peers know why) with every endpoint not ready.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogFaults {
    /// Every export is published unready.
    pub drain: bool,
    /// These exports (`namespace/name`) are published unready.
    pub unready: BTreeSet<String>,
}

/// The catalog entries this cluster publishes for `exports`, shaped by `faults`.
pub fn published(
    exports: &[Export],
    zone: &str,
    faults: &CatalogFaults,
) -> BTreeMap<ServiceKey, Service> {
    let mut services = to_catalog(exports, zone);
    shape(&mut services, faults);
    services
}

/// Marks the endpoints of drained or unready services not ready.
pub fn shape(services: &mut BTreeMap<ServiceKey, Service>, faults: &CatalogFaults) {
    for (key, svc) in services.iter_mut() {
        if faults.drain || faults.unready.contains(&key.to_string()) {
            for e in &mut svc.endpoints {
                e.ready = false;
            }
        }
    }
}

/// What of the config is fixed for the gateway's life, converted once to runtime types.
#[derive(Debug, Clone, PartialEq)]
pub struct Local {
    /// This cluster.
    pub cluster: String,
    /// Its region.
    pub region: String,
    /// Its zone.
    pub zone: String,
    /// Configured peers.
    pub peers: Vec<PeerTarget>,
    /// Configured imports.
    pub imports: Vec<Import>,
    /// Where discovered imports get their addresses (`discovery.import_addresses`).
    pub import_range: Option<IpNet>,
    /// Kubernetes mode: discovered imports listen on `listen` with a port each from
    /// `ports`, and are addressed by their derived Service's cluster IP.
    pub kubernetes: Option<KubeImports>,
}

/// Where imports listen in Kubernetes mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KubeImports {
    /// The address every import listener binds.
    pub listen: IpAddr,
    /// The gateway ports imports are given.
    pub ports: PortRange,
}

impl From<&Config> for Local {
    fn from(c: &Config) -> Self {
        Local {
            cluster: c.cluster.clone(),
            region: c.region.clone(),
            zone: c.zone.clone(),
            peers: c
                .peers
                .iter()
                .map(|p| PeerTarget::single(&p.cluster, p.address))
                .collect(),
            imports: c.imports.iter().map(Import::from).collect(),
            import_range: c.discovery.as_ref().map(|d| d.import_addresses),
            kubernetes: c.kubernetes.as_ref().map(|k| KubeImports {
                listen: k.listen,
                ports: k.import_ports,
            }),
        }
    }
}

/// The desired state of one gateway.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// Peers to keep tunnels to.
    pub peers: Vec<PeerTarget>,
    /// Services to listen for.
    pub imports: Vec<Import>,
    /// Every service imported from the federation, resolved (with discovery).
    pub clusterset: Vec<ClustersetService>,
    /// KEP-5939: `namespace/name` → cluster → the index of the first cluster selector it
    /// matches, for services whose exports carry selectors (clusters matching none are
    /// absent). Routing prefers lower indexes, then locality.
    pub selection: BTreeMap<String, BTreeMap<String, u32>>,
    /// This cluster's exports: what inbound streams may reach.
    pub exports: Arc<Vec<Export>>,
    /// What the discovery member advertises for this cluster.
    pub published: BTreeMap<ServiceKey, Service>,
    /// What routing knows of each cluster's offers and locality.
    pub catalog: CatalogView,
    /// What DNS answers.
    pub dns: Vec<ServiceEntry>,
    /// Routing policies.
    pub routing: Arc<RoutingConfig>,
    /// Limits on what each calling cluster may open here.
    pub limits: Arc<CallerLimits>,
}

impl Desired {
    /// Imported services and the clusters that serve them (in import order; for a
    /// headless service, every cluster with an endpoint).
    pub fn services(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for imp in &self.imports {
            let clusters = out.entry(imp.service()).or_default();
            for c in &imp.clusters {
                if !clusters.contains(c) {
                    clusters.push(c.clone());
                }
            }
        }
        out
    }
}

/// This cluster's exports as the desired state has them now: a read-only view for the
/// components that need nothing else (the inbound side, fault validation).
#[derive(Clone)]
pub struct Exports(watch::Receiver<Arc<Desired>>);

impl Exports {
    /// The exports in `desired`.
    pub fn new(desired: watch::Receiver<Arc<Desired>>) -> Self {
        Exports(desired)
    }

    /// The exports now.
    pub fn now(&self) -> Arc<Vec<Export>> {
        self.0.borrow().exports.clone()
    }

    /// The callers' limits now (re-read with the config file).
    pub fn limits(&self) -> Arc<CallerLimits> {
        self.0.borrow().limits.clone()
    }
}

/// Everything the desired state is computed from.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The fixed part of the config.
    pub local: &'a Local,
    /// This cluster's exports now.
    pub exports: &'a Arc<Vec<Export>>,
    /// Routing policies now.
    pub routing: &'a Arc<RoutingConfig>,
    /// Callers' limits now.
    pub limits: &'a Arc<CallerLimits>,
    /// The federated catalog, with discovery.
    pub view: Option<&'a View>,
    /// Catalog faults in force.
    pub faults: &'a CatalogFaults,
    /// Kubernetes mode: the ports and cluster IPs recorded in the derived Services.
    pub placement: Option<&'a Placement>,
    /// Kubernetes mode: this cluster's `ClusterProperty` values (for `@SameAsImporter@`).
    pub properties: Option<&'a BTreeMap<String, String>>,
}

/// The desired state for `inputs`. `alloc` keeps discovered imports on stable addresses:
/// it is read and updated (addresses of withdrawn services are freed).
pub fn compute(inputs: &Inputs<'_>, alloc: &mut Allocation) -> Desired {
    let no_view = View::default();
    let view = inputs.view.unwrap_or(&no_view);
    let local = inputs.local;
    let no_placement = Placement::default();
    let placement = inputs.placement.unwrap_or(&no_placement);
    let no_properties = BTreeMap::new();
    let properties = inputs.properties.unwrap_or(&no_properties);
    let (imports, clusterset) = imports::desired_imports(local, view, placement, properties, alloc);
    let selection = imports::selection(&clusterset);
    Desired {
        peers: imports::desired_peers(&local.peers, view, &local.cluster),
        dns: dns::entries(&imports, view, &local.cluster, &local.region),
        imports,
        clusterset,
        selection,
        exports: inputs.exports.clone(),
        published: published(inputs.exports, &local.zone, inputs.faults),
        catalog: CatalogView::from_view(view),
        routing: inputs.routing.clone(),
        limits: inputs.limits.clone(),
    }
}

/// Where the inputs come from while the gateway runs.
pub struct Sources {
    /// The local exports (the config file, or Kubernetes).
    pub exports: watch::Receiver<Arc<Vec<Export>>>,
    /// The config as reloaded from its file (routing policies apply at run time).
    pub config: watch::Receiver<Arc<Config>>,
    /// The discovery member's view.
    pub view: Option<watch::Receiver<Arc<View>>>,
    /// Catalog faults in force.
    pub faults: watch::Receiver<CatalogFaults>,
    /// Kubernetes mode: the placement recorded in the derived Services.
    pub placement: Option<watch::Receiver<Arc<Placement>>>,
    /// Kubernetes mode: this cluster's `ClusterProperty` values.
    pub properties: Option<watch::Receiver<Arc<BTreeMap<String, String>>>>,
}

impl Sources {
    /// The desired state for the inputs as they are now.
    pub fn compute(&mut self, local: &Local, alloc: &mut Allocation) -> Desired {
        let exports = self.exports.borrow_and_update().clone();
        let (routing, limits) = {
            let c = self.config.borrow_and_update();
            (Arc::new(c.routing.clone()), Arc::new(c.limits.clone()))
        };
        let view = self.view.as_mut().map(|v| v.borrow_and_update().clone());
        let faults = self.faults.borrow_and_update().clone();
        let placement = self
            .placement
            .as_mut()
            .map(|p| p.borrow_and_update().clone());
        let properties = self
            .properties
            .as_mut()
            .map(|p| p.borrow_and_update().clone());
        compute(
            &Inputs {
                local,
                exports: &exports,
                routing: &routing,
                limits: &limits,
                view: view.as_deref(),
                faults: &faults,
                placement: placement.as_deref(),
                properties: properties.as_deref(),
            },
            alloc,
        )
    }
}

/// The one writer of the desired state: recomputes it whenever an input changes and
/// publishes it when it differs. Runs until the gateway stops.
pub async fn run(
    local: Local,
    mut sources: Sources,
    mut alloc: Allocation,
    desired: watch::Sender<Arc<Desired>>,
) {
    let started = sources.config.borrow().clone();
    loop {
        tokio::select! {
            _ = changed(&mut sources.exports) => {}
            _ = changed(&mut sources.faults) => {}
            _ = changed_opt(&mut sources.view) => {}
            _ = changed_opt(&mut sources.placement) => {}
            _ = changed_opt(&mut sources.properties) => {}
            _ = changed(&mut sources.config) => {
                note_reload(&started, &sources.config.borrow());
            }
        }
        let next = sources.compute(&local, &mut alloc);
        desired.send_if_modified(|cur| {
            let changed = **cur != next;
            if changed {
                *cur = Arc::new(next);
            }
            changed
        });
    }
}

/// Resolves when `rx` changes; never, once its sender is gone (a fixed input).
async fn changed<T>(rx: &mut watch::Receiver<T>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves when `rx` is present and changes.
async fn changed_opt<T>(rx: &mut Option<watch::Receiver<T>>) {
    match rx.as_mut() {
        Some(rx) => changed(rx).await,
        None => std::future::pending().await,
    }
}

/// Says which edits of the config file apply now and which wait for a restart.
fn note_reload(started: &Config, now: &Config) {
    let rest = |c: &Config| {
        let mut c = c.clone();
        c.exports.clear();
        c.routing = Default::default();
        c.limits = Default::default();
        c
    };
    if rest(now) != rest(started) {
        tracing::warn!(
            "the config file changed beyond `exports`, `routing` and `limits`; those changes apply at the next restart"
        );
    }
    tracing::info!("configuration reloaded (exports, routing, limits)");
}
