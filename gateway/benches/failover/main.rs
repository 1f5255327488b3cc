//! Failover benchmark: time from a fault to full reroute, and failed connections, under
//! 500 new connections per second.
//!
//! Topology on loopback: `west` (in this process) imports `bench/svc` from `east`
//! (preferred) and `north` (the healthy alternative); east and north are real `strait run`
//! processes with an HTTP backend each. West reaches east through a user-space UDP relay.
//! Faults, injected 2 s into an 8 s load:
//! - `kill`: east's process gets SIGKILL (no goodbye to anyone);
//! - `blackhole`: the relay silently drops every datagram both ways.
//!
//! A connection counts as affected when it failed, was answered by east after the fault,
//! or took longer than 3x the pre-fault p99 + 5 ms. Reroute time = fault until the end of
//! the last affected connection: from then on every new connection went straight to north.
//!
//! The replica sections ([`replicas`]) then kill one of a cluster's two replicas, restart
//! both in turn, and measure what replicas cost at rest.
//!
//! Run: `cargo bench -p strait-gateway --bench failover` (options after `--`:
//! `--runs N` (default 3), `--rate R` (default 500), `--out FILE.md` (relative to the
//! workspace), `--west-yaml 'tunnel:\n  keep_alive: 200ms'` (top-level sections set in
//! west's config, as if appended to its file), `--only clusters` or `--only replicas`
//! (one part)).

mod replicas;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use strait_common::Config;
use strait_gateway::demo::backend::Backend;
use strait_gateway::tunnel::peers::PeerStatus;
use strait_ops::load::{Load, LoadSpec, Sample, reroute};
use strait_tests::*;

const LOAD: Duration = Duration::from_secs(8);
const FAULT_AT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Blackhole,
}

struct Outcome {
    fault: Fault,
    connections: usize,
    failed: usize,
    reroute: Duration,
    p99_before: Duration,
    p99_during: Duration,
}

fn p99(samples: &[&Sample]) -> Duration {
    let mut v: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    v.sort();
    v.get((v.len() * 99 / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// Sets the top-level sections of `yaml` (e.g. `tunnel:` with other timings) in `config`,
/// as appending them to its file would: a section given replaces the whole section, and
/// what it leaves out takes its default.
fn set_sections(config: &mut Config, yaml: &str) {
    if yaml.trim().is_empty() {
        return;
    }
    let extra: serde_yaml::Mapping = serde_yaml::from_str(yaml)
        .unwrap_or_else(|e| panic!("--west-yaml is not a YAML mapping: {e}"));
    let serde_yaml::Value::Mapping(mut merged) =
        serde_yaml::to_value(&*config).expect("a config serializes")
    else {
        unreachable!("a config serializes to a mapping")
    };
    for (key, value) in extra {
        merged.insert(key, value);
    }
    *config = serde_yaml::from_value(serde_yaml::Value::Mapping(merged))
        .unwrap_or_else(|e| panic!("--west-yaml does not fit west's config: {e}"));
}

/// HTTP backends for east and north, each answering with its cluster's name.
async fn backends() -> (Backend, Backend) {
    let hello = async |cluster: &str| {
        Backend::http_hello(format!("hello from {cluster}\n"))
            .await
            .unwrap()
    };
    (hello("east").await, hello("north").await)
}

async fn run_once(fault: Fault, rate: f64, west_extra: &str) -> Outcome {
    let pki = TestPki::new();
    let (be, bn) = backends().await;
    let mut children = Vec::new();
    let mut tunnel = |name: &str, backend: &Backend| {
        let (probe, addr) = udp();
        drop(probe);
        pki.write(name, &pki.issue(name));
        let mut config = pki.config(name, addr);
        config
            .exports
            .push(export("svc", 7000, backend.addr, &["*"]));
        let path = pki.write_config(&config);
        children.push(spawn_strait(env!("CARGO_BIN_EXE_strait"), &path));
        addr
    };
    let east = tunnel("east", &be);
    let north = tunnel("north", &bn);
    let relay = UdpRelay::new(east).await;
    let (uw, _) = udp();
    let west = pki
        .gateway("west", uw, |c| {
            import_from(c, "svc", 7000, &[("east", relay.addr), ("north", north)]);
            set_sections(c, west_extra);
        })
        .await;
    wait_peer(&west, "east", PeerStatus::Up).await;
    wait_peer(&west, "north", PeerStatus::Up).await;
    let target = west.listener("default/svc", 7000).expect("listener");

    let load = Load::start(LoadSpec {
        target,
        rate,
        duration: LOAD,
        timeout: Duration::from_secs(5),
    });
    tokio::time::sleep_until((Instant::now() + FAULT_AT.saturating_sub(load.elapsed())).into())
        .await;
    let at = load.elapsed();
    match fault {
        Fault::Kill => children[0].kill().await.expect("SIGKILL east"),
        Fault::Blackhole => relay.blackhole(),
    }
    let samples = load.finish().await;
    let before: Vec<&Sample> = samples.iter().filter(|s| s.end() < at).collect();
    let during: Vec<&Sample> = samples.iter().filter(|s| s.at >= at).collect();
    let p99_before = p99(&before);
    let r = reroute(
        &samples,
        at,
        LOAD,
        "east",
        p99_before * 3 + Duration::from_millis(5),
    );
    Outcome {
        fault,
        connections: samples.len(),
        failed: samples
            .iter()
            .filter(|s| s.result.is_err())
            .count()
            .max(r.failed),
        reroute: r.reroute,
        p99_before,
        p99_during: p99(&during),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let runs: usize = opt("--runs").and_then(|v| v.parse().ok()).unwrap_or(3);
    let rate: f64 = opt("--rate").and_then(|v| v.parse().ok()).unwrap_or(500.0);
    // YAML sections for west's config, e.g. other tunnel timings for a comparison.
    let west_extra = opt("--west-yaml").unwrap_or_default().replace("\\n", "\n");
    let only = opt("--only");
    let part = |name: &str| only.as_deref().is_none_or(|o| o == name);
    strait_gateway::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut report = format!(
        "# Failover benchmark\n\n`cargo bench -p strait-gateway --bench failover -- --runs {runs} --rate {rate}{}`{}\n\n{rate} new connections/s for {}s, fault at {}s; {} cores.\n\n| fault | run | connections | failed | reroute | p99 before | p99 after fault |\n|---|---|---|---|---|---|---|\n",
        only.as_deref()
            .map_or(String::new(), |o| format!(" --only {o}")),
        if west_extra.is_empty() {
            String::new()
        } else {
            format!(" with west config `{}`", west_extra.replace('\n', "\\n"))
        },
        LOAD.as_secs(),
        FAULT_AT.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let mut summary = String::new();
    let faults = if part("clusters") {
        vec![Fault::Kill, Fault::Blackhole]
    } else {
        Vec::new()
    };
    for fault in faults {
        let mut reroutes = Vec::new();
        for run in 1..=runs {
            let o = rt.block_on(run_once(fault, rate, &west_extra));
            let line = format!(
                "| {:?} | {run} | {} | {} | {:.0} ms | {:.1} ms | {:.0} ms |",
                o.fault,
                o.connections,
                o.failed,
                o.reroute.as_secs_f64() * 1000.0,
                o.p99_before.as_secs_f64() * 1000.0,
                o.p99_during.as_secs_f64() * 1000.0,
            );
            println!("{line}");
            let _ = writeln!(report, "{line}");
            reroutes.push(o.reroute);
        }
        reroutes.sort();
        let median = reroutes[reroutes.len() / 2];
        let worst = reroutes[reroutes.len() - 1];
        let line = format!(
            "\n{fault:?}: median reroute {:.0} ms, worst {:.0} ms\n",
            median.as_secs_f64() * 1000.0,
            worst.as_secs_f64() * 1000.0
        );
        println!("{line}");
        summary += &line;
    }
    report += &summary;
    if part("replicas") {
        report += "\n";
        report += &replicas::report(&rt, runs, rate);
    }
    if let Some(out) = opt("--out") {
        // cargo runs benches in the package directory; relative paths are from the workspace.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let path = root.join(&out);
        std::fs::write(&path, report).expect("write report");
        println!("report written to {}", path.display());
    }
}
