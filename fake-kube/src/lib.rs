//! A faithful in-memory fake of the Kubernetes API server's HTTP protocol, for tests
//! that drive the real kube-rs client and kube-runtime (watchers, reflectors) against it.
//!
//! Why an in-tree fake: no real API server can run where these tests run, and nothing
//! existing serves list/watch over HTTP with resourceVersion semantics, bookmarks and
//! `410 Gone`. kube-client's own test helpers are `tower-test` mocks of single
//! request/response pairs, `kubernetes-mock` replays scripted expectations, and
//! `kube-fake-client` is an in-process client (controller-runtime style) that bypasses
//! HTTP, so none of them exercises kube-runtime's watcher state machine (re-list on
//! 410, bookmarks, paging, streaming lists). The fakes that do speak the protocol are
//! Go test helpers (client-go/envtest), which need a Go toolchain and an etcd binary.
//!
//! [`FakeApi::start`] serves plain HTTP/1.1 on `127.0.0.1:0`; [`FakeApi::client`] is a
//! real [`kube::Client`] for it. The same store is reachable directly ([`FakeApi::create`],
//! [`FakeApi::get`], ...) with the HTTP API's semantics, and [`FakeApi::wait_until`]
//! waits on store changes without polling.
//!
//! Implemented: one global resourceVersion; create/get/list/replace/patch/delete/
//! deletecollection with `metav1.Status` errors (404, 409 AlreadyExists/Conflict, 400,
//! 410, 422); generateName; namespace existence; Service ClusterIP/NodePort allocation;
//! status subresources; generation; no-op writes that keep the resourceVersion;
//! finalizers and `deletionTimestamp`; owner-reference garbage collection (background,
//! `Orphan` honoured) and namespace deletion; label/field selectors; `limit`/`continue`
//! paging; watches with history replay, 410 on expired resourceVersions, selector
//! transitions (ADDED/DELETED), bookmarks, `timeoutSeconds` and `sendInitialEvents`.
//!
//! Simplified: strategic merge patch is a JSON merge patch;
//! server-side apply merges without field-ownership tracking; the two
//! multicluster.x-k8s.io versions are separate stores (no conversion); lists at an old
//! resourceVersion are served at the latest one; deleting a namespace removes its
//! contents at once, ignoring their finalizers; `dryRun` is rejected with 400; field
//! selectors accept any dotted path; no admission, validation or authentication.

mod error;
mod http;
mod patch;
mod selector;
mod store;
mod watch;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::Value;
use tokio::net::TcpListener;

pub use error::ApiError;
pub use patch::PatchKind;
pub use selector::{FieldSelector, LabelSelector};
pub use store::{Resource, default_resources};

use store::{DeleteOptions, Part, ResId, Store};

/// State shared by the handle, the HTTP handlers and the watch streams.
pub(crate) struct Shared {
    store: Mutex<Store>,
    reachable: AtomicBool,
    /// Bumped when the server goes unreachable: every open connection is then dropped.
    disconnect: tokio::sync::watch::Sender<u64>,
    requests: Mutex<Vec<String>>,
    bookmark_interval: Mutex<Duration>,
    addr: SocketAddr,
}

impl Shared {
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log_request(&self, line: String) {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }

    fn bookmark_interval(&self) -> Duration {
        *self
            .bookmark_interval
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn set_reachable(&self, up: bool) {
        self.reachable.store(up, Ordering::SeqCst);
        if !up {
            self.disconnect.send_modify(|n| *n += 1);
            self.store().close_watches();
        }
    }
}

struct Inner {
    shared: Arc<Shared>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.accept_loop.abort();
        self.shared.set_reachable(false);
    }
}

/// A running fake API server. Clones share the server; it stops serving (and drops
/// every connection) when the last clone is dropped.
#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Inner>,
}

impl FakeApi {
    /// Starts a server on `127.0.0.1:0` (plain HTTP/1.1) with the default resources and
    /// the `default` and `kube-system` namespaces.
    pub async fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            reachable: AtomicBool::new(true),
            disconnect: tokio::sync::watch::channel(0).0,
            requests: Mutex::new(Vec::new()),
            bookmark_interval: Mutex::new(Duration::from_secs(1)),
            addr,
        });
        let accept_loop = tokio::spawn(accept_loop(listener, shared.clone()));
        FakeApi {
            inner: Arc::new(Inner {
                shared,
                accept_loop,
            }),
        }
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared().addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.shared().addr
    }

    /// Stops serving `api_version`/`kind` over HTTP (404, as a server whose CRD lacks that
    /// version); the direct store API still reaches it. Discovery lists still name it.
    pub fn stop_serving(&self, api_version: &str, kind: &str) {
        let mut store = self.shared().store();
        let id = self.resolve(&store, api_version, kind);
        store.unserved.insert(id);
    }

    /// A real [`kube::Client`] for [`FakeApi::url`], default namespace `default`.
    /// Must be called inside a tokio runtime.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("valid url"));
        kube::Client::try_from(config).expect("kube client for the fake API server")
    }

    /// Registers (or replaces) a resource type.
    pub fn register(&self, resource: Resource) {
        self.shared().store().register(resource);
    }

    /// Interval between BOOKMARK events of watches started from now on (default 1s).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        *self
            .shared()
            .bookmark_interval
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = interval;
    }

    fn resolve(&self, store: &Store, api_version: &str, kind: &str) -> ResId {
        store
            .resource_by_kind(api_version, kind)
            .unwrap_or_else(|| {
                panic!("strait-fake-kube: resource {api_version}/{kind} is not registered")
            })
    }

    fn resolve_obj(&self, store: &Store, obj: &Value) -> (ResId, String) {
        let s = |p: &str| {
            obj.pointer(p)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let res = self.resolve(store, &s("/apiVersion"), &s("/kind"));
        let ns = Some(s("/metadata/namespace"))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into());
        (res, ns)
    }

    /// Creates `obj` (which must carry `apiVersion`, `kind`, `metadata.name` or
    /// `generateName`; namespace defaults to `default`) exactly as `POST` would.
    pub fn try_create(&self, obj: Value) -> Result<Value, ApiError> {
        let mut store = self.shared().store();
        let (res, ns) = self.resolve_obj(&store, &obj);
        store.create(res, Some(&ns), obj, Part::Main)
    }

    /// [`FakeApi::try_create`], panicking on error.
    pub fn create(&self, obj: Value) -> Value {
        self.try_create(obj)
            .unwrap_or_else(|e| panic!("strait-fake-kube create: {e}"))
    }

    /// Creates `obj`, or replaces the existing object (keeping uid and
    /// creationTimestamp). Unlike `PUT`, spec and status are written together in one
    /// write, and `metadata.resourceVersion` in `obj` is ignored.
    pub fn try_apply(&self, obj: Value) -> Result<Value, ApiError> {
        let mut store = self.shared().store();
        let (res, ns) = self.resolve_obj(&store, &obj);
        store.put(res, Some(&ns), obj)
    }

    /// [`FakeApi::try_apply`], panicking on error.
    pub fn apply(&self, obj: Value) -> Value {
        self.try_apply(obj)
            .unwrap_or_else(|e| panic!("strait-fake-kube apply: {e}"))
    }

    /// One object, or `None`. `namespace` is ignored for cluster-scoped kinds and
    /// defaults to `default` for namespaced ones.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let store = self.shared().store();
        let res = self.resolve(&store, api_version, kind);
        store.get(res, namespace, name).ok()
    }

    /// Every object of a kind, in `namespace` or (with `None`) all namespaces, sorted
    /// by namespace and name.
    pub fn list(&self, api_version: &str, kind: &str, namespace: Option<&str>) -> Vec<Value> {
        let store = self.shared().store();
        let res = self.resolve(&store, api_version, kind);
        store.objects_of(res, namespace)
    }

    /// Deletes an object as `DELETE` would (finalizers, background garbage collection,
    /// namespace contents). Returns whether it existed. `namespace` as in [`FakeApi::get`].
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        let mut store = self.shared().store();
        let res = self.resolve(&store, api_version, kind);
        store
            .delete(res, namespace, name, &DeleteOptions::default())
            .is_ok()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared().store().rv
    }

    /// Forgets the watch history: a watch or continued list from any resourceVersion
    /// older than the current one now gets `410 Expired`. Open watches keep streaming.
    pub fn compact(&self) {
        self.shared().store().compact();
    }

    /// Ends every open watch normally, as a server-side watch timeout would: clients
    /// then re-watch from their last resourceVersion.
    pub fn close_watches(&self) {
        self.shared().store().close_watches();
    }

    /// `false`: drop every open connection (watches included) and every new one without
    /// an answer, as an API server that vanished. `true`: serve again, same store.
    pub fn set_reachable(&self, up: bool) {
        self.shared().set_reachable(up);
    }

    /// Whether the server currently answers.
    pub fn is_reachable(&self) -> bool {
        self.shared().reachable.load(Ordering::SeqCst)
    }

    /// Every request served so far, as `"METHOD path?query"` lines.
    pub fn requests(&self) -> Vec<String> {
        self.shared()
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.shared()
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Waits until `pred` holds, re-evaluating it after every store change (no polling).
    /// Returns whether it held before `timeout`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&FakeApi) -> bool,
    ) -> bool {
        let mut changes = self.shared().store().subscribe_changes();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return pred(self),
            }
        }
    }

    /// Waits until the object exists and satisfies `pred`; returns it, or `None` on
    /// timeout.
    pub async fn wait_for(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Option<Value> {
        let mut found = None;
        self.wait_until(timeout, |api| {
            found = api
                .get(api_version, kind, namespace, name)
                .filter(|o| pred(o));
            found.is_some()
        })
        .await;
        found
    }
}

/// Accepts connections and serves each with HTTP/1.1 until the server goes
/// unreachable, which drops the connection (and any watch on it) mid-stream.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let router = http::router(shared.clone());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        if !shared.reachable.load(Ordering::SeqCst) {
            drop(stream);
            continue;
        }
        let mut disconnect = shared.disconnect.subscribe();
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = disconnect.changed() => {}
            }
        });
    }
}
