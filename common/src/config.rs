//! Gateway configuration: the YAML model, parsing with field paths, and semantic validation.
//!
//! Every error names the file, the field path and what to do about it, because a gateway
//! that refuses to start is only useful if the operator can fix it from the message alone.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::{is_dns_label, is_trust_domain};
use crate::units::{ByteSize, HumanDuration};

pub mod routing;

/// One gateway's configuration file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This cluster's id, unique in the federation (a DNS label, e.g. `us-east`).
    pub cluster: String,
    /// Region this cluster runs in (e.g. `us-east-1`).
    pub region: String,
    /// Zone inside the region; empty when the cluster spans zones.
    #[serde(default)]
    pub zone: String,
    /// SPIFFE trust domain shared by every gateway of the federation.
    pub trust_domain: String,
    /// Addresses this gateway listens on.
    pub listen: Listen,
    /// Certificate, key and federation CA.
    pub tls: TlsFiles,
    /// QUIC tunnel tuning; the defaults suit most deployments.
    #[serde(default)]
    pub tunnel: TunnelTuning,
    /// Services of this cluster offered to other clusters.
    #[serde(default)]
    pub exports: Vec<Export>,
    /// Peer gateways to connect to (static until discovery replaces them).
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// Services of other clusters made reachable here.
    #[serde(default)]
    pub imports: Vec<Import>,
    /// Gossip discovery: learn peers and imports from the federation instead of listing them.
    #[serde(default)]
    pub discovery: Option<Discovery>,
    /// How imported services choose a cluster per connection and fail over.
    #[serde(default)]
    pub routing: routing::Routing,
    /// Limits on what each calling cluster may open here (re-read with the file).
    #[serde(default)]
    pub limits: CallerLimits,
    /// Fault injection for failover drills through the admin API; off when absent.
    #[serde(default)]
    pub faults: Option<FaultInjection>,
    /// The DNS server for `clusterset.local` names (served on `listen.dns`).
    #[serde(default)]
    pub dns: Dns,
    /// Graceful drain on SIGTERM (or `POST /v1/drain`).
    #[serde(default)]
    pub drain: Drain,
    /// Kubernetes mode: exports from `ServiceExport` objects, imports written as
    /// `ServiceImport`s with derived Services and EndpointSlices; off when absent.
    #[serde(default)]
    pub kubernetes: Option<Kubernetes>,
    /// The file this configuration was loaded from (set by [`Config::load`]).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// Discovery settings. When present, `listen.discovery` serves gossip, every member becomes
/// a peer, and every service exported to this cluster gets a listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    /// Gossip addresses of members to join through (any live member works).
    #[serde(default)]
    pub seeds: Vec<SocketAddr>,
    /// Local addresses for imported services, one per service (e.g. `127.0.10.0/24`).
    pub import_addresses: ipnet::IpNet,
    /// Time between gossip rounds (also the heartbeat period).
    #[serde(default = "default_gossip_interval")]
    pub interval: HumanDuration,
    /// Members contacted per round.
    #[serde(default = "default_fanout")]
    pub fanout: usize,
    /// How long a silent member's services are still served (static stability).
    #[serde(default = "default_lease")]
    pub lease: HumanDuration,
    /// Phi accrual threshold above which a member is considered down.
    #[serde(default = "default_phi")]
    pub phi_threshold: f64,
    /// Address other members should use for this gateway's tunnel and gossip ports, when
    /// they listen on an unspecified address (0.0.0.0) or behind NAT.
    #[serde(default)]
    pub advertise: Option<IpAddr>,
    /// How often the config file is checked for export changes.
    #[serde(default = "default_exports_reload")]
    pub reload_interval: HumanDuration,
    /// Take catalog origins that arrive unsigned, from gateways of a version before signed
    /// origins: only while upgrading a federation (docs/SECURITY.md). An origin once seen
    /// signed is never again taken unsigned.
    #[serde(default)]
    pub accept_unsigned_origins: bool,
    /// This gateway's name when its cluster runs several (replicas, e.g. `eu-west-1`): each
    /// replica announces itself at its own advertised tunnel address, and peers spread new
    /// connections over the live ones.
    #[serde(default)]
    pub replica: Option<String>,
}

impl Discovery {
    /// Discovery through `seeds`, importing on `import_addresses`, everything else at its
    /// default (as a `discovery:` block with only those two fields).
    pub fn new(seeds: Vec<SocketAddr>, import_addresses: ipnet::IpNet) -> Self {
        Discovery {
            seeds,
            import_addresses,
            interval: default_gossip_interval(),
            fanout: default_fanout(),
            lease: default_lease(),
            phi_threshold: default_phi(),
            advertise: None,
            reload_interval: default_exports_reload(),
            accept_unsigned_origins: false,
            replica: None,
        }
    }
}

fn default_gossip_interval() -> HumanDuration {
    HumanDuration(Duration::from_millis(100))
}

fn default_fanout() -> usize {
    3
}

fn default_lease() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn default_phi() -> f64 {
    5.0
}

fn default_exports_reload() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

/// Kubernetes mode. The gateway runs as a Deployment; its exports are the cluster's
/// `ServiceExport`s, and each service it imports gets a `ServiceImport` plus a derived
/// Service whose EndpointSlices point at the gateway pods on a port from `import_ports`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Kubernetes {
    /// The gateway's own namespace: its Lease and its Service live there.
    #[serde(default = "default_kube_namespace")]
    pub namespace: String,
    /// The Service selecting the gateway pods; its ready endpoints are where imported
    /// services' derived EndpointSlices point.
    #[serde(default = "default_gateway_service")]
    pub gateway_service: String,
    /// Gateway ports given to imported service ports, one per (service, port), kept while
    /// the import exists.
    #[serde(default = "default_import_ports")]
    pub import_ports: PortRange,
    /// Address the import listeners bind (every pod address by default).
    #[serde(default = "default_kube_listen")]
    pub listen: IpAddr,
    /// API server URL; by default the in-cluster service account, else `KUBECONFIG`.
    #[serde(default)]
    pub api_server: Option<String>,
    /// This replica's name in the writer Lease; by default `$POD_NAME`, else the hostname.
    #[serde(default)]
    pub replica: Option<String>,
    /// How long a writer's Lease holds without renewal.
    #[serde(default = "default_kube_lease")]
    pub lease: HumanDuration,
    /// Export endpoints at loopback, link-local, multicast or unspecified addresses.
    /// Off: anyone who can write an EndpointSlice could otherwise point the clusterset
    /// at the gateway's own admin port or a cloud metadata address. For single-host
    /// trials and tests.
    #[serde(default)]
    pub allow_local_endpoints: bool,
}

impl Kubernetes {
    /// Kubernetes mode against `api_server`, everything else at its default.
    pub fn new(api_server: Option<String>) -> Self {
        Kubernetes {
            namespace: default_kube_namespace(),
            gateway_service: default_gateway_service(),
            import_ports: default_import_ports(),
            listen: default_kube_listen(),
            api_server,
            replica: None,
            lease: default_kube_lease(),
            allow_local_endpoints: false,
        }
    }
}

fn default_kube_namespace() -> String {
    "strait-system".into()
}

fn default_gateway_service() -> String {
    "strait-gateway".into()
}

fn default_import_ports() -> PortRange {
    PortRange {
        first: 20_000,
        last: 20_999,
    }
}

fn default_kube_listen() -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
}

fn default_kube_lease() -> HumanDuration {
    HumanDuration(Duration::from_secs(15))
}

/// An inclusive range of ports, written `20000-20999`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

impl PortRange {
    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// How many ports it holds.
    pub fn len(&self) -> usize {
        usize::from(self.last.saturating_sub(self.first)) + usize::from(self.first <= self.last)
    }

    /// Whether it holds no port.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl TryFrom<String> for PortRange {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a port range; write it as `20000-20999`");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> String {
        format!("{}-{}", r.first, r.last)
    }
}

/// Per calling cluster limits on inbound streams, keyed on the caller's verified
/// identity: a caller over its limit gets the retryable `overloaded` answer, so its
/// gateway tries another cluster. The most specific entry applies: the caller and the
/// service, then the caller, then `default`. Each (caller, service) has its own budget.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CallerLimits {
    /// For every caller and service without an entry of its own.
    #[serde(default)]
    pub default: Limit,
    /// Entries for one calling cluster, for all its services or one.
    #[serde(default)]
    pub callers: Vec<CallerLimit>,
}

/// One `limits.callers` entry. It repeats [`Limit`]'s fields rather than flattening it:
/// serde cannot combine `flatten` with `deny_unknown_fields`, and a typo must be an error.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CallerLimit {
    /// The calling cluster.
    pub cluster: String,
    /// Only this service (`namespace/name`); all when absent.
    #[serde(default)]
    pub service: Option<String>,
    /// New streams per second (see [`Limit`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams_per_second: Option<f64>,
    /// Bucket size (see [`Limit`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Streams open at the same time (see [`Limit`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent_streams: Option<u32>,
}

impl CallerLimit {
    /// Its limits.
    pub fn limit(&self) -> Limit {
        Limit {
            streams_per_second: self.streams_per_second,
            burst: self.burst,
            concurrent_streams: self.concurrent_streams,
        }
    }
}

/// Stream limits; absent values do not limit.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// New streams per second (a token bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams_per_second: Option<f64>,
    /// Streams that may start at once after a quiet period (bucket size; default: one
    /// second's worth, at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Streams open at the same time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent_streams: Option<u32>,
}

impl CallerLimits {
    /// The limit for `caller` opening streams to `service`.
    pub fn for_caller(&self, caller: &str, service: &str) -> Limit {
        let of = |svc: Option<&str>| {
            self.callers
                .iter()
                .find(|c| c.cluster == caller && c.service.as_deref() == svc)
        };
        of(Some(service))
            .or_else(|| of(None))
            .map_or(self.default, CallerLimit::limit)
    }

    fn validate(&self, v: &mut Validator) {
        let mut seen = HashSet::new();
        let limits = std::iter::once(("limits.default".to_owned(), self.default)).chain(
            self.callers
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("limits.callers[{i}]"), c.limit())),
        );
        for (at, l) in limits {
            if l.streams_per_second.is_some_and(|r| !(r > 0.0 && r <= 1e6)) {
                v.push(
                    &format!("{at}.streams_per_second"),
                    "must be above 0 and at most 1000000",
                    "leave it out for no rate limit",
                );
            }
            if l.burst == Some(0) || l.concurrent_streams == Some(0) {
                v.push(
                    &at,
                    "has a burst or concurrent_streams of 0, which refuses everything",
                    "leave it out for no limit, or use at least 1",
                );
            }
        }
        for (i, c) in self.callers.iter().enumerate() {
            v.label(&format!("limits.callers[{i}].cluster"), &c.cluster);
            if let Some(s) = &c.service
                && !s
                    .split_once('/')
                    .is_some_and(|(ns, n)| is_dns_label(ns) && is_dns_label(n))
            {
                v.push(
                    &format!("limits.callers[{i}].service"),
                    format!("`{s}` is not namespace/name"),
                    "write it as e.g. `shop/checkout`",
                );
            }
            if !seen.insert((c.cluster.as_str(), c.service.as_deref())) {
                v.push(
                    &format!("limits.callers[{i}]"),
                    "repeats an earlier entry's cluster and service",
                    "merge the two entries",
                );
            }
        }
    }
}

/// Listen addresses. The admin API must never share the peer-facing port.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// UDP address for the QUIC tunnel (peer-facing).
    pub tunnel: SocketAddr,
    /// HTTP admin API; keep it on loopback.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// gRPC discovery address (served once discovery lands; accepted and checked now).
    #[serde(default)]
    pub discovery: Option<SocketAddr>,
    /// DNS address (UDP and TCP) answering for the `dns.zone` names; no DNS server when
    /// absent.
    #[serde(default)]
    pub dns: Option<SocketAddr>,
}

/// The DNS server: the zone it is authoritative for and how long answers may be cached.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// Zone answered (Kubernetes Multi-Cluster Services names live in `clusterset.local`).
    #[serde(default = "default_dns_zone")]
    pub zone: String,
    /// TTL of positive answers; short, so clients follow health changes.
    #[serde(default = "default_dns_ttl")]
    pub ttl: HumanDuration,
    /// TTL of negative answers (the SOA minimum): how long a resolver may remember that a
    /// name does not exist.
    #[serde(default = "default_dns_ttl")]
    pub negative_ttl: HumanDuration,
}

impl Default for Dns {
    fn default() -> Self {
        Self {
            zone: default_dns_zone(),
            ttl: default_dns_ttl(),
            negative_ttl: default_dns_ttl(),
        }
    }
}

fn default_dns_zone() -> String {
    "clusterset.local".to_owned()
}

fn default_dns_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

/// Fault injection (`/v1/faults` on the admin API), used by `strait drill`. Every request
/// must carry the token from `token_file` as `Authorization: Bearer <token>`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultInjection {
    /// File holding the admin token (at least 16 characters; surrounding whitespace is
    /// ignored). Relative paths are resolved against the config file's directory.
    pub token_file: PathBuf,
    /// Longest one fault may last: the gateway undoes it by itself after that, even if the
    /// drill that injected it is gone.
    #[serde(default = "default_max_fault")]
    pub max_duration: HumanDuration,
}

fn default_max_fault() -> HumanDuration {
    HumanDuration(Duration::from_secs(600))
}

/// How a gateway drains before it exits (SIGTERM, or `POST /v1/drain`): `/ready` fails at
/// once, peers are told to send no new tunnel streams (they use its siblings or other
/// clusters), its service listeners keep accepting for `accept_for` (while load balancers
/// notice `/ready`) and then close, and it exits once no proxied connection is open, or
/// when `grace` has passed since the drain began.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Drain {
    /// Longest the drain lasts: connections still open then are closed.
    #[serde(default = "default_drain_grace")]
    pub grace: HumanDuration,
    /// How long the service listeners keep accepting new client connections.
    #[serde(default = "default_drain_accept_for")]
    pub accept_for: HumanDuration,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            grace: default_drain_grace(),
            accept_for: default_drain_accept_for(),
        }
    }
}

fn default_drain_grace() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn default_drain_accept_for() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

/// PEM files of this gateway's identity.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Federation root CA bundle (PEM) that peers' certificates must chain to.
    pub ca: PathBuf,
    /// This gateway's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// This gateway's private key (PEM, PKCS#8).
    pub key: PathBuf,
    /// How often the files are checked for changes; rotated files take effect for new
    /// connections without dropping established ones.
    #[serde(default = "default_reload_interval")]
    pub reload_interval: HumanDuration,
}

impl TlsFiles {
    /// These files, checked for changes at the default interval.
    pub fn new(ca: PathBuf, cert: PathBuf, key: PathBuf) -> Self {
        TlsFiles {
            ca,
            cert,
            key,
            reload_interval: default_reload_interval(),
        }
    }
}

fn default_reload_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// QUIC and proxy tuning knobs.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelTuning {
    /// Keep-alive (probe) interval on peer connections: each one must be acknowledged, so
    /// it bounds how fast a silent peer is noticed.
    pub keep_alive: HumanDuration,
    /// A peer that has sent nothing (not even an acknowledgement) for this long is taken out
    /// of routing at once; its connection stays open until `idle_timeout` in case it was a
    /// blip. Raised automatically to 4 RTT + keep_alive on slow paths.
    pub unresponsive_after: HumanDuration,
    /// A peer connection with no traffic (keep-alives included) for this long is closed.
    pub idle_timeout: HumanDuration,
    /// Time allowed for the QUIC handshake and for the remote's stream status.
    pub connect_timeout: HumanDuration,
    /// Time the remote gateway allows for connecting to a service endpoint.
    pub endpoint_connect_timeout: HumanDuration,
    /// Longest wait between reconnect attempts to a peer (backoff starts at 50 ms).
    pub max_backoff: HumanDuration,
    /// Concurrent streams a peer may open on one connection.
    pub max_concurrent_streams: u32,
    /// Inbound streams (proxied connections) this gateway serves at once before
    /// answering `overloaded`.
    pub max_inbound_streams: u32,
    /// Per-stream flow-control window.
    pub stream_window: ByteSize,
    /// Per-connection flow-control window (shared by all streams).
    pub connection_window: ByteSize,
    /// UDP socket send and receive buffer size.
    pub udp_buffer: ByteSize,
    /// Largest read from a proxied connection's TCP side per write to its stream (the
    /// other direction writes the received packets as they are, gathered, with no buffer).
    pub copy_buffer: ByteSize,
    /// Handshakes in progress above which a new one must first prove its address (a QUIC
    /// retry: one extra round trip, no state kept for spoofed sources).
    #[serde(default = "default_retry_above")]
    pub retry_above: u32,
    /// Handshakes in progress at most; beyond it new ones are refused.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: u32,
    /// Largest UDP payload path MTU discovery may probe for (1200..=65527). The default
    /// fits a 9,000-byte jumbo frame; on a 1,500-byte path discovery settles near the
    /// path's limit (1,470 on IPv4, 1,441 on IPv6) after about twenty lost probes, and
    /// loses as many again at each ten-minute search: probes only, never data.
    pub max_udp_payload: u16,
}

impl Default for TunnelTuning {
    fn default() -> Self {
        Self {
            keep_alive: HumanDuration(Duration::from_millis(100)),
            unresponsive_after: HumanDuration(Duration::from_millis(500)),
            idle_timeout: HumanDuration(Duration::from_millis(1500)),
            connect_timeout: HumanDuration(Duration::from_secs(2)),
            endpoint_connect_timeout: HumanDuration(Duration::from_secs(2)),
            max_backoff: HumanDuration(Duration::from_secs(2)),
            max_concurrent_streams: 16_384,
            max_inbound_streams: 16_384,
            stream_window: ByteSize(4 << 20),
            connection_window: ByteSize(64 << 20),
            udp_buffer: ByteSize(8 << 20),
            copy_buffer: ByteSize(64 << 10),
            retry_above: default_retry_above(),
            max_handshakes: default_max_handshakes(),
            max_udp_payload: 8952,
        }
    }
}

/// A service of this cluster offered to others.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Export {
    /// Service name (DNS label).
    pub name: String,
    /// Namespace (DNS label).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Service ports.
    pub ports: Vec<ServicePort>,
    /// Backends serving the service.
    pub endpoints: Vec<Endpoint>,
    /// Clusters allowed to import the service; `["*"]` (the default) means every cluster
    /// of the trust domain.
    #[serde(default = "default_export_to")]
    pub export_to: Vec<String>,
    /// Relative weight of this cluster for the service (for canaries between clusters).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// A headless service: no ClusterSetIP; DNS names each ready endpoint, and each remote
    /// endpoint gets its own local address that forwards to exactly that endpoint.
    #[serde(default)]
    pub headless: bool,
    /// Client-IP session affinity for this long (Kubernetes `sessionAffinity: ClientIP`);
    /// none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<HumanDuration>,
    /// When the export was created (Unix ms; 0 unknown), in Kubernetes the
    /// ServiceExport's creation time: the oldest export wins conflicts between clusters.
    #[serde(skip)]
    pub exported_at_ms: i64,
    /// KEP-5939 cluster selection (Kubernetes mode only).
    #[serde(skip)]
    pub selection: Selection,
}

fn default_weight() -> u32 {
    1
}

fn default_namespace() -> String {
    "default".to_owned()
}

fn default_export_to() -> Vec<String> {
    vec!["*".to_owned()]
}

impl Export {
    /// Whether `cluster` may import this service.
    pub fn exported_to(&self, cluster: &str) -> bool {
        self.export_to.iter().any(|c| c == "*" || c == cluster)
    }

    /// The port entry for a service port number.
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// One port of a service.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// Port name (used for SRV records); optional for single-port services.
    #[serde(default)]
    pub name: String,
    /// The service port clients connect to.
    pub port: u16,
    /// The port endpoints listen on; defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
    /// Transport protocol; only TCP is proxied.
    #[serde(default)]
    pub protocol: Protocol,
}

impl ServicePort {
    /// The port on the endpoints.
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

fn default_retry_above() -> u32 {
    64
}

fn default_max_handshakes() -> u32 {
    1024
}

/// KEP-5939 cluster selection carried with an export: the `ServiceExport`'s ordered
/// `clusterSelectors` (each a set of `ClusterProperty` name → value that must all match;
/// the value [`SAME_AS_IMPORTER`] matches the importing cluster's own value), and the
/// exporting cluster's `ClusterProperty` values they are matched against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// The selectors, in order of preference.
    pub selectors: Vec<std::collections::BTreeMap<String, String>>,
    /// The exporting cluster's properties.
    pub properties: std::collections::BTreeMap<String, String>,
}

/// The selector value that matches the importing cluster's own property value.
pub const SAME_AS_IMPORTER: &str = "@SameAsImporter@";

impl Selection {
    /// The index of the first of `selectors` that a cluster with `properties` matches, as
    /// seen from an importer with `mine`.
    pub fn first_match(
        selectors: &[std::collections::BTreeMap<String, String>],
        properties: &std::collections::BTreeMap<String, String>,
        mine: &std::collections::BTreeMap<String, String>,
    ) -> Option<u32> {
        selectors
            .iter()
            .position(|sel| {
                sel.iter().all(|(name, want)| {
                    let want = if want == SAME_AS_IMPORTER {
                        mine.get(name)
                    } else {
                        Some(want)
                    };
                    want.is_some() && properties.get(name) == want
                })
            })
            .map(|i| i as u32)
    }
}

/// Transport protocol of a service port.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP, proxied through the tunnel.
    #[default]
    Tcp,
}

/// One backend of an exported service.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Endpoint IP address.
    pub address: IpAddr,
    /// Stable hostname (e.g. a StatefulSet pod name), if any.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Whether the endpoint takes traffic.
    #[serde(default = "yes")]
    pub ready: bool,
}

fn yes() -> bool {
    true
}

/// A peer gateway to keep a tunnel connection to.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// The peer's cluster id; its certificate must carry this identity.
    pub cluster: String,
    /// The peer's tunnel (UDP) address.
    pub address: SocketAddr,
}

/// A service of other clusters made reachable on a local address.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Import {
    /// Service name.
    pub name: String,
    /// Namespace.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Local address the service's listeners bind (one address per service keeps every
    /// service on its own port numbers).
    pub address: IpAddr,
    /// Ports to listen on.
    pub ports: Vec<ImportPort>,
    /// Clusters serving the service, tried in this order.
    pub clusters: Vec<String>,
}

/// One port of an imported service.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImportPort {
    /// Port name.
    #[serde(default)]
    pub name: String,
    /// The service port (as exported by the remote cluster).
    pub port: u16,
    /// Local port to listen on instead of `port` (0 picks a free port; for tests).
    #[serde(default)]
    pub listen_port: Option<u16>,
}

impl ImportPort {
    /// The local port the listener binds.
    pub fn local_port(&self) -> u16 {
        self.listen_port.unwrap_or(self.port)
    }
}

/// A configuration error: which file, which field, what is wrong, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file the configuration came from.
    pub file: PathBuf,
    /// The field path, e.g. `exports[0].ports[1].port`; empty for whole-file problems.
    pub field: String,
    /// What is wrong.
    pub problem: String,
    /// What to do about it.
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.problem)?;
        if !self.fix.is_empty() {
            write!(f, "\n  fix: {}", self.fix)?;
        }
        Ok(())
    }
}

/// Every problem found in one file, reported together so one edit fixes them all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl Config {
    /// The typed twin of the smallest config file: a cluster, its region, the trust
    /// domain, the tunnel address and the certificate files; every other section at its
    /// default. It is not checked: write it to a file and [`Config::load`] it, as an
    /// operator's file would be.
    pub fn new(
        cluster: &str,
        region: &str,
        trust_domain: &str,
        tunnel: SocketAddr,
        tls: TlsFiles,
    ) -> Config {
        Config {
            cluster: cluster.to_owned(),
            region: region.to_owned(),
            zone: String::new(),
            trust_domain: trust_domain.to_owned(),
            listen: Listen {
                tunnel,
                admin: default_admin(),
                discovery: None,
                dns: None,
            },
            tls,
            tunnel: TunnelTuning::default(),
            exports: Vec::new(),
            peers: Vec::new(),
            imports: Vec::new(),
            discovery: None,
            routing: routing::Routing::default(),
            limits: CallerLimits::default(),
            faults: None,
            dns: Dns::default(),
            drain: Drain::default(),
            kubernetes: None,
            source: None,
        }
    }

    /// Reads, parses and validates a configuration file. Relative certificate paths are
    /// resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_owned(),
                field: String::new(),
                problem: format!("cannot read the file: {e}"),
                fix: "check the path and its permissions".to_owned(),
            }])
        })?;
        let mut config = Config::parse(path, &text)?;
        if let Some(dir) = path.parent() {
            config.tls.resolve_relative_to(dir);
            if let Some(f) = &mut config.faults
                && f.token_file.is_relative()
            {
                f.token_file = dir.join(&f.token_file);
            }
        }
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Parses and validates configuration text; `file` is only used in error messages.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let config: Config = parse_yaml(file, text)?;
        into_errors(file, config.validate())?;
        Ok(config)
    }

    /// Semantic checks serde cannot express: (field path, problem, fix) for each.
    fn validate(&self) -> Vec<(String, String, String)> {
        let mut v = Validator::default();
        v.label("cluster", &self.cluster);
        if self.region.trim().is_empty() {
            v.push(
                "region",
                "is empty",
                "set the region this cluster runs in, e.g. `us-east-1`",
            );
        }
        if !is_trust_domain(&self.trust_domain) {
            v.push(
                "trust_domain",
                format!("`{}` is not a valid SPIFFE trust domain", self.trust_domain),
                "use lowercase letters, digits, `.`, `-` and `_`, e.g. `strait.example`",
            );
        }
        self.validate_listen(&mut v);
        if self.tls.reload_interval.0.is_zero() {
            v.push("tls.reload_interval", "is zero", "use e.g. `10s`");
        }
        self.tunnel.validate(&mut v);
        self.validate_exports(&mut v);
        self.validate_peers(&mut v);
        self.validate_imports(&mut v);
        self.validate_discovery(&mut v);
        self.routing.validate(&mut v);
        self.limits.validate(&mut v);
        if let Some(f) = &self.faults
            && (f.max_duration.0.is_zero() || f.max_duration.0 > Duration::from_secs(86_400))
        {
            v.push(
                "faults.max_duration",
                "is outside 1ms..24h",
                "use e.g. `10m`: the longest one drill fault may last",
            );
        }
        self.validate_dns(&mut v);
        self.validate_kubernetes(&mut v);
        if self.drain.grace.0 > Duration::from_secs(3600) {
            v.push(
                "drain.grace",
                "is over 1h",
                "use e.g. `30s` (and a Kubernetes terminationGracePeriodSeconds a little longer)",
            );
        }
        if self.drain.accept_for.0 > self.drain.grace.0 {
            v.push(
                "drain.accept_for",
                "is longer than drain.grace",
                "use a few seconds, e.g. `5s`: long enough for load balancers to see /ready fail",
            );
        }
        v.problems
    }

    fn validate_kubernetes(&self, v: &mut Validator) {
        let Some(k) = &self.kubernetes else { return };
        if self.discovery.is_none() {
            v.push(
                "kubernetes",
                "needs `discovery`: imported services are learned from the federation",
                "add a `discovery:` section with the other clusters' gateways as `seeds`",
            );
        }
        if !self.exports.is_empty() {
            v.push(
                "exports",
                "is set together with `kubernetes`, where exports are the cluster's ServiceExport objects",
                "remove `exports` and create a ServiceExport for each Service instead",
            );
        }
        v.label("kubernetes.namespace", &k.namespace);
        v.label("kubernetes.gateway_service", &k.gateway_service);
        let own = [
            Some(self.listen.tunnel.port()),
            Some(self.listen.admin.port()),
            self.listen.discovery.map(|a| a.port()),
            self.listen.dns.map(|a| a.port()),
        ];
        if let Some(p) = own
            .into_iter()
            .flatten()
            .find(|p| k.import_ports.contains(*p))
        {
            v.push(
                "kubernetes.import_ports",
                format!("contains port {p}, which the gateway already listens on"),
                "choose a range clear of the `listen` ports, e.g. `20000-20999`",
            );
        }
        if k.lease.0 < Duration::from_secs(2) {
            v.push(
                "kubernetes.lease",
                "is shorter than 2s",
                "use e.g. `15s`: replicas renew it every third of that",
            );
        }
    }

    fn validate_dns(&self, v: &mut Validator) {
        let d = &self.dns;
        let zone = d.zone.trim_end_matches('.');
        if zone.is_empty() || zone.len() > 200 || !zone.split('.').all(is_dns_label) {
            v.push(
                "dns.zone",
                format!("`{}` is not a DNS name", d.zone),
                "use lowercase labels separated by dots, e.g. `clusterset.local`",
            );
        }
        for (field, ttl) in [("dns.ttl", d.ttl), ("dns.negative_ttl", d.negative_ttl)] {
            if ttl.0 > Duration::from_secs(3600) {
                v.push(
                    field,
                    "is over 1h",
                    "keep DNS TTLs short (e.g. `5s`) so clients follow health changes",
                );
            }
        }
    }

    fn validate_listen(&self, v: &mut Validator) {
        let l = &self.listen;
        if l.admin.port() != 0 && l.admin.port() == l.tunnel.port() && l.admin.ip() == l.tunnel.ip()
        {
            v.push(
                "listen.admin",
                "shares the tunnel's address",
                "give the admin API its own address; it must never be reachable on the peer port",
            );
        }
        if !l.admin.ip().is_loopback() {
            tracing::warn!(admin = %l.admin, "admin API listens on a non-loopback address");
        }
    }

    fn validate_exports(&self, v: &mut Validator) {
        let mut seen = HashSet::new();
        for (i, e) in self.exports.iter().enumerate() {
            let at = format!("exports[{i}]");
            v.label(&format!("{at}.name"), &e.name);
            v.label(&format!("{at}.namespace"), &e.namespace);
            if !seen.insert((&e.namespace, &e.name)) {
                v.push(
                    &format!("{at}.name"),
                    format!("service {}/{} is exported twice", e.namespace, e.name),
                    "merge the two entries into one",
                );
            }
            validate_ports(v, &at, e.ports.iter().map(|p| (p.name.as_str(), p.port)));
            for (j, p) in e.ports.iter().enumerate() {
                if p.target_port == Some(0) {
                    v.push(
                        &format!("{at}.ports[{j}].target_port"),
                        "is 0",
                        "set the port the endpoints listen on",
                    );
                }
            }
            if e.endpoints.is_empty() {
                v.push(
                    &format!("{at}.endpoints"),
                    "is empty",
                    "list at least one endpoint address, or remove the export",
                );
            }
            for (j, ep) in e.endpoints.iter().enumerate() {
                if let Some(h) = &ep.hostname {
                    v.label(&format!("{at}.endpoints[{j}].hostname"), h);
                }
            }
            if e.export_to.is_empty() {
                v.push(
                    &format!("{at}.export_to"),
                    "is empty, so no cluster may import the service",
                    "list the cluster ids allowed to import it, or `\"*\"` for all",
                );
            }
            for (j, c) in e.export_to.iter().enumerate() {
                if c != "*" {
                    v.label(&format!("{at}.export_to[{j}]"), c);
                }
            }
        }
    }

    fn validate_peers(&self, v: &mut Validator) {
        let mut seen = HashSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            let at = format!("peers[{i}]");
            v.label(&format!("{at}.cluster"), &p.cluster);
            if p.cluster == self.cluster {
                v.push(
                    &format!("{at}.cluster"),
                    "names this gateway's own cluster",
                    "remove this peer; a gateway does not tunnel to itself",
                );
            }
            if !seen.insert(&p.cluster) {
                v.push(
                    &format!("{at}.cluster"),
                    format!("peer `{}` is listed twice", p.cluster),
                    "keep one entry per peer cluster",
                );
            }
            if p.address.port() == 0 || p.address.ip().is_unspecified() {
                v.push(
                    &format!("{at}.address"),
                    format!("`{}` cannot be connected to", p.address),
                    "give the peer gateway's tunnel address with a concrete IP and port",
                );
            }
        }
    }

    fn validate_imports(&self, v: &mut Validator) {
        let peers: BTreeSet<&str> = self.peers.iter().map(|p| p.cluster.as_str()).collect();
        let mut bound = HashSet::new();
        let mut seen = HashSet::new();
        for (i, imp) in self.imports.iter().enumerate() {
            let at = format!("imports[{i}]");
            v.label(&format!("{at}.name"), &imp.name);
            v.label(&format!("{at}.namespace"), &imp.namespace);
            if !seen.insert((&imp.namespace, &imp.name)) {
                v.push(
                    &format!("{at}.name"),
                    format!("service {}/{} is imported twice", imp.namespace, imp.name),
                    "merge the two entries into one",
                );
            }
            validate_ports(v, &at, imp.ports.iter().map(|p| (p.name.as_str(), p.port)));
            for (j, p) in imp.ports.iter().enumerate() {
                let port = p.local_port();
                if port != 0 && !bound.insert((imp.address, port)) {
                    v.push(
                        &format!("{at}.ports[{j}]"),
                        format!("{}:{port} is already used by another import", imp.address),
                        "give each imported service its own address (or listen_port)",
                    );
                }
            }
            if imp.clusters.is_empty() {
                v.push(
                    &format!("{at}.clusters"),
                    "is empty",
                    "list the clusters that export this service",
                );
            }
            for (j, c) in imp.clusters.iter().enumerate() {
                // With discovery, clusters are learned from the federation at run time.
                if self.discovery.is_none() && !peers.contains(c.as_str()) {
                    v.push(
                        &format!("{at}.clusters[{j}]"),
                        format!("`{c}` is not a configured peer"),
                        format!("add `{c}` under `peers`, or use one of: {}", join(&peers)),
                    );
                }
            }
        }
    }
}

impl Config {
    fn validate_discovery(&self, v: &mut Validator) {
        let Some(d) = &self.discovery else { return };
        if self.listen.discovery.is_none() {
            v.push(
                "listen.discovery",
                "is missing but `discovery` is configured",
                "add `discovery: <ip>:<port>` under `listen` for the gossip service",
            );
        }
        if d.interval.0 < Duration::from_millis(10) || d.interval.0 > Duration::from_secs(10) {
            v.push(
                "discovery.interval",
                "must be between 10ms and 10s",
                "use e.g. `100ms`",
            );
        }
        if d.fanout == 0 || d.fanout > 16 {
            v.push("discovery.fanout", "must be between 1 and 16", "use e.g. 3");
        }
        if let Some(r) = &d.replica
            && !crate::identity::is_dns_label(r)
        {
            v.push(
                "discovery.replica",
                format!("`{}` is not a DNS label", r.escape_debug()),
                "use lowercase letters, digits and `-`, e.g. `eu-west-1`",
            );
        }
        if d.lease.0 <= d.interval.0 * 10 {
            v.push(
                "discovery.lease",
                "is not much longer than discovery.interval",
                "leases must outlive many rounds, e.g. `30s`",
            );
        }
        if !(1.0..=20.0).contains(&d.phi_threshold) {
            v.push(
                "discovery.phi_threshold",
                "must be between 1 and 20",
                "use e.g. 5 (about 1.2 s of silence at 100ms rounds)",
            );
        }
        if d.reload_interval.0.is_zero() {
            v.push("discovery.reload_interval", "is zero", "use e.g. `1s`");
        }
        let unspecified = self.listen.tunnel.ip().is_unspecified()
            || self
                .listen
                .discovery
                .is_some_and(|a| a.ip().is_unspecified());
        // In Kubernetes mode the address comes from the gateway Service's load balancer.
        if unspecified && d.advertise.is_none() && self.kubernetes.is_none() {
            v.push(
                "discovery.advertise",
                "is missing while listen.tunnel or listen.discovery is an unspecified address (0.0.0.0), which members cannot dial",
                "set `advertise:` to the IP other gateways reach this one on",
            );
        }
        if d.import_addresses.hosts().take(2).count() < 2 {
            v.push(
                "discovery.import_addresses",
                "has room for fewer than two services",
                "use a range such as `127.0.10.0/24`",
            );
        }
        // Port 0 picks a free port, so two ephemeral addresses never collide.
        if self.listen.admin.port() != 0 && self.listen.discovery == Some(self.listen.admin) {
            v.push(
                "listen.discovery",
                "shares the admin address",
                "give discovery its own port",
            );
        }
    }
}

fn validate_ports<'a>(v: &mut Validator, at: &str, ports: impl Iterator<Item = (&'a str, u16)>) {
    let mut numbers = HashSet::new();
    let mut names = HashSet::new();
    let mut count = 0;
    for (j, (name, port)) in ports.enumerate() {
        count += 1;
        if port == 0 {
            v.push(
                &format!("{at}.ports[{j}].port"),
                "is 0",
                "use the service's real port number (1-65535)",
            );
        }
        if !numbers.insert(port) {
            v.push(
                &format!("{at}.ports[{j}].port"),
                format!("port {port} is listed twice"),
                "list each port once",
            );
        }
        if !name.is_empty() {
            v.label(&format!("{at}.ports[{j}].name"), name);
            if !names.insert(name) {
                v.push(
                    &format!("{at}.ports[{j}].name"),
                    format!("port name `{name}` is used twice"),
                    "give each port its own name",
                );
            }
        }
    }
    if count == 0 {
        v.push(
            &format!("{at}.ports"),
            "is empty",
            "list at least one port, e.g. `[{port: 80}]`",
        );
    }
    if count > 1 && names.len() < count {
        v.push(
            &format!("{at}.ports"),
            "a multi-port service has unnamed ports",
            "name every port (names make SRV records)",
        );
    }
}

impl TunnelTuning {
    fn validate(&self, v: &mut Validator) {
        let zero = |d: &HumanDuration| d.0.is_zero();
        for (field, d) in [
            ("tunnel.keep_alive", &self.keep_alive),
            ("tunnel.unresponsive_after", &self.unresponsive_after),
            ("tunnel.idle_timeout", &self.idle_timeout),
            ("tunnel.connect_timeout", &self.connect_timeout),
            (
                "tunnel.endpoint_connect_timeout",
                &self.endpoint_connect_timeout,
            ),
            ("tunnel.max_backoff", &self.max_backoff),
        ] {
            if zero(d) {
                v.push(
                    field,
                    "is zero",
                    "use a positive duration such as `500ms` or `2s`",
                );
            }
        }
        if self.keep_alive.0 >= self.idle_timeout.0 {
            v.push(
                "tunnel.keep_alive",
                format!("{} is not shorter than tunnel.idle_timeout ({})", self.keep_alive, self.idle_timeout),
                "keep-alives must be sent well within the idle timeout, e.g. keep_alive: 100ms with idle_timeout: 1500ms",
            );
        } else if self.unresponsive_after.0 < self.keep_alive.0 * 2
            || self.unresponsive_after.0 >= self.idle_timeout.0
        {
            v.push(
                "tunnel.unresponsive_after",
                format!(
                    "{} is not between 2 x tunnel.keep_alive ({}) and tunnel.idle_timeout ({})",
                    self.unresponsive_after, self.keep_alive, self.idle_timeout
                ),
                "use e.g. keep_alive: 100ms, unresponsive_after: 500ms, idle_timeout: 1500ms",
            );
        }
        if self.max_handshakes == 0 || self.retry_above > self.max_handshakes {
            v.push(
                "tunnel.max_handshakes",
                format!(
                    "is {} with tunnel.retry_above {}: it must be at least 1 and at least retry_above",
                    self.max_handshakes, self.retry_above
                ),
                "use e.g. retry_above: 64, max_handshakes: 1024",
            );
        }
        if self.max_concurrent_streams == 0 || self.max_inbound_streams == 0 {
            v.push(
                "tunnel.max_concurrent_streams",
                "is zero",
                "allow at least one stream",
            );
        }
        if self.stream_window.0 < 16 << 10 || self.stream_window.0 > (1 << 30) {
            v.push(
                "tunnel.stream_window",
                "must be between 16KiB and 1GiB",
                "use e.g. `4MiB`",
            );
        }
        if self.connection_window.0 < self.stream_window.0 || self.connection_window.0 > (4 << 30) {
            v.push(
                "tunnel.connection_window",
                "must be at least tunnel.stream_window and at most 4GiB",
                "use e.g. `64MiB`",
            );
        }
        if self.copy_buffer.0 < 1024 || self.copy_buffer.0 > (16 << 20) {
            v.push(
                "tunnel.copy_buffer",
                "must be between 1KiB and 16MiB",
                "use e.g. `64KiB`",
            );
        }
        if self.udp_buffer.0 > (1 << 30) {
            v.push(
                "tunnel.udp_buffer",
                "is larger than 1GiB",
                "use e.g. `8MiB`",
            );
        }
        if !(1200..=65527).contains(&self.max_udp_payload) {
            v.push(
                "tunnel.max_udp_payload",
                "must be between 1200 and 65527",
                "use 8952 (the default: jumbo frames where the path has them) or 1452 to stay within 1,500-byte Ethernet",
            );
        }
    }
}

impl TlsFiles {
    fn resolve_relative_to(&mut self, dir: &Path) {
        for p in [&mut self.ca, &mut self.cert, &mut self.key] {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }
}

/// Deserializes YAML into `T`, reporting a failure with its field path and a fix.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(
    file: &Path,
    text: &str,
) -> Result<T, ConfigErrors> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        ConfigErrors(vec![ConfigError {
            file: file.to_owned(),
            field: if field == "." { String::new() } else { field },
            fix: fix_for_parse_error(&inner.to_string()),
            problem: inner.to_string(),
        }])
    })
}

/// `Ok` when a validator found nothing, else every problem as a [`ConfigError`] of `file`.
pub fn into_errors(
    file: &Path,
    problems: Vec<(String, String, String)>,
) -> Result<(), ConfigErrors> {
    if problems.is_empty() {
        return Ok(());
    }
    Err(ConfigErrors(
        problems
            .into_iter()
            .map(|(field, problem, fix)| ConfigError {
                file: file.to_owned(),
                field,
                problem,
                fix,
            })
            .collect(),
    ))
}

/// Collects (field path, problem, fix) triples during semantic validation.
#[derive(Default)]
pub struct Validator {
    /// What was found so far.
    pub problems: Vec<(String, String, String)>,
}

impl Validator {
    /// Records one problem.
    pub fn push(&mut self, field: &str, problem: impl Into<String>, fix: impl Into<String>) {
        self.problems
            .push((field.to_owned(), problem.into(), fix.into()));
    }

    /// Records a problem unless `value` is a DNS label.
    pub fn label(&mut self, field: &str, value: &str) {
        if !is_dns_label(value) {
            self.push(
                field,
                format!("`{value}` is not a DNS label"),
                "use 1-63 lowercase letters, digits and `-`, starting and ending with a letter or digit",
            );
        }
    }
}

fn join(set: &BTreeSet<&str>) -> String {
    if set.is_empty() {
        "(no peers configured)".to_owned()
    } else {
        set.iter().copied().collect::<Vec<_>>().join(", ")
    }
}

fn fix_for_parse_error(msg: &str) -> String {
    if msg.contains("unknown field") {
        "remove the field or correct its spelling (the message lists the expected fields)"
            .to_owned()
    } else if msg.contains("missing field") {
        "add the missing field".to_owned()
    } else if msg.contains("invalid type") || msg.contains("invalid value") {
        "give the field a value of the expected type".to_owned()
    } else {
        "correct the YAML at the reported line and column".to_owned()
    }
}

#[cfg(test)]
mod tests;

/// What to do about a socket that cannot be bound.
pub fn bind_fix(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "another process (another gateway?) holds it: stop that process, or choose another port"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            "the address is not on this host: use an address of one of its interfaces or a loopback address (all of 127.0.0.0/8 is local on Linux), or add it, e.g. `ip addr add <address>/32 dev lo`"
        }
        std::io::ErrorKind::PermissionDenied => {
            "ports below 1024 need root or CAP_NET_BIND_SERVICE: use a higher port, or grant the capability"
        }
        _ => "check the address and port",
    }
}

/// Files `config` names that cannot be read now (certificates, key, admin token): (field,
/// problem, fix). `config check` shows them as warnings (a deployment may put them in
/// place later); a gateway would not start without them.
pub fn file_warnings(config: &Config) -> Vec<(String, String, String)> {
    let mut files = vec![
        (
            "tls.ca",
            &config.tls.ca,
            "copy the federation's ca.pem there (`strait pki init` made it)".to_owned(),
        ),
        (
            "tls.cert",
            &config.tls.cert,
            format!(
                "issue it with `strait pki issue --ca <ca dir> --cluster {} --out <dir>`",
                config.cluster
            ),
        ),
        (
            "tls.key",
            &config.tls.key,
            "it is written beside the certificate by `strait pki issue`".to_owned(),
        ),
    ];
    if let Some(f) = &config.faults {
        files.push((
            "faults.token_file",
            &f.token_file,
            "create it with a random token: `openssl rand -hex 32 > <file>`".to_owned(),
        ));
    }
    files
        .into_iter()
        .filter_map(|(field, path, missing)| {
            let e = std::fs::File::open(path).err()?;
            let fix = match e.kind() {
                std::io::ErrorKind::NotFound => {
                    format!("{missing}, or correct {field} (relative to the config file)")
                }
                std::io::ErrorKind::PermissionDenied => "let the user running strait read it (e.g. `chown` it to that user, or `chmod 640` with its group)".to_owned(),
                _ => format!("check the file {field} names"),
            };
            Some((
                field.to_owned(),
                format!("{} cannot be read: {e}", path.display()),
                fix,
            ))
        })
        .collect()
}

/// Problems the host would have binding what `config` asks for, found by trying (each
/// address on an ephemeral port, so nothing in use is disturbed): (field, problem, fix).
/// `config check` shows them as warnings; a gateway would fail to start, or to listen for
/// an import, on them.
pub fn bind_warnings(config: &Config) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut check = |field: String, ip: IpAddr| {
        if ip.is_unspecified() {
            return;
        }
        if let Err(e) = std::net::TcpListener::bind(SocketAddr::new(ip, 0)) {
            out.push((
                field,
                format!("{ip} cannot be bound on this host ({e})"),
                bind_fix(&e).to_owned(),
            ));
        }
    };
    check("listen.tunnel".into(), config.listen.tunnel.ip());
    check("listen.admin".into(), config.listen.admin.ip());
    if let Some(a) = config.listen.discovery {
        check("listen.discovery".into(), a.ip());
    }
    if let Some(a) = config.listen.dns {
        check("listen.dns".into(), a.ip());
    }
    for (i, imp) in config.imports.iter().enumerate() {
        check(format!("imports[{i}].address"), imp.address);
    }
    if let Some(d) = &config.discovery
        && config.kubernetes.is_none()
        && let Some(first) = d.import_addresses.hosts().next()
    {
        check("discovery.import_addresses".into(), first);
    }
    out
}
