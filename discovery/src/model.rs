//! The federated catalog's data model: services keyed by namespace/name, published by the
//! cluster that owns them, with the origin gateway's addresses and locality.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

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
