//! What signed origins cost: time to sign, to verify and merge, and bytes on the wire.
//!
//! Run: `cargo bench -p strait-discovery --bench seal`. Real certificates (ECDSA P-256
//! from `strait pki`), the catalog state machine alone (no sockets). Each figure is the
//! median of 9 batches.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use strait_common::GatewayId;
use strait_common::pki::{CertificateAuthority, Identity};
use strait_discovery::model::{MemberInfo, Port, Service, ServiceKey};
use strait_discovery::seal::Sealing;
use strait_discovery::state::{Catalog, CatalogConfig, Delta, Digest};
use strait_discovery::wire;

const TD: &str = "bench.strait";

fn info(cluster: &str) -> MemberInfo {
    MemberInfo {
        cluster: cluster.into(),
        region: "r".into(),
        zone: String::new(),
        tunnel_addr: "127.0.0.1:4433".parse().unwrap(),
        gossip_addr: "127.0.0.1:4434".parse().unwrap(),
    }
}

fn services(n: usize) -> BTreeMap<ServiceKey, Service> {
    (0..n)
        .map(|i| {
            let s = Service {
                ports: vec![Port {
                    name: "http".into(),
                    port: 80,
                    protocol: "TCP".into(),
                }],
                endpoints: vec![],
                export_to: vec!["*".into()],
                weight: 1,
                headless: false,
                session_affinity: None,
                exported_at_ms: 0,
                selection: Default::default(),
            };
            (ServiceKey::new("default", &format!("svc-{i}")), s)
        })
        .collect()
}

fn sealing(ca: &CertificateAuthority, cluster: &str) -> Arc<Sealing> {
    let c = ca
        .issue_gateway_for(&GatewayId::new(TD, cluster), Duration::from_secs(3600))
        .unwrap();
    let id = Identity::from_pem(&ca.cert_pem, &c.cert_pem, &c.key_pem).unwrap();
    Arc::new(Sealing::new(&id).unwrap())
}

/// Median time per operation of `op`, run `n` times per batch.
fn time(n: u32, mut op: impl FnMut()) -> Duration {
    let mut batches: Vec<Duration> = (0..9)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                op();
            }
            t.elapsed() / n
        })
        .collect();
    batches.sort();
    batches[4]
}

fn bytes(d: &Delta) -> usize {
    wire::delta_to_pb(d).encoded_len()
}

fn main() {
    let ca = CertificateAuthority::generate(TD, Duration::from_secs(3600)).unwrap();
    let t0 = Instant::now();
    println!("| catalog | operation | sealed | unsealed |");
    println!("|---|---|---:|---:|");
    for n in [1, 100] {
        let make = |sealed: bool, cluster: &str| {
            let c = info(cluster);
            if sealed {
                Catalog::sealed(c, 1, CatalogConfig::default(), sealing(&ca, cluster))
            } else {
                Catalog::new(c, 1, CatalogConfig::default())
            }
        };
        let row = |what: &str, f: &dyn Fn(bool) -> String| {
            println!("| {n} services | {what} | {} | {} |", f(true), f(false));
        };
        row("heartbeat (tick: sign)", &|sealed| {
            let mut a = make(sealed, "a");
            a.set_local(services(n));
            format!(
                "{:.1} µs",
                time(200, || {
                    a.tick(t0);
                })
                .as_secs_f64()
                    * 1e6
            )
        });
        row("merge a heartbeat delta (verify)", &|sealed| {
            let mut a = make(sealed, "a");
            a.set_local(services(n));
            let mut b = make(sealed, "b");
            b.apply(a.delta_for(&Digest::new()), t0);
            // Deltas with ever larger heartbeats, made up front.
            let deltas: Vec<Delta> = (0..200 * 9)
                .map(|_| {
                    a.tick(t0);
                    a.delta_for(&b.digest())
                })
                .collect();
            let mut it = deltas.into_iter();
            format!(
                "{:.1} µs",
                time(200, || {
                    b.apply(it.next().unwrap(), t0);
                })
                .as_secs_f64()
                    * 1e6
            )
        });
        row(
            "merge the whole origin (check certificate, hash, verify)",
            &|sealed| {
                let mut a = make(sealed, "a");
                a.set_local(services(n));
                let d = a.delta_for(&Digest::new());
                format!(
                    "{:.1} µs",
                    time(50, || {
                        let mut b = make(sealed, "b");
                        b.apply(d.clone(), t0);
                    })
                    .as_secs_f64()
                        * 1e6
                )
            },
        );
        row("heartbeat delta on the wire", &|sealed| {
            let mut a = make(sealed, "a");
            a.set_local(services(n));
            let b_digest = {
                let mut b = make(sealed, "b");
                b.apply(a.delta_for(&Digest::new()), t0);
                b.digest()
            };
            a.tick(t0);
            format!("{} B", bytes(&a.delta_for(&b_digest)))
        });
        row("whole origin on the wire", &|sealed| {
            let mut a = make(sealed, "a");
            a.set_local(services(n));
            format!("{} B", bytes(&a.delta_for(&Digest::new())))
        });
    }
}
