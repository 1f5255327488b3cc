//! The admin API's JSON model. The gateway's handlers serialize these types; `strait
//! status`, the drill runner and the tests read them back. Field names are the wire format:
//! renaming one is an API change. Durations are human strings (`"2s"`), as in the config.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Export;
use crate::config::routing::{Mode, RoutePolicy};
use crate::units::HumanDuration;

/// `GET /ready`: 200 while the gateway can serve, 503 once its certificate has expired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    /// Whether the gateway is ready.
    pub ready: bool,
    /// The certificate in use has expired.
    pub certificate_expired: bool,
    /// It drains (it is shutting down): load balancers should send it nothing new.
    #[serde(default)]
    pub draining: bool,
    /// Peers with an established tunnel.
    pub peers_up: usize,
    /// Peers known.
    pub peers: usize,
    /// Service listeners bound.
    pub listeners: usize,
    /// Its process id: a drill on the same host signals it (0 from an older gateway).
    #[serde(default)]
    pub pid: u32,
    /// Differs on every start (in one process, too): a restart is a new instance.
    #[serde(default)]
    pub instance: u64,
    /// Its replica name (`discovery.replica`), when it is one of its cluster's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// Kubernetes mode: the state of the API integration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesReady>,
}

/// `POST /v1/drain`: the drain begun (or already under way).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Draining {
    /// Always true once asked.
    pub draining: bool,
    /// This request started it (false: it was already draining).
    pub started: bool,
    /// Seconds the service listeners keep accepting.
    pub accept_for_seconds: f64,
    /// Longest the drain lasts (seconds); the gateway then exits.
    pub grace_seconds: f64,
}

/// The Kubernetes integration as `/ready` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesReady {
    /// Every watch has listed once.
    pub synced: bool,
    /// This replica writes (holds the Lease).
    pub leader: bool,
    /// The latest unresolved error talking to the API server.
    pub error: Option<String>,
}

/// Connection state of one peer's tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerStatus {
    /// A handshake is under way.
    Connecting,
    /// The tunnel connection is established.
    Up,
    /// The last attempt failed or the connection was lost; retrying with backoff.
    Down,
}

impl PeerStatus {
    /// The name, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerStatus::Connecting => "connecting",
            PeerStatus::Up => "up",
            PeerStatus::Down => "down",
        }
    }
}

/// RTT percentiles over the last minute.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RttSummary {
    /// Median, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, in milliseconds.
    pub p99_ms: f64,
    /// Samples behind the figures.
    pub samples: usize,
}

/// One peer in `GET /v1/peers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    /// Cluster id.
    pub cluster: String,
    /// Replica name, when the cluster runs several gateways (empty otherwise).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub replica: String,
    /// It is draining (its record or its connection said so): no new connections.
    #[serde(default)]
    pub draining: bool,
    /// Proxied connections open through it now.
    #[serde(default)]
    pub open_connections: usize,
    /// Tunnel address dialled.
    pub address: String,
    /// Tunnel state.
    pub status: PeerStatus,
    /// Seconds in this state.
    pub since_seconds: f64,
    /// Smoothed RTT while connected.
    pub rtt_ms: Option<f64>,
    /// Current path MTU (UDP payload bytes) of the tunnel connection.
    pub mtu: Option<u16>,
    /// Gateway liveness: answering probes (only an up, responsive peer gets connections).
    pub responsive: bool,
    /// RTT percentiles over the last minute.
    pub rtt: Option<RttSummary>,
    /// Successful handshakes so far.
    pub connects: u64,
    /// Why the last attempt or connection ended.
    pub last_error: Option<String>,
}

impl Peer {
    /// Whether it gets new connections now: up, answering probes, not draining.
    pub fn in_rotation(&self) -> bool {
        self.status == PeerStatus::Up && self.responsive && !self.draining
    }
}

/// One bound service listener (an import) in `GET /v1/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    /// `namespace/name` of the imported service.
    pub service: String,
    /// Service port.
    pub port: u16,
    /// Local address accepting connections.
    pub address: SocketAddr,
    /// Clusters tried, in order.
    pub clusters: Vec<String>,
    /// For one endpoint of a headless service: `cluster/address` of the only backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// `GET /v1/services`: what this gateway exports and imports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Services {
    /// This gateway's cluster id.
    pub cluster: String,
    /// This cluster's exports now.
    pub exports: Vec<Export>,
    /// Bound listeners.
    pub imports: Vec<Listener>,
}

/// `GET /v1/identity`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The certificate's SPIFFE ID.
    pub spiffe_id: String,
    /// Its serial number.
    pub serial: String,
    /// Its expiry (Unix seconds).
    pub not_after_unix: u64,
}

/// One discovery member in `GET /v1/members`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Cluster id.
    pub cluster: String,
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Heard from recently enough (phi below the threshold).
    pub alive: bool,
    /// Its lease ran out: its services are withdrawn.
    pub expired: bool,
    /// Suspicion level of the failure detector.
    pub phi: f64,
    /// Seconds since its last heartbeat.
    pub last_heard_seconds: f64,
    /// Incarnation (start time in ms).
    pub generation: u64,
    /// Highest entry version.
    pub version: u64,
    /// Services it exports.
    pub services: usize,
    /// Its tunnel address.
    pub tunnel_addr: String,
    /// Its gossip address.
    pub gossip_addr: String,
    /// Tunnel RTT from this gateway, when connected.
    pub rtt_ms: Option<f64>,
    /// Its clock minus this gateway's, in ms, as the last gossip exchange with it measured
    /// (to within half that exchange's round trip); absent until one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset_ms: Option<f64>,
    /// The offset is known to within this (half that exchange's round trip), in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_uncertainty_ms: Option<f64>,
}

/// One port of a catalog entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogPort {
    /// Port name.
    pub name: String,
    /// Service port.
    pub port: u16,
    /// Transport protocol.
    pub protocol: String,
}

/// One service of one origin in `GET /v1/catalog`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// `namespace/name`.
    pub service: String,
    /// The cluster exporting it.
    pub origin: String,
    /// That cluster's region.
    pub region: String,
    /// Entry version.
    pub version: u64,
    /// Seconds since the origin's lease was last renewed.
    pub lease_age_seconds: f64,
    /// The origin is alive.
    pub origin_alive: bool,
    /// Ports.
    pub ports: Vec<CatalogPort>,
    /// Ready endpoints.
    pub ready_endpoints: usize,
    /// All endpoints.
    pub endpoints: usize,
    /// Clusters allowed to import it.
    pub export_to: Vec<String>,
    /// Relative weight of the origin.
    pub weight: u32,
}

/// `GET /v1/routes/<ns>/<name>`: how one imported service routes now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    /// `namespace/name`.
    pub service: String,
    /// Ordering mode in force.
    pub mode: Mode,
    /// The cluster new connections go to first now (`null`: none usable).
    pub primary: Option<String>,
    /// Candidates, best first, with why each is in or out.
    pub clusters: Vec<RouteCluster>,
    /// The resolved policy.
    pub policy: RoutePolicy,
}

/// One candidate cluster in a [`Route`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteCluster {
    /// Cluster id.
    pub cluster: String,
    /// Locality tier (lower is preferred).
    pub tier: u32,
    /// Whether it takes new connections.
    pub eligible: bool,
    /// Why not, when it does not (`peer-down`, `no-ready-endpoints`, `ejected`,
    /// `recovering`, `saturated`).
    pub reason: Option<String>,
    /// Human detail for the reason.
    pub detail: Option<String>,
    /// Share of its traffic while ramping up after a recovery (1 = full).
    pub share: f64,
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Gateway liveness: tunnel status.
    pub peer: Option<PeerStatus>,
    /// Gateway liveness: probes answered.
    pub responsive: bool,
    /// Its gateways this one keeps tunnels to (1 unless it runs replicas; 0 for this
    /// cluster itself).
    #[serde(default)]
    pub replicas: usize,
    /// Of those, the ones new connections may go to (up, answering, not draining).
    #[serde(default)]
    pub routable_replicas: usize,
    /// RTT percentiles over the last minute.
    pub rtt: Option<RttSummary>,
    /// Service health: ready endpoints there (`null`: unknown, a static import).
    pub ready_endpoints: Option<usize>,
    /// Weight used.
    pub weight: u32,
    /// Proxied connections there now.
    pub active: usize,
    /// Connections it took since the gateway started (drills chart the share from this).
    pub served: u64,
}

/// An error answer: what was wrong, in which field of the request, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What was wrong.
    pub error: String,
    /// The request field at fault, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl ApiError {
    /// An error with a fix.
    pub fn new(error: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            field: None,
            fix: Some(fix.into()),
        }
    }

    /// An error in one request field.
    pub fn field(
        error: impl Into<String>,
        field: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            field: Some(field.into()),
            ..Self::new(error, fix)
        }
    }

    /// An error that needs no fix (a name that does not exist).
    pub fn plain(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            field: None,
            fix: None,
        }
    }
}

/// `DELETE /v1/faults[/<id>]`: the faults undone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Undone {
    /// Their ids.
    pub undone: Vec<u64>,
}

/// One fault a gateway can inject into itself (`POST /v1/faults`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Fault {
    /// The tunnel stops as in a crash: every connection is dropped without a word to the
    /// peer and every packet in or out is discarded until the fault ends.
    KillTunnel,
    /// Packets to and/or from one peer cluster (every peer when `peer` is absent) vanish.
    Blackhole {
        /// Peer cluster; absent: all of them.
        #[serde(default)]
        peer: Option<String>,
        /// Which way packets are lost.
        #[serde(default)]
        direction: Direction,
    },
    /// Packets this gateway sends (to one peer, or all) leave `latency` late.
    Delay {
        /// Peer cluster; absent: all of them.
        #[serde(default)]
        peer: Option<String>,
        /// Added one-way delay (round trips grow by the same).
        latency: HumanDuration,
    },
    /// A random `fraction` of packets to and/or from a peer is dropped.
    Loss {
        /// Peer cluster; absent: all of them.
        #[serde(default)]
        peer: Option<String>,
        /// Share of packets dropped, above 0 and at most 1.
        fraction: f64,
        /// Which way packets are lost.
        #[serde(default)]
        direction: Direction,
    },
    /// Every exported service is published as having no ready endpoint, so peers send new
    /// connections elsewhere; connections already open (and late arrivals) are still served.
    Drain,
    /// One exported service (`namespace/name`) is published as having no ready endpoint.
    Unready {
        /// `namespace/name` of an exported service.
        service: String,
    },
    /// Gossip stops both ways; the data plane serves on the last view it had.
    CutDiscovery,
}

impl Fault {
    /// Every kind's name, as in the API and metrics.
    pub const KINDS: [&'static str; 7] = [
        "kill-tunnel",
        "blackhole",
        "delay",
        "loss",
        "drain",
        "unready",
        "cut-discovery",
    ];

    /// The kind's name, as in the API and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::KillTunnel => "kill-tunnel",
            Fault::Blackhole { .. } => "blackhole",
            Fault::Delay { .. } => "delay",
            Fault::Loss { .. } => "loss",
            Fault::Drain => "drain",
            Fault::Unready { .. } => "unready",
            Fault::CutDiscovery => "cut-discovery",
        }
    }

    /// The peer cluster a packet fault is limited to.
    pub fn peer(&self) -> Option<&str> {
        match self {
            Fault::Blackhole { peer, .. }
            | Fault::Delay { peer, .. }
            | Fault::Loss { peer, .. } => peer.as_deref(),
            _ => None,
        }
    }

    /// Problems with the fault's own fields: (field, problem, fix).
    pub fn check(&self) -> Option<(&'static str, String, &'static str)> {
        match self {
            Fault::Delay { latency, .. }
                if latency.0.is_zero() || latency.0 > Duration::from_secs(10) =>
            {
                Some((
                    "latency",
                    format!("{latency} is outside 1ms..10s"),
                    "give a one-way delay such as `200ms`",
                ))
            }
            Fault::Loss { fraction, .. } if !(*fraction > 0.0 && *fraction <= 1.0) => Some((
                "fraction",
                format!("{fraction} is not above 0 and at most 1"),
                "give the share of packets to drop, e.g. `0.3`",
            )),
            Fault::Unready { service } if service.split_once('/').is_none() => Some((
                "service",
                format!("`{service}` is not `namespace/name`"),
                "name an exported service as `namespace/name`",
            )),
            _ => None,
        }
    }
}

/// Which packets a fault drops, seen from the gateway that injects it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Both ways.
    #[default]
    Both,
    /// Packets sent to the peer.
    To,
    /// Packets received from the peer.
    From,
}

/// A request to inject a fault for a while.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultRequest {
    /// What to break.
    pub fault: Fault,
    /// How long; the gateway undoes the fault by itself after that.
    pub duration: HumanDuration,
}

/// An injected fault, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ActiveFault {
    /// Id to undo it with (`DELETE /v1/faults/{id}`).
    pub id: u64,
    /// The fault.
    pub fault: Fault,
    /// When it was injected (Unix milliseconds).
    pub started_unix_ms: u64,
    /// Seconds until the gateway undoes it by itself.
    pub expires_in_seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_round_trips_with_human_durations() {
        let route = Route {
            service: "shop/web".into(),
            mode: Mode::Locality,
            primary: Some("eu".into()),
            clusters: vec![],
            policy: RoutePolicy::default(),
        };
        let json = serde_json::to_value(&route).unwrap();
        assert_eq!(json["policy"]["dwell"], "5s");
        assert_eq!(json["policy"]["connect_timeout"], serde_json::Value::Null);
        assert_eq!(serde_json::from_value::<Route>(json).unwrap(), route);
    }

    #[test]
    fn errors_leave_out_what_they_do_not_have() {
        let e = serde_json::to_string(&ApiError::plain("x is not imported")).unwrap();
        assert_eq!(e, r#"{"error":"x is not imported"}"#);
        let e = ApiError::field("bad", "fault.kind", "use drain");
        let back: ApiError = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
    }
}
