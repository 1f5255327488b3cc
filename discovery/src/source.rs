//! Local sources of this cluster's exports. A source publishes the current list on a watch
//! channel; the gateway serves it to peers and the gossip member advertises it. The file
//! source re-reads the gateway's config file; a Kubernetes source (ServiceExport objects)
//! plugs in behind the same trait.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use strait_common::Config;
use strait_common::config::Export;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::model::{Endpoint, Port, Service, ServiceKey};

/// Where this cluster's exports come from.
pub trait ExportSource: Send + Sync {
    /// The current exports; the receiver sees every change.
    fn watch(&self) -> watch::Receiver<Arc<Vec<Export>>>;
}

/// Exports read from the gateway's config file, re-read when the file changes. An invalid
/// edit is reported and ignored: the last good exports stay. The whole last good config is
/// published too, for the other sections that apply at run time (routing policies).
pub struct FileSource {
    rx: watch::Receiver<Arc<Vec<Export>>>,
    config: watch::Receiver<Arc<Config>>,
    task: JoinHandle<()>,
}

impl Drop for FileSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ExportSource for FileSource {
    fn watch(&self) -> watch::Receiver<Arc<Vec<Export>>> {
        self.rx.clone()
    }
}

impl FileSource {
    /// Watches `path`, starting from `initial` (what the gateway started with).
    pub fn start(path: PathBuf, initial: Config, interval: Duration) -> FileSource {
        let (tx, rx) = watch::channel(Arc::new(initial.exports.clone()));
        let (config_tx, config) = watch::channel(Arc::new(initial));
        let task = tokio::spawn(async move {
            let stamp = |p: &PathBuf| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            };
            let mut seen: Option<(SystemTime, u64)> = stamp(&path);
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let now = stamp(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                match Config::load(&path) {
                    Ok(c) => {
                        tx.send_if_modified(|cur| {
                            let changed = **cur != c.exports;
                            if changed {
                                tracing::info!(
                                    exports = c.exports.len(),
                                    "exports reloaded from the config file"
                                );
                                *cur = Arc::new(c.exports.clone());
                            }
                            changed
                        });
                        config_tx.send_if_modified(|cur| {
                            let changed = **cur != c;
                            if changed {
                                *cur = Arc::new(c);
                            }
                            changed
                        });
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "config file changed but is invalid; keeping the current configuration")
                    }
                }
            }
        });
        FileSource { rx, config, task }
    }

    /// The last good configuration; the receiver sees every change.
    pub fn config(&self) -> watch::Receiver<Arc<Config>> {
        self.config.clone()
    }
}

/// The catalog form of this cluster's exports.
pub fn to_catalog(exports: &[Export], zone: &str) -> BTreeMap<ServiceKey, Service> {
    exports
        .iter()
        .map(|e| {
            let service = Service {
                ports: e
                    .ports
                    .iter()
                    .map(|p| Port {
                        name: p.name.clone(),
                        port: p.port,
                        protocol: "TCP".into(),
                    })
                    .collect(),
                endpoints: e
                    .endpoints
                    .iter()
                    .map(|ep| Endpoint {
                        address: ep.address,
                        hostname: ep.hostname.clone(),
                        ready: ep.ready,
                        zone: zone.to_owned(),
                    })
                    .collect(),
                export_to: e.export_to.clone(),
                weight: e.weight,
                headless: e.headless,
                session_affinity: e
                    .session_affinity
                    .map(|d| u32::try_from(d.0.as_secs()).unwrap_or(u32::MAX)),
                exported_at_ms: e.exported_at_ms,
                selection: e.selection.clone(),
            };
            (ServiceKey::new(&e.namespace, &e.name), service)
        })
        .collect()
}
