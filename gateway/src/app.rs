//! The assembly: the one file that knows every component. It binds the sockets, builds
//! each component from exactly what that component reads, starts their tasks in one
//! [`Lifetime`], and stops them. Nothing else imports it but the binary, the demo and the
//! tests (through [`Gateway`]).
//!
//! ```text
//! config file ─┐                                  ┌─► peers      (tunnel per peer)
//! exports ─────┤                                  ├─► listeners  (one per import port)
//! discovery ───┼─► desired::run ─► watch<Desired> ┼─► routing    (services, catalog, policy)
//! faults ──────┘    (one writer)                  ├─► dns        (zone)
//!                                                 ├─► inbound    (exports it may serve)
//!                                                 └─► federation (what is published)
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwapOption;
use strait_common::pki::Identity;
use strait_common::{Config, GatewayId};
use strait_discovery::source::{ExportSource, FileSource};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::admin::{self, AdminState};
use crate::desired::{self, Allocation, Desired, Exports, Local, Sources};
use crate::dns::{self, Dns, DnsMetrics};
use crate::drain::{self, Drain, Draining};
use crate::faults::{FaultMetrics, Faults, Targets, Token};
use crate::federation::Federation;
use crate::kubernetes;
use crate::lifetime::Lifetime;
use crate::listener::{BoundListener, Forwarding, ListenerMetrics, Listeners};
use crate::metrics::{Desc, Registry};
use crate::rotation::{CertMetrics, Install, Rotation, TunnelServer};
use crate::router::Locality;
use crate::routing::{RouteReport, Routing, RoutingMetrics};
use crate::tunnel::inbound::{Inbound, InboundMetrics, Limits};
use crate::tunnel::peers::{Dialer, PeerMetrics, PeerState, Peers};
use crate::tunnel::{self, CurrentIdentity, StreamMetrics, codes};

/// A running gateway. It stops on [`Gateway::shutdown`], or when dropped.
pub struct Gateway {
    life: Lifetime,
    tasks: JoinSet<()>,
    endpoint: quinn::Endpoint,
    /// Kept to know when the endpoint has let go of the port (see `shutdown`).
    socket: Option<tunnel::TunnelSocket>,
    tunnel_addr: SocketAddr,
    admin_addr: SocketAddr,
    dns_addr: Option<SocketAddr>,
    federation: Option<Federation>,
    identity: CurrentIdentity,
    peers: Peers,
    listeners: Listeners,
    routing: Routing,
    metrics: Registry,
    drain: Drain,
}

impl Gateway {
    /// Loads the identity, binds every socket, and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        let udp = tunnel::bind_udp(config.listen.tunnel, &config.tunnel)
            .map_err(|e| bind_error("the tunnel UDP socket", config.listen.tunnel, e))?;
        Self::start_on(config, udp).await
    }

    /// Like [`Gateway::start`], on an already-bound tunnel socket (see [`tunnel::bind_udp`]).
    pub async fn start_on(mut config: Config, udp: std::net::UdpSocket) -> anyhow::Result<Gateway> {
        anyhow::ensure!(
            config.discovery.is_none() || config.source.is_some(),
            "discovery needs the config file's path to reload exports (load it with Config::load)"
        );
        let me = GatewayId::new(&config.trust_domain, &config.cluster);
        let identity = Identity::load(&config.tls.ca, &config.tls.cert, &config.tls.key, &me)
            .context("loading the gateway certificate")?;
        let server = tunnel::server_config(&identity, &config.tunnel)
            .context("building the tunnel TLS configuration")?;
        let (token, max_fault) = fault_token(&config)?;
        let packets = Arc::new(ArcSwapOption::empty());
        let (endpoint, socket) = tunnel::endpoint_on(udp, server, &config.tunnel, packets.clone())
            .context("starting the QUIC endpoint")?;
        let admin_listener = tokio::net::TcpListener::bind(config.listen.admin)
            .await
            .map_err(|e| bind_error("the admin API", config.listen.admin, e))?;
        let admin_addr = admin_listener.local_addr()?;
        // Replicas of one cluster on one host serve the same addresses (the kernel spreads
        // clients over them); each replica's own ports (tunnel, admin, gossip) stay its own.
        let shared_ports = crate::federation::replica_name(&config).is_some();
        let dns_sockets = match config.listen.dns {
            Some(addr) => Some(dns::bind(addr, shared_ports).await.map_err(|e| {
                match e.downcast::<std::io::Error>() {
                    Ok(io) => bind_error("the DNS server (UDP and TCP)", addr, io),
                    Err(e) => e.context(format!("binding the DNS server {addr}")),
                }
            })?),
            None => None,
        };
        let dns_addr = match &dns_sockets {
            Some((udp, _)) => Some(udp.local_addr()?),
            None => None,
        };
        let metrics = Registry::new();
        metrics.identify(&config.cluster, &config.region);
        let tunnel_addr = endpoint.local_addr()?;
        let kube_client = match &config.kubernetes {
            Some(k) => {
                let client = kubernetes::client(k).await?;
                kubernetes::check_cluster_id(&client, &config.cluster).await?;
                if let Some(d) = config.discovery.as_mut()
                    && d.advertise.is_none()
                    && config.listen.tunnel.ip().is_unspecified()
                {
                    d.advertise = Some(kubernetes::advertise_address(&client, k).await?);
                }
                Some(client)
            }
            None => None,
        };
        let federation = match &config.discovery {
            Some(d) => {
                let services = desired::published(
                    &config.exports,
                    &config.zone,
                    &desired::CatalogFaults::default(),
                );
                let f = Federation::start(&config, d, &identity, tunnel_addr, services, &metrics);
                Some(f.await?)
            }
            None => None,
        };
        let node = federation.as_ref().map(|f| f.node().clone());

        let span = tracing::info_span!(
            "gateway",
            cluster = %config.cluster,
            replica = tracing::field::Empty
        );
        if let Some(name) = crate::federation::replica_name(&config) {
            span.record("replica", name.as_str());
        }
        let life = Lifetime::new();
        let drain = Drain::new();
        let identity = CurrentIdentity::new(identity);
        let streams = StreamMetrics::new(&metrics);
        let peers = Peers::new(
            Dialer {
                endpoint: endpoint.clone(),
                identity: identity.clone(),
                tuning: config.tunnel.clone(),
            },
            PeerMetrics::new(&metrics),
            life.child(),
        );

        // The desired state: its one writer's inputs, and its first value, computed now so
        // that a configured import that cannot be bound fails the start.
        let (desired_tx, desired) = watch::channel(Arc::new(Desired::default()));
        let faults = Arc::new(Faults::new(
            token,
            max_fault,
            Targets {
                packets,
                peers: peers.clone(),
                discovery: node.clone(),
                exports: Exports::new(desired.clone()),
            },
            FaultMetrics::new(&metrics),
        ));
        let file = config.source.clone().map(|path| {
            let interval = config
                .discovery
                .as_ref()
                .map_or(Duration::from_secs(1), |d| d.reload_interval.0);
            FileSource::start(path, config.clone(), interval)
        });
        let kube = kube_client.map(|client| {
            let k = config
                .kubernetes
                .as_ref()
                .expect("a client only in Kubernetes mode");
            // A new writer waits this long before deleting: the federation's view fills.
            let settle = config
                .discovery
                .as_ref()
                .map_or(Duration::ZERO, |d| d.lease.0);
            kubernetes::start(
                client,
                &config.cluster,
                k,
                settle,
                desired.clone(),
                node.clone(),
                &metrics,
            )
        });
        let mut sources = Sources {
            exports: match (&kube, &file) {
                (Some(k), _) => k.exports.watch(),
                (None, Some(f)) => f.watch(),
                (None, None) => watch::channel(Arc::new(config.exports.clone())).1,
            },
            config: match &file {
                Some(f) => f.config(),
                None => watch::channel(Arc::new(config.clone())).1,
            },
            view: node.as_ref().map(|n| n.subscribe()),
            faults: faults.catalog(),
            placement: kube.as_ref().map(|k| k.placement.clone()),
            properties: kube.as_ref().map(|k| k.exports.properties()),
        };
        let local = Local::from(&config);
        let mut alloc = Allocation::default();
        let first = Arc::new(sources.compute(&local, &mut alloc));
        desired_tx.send_replace(first.clone());

        let routing = Routing::new(
            Locality {
                cluster: config.cluster.clone(),
                region: config.region.clone(),
                zone: config.zone.clone(),
            },
            desired.clone(),
            Arc::new(peers.clone()),
            config.tunnel.connect_timeout.0,
            RoutingMetrics::new(&metrics),
        );
        let listeners = Listeners::new(
            Forwarding {
                routing: routing.clone(),
                peers: Arc::new(peers.clone()),
                metrics: ListenerMetrics::new(&metrics, streams.clone()),
                copy_buffer: config.tunnel.copy_buffer.0 as usize,
                local: Exports::new(desired.clone()),
                connect_timeout: config.tunnel.endpoint_connect_timeout.0,
                shared_ports,
                open: Default::default(),
            },
            life.child(),
        );
        span.in_scope(|| peers.reconcile(&first.peers));
        let bind_errors = listeners
            .reconcile(&first.imports)
            .instrument(span.clone())
            .await;
        if let Some(e) = bind_errors.into_iter().next() {
            // Peer tasks have started: stop them, or a gateway that failed to start would
            // keep running (and gossiping) unseen.
            stop(&life, &endpoint, node.as_deref());
            return Err(e);
        }
        let dns = Arc::new(Dns::new(config.dns.clone(), DnsMetrics::new(&metrics)));
        dns.update(&first.dns);
        let inbound = Arc::new(Inbound::new(
            Exports::new(desired.clone()),
            config.tunnel.max_inbound_streams as usize,
            Limits {
                handshake_timeout: config.tunnel.connect_timeout.0,
                endpoint_connect_timeout: config.tunnel.endpoint_connect_timeout.0,
                copy_buffer: config.tunnel.copy_buffer.0 as usize,
                retry_above: config.tunnel.retry_above as usize,
                max_handshakes: config.tunnel.max_handshakes as usize,
                max_concurrent_streams: config.tunnel.max_concurrent_streams,
            },
            InboundMetrics::new(&metrics, streams),
            faults.killed(),
            drain.subscribe(),
        ));
        let mut rotate: Vec<Box<dyn Install>> = vec![Box::new(TunnelServer {
            endpoint: endpoint.clone(),
            tuning: config.tunnel.clone(),
        })];
        if let Some(n) = &node {
            rotate.push(Box::new(n.clone()));
        }
        let rotation = Rotation::new(
            config.tls.clone(),
            me,
            identity.clone(),
            rotate,
            CertMetrics::new(&metrics),
        );
        let admin_state = AdminState {
            cluster: config.cluster.clone(),
            identity: identity.clone(),
            peers: peers.clone(),
            listeners: listeners.clone(),
            routing: routing.clone(),
            desired: desired.clone(),
            federation: federation.clone(),
            metrics: metrics.clone(),
            kubernetes: kube.as_ref().map(|k| k.health.clone()),
            drain: drain.clone(),
            drain_config: config.drain.clone(),
            instance: rand::random(),
            replica: config.discovery.as_ref().and_then(|d| d.replica.clone()),
        };

        let mut tasks = JoinSet::new();
        let mut spawn = |task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
            tasks.spawn(life.bound(task).instrument(span.clone()));
        };
        spawn(Box::pin(async move {
            // The file watcher lives as long as the writer that reads it.
            let _file = file;
            desired::run(local, sources, alloc, desired_tx).await
        }));
        for task in kube.map(|k| k.tasks).into_iter().flatten() {
            spawn(task);
        }
        spawn(Box::pin(peers.clone().follow(desired.clone())));
        spawn(Box::pin(listeners.clone().follow(desired.clone())));
        spawn(Box::pin(routing.clone().run()));
        spawn(Box::pin(dns.clone().follow(desired.clone())));
        spawn(Box::pin(
            inbound.clone().accept_loop(endpoint.clone(), life.child()),
        ));
        spawn(Box::pin(admin::serve(
            admin_state,
            faults.clone(),
            admin_listener,
        )));
        spawn(Box::pin(faults.expire()));
        let (open_listeners, open_inbound, closing, counting) = (
            listeners.clone(),
            inbound.clone(),
            listeners.clone(),
            listeners.clone(),
        );
        spawn(Box::pin(drain::run(
            drain.clone(),
            Draining {
                config: config.drain.clone(),
                close_listeners: Box::new(move || closing.close()),
                listeners: Box::new(move || counting.count()),
                node: node.clone(),
                open: Box::new(move || {
                    open_listeners.open_connections() + open_inbound.open_streams()
                }),
            },
        )));
        spawn(Box::pin(rotation.run()));
        if let Some(f) = &federation {
            spawn(Box::pin(f.clone().publish(desired.clone())));
        }
        if let (Some((udp, tcp)), Some(address)) = (dns_sockets, dns_addr) {
            tracing::info!(parent: &span, %address, zone = %config.dns.zone, "dns server listening");
            spawn(Box::pin(dns::serve_udp(dns.clone(), udp)));
            spawn(Box::pin(dns::serve_tcp(
                dns.clone(),
                tcp,
                dns::TcpLimits::default(),
                life.child(),
            )));
        }
        tracing::info!(parent: &span, tunnel = %tunnel_addr, admin = %admin_addr, discovery = federation.is_some(), "gateway started");
        Ok(Gateway {
            life,
            tasks,
            endpoint,
            socket: Some(socket),
            tunnel_addr,
            admin_addr,
            dns_addr,
            federation,
            identity,
            peers,
            listeners,
            routing,
            metrics,
            drain,
        })
    }

    /// Starts draining (see [`crate::drain`]): [`Gateway::wait`] returns once it is over.
    /// Whether this call started it.
    pub fn start_drain(&self) -> bool {
        self.drain.start()
    }

    /// Drains: returns once no proxied connection is open, or `drain.grace` has passed.
    pub async fn drain(&self) {
        self.drain.start();
        self.drain.drained().await;
    }

    /// Whether it drains (or has drained).
    pub fn is_draining(&self) -> bool {
        self.drain.is_draining()
    }

    /// Whether its drain is over (it should now be shut down).
    pub fn drain_over(&self) -> bool {
        self.drain.is_over()
    }

    /// The tunnel's bound UDP address.
    pub fn tunnel_addr(&self) -> SocketAddr {
        self.tunnel_addr
    }

    /// The DNS server's bound address (UDP and TCP), when `listen.dns` is set.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns_addr
    }

    /// The admin API's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The gossip address, when discovery runs.
    pub fn discovery_addr(&self) -> Option<SocketAddr> {
        self.federation.as_ref().map(|f| f.node().addr())
    }

    /// Bound service listeners.
    pub fn listeners(&self) -> Vec<BoundListener> {
        self.listeners.snapshot()
    }

    /// The listener address for an imported `namespace/name` and service port.
    pub fn listener(&self, service: &str, port: u16) -> Option<SocketAddr> {
        self.listeners.address(service, port)
    }

    /// The certificate in use.
    pub fn identity(&self) -> Arc<Identity> {
        self.identity.load()
    }

    /// The tunnel state of a peer, followed as it changes; `None` if it is not a peer.
    pub fn peer(&self, cluster: &str) -> Option<watch::Receiver<PeerState>> {
        self.peers.get(cluster).map(|p| p.subscribe())
    }

    /// The replicas of peer `cluster` new connections may go to now, by name (the empty
    /// name for a cluster's only gateway).
    pub fn routable_replicas(&self, cluster: &str) -> Vec<String> {
        self.peers
            .replicas(cluster)
            .iter()
            .filter(|p| p.liveness().routable)
            .map(|p| p.target.replica.clone())
            .collect()
    }

    /// Open tunnel connections (inbound and outbound).
    pub fn tunnel_connections(&self) -> usize {
        self.endpoint.open_connections()
    }

    /// How an imported service (`namespace/name`) routes now.
    pub fn route(&self, service: &str) -> Option<RouteReport> {
        self.routing.report(Some(service)).pop()
    }

    /// The Prometheus text of this gateway's metrics (as `/metrics` serves it).
    pub fn render_metrics(&self) -> String {
        if let Some(f) = &self.federation {
            f.publish_metrics();
        }
        self.metrics.render()
    }

    /// Runs until one of the gateway's tasks ends: a drain that is over, or a fatal error.
    pub async fn wait(&mut self) {
        self.tasks.join_next().await;
    }

    /// Closes every connection and stops every task, waiting briefly for them to end and
    /// for peers to be told.
    pub async fn shutdown(self) {
        self.stop_and_wait().await;
    }

    /// [`Gateway::shutdown`], then waits (at most 5 s in all) until the endpoint has let go
    /// of the tunnel's UDP port, so that a gateway can start again on the same ports at
    /// once (a restart in the same process; a new process needs no wait). Closed
    /// connections drain first: about 3 s for one that was still handshaking (with a dead
    /// peer, say), as QUIC waits three probe timeouts of its initial 333 ms RTT estimate.
    /// Proxied connections still open keep the port until they end.
    pub async fn shutdown_and_release(self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        if let Some(socket) = self.stop_and_wait().await
            && !socket
                .released(deadline.saturating_duration_since(tokio::time::Instant::now()))
                .await
        {
            tracing::warn!(
                "the tunnel socket is still in use 5s after shutdown began (proxied connections still open?)"
            );
        }
    }

    /// Stops, waits for the tasks and for the peers to be told, and drops every handle; the
    /// tunnel socket, to wait for its release.
    async fn stop_and_wait(mut self) -> Option<tunnel::TunnelSocket> {
        self.stop();
        let joined = tokio::time::timeout(Duration::from_secs(2), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            tracing::warn!("gateway tasks did not stop within 2s");
        }
        if !self.life.wait(Duration::from_secs(1)).await {
            tracing::warn!("gateway connection tasks did not stop within 1s");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        self.socket.take()
    }

    /// Tells every task to stop, closes the tunnel and leaves the gossip.
    fn stop(&self) {
        stop(
            &self.life,
            &self.endpoint,
            self.federation.as_ref().map(|f| &**f.node()),
        );
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stop(life: &Lifetime, endpoint: &quinn::Endpoint, node: Option<&strait_discovery::node::Node>) {
    life.stop();
    endpoint.close(codes::SHUTDOWN, b"gateway shutting down");
    if let Some(n) = node {
        n.stop();
    }
}

/// Every metric a gateway can export, component by component (docs/METRICS.md lists
/// exactly these).
pub fn metrics_reference() -> Vec<&'static Desc> {
    [
        crate::metrics::METRICS,
        crate::tunnel::STREAM_METRICS,
        crate::tunnel::peers::METRICS,
        crate::tunnel::inbound::METRICS,
        crate::listener::METRICS,
        crate::routing::METRICS,
        crate::dns::METRICS,
        crate::rotation::METRICS,
        crate::federation::METRICS,
        crate::faults::METRICS,
        crate::kubernetes::METRICS,
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// A socket that cannot be bound, with what to do about it.
fn bind_error(what: &str, addr: SocketAddr, e: std::io::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "binding {what} {addr}: {e}\n  fix: {}",
        strait_common::config::bind_fix(&e)
    )
}

/// The admin token from `faults.token_file` (fault injection is off without one), and the
/// longest fault it may ask for.
fn fault_token(config: &Config) -> anyhow::Result<(Token, Duration)> {
    let Some(f) = &config.faults else {
        return Ok((Token::new(None), Duration::ZERO));
    };
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
    Ok((Token::new(Some(token)), f.max_duration.0))
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
