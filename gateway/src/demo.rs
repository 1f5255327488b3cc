//! `strait demo`: a federation of several regions on loopback, each gateway with sample
//! backends, wired together with real QUIC, real mTLS and a fresh federation CA.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use strait_common::pki::{CertificateAuthority, write_atomic};
use strait_common::{Config, GatewayId, api};
use strait_ops::client::Admin;

use crate::Gateway;

pub mod backend;

/// Region names, in the order regions are created.
pub const REGIONS: &[&str] = &[
    "us-east", "eu-west", "ap-south", "us-west", "eu-north", "sa-east",
];
const TRUST_DOMAIN: &str = "demo.strait";
/// The demo's admin token file (for `strait drill`), in the demo directory.
pub const TOKEN_FILE: &str = "admin-token";
/// The demo's failback dwell and slow start (production defaults: 5 s and 10 s).
pub const DEMO_DWELL: Duration = Duration::from_secs(3);
/// See [`DEMO_DWELL`].
pub const DEMO_SLOW_START: Duration = Duration::from_secs(3);

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
    /// Directory for the generated CA, certificates, configs and admin token (default:
    /// `<tmp>/strait-demo-<base-port>`, where the drills in deploy/drills/ look for the
    /// token; a temp dir of its own with --base-port 0).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Stop after this many seconds instead of waiting for Ctrl-C.
    #[arg(long)]
    pub duration: Option<u64>,
    /// Failover tour: run traffic from the first region, take the region serving it down,
    /// bring it back, and print each second which region answered.
    #[arg(long)]
    pub tour: bool,
    /// Gateways per region (1-3). With several, each is a replica: peers spread
    /// connections over them, and `down <region>/<n>` or `restart <region>` shows traffic
    /// stay in the region.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub replicas: u8,
    /// Run each gateway as a `strait run` process of its own, which the demo supervises
    /// (any that exits is started again), so drills can send them real signals (`fault:
    /// signal`). `down <region>/<n>` then kills the process outright. Needs fixed ports
    /// (not `--base-port 0`).
    #[arg(long)]
    pub processes: bool,
    /// The `strait` binary `--processes` runs (default: this one).
    #[arg(skip)]
    pub program: Option<PathBuf>,
}

impl DemoArgs {
    /// `regions` regions on ephemeral ports in a temp dir (tests, embedding).
    /// One gateway per region, as tests mostly want; set `replicas` for more.
    pub fn ephemeral(regions: u8) -> Self {
        DemoArgs {
            regions,
            base_port: 0,
            dir: None,
            duration: None,
            tour: false,
            replicas: 1,
            processes: false,
            program: None,
        }
    }
}

/// A demo gateway: one replica of its region.
pub struct Replica {
    /// Its name (`us-east-2`), or the cluster's when the region runs one gateway.
    pub name: String,
    /// The gateway; `None` while it is taken down.
    running: Option<Instance>,
    /// The config file written for it.
    pub config_path: PathBuf,
    /// Where it listened first (tunnel, admin, gossip, DNS); a restart binds the same ports
    /// so the federation finds it again.
    bound: Bound,
    /// With `--processes`: the binary its process runs.
    program: Option<PathBuf>,
    /// Whether it should run: false only after `down`. A supervisor keeps trying to start
    /// one that should and does not.
    wanted: bool,
}

/// A running demo gateway: in the demo's process, or a process of its own.
enum Instance {
    Here(Gateway),
    Process(tokio::process::Child),
}

type Bound = (
    SocketAddr,
    SocketAddr,
    Option<SocketAddr>,
    Option<SocketAddr>,
);

impl Replica {
    /// Its gateway, when it runs in the demo's process.
    pub fn gateway(&self) -> Option<&Gateway> {
        match &self.running {
            Some(Instance::Here(g)) => Some(g),
            _ => None,
        }
    }

    /// Whether it runs (in the demo's process or its own).
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Its admin API, as an operator reaches it.
    pub fn admin(&self) -> Admin {
        Admin::new(self.bound.1)
    }

    /// Stops it and waits until its ports are free again; a process is killed outright.
    async fn take_down(&mut self) -> anyhow::Result<()> {
        match self
            .running
            .take()
            .with_context(|| format!("{} is already down", self.name))?
        {
            Instance::Here(g) => g.shutdown_and_release().await,
            Instance::Process(mut child) => {
                // SIGKILL, then reaped: the kernel frees its ports with it.
                let _ = child.kill().await;
            }
        }
        Ok(())
    }

    /// Starts it again on the ports it had.
    async fn bring_up(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.running.is_none(), "{} is already up", self.name);
        self.running = Some(match &self.program {
            Some(program) => Instance::Process(self.spawn(program).await?),
            None => {
                let mut config = Config::load(&self.config_path)
                    .map_err(|e| anyhow::anyhow!("demo config is invalid: {e}"))?;
                (
                    config.listen.tunnel,
                    config.listen.admin,
                    config.listen.discovery,
                    config.listen.dns,
                ) = self.bound;
                Instance::Here(
                    Gateway::start(config)
                        .await
                        .with_context(|| format!("restarting {}", self.name))?,
                )
            }
        });
        Ok(())
    }

    /// Runs `program run --config <its file>`, its output appended to `<name>.log` beside
    /// the config, and waits until its admin API answers from that process. The process
    /// dies with the demo.
    async fn spawn(&self, program: &Path) -> anyhow::Result<tokio::process::Child> {
        let log_path = self.config_path.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut command = tokio::process::Command::new(program);
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let parent = std::process::id();
        // SAFETY: prctl(2) and getppid(2), async-signal-safe, between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // The demo killed outright takes its gateways with it. (The signal comes
                // when the thread that forked exits: this runs on the demo's runtime
                // threads, which live as long as the demo.)
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The demo died before the prctl took effect: do not outlive it.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("the demo exited"));
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, program.display()))?;
        let pid = child.id().unwrap_or_default();
        let deadline = tokio::time::Instant::now() + PROCESS_START_WITHIN;
        loop {
            if let Ok((_, ready)) = self.admin().ready().await
                && ready.pid == pid
            {
                return Ok(child);
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "{} exited at start ({status}); see {}",
                    self.name,
                    log_path.display()
                );
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} did not answer on its admin API within {PROCESS_START_WITHIN:?}; see {}",
                self.name,
                log_path.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops it as a supervisor stops a gateway (in turn, for a rolling restart): it
    /// drains, then it is gone.
    async fn drain_and_stop(&mut self) -> anyhow::Result<()> {
        match &mut self.running {
            Some(Instance::Here(g)) => g.drain().await,
            Some(Instance::Process(child)) => {
                if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                    // SAFETY: kill(2) on our own child.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
                let _ = tokio::time::timeout(PROCESS_DRAIN_WITHIN, child.wait()).await;
            }
            None => return Ok(()),
        }
        self.take_down().await
    }

    /// Whether it stopped on its own: its drain (asked on its admin API) is over, or its
    /// process exited (a signal, a drain, a crash). A supervisor starts it again.
    fn stopped(&mut self) -> Option<String> {
        match &mut self.running {
            Some(Instance::Here(g)) if g.drain_over() => Some("drained".to_owned()),
            Some(Instance::Process(child)) => match child.try_wait() {
                Ok(Some(status)) => Some(format!("exited ({status})")),
                _ => None,
            },
            _ => None,
        }
    }

    /// The service listeners it has bound, as its admin API lists them.
    async fn listeners(&self) -> Vec<api::Listener> {
        match self.gateway() {
            Some(g) => g.listeners(),
            None => self
                .admin()
                .services()
                .await
                .map(|s| s.imports)
                .unwrap_or_default(),
        }
    }

    /// Its listener for `service` port `port`.
    async fn listener(&self, service: &str, port: u16) -> Option<SocketAddr> {
        self.listeners()
            .await
            .into_iter()
            .find(|l| l.service == service && l.port == port)
            .map(|l| l.address)
    }

    /// The names of `cluster`'s replicas it sends new connections to now.
    async fn routable_replicas(&self, cluster: &str) -> Vec<String> {
        match self.gateway() {
            Some(g) => g.routable_replicas(cluster),
            None => self
                .admin()
                .peers()
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p.cluster == cluster && p.in_rotation())
                .map(|p| p.replica)
                .collect(),
        }
    }

    /// The cluster its new connections to `service` go to first now.
    async fn first_cluster(&self, service: &str) -> Option<String> {
        match self.gateway() {
            Some(g) => g.route(service).and_then(|r| r.primary),
            None => match self.admin().route(service).await {
                Ok(Ok(route)) => route.primary,
                _ => None,
            },
        }
    }
}

/// How long a gateway process may take to answer on its admin API.
const PROCESS_START_WITHIN: Duration = Duration::from_secs(10);
/// How long a gateway process may take to drain and exit (its grace is 5 s).
const PROCESS_DRAIN_WITHIN: Duration = Duration::from_secs(15);

/// One demo region.
pub struct Region {
    /// Cluster id.
    pub cluster: String,
    /// Its gateways, in order (one, or several replicas).
    pub replicas: Vec<Replica>,
    /// The first replica's config file.
    pub config_path: PathBuf,
}

impl Region {
    /// The region's first gateway running in the demo's process.
    ///
    /// # Panics
    /// While the region is down, or with `--processes`.
    pub fn gateway(&self) -> &Gateway {
        self.gateways().next().expect("region is up")
    }

    /// Every gateway of the region running in the demo's process.
    pub fn gateways(&self) -> impl Iterator<Item = &Gateway> {
        self.replicas.iter().filter_map(Replica::gateway)
    }

    /// Its replicas that run.
    pub fn running(&self) -> impl Iterator<Item = &Replica> {
        self.replicas.iter().filter(|r| r.is_running())
    }

    /// Whether a gateway of the region runs.
    pub fn is_up(&self) -> bool {
        self.running().next().is_some()
    }
}

/// The demo directory, removed when the demo ends.
enum Scratch {
    Temp(#[allow(dead_code)] tempfile::TempDir),
    Fixed(PathBuf),
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Scratch::Fixed(p) = self {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// A running demo federation.
pub struct Demo {
    /// The regions, in creation order.
    pub regions: Vec<Region>,
    /// Where the CA, certificates and configs live.
    pub dir: PathBuf,
    _temp: Option<Scratch>,
    _backends: Vec<backend::Backend>,
}

/// Runs the demo until Ctrl-C (or `--duration`).
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let duration = args.duration.map(Duration::from_secs);
    let args_tour = args.tour;
    let demo = start(args).await?;
    tokio::spawn(crate::memory::give_back(crate::memory::EVERY));
    if !demo.wait_converged(Duration::from_secs(10)).await {
        println!(
            "(discovery has not converged yet; `strait status` shows the federation as it forms)"
        );
    }
    let mut demo = demo;
    println!("{}", demo.instructions().await);
    if args_tour {
        demo.tour().await?;
    }
    let stop = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    tokio::pin!(stop);
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tokio::io::stdin()));
    let mut stdin_open = true;
    // A gateway drained through its admin API (a drill's rolling restart) is started
    // again, as a supervisor would.
    let mut supervise = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = supervise.tick() => demo.restart_drained().await,
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(l)) => {
                    if let Err(e) = demo.command(l.trim()).await {
                        println!("{e:#}");
                    }
                }
                _ => stdin_open = false,
            },
        }
    }
    println!("stopping the demo federation");
    for r in demo.regions {
        for running in r.replicas.into_iter().filter_map(|r| r.running) {
            match running {
                Instance::Here(g) => g.shutdown().await,
                Instance::Process(mut child) => {
                    let _ = child.kill().await;
                }
            }
        }
    }
    Ok(())
}

/// Fails, naming the port, when any port of `regions` regions from `base` is taken
/// (most likely by another demo on the same `--base-port`, whose directory must then be
/// left alone).
fn ports_free(base: u16, regions: usize, replicas: usize) -> anyhow::Result<()> {
    for i in 0..regions {
        let mut udp = vec![DNS_PORT];
        let mut tcp = vec![DNS_PORT];
        for r in 0..replicas {
            let (tunnel, admin, gossip) = port_offsets(r);
            udp.push(tunnel);
            tcp.extend([admin, gossip]);
        }
        let tries = udp
            .into_iter()
            .map(|k| (k, true))
            .chain(tcp.into_iter().map(|k| (k, false)));
        for (k, is_udp) in tries {
            let port = base + 10 * i as u16 + k;
            let at = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let bound = if is_udp {
                std::net::UdpSocket::bind(at).map(drop)
            } else {
                std::net::TcpListener::bind(at).map(drop)
            };
            if let Err(e) = bound {
                anyhow::bail!(
                    "port {port} is in use ({e}): is another `strait demo` running with --base-port {base}? Stop it or pick another --base-port (nothing was changed)"
                );
            }
        }
    }
    Ok(())
}

/// Region port offsets (from base + 10 x region) of replica `r`: tunnel, admin, gossip.
/// The first replica has 0, 1, 2 (what the library drills expect), the others 4..9.
fn port_offsets(r: usize) -> (u16, u16, u16) {
    match r as u16 {
        0 => (0, 1, 2),
        r => (1 + 3 * r, 2 + 3 * r, 3 + 3 * r),
    }
}

/// The DNS port offset, shared by a region's replicas.
const DNS_PORT: u16 = 3;

/// Starts every region: PKI, backends, configs, gateways.
pub async fn start(args: DemoArgs) -> anyhow::Result<Demo> {
    let n = args.regions as usize;
    anyhow::ensure!(
        !args.processes || args.base_port != 0,
        "--processes needs fixed ports: give a --base-port other than 0"
    );
    let program = if args.processes {
        Some(match &args.program {
            Some(p) => p.clone(),
            None => std::env::current_exe().context("finding the strait binary")?,
        })
    } else {
        None
    };
    let (temp, dir) = match &args.dir {
        Some(d) => (None, d.clone()),
        None if args.base_port == 0 => {
            let t = tempfile::Builder::new().prefix("strait-demo-").tempdir()?;
            let p = t.path().to_owned();
            (Some(Scratch::Temp(t)), p)
        }
        None => {
            // Another demo on these ports owns this directory: refuse before touching it.
            ports_free(args.base_port, n, args.replicas as usize)?;
            let p = std::env::temp_dir().join(format!("strait-demo-{}", args.base_port));
            // A previous demo on these ports that did not clean up (killed) left this.
            let _ = std::fs::remove_dir_all(&p);
            (Some(Scratch::Fixed(p.clone())), p)
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = CertificateAuthority::generate(TRUST_DOMAIN, Duration::from_secs(30 * 86_400))?;
    write_atomic(&dir.join("ca.pem"), ca.cert_pem.as_bytes(), false)?;
    // Fault injection is on in the demo, so drills can run against it.
    let token: String = {
        use rand::Rng;
        let mut rng = rand::rng();
        (0..32)
            .map(|_| format!("{:x}", rng.random_range(0..16u8)))
            .collect()
    };
    write_atomic(&dir.join(TOKEN_FILE), token.as_bytes(), true)?;

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
    let mut plans = Vec::new();
    for (i, cluster) in clusters.iter().enumerate() {
        let cert = ca.issue_gateway_for(
            &GatewayId::new(TRUST_DOMAIN, cluster),
            Duration::from_secs(30 * 86_400),
        )?;
        cert.save(&dir, cluster)?;
        let hello = backend::Backend::http_hello(format!("hello from {cluster}\n")).await?;
        let echo = backend::Backend::echo().await?;
        // A region's replicas serve the same import addresses, backends and DNS port.
        plans.push(RegionPlan {
            imports: import_range(i, ephemeral),
            dns: port(i, DNS_PORT),
            hello: hello.addr.port(),
            echo: echo.addr.port(),
        });
        backends.extend([hello, echo]);
    }
    // The first gateway of every region, then the other replicas. Every region joins
    // through the first one; an extra replica through the next region's first gateway (a
    // gateway refuses gossip from its own cluster's identity, its siblings' included). After
    // that, gossip does the rest.
    for r in 0..args.replicas as usize {
        for (i, cluster) in clusters.iter().enumerate() {
            let seed = if r == 0 {
                regions.first().map(|f: &Region| f.replicas[0].bound.2)
            } else {
                regions
                    .get((i + 1) % n)
                    .map(|next| next.replicas[0].bound.2)
            };
            let plan = &mut plans[i];
            let (tunnel, admin, gossip) = port_offsets(r);
            let name = (args.replicas > 1).then(|| format!("{cluster}-{}", r + 1));
            let yaml = region_config(&RegionPorts {
                index: i,
                clusters: &clusters,
                replica: name.as_deref(),
                tunnel: port(i, tunnel),
                admin: port(i, admin),
                gossip: port(i, gossip),
                dns: plan.dns,
                seeds: seed.flatten().into_iter().collect(),
                imports: plan.imports.clone(),
                hello: plan.hello,
                echo: plan.echo,
            });
            let file = name.as_deref().unwrap_or(cluster);
            let config_path = dir.join(format!("{file}.yaml"));
            write_atomic(&config_path, yaml.as_bytes(), false)?;
            let config = Config::load(&config_path)
                .map_err(|e| anyhow::anyhow!("demo config is invalid: {e}"))?;
            let mut replica = Replica {
                name: file.to_owned(),
                running: None,
                config_path,
                bound: (
                    config.listen.tunnel,
                    config.listen.admin,
                    config.listen.discovery,
                    config.listen.dns,
                ),
                program: program.clone(),
                wanted: true,
            };
            if program.is_some() {
                replica.bring_up().await?;
            } else {
                let gateway = Gateway::start(config).await.with_context(|| {
                    format!("starting {file}; if a port is taken, pick another --base-port")
                })?;
                replica.bound = (
                    gateway.tunnel_addr(),
                    gateway.admin_addr(),
                    gateway.discovery_addr(),
                    gateway.dns_addr(),
                );
                replica.running = Some(Instance::Here(gateway));
            }
            // With --base-port 0 the first replica picked the DNS port: the others share it.
            plan.dns = replica.bound.3.map_or(plan.dns, |a| a.port());
            match regions.get_mut(i) {
                Some(region) => region.replicas.push(replica),
                None => regions.push(Region {
                    cluster: (*cluster).to_owned(),
                    config_path: replica.config_path.clone(),
                    replicas: vec![replica],
                }),
            }
        }
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

/// What a region's replicas share.
struct RegionPlan {
    imports: String,
    dns: u16,
    hello: u16,
    echo: u16,
}

struct RegionPorts<'a> {
    index: usize,
    clusters: &'a [&'a str],
    /// This gateway's replica name, when the region runs several.
    replica: Option<&'a str>,
    tunnel: u16,
    admin: u16,
    gossip: u16,
    dns: u16,
    seeds: Vec<SocketAddr>,
    imports: String,
    hello: u16,
    echo: u16,
}

/// Region `i`'s config: it exports `hello` to everyone, `echo` only to the first region,
/// and the headless `hello-pods` to everyone; peers and imports come from discovery.
fn region_config(r: &RegionPorts<'_>) -> String {
    let cluster = r.clusters[r.index];
    let seeds: Vec<String> = r.seeds.iter().map(|s| s.to_string()).collect();
    let seeds = seeds.join(", ");
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
        "listen:\n  tunnel: 127.0.0.1:{}\n  admin: 127.0.0.1:{}\n  discovery: 127.0.0.1:{}\n  dns: 127.0.0.1:{}",
        r.tunnel, r.admin, r.gossip, r.dns
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
    if let Some(name) = r.replica {
        // Its siblings share the region's listeners and DNS port (on one host, the kernel
        // spreads clients over them): on a drain the others take new clients at once.
        let _ = writeln!(
            y,
            "  replica: {name}\ndrain:\n  grace: 5s\n  accept_for: 0s"
        );
    }
    // Short enough to watch: a recovered region waits 3 s, then ramps up over 3 s.
    let _ = writeln!(
        y,
        "routing:\n  default:\n    dwell: {}s\n    slow_start: {}s",
        DEMO_DWELL.as_secs(),
        DEMO_SLOW_START.as_secs()
    );
    let _ = writeln!(y, "faults:\n  token_file: {TOKEN_FILE}");
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
    // Headless: DNS names this region's one pod; other regions reach it through a local
    // address of their own that forwards to exactly this endpoint.
    let _ = writeln!(
        y,
        "  - name: hello-pods\n    namespace: demo\n    headless: true\n    ports: [{{name: http, port: 8080, target_port: {}}}]\n    endpoints: [{{address: 127.0.0.1, hostname: hello-0}}]",
        r.hello
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
            let mut done = true;
            for (i, r) in self.regions.iter().enumerate() {
                for replica in r.running() {
                    let listeners = replica.listeners().await;
                    let has = |service: &str, clusters: usize| {
                        listeners
                            .iter()
                            .any(|l| l.service == service && l.clusters.len() >= clusters)
                    };
                    done &= has("demo/hello", n - 1) && (i != 0 || has("demo/echo", 1));
                }
            }
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
    pub async fn instructions(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nstrait demo federation: {} regions on loopback (files in {})\n",
            self.regions.len(),
            self.dir.display()
        );
        for r in &self.regions {
            for replica in r.running() {
                let _ = writeln!(
                    s,
                    "region {:<9} {:<11} tunnel udp://{}  admin http://{}",
                    r.cluster,
                    if r.replicas.len() > 1 {
                        replica.name.as_str()
                    } else {
                        ""
                    },
                    replica.bound.0,
                    replica.bound.1
                );
            }
        }
        let _ = writeln!(
            s,
            "\nTry (each region reaches the others' services through mTLS over QUIC):"
        );
        let firsts: Vec<&Replica> = self
            .regions
            .iter()
            .filter_map(|r| r.running().next())
            .collect();
        for (r, first) in self.regions.iter().zip(&firsts) {
            if let Some(a) = first.listener("demo/hello", 8080).await {
                let _ = writeln!(
                    s,
                    "  curl http://{a}/                  # from {}: served by {}",
                    r.cluster,
                    first_cluster(r, "demo/hello").await
                );
            }
        }
        for (r, first) in self.regions.iter().zip(&firsts) {
            if let Some(a) = first.listener("demo/echo", 7000).await {
                let _ = writeln!(
                    s,
                    "  echo hi | nc -q1 {} {}       # from {}: echo is exported to {} only, served by {}",
                    a.ip(),
                    a.port(),
                    r.cluster,
                    r.cluster,
                    first_cluster(r, "demo/echo").await
                );
            }
        }
        if let Some(r) = self.regions.first()
            && let Some(dns) = r.running().next().and_then(|first| first.bound.3)
        {
            let (ip, port) = (dns.ip(), dns.port());
            let _ = writeln!(
                s,
                "\nDNS (clusterset.local, answered by {}'s gateway from the federated catalog):",
                r.cluster
            );
            let _ = writeln!(
                s,
                "  dig @{ip} -p {port} hello.demo.svc.clusterset.local            # ClusterSetIP\n  dig @{ip} -p {port} _http._tcp.hello.demo.svc.clusterset.local SRV\n  dig @{ip} -p {port} hello-pods.demo.svc.clusterset.local       # headless: one address per pod\n  dig @{ip} -p {port} _http._tcp.hello-pods.demo.svc.clusterset.local SRV   # nearest first"
            );
            if let Some(other) = self.regions.get(1) {
                let _ = writeln!(
                    s,
                    "  curl http://$(dig +short @{ip} -p {port} hello-0.{c}.hello-pods.demo.svc.clusterset.local):8080/   # that one pod in {c}",
                    c = other.cluster
                );
            }
        }
        if let Some(r) = self.regions.first()
            && let Some(first) = r.running().next()
        {
            let a = first.bound.1;
            let _ = writeln!(
                s,
                "\nInspect: strait status --admin {a}   (or curl http://{a}/v1/routes, /v1/members, /v1/catalog, /v1/peers, /metrics)"
            );
            let _ = writeln!(
                s,
                "Configs: strait config check {}",
                r.config_path.display()
            );
        }
        let names: Vec<&str> = self.regions.iter().map(|r| r.cluster.as_str()).collect();
        let _ = writeln!(
            s,
            "\nFailover: type `down <region>` or `up <region>` here ({}), then curl again or\nrun `strait status`; `strait demo --tour` shows the traffic move on its own.",
            names.join(", ")
        );
        if let Some(r) = self.regions.get(1).filter(|r| r.replicas.len() > 1) {
            let _ = writeln!(
                s,
                "Replicas: `down {c}/2` takes one of {c}'s gateways away (its sibling keeps the traffic in\n{c}); `restart {c}` drains and restarts each in turn, with no connection lost.",
                c = r.cluster
            );
        }
        let _ = writeln!(
            s,
            "\nDrills: strait drill run deploy/drills/gateway-kill.yaml   (library in deploy/drills/; admin token in {})",
            self.dir.join(TOKEN_FILE).display()
        );
        let _ = writeln!(s, "\nCtrl-C stops the federation.");
        s
    }
}

/// The cluster a region's new connections to `service` go to first now.
async fn first_cluster(r: &Region, service: &str) -> String {
    match r.running().next() {
        Some(first) => first.first_cluster(service).await,
        None => None,
    }
    .unwrap_or_else(|| "(none)".to_owned())
}

impl Demo {
    fn index(&self, cluster: &str) -> anyhow::Result<usize> {
        self.regions
            .iter()
            .position(|r| r.cluster == cluster)
            .with_context(|| {
                let names: Vec<&str> = self.regions.iter().map(|r| r.cluster.as_str()).collect();
                format!("no region `{cluster}` (regions: {})", names.join(", "))
            })
    }

    /// The replicas `target` names: `<region>` (all of them) or `<region>/<n>` (the n-th,
    /// from 1); the region's index and the replicas' indexes.
    fn select(&self, target: &str) -> anyhow::Result<(usize, Vec<usize>)> {
        let (cluster, nth) = match target.split_once('/') {
            Some((c, n)) => (c, Some(n)),
            None => (target, None),
        };
        let i = self.index(cluster)?;
        let count = self.regions[i].replicas.len();
        match nth {
            None => Ok((i, (0..count).collect())),
            Some(n) => {
                let k: usize = n
                    .parse()
                    .ok()
                    .filter(|k| (1..=count).contains(k))
                    .with_context(|| format!("`{target}`: {cluster} has replicas 1 to {count}"))?;
                Ok((i, vec![k - 1]))
            }
        }
    }

    /// Takes gateways down (their tunnel, listeners and gossip stop): `<region>` or
    /// `<region>/<n>`.
    pub async fn take_down(&mut self, target: &str) -> anyhow::Result<()> {
        let (i, which) = self.select(target)?;
        let region = &mut self.regions[i];
        anyhow::ensure!(
            which.iter().any(|&k| region.replicas[k].is_running()),
            "{target} is already down"
        );
        for k in which {
            region.replicas[k].wanted = false;
            if region.replicas[k].is_running() {
                // `up` binds the same ports again, possibly at once.
                region.replicas[k].take_down().await?;
            }
        }
        Ok(())
    }

    /// Brings gateways back on the ports they had: `<region>` or `<region>/<n>`.
    pub async fn bring_up(&mut self, target: &str) -> anyhow::Result<()> {
        let (i, which) = self.select(target)?;
        let region = &mut self.regions[i];
        anyhow::ensure!(
            which.iter().any(|&k| !region.replicas[k].is_running()),
            "{target} is already up"
        );
        for k in which {
            region.replicas[k].wanted = true;
            if !region.replicas[k].is_running() {
                region.replicas[k].bring_up().await?;
            }
        }
        Ok(())
    }

    /// A rolling restart of a region: each replica in turn drains (peers and clients move
    /// to its siblings), stops, and starts again; the next one goes once it is back.
    pub async fn restart(&mut self, cluster: &str) -> anyhow::Result<()> {
        let i = self.index(cluster)?;
        let count = self.regions[i].replicas.len();
        for k in 0..count {
            // Its siblings take its connections: they must be in every region's rotation
            // first (one just brought up may not be yet).
            for j in (0..count).filter(|&j| j != k) {
                self.wait_rejoined(i, j, Duration::from_secs(10)).await;
            }
            let replica = &mut self.regions[i].replicas[k];
            if !replica.is_running() {
                continue;
            }
            println!("  {}: draining", replica.name);
            replica.drain_and_stop().await?;
            replica.bring_up().await?;
            println!("  {}: restarted", replica.name);
        }
        // The last one back too.
        for k in 0..count {
            self.wait_rejoined(i, k, Duration::from_secs(10)).await;
        }
        Ok(())
    }

    /// Waits (at most `limit`) until replica `k` of region `i` is back in service: it has
    /// its siblings' listeners bound, and every other region's gateways send it new
    /// connections again.
    async fn wait_rejoined(&self, i: usize, k: usize, limit: Duration) {
        let region = &self.regions[i];
        let replica = &region.replicas[k];
        if !replica.is_running() {
            return;
        }
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            let mut wanted = 0;
            for sibling in region.running() {
                wanted = wanted.max(sibling.listeners().await.len());
            }
            let mut routed = true;
            for other in self
                .regions
                .iter()
                .filter(|r| r.cluster != region.cluster)
                .flat_map(Region::running)
            {
                let names = other.routable_replicas(&region.cluster).await;
                // A region's only gateway has no replica name.
                routed &= names.contains(&replica.name)
                    || (region.replicas.len() == 1 && !names.is_empty());
            }
            if replica.listeners().await.len() >= wanted && routed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "  {}: not back in every region's rotation after {limit:?}",
            replica.name
        );
    }

    /// Starts again every gateway that stopped on its own: a drain asked for on its admin
    /// API is over, or (`--processes`) its process exited, killed or drained; and tries
    /// again one whose start failed (a supervisor's job: a drill's rolling restart and
    /// signals rely on it).
    pub async fn restart_drained(&mut self) {
        for region in &mut self.regions {
            for replica in &mut region.replicas {
                if replica.wanted && !replica.is_running() {
                    println!("{} is not running; starting it again", replica.name);
                    if let Err(e) = replica.bring_up().await {
                        println!("{e:#}");
                    }
                } else if let Some(why) = replica.stopped() {
                    println!("{} {why}; starting it again", replica.name);
                    let restarted = match replica.take_down().await {
                        Ok(()) => replica.bring_up().await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = restarted {
                        println!("{e:#}");
                    }
                }
            }
        }
    }

    /// One interactive command: `down`, `up` (a region, or one replica as
    /// `<region>/<n>`), `restart <region>` (rolling).
    pub async fn command(&mut self, line: &str) -> anyhow::Result<()> {
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["down", target] => {
                self.take_down(target).await?;
                if target.contains('/') {
                    println!("{target} is down; its siblings take its connections, in its region");
                } else {
                    println!("{target} is down; new connections move to the next region");
                }
            }
            ["up", target] => {
                self.bring_up(target).await?;
                println!(
                    "{target} is back; it gets traffic again after {}s of health, ramping up over {}s",
                    DEMO_DWELL.as_secs(),
                    DEMO_SLOW_START.as_secs()
                );
            }
            ["restart", cluster] => {
                println!("rolling restart of {cluster}:");
                self.restart(cluster).await?;
                println!("{cluster} restarted, one replica at a time");
            }
            [] => {}
            _ => anyhow::bail!(
                "commands: `down <region>[/<n>]`, `up <region>[/<n>]`, `restart <region>`"
            ),
        }
        Ok(())
    }

    /// The failover tour: 50 new connections/s from the first region to `demo/hello`;
    /// after 3 s the region serving them goes down, after 10 s it comes back. Prints one
    /// line per second with the share each region answered, and what happened.
    pub async fn tour(&mut self) -> anyhow::Result<TourReport> {
        let from = self.regions[0]
            .running()
            .next()
            .context("the first region is down")?;
        let target = from
            .listener("demo/hello", 8080)
            .await
            .context("the first region has no demo/hello listener yet")?;
        let victim = first_cluster(&self.regions[0], "demo/hello").await;
        let total = Duration::from_secs(10) + DEMO_DWELL + DEMO_SLOW_START + Duration::from_secs(3);
        println!(
            "\nFailover tour: 50 new connections/s from {} to demo/hello; {victim} goes down at 3s and comes back at 10s.\n",
            self.regions[0].cluster
        );
        let load = strait_ops::load::Load::start(strait_ops::load::LoadSpec {
            target,
            rate: 50.0,
            duration: total,
            timeout: Duration::from_secs(5),
        });
        let mut report = TourReport {
            victim: victim.clone(),
            ..Default::default()
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut downs = Vec::new();
        for second in 1..=total.as_secs() {
            tick.tick().await;
            let window = Duration::from_secs(second - 1)..Duration::from_secs(second);
            let samples: Vec<_> = load
                .samples()
                .into_iter()
                .filter(|s| window.contains(&s.at))
                .collect();
            let mut by: std::collections::BTreeMap<String, usize> = Default::default();
            let mut failed = 0;
            for s in &samples {
                match &s.result {
                    Ok(c) => *by.entry(c.clone()).or_default() += 1,
                    Err(_) => failed += 1,
                }
            }
            report.failed += failed;
            let shares: Vec<String> = by
                .iter()
                .map(|(c, n)| {
                    format!(
                        "{c} {:>3.0}%",
                        100.0 * *n as f64 / samples.len().max(1) as f64
                    )
                })
                .collect();
            let mut event = String::new();
            if second == 3 {
                downs.push(load.elapsed());
                self.take_down(&victim).await?;
                event = format!("  <- {victim} taken down");
            } else if second == 10 {
                self.bring_up(&victim).await?;
                event = format!(
                    "  <- {victim} back (dwell {}s, then slow start {}s)",
                    DEMO_DWELL.as_secs(),
                    DEMO_SLOW_START.as_secs()
                );
            }
            println!(
                "t={second:>2}s  {:<40} failed {failed}{event}",
                shares.join("  ")
            );
            report.seconds.push(by);
        }
        // Count failures from every connection, including those still running at a tick;
        // one in flight through the region as it went down died with it (broken), a new
        // one that failed is a failover failure.
        let all = load.finish().await;
        let errors = all.iter().filter(|s| s.result.is_err());
        report.broken = errors
            .clone()
            .filter(|s| strait_ops::drill::analysis::in_flight(s, &downs))
            .count();
        report.failed = errors.count() - report.broken;
        println!(
            "\n{} failed new connections while {victim} went down and came back ({} in flight through it broken).\n",
            report.failed, report.broken
        );
        Ok(report)
    }
}

/// What the tour saw.
#[derive(Debug, Default)]
pub struct TourReport {
    /// The region taken down and brought back.
    pub victim: String,
    /// Per second: connections answered by each region.
    pub seconds: Vec<std::collections::BTreeMap<String, usize>>,
    /// New connections that failed (started after the region went down).
    pub failed: usize,
    /// Connections in flight through the region as it went down that broke.
    pub broken: usize,
}
