//! The DNS server: answers `clusterset.local` names from the desired state's DNS entries
//! (imports and catalog), over UDP and TCP on `listen.dns`. The zone is rebuilt whenever
//! those change ([`Dns::follow`]) and swapped in whole; queries read it without locks.
//!
//! Wire format and parsing come from hickory-dns's protocol crate; the answers are
//! precomputed per name (see [`zone`]), so the serving loops here only move bytes.

mod batch;
pub mod zone;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use strait_common::config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};

use crate::desired::Desired;
use crate::lifetime::Lifetime;
use crate::metrics::{Desc, Registry};
use zone::{ServiceEntry, Spec, Transport, Zone};

/// How the DNS server shares its TCP side.
#[derive(Debug, Clone, Copy)]
pub struct TcpLimits {
    /// Most connections served at once; further ones wait, first come first served.
    pub connections: usize,
    /// A connection with no complete query for this long is closed.
    pub idle: Duration,
    /// A connection is closed after this long whatever it does, so clients that keep
    /// their connections busy cannot hold every slot from the others (a slow-client
    /// attack); resolvers reconnect.
    pub lifetime: Duration,
}

impl Default for TcpLimits {
    fn default() -> Self {
        TcpLimits {
            connections: 512,
            idle: Duration::from_secs(10),
            lifetime: Duration::from_secs(30),
        }
    }
}

const QUERIES: Desc = Desc::counter(
    "strait_dns_queries_total",
    &["transport"],
    "DNS queries received on listen.dns, by transport (udp, tcp).",
);
const DROPPED: Desc = Desc::counter(
    "strait_dns_dropped_total",
    &["transport"],
    "DNS datagrams not answered (not a request, or no room to answer), by transport.",
);
const RESPONSES: Desc = Desc::counter(
    "strait_dns_responses_total",
    &["transport", "rcode"],
    "DNS responses sent, by transport and response code (NOERROR, NXDOMAIN, REFUSED, FORMERR, NOTIMP, SERVFAIL; an EDNS BADVERS counts as NOERROR, its header code).",
);
/// The DNS server's metrics.
pub(crate) const METRICS: &[Desc] = &[QUERIES, DROPPED, RESPONSES];

/// Header response codes 0..=5 by name; the others are not sent by this server.
const RCODES: [&str; 6] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED",
];

/// The responses counter of each response code, for one transport.
struct Responses([metrics::Counter; 6]);

impl Responses {
    /// Counts `reply` by the response code in its header.
    fn count(&self, reply: &[u8]) {
        if let Some(flags) = reply.get(3)
            && let Some(c) = self.0.get(usize::from(flags & 0x0f))
        {
            c.increment(1);
        }
    }
}

/// What the DNS server counts (its series appear once it serves).
#[derive(Clone)]
pub struct DnsMetrics(Registry);

impl DnsMetrics {
    /// The DNS metrics in `registry`.
    pub fn new(registry: &Registry) -> Self {
        registry.describe(METRICS);
        Self(registry.clone())
    }

    fn queries(&self, transport: &str) -> metrics::Counter {
        self.0.counter(&QUERIES, &[transport])
    }

    fn dropped(&self, transport: &str) -> metrics::Counter {
        self.0.counter(&DROPPED, &[transport])
    }

    fn responses(&self, transport: &str) -> Responses {
        Responses(RCODES.map(|rcode| self.0.counter(&RESPONSES, &[transport, rcode])))
    }
}

/// The zone being served and how to rebuild it.
pub struct Dns {
    config: config::Dns,
    serial: AtomicU32,
    zone: ArcSwap<Zone>,
    /// What the zone was last built from: an unchanged catalog costs no rebuild.
    last: Mutex<Option<Vec<ServiceEntry>>>,
    metrics: DnsMetrics,
}

impl Dns {
    /// An empty zone (apex, `dns-version`), until the first [`Dns::update`].
    pub fn new(config: config::Dns, metrics: DnsMetrics) -> Dns {
        // Serials only have to grow; starting from the clock keeps them growing across
        // restarts.
        let serial = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
        Dns {
            zone: ArcSwap::from_pointee(Zone::build(&spec(&config, serial), &[])),
            serial: AtomicU32::new(serial),
            config,
            last: Mutex::new(Some(Vec::new())),
            metrics,
        }
    }

    /// Serves `services` from now on (a new SOA serial when they changed).
    pub fn update(&self, services: &[ServiceEntry]) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_deref() == Some(services) {
            return;
        }
        *last = Some(services.to_vec());
        let serial = self.serial.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        self.zone
            .store(Arc::new(Zone::build(&spec(&self.config, serial), services)));
    }

    /// Serves what the desired state says, from now until the gateway stops.
    pub async fn follow(self: Arc<Self>, mut desired: watch::Receiver<Arc<Desired>>) {
        loop {
            let d = desired.borrow_and_update().clone();
            self.update(&d.dns);
            if desired.changed().await.is_err() {
                return;
            }
        }
    }
}

fn spec(c: &config::Dns, serial: u32) -> Spec {
    Spec {
        zone: c.zone.clone(),
        ttl: c.ttl.0.as_secs() as u32,
        negative_ttl: c.negative_ttl.0.as_secs() as u32,
        serial,
    }
}

/// Binds UDP and TCP on `addr` (the same port for both; port 0 picks one free for both).
pub async fn bind(addr: SocketAddr, shared: bool) -> anyhow::Result<(UdpSocket, TcpListener)> {
    // With port 0 the UDP port is chosen first and TCP takes the same number; another
    // process may hold it on TCP, so try a few.
    for _ in 0..16 {
        let udp = udp_socket(addr, shared)?;
        let port = udp.local_addr()?.port();
        match crate::listener::bind_tcp(SocketAddr::new(addr.ip(), port), shared) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() != 0 => return Err(e.into()),
            Err(_) => continue,
        }
    }
    anyhow::bail!("no port free for both UDP and TCP on {}", addr.ip())
}

/// Socket buffers of the UDP listener: room for a burst of queries while the one serving
/// task is busy (the kernel caps them at `net.core.rmem_max` / `wmem_max`).
const UDP_BUFFER: usize = 4 << 20;

/// The UDP socket; `shared` with other replicas on this host (`SO_REUSEPORT`).
fn udp_socket(addr: SocketAddr, shared: bool) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if shared {
        s.set_reuse_port(true)?;
    }
    // Best effort: a smaller buffer still works, it only drops sooner under bursts.
    let _ = s.set_recv_buffer_size(UDP_BUFFER);
    let _ = s.set_send_buffer_size(UDP_BUFFER);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Answers UDP queries until the socket fails. One request, one response at most, never
/// larger than the client allows; requests that cannot carry an ID get nothing. On Linux,
/// queries are read and answered in batches of up to [`BATCH`] per system call.
pub async fn serve_udp(dns: Arc<Dns>, socket: UdpSocket) {
    let queries = dns.metrics.queries("udp");
    let dropped = dns.metrics.dropped("udp");
    let responses = dns.metrics.responses("udp");
    let mut batch = batch::Batch::new();
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let received = socket.try_io(tokio::io::Interest::READABLE, || batch.receive(&socket));
        let n = match received {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            // ICMP errors from earlier replies surface here on some systems: keep serving.
            Err(e) => {
                tracing::debug!(error = %e, "dns udp receive failed");
                continue;
            }
        };
        queries.increment(n as u64);
        let zone = dns.zone.load();
        let answered = batch.answer(n, |request| {
            let reply = zone.respond(request, Transport::Udp);
            if let Some(r) = &reply {
                responses.count(r);
            }
            reply
        });
        dropped.increment((n - answered) as u64);
        batch.send(&socket).await;
    }
}

/// Answers TCP queries (two-byte length framing, several per connection); connections are
/// served within `life`.
pub async fn serve_tcp(dns: Arc<Dns>, listener: TcpListener, limits: TcpLimits, life: Lifetime) {
    // Tokio's semaphore is fair: waiting clients get slots in the order they came.
    let limit = Arc::new(Semaphore::new(limits.connections));
    let queries = dns.metrics.queries("tcp");
    let responses = Arc::new(dns.metrics.responses("tcp"));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "dns tcp accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let dns = dns.clone();
        let (queries, responses) = (queries.clone(), responses.clone());
        life.spawn(async move {
            let _permit = permit;
            let served = tcp_connection(&dns, stream, &queries, &responses, limits.idle);
            let _ = tokio::time::timeout(limits.lifetime, served).await;
        });
    }
}

async fn tcp_connection(
    dns: &Dns,
    mut stream: TcpStream,
    queries: &metrics::Counter,
    responses: &Responses,
    idle: Duration,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            // Closed, broken or idle: nothing more to answer.
            _ => return Ok(()),
        }
        buf.resize(usize::from(u16::from_be_bytes(len)), 0);
        match tokio::time::timeout(idle, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        queries.increment(1);
        let Some(reply) = dns.zone.load().respond(&buf, Transport::Tcp) else {
            // Not a request: the stream cannot be trusted to be in step any more.
            return Ok(());
        };
        responses.count(&reply);
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        framed.extend_from_slice(&reply);
        stream.write_all(&framed).await?;
    }
}
