//! Drill scenario files: the federation to drive, the load, the faults on a timeline and
//! the objectives, parsed and checked with file/field/fix errors.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strait_common::config::{ConfigErrors, Validator, into_errors, parse_yaml};
use strait_common::units::HumanDuration;

use strait_common::api::Direction;

/// Placeholder for the cluster the (first) load's service goes to first when the drill
/// starts.
pub const PRIMARY: &str = "$primary";
/// Placeholder for the (first) load's source gateway.
pub const FROM: &str = "$from";

/// Most loads one scenario runs.
const MAX_LOADS: usize = 4;

/// One drill.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name (used in report file names).
    pub name: String,
    /// What the drill shows, for people.
    #[serde(default)]
    pub description: String,
    /// The gateways and how to reach their admin APIs.
    pub federation: Federation,
    /// Traffic generated while the faults play out.
    pub load: Vec<LoadEntry>,
    /// How long the drill runs (load included).
    pub duration: HumanDuration,
    /// Faults on the timeline.
    pub steps: Vec<Step>,
    /// What the drill must show to pass.
    #[serde(default)]
    pub objectives: Objectives,
    /// Guard rail: the drill stops early (faults undone) when it is crossed.
    #[serde(default)]
    pub stop_if: StopIf,
}

/// The target federation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Federation {
    /// Cluster id → admin API address of its gateway, or of each of its replicas.
    pub gateways: BTreeMap<String, Admins>,
    /// File with the admin token (the gateways' `faults.token_file`); relative to the
    /// scenario file.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the admin token instead.
    #[serde(default)]
    pub token_env: Option<String>,
}

/// The admin API of a cluster's gateway, or of each of its replicas (a list).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Admins {
    /// A cluster's only gateway.
    One(SocketAddr),
    /// Its replicas, in order (`replica: 1` is the first).
    Replicas(Vec<SocketAddr>),
}

impl Admins {
    /// Every gateway's admin API.
    pub fn all(&self) -> Vec<SocketAddr> {
        match self {
            Admins::One(a) => vec![*a],
            Admins::Replicas(v) => v.clone(),
        }
    }

    /// The first gateway's (loads are driven and routes read there).
    pub fn first(&self) -> SocketAddr {
        self.all()[0]
    }
}

/// One stream of load.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoadEntry {
    /// Gateway (cluster id) whose listener for the service is driven.
    pub from: String,
    /// Imported service, `namespace/name`.
    pub service: String,
    /// Service port, when the service has several.
    #[serde(default)]
    pub port: Option<u16>,
    /// New connections per second (one HTTP request each).
    #[serde(default)]
    pub rate: f64,
    /// Long-lived connections kept open, each echoing a ping every 100 ms (needs an echo
    /// service, like the demo's `demo/echo`).
    #[serde(default)]
    pub connections: usize,
    /// Longest a new connection may take before it counts as failed.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

/// Fault kinds a step can inject.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// The tunnel of `on` stops as in a crash.
    KillTunnel,
    /// Packets of `on` to/from `peer` (or everyone) vanish.
    Blackhole,
    /// `between` two gateways nothing passes, both ways.
    Partition,
    /// `on` sends to `peer` (or everyone) `latency` late.
    Delay,
    /// `on` loses `fraction` of packets to/from `peer` (or everyone).
    Loss,
    /// `on` reports every export unready.
    Drain,
    /// `on` reports `service` unready.
    Unready,
    /// `on` stops gossiping.
    CutDiscovery,
    /// One replica of `on` (`replica`, from 1) stops as in a crash; its siblings should
    /// keep the cluster's traffic.
    KillReplica,
    /// Every replica of `on` in turn drains and is restarted by its supervisor (the demo
    /// does it); the next goes once the previous one is back in the source's rotation.
    RollingRestart,
    /// One replica's process (`replica`, from 1) gets a real `signal` (SIGKILL by default,
    /// or SIGTERM: a drain); its supervisor starts it again (`strait demo --processes`
    /// does). The gateway must run on the drill's host, in a process of its own.
    Signal,
}

impl FaultKind {
    /// Faults a cluster with replicas rides out: its traffic should stay. (A signal to a
    /// cluster's only gateway is the exception, settled when the drill plans the step.)
    pub fn stays(self) -> bool {
        matches!(
            self,
            FaultKind::KillReplica | FaultKind::RollingRestart | FaultKind::Signal
        )
    }
}

/// A signal a `signal` fault sends.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum Signal {
    /// Killed outright: no drain, no goodbye to anyone.
    #[default]
    #[serde(rename = "SIGKILL")]
    Kill,
    /// Asked to stop: the gateway drains first.
    #[serde(rename = "SIGTERM")]
    Term,
}

impl Signal {
    /// The signal's number.
    pub fn number(self) -> i32 {
        match self {
            Signal::Kill => 9,
            Signal::Term => 15,
        }
    }
}

/// One fault on the timeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// When it starts, from the start of the drill.
    pub at: HumanDuration,
    /// How long it lasts.
    pub duration: HumanDuration,
    /// What it breaks.
    pub fault: FaultKind,
    /// The gateway that injects it (`$primary`, `$from` or a cluster id).
    #[serde(default)]
    pub on: Option<String>,
    /// The peer a packet fault is limited to.
    #[serde(default)]
    pub peer: Option<String>,
    /// The two gateways of a partition.
    #[serde(default)]
    pub between: Option<Vec<String>>,
    /// Which way packets are lost (blackhole, loss).
    #[serde(default)]
    pub direction: Option<Direction>,
    /// Added one-way delay (delay).
    #[serde(default)]
    pub latency: Option<HumanDuration>,
    /// Share of packets lost (loss).
    #[serde(default)]
    pub fraction: Option<f64>,
    /// Which replica of `on`, from 1 (kill-replica, signal).
    #[serde(default)]
    pub replica: Option<usize>,
    /// What a `signal` fault sends: `SIGKILL` (default) or `SIGTERM`.
    #[serde(default)]
    pub signal: Option<Signal>,
    /// `namespace/name` made unready (unready; default: the first load's service).
    #[serde(default)]
    pub service: Option<String>,
}

/// Pass/fail limits; absent ones are not judged.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Objectives {
    /// Most new connections that may fail over the whole drill (connections in flight when
    /// a fault began are not new: they count as broken).
    #[serde(default)]
    pub max_failed_connections: Option<usize>,
    /// Most connections open when a fault hit that may break: long-lived ones, and
    /// requests in flight when a fault began.
    #[serde(default)]
    pub max_broken_connections: Option<usize>,
    /// Most connections another cluster may answer during a fault the hit cluster's
    /// replicas ride out (kill-replica, rolling-restart).
    #[serde(default)]
    pub max_served_elsewhere: Option<usize>,
    /// Longest time from a fault's start until no new connection goes to (or fails at)
    /// the cluster it hit.
    #[serde(default)]
    pub max_reroute: Option<HumanDuration>,
    /// Longest time from a fault's end until the cluster it hit has its share back.
    #[serde(default)]
    pub max_failback: Option<HumanDuration>,
    /// Highest p99 time to a new connection's answer over the drill.
    #[serde(default)]
    pub max_p99_connect: Option<HumanDuration>,
}

/// Guard rail.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StopIf {
    /// Stop once this many new connections have failed.
    #[serde(default)]
    pub failed_connections: Option<usize>,
    /// Stop once more than this share of the last second's new connections failed.
    #[serde(default)]
    pub failed_ratio: Option<f64>,
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![strait_common::config::ConfigError {
                file: path.to_owned(),
                field: String::new(),
                problem: format!("cannot read the file: {e}"),
                fix: "check the path (the library is in deploy/drills/)".to_owned(),
            }])
        })?;
        let mut s = Scenario::parse(path, &text)?;
        if let (Some(dir), Some(t)) = (path.parent(), &mut s.federation.token_file)
            && t.is_relative()
        {
            *t = dir.join(&*t);
        }
        Ok(s)
    }

    /// Parses and checks scenario text; `file` names it in errors.
    pub fn parse(file: &Path, text: &str) -> Result<Scenario, ConfigErrors> {
        let s: Scenario = parse_yaml(file, text)?;
        into_errors(file, s.validate())?;
        Ok(s)
    }

    fn validate(&self) -> Vec<(String, String, String)> {
        let mut v = Validator::default();
        if self.name.trim().is_empty() {
            v.push(
                "name",
                "is empty",
                "name the drill, e.g. `region-blackhole`",
            );
        }
        let f = &self.federation;
        if f.gateways.is_empty() {
            v.push(
                "federation.gateways",
                "is empty",
                "list each gateway as `<cluster>: <admin address>`",
            );
        }
        for (c, admins) in &f.gateways {
            v.label(&format!("federation.gateways.{c}"), c);
            if admins.all().is_empty() {
                v.push(
                    &format!("federation.gateways.{c}"),
                    "lists no admin address",
                    "give one address, or one per replica: `[127.0.0.1:7411, 127.0.0.1:7415]`",
                );
            }
        }
        if f.token_file.is_some() == f.token_env.is_some() {
            v.push(
                "federation.token_file",
                "exactly one of token_file and token_env must be set",
                "point token_file at the gateways' faults.token_file (or name an environment variable in token_env)",
            );
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.duration.0) {
            v.push("duration", "is outside 1s..1h", "give e.g. `30s`");
        }
        self.validate_load(&mut v);
        for (i, step) in self.steps.iter().enumerate() {
            self.validate_step(&mut v, &format!("steps[{i}]"), step);
        }
        if let Some(r) = self.stop_if.failed_ratio
            && !(r > 0.0 && r <= 1.0)
        {
            v.push(
                "stop_if.failed_ratio",
                format!("{r} is not above 0 and at most 1"),
                "give e.g. `0.2` to stop when a fifth of a second's connections fail",
            );
        }
        v.problems
    }

    fn validate_load(&self, v: &mut Validator) {
        if self.load.is_empty() || self.load.len() > MAX_LOADS {
            v.push(
                "load",
                format!("has {} entries", self.load.len()),
                format!("give 1 to {MAX_LOADS} loads (from, service, rate and/or connections)"),
            );
        }
        let mut total = 0.0;
        for (i, l) in self.load.iter().enumerate() {
            let at = format!("load[{i}]");
            self.gateway(v, &format!("{at}.from"), &l.from, false);
            if l.service
                .split_once('/')
                .is_none_or(|(n, s)| n.is_empty() || s.is_empty())
            {
                v.push(
                    &format!("{at}.service"),
                    format!("`{}` is not `namespace/name`", l.service),
                    "name an imported service, e.g. `demo/hello`",
                );
            }
            if !(l.rate >= 0.0 && l.rate <= 20_000.0) {
                v.push(
                    &format!("{at}.rate"),
                    format!("{} is outside 0..20000", l.rate),
                    "give new connections per second, e.g. `200`",
                );
            }
            if l.connections > 1000 {
                v.push(
                    &format!("{at}.connections"),
                    format!("{} is above 1000", l.connections),
                    "keep long-lived connections at 1000 or fewer",
                );
            }
            if l.rate == 0.0 && l.connections == 0 {
                v.push(
                    &at,
                    "generates nothing",
                    "set `rate` (new connections per second) and/or `connections` (long-lived)",
                );
            }
            if l.timeout.0.is_zero() {
                v.push(&format!("{at}.timeout"), "is zero", "give e.g. `5s`");
            }
            total += l.rate * self.duration.0.as_secs_f64();
        }
        if total > crate::load::MAX_CONNECTIONS as f64 {
            v.push(
                "load",
                format!("would open {total:.0} connections"),
                format!(
                    "keep rate × duration under {}",
                    crate::load::MAX_CONNECTIONS
                ),
            );
        }
    }

    /// Checks that `name` is a gateway of the federation (or a placeholder, if allowed).
    fn gateway(&self, v: &mut Validator, at: &str, name: &str, placeholders: bool) {
        if placeholders && (name == PRIMARY || name == FROM) {
            return;
        }
        if !self.federation.gateways.contains_key(name) {
            let mut known: Vec<&str> = self
                .federation
                .gateways
                .keys()
                .map(String::as_str)
                .collect();
            if placeholders {
                known.extend([PRIMARY, FROM]);
            }
            v.push(
                at,
                format!("`{name}` is not in federation.gateways"),
                format!("use one of: {}", known.join(", ")),
            );
        }
    }

    fn validate_step(&self, v: &mut Validator, at: &str, s: &Step) {
        let field = |f: &str| format!("{at}.{f}");
        if s.at.0 < Duration::from_secs(1) {
            v.push(
                &field("at"),
                format!("{} is before 1s", s.at),
                "start faults at 1s or later, so the drill has a baseline to compare with",
            );
        }
        if s.duration.0.is_zero() {
            v.push(&field("duration"), "is zero", "give e.g. `5s`");
        }
        if s.at.0.saturating_add(s.duration.0) > self.duration.0 {
            v.push(
                &field("duration"),
                format!(
                    "ends at {} after the drill's {}",
                    HumanDuration(s.at.0.saturating_add(s.duration.0)),
                    self.duration
                ),
                "end every fault before the drill does (raise `duration` or shorten the step)",
            );
        }
        use FaultKind as K;
        let partition = s.fault == K::Partition;
        match (&s.on, partition) {
            (None, false) => v.push(
                &field("on"),
                "is missing",
                "name the gateway that injects the fault (a cluster id, `$primary` or `$from`)",
            ),
            (Some(on), false) => self.gateway(v, &field("on"), on, true),
            (Some(_), true) => v.push(
                &field("on"),
                "does not apply to a partition",
                "name both sides in `between` instead",
            ),
            (None, true) => {}
        }
        match (&s.between, partition) {
            (Some(b), true) => {
                if b.len() != 2 || b[0] == b[1] {
                    v.push(
                        &field("between"),
                        "must name two different gateways",
                        "e.g. `between: [$from, $primary]`",
                    );
                }
                for (j, g) in b.iter().enumerate() {
                    self.gateway(v, &format!("{at}.between[{j}]"), g, true);
                }
            }
            (None, true) => v.push(
                &field("between"),
                "is missing",
                "name the two sides, e.g. `between: [$from, $primary]`",
            ),
            (Some(_), false) => v.push(
                &field("between"),
                "only applies to a partition",
                "remove it (use `on` and `peer`)",
            ),
            (None, false) => {}
        }
        if let Some(p) = &s.peer {
            self.gateway(v, &field("peer"), p, true);
        }
        let allowed: &[&str] = match s.fault {
            K::KillTunnel | K::Drain | K::CutDiscovery | K::Partition | K::RollingRestart => &[],
            K::KillReplica => &["replica"],
            K::Signal => &["replica", "signal"],
            K::Blackhole => &["peer", "direction"],
            K::Delay => &["peer", "latency"],
            K::Loss => &["peer", "direction", "fraction"],
            K::Unready => &["service"],
        };
        let given = [
            ("peer", s.peer.is_some()),
            ("direction", s.direction.is_some()),
            ("latency", s.latency.is_some()),
            ("fraction", s.fraction.is_some()),
            ("service", s.service.is_some()),
            ("replica", s.replica.is_some()),
            ("signal", s.signal.is_some()),
        ];
        for (name, set) in given {
            if set && !allowed.contains(&name) {
                v.push(
                    &field(name),
                    format!("does not apply to {:?}", s.fault),
                    "remove it (docs/DRILLS.md lists each fault's fields)",
                );
            }
        }
        if s.fault == K::Delay && s.latency.is_none() {
            v.push(
                &field("latency"),
                "is missing",
                "give the added delay, e.g. `200ms`",
            );
        }
        if s.fault.stays() {
            let on = s.on.as_deref().unwrap_or_default();
            let replicas = self.federation.gateways.get(on).map(|a| a.all().len());
            if on == FROM {
                v.push(
                    &field("on"),
                    "cannot be the load's source",
                    "name the cluster whose replicas are hit (a cluster id or `$primary`)",
                );
            }
            // A signalled only gateway is a gateway kill: its traffic moves.
            if s.fault != K::Signal && replicas.is_some_and(|n| n < 2) {
                v.push(
                    &field("on"),
                    format!("`{on}` lists one admin address: no replica is left to serve"),
                    "list each replica's admin API: `<cluster>: [<admin 1>, <admin 2>]`",
                );
            }
            if let (Some(r), Some(n)) = (s.replica, replicas)
                && !(1..=n).contains(&r)
            {
                v.push(
                    &field("replica"),
                    format!("{r} is not one of {on}'s replicas 1..={n}"),
                    "count replicas from 1, in federation.gateways order",
                );
            }
        }
        if s.fault == K::Signal {
            // `$primary` may be any cluster but the source.
            let on = s.on.as_deref().unwrap_or(FROM);
            let remote = self
                .federation
                .gateways
                .iter()
                .filter(|(name, _)| name.as_str() == on || on == PRIMARY)
                .flat_map(|(_, a)| a.all())
                .find(|a| !a.ip().is_loopback());
            if let Some(a) = remote {
                v.push(
                    &field("on"),
                    format!(
                        "a signal needs the gateway's process on this host, and {a} is not loopback"
                    ),
                    "run the drill on the gateways' host, against their loopback admin addresses",
                );
            }
        }
        if s.fault == K::Loss && s.fraction.is_none() {
            v.push(
                &field("fraction"),
                "is missing",
                "give the share of packets lost, e.g. `0.3`",
            );
        }
    }

    /// The token, from the file or the environment.
    pub fn token(&self) -> anyhow::Result<String> {
        use anyhow::Context;
        let f = &self.federation;
        let token = match (&f.token_file, &f.token_env) {
            (Some(p), _) => std::fs::read_to_string(p).with_context(|| {
                format!(
                    "reading federation.token_file {} (is the federation running? `strait demo` writes it at start)",
                    p.display()
                )
            })?,
            (None, Some(var)) => std::env::var(var)
                .with_context(|| format!("federation.token_env: ${var} is not set"))?,
            (None, None) => anyhow::bail!("federation: no token_file or token_env"),
        };
        Ok(token.trim().to_owned())
    }
}
