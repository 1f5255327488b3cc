//! Test harness: a throwaway federation PKI, gateways on ephemeral loopback ports, and
//! bounded waits on conditions (never sleeps as synchronisation).

pub mod kube;
pub mod prometheus;
use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use strait_common::config::{
    Discovery, Endpoint, Export, Import, ImportPort, Peer, Protocol, ServicePort, TlsFiles,
};
use strait_common::pki::{CertificateAuthority, IssuedCert, write_atomic};
use strait_common::units::HumanDuration;
use strait_common::{Config, GatewayId};
use strait_gateway::Gateway;
use strait_gateway::tunnel::peers::PeerStatus;

/// Trust domain of test federations.
pub const TD: &str = "test.strait";

/// A federation CA and a directory for its files.
pub struct TestPki {
    /// Holds certificates and configs.
    pub dir: tempfile::TempDir,
    /// The federation CA.
    pub ca: CertificateAuthority,
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    /// A fresh CA in a fresh directory.
    pub fn new() -> Self {
        strait_gateway::raise_fd_limit();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::generate(TD, Duration::from_secs(86_400)).expect("CA");
        write_atomic(&dir.path().join("ca.pem"), ca.cert_pem.as_bytes(), false).expect("write CA");
        Self { dir, ca }
    }

    /// Path of the CA bundle.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A valid certificate for `cluster`.
    pub fn issue(&self, cluster: &str) -> IssuedCert {
        self.ca
            .issue_gateway_for(&GatewayId::new(TD, cluster), Duration::from_secs(86_400))
            .expect("issue")
    }

    /// Writes a certificate and key as `<name>.pem` / `<name>.key`.
    pub fn write(&self, name: &str, cert: &IssuedCert) {
        cert.save(self.dir.path(), name).expect("write cert");
    }

    /// The base config of `cluster`: its certificate files in this directory (re-read
    /// every 100 ms), the tunnel on `tunnel`, admin and gossip on ephemeral loopback ports.
    pub fn config(&self, cluster: &str, tunnel: SocketAddr) -> Config {
        let file = |name: String| self.dir.path().join(name);
        let mut tls = TlsFiles::new(
            self.ca_path(),
            file(format!("{cluster}.pem")),
            file(format!("{cluster}.key")),
        );
        tls.reload_interval = ms(100);
        let mut c = Config::new(cluster, &format!("{cluster}-region"), TD, tunnel, tls);
        c.listen.admin = SocketAddr::from(([127, 0, 0, 1], 0));
        c.listen.discovery = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        c
    }

    /// Writes (or rewrites, atomically) `config` as `<cluster>.yaml`, the file an operator
    /// would edit; its path.
    pub fn write_config(&self, config: &Config) -> PathBuf {
        let yaml = serde_yaml::to_string(config).expect("a config serializes");
        let path = self.dir.path().join(format!("{}.yaml", config.cluster));
        write_atomic(&path, yaml.as_bytes(), false).expect("write config");
        path
    }

    /// Starts a gateway for `cluster` on `udp` with a fresh certificate. `setup` adds what
    /// the test needs (exports, peers, imports, tuning) to the base config; the result goes
    /// through its file and [`Config::load`], as an operator's config does.
    pub async fn gateway(
        &self,
        cluster: &str,
        udp: UdpSocket,
        setup: impl FnOnce(&mut Config),
    ) -> Gateway {
        self.write(cluster, &self.issue(cluster));
        let mut config = self.config(cluster, udp.local_addr().expect("addr"));
        setup(&mut config);
        let path = self.write_config(&config);
        let config = Config::load(&path).unwrap_or_else(|e| panic!("test config invalid: {e}"));
        Gateway::start_on(config, udp)
            .await
            .expect("gateway starts")
    }
}

/// A duration of `n` milliseconds, as config fields take it.
pub fn ms(n: u64) -> HumanDuration {
    HumanDuration(Duration::from_millis(n))
}

/// A UDP socket on an ephemeral loopback port, and its address.
pub fn udp() -> (UdpSocket, SocketAddr) {
    let s = strait_gateway::tunnel::bind_udp(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &Default::default(),
    )
    .expect("bind udp");
    let a = s.local_addr().expect("addr");
    (s, a)
}

/// An export of `service` (namespace `default`) on `port`, forwarding to `target`, for
/// the clusters in `export_to` (`"*"`: all).
pub fn export(service: &str, port: u16, target: SocketAddr, export_to: &[&str]) -> Export {
    Export {
        name: service.into(),
        namespace: "default".into(),
        ports: vec![ServicePort {
            name: "p".into(),
            port,
            target_port: Some(target.port()),
            protocol: Protocol::default(),
        }],
        endpoints: vec![Endpoint {
            address: target.ip(),
            hostname: None,
            ready: true,
        }],
        export_to: export_to.iter().map(|c| c.to_string()).collect(),
        weight: 1,
        headless: false,
        session_affinity: None,
        exported_at_ms: 0,
        selection: Default::default(),
    }
}

/// Adds `peers` and an import of `service`/`port` from them (tried in that order), on an
/// ephemeral port of 127.0.0.1.
pub fn import_from(config: &mut Config, service: &str, port: u16, peers: &[(&str, SocketAddr)]) {
    for (cluster, address) in peers {
        config.peers.push(Peer {
            cluster: cluster.to_string(),
            address: *address,
        });
    }
    config.imports.push(Import {
        name: service.into(),
        namespace: "default".into(),
        address: [127, 0, 0, 1].into(),
        ports: vec![ImportPort {
            name: "p".into(),
            port,
            listen_port: Some(0),
        }],
        clusters: peers.iter().map(|(c, _)| c.to_string()).collect(),
    });
}

/// Waits (bounded) for a peer of `g` to reach `status`.
pub async fn wait_peer(g: &Gateway, cluster: &str, status: PeerStatus) {
    let mut rx = g.peer(cluster).expect("configured peer");
    within(Duration::from_secs(10), rx.wait_for(|s| s.status == status))
        .await
        .unwrap_or_else(|_| panic!("peer {cluster} never became {status:?}"));
}

/// Runs `fut` with a deadline; panics with the elapsed time if it is exceeded.
pub async fn within<F: Future>(limit: Duration, fut: F) -> F::Output {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("not done within {limit:?}"))
}

/// Polls `cond` every 20 ms until it holds, for at most `limit`; how long that took. The
/// one bounded wait of the tests: it panics naming `what` when time runs out.
pub async fn eventually(
    limit: Duration,
    what: &str,
    mut cond: impl AsyncFnMut() -> bool,
) -> Duration {
    let started = tokio::time::Instant::now();
    // The limit bounds the checks too: a check that hangs fails the wait, not the suite.
    let polled = tokio::time::timeout(limit, async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        polled.is_ok(),
        "timed out after {limit:?} waiting for: {what}"
    );
    started.elapsed()
}

/// The value of a metric line (name with labels, exactly as rendered) in `text`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

/// A certificate for `cluster` in `td`, from `ca`, with explicit validity.
pub fn issue_with(
    ca: &CertificateAuthority,
    td: &str,
    cluster: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> IssuedCert {
    ca.issue_gateway(&GatewayId::new(td, cluster), not_before, not_after)
        .expect("issue")
}

/// A TCP relay in front of `target` that can hold every byte both ways (a partition: the
/// senders' writes succeed and queue in the socket buffers, nothing is closed or reset) and
/// release them all at once (the heal), as a real blackhole followed by TCP retransmission.
pub struct TcpRelay {
    /// Where peers should dial (stands in for the target).
    pub addr: std::net::SocketAddr,
    held: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpRelay {
    pub async fn new(target: std::net::SocketAddr) -> TcpRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let held = tokio::sync::watch::Sender::new(false);
        let h = held.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (to_target, from_target) = (h.subscribe(), h.subscribe());
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::join!(pump(ri, wo, to_target), pump(ro, wi, from_target));
                });
            }
        });
        TcpRelay { addr, held, task }
    }

    /// From now on nothing is forwarded (new connections are accepted but stall too).
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Forwards again, everything held first.
    pub fn release(&self) {
        self.held.send_replace(false);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut held: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // Not reading while held leaves the bytes in the kernel buffers, as a partition does.
        if held.wait_for(|h| !*h).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Bytes read just as the hold began wait for the release too.
        if held.wait_for(|h| !*h).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A UDP relay between a gateway and its peer that can silently drop everything, or one
/// direction only, to make a peer vanish without a close (no netem here: impairment lives
/// in user space).
pub struct UdpRelay {
    /// Where peers should send (stands in for the target).
    pub addr: SocketAddr,
    drop: std::sync::Arc<std::sync::atomic::AtomicU8>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const TO_TARGET: u8 = 1;
const FROM_TARGET: u8 = 2;

impl UdpRelay {
    /// Relays datagrams between the first sender and `target`.
    pub async fn new(target: SocketAddr) -> UdpRelay {
        use std::sync::atomic::{AtomicU8, Ordering};
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let addr = sock.local_addr().expect("addr");
        let drop = std::sync::Arc::new(AtomicU8::new(0));
        let dropping = drop.clone();
        let task = tokio::spawn(async move {
            let mut client = None;
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let (to, direction) = if from == target {
                    (client, FROM_TARGET)
                } else {
                    client = Some(from);
                    (Some(target), TO_TARGET)
                };
                if dropping.load(Ordering::Relaxed) & direction != 0 {
                    continue;
                }
                if let Some(to) = to {
                    let _ = sock.send_to(&buf[..n], to).await;
                }
            }
        });
        UdpRelay { addr, drop, task }
    }

    fn set(&self, bits: u8) {
        self.drop.store(bits, std::sync::atomic::Ordering::Relaxed);
    }

    /// From now on every datagram in both directions is dropped.
    pub fn blackhole(&self) {
        self.set(TO_TARGET | FROM_TARGET);
    }

    /// From now on only datagrams towards the target are dropped (its own still arrive).
    pub fn blackhole_to_target(&self) {
        self.set(TO_TARGET);
    }

    /// From now on only the target's datagrams are dropped (its answers are lost).
    pub fn blackhole_from_target(&self) {
        self.set(FROM_TARGET);
    }

    /// Ends the blackhole: datagrams flow again.
    pub fn restore(&self) {
        self.set(0);
    }
}

/// Discovery for tests: fast rounds, the given lease, a random /24 of loopback for imports
/// (so parallel tests do not collide on service ports).
pub fn discovery(seeds: &[SocketAddr], lease: Duration) -> Discovery {
    use rand::Rng;
    let mut rng = rand::rng();
    let (a, b) = (rng.random_range(100..250u8), rng.random_range(0..=255u8));
    let range = format!("127.{a}.{b}.0/24").parse().expect("a /24");
    let mut d = Discovery::new(seeds.to_vec(), range);
    d.interval = ms(50);
    d.lease = HumanDuration(lease);
    d.reload_interval = ms(50);
    d
}

/// The admin API of `g`, through the typed client the operator tools use.
pub fn admin(g: &Gateway) -> strait_ops::client::Admin {
    strait_ops::client::Admin::new(g.admin_addr())
}

/// GET `path` from an HTTP/1.1 server; the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// Starts `strait run --config CONFIG` from the binary at `bin` (quiet; killed when the
/// handle is dropped): a gateway as its own process, so it can be SIGKILLed.
pub fn spawn_strait(bin: &str, config: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(bin)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start strait")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_built_in_rust_round_trips_through_its_file() {
        let pki = TestPki::new();
        let mut c = pki.config("east", "127.0.0.1:7400".parse().unwrap());
        c.exports
            .push(export("web", 80, "127.0.0.1:8080".parse().unwrap(), &["*"]));
        import_from(
            &mut c,
            "db",
            5432,
            &[("west", "127.0.0.1:7410".parse().unwrap())],
        );
        c.discovery = Some(discovery(
            &["127.0.0.1:7402".parse().unwrap()],
            Duration::from_secs(2),
        ));
        c.routing.default.dwell = Some(ms(1500));
        c.tunnel.connect_timeout = ms(750);
        let loaded = Config::load(&pki.write_config(&c)).expect("a valid config");
        assert_eq!(
            loaded.source.as_deref(),
            Some(pki.dir.path().join("east.yaml").as_path())
        );
        assert_eq!(
            Config {
                source: None,
                ..loaded
            },
            c
        );
    }
}
