//! What DNS answers, from the imports in force and the catalog.

use std::collections::BTreeMap;
use std::net::IpAddr;

use strait_discovery::node::View;

use super::Import;
use crate::dns::zone::{self, EndpointEntry, Kind, PortEntry, ServiceEntry};

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
                port: p.listen,
                protocol: "tcp".into(),
            })
            .collect()
    };
    for imp in imports {
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
        _ => zone::address_label(address),
    }
}
