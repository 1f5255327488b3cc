//! Admin API (loopback by default; never on the peer-facing port): health, readiness,
//! Prometheus metrics, and JSON views of peers, services and identity.

pub mod client;

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::gateway::Shared;
use crate::tunnel::peers::{PeerStatus, age};

/// Serves the admin API on an already-bound listener.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/peers", get(peers))
        .route("/v1/services", get(services))
        .route("/v1/identity", get(identity))
        .route("/v1/members", get(members))
        .route("/v1/catalog", get(catalog))
        .route("/v1/routes", get(routes))
        .route("/v1/routes/{namespace}/{name}", get(route))
        .merge(crate::faults::api::routes())
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "admin API stopped");
    }
}

async fn ready(State(s): State<Arc<Shared>>) -> Response {
    let expired = s.identity.load().not_after <= SystemTime::now();
    let up = s
        .peers
        .all()
        .iter()
        .filter(|p| p.state().status == PeerStatus::Up)
        .count();
    let body = json!({
        "ready": !expired,
        "certificate_expired": expired,
        "peers_up": up,
        "peers": s.peers.all().len(),
        "listeners": s.listeners.snapshot().len(),
    });
    let code = if expired {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(body)).into_response()
}

/// Refreshes the discovery metrics from the member's view and counters.
fn publish_discovery(s: &Shared) {
    let Some(node) = &s.discovery else { return };
    let m = &s.metrics;
    let view = node.view();
    let count = |f: &dyn Fn(&strait_discovery::state::MemberView) -> bool| {
        view.members.iter().filter(|x| f(x)).count() as f64
    };
    m.gauge("strait_discovery_members", &[("state", "alive")])
        .set(count(&|x| x.alive));
    m.gauge("strait_discovery_members", &[("state", "suspect")])
        .set(count(&|x| !x.alive && !x.expired));
    m.gauge("strait_discovery_members", &[("state", "expired")])
        .set(count(&|x| x.expired));
    m.gauge("strait_discovery_catalog_entries", &[])
        .set(view.services.len() as f64);
    for x in &view.members {
        m.gauge(
            "strait_discovery_origin_version",
            &[("origin", &x.info.cluster)],
        )
        .set(x.digest.version as f64);
    }
    let lag = view
        .members
        .iter()
        .filter(|x| x.alive)
        .map(|x| x.last_heard.as_secs_f64())
        .fold(0.0, f64::max);
    m.gauge("strait_discovery_convergence_lag_seconds", &[])
        .set(lag);
    let st = node.stats();
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    m.counter("strait_discovery_bytes_total", &[("direction", "sent")])
        .absolute(get(&st.bytes_sent));
    m.counter("strait_discovery_bytes_total", &[("direction", "received")])
        .absolute(get(&st.bytes_received));
    m.counter("strait_discovery_messages_total", &[("direction", "sent")])
        .absolute(get(&st.messages_sent));
    m.counter(
        "strait_discovery_messages_total",
        &[("direction", "received")],
    )
    .absolute(get(&st.messages_received));
    m.counter("strait_discovery_rejected_total", &[("what", "message")])
        .absolute(get(&st.rejected_messages));
    m.counter("strait_discovery_rejected_total", &[("what", "handshake")])
        .absolute(get(&st.rejected_handshakes));
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    publish_discovery(&s);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

/// One peer in `/v1/peers`.
#[derive(Serialize)]
struct PeerView {
    cluster: String,
    address: String,
    status: PeerStatus,
    since_seconds: f64,
    rtt_ms: Option<f64>,
    /// Current path MTU (UDP payload bytes) of the tunnel connection.
    mtu: Option<u16>,
    /// Gateway liveness: answering probes (only an up, responsive peer gets connections).
    responsive: bool,
    /// RTT percentiles over the last minute.
    rtt: Option<crate::tunnel::peers::RttSummary>,
    connects: u64,
    last_error: Option<String>,
}

async fn peers(State(s): State<Arc<Shared>>) -> Json<Vec<PeerView>> {
    Json(
        s.peers
            .all()
            .iter()
            .map(|p| {
                let st = p.state();
                PeerView {
                    cluster: p.config.cluster.clone(),
                    address: p.config.address.to_string(),
                    status: st.status,
                    since_seconds: age(st.since),
                    rtt_ms: st
                        .connection
                        .as_ref()
                        .map(|c| c.rtt().as_secs_f64() * 1000.0),
                    mtu: st.connection.as_ref().map(|c| c.stats().path.current_mtu),
                    responsive: st.status == PeerStatus::Up && st.responsive,
                    rtt: p.rtt_summary(),
                    connects: st.connects,
                    last_error: st.last_error,
                }
            })
            .collect(),
    )
}

/// How every imported service routes now: ranked clusters and why each is in or out.
async fn routes(State(s): State<Arc<Shared>>) -> Json<Vec<crate::routing::RouteReport>> {
    Json(s.routing.report(&s, None))
}

async fn route(
    State(s): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let service = format!("{namespace}/{name}");
    match s.routing.report(&s, Some(&service)).pop() {
        Some(r) => Json(r).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("{service} is not imported by this gateway") })),
        )
            .into_response(),
    }
}

async fn services(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(json!({
        "cluster": s.config.cluster,
        "exports": *s.exports.load_full(),
        "imports": s.listeners.snapshot(),
    }))
}

async fn identity(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let id = s.identity.load();
    let expires = id
        .not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    Json(json!({ "spiffe_id": id.id.uri(), "serial": id.serial, "not_after_unix": expires }))
}

fn no_discovery() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"error": "discovery is not configured on this gateway (add a `discovery:` block)"}))).into_response()
}

/// One member in `/v1/members`.
#[derive(Serialize)]
struct MemberRow {
    cluster: String,
    region: String,
    zone: String,
    alive: bool,
    expired: bool,
    phi: f64,
    last_heard_seconds: f64,
    generation: u64,
    version: u64,
    services: usize,
    tunnel_addr: String,
    gossip_addr: String,
    /// Tunnel RTT from this gateway, when connected.
    rtt_ms: Option<f64>,
}

async fn members(State(s): State<Arc<Shared>>) -> Response {
    let Some(node) = &s.discovery else {
        return no_discovery();
    };
    let view = node.view();
    let rows: Vec<MemberRow> = view
        .members
        .iter()
        .map(|m| MemberRow {
            cluster: m.info.cluster.clone(),
            region: m.info.region.clone(),
            zone: m.info.zone.clone(),
            alive: m.alive,
            expired: m.expired,
            phi: (m.phi * 100.0).round() / 100.0,
            last_heard_seconds: m.last_heard.as_secs_f64(),
            generation: m.digest.generation,
            version: m.digest.version,
            services: m.services,
            tunnel_addr: m.info.tunnel_addr.to_string(),
            gossip_addr: m.info.gossip_addr.to_string(),
            rtt_ms: s
                .peers
                .get(&m.info.cluster)
                .and_then(|p| p.connection())
                .map(|c| c.rtt().as_secs_f64() * 1000.0),
        })
        .collect();
    Json(rows).into_response()
}

async fn catalog(State(s): State<Arc<Shared>>) -> Response {
    let Some(node) = &s.discovery else {
        return no_discovery();
    };
    let view = node.view();
    let rows: Vec<serde_json::Value> = view
        .services
        .iter()
        .map(|e| {
            json!({
                "service": e.key.to_string(),
                "origin": e.origin.cluster,
                "region": e.origin.region,
                "version": e.version,
                "lease_age_seconds": e.lease_age.as_secs_f64(),
                "origin_alive": e.origin_alive,
                "ports": e.service.ports.iter().map(|p| json!({"name": p.name, "port": p.port, "protocol": p.protocol})).collect::<Vec<_>>(),
                "ready_endpoints": e.service.ready_endpoints(),
                "endpoints": e.service.endpoints.len(),
                "export_to": e.service.export_to,
                "weight": e.service.weight,
            })
        })
        .collect();
    Json(rows).into_response()
}
