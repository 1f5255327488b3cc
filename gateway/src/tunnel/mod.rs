//! The QUIC mTLS tunnel between gateways: one connection per peer, one bidirectional
//! stream per proxied TCP connection, a [`header`] exchange before payload.

pub mod header;
pub(crate) mod inbound;
pub(crate) mod limits;
pub mod outbound;
pub mod peers;
pub(crate) mod socket;
pub mod splice;

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use strait_common::config::TunnelTuning;
use strait_common::pki::{Identity, PkiError};

use crate::metrics::{Desc, Registry};
use splice::Side;

/// The gateway's identity now: read for each new handshake, replaced by certificate
/// rotation. Cheap to clone: clones share it.
#[derive(Clone)]
pub(crate) struct CurrentIdentity(Arc<arc_swap::ArcSwap<Identity>>);

impl CurrentIdentity {
    /// Starts with `identity`.
    pub fn new(identity: Identity) -> Self {
        Self(Arc::new(arc_swap::ArcSwap::from_pointee(identity)))
    }

    /// The identity in use.
    pub fn load(&self) -> Arc<Identity> {
        self.0.load_full()
    }

    /// Presents `identity` from now on (rotation does this).
    pub(crate) fn store(&self, identity: Identity) {
        self.0.store(Arc::new(identity));
    }
}

const OPENED: Desc = Desc::counter(
    "strait_streams_opened_total",
    &["service", "peer", "direction"],
    "Tunnel streams opened that reached an endpoint (direction: outbound or inbound), by service and peer cluster.",
);
const FAILED: Desc = Desc::counter(
    "strait_streams_failed_total",
    &["service", "peer", "side", "reason"],
    "Tunnel streams that did not reach an endpoint, by service, peer, side (outbound: opened here; inbound: refused here) and reason (a refusal status: no-endpoints, forbidden, connect-failed, overloaded, draining, unspecified; or peer-down, timeout, stream-error, peer-unresponsive, protocol-error). Inbound, a service this cluster does not export is `(unknown)`.",
);
const BYTES: Desc = Desc::counter(
    "strait_bytes_total",
    &["service", "peer", "side", "direction"],
    "Payload bytes proxied, by service, peer, side (outbound or inbound) and direction (sent=towards the service).",
);
const ACTIVE: Desc = Desc::gauge(
    "strait_active_connections",
    &["service", "peer", "direction"],
    "Proxied connections open now, by service, peer cluster and direction (outbound or inbound).",
);
/// Metrics of proxied streams, both sides of the tunnel.
pub(crate) const STREAM_METRICS: &[Desc] = &[OPENED, FAILED, BYTES, ACTIVE];

/// What both sides of the tunnel count about proxied streams.
#[derive(Clone)]
pub(crate) struct StreamMetrics(Registry);

impl StreamMetrics {
    /// The stream metrics in `registry`.
    pub fn new(registry: &Registry) -> Self {
        registry.describe(STREAM_METRICS);
        Self(registry.clone())
    }

    /// A stream to or from `peer` for `service` did not reach an endpoint.
    pub fn failed(&self, service: &str, peer: &str, side: Side, reason: &str) {
        self.0
            .counter(&FAILED, &[service, peer, side.label(), reason])
            .increment(1);
    }

    fn opened(&self, service: &str, peer: &str, side: Side) {
        self.0
            .counter(&OPENED, &[service, peer, side.label()])
            .increment(1);
    }

    fn active(&self, service: &str, peer: &str, side: Side) -> metrics::Gauge {
        self.0.gauge(&ACTIVE, &[service, peer, side.label()])
    }

    fn bytes(&self, service: &str, peer: &str, side: Side, sent: u64, received: u64) {
        self.0
            .counter(&BYTES, &[service, peer, side.label(), "sent"])
            .increment(sent);
        self.0
            .counter(&BYTES, &[service, peer, side.label(), "received"])
            .increment(received);
    }
}

/// What a draining gateway sends, on a unidirectional stream, on each tunnel connection it
/// serves: the peer sends it no new streams (those open finish) and uses its siblings, or
/// other clusters, until it is back (a fresh connection).
pub(crate) const GOAWAY: &[u8] = b"strait goaway v1";

/// QUIC application error codes used when closing connections and resetting streams.
pub mod codes {
    use quinn::VarInt;
    /// Gateway shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(0);
    /// The TCP side of the proxied connection was reset.
    pub const TCP_RESET: VarInt = VarInt::from_u32(1);
    /// The stream header was malformed or late.
    pub const BAD_HEADER: VarInt = VarInt::from_u32(2);
    /// The peer's identity could not be read after the handshake.
    pub const BAD_IDENTITY: VarInt = VarInt::from_u32(3);
    /// The opener gave up on the stream before the remote's answer arrived.
    pub const ABANDONED: VarInt = VarInt::from_u32(4);
}

/// Streams a peer may open on a new connection at first (or `tunnel.max_concurrent_streams`
/// if lower). quinn keeps an entry for every stream the peer may open, in two maps that
/// never shrink: granting all 16,384 up front cost every connection 1.3 MiB at each end.
/// The serving side raises the grant as the peer uses it (`inbound::raised_credit`).
pub const INITIAL_STREAM_CREDIT: u32 = 256;

/// The bidirectional streams a peer may open on a new connection to this gateway.
pub(crate) fn initial_stream_credit(max_concurrent_streams: u32) -> u32 {
    INITIAL_STREAM_CREDIT.min(max_concurrent_streams)
}

/// Builds the transport tuning of one side: the serving side lets its peer open
/// `bidi_streams` at first; the calling side lets its peer open none (streams go one way:
/// a gateway opens them on the connections it made).
pub fn transport_config(t: &TunnelTuning, bidi_streams: u32) -> Arc<TransportConfig> {
    let mut c = TransportConfig::default();
    c.max_concurrent_bidi_streams(VarInt::from_u32(bidi_streams));
    // One: the GOAWAY a draining gateway sends its peers. A gateway accepts none (it never
    // reads them on its inbound side), so one is all a peer can hold open there.
    c.max_concurrent_uni_streams(VarInt::from_u32(1));
    c.stream_receive_window(VarInt::from_u64(t.stream_window.0).unwrap_or(VarInt::MAX));
    c.receive_window(VarInt::from_u64(t.connection_window.0).unwrap_or(VarInt::MAX));
    c.send_window(t.connection_window.0);
    c.keep_alive_interval(Some(t.keep_alive.0));
    // Datagrams carry only liveness probes (a few bytes every keep-alive).
    c.datagram_receive_buffer_size(Some(64 << 10));
    c.datagram_send_buffer_size(64 << 10);
    c.max_idle_timeout(IdleTimeout::try_from(t.idle_timeout.0).ok());
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(t.max_udp_payload);
    c.mtu_discovery_config(Some(mtu));
    Arc::new(c)
}

/// The server side: requires and verifies a peer gateway certificate.
pub fn server_config(
    identity: &Identity,
    t: &TunnelTuning,
) -> Result<quinn::ServerConfig, PkiError> {
    let tls = identity.server_config()?;
    let quic = QuicServerConfig::try_from(tls)
        .map_err(|e| PkiError::Tls(rustls::Error::General(e.to_string())))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport_config(
        t,
        initial_stream_credit(t.max_concurrent_streams),
    ));
    Ok(cfg)
}

/// The client side towards `peer_cluster`, whose certificate must carry that identity.
pub fn client_config(
    identity: &Identity,
    peer_cluster: &str,
    t: &TunnelTuning,
) -> Result<quinn::ClientConfig, PkiError> {
    let tls = identity.client_config(peer_cluster)?;
    let quic = QuicClientConfig::try_from(tls)
        .map_err(|e| PkiError::Tls(rustls::Error::General(e.to_string())))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport_config(t, 0));
    Ok(cfg)
}

/// Binds the tunnel's UDP socket with large buffers (so callers can learn its address
/// before the gateway starts, e.g. to wire up a local federation on ephemeral ports).
pub fn bind_udp(addr: SocketAddr, t: &TunnelTuning) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    let size = t.udp_buffer.0 as usize;
    // Larger buffers absorb bursts at high throughput; the kernel caps them at
    // net.core.{r,w}mem_max, which is reported so operators can raise it.
    if socket.set_recv_buffer_size(size).is_err() || socket.set_send_buffer_size(size).is_err() {
        tracing::warn!(size, "could not set UDP socket buffer sizes");
    }
    let (rcv, snd) = (
        socket.recv_buffer_size().unwrap_or(0),
        socket.send_buffer_size().unwrap_or(0),
    );
    if rcv < size {
        tracing::debug!(
            requested = size,
            receive = rcv,
            send = snd,
            "kernel capped UDP buffers; raise net.core.rmem_max/wmem_max for more throughput"
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The tunnel's UDP socket as the endpoint uses it. Holding it tells when quinn has let go
/// of the socket (see [`TunnelSocket::released`]).
pub(crate) struct TunnelSocket(Arc<socket::FaultSocket>);

impl TunnelSocket {
    /// Waits (at most `limit`) until the endpoint's driver has dropped the socket, then
    /// closes it: the port is free for a restart. Call once every endpoint handle is gone.
    pub(crate) async fn released(self, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        // The endpoint holds this socket, and each connection's I/O poller the runtime's
        // socket inside it: both must be gone (the pollers can outlive the connection's
        // hold on this socket for a moment on a multi-threaded runtime).
        while Arc::strong_count(&self.0) > 1 || self.0.other_users() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            // The driver ends on its next poll once the last handle is gone.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        true
    }
}

/// Starts the QUIC endpoint on a bound UDP socket, behind the drill fault layer
/// ([`socket::FaultSocket`]) that `faults` steers.
pub(crate) fn endpoint_on(
    socket: std::net::UdpSocket,
    server: quinn::ServerConfig,
    t: &TunnelTuning,
    faults: Arc<arc_swap::ArcSwapOption<socket::PacketRules>>,
) -> std::io::Result<(quinn::Endpoint, TunnelSocket)> {
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    let mut config = quinn::EndpointConfig::default();
    // The advertised limit caps what the *peer* may send, so MTU discovery's upper bound
    // only takes effect when both ends raise it (quinn's default is 1480).
    config
        .max_udp_payload_size(t.max_udp_payload)
        .map_err(|e| std::io::Error::other(format!("tunnel.max_udp_payload: {e}")))?;
    let socket = runtime.wrap_udp_socket(socket)?;
    let socket = Arc::new(socket::FaultSocket::new(socket, faults, t.max_udp_payload));
    let endpoint =
        quinn::Endpoint::new_with_abstract_socket(config, Some(server), socket.clone(), runtime)?;
    Ok((endpoint, TunnelSocket(socket)))
}
