use std::path::Path;

use super::*;

const BASE: &str = "
cluster: us-east
region: us-east-1
zone: us-east-1a
trust_domain: strait.example
listen:
  tunnel: 0.0.0.0:4433
  admin: 127.0.0.1:9901
tls:
  ca: ca.pem
  cert: us-east.pem
  key: us-east.key
";

fn parse(extra: &str) -> Result<Config, ConfigErrors> {
    Config::parse(Path::new("us-east.yaml"), &format!("{BASE}{extra}"))
}

fn only_error(extra: &str) -> ConfigError {
    let errs = parse(extra).expect_err("config should be rejected").0;
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    errs.into_iter().next().unwrap()
}

#[test]
fn minimal_config_gets_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c.cluster, "us-east");
    assert_eq!(c.tunnel, TunnelTuning::default());
    assert_eq!(c.tls.reload_interval.0, Duration::from_secs(10));
    assert!(c.exports.is_empty() && c.peers.is_empty() && c.imports.is_empty());
}

#[test]
fn full_config_parses() {
    let c = parse(
        "
tunnel:
  keep_alive: 250ms
  idle_timeout: 2s
  stream_window: 8MiB
  copy_buffer: 131072
exports:
  - name: web
    namespace: shop
    ports: [{name: http, port: 80, target_port: 8080}, {name: admin, port: 81}]
    endpoints: [{address: 10.0.0.1, hostname: web-0}, {address: 10.0.0.2, ready: false}]
    export_to: [eu-west]
peers:
  - cluster: eu-west
    address: 192.0.2.10:4433
imports:
  - name: cart
    namespace: shop
    address: 127.0.10.1
    ports: [{name: http, port: 80}]
    clusters: [eu-west]
",
    )
    .unwrap();
    assert_eq!(c.tunnel.stream_window.0, 8 << 20);
    assert_eq!(c.tunnel.copy_buffer.0, 131072);
    let web = &c.exports[0];
    assert_eq!(web.ports[0].target(), 8080);
    assert_eq!(web.ports[1].target(), 81);
    assert!(web.exported_to("eu-west"));
    assert!(!web.exported_to("ap-south"));
    assert!(!web.endpoints[1].ready);
    assert_eq!(c.imports[0].ports[0].local_port(), 80);
}

#[test]
fn typo_names_file_field_and_fix() {
    let e = only_error("exports:\n  - name: web\n    prots: [{port: 80}]\n    endpoints: []\n");
    assert_eq!(e.file, Path::new("us-east.yaml"));
    assert!(e.field.starts_with("exports[0]"), "field was {}", e.field);
    assert!(e.problem.contains("unknown field `prots`"), "{}", e.problem);
    assert!(
        e.problem.contains("ports"),
        "the message lists the expected fields: {}",
        e.problem
    );
    let shown = e.to_string();
    assert!(
        shown.starts_with("us-east.yaml: field `exports[0]"),
        "{shown}"
    );
    assert!(
        shown.contains("fix: remove the field or correct its spelling"),
        "{shown}"
    );
}

#[test]
fn wrong_types_and_bad_units_name_the_field() {
    let e = only_error("tunnel:\n  keep_alive: 5\n");
    assert_eq!(e.field, "tunnel.keep_alive");
    let e = only_error("tunnel:\n  stream_window: 4MB\n");
    assert_eq!(e.field, "tunnel.stream_window");
    assert!(e.problem.contains("KiB, MiB or GiB"));
    let e = only_error("peers:\n  - cluster: eu-west\n    address: not-an-address\n");
    assert_eq!(e.field, "peers[0].address");
}

#[test]
fn missing_field_is_named() {
    let e = Config::parse(
        Path::new("x.yaml"),
        "cluster: a\nregion: r\ntrust_domain: t\ntls: {ca: a, cert: b, key: c}\n",
    )
    .unwrap_err()
    .0
    .remove(0);
    assert!(
        e.problem.contains("missing field `listen`"),
        "{}",
        e.problem
    );
    assert_eq!(e.fix, "add the missing field");
}

#[test]
fn semantic_errors_are_all_reported_with_paths() {
    let errs = parse(
        "
exports:
  - name: Web
    ports: [{port: 0}]
    endpoints: []
    export_to: []
peers:
  - cluster: us-east
    address: 0.0.0.0:0
imports:
  - name: cart
    address: 127.0.10.1
    ports: [{port: 80}]
    clusters: [nowhere]
",
    )
    .unwrap_err()
    .0;
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    for want in [
        "exports[0].name",
        "exports[0].ports[0].port",
        "exports[0].endpoints",
        "exports[0].export_to",
        "peers[0].cluster",
        "peers[0].address",
        "imports[0].clusters[0]",
    ] {
        assert!(
            fields.contains(&want),
            "no error for {want}; got {fields:?}"
        );
    }
    let unknown_peer = errs
        .iter()
        .find(|e| e.field == "imports[0].clusters[0]")
        .unwrap();
    assert!(
        unknown_peer.fix.contains("add `nowhere` under `peers`"),
        "{}",
        unknown_peer.fix
    );
    assert!(
        errs.iter().all(|e| !e.fix.is_empty()),
        "every error says how to fix it"
    );
}

#[test]
fn keep_alive_must_be_shorter_than_idle_timeout() {
    let e = only_error("tunnel:\n  keep_alive: 5s\n  idle_timeout: 3s\n");
    assert_eq!(e.field, "tunnel.keep_alive");
}

#[test]
fn admin_may_not_share_the_tunnel_address() {
    let text = BASE.replace("admin: 127.0.0.1:9901", "admin: 0.0.0.0:4433");
    let e = Config::parse(Path::new("x.yaml"), &text)
        .unwrap_err()
        .0
        .remove(0);
    assert_eq!(e.field, "listen.admin");
}

#[test]
fn duplicate_imports_on_one_address_are_rejected() {
    let e = only_error(
        "
peers: [{cluster: eu-west, address: 127.0.0.1:4433}]
imports:
  - {name: a, address: 127.0.10.1, ports: [{port: 80}], clusters: [eu-west]}
  - {name: b, address: 127.0.10.1, ports: [{port: 80}], clusters: [eu-west]}
",
    );
    assert_eq!(e.field, "imports[1].ports[0]");
}

#[test]
fn multi_port_services_need_port_names() {
    let e = only_error(
        "exports:\n  - name: web\n    ports: [{port: 80}, {port: 443}]\n    endpoints: [{address: 10.0.0.1}]\n",
    );
    assert_eq!(e.field, "exports[0].ports");
}

#[test]
fn load_reports_unreadable_file_and_resolves_relative_paths() {
    let e = Config::load(Path::new("/nonexistent/strait.yaml"))
        .unwrap_err()
        .0
        .remove(0);
    assert!(
        e.to_string()
            .starts_with("/nonexistent/strait.yaml: cannot read the file")
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.yaml");
    std::fs::write(&path, BASE).unwrap();
    let c = Config::load(&path).unwrap();
    assert_eq!(c.tls.ca, dir.path().join("ca.pem"));
}

#[test]
fn shipped_example_config_is_valid() {
    let text = include_str!("../../../deploy/examples/us-east.yaml");
    let c = Config::parse(Path::new("deploy/examples/us-east.yaml"), text).unwrap();
    assert_eq!(c.exports.len(), 2);
    assert!(!c.exports[1].exported_to("ap-south"));
}

#[test]
fn discovery_on_an_unspecified_address_needs_advertise_and_intervals_must_be_positive() {
    let base = BASE.replace(
        "admin: 127.0.0.1:9901",
        "admin: 127.0.0.1:9901\n  discovery: 0.0.0.0:4434",
    );
    let text =
        format!("{base}discovery:\n  import_addresses: 127.0.10.0/24\n  reload_interval: 0s\n");
    let errs = Config::parse(Path::new("x.yaml"), &text).unwrap_err().0;
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert!(fields.contains(&"discovery.advertise"), "{fields:?}");
    assert!(fields.contains(&"discovery.reload_interval"), "{fields:?}");
    let text = BASE.replace(
        "key: us-east.key",
        "key: us-east.key\n  reload_interval: 0s",
    );
    let e = Config::parse(Path::new("x.yaml"), &text)
        .unwrap_err()
        .0
        .remove(0);
    assert_eq!(e.field, "tls.reload_interval");
}

#[test]
fn routing_policy_merges_service_over_default_over_builtin() {
    let c = parse(
        "
routing:
  default:
    dwell: 3s
    ejection: {consecutive_failures: 5}
  services:
    - service: shop/cart
      mode: weighted
      weights: {us-west: 90, eu-west: 10}
      ejection: {base_time: 1s}
",
    )
    .unwrap();
    let cart = c.routing.policy_for("shop/cart");
    assert_eq!(cart.mode, routing::Mode::Weighted);
    assert_eq!(cart.weights["us-west"], 90);
    assert_eq!(cart.dwell, Duration::from_secs(3), "inherited from default");
    assert_eq!(cart.consecutive_failures, 5, "inherited from default");
    assert_eq!(cart.ejection_base, Duration::from_secs(1), "its own");
    assert_eq!(cart.attempts, 3, "built-in");
    let other = c.routing.policy_for("shop/web");
    assert_eq!(other.mode, routing::Mode::Locality);
    assert_eq!(other.ejection_base, Duration::from_secs(2));
}

#[test]
fn bad_routing_policies_name_the_field_and_the_fix() {
    let e = only_error("routing:\n  default:\n    attempts: 0\n");
    assert_eq!(e.field, "routing.default.attempts");
    let e = only_error("routing:\n  services:\n    - service: cart\n      dwell: 1s\n");
    assert_eq!(e.field, "routing.services[0].service");
    assert!(e.fix.contains("namespace/name"), "{e}");
    let e = only_error("routing:\n  services:\n    - mode: priority\n      priority: [a]\n");
    assert_eq!(e.field, "routing.services[0].service");
    let e = only_error("routing:\n  default:\n    mode: priority\n");
    assert_eq!(e.field, "routing.default.priority");
    let e = only_error("routing:\n  default:\n    mode: nearest\n");
    assert!(e.field.starts_with("routing.default.mode"), "{e}");
    let e = only_error("routing:\n  default:\n    ejection: {base_time: 10s, max_time: 1s}\n");
    assert_eq!(e.field, "routing.default.ejection.max_time");
    let e = only_error(
        "routing:\n  services:\n    - service: a/b\n      attempts: 2\n    - service: a/b\n      attempts: 3\n",
    );
    assert_eq!(e.field, "routing.services[1].service");
    let e = only_error("routing:\n  default:\n    weights: {Bad_Name: 1}\n");
    assert_eq!(e.field, "routing.default.weights.Bad_Name");
    let e = only_error("tunnel:\n  unresponsive_after: 50ms\n");
    assert_eq!(e.field, "tunnel.unresponsive_after");
}

#[test]
fn routing_checks_apply_to_the_policy_as_inherited() {
    // A service in priority mode may inherit its list from the default...
    parse("routing:\n  default:\n    priority: [a, b]\n  services:\n    - service: x/y\n      mode: priority\n").unwrap();
    // ...but not end up with an empty one.
    let e = only_error(
        "routing:\n  default:\n    mode: priority\n    priority: [a]\n  services:\n    - service: x/y\n      priority: []\n",
    );
    assert_eq!(e.field, "routing.services[0].priority");
    let e = only_error(
        "routing:\n  default:\n    ejection: {base_time: 5s}\n  services:\n    - service: x/y\n      ejection: {max_time: 1s}\n",
    );
    assert_eq!(e.field, "routing.services[0].ejection.max_time");
    let e = only_error("routing:\n  default:\n    weights: {a: 0}\n");
    assert_eq!(e.field, "routing.default.weights.a");
}

#[test]
fn caller_limits_parse_pick_the_most_specific_entry_and_bad_ones_name_the_field() {
    let c = parse(
        "limits:\n  default: {concurrent_streams: 100}\n  callers:\n    - {cluster: eu-west, streams_per_second: 5}\n    - {cluster: eu-west, service: shop/web, burst: 3, streams_per_second: 1}\n",
    )
    .unwrap();
    assert_eq!(c.limits.for_caller("eu-west", "shop/web").burst, Some(3));
    assert_eq!(
        c.limits
            .for_caller("eu-west", "shop/cart")
            .streams_per_second,
        Some(5.0)
    );
    assert_eq!(
        c.limits
            .for_caller("ap-south", "shop/web")
            .concurrent_streams,
        Some(100)
    );

    let e = only_error(
        "limits:\n  callers:\n    - {cluster: eu-west, service: shop/web, concurrent_streams: 0}\n",
    );
    assert_eq!(e.field, "limits.callers[0]");
    let e = only_error("limits:\n  callers:\n    - {cluster: eu-west, service: web}\n");
    assert_eq!(e.field, "limits.callers[0].service");
    assert!(e.fix.contains("shop/checkout"), "{e}");
    let e = only_error("limits:\n  default: {streams_per_second: -1}\n");
    assert_eq!(e.field, "limits.default.streams_per_second");
}
