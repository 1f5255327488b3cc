//! What DNS answers, from the imports in force and the catalog: the entries that
//! `dns::zone` turns into records.

use std::collections::BTreeMap;
use std::net::IpAddr;

use strait_discovery::node::View;

use super::Import;

/// One service as DNS sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Ports; named ones get SRV records.
    pub ports: Vec<PortEntry>,
    /// ClusterSetIP or headless.
    pub kind: Kind,
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortEntry {
    /// Port name (the SRV `_<name>` label); unnamed ports get no SRV record.
    pub name: String,
    /// Port number clients connect to.
    pub port: u16,
    /// Protocol, lowercase (`tcp`).
    pub protocol: String,
}

/// How a service is addressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// One stable address; the gateway picks a healthy cluster per connection.
    ClusterSetIp(IpAddr),
    /// One address per ready endpoint of a live cluster (none → the name does not exist).
    Headless(Vec<EndpointEntry>),
}

/// One endpoint of a headless service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointEntry {
    /// Cluster id.
    pub cluster: String,
    /// Hostname label: the endpoint's hostname, else its address with dashes.
    pub label: String,
    /// The address clients use (local to this gateway for remote endpoints).
    pub address: IpAddr,
    /// SRV priority: locality order, lower is nearer (0 = this cluster).
    pub priority: u16,
}

/// The label of an endpoint without hostname: its address with dashes (`10-1-2-3`).
fn address_label(address: IpAddr) -> String {
    address.to_string().replace(['.', ':'], "-")
}

/// What DNS serves, from the imports in force and the catalog: a ClusterSetIP per imported
/// service, and for headless services every ready endpoint of a live cluster (this
/// cluster's own at their real addresses, remote ones at their local forwarding addresses),
/// with SRV priority by locality.
pub(super) fn entries(
    imports: &[Import],
    view: &View,
    cluster: &str,
    region: &str,
) -> Vec<ServiceEntry> {
    let (me, region_of_me) = (cluster, region);
    let mut out: BTreeMap<(String, String), ServiceEntry> = BTreeMap::new();
    let alive = |cluster: &str| {
        view.members
            .iter()
            .any(|m| m.info.cluster == cluster && m.alive && !m.expired)
    };
    let region = |cluster: &str| {
        view.members
            .iter()
            .find(|m| m.info.cluster == cluster)
            .map(|m| m.info.region.clone())
    };
    let ports = |imp: &Import| -> Vec<PortEntry> {
        imp.ports
            .iter()
            .map(|p| PortEntry {
                name: p.name.clone(),
                port: imp.client_port(p),
                protocol: "tcp".into(),
            })
            .collect()
    };
    for imp in imports {
        // In Kubernetes mode, until the derived Service has its cluster IP.
        if imp.address.is_unspecified() {
            continue;
        }
        let key = (imp.namespace.clone(), imp.name.clone());
        let Some(endpoint) = imp.endpoint else {
            out.insert(
                key,
                ServiceEntry {
                    namespace: imp.namespace.clone(),
                    name: imp.name.clone(),
                    ports: ports(imp),
                    kind: Kind::ClusterSetIp(imp.address),
                },
            );
            continue;
        };
        let entry = out.entry(key).or_insert_with(|| ServiceEntry {
            namespace: imp.namespace.clone(),
            name: imp.name.clone(),
            ports: ports(imp),
            kind: Kind::Headless(Vec::new()),
        });
        let Some(cluster) = imp.clusters.first() else {
            continue;
        };
        let found = view.services.iter().find_map(|e| {
            (e.origin.cluster == *cluster
                && e.key.namespace == imp.namespace
                && e.key.name == imp.name)
                .then(|| e.service.endpoints.iter().find(|ep| ep.address == endpoint))
                .flatten()
        });
        let Some(ep) = found else { continue };
        if !ep.ready || !alive(cluster) {
            continue;
        }
        if let Kind::Headless(list) = &mut entry.kind {
            list.push(EndpointEntry {
                cluster: cluster.clone(),
                label: label(ep.hostname.as_deref(), ep.address),
                address: imp.address,
                priority: if region(cluster).as_deref() == Some(region_of_me) {
                    1
                } else {
                    2
                },
            });
        }
    }
    // This cluster's own headless services: its ready endpoints, reachable directly.
    for e in &view.services {
        if e.origin.cluster != me || !e.service.headless {
            continue;
        }
        let entry = out
            .entry((e.key.namespace.clone(), e.key.name.clone()))
            .or_insert_with(|| ServiceEntry {
                namespace: e.key.namespace.clone(),
                name: e.key.name.clone(),
                ports: e
                    .service
                    .ports
                    .iter()
                    .map(|p| PortEntry {
                        name: p.name.clone(),
                        port: p.port,
                        protocol: p.protocol.to_ascii_lowercase(),
                    })
                    .collect(),
                kind: Kind::Headless(Vec::new()),
            });
        if let Kind::Headless(list) = &mut entry.kind {
            for ep in e.service.endpoints.iter().filter(|ep| ep.ready) {
                list.push(EndpointEntry {
                    cluster: me.to_owned(),
                    label: label(ep.hostname.as_deref(), ep.address),
                    address: ep.address,
                    priority: 0,
                });
            }
        }
    }
    out.into_values().collect()
}

/// An endpoint's DNS label: its hostname, else its address with dashes.
fn label(hostname: Option<&str>, address: IpAddr) -> String {
    match hostname {
        Some(h) if !h.is_empty() => h.to_ascii_lowercase(),
        _ => address_label(address),
    }
}
