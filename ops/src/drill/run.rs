//! Drives a drill: checks the federation, starts the load and the route watchers, injects
//! and undoes faults on the timeline, stops early at the guard rail or on abort, and
//! confirms every fault is gone before the report is built. Progress goes to a callback
//! each second and on each injection and undo.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use strait_common::api::{Direction, Fault, FaultRequest, Peer};
use strait_common::units::HumanDuration;

use super::analysis::{self, LoadRecording, Recording, Report, RoutePoll, StepRecord};
use super::process::GatewayProcess;
use super::progress::Progress;
use super::scenario::{FROM, FaultKind, LoadEntry, PRIMARY, Scenario, Signal, Step};
use crate::client::Admin;
use crate::load::{Load, LoadSpec, Steady, SteadySpec};

/// How often the source gateways' routes are read.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// How often the guard rail is checked.
const GUARD_EVERY: Duration = Duration::from_millis(250);
/// How often progress is reported (besides on each injection and undo).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// The window whose connections say which cluster serves now.
const SERVING_WINDOW: Duration = Duration::from_secs(1);

/// One fault injection: which gateway, and what.
struct Injection {
    gateway: String,
    admin: SocketAddr,
    request: FaultRequest,
}

/// A step with its names resolved.
struct Planned {
    at: Duration,
    duration: Duration,
    record: StepRecord,
    injections: Vec<Injection>,
    /// (admin, id) of what was injected.
    injected: Vec<(SocketAddr, u64)>,
    /// A rolling restart or a signal: what it drives, and the task carrying it out (it
    /// ends when the last replica it stopped is back, from the drill's start).
    restart: Option<Cycle>,
    restarting: Option<tokio::task::JoinHandle<Result<Duration, String>>>,
    /// When the cycle stopped each replica, from the drill's start: the moments the fault
    /// struck (the checks before each stop take a while, and a connection started during
    /// them that the stop then breaks was in flight at it, not a new one that failed).
    stopped: Arc<Mutex<Vec<Duration>>>,
}

impl Planned {
    /// The moments the fault struck so far: each replica a cycle stopped, or its start.
    fn strikes(&self) -> Vec<Duration> {
        let stops = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        analysis::strikes(self.record.start, &stops)
    }
}

/// Replicas stopped in turn and waited for until their supervisor has them back: each
/// replica's admin API, which ones (indexes, in order), how they are stopped, and where
/// to watch the cluster come back (the first load's source gateway and service).
#[derive(Clone)]
struct Cycle {
    cluster: String,
    replicas: Vec<SocketAddr>,
    which: Vec<usize>,
    stop: Stop,
    /// Per replica: every other gateway of the federation (a signal must not hit a
    /// process one of them shares).
    others: Vec<Vec<SocketAddr>>,
    source: SocketAddr,
    service: String,
}

/// How a [`Cycle`] stops a replica.
#[derive(Clone, Copy)]
enum Stop {
    /// `POST /v1/drain`.
    Drain,
    /// A signal to its process.
    Signal(Signal),
}

/// Calls gateways' fault APIs with the drill's token.
struct Client {
    token: String,
}

impl Client {
    fn admin(&self, addr: SocketAddr) -> Admin {
        Admin::with_token(addr, self.token.clone())
    }
}

/// Runs a drill until its end, its guard rail, or `abort` (Ctrl-C in the CLI).
pub async fn run(scenario: Scenario, abort: impl Future<Output = ()>) -> anyhow::Result<Report> {
    run_with_progress(scenario, abort, |_| {}).await
}

/// [`run`], telling `progress` where the drill stands each second and on each injection
/// and undo, and once more when every fault is undone.
pub async fn run_with_progress(
    scenario: Scenario,
    abort: impl Future<Output = ()>,
    mut progress: impl FnMut(&Progress),
) -> anyhow::Result<Report> {
    let client = Client {
        token: scenario.token()?,
    };
    preflight(&client, &scenario).await?;
    let mut targets = Vec::new();
    for l in &scenario.load {
        targets.push(listener_of(&scenario, l).await?);
    }
    let first = &scenario.load[0];
    let primary = primary_of(&scenario, first).await?;
    let mut plan: Vec<Planned> = scenario
        .steps
        .iter()
        .map(|s| plan_step(&scenario, s, &first.from, primary.as_deref()))
        .collect::<anyhow::Result<_>>()?;

    let started_unix_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let t0 = Instant::now();
    let duration = scenario.duration.0;
    let mut loads = Vec::new();
    for (l, target) in scenario.load.iter().zip(&targets) {
        loads.push(Running::start(l, *target, duration, t0, &scenario));
    }

    // The timeline: (when, step, inject?) in time order.
    let mut actions: Vec<(Duration, usize, bool)> = plan
        .iter()
        .enumerate()
        .flat_map(|(i, p)| [(p.at, i, true), (p.at + p.duration, i, false)])
        .collect();
    actions.sort_by_key(|a| (a.0, !a.2));
    let mut next = 0;
    let mut aborted = None;
    let mut guard = tokio::time::interval(GUARD_EVERY);
    let mut report_tick = tokio::time::interval(PROGRESS_EVERY);
    report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let now = |plan: &[Planned], loads: &[Running]| progress_of(t0, duration, plan, loads);
    tokio::pin!(abort);
    let end = t0 + duration;
    loop {
        let due = actions.get(next).map_or(end, |a| t0 + a.0).min(end);
        tokio::select! {
            _ = tokio::time::sleep_until(due.into()) => {
                let Some(&(_, i, inject)) = actions.get(next) else { break };
                if t0 + actions[next].0 > end { break }
                next += 1;
                if inject {
                    inject_step(&client, &mut plan[i], t0).await;
                } else {
                    undo_step(&client, &mut plan[i], t0).await;
                }
                progress(&now(&plan, &loads));
            }
            _ = report_tick.tick() => progress(&now(&plan, &loads)),
            _ = guard.tick() => {
                if let Some(why) = guard_rail(&scenario, &plan, &loads) {
                    aborted = Some(why);
                    break;
                }
            }
            _ = &mut abort => {
                aborted = Some("interrupted by the operator".to_owned());
                break;
            }
        }
        if Instant::now() >= end && next >= actions.len() {
            break;
        }
    }
    // Whatever is still injected is undone now, aborted or not.
    for p in plan.iter_mut().filter(|p| !p.injected.is_empty()) {
        undo_step(&client, p, t0).await;
    }
    let faults_undone = confirm_undone(&client, &plan).await;
    progress(&now(&plan, &loads));
    let mut recorded = Vec::new();
    for r in loads {
        recorded.push(r.finish(aborted.is_some()).await);
    }
    let recording = Recording {
        loads: recorded,
        steps: plan.into_iter().map(|p| p.record).collect(),
        aborted,
        faults_undone,
        elapsed: t0.elapsed().min(duration + Duration::from_secs(60)),
        started_unix_ms,
    };
    Ok(analysis::analyse(&scenario, &recording))
}

/// Every gateway answers, with fault injection on and the token accepted.
async fn preflight(client: &Client, s: &Scenario) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    let each = s
        .federation
        .gateways
        .iter()
        .flat_map(|(c, a)| a.all().into_iter().map(move |a| (c, a)));
    for (cluster, admin) in each {
        match client.admin(admin).faults().await {
            Ok(Ok(_)) => {}
            Ok(Err(refused)) => problems.push(format!("{cluster} ({admin}): {refused}")),
            Err(e) => problems.push(format!("{cluster}: {e:#}")),
        }
    }
    if !problems.is_empty() {
        bail!(
            "the federation is not ready for this drill:\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// The listener address of a load's service on its source gateway.
async fn listener_of(s: &Scenario, l: &LoadEntry) -> anyhow::Result<SocketAddr> {
    let admin = s.federation.gateways[&l.from].first();
    let imports = Admin::new(admin).services().await?.imports;
    let found: Vec<_> = imports
        .iter()
        .filter(|i| i.service == l.service)
        .filter(|i| l.port.is_none_or(|p| i.port == p))
        .collect();
    let names: Vec<String> = imports
        .iter()
        .map(|i| format!("{}:{}", i.service, i.port))
        .collect();
    match found[..] {
        [one] => {
            let mut addr = one.address;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            Ok(addr)
        }
        [] => bail!(
            "{} does not import {} (its imports: {}); wait for discovery or fix load.service",
            l.from,
            l.service,
            names.join(", ")
        ),
        _ => bail!(
            "{} imports {} on several ports ({}); set load.port",
            l.from,
            l.service,
            names.join(", ")
        ),
    }
}

/// The cluster the load's service goes to first now, from its source gateway.
async fn primary_of(s: &Scenario, l: &LoadEntry) -> anyhow::Result<Option<String>> {
    let admin = s.federation.gateways[&l.from].first();
    Ok(Admin::new(admin)
        .route(&l.service)
        .await?
        .ok()
        .and_then(|route| route.primary))
}

fn plan_step(
    s: &Scenario,
    step: &Step,
    from: &str,
    primary: Option<&str>,
) -> anyhow::Result<Planned> {
    let resolve = |name: &str| -> anyhow::Result<String> {
        match name {
            PRIMARY => primary.map(str::to_owned).with_context(|| {
                format!("`{PRIMARY}`: {from} has no usable cluster for the load's service now")
            }),
            FROM => Ok(from.to_owned()),
            other => Ok(other.to_owned()),
        }
    };
    let admins = |g: &str| -> anyhow::Result<Vec<SocketAddr>> {
        s.federation
            .gateways
            .get(g)
            .map(|a| a.all())
            .with_context(|| {
                format!("`{g}` (resolved from a placeholder) is not in federation.gateways")
            })
    };
    let duration = HumanDuration(step.duration.0);
    // A fault on a cluster hits every replica of it.
    let one = |gateway: &str, fault: Fault| -> anyhow::Result<Vec<Injection>> {
        Ok(admins(gateway)?
            .into_iter()
            .map(|admin| Injection {
                gateway: gateway.to_owned(),
                admin,
                request: FaultRequest {
                    fault: fault.clone(),
                    duration,
                },
            })
            .collect())
    };
    let peer = step.peer.as_deref().map(resolve).transpose()?;
    let direction = step.direction.unwrap_or_default();
    let mut restart = None;
    let (label, victim, injections) = if step.fault == FaultKind::Partition {
        let sides = step.between.as_deref().unwrap_or_default();
        let (a, b) = (resolve(&sides[0])?, resolve(&sides[1])?);
        // The side that is not the source; with the source on neither side, no victim.
        let victim = if a == from {
            Some(b.clone())
        } else if b == from {
            Some(a.clone())
        } else {
            None
        };
        let cut = |p: &str| Fault::Blackhole {
            peer: Some(p.to_owned()),
            direction: Direction::Both,
        };
        let mut both = one(&a, cut(&b))?;
        both.extend(one(&b, cut(&a))?);
        (format!("partition {a} | {b}"), victim, both)
    } else if step.fault.stays() {
        let on = resolve(step.on.as_deref().unwrap_or(FROM))?;
        let all = admins(&on)?;
        if step.fault == FaultKind::KillReplica {
            let n = step.replica.unwrap_or(1);
            let admin = *all
                .get(n - 1)
                .with_context(|| format!("{on} has no replica {n}"))?;
            let injection = Injection {
                gateway: on.clone(),
                admin,
                request: FaultRequest {
                    fault: Fault::KillTunnel,
                    duration,
                },
            };
            (format!("kill-replica {on}/{n}"), Some(on), vec![injection])
        } else {
            // Carried out by the runner (stop, wait for the restart), not injected.
            let (label, which, stop) = if step.fault == FaultKind::Signal {
                let n = step.replica.unwrap_or(1);
                anyhow::ensure!(n >= 1 && n <= all.len(), "{on} has no replica {n}");
                let signal = step.signal.unwrap_or_default();
                let name = serde_json::to_value(signal)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                (
                    format!("{name} {on}/{n}"),
                    vec![n - 1],
                    Stop::Signal(signal),
                )
            } else {
                (
                    format!("rolling-restart {on}"),
                    (0..all.len()).collect(),
                    Stop::Drain,
                )
            };
            let everyone: Vec<SocketAddr> = s
                .federation
                .gateways
                .values()
                .flat_map(|a| a.all())
                .collect();
            let others = all
                .iter()
                .map(|me| everyone.iter().filter(|a| *a != me).copied().collect())
                .collect();
            restart = Some(Cycle {
                cluster: on.clone(),
                others,
                replicas: all,
                which,
                stop,
                source: s.federation.gateways[from].first(),
                service: s.load[0].service.clone(),
            });
            (label, Some(on), Vec::new())
        }
    } else {
        let on = resolve(step.on.as_deref().unwrap_or(FROM))?;
        let fault = match step.fault {
            FaultKind::KillTunnel => Fault::KillTunnel,
            FaultKind::Blackhole => Fault::Blackhole {
                peer: peer.clone(),
                direction,
            },
            FaultKind::Delay => Fault::Delay {
                peer: peer.clone(),
                latency: step.latency.unwrap_or(HumanDuration(Duration::ZERO)),
            },
            FaultKind::Loss => Fault::Loss {
                peer: peer.clone(),
                fraction: step.fraction.unwrap_or(0.0),
                direction,
            },
            FaultKind::Drain => Fault::Drain,
            FaultKind::Unready => Fault::Unready {
                service: step
                    .service
                    .clone()
                    .unwrap_or_else(|| s.load[0].service.clone()),
            },
            FaultKind::CutDiscovery => Fault::CutDiscovery,
            FaultKind::Partition
            | FaultKind::KillReplica
            | FaultKind::RollingRestart
            | FaultKind::Signal => {
                unreachable!("handled above")
            }
        };
        // The source gateway itself is no cluster its traffic can move away from.
        let victim = match &peer {
            Some(p) if on == from => Some(p.clone()),
            _ => (on != from).then(|| on.clone()),
        };
        (label(&fault, &on), victim, one(&on, fault)?)
    };
    Ok(Planned {
        at: step.at.0,
        duration: step.duration.0,
        record: StepRecord {
            kind: serde_json::to_value(step.fault)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            label,
            victim,
            // A cluster's only gateway signalled: its traffic must move, as in a kill.
            stays: step.fault.stays() && restart.as_ref().is_none_or(|c| c.replicas.len() > 1),
            start: step.at.0,
            stops: Vec::new(),
            end: step.at.0 + step.duration.0,
            error: None,
        },
        injections,
        injected: Vec::new(),
        restart,
        restarting: None,
        stopped: Arc::default(),
    })
}

/// What a fault does, for people.
fn label(f: &Fault, on: &str) -> String {
    let to = |p: &Option<String>, d: Direction| match (p, d) {
        (None, Direction::Both) => String::new(),
        (None, d) => format!(" ({d:?})").to_lowercase(),
        (Some(p), Direction::Both) => format!(" <-> {p}"),
        (Some(p), Direction::To) => format!(" -> {p}"),
        (Some(p), Direction::From) => format!(" <- {p}"),
    };
    match f {
        Fault::KillTunnel => format!("kill-tunnel {on}"),
        Fault::Blackhole { peer, direction } => format!("blackhole {on}{}", to(peer, *direction)),
        Fault::Delay { peer, latency } => match peer {
            Some(_) => format!("delay {latency} {on}{}", to(peer, Direction::To)),
            None => format!("delay {latency} {on}"),
        },
        Fault::Loss {
            peer,
            fraction,
            direction,
        } => format!("loss {:.0}% {on}{}", fraction * 100.0, to(peer, *direction)),
        Fault::Drain => format!("drain {on}"),
        Fault::Unready { service } => format!("unready {service} on {on}"),
        Fault::CutDiscovery => format!("cut-discovery {on}"),
    }
}

async fn inject_step(client: &Client, p: &mut Planned, t0: Instant) {
    p.record.start = t0.elapsed();
    if let Some(r) = p.restart.clone() {
        let token = client.token.clone();
        p.restarting = Some(tokio::spawn(cycle(r, token, t0, p.stopped.clone())));
        return;
    }
    // Every gateway at once; the fault counts from when it is in force on all of them
    // (a connection started while it was half applied was in flight at it).
    let mut calls = tokio::task::JoinSet::new();
    for inj in &p.injections {
        let (admin, request, gateway) = (
            client.admin(inj.admin),
            inj.request.clone(),
            inj.gateway.clone(),
        );
        let at = inj.admin;
        calls.spawn(async move { (at, gateway, admin.inject(&request).await) });
    }
    let mut errors = Vec::new();
    while let Some(done) = calls.join_next().await {
        match done {
            Ok((at, _, Ok(Ok(active)))) => p.injected.push((at, active.id)),
            Ok((_, gateway, Ok(Err(refused)))) => errors.push(format!("{gateway}: {refused}")),
            Ok((_, gateway, Err(e))) => errors.push(format!("{gateway}: {e:#}")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    p.record.start = t0.elapsed();
    if !errors.is_empty() {
        tracing::error!(step = %p.record.label, errors = ?errors, "fault not injected");
        p.record.error = Some(errors.join("; "));
    }
}

async fn undo_step(client: &Client, p: &mut Planned, t0: Instant) {
    if let Some(task) = p.restarting.take() {
        // Its time is up: a restart still under way is stopped (the replica being
        // drained still finishes its drain and restarts).
        if !task.is_finished() {
            task.abort();
        }
        match task.await {
            Ok(Ok(done)) => p.record.end = done,
            Ok(Err(e)) => {
                p.record.error = Some(e);
                p.record.end = t0.elapsed();
            }
            Err(_) => {
                p.record.error = Some(format!(
                    "not every replica was back within the step's {:?}",
                    p.duration
                ));
                p.record.end = t0.elapsed();
            }
        }
        // The fault struck when the cycle stopped replicas (none stopped: at its start).
        let stops = p.stopped.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(&first) = stops.first() {
            p.record.start = first;
        }
        p.record.stops = stops;
        return;
    }
    if p.injected.is_empty() {
        return;
    }
    // The fault ends as its undo begins: a connection started while it was being lifted
    // (the revived gateways' reconnects briefly load the host) is not one it slowed.
    p.record.end = t0.elapsed();
    let mut left = Vec::new();
    for (admin, id) in p.injected.drain(..) {
        // 404: the gateway already ended it on its own timer.
        match client.admin(admin).undo(id).await {
            Ok(reply) if undone(&reply) => {}
            other => {
                tracing::warn!(%admin, id, result = ?other, "undo failed; will retry");
                left.push((admin, id));
            }
        }
    }
    p.injected = left;
}

/// How long a cycle waits for one replica to stop, restart and be back.
const REPLICA_BACK_WITHIN: Duration = Duration::from_secs(60);

/// How long the source's new tunnel to a restarted replica must stay up and answering
/// before the replica counts as back: longer than the probes take to find a dead one with
/// the default tunnel timings (`unresponsive_after` 500 ms, `keep_alive` 100 ms, about
/// 550 ms); a source with a much longer `unresponsive_after` needs more.
const TUNNEL_SETTLED: Duration = Duration::from_secs(1);

/// Stops each replica of `r` in turn and waits until it is back: a new instance answers
/// ready (its supervisor started it again), the source gateway has a fresh tunnel to it,
/// and the source sends it new connections; a replica stops only while all its siblings
/// are in the source's rotation. When the last one is back, from the drill's start.
async fn cycle(
    r: Cycle,
    token: String,
    t0: Instant,
    stops: Arc<Mutex<Vec<Duration>>>,
) -> Result<Duration, String> {
    // Just before each stop: a connection started earlier and broken by it was in flight.
    let note_stop = || {
        stops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(t0.elapsed());
    };
    for &k in &r.which {
        all_in_rotation(&r).await?;
        let admin = r.replicas[k];
        let name = format!("{}/{}", r.cluster, k + 1);
        let (_, was) = Admin::new(admin)
            .ready()
            .await
            .map_err(|e| format!("{name}: {e:#}"))?;
        let replica = was.replica.clone().unwrap_or_default();
        let tunnel = source_tunnel(&r, &replica).await;
        let stopped = tokio::time::Instant::now();
        let hint = match r.stop {
            Stop::Drain => {
                note_stop();
                match Admin::with_token(admin, token.clone()).drain().await {
                    Ok(Ok(_)) => {}
                    Ok(Err(refused)) => return Err(format!("{name}: {refused}")),
                    Err(e) => return Err(format!("{name}: {e:#}")),
                }
                "is something restarting it, like `strait demo`?"
            }
            Stop::Signal(signal) => {
                let process = GatewayProcess::find(admin, was.pid, &r.others[k])
                    .await
                    .map_err(|e| format!("{name}: {e}"))?;
                note_stop();
                process
                    .signal(signal)
                    .map_err(|e| format!("{name} (pid {}): {e}", process.pid()))?;
                "is something restarting it, like `strait demo --processes`?"
            }
        };
        let deadline = stopped + REPLICA_BACK_WITHIN;
        // A new instance answers ready (a draining one says 503 until it exits).
        loop {
            match Admin::new(admin).ready().await {
                Ok((200, now)) if now.instance != was.instance => break,
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "{name} was not started again within {REPLICA_BACK_WITHIN:?} ({hint})"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The source's tunnel to it is a new one, and it lives: after a SIGKILL the
        // connection to the old process may look alive for a moment, and during a drain the
        // source may reconnect to the old process just before it exits. A connection to a
        // dead process stops answering probes within `tunnel.unresponsive_after`, so the
        // same connection must stay up and answering for `TUNNEL_SETTLED`.
        let mut settled: Option<(u64, tokio::time::Instant)> = None;
        loop {
            match source_tunnel(&r, &replica).await {
                Some(now)
                    if now.in_rotation()
                        && (tunnel.as_ref().is_none_or(|t| t.connects != now.connects)
                            || now.since_seconds < stopped.elapsed().as_secs_f64()) =>
                {
                    match settled {
                        Some((connects, since)) if connects == now.connects => {
                            if since.elapsed() >= TUNNEL_SETTLED {
                                break;
                            }
                        }
                        _ => settled = Some((now.connects, tokio::time::Instant::now())),
                    }
                }
                _ => settled = None,
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the source did not connect to {name}'s new instance within {REPLICA_BACK_WITHIN:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    all_in_rotation(&r).await?;
    Ok(t0.elapsed())
}

/// The source gateway's tunnel to `replica` of the cluster (`""`: its only gateway), as
/// its `/v1/peers` shows it; `None` when it has none or cannot be read.
async fn source_tunnel(r: &Cycle, replica: &str) -> Option<Peer> {
    Admin::new(r.source)
        .peers()
        .await
        .ok()?
        .into_iter()
        .find(|p| p.cluster == r.cluster && p.replica == replica)
}

/// Waits until the source gateway sends new connections to every replica of the cluster.
async fn all_in_rotation(r: &Cycle) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + REPLICA_BACK_WITHIN;
    loop {
        if let Ok(Ok(route)) = Admin::new(r.source).route(&r.service).await
            && route
                .clusters
                .iter()
                .any(|c| c.cluster == r.cluster && c.routable_replicas >= r.replicas.len())
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "{}'s replicas were not all in the source's rotation within {REPLICA_BACK_WITHIN:?}",
                r.cluster
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether an undo left the fault gone: undone now, or (404) already ended on the
/// gateway's own timer.
fn undone<T>(reply: &crate::client::Reply<T>) -> bool {
    match reply {
        Ok(_) => true,
        Err(refused) => refused.code == 404,
    }
}

/// Asks every gateway the drill touched whether any fault matching one of its injections
/// is still active (including ones whose POST failed or timed out after the gateway had
/// taken it), undoes those, and says whether all are gone.
async fn confirm_undone(client: &Client, plan: &[Planned]) -> bool {
    let mut all = plan.iter().all(|p| p.injected.is_empty());
    for p in plan {
        for inj in &p.injections {
            let admin = client.admin(inj.admin);
            let Ok(Ok(active)) = admin.faults().await else {
                all = false;
                continue;
            };
            // Only faults this drill asked for are removed; others' are left alone.
            let ours = active.iter().filter(|f| f.fault == inj.request.fault);
            for f in ours {
                all &= admin.undo(f.id).await.is_ok_and(|r| undone(&r));
            }
        }
    }
    all
}

/// One load while it runs.
struct Running {
    entry: LoadEntry,
    target: SocketAddr,
    load: Option<Load>,
    steady: Option<Steady>,
    polls: Arc<Mutex<Vec<RoutePoll>>>,
    poller: tokio::task::JoinHandle<()>,
    /// Load clocks start a moment after the drill's; samples are shifted onto its clock.
    offset: Duration,
}

impl Running {
    fn start(
        l: &LoadEntry,
        target: SocketAddr,
        duration: Duration,
        t0: Instant,
        s: &Scenario,
    ) -> Running {
        let offset = t0.elapsed();
        let load = (l.rate > 0.0).then(|| {
            Load::start(LoadSpec {
                target,
                rate: l.rate,
                duration: duration.saturating_sub(offset),
                timeout: l.timeout.0,
            })
        });
        let steady = (l.connections > 0).then(|| {
            Steady::start(SteadySpec {
                target,
                connections: l.connections,
                duration: duration.saturating_sub(offset),
                timeout: l.timeout.0,
            })
        });
        let polls = Arc::new(Mutex::new(Vec::new()));
        let poller = tokio::spawn(poll_routes(
            s.federation.gateways[&l.from].first(),
            l.service.clone(),
            polls.clone(),
            t0,
        ));
        Running {
            entry: l.clone(),
            target,
            load,
            steady,
            polls,
            poller,
            offset,
        }
    }

    /// Long-lived connection breaks so far; `None` when this load keeps none open.
    fn breaks(&self) -> Option<usize> {
        self.steady.as_ref().map(|s| s.breaks().len())
    }

    /// Connections each cluster took from `from` on (the source gateway's counters).
    fn served_since(&self, from: Duration, now: Duration) -> BTreeMap<String, u64> {
        let polls = self.polls.lock().unwrap_or_else(|p| p.into_inner());
        analysis::served_between(&polls, from, now)
    }

    /// Connections finished so far, and those of the last second. `fault_starts` (from
    /// the drill's start) tell the connections a fault broke from new ones that failed.
    fn failures(&self, fault_starts: &[Duration]) -> Failures {
        let Some(load) = &self.load else {
            return Failures::default();
        };
        let now = load.elapsed();
        let samples = load.samples();
        // Samples are timed from the load's start.
        let starts: Vec<Duration> = fault_starts
            .iter()
            .map(|f| f.saturating_sub(self.offset))
            .collect();
        let failed: Vec<_> = samples.iter().filter(|s| s.result.is_err()).collect();
        let broken = failed
            .iter()
            .filter(|s| analysis::in_flight(s, &starts))
            .count();
        let recent = |s: &crate::load::Sample| s.end() + Duration::from_secs(1) >= now;
        Failures {
            done: samples.len(),
            failed: failed.len() - broken,
            broken,
            recent: samples.iter().filter(|s| recent(s)).count(),
            recent_failed: failed.iter().filter(|s| recent(s)).count(),
        }
    }

    async fn finish(self, aborted: bool) -> LoadRecording {
        let shift = |d: Duration| d + self.offset;
        let mut samples = match self.load {
            // An aborted drill keeps what finished and drops the rest (the task stops).
            Some(l) if aborted => {
                let mut v = l.samples();
                v.sort_by_key(|s| s.at);
                v
            }
            Some(l) => l.finish().await,
            None => Vec::new(),
        };
        for s in &mut samples {
            s.at = shift(s.at);
        }
        let mut breaks = match self.steady {
            Some(st) if aborted => st.breaks(),
            Some(st) => st.finish().await,
            None => Vec::new(),
        };
        for b in &mut breaks {
            b.at = shift(b.at);
        }
        self.poller.abort();
        let polls = self.polls.lock().unwrap_or_else(|p| p.into_inner()).clone();
        LoadRecording {
            from: self.entry.from,
            service: self.entry.service,
            target: self.target,
            connections: self.entry.connections,
            samples,
            breaks,
            polls,
        }
    }
}

/// Reads the source gateway's route for the service every [`POLL_EVERY`].
async fn poll_routes(
    admin: SocketAddr,
    service: String,
    polls: Arc<Mutex<Vec<RoutePoll>>>,
    t0: Instant,
) {
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let admin = Admin::new(admin);
    loop {
        tick.tick().await;
        let at = t0.elapsed();
        let Ok(Ok(route)) = admin.route(&service).await else {
            continue;
        };
        let clusters = route
            .clusters
            .into_iter()
            .map(|c| (c.cluster, (c.eligible, c.reason, c.served)))
            .collect();
        polls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(RoutePoll { at, clusters });
    }
}

/// New connections of one load: finished, failed and broken by a fault (see
/// [`analysis::in_flight`]), and the last second's finished and failed of either kind.
#[derive(Debug, Default)]
struct Failures {
    done: usize,
    failed: usize,
    broken: usize,
    recent: usize,
    recent_failed: usize,
}

/// When each fault began, from the drill's start: a step injected so far has its actual
/// start, one not injected yet its planned one, which no finished connection straddles.
fn fault_starts(plan: &[Planned]) -> Vec<Duration> {
    plan.iter().flat_map(Planned::strikes).collect()
}

/// Where the drill stands: counts over every load, the faults in force.
fn progress_of(t0: Instant, total: Duration, plan: &[Planned], loads: &[Running]) -> Progress {
    let elapsed = t0.elapsed();
    let mut p = Progress {
        elapsed,
        total,
        faults: plan
            .iter()
            .filter(|s| {
                !s.injected.is_empty() || s.restarting.as_ref().is_some_and(|t| !t.is_finished())
            })
            .map(|s| s.record.label.clone())
            .collect(),
        ..Progress::default()
    };
    let starts = fault_starts(plan);
    for l in loads {
        let f = l.failures(&starts);
        p.connections += f.done;
        p.failed += f.failed;
        p.broken += f.broken;
        if let Some(b) = l.breaks() {
            *p.breaks.get_or_insert(0) += b;
        }
        for (c, n) in l.served_since(elapsed.saturating_sub(SERVING_WINDOW), elapsed) {
            *p.served.entry(c).or_default() += n;
        }
    }
    p
}

/// Why the guard rail stops the drill now, if it does. It counts every failed connection,
/// broken ones included: it is there to protect the federation, not to judge it.
fn guard_rail(s: &Scenario, plan: &[Planned], loads: &[Running]) -> Option<String> {
    let (mut failed, mut recent_failed, mut recent) = (0, 0, 0);
    let starts = fault_starts(plan);
    for l in loads {
        let f = l.failures(&starts);
        failed += f.failed + f.broken;
        recent_failed += f.recent_failed;
        recent += f.recent;
    }
    if let Some(max) = s.stop_if.failed_connections
        && failed >= max
    {
        return Some(format!(
            "guard rail: {failed} failed connections (stop_if.failed_connections {max})"
        ));
    }
    if let Some(max) = s.stop_if.failed_ratio
        && recent >= 10
        && recent_failed as f64 / recent as f64 > max
    {
        return Some(format!(
            "guard rail: {recent_failed} of the last second's {recent} connections failed (stop_if.failed_ratio {max})"
        ));
    }
    None
}

/// Writes the report as JSON and as HTML beside it; the two paths.
pub fn write_report(report: &Report, json_path: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(json_path, json)
        .with_context(|| format!("writing the report {}", json_path.display()))?;
    let html_path = json_path.with_extension("html");
    std::fs::write(&html_path, super::render::html(report))
        .with_context(|| format!("writing {}", html_path.display()))?;
    Ok((json_path.to_owned(), html_path))
}
