use std::net::SocketAddr;

use proptest::prelude::*;

use super::*;
use crate::model::{Endpoint, Port};

fn info(cluster: &str) -> MemberInfo {
    let addr: SocketAddr = "127.0.0.1:4433".parse().unwrap();
    MemberInfo {
        cluster: cluster.into(),
        region: format!("{cluster}-r"),
        zone: String::new(),
        tunnel_addr: addr,
        gossip_addr: addr,
    }
}

fn svc(weight: u32) -> Service {
    Service {
        ports: vec![Port {
            name: "http".into(),
            port: 80,
            protocol: "TCP".into(),
        }],
        endpoints: vec![Endpoint {
            address: "10.0.0.1".parse().unwrap(),
            hostname: None,
            ready: true,
            zone: String::new(),
        }],
        export_to: vec!["*".into()],
        weight,
        headless: false,
        session_affinity: None,
        exported_at_ms: 0,
        selection: Default::default(),
    }
}

fn exports(names: &[(&str, u32)]) -> BTreeMap<ServiceKey, Service> {
    names
        .iter()
        .map(|(n, w)| (ServiceKey::new("default", n), svc(*w)))
        .collect()
}

fn node(cluster: &str, generation: u64) -> Catalog {
    Catalog::new(
        info(cluster),
        generation,
        CatalogConfig {
            lease: Duration::from_secs(10),
            ..Default::default()
        },
    )
}

/// What a catalog serves, origin by origin, ignoring local timing.
fn visible(c: &Catalog, now: Instant) -> Vec<(String, String, u32)> {
    let mut v: Vec<_> = c
        .services(now)
        .into_iter()
        .map(|e| (e.origin.cluster, e.key.to_string(), e.service.weight))
        .collect();
    v.sort();
    v
}

/// One push-pull exchange: `a` sends its digest, `b` answers with a delta and its digest,
/// `a` answers with the delta `b` is missing.
fn exchange(a: &mut Catalog, b: &mut Catalog, now: Instant) {
    let to_a = b.delta_for(&a.digest());
    let b_digest = b.digest();
    a.apply(to_a, now);
    let to_b = a.delta_for(&b_digest);
    b.apply(to_b, now);
}

#[test]
fn exports_reach_a_peer_and_removals_arrive_as_tombstones() {
    let t0 = Instant::now();
    let mut a = node("a", 1);
    let mut b = node("b", 1);
    assert!(a.set_local(exports(&[("web", 1), ("db", 1)])));
    assert!(
        !a.set_local(exports(&[("web", 1), ("db", 1)])),
        "same exports change nothing"
    );
    exchange(&mut b, &mut a, t0);
    assert_eq!(
        visible(&b, t0),
        vec![
            ("a".into(), "default/db".into(), 1),
            ("a".into(), "default/web".into(), 1)
        ]
    );
    a.set_local(exports(&[("web", 2)]));
    exchange(&mut b, &mut a, t0);
    assert_eq!(visible(&b, t0), vec![("a".into(), "default/web".into(), 2)]);
    assert_eq!(b.digest()["a"], a.digest()["a"]);
}

#[test]
fn tombstones_win_over_stale_adds() {
    let t0 = Instant::now();
    let mut a = node("a", 1);
    a.set_local(exports(&[("web", 1)]));
    let mut b = node("b", 1);
    let stale = a.delta_for(&b.digest());
    a.set_local(BTreeMap::new());
    let fresh = a.delta_for(&b.digest());
    b.apply(fresh, t0);
    b.apply(stale, t0);
    assert!(
        visible(&b, t0).is_empty(),
        "the old add must not resurrect a deleted service"
    );
}

#[test]
fn leases_expire_and_a_returning_heartbeat_restores_service() {
    let t0 = Instant::now();
    let mut a = node("a", 1);
    let mut b = node("b", 1);
    a.set_local(exports(&[("web", 1)]));
    a.tick(t0);
    exchange(&mut b, &mut a, t0);
    // Still served while the lease holds, though a is silent (static stability).
    assert!(!b.tick(t0 + Duration::from_secs(9)));
    assert_eq!(visible(&b, t0 + Duration::from_secs(9)).len(), 1);
    assert!(b.tick(t0 + Duration::from_secs(11)), "lease ran out");
    assert!(visible(&b, t0 + Duration::from_secs(11)).is_empty());
    let m = b.members(t0 + Duration::from_secs(11));
    assert!(
        m.iter()
            .any(|m| m.info.cluster == "a" && !m.alive && m.expired)
    );
    // A third member that still has a's old state cannot revive it: no heartbeat advance.
    let mut c = node("c", 1);
    exchange(&mut c, &mut a, t0);
    exchange(&mut b, &mut c, t0 + Duration::from_secs(12));
    assert!(visible(&b, t0 + Duration::from_secs(12)).is_empty());
    // a beats again: back.
    a.tick(t0 + Duration::from_secs(13));
    exchange(&mut b, &mut a, t0 + Duration::from_secs(13));
    assert_eq!(visible(&b, t0 + Duration::from_secs(13)).len(), 1);
}

#[test]
fn restarted_origin_with_new_generation_replaces_old_entries() {
    let t0 = Instant::now();
    let mut a = node("a", 1);
    let mut b = node("b", 1);
    a.set_local(exports(&[("web", 1), ("db", 1), ("cache", 1)]));
    exchange(&mut b, &mut a, t0);
    assert_eq!(visible(&b, t0).len(), 3);
    // Restart: new generation, version counter starts over, fewer exports.
    let mut a2 = node("a", 2);
    a2.set_local(exports(&[("web", 5)]));
    exchange(&mut b, &mut a2, t0);
    assert_eq!(visible(&b, t0), vec![("a".into(), "default/web".into(), 5)]);
    // The old incarnation's gossip is ignored from now on.
    let stats = b.apply(a.delta_for(&Digest::new()), t0);
    assert_eq!(stats.entries_applied, 0);
    assert!(!stats.changed);
    assert_eq!(visible(&b, t0), vec![("a".into(), "default/web".into(), 5)]);
}

#[test]
fn nobody_else_writes_our_origin() {
    let t0 = Instant::now();
    let mut a = node("a", 1);
    a.set_local(exports(&[("web", 1)]));
    let mut impostor = node("a", 9);
    impostor.set_local(exports(&[("evil", 1)]));
    let stats = a.apply(impostor.delta_for(&Digest::new()), t0);
    assert_eq!(stats.ignored, 1);
    assert_eq!(visible(&a, t0), vec![("a".into(), "default/web".into(), 1)]);
}

#[test]
fn deltas_respect_the_byte_budget_origin_by_origin_and_finish_over_several_rounds() {
    // An origin's update is never cut (a part of it is not what the origin signed): the
    // budget decides how many origins one delta carries.
    let t0 = Instant::now();
    let config = CatalogConfig {
        max_delta_bytes: 2_000,
        ..Default::default()
    };
    let mut relay = Catalog::new(info("relay"), 1, config.clone());
    for o in 0..10 {
        let mut origin = Catalog::new(info(&format!("o{o}")), 1, config.clone());
        origin.set_local(
            (0..8)
                .map(|i| (ServiceKey::new("default", &format!("svc-{i}")), svc(1)))
                .collect(),
        );
        relay.apply(origin.delta_for(&Digest::new()), t0);
    }
    let mut b = Catalog::new(info("b"), 1, config);
    let mut rounds = 0;
    loop {
        let d = relay.delta_for(&b.digest());
        if d.origins.is_empty() {
            break;
        }
        let est: usize = d
            .origins
            .iter()
            .flat_map(|o| &o.entries)
            .map(|(_, e)| e.service.as_ref().map_or(0, Service::estimated_size))
            .sum();
        assert!(
            est <= 2_000 || d.origins.len() == 1,
            "delta over budget: {est} in {} origins",
            d.origins.len()
        );
        for o in d.origins.iter().filter(|o| o.cluster != "relay") {
            assert_eq!(o.entries.len(), 8, "{} was cut", o.cluster);
        }
        b.apply(d, t0);
        rounds += 1;
        assert!(rounds < 100, "never converged");
    }
    assert!(rounds > 1, "the budget split the catalog");
    assert_eq!(visible(&b, t0).len(), 80);
}

#[test]
fn idle_deltas_carry_heartbeats_only() {
    let t0 = Instant::now();
    let mut a = node("a", 1);
    let mut b = node("b", 1);
    a.set_local(
        (0..50)
            .map(|i| (ServiceKey::new("default", &format!("s{i}")), svc(1)))
            .collect(),
    );
    exchange(&mut b, &mut a, t0);
    a.tick(t0);
    let d = a.delta_for(&b.digest());
    assert_eq!(d.origins.len(), 1);
    assert!(
        d.origins[0].entries.is_empty() && d.origins[0].info.is_none(),
        "at rest only the heartbeat moves"
    );
}

/// A simulated federation: every round each member ticks and does a push-pull with
/// `fanout` random others, in a seeded order.
fn simulate(n: usize, fanout: usize, rounds: usize, seed: u64) -> (Vec<Catalog>, Instant) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t0 = Instant::now();
    let mut nodes: Vec<Catalog> = (0..n).map(|i| node(&format!("m{i}"), 1)).collect();
    for (i, c) in nodes.iter_mut().enumerate() {
        c.set_local(exports(&[(&format!("svc{i}"), i as u32)]));
    }
    let mut now = t0;
    for _ in 0..rounds {
        now += Duration::from_millis(100);
        for i in 0..n {
            nodes[i].tick(now);
            for _ in 0..fanout {
                let j = rng.random_range(0..n);
                if i != j {
                    let (a, b) = if i < j {
                        let (l, r) = nodes.split_at_mut(j);
                        (&mut l[i], &mut r[0])
                    } else {
                        let (l, r) = nodes.split_at_mut(i);
                        (&mut r[0], &mut l[j])
                    };
                    exchange(a, b, now);
                }
            }
        }
    }
    (nodes, now)
}

#[test]
fn a_federation_converges() {
    let (nodes, now) = simulate(20, 2, 15, 7);
    let want = visible(&nodes[0], now);
    assert_eq!(want.len(), 20);
    for c in &nodes {
        assert_eq!(visible(c, now), want, "{} differs", c.me().cluster);
        assert!(
            c.members(now).iter().all(|m| m.alive),
            "nobody is suspected while all beat"
        );
    }
}

#[test]
fn a_silent_member_is_suspected_by_everyone() {
    let (mut nodes, mut now) = simulate(10, 2, 20, 3);
    // Member 0 goes silent: the rest keep gossiping among themselves. The target is
    // detection within 2 s.
    for _ in 0..20 {
        now += Duration::from_millis(100);
        for i in 1..10 {
            nodes[i].tick(now);
            let j = 1 + (i % 9);
            if i != j {
                let (l, r) = nodes.split_at_mut(i.max(j));
                let (a, b) = if i < j {
                    (&mut l[i], &mut r[0])
                } else {
                    (&mut r[0], &mut l[j])
                };
                exchange(a, b, now);
            }
        }
    }
    for c in &nodes[1..] {
        let m0 = c
            .members(now)
            .into_iter()
            .find(|m| m.info.cluster == "m0")
            .unwrap();
        assert!(
            !m0.alive,
            "{} still trusts m0 after 2 s of silence (phi {:.1})",
            c.me().cluster,
            m0.phi
        );
    }
}

fn arb_delta() -> impl Strategy<Value = Delta> {
    // One writer per origin: a given (key, version) always carries the same content.
    let entry = (0u8..6, 1u64..20).prop_map(|(k, v)| {
        let service = (v % 3 != 0).then(|| svc((u64::from(k) + v) as u32 % 4));
        (
            ServiceKey::new("default", &format!("s{k}")),
            Entry {
                version: v,
                service,
            },
        )
    });
    let origin = (
        0u8..3,
        1u64..3,
        0u64..10,
        proptest::collection::vec(entry, 0..6),
    )
        .prop_map(|(c, g, hb, mut entries)| {
            entries.sort_by_key(|(_, e)| e.version);
            let cluster = format!("o{c}");
            OriginDelta {
                info: Some(info(&cluster)),
                cluster,
                generation: g,
                heartbeat: hb,
                full: true,
                entries,
                seal: None,
                chain: None,
            }
        });
    proptest::collection::vec(origin, 0..4).prop_map(|origins| Delta {
        origins,
        replicas: vec![],
    })
}

fn state(c: &Catalog, now: Instant) -> (Digest, Vec<(String, String, u32)>) {
    (c.digest(), visible(c, now))
}

proptest! {
    #[test]
    fn merge_is_commutative(d1 in arb_delta(), d2 in arb_delta()) {
        let t0 = Instant::now();
        let mut x = node("me", 1);
        let mut y = node("me", 1);
        x.apply(d1.clone(), t0); x.apply(d2.clone(), t0);
        y.apply(d2, t0); y.apply(d1, t0);
        prop_assert_eq!(state(&x, t0), state(&y, t0));
    }

    #[test]
    fn merge_is_idempotent(d in arb_delta()) {
        let t0 = Instant::now();
        let mut x = node("me", 1);
        x.apply(d.clone(), t0);
        let once = state(&x, t0);
        x.apply(d, t0);
        prop_assert_eq!(once, state(&x, t0));
    }
}

#[test]
fn an_entry_larger_than_the_budget_still_replicates() {
    let t0 = Instant::now();
    let config = CatalogConfig {
        max_delta_bytes: 500,
        ..Default::default()
    };
    let mut a = Catalog::new(info("a"), 1, config.clone());
    let mut big = svc(1);
    big.endpoints = (0..100)
        .map(|i| Endpoint {
            address: format!("10.0.1.{i}").parse().unwrap(),
            hostname: None,
            ready: true,
            zone: String::new(),
        })
        .collect();
    assert!(big.estimated_size() > 500);
    a.set_local(
        [
            (ServiceKey::new("default", "big"), big),
            (ServiceKey::new("default", "small"), svc(1)),
        ]
        .into_iter()
        .collect(),
    );
    let mut b = Catalog::new(info("b"), 1, config);
    for _ in 0..5 {
        b.apply(a.delta_for(&b.digest()), t0);
    }
    assert_eq!(
        visible(&b, t0).len(),
        2,
        "the oversized entry went alone, then the rest followed"
    );
}

#[test]
fn a_newer_generation_of_ourselves_is_outranked() {
    let t0 = Instant::now();
    let mut a = node("a", 5);
    a.set_local(exports(&[("web", 1)]));
    let mut b = node("b", 1);
    // b believes in a future incarnation of a (a clock that stepped back, or a forgery).
    let mut ghost = node("a", 9);
    ghost.set_local(exports(&[("ghost", 1)]));
    b.apply(ghost.delta_for(&b.digest()), t0);
    // a hears of it and moves past it; then b takes a's real exports.
    a.apply(b.delta_for(&a.digest()), t0);
    assert!(a.digest()["a"].generation > 9);
    exchange(&mut b, &mut a, t0);
    assert_eq!(
        visible(&b, t0)
            .into_iter()
            .filter(|v| v.0 == "a")
            .collect::<Vec<_>>(),
        vec![("a".into(), "default/web".into(), 1)]
    );
}

#[test]
fn a_generation_change_must_come_whole() {
    let t0 = Instant::now();
    let mut a = node("a", 1);
    a.set_local(exports(&[("web", 1)]));
    let mut b = node("b", 1);
    exchange(&mut b, &mut a, t0);
    let mut partial = node("a", 2).delta_for(&Digest::new());
    partial.origins[0].full = false;
    let stats = b.apply(partial, t0);
    assert_eq!(stats.ignored, 1);
    assert_eq!(
        visible(&b, t0).len(),
        1,
        "the old generation stays until a whole new one arrives"
    );
}

#[test]
fn a_quiet_replica_relays_but_never_outranks_the_replica_that_speaks_for_its_cluster() {
    let t0 = Instant::now();
    // Two replicas of cluster `a` (generations 5 and 7) and a peer `b`.
    let mut speaker = node("a", 5);
    speaker.set_local(exports(&[("web", 1)]));
    let mut quiet = node("a", 7);
    quiet.set_local(exports(&[("web", 1)]));
    quiet.set_voice(Voice::Quiet, t0);
    let mut b = node("b", 1);
    let generation = |c: &Catalog| c.digest().get("a").map(|d| d.generation);

    for _ in 0..3 {
        exchange(&mut speaker, &mut quiet, t0);
        exchange(&mut quiet, &mut b, t0);
        exchange(&mut speaker, &mut b, t0);
    }
    assert_eq!(
        generation(&speaker),
        Some(5),
        "the quiet replica never made it bump"
    );
    assert_eq!(
        generation(&b),
        Some(5),
        "the peer hears only the speaker's incarnation"
    );
    assert_eq!(visible(&b, t0), vec![("a".into(), "default/web".into(), 1)]);

    // The quiet replica takes over: it outranks the old speaker and the peer follows.
    quiet.set_voice(Voice::Speak, t0);
    speaker.set_voice(Voice::Quiet, t0);
    for _ in 0..2 {
        exchange(&mut speaker, &mut quiet, t0);
        exchange(&mut quiet, &mut b, t0);
    }
    assert_eq!(generation(&b), Some(7));
    assert_eq!(visible(&b, t0), vec![("a".into(), "default/web".into(), 1)]);
}

#[test]
fn replicas_that_do_not_know_who_speaks_settle_on_the_newest_and_it_takes_over_when_gone() {
    let mut now = Instant::now();
    let mut older = node("a", 5);
    let mut newer = node("a", 7);
    let mut b = node("b", 1);
    for r in [&mut older, &mut newer] {
        r.set_local(exports(&[("web", 1)]));
        r.set_voice(Voice::Auto, now);
        assert!(!r.speaks(), "a replica listens before it speaks");
    }
    let generation = |c: &Catalog| c.digest().get("a").map(|d| d.generation);
    for _ in 0..30 {
        now += Duration::from_millis(100);
        for r in [&mut older, &mut newer, &mut b] {
            r.tick(now);
        }
        exchange(&mut older, &mut b, now);
        exchange(&mut newer, &mut b, now);
    }
    assert!(
        !older.speaks() && newer.speaks(),
        "the newest incarnation speaks"
    );
    let settled = generation(&b);
    assert_eq!(
        settled,
        Some(7),
        "no generation race: nobody outranked anybody"
    );

    // The newer replica dies: once its heartbeat stops growing, the older one speaks.
    for _ in 0..30 {
        now += Duration::from_millis(100);
        older.tick(now);
        b.tick(now);
        exchange(&mut older, &mut b, now);
    }
    assert!(older.speaks(), "a silent sibling gives the voice back");
    assert!(
        generation(&b) > Some(7),
        "it outranks the dead incarnation, so the peer hears it: {:?}",
        generation(&b)
    );
    assert_eq!(
        visible(&b, now),
        vec![("a".into(), "default/web".into(), 1)]
    );
}

/// Signed origins, with real certificates of one federation CA.
mod sealed {
    use strait_common::GatewayId;
    use strait_common::pki::{CertificateAuthority, Identity};

    use super::*;

    const TD: &str = "seal.strait";

    fn sealing(ca: &CertificateAuthority, cluster: &str) -> Arc<Sealing> {
        let c = ca
            .issue_gateway_for(&GatewayId::new(TD, cluster), Duration::from_secs(3600))
            .unwrap();
        let id = Identity::from_pem(&ca.cert_pem, &c.cert_pem, &c.key_pem).unwrap();
        Arc::new(Sealing::new(&id).unwrap())
    }

    fn member(ca: &CertificateAuthority, cluster: &str) -> Catalog {
        Catalog::sealed(
            info(cluster),
            1,
            CatalogConfig::default(),
            sealing(ca, cluster),
        )
    }

    fn ca() -> CertificateAuthority {
        CertificateAuthority::generate(TD, Duration::from_secs(3600)).unwrap()
    }

    /// `b`'s delta for `c`, restricted to origin `of`.
    fn relayed(b: &Catalog, c: &Catalog, of: &str) -> Delta {
        let mut d = b.delta_for(&c.digest());
        d.origins.retain(|o| o.cluster == of);
        assert_eq!(d.origins.len(), 1, "{of} is relayed");
        d
    }

    #[test]
    fn signed_origins_replicate_through_a_relay_and_keep_beating() {
        let t0 = Instant::now();
        let ca = ca();
        let (mut a, mut b, mut c) = (member(&ca, "a"), member(&ca, "b"), member(&ca, "c"));
        a.set_local(exports(&[("web", 1)]));
        let first = a.delta_for(&b.digest());
        assert!(first.origins[0].seal.is_some() && first.origins[0].chain.is_some());
        assert_eq!(b.apply(first, t0).rejected, 0);
        // c never talks to a: b relays a's origin, certificate and signature.
        let stats = c.apply(relayed(&b, &c, "a"), t0);
        assert_eq!((stats.rejected, stats.entries_applied), (0, 1));
        assert!(visible(&c, t0).contains(&("a".into(), "default/web".into(), 1)));
        // Heartbeats are signed too, and the certificate is not sent again.
        a.tick(t0);
        b.apply(a.delta_for(&b.digest()), t0);
        let beat = relayed(&b, &c, "a");
        assert!(beat.origins[0].entries.is_empty() && beat.origins[0].chain.is_none());
        let stats = c.apply(beat, t0);
        assert_eq!(stats.rejected, 0);
        assert_eq!(c.digest()["a"].heartbeat, a.digest()["a"].heartbeat);
    }

    #[test]
    fn a_relay_can_neither_alter_nor_forge_nor_withdraw_another_clusters_services() {
        let t0 = Instant::now();
        let ca = ca();
        let (mut a, mut b, mut c) = (member(&ca, "a"), member(&ca, "b"), member(&ca, "c"));
        a.set_local(exports(&[("web", 1), ("api", 1)]));
        b.apply(a.delta_for(&b.digest()), t0);
        let genuine = relayed(&b, &c, "a");
        let tampered = |f: &dyn Fn(&mut OriginDelta)| {
            let mut d = genuine.clone();
            f(&mut d.origins[0]);
            d
        };
        let attempts: Vec<(&str, Delta)> = vec![
            (
                "alter a service",
                tampered(&|o| o.entries[0].1.service.as_mut().unwrap().weight = 100),
            ),
            (
                "forge a service",
                tampered(&|o| {
                    let v = o.entries.last().unwrap().1.version + 1;
                    o.entries.push((
                        ServiceKey::new("default", "evil"),
                        Entry {
                            version: v,
                            service: Some(svc(1)),
                        },
                    ));
                }),
            ),
            (
                "withdraw a service",
                tampered(&|o| o.entries[0].1.service = None),
            ),
            ("drop a service", tampered(&|o| drop(o.entries.remove(0)))),
            (
                "redirect its tunnel",
                tampered(&|o| {
                    o.info.as_mut().unwrap().tunnel_addr = "192.0.2.66:4433".parse().unwrap()
                }),
            ),
            ("strip the signature", tampered(&|o| o.seal = None)),
            ("claim a later heartbeat", tampered(&|o| o.heartbeat += 1)),
        ];
        for (what, d) in attempts {
            let stats = c.apply(d, t0);
            assert_eq!(stats.rejected, 1, "{what}: accepted");
            assert!(
                !visible(&c, t0).iter().any(|(o, _, _)| o == "a"),
                "{what}: c's view changed"
            );
        }
        // Without the certificate nothing can be checked: not taken (nor counted against
        // the relay: certificates are dropped when the roots change, and come again).
        let stats = c.apply(tampered(&|o| o.chain = None), t0);
        assert_eq!(
            (stats.ignored, stats.rejected, stats.entries_applied),
            (1, 0, 0)
        );
        assert!(visible(&c, t0).is_empty());
        // The genuine relay still goes through.
        assert_eq!(c.apply(genuine, t0).rejected, 0);
        assert_eq!(
            visible(&c, t0),
            vec![
                ("a".into(), "default/api".into(), 1),
                ("a".into(), "default/web".into(), 1)
            ]
        );
    }

    #[test]
    fn a_member_cannot_sign_for_another_cluster() {
        let t0 = Instant::now();
        let ca = ca();
        let mut c = member(&ca, "c");
        // m holds a valid certificate, but for cluster m: it publishes an origin "a".
        let mut impostor =
            Catalog::sealed(info("a"), 9, CatalogConfig::default(), sealing(&ca, "m"));
        impostor.set_local(exports(&[("evil", 1)]));
        assert_eq!(c.apply(impostor.delta_for(&c.digest()), t0).rejected, 1);
        // Nor can a certificate of another CA with the right name.
        let mut outsider = Catalog::sealed(
            info("a"),
            9,
            CatalogConfig::default(),
            sealing(&self::ca(), "a"),
        );
        outsider.set_local(exports(&[("evil", 1)]));
        assert_eq!(c.apply(outsider.delta_for(&c.digest()), t0).rejected, 1);
        assert!(visible(&c, t0).is_empty());
    }

    #[test]
    fn a_stale_signed_state_replayed_cannot_hide_a_newer_one() {
        let t0 = Instant::now();
        let ca = ca();
        let (mut a, mut c) = (member(&ca, "a"), member(&ca, "c"));
        a.set_local(exports(&[("web", 1)]));
        let old = a.delta_for(&c.digest());
        a.tick(t0);
        a.set_local(exports(&[("web", 2)]));
        a.tick(t0);
        c.apply(a.delta_for(&c.digest()), t0);
        assert_eq!(visible(&c, t0), vec![("a".into(), "default/web".into(), 2)]);
        // The old state is genuinely signed, but its heartbeat is older.
        let stats = c.apply(old, t0);
        assert_eq!((stats.ignored, stats.rejected), (1, 0));
        assert_eq!(visible(&c, t0), vec![("a".into(), "default/web".into(), 2)]);
        // The old content under a newer signed heartbeat is not something a ever signed.
        a.tick(t0);
        let mut replay = a.delta_for(&Digest::new());
        let web = &mut replay.origins[0].entries[0].1;
        web.version += 1;
        web.service.as_mut().unwrap().weight = 1;
        assert_eq!(c.apply(replay, t0).rejected, 1);
        assert_eq!(visible(&c, t0), vec![("a".into(), "default/web".into(), 2)]);
    }

    #[test]
    fn a_rotated_certificate_travels_with_the_next_update() {
        let t0 = Instant::now();
        let ca = ca();
        let (mut a, mut c) = (member(&ca, "a"), member(&ca, "c"));
        a.set_local(exports(&[("web", 1)]));
        c.apply(a.delta_for(&c.digest()), t0);
        let before = c.digest()["a"].cert;
        a.set_sealing(sealing(&ca, "a"));
        a.tick(t0);
        let d = a.delta_for(&c.digest());
        assert!(d.origins[0].chain.is_some(), "c holds the old certificate");
        assert_eq!(c.apply(d, t0).rejected, 0);
        assert_ne!(c.digest()["a"].cert, before);
        assert_eq!(c.digest()["a"].cert, a.digest()["a"].cert);
    }

    #[test]
    fn a_heartbeat_or_an_update_to_a_held_origin_is_checked_too() {
        let t0 = Instant::now();
        let ca = ca();
        let (mut a, mut c) = (member(&ca, "a"), member(&ca, "c"));
        a.set_local(exports(&[("web", 1)]));
        c.apply(a.delta_for(&c.digest()), t0);
        // A heartbeat-only update with a heartbeat a did not sign.
        a.tick(t0);
        let mut beat = a.delta_for(&c.digest());
        assert!(beat.origins[0].entries.is_empty());
        beat.origins[0].heartbeat += 1;
        let before = c.digest()["a"];
        assert_eq!(c.apply(beat, t0).rejected, 1);
        assert_eq!(c.digest()["a"], before);
        // An incremental update to the held origin, altered.
        a.set_local(exports(&[("web", 1), ("api", 1)]));
        a.tick(t0);
        let genuine = a.delta_for(&c.digest());
        assert_eq!(genuine.origins[0].entries.len(), 1, "only api is new");
        let mut altered = genuine.clone();
        altered.origins[0].entries[0]
            .1
            .service
            .as_mut()
            .unwrap()
            .weight = 7;
        assert_eq!(c.apply(altered, t0).rejected, 1);
        assert_eq!(c.digest()["a"], before);
        assert_eq!(c.apply(genuine, t0).rejected, 0);
        assert_eq!(visible(&c, t0).len(), 2);
    }

    #[test]
    fn an_origin_bigger_than_the_budget_is_still_relayed() {
        let t0 = Instant::now();
        let ca = ca();
        let small = CatalogConfig {
            max_delta_bytes: 2_000,
            ..Default::default()
        };
        let sealed =
            |cluster: &str| Catalog::sealed(info(cluster), 1, small.clone(), sealing(&ca, cluster));
        let (mut big, mut relay, mut c) = (sealed("big"), sealed("relay"), sealed("c"));
        big.set_local(
            (0..100)
                .map(|i| (ServiceKey::new("default", &format!("s{i}")), svc(1)))
                .collect(),
        );
        relay.apply(big.delta_for(&relay.digest()), t0);
        // The relay's own origin (a newer heartbeat every round) comes first in its deltas.
        for _ in 0..3 {
            relay.tick(t0);
            c.apply(relay.delta_for(&c.digest()), t0);
        }
        assert_eq!(visible(&c, t0).len(), 100);
    }

    #[test]
    fn unsigned_origins_are_taken_during_an_upgrade_until_one_was_seen_signed() {
        let t0 = Instant::now();
        let ca = ca();
        let upgrading = CatalogConfig {
            accept_unsigned: true,
            ..Default::default()
        };
        let mut c = Catalog::sealed(info("c"), 1, upgrading, sealing(&ca, "c"));
        let mut old = node("old", 1);
        old.set_local(exports(&[("web", 1)]));
        assert_eq!(c.apply(old.delta_for(&c.digest()), t0).rejected, 0);
        assert_eq!(visible(&c, t0).len(), 1);
        // Once a cluster is seen signed, its unsigned updates are refused.
        let mut a = member(&ca, "a");
        a.set_local(exports(&[("api", 1)]));
        c.apply(a.delta_for(&c.digest()), t0);
        let mut stripped = a.delta_for(&Digest::new());
        stripped.origins[0].seal = None;
        stripped.origins[0].heartbeat += 10;
        assert_eq!(c.apply(stripped, t0).rejected, 1);
        // Without the upgrade setting nothing unsigned is taken.
        let mut strict = member(&ca, "strict");
        assert_eq!(strict.apply(old.delta_for(&Digest::new()), t0).rejected, 1);
    }

    #[test]
    fn an_expired_or_no_longer_trusted_certificate_verifies_nothing() {
        let t0 = Instant::now();
        let ca = ca();
        let (mut a, mut c) = (member(&ca, "a"), member(&ca, "c"));
        a.set_local(exports(&[("web", 1)]));
        c.apply(a.delta_for(&c.digest()), t0);
        c.remotes
            .get_mut("a")
            .unwrap()
            .origin
            .chain
            .as_mut()
            .unwrap()
            .not_after = Some(std::time::SystemTime::UNIX_EPOCH);
        a.tick(t0);
        assert_eq!(c.apply(a.delta_for(&c.digest()), t0).rejected, 1);
        // Other roots: held certificates are checked again (the digest holds none).
        let other = self::ca();
        c.set_sealing(sealing(&other, "c"));
        assert_eq!(c.digest()["a"].cert, 0);
        a.tick(t0);
        assert_eq!(
            c.apply(a.delta_for(&c.digest()), t0).rejected,
            1,
            "a's certificate is not from c's roots now"
        );
    }

    #[test]
    fn only_a_signed_newer_incarnation_of_our_cluster_is_outranked() {
        let t0 = Instant::now();
        let ca = ca();
        let key = sealing(&ca, "a");
        let mut a = Catalog::sealed(info("a"), 1, CatalogConfig::default(), key.clone());
        let claim = |generation| {
            Digest::from([(
                "a".to_owned(),
                OriginDigest {
                    generation,
                    ..Default::default()
                },
            )])
        };
        // Digests are not signed: neither a forged u64::MAX nor any other claim moves it.
        a.note_digest(&claim(u64::MAX), t0);
        a.note_digest(&claim(5_000), t0);
        assert_eq!(a.digest()["a"].generation, 1);
        // A previous incarnation (same key) whose clock ran far ahead, as a peer holds it,
        // is sent to a with the content hash, and outranked however far ahead it is.
        let mut previous = Catalog::sealed(info("a"), 5_000_000_000, CatalogConfig::default(), key);
        previous.set_local(exports(&[("web", 1)]));
        let mut b = member(&ca, "b");
        b.apply(previous.delta_for(&b.digest()), t0);
        a.apply(b.delta_to(&a.digest(), Some("a")), t0);
        assert_eq!(a.digest()["a"].generation, 5_000_000_001);
    }

    /// `exchange` as members do it: each side knows the other's cluster.
    fn talk(a: &mut Catalog, b: &mut Catalog, now: Instant) {
        let (ca, cb) = (a.me().cluster.clone(), b.me().cluster.clone());
        // As the node does: the callee notes the caller's digest first.
        b.note_digest(&a.digest(), now);
        let to_a = b.delta_to(&a.digest(), Some(&ca));
        let b_digest = b.digest();
        a.note_digest(&b_digest, now);
        a.apply(to_a, now);
        let to_b = a.delta_to(&b_digest, Some(&cb));
        b.apply(to_b, now);
    }

    /// A replica of cluster "a" that does not know who speaks, signing with `key`.
    fn replica(key: &Arc<Sealing>, generation: u64, now: Instant) -> Catalog {
        let mut r = Catalog::sealed(info("a"), generation, CatalogConfig::default(), key.clone());
        r.set_local(exports(&[("web", 1)]));
        r.set_voice(Voice::Auto, now);
        r
    }

    /// Six seconds of rounds: both replicas tick and talk to `b`.
    fn rounds(older: &mut Catalog, newer: &mut Catalog, b: &mut Catalog, now: &mut Instant) {
        for _ in 0..60 {
            *now += Duration::from_millis(100);
            for r in [&mut *older, &mut *newer, &mut *b] {
                r.tick(*now);
            }
            talk(older, b, *now);
            talk(newer, b, *now);
        }
    }
    #[test]
    fn signed_replicas_settle_on_the_newest_and_take_over_when_it_is_gone() {
        let mut now = Instant::now();
        let ca = ca();
        let (mut older, mut newer) = (
            replica(&sealing(&ca, "a"), 5, now),
            replica(&sealing(&ca, "a"), 7, now),
        );
        let mut b = member(&ca, "b");
        rounds(&mut older, &mut newer, &mut b, &mut now);
        assert!(
            !older.speaks() && newer.speaks(),
            "the newest incarnation speaks"
        );
        assert_eq!(b.digest()["a"].generation, 7);
        for _ in 0..60 {
            now += Duration::from_millis(100);
            older.tick(now);
            b.tick(now);
            talk(&mut older, &mut b, now);
        }
        assert!(older.speaks(), "a silent sibling gives the voice back");
        assert!(b.digest()["a"].generation > 7);
        assert_eq!(
            visible(&b, now),
            vec![("a".into(), "default/web".into(), 1)]
        );
    }

    #[test]
    fn a_claimed_incarnation_of_our_cluster_neither_silences_nor_outranks_us() {
        let mut now = Instant::now();
        let ca = ca();
        let mut a = replica(&sealing(&ca, "a"), 5, now);
        // m holds a valid certificate of its own cluster and claims a live, newer "a".
        let mut fake = Catalog::sealed(info("a"), 7, CatalogConfig::default(), sealing(&ca, "m"));
        fake.set_local(exports(&[("evil", 1)]));
        for _ in 0..60 {
            now += Duration::from_millis(100);
            a.tick(now);
            fake.tick(now);
            let d = fake.delta_to(&a.digest(), Some("a"));
            assert!(d.origins[0].seal.as_ref().unwrap().content.is_some());
            a.apply(d, now);
        }
        assert!(a.speaks(), "no genuine sibling: it speaks for its cluster");
        assert_eq!(
            a.digest()["a"].generation,
            5,
            "and was not made to outrank a fake"
        );
    }

    #[test]
    fn replicas_sharing_one_certificate_settle_on_the_newest() {
        // As deployed: every replica mounts the cluster's one certificate.
        let mut now = Instant::now();
        let ca = ca();
        let key = sealing(&ca, "a");
        let (mut older, mut newer) = (replica(&key, 5, now), replica(&key, 7, now));
        let mut b = member(&ca, "b");
        rounds(&mut older, &mut newer, &mut b, &mut now);
        assert!(
            !older.speaks() && newer.speaks(),
            "the newest incarnation speaks"
        );
        assert_eq!(b.digest()["a"].generation, 7, "no generation race");
    }

    /// Replica `name` of cluster "a" (tunnel port `port`), signing with `key`, that does
    /// not know who speaks.
    fn named(key: &Arc<Sealing>, name: &str, port: u16, generation: u64, now: Instant) -> Catalog {
        let mut me = info("a");
        me.tunnel_addr.set_port(port);
        let config = CatalogConfig {
            replica: Some(name.into()),
            ..Default::default()
        };
        let mut r = Catalog::sealed(me, generation, config, key.clone());
        r.set_local(exports(&[("web", 1)]));
        r.set_voice(Voice::Auto, now);
        r
    }

    /// (replica, tunnel port, alive, draining) of cluster "a" as `c` sees them.
    fn replicas_of_a(c: &Catalog, now: Instant) -> Vec<(String, u16, bool, bool)> {
        let mut v: Vec<_> = c
            .replicas(now)
            .into_iter()
            .filter(|r| r.info.cluster == "a")
            .map(|r| (r.replica, r.info.tunnel_addr.port(), r.alive, r.draining))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn every_replica_announces_itself_and_relays_pass_the_records_on() {
        let mut now = Instant::now();
        let ca = ca();
        let key = sealing(&ca, "a");
        let (mut r1, mut r2) = (
            named(&key, "a-1", 7001, 5, now),
            named(&key, "a-2", 7002, 7, now),
        );
        let (mut b, mut c) = (member(&ca, "b"), member(&ca, "c"));
        rounds(&mut r1, &mut r2, &mut b, &mut now);
        // Only one speaks for the cluster's origin; both are announced.
        assert!(!r1.speaks() && r2.speaks());
        let both = vec![
            ("a-1".to_owned(), 7001, true, false),
            ("a-2".to_owned(), 7002, true, false),
        ];
        assert_eq!(replicas_of_a(&b, now), both);
        // c never talks to a replica: b passes the records on, signatures and all.
        talk(&mut c, &mut b, now);
        assert_eq!(replicas_of_a(&c, now), both);
        // A cluster's only gateway has no record: peers dial its origin's address.
        assert!(b.replicas(now).iter().all(|r| r.info.cluster == "a"));
    }

    #[test]
    fn a_lost_replica_expires_but_never_withdraws_what_its_sibling_exports() {
        let mut now = Instant::now();
        let ca = ca();
        let key = sealing(&ca, "a");
        let (mut r1, mut r2) = (
            named(&key, "a-1", 7001, 5, now),
            named(&key, "a-2", 7002, 7, now),
        );
        let mut b = member(&ca, "b");
        rounds(&mut r1, &mut r2, &mut b, &mut now);
        assert!(r2.speaks(), "the newest speaks");
        // The speaker dies; the lease (30 s) passes with only a-1 beating.
        for _ in 0..320 {
            now += Duration::from_millis(100);
            r1.tick(now);
            b.tick(now);
            talk(&mut r1, &mut b, now);
            assert_eq!(
                visible(&b, now),
                vec![("a".into(), "default/web".into(), 1)],
                "a's services stay while a replica of it lives"
            );
        }
        assert!(r1.speaks(), "the sibling took the voice");
        assert_eq!(
            replicas_of_a(&b, now),
            vec![
                ("a-1".to_owned(), 7001, true, false),
                ("a-2".to_owned(), 7002, false, false),
            ]
        );
    }

    #[test]
    fn draining_travels_with_the_record_and_a_forged_or_altered_record_is_refused() {
        let now = Instant::now();
        let ca = ca();
        let mut r1 = named(&sealing(&ca, "a"), "a-1", 7001, 5, now);
        let mut b = member(&ca, "b");
        assert!(r1.set_draining(true));
        assert!(!r1.set_draining(true), "no change, no new beat");
        talk(&mut r1, &mut b, now);
        assert_eq!(
            replicas_of_a(&b, now),
            vec![("a-1".to_owned(), 7001, true, true)]
        );

        // A relay moves the replica's tunnel address: not what it signed.
        let mut c = member(&ca, "c");
        let mut d = b.delta_for(&c.digest());
        d.replicas[0].info.tunnel_addr.set_port(6666);
        let stats = c.apply(d, now);
        assert_eq!((stats.rejected, stats.replicas_applied), (1, 0));
        assert!(replicas_of_a(&c, now).is_empty());

        // A member of cluster m announces a replica of a, signed with its own key.
        let mut fake = named(&sealing(&ca, "m"), "a-9", 7009, 9, now);
        fake.tick(now);
        let stats = c.apply(fake.delta_for(&c.digest()), now);
        assert_eq!(stats.replicas_applied, 0);
        assert!(replicas_of_a(&c, now).is_empty());
    }
}

/// Replica `name` of `cluster` at tunnel port `port`, generation 1, beat 1, unsigned.
fn unsigned_record(cluster: &str, name: &str, port: u16) -> ReplicaRecord {
    let mut me = info(cluster);
    me.tunnel_addr.set_port(port);
    ReplicaRecord {
        replica: name.into(),
        info: me,
        generation: 1,
        beat: 1,
        draining: false,
        seal: None,
        chain: None,
    }
}

/// Replica records from one writer: the content is a function of (key, generation, beat),
/// as a replica bumps its beat with every change.
fn arb_records() -> impl Strategy<Value = Delta> {
    let record = (0..2usize, 0..2usize, 1..3u64, 0..4u64).prop_map(|(c, r, generation, beat)| {
        let cluster = ["a", "b"][c];
        let port = 7000 + (generation * 10 + beat) as u16;
        ReplicaRecord {
            generation,
            beat,
            draining: beat % 2 == 1,
            ..unsigned_record(cluster, &format!("{cluster}-{r}"), port)
        }
    });
    proptest::collection::vec(record, 0..6).prop_map(|replicas| Delta {
        origins: vec![],
        replicas,
    })
}

fn replica_state(c: &Catalog, now: Instant) -> Vec<(String, String, u16, bool)> {
    let mut v: Vec<_> = c
        .replicas(now)
        .into_iter()
        .map(|r| {
            (
                r.info.cluster,
                r.replica,
                r.info.tunnel_addr.port(),
                r.draining,
            )
        })
        .collect();
    v.sort();
    v
}

proptest! {
    #[test]
    fn replica_records_merge_commutatively_and_idempotently(d1 in arb_records(), d2 in arb_records()) {
        let now = Instant::now();
        let (mut x, mut y) = (node("z", 1), node("z", 1));
        x.apply(d1.clone(), now);
        x.apply(d2.clone(), now);
        y.apply(d2.clone(), now);
        y.apply(d1.clone(), now);
        prop_assert_eq!(replica_state(&x, now), replica_state(&y, now));
        prop_assert_eq!(x.digest().replicas, y.digest().replicas);
        let before = replica_state(&x, now);
        x.apply(d1, now);
        x.apply(d2, now);
        prop_assert_eq!(replica_state(&x, now), before);
    }
}

#[test]
fn a_cluster_gets_at_most_sixteen_replica_records() {
    let now = Instant::now();
    let mut c = node("z", 1);
    let records = (0..20)
        .map(|i| unsigned_record("a", &format!("a-{i}"), 7000 + i))
        .collect();
    let stats = c.apply(
        Delta {
            origins: vec![],
            replicas: records,
        },
        now,
    );
    assert_eq!((stats.replicas_applied, stats.rejected), (16, 4));
    assert_eq!(c.replicas(now).len(), 16);
}
