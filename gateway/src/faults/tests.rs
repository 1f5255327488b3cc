use std::time::{Duration, Instant};

use super::*;
use crate::tunnel::socket::{PacketRules, Verdict};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn never() -> impl FnMut() -> f64 {
    || 1.0
}

#[test]
fn faults_parse_from_the_api_shape_and_reject_typos() {
    let r: FaultRequest = serde_json::from_str(
        r#"{"fault": {"kind": "blackhole", "peer": "east", "direction": "to"}, "duration": "5s"}"#,
    )
    .unwrap();
    assert_eq!(
        r.fault,
        Fault::Blackhole {
            peer: Some("east".into()),
            direction: Direction::To
        }
    );
    assert_eq!(r.duration.0, Duration::from_secs(5));
    let kill: Fault = serde_json::from_str(r#"{"kind": "kill-tunnel"}"#).unwrap();
    assert_eq!(kill, Fault::KillTunnel);
    assert!(serde_json::from_str::<Fault>(r#"{"kind": "blackhole", "peeer": "east"}"#).is_err());
    assert!(serde_json::from_str::<Fault>(r#"{"kind": "meteor"}"#).is_err());
}

#[test]
fn fault_fields_are_checked() {
    let bad = [
        Fault::Delay {
            peer: None,
            latency: HumanDuration(Duration::ZERO),
        },
        Fault::Delay {
            peer: None,
            latency: HumanDuration(Duration::from_secs(11)),
        },
        Fault::Loss {
            peer: None,
            fraction: 0.0,
            direction: Direction::Both,
        },
        Fault::Loss {
            peer: None,
            fraction: 1.5,
            direction: Direction::Both,
        },
        Fault::Unready {
            service: "echo".into(),
        },
    ];
    for f in bad {
        assert!(f.check().is_some(), "{f:?} passed");
    }
    assert!(
        Fault::Loss {
            peer: None,
            fraction: 1.0,
            direction: Direction::Both
        }
        .check()
        .is_none()
    );
}

#[test]
fn faults_expire_on_their_own_and_effects_follow() {
    let mut t = FaultTable::default();
    let now = Instant::now();
    let east = addr("127.0.0.1:7410");
    let a = t.add(
        Fault::Blackhole {
            peer: Some("east".into()),
            direction: Direction::Both,
        },
        vec![east],
        now,
        Duration::from_secs(2),
    );
    let b = t.add(Fault::Drain, vec![], now, Duration::from_secs(5));
    assert_ne!(a, b);
    let fx = t.effects();
    assert!(fx.drain);
    let rules = fx.packets.expect("packet rules");
    assert_eq!(rules.verdict(east, true, &mut never()), Verdict::Drop);
    assert_eq!(rules.verdict(east, false, &mut never()), Verdict::Drop);
    assert_eq!(
        rules.verdict(addr("127.0.0.1:7420"), true, &mut never()),
        Verdict::Pass
    );
    assert_eq!(t.next_expiry(), Some(now + Duration::from_secs(2)));

    assert!(t.expire(now + Duration::from_secs(1)).is_empty());
    assert_eq!(
        t.expire(now + Duration::from_secs(2)),
        vec![(a, "blackhole")]
    );
    let fx = t.effects();
    assert!(fx.packets.is_none(), "packets flow again");
    assert!(fx.drain);
    assert!(t.remove(b));
    assert!(!t.remove(b));
    assert_eq!(t.effects(), Effects::default());
}

#[test]
fn kill_drops_everything_and_directions_are_one_way() {
    let mut t = FaultTable::default();
    let now = Instant::now();
    let east = addr("127.0.0.1:7410");
    t.add(
        Fault::Blackhole {
            peer: Some("east".into()),
            direction: Direction::To,
        },
        vec![east],
        now,
        Duration::from_secs(1),
    );
    let rules = t.effects().packets.unwrap();
    assert_eq!(rules.verdict(east, true, &mut never()), Verdict::Drop);
    assert_eq!(rules.verdict(east, false, &mut never()), Verdict::Pass);
    // A dual-stack socket sees the same peer as an IPv4-mapped address.
    assert_eq!(
        rules.verdict(addr("[::ffff:127.0.0.1]:7410"), true, &mut never()),
        Verdict::Drop
    );

    t.clear();
    t.add(Fault::KillTunnel, vec![], now, Duration::from_secs(1));
    let fx = t.effects();
    assert!(fx.killed);
    let rules = fx.packets.unwrap();
    for a in ["127.0.0.1:1", "10.0.0.1:443"] {
        assert_eq!(rules.verdict(addr(a), true, &mut never()), Verdict::Drop);
        assert_eq!(rules.verdict(addr(a), false, &mut never()), Verdict::Drop);
    }
}

#[test]
fn loss_draws_per_packet_and_delay_only_holds_outgoing_packets() {
    let mut rules = PacketRules::default();
    rules.lose(None, 0.25, Direction::Both);
    rules.delay(None, Duration::from_millis(80));
    let a = addr("127.0.0.1:9");
    let mut rolls = [0.1, 0.9, 0.3].into_iter();
    let mut roll = || rolls.next().unwrap();
    assert_eq!(rules.verdict(a, true, &mut roll), Verdict::Drop);
    assert_eq!(
        rules.verdict(a, true, &mut roll),
        Verdict::Delay(Duration::from_millis(80))
    );
    assert_eq!(rules.verdict(a, false, &mut roll), Verdict::Pass);
}

#[test]
fn drained_and_unready_services_are_published_without_ready_endpoints() {
    use strait_discovery::model::{Endpoint, Service, ServiceKey};
    let svc = || Service {
        ports: vec![],
        endpoints: vec![Endpoint {
            address: "10.0.0.1".parse().unwrap(),
            hostname: None,
            ready: true,
            zone: String::new(),
        }],
        export_to: vec!["*".into()],
        weight: 1,
        headless: false,
        session_affinity: None,
        exported_at_ms: 0,
        selection: Default::default(),
    };
    let mut catalog: std::collections::BTreeMap<ServiceKey, Service> = [
        (ServiceKey::new("demo", "hello"), svc()),
        (ServiceKey::new("demo", "echo"), svc()),
    ]
    .into();
    let fx = Effects {
        unready: ["demo/echo".to_owned()].into(),
        ..Default::default()
    };
    crate::desired::shape(&mut catalog, &fx.catalog());
    assert_eq!(
        catalog[&ServiceKey::new("demo", "echo")].ready_endpoints(),
        0
    );
    assert_eq!(
        catalog[&ServiceKey::new("demo", "hello")].ready_endpoints(),
        1
    );
    crate::desired::shape(
        &mut catalog,
        &Effects {
            drain: true,
            ..Default::default()
        }
        .catalog(),
    );
    assert_eq!(
        catalog[&ServiceKey::new("demo", "hello")].ready_endpoints(),
        0
    );
}

#[test]
fn the_token_must_match_exactly() {
    let f = Token::new(Some("0123456789abcdef".into()));
    assert!(f.authorized("0123456789abcdef").unwrap());
    assert!(!f.authorized("0123456789abcde").unwrap());
    assert!(!f.authorized("0123456789abcdeF").unwrap());
    assert!(!f.authorized("").unwrap());
    let off = Token::new(None);
    assert!(matches!(off.authorized("x"), Err(FaultError::Disabled)));
}
