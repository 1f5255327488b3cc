//! The routing and failover engine, sans-IO: for one service, rank the clusters that serve
//! it by locality, keep the healthy ones, spread by weight, eject paths that keep failing
//! (longer each time), bring recovered clusters back only after a dwell time and then
//! gradually, cap concurrency per cluster, and ration retries. Inputs are explicit (the
//! candidates with their health, outcomes, `now`, a seeded RNG), so every rule is tested
//! deterministically; the listener turns decisions into connection attempts.
//! `crate::routing` feeds it from the live gateway.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Where this gateway is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locality {
    /// Cluster id.
    pub cluster: String,
    /// Region.
    pub region: String,
    /// Zone (empty: unknown).
    pub zone: String,
}

/// One cluster that serves the service, with what is known of its health right now.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Cluster id.
    pub cluster: String,
    /// Its region.
    pub region: String,
    /// Its zone.
    pub zone: String,
    /// Position in the policy's priority list (lower first); `None` orders by RTT.
    pub priority: Option<u32>,
    /// Measured tunnel RTT.
    pub rtt: Option<Duration>,
    /// Relative weight (canaries: e.g. 90 and 10).
    pub weight: u32,
    /// Gateway liveness: the tunnel to it is up.
    pub peer_up: bool,
    /// Service health: its ready endpoints for this service.
    pub ready_endpoints: usize,
    /// Proxied connections to it now (for spill protection).
    pub active: usize,
    /// KEP-5939: the index of the first of the service's cluster selectors it matches.
    pub selector: Option<u32>,
}

pub use strait_common::config::routing::{Mode, RoutePolicy as Policy};

/// Why a cluster is not tried (shown by the admin API).
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    /// Its gateway is not reachable.
    PeerDown,
    /// It has no ready endpoint for the service.
    NoReadyEndpoints,
    /// Ejected after repeated failures, until this long from now; `count` ejections so far.
    Ejected { remaining: Duration, count: u32 },
    /// Recovered, waiting out the dwell time.
    Recovering { healthy_for: Duration },
    /// At its concurrency limit.
    Saturated,
}

/// One cluster in a decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Considered {
    /// Cluster id.
    pub cluster: String,
    /// Locality tier (0 same cluster, 1 same zone, 2 same region, 10+p priority, 1000+ by
    /// RTT); in `weighted` mode every cluster is tier 0.
    pub tier: u32,
    /// `None` when it is in; the reason when it is out.
    pub out: Option<Out>,
    /// Share of its normal traffic while ramping up after a recovery (1.0 = full).
    pub share: f64,
}

/// The result of ranking: clusters to try in order, and the reasoning for each candidate.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    /// Clusters to try, in order (at most `max_attempts`).
    pub attempts: Vec<String>,
    /// Every candidate, best tier first.
    pub considered: Vec<Considered>,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The stream opened and payload flowed.
    Success,
    /// Connect-level failure on this path (refused, timeout, connect-failed, overloaded).
    Failure,
}

#[derive(Debug, Clone, Default)]
struct Path {
    failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    last_ejection: Option<Instant>,
    healthy: Option<bool>,
    recovered_at: Option<Instant>,
    /// Its gateway is up and it has ready endpoints: counts towards the ejection cap.
    live: bool,
}

/// Routing state of one service.
#[derive(Debug)]
pub struct ServiceRouter {
    policy: Policy,
    paths: BTreeMap<String, Path>,
    tokens: f64,
    refilled: Option<Instant>,
    rng: StdRng,
}

impl ServiceRouter {
    /// A router with `policy`; `seed` makes weighted choices reproducible.
    pub fn new(policy: Policy, seed: u64) -> Self {
        // One second's worth of the floor is there from the start: the first failure
        // after a start or a quiet spell can be retried.
        let tokens = policy.min_retries_per_sec.max(0.0);
        Self {
            policy,
            paths: BTreeMap::new(),
            tokens,
            refilled: None,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Replaces the policy (config reload); state is kept.
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// Judges every candidate as of `now`, best tier first, without choosing: what the
    /// admin API shows, and what keeps dwell timers right while no traffic flows.
    pub fn observe(
        &mut self,
        me: &Locality,
        candidates: &[Candidate],
        now: Instant,
    ) -> Vec<Considered> {
        let tiers = tiers(self.policy.mode, me, candidates);
        // Clusters that no longer serve the service are forgotten (and stop counting
        // towards the ejection cap).
        self.paths
            .retain(|name, _| candidates.iter().any(|c| &c.cluster == name));
        let mut considered = Vec::with_capacity(candidates.len());
        for (c, tier) in candidates.iter().zip(&tiers) {
            let (out, share) = self.judge(c, now);
            considered.push(Considered {
                cluster: c.cluster.clone(),
                tier: *tier,
                out,
                share,
            });
        }
        considered.sort_by(|a, b| a.tier.cmp(&b.tier).then_with(|| a.cluster.cmp(&b.cluster)));
        considered
    }

    /// Ranks `candidates` for one new connection from `me`.
    pub fn decide(&mut self, me: &Locality, candidates: &[Candidate], now: Instant) -> Decision {
        let considered = self.observe(me, candidates, now);
        let weight = |cluster: &str| {
            candidates
                .iter()
                .find(|c| c.cluster == cluster)
                .map_or(1, |c| c.weight.max(1))
        };
        let in_rotation: Vec<&Considered> = considered.iter().filter(|c| c.out.is_none()).collect();
        // Slow start: a ramping cluster keeps its place with probability `share`, otherwise
        // it yields to the next tier for this connection; with no next tier (weighted mode,
        // or the last tier) its weight is scaled by `share` instead.
        let mut keyed: Vec<((u32, u32), f64, &str)> = Vec::with_capacity(in_rotation.len());
        for c in &in_rotation {
            let next_tier = in_rotation
                .iter()
                .map(|o| o.tier)
                .filter(|t| *t > c.tier)
                .min();
            let ramping = c.share < 1.0;
            let demoted = ramping && next_tier.is_some() && self.rng.random::<f64>() >= c.share;
            let key = if demoted {
                (next_tier.unwrap_or(c.tier), 1)
            } else {
                (c.tier, 0)
            };
            let mut w = f64::from(weight(&c.cluster));
            if ramping && next_tier.is_none() {
                w *= c.share.max(0.01);
            }
            // Weighted order without replacement: smaller -ln(u)/w comes first.
            let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
            keyed.push((key, -u.ln() / w, &c.cluster));
        }
        keyed.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        // Last resorts, nearest first: a cluster still dwelling or at its limit, then an
        // ejected one. A doubtful attempt beats resetting the client.
        let last_resort = |pick: fn(&Out) -> bool| {
            considered
                .iter()
                .filter(move |c| c.out.as_ref().is_some_and(pick))
                .map(|c| c.cluster.as_str())
        };
        let attempts = keyed
            .into_iter()
            .map(|(_, _, c)| c)
            .chain(last_resort(|o| {
                matches!(o, Out::Recovering { .. } | Out::Saturated)
            }))
            .chain(last_resort(|o| matches!(o, Out::Ejected { .. })))
            .take(self.policy.attempts.max(1))
            .map(str::to_owned)
            .collect();
        Decision {
            attempts,
            considered,
        }
    }

    fn judge(&mut self, c: &Candidate, now: Instant) -> (Option<Out>, f64) {
        let policy = &self.policy;
        let path = self.paths.entry(c.cluster.clone()).or_default();
        path.live = c.peer_up && c.ready_endpoints > 0;
        if path.ejected_until.is_some_and(|t| t <= now) {
            path.ejected_until = None;
        }
        let out = if !c.peer_up {
            Some(Out::PeerDown)
        } else if c.ready_endpoints == 0 {
            Some(Out::NoReadyEndpoints)
        } else if let Some(until) = path.ejected_until {
            Some(Out::Ejected {
                remaining: until - now,
                count: path.ejections,
            })
        } else {
            None
        };
        let healthy = out.is_none();
        match (path.healthy, healthy) {
            (Some(false), true) => path.recovered_at = Some(now),
            (_, false) => path.recovered_at = None,
            _ => {}
        }
        path.healthy = Some(healthy);
        if let Some(out) = out {
            return (Some(out), 0.0);
        }
        let mut share = 1.0;
        if let Some(at) = path.recovered_at {
            let healthy_for = now.saturating_duration_since(at);
            if healthy_for < policy.dwell {
                return (Some(Out::Recovering { healthy_for }), 0.0);
            }
            let ramp = healthy_for - policy.dwell;
            if ramp < policy.slow_start {
                share = ramp.as_secs_f64() / policy.slow_start.as_secs_f64().max(f64::EPSILON);
            } else {
                path.recovered_at = None;
            }
        }
        if policy.max_per_cluster.is_some_and(|max| c.active >= max) {
            return (Some(Out::Saturated), share);
        }
        (None, share)
    }

    /// Records how an attempt on `cluster` ended; repeated failures eject the path.
    /// Returns the ejection time when this failure ejected it.
    pub fn record(&mut self, cluster: &str, outcome: Outcome, now: Instant) -> Option<Duration> {
        let p = &self.policy;
        let (threshold, base, max, fraction) = (
            p.consecutive_failures,
            p.ejection_base,
            p.ejection_max,
            p.max_ejected_fraction,
        );
        // The cap is a share of the clusters that could serve now (gateway up, endpoints
        // ready), not of every cluster ever seen.
        let total = self.paths.values().filter(|p| p.live).count().max(1);
        let ejected = self
            .paths
            .values()
            .filter(|p| p.live && p.ejected_until.is_some_and(|t| t > now))
            .count();
        let path = self.paths.entry(cluster.to_owned()).or_default();
        match outcome {
            Outcome::Success => {
                path.failures = 0;
                // Flap damping decays: a path healthy for a whole max period starts over.
                if path
                    .last_ejection
                    .is_some_and(|t| now.saturating_duration_since(t) > max * 2)
                {
                    path.ejections = 0;
                }
            }
            Outcome::Failure => {
                path.failures += 1;
                let already = path.ejected_until.is_some_and(|t| t > now);
                let room = ((ejected + 1) as f64) <= fraction * total as f64 + 1e-9;
                if path.failures >= threshold && !already && room {
                    let factor = 2u32.saturating_pow(path.ejections.min(16));
                    let time = base.saturating_mul(factor).min(max);
                    path.ejected_until = Some(now + time);
                    path.last_ejection = Some(now);
                    path.ejections += 1;
                    path.failures = 0;
                    return Some(time);
                }
            }
        }
        None
    }

    /// Counts a first attempt (earns retry budget).
    pub fn first_attempt(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + self.policy.retry_ratio).min(self.cap());
    }

    /// Whether a retry may be spent now; takes it from the budget if so.
    pub fn try_retry(&mut self, now: Instant) -> bool {
        self.refill(now);
        // Tolerance: five times 0.2 must make one whole retry despite float rounding.
        if self.tokens >= 1.0 - 1e-9 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            true
        } else {
            false
        }
    }

    /// Most retries that can be saved up: one second of the minimum rate plus the ratio's
    /// share of 100 connections, so a burst of failures cannot spend an unbounded hoard.
    fn cap(&self) -> f64 {
        (self.policy.min_retries_per_sec + 100.0 * self.policy.retry_ratio).max(1.0)
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.refilled {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.policy.min_retries_per_sec).min(self.cap());
        }
        self.refilled = Some(now);
    }
}

/// Width of the RTT buckets clusters are ranked by.
pub const RTT_BUCKET_MS: u128 = 10;

/// Locality tier of each candidate under `mode`.
/// Tiers a KEP-5939 selector index adds: the first selector's clusters before the
/// second's, and so on, then the clusters no selector matches; locality orders within.
const SELECTOR_TIER: u32 = 10_000;

fn tiers(mode: Mode, me: &Locality, candidates: &[Candidate]) -> Vec<u32> {
    let selecting = candidates.iter().any(|c| c.selector.is_some());
    let base = locality_tiers(mode, me, candidates);
    candidates
        .iter()
        .zip(base)
        .map(|(c, tier)| match (selecting, c.selector) {
            (false, _) => tier,
            (true, Some(i)) => tier + SELECTOR_TIER * i.min(100),
            (true, None) => tier + SELECTOR_TIER * 101,
        })
        .collect()
}

fn locality_tiers(mode: Mode, me: &Locality, candidates: &[Candidate]) -> Vec<u32> {
    let tier_of = |c: &Candidate| match mode {
        Mode::Locality => locality_tier(me, c),
        Mode::Weighted => Some(0),
        Mode::Priority => c.priority.map(|p| 10 + p.min(900)),
    };
    // RTTs within one bucket count as equally near (then by cluster id), so jitter between
    // two similar paths does not flip traffic back and forth.
    let mut by_rtt: Vec<(u128, &str)> = candidates
        .iter()
        .filter(|c| tier_of(c).is_none())
        .map(|c| {
            let bucket = c.rtt.map_or(u128::MAX, |r| r.as_millis() / RTT_BUCKET_MS);
            (bucket, c.cluster.as_str())
        })
        .collect();
    by_rtt.sort();
    candidates
        .iter()
        .map(|c| {
            tier_of(c).unwrap_or_else(|| {
                let rank = by_rtt
                    .iter()
                    .position(|(_, n)| *n == c.cluster)
                    .unwrap_or(by_rtt.len());
                1000 + rank as u32
            })
        })
        .collect()
}

fn locality_tier(me: &Locality, c: &Candidate) -> Option<u32> {
    if c.cluster == me.cluster {
        Some(0)
    } else if !me.zone.is_empty() && c.zone == me.zone {
        Some(1)
    } else if c.region == me.region {
        Some(2)
    } else {
        c.priority.map(|p| 10 + p.min(900))
    }
}

#[cfg(test)]
mod tests;
