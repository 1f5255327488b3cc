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
    let s = scenario(
        &d,
        &format!(
            "load:\n  - from: {from}\n    service: demo/hello\n    rate: 100\nduration: 5s\n\
             steps:\n  - at: 1500ms\n    duration: 2s\n    fault: kill-tunnel\n    on: $primary\n\
             objectives:\n  max_failed_connections: 0\n  max_reroute: 1500ms\n  max_p99_connect: 2s\n"
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
    let report = within(
        Duration::from_secs(30),
        drill::run(s, std::future::pending()),
    )
    .await
    .unwrap();
    let text = drill::render::summary(&report);
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
