use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use strait_common::config::{Endpoint, Export, Protocol, ServicePort};
use strait_discovery::model::{MemberInfo, Port, Service, ServiceKey};
use strait_discovery::node::View;
use strait_discovery::state::{CatalogEntry, MemberView, OriginDigest};

use super::dns::Kind;
use super::*;

const ME: &str = "here";
const MY_REGION: &str = "r0";

fn tunnel(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 1, 0, i as u8 + 1)), 7400)
}

fn member(cluster: &str, region: &str, tunnel_addr: SocketAddr) -> MemberView {
    MemberView {
        info: MemberInfo {
            cluster: cluster.into(),
            region: region.into(),
            zone: String::new(),
            tunnel_addr,
            gossip_addr: "127.0.0.1:1".parse().unwrap(),
        },
        alive: true,
        expired: false,
        phi: 0.0,
        last_heard: Duration::ZERO,
        digest: OriginDigest::default(),
        services: 0,
    }
}

/// This cluster with nothing configured, importing what discovery offers on 127.9.0.0/24.
fn discovering() -> Local {
    Local {
        cluster: ME.into(),
        region: MY_REGION.into(),
        zone: String::new(),
        peers: vec![],
        imports: vec![],
        import_range: Some("127.9.0.0/24".parse().unwrap()),
        kubernetes: None,
    }
}

fn export(name: &str, headless: bool) -> Export {
    Export {
        name: name.into(),
        namespace: "shop".into(),
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            target_port: Some(8080),
            protocol: Protocol::default(),
        }],
        endpoints: vec![Endpoint {
            address: "10.0.0.1".parse().unwrap(),
            hostname: None,
            ready: true,
        }],
        export_to: vec!["*".into()],
        weight: 1,
        headless,
        session_affinity: None,
        exported_at_ms: 0,
        selection: Default::default(),
    }
}

/// A generated service: name, ports (number, name), and the clusters exporting it.
type Offered = (String, Vec<(u16, String)>, Vec<usize>);

/// One generated federation: remote clusters (with regions), the services they export,
/// and this cluster's own exports.
#[derive(Debug, Clone)]
struct Federation {
    clusters: Vec<(String, String)>,
    services: Vec<Offered>,
    exports: Vec<String>,
}

fn federation() -> impl Strategy<Value = Federation> {
    (1usize..5).prop_flat_map(|n| {
        let clusters = prop::collection::vec(0usize..3, n).prop_map(|regions| {
            regions
                .into_iter()
                .enumerate()
                .map(|(i, r)| (format!("c{i}"), format!("r{r}")))
                .collect::<Vec<_>>()
        });
        let service = (
            prop::collection::btree_map(1u16..100, "[a-z]{1,4}", 1..3),
            prop::collection::btree_set(0..n, 1..=n),
        );
        let services = prop::collection::vec(service, 0..5).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (ports, origins))| {
                    (
                        format!("s{i}"),
                        ports.into_iter().collect(),
                        origins.into_iter().collect(),
                    )
                })
                .collect::<Vec<_>>()
        });
        let exports = prop::collection::vec("[a-z]{1,6}", 0..3);
        (clusters, services, exports).prop_map(|(clusters, services, exports)| Federation {
            clusters,
            services,
            exports,
        })
    })
}

impl Federation {
    /// The import address of service `i`.
    fn address(i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 9, 0, i as u8 + 1))
    }

    /// The order discovery tries origins in: same region first, then by id (all alive).
    fn order(&self, origins: &[usize]) -> Vec<String> {
        let mut o: Vec<&(String, String)> = origins.iter().map(|&i| &self.clusters[i]).collect();
        o.sort_by_key(|(c, r)| (r != MY_REGION, c.clone()));
        o.into_iter().map(|(c, _)| c.clone()).collect()
    }

    fn exports(&self) -> Arc<Vec<Export>> {
        Arc::new(self.exports.iter().map(|n| export(n, false)).collect())
    }

    /// The same federation written as a static config: peers and imports by hand.
    fn statically(&self) -> Local {
        Local {
            cluster: ME.into(),
            region: MY_REGION.into(),
            zone: String::new(),
            peers: self
                .clusters
                .iter()
                .enumerate()
                .map(|(i, (c, _))| PeerTarget::single(c, tunnel(i)))
                .collect(),
            imports: self
                .services
                .iter()
                .enumerate()
                .map(|(i, (name, ports, origins))| Import {
                    namespace: "shop".into(),
                    name: name.clone(),
                    address: Self::address(i),
                    listen_on: Self::address(i),
                    ports: ports
                        .iter()
                        .map(|(port, name)| ImportPort {
                            name: name.clone(),
                            port: *port,
                            listen: *port,
                        })
                        .collect(),
                    clusters: self.order(origins),
                    endpoint: None,
                    session_affinity: None,
                })
                .collect(),
            import_range: None,
            kubernetes: None,
        }
    }

    /// The same federation as discovery sees it, with every service already given the
    /// address the static config gives it.
    fn discovered(&self) -> (Local, View, Allocation) {
        let local = discovering();
        let mut members = vec![member(ME, MY_REGION, "127.0.0.1:7400".parse().unwrap())];
        members.extend(
            self.clusters
                .iter()
                .enumerate()
                .map(|(i, (c, r))| member(c, r, tunnel(i))),
        );
        let mut services = Vec::new();
        let mut alloc = Allocation::default();
        for (i, (name, ports, origins)) in self.services.iter().enumerate() {
            alloc = alloc.with(&format!("shop/{name}"), Self::address(i));
            for &o in origins {
                services.push(CatalogEntry {
                    origin: members[o + 1].info.clone(),
                    key: ServiceKey::new("shop", name),
                    service: Service {
                        ports: ports
                            .iter()
                            .map(|(port, name)| Port {
                                name: name.clone(),
                                port: *port,
                                protocol: "TCP".into(),
                            })
                            .collect(),
                        endpoints: vec![],
                        export_to: vec![ME.into()],
                        weight: 1,
                        headless: false,
                        session_affinity: None,
                        exported_at_ms: 0,
                        selection: Default::default(),
                    },
                    version: 1,
                    lease_age: Duration::ZERO,
                    origin_alive: true,
                });
            }
        }
        // This cluster's own exports are in the view too; they are never imported.
        for (key, service) in published(&self.exports(), "", &CatalogFaults::default()) {
            services.push(CatalogEntry {
                origin: members[0].info.clone(),
                key,
                service,
                version: 1,
                lease_age: Duration::ZERO,
                origin_alive: true,
            });
        }
        (
            local,
            View {
                members,
                services,
                ..Default::default()
            },
            alloc,
        )
    }
}

fn inputs<'a>(
    local: &'a Local,
    exports: &'a Arc<Vec<Export>>,
    routing: &'a Arc<RoutingConfig>,
    view: Option<&'a View>,
    faults: &'a CatalogFaults,
) -> Inputs<'a> {
    static NO_LIMITS: std::sync::LazyLock<Arc<strait_common::config::CallerLimits>> =
        std::sync::LazyLock::new(Arc::default);
    Inputs {
        local,
        exports,
        routing,
        limits: &NO_LIMITS,
        view,
        faults,
        placement: None,
        properties: None,
    }
}

proptest! {
    #[test]
    fn static_and_discovery_inputs_with_the_same_services_give_the_same_desired_state(
        fed in federation()
    ) {
        let exports = fed.exports();
        let routing = Arc::new(RoutingConfig::default());
        let faults = CatalogFaults::default();

        let local = fed.statically();
        let mut none = Allocation::default();
        let from_config = compute(&inputs(&local, &exports, &routing, None, &faults), &mut none);

        let (local, view, mut alloc) = fed.discovered();
        let from_view = compute(&inputs(&local, &exports, &routing, Some(&view), &faults), &mut alloc);

        prop_assert_eq!(&from_config.peers, &from_view.peers);
        prop_assert_eq!(&from_config.imports, &from_view.imports);
        prop_assert_eq!(&from_config.dns, &from_view.dns);
        prop_assert_eq!(&from_config.published, &from_view.published);
        prop_assert_eq!(&from_config.exports, &from_view.exports);
        prop_assert_eq!(&from_config.routing, &from_view.routing);
        prop_assert_eq!(from_config.services(), from_view.services());
        // Only discovery knows each cluster's locality and offers.
        prop_assert_eq!(&from_config.catalog, &CatalogView::default());
        for (name, _, origins) in &fed.services {
            prop_assert_eq!(from_view.catalog.offers[&format!("shop/{name}")].len(), origins.len());
        }
        prop_assert_eq!(alloc.len(), fed.services.len(), "every address kept");
    }
}

#[test]
fn catalog_faults_shape_what_is_published_but_not_what_is_served() {
    let local = Local {
        cluster: ME.into(),
        region: MY_REGION.into(),
        zone: "z".into(),
        peers: vec![],
        imports: vec![],
        import_range: None,
        kubernetes: None,
    };
    let exports = Arc::new(vec![export("web", false), export("db", false)]);
    let routing = Arc::new(RoutingConfig::default());
    let faults = CatalogFaults {
        drain: false,
        unready: ["shop/db".to_owned()].into(),
    };
    let d = compute(
        &inputs(&local, &exports, &routing, None, &faults),
        &mut Allocation::default(),
    );
    let ready = |name: &str| d.published[&ServiceKey::new("shop", name)].ready_endpoints();
    assert_eq!(ready("web"), 1);
    assert_eq!(
        ready("db"),
        0,
        "published unready, so peers route elsewhere"
    );
    assert!(
        d.exports.iter().find(|e| e.name == "db").unwrap().endpoints[0].ready,
        "connections that still arrive are served"
    );
    assert_eq!(
        d.published[&ServiceKey::new("shop", "web")].endpoints[0].zone,
        "z"
    );
}

#[test]
fn headless_endpoints_are_imports_of_their_own_and_routing_sees_every_cluster() {
    let here = member(ME, MY_REGION, "127.0.0.1:7400".parse().unwrap());
    let near = member("near", MY_REGION, tunnel(1));
    let far = member("far", "r9", tunnel(2));
    let pods = |origin: &MemberView, last: u8| CatalogEntry {
        origin: origin.info.clone(),
        key: ServiceKey::new("shop", "pods"),
        service: Service {
            ports: vec![Port {
                name: "http".into(),
                port: 80,
                protocol: "TCP".into(),
            }],
            endpoints: vec![strait_discovery::model::Endpoint {
                address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)),
                hostname: Some(format!("pod-{last}")),
                ready: true,
                zone: String::new(),
            }],
            export_to: vec!["*".into()],
            weight: 1,
            headless: true,
            session_affinity: None,
            exported_at_ms: 0,
            selection: Default::default(),
        },
        version: 1,
        lease_age: Duration::ZERO,
        origin_alive: true,
    };
    let view = View {
        members: vec![here, near.clone(), far.clone()],
        services: vec![pods(&far, 2), pods(&near, 1)],
        ..Default::default()
    };
    let local = discovering();
    let d = compute(
        &inputs(
            &local,
            &Arc::new(vec![]),
            &Arc::new(RoutingConfig::default()),
            Some(&view),
            &CatalogFaults::default(),
        ),
        &mut Allocation::default(),
    );
    assert_eq!(d.imports.len(), 2, "one import per remote endpoint");
    assert_ne!(d.imports[0].address, d.imports[1].address);
    assert!(
        d.imports
            .iter()
            .all(|i| i.endpoint.is_some() && i.clusters.len() == 1)
    );
    assert_eq!(
        d.services()["shop/pods"],
        vec!["near".to_owned(), "far".to_owned()],
        "routing knows both clusters, nearest first"
    );
    let entry = d.dns.iter().find(|e| e.name == "pods").unwrap();
    let Kind::Headless(endpoints) = &entry.kind else {
        panic!("headless service answered as {:?}", entry.kind)
    };
    let priorities: BTreeMap<&str, u16> = endpoints
        .iter()
        .map(|e| (e.cluster.as_str(), e.priority))
        .collect();
    assert_eq!(priorities, [("far", 2), ("near", 1)].into());
}
