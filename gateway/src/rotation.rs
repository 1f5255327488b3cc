//! Certificate rotation: the files are checked periodically; a changed, valid set is
//! installed where the identity is presented (the tunnel's server config, the gossip
//! member) and swapped in for new outbound handshakes, while established connections keep
//! their session. A bad set is counted and ignored: the gateway keeps its certificate.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use strait_common::config::TlsFiles;
use strait_common::pki::Identity;
use strait_common::{GatewayId, config::TunnelTuning};
use strait_discovery::node::Node;

use crate::metrics::{Desc, Registry};
use crate::tunnel::CurrentIdentity;

const RELOADS: Desc = Desc::counter(
    "strait_cert_reloads_total",
    &["result"],
    "Certificate reloads from disk, by result (ok, error).",
);
const EXPIRY: Desc = Desc::gauge(
    "strait_cert_expiry_timestamp_seconds",
    &[],
    "Expiry of the certificate in use (Unix time).",
);
/// Certificate rotation's metrics.
pub(crate) const METRICS: &[Desc] = &[RELOADS, EXPIRY];

/// What rotation counts.
#[derive(Clone)]
pub struct CertMetrics {
    ok: metrics::Counter,
    error: metrics::Counter,
    expiry: metrics::Gauge,
}

impl CertMetrics {
    /// The certificate metrics in `registry`.
    pub fn new(registry: &Registry) -> Self {
        registry.describe(METRICS);
        Self {
            ok: registry.counter(&RELOADS, &["ok"]),
            error: registry.counter(&RELOADS, &["error"]),
            expiry: registry.gauge(&EXPIRY, &[]),
        }
    }

    /// Publishes the expiry of the certificate in use.
    pub fn expiry(&self, identity: &Identity) {
        let expiry = identity
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.expiry.set(expiry.as_secs_f64());
    }
}

/// The step that presents a prepared identity; it cannot fail.
pub type Commit<'a> = Box<dyn FnOnce() + 'a>;

/// Somewhere a new identity must be presented besides [`CurrentIdentity`]. Rotation
/// prepares every target before committing any, so a certificate one of them refuses
/// reaches none.
pub trait Install: Send + Sync {
    /// Checks that `identity` can be presented here; the step that presents it.
    fn prepare(&self, identity: &Identity) -> anyhow::Result<Commit<'_>>;
}

/// The tunnel's server side: new inbound handshakes present the new certificate.
pub struct TunnelServer {
    /// The QUIC endpoint.
    pub endpoint: quinn::Endpoint,
    /// Its tuning (the server config carries the transport settings).
    pub tuning: TunnelTuning,
}

impl Install for TunnelServer {
    fn prepare(&self, identity: &Identity) -> anyhow::Result<Commit<'_>> {
        let server = crate::tunnel::server_config(identity, &self.tuning)?;
        Ok(Box::new(move || {
            self.endpoint.set_server_config(Some(server))
        }))
    }
}

impl Install for Arc<Node> {
    fn prepare(&self, identity: &Identity) -> anyhow::Result<Commit<'_>> {
        let prepared = Node::prepare_identity(Arc::new(identity.clone()))?;
        Ok(Box::new(move || self.use_identity(prepared)))
    }
}

/// What identifies a version of the files without reading them.
type Fingerprint = Vec<Option<(SystemTime, u64)>>;

/// What one look at the files found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// The files did not change.
    Unchanged,
    /// A new certificate is in use.
    Rotated,
    /// The files changed but are not a valid identity for this gateway; the old stays.
    Refused,
}

/// Watches the certificate files of one gateway.
pub struct Rotation {
    files: TlsFiles,
    me: GatewayId,
    current: CurrentIdentity,
    targets: Vec<Box<dyn Install>>,
    metrics: CertMetrics,
    seen: Fingerprint,
}

impl Rotation {
    /// Rotation of the files in `files` for `me`, starting from the files as they are now.
    pub fn new(
        files: TlsFiles,
        me: GatewayId,
        current: CurrentIdentity,
        targets: Vec<Box<dyn Install>>,
        metrics: CertMetrics,
    ) -> Self {
        metrics.expiry(&current.load());
        let mut r = Self {
            files,
            me,
            current,
            targets,
            metrics,
            seen: Vec::new(),
        };
        r.seen = r.fingerprint();
        r
    }

    fn paths(&self) -> [&PathBuf; 3] {
        [&self.files.ca, &self.files.cert, &self.files.key]
    }

    fn fingerprint(&self) -> Fingerprint {
        self.paths()
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    }

    /// Looks at the files once; installs them when they changed and are valid.
    pub fn check(&mut self) -> Checked {
        let now = self.fingerprint();
        if now == self.seen {
            return Checked::Unchanged;
        }
        self.seen = now;
        match self.reload() {
            Ok(serial) => {
                self.metrics.ok.increment(1);
                tracing::info!(%serial, "certificate reloaded; new connections use it");
                Checked::Rotated
            }
            Err(e) => {
                // Keep serving with the old identity: a half-written or wrong file must not
                // take the gateway down.
                self.metrics.error.increment(1);
                tracing::error!(error = %e, "certificate reload failed; keeping the current certificate");
                Checked::Refused
            }
        }
    }

    fn reload(&self) -> anyhow::Result<String> {
        let f = &self.files;
        let identity = Identity::load(&f.ca, &f.cert, &f.key, &self.me)?;
        let commits = self
            .targets
            .iter()
            .map(|t| t.prepare(&identity))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for commit in commits {
            commit();
        }
        self.metrics.expiry(&identity);
        let serial = identity.serial.clone();
        self.current.store(identity);
        Ok(serial)
    }

    /// Checks every `tls.reload_interval` until the gateway stops.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.files.reload_interval.0);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.check();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use strait_common::pki::{CertificateAuthority, write_atomic};

    use super::*;

    /// Records the serials installed; refuses when told to.
    #[derive(Default, Clone)]
    struct Fake(Arc<Mutex<Vec<String>>>, Arc<std::sync::atomic::AtomicBool>);

    impl Install for Fake {
        fn prepare(&self, identity: &Identity) -> anyhow::Result<Commit<'_>> {
            anyhow::ensure!(
                !self.1.load(std::sync::atomic::Ordering::Relaxed),
                "refused"
            );
            let serial = identity.serial.clone();
            Ok(Box::new(move || self.0.lock().unwrap().push(serial)))
        }
    }

    struct Setup {
        dir: tempfile::TempDir,
        ca: CertificateAuthority,
        files: TlsFiles,
        me: GatewayId,
        writes: std::sync::atomic::AtomicU64,
    }

    impl Setup {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ca =
                CertificateAuthority::generate("test.strait", Duration::from_secs(3600)).unwrap();
            write_atomic(&dir.path().join("ca.pem"), ca.cert_pem.as_bytes(), false).unwrap();
            let files = TlsFiles {
                ca: dir.path().join("ca.pem"),
                cert: dir.path().join("east.pem"),
                key: dir.path().join("east.key"),
                reload_interval: strait_common::units::HumanDuration(Duration::from_millis(10)),
            };
            let s = Setup {
                dir,
                ca,
                files,
                me: GatewayId::new("test.strait", "east"),
                writes: Default::default(),
            };
            s.issue("east");
            s
        }

        /// Writes a certificate for `cluster` where east's belongs; its serial.
        fn issue(&self, cluster: &str) -> String {
            let cert = self
                .ca
                .issue_gateway_for(
                    &GatewayId::new("test.strait", cluster),
                    Duration::from_secs(3600),
                )
                .unwrap();
            cert.save(self.dir.path(), "east").unwrap();
            // File times are coarse (a clock tick): give each write its own, as writes
            // seconds apart would have.
            let n = self
                .writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let at = SystemTime::now() + Duration::from_secs(n + 1);
            std::fs::File::options()
                .write(true)
                .open(&self.files.cert)
                .and_then(|f| f.set_modified(at))
                .unwrap();
            self.load().serial
        }

        fn load(&self) -> Identity {
            let f = &self.files;
            Identity::load(
                &f.ca,
                &f.cert,
                &f.key,
                &GatewayId::new("test.strait", "east"),
            )
            .or_else(|_| {
                // A certificate for another cluster: read it without the identity check.
                let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap();
                Identity::from_pem(&read(&f.ca), &read(&f.cert), &read(&f.key))
                    .map_err(|e| anyhow::anyhow!(e))
            })
            .unwrap()
        }
    }

    #[test]
    fn a_changed_valid_certificate_is_installed_everywhere_and_a_bad_one_nowhere() {
        let s = Setup::new();
        let current = CurrentIdentity::new(s.load());
        let first = current.load().serial.clone();
        let (fake, refusing) = (Fake::default(), Fake::default());
        let registry = Registry::new();
        let mut r = Rotation::new(
            s.files.clone(),
            s.me.clone(),
            current.clone(),
            vec![Box::new(fake.clone()), Box::new(refusing.clone())],
            CertMetrics::new(&registry),
        );
        assert!(matches!(r.check(), Checked::Unchanged));

        let second = s.issue("east");
        assert!(matches!(r.check(), Checked::Rotated));
        assert_eq!(current.load().serial, second, "new handshakes use it");
        assert_eq!(*fake.0.lock().unwrap(), vec![second.clone()]);
        assert_eq!(*refusing.0.lock().unwrap(), vec![second.clone()]);
        assert!(matches!(r.check(), Checked::Unchanged), "installed once");

        s.issue("west");
        assert!(
            matches!(r.check(), Checked::Refused),
            "another cluster's certificate"
        );
        assert_eq!(current.load().serial, second, "the old one stays");
        assert_eq!(fake.0.lock().unwrap().len(), 1);

        refusing.1.store(true, std::sync::atomic::Ordering::Relaxed);
        s.issue("east");
        assert!(
            matches!(r.check(), Checked::Refused),
            "the second target refused it"
        );
        assert_eq!(current.load().serial, second, "not swapped half-way");
        assert_eq!(
            fake.0.lock().unwrap().len(),
            1,
            "the first target never presented what the second refused"
        );

        let text = registry.render();
        assert!(
            text.contains("strait_cert_reloads_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("strait_cert_reloads_total{result=\"error\"} 2"),
            "{text}"
        );
        assert_ne!(first, second);
    }
}
