//! Gateways that find each other through discovery: no static peers or imports.

use std::net::SocketAddr;
use std::time::Duration;

use strait_common::Config;
use strait_common::config::{Export, Peer};
use strait_gateway::Gateway;
use strait_gateway::demo::backend::Backend;
use strait_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Exports of `names` (echo on port 7000) to everyone.
fn exports(names: &[&str], backend: SocketAddr) -> Vec<Export> {
    names
        .iter()
        .map(|n| export(n, 7000, backend, &["*"]))
        .collect()
}

async fn echo_through(addr: SocketAddr) -> Vec<u8> {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"via discovery").await.unwrap();
    let mut b = vec![0u8; 13];
    within(Duration::from_secs(5), c.read_exact(&mut b))
        .await
        .unwrap();
    b
}

async fn catalog_has(g: &Gateway, origin: &str, name: &str) -> bool {
    let rows = admin(g).catalog().await.unwrap();
    assert!(rows.is_ok(), "{rows:?}");
    rows.unwrap()
        .iter()
        .any(|r| r.origin == origin && r.service == format!("default/{name}"))
}

/// Starts a discovery member exporting `names` (echo on port 7000); returns it with the
/// config it started with (to rewrite its file).
async fn member(
    pki: &TestPki,
    name: &str,
    names: &[&str],
    backend: SocketAddr,
    seeds: &[SocketAddr],
    lease: Duration,
) -> (Gateway, Config) {
    let (u, a) = udp();
    let mut config = pki.config(name, a);
    config.exports = exports(names, backend);
    config.discovery = Some(discovery(seeds, lease));
    let g = pki.gateway(name, u, |c| *c = config.clone()).await;
    (g, config)
}

/// g0 exporting `svc0` (echo at `backend`), and g1 joining through it; returned once g1
/// imports `svc0` (leases 5 s), with g0's config.
async fn exporter_and_importer(pki: &TestPki, backend: SocketAddr) -> (Gateway, Config, Gateway) {
    let lease = Duration::from_secs(5);
    let (g0, c0) = member(pki, "g0", &["svc0"], backend, &[], lease).await;
    let seed = g0.discovery_addr().unwrap();
    let (g1, _) = member(pki, "g1", &[], backend, &[seed], lease).await;
    eventually(Duration::from_secs(10), "g1 imports svc0", async || {
        g1.listener("default/svc0", 7000).is_some()
    })
    .await;
    (g0, c0, g1)
}

#[tokio::test]
async fn five_gateways_discover_each_other_and_follow_export_changes() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (g0, c0) = member(
        &pki,
        "g0",
        &["svc0"],
        echo.addr,
        &[],
        Duration::from_secs(2),
    )
    .await;
    let seed = g0.discovery_addr().unwrap();
    let mut gateways = vec![g0];
    let mut configs = vec![c0];
    for i in 1..5 {
        let (g, c) = member(
            &pki,
            &format!("g{i}"),
            &[&format!("svc{i}")],
            echo.addr,
            &[seed],
            Duration::from_secs(2),
        )
        .await;
        gateways.push(g);
        configs.push(c);
    }
    // Every gateway gets a listener for the four services of the others.
    for (i, g) in gateways.iter().enumerate() {
        eventually(
            Duration::from_secs(10),
            "four imported listeners",
            async || g.listeners().len() == 4,
        )
        .await;
        assert!(
            g.listener(&format!("default/svc{i}"), 7000).is_none(),
            "own service is not imported"
        );
    }
    // Traffic flows over peers nobody configured.
    let addr = gateways[1].listener("default/svc3", 7000).unwrap();
    assert_eq!(echo_through(addr).await, b"via discovery");

    // Add an export at g2 by editing its config file: everyone imports it.
    let mut edited = configs[2].clone();
    edited.exports = exports(&["svc2", "extra"], echo.addr);
    pki.write_config(&edited);
    for (i, g) in gateways.iter().enumerate() {
        if i != 2 {
            eventually(
                Duration::from_secs(10),
                "extra gets a listener",
                async || g.listener("default/extra", 7000).is_some(),
            )
            .await;
            eventually(Duration::from_secs(5), "extra in /v1/catalog", async || {
                catalog_has(g, "g2", "extra").await
            })
            .await;
        }
    }
    assert_eq!(
        echo_through(gateways[4].listener("default/extra", 7000).unwrap()).await,
        b"via discovery"
    );
    // And remove it again.
    edited.exports = exports(&["svc2"], echo.addr);
    pki.write_config(&edited);
    for (i, g) in gateways.iter().enumerate() {
        if i != 2 {
            eventually(
                Duration::from_secs(10),
                "extra's listener closes",
                async || g.listener("default/extra", 7000).is_none(),
            )
            .await;
        }
    }
    // An invalid edit is ignored: svc2 stays.
    std::fs::write(pki.dir.path().join("g2.yaml"), "cluster: [broken").unwrap();
    let (code, body) = http_get(gateways[2].admin_addr(), "/v1/services").await;
    assert_eq!(code, 200);
    assert!(body.contains("svc2"));
}

#[tokio::test]
async fn a_killed_gateway_is_marked_down_and_withdrawn_after_its_lease() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (g0, _) = member(
        &pki,
        "g0",
        &["svc0"],
        echo.addr,
        &[],
        Duration::from_secs(2),
    )
    .await;
    let seed = g0.discovery_addr().unwrap();
    let (g1, _) = member(&pki, "g1", &[], echo.addr, &[seed], Duration::from_secs(2)).await;
    let (g2, _) = member(
        &pki,
        "g2",
        &["svc2"],
        echo.addr,
        &[seed],
        Duration::from_secs(2),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "g1 imports svc0 and svc2",
        async || g1.listeners().len() == 2,
    )
    .await;

    drop(g2);
    let killed = tokio::time::Instant::now();
    eventually(Duration::from_secs(5), "g2 marked down", async || {
        let rows = admin(&g1).members().await.unwrap().unwrap();
        rows.iter().any(|m| m.cluster == "g2" && !m.alive)
    })
    .await;
    let detected = killed.elapsed();
    assert!(
        detected < Duration::from_secs(2),
        "failure detection took {detected:?}"
    );
    eventually(
        Duration::from_secs(10),
        "svc2 withdrawn after the lease",
        async || g1.listener("default/svc2", 7000).is_none(),
    )
    .await;
    assert!(
        killed.elapsed() >= Duration::from_secs(2),
        "withdrawn only once the lease ran out"
    );
    assert!(
        g1.listener("default/svc0", 7000).is_some(),
        "the live member's service stays"
    );
    drop(g0);
}

#[tokio::test]
async fn status_and_metrics_show_the_federation() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (g0, _, g1) = exporter_and_importer(&pki, echo.addr).await;
    let text = strait_ops::status::render(g1.admin_addr()).await.unwrap();
    assert!(text.contains("gateway g1: 2 members (discovery)"), "{text}");
    let g0_row = text
        .lines()
        .find(|l| l.starts_with("g0 "))
        .unwrap_or_default();
    assert!(g0_row.contains("alive"), "{text}");
    let svc_row = text
        .lines()
        .find(|l| l.starts_with("default/svc0"))
        .unwrap_or_default();
    assert!(
        svc_row.contains("7000") && svc_row.ends_with("g0"),
        "{text}"
    );
    let (_, m) = http_get(g1.admin_addr(), "/metrics").await;
    assert_eq!(
        metric(&m, "strait_discovery_members{state=\"alive\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(metric(&m, "strait_discovery_catalog_entries"), Some(1.0));
    assert!(metric(&m, "strait_discovery_bytes_total{direction=\"sent\"}").unwrap_or(0.0) > 0.0);
    // A gateway without discovery says so and shows its static peers instead.
    let (u2, _) = udp();
    let g2 = pki
        .gateway("g2", u2, |c| {
            c.peers.push(Peer {
                cluster: "g0".into(),
                address: g0.tunnel_addr(),
            })
        })
        .await;
    let text = strait_ops::status::render(g2.admin_addr()).await.unwrap();
    assert!(
        text.contains("1 static peers (no discovery)") && text.contains("g0"),
        "{text}"
    );
}

/// The serial of the certificate `addr` presents on the gossip port.
async fn gossip_serial(pki: &TestPki, addr: SocketAddr, expect: &str) -> String {
    let c = pki.issue("prober");
    let id =
        strait_common::pki::Identity::from_pem(&pki.ca.cert_pem, &c.cert_pem, &c.key_pem).unwrap();
    let mut tls = id.client_config(expect).unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("strait-gossip").unwrap();
    let conn = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap();
    let certs = conn.get_ref().1.peer_certificates().unwrap().to_vec();
    strait_common::pki::Identity::from_parts(
        certs,
        rustls::pki_types::PrivateKeyDer::Pkcs8(vec![0u8].into()),
        rustls::RootCertStore::empty(),
    )
    .unwrap()
    .serial
}

#[tokio::test]
async fn rotated_certificates_reach_the_gossip_port_too() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (g0, _) = member(
        &pki,
        "g0",
        &["svc0"],
        echo.addr,
        &[],
        Duration::from_secs(5),
    )
    .await;
    let seed = g0.discovery_addr().unwrap();
    let old = g0.identity().serial.clone();
    assert_eq!(gossip_serial(&pki, seed, "g0").await, old);
    pki.write("g0", &pki.issue("g0"));
    eventually(Duration::from_secs(10), "rotation loaded", async || {
        g0.identity().serial != old
    })
    .await;
    let new = g0.identity().serial.clone();
    assert_eq!(
        gossip_serial(&pki, seed, "g0").await,
        new,
        "gossip presents the rotated certificate"
    );
    // Gossip keeps working across the rotation: a new member joins through g0.
    let (g1, _) = member(&pki, "g1", &[], echo.addr, &[seed], Duration::from_secs(5)).await;
    eventually(Duration::from_secs(10), "g1 imports svc0", async || {
        g1.listener("default/svc0", 7000).is_some()
    })
    .await;
}

#[tokio::test]
async fn a_restarted_gateway_replaces_its_old_incarnation_at_once() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (g0, _) = member(&pki, "g0", &[], echo.addr, &[], Duration::from_secs(30)).await;
    let seed = g0.discovery_addr().unwrap();
    let (g1, _) = member(
        &pki,
        "g1",
        &["old"],
        echo.addr,
        &[seed],
        Duration::from_secs(30),
    )
    .await;
    eventually(Duration::from_secs(10), "g0 imports old", async || {
        g0.listener("default/old", 7000).is_some()
    })
    .await;
    drop(g1);
    // Back with a new generation and different exports; the 30 s lease of the old
    // incarnation does not keep `old` alive.
    let (g1, _) = member(
        &pki,
        "g1",
        &["new"],
        echo.addr,
        &[seed],
        Duration::from_secs(30),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "new imported, old gone",
        async || {
            g0.listener("default/new", 7000).is_some() && g0.listener("default/old", 7000).is_none()
        },
    )
    .await;
    assert_eq!(
        echo_through(g0.listener("default/new", 7000).unwrap()).await,
        b"via discovery"
    );
    let rows = admin(&g0).members().await.unwrap().unwrap();
    let g1_row = rows.iter().find(|m| m.cluster == "g1").unwrap().clone();
    assert!(g1_row.alive, "{g1_row:?}");
    drop(g1);
}

#[tokio::test]
async fn connections_through_a_member_whose_lease_ran_out_keep_flowing() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (g0, _) = member(
        &pki,
        "g0",
        &["svc0"],
        echo.addr,
        &[],
        Duration::from_secs(2),
    )
    .await;
    // g1 has fault injection on, so a drill can cut its gossip.
    let token = "0123456789abcdef0123456789abcdef";
    let token_file = pki.dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let (u1, a1) = udp();
    let mut c1 = pki.config("g1", a1);
    c1.discovery = Some(discovery(
        &[g0.discovery_addr().unwrap()],
        Duration::from_secs(2),
    ));
    c1.faults = Some(strait_common::config::FaultInjection {
        token_file,
        max_duration: ms(60_000),
    });
    let g1 = pki.gateway("g1", u1, |c| *c = c1).await;
    eventually(Duration::from_secs(10), "g1 imports svc0", async || {
        g1.listener("default/svc0", 7000).is_some()
    })
    .await;
    let mut held = TcpStream::connect(g1.listener("default/svc0", 7000).unwrap())
        .await
        .unwrap();
    let mut b = [0u8; 6];
    held.write_all(b"before").await.unwrap();
    within(Duration::from_secs(5), held.read_exact(&mut b))
        .await
        .unwrap();

    // Gossip cut: g0's lease runs out in g1's view, so g0 is no longer a peer of g1.
    let cut = strait_common::api::FaultRequest {
        fault: strait_common::api::Fault::CutDiscovery,
        duration: ms(20_000),
    };
    let admin = strait_ops::client::Admin::with_token(g1.admin_addr(), token);
    admin.inject(&cut).await.unwrap().unwrap();
    eventually(
        Duration::from_secs(10),
        "g0 removed from g1's peers",
        async || {
            !admin
                .peers()
                .await
                .unwrap()
                .iter()
                .any(|p| p.cluster == "g0")
        },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "the import is withdrawn",
        async || g1.listener("default/svc0", 7000).is_none(),
    )
    .await;

    // The connection opened before keeps its stream, and its stream the tunnel.
    held.write_all(b"after!").await.unwrap();
    within(Duration::from_secs(5), held.read_exact(&mut b))
        .await
        .unwrap();
    assert_eq!(&b, b"after!");
    admin.undo_all().await.unwrap().unwrap();
}

#[tokio::test]
async fn a_gateway_shut_down_starts_again_at_once_on_the_same_ports() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (g0, c0, g1) = exporter_and_importer(&pki, echo.addr).await;
    let seed = g0.discovery_addr().unwrap();
    assert_eq!(
        echo_through(g1.listener("default/svc0", 7000).unwrap()).await,
        b"via discovery"
    );
    // Tunnels both ways, gossip and the admin API are all in use; then a restart.
    let mut again = c0.clone();
    again.listen.admin = g0.admin_addr();
    again.listen.discovery = Some(seed);
    assert_eq!(again.listen.tunnel, g0.tunnel_addr());
    g0.shutdown_and_release().await;
    let path = pki.write_config(&again);
    let config = Config::load(&path).unwrap();
    let g0 = Gateway::start(config)
        .await
        .expect("every port is free again after shutdown");
    assert_eq!(g0.admin_addr(), again.listen.admin);
    // While g1 reconnects, connections may be refused; then they are served again.
    eventually(Duration::from_secs(10), "g1 reaches g0 again", async || {
        let Some(addr) = g1.listener("default/svc0", 7000) else {
            return false;
        };
        let echoed = async {
            let mut c = TcpStream::connect(addr).await.ok()?;
            c.write_all(b"again").await.ok()?;
            let mut b = [0u8; 5];
            c.read_exact(&mut b).await.ok()?;
            Some(b)
        };
        tokio::time::timeout(Duration::from_secs(1), echoed)
            .await
            .ok()
            .flatten()
            == Some(*b"again")
    })
    .await;
}

#[tokio::test]
async fn a_gateway_dialling_a_dead_peer_starts_again_at_once_on_the_same_ports() {
    let pki = TestPki::new();
    let (gone, gone_addr) = udp();
    drop(gone);
    let (u, a) = udp();
    let mut config = pki.config("g0", a);
    config.peers.push(Peer {
        cluster: "gone".into(),
        address: gone_addr,
    });
    let g0 = pki.gateway("g0", u, |c| *c = config.clone()).await;
    // A handshake to the dead peer is under way when the gateway stops.
    eventually(
        Duration::from_secs(5),
        "a handshake in flight",
        async || g0.tunnel_connections() >= 1,
    )
    .await;
    config.listen.admin = g0.admin_addr();
    config.listen.discovery = None;
    g0.shutdown_and_release().await;
    let again = Config::load(&pki.write_config(&config)).unwrap();
    let g0 = Gateway::start(again)
        .await
        .expect("the port is free once the handshake has drained");
    assert_eq!(g0.tunnel_addr(), a);
}

#[tokio::test]
async fn signed_origins_stay_trusted_through_a_root_rotation() {
    use std::time::SystemTime;
    use strait_common::pki::{CertificateAuthority, write_atomic};

    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    // Short leases: an origin whose heartbeats stopped being accepted would be withdrawn.
    let lease = Duration::from_secs(3);
    let (g0, mut c0) = member(&pki, "g0", &["svc0"], echo.addr, &[], lease).await;
    let seed = g0.discovery_addr().unwrap();
    let (g1, _) = member(&pki, "g1", &[], echo.addr, &[seed], lease).await;
    let (g2, _) = member(&pki, "g2", &[], echo.addr, &[seed], lease).await;
    let gateways = [("g0", &g0), ("g1", &g1), ("g2", &g2)];
    for g in [&g1, &g2] {
        eventually(Duration::from_secs(10), "svc0 imported", async || {
            g.listener("default/svc0", 7000).is_some()
        })
        .await;
    }
    let reloads = |g: &Gateway| {
        metric(
            &g.render_metrics(),
            "strait_cert_reloads_total{result=\"ok\"}",
        )
        .unwrap_or(0.0)
    };
    let refused_origins = |g: &Gateway| {
        metric(
            &g.render_metrics(),
            "strait_discovery_rejected_total{what=\"origin\"}",
        )
        .unwrap_or(0.0)
    };
    let step = async |what: &str, change: &dyn Fn()| {
        let before: Vec<f64> = gateways.iter().map(|(_, g)| reloads(g)).collect();
        change();
        eventually(Duration::from_secs(10), what, async || {
            gateways
                .iter()
                .zip(&before)
                .all(|((_, g), b)| reloads(g) > *b)
        })
        .await;
        // Gossip goes on with the new certificates: every member keeps every origin.
        for (_, g) in &gateways[1..] {
            assert!(catalog_has(g, "g0", "svc0").await, "{what}");
        }
    };
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    let new_ca = CertificateAuthority::generate(TD, day).unwrap();
    let ca_file = pki.ca_path();
    let both = strait_common::pki::bundle(&[
        (ca_file.clone(), pki.ca.cert_pem.clone()),
        ("new/ca.pem".into(), new_ca.cert_pem.clone()),
    ])
    .unwrap();
    step("both roots trusted", &|| {
        write_atomic(&ca_file, both.as_bytes(), false).unwrap()
    })
    .await;
    step("leaves of the new root", &|| {
        for (cluster, _) in gateways {
            pki.write(
                cluster,
                &issue_with(&new_ca, TD, cluster, now - day, now + day),
            );
        }
    })
    .await;
    step("the old root retired", &|| {
        write_atomic(&ca_file, new_ca.cert_pem.as_bytes(), false).unwrap()
    })
    .await;

    // Heartbeats signed with the new keys are taken: after more than a lease, every member
    // still holds every origin alive.
    // (A wait for time to pass, which the claim is about; nothing to synchronise with.)
    tokio::time::sleep(lease + Duration::from_secs(1)).await;
    for (name, g) in gateways {
        let rows = admin(g).members().await.unwrap().unwrap();
        assert_eq!(rows.len(), 3, "{name}: {rows:?}");
        assert!(rows.iter().all(|m| m.alive), "{name}: {rows:?}");
    }
    assert!(catalog_has(&g2, "g0", "svc0").await);
    // Origins signed with the new keys reach everyone: a change after the rotation.
    c0.exports = exports(&["svc0", "after"], echo.addr);
    pki.write_config(&c0);
    for g in [&g1, &g2] {
        eventually(
            Duration::from_secs(15),
            "the change after the rotation",
            async || g.listener("default/after", 7000).is_some(),
        )
        .await;
        assert_eq!(
            echo_through(g.listener("default/after", 7000).unwrap()).await,
            b"via discovery"
        );
    }
    for (name, g) in gateways {
        assert_eq!(refused_origins(g), 0.0, "{name} refused a genuine origin");
    }
}
