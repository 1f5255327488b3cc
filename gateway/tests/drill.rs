//! Drills against a real local federation (the demo's three regions on loopback): a gateway
//! kill with a healthy alternative passes its objectives, and a drill stopped early (by the
//! operator or by its guard rail) leaves no fault behind.

use std::net::SocketAddr;
use std::time::Duration;

use strait_common::api::{ActiveFault, ApiError};
use strait_gateway::demo::{self, Demo, DemoArgs, TOKEN_FILE};
use strait_ops::client::Admin;
use strait_ops::drill::analysis::Verdict;
use strait_ops::drill::{self, Scenario};
use strait_tests::{eventually, within};

async fn federation() -> Demo {
    strait_gateway::raise_fd_limit();
    let d = demo::start(DemoArgs::ephemeral(3)).await.unwrap();
    assert!(
        d.wait_converged(Duration::from_secs(15)).await,
        "discovery did not converge"
    );
    d
}

/// A scenario against `d`: its gateways and token, then `rest` (load, steps, objectives).
fn scenario(d: &Demo, rest: &str) -> Scenario {
    let mut y = format!(
        "name: test\nfederation:\n  token_file: {}\n  gateways:\n",
        d.dir.join(TOKEN_FILE).display()
    );
    for r in &d.regions {
        y.push_str(&format!(
            "    {}: {}\n",
            r.cluster,
            r.gateway().admin_addr()
        ));
    }
    y.push_str(rest);
    let path = d.dir.join("drill.yaml");
    std::fs::write(&path, y).unwrap();
    Scenario::load(&path).unwrap()
}

/// Runs drill `s` to its end (at most 30 s) and returns its report with the summary a
/// user reads.
async fn run_to_end(s: Scenario) -> (drill::analysis::Report, String) {
    let report = within(
        Duration::from_secs(30),
        drill::run(s, std::future::pending()),
    )
    .await
    .unwrap();
    let text = drill::render::summary(&report);
    (report, text)
}

/// The faults active on a gateway, read through its admin API.
async fn active_faults(d: &Demo, admin: SocketAddr) -> Vec<ActiveFault> {
    let token = std::fs::read_to_string(d.dir.join(TOKEN_FILE)).unwrap();
    let reply = Admin::with_token(admin, token.trim())
        .faults()
        .await
        .unwrap();
    assert!(reply.is_ok(), "{reply:?}");
    reply.unwrap()
}

async fn assert_no_faults_left(d: &Demo) {
    for r in &d.regions {
        let left = active_faults(d, r.gateway().admin_addr()).await;
        assert!(left.is_empty(), "{} still has {left:?}", r.cluster);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_kill_with_a_healthy_alternative_meets_its_objectives() {
    let d = federation().await;
    let from = d.regions[0].cluster.clone();
    // No new connection may fail; a request in flight through the killed gateway dies
    // with it (broken, judged on its own), as in the library's gateway-kill drill.
    let s = scenario(
        &d,
        &format!(
            "load:\n  - from: {from}\n    service: demo/hello\n    rate: 100\nduration: 5s\n\
             steps:\n  - at: 1500ms\n    duration: 2s\n    fault: kill-tunnel\n    on: $primary\n\
             objectives:\n  max_failed_connections: 0\n  max_broken_connections: 1\n  max_reroute: 1500ms\n  max_p99_connect: 2s\n"
        ),
    );
    // Progress as `strait drill run` shows it when piped: plain lines as it goes.
    let mut progress = drill::progress::Reporter::new(Vec::new(), false);
    let report = drill::run_with_progress(s, std::future::pending(), |p| progress.update(p))
        .await
        .unwrap();
    let shown = String::from_utf8(progress.finish()).unwrap();
    let text = drill::render::summary(&report);
    assert_eq!(report.verdict, Verdict::Passed, "{text}");
    let lines: Vec<&str> = shown.lines().collect();
    assert!(
        !shown.contains('\x1b') && !shown.contains('\r'),
        "piped progress has no terminal codes: {shown:?}"
    );
    assert!(lines.len() >= 3, "{shown}");
    assert!(lines[0].starts_with("[0s/5s]"), "{shown}");
    let faulted = lines
        .iter()
        .find(|l| l.contains("faults: kill-tunnel"))
        .unwrap_or_else(|| panic!("no line shows the fault: {shown}"));
    assert!(faulted.contains("served by"), "{shown}");
    let last = lines.last().unwrap();
    assert!(
        last.starts_with("[5s/5s]") && last.ends_with("faults: none") && last.contains(" 0 failed"),
        "{shown}"
    );
    let f = &report.faults[0];
    assert!(
        f.victim_served,
        "the killed gateway carried the load: {text}"
    );
    let detected = f.detected_after_s.expect("detection time");
    let rerouted = f.rerouted_after_s.expect("reroute time");
    assert!(detected <= 1.5 && rerouted <= 1.5, "{text}");
    assert_eq!(f.failed, 0, "{text}");
    assert_eq!(report.loads[0].failed, 0, "{text}");
    assert!(report.loads[0].started >= 450, "{text}");
    // The share timeline shows the move to another cluster.
    assert!(report.loads[0].clusters.len() >= 2, "{text}");
    assert!(report.faults_undone, "{text}");
    assert_no_faults_left(&d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_drill_undoes_its_faults() {
    let d = federation().await;
    let from = d.regions[0].cluster.clone();
    let s = scenario(
        &d,
        &format!(
            "load:\n  - from: {from}\n    service: demo/hello\n    rate: 20\nduration: 60s\n\
             steps:\n  - at: 1s\n    duration: 50s\n    fault: blackhole\n    on: $primary\n\
             \x20 - at: 1s\n    duration: 50s\n    fault: cut-discovery\n    on: $from\n"
        ),
    );
    let admins: Vec<SocketAddr> = d.regions.iter().map(|r| r.gateway().admin_addr()).collect();
    // The operator presses Ctrl-C once both faults are in place.
    let interrupt = async {
        eventually(
            Duration::from_secs(30),
            "both faults in place",
            async || {
                let mut n = 0;
                for a in &admins {
                    n += active_faults(&d, *a).await.len();
                }
                n == 2
            },
        )
        .await;
    };
    let report = within(Duration::from_secs(30), drill::run(s, interrupt))
        .await
        .unwrap();
    assert_eq!(report.verdict, Verdict::Aborted);
    assert!(report.abort_reason.as_deref().unwrap().contains("operator"));
    assert!(report.faults_undone);
    assert!(report.duration_s < 30.0);
    assert_no_faults_left(&d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_rail_stops_a_drill_that_breaks_too_much() {
    let d = federation().await;
    let from = d.regions[0].cluster.clone();
    // Killing the source's own tunnel leaves its clients no way out: connections fail.
    let s = scenario(
        &d,
        &format!(
            "load:\n  - from: {from}\n    service: demo/hello\n    rate: 50\n    timeout: 1s\nduration: 60s\n\
             steps:\n  - at: 1s\n    duration: 50s\n    fault: kill-tunnel\n    on: $from\n\
             stop_if:\n  failed_connections: 5\n"
        ),
    );
    let (report, text) = run_to_end(s).await;
    assert_eq!(report.verdict, Verdict::Aborted, "{text}");
    assert!(
        report
            .abort_reason
            .as_deref()
            .unwrap()
            .contains("guard rail"),
        "{text}"
    );
    assert!(report.loads[0].failed > 5, "{text}");
    assert!(report.faults_undone, "{text}");
    assert_no_faults_left(&d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_api_wants_the_token_and_explains_bad_requests() {
    use strait_ops::client::request;
    let d = federation().await;
    let admin = d.regions[1].gateway().admin_addr();
    let token = std::fs::read_to_string(d.dir.join(TOKEN_FILE)).unwrap();
    let token = token.trim();
    let blackhole = serde_json::json!({"fault": {"kind": "blackhole"}, "duration": "1s"});
    let blackhole = &serde_json::to_vec(&blackhole).unwrap()[..];
    let (code, body) = request(admin, "POST", "/v1/faults", None, Some(blackhole))
        .await
        .unwrap();
    assert_eq!(code, 401, "{body}");
    let wrong = "x".repeat(token.len());
    let (code, _) = request(admin, "POST", "/v1/faults", Some(&wrong), Some(blackhole))
        .await
        .unwrap();
    assert_eq!(code, 401);
    let bad = [
        (
            serde_json::json!({"fault": {"kind": "meteor"}, "duration": "1s"}),
            "fault",
        ),
        (
            serde_json::json!({"fault": {"kind": "blackhole", "peer": "mars"}, "duration": "1s"}),
            "fault.peer",
        ),
        (
            serde_json::json!({"fault": {"kind": "loss", "fraction": 2.0}, "duration": "1s"}),
            "fault.fraction",
        ),
        (
            serde_json::json!({"fault": {"kind": "drain"}, "duration": "1h"}),
            "duration",
        ),
        (
            serde_json::json!({"fault": {"kind": "unready", "service": "demo/nope"}, "duration": "1s"}),
            "fault.service",
        ),
    ];
    for (req, field) in bad {
        let sent = serde_json::to_vec(&req).unwrap();
        let (code, body) = request(admin, "POST", "/v1/faults", Some(token), Some(&sent))
            .await
            .unwrap();
        assert_eq!(code, 400, "{req} -> {body}");
        let error: ApiError = serde_json::from_str(&body).unwrap();
        assert!(
            error.field.as_deref().unwrap_or("").starts_with(field),
            "{req} -> {body}"
        );
        assert!(!error.fix.as_deref().unwrap_or("").is_empty(), "{body}");
    }
    // Undoing an unknown fault is a 404, and none of the above injected anything.
    let (code, _) = request(admin, "DELETE", "/v1/faults/999", Some(token), None)
        .await
        .unwrap();
    assert_eq!(code, 404);
    assert_no_faults_left(&d).await;
    // A fault ends on the gateway's own timer, with no drill to undo it.
    let (code, body) = request(admin, "POST", "/v1/faults", Some(token), Some(blackhole))
        .await
        .unwrap();
    assert_eq!(code, 201, "{body}");
    assert_eq!(active_faults(&d, admin).await.len(), 1);
    eventually(
        Duration::from_secs(5),
        "the fault ended on its own",
        async || active_faults(&d, admin).await.is_empty(),
    )
    .await;
}

/// A demo whose gateways run as processes of their own (`strait demo --processes`): two
/// regions of two replicas, on a random block of fixed ports.
async fn process_federation(dir: &std::path::Path) -> Demo {
    use rand::Rng;
    strait_gateway::raise_fd_limit();
    // Fixed ports (the processes bind what their configs say): a random block of 20,
    // below the ephemeral range other tests' client sockets take ports from.
    let base = rand::rng().random_range(1_000..1_600u16) * 20;
    let d = demo::start(DemoArgs {
        regions: 2,
        base_port: base,
        dir: Some(dir.to_owned()),
        duration: None,
        tour: false,
        replicas: 2,
        processes: true,
        program: Some(env!("CARGO_BIN_EXE_strait").into()),
    })
    .await
    .unwrap();
    assert!(
        d.wait_converged(Duration::from_secs(20)).await,
        "discovery did not converge"
    );
    d
}

/// Runs drill `s` while the demo's supervisor starts again what stops (as `strait demo`
/// does between commands).
async fn supervised(d: &mut Demo, s: Scenario) -> drill::analysis::Report {
    let drill = drill::run(s, std::future::pending());
    tokio::pin!(drill);
    let mut supervise = tokio::time::interval(Duration::from_millis(100));
    within(Duration::from_secs(90), async {
        loop {
            tokio::select! {
                r = &mut drill => break r.unwrap(),
                _ = supervise.tick() => d.restart_drained().await,
            }
        }
    })
    .await
}

/// `d`'s gateways for a scenario: each cluster's replicas' admin APIs.
fn replicated_scenario(d: &Demo, rest: &str) -> Scenario {
    let mut y = format!(
        "name: test\nfederation:\n  token_file: {}\n  gateways:\n",
        d.dir.join(TOKEN_FILE).display()
    );
    for r in &d.regions {
        let admins: Vec<String> = r
            .replicas
            .iter()
            .map(|x| x.admin().addr().to_string())
            .collect();
        y.push_str(&format!("    {}: [{}]\n", r.cluster, admins.join(", ")));
    }
    y.push_str(rest);
    let path = d.dir.join("drill.yaml");
    std::fs::write(&path, y).unwrap();
    Scenario::load(&path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_signals_to_replica_processes_keep_traffic_in_their_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = process_federation(dir.path()).await;
    let (from, to) = (d.regions[0].cluster.clone(), d.regions[1].cluster.clone());
    let pid = async |d: &Demo, k: usize| {
        d.regions[1].replicas[k]
            .admin()
            .ready()
            .await
            .unwrap()
            .1
            .pid
    };
    let before = (pid(&d, 0).await, pid(&d, 1).await);
    assert_ne!(before.0, std::process::id());
    assert_ne!(before.0, before.1, "each replica is its own process");
    let s = replicated_scenario(
        &d,
        &format!(
            "load:\n  - from: {from}\n    service: demo/hello\n    rate: 100\nduration: 24s\n\
             steps:\n  - at: 1500ms\n    duration: 10s\n    fault: signal\n    on: {to}\n    replica: 1\n\
             \x20 - at: 12s\n    duration: 10s\n    fault: signal\n    on: {to}\n    replica: 2\n    signal: SIGTERM\n\
             objectives:\n  max_failed_connections: 0\n  max_broken_connections: 2\n  max_served_elsewhere: 0\n"
        ),
    );
    let report = supervised(&mut d, s).await;
    let text = drill::render::summary(&report);
    assert_eq!(report.verdict, Verdict::Passed, "{text}");
    for f in &report.faults {
        assert!(f.error.is_none(), "{text}");
        assert!(f.stays && f.victim_served, "{text}");
        assert_eq!(f.served_elsewhere, Some(0), "{text}");
    }
    assert_eq!(report.faults[0].label, format!("SIGKILL {to}/1"));
    assert_eq!(report.faults[1].label, format!("SIGTERM {to}/2"));
    assert_eq!(report.loads[0].failed, 0, "{text}");
    // Both replicas are new processes, started again by the supervisor.
    let after = (pid(&d, 0).await, pid(&d, 1).await);
    assert!(
        after.0 != before.0 && after.1 != before.1,
        "{before:?} -> {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_to_a_gateway_sharing_the_drills_process_is_refused() {
    let d = federation().await;
    let from = d.regions[0].cluster.clone();
    let s = scenario(
        &d,
        &format!(
            "load:\n  - from: {from}\n    service: demo/hello\n    rate: 20\nduration: 3s\n\
             steps:\n  - at: 1s\n    duration: 1s\n    fault: signal\n    on: $primary\n"
        ),
    );
    let (report, text) = run_to_end(s).await;
    let error = report.faults[0].error.as_deref().unwrap_or_default();
    assert!(error.contains("the drill's own process"), "{text}");
    assert_ne!(report.verdict, Verdict::Passed, "{text}");
    // Nobody was signalled: every region still answers.
    for r in &d.regions {
        assert!(matches!(
            Admin::new(r.gateway().admin_addr()).ready().await,
            Ok((200, _))
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_drill_passes_against_the_in_process_demo() {
    strait_gateway::raise_fd_limit();
    let mut d = demo::start(DemoArgs {
        replicas: 2,
        ..DemoArgs::ephemeral(2)
    })
    .await
    .unwrap();
    assert!(d.wait_converged(Duration::from_secs(20)).await);
    let (from, to) = (d.regions[0].cluster.clone(), d.regions[1].cluster.clone());
    let s = replicated_scenario(
        &d,
        &format!(
            "load:\n  - from: {from}\n    service: demo/hello\n    rate: 100\nduration: 20s\n\
             steps:\n  - at: 1500ms\n    duration: 17s\n    fault: rolling-restart\n    on: {to}\n\
             objectives:\n  max_failed_connections: 0\n  max_served_elsewhere: 0\n"
        ),
    );
    let report = supervised(&mut d, s).await;
    let text = drill::render::summary(&report);
    assert_eq!(report.verdict, Verdict::Passed, "{text}");
    // Restarted in the same process: a new instance, the same pid, is "back".
    let f = &report.faults[0];
    assert!(f.error.is_none() && f.end_s < 18.5, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_to_the_in_process_demo_is_refused_and_nothing_is_killed() {
    use rand::Rng;
    let dir = tempfile::tempdir().unwrap();
    let base = rand::rng().random_range(1_000..1_600u16) * 20;
    // The user's `strait demo` (gateways in one process), and a drill from another.
    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait"))
        .args([
            "demo",
            "--regions",
            "2",
            "--replicas",
            "2",
            "--duration",
            "60",
        ])
        .arg("--base-port")
        .arg(base.to_string())
        .arg("--dir")
        .arg(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let admin = |region: u16, replica: u16| -> SocketAddr {
        let offset = if replica == 0 { 1 } else { 2 + 3 * replica };
        SocketAddr::from(([127, 0, 0, 1], base + 10 * region + offset))
    };
    let admins = [admin(0, 0), admin(0, 1), admin(1, 0), admin(1, 1)];
    eventually(
        Duration::from_secs(30),
        "the demo answers and imports",
        async || {
            let mut up = 0;
            for a in admins {
                up += usize::from(matches!(Admin::new(a).ready().await, Ok((200, _))));
            }
            let imported = Admin::new(admins[0])
                .services()
                .await
                .is_ok_and(|s| s.imports.iter().any(|l| l.service == "demo/hello"));
            up == admins.len() && imported && dir.path().join(TOKEN_FILE).exists()
        },
    )
    .await;
    let y = format!(
        "name: test\nfederation:\n  token_file: {}\n  gateways:\n    us-east: [{}, {}]\n    eu-west: [{}, {}]\n\
         load:\n  - from: us-east\n    service: demo/hello\n    rate: 20\nduration: 4s\n\
         steps:\n  - at: 1s\n    duration: 2s\n    fault: signal\n    on: eu-west\n    replica: 1\n",
        dir.path().join(TOKEN_FILE).display(),
        admins[0],
        admins[1],
        admins[2],
        admins[3]
    );
    let path = dir.path().join("drill.yaml");
    std::fs::write(&path, y).unwrap();
    let (report, text) = run_to_end(Scenario::load(&path).unwrap()).await;
    let error = report.faults[0].error.as_deref().unwrap_or_default();
    assert!(
        error.contains("shares process") && error.contains("strait demo --processes"),
        "{text}"
    );
    assert_ne!(report.verdict, Verdict::Passed, "{text}");
    assert!(demo.try_wait().unwrap().is_none(), "the demo still runs");
    for a in admins {
        assert!(matches!(Admin::new(a).ready().await, Ok((200, _))));
    }
}
