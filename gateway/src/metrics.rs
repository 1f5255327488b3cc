//! Per-gateway Prometheus metrics. Each gateway owns its recorder (no global), so several
//! gateways in one process (the demo, the tests) keep separate numbers.
//!
//! Every metric strait exports is listed in [`describe`] and in docs/ARCHITECTURE.md.

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

static META: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// Latency buckets (seconds) for connect-time histograms.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A gateway's metrics registry.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric described.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("bucket list is non-empty")
            .build_recorder();
        let handle = recorder.handle();
        let m = Self {
            recorder: Arc::new(recorder),
            handle,
        };
        m.describe();
        m
    }

    fn describe(&self) {
        let r = &self.recorder;
        let d = |s: &'static str| SharedString::from(s);
        r.describe_counter(
            "strait_streams_opened_total".into(),
            None,
            d("Tunnel streams opened (direction=outbound|inbound), by service and peer cluster."),
        );
        r.describe_counter(
            "strait_streams_failed_total".into(),
            None,
            d("Tunnel streams that did not reach an endpoint, by service, peer and reason."),
        );
        r.describe_counter(
            "strait_bytes_total".into(),
            Some(Unit::Bytes),
            d("Payload bytes proxied, by service, peer and direction (sent=towards the service)."),
        );
        r.describe_histogram(
            "strait_connect_duration_seconds".into(),
            Some(Unit::Seconds),
            d("Time from accepting a client connection to the remote's ok, by peer."),
        );
        r.describe_gauge(
            "strait_active_connections".into(),
            None,
            d("Proxied connections open now, by service and direction."),
        );
        r.describe_gauge(
            "strait_peer_up".into(),
            None,
            d("1 while the tunnel connection to the peer cluster is established."),
        );
        r.describe_gauge(
            "strait_peer_rtt_seconds".into(),
            Some(Unit::Seconds),
            d("Smoothed QUIC RTT to the peer cluster."),
        );
        r.describe_counter(
            "strait_peer_connects_total".into(),
            None,
            d("Tunnel connection attempts to the peer cluster, by result."),
        );
        r.describe_counter(
            "strait_handshakes_rejected_total".into(),
            None,
            d("Inbound tunnel handshakes refused (bad or missing certificate, wrong identity)."),
        );
        r.describe_counter(
            "strait_stream_headers_rejected_total".into(),
            None,
            d("Inbound streams whose header was malformed or late."),
        );
        r.describe_counter(
            "strait_cert_reloads_total".into(),
            None,
            d("Certificate reloads from disk, by result (ok|error)."),
        );
        r.describe_gauge(
            "strait_cert_expiry_timestamp_seconds".into(),
            Some(Unit::Seconds),
            d("Expiry of the certificate in use (Unix time)."),
        );
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        Key::from_parts(
            name,
            labels
                .iter()
                .map(|(k, v)| Label::new(*k, v.to_string()))
                .collect::<Vec<_>>(),
        )
    }

    /// A counter handle.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&Self::key(name, labels), &META)
    }

    /// A gauge handle.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder
            .register_gauge(&Self::key(name, labels), &META)
    }

    /// A histogram handle.
    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&Self::key(name, labels), &META)
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}
