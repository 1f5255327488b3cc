//! `strait demo` builds a working federation: every region reaches the others.

use std::time::Duration;

use strait_gateway::demo::{self, DemoArgs};
use strait_gateway::tunnel::peers::PeerStatus;
use strait_tests::{wait_peer, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn demo_regions_reach_each_other() {
    strait_gateway::raise_fd_limit();
    let d = demo::start(DemoArgs {
        regions: 3,
        base_port: 0,
        dir: None,
        duration: None,
    })
    .await
    .unwrap();
    for r in &d.regions {
        for p in r.gateway.shared().peers.all() {
            wait_peer(&r.gateway, &p.config.cluster, PeerStatus::Up).await;
        }
    }
    for (i, r) in d.regions.iter().enumerate() {
        let addr = r.gateway.listener("demo/hello", 8080).unwrap();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: demo\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        within(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .unwrap();
        let next = &d.regions[(i + 1) % d.regions.len()].cluster;
        assert!(
            out.ends_with(&format!("hello from {next}\n")),
            "{} got {out:?}",
            r.cluster
        );
    }
    // echo is exported by the last region to the first only.
    let first = d.regions[0].gateway.listener("demo/echo", 7000).unwrap();
    let mut s = TcpStream::connect(first).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    within(Duration::from_secs(5), s.read_exact(&mut b))
        .await
        .unwrap();
    assert_eq!(&b, b"ping");
    let second = d.regions[1].gateway.listener("demo/echo", 7000).unwrap();
    let mut s = TcpStream::connect(second).await.unwrap();
    let _ = s.write_all(b"ping").await;
    let mut out = Vec::new();
    let res = within(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(
        res.is_err() || out.is_empty(),
        "a region the service is not exported to gets nothing"
    );
    assert!(d.instructions().contains("curl http://"));
}
