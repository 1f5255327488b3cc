//! Test harness: a throwaway federation PKI, gateways on ephemeral loopback ports, and
//! bounded waits on conditions (never sleeps as synchronisation).

use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use strait_common::pki::{CertificateAuthority, IssuedCert, write_atomic};
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

    /// Writes (or rewrites, atomically) `<cluster>.yaml`: the base config plus `extra`.
    pub fn write_config(&self, cluster: &str, tunnel: SocketAddr, extra: &str) -> PathBuf {
        let yaml = format!(
            "cluster: {cluster}\nregion: {cluster}-region\ntrust_domain: {TD}\nlisten:\n  tunnel: {tunnel}\n  admin: 127.0.0.1:0\n  discovery: 127.0.0.1:0\ntls:\n  ca: ca.pem\n  cert: {cluster}.pem\n  key: {cluster}.key\n  reload_interval: 100ms\n{extra}"
        );
        let path = self.dir.path().join(format!("{cluster}.yaml"));
        write_atomic(&path, yaml.as_bytes(), false).expect("write config");
        path
    }

    /// Starts a gateway for `cluster` on `udp` with a fresh certificate; `extra` is YAML
    /// appended to the generated base config (exports, peers, imports, tunnel tuning).
    pub async fn gateway(&self, cluster: &str, udp: UdpSocket, extra: &str) -> Gateway {
        self.write(cluster, &self.issue(cluster));
        let path = self.write_config(cluster, udp.local_addr().expect("addr"), extra);
        let config = Config::load(&path).unwrap_or_else(|e| panic!("test config invalid: {e}"));
        Gateway::start_on(config, udp)
            .await
            .expect("gateway starts")
    }
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

/// YAML exporting `service` (namespace `default`) on `port` to `target` on 127.0.0.1.
pub fn export(service: &str, port: u16, target: SocketAddr, export_to: &str) -> String {
    format!(
        "  - name: {service}\n    ports: [{{name: p, port: {port}, target_port: {}}}]\n    endpoints: [{{address: {}}}]\n    export_to: {export_to}\n",
        target.port(),
        target.ip()
    )
}

/// YAML with peers and an import of `service`/`port` from them, on an ephemeral port.
pub fn import_from(service: &str, port: u16, peers: &[(&str, SocketAddr)]) -> String {
    let mut y = String::from("peers:\n");
    for (c, a) in peers {
        y += &format!("  - cluster: {c}\n    address: {a}\n");
    }
    let names: Vec<_> = peers.iter().map(|(c, _)| *c).collect();
    y += &format!(
        "imports:\n  - name: {service}\n    address: 127.0.0.1\n    ports: [{{name: p, port: {port}, listen_port: 0}}]\n    clusters: [{}]\n",
        names.join(", ")
    );
    y
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

/// Polls `cond` every 20 ms until it holds, for at most `limit`.
pub async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// A `discovery:` block for tests: fast rounds, a short lease, a random /24 of loopback for
/// imports (so parallel tests do not collide on service ports).
pub fn discovery_block(seeds: &[SocketAddr], lease: &str) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    let (a, b) = (rng.random_range(100..250u8), rng.random_range(0..=255u8));
    let seeds: Vec<String> = seeds.iter().map(|s| s.to_string()).collect();
    format!(
        "discovery:\n  seeds: [{}]\n  import_addresses: 127.{a}.{b}.0/24\n  interval: 50ms\n  lease: {lease}\n  reload_interval: 50ms\n",
        seeds.join(", ")
    )
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
