use super::*;

fn me() -> Locality {
    Locality {
        cluster: "use1-a".into(),
        region: "us-east".into(),
        zone: "use1-az1".into(),
    }
}

fn cand(cluster: &str, region: &str, zone: &str) -> Candidate {
    Candidate {
        cluster: cluster.into(),
        region: region.into(),
        zone: zone.into(),
        priority: None,
        rtt: None,
        weight: 1,
        peer_up: true,
        ready_endpoints: 2,
        active: 0,
        selector: None,
    }
}

/// Three failures in a row on each of `clusters`, at `t`.
fn fail_each(r: &mut ServiceRouter, clusters: &[&str], t: Instant) {
    for c in clusters {
        for _ in 0..3 {
            r.record(c, Outcome::Failure, t);
        }
    }
}

fn ejected(d: &Decision) -> usize {
    d.considered
        .iter()
        .filter(|c| matches!(c.out, Some(Out::Ejected { .. })))
        .count()
}

fn router(policy: Policy) -> ServiceRouter {
    ServiceRouter::new(policy, 42)
}

fn first_choice_share(
    r: &mut ServiceRouter,
    cands: &[Candidate],
    now: Instant,
    cluster: &str,
    n: usize,
) -> f64 {
    let hits = (0..n)
        .filter(|_| {
            r.decide(&me(), cands, now)
                .attempts
                .first()
                .map(String::as_str)
                == Some(cluster)
        })
        .count();
    hits as f64 / n as f64
}

#[test]
fn cluster_selectors_order_before_locality_and_unmatched_clusters_come_last() {
    // KEP-5939: selector 0 picks eu-west, selector 1 the same-region cluster; the
    // nearest cluster matches no selector.
    let mut picked_first = cand("euw1", "eu-west", "");
    picked_first.selector = Some(0);
    let mut picked_second = cand("use1-b", "us-east", "use1-az2");
    picked_second.selector = Some(1);
    let nearest = cand("use1-c", "us-east", "use1-az1");
    let mut r = router(Policy {
        attempts: 10,
        ..Default::default()
    });
    let d = r.decide(
        &me(),
        &[nearest, picked_second, picked_first],
        Instant::now(),
    );
    assert_eq!(d.attempts, vec!["euw1", "use1-b", "use1-c"]);

    // Without any match the selectors change nothing: locality as usual.
    let plain = [
        cand("use1-c", "us-east", "use1-az1"),
        cand("euw1", "eu-west", ""),
    ];
    let d = r.decide(&me(), &plain, Instant::now());
    assert_eq!(d.attempts, vec!["use1-c", "euw1"]);
}

#[test]
fn ranks_by_locality_then_priority_then_rtt() {
    let mut far_fast = cand("euw1", "eu-west", "");
    far_fast.rtt = Some(Duration::from_millis(80));
    let mut far_slow = cand("aps1", "ap-south", "");
    far_slow.rtt = Some(Duration::from_millis(200));
    let mut prio = cand("usw2", "us-west", "");
    prio.priority = Some(1);
    let cands = vec![
        far_slow,
        far_fast,
        prio,
        cand("use1-b", "us-east", "use1-az2"),
        cand("use1-c", "us-east", "use1-az1"),
    ];
    let mut r = router(Policy {
        attempts: 10,
        ..Default::default()
    });
    let d = r.decide(&me(), &cands, Instant::now());
    assert_eq!(
        d.attempts,
        vec!["use1-c", "use1-b", "usw2", "euw1", "aps1"],
        "zone, region, priority, then RTT"
    );
    assert_eq!(
        d.considered.iter().map(|c| c.tier).collect::<Vec<_>>(),
        vec![1, 2, 11, 1000, 1001]
    );
}

#[test]
fn unhealthy_clusters_are_out_with_their_reason() {
    let mut down = cand("a", "us-east", "");
    down.peer_up = false;
    let mut empty = cand("b", "us-east", "");
    empty.ready_endpoints = 0;
    let ok = cand("c", "eu-west", "");
    let mut r = router(Policy::default());
    let d = r.decide(&me(), &[down, empty, ok], Instant::now());
    assert_eq!(d.attempts, vec!["c"]);
    let reason = |c: &str| {
        d.considered
            .iter()
            .find(|x| x.cluster == c)
            .unwrap()
            .out
            .clone()
    };
    assert_eq!(reason("a"), Some(Out::PeerDown));
    assert_eq!(
        reason("b"),
        Some(Out::NoReadyEndpoints),
        "zero ready endpoints excludes the cluster for this service"
    );
    assert_eq!(reason("c"), None);
}

#[test]
fn weights_split_traffic_within_a_tier() {
    let mut a = cand("canary", "us-east", "");
    a.weight = 10;
    let mut b = cand("stable", "us-east", "");
    b.weight = 90;
    let mut r = router(Policy::default());
    let share = first_choice_share(&mut r, &[a, b], Instant::now(), "stable", 4000);
    assert!((share - 0.9).abs() < 0.02, "stable got {share}");
}

#[test]
fn max_attempts_bounds_the_list() {
    let cands: Vec<_> = (0..6).map(|i| cand(&format!("c{i}"), "x", "")).collect();
    let mut r = router(Policy {
        attempts: 2,
        ..Default::default()
    });
    assert_eq!(r.decide(&me(), &cands, Instant::now()).attempts.len(), 2);
}

#[test]
fn ejection_grows_with_repeats_and_is_capped() {
    let t0 = Instant::now();
    let policy = Policy {
        dwell: Duration::ZERO,
        slow_start: Duration::ZERO,
        ..Default::default()
    };
    let cands = vec![cand("bad", "us-east", ""), cand("good", "eu-west", "")];
    let mut r = router(policy);
    let mut now = t0;
    let mut lengths = Vec::new();
    for _ in 0..8 {
        r.decide(&me(), &cands, now);
        for _ in 0..3 {
            r.record("bad", Outcome::Failure, now);
        }
        let d = r.decide(&me(), &cands, now);
        let Some(Out::Ejected { remaining, .. }) = d
            .considered
            .iter()
            .find(|c| c.cluster == "bad")
            .unwrap()
            .out
            .clone()
        else {
            panic!("not ejected: {d:?}")
        };
        assert_eq!(
            d.attempts,
            vec!["good", "bad"],
            "ejected: a last resort only"
        );
        lengths.push(remaining);
        now += remaining; // ejection over
    }
    let secs: Vec<u64> = lengths.iter().map(Duration::as_secs).collect();
    assert_eq!(
        secs,
        vec![2, 4, 8, 16, 32, 60, 60, 60],
        "doubles, capped at max"
    );
    let d = r.decide(&me(), &cands, now);
    assert_eq!(
        d.attempts[0], "bad",
        "back in rotation once the ejection ends"
    );
}

#[test]
fn no_more_than_the_max_fraction_is_ejected() {
    let t0 = Instant::now();
    let cands = vec![cand("a", "x", ""), cand("b", "x", "")];
    let mut r = router(Policy::default());
    r.decide(&me(), &cands, t0);
    fail_each(&mut r, &["a", "b"], t0);
    let d = r.decide(&me(), &cands, t0);
    assert_eq!(ejected(&d), 1, "half of two clusters");
    let in_rotation = d.considered.iter().find(|c| c.out.is_none()).unwrap();
    assert_eq!(
        d.attempts[0], in_rotation.cluster,
        "the one left in rotation first"
    );
}

#[test]
fn success_resets_the_failure_streak() {
    let t0 = Instant::now();
    let cands = vec![cand("a", "x", ""), cand("b", "x", "")];
    let mut r = router(Policy::default());
    r.decide(&me(), &cands, t0);
    for _ in 0..5 {
        r.record("a", Outcome::Failure, t0);
        r.record("a", Outcome::Failure, t0);
        r.record("a", Outcome::Success, t0);
    }
    assert!(
        r.decide(&me(), &cands, t0)
            .considered
            .iter()
            .all(|c| c.out.is_none())
    );
}

#[test]
fn failback_waits_out_the_dwell_then_ramps_up() {
    let t0 = Instant::now();
    let policy = Policy {
        dwell: Duration::from_secs(5),
        slow_start: Duration::from_secs(10),
        ..Default::default()
    };
    let mut near = cand("near", "us-east", "");
    let far = cand("far", "eu-west", "");
    let mut r = router(policy);
    assert_eq!(
        r.decide(&me(), &[near.clone(), far.clone()], t0).attempts[0],
        "near"
    );
    near.peer_up = false;
    assert_eq!(
        r.decide(
            &me(),
            &[near.clone(), far.clone()],
            t0 + Duration::from_secs(1)
        )
        .attempts,
        vec!["far"]
    );
    near.peer_up = true;
    let back = t0 + Duration::from_secs(2);
    let d = r.decide(&me(), &[near.clone(), far.clone()], back);
    assert_eq!(
        d.attempts,
        vec!["far", "near"],
        "recovered but still dwelling: only a last resort"
    );
    assert!(matches!(d.considered[0].out, Some(Out::Recovering { .. })));
    let cands = [near.clone(), far.clone()];
    let quarter = first_choice_share(
        &mut r,
        &cands,
        back + Duration::from_millis(7_500),
        "near",
        4000,
    );
    let three_q = first_choice_share(
        &mut r,
        &cands,
        back + Duration::from_millis(12_500),
        "near",
        4000,
    );
    assert!(
        (quarter - 0.25).abs() < 0.03,
        "25% into slow start: {quarter}"
    );
    assert!(
        (three_q - 0.75).abs() < 0.03,
        "75% into slow start: {three_q}"
    );
    let d = r.decide(&me(), &cands, back + Duration::from_secs(16));
    assert_eq!(d.attempts[0], "near", "fully back after dwell + slow start");
    assert_eq!(d.considered[0].share, 1.0);
}

#[test]
fn recovering_clusters_still_serve_when_nothing_else_can() {
    let t0 = Instant::now();
    let mut only = cand("only", "x", "");
    let mut r = router(Policy::default());
    r.decide(&me(), std::slice::from_ref(&only), t0);
    only.peer_up = false;
    r.decide(&me(), std::slice::from_ref(&only), t0);
    only.peer_up = true;
    let d = r.decide(
        &me(),
        std::slice::from_ref(&only),
        t0 + Duration::from_secs(1),
    );
    assert_eq!(
        d.attempts,
        vec!["only"],
        "dwell never turns a working path into no path"
    );
}

#[test]
fn spill_protection_caps_concurrency_per_cluster() {
    let mut near = cand("near", "us-east", "");
    near.active = 100;
    let far = cand("far", "eu-west", "");
    let mut r = router(Policy {
        max_per_cluster: Some(100),
        ..Default::default()
    });
    let d = r.decide(&me(), &[near.clone(), far], Instant::now());
    assert_eq!(d.attempts, vec!["far", "near"], "full: a last resort");
    assert_eq!(d.considered[0].out, Some(Out::Saturated));
    // Alone at its limit, it still gets the connection rather than none.
    assert_eq!(
        r.decide(&me(), &[near], Instant::now()).attempts,
        vec!["near"]
    );
}

#[test]
fn retry_budget_limits_retries_to_a_share_of_traffic() {
    let t0 = Instant::now();
    let mut r = router(Policy {
        retry_ratio: 0.2,
        min_retries_per_sec: 0.0,
        ..Default::default()
    });
    for _ in 0..100 {
        r.first_attempt(t0);
    }
    let allowed = (0..100).filter(|_| r.try_retry(t0)).count();
    assert_eq!(allowed, 20, "one retry per five first attempts");
    let mut r = router(Policy {
        retry_ratio: 0.0,
        min_retries_per_sec: 10.0,
        ..Default::default()
    });
    r.first_attempt(t0);
    let allowed = (0..100)
        .filter(|_| r.try_retry(t0 + Duration::from_secs(1)))
        .count();
    assert_eq!(allowed, 10, "the floor refills at its rate");
}

#[test]
fn weighted_mode_splits_by_weight_wherever_clusters_are() {
    let t0 = Instant::now();
    // A near cluster would win in locality mode; weighted mode ignores locality.
    let mut near = cand("near", "us-east", "");
    near.weight = 90;
    let mut far = cand("far", "eu-west", "");
    far.weight = 10;
    let mut r = router(Policy {
        mode: Mode::Weighted,
        ..Default::default()
    });
    let share = first_choice_share(&mut r, &[near.clone(), far.clone()], t0, "far", 10_000);
    assert!((0.08..0.12).contains(&share), "far got {share}");
    // An unhealthy heavy cluster gives everything to the light one.
    near.peer_up = false;
    let share = first_choice_share(&mut r, &[near, far], t0, "far", 100);
    assert_eq!(share, 1.0);
}

#[test]
fn priority_mode_follows_the_list_then_rtt() {
    let mut same_region = cand("use1-b", "us-east", "");
    same_region.priority = Some(2);
    let mut first = cand("euw1", "eu-west", "");
    first.priority = Some(0);
    let mut second = cand("aps1", "ap-south", "");
    second.priority = Some(1);
    let mut unlisted_fast = cand("usw2", "us-west", "");
    unlisted_fast.rtt = Some(Duration::from_millis(5));
    let mut unlisted_slow = cand("sae1", "sa-east", "");
    unlisted_slow.rtt = Some(Duration::from_millis(150));
    let mut r = router(Policy {
        mode: Mode::Priority,
        attempts: 10,
        ..Default::default()
    });
    let d = r.decide(
        &me(),
        &[unlisted_slow, same_region, unlisted_fast, second, first],
        Instant::now(),
    );
    assert_eq!(d.attempts, vec!["euw1", "aps1", "use1-b", "usw2", "sae1"]);
}

#[test]
fn observing_without_traffic_still_times_the_dwell() {
    let t0 = Instant::now();
    let policy = Policy {
        dwell: Duration::from_secs(5),
        slow_start: Duration::ZERO,
        ..Default::default()
    };
    let mut near = cand("near", "us-east", "");
    let far = cand("far", "eu-west", "");
    let mut r = router(policy);
    r.observe(&me(), &[near.clone(), far.clone()], t0);
    near.peer_up = false;
    r.observe(
        &me(),
        &[near.clone(), far.clone()],
        t0 + Duration::from_secs(1),
    );
    near.peer_up = true;
    // Only observed (no connection) when it came back at t=2s.
    r.observe(
        &me(),
        &[near.clone(), far.clone()],
        t0 + Duration::from_secs(2),
    );
    let d = r.decide(
        &me(),
        &[near.clone(), far.clone()],
        t0 + Duration::from_secs(6),
    );
    assert_eq!(d.attempts[0], "far", "4 s after recovery: still dwelling");
    let d = r.decide(&me(), &[near, far], t0 + Duration::from_secs(7));
    assert_eq!(d.attempts[0], "near", "5 s after recovery: back");
}

#[test]
fn rtt_jitter_between_similar_paths_does_not_reorder() {
    let mut a = cand("a", "eu-west", "");
    let mut b = cand("b", "ap-south", "");
    let mut r = router(Policy::default());
    for (ra, rb) in [(4, 3), (3, 4), (7, 1)] {
        a.rtt = Some(Duration::from_millis(ra));
        b.rtt = Some(Duration::from_millis(rb));
        let d = r.decide(&me(), &[a.clone(), b.clone()], Instant::now());
        assert_eq!(d.attempts[0], "a", "{ra} vs {rb} ms: same bucket, by id");
    }
    a.rtt = Some(Duration::from_millis(40));
    let d = r.decide(&me(), &[a, b], Instant::now());
    assert_eq!(d.attempts[0], "b", "clearly nearer wins");
}

#[test]
fn ejection_cap_counts_only_clusters_that_could_serve() {
    let t0 = Instant::now();
    // Four clusters, two of them down: of the two live ones only one may be ejected.
    let mut cands: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|c| cand(c, "x", ""))
        .collect();
    cands[2].peer_up = false;
    cands[3].peer_up = false;
    let mut r = router(Policy::default());
    r.decide(&me(), &cands, t0);
    fail_each(&mut r, &["a", "b"], t0);
    let d = r.decide(&me(), &cands, t0);
    assert_eq!(ejected(&d), 1, "{d:?}");
}

#[test]
fn slow_start_scales_the_share_within_a_single_tier() {
    let t0 = Instant::now();
    let policy = Policy {
        mode: Mode::Weighted,
        dwell: Duration::ZERO,
        slow_start: Duration::from_secs(10),
        ..Default::default()
    };
    let mut a = cand("a", "x", "");
    let b = cand("b", "y", "");
    let mut r = router(policy);
    r.observe(&me(), &[a.clone(), b.clone()], t0);
    a.peer_up = false;
    r.observe(&me(), &[a.clone(), b.clone()], t0);
    a.peer_up = true;
    r.observe(&me(), &[a.clone(), b.clone()], t0);
    // 2 s into a 10 s ramp: a's weight is a fifth of b's, so about 1/6 of first choices.
    let share = first_choice_share(&mut r, &[a, b], t0 + Duration::from_secs(2), "a", 10_000);
    assert!((0.12..0.22).contains(&share), "a got {share}");
}
