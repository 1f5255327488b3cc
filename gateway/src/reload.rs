//! Certificate rotation: the files are checked periodically; a changed, valid set is
//! swapped in for new connections while established connections keep their session.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use strait_common::GatewayId;
use strait_common::pki::Identity;

use crate::gateway::Shared;
use crate::metrics::Metrics;
use crate::tunnel;

/// Publishes the certificate's expiry as a metric.
pub fn publish_expiry(metrics: &Metrics, identity: &Identity) {
    let expiry = identity
        .not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    metrics
        .gauge("strait_cert_expiry_timestamp_seconds", &[])
        .set(expiry.as_secs_f64());
}

/// What identifies a version of the files without reading them.
type Fingerprint = Vec<Option<(SystemTime, u64)>>;

fn fingerprint(paths: &[&Path]) -> Fingerprint {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// Polls the certificate files and reloads them when they change.
pub async fn watch_certificates(shared: Arc<Shared>) {
    let tls = &shared.config.tls;
    let paths = [tls.ca.as_path(), tls.cert.as_path(), tls.key.as_path()];
    let me = GatewayId::new(&shared.config.trust_domain, &shared.config.cluster);
    let mut seen = fingerprint(&paths);
    let mut tick = tokio::time::interval(tls.reload_interval.0);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = fingerprint(&paths);
        if now == seen {
            continue;
        }
        seen = now;
        match reload(&shared, &me) {
            Ok(serial) => {
                shared
                    .metrics
                    .counter("strait_cert_reloads_total", &[("result", "ok")])
                    .increment(1);
                tracing::info!(%serial, "certificate reloaded; new connections use it");
            }
            Err(e) => {
                // Keep serving with the old identity: a half-written or wrong file must not
                // take the gateway down.
                shared
                    .metrics
                    .counter("strait_cert_reloads_total", &[("result", "error")])
                    .increment(1);
                tracing::error!(error = %e, "certificate reload failed; keeping the current certificate");
            }
        }
    }
}

fn reload(shared: &Shared, me: &GatewayId) -> anyhow::Result<String> {
    let tls = &shared.config.tls;
    let identity = Identity::load(&tls.ca, &tls.cert, &tls.key, me)?;
    let server = tunnel::server_config(&identity, &shared.config.tunnel)?;
    if let Some(node) = &shared.discovery {
        node.set_identity(Arc::new(identity.clone()))?;
    }
    shared.endpoint.set_server_config(Some(server));
    publish_expiry(&shared.metrics, &identity);
    let serial = identity.serial.clone();
    shared.identity.store(Arc::new(identity));
    Ok(serial)
}

/// Applies what may change at run time from the config file: routing policies, and the
/// exports when no discovery member follows them. `source` is the file watcher when
/// nothing else owns it (it stops when dropped).
pub async fn follow_config(
    shared: Arc<Shared>,
    mut config: tokio::sync::watch::Receiver<Arc<strait_common::Config>>,
    source: Option<strait_discovery::source::FileSource>,
) {
    let _source = source;
    while config.changed().await.is_ok() {
        let c = config.borrow_and_update().clone();
        shared.routing.set_config(c.routing.clone());
        if shared.discovery.is_none() {
            shared.exports.store(Arc::new(c.exports.clone()));
        }
        let rest = |c: &strait_common::Config| {
            let mut c = c.clone();
            c.exports.clear();
            c.routing = Default::default();
            c
        };
        if rest(&c) != rest(&shared.config) {
            tracing::warn!(
                "the config file changed beyond `exports` and `routing`; those changes apply at the next restart"
            );
        }
        tracing::info!("configuration reloaded (exports, routing)");
    }
}
