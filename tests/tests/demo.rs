//! `strait demo` builds a working federation through discovery: every region reaches the
//! others' services, and a service exported to one region is imported there only.

use std::time::Duration;

use strait_gateway::demo::{self, DemoArgs};
use strait_tests::within;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn demo_regions_discover_and_reach_each_other() {
    strait_gateway::raise_fd_limit();
    let d = demo::start(DemoArgs::ephemeral(3)).await.unwrap();
    assert!(
        d.wait_converged(Duration::from_secs(10)).await,
        "discovery did not converge"
    );
    for r in &d.regions {
        let hello = r
            .gateway()
            .listeners()
            .into_iter()
            .find(|l| l.service == "demo/hello")
            .unwrap();
        let mut s = TcpStream::connect(hello.address).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: demo\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        within(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .unwrap();
        // Served by another region (the nearest by RTT: on loopback, any of them).
        let served = out.rsplit("hello from ").next().unwrap_or("").trim();
        assert!(
            served != r.cluster && hello.clusters.iter().any(|c| c == served),
            "{} got {out:?}",
            r.cluster
        );
    }
    // echo is exported by every region to the first one only.
    let first = d.regions[0].gateway().listener("demo/echo", 7000).unwrap();
    let mut s = TcpStream::connect(first).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    within(Duration::from_secs(5), s.read_exact(&mut b))
        .await
        .unwrap();
    assert_eq!(&b, b"ping");
    for r in &d.regions[1..] {
        assert!(
            r.gateway().listener("demo/echo", 7000).is_none(),
            "{} imported a service not exported to it",
            r.cluster
        );
    }
    let text = d.instructions().await;
    assert!(
        text.contains("curl http://") && text.contains("strait status --admin"),
        "{text}"
    );
}

/// The failover tour takes the serving region down and back: traffic moves to the other
/// region with no failed new connection, and returns after the dwell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_tour_moves_traffic_and_brings_it_back() {
    strait_gateway::raise_fd_limit();
    let mut d = demo::start(DemoArgs {
        tour: true,
        ..DemoArgs::ephemeral(3)
    })
    .await
    .unwrap();
    assert!(d.wait_converged(Duration::from_secs(10)).await);
    let report = d.tour().await.unwrap();
    assert_eq!(report.failed, 0, "{report:?}");
    // A request in flight through the region taken down may die with it.
    assert!(report.broken <= 1, "{report:?}");
    let victim = report.victim.as_str();
    let share = |s: usize, c: &str| report.seconds[s].get(c).copied().unwrap_or(0);
    let others = |s: usize| {
        report.seconds[s]
            .iter()
            .filter(|(c, _)| *c != victim)
            .map(|(_, n)| n)
            .sum::<usize>()
    };
    assert!(
        share(1, victim) > 0,
        "{victim} served before the fault: {report:?}"
    );
    // Down from t=3s to t=10s (seconds are 1-based windows: index 4 is 4..5s).
    for s in 4..9 {
        assert_eq!(share(s, victim), 0, "second {s}: {report:?}");
        assert!(others(s) > 0, "second {s}: {report:?}");
    }
    // Back at 10s; dwell 3s, slow start 3s: by the last seconds it serves again.
    for s in 10..12 {
        assert_eq!(
            share(s, victim),
            0,
            "second {s}: still dwelling: {report:?}"
        );
    }
    let tail = report.seconds.len();
    assert!(
        (tail - 3..tail).any(|s| share(s, victim) > 0),
        "{victim} never got traffic back: {report:?}"
    );
    assert!(d.regions.iter().all(|r| r.is_up()));
}

#[tokio::test]
async fn a_second_demo_on_the_same_ports_refuses_and_leaves_the_running_one_alone() {
    use rand::Rng;
    strait_gateway::raise_fd_limit();
    // Fixed ports (the shared demo directory is per base port); a random range so that
    // parallel test runs do not meet.
    let base = 21_000 + 100 * rand::rng().random_range(0..100u16);
    let args = DemoArgs {
        base_port: base,
        ..DemoArgs::ephemeral(2)
    };
    let running = demo::start(args.clone())
        .await
        .expect("the first demo starts");
    let token = std::fs::read_to_string(running.dir.join(demo::TOKEN_FILE)).unwrap();

    let second = demo::start(args).await;
    let err = format!("{:#}", second.err().expect("the second demo refuses"));
    assert!(
        err.contains("is in use") && err.contains("nothing was changed"),
        "{err}"
    );

    // The running demo keeps its directory: CA, configs and the drill token.
    assert_eq!(
        std::fs::read_to_string(running.dir.join(demo::TOKEN_FILE)).unwrap(),
        token
    );
    assert!(running.dir.join("ca.pem").exists());
    assert!(running.regions[0].config_path.exists());
}

/// `strait demo --replicas 2`: one replica of the serving region taken down, then a rolling
/// restart of that region, under load: every connection is served, and by that region.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_replicas_keep_traffic_in_their_region_through_a_kill_and_a_rolling_restart() {
    strait_gateway::raise_fd_limit();
    let mut d = demo::start(DemoArgs {
        replicas: 2,
        ..DemoArgs::ephemeral(3)
    })
    .await
    .unwrap();
    assert!(d.wait_converged(Duration::from_secs(15)).await);
    assert!(d.regions.iter().all(|r| r.gateways().count() == 2));
    let from = d.regions[0].gateway();
    let target = from.listener("demo/hello", 8080).unwrap();
    let serving = from.route("demo/hello").unwrap().primary.unwrap();
    let load = strait_ops::load::Load::start(strait_ops::load::LoadSpec {
        target,
        rate: 100.0,
        duration: Duration::from_secs(60),
        timeout: Duration::from_secs(5),
    });
    strait_tests::eventually(Duration::from_secs(10), "load under way", async || {
        load.samples().len() >= 100
    })
    .await;
    let killed_from = load.elapsed();
    d.command(&format!("down {serving}/2")).await.unwrap();
    let killed_to = load.elapsed();
    d.command(&format!("up {serving}/2")).await.unwrap();
    d.command(&format!("restart {serving}")).await.unwrap();
    let samples = load.samples();
    drop(load);
    assert!(samples.len() > 100, "{} connections", samples.len());
    // Every connection was served by the same region. The one exception: a request in
    // flight through the replica taken down (abruptly, as in a crash) may break with it.
    let wrong: Vec<String> = samples
        .iter()
        .filter(|s| s.result.as_deref() != Ok(serving.as_str()))
        .filter(|s| !(s.result.is_err() && s.at < killed_to && s.end() >= killed_from))
        .map(|s| format!("at {:?}: {:?}", s.at, s.result))
        .collect();
    assert_eq!(wrong, Vec::<String>::new());
}
