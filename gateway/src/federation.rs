//! What the gateway takes from discovery: the federated catalog decides which peers it keeps
//! tunnels to and which imported services get listeners; the local export source decides
//! what it serves. The mapping is pure (tested below); `follow` applies it as things change.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use strait_common::config::{Import, ImportPort, Peer};
use strait_discovery::model::MemberInfo;
use strait_discovery::node::{Node, View};
use strait_discovery::source::{ExportSource, to_catalog};

use crate::gateway::Shared;

/// Peers to keep: the configured ones, plus every member of the federation whose lease
/// holds (suspected members are kept: their connection retries until the lease ends).
pub fn desired_peers(configured: &[Peer], view: &View, me: &str) -> Vec<Peer> {
    let mut out: BTreeMap<String, Peer> = view
        .members
        .iter()
        .filter(|m| m.info.cluster != me && !m.expired)
        .map(|m| {
            (
                m.info.cluster.clone(),
                Peer {
                    cluster: m.info.cluster.clone(),
                    address: m.info.tunnel_addr,
                },
            )
        })
        .collect();
    for p in configured {
        out.insert(p.cluster.clone(), p.clone());
    }
    out.into_values().collect()
}

/// Imports: the configured ones, plus every service another cluster exports to this one,
/// on an address from `range` that stays the same while the service exists. Clusters are
/// ordered alive first, then same region, then by id.
///
/// A headless service gets no shared address: each endpoint of each origin cluster gets
/// its own import (and address), reaching exactly that endpoint.
pub fn desired_imports(
    configured: &[Import],
    view: &View,
    me: &MemberInfo,
    range: IpNet,
    allocated: &mut BTreeMap<String, IpAddr>,
) -> Vec<Import> {
    let alive: BTreeMap<&str, bool> = view
        .members
        .iter()
        .map(|m| (m.info.cluster.as_str(), m.alive))
        .collect();
    let mut found: BTreeMap<(String, String), Offers> = BTreeMap::new();
    for e in &view.services {
        if e.origin.cluster == me.cluster || !e.service.exported_to(&me.cluster) {
            continue;
        }
        let slot = found
            .entry((e.key.namespace.clone(), e.key.name.clone()))
            .or_default();
        for p in &e.service.ports {
            slot.ports.entry(p.port).or_insert_with(|| p.name.clone());
        }
        slot.headless |= e.service.headless;
        slot.origins.push((&e.origin, &e.service));
    }
    // Configured imports keep their addresses; discovered ones never take them.
    let reserved: Vec<IpAddr> = configured.iter().map(|i| i.address).collect();
    let fixed: Vec<(String, String)> = configured
        .iter()
        .map(|i| (i.namespace.clone(), i.name.clone()))
        .collect();
    let mut wanted: Vec<Wanted> = Vec::new();
    for (
        (namespace, name),
        Offers {
            ports,
            mut origins,
            headless,
        },
    ) in found
    {
        if fixed.contains(&(namespace.clone(), name.clone())) {
            continue;
        }
        origins.sort_by_key(|(m, _)| {
            (
                !alive.get(m.cluster.as_str()).copied().unwrap_or(false),
                m.region != me.region,
                m.cluster.clone(),
            )
        });
        let ports: Vec<ImportPort> = ports
            .into_iter()
            .map(|(port, name)| ImportPort {
                name,
                port,
                listen_port: None,
            })
            .collect();
        let base = format!("{namespace}/{name}");
        if headless {
            for (origin, service) in &origins {
                for ep in &service.endpoints {
                    wanted.push(Wanted {
                        key: endpoint_key(&base, &origin.cluster, ep.address),
                        namespace: namespace.clone(),
                        name: name.clone(),
                        ports: ports.clone(),
                        clusters: vec![origin.cluster.clone()],
                        endpoint: Some(ep.address),
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
            });
        }
    }
    allocated.retain(|k, _| wanted.iter().any(|w| w.key == *k));
    let mut out: Vec<Import> = configured.to_vec();
    for w in wanted {
        let Some(address) = allocate(range, &w.key, allocated, &reserved) else {
            tracing::warn!(service = %w.key, %range, "no free import address; widen discovery.import_addresses");
            continue;
        };
        out.push(Import {
            name: w.name,
            namespace: w.namespace,
            address,
            ports: w.ports,
            clusters: w.clusters,
            endpoint: w.endpoint,
        });
    }
    out
}

/// The allocation key of one headless endpoint: `ns/name@cluster/address`.
pub fn endpoint_key(service: &str, cluster: &str, address: IpAddr) -> String {
    format!("{service}@{cluster}/{address}")
}

/// What the federation offers of one service: the union of its ports, and its origins.
#[derive(Default)]
struct Offers<'a> {
    ports: BTreeMap<u16, String>,
    origins: Vec<(&'a MemberInfo, &'a strait_discovery::model::Service)>,
    headless: bool,
}

/// One import to allocate an address for.
struct Wanted {
    key: String,
    namespace: String,
    name: String,
    ports: Vec<ImportPort>,
    clusters: Vec<String>,
    endpoint: Option<IpAddr>,
}

/// A stable address for `key` in `range`: its previous one, else the first free host
/// starting from a hash of the name (so restarts tend to give the same address).
fn allocate(
    range: IpNet,
    key: &str,
    allocated: &mut BTreeMap<String, IpAddr>,
    reserved: &[IpAddr],
) -> Option<IpAddr> {
    if let Some(a) = allocated.get(key) {
        return Some(*a);
    }
    let hosts: Vec<IpAddr> = range.hosts().take(65_536).collect();
    if hosts.is_empty() {
        return None;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    let start = (h.finish() % hosts.len() as u64) as usize;
    let taken: Vec<IpAddr> = allocated
        .values()
        .copied()
        .chain(reserved.iter().copied())
        .collect();
    let free = (0..hosts.len())
        .map(|i| hosts[(start + i) % hosts.len()])
        .find(|a| !taken.contains(a))?;
    allocated.insert(key.to_owned(), free);
    Some(free)
}

/// Applies export changes and catalog changes until the gateway stops.
pub async fn follow(
    shared: Arc<Shared>,
    node: Arc<Node>,
    source: Box<dyn ExportSource>,
    range: IpNet,
) {
    let mut exports = source.watch();
    let mut view = node.subscribe();
    let mut faults = shared.faults.subscribe();
    let mut allocated = BTreeMap::new();
    let me = node.view().members.first().map(|m| m.info.clone());
    let Some(me) = me else { return };
    loop {
        let current = exports.borrow_and_update().clone();
        shared.exports.store(current.clone());
        let mut catalog = to_catalog(&current, &shared.config.zone);
        crate::faults::shape_catalog(&faults.borrow_and_update(), &mut catalog);
        node.set_local(catalog);
        let v = view.borrow_and_update().clone();
        shared
            .routing
            .set_catalog(crate::routing::CatalogView::from_view(&v));
        shared.peers.reconcile(
            &shared,
            &desired_peers(&shared.config.peers, &v, &me.cluster),
        );
        let imports = desired_imports(&shared.config.imports, &v, &me, range, &mut allocated);
        let errors = shared.listeners.reconcile(&shared, &imports).await;
        shared.dns.update(&crate::dns::entries(
            &imports,
            Some(&v),
            &me.cluster,
            &me.region,
        ));
        for e in &errors {
            tracing::error!(error = %e, "listener not opened; retrying");
        }
        // A listener that could not bind (address still in use, say) is retried on a timer
        // rather than waiting for the next catalog change, which may never come.
        let retry = !errors.is_empty();
        tokio::select! {
            r = exports.changed() => if r.is_err() { return },
            r = view.changed() => if r.is_err() { return },
            r = faults.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use strait_discovery::model::{Port, Service, ServiceKey};
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
            },
            version: 1,
            lease_age: Duration::ZERO,
            origin_alive: origin.alive,
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
        };
        let range: IpNet = "127.0.10.0/29".parse().unwrap();
        let mut alloc = BTreeMap::new();
        let imports = desired_imports(&[], &view, &me.info, range, &mut alloc);
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
        let again = desired_imports(&[], &view, &me.info, range, &mut alloc);
        assert_eq!(again[0].address, web.address, "address is stable");
        let gone = View {
            members: view.members.clone(),
            services: vec![],
        };
        assert!(desired_imports(&[], &gone, &me.info, range, &mut alloc).is_empty());
        assert!(alloc.is_empty(), "a withdrawn service frees its address");
    }

    #[test]
    fn discovered_imports_never_take_a_configured_address() {
        let range: IpNet = "127.0.10.0/30".parse().unwrap();
        let reserved: IpAddr = "127.0.10.1".parse().unwrap();
        let mut alloc = BTreeMap::new();
        assert_eq!(
            allocate(range, "x/a", &mut alloc, &[reserved]),
            Some("127.0.10.2".parse().unwrap())
        );
        assert_eq!(allocate(range, "x/b", &mut alloc, &[reserved]), None);
    }

    #[test]
    fn addresses_do_not_collide() {
        let range: IpNet = "127.0.10.0/30".parse().unwrap();
        let mut alloc = BTreeMap::new();
        let a = allocate(range, "x/a", &mut alloc, &[]).unwrap();
        let b = allocate(range, "x/b", &mut alloc, &[]).unwrap();
        assert_ne!(a, b);
        assert_eq!(
            allocate(range, "x/c", &mut alloc, &[]),
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
        };
        let fixed = Peer {
            cluster: "static".into(),
            address: "127.0.0.1:9".parse().unwrap(),
        };
        let peers = desired_peers(std::slice::from_ref(&fixed), &view, "us-east");
        let names: Vec<_> = peers.iter().map(|p| p.cluster.as_str()).collect();
        assert_eq!(
            names,
            vec!["eu-west", "static"],
            "suspected members stay, expired ones and self do not"
        );
    }
}
