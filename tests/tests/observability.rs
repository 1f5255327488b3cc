//! The observability kit in deploy/observability/ against the real thing: promtool checks
//! and unit-tests the rules, every metric the rules and the dashboard use exists, and a
//! real Prometheus scraping a demo federation records the golden signals with the
//! documented labels and evaluates every rule without error.
//!
//! With `STRAIT_DASHBOARD_SVG=<path>` the scrape test also runs the demo's failover tour
//! and renders the dashboard's main panels from Prometheus into that SVG file (how
//! docs/dashboard.svg is made).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use strait_gateway::demo::{self, DemoArgs};
use strait_tests::eventually;
use strait_tests::prometheus::{Panel, Prometheus, installed, observability_dir, render_svg};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn read(name: &str) -> String {
    std::fs::read_to_string(observability_dir().join(name))
        .unwrap_or_else(|e| panic!("deploy/observability/{name}: {e}"))
}

/// Words of a PromQL text: metric names (`strait_*`) and recorded names (`a:b:c`).
fn names(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut raw = BTreeSet::new();
    let mut recorded = BTreeSet::new();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
        match word.matches(':').count() {
            0 if word.starts_with("strait_") => {
                raw.insert(word.to_owned());
            }
            2 if word.split(':').all(|p| !p.is_empty()) => {
                recorded.insert(word.to_owned());
            }
            _ => {}
        }
    }
    (raw, recorded)
}

/// Every expression of the dashboard (panel targets, annotations, variables).
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    ("query", Value::String(e)) if e.contains('(') => out.push(e.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// The names the rules file records and the alerts it defines.
fn rule_names(rules: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let value = |prefix: &str| -> BTreeSet<String> {
        rules
            .lines()
            .filter_map(|l| l.trim().strip_prefix(prefix))
            .map(|n| n.trim().to_owned())
            .collect()
    };
    (value("- record:"), value("- alert:"))
}

#[test]
fn promtool_checks_the_rules_and_every_alert_passes_its_unit_test() {
    let promtool = installed("promtool");
    for args in [
        &["check", "rules", "strait.rules.yml"][..],
        &["test", "rules", "strait.rules.test.yml"][..],
    ] {
        let out = std::process::Command::new(&promtool)
            .args(args)
            .current_dir(observability_dir())
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Each alert has a unit test that expects it to fire.
    let rules = read("strait.rules.yml");
    let tests = read("strait.rules.test.yml");
    let (_, alerts) = rule_names(&rules);
    for a in &alerts {
        let fired = tests.split("alertname: ").skip(1).any(|rest| {
            rest.starts_with(&format!("{a}\n"))
                && rest
                    .lines()
                    .nth(1)
                    .is_some_and(|l| l.trim() == "exp_alerts:")
        });
        assert!(
            fired,
            "no unit test in strait.rules.test.yml makes {a} fire"
        );
    }
}

#[test]
fn every_metric_the_rules_and_the_dashboard_use_exists_and_every_alert_has_a_runbook() {
    let reference: BTreeSet<&str> = strait_gateway::app::metrics_reference()
        .iter()
        .map(|d| d.name)
        .collect();
    let exists = |name: &str| {
        reference.contains(name)
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name.strip_suffix(s).is_some_and(|n| reference.contains(n)))
    };
    let rules = read("strait.rules.yml");
    let (recorded_here, alerts) = rule_names(&rules);
    let dashboard: Value = serde_json::from_str(&read("strait-dashboard.json"))
        .expect("strait-dashboard.json is JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 15, "dashboard expressions: {exprs:?}");

    let (raw, recorded) = names(&(rules.clone() + &exprs.join("\n")));
    assert!(raw.len() >= 15, "{raw:?}");
    for name in &raw {
        assert!(exists(name), "{name} is not a metric any gateway exports");
    }
    for name in &recorded {
        assert!(
            recorded_here.contains(name),
            "{name} is used but no rule in strait.rules.yml records it"
        );
    }
    let (_, dashboard_recorded) = names(&exprs.join("\n"));
    for name in &recorded_here {
        assert!(
            dashboard_recorded.contains(name) || rules.matches(name.as_str()).count() > 1,
            "{name} is recorded but neither the dashboard nor another rule reads it"
        );
    }
    let operations = std::fs::read_to_string(observability_dir().join("../../docs/OPERATIONS.md"))
        .expect("docs/OPERATIONS.md");
    for a in &alerts {
        assert!(
            operations.contains(&format!("### {a}\n")),
            "docs/OPERATIONS.md has no runbook section `### {a}`"
        );
        assert!(
            rules.contains(&format!(
                "runbook_url: docs/OPERATIONS.md#{}",
                a.to_lowercase()
            )),
            "{a} does not link its runbook"
        );
    }
}

/// A DNS query for `name` (type A, class IN) with ID `id`, as a resolver sends it.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Client connections to `demo/hello` through `listener`, one every 20 ms, and a DNS
/// question to `dns` every 100 ms (a name that exists, and every fifth time one that does
/// not), for `span`.
async fn traffic(listener: SocketAddr, dns: SocketAddr, span: Duration) {
    let resolver = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let end = tokio::time::Instant::now() + span;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for n in 0u16.. {
        if tokio::time::Instant::now() >= end {
            break;
        }
        tick.tick().await;
        if n % 5 == 0 {
            let name = if n % 25 == 0 { "nope" } else { "hello" };
            let q = dns_query(n, &format!("{name}.demo.svc.clusterset.local"));
            let _ = resolver.send_to(&q, dns).await;
        }
        tokio::spawn(async move {
            if let Ok(mut s) = TcpStream::connect(listener).await {
                let _ = s
                    .write_all(b"GET / HTTP/1.1\r\nhost: demo\r\nconnection: close\r\n\r\n")
                    .await;
                let mut out = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
            }
        });
    }
}

fn label<'a>(series: &'a Value, name: &str) -> &'a str {
    series["metric"][name].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_records_the_golden_signals_of_a_demo_federation() {
    strait_gateway::raise_fd_limit();
    let mut d = demo::start(DemoArgs::ephemeral(3)).await.unwrap();
    assert!(d.wait_converged(Duration::from_secs(15)).await);
    let clusters: Vec<String> = d.regions.iter().map(|r| r.cluster.clone()).collect();
    let targets: Vec<SocketAddr> = d.regions.iter().map(|r| r.gateway().admin_addr()).collect();
    let prom = Prometheus::start(&targets, &observability_dir().join("strait.rules.yml")).await;
    let from = d.regions[0].gateway();
    let hello = from
        .listener("demo/hello", 8080)
        .expect("demo/hello imported");
    let source = clusters[0].clone();
    let dns = from.dns_addr().expect("the demo serves DNS");
    let picture = std::env::var_os("STRAIT_DASHBOARD_SVG");
    let span = Duration::from_secs(if picture.is_some() { 150 } else { 40 });
    let load = tokio::spawn(traffic(hello, dns, span));
    let started = tokio::time::Instant::now();

    // The links from the first region carry the traffic, labelled source → destination.
    let opened =
        format!("link:strait_streams_opened:rate1m{{source=\"{source}\",service=\"demo/hello\"}}");
    eventually(
        Duration::from_secs(60),
        "link series recorded",
        async || {
            prom.query(&format!("{opened} > 0"))
                .await
                .iter()
                .any(|s| clusters[1..].iter().any(|c| c == label(s, "destination")))
        },
    )
    .await;

    // Each gateway names its cluster, and the raw series carry the documented labels.
    let info = prom.query("strait_gateway_info").await;
    let named: BTreeSet<&str> = info.iter().map(|s| label(s, "local_cluster")).collect();
    assert_eq!(
        named,
        clusters.iter().map(String::as_str).collect(),
        "{info:?}"
    );
    for (metric, labels) in [
        (
            "strait_streams_opened_total",
            &["service", "peer", "direction"][..],
        ),
        (
            "strait_bytes_total",
            &["service", "peer", "side", "direction"],
        ),
        (
            "strait_active_connections",
            &["service", "peer", "direction"],
        ),
        ("strait_connect_duration_seconds_bucket", &["peer", "le"]),
        ("strait_peer_rtt_quantile_seconds", &["peer", "quantile"]),
        ("strait_route_connections_total", &["service", "cluster"]),
        ("strait_dns_responses_total", &["transport", "rcode"]),
    ] {
        let series = prom.query(metric).await;
        assert!(!series.is_empty(), "{metric}: no series scraped");
        for s in &series {
            let mut have: BTreeSet<&str> = s["metric"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            for fixed in ["__name__", "instance", "job"] {
                assert!(have.remove(fixed), "{metric} lacks {fixed}: {s}");
            }
            assert_eq!(have, labels.iter().copied().collect(), "{metric}: {s}");
        }
    }

    // Every golden signal of the link is recorded.
    for recorded in [
        "link:strait_bytes:rate1m",
        "link:strait_connect_duration_seconds:p99_1m",
        "link:strait_peer_rtt_seconds:quantile",
        "link:strait_active_connections:sum",
        "service:strait_route_connections:rate1m",
        "cluster:strait_dns_responses:rate1m",
        "cluster:strait_cert_expiry_seconds:min",
        "cluster:strait_discovery_convergence_lag_seconds:max",
    ] {
        let q = format!("{recorded}{{source=\"{source}\"}}");
        eventually(Duration::from_secs(30), &q, async || {
            !prom.query(&q).await.is_empty()
        })
        .await;
    }
    // DNS answers are counted by response code: the names asked exist, and some do not.
    for rcode in ["NOERROR", "NXDOMAIN"] {
        let q = format!(
            "cluster:strait_dns_responses:rate1m{{source=\"{source}\",rcode=\"{rcode}\"}} > 0"
        );
        eventually(Duration::from_secs(30), &q, async || {
            !prom.query(&q).await.is_empty()
        })
        .await;
    }
    let others: BTreeSet<String> = clusters[1..].iter().cloned().collect();
    let live = format!("link:strait_peer_responsive:min{{source=\"{source}\"}} == 1");
    eventually(Duration::from_secs(30), "every link answers", async || {
        let reached: BTreeSet<String> = prom
            .query(&live)
            .await
            .iter()
            .map(|s| label(s, "destination").to_owned())
            .collect();
        reached == others
    })
    .await;

    // Every rule loaded and evaluates without error; no alert fires on a healthy demo.
    let rules_file = std::fs::read_to_string(observability_dir().join("strait.rules.yml")).unwrap();
    let (recorded, alerts) = rule_names(&rules_file);
    let mut evaluated = 0;
    eventually(
        Duration::from_secs(30),
        "every rule evaluated",
        async || {
            let groups = prom.api("rules").await;
            let rules: Vec<Value> = groups["groups"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            evaluated = rules.len();
            rules.iter().all(|r| r["health"] == "ok")
        },
    )
    .await;
    assert_eq!(evaluated, recorded.len() + alerts.len());
    // No alert fires or is even pending (each waits out its `for` pending first).
    let alerts = prom.query("ALERTS").await;
    assert!(alerts.is_empty(), "alerts on a healthy demo: {alerts:?}");

    if let Some(path) = picture {
        // A minute of steady traffic, the tour (a region down and back), then a while
        // more: the picture's time line (waits that shape the data, not synchronisation).
        tokio::time::sleep_until(started + Duration::from_secs(45)).await;
        d.tour().await.expect("failover tour");
        tokio::time::sleep(Duration::from_secs(20)).await;
        let svg = dashboard_picture(&prom, &source).await;
        std::fs::write(&path, svg).expect("write the dashboard picture");
    }
    load.abort();
}

/// The dashboard's main panels, from the last two minutes of Prometheus data.
async fn dashboard_picture(prom: &Prometheus, source: &str) -> String {
    let span = Duration::from_secs(100);
    let s = format!("source=\"{source}\"");
    let mut panels = Vec::new();
    for (title, unit, expr, legend) in [
        (
            "Connections by serving cluster (demo/hello)",
            "/s",
            format!(
                "sum by (cluster) (service:strait_route_connections:rate1m{{{s},service=\"demo/hello\"}})"
            ),
            "served by {{cluster}}",
        ),
        (
            "Peer liveness",
            "",
            format!("link:strait_peer_responsive:min{{{s}}}"),
            "{{source}} → {{destination}}",
        ),
        (
            "Connect latency p99",
            "s",
            format!("link:strait_connect_duration_seconds:p99_1m{{{s}}}"),
            "{{source}} → {{destination}}",
        ),
        (
            "RTT p99",
            "s",
            format!("link:strait_peer_rtt_seconds:quantile{{{s},quantile=\"0.99\"}}"),
            "{{source}} → {{destination}}",
        ),
        (
            "Failed and refused connections",
            "/s",
            format!("sum by (destination, reason) (link:strait_streams_failed:rate1m{{{s}}})"),
            "{{destination}}: {{reason}}",
        ),
        (
            "DNS responses",
            "/s",
            "sum by (rcode) (cluster:strait_dns_responses:rate1m)".to_owned(),
            "{{rcode}}",
        ),
    ] {
        let result = prom.query_range(&expr, span, 1).await;
        panels.push(Panel::from_range(title, unit, &result, legend));
    }
    render_svg(
        &format!("strait federation, seen from {source} (a failover tour of the demo)"),
        &panels,
    )
}
