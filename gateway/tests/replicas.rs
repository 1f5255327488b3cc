//! Gateway replicas with real processes on loopback: `east` runs two `strait run`
//! processes (replicas `east-1` and `east-2`, one certificate), `north` is the healthy
//! alternative in another region, and `west` drives 500 new connections/s to `east`'s
//! service through its listener. A replica killed with SIGKILL, or every replica
//! restarted in turn (SIGTERM: drain, exit, start again), must cost no new connection and
//! keep the traffic in `east`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use strait_common::Config;
use strait_common::config::routing::Mode;
use strait_gateway::Gateway;
use strait_gateway::demo::backend::Backend;
use strait_ops::drill::analysis::in_flight;
use strait_ops::load::{Load, LoadSpec, Sample, Steady, SteadySpec};
use strait_tests::*;

/// A replica of east as its own `strait run` process.
struct Replica {
    config: PathBuf,
    child: tokio::process::Child,
}

impl Replica {
    fn spawn(config: PathBuf) -> Replica {
        let child = spawn_strait(env!("CARGO_BIN_EXE_strait"), &config);
        Replica { config, child }
    }

    /// SIGTERM: the replica drains and exits; waits for the exit.
    async fn terminate(&mut self) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = within(Duration::from_secs(20), self.child.wait())
            .await
            .expect("exit status");
        assert!(
            status.success(),
            "a drained replica exits cleanly: {status}"
        );
    }

    fn restart(&mut self) {
        *self = Replica::spawn(self.config.clone());
    }
}

struct Federation {
    west: Gateway,
    east: Vec<Replica>,
    _north: Gateway,
    _backends: Vec<Backend>,
    _pki: TestPki,
}

/// The service west drives: `svc` (HTTP, "hello from <cluster>") on 7000, `echo` on 7001.
fn exporting(c: &mut Config, hello: SocketAddr, echo: SocketAddr) {
    c.exports.push(export("svc", 7000, hello, &["*"]));
    c.exports.push(export("echo", 7001, echo, &["*"]));
}

async fn federation() -> Federation {
    let pki = TestPki::new();
    let east_hello = Backend::http_hello("hello from east\n".into())
        .await
        .unwrap();
    let north_hello = Backend::http_hello("hello from north\n".into())
        .await
        .unwrap();
    let (east_echo, north_echo) = (
        Backend::echo().await.unwrap(),
        Backend::echo().await.unwrap(),
    );
    let lease = Duration::from_secs(3);
    let (un, _) = udp();
    let north = pki
        .gateway("north", un, |c| {
            exporting(c, north_hello.addr, north_echo.addr);
            c.discovery = Some(discovery(&[], lease));
        })
        .await;
    let seed = north.discovery_addr().expect("gossip");
    // East: two processes of one cluster, sharing its certificate.
    pki.write("east", &pki.issue("east"));
    let mut east = Vec::new();
    for name in ["east-1", "east-2"] {
        let (probe, tunnel) = udp();
        drop(probe);
        let mut c = pki.config("east", tunnel);
        exporting(&mut c, east_hello.addr, east_echo.addr);
        let mut d = discovery(&[seed], lease);
        d.replica = Some(name.into());
        c.discovery = Some(d);
        c.drain.grace = ms(10_000);
        let yaml = serde_yaml::to_string(&c).unwrap();
        let path = pki.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        east.push(Replica::spawn(path));
    }
    let (uw, _) = udp();
    let west = pki
        .gateway("west", uw, |c| {
            c.discovery = Some(discovery(&[seed], lease));
            c.tunnel.connect_timeout = ms(1000);
            c.tunnel.max_backoff = ms(200);
            c.routing.default.mode = Some(Mode::Priority);
            c.routing.default.priority = Some(vec!["east".into(), "north".into()]);
            c.routing.default.dwell = Some(ms(500));
            c.routing.default.slow_start = Some(ms(0));
        })
        .await;
    let fed = Federation {
        west,
        east,
        _north: north,
        _backends: vec![east_hello, north_hello, east_echo, north_echo],
        _pki: pki,
    };
    replicas_serving(&fed.west, 2).await;
    fed
}

/// Waits until west routes `default/svc` to east first, through `n` routable replicas.
async fn replicas_serving(west: &Gateway, n: usize) {
    let admin = admin(west);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let route = admin.route("default/svc").await;
        if let Ok(Ok(r)) = &route
            && r.primary.as_deref() == Some("east")
            && r.clusters
                .iter()
                .any(|c| c.cluster == "east" && (c.replicas, c.routable_replicas) == (2, n))
        {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            let peers = admin.peers().await;
            panic!(
                "west does not route to east through {n} replicas: {route:#?}\npeers: {peers:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn load(west: &Gateway, secs: u64) -> Load {
    Load::start(LoadSpec {
        target: west.listener("default/svc", 7000).expect("svc listener"),
        rate: 500.0,
        duration: Duration::from_secs(secs),
        timeout: Duration::from_secs(4),
    })
}

/// Connections not in flight at any of `faults` that failed, and every connection served
/// by a cluster other than east.
fn judge(samples: &[Sample], faults: &[Duration]) -> (Vec<String>, Vec<String>) {
    let failed = samples
        .iter()
        .filter(|s| s.result.is_err() && !in_flight(s, faults))
        .map(|s| format!("at {:?} after {:?}: {:?}", s.at, s.latency, s.result))
        .collect();
    let elsewhere = samples
        .iter()
        .filter_map(|s| s.result.as_ref().ok())
        .filter(|c| *c != "east")
        .cloned()
        .collect();
    (failed, elsewhere)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_costs_no_new_connection_and_traffic_stays_in_its_cluster() {
    let mut fed = federation().await;
    let load = load(&fed.west, 6);
    eventually(Duration::from_secs(5), "load under way", async || {
        load.samples().len() >= 500
    })
    .await;
    let kill = load.elapsed();
    fed.east[0].child.kill().await.expect("SIGKILL");
    // West finds the dead replica by its probes and routes around it inside east.
    replicas_serving(&fed.west, 1).await;
    let samples = load.finish().await;
    let (failed, elsewhere) = judge(&samples, &[kill]);
    assert_eq!(failed, Vec::<String>::new(), "no new connection failed");
    assert_eq!(
        elsewhere,
        Vec::<String>::new(),
        "east's sibling served everything"
    );
    assert!(samples.iter().filter(|s| s.at > kill).count() > 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_breaks_no_connection() {
    let mut fed = federation().await;
    let load = load(&fed.west, 30);
    let echo = fed
        .west
        .listener("default/echo", 7001)
        .expect("echo listener");
    let mut restarts = Vec::new();
    let mut breaks = Vec::new();
    for i in 0..fed.east.len() {
        // 20 long-lived connections over both replicas, each ending within the grace.
        let steady = Steady::start(SteadySpec {
            target: echo,
            connections: 20,
            duration: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
        });
        eventually(Duration::from_secs(5), "load under way", async || {
            load.samples().len() >= 250 * (i + 1)
        })
        .await;
        restarts.push(load.elapsed());
        fed.east[i].terminate().await;
        fed.east[i].restart();
        replicas_serving(&fed.west, 2).await;
        breaks.extend(steady.finish().await);
    }
    // Stop the load early: every replica is back.
    let samples: Vec<Sample> = load
        .samples()
        .into_iter()
        .filter(|s| s.at > Duration::ZERO)
        .collect();
    drop(load);
    assert_eq!(
        breaks.iter().map(|b| b.error.clone()).collect::<Vec<_>>(),
        Vec::<String>::new(),
        "no long-lived connection broke"
    );
    // A drain breaks nothing in flight: every connection counts.
    let (failed, elsewhere) = judge(&samples, &[]);
    assert_eq!(failed, Vec::<String>::new(), "no connection failed");
    assert_eq!(
        elsewhere,
        Vec::<String>::new(),
        "east's replicas served everything"
    );
    assert!(samples.len() > 1000, "{} connections", samples.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_drains_a_gateway_which_then_stops() {
    let pki = TestPki::new();
    let token = "a-token-of-sixteen-characters-or-more";
    std::fs::write(pki.dir.path().join("admin-token"), token).unwrap();
    let (u, _) = udp();
    let mut gateway = pki
        .gateway("solo", u, |c| {
            c.faults = Some(strait_common::config::FaultInjection {
                token_file: "admin-token".into(),
                max_duration: ms(60_000),
            });
        })
        .await;
    let anonymous = admin(&gateway);
    let (code, ready) = anonymous.ready().await.unwrap();
    assert_eq!((code, ready.draining), (200, false));
    // Draining takes the admin token.
    let refused = anonymous.drain().await.unwrap().unwrap_err();
    assert_eq!(refused.code, 401, "{refused:?}");
    assert!(!gateway.is_draining());

    let with_token = strait_ops::client::Admin::with_token(gateway.admin_addr(), token);
    let first = with_token.drain().await.unwrap().unwrap();
    assert!(first.draining && first.started, "{first:?}");
    let again = with_token.drain().await.unwrap().unwrap();
    assert!(again.draining && !again.started, "already under way");
    let (code, ready) = anonymous.ready().await.unwrap();
    assert_eq!((code, ready.ready, ready.draining), (503, false, true));
    // Nothing is open and it has no listener: the drain is over at once, and the gateway's
    // run loop (`strait run`) sees it end.
    within(Duration::from_secs(5), gateway.wait()).await;
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_gateway_tells_its_peers_on_their_own_connections() {
    use strait_gateway::tunnel::peers::PeerStatus;
    let pki = TestPki::new();
    let hello = Backend::http_hello("hello from east\n".into())
        .await
        .unwrap();
    let (ue, east_addr) = udp();
    let east = pki
        .gateway("east", ue, |c| {
            c.exports.push(export("svc", 7000, hello.addr, &["*"]))
        })
        .await;
    let (uw, _) = udp();
    let west = pki
        .gateway("west", uw, |c| {
            import_from(c, "svc", 7000, &[("east", east_addr)])
        })
        .await;
    wait_peer(&west, "east", PeerStatus::Up).await;
    assert_eq!(
        http_get(west.listener("default/svc", 7000).unwrap(), "/")
            .await
            .1,
        "hello from east\n"
    );
    assert!(east.start_drain());
    // No discovery here (no replica record) and no stream sent: only the GOAWAY on west's
    // own connection can tell it.
    let admin = admin(&west);
    eventually(
        Duration::from_secs(5),
        "west sees east draining",
        async || {
            admin
                .peers()
                .await
                .unwrap()
                .iter()
                .any(|p| p.cluster == "east" && p.draining && p.status == PeerStatus::Up)
        },
    )
    .await;
    let route = admin.route("default/svc").await.unwrap().unwrap();
    let row = route.clusters.iter().find(|c| c.cluster == "east").unwrap();
    assert!(!row.eligible && row.routable_replicas == 0, "{row:?}");
}
