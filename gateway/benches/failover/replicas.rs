//! The failover benchmark's replica sections: what several gateways per cluster buy and
//! cost, under 500 new connections per second.
//!
//! Topology on loopback: `west` (in this process) drives `default/svc`, exported by `east`
//! (two `strait run` processes, replicas `east-1` and `east-2`, preferred by policy) and
//! `north` (one gateway, the other region). Discovery runs everywhere (replica records
//! travel by gossip).
//! - `kill`: `east-1` gets SIGKILL 2 s into an 8 s load. Reroute time = the kill until the
//!   end of the last connection it slowed (over 3x the pre-fault p99 + 5 ms) or failed,
//!   those in flight at the kill included:
//!   from then on every new connection went straight to `east-2`. Also counted: failed new
//!   connections (not in flight at the kill) and connections another region answered.
//! - `rolling`: each replica in turn gets SIGTERM (drain, exit) and is started again once
//!   gone; the next goes once west routes to the restarted one. Failed and broken
//!   connections, and connections another region answered, over the whole load.
//! - `rest`: west's gossip bytes per second and tunnel connections, idle, with east as one
//!   gateway and as two replicas.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use strait_common::config::routing::Mode;
use strait_gateway::Gateway;
use strait_gateway::demo::backend::Backend;
use strait_ops::drill::analysis::in_flight;
use strait_ops::load::{Load, LoadSpec, Sample};
use strait_tests::*;
use tokio::runtime::Runtime;

use super::{FAULT_AT, LOAD, p99};

const LEASE: Duration = Duration::from_secs(3);

struct Fed {
    west: Gateway,
    east: Vec<(PathBuf, tokio::process::Child)>,
    _north: Gateway,
    _backends: (Backend, Backend),
    _pki: TestPki,
}

async fn federation(replicas: usize) -> Fed {
    let pki = TestPki::new();
    let (be, bn) = super::backends().await;
    let (un, _) = udp();
    let north = pki
        .gateway("north", un, |c| {
            c.exports.push(export("svc", 7000, bn.addr, &["*"]));
            c.discovery = Some(discovery(&[], LEASE));
        })
        .await;
    let seed = north.discovery_addr().expect("gossip");
    pki.write("east", &pki.issue("east"));
    let mut east = Vec::new();
    for k in 1..=replicas {
        let (probe, tunnel) = udp();
        drop(probe);
        let mut c = pki.config("east", tunnel);
        c.exports.push(export("svc", 7000, be.addr, &["*"]));
        let mut d = discovery(&[seed], LEASE);
        d.replica = (replicas > 1).then(|| format!("east-{k}"));
        c.discovery = Some(d);
        let path = pki.dir.path().join(format!("east-{k}.yaml"));
        std::fs::write(&path, serde_yaml::to_string(&c).unwrap()).unwrap();
        let child = spawn_strait(env!("CARGO_BIN_EXE_strait"), &path);
        east.push((path, child));
    }
    let (uw, _) = udp();
    let west = pki
        .gateway("west", uw, |c| {
            c.discovery = Some(discovery(&[seed], LEASE));
            c.routing.default.mode = Some(Mode::Priority);
            c.routing.default.priority = Some(vec!["east".into(), "north".into()]);
        })
        .await;
    let fed = Fed {
        west,
        east,
        _north: north,
        _backends: (be, bn),
        _pki: pki,
    };
    in_rotation(&fed.west, replicas).await;
    fed
}

/// Waits until west routes to east first through `n` replicas.
async fn in_rotation(west: &Gateway, n: usize) {
    let admin = admin(west);
    eventually(Duration::from_secs(30), "east in rotation", async || {
        let Ok(Ok(r)) = admin.route("default/svc").await else {
            return false;
        };
        r.primary.as_deref() == Some("east")
            && r.clusters
                .iter()
                .any(|c| c.cluster == "east" && c.routable_replicas == n)
    })
    .await;
}

fn load(west: &Gateway, rate: f64, duration: Duration) -> Load {
    Load::start(LoadSpec {
        target: west.listener("default/svc", 7000).expect("listener"),
        rate,
        duration,
        timeout: Duration::from_secs(5),
    })
}

fn elsewhere(samples: &[Sample]) -> usize {
    samples
        .iter()
        .filter(|s| s.result.as_ref().is_ok_and(|c| c != "east"))
        .count()
}

/// (connections, failed new, served elsewhere, reroute, p99 before).
async fn kill(rate: f64) -> (usize, usize, usize, Duration, Duration) {
    let mut fed = federation(2).await;
    let load = load(&fed.west, rate, LOAD);
    tokio::time::sleep_until((Instant::now() + FAULT_AT.saturating_sub(load.elapsed())).into())
        .await;
    let at = load.elapsed();
    fed.east[0].1.kill().await.expect("SIGKILL");
    let samples = load.finish().await;
    let before: Vec<&Sample> = samples.iter().filter(|s| s.end() < at).collect();
    let p99_before = p99(&before);
    let slow = p99_before * 3 + Duration::from_millis(5);
    // The connections the kill slowed or failed, those in flight at it included (no
    // connection should be answered by another cluster: only slow or failed ones count).
    let affected: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.end() >= at && (s.result.is_err() || s.latency > slow))
        .collect();
    let rerouted = affected
        .iter()
        .map(|s| s.end().saturating_sub(at))
        .max()
        .unwrap_or_default();
    for s in affected.iter().take(8) {
        println!(
            "  affected: started {:+.0} ms from the kill, took {:.0} ms: {:?}",
            s.at.as_secs_f64() * 1000.0 - at.as_secs_f64() * 1000.0,
            s.latency.as_secs_f64() * 1000.0,
            s.result
        );
    }
    let failed = samples
        .iter()
        .filter(|s| s.result.is_err() && !in_flight(s, &[at]))
        .count();
    (
        samples.len(),
        failed,
        elsewhere(&samples),
        rerouted,
        p99_before,
    )
}

/// (connections, failed, served elsewhere, time to restart both).
async fn rolling(rate: f64) -> (usize, usize, usize, Duration) {
    let mut fed = federation(2).await;
    let load = load(&fed.west, rate, Duration::from_secs(60));
    tokio::time::sleep(FAULT_AT).await;
    let began = Instant::now();
    for k in 0..fed.east.len() {
        let (path, child) = &mut fed.east[k];
        let pid = child.id().expect("running") as i32;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let _ = child.wait().await;
        *child = spawn_strait(env!("CARGO_BIN_EXE_strait"), path);
        in_rotation(&fed.west, 2).await;
    }
    let took = began.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let samples = load.samples();
    drop(load);
    let failed = samples.iter().filter(|s| s.result.is_err()).count();
    (samples.len(), failed, elsewhere(&samples), took)
}

/// West's gossip bytes per second (sent + received) and tunnel connections, idle.
async fn rest(replicas: usize) -> (f64, usize) {
    let fed = federation(replicas).await;
    let bytes = |g: &Gateway| {
        let m = g.render_metrics();
        ["sent", "received"]
            .iter()
            .filter_map(|d| {
                metric(
                    &m,
                    &format!("strait_discovery_bytes_total{{direction=\"{d}\"}}"),
                )
            })
            .sum::<f64>()
    };
    // Settled first: records and origins known everywhere.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (b0, t0) = (bytes(&fed.west), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rate = (bytes(&fed.west) - b0) / t0.elapsed().as_secs_f64();
    (rate, fed.west.tunnel_connections())
}

/// The replica sections of the report: `runs` kills and rolling restarts at `rate`, and
/// the cost at rest.
pub fn report(rt: &Runtime, runs: usize, rate: f64) -> String {
    let mut report = format!(
        "## Kill one of two replicas ({rate} new connections/s, SIGKILL at {}s)\n\n| run | connections | failed new | served by another region | reroute inside the cluster | p99 before |\n|---|---|---|---|---|---|\n",
        FAULT_AT.as_secs(),
    );
    let mut reroutes = Vec::new();
    for run in 1..=runs {
        let (n, failed, other, reroute, p99_before) = rt.block_on(kill(rate));
        let line = format!(
            "| {run} | {n} | {failed} | {other} | {:.0} ms | {:.1} ms |",
            reroute.as_secs_f64() * 1000.0,
            p99_before.as_secs_f64() * 1000.0
        );
        println!("{line}");
        let _ = writeln!(report, "{line}");
        reroutes.push(reroute);
    }
    reroutes.sort();
    let _ = writeln!(
        report,
        "\nmedian reroute {:.0} ms, worst {:.0} ms\n\n## Rolling restart of both replicas ({rate} new connections/s)\n\n| run | connections | failed | served by another region | restart took |\n|---|---|---|---|---|",
        reroutes[reroutes.len() / 2].as_secs_f64() * 1000.0,
        reroutes[reroutes.len() - 1].as_secs_f64() * 1000.0
    );
    for run in 1..=runs {
        let (n, failed, other, took) = rt.block_on(rolling(rate));
        let line = format!(
            "| {run} | {n} | {failed} | {other} | {:.1} s |",
            took.as_secs_f64()
        );
        println!("{line}");
        let _ = writeln!(report, "{line}");
    }
    let _ = writeln!(
        report,
        "\n## Replicas at rest (west's view, 10 s idle)\n\n| east runs | gossip bytes/s at west | west's tunnel connections |\n|---|---|---|"
    );
    for replicas in [1, 2] {
        let (bytes, conns) = rt.block_on(rest(replicas));
        let line = format!(
            "| {} | {bytes:.0} | {conns} |",
            if replicas == 1 {
                "one gateway"
            } else {
                "two replicas"
            }
        );
        println!("{line}");
        let _ = writeln!(report, "{line}");
    }
    report
}
