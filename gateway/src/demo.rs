//! `strait demo`: a federation of several regions on loopback, each gateway with sample
//! backends, wired together with real QUIC, real mTLS and a fresh federation CA.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use strait_common::pki::{CertificateAuthority, write_atomic};
use strait_common::{Config, GatewayId};

use crate::{Gateway, tunnel};

pub mod backend;

/// Region names, in the order regions are created.
pub const REGIONS: &[&str] = &[
    "us-east", "eu-west", "ap-south", "us-west", "eu-north", "sa-east",
];
const TRUST_DOMAIN: &str = "demo.strait";

/// `strait demo` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Number of regions (2-6).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=6))]
    pub regions: u8,
    /// First port: region i uses base+10i (tunnel, UDP) and base+10i+1 (admin). 0 picks
    /// free ports for everything, listeners included.
    #[arg(long, default_value_t = 7400)]
    pub base_port: u16,
    /// Directory for the generated CA, certificates and configs (default: a temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Stop after this many seconds instead of waiting for Ctrl-C.
    #[arg(long)]
    pub duration: Option<u64>,
}

/// One running demo region.
pub struct Region {
    /// Cluster id.
    pub cluster: String,
    /// The region's gateway.
    pub gateway: Gateway,
    /// The config file written for it.
    pub config_path: PathBuf,
}

/// A running demo federation.
pub struct Demo {
    /// The regions, in creation order.
    pub regions: Vec<Region>,
    /// Where the CA, certificates and configs live.
    pub dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    _backends: Vec<backend::Backend>,
}

/// Runs the demo until Ctrl-C (or `--duration`).
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let duration = args.duration.map(Duration::from_secs);
    let demo = start(args).await?;
    println!("{}", demo.instructions());
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    println!("stopping the demo federation");
    for r in demo.regions {
        r.gateway.shutdown().await;
    }
    Ok(())
}

/// The address region `i` imports services on: one loopback address per region, so every
/// imported service keeps its own port number.
pub fn import_address(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 10 + i as u8, 1))
}

/// Starts every region: PKI, backends, configs, gateways.
pub async fn start(args: DemoArgs) -> anyhow::Result<Demo> {
    let n = args.regions as usize;
    let (temp, dir) = match &args.dir {
        Some(d) => (None, d.clone()),
        None => {
            let t = tempfile::Builder::new().prefix("strait-demo-").tempdir()?;
            let p = t.path().to_owned();
            (Some(t), p)
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = CertificateAuthority::generate(TRUST_DOMAIN, Duration::from_secs(30 * 86_400))?;
    write_atomic(&dir.join("ca.pem"), ca.cert_pem.as_bytes(), false)?;

    let clusters: Vec<&str> = REGIONS[..n].to_vec();
    let ephemeral = args.base_port == 0;
    let mut sockets = Vec::new();
    let mut tunnel_addrs = Vec::new();
    for (i, cluster) in clusters.iter().enumerate() {
        let port = if ephemeral {
            0
        } else {
            args.base_port + 10 * i as u16
        };
        let sock = tunnel::bind_udp(
            SocketAddr::from(([127, 0, 0, 1], port)),
            &Default::default(),
        )
        .with_context(|| {
            format!("binding UDP port {port} for region {cluster}; pick another --base-port")
        })?;
        tunnel_addrs.push(sock.local_addr()?);
        sockets.push(sock);
    }

    let mut backends = Vec::new();
    let mut regions = Vec::new();
    for (i, sock) in sockets.into_iter().enumerate() {
        let cluster = clusters[i];
        let cert = ca.issue_gateway_for(
            &GatewayId::new(TRUST_DOMAIN, cluster),
            Duration::from_secs(30 * 86_400),
        )?;
        cert.save(&dir, cluster)?;
        let hello = backend::Backend::http_hello(format!("hello from {cluster}\n")).await?;
        let echo = backend::Backend::echo().await?;
        let admin_port = if ephemeral {
            0
        } else {
            args.base_port + 10 * i as u16 + 1
        };
        let yaml = region_config(
            i,
            &clusters,
            &tunnel_addrs,
            admin_port,
            hello.addr.port(),
            echo.addr.port(),
            ephemeral,
        );
        let config_path = dir.join(format!("{cluster}.yaml"));
        write_atomic(&config_path, yaml.as_bytes(), false)?;
        let config = Config::load(&config_path)
            .map_err(|e| anyhow::anyhow!("demo config is invalid: {e}"))?;
        let gateway = Gateway::start_on(config, sock)
            .await
            .with_context(|| format!("starting region {cluster}"))?;
        backends.extend([hello, echo]);
        regions.push(Region {
            cluster: cluster.to_owned(),
            gateway,
            config_path,
        });
    }
    Ok(Demo {
        regions,
        dir,
        _temp: temp,
        _backends: backends,
    })
}

/// Region `i`'s config: it exports `hello` to everyone and `echo` only to the first
/// region, and imports `hello` from the others (next region first) and `echo` from the last.
fn region_config(
    i: usize,
    clusters: &[&str],
    tunnels: &[SocketAddr],
    admin_port: u16,
    hello_port: u16,
    echo_port: u16,
    ephemeral: bool,
) -> String {
    let cluster = clusters[i];
    let n = clusters.len();
    let listen_port = |p: u16| {
        if ephemeral {
            ", listen_port: 0".to_owned()
        } else {
            format!(", listen_port: {p}")
        }
    };
    let mut y = String::new();
    let _ = writeln!(
        y,
        "# strait demo region {cluster} (generated by `strait demo`)"
    );
    let _ = writeln!(
        y,
        "cluster: {cluster}\nregion: {cluster}\nzone: {cluster}-a\ntrust_domain: {TRUST_DOMAIN}"
    );
    let _ = writeln!(
        y,
        "listen:\n  tunnel: {}\n  admin: 127.0.0.1:{admin_port}",
        tunnels[i]
    );
    let _ = writeln!(
        y,
        "tls:\n  ca: ca.pem\n  cert: {cluster}.pem\n  key: {cluster}.key"
    );
    let _ = writeln!(y, "exports:");
    let _ = writeln!(
        y,
        "  - name: hello\n    namespace: demo\n    ports: [{{name: http, port: 8080, target_port: {hello_port}}}]\n    endpoints: [{{address: 127.0.0.1, hostname: hello-0}}]"
    );
    let _ = writeln!(
        y,
        "  - name: echo\n    namespace: demo\n    ports: [{{name: tcp, port: 7000, target_port: {echo_port}}}]\n    endpoints: [{{address: 127.0.0.1}}]\n    export_to: [{}]",
        clusters[0]
    );
    let others: Vec<usize> = (1..n).map(|k| (i + k) % n).collect();
    let _ = writeln!(y, "peers:");
    for &k in &others {
        let _ = writeln!(
            y,
            "  - cluster: {}\n    address: {}",
            clusters[k], tunnels[k]
        );
    }
    let names: Vec<&str> = others.iter().map(|&k| clusters[k]).collect();
    let _ = writeln!(y, "imports:");
    let _ = writeln!(
        y,
        "  - name: hello\n    namespace: demo\n    address: {}\n    ports: [{{name: http, port: 8080{}}}]\n    clusters: [{}]",
        import_address(i),
        listen_port(8080),
        names.join(", ")
    );
    if i != n - 1 {
        let _ = writeln!(
            y,
            "  - name: echo\n    namespace: demo\n    address: {}\n    ports: [{{name: tcp, port: 7000{}}}]\n    clusters: [{}]",
            import_address(i),
            listen_port(7000),
            clusters[n - 1]
        );
    }
    y
}

impl Demo {
    /// What to try, for people.
    pub fn instructions(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nstrait demo federation: {} regions on loopback (files in {})\n",
            self.regions.len(),
            self.dir.display()
        );
        for r in &self.regions {
            let g = &r.gateway;
            let _ = writeln!(
                s,
                "region {:<9} tunnel udp://{}  admin http://{}",
                r.cluster,
                g.tunnel_addr(),
                g.admin_addr()
            );
        }
        let _ = writeln!(
            s,
            "\nTry (each region reaches the others' services through mTLS over QUIC):"
        );
        for r in &self.regions {
            if let Some(a) = r.gateway.listener("demo/hello", 8080) {
                let _ = writeln!(
                    s,
                    "  curl http://{a}/                  # from {}: served by {}",
                    r.cluster,
                    first_cluster(r, "demo/hello")
                );
            }
        }
        let last = self
            .regions
            .last()
            .map(|r| r.cluster.as_str())
            .unwrap_or_default();
        for (k, r) in self.regions.iter().enumerate() {
            if let Some(a) = r.gateway.listener("demo/echo", 7000) {
                let note = if k == 0 {
                    format!("echoed by {last}")
                } else {
                    format!(
                        "refused: {last} exports echo only to {}",
                        self.regions[0].cluster
                    )
                };
                let _ = writeln!(
                    s,
                    "  echo hi | nc -q1 {} {}       # from {}: {note}",
                    a.ip(),
                    a.port(),
                    r.cluster
                );
            }
        }
        if let Some(r) = self.regions.first() {
            let a = r.gateway.admin_addr();
            let _ = writeln!(
                s,
                "\nInspect: curl http://{a}/v1/peers | curl http://{a}/v1/services | curl http://{a}/metrics"
            );
            let _ = writeln!(
                s,
                "Configs: strait config check {}",
                r.config_path.display()
            );
        }
        let _ = writeln!(s, "\nCtrl-C stops the federation.");
        s
    }
}

fn first_cluster(r: &Region, service: &str) -> String {
    r.gateway
        .listeners()
        .iter()
        .find(|l| l.service == service)
        .and_then(|l| l.clusters.first().cloned())
        .unwrap_or_default()
}
