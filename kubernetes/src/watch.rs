//! Reflectors (kube-runtime's list/watch caches, which re-list on `410 Gone` and restarts)
//! and the health of everything strait does with the API server: which watches have
//! synced, the last error, and counters. An API server that is down only shows here: the
//! stores keep their last contents and the data plane goes on from them.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

use futures::StreamExt;
use kube::Resource;
use kube::api::ListParams;
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};

/// What an operator sees of the Kubernetes integration (`/ready` detail, metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthReport {
    /// Every watch has listed once: the exports and imports reflect the API.
    pub synced: bool,
    /// This replica is the one that writes (holds the Lease).
    pub leader: bool,
    /// The latest unresolved error (a failing watch or write), if any.
    pub error: Option<String>,
    /// Watch or list requests that failed.
    pub watch_errors: u64,
    /// Writes (status, imports, derived objects, the Lease) that failed.
    pub write_errors: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Watch name → (synced once, current error).
    watches: BTreeMap<&'static str, (bool, Option<String>)>,
    /// Area (lease, status, imports, api) → its unresolved errors.
    write_errors_by_area: BTreeMap<&'static str, Vec<String>>,
    leader: bool,
    watch_errors: u64,
    write_errors: u64,
}

impl State {
    fn report(&self) -> HealthReport {
        let watch_error = self
            .watches
            .iter()
            .find_map(|(w, (_, e))| e.as_ref().map(|e| format!("watching {w}: {e}")));
        HealthReport {
            synced: self.watches.values().all(|(s, _)| *s),
            leader: self.leader,
            error: watch_error.or_else(|| {
                self.write_errors_by_area
                    .values()
                    .find_map(|e| e.first().cloned())
            }),
            watch_errors: self.watch_errors,
            write_errors: self.write_errors,
        }
    }
}

/// Shared health of the integration; every change is published on a watch channel.
#[derive(Clone)]
pub struct Health {
    state: Arc<std::sync::Mutex<State>>,
    tx: Arc<watch::Sender<HealthReport>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            state: Arc::default(),
            tx: Arc::new(watch::channel(HealthReport::default()).0),
        }
    }
}

impl Health {
    /// The report now; the receiver sees every change.
    pub fn subscribe(&self) -> watch::Receiver<HealthReport> {
        self.tx.subscribe()
    }

    /// The report now.
    pub fn now(&self) -> HealthReport {
        self.tx.borrow().clone()
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        let report = {
            let mut s = self.state.lock().expect("health lock");
            f(&mut s);
            s.report()
        };
        self.tx.send_if_modified(|cur| {
            let changed = *cur != report;
            *cur = report;
            changed
        });
    }

    pub(crate) fn watching(&self, what: &'static str) {
        self.update(|s| {
            s.watches.entry(what).or_default();
        });
    }

    fn watch_ok(&self, what: &'static str, synced: bool) {
        self.update(|s| {
            let w = s.watches.entry(what).or_default();
            w.0 |= synced;
            w.1 = None;
        });
    }

    fn watch_failed(&self, what: &'static str, error: String) {
        self.update(|s| {
            s.watch_errors += 1;
            s.watches.entry(what).or_default().1 = Some(error);
        });
    }

    /// The outcome of one pass of the writes of `area`: its unresolved errors (none:
    /// all went through). Each error counts as a failed write.
    pub(crate) fn report(&self, area: &'static str, errors: Vec<String>) {
        self.update(|s| {
            s.write_errors += errors.len() as u64;
            s.write_errors_by_area.insert(area, errors);
        });
    }

    pub(crate) fn set_leader(&self, leader: bool) {
        self.update(|s| s.leader = leader);
    }
}

/// How often a failing watch's resource is probed.
const PROBE: std::time::Duration = std::time::Duration::from_secs(1);

/// A reflector of `api` (filtered by `config`): the store, and the future that keeps it
/// current. Every change wakes `changed`; failures are logged and counted in `health`, and
/// retried with kube-runtime's default backoff.
pub(crate) fn reflect<K>(
    api: kube::Api<K>,
    config: watcher::Config,
    dyntype: K::DynamicType,
    what: &'static str,
    health: Health,
    changed: Arc<Notify>,
) -> (Store<K>, impl Future<Output = ()> + Send + 'static)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype);
    let store = writer.as_reader();
    health.watching(what);
    let run = async move {
        // A resumed watch says nothing until something changes, so while a watch is
        // failing a one-item list of the same resource tells when the API answers again.
        let probe = api.clone();
        let stream = reflector(writer, watcher(api, config).default_backoff());
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        // Backs off to 30 s: a resource that is not served at all is probed rarely.
        let mut every = PROBE;
        loop {
            let event = tokio::select! {
                event = stream.next() => event,
                _ = tokio::time::sleep(every), if failing => {
                    if probe.list_metadata(&ListParams::default().limit(1)).await.is_ok() {
                        failing = false;
                        health.watch_ok(what, false);
                    } else {
                        every = (every * 2).min(std::time::Duration::from_secs(30));
                    }
                    continue;
                }
            };
            if !failing {
                every = PROBE;
            }
            let Some(event) = event else { return };
            failing = event.is_err();
            match event {
                // Objects of a re-list land in the store all at once, at InitDone.
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(watcher::Event::InitDone) => {
                    health.watch_ok(what, true);
                    changed.notify_one();
                }
                Ok(_) => {
                    health.watch_ok(what, false);
                    changed.notify_one();
                }
                Err(e) => {
                    tracing::warn!(watch = what, error = %e, "Kubernetes watch failed; serving the last known state and retrying");
                    health.watch_failed(what, e.to_string());
                }
            }
        }
    };
    (store, run)
}

/// Resolves when `rx` changes; never once its sender is gone (the value is then final).
pub(crate) async fn next_change<T>(rx: &mut watch::Receiver<T>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Publishes `now` on `tx` only if it differs from what is there; whether it did.
pub fn publish<T: PartialEq>(tx: &watch::Sender<Arc<T>>, now: T) -> bool {
    tx.send_if_modified(|cur| {
        let changed = **cur != now;
        if changed {
            *cur = Arc::new(now);
        }
        changed
    })
}

/// How long one write may take: a writer whose API server stalls stops writing well
/// within its Lease, instead of finishing a write long after another replica took over.
pub(crate) const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `write`, failing if it takes longer than [`WRITE_TIMEOUT`].
pub(crate) async fn bounded<T>(write: impl Future<Output = kube::Result<T>>) -> kube::Result<T> {
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(kube::Error::Service("no answer within 5 s".into())))
}
