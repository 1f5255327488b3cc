//! `strait demo`: a federation of several regions on loopback, each gateway with sample
//! backends, wired together with real QUIC, real mTLS and a fresh federation CA.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use strait_common::pki::{CertificateAuthority, write_atomic};
use strait_common::{Config, GatewayId};

use crate::Gateway;

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
    if !demo.wait_converged(Duration::from_secs(10)).await {
        println!(
            "(discovery has not converged yet; `strait status` shows the federation as it forms)"
        );
    }
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
    let port = |i: usize, k: u16| {
        if ephemeral {
            0
        } else {
            args.base_port + 10 * i as u16 + k
        }
    };
    let mut backends = Vec::new();
    let mut regions: Vec<Region> = Vec::new();
    for (i, cluster) in clusters.iter().enumerate() {
        let cert = ca.issue_gateway_for(
            &GatewayId::new(TRUST_DOMAIN, cluster),
            Duration::from_secs(30 * 86_400),
        )?;
        cert.save(&dir, cluster)?;
        let hello = backend::Backend::http_hello(format!("hello from {cluster}\n")).await?;
        let echo = backend::Backend::echo().await?;
        // Every region joins through the first one; after that, gossip does the rest.
        let seed = regions.first().and_then(|r| r.gateway.discovery_addr());
        let yaml = region_config(&RegionPorts {
            index: i,
            clusters: &clusters,
            tunnel: port(i, 0),
            admin: port(i, 1),
            gossip: port(i, 2),
            seed,
            imports: import_range(i, ephemeral),
            hello: hello.addr.port(),
            echo: echo.addr.port(),
        });
        let config_path = dir.join(format!("{cluster}.yaml"));
        write_atomic(&config_path, yaml.as_bytes(), false)?;
        let config = Config::load(&config_path)
            .map_err(|e| anyhow::anyhow!("demo config is invalid: {e}"))?;
        let gateway = Gateway::start(config).await.with_context(|| {
            format!("starting region {cluster}; if a port is taken, pick another --base-port")
        })?;
        backends.extend([hello, echo]);
        regions.push(Region {
            cluster: (*cluster).to_owned(),
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

/// The loopback range region `i` imports services on. Fixed ranges are easy to read; with
/// `--base-port 0` (tests) a random one keeps parallel runs from colliding.
fn import_range(i: usize, ephemeral: bool) -> String {
    if ephemeral {
        use rand::Rng;
        let mut rng = rand::rng();
        format!(
            "127.{}.{}.0/24",
            rng.random_range(100..250u8),
            rng.random_range(0..=255u8)
        )
    } else {
        format!("127.0.{}.0/24", 10 + i)
    }
}

struct RegionPorts<'a> {
    index: usize,
    clusters: &'a [&'a str],
    tunnel: u16,
    admin: u16,
    gossip: u16,
    seed: Option<SocketAddr>,
    imports: String,
    hello: u16,
    echo: u16,
}

/// Region `i`'s config: it exports `hello` to everyone and `echo` only to the first
/// region; peers and imports come from discovery.
fn region_config(r: &RegionPorts<'_>) -> String {
    let cluster = r.clusters[r.index];
    let seeds = r.seed.map(|s| s.to_string()).unwrap_or_default();
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
        "listen:\n  tunnel: 127.0.0.1:{}\n  admin: 127.0.0.1:{}\n  discovery: 127.0.0.1:{}",
        r.tunnel, r.admin, r.gossip
    );
    let _ = writeln!(
        y,
        "tls:\n  ca: ca.pem\n  cert: {cluster}.pem\n  key: {cluster}.key"
    );
    let _ = writeln!(
        y,
        "discovery:\n  seeds: [{seeds}]\n  import_addresses: {}",
        r.imports
    );
    let _ = writeln!(y, "exports:");
    let _ = writeln!(
        y,
        "  - name: hello\n    namespace: demo\n    ports: [{{name: http, port: 8080, target_port: {}}}]\n    endpoints: [{{address: 127.0.0.1, hostname: hello-0}}]",
        r.hello
    );
    let _ = writeln!(
        y,
        "  - name: echo\n    namespace: demo\n    ports: [{{name: tcp, port: 7000, target_port: {}}}]\n    endpoints: [{{address: 127.0.0.1}}]\n    export_to: [{}]",
        r.echo, r.clusters[0]
    );
    y
}

impl Demo {
    /// Waits (at most `limit`) until discovery has given every region its imports: `hello`
    /// from every other region, and `echo` in the first region.
    pub async fn wait_converged(&self, limit: Duration) -> bool {
        let n = self.regions.len();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let done = self.regions.iter().enumerate().all(|(i, r)| {
                let hello = r
                    .gateway
                    .listeners()
                    .iter()
                    .any(|l| l.service == "demo/hello" && l.clusters.len() == n - 1);
                hello && (i != 0 || r.gateway.listener("demo/echo", 7000).is_some())
            });
            if done {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

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
        for r in &self.regions {
            if let Some(a) = r.gateway.listener("demo/echo", 7000) {
                let _ = writeln!(
                    s,
                    "  echo hi | nc -q1 {} {}       # from {}: echo is exported to {} only, served by {}",
                    a.ip(),
                    a.port(),
                    r.cluster,
                    r.cluster,
                    first_cluster(r, "demo/echo")
                );
            }
        }
        if let Some(r) = self.regions.first() {
            let a = r.gateway.admin_addr();
            let _ = writeln!(
                s,
                "\nInspect: strait status --admin {a}   (or curl http://{a}/v1/members, /v1/catalog, /v1/peers, /metrics)"
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
