//! The `strait` binary as an operator uses it: PKI commands, `config check`, `drill check`
//! and `drill report`.

use std::process::Command;

fn strait(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("run strait")
}

/// `strait run` with `config`, expected to refuse to start: its output. A gateway that
/// starts after all is killed after 30 s and fails the test (rather than hanging it).
fn run_refused(config: &std::path::Path) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run strait");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "strait run started with {} instead of refusing",
                config.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn pki_init_issue_and_config_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = d.join("ca");
    let out = strait(&[
        "pki",
        "init",
        "--dir",
        ca.to_str().unwrap(),
        "--trust-domain",
        "strait.example",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = strait(&[
        "pki",
        "init",
        "--dir",
        ca.to_str().unwrap(),
        "--trust-domain",
        "strait.example",
    ]);
    assert!(
        !again.status.success(),
        "init refuses to overwrite an existing CA"
    );

    let out = strait(&[
        "pki",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--cluster",
        "us-east",
        "--out",
        d.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("spiffe://strait.example/cluster/us-east/gateway")
    );

    let good = format!(
        "cluster: us-east\nregion: us-east-1\ntrust_domain: strait.example\nlisten: {{tunnel: 127.0.0.1:4433}}\ntls: {{ca: {}, cert: us-east.pem, key: us-east.key}}\n",
        ca.join("ca.pem").display()
    );
    std::fs::write(d.join("good.yaml"), &good).unwrap();
    let out = strait(&["config", "check", d.join("good.yaml").to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (cluster us-east"));

    std::fs::write(d.join("bad.yaml"), good.replace("region:", "regoin:")).unwrap();
    let out = strait(&["config", "check", d.join("bad.yaml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml") && err.contains("unknown field `regoin`") && err.contains("fix:"),
        "{err}"
    );
}

#[test]
fn run_refuses_a_certificate_for_another_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = d.join("ca");
    assert!(
        strait(&[
            "pki",
            "init",
            "--dir",
            ca.to_str().unwrap(),
            "--trust-domain",
            "strait.example"
        ])
        .status
        .success()
    );
    assert!(
        strait(&[
            "pki",
            "issue",
            "--ca",
            ca.to_str().unwrap(),
            "--cluster",
            "eu-west",
            "--out",
            d.to_str().unwrap()
        ])
        .status
        .success()
    );
    let cfg = format!(
        "cluster: us-east\nregion: r\ntrust_domain: strait.example\nlisten: {{tunnel: 127.0.0.1:0, admin: 127.0.0.1:0}}\ntls: {{ca: {}, cert: eu-west.pem, key: eu-west.key}}\n",
        ca.join("ca.pem").display()
    );
    std::fs::write(d.join("gw.yaml"), cfg).unwrap();
    let out = run_refused(&d.join("gw.yaml"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("carries identity spiffe://strait.example/cluster/eu-west/gateway"),
        "{err}"
    );
}

#[test]
fn drill_check_accepts_the_library_and_names_the_field_of_a_bad_file() {
    let lib = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/drills/gateway-kill.yaml"
    );
    let out = strait(&["drill", "check", lib]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(lib)
        .unwrap()
        .replace(
            "fault: kill-tunnel",
            "fault: kill-tunnel\n    latency: 100ms",
        )
        .replace("rate: 200", "rate: -5");
    std::fs::write(&bad, text).unwrap();
    let out = strait(&["drill", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "bad.yaml: field `steps[0].latency`",
        "bad.yaml: field `load[0].rate`",
        "fix:",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }
}

#[test]
fn drill_report_renders_a_saved_report_and_refuses_other_json() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.json");
    std::fs::write(&other, r#"{"hello": 1}"#).unwrap();
    let out = strait(&["drill", "report", other.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a drill report"));
}

#[test]
fn install_prints_the_manifests_of_one_cluster_and_refuses_a_bad_id() {
    let out = strait(&[
        "install",
        "--cluster",
        "eu-west",
        "--region",
        "eu-west-1",
        "--seed",
        "203.0.113.10:4434",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let mut options = strait_kubernetes::install::Options::new("eu-west", "eu-west-1");
    options.seeds = vec!["203.0.113.10:4434".into()];
    assert_eq!(
        printed,
        strait_kubernetes::install::render(&options).unwrap(),
        "the CLI prints exactly what the tested renderer does"
    );
    // The gateway config inside is one `strait run` accepts.
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&printed)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let config = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .and_then(|d| d["data"]["strait.yaml"].as_str())
        .expect("the config map");
    let parsed = strait_common::Config::parse(std::path::Path::new("strait.yaml"), config)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed.cluster, "eu-west");
    assert!(parsed.kubernetes.is_some());
    assert_eq!(
        parsed.discovery.unwrap().seeds,
        ["203.0.113.10:4434".parse().unwrap()]
    );

    let bad = strait(&["install", "--cluster", "EU_west"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("DNS-1123") && err.contains("us-east"), "{err}");
}

#[test]
fn pki_bundle_joins_roots_of_one_trust_domain_and_refuses_anything_else() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let path = |p: &str| d.join(p).to_str().unwrap().to_owned();
    for (ca, td) in [
        ("old", "strait.example"),
        ("new", "strait.example"),
        ("other", "other.example"),
    ] {
        let out = strait(&["pki", "init", "--dir", &path(ca), "--trust-domain", td]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = strait(&[
        "pki",
        "bundle",
        "--ca",
        &path("old"),
        "--ca",
        &path("new"),
        "--out",
        &path("trust.pem"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bundle = std::fs::read_to_string(d.join("trust.pem")).unwrap();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
    for ca in ["old", "new"] {
        let root = std::fs::read_to_string(d.join(ca).join("ca.pem")).unwrap();
        assert!(
            bundle.contains(root.trim()),
            "the {ca} root is in the bundle"
        );
    }

    let mixed = strait(&[
        "pki",
        "bundle",
        "--ca",
        &path("old"),
        "--ca",
        &path("other"),
        "--out",
        &path("x.pem"),
    ]);
    assert!(!mixed.status.success());
    assert!(String::from_utf8_lossy(&mixed.stderr).contains("different trust domains"));

    // A gateway certificate is not a root.
    let issued = strait(&[
        "pki",
        "issue",
        "--ca",
        &path("old"),
        "--cluster",
        "east",
        "--out",
        &path("certs"),
    ]);
    assert!(issued.status.success());
    std::fs::create_dir_all(d.join("fake")).unwrap();
    std::fs::copy(d.join("certs/east.pem"), d.join("fake/ca.pem")).unwrap();
    std::fs::copy(d.join("old/trust-domain"), d.join("fake/trust-domain")).unwrap();
    let leaf = strait(&[
        "pki",
        "bundle",
        "--ca",
        &path("fake"),
        "--out",
        &path("y.pem"),
    ]);
    assert!(!leaf.status.success());
    assert!(
        String::from_utf8_lossy(&leaf.stderr).contains("not a CA"),
        "{}",
        String::from_utf8_lossy(&leaf.stderr)
    );
}

#[test]
fn logs_carry_no_colour_codes_off_a_terminal_and_json_logs_are_one_object_a_line() {
    for format in ["text", "json"] {
        let out = Command::new(env!("CARGO_BIN_EXE_strait"))
            .args([
                "--log-format",
                format,
                "demo",
                "--regions",
                "2",
                "--replicas",
                "2",
                "--base-port",
                "0",
                "--duration",
                "1",
            ])
            .env("RUST_LOG", "info")
            .output()
            .expect("run strait demo");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let logs: Vec<&str> = stdout
            .lines()
            .filter(|l| l.contains("gateway started"))
            .collect();
        assert_eq!(
            logs.len(),
            4,
            "one start line per gateway: 2 regions of 2 replicas ({format}):\n{stdout}"
        );
        assert!(
            !stdout.contains('\u{1b}'),
            "no ANSI escape codes in piped output ({format})"
        );
        if format == "json" {
            for line in logs {
                let v: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                assert_eq!(v["level"], "INFO");
            }
        }
    }
}

/// A CA (trust domain strait.example) in `d/ca` and a us-east certificate in `d`, made
/// with the CLI; the CA's directory.
fn us_east_pki(d: &std::path::Path) -> std::path::PathBuf {
    let ca = d.join("ca");
    let ca_s = ca.to_str().unwrap();
    let init = strait(&[
        "pki",
        "init",
        "--dir",
        ca_s,
        "--trust-domain",
        "strait.example",
    ]);
    assert!(init.status.success());
    let out = d.to_str().unwrap();
    let issue = strait(&[
        "pki",
        "issue",
        "--ca",
        ca_s,
        "--cluster",
        "us-east",
        "--out",
        out,
    ]);
    assert!(issue.status.success());
    ca
}

#[test]
fn addresses_the_host_cannot_bind_are_warned_by_config_check_and_fail_start_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = us_east_pki(d);
    // A port another process holds, and import addresses that are not on this host.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = format!(
        "cluster: us-east\nregion: r\ntrust_domain: strait.example\n\
         listen: {{tunnel: 127.0.0.1:{port}, admin: 127.0.0.1:0, discovery: 127.0.0.1:0}}\n\
         tls: {{ca: {}, cert: us-east.pem, key: us-east.key}}\n\
         discovery: {{import_addresses: 198.51.100.0/24}}\n",
        ca.join("ca.pem").display()
    );
    let file = d.join("gw.yaml");
    std::fs::write(&file, cfg).unwrap();

    let check = strait(&["config", "check", file.to_str().unwrap()]);
    assert!(check.status.success(), "warnings do not fail the check");
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        out.contains("warning: field `discovery.import_addresses`") && out.contains("ip addr add"),
        "{out}"
    );

    let run = run_refused(&file);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains(&format!("binding the tunnel UDP socket 127.0.0.1:{port}"))
            && err.contains("fix: another process"),
        "{err}"
    );
    drop(taken);
}

#[test]
fn missing_certificate_and_token_files_are_warned_by_config_check_and_fail_start_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = us_east_pki(d);
    // The key is named wrong and the admin token was never created.
    let cfg = format!(
        "cluster: us-east\nregion: r\ntrust_domain: strait.example\n\
         listen: {{tunnel: 127.0.0.1:0, admin: 127.0.0.1:0}}\n\
         tls: {{ca: {}, cert: us-east.pem, key: us-east.pem.key}}\n\
         faults: {{token_file: admin-token}}\n",
        ca.join("ca.pem").display()
    );
    let file = d.join("gw.yaml");
    std::fs::write(&file, cfg).unwrap();

    let check = strait(&["config", "check", file.to_str().unwrap()]);
    assert!(check.status.success(), "warnings do not fail the check");
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        out.contains("warning: field `tls.key`")
            && out.contains("us-east.pem.key cannot be read")
            && out.contains("strait pki issue"),
        "{out}"
    );
    assert!(
        out.contains("warning: field `faults.token_file`") && out.contains("openssl rand -hex 32"),
        "{out}"
    );

    let run = run_refused(&file);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("us-east.pem.key: cannot be read (tls.key)")
            && err.contains("fix: issue it with `strait pki issue --ca <ca dir> --cluster us-east"),
        "{err}"
    );
    std::fs::rename(d.join("us-east.key"), d.join("us-east.pem.key")).unwrap();
    let run = run_refused(&file);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("reading faults.token_file") && err.contains("openssl rand -hex 32"),
        "{err}"
    );
}
