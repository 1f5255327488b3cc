//! Convergence benchmark: N discovery members in one process, real gRPC over mTLS on
//! loopback. Measures, per N:
//! - time from an export change at one member until every member sees it (p50/p99 over
//!   trials),
//! - gossip bytes per member per second at rest,
//! - time until every other member marks a stopped member down.
//!
//! Run: `cargo bench -p strait-discovery --bench convergence` (sizes default to 10 50 100;
//! pass others after `--`, e.g. `-- 10 20`). Defaults: 100 ms rounds, fanout 3, phi 5.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use strait_common::GatewayId;
use strait_common::pki::{CertificateAuthority, Identity};
use strait_discovery::model::{MemberInfo, Port, Service, ServiceKey};
use strait_discovery::node::{Node, NodeConfig};

const TD: &str = "bench.strait";
const TRIALS: usize = 20;

fn service() -> Service {
    Service {
        ports: vec![Port {
            name: "http".into(),
            port: 80,
            protocol: "TCP".into(),
        }],
        endpoints: vec![],
        export_to: vec!["*".into()],
        weight: 1,
        headless: false,
        session_affinity: None,
        exported_at_ms: 0,
        selection: Default::default(),
    }
}

fn exports(names: &[String]) -> BTreeMap<ServiceKey, Service> {
    names
        .iter()
        .map(|n| (ServiceKey::new("bench", n), service()))
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn run(n: usize) {
    let ca = CertificateAuthority::generate(TD, Duration::from_secs(3600)).expect("CA");
    let mut nodes: Vec<Node> = Vec::new();
    let started = Instant::now();
    for i in 0..n {
        let cluster = format!("m{i}");
        let cert = ca
            .issue_gateway_for(&GatewayId::new(TD, &cluster), Duration::from_secs(3600))
            .expect("issue");
        let id = Arc::new(
            Identity::from_pem(&ca.cert_pem, &cert.cert_pem, &cert.key_pem).expect("identity"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let me = MemberInfo {
            cluster: cluster.clone(),
            region: "bench".into(),
            zone: String::new(),
            tunnel_addr: addr,
            gossip_addr: addr,
        };
        let seeds = nodes.first().map(|n| vec![n.addr()]).unwrap_or_default();
        let node = Node::start(
            me,
            1,
            id,
            listener,
            NodeConfig {
                seeds,
                ..Default::default()
            },
        )
        .expect("start");
        node.set_local(exports(&[format!("svc{i}")]));
        nodes.push(node);
    }
    // Join: everyone sees everyone alive.
    for node in &nodes {
        let mut rx = node.subscribe();
        tokio::time::timeout(
            Duration::from_secs(120),
            rx.wait_for(|v| v.members.iter().filter(|m| m.alive).count() == n),
        )
        .await
        .expect("join within 120 s")
        .expect("node running");
    }
    let joined = started.elapsed();

    // Bytes at rest: every member gossips, nothing changes.
    let sent = |nodes: &[Node]| {
        nodes
            .iter()
            .map(|n| n.stats().bytes_sent.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let before = sent(&nodes);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await; // measuring a rate over a fixed window
    let rest_bps = (sent(&nodes) - before) as f64 / t.elapsed().as_secs_f64() / n as f64;

    // Convergence of an export change.
    let mut times = Vec::with_capacity(TRIALS);
    for trial in 0..TRIALS {
        let k = (trial * 7) % n;
        let name = format!("probe{trial}");
        let waits: Vec<_> = nodes
            .iter()
            .map(|node| {
                let mut rx = node.subscribe();
                let name = name.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(30),
                        rx.wait_for(|v| v.services.iter().any(|e| e.key.name == name)),
                    )
                    .await;
                    Instant::now()
                })
            })
            .collect();
        let t0 = Instant::now();
        nodes[k].set_local(exports(&[format!("svc{k}"), name]));
        let mut last = t0;
        for w in waits {
            last = last.max(w.await.expect("waiter"));
        }
        times.push(last - t0);
        nodes[k].set_local(exports(&[format!("svc{k}")]));
        tokio::time::sleep(Duration::from_millis(200)).await; // let the removal settle between trials
    }
    times.sort();

    // Failure detection: stop the last member.
    let dead = nodes.pop().expect("n > 1");
    let dead_name = format!("m{}", n - 1);
    dead.shutdown().await;
    let t0 = Instant::now();
    for node in &nodes {
        let mut rx = node.subscribe();
        let name = dead_name.clone();
        let _ = tokio::time::timeout(
            Duration::from_secs(30),
            rx.wait_for(|v| v.members.iter().any(|m| m.info.cluster == name && !m.alive)),
        )
        .await;
    }
    let detect = t0.elapsed();
    println!(
        "| {n:>4} | {:>8.1} | {:>9.0} | {:>9.0} | {:>9.0} | {:>12.0} | {:>10.0} |",
        joined.as_secs_f64(),
        percentile(&times, 0.5).as_secs_f64() * 1000.0,
        percentile(&times, 0.99).as_secs_f64() * 1000.0,
        times.last().expect("trials").as_secs_f64() * 1000.0,
        rest_bps,
        detect.as_secs_f64() * 1000.0
    );
    for node in nodes {
        node.shutdown().await;
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10, 50, 100]
    } else {
        sizes
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "Convergence of N members ({TRIALS} trials each; 100 ms rounds, fanout 3, phi 5), one process, loopback mTLS gRPC\n"
    );
    println!(
        "|    N | join (s) | p50 (ms) | p99 (ms) | max (ms) | rest B/member/s | detect (ms) |"
    );
    println!(
        "|-----:|---------:|---------:|---------:|---------:|----------------:|------------:|"
    );
    for n in sizes {
        rt.block_on(run(n));
    }
}
