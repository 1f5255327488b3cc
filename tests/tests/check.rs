//! `strait check` against a demo federation: all ✓ when healthy, and the matching ✗
//! with its fix for a peer that is down, a certificate of another cluster and a gateway
//! that does not run.

use std::time::Duration;

use strait_gateway::demo::{self, DemoArgs};
use strait_ops::check::{Check, Targets, render, run};
use strait_tests::eventually;

fn failed(checks: &[Check]) -> Vec<&Check> {
    checks.iter().filter(|c| !c.ok).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_demo_passes_every_check_and_a_region_down_fails_its_peer_line() {
    strait_gateway::raise_fd_limit();
    let mut d = demo::start(DemoArgs::ephemeral(2)).await.unwrap();
    assert!(
        d.wait_converged(Duration::from_secs(15)).await,
        "demo converged"
    );
    let first = &d.regions[0];
    let targets = Targets {
        admin: Some(first.gateway().admin_addr()),
        dns: first.gateway().dns_addr(),
    };
    let config = first.config_path.clone();
    let other = d.regions[1].cluster.clone();

    let mut checks = Vec::new();
    eventually(Duration::from_secs(15), "every check passes", async || {
        checks = run(&config, targets).await;
        // (Clocks are measured by the first gossip exchange after the demo converged.)
        failed(&checks).is_empty() && render(&checks).contains("member(s) measured")
    })
    .await;
    let names: Vec<&str> = checks.iter().map(|c| c.check.as_str()).collect();
    for expected in ["config", "certificate", "gateway", "faults"] {
        assert!(
            names.contains(&expected),
            "{expected} is checked:\n{}",
            render(&checks)
        );
    }
    assert!(
        names.contains(&format!("peer {other}").as_str()),
        "{}",
        render(&checks)
    );
    assert!(
        names.iter().any(|n| n.starts_with("dns ")),
        "DNS is asked:\n{}",
        render(&checks)
    );
    let clocks = checks
        .iter()
        .find(|c| c.check == "clocks")
        .expect("clocks checked");
    assert!(
        clocks
            .detail
            .contains(&format!("1 member(s) measured; largest offset {other}")),
        "{}",
        render(&checks)
    );
    assert!(render(&checks).ends_with(&format!("all {} checks passed\n", checks.len())));

    d.take_down(&other).await.unwrap();
    eventually(Duration::from_secs(15), "the peer line fails", async || {
        let checks = run(&config, targets).await;
        failed(&checks).iter().any(|c| {
            c.check == format!("peer {other}")
                && c.fix.as_deref().is_some_and(|f| f.contains("UDP"))
        })
    })
    .await;
}

#[tokio::test]
async fn a_certificate_of_another_cluster_and_a_gateway_that_does_not_run_fail_with_their_fix() {
    let pki = strait_tests::TestPki::new();
    pki.write("us-east", &pki.issue("eu-west"));
    let (_sock, tunnel) = strait_tests::udp();
    let mut config = pki.config("us-east", tunnel);
    // Nothing listens here: the gateway is not running.
    config.listen.admin = "127.0.0.1:1".parse().unwrap();
    let file = pki.write_config(&config);
    let checks = run(&file, Targets::default()).await;
    let text = render(&checks);
    let cert = checks.iter().find(|c| c.check == "certificate").unwrap();
    assert!(!cert.ok && cert.detail.contains("eu-west"), "{text}");
    assert!(
        cert.fix.as_deref().unwrap().contains("strait pki issue"),
        "{text}"
    );
    let gw = checks.iter().find(|c| c.check == "gateway").unwrap();
    assert!(
        !gw.ok && gw.fix.as_deref().unwrap().contains("strait run"),
        "{text}"
    );
    assert!(
        text.ends_with(&format!("2 of {} checks failed\n", checks.len())),
        "{text}"
    );
}
