//! The tunnel end to end: real gateways on loopback, real QUIC, real mTLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use strait_common::Config;
use strait_common::config::{Endpoint, Export, Peer, ServicePort};
use strait_common::pki::{CertificateAuthority, Identity};
use strait_gateway::Gateway;
use strait_gateway::demo::backend::Backend;
use strait_gateway::tunnel::header::{Status, StreamRequest};
use strait_gateway::tunnel::outbound::{OpenError, open_stream};
use strait_gateway::tunnel::peers::PeerStatus;
use strait_gateway::tunnel::{self};
use strait_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The request for the `echo` service every test exports.
fn echo_request() -> StreamRequest {
    StreamRequest {
        service: "echo".into(),
        namespace: "default".into(),
        port: 7000,
        endpoint: None,
    }
}

/// Starts "east", exporting `echo` (port 7000, forwarding to `backend`) to everyone.
async fn exporter(pki: &TestPki, udp: std::net::UdpSocket, backend: SocketAddr) -> Gateway {
    pki.gateway("east", udp, |c| {
        c.exports.push(export("echo", 7000, backend, &["*"]))
    })
    .await
}

/// East exports `echo` (port 7000) to everyone, then whatever `extra_east` adds; west
/// imports it. Returns both and the local listener address on west.
async fn pair(
    pki: &TestPki,
    backend: SocketAddr,
    extra_east: impl FnOnce(&mut Config),
) -> (Gateway, Gateway, SocketAddr) {
    let (ue, ae) = udp();
    let (uw, _) = udp();
    let east = pki
        .gateway("east", ue, |c| {
            c.exports.push(export("echo", 7000, backend, &["*"]));
            extra_east(c);
        })
        .await;
    let west = pki
        .gateway("west", uw, |c| {
            import_from(c, "echo", 7000, &[("east", ae)])
        })
        .await;
    wait_peer(&west, "east", PeerStatus::Up).await;
    let listener = west.listener("default/echo", 7000).expect("listener bound");
    (east, west, listener)
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn one_kib_round_trips() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (_east, _west, addr) = pair(&pki, echo.addr, |_| {}).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    let data = pattern(1024, 7);
    c.write_all(&data).await.unwrap();
    let mut back = vec![0u8; 1024];
    within(Duration::from_secs(5), c.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(back, data);
}

#[tokio::test]
async fn hundred_mib_both_ways() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (_east, west, addr) = pair(&pki, echo.addr, |_| {}).await;
    // Path MTU discovery reaches the default bound (a jumbo frame) on loopback.
    let jumbo = strait_common::config::TunnelTuning::default().max_udp_payload;
    let mtu = async || {
        let peers = admin(&west).peers().await.unwrap();
        peers
            .iter()
            .find(|p| p.cluster == "east")
            .and_then(|p| p.mtu)
    };
    eventually(
        Duration::from_secs(10),
        "discovery reaches the bound",
        async || mtu().await == Some(jumbo),
    )
    .await;
    let c = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = c.into_split();
    const LEN: usize = 100 << 20;
    let chunk = pattern(1 << 20, 42);
    let expected = {
        let mut h = Sha256::new();
        for _ in 0..100 {
            h.update(&chunk);
        }
        h.finalize()
    };
    let writer = tokio::spawn(async move {
        for _ in 0..100 {
            w.write_all(&chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let reader = async move {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            total += n;
        }
        (total, h.finalize())
    };
    let (total, digest) = within(Duration::from_secs(120), reader).await;
    writer.await.unwrap();
    assert_eq!(total, LEN, "every byte came back, then a clean EOF");
    assert_eq!(digest, expected, "bytes arrived intact and in order");
    // Full-size batches were sent and delivered: no fall back to 1,200-byte packets (ten
    // jumbo datagrams in one GSO send were refused by the kernel, every full batch lost,
    // and quinn took that for an MTU black hole).
    assert_eq!(
        mtu().await,
        Some(jumbo),
        "the tunnel still sends full-size datagrams"
    );
    let m = west.render_metrics();
    assert_eq!(
        metric(
            &m,
            "strait_bytes_total{service=\"default/echo\",peer=\"east\",side=\"outbound\",direction=\"sent\"}"
        ),
        Some(LEN as f64)
    );
}

#[tokio::test]
async fn half_close_keeps_the_other_direction_open() {
    // The backend reads until the client half-closes, then answers and closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(format!("got {} bytes", got.len()).as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
    });
    let pki = TestPki::new();
    let (_east, _west, addr) = pair(&pki, backend, |_| {}).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(&[1u8; 10_000]).await.unwrap();
    c.shutdown().await.unwrap();
    let mut reply = String::new();
    within(Duration::from_secs(5), c.read_to_string(&mut reply))
        .await
        .unwrap();
    assert_eq!(reply, "got 10000 bytes");
}

#[tokio::test]
async fn backend_reset_reaches_the_client_as_reset() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).await.unwrap();
        tunnel::splice::abort_on_close(&s);
    });
    let pki = TestPki::new();
    let (_east, _west, addr) = pair(&pki, backend, |_| {}).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 16];
    let err = within(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect_err("a reset, not a clean EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn thousand_concurrent_connections_share_one_quic_connection() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (east, west, addr) = pair(&pki, echo.addr, |_| {}).await;
    let mut conns = Vec::new();
    for i in 0..1000u32 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&i.to_be_bytes()).await.unwrap();
        conns.push(c);
    }
    // All 1,000 are open at once; each gets its own bytes back.
    let mut checks = tokio::task::JoinSet::new();
    for (i, mut c) in conns.into_iter().enumerate() {
        checks.spawn(async move {
            let mut b = [0u8; 4];
            c.read_exact(&mut b).await.unwrap();
            assert_eq!(u32::from_be_bytes(b), i as u32);
            c
        });
    }
    let held = within(Duration::from_secs(30), checks.join_all()).await;
    assert_eq!(held.len(), 1000);
    let m = east.render_metrics();
    assert_eq!(
        metric(
            &m,
            "strait_active_connections{service=\"default/echo\",peer=\"west\",direction=\"inbound\"}"
        ),
        Some(1000.0)
    );
    assert_eq!(
        east.tunnel_connections(),
        1,
        "one QUIC connection carries every stream"
    );
    assert_eq!(west.peer("east").unwrap().borrow().clone().connects, 1);
}

/// A client presenting `cert` that trusts any server, so that only the server's
/// verification of the client decides the outcome.
async fn raw_connect(
    cert: Option<&strait_common::pki::IssuedCert>,
    server: SocketAddr,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    raw_connect_with(cert, server, Arc::new(AcceptAnyServer)).await
}

/// Like [`raw_connect`], checking the server with `verifier`.
async fn raw_connect_with(
    cert: Option<&strait_common::pki::IssuedCert>,
    server: SocketAddr,
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    use rustls::pki_types::pem::PemObject;
    let builder = rustls::ClientConfig::builder_with_provider(strait_common::pki::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = match cert {
        Some(c) => {
            let chain = rustls::pki_types::CertificateDer::pem_slice_iter(c.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key =
                rustls::pki_types::PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![strait_common::pki::ALPN.to_vec()];
    let cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let ep = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    ep.connect_with(cfg, server, "east").unwrap().await
}

/// A proxied connection through `addr`, echoed once: it holds a stream open on the tunnel.
async fn held_connection(addr: SocketAddr) -> TcpStream {
    let mut held = TcpStream::connect(addr).await.unwrap();
    held.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    within(Duration::from_secs(5), held.read_exact(&mut b))
        .await
        .unwrap();
    held
}

/// West's tunnel connection to east.
fn tunnel_to_east(west: &Gateway) -> quinn::Connection {
    west.peer("east")
        .unwrap()
        .borrow()
        .connection
        .clone()
        .unwrap()
}

/// Whether the server refused: the handshake fails, or the connection carries no stream.
async fn refused(res: Result<quinn::Connection, quinn::ConnectionError>) -> bool {
    match res {
        Err(_) => true,
        Ok(conn) => {
            let req = echo_request();
            open_stream(&conn, &req, &[], Duration::from_secs(2))
                .await
                .is_err()
        }
    }
}

#[tokio::test]
async fn bad_peer_certificates_are_refused() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (ue, ae) = udp();
    let east = exporter(&pki, ue, echo.addr).await;
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);

    // Control: a good certificate is admitted and served, so the refusals below are
    // about the certificates.
    assert!(
        !refused(raw_connect(Some(&pki.issue("west")), ae).await).await,
        "a valid peer is served"
    );

    let other_ca = CertificateAuthority::generate(TD, day).unwrap();
    let cases = [
        (
            "another CA",
            issue_with(&other_ca, TD, "west", now - day, now + day),
        ),
        (
            "wrong trust domain",
            issue_with(&pki.ca, "other.example", "west", now - day, now + day),
        ),
        (
            "expired",
            issue_with(&pki.ca, TD, "west", now - 2 * day, now - day),
        ),
    ];
    for (what, cert) in &cases {
        assert!(
            refused(raw_connect(Some(cert), ae).await).await,
            "{what}: peer was admitted"
        );
    }
    // A valid certificate of the gateway's own cluster (a copied key, or a seed that
    // points at itself): no peer needs it.
    assert!(
        refused(raw_connect(Some(&pki.issue("east")), ae).await).await,
        "own identity: peer was admitted"
    );
    assert!(
        refused(raw_connect(None, ae).await).await,
        "no client certificate: peer was admitted"
    );
    eventually(
        Duration::from_secs(5),
        "five refused handshakes counted",
        async || metric(&east.render_metrics(), "strait_handshakes_rejected_total") >= Some(5.0),
    )
    .await;
}

#[tokio::test]
async fn a_restarted_peer_is_reached_by_the_next_fresh_handshake() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (ue, ae) = udp();
    let east = exporter(&pki, ue, echo.addr).await;
    let (uw, _) = udp();
    let west = pki
        .gateway("west", uw, |c| {
            import_from(c, "echo", 7000, &[("east", ae)])
        })
        .await;
    wait_peer(&west, "east", PeerStatus::Up).await;
    let mut rx = west.peer("east").unwrap();
    east.shutdown_and_release().await;
    // East comes back just after a handshake to the dead address began: that first
    // Initial is lost, and quinn retransmits it only after three times its 333 ms initial
    // RTT estimate. A fresh handshake must reach the new east long before that.
    within(
        Duration::from_secs(10),
        rx.wait_for(|s| s.status == PeerStatus::Down),
    )
    .await
    .unwrap();
    within(
        Duration::from_secs(10),
        rx.wait_for(|s| s.status == PeerStatus::Connecting),
    )
    .await
    .unwrap();
    let socket = tunnel::bind_udp(ae, &Default::default()).expect("east's port is free again");
    let _east = exporter(&pki, socket, echo.addr).await;
    let back = std::time::Instant::now();
    within(
        Duration::from_secs(10),
        rx.wait_for(|s| s.status == PeerStatus::Up),
    )
    .await
    .unwrap();
    let reconnected = back.elapsed();
    assert!(
        reconnected < Duration::from_millis(800),
        "west reached the restarted east only after {reconnected:?}"
    );
    let listener = west.listener("default/echo", 7000).expect("listener bound");
    let mut c = TcpStream::connect(listener).await.unwrap();
    c.write_all(b"back").await.unwrap();
    let mut b = [0u8; 4];
    within(Duration::from_secs(5), c.read_exact(&mut b))
        .await
        .unwrap();
    assert_eq!(&b, b"back");
}

#[tokio::test]
async fn server_with_unexpected_identity_is_refused_by_the_caller() {
    let pki = TestPki::new();
    let (ue, ae) = udp();
    let (uw, _) = udp();
    let _east = pki.gateway("east", ue, |_| {}).await;
    // West believes the gateway at east's address is "north": the SPIFFE ID will not match.
    let west = pki
        .gateway("west", uw, |c| {
            c.peers.push(Peer {
                cluster: "north".into(),
                address: ae,
            })
        })
        .await;
    let mut rx = west.peer("north").unwrap();
    within(
        Duration::from_secs(10),
        rx.wait_for(|s| s.last_error.is_some()),
    )
    .await
    .unwrap();
    let st = rx.borrow().clone();
    assert_ne!(st.status, PeerStatus::Up);
    assert!(
        st.last_error
            .unwrap()
            .contains("spiffe://test.strait/cluster/north/gateway"),
        "error names the expected identity"
    );
}

#[tokio::test]
async fn streams_are_refused_with_the_right_status() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap(); // closed again: refuses
    let exports = |c: &mut Config| {
        c.exports
            .push(export("secret", 7001, echo.addr, &["north"]));
        c.exports.push(export("broken", 7002, dead, &["*"]));
        // A bare export: default namespace, unnamed port, its one endpoint not ready.
        c.exports.push(Export {
            name: "drained".into(),
            namespace: "default".into(),
            ports: vec![ServicePort {
                name: String::new(),
                port: 7003,
                target_port: None,
                protocol: Default::default(),
            }],
            endpoints: vec![Endpoint {
                address: [127, 0, 0, 1].into(),
                hostname: None,
                ready: false,
            }],
            export_to: vec!["*".into()],
            weight: 1,
            headless: false,
            session_affinity: None,
            exported_at_ms: 0,
            selection: Default::default(),
        });
    };
    let (east, west, listener) = pair(&pki, echo.addr, exports).await;
    let conn = west
        .peer("east")
        .unwrap()
        .borrow()
        .connection
        .clone()
        .unwrap();
    let ask = |service: &str, port: u32| StreamRequest {
        service: service.into(),
        namespace: "default".into(),
        port,
        endpoint: None,
    };
    let status = |r: Result<_, OpenError>| match r {
        Ok(_) => Status::Ok,
        Err(OpenError::Refused { status, .. }) => status,
        Err(e) => panic!("unexpected error {e}"),
    };
    let t = Duration::from_secs(5);
    assert_eq!(
        status(open_stream(&conn, &ask("echo", 7000), &[], t).await),
        Status::Ok
    );
    assert_eq!(
        status(open_stream(&conn, &ask("secret", 7001), &[], t).await),
        Status::Forbidden,
        "not exported to west"
    );
    assert_eq!(
        status(open_stream(&conn, &ask("nosuch", 7000), &[], t).await),
        Status::Forbidden,
        "unknown looks like forbidden"
    );
    assert_eq!(
        status(open_stream(&conn, &ask("echo", 9999), &[], t).await),
        Status::NoEndpoints,
        "no such port"
    );
    assert_eq!(
        status(open_stream(&conn, &ask("drained", 7003), &[], t).await),
        Status::NoEndpoints,
        "no ready endpoint"
    );
    assert_eq!(
        status(open_stream(&conn, &ask("broken", 7002), &[], t).await),
        Status::ConnectFailed
    );
    let mut named = ask("echo", 7000);
    named.endpoint = Some("127.0.0.9".into());
    assert_eq!(
        status(open_stream(&conn, &named, &[], t).await),
        Status::NoEndpoints,
        "unknown named endpoint"
    );
    // Refusals are counted on the inbound side; a name east does not export is not a
    // label value (a caller could otherwise make up series without end).
    let m = east.render_metrics();
    for (service, reason, n) in [
        ("default/secret", "forbidden", 1.0),
        ("(unknown)", "forbidden", 1.0),
        ("default/drained", "no-endpoints", 1.0),
        ("default/broken", "connect-failed", 1.0),
    ] {
        let series = format!(
            "strait_streams_failed_total{{service=\"{service}\",peer=\"west\",side=\"inbound\",reason=\"{reason}\"}}"
        );
        assert_eq!(metric(&m, &series), Some(n), "{series}\n{m}");
    }
    assert!(!m.contains("nosuch"), "{m}");
    // The tunnel connection survives every refusal.
    let mut c = TcpStream::connect(listener).await.unwrap();
    c.write_all(b"still").await.unwrap();
    let mut b = [0u8; 5];
    within(t, c.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_on_the_admin_port_neither_starve_a_scrape_nor_stay_forever() {
    strait_gateway::raise_fd_limit();
    let pki = TestPki::new();
    let (u, _) = udp();
    let g = pki.gateway("east", u, |_| {}).await;
    let admin = g.admin_addr();
    // 1,000 clients that start a request and never finish its header (slowloris), and
    // 1,000 that connect and never send a byte.
    let mut slow = Vec::new();
    for i in 0..2000 {
        let mut s = TcpStream::connect(admin).await.unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nx-slow: ")
                .await
                .unwrap();
        }
        slow.push(s);
    }
    // A scrape is answered at once meanwhile.
    let started = std::time::Instant::now();
    let metrics = within(
        Duration::from_secs(5),
        strait_ops::client::Admin::new(admin).metrics(),
    )
    .await
    .unwrap();
    assert!(metrics.contains("strait_gateway_info"), "{metrics}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the scrape waited {:?} behind the slow clients",
        started.elapsed()
    );
    // None of them holds its connection for good: each is closed once the header timeout
    // (10 s) passes, whether it sent part of a request or nothing.
    let closed = async |s: &mut TcpStream| {
        let mut b = [0u8; 512];
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let deadline = Duration::from_secs(30);
    within(deadline, async {
        for s in &mut slow {
            closed(s).await;
        }
    })
    .await;
}

#[tokio::test]
async fn garbage_on_every_port_does_no_harm() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (east, west, listener) = pair(&pki, echo.addr, |_| {}).await;
    let ae = east.tunnel_addr();

    // UDP garbage at the tunnel port, including things shaped like QUIC long headers.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..2000usize {
        let mut d = pattern(1 + (i * 37) % 1400, i as u64 + 1);
        if i % 2 == 0 {
            d[0] = 0xc0 | (d[0] & 0x0f);
        }
        sock.send_to(&d, ae).unwrap();
    }
    // TCP garbage at the admin port.
    for i in 0..20u64 {
        if let Ok(mut s) = TcpStream::connect(east.admin_addr()).await {
            let _ = s.write_all(&pattern(4096, i + 99)).await;
        }
    }
    // A verified peer sending a garbage stream header: that stream is reset, the
    // connection and other streams carry on.
    let conn = west
        .peer("east")
        .unwrap()
        .borrow()
        .connection
        .clone()
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0x01, 0x00, 0x05, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let mut b = [0u8; 1];
    assert!(
        within(Duration::from_secs(5), recv.read_exact(&mut b))
            .await
            .is_err(),
        "garbage header is refused"
    );
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0x09; 64]).await.unwrap();
    eventually(Duration::from_secs(5), "bad headers counted", async || {
        metric(
            &east.render_metrics(),
            "strait_stream_headers_rejected_total{peer=\"west\"}",
        ) >= Some(2.0)
    })
    .await;
    // Garbage through a listener is just payload: it is proxied verbatim.
    let mut c = TcpStream::connect(listener).await.unwrap();
    let junk = pattern(70_000, 5);
    c.write_all(&junk).await.unwrap();
    let mut back = vec![0u8; junk.len()];
    within(Duration::from_secs(5), c.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(back, junk);
    let status = reqwest_status(east.admin_addr(), "/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(
        west.peer("east").unwrap().borrow().clone().connects,
        1,
        "tunnel never dropped"
    );
}

/// Minimal HTTP/1.1 GET returning the status code.
async fn reqwest_status(addr: SocketAddr, path: &str) -> u16 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn certificate_rotation_keeps_established_streams() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (east, _west, addr) = pair(&pki, echo.addr, |_| {}).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"before").await.unwrap();
    let mut b = [0u8; 6];
    within(Duration::from_secs(5), c.read_exact(&mut b))
        .await
        .unwrap();
    let old_serial = east.identity().serial.clone();

    pki.write("east", &pki.issue("east"));
    eventually(
        Duration::from_secs(10),
        "rotated certificate loaded",
        async || east.identity().serial != old_serial,
    )
    .await;
    let new_serial = east.identity().serial.clone();

    // The connection established under the old certificate still carries bytes.
    c.write_all(b"after!").await.unwrap();
    within(Duration::from_secs(5), c.read_exact(&mut b))
        .await
        .unwrap();
    assert_eq!(&b, b"after!");
    // A new peer handshakes against the new certificate.
    let (un, _) = udp();
    let north = pki
        .gateway("north", un, |c| {
            c.peers.push(Peer {
                cluster: "east".into(),
                address: east.tunnel_addr(),
            })
        })
        .await;
    wait_peer(&north, "east", PeerStatus::Up).await;
    let conn = north
        .peer("east")
        .unwrap()
        .borrow()
        .connection
        .clone()
        .unwrap();
    let certs = conn
        .peer_identity()
        .unwrap()
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .unwrap();
    let presented = Identity::from_parts(
        certs.to_vec(),
        rustls::pki_types::PrivateKeyDer::Pkcs8(vec![0u8].into()),
        rustls::RootCertStore::empty(),
    )
    .unwrap();
    assert_eq!(presented.serial, new_serial);

    // A broken file on disk is refused and the current certificate stays.
    std::fs::write(pki.dir.path().join("east.pem"), b"not a certificate").unwrap();
    eventually(
        Duration::from_secs(10),
        "failed reload counted",
        async || {
            metric(
                &east.render_metrics(),
                "strait_cert_reloads_total{result=\"error\"}",
            ) >= Some(1.0)
        },
    )
    .await;
    assert_eq!(east.identity().serial, new_serial);
}

#[derive(Debug)]
struct AcceptAnyServer;

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &strait_common::pki::provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &strait_common::pki::provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        strait_common::pki::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test]
async fn early_bytes_ride_with_the_header_and_arrive_after_ok() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (_east, west, _) = pair(&pki, echo.addr, |_| {}).await;
    let conn = west
        .peer("east")
        .unwrap()
        .borrow()
        .connection
        .clone()
        .unwrap();
    let req = echo_request();
    let (mut send, mut recv) = open_stream(&conn, &req, b"early bytes", Duration::from_secs(5))
        .await
        .unwrap();
    send.finish().unwrap();
    let back = within(Duration::from_secs(5), recv.read_to_end(1024))
        .await
        .unwrap();
    assert_eq!(back, b"early bytes");
}

#[tokio::test]
async fn refused_by_the_first_cluster_served_by_the_next_bytes_delivered_once() {
    // The backend records everything it receives on each connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                s.write_all(b"done").await.unwrap();
                tx.send(got).unwrap();
            });
        }
    });
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let pki = TestPki::new();
    let (ue, ae) = udp();
    let (un, an) = udp();
    let (uw, _) = udp();
    // east's endpoint refuses connections (connect-failed); north serves.
    let _east = pki
        .gateway("east", ue, |c| {
            c.exports.push(export("svc", 7000, dead, &["*"]))
        })
        .await;
    let _north = pki
        .gateway("north", un, |c| {
            c.exports.push(export("svc", 7000, backend, &["*"]))
        })
        .await;
    let west = pki
        .gateway("west", uw, |c| {
            import_from(c, "svc", 7000, &[("east", ae), ("north", an)])
        })
        .await;
    wait_peer(&west, "east", PeerStatus::Up).await;
    wait_peer(&west, "north", PeerStatus::Up).await;
    let mut c = TcpStream::connect(west.listener("default/svc", 7000).unwrap())
        .await
        .unwrap();
    c.write_all(b"exactly once").await.unwrap();
    c.shutdown().await.unwrap();
    let mut reply = Vec::new();
    within(Duration::from_secs(5), c.read_to_end(&mut reply))
        .await
        .unwrap();
    assert_eq!(reply, b"done");
    let got = within(Duration::from_secs(5), rx.recv()).await.unwrap();
    assert_eq!(got, b"exactly once");
    assert!(rx.try_recv().is_err(), "no second delivery");
    let m = west.render_metrics();
    assert_eq!(
        metric(
            &m,
            "strait_streams_failed_total{service=\"default/svc\",peer=\"east\",side=\"outbound\",reason=\"connect-failed\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "strait_streams_opened_total{service=\"default/svc\",peer=\"north\",direction=\"outbound\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn streams_beyond_the_inbound_limit_are_told_overloaded() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (east, west, addr) = pair(&pki, echo.addr, |c| c.tunnel.max_inbound_streams = 1).await;
    let held = held_connection(addr).await;
    let conn = tunnel_to_east(&west);
    let req = echo_request();
    match open_stream(&conn, &req, &[], Duration::from_secs(5)).await {
        Err(OpenError::Refused { status, .. }) => assert_eq!(status, Status::Overloaded),
        other => panic!("expected overloaded, got {:?}", other.map(|_| ())),
    }
    drop(held);
    // The permit is returned when the held connection ends.
    eventually(Duration::from_secs(5), "capacity is back", async || {
        metric(
            &east.render_metrics(),
            "strait_active_connections{service=\"default/echo\",peer=\"west\",direction=\"inbound\"}",
        ) == Some(0.0)
    })
    .await;
    assert!(
        open_stream(&conn, &req, &[], Duration::from_secs(5))
            .await
            .is_ok()
    );
}

/// `fut` polled once now, without a runtime to wake it: whether it is ready at once.
fn poll_now<F: std::future::Future>(fut: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    fut.poll(&mut cx)
}

#[tokio::test]
async fn stream_credit_starts_small_grows_with_use_and_stops_at_the_limit() {
    // Above twice the initial credit: east has to raise it twice, and stop at the limit.
    const MAX: usize = 600;
    let initial = tunnel::INITIAL_STREAM_CREDIT as usize;
    assert!(MAX > initial * 2);
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (_east, west, _) = pair(&pki, echo.addr, |c| {
        c.tunnel.max_concurrent_streams = MAX as u32
    })
    .await;
    let conn = tunnel_to_east(&west);
    // Opening a stream stays local until it carries bytes, so how many open at once is the
    // credit east granted with the handshake: the initial one, not the limit.
    let mut first = Vec::new();
    for k in 0..initial {
        match poll_now(std::pin::pin!(conn.open_bi())) {
            std::task::Poll::Ready(Ok(stream)) => first.push(stream),
            other => panic!("stream {k} of the initial credit: {:?}", other.map(|_| ())),
        }
    }
    let mut next = std::pin::pin!(conn.open_bi());
    assert!(
        poll_now(next.as_mut()).is_pending(),
        "more than the initial credit of {initial} granted up front"
    );
    // Used, they make east raise the credit: the waiting stream opens.
    let header = strait_gateway::tunnel::header::encode(&echo_request());
    let serve = async |(mut send, mut recv): (quinn::SendStream, quinn::RecvStream)| {
        send.write_all(&header).await.unwrap();
        let answer: strait_gateway::tunnel::header::StreamResponse = within(
            Duration::from_secs(5),
            strait_gateway::tunnel::outbound::read_frame(&mut recv),
        )
        .await
        .unwrap();
        assert_eq!(answer.status(), Status::Ok);
        (send, recv)
    };
    let mut served = Vec::new();
    for stream in first {
        served.push(serve(stream).await);
    }
    let waited = within(Duration::from_secs(5), next)
        .await
        .expect("credit raised as the first streams were used");
    served.push(serve(waited).await);
    let req = echo_request();
    while served.len() < MAX {
        let opened = within(
            Duration::from_secs(10),
            open_stream(&conn, &req, &[], Duration::from_secs(5)),
        )
        .await;
        served.push(opened.expect("served within the credit"));
    }
    // East grants no more than the limit: one more stream waits while all are open.
    let mut over = std::pin::pin!(conn.open_bi());
    assert!(
        poll_now(over.as_mut()).is_pending(),
        "a stream beyond tunnel.max_concurrent_streams was allowed"
    );
    // Streams that end return their credit (east announces it in batches of an eighth).
    served.truncate(MAX - MAX / 4);
    within(Duration::from_secs(5), over)
        .await
        .expect("credit returned by the streams that ended");
}

#[tokio::test]
async fn a_stream_waiting_for_credit_gives_up_with_its_peer() {
    // East grants one stream, and one held connection uses it: the next stream waits for
    // credit that a dead east would never send. Given up on, it is as good as down (sent
    // nothing), at once, not at the timeout.
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (_east, west, addr) = pair(&pki, echo.addr, |c| c.tunnel.max_concurrent_streams = 1).await;
    let _held = held_connection(addr).await;
    let conn = tunnel_to_east(&west);
    let waited = within(
        Duration::from_secs(5),
        strait_gateway::tunnel::outbound::open_stream_until(
            &conn,
            &echo_request(),
            b"early",
            Duration::from_secs(30),
            async {},
        ),
    )
    .await;
    let Err(e) = waited else {
        panic!("a stream beyond the credit was opened")
    };
    assert!(matches!(e, OpenError::PeerDown), "{e}");
    assert!(!e.ambiguous(), "nothing was sent");
    // A live peer that grants nothing in time is at its stream limit: overloaded, and
    // as nothing was sent, the next cluster may take the early bytes.
    let timed_out = strait_gateway::tunnel::outbound::open_stream_until(
        &conn,
        &echo_request(),
        b"early",
        Duration::from_millis(200),
        std::future::pending(),
    )
    .await;
    let Err(e) = timed_out else {
        panic!("a stream beyond the credit was opened")
    };
    let overloaded = matches!(
        e,
        OpenError::Refused {
            status: Status::Overloaded,
            ..
        }
    );
    assert!(overloaded, "{e}");
    assert!(!e.ambiguous() && e.retryable(), "nothing was sent");
}

#[tokio::test]
async fn a_gateway_lets_the_peer_it_dialed_open_no_stream_towards_it() {
    let pki = TestPki::new();
    let tuning = strait_common::config::TunnelTuning::default();
    let identity = |cluster: &str| {
        let cert = pki.issue(cluster);
        strait_common::pki::Identity::from_pem(&pki.ca.cert_pem, &cert.cert_pem, &cert.key_pem)
            .unwrap()
    };
    // East as the tunnel serves it; west dials it with the tunnel's client side.
    let server = quinn::Endpoint::server(
        tunnel::server_config(&identity("east"), &tuning).unwrap(),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .unwrap();
    let mut client = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    client.set_default_client_config(
        tunnel::client_config(&identity("west"), "east", &tuning).unwrap(),
    );
    let dialing = client
        .connect(server.local_addr().unwrap(), "east")
        .unwrap();
    let (dialed, accepted) = within(Duration::from_secs(5), async {
        let incoming = server.accept().await.unwrap();
        tokio::join!(dialing, incoming)
    })
    .await;
    let (dialed, accepted) = (dialed.unwrap(), accepted.unwrap());
    assert!(
        poll_now(std::pin::pin!(accepted.open_bi())).is_pending(),
        "the dialing side granted its peer streams it never accepts"
    );
    // The other way, the initial credit.
    assert!(poll_now(std::pin::pin!(dialed.open_bi())).is_ready());
}

#[tokio::test]
async fn peer_vanishing_mid_stream_resets_the_client_instead_of_hanging() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (ue, ae) = udp();
    let (uw, _) = udp();
    let _east = exporter(&pki, ue, echo.addr).await;
    let relay = UdpRelay::new(ae).await;
    let west = pki
        .gateway("west", uw, |c| {
            import_from(c, "echo", 7000, &[("east", relay.addr)]);
            c.tunnel.keep_alive = ms(100);
            c.tunnel.idle_timeout = ms(1000);
        })
        .await;
    wait_peer(&west, "east", PeerStatus::Up).await;
    let mut c = TcpStream::connect(west.listener("default/echo", 7000).unwrap())
        .await
        .unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    within(Duration::from_secs(5), c.read_exact(&mut b))
        .await
        .unwrap();

    relay.blackhole();
    let started = tokio::time::Instant::now();
    let res = within(Duration::from_secs(5), c.read(&mut b)).await;
    assert!(
        res.is_err(),
        "the client sees a reset, not a clean end: {res:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "failed within idle_timeout, took {:?}",
        started.elapsed()
    );
    let st = west.peer("east").unwrap().borrow().clone();
    assert_ne!(st.status, PeerStatus::Up);
}

#[tokio::test]
async fn a_calling_cluster_over_its_limits_is_told_overloaded_and_a_reloaded_limit_applies() {
    use strait_common::config::CallerLimit;
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let limit = |concurrent: u32| CallerLimit {
        cluster: "west".into(),
        service: Some("default/echo".into()),
        streams_per_second: None,
        burst: None,
        concurrent_streams: Some(concurrent),
    };
    let (east, west, addr) = pair(&pki, echo.addr, |c| {
        // Another caller's entry does not apply to west; west's own does.
        c.limits.callers.push(CallerLimit {
            cluster: "north".into(),
            ..limit(100)
        });
        c.limits.callers.push(limit(1));
        c.limits.default.concurrent_streams = Some(1000);
    })
    .await;
    let held = held_connection(addr).await;
    let conn = tunnel_to_east(&west);
    let req = echo_request();
    match open_stream(&conn, &req, &[], Duration::from_secs(5)).await {
        Err(OpenError::Refused { status, detail }) => {
            assert_eq!(status, Status::Overloaded);
            assert!(
                detail.contains("west is over its concurrency limit"),
                "{detail}"
            );
        }
        other => panic!("expected overloaded, got {:?}", other.map(|_| ())),
    }
    assert_eq!(
        metric(
            &east.render_metrics(),
            "strait_inbound_limited_total{caller=\"west\",service=\"default/echo\",limit=\"concurrency\"}"
        ),
        Some(1.0)
    );

    // The operator raises the limit in the file: it applies without a restart.
    let path = pki.dir.path().join("east.yaml");
    let mut config = strait_common::Config::load(&path).unwrap();
    config.limits.callers = vec![limit(2)];
    pki.write_config(&config);
    eventually(
        Duration::from_secs(10),
        "the raised limit admits a second stream",
        async || {
            open_stream(&conn, &req, &[], Duration::from_secs(5))
                .await
                .is_ok()
        },
    )
    .await;
    drop(held);
}

/// A client verifier that says when the server's certificate has arrived (the server is
/// then mid-handshake) and holds the handshake there until released.
#[derive(Debug)]
struct Gate {
    entered: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl rustls::client::danger::ServerCertVerifier for Gate {
    fn verify_server_cert(
        &self,
        e: &rustls::pki_types::CertificateDer<'_>,
        i: &[rustls::pki_types::CertificateDer<'_>],
        n: &rustls::pki_types::ServerName<'_>,
        o: &[u8],
        t: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let _ = self.entered.lock().unwrap().send(());
        let _ = self.release.lock().unwrap().recv();
        AcceptAnyServer.verify_server_cert(e, i, n, o, t)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        AcceptAnyServer.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        AcceptAnyServer.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        AcceptAnyServer.supported_verify_schemes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handshakes_beyond_the_bound_are_refused_and_above_the_threshold_must_prove_their_address()
{
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (ue, ae) = udp();
    let east = pki
        .gateway("east", ue, |c| {
            c.exports.push(export("echo", 7000, echo.addr, &["*"]));
            c.tunnel.retry_above = 0;
            c.tunnel.max_handshakes = 1;
        })
        .await;
    let west = pki.issue("west");
    // Above retry_above (0 here) every new source proves its address first; quinn's client
    // answers the retry, so the connection still succeeds.
    let first = raw_connect(Some(&west), ae).await;
    assert!(!refused(first).await, "a retried handshake is served");
    let shed = |action: &str| {
        metric(
            &east.render_metrics(),
            &format!("strait_handshakes_shed_total{{action=\"{action}\"}}"),
        )
    };
    assert!(shed("retry") >= Some(1.0));

    // One handshake held in progress (its client sits on the server's certificate) ...
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let gate = Arc::new(Gate {
        entered: std::sync::Mutex::new(entered_tx),
        release: std::sync::Mutex::new(release_rx),
    });
    let held_cert = west.clone();
    let held = tokio::spawn(async move { raw_connect_with(Some(&held_cert), ae, gate).await });
    tokio::task::spawn_blocking(move || entered.recv().unwrap())
        .await
        .unwrap();
    // ... so the next one is beyond max_handshakes (1): refused.
    assert!(
        raw_connect(Some(&west), ae).await.is_err(),
        "a handshake beyond the bound is refused"
    );
    assert_eq!(shed("refuse"), Some(1.0));
    release.send(()).unwrap();
    assert!(
        !refused(held.await.unwrap()).await,
        "the held handshake completes"
    );
}

#[tokio::test]
async fn a_calling_cluster_over_its_stream_rate_is_told_overloaded() {
    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (east, west, _) = pair(&pki, echo.addr, |c| {
        // Two streams at once, then one every 10 s.
        c.limits.default.streams_per_second = Some(0.1);
        c.limits.default.burst = Some(2);
    })
    .await;
    let conn = west
        .peer("east")
        .unwrap()
        .borrow()
        .connection
        .clone()
        .unwrap();
    let req = echo_request();
    for _ in 0..2 {
        assert!(
            open_stream(&conn, &req, &[], Duration::from_secs(5))
                .await
                .is_ok()
        );
    }
    match open_stream(&conn, &req, &[], Duration::from_secs(5)).await {
        Err(OpenError::Refused { status, detail }) => {
            assert_eq!(status, Status::Overloaded);
            assert!(detail.contains("west is over its rate limit"), "{detail}");
        }
        other => panic!("expected overloaded, got {:?}", other.map(|_| ())),
    }
    assert_eq!(
        metric(
            &east.render_metrics(),
            "strait_inbound_limited_total{caller=\"west\",service=\"default/echo\",limit=\"rate\"}"
        ),
        Some(1.0)
    );
}

/// The federation's root rotates under load, in the three documented steps (trust both
/// roots; re-issue every gateway under the new one; trust only the new one): no new
/// connection fails, an established one keeps working, and afterwards a certificate of
/// the old root is refused while one of the new root is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_rotates_under_load_without_a_failed_or_broken_connection() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use strait_common::pki::write_atomic;

    let pki = TestPki::new();
    let echo = Backend::echo().await.unwrap();
    let (ue, ae) = udp();
    let (uw, _) = udp();
    let (un, _) = udp();
    let east = pki
        .gateway("east", ue, |c| {
            c.exports.push(export("echo", 7000, echo.addr, &["*"]))
        })
        .await;
    let west = pki
        .gateway("west", uw, |c| {
            import_from(c, "echo", 7000, &[("east", ae)])
        })
        .await;
    let north = pki
        .gateway("north", un, |c| {
            import_from(c, "echo", 7000, &[("east", ae)])
        })
        .await;
    for g in [&west, &north] {
        wait_peer(g, "east", PeerStatus::Up).await;
    }
    let targets = [
        west.listener("default/echo", 7000).unwrap(),
        north.listener("default/echo", 7000).unwrap(),
    ];
    let roundtrip = async |s: &mut TcpStream| -> std::io::Result<()> {
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .map_err(|_| std::io::Error::other("no echo in 5 s"))??;
        Ok(())
    };
    let mut long_lived = TcpStream::connect(targets[0]).await.unwrap();
    roundtrip(&mut long_lived).await.unwrap();

    // Load: new connections through both importers, paced, bounded in count, until told.
    let stop = Arc::new(AtomicBool::new(false));
    let (total, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, total, failed) = (stop.clone(), total.clone(), failed.clone());
        tokio::spawn(async move {
            for i in 0..20_000usize {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let ok = async {
                    let mut s = TcpStream::connect(targets[i % 2]).await?;
                    s.write_all(b"y").await?;
                    let mut b = [0u8; 1];
                    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
                        .await
                        .map_err(|_| std::io::Error::other("no echo"))??;
                    std::io::Result::Ok(())
                }
                .await;
                total.fetch_add(1, Ordering::Relaxed);
                if ok.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let gateways = [("east", &east), ("west", &west), ("north", &north)];
    let reloads = |g: &Gateway| {
        metric(
            &g.render_metrics(),
            "strait_cert_reloads_total{result=\"ok\"}",
        )
        .unwrap_or(0.0)
    };
    let counts = || -> Vec<f64> { gateways.iter().map(|(_, g)| reloads(g)).collect() };
    // Waits until every gateway has reloaded since `before` (counted before the change).
    let all_reloaded = async |before: Vec<f64>, what: &str| {
        eventually(Duration::from_secs(10), what, async || {
            gateways
                .iter()
                .zip(&before)
                .all(|((_, g), b)| reloads(g) > *b)
        })
        .await;
    };
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    let new_ca = CertificateAuthority::generate(TD, day).unwrap();
    let ca_file = pki.ca_path();

    // 1. Every gateway trusts both roots.
    let both = strait_common::pki::bundle(&[
        (ca_file.clone(), pki.ca.cert_pem.clone()),
        ("new/ca.pem".into(), new_ca.cert_pem.clone()),
    ])
    .unwrap();
    let before = counts();
    write_atomic(&ca_file, both.as_bytes(), false).unwrap();
    all_reloaded(before, "every gateway trusts both roots").await;
    // 2. Every gateway presents a certificate of the new root.
    let before = counts();
    for (cluster, _) in gateways {
        pki.write(
            cluster,
            &issue_with(&new_ca, TD, cluster, now - day, now + day),
        );
    }
    all_reloaded(before, "every gateway presents the new root's certificate").await;
    // 3. Only the new root is trusted.
    let before = counts();
    write_atomic(&ca_file, new_ca.cert_pem.as_bytes(), false).unwrap();
    all_reloaded(before, "every gateway trusts only the new root").await;

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let (total, failed) = (
        total.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    assert!(
        total >= 20,
        "the load ran through the rotation: {total} connections"
    );
    assert_eq!(
        failed, 0,
        "{failed} of {total} new connections failed during the rotation"
    );
    roundtrip(&mut long_lived)
        .await
        .expect("the established connection survives the rotation");

    // New handshakes: a certificate of the retired root is refused, one of the new served.
    assert!(
        refused(raw_connect(Some(&pki.issue("west")), ae).await).await,
        "a certificate of the retired root is refused"
    );
    assert!(
        !refused(
            raw_connect(
                Some(&issue_with(&new_ca, TD, "west", now - day, now + day)),
                ae
            )
            .await
        )
        .await,
        "a certificate of the new root is served"
    );
}
