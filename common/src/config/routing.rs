//! The `routing:` section: how each imported service picks a cluster per connection, and
//! how failures move it elsewhere. A `default` policy applies to every service; entries
//! under `services` override it field by field. Reloaded with the config file.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Validator;
use crate::units::HumanDuration;

/// Routing policies.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    /// Policy for every service without its own entry (unset fields: built-in defaults).
    #[serde(default)]
    pub default: PolicyFields,
    /// Per-service overrides; each names its service as `namespace/name`.
    #[serde(default)]
    pub services: Vec<PolicyFields>,
}

/// How candidate clusters are ordered.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Same cluster, then same zone, then same region, then `priority`, then measured RTT.
    #[default]
    Locality,
    /// Every healthy cluster shares traffic by weight, wherever it is.
    Weighted,
    /// Exactly the `priority` order; unlisted clusters come last, by RTT.
    Priority,
}

/// Outlier ejection: a (service, cluster) path that keeps failing is taken out for a while.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EjectionFields {
    /// Consecutive connect failures that eject the path (default 3).
    pub consecutive_failures: Option<u32>,
    /// First ejection time, doubled on each repeat (default 2s).
    pub base_time: Option<HumanDuration>,
    /// Longest ejection (default 60s).
    pub max_time: Option<HumanDuration>,
    /// Most of a service's clusters ejected at once, in percent (default 50).
    pub max_ejected_percent: Option<u32>,
}

/// Retry budget: retries allowed beyond first attempts.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetFields {
    /// Retries earned per connection (default 0.2: one in five).
    pub ratio: Option<f64>,
    /// Retries always allowed per second (default 10).
    pub min_per_second: Option<f64>,
}

/// One routing policy. Every field is optional: a service entry inherits what it leaves
/// out from `default`, and `default` from the built-in values.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyFields {
    /// The service this entry is for (`namespace/name`); only under `services`.
    pub service: Option<String>,
    /// `locality` (default), `weighted` or `priority`.
    pub mode: Option<Mode>,
    /// Cluster order for `priority` mode; in `locality` mode, the order of other regions.
    pub priority: Option<Vec<String>>,
    /// Weight per cluster, overriding the weight each cluster exports (canaries: 90/10).
    pub weights: Option<BTreeMap<String, u32>>,
    /// Time one attempt may take to open a stream (default: tunnel.connect_timeout).
    pub connect_timeout: Option<HumanDuration>,
    /// Most clusters tried for one connection (default 3).
    pub attempts: Option<usize>,
    /// Outlier ejection.
    pub ejection: Option<EjectionFields>,
    /// A recovered cluster must stay healthy this long before it gets traffic (default 5s).
    pub dwell: Option<HumanDuration>,
    /// After the dwell, its share ramps up over this long (default 10s; 0s: at once).
    pub slow_start: Option<HumanDuration>,
    /// Retry budget.
    pub retry_budget: Option<RetryBudgetFields>,
    /// Most concurrent connections sent to one cluster (spill protection; default none).
    pub max_connections_per_cluster: Option<usize>,
    /// Send what the client wrote before the tunnel answered together with the stream
    /// request even when a retry is possible (saves a round trip per new connection, but an
    /// attempt that times out may have delivered those bytes, and the retry sends them
    /// again). Default false: with a cluster to fail over to, they wait for the remote's ok.
    pub early_data: Option<bool>,
}

/// A fully resolved policy for one service (durations in the admin API's JSON are human
/// strings, as in the config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutePolicy {
    /// Ordering mode.
    pub mode: Mode,
    /// Priority list.
    pub priority: Vec<String>,
    /// Weight overrides.
    pub weights: BTreeMap<String, u32>,
    /// Per-attempt open timeout; `None` uses tunnel.connect_timeout.
    #[serde(with = "crate::units::human::option")]
    pub connect_timeout: Option<Duration>,
    /// Most attempts per connection.
    pub attempts: usize,
    /// Consecutive failures that eject.
    pub consecutive_failures: u32,
    /// First ejection time.
    #[serde(with = "crate::units::human")]
    pub ejection_base: Duration,
    /// Longest ejection.
    #[serde(with = "crate::units::human")]
    pub ejection_max: Duration,
    /// Largest ejected share of a service's clusters (0..=1).
    pub max_ejected_fraction: f64,
    /// Dwell before failback.
    #[serde(with = "crate::units::human")]
    pub dwell: Duration,
    /// Slow-start ramp after the dwell.
    #[serde(with = "crate::units::human")]
    pub slow_start: Duration,
    /// Retries per first attempt.
    pub retry_ratio: f64,
    /// Retries always allowed per second.
    pub min_retries_per_sec: f64,
    /// Concurrency cap per cluster.
    pub max_per_cluster: Option<usize>,
    /// Early bytes ride with the stream request even when retries are possible.
    pub early_data: bool,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        Self {
            mode: Mode::Locality,
            priority: Vec::new(),
            weights: BTreeMap::new(),
            connect_timeout: None,
            attempts: 3,
            consecutive_failures: 3,
            ejection_base: Duration::from_secs(2),
            ejection_max: Duration::from_secs(60),
            max_ejected_fraction: 0.5,
            dwell: Duration::from_secs(5),
            slow_start: Duration::from_secs(10),
            retry_ratio: 0.2,
            min_retries_per_sec: 10.0,
            max_per_cluster: None,
            early_data: false,
        }
    }
}

impl RoutePolicy {
    fn apply(&mut self, f: &PolicyFields) {
        let d = |v: &Option<HumanDuration>| v.map(|d| d.0);
        if let Some(m) = f.mode {
            self.mode = m;
        }
        if let Some(p) = &f.priority {
            self.priority = p.clone();
        }
        if let Some(w) = &f.weights {
            self.weights = w.clone();
        }
        if let Some(t) = d(&f.connect_timeout) {
            self.connect_timeout = Some(t);
        }
        if let Some(a) = f.attempts {
            self.attempts = a;
        }
        if let Some(e) = &f.ejection {
            if let Some(n) = e.consecutive_failures {
                self.consecutive_failures = n;
            }
            if let Some(t) = d(&e.base_time) {
                self.ejection_base = t;
            }
            if let Some(t) = d(&e.max_time) {
                self.ejection_max = t;
            }
            if let Some(p) = e.max_ejected_percent {
                self.max_ejected_fraction = f64::from(p) / 100.0;
            }
        }
        if let Some(t) = d(&f.dwell) {
            self.dwell = t;
        }
        if let Some(t) = d(&f.slow_start) {
            self.slow_start = t;
        }
        if let Some(b) = &f.retry_budget {
            if let Some(r) = b.ratio {
                self.retry_ratio = r;
            }
            if let Some(m) = b.min_per_second {
                self.min_retries_per_sec = m;
            }
        }
        if let Some(m) = f.max_connections_per_cluster {
            self.max_per_cluster = Some(m);
        }
        if let Some(e) = f.early_data {
            self.early_data = e;
        }
    }
}

impl Routing {
    /// The policy for `service` (`namespace/name`): built-in defaults, then `default`,
    /// then the service's own entry.
    pub fn policy_for(&self, service: &str) -> RoutePolicy {
        let mut p = RoutePolicy::default();
        p.apply(&self.default);
        if let Some(s) = self
            .services
            .iter()
            .find(|s| s.service.as_deref() == Some(service))
        {
            p.apply(s);
        }
        p
    }

    pub(super) fn validate(&self, v: &mut Validator) {
        if self.default.service.is_some() {
            v.push(
                "routing.default.service",
                "is set on the default policy",
                "move the entry under `routing.services`, or remove `service:`",
            );
        }
        self.default.validate(v, "routing.default");
        resolved(v, "routing.default", &self.policy_for(""));
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = format!("routing.services[{i}]");
            match s.service.as_deref() {
                None => v.push(
                    &format!("{at}.service"),
                    "is missing",
                    "name the service as `namespace/name`, e.g. `service: default/web`",
                ),
                Some(name) => {
                    let valid = name
                        .split_once('/')
                        .is_some_and(|(ns, n)| is_label(ns) && is_label(n));
                    if !valid {
                        v.push(
                            &format!("{at}.service"),
                            format!("`{name}` is not `namespace/name`"),
                            "write the service as `namespace/name`, e.g. `default/web`",
                        );
                    } else if !seen.insert(name) {
                        v.push(
                            &format!("{at}.service"),
                            format!("`{name}` has two entries"),
                            "merge them into one entry",
                        );
                    }
                }
            }
            s.validate(v, &at);
            if let Some(name) = &s.service {
                resolved(v, &at, &self.policy_for(name));
            }
        }
    }
}

/// Checks that span fields, on the policy as resolved (an entry may inherit half of a pair
/// from `default`).
fn resolved(v: &mut Validator, at: &str, p: &RoutePolicy) {
    if p.mode == Mode::Priority && p.priority.is_empty() {
        v.push(
            &format!("{at}.priority"),
            "is empty (here or in routing.default) but mode is `priority`",
            "list the clusters in the order to use them, e.g. `priority: [us-east, eu-west]`",
        );
    }
    if p.ejection_max < p.ejection_base {
        v.push(
            &format!("{at}.ejection.max_time"),
            format!(
                "{}ms is shorter than base_time ({}ms, here or in routing.default)",
                p.ejection_max.as_millis(),
                p.ejection_base.as_millis()
            ),
            "make max_time at least base_time, e.g. base_time: 2s, max_time: 60s",
        );
    }
}

fn is_label(s: &str) -> bool {
    crate::identity::is_dns_label(s)
}

impl PolicyFields {
    fn validate(&self, v: &mut Validator, at: &str) {
        if let Some(a) = self.attempts
            && !(1..=10).contains(&a)
        {
            v.push(
                &format!("{at}.attempts"),
                "must be between 1 and 10",
                "use e.g. 3",
            );
        }
        if let Some(t) = self.connect_timeout
            && (t.0 < Duration::from_millis(10) || t.0 > Duration::from_secs(60))
        {
            v.push(
                &format!("{at}.connect_timeout"),
                "must be between 10ms and 60s",
                "use e.g. `1s`",
            );
        }
        for (j, c) in self.priority.iter().flatten().enumerate() {
            if !is_label(c) {
                v.push(
                    &format!("{at}.priority[{j}]"),
                    format!("`{c}` is not a cluster id"),
                    "use the cluster ids of the federation",
                );
            }
        }
        for (c, w) in self.weights.iter().flatten() {
            if !is_label(c) {
                v.push(
                    &format!("{at}.weights.{c}"),
                    format!("`{c}` is not a cluster id"),
                    "use the cluster ids of the federation",
                );
            }
            if *w == 0 || *w > 1_000_000 {
                v.push(
                    &format!("{at}.weights.{c}"),
                    format!("{w} is not between 1 and 1000000"),
                    "use relative weights such as 90 and 10; to take a cluster out, stop exporting the service there",
                );
            }
        }
        if let Some(e) = &self.ejection {
            if e.consecutive_failures == Some(0) {
                v.push(
                    &format!("{at}.ejection.consecutive_failures"),
                    "is 0",
                    "use at least 1 (e.g. 3)",
                );
            }
            if e.max_ejected_percent.is_some_and(|p| p > 100) {
                v.push(
                    &format!("{at}.ejection.max_ejected_percent"),
                    "is above 100",
                    "use a percentage, e.g. 50",
                );
            }
            if e.base_time.is_some_and(|t| t.0.is_zero()) {
                v.push(
                    &format!("{at}.ejection.base_time"),
                    "is zero",
                    "use e.g. `2s`",
                );
            }
        }
        if let Some(b) = &self.retry_budget {
            if b.ratio.is_some_and(|r| !(0.0..=10.0).contains(&r)) {
                v.push(
                    &format!("{at}.retry_budget.ratio"),
                    "must be between 0 and 10",
                    "use e.g. 0.2 (one retry per five connections)",
                );
            }
            if b.min_per_second
                .is_some_and(|r| !(0.0..=100_000.0).contains(&r))
            {
                v.push(
                    &format!("{at}.retry_budget.min_per_second"),
                    "must be between 0 and 100000",
                    "use e.g. 10",
                );
            }
        }
        if self.max_connections_per_cluster == Some(0) {
            v.push(
                &format!("{at}.max_connections_per_cluster"),
                "is 0",
                "leave it out for no limit, or allow at least 1",
            );
        }
    }
}
