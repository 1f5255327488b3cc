//! One running gateway: binds its sockets, starts the tunnel, listeners, admin API and
//! certificate reloader, and shuts them down together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use arc_swap::ArcSwap;
use strait_common::pki::Identity;
use strait_common::{Config, GatewayId};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::listener::{self, BoundListener};
use crate::metrics::Metrics;
use crate::tunnel::peers::{self, Peers};
use crate::tunnel::{self, codes, inbound};
use crate::{admin, reload};

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
    /// Bound service listeners.
    pub listeners: Vec<BoundListener>,
    /// When the gateway started.
    pub started: SystemTime,
}

/// A running gateway. Dropping it stops every task it started.
pub struct Gateway {
    shared: Arc<Shared>,
    admin_addr: SocketAddr,
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
        let endpoint = tunnel::endpoint_on(udp, server, &config.tunnel)
            .context("starting the QUIC endpoint")?;
        let bound = listener::bind_all(&config.imports).await?;
        let admin_listener = tokio::net::TcpListener::bind(config.listen.admin)
            .await
            .with_context(|| format!("binding the admin API {}", config.listen.admin))?;
        let admin_addr = admin_listener.local_addr()?;
        for (what, addr) in [
            ("discovery", config.listen.discovery),
            ("dns", config.listen.dns),
        ] {
            if let Some(addr) = addr {
                tracing::warn!(%addr, "listen.{what} is configured but not served by this version");
            }
        }

        let metrics = Metrics::new();
        reload::publish_expiry(&metrics, &identity);
        let shared = Arc::new(Shared {
            peers: Peers::new(&config.peers),
            inbound_streams: Arc::new(Semaphore::new(config.tunnel.max_inbound_streams as usize)),
            identity: ArcSwap::from_pointee(identity),
            metrics,
            endpoint,
            next_endpoint: AtomicUsize::new(0),
            listeners: bound.iter().map(|b| b.info.clone()).collect(),
            started: SystemTime::now(),
            config,
        });

        let span = tracing::info_span!("gateway", cluster = %shared.config.cluster);
        let mut tasks = JoinSet::new();
        tasks.spawn(inbound::accept_loop(shared.clone()).instrument(span.clone()));
        for peer in shared.peers.iter() {
            tasks.spawn(peers::maintain(shared.clone(), peer.clone()).instrument(span.clone()));
        }
        for b in bound {
            tasks.spawn(listener::serve(shared.clone(), b).instrument(span.clone()));
        }
        tasks.spawn(admin::serve(shared.clone(), admin_listener).instrument(span.clone()));
        tasks.spawn(reload::watch_certificates(shared.clone()).instrument(span.clone()));
        tracing::info!(parent: &span, tunnel = %shared.endpoint.local_addr()?, admin = %admin_addr, listeners = shared.listeners.len(), "gateway started");
        Ok(Gateway {
            shared,
            admin_addr,
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

    /// The admin API's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Bound service listeners.
    pub fn listeners(&self) -> &[BoundListener] {
        &self.shared.listeners
    }

    /// The listener address for an imported `namespace/name` and service port.
    pub fn listener(&self, service: &str, port: u16) -> Option<SocketAddr> {
        self.shared
            .listeners
            .iter()
            .find(|l| l.service == service && l.port == port)
            .map(|l| l.address)
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
        self.shared
            .endpoint
            .close(codes::SHUTDOWN, b"gateway shutting down");
        self.tasks.shutdown().await;
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.shared.endpoint.wait_idle()).await;
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shared
            .endpoint
            .close(codes::SHUTDOWN, b"gateway shutting down");
    }
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
