//! Service listeners: a local TCP address per imported service port, forwarding each
//! accepted connection through the tunnel to a cluster that serves the service.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use serde::Serialize;
use strait_common::config::Import;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tracing::Instrument;

use crate::gateway::Shared;
use crate::router::Outcome;
use crate::routing::RetryReason;
use crate::tunnel::header::StreamRequest;
use crate::tunnel::outbound::{OpenError, open_stream_until};
use crate::tunnel::splice;

/// One bound listener, as reported by the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct BoundListener {
    /// `namespace/name` of the imported service.
    pub service: String,
    /// Service port.
    pub port: u16,
    /// Local address accepting connections.
    pub address: SocketAddr,
    /// Clusters tried, in order.
    pub clusters: Vec<String>,
    /// For one endpoint of a headless service: `cluster/address` of the only backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// A listener's identity: service, port, and for headless services the endpoint.
type Key = (String, u16, Option<String>);

/// The service listeners of a gateway, keyed by (service, port, endpoint). Static imports
/// are bound at start; with discovery the set follows the federated catalog: new imports
/// are bound, withdrawn ones closed, and the cluster order of existing ones updated in place.
#[derive(Default)]
pub struct Listeners(Mutex<BTreeMap<Key, Active>>);

struct Active {
    address: SocketAddr,
    import: Arc<ArcSwap<Import>>,
    task: AbortHandle,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Listeners {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Active>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What is bound now.
    pub fn snapshot(&self) -> Vec<BoundListener> {
        self.lock()
            .iter()
            .map(|((service, port, endpoint), a)| BoundListener {
                service: service.clone(),
                port: *port,
                address: a.address,
                clusters: a.import.load().clusters.clone(),
                endpoint: endpoint.clone(),
            })
            .collect()
    }

    /// The local address of an imported service port (the ClusterSetIP listener).
    pub fn address(&self, service: &str, port: u16) -> Option<SocketAddr> {
        self.lock()
            .get(&(service.to_owned(), port, None))
            .map(|a| a.address)
    }

    /// Makes the bound set equal to `desired`. Returns the listeners that could not be
    /// bound (the rest are serving).
    pub async fn reconcile(&self, shared: &Arc<Shared>, desired: &[Import]) -> Vec<anyhow::Error> {
        let mut wanted: BTreeMap<Key, (&Import, u16)> = BTreeMap::new();
        for imp in desired {
            let endpoint = imp
                .endpoint
                .map(|e| format!("{}/{e}", imp.clusters.join(",")));
            for p in &imp.ports {
                wanted.insert(
                    (
                        format!("{}/{}", imp.namespace, imp.name),
                        p.port,
                        endpoint.clone(),
                    ),
                    (imp, p.local_port()),
                );
            }
        }
        let mut to_bind = Vec::new();
        {
            let mut active = self.lock();
            active.retain(|key, a| {
                let keep = wanted
                    .get(key)
                    .is_some_and(|(imp, _)| imp.address == a.address.ip());
                if !keep {
                    tracing::info!(service = %key.0, port = key.1, "listener closed");
                }
                keep
            });
            for (key, (imp, local_port)) in &wanted {
                match active.get(key) {
                    Some(a) => {
                        if **a.import.load() != **imp {
                            a.import.store(Arc::new((*imp).clone()));
                        }
                    }
                    None => to_bind.push((key.clone(), (*imp).clone(), *local_port)),
                }
            }
        }
        let mut errors = Vec::new();
        for ((service, port, endpoint), imp, local_port) in to_bind {
            let addr = SocketAddr::new(imp.address, local_port);
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    errors.push(anyhow::anyhow!(
                        "binding listener {addr} for imported service {service}: {e}"
                    ));
                    continue;
                }
            };
            let Ok(address) = listener.local_addr() else {
                continue;
            };
            tracing::info!(%service, port, %address, clusters = ?imp.clusters, "listener open");
            let import = Arc::new(ArcSwap::from_pointee(imp));
            let info = Arc::new(BoundListener {
                service: service.clone(),
                port,
                address,
                clusters: Vec::new(),
                endpoint: endpoint.clone(),
            });
            let task = tokio::spawn(
                serve(shared.clone(), info, listener, import.clone()).in_current_span(),
            )
            .abort_handle();
            self.lock().insert(
                (service, port, endpoint),
                Active {
                    address,
                    import,
                    task,
                },
            );
        }
        errors
    }

    /// Closes every listener.
    pub fn clear(&self) {
        self.lock().clear();
    }
}

/// Accepts connections on one listener until it is closed.
async fn serve(
    shared: Arc<Shared>,
    info: Arc<BoundListener>,
    listener: TcpListener,
    import: Arc<ArcSwap<Import>>,
) {
    loop {
        match listener.accept().await {
            Ok((tcp, client)) => {
                let span = tracing::info_span!("outbound", service = %info.service, port = info.port, %client);
                tokio::spawn(
                    forward(shared.clone(), info.clone(), import.load_full(), tcp).instrument(span),
                );
            }
            Err(e) => {
                // Out of file descriptors and similar are transient: report and keep serving.
                tracing::warn!(error = %e, address = %info.address, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

async fn forward(
    shared: Arc<Shared>,
    info: Arc<BoundListener>,
    import: Arc<Import>,
    tcp: TcpStream,
) {
    let started = Instant::now();
    let _ = tcp.set_nodelay(true);
    let req = StreamRequest {
        service: import.name.clone(),
        namespace: import.namespace.clone(),
        port: info.port.into(),
        endpoint: import.endpoint.map(|e| e.to_string()),
    };
    let service = info.service.as_str();
    let routing = &shared.routing;
    let plan = routing.plan(&shared, service, &import.clusters);
    let early = early_bytes(&tcp);
    // Bytes the client already sent ride with the request only when no retry can follow
    // (or the policy allows replays): an attempt that times out may have delivered them.
    let eager = plan.attempts.len() <= 1 || plan.early_data;
    let with_request: &[u8] = if eager { &early } else { &[] };
    let mut retry = None;
    for cluster in &plan.attempts {
        if let Some(reason) = retry
            && !routing.may_retry(&shared, service, reason)
        {
            break;
        }
        let held = routing.hold(service, cluster);
        let opened = open_on(&shared, cluster, &req, with_request, plan.timeout).await;
        match opened {
            Ok((mut send, recv)) => {
                routing.record(&shared, service, cluster, Outcome::Success);
                shared
                    .metrics
                    .histogram("strait_connect_duration_seconds", &[("peer", cluster)])
                    .record(started.elapsed().as_secs_f64());
                shared
                    .metrics
                    .counter(
                        "strait_route_connections_total",
                        &[("service", service), ("cluster", cluster)],
                    )
                    .increment(1);
                if !eager && !early.is_empty() && send.write_all(&early).await.is_err() {
                    splice::abort_on_close(&tcp);
                    return;
                }
                splice::splice_counted(
                    &shared.metrics,
                    service,
                    cluster,
                    splice::Side::Outbound,
                    (tcp, send, recv),
                    shared.config.tunnel.copy_buffer.0 as usize,
                    early.len() as u64,
                )
                .await;
                drop(held);
                return;
            }
            Err(e) => {
                drop(held);
                let peer_down = matches!(e, OpenError::PeerDown | OpenError::Abandoned)
                    || shared
                        .peers
                        .get(cluster)
                        .is_none_or(|p| !p.state().routable());
                // A dead gateway is gateway liveness, not this path's fault: it does not
                // count towards ejecting the path.
                if !peer_down {
                    routing.record(&shared, service, cluster, Outcome::Failure);
                }
                shared
                    .metrics
                    .counter(
                        "strait_streams_failed_total",
                        &[
                            ("service", service),
                            ("peer", cluster),
                            ("reason", e.label()),
                        ],
                    )
                    .increment(1);
                tracing::info!(peer = %cluster, error = %e, "stream to peer failed");
                // Never replay: bytes that may have been delivered end the connection here.
                let replay = e.ambiguous() && !with_request.is_empty() && !plan.early_data;
                if !e.retryable() || replay {
                    break;
                }
                retry = Some(if peer_down {
                    RetryReason::PeerDown
                } else {
                    RetryReason::Failed
                });
            }
        }
    }
    shared
        .metrics
        .counter("strait_route_unserved_total", &[("service", service)])
        .increment(1);
    // Nothing could serve the connection: reset it so the client fails fast, not on a timeout.
    splice::abort_on_close(&tcp);
}

/// Opens a stream on `cluster`'s tunnel; gives up early, as `Abandoned`, when the peer
/// stops answering probes while we wait (the usual sign of a dead or cut-off gateway).
async fn open_on(
    shared: &Shared,
    cluster: &str,
    req: &StreamRequest,
    early: &[u8],
    timeout: Duration,
) -> Result<(quinn::SendStream, quinn::RecvStream), OpenError> {
    let Some(peer) = shared.peers.get(cluster) else {
        return Err(OpenError::PeerDown);
    };
    let mut state = peer.subscribe();
    let Some(conn) = peer.ready_connection(timeout).await else {
        return Err(OpenError::PeerDown);
    };
    let unresponsive = async move {
        let _ = state.wait_for(|s| !s.routable()).await;
    };
    open_stream_until(&conn, req, early, timeout, unresponsive).await
}

/// Most bytes read ahead of the stream header.
const EARLY_MAX: usize = 16 << 10;

/// Whatever the client has already sent, read without waiting (a server-speaks-first
/// protocol sends nothing, and must not be delayed). These bytes ride in the same packet
/// as the stream header when no retry can follow. Resending them after a refusal is safe:
/// a remote that refuses never connects an endpoint, so they were delivered nowhere.
fn early_bytes(tcp: &TcpStream) -> Bytes {
    let mut buf = BytesMut::with_capacity(EARLY_MAX);
    match tcp.try_read_buf(&mut buf) {
        Ok(_) => buf.freeze(),
        // WouldBlock (nothing yet) or an error the splice will meet again on its first read.
        Err(_) => Bytes::new(),
    }
}
