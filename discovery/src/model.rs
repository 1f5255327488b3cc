//! The federated catalog's data model: services keyed by namespace/name, published by the
//! cluster that owns them, with the origin gateway's addresses and locality.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

pub use strait_common::config::Selection;

/// A service's identity in the federation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ServiceKey {
    /// A key from namespace and name.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of a service as the federation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Port name (SRV records use it).
    pub name: String,
    /// The service port clients use.
    pub port: u16,
    /// Transport protocol (`TCP`).
    pub protocol: String,
}

/// One backend of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Address inside the origin cluster.
    pub address: IpAddr,
    /// Stable hostname, if any.
    pub hostname: Option<String>,
    /// Whether it takes traffic.
    pub ready: bool,
    /// Zone it runs in.
    pub zone: String,
}

/// A service as exported by its origin cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Ports.
    pub ports: Vec<Port>,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Clusters allowed to import it (`*` = all).
    pub export_to: Vec<String>,
    /// Relative weight of this cluster for the service (canaries).
    pub weight: u32,
    /// No ClusterSetIP: DNS names each ready endpoint (Kubernetes headless Service).
    pub headless: bool,
    /// Client-IP session affinity timeout (seconds), when the service has affinity.
    pub session_affinity: Option<u32>,
    /// When the origin started exporting it (Unix ms; 0 unknown): the oldest export wins
    /// conflicts between clusters.
    pub exported_at_ms: i64,
    /// KEP-5939 cluster selection: the export's selectors and the origin's properties.
    pub selection: Selection,
}

impl Service {
    /// Whether `cluster` may import the service.
    pub fn exported_to(&self, cluster: &str) -> bool {
        self.export_to.iter().any(|c| c == "*" || c == cluster)
    }

    /// Ready endpoints.
    pub fn ready_endpoints(&self) -> usize {
        self.endpoints.iter().filter(|e| e.ready).count()
    }

    /// Rough encoded size, used to keep gossip messages within their byte budget.
    pub fn estimated_size(&self) -> usize {
        16 + self
            .ports
            .iter()
            .map(|p| 8 + p.name.len() + p.protocol.len())
            .sum::<usize>()
            + self
                .endpoints
                .iter()
                .map(|e| 24 + e.hostname.as_ref().map_or(0, String::len) + e.zone.len())
                .sum::<usize>()
            + self.export_to.iter().map(|c| 2 + c.len()).sum::<usize>()
    }
}

/// One service as the clusterset sees it when several clusters export it, by the MCS
/// API's conflict resolution (KEP-1645): the oldest export decides the type, the session
/// affinity and a port's definition; ports are the union of the exports' ports. Each
/// property on which the exports disagree is a conflict, reported on every export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// The union of the ports (a name or number defined differently: the oldest's).
    pub ports: Vec<Port>,
    /// Headless, as the oldest export says.
    pub headless: bool,
    /// Session affinity, as the oldest export says.
    pub session_affinity: Option<u32>,
    /// KEP-5939 cluster selectors, as the oldest export says.
    pub selectors: Vec<std::collections::BTreeMap<String, String>>,
    /// The cluster whose export is the oldest.
    pub oldest: String,
    /// MCS `Conflict` reasons (`PortConflict`, `TypeConflict`, `SessionAffinityConflict`,
    /// `SessionAffinityConfigConflict`); empty when the exports agree.
    pub conflicts: Vec<&'static str>,
}

/// Resolves the exports of one service by (cluster, service). An unknown export time
/// counts as newer than every known one; equal times go by cluster id.
pub fn resolve<'a>(exports: impl IntoIterator<Item = (&'a str, &'a Service)>) -> Resolved {
    let mut exports: Vec<(&str, &Service)> = exports.into_iter().collect();
    exports.sort_by_key(|(cluster, s)| (s.exported_at_ms == 0, s.exported_at_ms, *cluster));
    let Some((oldest, first)) = exports.first().copied() else {
        return Resolved::default();
    };
    let mut out = Resolved {
        ports: Vec::new(),
        headless: first.headless,
        session_affinity: first.session_affinity,
        selectors: first.selection.selectors.clone(),
        oldest: oldest.to_owned(),
        conflicts: Vec::new(),
    };
    let conflict = |reason: &'static str, out: &mut Vec<&'static str>| {
        if !out.contains(&reason) {
            out.push(reason);
        }
    };
    for (_, s) in &exports {
        if s.headless != first.headless {
            conflict("TypeConflict", &mut out.conflicts);
        }
        match (s.session_affinity, first.session_affinity) {
            (Some(a), Some(b)) if a != b => {
                conflict("SessionAffinityConfigConflict", &mut out.conflicts)
            }
            (Some(_), None) | (None, Some(_)) => {
                conflict("SessionAffinityConflict", &mut out.conflicts)
            }
            _ => {}
        }
        // Compared with older exports' ports only: an export's own list is its own.
        let older = out.ports.len();
        for p in &s.ports {
            let same_name = out.ports[..older].iter().find(|q| q.name == p.name);
            let same_number = out.ports[..older].iter().find(|q| q.port == p.port);
            match (same_name, same_number) {
                (None, None) => out.ports.push(p.clone()),
                (Some(q), _) | (None, Some(q)) if q != p => {
                    conflict("PortConflict", &mut out.conflicts)
                }
                _ => {}
            }
        }
    }
    out.ports.sort_by_key(|p| p.port);
    out
}

/// Who a member is and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// Cluster id.
    pub cluster: String,
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// QUIC tunnel address for traffic.
    pub tunnel_addr: SocketAddr,
    /// gRPC address for discovery.
    pub gossip_addr: SocketAddr,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(
        at_ms: i64,
        ports: &[(&str, u16)],
        headless: bool,
        affinity: Option<u32>,
    ) -> Service {
        Service {
            ports: ports
                .iter()
                .map(|(name, port)| Port {
                    name: (*name).into(),
                    port: *port,
                    protocol: "TCP".into(),
                })
                .collect(),
            endpoints: vec![],
            export_to: vec!["*".into()],
            weight: 1,
            headless,
            session_affinity: affinity,
            exported_at_ms: at_ms,
            selection: Selection::default(),
        }
    }

    fn names(r: &Resolved) -> Vec<(String, u16)> {
        r.ports.iter().map(|p| (p.name.clone(), p.port)).collect()
    }

    #[test]
    fn exports_that_agree_resolve_to_the_union_without_conflict() {
        let a = service(1_000, &[("http", 80)], false, None);
        let b = service(2_000, &[("http", 80), ("grpc", 90)], false, None);
        let r = resolve([("a", &a), ("b", &b)]);
        assert!(r.conflicts.is_empty(), "{:?}", r.conflicts);
        assert_eq!(names(&r), [("http".into(), 80), ("grpc".into(), 90)]);
    }

    #[test]
    fn the_oldest_export_decides_whatever_the_cluster_ids_say() {
        // `z` exported first: it wins although it sorts last.
        let z = service(1_000, &[("http", 80)], true, Some(60));
        let a = service(5_000, &[("http", 81), ("admin", 80)], false, None);
        let r = resolve([("a", &a), ("z", &z)]);
        assert_eq!(r.oldest, "z");
        assert!(r.headless);
        assert_eq!(r.session_affinity, Some(60));
        assert_eq!(
            names(&r),
            [("http".into(), 80)],
            "a's `http` and its port 80 lose to z's"
        );
        assert_eq!(
            r.conflicts,
            ["TypeConflict", "SessionAffinityConflict", "PortConflict"]
        );
    }

    #[test]
    fn an_unknown_export_time_counts_as_newest_and_ties_go_by_cluster_id() {
        let unknown = service(0, &[("http", 80)], false, Some(10));
        let known = service(9_000, &[("http", 80)], false, Some(20));
        let r = resolve([("a", &unknown), ("b", &known)]);
        assert_eq!((r.oldest.as_str(), r.session_affinity), ("b", Some(20)));
        assert_eq!(r.conflicts, ["SessionAffinityConfigConflict"]);
        let tie = resolve([("b", &known), ("a", &known)]);
        assert_eq!(tie.oldest, "a");
    }
}
