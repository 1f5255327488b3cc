use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::analysis::{LoadRecording, Recording, RoutePoll, StepRecord, Verdict, analyse};
use super::scenario::{FaultKind, Scenario, Signal};
use crate::load::Sample;

const GOOD: &str = r#"
name: kill
federation:
  token_file: token
  gateways:
    west: 127.0.0.1:9901
    east: 127.0.0.1:9902
load:
  - from: west
    service: demo/hello
    rate: 100
duration: 10s
steps:
  - at: 2s
    duration: 3s
    fault: kill-tunnel
    on: $primary
objectives:
  max_failed_connections: 0
  max_reroute: 1s
  max_failback: 4s
"#;

fn parse(text: &str) -> Result<Scenario, Vec<(String, String, String)>> {
    Scenario::parse(Path::new("drill.yaml"), text).map_err(|e| {
        e.0.into_iter()
            .map(|e| {
                assert_eq!(e.file, Path::new("drill.yaml"));
                assert!(!e.fix.is_empty(), "no fix for {}", e.field);
                (e.field, e.problem, e.fix)
            })
            .collect()
    })
}

/// The fields the errors name, for `GOOD` with `from` replaced by `to`.
fn fields_for(from: &str, to: &str) -> Vec<String> {
    assert!(GOOD.contains(from), "{from}");
    parse(&GOOD.replacen(from, to, 1))
        .expect_err("should be rejected")
        .into_iter()
        .map(|e| e.0)
        .collect()
}

#[test]
fn the_library_and_a_good_file_parse() {
    let s = parse(GOOD).unwrap();
    assert_eq!(s.steps[0].on.as_deref(), Some("$primary"));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/drills");
    let mut n = 0;
    for f in std::fs::read_dir(&dir).unwrap() {
        let path = f.unwrap().path();
        Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        n += 1;
    }
    assert!(n >= 8, "the library has {n} drills");
}

#[test]
fn bad_files_name_the_field_and_the_fix() {
    let cases: &[(&str, &str, &str)] = &[
        ("on: $primary", "on: south", "steps[0].on"),
        ("fault: kill-tunnel", "fault: meteor", "steps[0].fault"),
        ("fault: kill-tunnel", "fault: delay", "steps[0].latency"),
        (
            "fault: kill-tunnel\n    on: $primary",
            "fault: partition\n    on: $primary",
            "steps[0].on",
        ),
        ("at: 2s", "at: 9s", "steps[0].duration"),
        ("at: 2s", "at: 0s", "steps[0].at"),
        ("at: 2s", "at: 99999999999999h", "steps[0].duration"),
        ("from: west", "from: north", "load[0].from"),
        ("rate: 100", "rate: 0", "load[0]"),
        ("service: demo/hello", "service: hello", "load[0].service"),
        ("token_file: token", "tokenfile: token", "federation"),
        (
            "max_reroute: 1s",
            "max_reroute: fast",
            "objectives.max_reroute",
        ),
        ("duration: 10s\nsteps", "duration: 2h\nsteps", "duration"),
    ];
    for (from, to, field) in cases {
        let fields = fields_for(from, to);
        assert!(
            fields.iter().any(|f| f.starts_with(field)),
            "{to:?}: expected an error at {field}, got {fields:?}"
        );
    }
    // A field that does not belong to the fault is named, with what to do.
    let errs =
        parse(&GOOD.replace("on: $primary", "on: $primary\n    latency: 100ms")).unwrap_err();
    assert!(
        errs.iter()
            .any(|e| e.0 == "steps[0].latency" && e.1.contains("does not apply"))
    );
}

fn poll(at_ms: u64, clusters: &[(&str, bool, u64)]) -> RoutePoll {
    RoutePoll {
        at: Duration::from_millis(at_ms),
        clusters: clusters
            .iter()
            .map(|(c, e, n)| (c.to_string(), (*e, None, *n)))
            .collect(),
    }
}

fn sample(at_ms: u64, latency_ms: u64, ok: bool) -> Sample {
    Sample {
        at: Duration::from_millis(at_ms),
        latency: Duration::from_millis(latency_ms),
        result: if ok {
            Ok(String::new())
        } else {
            Err("reset".into())
        },
    }
}

/// West's traffic to east moves to north when east is killed at 2 s, and returns at 6 s.
/// The GOOD scenario with `max_broken_connections: limit` beside its failed limit.
fn good_with_broken_limit(limit: u32) -> Scenario {
    parse(&GOOD.replace(
        "max_failed_connections: 0",
        &format!("max_failed_connections: 0\n  max_broken_connections: {limit}"),
    ))
    .unwrap()
}

fn recording() -> Recording {
    let mut polls = Vec::new();
    let (mut east, mut north) = (0u64, 0u64);
    for i in 0..=100u64 {
        let at = i * 100;
        // 10 connections per poll: east until 2.4 s, north until 6 s, east again after.
        let east_up = !(2400..6000).contains(&at);
        if east_up {
            east += 10;
        } else {
            north += 10;
        }
        let eligible = !(2500..6000).contains(&at);
        polls.push(poll(
            at,
            &[("east", eligible, east), ("north", true, north)],
        ));
    }
    let mut samples: Vec<Sample> = (0..1000).map(|i| sample(i * 10, 1, true)).collect();
    // Connections caught by the fault wait until it is detected.
    for s in samples
        .iter_mut()
        .filter(|s| (2000..2450).contains(&s.at.as_millis()))
    {
        s.latency = Duration::from_millis(2450) - s.at;
    }
    Recording {
        loads: vec![LoadRecording {
            from: "west".into(),
            service: "demo/hello".into(),
            target: "127.0.0.1:1".parse().unwrap(),
            connections: 0,
            samples,
            breaks: vec![],
            polls,
        }],
        steps: vec![StepRecord {
            kind: "kill-tunnel".into(),
            label: "kill-tunnel east".into(),
            victim: Some("east".into()),
            stays: false,
            start: Duration::from_secs(2),
            stops: vec![],
            end: Duration::from_secs(5),
            error: None,
        }],
        aborted: None,
        faults_undone: true,
        elapsed: Duration::from_secs(10),
        started_unix_ms: 0,
    }
}

#[test]
fn detection_reroute_and_failback_are_measured_from_the_recording() {
    let s = parse(GOOD).unwrap();
    let r = analyse(&s, &recording());
    let f = &r.faults[0];
    assert!(f.victim_served);
    assert_eq!(f.detected_after_s, Some(0.5));
    // Last slowed connection ended at 2.45 s; east's counter last grew at the 2.3 s poll.
    assert_eq!(f.rerouted_after_s, Some(0.45));
    // East is back from the 6.0 s poll; the 1 s window is all east again at 7.0 s.
    let fb = f.failback_after_s.unwrap();
    assert!((1.5..=2.0).contains(&fb), "failback {fb}");
    assert_eq!(r.verdict, Verdict::Passed, "{:?}", r.objectives);
    let l = &r.loads[0];
    assert_eq!((l.started, l.failed), (1000, 0));
    assert_eq!(l.clusters, vec!["east".to_owned(), "north".to_owned()]);
    // The timeline shows the move: all east before, all north during.
    let at = |t: f64| l.timeline.iter().find(|b| (b.t - t).abs() < 1e-9).unwrap();
    assert_eq!(at(1.0).served.get("north").copied().unwrap_or(0), 0);
    assert_eq!(at(4.0).served.get("east").copied().unwrap_or(0), 0);
    assert!(at(4.0).served["north"] > 0);
}

#[test]
fn objectives_fail_when_missed_and_an_abort_is_not_a_pass() {
    let s = parse(&GOOD.replace("max_failback: 4s", "max_failback: 1s")).unwrap();
    let mut rec = recording();
    // A failure after the fault: counted, but not part of its reroute.
    rec.loads[0].samples[800].result = Err("reset".into());
    let r = analyse(&s, &rec);
    assert_eq!(r.verdict, Verdict::Failed);
    let passed: BTreeMap<&str, bool> = r
        .objectives
        .iter()
        .map(|o| (o.name.as_str(), o.passed))
        .collect();
    assert!(!passed["max_failed_connections"]);
    assert!(!passed["max_failback"]);
    assert!(passed["max_reroute"]);

    let mut rec = recording();
    rec.faults_undone = false;
    assert_eq!(
        analyse(&parse(GOOD).unwrap(), &rec).verdict,
        Verdict::Failed
    );
    rec.aborted = Some("guard rail".into());
    assert_eq!(
        analyse(&parse(GOOD).unwrap(), &rec).verdict,
        Verdict::Aborted
    );
}

#[test]
fn traffic_that_never_left_is_not_a_reroute() {
    let s = parse(GOOD).unwrap();
    let mut rec = recording();
    // East keeps taking connections through the whole fault.
    let mut east = 0;
    for p in &mut rec.loads[0].polls {
        east += 10;
        p.clusters.insert("east".into(), (true, None, east));
        p.clusters.insert("north".into(), (true, None, 0));
    }
    let r = analyse(&s, &rec);
    assert_eq!(r.faults[0].rerouted_after_s, None);
    assert_eq!(r.faults[0].detected_after_s, None);
    assert_eq!(r.faults[0].failback_after_s, None);
    assert_eq!(r.verdict, Verdict::Failed);
}

#[test]
fn the_report_renders_and_survives_a_json_round_trip() {
    let r = analyse(&parse(GOOD).unwrap(), &recording());
    let json = serde_json::to_string(&r).unwrap();
    let back: super::Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back, r);
    let svg = super::render::svg(&r);
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for needle in ["kill-tunnel east", "east", "north", "PASSED"] {
        assert!(svg.contains(needle), "{needle} missing from the picture");
    }
    let text = super::render::summary(&r);
    assert!(
        text.contains("PASSED") && text.contains("rerouted 0.45s"),
        "{text}"
    );
}

#[test]
fn a_victim_that_was_never_a_candidate_is_not_detected() {
    let mut rec = recording();
    rec.steps[0].victim = Some("south".into());
    let r = analyse(&parse(GOOD).unwrap(), &rec);
    assert_eq!(r.faults[0].detected_after_s, None);
    assert!(!r.faults[0].victim_served);
}

#[test]
fn a_connection_in_flight_when_the_fault_began_is_broken_not_a_failed_new_one() {
    let s = good_with_broken_limit(0);
    let mut rec = recording();
    // Started 5 ms before the kill at 2 s and reset by it: the crash broke it.
    rec.loads[0].samples[199] = Sample {
        at: Duration::from_millis(1995),
        latency: Duration::from_millis(10),
        result: Err("reset".into()),
    };
    // One that ended just before the fault was not in flight: a failed new connection
    // would fail the drill; here it succeeded.
    assert!(!super::analysis::in_flight(
        &sample(1990, 9, false),
        &[Duration::from_secs(2)]
    ));
    let r = analyse(&s, &rec);
    let l = &r.loads[0];
    assert_eq!((l.failed, l.broken_in_flight, l.broken), (0, 1, 0));
    assert_eq!(r.faults[0].failed, 0);
    assert_eq!(r.faults[0].broken, 1);
    // The break shows in the bucket where it happened, apart from failures.
    let at = |t: f64| l.timeline.iter().find(|b| (b.t - t).abs() < 1e-9).unwrap();
    assert_eq!((at(2.0).failed, at(2.0).broken), (0, 1));
    let verdicts: BTreeMap<&str, (bool, &str)> = r
        .objectives
        .iter()
        .map(|o| (o.name.as_str(), (o.passed, o.actual.as_str())))
        .collect();
    assert_eq!(verdicts["max_failed_connections"], (true, "0 of 1000"));
    assert_eq!(
        verdicts["max_broken_connections"],
        (false, "1 (1 in flight at a fault, 0 long-lived)")
    );
    assert_eq!(r.verdict, Verdict::Failed);

    // Without a limit for broken connections, every failure counts against the failed one.
    let strict = parse(GOOD).unwrap();
    let mut rec = recording();
    rec.loads[0].samples[199] = Sample {
        at: Duration::from_millis(1995),
        latency: Duration::from_millis(10),
        result: Err("reset".into()),
    };
    let r = analyse(&strict, &rec);
    let failed = r
        .objectives
        .iter()
        .find(|o| o.name == "max_failed_connections")
        .unwrap();
    assert!(!failed.passed);
    assert_eq!(failed.actual, "1 of 1000 (1 in flight at a fault)");

    // The same failure one connection later (started after the kill) is a failed new one.
    let mut rec = recording();
    rec.loads[0].samples[200].result = Err("reset".into());
    let r = analyse(&s, &rec);
    assert_eq!((r.loads[0].failed, r.loads[0].broken_in_flight), (1, 0));
    assert_eq!((r.faults[0].failed, r.faults[0].broken), (1, 0));
    assert!(super::render::summary(&r).contains("1 failed, 0 broken in flight at a fault"));
}

#[test]
fn a_connection_in_flight_when_any_replica_was_stopped_is_broken() {
    let s = good_with_broken_limit(1);
    // A rolling restart that stopped one replica at 2 s and the next at 3.5 s.
    let mut rec = recording();
    rec.steps[0].stops = vec![Duration::from_secs(2), Duration::from_millis(3500)];
    rec.loads[0].samples[349] = Sample {
        at: Duration::from_millis(3495),
        latency: Duration::from_millis(10),
        result: Err("reset".into()),
    };
    let passed = |r: &super::analysis::Report, name: &str| {
        r.objectives.iter().find(|o| o.name == name).unwrap().passed
    };
    let r = analyse(&s, &rec);
    assert_eq!((r.loads[0].failed, r.loads[0].broken_in_flight), (0, 1));
    assert_eq!(r.faults[0].broken, 1);
    assert!(passed(&r, "max_failed_connections"));
    assert!(passed(&r, "max_broken_connections"));
    // Only the first stop known: the same connection is a failed new one.
    rec.steps[0].stops.truncate(1);
    let r = analyse(&s, &rec);
    assert_eq!((r.loads[0].failed, r.loads[0].broken_in_flight), (1, 0));
    assert!(!passed(&r, "max_failed_connections"));
}

const REPLICATED: &str = r#"
name: kill-replica
federation:
  token_file: token
  gateways:
    west: 127.0.0.1:9901
    east: [127.0.0.1:9902, 127.0.0.1:9906]
load:
  - from: west
    service: demo/hello
    rate: 100
duration: 10s
steps:
  - at: 2s
    duration: 3s
    fault: kill-replica
    on: east
    replica: 2
objectives:
  max_failed_connections: 0
  max_served_elsewhere: 0
"#;

#[test]
fn replicated_gateways_and_replica_faults_parse_and_bad_ones_name_the_fix() {
    let s = parse(REPLICATED).unwrap();
    assert_eq!(s.federation.gateways["east"].all().len(), 2);
    assert_eq!(
        s.federation.gateways["west"].first(),
        "127.0.0.1:9901".parse().unwrap()
    );
    let errors = parse(&REPLICATED.replace("replica: 2", "replica: 3")).unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.0 == "steps[0].replica" && e.1.contains("1..=2")),
        "{errors:?}"
    );
    let errors = parse(&REPLICATED.replace("on: east", "on: west")).unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.0 == "steps[0].on" && e.2.contains("each replica")),
        "{errors:?}"
    );
    let errors =
        parse(&REPLICATED.replace("fault: kill-replica", "fault: kill-tunnel")).unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.0 == "steps[0].replica" && e.1.contains("does not apply")),
        "{errors:?}"
    ); // A real signal to one replica's process: SIGKILL unless it says SIGTERM.
    let signal = REPLICATED.replace("fault: kill-replica", "fault: signal");
    let s = parse(&signal).unwrap();
    assert_eq!(s.steps[0].fault, FaultKind::Signal);
    assert_eq!(s.steps[0].signal, None);
    assert_eq!(Signal::default(), Signal::Kill);
    let term = parse(&signal.replace("replica: 2", "replica: 2\n    signal: SIGTERM")).unwrap();
    assert_eq!(term.steps[0].signal, Some(Signal::Term));
    assert!(parse(&signal.replace("replica: 2", "replica: 2\n    signal: SIGHUP")).is_err());
    // A process on another host cannot be signalled.
    let errors = parse(&signal.replace("127.0.0.1:9906", "10.0.0.2:9906")).unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.0 == "steps[0].on" && e.1.contains("10.0.0.2:9906 is not loopback")),
        "{errors:?}"
    );
    let errors =
        parse(&REPLICATED.replace("replica: 2", "replica: 2\n    signal: SIGTERM")).unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.0 == "steps[0].signal" && e.1.contains("does not apply")),
        "{errors:?}"
    );
}

#[test]
fn a_replica_fault_is_judged_on_traffic_that_stayed_not_on_a_reroute() {
    let s = parse(REPLICATED).unwrap();
    let mut rec = recording();
    rec.steps[0].stays = true;
    // Every connection answered by east (the recording's polls show east serving before).
    for x in &mut rec.loads[0].samples {
        x.result = Ok("east".into());
    }
    let r = analyse(&s, &rec);
    let f = &r.faults[0];
    assert!(f.stays && f.victim_served);
    assert_eq!(f.served_elsewhere, Some(0));
    assert_eq!(f.rerouted_after_s, None, "not judged as a reroute");
    let passed: BTreeMap<&str, bool> = r
        .objectives
        .iter()
        .map(|o| (o.name.as_str(), o.passed))
        .collect();
    assert!(passed["max_served_elsewhere"], "{:?}", r.objectives);
    // Three connections during the fault went to north: counted against it.
    for x in &mut rec.loads[0].samples[250..253] {
        x.result = Ok("north".into());
    }
    let r = analyse(&s, &rec);
    assert_eq!(r.faults[0].served_elsewhere, Some(3));
    assert_eq!(r.verdict, Verdict::Failed);
}
