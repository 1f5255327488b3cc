//! The `strait` command: run a gateway, check a config, manage the federation PKI, or
//! start the local demo federation.

use std::ffi::OsStr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use strait_common::config::TunnelTuning;
use strait_common::pki::{CA_CERT_FILE, CertificateAuthority, write_atomic};
use strait_common::telemetry::{self, LogFormat};
use strait_common::{Config, GatewayId};
use strait_gateway::{Gateway, demo, raise_fd_limit};
use strait_ops::{drill, status};

#[derive(Parser)]
#[command(
    name = "strait",
    version,
    about = "Multi-cluster federation gateway: mTLS over QUIC between clusters"
)]
struct Cli {
    /// Log format: `text` (colours only on a terminal) or `json` (one object per line,
    /// for log pipelines).
    #[arg(long, global = true, value_enum, default_value_t = LogFormatArg::Text)]
    log_format: LogFormatArg,
    /// The same as `--log-format json`.
    #[arg(long, global = true, hide = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run one gateway in the foreground.
    Run {
        /// The gateway's YAML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Federation PKI: create the root CA and issue gateway certificates.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Start a local federation of several regions on loopback and show what to try.
    Demo(demo::DemoArgs),
    /// Failover drills: inject faults into a running federation under load and report.
    #[command(subcommand)]
    Drill(DrillCmd),
    /// Print the Kubernetes manifests for one cluster (CRDs, RBAC, the gateway Deployment
    /// and Services, its config); pipe them to `kubectl apply -f -`.
    Install {
        /// The cluster id (a DNS label, unique in the clusterset).
        #[arg(long)]
        cluster: String,
        /// The region the cluster runs in (default: the cluster id).
        #[arg(long)]
        region: Option<String>,
        /// The zone (default: the region followed by `a`).
        #[arg(long)]
        zone: Option<String>,
        /// The clusterset's name (the `clusterset.k8s.io` ClusterProperty).
        #[arg(long, default_value = strait_kubernetes::install::DEFAULT_CLUSTERSET)]
        clusterset: String,
        /// The federation's SPIFFE trust domain.
        #[arg(long, default_value = strait_kubernetes::install::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Another cluster's gateway gossip address (`host:4434`); repeat for each.
        #[arg(long = "seed")]
        seeds: Vec<String>,
        /// The gateway image.
        #[arg(long)]
        image: Option<String>,
    },
    /// Preflight of one gateway: config, certificate, the running gateway, its peers,
    /// imports, DNS answers and drill faults; ✓/✗ per line with the fix. Exits 1 when a
    /// check fails.
    Check {
        /// The gateway's YAML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The admin API to ask (default: listen.admin of the config).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// The DNS server to ask (default: listen.dns of the config).
        #[arg(long)]
        dns: Option<std::net::SocketAddr>,
        /// `text` for people, `json` for scripts.
        #[arg(long, value_enum, default_value_t = LogFormatArg::Text)]
        output: LogFormatArg,
    },
    /// Show a running gateway's view: members, peers and imported services.
    Status {
        /// The gateway's admin address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: std::net::SocketAddr,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Parse and validate a configuration file; prints every problem with its field and fix.
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum DrillCmd {
    /// Run a drill scenario (see deploy/drills/); exits 0 when every objective is met,
    /// 1 when one is not, 2 when the drill was stopped early.
    Run {
        /// The scenario file.
        file: PathBuf,
        /// Where to write the JSON report (an HTML page is written beside it).
        #[arg(long)]
        out: Option<PathBuf>,
        /// No live progress on stderr (by default one line redrawn in place on a terminal,
        /// plain lines on change and every 5 s when piped).
        #[arg(long, short)]
        quiet: bool,
    },
    /// Check a scenario file without running it.
    Check {
        /// The scenario file.
        file: PathBuf,
    },
    /// Print a saved report and render its HTML page (and, with --svg, the picture alone).
    Report {
        /// A JSON report written by `drill run`.
        file: PathBuf,
        /// Where to write the HTML page (default: beside the JSON file).
        #[arg(long)]
        html: Option<PathBuf>,
        /// Also write the timeline picture as SVG here.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a federation root CA (ca.pem, ca.key, trust-domain) in a directory.
    Init {
        /// Directory to create the CA in.
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain of the federation.
        #[arg(long)]
        trust_domain: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u64,
    },
    /// Write a trust bundle of several CAs' roots (for a root rotation: trust the new root
    /// everywhere, re-issue every gateway under it, then trust only the new one;
    /// docs/SECURITY.md walks through it).
    Bundle {
        /// A CA directory made by `pki init`; repeat for each root to trust.
        #[arg(long = "ca", required = true)]
        cas: Vec<PathBuf>,
        /// The bundle file to write (what `tls.ca` points at).
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a gateway certificate with the SPIFFE ID spiffe://<td>/cluster/<id>/gateway.
    Issue {
        /// The CA directory made by `pki init`.
        #[arg(long)]
        ca: PathBuf,
        /// Cluster id of the gateway.
        #[arg(long)]
        cluster: String,
        /// Output directory for <cluster>.pem and <cluster>.key.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 90)]
        days: u64,
    },
}

fn main() -> anyhow::Result<()> {
    // The default read buffer; `run` sizes it to the configured one.
    strait_gateway::memory::keep_freed_memory(TunnelTuning::default().copy_buffer.0 as usize);
    let cli = Cli::parse();
    telemetry::init(if cli.log_json || cli.log_format == LogFormatArg::Json {
        LogFormat::Json
    } else {
        LogFormat::Text
    });
    match cli.command {
        Command::Config(ConfigCmd::Check { file }) => config_check(&file),
        Command::Pki(cmd) => pki(cmd),
        Command::Run { config } => {
            let config = Config::load(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
            strait_gateway::memory::keep_freed_memory(config.tunnel.copy_buffer.0 as usize);
            runtime()?.block_on(run(config))
        }
        Command::Demo(args) => runtime()?.block_on(demo::run(args)),
        Command::Status { admin } => runtime()?.block_on(status::print(admin)),
        Command::Check {
            config,
            admin,
            dns,
            output,
        } => {
            let targets = strait_ops::check::Targets { admin, dns };
            let checks = runtime()?.block_on(strait_ops::check::run(&config, targets));
            match output {
                LogFormatArg::Json => println!("{}", serde_json::to_string_pretty(&checks)?),
                LogFormatArg::Text => print!("{}", strait_ops::check::render(&checks)),
            }
            if checks.iter().any(|c| !c.ok) {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Install {
            cluster,
            region,
            zone,
            clusterset,
            trust_domain,
            seeds,
            image,
        } => {
            let region = region.unwrap_or_else(|| cluster.clone());
            let options = strait_kubernetes::install::Options {
                zone,
                clusterset,
                trust_domain,
                seeds,
                image,
                ..strait_kubernetes::install::Options::new(cluster, region)
            };
            print!("{}", strait_kubernetes::install::render(&options)?);
            Ok(())
        }
        Command::Drill(cmd) => drill_cmd(cmd),
    }
}

fn drill_cmd(cmd: DrillCmd) -> anyhow::Result<()> {
    let load = |file: &std::path::Path| {
        drill::Scenario::load(file).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(1);
        })
    };
    match cmd {
        DrillCmd::Check { file } => {
            let s = load(&file);
            println!(
                "{}: ok (drill {}, {} loads, {} steps over {})",
                file.display(),
                s.name,
                s.load.len(),
                s.steps.len(),
                s.duration
            );
            Ok(())
        }
        DrillCmd::Run { file, out, quiet } => {
            let s = load(&file);
            let out = out.unwrap_or_else(|| PathBuf::from(format!("drill-{}.json", s.name)));
            println!(
                "drill {}: {} ({} steps over {}); Ctrl-C stops it and undoes every fault",
                s.name,
                s.description.trim(),
                s.steps.len(),
                s.duration
            );
            // Progress goes to stderr so stdout keeps only the header and the summary.
            let stderr = std::io::stderr();
            let terminal = std::io::IsTerminal::is_terminal(&stderr)
                && std::env::var_os("TERM").is_none_or(|t| t != "dumb");
            let mut progress = (!quiet).then(|| drill::progress::Reporter::new(stderr, terminal));
            let ctrl_c = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            let report = runtime()?.block_on(drill::run_with_progress(s, ctrl_c, |p| {
                if let Some(r) = &mut progress {
                    r.update(p);
                }
            }));
            if let Some(r) = progress {
                r.finish();
            }
            let report = report?;
            print!("{}", drill::render::summary(&report));
            let (json, html) = drill::write_report(&report, &out)?;
            println!("  report: {} and {}", json.display(), html.display());
            match report.verdict {
                drill::analysis::Verdict::Passed => Ok(()),
                drill::analysis::Verdict::Failed => std::process::exit(1),
                drill::analysis::Verdict::Aborted => std::process::exit(2),
            }
        }
        DrillCmd::Report { file, html, svg } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let report: drill::Report = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not a drill report (written by `strait drill run`)",
                    file.display()
                )
            })?;
            print!("{}", drill::render::summary(&report));
            let html = html.unwrap_or_else(|| file.with_extension("html"));
            std::fs::write(&html, drill::render::html(&report))
                .with_context(|| format!("writing {}", html.display()))?;
            println!("  html: {}", html.display());
            if let Some(svg) = svg {
                std::fs::write(&svg, drill::render::svg(&report))
                    .with_context(|| format!("writing {}", svg.display()))?;
                println!("  svg: {}", svg.display());
            }
            Ok(())
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    raise_fd_limit();
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads(std::env::var_os("STRAIT_WORKER_THREADS").as_deref())? {
        b.worker_threads(n.get());
    }
    Ok(b.enable_all().build()?)
}

/// The runtime's worker threads from `STRAIT_WORKER_THREADS` (docs/OPERATIONS.md "Worker
/// threads"): unset or empty keeps tokio's default, one per CPU.
fn worker_threads(value: Option<&OsStr>) -> anyhow::Result<Option<NonZeroUsize>> {
    // Bytes that are not UTF-8 become U+FFFD, which no count parses as.
    let Some(v) = value.map(OsStr::to_string_lossy) else {
        return Ok(None);
    };
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    let n = v.parse().with_context(|| {
        format!(
            "STRAIT_WORKER_THREADS={v:?} is not a thread count: give a whole number of at \
             least 1, or unset it for one thread per CPU"
        )
    })?;
    Ok(Some(n))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let mut gateway = Gateway::start(config).await?;
    tokio::spawn(strait_gateway::memory::give_back(
        strait_gateway::memory::EVERY,
    ));
    tokio::select! {
        _ = shutdown_signal() => {
            // Drain first (docs/OPERATIONS.md): a second signal stops at once.
            tracing::info!("draining before shutdown; a second Ctrl-C or SIGTERM stops at once");
            gateway.start_drain();
            tokio::select! {
                _ = gateway.wait() => {}
                _ = shutdown_signal() => tracing::warn!("second signal: stopping without waiting for the drain"),
            }
        }
        _ = gateway.wait() => {
            // The drain asked for on the admin API is over; anything else is a failure.
            if !gateway.is_draining() {
                bail!("a gateway task stopped unexpectedly");
            }
        }
    }
    tracing::info!("shutting down");
    gateway.shutdown().await;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

fn config_check(file: &std::path::Path) -> anyhow::Result<()> {
    match Config::load(file) {
        Ok(c) => {
            let warnings = strait_common::config::bind_warnings(&c)
                .into_iter()
                .chain(strait_common::config::file_warnings(&c));
            for (field, problem, fix) in warnings {
                println!(
                    "{}: warning: field `{field}`: {problem}\n  fix: {fix}",
                    file.display()
                );
            }
            println!(
                "{}: ok (cluster {}, {} exports, {} peers, {} imports)",
                file.display(),
                c.cluster,
                c.exports.len(),
                c.peers.len(),
                c.imports.len()
            );
            Ok(())
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}

const TRUST_DOMAIN_FILE: &str = "trust-domain";

/// The trust domain of the CA in `ca` (a directory made by `pki init`).
fn trust_domain_of(ca: &std::path::Path) -> anyhow::Result<String> {
    let path = ca.join(TRUST_DOMAIN_FILE);
    let td = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (is {} a CA made by `strait pki init`?)",
            path.display(),
            ca.display()
        )
    })?;
    Ok(td.trim().to_owned())
}

fn pki(cmd: PkiCmd) -> anyhow::Result<()> {
    match cmd {
        PkiCmd::Init {
            dir,
            trust_domain,
            days,
        } => {
            if !strait_common::identity::is_trust_domain(&trust_domain) {
                bail!(
                    "`{trust_domain}` is not a valid trust domain: use lowercase letters, digits, `.`, `-`, `_`"
                );
            }
            let ca =
                CertificateAuthority::generate(&trust_domain, Duration::from_secs(days * 86_400))?;
            ca.save(&dir)?;
            write_atomic(&dir.join(TRUST_DOMAIN_FILE), trust_domain.as_bytes(), false)?;
            println!(
                "created CA for trust domain {trust_domain} in {}",
                dir.display()
            );
            Ok(())
        }
        PkiCmd::Bundle { cas, out } => {
            let mut roots = Vec::new();
            let mut domains = std::collections::BTreeSet::new();
            for ca in &cas {
                domains.insert(trust_domain_of(ca)?);
                let path = ca.join(CA_CERT_FILE);
                let pem = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                roots.push((path, pem));
            }
            if domains.len() > 1 {
                bail!(
                    "the CAs are for different trust domains ({}): a bundle serves one federation; give CAs of one trust domain",
                    domains.into_iter().collect::<Vec<_>>().join(", ")
                );
            }
            let bundle = strait_common::pki::bundle(&roots)?;
            write_atomic(&out, bundle.as_bytes(), false)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote a bundle of {} root(s) to {}",
                roots.len(),
                out.display()
            );
            Ok(())
        }
        PkiCmd::Issue {
            ca,
            cluster,
            out,
            days,
        } => {
            if !strait_common::identity::is_dns_label(&cluster) {
                bail!(
                    "`{cluster}` is not a valid cluster id: use a DNS label (lowercase letters, digits, `-`)"
                );
            }
            let td = trust_domain_of(&ca)?;
            let authority = CertificateAuthority::load(&ca)?;
            let id = GatewayId::new(td.trim(), &cluster);
            let cert = authority.issue_gateway_for(&id, Duration::from_secs(days * 86_400))?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            cert.save(&out, &cluster)?;
            println!(
                "issued {id} -> {}/{cluster}.pem (CA: {})",
                out.display(),
                ca.join(CA_CERT_FILE).display()
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::num::NonZeroUsize;
    use std::os::unix::ffi::OsStrExt;

    use super::worker_threads;

    #[test]
    fn worker_threads_takes_a_positive_count_and_names_the_variable_otherwise() {
        let threads = |v: &str| worker_threads(Some(OsStr::new(v)));
        assert_eq!(worker_threads(None).unwrap(), None);
        assert_eq!(threads(" ").unwrap(), None);
        assert_eq!(threads("1").unwrap().map(NonZeroUsize::get), Some(1));
        assert_eq!(threads(" 4 ").unwrap().map(NonZeroUsize::get), Some(4));
        for bad in ["0", "-1", "two", "1.5"] {
            let e = threads(bad).unwrap_err().to_string();
            assert!(
                e.contains("STRAIT_WORKER_THREADS") && e.contains(bad),
                "{e}"
            );
        }
        // Not UTF-8 (an environment can hold any bytes): refused, not ignored.
        let not_utf8 = OsStr::from_bytes(b"2\xff");
        let e = worker_threads(Some(not_utf8)).unwrap_err().to_string();
        assert!(e.contains("STRAIT_WORKER_THREADS"), "{e}");
    }
}
