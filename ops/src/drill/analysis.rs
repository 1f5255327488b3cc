//! Turns what a drill recorded (every connection, the source gateway's route polls, when
//! each fault started and ended) into its report: timelines, detection, reroute and
//! failback times, and the objectives' verdicts. No I/O; times are from the drill's start.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::scenario::{Objectives, Scenario};
use crate::load::{Break, Sample};

/// Width of one timeline bucket.
pub const BUCKET: Duration = Duration::from_millis(250);
/// Window before a fault whose traffic is its baseline.
const BASELINE: Duration = Duration::from_secs(2);
/// Window over which a recovered cluster's share is judged.
const FAILBACK_WINDOW: Duration = Duration::from_secs(1);
/// A cluster has failed back once its share is this close to its baseline.
const FAILBACK_SHARE: f64 = 0.9;

/// Whether a connection was in flight when a fault began: it started before the fault
/// and had not ended by then. Such a connection that fails was *broken* by the fault (a
/// crash resets what it carried); only connections started after every fault that was
/// under way count as *new* ones. `fault_starts` and the sample share one clock.
pub fn in_flight(s: &Sample, fault_starts: &[Duration]) -> bool {
    fault_starts.iter().any(|&f| s.at < f && s.end() >= f)
}

/// One poll of the source gateway's route for the load's service.
#[derive(Debug, Clone, Default)]
pub struct RoutePoll {
    /// When.
    pub at: Duration,
    /// Cluster → (takes new connections, why not, connections taken so far).
    pub clusters: BTreeMap<String, (bool, Option<String>, u64)>,
}

/// Everything one load saw.
#[derive(Debug, Clone)]
pub struct LoadRecording {
    /// Source gateway.
    pub from: String,
    /// Service driven.
    pub service: String,
    /// Listener address driven.
    pub target: SocketAddr,
    /// Long-lived connections asked for.
    pub connections: usize,
    /// Every new connection.
    pub samples: Vec<Sample>,
    /// Every long-lived connection break.
    pub breaks: Vec<Break>,
    /// Route polls, in time order.
    pub polls: Vec<RoutePoll>,
}

/// One step as it ran.
#[derive(Debug, Clone)]
pub struct StepRecord {
    /// Kind name.
    pub kind: String,
    /// What it did, for people (`blackhole on eu-west to us-east`).
    pub label: String,
    /// The cluster whose traffic it should move (or keep, when it `stays`).
    pub victim: Option<String>,
    /// A fault the cluster's replicas ride out: its traffic should stay there.
    pub stays: bool,
    /// When it was injected; for a rolling restart or a signal, when it stopped its first
    /// replica.
    pub start: Duration,
    /// When it stopped each replica (signal or drain), if it stops replicas: each is a
    /// moment connections may be in flight at.
    pub stops: Vec<Duration>,
    /// When it was undone.
    pub end: Duration,
    /// Why it could not be injected, if it was not.
    pub error: Option<String>,
}

impl StepRecord {
    /// The moments the fault struck: every replica it stopped, or its start.
    pub fn strikes(&self) -> Vec<Duration> {
        strikes(self.start, &self.stops)
    }
}

/// The moments a fault that started at `start` struck: each replica it stopped (`stops`),
/// or its start when it stops none.
pub fn strikes(start: Duration, stops: &[Duration]) -> Vec<Duration> {
    if stops.is_empty() {
        vec![start]
    } else {
        stops.to_vec()
    }
}

/// A whole drill's raw record.
#[derive(Debug, Clone)]
pub struct Recording {
    /// Loads.
    pub loads: Vec<LoadRecording>,
    /// Steps.
    pub steps: Vec<StepRecord>,
    /// Why the drill stopped early, if it did.
    pub aborted: Option<String>,
    /// Every fault the drill injected is confirmed gone.
    pub faults_undone: bool,
    /// How long it ran.
    pub elapsed: Duration,
    /// Wall-clock start (Unix ms).
    pub started_unix_ms: u64,
}

/// Pass, fail, or stopped early.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Every objective met, every fault undone.
    Passed,
    /// Something was not met.
    Failed,
    /// The guard rail or the operator stopped it.
    Aborted,
}

/// The drill report (also the JSON file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// Scenario name.
    pub name: String,
    /// Scenario description.
    pub description: String,
    /// Wall-clock start (Unix ms).
    pub started_unix_ms: u64,
    /// Seconds it ran.
    pub duration_s: f64,
    /// The verdict.
    pub verdict: Verdict,
    /// Why it was aborted.
    pub abort_reason: Option<String>,
    /// Every injected fault confirmed undone afterwards.
    pub faults_undone: bool,
    /// Per load.
    pub loads: Vec<LoadReport>,
    /// Per fault step.
    pub faults: Vec<FaultReport>,
    /// Per objective.
    pub objectives: Vec<ObjectiveResult>,
    /// The scenario as run.
    pub scenario: Scenario,
}

/// One load's figures and timeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoadReport {
    /// Source gateway.
    pub from: String,
    /// Service.
    pub service: String,
    /// Listener driven.
    pub target: String,
    /// New connections started.
    pub started: usize,
    /// New connections failed (not counting those in flight when a fault began).
    pub failed: usize,
    /// Connections in flight when a fault began that broke (one request each).
    #[serde(default)]
    pub broken_in_flight: usize,
    /// Long-lived connections kept.
    pub connections: usize,
    /// Long-lived connection breaks.
    pub broken: usize,
    /// Time to answer, successful connections (ms).
    pub p50_ms: Option<f64>,
    /// p99 of the same.
    pub p99_ms: Option<f64>,
    /// Slowest.
    pub max_ms: Option<f64>,
    /// Clusters that served it, in order of first appearance.
    pub clusters: Vec<String>,
    /// Per bucket.
    pub timeline: Vec<Bucket>,
    /// Distinct failure reasons with counts.
    pub errors: BTreeMap<String, usize>,
}

/// One timeline bucket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Bucket {
    /// Start (s).
    pub t: f64,
    /// Connections each cluster took (from the gateway's counters).
    pub served: BTreeMap<String, u64>,
    /// New connections started in the bucket that failed.
    pub failed: usize,
    /// Connections that broke in the bucket: long-lived ones, and requests in flight when
    /// a fault began.
    pub broken: usize,
    /// p99 time to answer of connections started in the bucket (ms).
    pub p99_ms: Option<f64>,
}

/// One fault's effect.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FaultReport {
    /// Kind.
    pub kind: String,
    /// What it did.
    pub label: String,
    /// The cluster it hit.
    pub victim: Option<String>,
    /// Injected at (s).
    pub start_s: f64,
    /// Undone at (s).
    pub end_s: f64,
    /// Whether the hit cluster carried the first load's traffic before the fault.
    pub victim_served: bool,
    /// A fault the cluster's replicas ride out (kill-replica, rolling-restart): its
    /// traffic should stay, and is not expected to reroute.
    #[serde(default)]
    pub stays: bool,
    /// For such a fault: connections started during it that another cluster answered.
    #[serde(default)]
    pub served_elsewhere: Option<usize>,
    /// Seconds from the start until the source gateway took the victim out of rotation.
    pub detected_after_s: Option<f64>,
    /// Seconds from the start until no new connection went to, failed at, or was slowed
    /// by the victim.
    pub rerouted_after_s: Option<f64>,
    /// Seconds from the end until the victim had its share back.
    pub failback_after_s: Option<f64>,
    /// New connections started during the fault that failed.
    pub failed: usize,
    /// Connections in flight at its start that broke.
    #[serde(default)]
    pub broken: usize,
    /// Why it could not be injected.
    pub error: Option<String>,
}

/// One objective's verdict.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ObjectiveResult {
    /// Objective name (as in the scenario).
    pub name: String,
    /// The limit.
    pub limit: String,
    /// What the drill measured.
    pub actual: String,
    /// Met.
    pub passed: bool,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e3).round() / 1e3
}

/// The `q` quantile (0..1) of sorted durations.
fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}

fn ok_latencies<'a>(samples: impl Iterator<Item = &'a Sample>) -> Vec<Duration> {
    let mut v: Vec<Duration> = samples
        .filter(|s| s.result.is_ok())
        .map(|s| s.latency)
        .collect();
    v.sort();
    v
}

/// Connections `cluster` had taken by poll `i`.
fn count(polls: &[RoutePoll], i: usize, cluster: &str) -> u64 {
    polls[i].clusters.get(cluster).map_or(0, |c| c.2)
}

/// Connections taken in the polls within `(from, to]`: per cluster. (Counters run since
/// the gateway started, so a window reaching back before the first poll starts there.)
pub(super) fn served_between(
    polls: &[RoutePoll],
    from: Duration,
    to: Duration,
) -> BTreeMap<String, u64> {
    let before = polls.iter().rposition(|p| p.at <= from).or(Some(0));
    let until = polls.iter().rposition(|p| p.at <= to);
    let mut out = BTreeMap::new();
    let (Some(b), Some(u)) = (before, until) else {
        return out;
    };
    if u <= b {
        return out;
    }
    for c in polls[u].clusters.keys() {
        let d = count(polls, u, c).saturating_sub(count(polls, b, c));
        out.insert(c.clone(), d);
    }
    out
}

fn share(served: &BTreeMap<String, u64>, cluster: &str) -> Option<f64> {
    let total: u64 = served.values().sum();
    (total > 0).then(|| served.get(cluster).copied().unwrap_or(0) as f64 / total as f64)
}

/// Builds the report.
pub fn analyse(scenario: &Scenario, rec: &Recording) -> Report {
    let starts: Vec<Duration> = rec.steps.iter().flat_map(StepRecord::strikes).collect();
    let loads: Vec<LoadReport> = rec
        .loads
        .iter()
        .map(|l| load_report(l, rec.elapsed, &starts))
        .collect();
    let faults: Vec<FaultReport> = rec
        .steps
        .iter()
        .map(|s| {
            // Failback is judged until the next fault starts (it would disturb it again).
            let next = rec
                .steps
                .iter()
                .map(|n| n.start)
                .filter(|&t| t > s.start)
                .min()
                .unwrap_or(rec.elapsed);
            fault_report(s, rec.loads.first(), next)
        })
        .collect();
    let objectives = judge(&scenario.objectives, rec, &loads, &faults);
    let verdict = if rec.aborted.is_some() {
        Verdict::Aborted
    } else if objectives.iter().all(|o| o.passed)
        && rec.faults_undone
        && faults.iter().all(|f| f.error.is_none())
    {
        Verdict::Passed
    } else {
        Verdict::Failed
    };
    Report {
        name: scenario.name.clone(),
        description: scenario.description.clone(),
        started_unix_ms: rec.started_unix_ms,
        duration_s: secs(rec.elapsed),
        verdict,
        abort_reason: rec.aborted.clone(),
        faults_undone: rec.faults_undone,
        loads,
        faults,
        objectives,
        scenario: scenario.clone(),
    }
}

fn load_report(l: &LoadRecording, elapsed: Duration, fault_starts: &[Duration]) -> LoadReport {
    let (broken, new): (Vec<&Sample>, Vec<&Sample>) = l
        .samples
        .iter()
        .filter(|s| s.result.is_err())
        .partition(|s| in_flight(s, fault_starts));
    let lat = ok_latencies(l.samples.iter());
    let mut clusters: Vec<String> = Vec::new();
    for p in &l.polls {
        for (c, (_, _, n)) in &p.clusters {
            if *n > 0 && !clusters.contains(c) {
                clusters.push(c.clone());
            }
        }
    }
    let mut errors = BTreeMap::new();
    for s in &l.samples {
        if let Err(e) = &s.result {
            *errors.entry(e.clone()).or_default() += 1;
        }
    }
    for b in &l.breaks {
        *errors
            .entry(format!("long-lived: {}", b.error))
            .or_default() += 1;
    }
    let n = (elapsed.as_secs_f64() / BUCKET.as_secs_f64()).ceil() as usize;
    let timeline = (0..n)
        .map(|i| {
            let from = BUCKET * i as u32;
            let to = from + BUCKET;
            let in_bucket = |at: Duration| at >= from && at < to;
            let started: Vec<&Sample> = l.samples.iter().filter(|s| in_bucket(s.at)).collect();
            Bucket {
                t: secs(from),
                served: served_between(&l.polls, from, to),
                failed: new.iter().filter(|s| in_bucket(s.at)).count(),
                broken: l.breaks.iter().filter(|b| in_bucket(b.at)).count()
                    + broken.iter().filter(|s| in_bucket(s.end())).count(),
                p99_ms: quantile(&ok_latencies(started.into_iter()), 0.99).map(ms),
            }
        })
        .collect();
    LoadReport {
        from: l.from.clone(),
        service: l.service.clone(),
        target: l.target.to_string(),
        started: l.samples.len(),
        failed: new.len(),
        broken_in_flight: broken.len(),
        connections: l.connections,
        broken: l.breaks.len(),
        p50_ms: quantile(&lat, 0.5).map(ms),
        p99_ms: quantile(&lat, 0.99).map(ms),
        max_ms: lat.last().copied().map(ms),
        clusters,
        timeline,
        errors,
    }
}

fn fault_report(s: &StepRecord, load: Option<&LoadRecording>, until: Duration) -> FaultReport {
    let mut r = FaultReport {
        kind: s.kind.clone(),
        label: s.label.clone(),
        victim: s.victim.clone(),
        start_s: secs(s.start),
        end_s: secs(s.end),
        victim_served: false,
        stays: s.stays,
        served_elsewhere: None,
        detected_after_s: None,
        rerouted_after_s: None,
        failback_after_s: None,
        failed: 0,
        broken: 0,
        error: s.error.clone(),
    };
    let (Some(l), Some(victim)) = (load, &s.victim) else {
        return r;
    };
    let during = |at: Duration| at >= s.start && at < s.end;
    r.failed = l
        .samples
        .iter()
        .filter(|x| during(x.at) && x.result.is_err())
        .count();
    r.broken = l
        .samples
        .iter()
        .filter(|x| x.result.is_err() && in_flight(x, &s.strikes()))
        .count();
    // Detection: the victim was a candidate in rotation before the fault, and a poll
    // during it shows the source no longer offering it new connections.
    let candidate = l
        .polls
        .iter()
        .any(|p| p.at < s.start && p.clusters.get(victim).is_some_and(|c| c.0));
    r.detected_after_s = l
        .polls
        .iter()
        .filter(|_| candidate)
        .find(|p| during(p.at) && p.clusters.get(victim).is_none_or(|c| !c.0))
        .map(|p| secs(p.at - s.start));
    let baseline = served_between(&l.polls, s.start.saturating_sub(BASELINE), s.start);
    let base_share = share(&baseline, victim).unwrap_or(0.0);
    r.victim_served = base_share > 0.0;
    if !r.victim_served {
        return r;
    }
    if s.stays {
        // Its siblings should have kept every connection in the cluster.
        r.served_elsewhere = Some(
            l.samples
                .iter()
                .filter(|x| during(x.at))
                .filter(|x| {
                    x.result
                        .as_ref()
                        .is_ok_and(|c| !c.is_empty() && c != victim)
                })
                .count(),
        );
        r.detected_after_s = None;
        return r;
    }
    // Reroute: the victim's counter stops growing, and connections stop failing or
    // waiting. A connection counts as slowed when it took 4x the baseline p99 (at least
    // 100 ms).
    let polls: Vec<(usize, &RoutePoll)> = l
        .polls
        .iter()
        .enumerate()
        .filter(|(_, p)| p.at >= s.start && p.at <= s.end)
        .collect();
    let last_growth = polls
        .iter()
        .filter(|(i, _)| *i > 0 && count(&l.polls, *i, victim) > count(&l.polls, i - 1, victim))
        .map(|(_, p)| p.at)
        .max();
    let still_growing = match (last_growth, polls.last()) {
        (Some(g), Some((_, last))) => g == last.at && polls.len() > 1,
        _ => false,
    };
    let base_lat = ok_latencies(
        l.samples
            .iter()
            .filter(|x| x.at < s.start && x.at + BASELINE >= s.start),
    );
    let slow = quantile(&base_lat, 0.99)
        .map_or(Duration::from_millis(100), |p| p * 4)
        .max(Duration::from_millis(100));
    let last_bad = l
        .samples
        .iter()
        .filter(|x| {
            during(x.at)
                && (x.result.is_err()
                    || x.latency > slow
                    || x.result.as_deref() == Ok(victim.as_str()))
        })
        .map(Sample::end)
        .max();
    if !still_growing {
        let settled = last_growth
            .unwrap_or(s.start)
            .max(last_bad.unwrap_or(s.start));
        r.rerouted_after_s = Some(secs(settled.saturating_sub(s.start)));
    }
    if r.rerouted_after_s.is_none() {
        return r;
    }
    // Failback: the first poll after the end whose last second gives the victim its share.
    r.failback_after_s = l
        .polls
        .iter()
        .filter(|p| p.at >= s.end + FAILBACK_WINDOW && p.at <= until)
        .find(|p| {
            let recent = served_between(&l.polls, p.at - FAILBACK_WINDOW, p.at);
            share(&recent, victim).is_some_and(|x| x >= base_share * FAILBACK_SHARE)
        })
        .map(|p| secs(p.at - s.end));
    r
}

fn judge(
    o: &Objectives,
    rec: &Recording,
    loads: &[LoadReport],
    faults: &[FaultReport],
) -> Vec<ObjectiveResult> {
    let mut out = Vec::new();
    let mut push = |name: &str, limit: String, actual: String, passed: bool| {
        out.push(ObjectiveResult {
            name: name.to_owned(),
            limit,
            actual,
            passed,
        });
    };
    if let Some(max) = o.max_failed_connections {
        let mut failed: usize = loads.iter().map(|l| l.failed).sum();
        let started: usize = loads.iter().map(|l| l.started).sum();
        let mut actual = format!("{failed} of {started}");
        // Connections a fault broke are judged apart only when the drill says how many
        // may break; otherwise every failure counts here.
        let in_flight: usize = loads.iter().map(|l| l.broken_in_flight).sum();
        if o.max_broken_connections.is_none() && in_flight > 0 {
            failed += in_flight;
            actual = format!("{failed} of {started} ({in_flight} in flight at a fault)");
        }
        push(
            "max_failed_connections",
            max.to_string(),
            actual,
            failed <= max,
        );
    }
    if let Some(max) = o.max_broken_connections {
        let long_lived: usize = loads.iter().map(|l| l.broken).sum();
        let in_flight: usize = loads.iter().map(|l| l.broken_in_flight).sum();
        let broken = long_lived + in_flight;
        push(
            "max_broken_connections",
            max.to_string(),
            format!("{broken} ({in_flight} in flight at a fault, {long_lived} long-lived)"),
            broken <= max,
        );
    }
    if let Some(max) = o.max_served_elsewhere {
        let stayed: Vec<&FaultReport> = faults
            .iter()
            .filter(|f| f.stays && f.victim_served)
            .collect();
        let elsewhere: usize = stayed.iter().filter_map(|f| f.served_elsewhere).sum();
        push(
            "max_served_elsewhere",
            max.to_string(),
            if stayed.is_empty() {
                "no replica fault hit a cluster that carried the load".to_owned()
            } else {
                elsewhere.to_string()
            },
            !stayed.is_empty() && elsewhere <= max,
        );
    }
    let judged: Vec<&FaultReport> = faults
        .iter()
        .filter(|f| f.victim_served && !f.stays)
        .collect();
    let mut timed = |name: &str,
                     limit: Option<Duration>,
                     get: fn(&FaultReport) -> Option<f64>,
                     missing: &str| {
        let Some(limit) = limit else { return };
        if judged.is_empty() {
            push(
                name,
                format!("{:.2}s", limit.as_secs_f64()),
                "no fault hit a cluster that carried the load".to_owned(),
                false,
            );
            return;
        }
        for f in &judged {
            let (actual, passed) = match get(f) {
                Some(x) => (format!("{x:.3}s"), x <= limit.as_secs_f64()),
                None => (missing.to_owned(), false),
            };
            push(
                name,
                format!("{:.2}s", limit.as_secs_f64()),
                format!("{actual} ({})", f.label),
                passed,
            );
        }
    };
    timed(
        "max_reroute",
        o.max_reroute.map(|d| d.0),
        |f| f.rerouted_after_s,
        "traffic stayed",
    );
    timed(
        "max_failback",
        o.max_failback.map(|d| d.0),
        |f| f.failback_after_s,
        "not back by the end of the drill",
    );
    if let Some(max) = o.max_p99_connect {
        let all = ok_latencies(rec.loads.iter().flat_map(|l| l.samples.iter()));
        let p99 = quantile(&all, 0.99);
        push(
            "max_p99_connect",
            format!("{:.0}ms", ms(max.0)),
            p99.map_or("no successful connection".to_owned(), |p| {
                format!("{:.1}ms", ms(p))
            }),
            p99.is_some_and(|p| p <= max.0),
        );
    }
    out
}

/// Clusters any load's timeline mentions, sorted.
pub fn all_clusters(r: &Report) -> BTreeSet<String> {
    r.loads
        .iter()
        .flat_map(|l| l.timeline.iter().flat_map(|b| b.served.keys().cloned()))
        .collect()
}
