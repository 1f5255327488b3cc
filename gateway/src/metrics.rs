//! Per-gateway Prometheus metrics. Each gateway owns its recorder (no global), so several
//! gateways in one process (the demo, the tests) keep separate numbers.
//!
//! Each component declares its metrics once, as [`Desc`]s beside a small typed struct that
//! records them (`routing::RoutingMetrics`, `dns::DnsMetrics`, ...); the struct describes
//! them when it is created. [`crate::app::metrics_reference`] lists every one, and a test
//! keeps docs/METRICS.md equal to it and checks that a running federation exports nothing
//! else.

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

static META: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// Latency buckets (seconds) for connect-time histograms.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets.
    Histogram,
}

impl Kind {
    /// The Prometheus `# TYPE` word.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric: its name, kind, help text and label names.
#[derive(Debug)]
pub struct Desc {
    /// `strait_*` name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Label names, in the order values are given when recording.
    pub labels: &'static [&'static str],
}

impl Desc {
    const fn new(
        kind: Kind,
        name: &'static str,
        labels: &'static [&'static str],
        help: &'static str,
    ) -> Desc {
        Desc {
            name,
            kind,
            help,
            labels,
        }
    }

    /// A counter.
    pub(crate) const fn counter(
        name: &'static str,
        labels: &'static [&'static str],
        help: &'static str,
    ) -> Desc {
        Self::new(Kind::Counter, name, labels, help)
    }

    /// A gauge.
    pub(crate) const fn gauge(
        name: &'static str,
        labels: &'static [&'static str],
        help: &'static str,
    ) -> Desc {
        Self::new(Kind::Gauge, name, labels, help)
    }

    /// A histogram.
    pub(crate) const fn histogram(
        name: &'static str,
        labels: &'static [&'static str],
        help: &'static str,
    ) -> Desc {
        Self::new(Kind::Histogram, name, labels, help)
    }
}

const INFO: Desc = Desc::gauge(
    "strait_gateway_info",
    &["local_cluster", "region", "version"],
    "Always 1: the cluster, region and strait version of the gateway serving these metrics (join on instance to tell which cluster reports a series).",
);
/// What every gateway says about itself.
pub(crate) const METRICS: &[Desc] = &[INFO];

/// A gateway's metrics registry; cheap to clone (every clone records into the same one).
#[derive(Clone)]
pub struct Registry {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// A fresh, empty registry.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("bucket list is non-empty")
            .build_recorder();
        let handle = recorder.handle();
        Self {
            recorder: Arc::new(recorder),
            handle,
        }
    }

    /// Names the gateway: `strait_gateway_info`.
    pub(crate) fn identify(&self, cluster: &str, region: &str) {
        self.describe(METRICS);
        self.gauge(&INFO, &[cluster, region, env!("CARGO_PKG_VERSION")])
            .set(1.0);
    }

    /// Describes a component's metrics (its `# HELP` lines).
    pub(crate) fn describe(&self, descs: &[Desc]) {
        for d in descs {
            let help = SharedString::from(d.help);
            let name = d.name.into();
            match d.kind {
                Kind::Counter => self.recorder.describe_counter(name, None, help),
                Kind::Gauge => self.recorder.describe_gauge(name, None, help),
                Kind::Histogram => self.recorder.describe_histogram(name, None, help),
            }
        }
    }

    fn key(d: &Desc, values: &[&str]) -> Key {
        debug_assert_eq!(d.labels.len(), values.len(), "label values of {}", d.name);
        Key::from_parts(
            d.name,
            d.labels
                .iter()
                .zip(values)
                .map(|(k, v)| Label::new(*k, v.to_string()))
                .collect::<Vec<_>>(),
        )
    }

    /// The counter `d` with these label values (in `d.labels` order).
    pub(crate) fn counter(&self, d: &Desc, values: &[&str]) -> Counter {
        debug_assert_eq!(d.kind, Kind::Counter, "{}", d.name);
        self.recorder.register_counter(&Self::key(d, values), &META)
    }

    /// The gauge `d` with these label values.
    pub(crate) fn gauge(&self, d: &Desc, values: &[&str]) -> Gauge {
        debug_assert_eq!(d.kind, Kind::Gauge, "{}", d.name);
        self.recorder.register_gauge(&Self::key(d, values), &META)
    }

    /// The histogram `d` with these label values.
    pub(crate) fn histogram(&self, d: &Desc, values: &[&str]) -> Histogram {
        debug_assert_eq!(d.kind, Kind::Histogram, "{}", d.name);
        self.recorder
            .register_histogram(&Self::key(d, values), &META)
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_named_once_with_conventional_names() {
        let all = crate::app::metrics_reference();
        let mut names: Vec<&str> = all.iter().map(|d| d.name).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a metric is declared twice");
        for d in all {
            assert!(d.name.starts_with("strait_"), "{}", d.name);
            assert!(!d.help.is_empty(), "{} has no help", d.name);
            assert_eq!(
                d.kind == Kind::Counter,
                d.name.ends_with("_total"),
                "{}: counters, and only counters, end in _total",
                d.name
            );
        }
    }

    #[test]
    fn described_metrics_render_with_help_and_labels() {
        const D: Desc = Desc::counter("example_total", &["peer"], "A test counter.");
        let r = Registry::new();
        r.describe(&[D]);
        r.counter(&D, &["east"]).increment(2);
        let text = r.render();
        assert!(
            text.contains("# HELP example_total A test counter."),
            "{text}"
        );
        assert!(text.contains("example_total{peer=\"east\"} 2"), "{text}");
    }
}
