//! The DNS server: answers `clusterset.local` names from the federated catalog, over UDP
//! and TCP on `listen.dns`. The zone is rebuilt whenever the catalog or the imports change
//! ([`Dns::update`]) and swapped in whole; queries read the current one without locks.
//!
//! Wire format and parsing come from hickory-dns's protocol crate; the answers are
//! precomputed per name (see [`zone`]), so the serving loops here only move bytes.

mod batch;
pub mod zone;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use strait_common::config::{self, Import};
use strait_discovery::node::View;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::gateway::Shared;
use zone::{EndpointEntry, Kind, PortEntry, ServiceEntry, Spec, Transport, Zone};

/// Most TCP connections served at once; further ones wait in the accept queue.
const MAX_TCP_CONNECTIONS: usize = 512;
/// A TCP connection with no complete query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// The zone being served and how to rebuild it.
pub struct Dns {
    config: config::Dns,
    serial: AtomicU32,
    zone: ArcSwap<Zone>,
    /// What the zone was last built from: an unchanged catalog costs no rebuild.
    last: Mutex<Option<Vec<ServiceEntry>>>,
}

impl Dns {
    /// An empty zone (apex, `dns-version`), until the first [`Dns::update`].
    pub fn new(config: config::Dns) -> Dns {
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

    /// The zone now.
    pub fn zone(&self) -> Arc<Zone> {
        self.zone.load_full()
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

/// What DNS serves, from the imports in force and the catalog: a ClusterSetIP per imported
/// service, and for headless services every ready endpoint of a live cluster (this
/// cluster's own at their real addresses, remote ones at their local forwarding addresses),
/// with SRV priority by locality.
pub fn entries(
    imports: &[Import],
    view: Option<&View>,
    cluster: &str,
    region: &str,
) -> Vec<ServiceEntry> {
    let (me, region_of_me) = (cluster, region);
    let mut out: BTreeMap<(String, String), ServiceEntry> = BTreeMap::new();
    let alive = |cluster: &str| {
        view.is_none_or(|v| {
            v.members
                .iter()
                .any(|m| m.info.cluster == cluster && m.alive && !m.expired)
        })
    };
    let region = |cluster: &str| {
        view.and_then(|v| v.members.iter().find(|m| m.info.cluster == cluster))
            .map(|m| m.info.region.clone())
    };
    let ports = |imp: &Import| -> Vec<PortEntry> {
        imp.ports
            .iter()
            .map(|p| PortEntry {
                name: p.name.clone(),
                port: p.local_port(),
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
        let found = view.and_then(|v| {
            v.services.iter().find_map(|e| {
                (e.origin.cluster == *cluster
                    && e.key.namespace == imp.namespace
                    && e.key.name == imp.name)
                    .then(|| e.service.endpoints.iter().find(|ep| ep.address == endpoint))
                    .flatten()
            })
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
    for e in view.map(|v| v.services.as_slice()).unwrap_or_default() {
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

/// Binds UDP and TCP on `addr` (the same port for both; port 0 picks one free for both).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<(UdpSocket, TcpListener)> {
    // With port 0 the UDP port is chosen first and TCP takes the same number; another
    // process may hold it on TCP, so try a few.
    for _ in 0..16 {
        let udp = udp_socket(addr)?;
        let port = udp.local_addr()?.port();
        match TcpListener::bind(SocketAddr::new(addr.ip(), port)).await {
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

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
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
pub async fn serve_udp(shared: Arc<Shared>, socket: UdpSocket) {
    let metrics = &shared.metrics;
    let queries = metrics.counter("strait_dns_queries_total", &[("transport", "udp")]);
    let dropped = metrics.counter("strait_dns_dropped_total", &[("transport", "udp")]);
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
        let zone = shared.dns.zone.load();
        let answered = batch.answer(n, |request| zone.respond(request, Transport::Udp));
        dropped.increment((n - answered) as u64);
        batch.send(&socket).await;
    }
}

/// Answers TCP queries (two-byte length framing, several per connection).
pub async fn serve_tcp(shared: Arc<Shared>, listener: TcpListener) {
    let metrics = &shared.metrics;
    let limit = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    let queries = metrics.counter("strait_dns_queries_total", &[("transport", "tcp")]);
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
        let shared = shared.clone();
        let queries = queries.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp_connection(&shared.dns, stream, &queries).await;
        });
    }
}

async fn tcp_connection(
    dns: &Dns,
    mut stream: TcpStream,
    queries: &metrics::Counter,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            // Closed, broken or idle: nothing more to answer.
            _ => return Ok(()),
        }
        buf.resize(usize::from(u16::from_be_bytes(len)), 0);
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        queries.increment(1);
        let Some(reply) = dns.zone.load().respond(&buf, Transport::Tcp) else {
            // Not a request: the stream cannot be trusted to be in step any more.
            return Ok(());
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        framed.extend_from_slice(&reply);
        stream.write_all(&framed).await?;
    }
}
