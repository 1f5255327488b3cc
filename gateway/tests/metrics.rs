//! The metrics reference stays true: every `strait_*` metric a running federation exports
//! is described (`# HELP`) and listed in docs/METRICS.md with its type and labels, and the
//! document lists exactly the metrics the code declares.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use strait_gateway::app::metrics_reference as reference;
use strait_gateway::demo::{self, DemoArgs};
use strait_tests::{eventually, http_get};

/// One documented metric: its type, label names and meaning (the `# HELP` text).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Documented {
    kind: String,
    labels: BTreeSet<String>,
    help: String,
}

/// The table of docs/METRICS.md: rows `| `name` | type | labels | ... |`.
fn documented() -> BTreeMap<String, Documented> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/METRICS.md");
    let text = std::fs::read_to_string(path).expect("docs/METRICS.md exists");
    text.lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix("`strait_")?.strip_suffix('`')?;
            let labels = cells
                .get(3)?
                .split(',')
                .map(|s| s.trim().trim_matches('`'))
                .filter(|s| !s.is_empty() && *s != "—")
                .map(str::to_owned)
                .collect();
            Some((
                format!("strait_{name}"),
                Documented {
                    kind: cells.get(2)?.to_string(),
                    labels,
                    help: cells.get(4)?.to_string(),
                },
            ))
        })
        .collect()
}

/// What the code declares, in the same form.
fn declared() -> BTreeMap<String, Documented> {
    reference()
        .into_iter()
        .map(|d| {
            (
                d.name.to_owned(),
                Documented {
                    kind: d.kind.as_str().to_owned(),
                    labels: d.labels.iter().map(|l| l.to_string()).collect(),
                    help: d.help.to_owned(),
                },
            )
        })
        .collect()
}

/// The table rows for what the code declares (printed when the document is out of date).
fn rows() -> String {
    reference()
        .into_iter()
        .map(|d| {
            let labels = if d.labels.is_empty() {
                "—".to_owned()
            } else {
                d.labels.join(", ")
            };
            format!(
                "| `{}` | {} | {} | {} |\n",
                d.name,
                d.kind.as_str(),
                labels,
                d.help
            )
        })
        .collect()
}

#[test]
fn the_metrics_reference_lists_exactly_the_declared_metrics() {
    assert_eq!(
        documented(),
        declared(),
        "docs/METRICS.md is out of date; its table should be:\n{}",
        rows()
    );
}

/// One scrape, parsed: family → (type, help?), and every sample's (family, label names).
#[derive(Default)]
struct Scrape {
    families: BTreeMap<String, (String, Option<String>)>,
    samples: Vec<(String, BTreeSet<String>)>,
}

fn parse(text: &str) -> Scrape {
    let mut s = Scrape::default();
    let mut help = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, h) = rest.split_once(' ').unwrap_or((rest, ""));
            help.insert(name.to_owned(), h.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            s.families
                .insert(name.to_owned(), (kind.to_owned(), help.get(name).cloned()));
        } else if !line.is_empty() && !line.starts_with('#') {
            let name_end = line.find(['{', ' ']).expect("sample line");
            let name = &line[..name_end];
            let labels = line[name_end..]
                .strip_prefix('{')
                .and_then(|l| l.split_once('}'))
                .map(|(l, _)| {
                    l.split("\",")
                        .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|f| s.families.get(*f).is_some_and(|(k, _)| k == "histogram"))
                .unwrap_or(name);
            s.samples.push((family.to_owned(), labels));
        }
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_federation_exports_only_described_and_documented_metrics() {
    strait_gateway::raise_fd_limit();
    let d = demo::start(DemoArgs::ephemeral(3)).await.unwrap();
    assert!(
        d.wait_converged(Duration::from_secs(15)).await,
        "discovery did not converge"
    );
    // Traffic through the tunnel, and DNS queries, so those components have numbers.
    let first = d.regions[0].gateway();
    let hello = first.listener("demo/hello", 8080).expect("hello imported");
    for _ in 0..3 {
        let (code, body) = http_get(hello, "/").await;
        assert_eq!(code, 200, "{body}");
    }
    let dns = first.dns_addr().expect("the demo serves DNS");
    let query = [
        0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 5, b'h', b'e', b'l', b'l', b'o', 4, b'd', b'e',
        b'm', b'o', 3, b's', b'v', b'c', 10, b'c', b'l', b'u', b's', b't', b'e', b'r', b's', b'e',
        b't', 5, b'l', b'o', b'c', b'a', b'l', 0, 0, 1, 0, 1,
    ];
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(&query, dns).await.unwrap();
    let mut answer = [0u8; 512];
    strait_tests::within(Duration::from_secs(5), client.recv_from(&mut answer))
        .await
        .unwrap();

    let docs = documented();
    let mut seen = BTreeSet::new();
    for r in &d.regions {
        let admin = r.gateway().admin_addr();
        // Routing publishes eligibility on its own tick: wait for one.
        let mut text = String::new();
        eventually(
            Duration::from_secs(5),
            "route eligibility published",
            async || {
                text = http_get(admin, "/metrics").await.1;
                text.contains("strait_route_cluster_eligible")
            },
        )
        .await;
        let scrape = parse(&text);
        for (name, (kind, help)) in &scrape.families {
            if !name.starts_with("strait_") {
                continue;
            }
            seen.insert(name.clone());
            assert!(
                help.as_deref().is_some_and(|h| !h.is_empty()),
                "{}: {name} is exported without a description",
                r.cluster
            );
            let doc = docs
                .get(name)
                .unwrap_or_else(|| panic!("{name} is exported but not in docs/METRICS.md"));
            assert_eq!(&doc.kind, kind, "{name}: documented type");
            assert_eq!(
                help.as_deref(),
                Some(doc.help.as_str()),
                "{name}: documented meaning"
            );
        }
        for (family, labels) in &scrape.samples {
            assert!(
                scrape.families.contains_key(family),
                "{}: sample {family} has no # TYPE",
                r.cluster
            );
            let Some(doc) = docs.get(family) else {
                continue;
            };
            let extra: Vec<_> = labels
                .iter()
                .filter(|l| !doc.labels.contains(*l) && *l != "le")
                .collect();
            assert!(
                extra.is_empty(),
                "{family} carries undocumented labels {extra:?}"
            );
        }
    }
    // The run exercised every part of the gateway whose numbers it checked.
    for expected in [
        "strait_bytes_total",
        "strait_streams_opened_total",
        "strait_connect_duration_seconds",
        "strait_route_connections_total",
        "strait_route_cluster_eligible",
        "strait_peer_up",
        "strait_peer_connects_total",
        "strait_dns_queries_total",
        "strait_discovery_members",
        "strait_cert_expiry_timestamp_seconds",
    ] {
        assert!(
            seen.contains(expected),
            "{expected} was not exported: {seen:?}"
        );
    }
}
