//! Which peers and imports a gateway wants: the configured ones, plus, with discovery,
//! every member and every service another cluster exports to this one, each on a stable
//! address from `discovery.import_addresses`.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use ipnet::IpNet;
use strait_discovery::model::{MemberInfo, Service, resolve};
use strait_discovery::node::View;
use strait_discovery::state::ReplicaView;

use strait_common::config::{PortRange, Selection};
use strait_kubernetes::imports::Placement;

use super::{ClustersetService, Import, ImportPort, KubeImports, Local, PeerTarget};

/// The addresses given to discovered imports, by allocation key (`ns/name`, or for a
/// headless endpoint `ns/name@cluster/address`); kept between computations so an import
/// keeps its address while its service exists.
/// In Kubernetes mode it also holds the gateway port of each (key, service port), for
/// the ports the API has not recorded yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Allocation key → local address.
    addresses: BTreeMap<String, IpAddr>,
    /// (allocation key, service port) → gateway port (Kubernetes mode).
    ports: BTreeMap<(String, u16), u16>,
}

impl Allocation {
    /// An allocation that already gave `key` the address `address`.
    #[cfg(test)]
    pub fn with(mut self, key: &str, address: IpAddr) -> Self {
        self.addresses.insert(key.to_owned(), address);
        self
    }

    /// Addresses given out now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.addresses.len()
    }

    /// A stable gateway port for service port `port` of `key` in `range`: the one the
    /// derived Services record, else (on the writer only) the one given before, else the
    /// first free port from a hash of the key. A recorded port wins over a local choice.
    fn allocate_port(
        &mut self,
        range: PortRange,
        key: &str,
        port: u16,
        placement: &Placement,
    ) -> Option<u16> {
        let id = (key.to_owned(), port);
        let recorded = recorded_ports(placement, range);
        if let Some(p) = recorded.get(&(key, port)) {
            self.ports.insert(id, *p);
            return Some(*p);
        }
        let taken_by_other = |p: u16, me: &(String, u16)| {
            recorded
                .iter()
                .any(|((k, sp), gp)| *gp == p && (*k, *sp) != (me.0.as_str(), me.1))
        };
        // Only the writer gives out ports the record does not have yet.
        if !placement.allocate {
            return None;
        }
        if let Some(p) = self.ports.get(&id).copied()
            && !taken_by_other(p, &id)
        {
            return Some(p);
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (key, port).hash(&mut h);
        let start = (h.finish() % range.len() as u64) as usize;
        let free = (0..range.len())
            .map(|i| range.first + ((start + i) % range.len()) as u16)
            .find(|p| {
                !taken_by_other(*p, &id)
                    && !self.ports.iter().any(|(other, q)| q == p && *other != id)
            })?;
        self.ports.insert(id, free);
        Some(free)
    }

    /// A stable address for `key` in `range`: its previous one, else the first free host
    /// starting from a hash of the name (so restarts tend to give the same address).
    fn allocate(&mut self, range: IpNet, key: &str, reserved: &[IpAddr]) -> Option<IpAddr> {
        if let Some(a) = self.addresses.get(key) {
            return Some(*a);
        }
        let hosts: Vec<IpAddr> = range.hosts().take(65_536).collect();
        if hosts.is_empty() {
            return None;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let start = (h.finish() % hosts.len() as u64) as usize;
        let taken: Vec<IpAddr> = self
            .addresses
            .values()
            .copied()
            .chain(reserved.iter().copied())
            .collect();
        let free = (0..hosts.len())
            .map(|i| hosts[(start + i) % hosts.len()])
            .find(|a| !taken.contains(a))?;
        self.addresses.insert(key.to_owned(), free);
        Some(free)
    }
}

/// Most replicas of one cluster this gateway keeps tunnels to.
pub(super) const MAX_REPLICAS: usize = 16;

/// Peers to keep: the configured ones, plus every member of the federation whose lease
/// holds (suspected members are kept: their connection retries until the lease ends). A
/// cluster that announces replicas is one peer per live replica record; one that does not
/// (its only gateway) is its origin's address. A configured peer replaces what discovery
/// says of its cluster.
pub(super) fn desired_peers(configured: &[PeerTarget], view: &View, me: &str) -> Vec<PeerTarget> {
    let replicas: Vec<&ReplicaView> = view
        .replicas
        .iter()
        .filter(|r| r.alive && r.info.cluster != me)
        .collect();
    let replicated = |cluster: &str| replicas.iter().any(|r| r.info.cluster == cluster);
    let singles = view
        .members
        .iter()
        .filter(|m| m.info.cluster != me && !m.expired && !replicated(&m.info.cluster))
        .map(|m| PeerTarget::single(&m.info.cluster, m.info.tunnel_addr));
    let each = replicas.iter().map(|r| PeerTarget {
        cluster: r.info.cluster.clone(),
        replica: r.replica.clone(),
        address: r.info.tunnel_addr,
        draining: r.draining,
    });
    let out: BTreeMap<(String, String), PeerTarget> = singles
        .chain(each)
        .filter(|p| !configured.iter().any(|c| c.cluster == p.cluster))
        .chain(configured.iter().cloned())
        .map(|p| ((p.cluster.clone(), p.replica.clone()), p))
        .collect();
    // Replicas that announce one address (behind one load balancer) are one tunnel: the
    // balancer, not this gateway, picks the replica. And a cluster gets at most
    // MAX_REPLICAS tunnels, whatever a holder of its key announces.
    let mut kept: Vec<PeerTarget> = Vec::new();
    for p in out.into_values() {
        let of_cluster = kept.iter().filter(|k| k.cluster == p.cluster).count();
        if let Some(same) = kept
            .iter_mut()
            .find(|k| k.cluster == p.cluster && k.address == p.address)
        {
            // Draining only when every replica behind the address is.
            same.draining &= p.draining;
        } else if of_cluster < MAX_REPLICAS {
            kept.push(p);
        }
    }
    kept
}

/// Imports: the configured ones, plus every service another cluster exports to this one,
/// on an address from the import range that stays the same while the service exists.
/// Clusters are ordered alive first, then same region, then by id.
///
/// A headless service gets no shared address: each endpoint of each origin cluster gets
/// its own import (and address), reaching exactly that endpoint.
pub(super) fn desired_imports(
    local: &Local,
    view: &View,
    placement: &Placement,
    properties: &BTreeMap<String, String>,
    alloc: &mut Allocation,
) -> (Vec<Import>, Vec<ClustersetService>) {
    let alive: BTreeMap<&str, bool> = view
        .members
        .iter()
        .map(|m| (m.info.cluster.as_str(), m.alive))
        .collect();
    let mut found: BTreeMap<(String, String), Offers> = BTreeMap::new();
    // In Kubernetes mode a cluster imports its own services too (the MCS API gives every
    // cluster of the clusterset the ServiceImport); its own endpoints are dialled directly.
    let own = |cluster: &str| cluster == local.cluster;
    for e in &view.services {
        let wanted = if own(&e.origin.cluster) {
            local.kubernetes.is_some()
        } else {
            e.service.exported_to(&local.cluster)
        };
        if !wanted {
            continue;
        }
        found
            .entry((e.key.namespace.clone(), e.key.name.clone()))
            .or_default()
            .origins
            .push((&e.origin, &e.service));
    }
    // Configured imports keep their addresses; discovered ones never take them.
    let configured = &local.imports;
    let reserved: Vec<IpAddr> = configured.iter().map(|i| i.address).collect();
    let mut wanted: Vec<Wanted> = Vec::new();
    let mut clusterset = Vec::new();
    for ((namespace, name), Offers { mut origins }) in found {
        if configured
            .iter()
            .any(|i| i.namespace == namespace && i.name == name)
        {
            continue;
        }
        origins.sort_by_key(|(m, _)| {
            (
                !(own(&m.cluster) || alive.get(m.cluster.as_str()).copied().unwrap_or(false)),
                m.region != local.region,
                m.cluster.clone(),
            )
        });
        // The clusterset's view of the service: the oldest export decides what differs.
        let resolved = resolve(origins.iter().map(|(m, s)| (m.cluster.as_str(), *s)));
        let ports: Vec<ImportPort> = resolved
            .ports
            .into_iter()
            .map(|p| ImportPort {
                name: p.name,
                port: p.port,
                listen: p.port,
            })
            .collect();
        let (headless, session_affinity) = (resolved.headless, resolved.session_affinity);
        clusterset.push(ClustersetService {
            namespace: namespace.clone(),
            name: name.clone(),
            headless,
            ports: ports.iter().map(|p| (p.name.clone(), p.port)).collect(),
            clusters: origins.iter().map(|(m, _)| m.cluster.clone()).collect(),
            session_affinity,
            selector_results: selector_results(&resolved.selectors, &origins, properties),
        });
        let base = format!("{namespace}/{name}");
        if headless {
            // Pods reach this cluster's own endpoints directly: no import for those.
            for (origin, service) in origins.iter().filter(|(m, _)| !own(&m.cluster)) {
                for ep in &service.endpoints {
                    wanted.push(Wanted {
                        key: endpoint_key(&base, &origin.cluster, ep.address),
                        namespace: namespace.clone(),
                        name: name.clone(),
                        ports: ports.clone(),
                        clusters: vec![origin.cluster.clone()],
                        endpoint: Some(ep.address),
                        session_affinity: None,
                    });
                }
            }
        } else {
            wanted.push(Wanted {
                key: base,
                namespace,
                name,
                ports,
                clusters: origins.iter().map(|(m, _)| m.cluster.clone()).collect(),
                endpoint: None,
                session_affinity,
            });
        }
    }
    alloc
        .addresses
        .retain(|k, _| wanted.iter().any(|w| w.key == *k));
    alloc
        .ports
        .retain(|(k, _), _| wanted.iter().any(|w| w.key == *k));
    let mut out: Vec<Import> = configured.to_vec();
    for w in wanted {
        if let Some(kube) = local.kubernetes {
            out.push(kube_import(w, kube, placement, alloc));
            continue;
        }
        let Some(range) = local.import_range else {
            tracing::warn!(service = %w.key, "a discovered service needs discovery.import_addresses");
            continue;
        };
        let Some(address) = alloc.allocate(range, &w.key, &reserved) else {
            tracing::warn!(service = %w.key, %range, "no free import address; widen discovery.import_addresses");
            continue;
        };
        out.push(Import {
            name: w.name,
            namespace: w.namespace,
            address,
            listen_on: address,
            ports: w.ports,
            clusters: w.clusters,
            endpoint: w.endpoint,
            session_affinity: w.session_affinity,
        });
    }
    (out, clusterset)
}

/// KEP-5939: for each selector (by index), the origin clusters it selects; a cluster
/// counts for the first selector it matches only.
fn selector_results(
    selectors: &[BTreeMap<String, String>],
    origins: &[(&MemberInfo, &Service)],
    mine: &BTreeMap<String, String>,
) -> Vec<(u32, Vec<String>)> {
    let mut out: Vec<(u32, Vec<String>)> = (0..selectors.len() as u32)
        .map(|i| (i, Vec::new()))
        .collect();
    for (m, s) in origins {
        if let Some(i) = Selection::first_match(selectors, &s.selection.properties, mine) {
            out[i as usize].1.push(m.cluster.clone());
        }
    }
    out
}

/// Routing's view of the selector results: service → cluster → selector index.
pub(super) fn selection(
    clusterset: &[ClustersetService],
) -> BTreeMap<String, BTreeMap<String, u32>> {
    clusterset
        .iter()
        .filter(|s| !s.selector_results.is_empty())
        .map(|s| {
            let by_cluster = s
                .selector_results
                .iter()
                .flat_map(|(i, clusters)| clusters.iter().map(move |c| (c.clone(), *i)))
                .collect();
            (format!("{}/{}", s.namespace, s.name), by_cluster)
        })
        .collect()
}

/// The recorded gateway port of each (key, service port): only ports inside `range`, and
/// a port recorded for several keys (an edited derived Service) counts for the first key
/// only; the others get new ports.
fn recorded_ports(placement: &Placement, range: PortRange) -> BTreeMap<(&str, u16), u16> {
    let mut taken = std::collections::BTreeSet::new();
    let mut out = BTreeMap::new();
    for (key, placed) in &placement.records {
        for (service_port, gateway_port) in &placed.ports {
            if range.contains(*gateway_port) && taken.insert(*gateway_port) {
                out.insert((key.as_str(), *service_port), *gateway_port);
            }
        }
    }
    out
}

/// An import in Kubernetes mode: every port on `kube.listen` with a port of its own, and
/// addressed by the cluster IP the derived Service records (unspecified until then).
fn kube_import(
    w: Wanted,
    kube: KubeImports,
    placement: &Placement,
    alloc: &mut Allocation,
) -> Import {
    let mut ports = Vec::with_capacity(w.ports.len());
    for p in w.ports {
        match alloc.allocate_port(kube.ports, &w.key, p.port, placement) {
            Some(listen) => ports.push(ImportPort { listen, ..p }),
            // Another replica writes: it records the port, then this one binds it.
            None if !placement.allocate => {}
            // The other ports keep serving.
            None => {
                tracing::warn!(service = %w.key, port = p.port, range = %String::from(kube.ports), "no free gateway port for an import port; widen kubernetes.import_ports")
            }
        }
    }
    let address = placement
        .records
        .get(&w.key)
        .and_then(|p| p.cluster_ip)
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    Import {
        name: w.name,
        namespace: w.namespace,
        address,
        listen_on: kube.listen,
        ports,
        clusters: w.clusters,
        endpoint: w.endpoint,
        session_affinity: w.session_affinity,
    }
}

/// The allocation key of one headless endpoint: `ns/name@cluster/address`.
pub(crate) fn endpoint_key(service: &str, cluster: &str, address: IpAddr) -> String {
    format!("{service}@{cluster}/{address}")
}

/// What the federation offers of one service: its origins.
#[derive(Default)]
struct Offers<'a> {
    origins: Vec<(&'a MemberInfo, &'a Service)>,
}

/// One import to allocate an address for.
struct Wanted {
    key: String,
    namespace: String,
    name: String,
    ports: Vec<ImportPort>,
    clusters: Vec<String>,
    endpoint: Option<IpAddr>,
    session_affinity: Option<u32>,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use strait_discovery::model::{Port, ServiceKey};
    use strait_discovery::state::{CatalogEntry, MemberView, OriginDigest};

    use super::*;

    fn member(c: &str, region: &str, alive: bool) -> MemberView {
        MemberView {
            info: MemberInfo {
                cluster: c.into(),
                region: region.into(),
                zone: String::new(),
                tunnel_addr: "127.0.0.1:1".parse().unwrap(),
                gossip_addr: "127.0.0.1:2".parse().unwrap(),
            },
            alive,
            expired: false,
            phi: 0.0,
            last_heard: Duration::ZERO,
            digest: OriginDigest::default(),
            services: 1,
        }
    }

    fn entry(origin: &MemberView, name: &str, export_to: &[&str]) -> CatalogEntry {
        CatalogEntry {
            origin: origin.info.clone(),
            key: ServiceKey::new("shop", name),
            service: Service {
                ports: vec![Port {
                    name: "http".into(),
                    port: 80,
                    protocol: "TCP".into(),
                }],
                endpoints: vec![],
                export_to: export_to.iter().map(|s| s.to_string()).collect(),
                weight: 1,
                headless: false,
                session_affinity: None,
                exported_at_ms: 0,
                selection: Default::default(),
            },
            version: 1,
            lease_age: Duration::ZERO,
            origin_alive: origin.alive,
        }
    }

    fn local(me: &MemberView, range: &str) -> Local {
        Local {
            cluster: me.info.cluster.clone(),
            region: me.info.region.clone(),
            zone: String::new(),
            peers: vec![],
            imports: vec![],
            import_range: Some(range.parse().unwrap()),
            kubernetes: None,
        }
    }

    #[test]
    fn imports_follow_the_catalog_with_stable_addresses_and_locality_order() {
        let me = member("us-east", "us", true);
        let near = member("us-west", "us", true);
        let far = member("eu-west", "eu", true);
        let down = member("ap-south", "ap", false);
        let view = View {
            members: vec![me.clone(), near.clone(), far.clone(), down.clone()],
            services: vec![
                entry(&me, "own", &["*"]),
                entry(&far, "web", &["*"]),
                entry(&near, "web", &["*"]),
                entry(&down, "web", &["*"]),
                entry(&far, "secret", &["ap-south"]),
            ],
            ..Default::default()
        };
        let local = local(&me, "127.0.10.0/29");
        let range = local.import_range.unwrap();
        let mut alloc = Allocation::default();
        let (imports, _) = desired_imports(
            &local,
            &view,
            &Placement::default(),
            &BTreeMap::new(),
            &mut alloc,
        );
        assert_eq!(
            imports.len(),
            1,
            "own and not-exported-to-us services are not imported"
        );
        let web = &imports[0];
        assert_eq!(
            web.clusters,
            vec!["us-west", "eu-west", "ap-south"],
            "alive first, same region first"
        );
        assert!(range.contains(&web.address));
        let (again, _) = desired_imports(
            &local,
            &view,
            &Placement::default(),
            &BTreeMap::new(),
            &mut alloc,
        );
        assert_eq!(again[0].address, web.address, "address is stable");
        let gone = View {
            members: view.members.clone(),
            services: vec![],
            ..Default::default()
        };
        assert!(
            desired_imports(
                &local,
                &gone,
                &Placement::default(),
                &BTreeMap::new(),
                &mut alloc
            )
            .0
            .is_empty()
        );
        assert!(
            alloc.addresses.is_empty(),
            "a withdrawn service frees its address"
        );
    }

    #[test]
    fn discovered_imports_never_take_a_configured_address() {
        let range: IpNet = "127.0.10.0/30".parse().unwrap();
        let reserved: IpAddr = "127.0.10.1".parse().unwrap();
        let mut alloc = Allocation::default();
        assert_eq!(
            alloc.allocate(range, "x/a", &[reserved]),
            Some("127.0.10.2".parse().unwrap())
        );
        assert_eq!(alloc.allocate(range, "x/b", &[reserved]), None);
    }

    #[test]
    fn addresses_do_not_collide() {
        let range: IpNet = "127.0.10.0/30".parse().unwrap();
        let mut alloc = Allocation::default();
        let a = alloc.allocate(range, "x/a", &[]).unwrap();
        let b = alloc.allocate(range, "x/b", &[]).unwrap();
        assert_ne!(a, b);
        assert_eq!(
            alloc.allocate(range, "x/c", &[]),
            None,
            "a /30 has two hosts"
        );
    }

    #[test]
    fn peers_are_members_plus_configured() {
        let me = member("us-east", "us", true);
        let mut gone = member("old", "us", false);
        gone.expired = true;
        let view = View {
            members: vec![me.clone(), member("eu-west", "eu", false), gone],
            services: vec![],
            ..Default::default()
        };
        let fixed = PeerTarget::single("static", "127.0.0.1:9".parse().unwrap());
        let peers = desired_peers(std::slice::from_ref(&fixed), &view, "us-east");
        let names: Vec<_> = peers.iter().map(|p| p.cluster.as_str()).collect();
        assert_eq!(
            names,
            vec!["eu-west", "static"],
            "suspected members stay, expired ones and self do not"
        );
    }

    #[test]
    fn a_cluster_with_replicas_is_one_peer_per_live_replica() {
        let me = member("us-east", "us", true);
        let eu = member("eu-west", "eu", true);
        let replica = |cluster: &str, name: &str, port: u16, alive: bool, draining: bool| {
            let mut info = member(cluster, "eu", true).info;
            info.tunnel_addr.set_port(port);
            ReplicaView {
                replica: name.into(),
                info,
                draining,
                alive,
                last_heard: Duration::ZERO,
            }
        };
        let view = View {
            members: vec![me.clone(), eu, member("ap-south", "ap", true)],
            replicas: vec![
                replica("eu-west", "eu-1", 7001, true, false),
                replica("eu-west", "eu-2", 7002, true, true),
                replica("eu-west", "eu-3", 7003, false, false),
                // This cluster's own siblings are no peers: their services are local.
                replica("us-east", "us-2", 7004, true, false),
            ],
            ..Default::default()
        };
        let peers = desired_peers(&[], &view, "us-east");
        let got: Vec<(String, u16, bool)> = peers
            .iter()
            .map(|p| (p.name(), p.address.port(), p.draining))
            .collect();
        assert_eq!(
            got,
            vec![
                ("ap-south".to_owned(), 1, false),
                ("eu-west/eu-1".to_owned(), 7001, false),
                ("eu-west/eu-2".to_owned(), 7002, true),
            ],
            "live replica records (draining ones marked), expired ones dropped"
        );
        // A peer configured by hand replaces what discovery says of its cluster.
        let fixed = PeerTarget::single("eu-west", "127.0.0.1:9".parse().unwrap());
        let peers = desired_peers(std::slice::from_ref(&fixed), &view, "us-east");
        assert_eq!(peers.iter().filter(|p| p.cluster == "eu-west").count(), 1);
        assert!(peers.contains(&fixed));
        // Replicas behind one load balancer address are one tunnel, draining only when
        // all of them are.
        let shared = View {
            replicas: vec![
                replica("eu-west", "eu-1", 7001, true, true),
                replica("eu-west", "eu-2", 7001, true, false),
            ],
            ..view.clone()
        };
        let peers = desired_peers(&[], &shared, "us-east");
        let eu: Vec<&PeerTarget> = peers.iter().filter(|p| p.cluster == "eu-west").collect();
        assert_eq!(eu.len(), 1, "{peers:?}");
        assert!(!eu[0].draining);
    }

    #[test]
    fn a_port_recorded_for_two_imports_counts_for_one_and_unrecorded_ports_wait_for_the_writer() {
        use strait_kubernetes::imports::Placed;
        let placed = |port: u16| Placed {
            ports: BTreeMap::from([(80, port)]),
            cluster_ip: None,
        };
        let range = PortRange {
            first: 20_000,
            last: 20_099,
        };
        let mut placement = Placement {
            // `shop/b` was edited by hand onto `shop/a`'s port; `shop/c` lies outside the range.
            records: BTreeMap::from([
                ("shop/a".to_owned(), placed(20_001)),
                ("shop/b".to_owned(), placed(20_001)),
                ("shop/c".to_owned(), placed(30_000)),
            ]),
            allocate: false,
        };
        let recorded = recorded_ports(&placement, range);
        assert_eq!(recorded.get(&("shop/a", 80)), Some(&20_001));
        assert_eq!(recorded.get(&("shop/b", 80)), None);
        assert_eq!(recorded.get(&("shop/c", 80)), None);

        let mut alloc = Allocation::default();
        assert_eq!(
            alloc.allocate_port(range, "shop/a", 80, &placement),
            Some(20_001)
        );
        assert_eq!(
            alloc.allocate_port(range, "shop/b", 80, &placement),
            None,
            "a replica that does not write waits for the record"
        );
        placement.allocate = true;
        let b = alloc
            .allocate_port(range, "shop/b", 80, &placement)
            .unwrap();
        assert!(
            range.contains(b) && b != 20_001,
            "the writer gives b a port of its own: {b}"
        );
    }
}
