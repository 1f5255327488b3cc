//! Admin API (loopback by default; never on the peer-facing port): health, readiness,
//! Prometheus metrics, and JSON views of peers, services and identity.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use strait_common::api;
use tokio::net::TcpListener;

use tokio::sync::watch;

use crate::desired::Desired;
use crate::faults::Faults;
use crate::federation::Federation;
use crate::listener::Listeners;
use crate::metrics::Registry;
use crate::routing::Routing;
use crate::tunnel::CurrentIdentity;
use crate::tunnel::peers::{PeerStatus, Peers, age};

/// What the admin API reads: a handle to each component it reports on.
pub struct AdminState {
    /// This gateway's cluster id.
    pub cluster: String,
    /// The certificate in use.
    pub identity: CurrentIdentity,
    /// Outbound tunnels.
    pub peers: Peers,
    /// Bound service listeners.
    pub listeners: Listeners,
    /// Routing state.
    pub routing: Routing,
    /// The desired state (exports).
    pub desired: watch::Receiver<Arc<Desired>>,
    /// The discovery member, when discovery runs.
    pub federation: Option<Federation>,
    /// The metrics registry.
    pub metrics: Registry,
    /// The Kubernetes integration's health, in Kubernetes mode.
    pub kubernetes: Option<strait_kubernetes::watch::Health>,
    /// The gateway's drain.
    pub drain: crate::drain::Drain,
    /// Its timings.
    pub drain_config: strait_common::config::Drain,
    /// This start's id (`/ready`'s `instance`).
    pub instance: u64,
    /// Its replica name, when it is one.
    pub replica: Option<String>,
}

/// Serves the admin API on an already-bound listener, with the fault routes of `faults`.
pub async fn serve(state: AdminState, faults: Arc<Faults>, listener: TcpListener) {
    let state = Arc::new(state);
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
        .merge(crate::faults::api::routes(faults.clone()))
        .with_state(state.clone())
        .merge(
            Router::new()
                .route("/v1/drain", axum::routing::post(drain))
                .with_state((state, faults)),
        );
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: keep serving once some are back.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            // Every request header, the first one included, must arrive within
            // HEADER_TIMEOUT: a client that sends nothing, or a header a byte at a time,
            // does not keep its connection (and file descriptor) for long.
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = served.await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

/// Time a client has to send a request's header on the admin port.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

async fn ready(State(s): State<Arc<AdminState>>) -> Response {
    let expired = s.identity.load().not_after <= SystemTime::now();
    let up = s
        .peers
        .all()
        .iter()
        .filter(|p| p.state().status == PeerStatus::Up)
        .count();
    let kubernetes = s.kubernetes.as_ref().map(|h| {
        let h = h.now();
        api::KubernetesReady {
            synced: h.synced,
            leader: h.leader,
            error: h.error,
        }
    });
    // Not ready until the API has been read once; after that, an API server that goes
    // away only shows in `error`: the last known state keeps serving.
    let unsynced = kubernetes.as_ref().is_some_and(|k| !k.synced);
    let draining = s.drain.is_draining();
    let body = api::Ready {
        ready: !expired && !unsynced && !draining,
        kubernetes,
        certificate_expired: expired,
        draining,
        peers_up: up,
        peers: s.peers.all().len(),
        listeners: s.listeners.snapshot().len(),
        pid: std::process::id(),
        instance: s.instance,
        replica: s.replica.clone(),
    };
    let code = if expired || unsynced || draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(body)).into_response()
}

/// `POST /v1/drain` (with the admin token): starts the drain; the gateway exits once it is
/// over.
async fn drain(
    State((s, faults)): State<(Arc<AdminState>, Arc<Faults>)>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Some(refused) = crate::faults::api::refuse(&faults, &headers) {
        return refused;
    }
    let started = s.drain.start();
    if started {
        tracing::warn!("drain asked for on the admin API");
    }
    (
        StatusCode::ACCEPTED,
        Json(api::Draining {
            draining: true,
            started,
            accept_for_seconds: s.drain_config.accept_for.0.as_secs_f64(),
            grace_seconds: s.drain_config.grace.0.as_secs_f64(),
        }),
    )
        .into_response()
}

async fn metrics(State(s): State<Arc<AdminState>>) -> Response {
    if let Some(f) = &s.federation {
        f.publish_metrics();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn peers(State(s): State<Arc<AdminState>>) -> Json<Vec<api::Peer>> {
    Json(
        s.peers
            .all()
            .iter()
            .map(|p| {
                let st = p.state();
                api::Peer {
                    cluster: p.target.cluster.clone(),
                    replica: p.target.replica.clone(),
                    draining: p.is_draining(),
                    open_connections: p.open_connections(),
                    address: p.target.address.to_string(),
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
async fn routes(State(s): State<Arc<AdminState>>) -> Json<Vec<crate::routing::RouteReport>> {
    Json(s.routing.report(None))
}

async fn route(
    State(s): State<Arc<AdminState>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let service = format!("{namespace}/{name}");
    match s.routing.report(Some(&service)).pop() {
        Some(r) => Json(r).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(api::ApiError::plain(format!(
                "{service} is not imported by this gateway"
            ))),
        )
            .into_response(),
    }
}

async fn services(State(s): State<Arc<AdminState>>) -> Json<api::Services> {
    Json(api::Services {
        cluster: s.cluster.clone(),
        exports: s.desired.borrow().exports.to_vec(),
        imports: s.listeners.snapshot(),
    })
}

async fn identity(State(s): State<Arc<AdminState>>) -> Json<api::Identity> {
    let id = s.identity.load();
    let expires = id
        .not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    Json(api::Identity {
        spiffe_id: id.id.uri(),
        serial: id.serial.clone(),
        not_after_unix: expires,
    })
}

fn no_discovery() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(api::ApiError::plain(
            "discovery is not configured on this gateway (add a `discovery:` block)",
        )),
    )
        .into_response()
}

async fn members(State(s): State<Arc<AdminState>>) -> Response {
    let Some(node) = s.federation.as_ref().map(Federation::node) else {
        return no_discovery();
    };
    let view = node.view();
    let clocks = node.clock_offsets();
    let rows: Vec<api::Member> = view
        .members
        .iter()
        .map(|m| api::Member {
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
            clock_offset_ms: clocks
                .get(&m.info.cluster)
                .map(|o| (o.offset_ms * 10.0).round() / 10.0),
            clock_uncertainty_ms: clocks
                .get(&m.info.cluster)
                .map(|o| (o.uncertainty_ms * 10.0).round() / 10.0),
        })
        .collect();
    Json(rows).into_response()
}

async fn catalog(State(s): State<Arc<AdminState>>) -> Response {
    let Some(node) = s.federation.as_ref().map(Federation::node) else {
        return no_discovery();
    };
    let view = node.view();
    let rows: Vec<api::CatalogEntry> = view
        .services
        .iter()
        .map(|e| api::CatalogEntry {
            service: e.key.to_string(),
            origin: e.origin.cluster.clone(),
            region: e.origin.region.clone(),
            version: e.version,
            lease_age_seconds: e.lease_age.as_secs_f64(),
            origin_alive: e.origin_alive,
            ports: e
                .service
                .ports
                .iter()
                .map(|p| api::CatalogPort {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: p.protocol.clone(),
                })
                .collect(),
            ready_endpoints: e.service.ready_endpoints(),
            endpoints: e.service.endpoints.len(),
            export_to: e.service.export_to.clone(),
            weight: e.service.weight,
        })
        .collect();
    Json(rows).into_response()
}
