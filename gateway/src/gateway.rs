//! One running gateway: binds its sockets, starts the tunnel, listeners, admin API and
//! certificate reloader, and shuts them down together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use arc_swap::{ArcSwap, ArcSwapOption};
use strait_common::pki::Identity;
use strait_common::{Config, GatewayId};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;

use strait_common::config::Export;
use strait_discovery::model::MemberInfo;
use strait_discovery::node::{Node, NodeConfig};
use strait_discovery::source::{FileSource, to_catalog};
use strait_discovery::state::CatalogConfig;

use crate::faults::{self, Faults, PacketRules};
use crate::listener::{BoundListener, Listeners};
use crate::metrics::Metrics;
use crate::router::Locality;
use crate::routing::{self, Routing};
use crate::tunnel::peers::Peers;
use crate::tunnel::{self, codes, inbound};
use crate::{admin, reload};
use crate::{dns, federation};

/// State shared by a gateway's tasks.
pub struct Shared {
    /// The configuration the gateway started with.
    pub config: Config,
    /// The identity in use; swapped when certificates are rotated on disk.
    pub identity: ArcSwap<Identity>,
    /// This gateway's metrics.
    pub metrics: Metrics,
    /// Outbound tunnel connections.
    pub peers: Peers,
    /// The QUIC endpoint (both client and server).
    pub endpoint: quinn::Endpoint,
    /// Bounds inbound streams; beyond it peers are told `overloaded`.
    pub inbound_streams: Arc<Semaphore>,
    /// Round-robin cursor over endpoints.
    pub next_endpoint: AtomicUsize,
    /// This cluster's exports now (from the config file, reloaded with discovery).
    pub exports: ArcSwap<Vec<Export>>,
    /// Service listeners.
    pub listeners: Listeners,
    /// The discovery member, when discovery is configured.
    pub discovery: Option<Arc<Node>>,
    /// Per-service routing and failover state.
    pub routing: Routing,
    /// Drill faults injected through the admin API.
    pub faults: Faults,
    /// The `clusterset.local` zone served on `listen.dns`.
    pub dns: dns::Dns,
    /// When the gateway started.
    pub started: SystemTime,
}

/// A running gateway. Dropping it stops every task it started.
pub struct Gateway {
    shared: Arc<Shared>,
    admin_addr: SocketAddr,
    dns_addr: Option<SocketAddr>,
    tasks: JoinSet<()>,
}

impl Gateway {
    /// Loads the identity, binds every socket, and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        let udp = tunnel::bind_udp(config.listen.tunnel, &config.tunnel)
            .with_context(|| format!("binding the tunnel UDP socket {}", config.listen.tunnel))?;
        Self::start_on(config, udp).await
    }

    /// Like [`Gateway::start`], on an already-bound tunnel socket (see [`tunnel::bind_udp`]).
    pub async fn start_on(config: Config, udp: std::net::UdpSocket) -> anyhow::Result<Gateway> {
        let me = GatewayId::new(&config.trust_domain, &config.cluster);
        let identity = Identity::load(&config.tls.ca, &config.tls.cert, &config.tls.key, &me)
            .context("loading the gateway certificate")?;
        let server = tunnel::server_config(&identity, &config.tunnel)
            .context("building the tunnel TLS configuration")?;
        let faults = fault_state(&config)?;
        let endpoint = tunnel::endpoint_on(udp, server, &config.tunnel, faults.1)
            .context("starting the QUIC endpoint")?;
        let admin_listener = tokio::net::TcpListener::bind(config.listen.admin)
            .await
            .with_context(|| format!("binding the admin API {}", config.listen.admin))?;
        let admin_addr = admin_listener.local_addr()?;
        let dns_sockets = match config.listen.dns {
            Some(addr) => Some(
                dns::bind(addr)
                    .await
                    .with_context(|| format!("binding the DNS server {addr} (UDP and TCP)"))?,
            ),
            None => None,
        };
        let discovery = match &config.discovery {
            Some(d) => Some(Arc::new(
                start_discovery(&config, d, &identity, endpoint.local_addr()?).await?,
            )),
            None => None,
        };

        let metrics = Metrics::new();
        reload::publish_expiry(&metrics, &identity);
        let shared = Arc::new(Shared {
            peers: Peers::default(),
            inbound_streams: Arc::new(Semaphore::new(config.tunnel.max_inbound_streams as usize)),
            identity: ArcSwap::from_pointee(identity),
            metrics,
            endpoint,
            next_endpoint: AtomicUsize::new(0),
            exports: ArcSwap::from_pointee(config.exports.clone()),
            listeners: Listeners::default(),
            discovery,
            routing: Routing::new(
                Locality {
                    cluster: config.cluster.clone(),
                    region: config.region.clone(),
                    zone: config.zone.clone(),
                },
                config.routing.clone(),
            ),
            started: SystemTime::now(),
            faults: faults.0,
            dns: dns::Dns::new(config.dns.clone()),
            config,
        });

        let span = tracing::info_span!("gateway", cluster = %shared.config.cluster);
        let mut tasks = JoinSet::new();
        let failed = {
            let _entered = span.enter();
            shared.peers.reconcile(&shared, &shared.config.peers);
            let bind_error = shared
                .listeners
                .reconcile(&shared, &shared.config.imports)
                .await
                .into_iter()
                .next();
            let no_source = (shared.config.discovery.is_some() && shared.config.source.is_none())
                .then(|| anyhow::anyhow!("discovery needs the config file's path to reload exports (load it with Config::load)"));
            bind_error.or(no_source)
        };
        if let Some(e) = failed {
            // The tasks started so far hold the shared state: stop them, or a gateway that
            // failed to start would keep running (and gossiping) unseen.
            stop_all(&shared);
            return Err(e);
        }
        tasks.spawn(inbound::accept_loop(shared.clone()).instrument(span.clone()));
        tasks.spawn(admin::serve(shared.clone(), admin_listener).instrument(span.clone()));
        tasks.spawn(reload::watch_certificates(shared.clone()).instrument(span.clone()));
        tasks.spawn(routing::watch(shared.clone()).instrument(span.clone()));
        tasks.spawn(faults::expire(shared.clone()).instrument(span.clone()));
        shared.dns.update(&dns::entries(
            &shared.config.imports,
            None,
            &shared.config.cluster,
            &shared.config.region,
        ));
        let dns_addr = match &dns_sockets {
            Some((udp, _)) => Some(udp.local_addr()?),
            None => None,
        };
        if let Some((udp, tcp)) = dns_sockets {
            tracing::info!(parent: &span, address = %udp.local_addr()?, zone = %shared.config.dns.zone, "dns server listening");
            tasks.spawn(dns::serve_udp(shared.clone(), udp).instrument(span.clone()));
            tasks.spawn(dns::serve_tcp(shared.clone(), tcp).instrument(span.clone()));
        }
        // The config file is watched for what applies at run time: exports and routing.
        if let Some(path) = shared.config.source.clone() {
            let interval = shared
                .config
                .discovery
                .as_ref()
                .map_or(Duration::from_secs(1), |d| d.reload_interval.0);
            let source = FileSource::start(path, shared.config.clone(), interval);
            let config = source.config();
            let source = match (&shared.discovery, &shared.config.discovery) {
                (Some(node), Some(d)) => {
                    tasks.spawn(
                        federation::follow(
                            shared.clone(),
                            node.clone(),
                            Box::new(source),
                            d.import_addresses,
                        )
                        .instrument(span.clone()),
                    );
                    None
                }
                _ => Some(source),
            };
            tasks.spawn(
                reload::follow_config(shared.clone(), config, source).instrument(span.clone()),
            );
        }
        tracing::info!(parent: &span, tunnel = %shared.endpoint.local_addr()?, admin = %admin_addr, discovery = shared.discovery.is_some(), "gateway started");
        Ok(Gateway {
            shared,
            admin_addr,
            dns_addr,
            tasks,
        })
    }

    /// The tunnel's bound UDP address.
    pub fn tunnel_addr(&self) -> SocketAddr {
        self.shared
            .endpoint
            .local_addr()
            .expect("bound socket has an address")
    }

    /// The DNS server's bound address (UDP and TCP), when `listen.dns` is set.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns_addr
    }

    /// The admin API's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Bound service listeners.
    pub fn listeners(&self) -> Vec<BoundListener> {
        self.shared.listeners.snapshot()
    }

    /// The listener address for an imported `namespace/name` and service port.
    pub fn listener(&self, service: &str, port: u16) -> Option<SocketAddr> {
        self.shared.listeners.address(service, port)
    }

    /// The gossip address, when discovery runs.
    pub fn discovery_addr(&self) -> Option<SocketAddr> {
        self.shared.discovery.as_ref().map(|n| n.addr())
    }

    /// Shared state, for inspection.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Runs until one of the gateway's tasks ends (which only happens on a fatal error).
    pub async fn wait(&mut self) {
        self.tasks.join_next().await;
    }

    /// Closes every connection and stops every task, waiting briefly for peers to be told.
    pub async fn shutdown(mut self) {
        // Peer tasks first: left running, they would retry against the closed endpoint.
        stop_all(&self.shared);
        self.tasks.shutdown().await;
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.shared.endpoint.wait_idle()).await;
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        stop_all(&self.shared);
    }
}

/// Closes the endpoint and stops the tasks that hold the shared state (peer connections,
/// listeners, the discovery member), so nothing outlives the gateway.
fn stop_all(shared: &Shared) {
    shared
        .endpoint
        .close(codes::SHUTDOWN, b"gateway shutting down");
    shared.peers.clear();
    shared.listeners.clear();
    if let Some(node) = &shared.discovery {
        node.stop();
    }
}

/// The fault state, with the admin token read from `faults.token_file`, and the packet
/// rules the tunnel socket follows.
fn fault_state(config: &Config) -> anyhow::Result<(Faults, Arc<ArcSwapOption<PacketRules>>)> {
    let packets = Arc::new(ArcSwapOption::empty());
    let (token, max) = match &config.faults {
        None => (None, Duration::ZERO),
        Some(f) => {
            let token = std::fs::read_to_string(&f.token_file).with_context(|| {
                format!(
                    "reading faults.token_file {} (create it with a random token, e.g. `openssl rand -hex 32`)",
                    f.token_file.display()
                )
            })?;
            let token = token.trim().to_owned();
            anyhow::ensure!(
                token.len() >= 16,
                "faults.token_file {}: the token is {} characters; use at least 16 random ones (e.g. `openssl rand -hex 32`)",
                f.token_file.display(),
                token.len()
            );
            (Some(token), f.max_duration.0)
        }
    };
    Ok((Faults::new(token, max, packets.clone()), packets))
}

/// Binds the gossip port and starts the discovery member.
async fn start_discovery(
    config: &Config,
    d: &strait_common::config::Discovery,
    identity: &Identity,
    tunnel: SocketAddr,
) -> anyhow::Result<Node> {
    let addr = config
        .listen
        .discovery
        .context("listen.discovery is required with discovery")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the discovery port {addr}"))?;
    let mut gossip_addr = listener.local_addr()?;
    let mut tunnel_addr = tunnel;
    if let Some(ip) = d.advertise {
        gossip_addr.set_ip(ip);
        tunnel_addr.set_ip(ip);
    }
    let me = MemberInfo {
        cluster: config.cluster.clone(),
        region: config.region.clone(),
        zone: config.zone.clone(),
        tunnel_addr,
        gossip_addr,
    };
    // A restart must outrank the previous incarnation: start time in milliseconds.
    let generation = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let node_config = NodeConfig {
        interval: d.interval.0,
        fanout: d.fanout,
        seeds: d.seeds.clone(),
        catalog: CatalogConfig {
            lease: d.lease.0,
            phi_threshold: d.phi_threshold,
            min_heartbeat_interval: d.interval.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let node = Node::start(
        me,
        generation,
        Arc::new(identity.clone()),
        listener,
        node_config,
    )?;
    node.set_local(to_catalog(&config.exports, &config.zone));
    Ok(node)
}

/// Raises the open-file limit to its hard maximum: each proxied connection holds two
/// sockets, and the usual soft limit of 1024 is far below what a gateway carries.
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
