//! Failover with real gateways on loopback, under a steady stream of new connections.
//! `west` imports `default/svc` from `east` (preferred: first in the import's order) and
//! `north` (the healthy alternative). Faults are injected from user space: a real `strait`
//! process killed with SIGKILL, a UDP relay that blackholes the path, backends that die.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use strait_common::Config;
use strait_common::config::routing::Mode;
use strait_gateway::Gateway;
use strait_gateway::demo::backend::Backend;
use strait_gateway::tunnel::peers::PeerStatus;
use strait_ops::load::{Load, LoadSpec, Sample, reroute};
use strait_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// West's tuning: failback after 1 s, at once; quick reconnects so healing is quick too.
fn west_tuning(c: &mut Config) {
    c.tunnel.connect_timeout = ms(1000);
    c.tunnel.max_backoff = ms(200);
    c.routing.default.dwell = Some(ms(1000));
    c.routing.default.slow_start = Some(ms(0));
}

async fn hello(name: &str) -> Backend {
    Backend::http_hello(format!("hello from {name}\n"))
        .await
        .expect("backend")
}

/// Exports `svc` (port 7000, forwarding to `backend`) to everyone.
fn exporting(c: &mut Config, backend: SocketAddr) {
    c.exports.push(export("svc", 7000, backend, &["*"]));
}

/// West's config: it imports from `east` at `east_addr` and from `north`, tuned.
fn west_config(c: &mut Config, east_addr: SocketAddr, north: SocketAddr) {
    import_from(c, "svc", 7000, &[("east", east_addr), ("north", north)]);
    west_tuning(c);
}

/// West importing from `east` at `east_addr` and from `north`; `extra` adjusts its config.
async fn west(
    pki: &TestPki,
    east_addr: SocketAddr,
    north: &Gateway,
    extra: impl FnOnce(&mut Config),
) -> Gateway {
    let (uw, _) = udp();
    let west = pki
        .gateway("west", uw, |c| {
            west_config(c, east_addr, north.tunnel_addr());
            extra(c);
        })
        .await;
    wait_peer(&west, "east", PeerStatus::Up).await;
    wait_peer(&west, "north", PeerStatus::Up).await;
    west
}

/// West importing from an in-process `east` (serving `east_backend`, reached through a
/// UDP relay when `relayed`) and `north` (a `hello from north` backend).
struct Federation {
    west: Gateway,
    relay: Option<UdpRelay>,
    _east: Gateway,
    _north: (Gateway, Backend),
    _pki: TestPki,
}

async fn federation(
    east_backend: SocketAddr,
    relayed: bool,
    extra: impl FnOnce(&mut Config),
) -> Federation {
    let pki = TestPki::new();
    let bn = hello("north").await;
    let (ue, ae) = udp();
    let (un, _) = udp();
    let east = pki
        .gateway("east", ue, |c| exporting(c, east_backend))
        .await;
    let north = pki.gateway("north", un, |c| exporting(c, bn.addr)).await;
    let relay = if relayed {
        Some(UdpRelay::new(ae).await)
    } else {
        None
    };
    let west = west(&pki, relay.as_ref().map_or(ae, |r| r.addr), &north, extra).await;
    Federation {
        west,
        relay,
        _east: east,
        _north: (north, bn),
        _pki: pki,
    }
}

impl Federation {
    fn relay(&self) -> &UdpRelay {
        self.relay.as_ref().expect("relayed")
    }
}

fn listener(west: &Gateway) -> SocketAddr {
    west.listener("default/svc", 7000).expect("listener")
}

fn load(target: SocketAddr, secs: u64) -> Load {
    Load::start(LoadSpec {
        target,
        rate: 100.0,
        duration: Duration::from_secs(secs),
        timeout: Duration::from_secs(4),
    })
}

async fn served_by(load: &Load, cluster: &str, n: usize) {
    let count = || {
        load.samples()
            .iter()
            .filter(|s| s.result.as_deref() == Ok(cluster))
            .count()
    };
    eventually(
        Duration::from_secs(10),
        &format!("{n} connections served by {cluster}"),
        async || count() >= n,
    )
    .await;
}

/// A keep-alive connection through west that `east` answered; kept open.
async fn long_lived(target: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(target).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("hello from") {
        let n = within(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        String::from_utf8_lossy(&got).contains("hello from east"),
        "{got:?}"
    );
    s
}

/// Right after a fault on east: the established connection through east fails (reset or
/// closed) within 2 s instead of hanging, and north takes the new connections. Returns
/// when the fault struck, from the start of the load.
async fn struck(load: &Load, mut established: TcpStream) -> Duration {
    let (fault, fault_at) = (load.elapsed(), Instant::now());
    let mut buf = [0u8; 64];
    let r = within(Duration::from_secs(10), established.read(&mut buf)).await;
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let cut = fault_at.elapsed();
    assert!(
        cut <= Duration::from_secs(2),
        "established connection hung for {cut:?}"
    );
    served_by(load, "north", 20).await;
    fault
}

/// Failures among connections that were not in flight when the fault struck: one whose
/// stream was already answered when the path died fails like any established connection
/// (its payload is never replayed elsewhere).
fn new_failures(samples: &[Sample], fault: Duration) -> Vec<String> {
    let margin = Duration::from_millis(20);
    let settled: Vec<Sample> = samples
        .iter()
        .filter(|s| s.at + margin < fault || s.at > fault + margin)
        .cloned()
        .collect();
    failures(&settled)
}

fn failures(samples: &[Sample]) -> Vec<String> {
    samples
        .iter()
        .filter_map(|s| {
            s.result
                .as_ref()
                .err()
                .map(|e| format!("at {:?} after {:?}: {e}", s.at, s.latency))
        })
        .collect()
}

/// Traffic after healing: the first connection east serves again starts no earlier than
/// the dwell after its tunnel came back, and not much later.
fn assert_fails_back(samples: &[Sample], fault: Duration, up_again: Duration) {
    let back = samples
        .iter()
        .filter(|s| s.at > fault && s.result.as_deref() == Ok("east"))
        .map(|s| s.at)
        .min()
        .expect("traffic returned to east");
    let dwell = Duration::from_secs(1);
    // `up_again` is when the test saw the tunnel up, which can trail the gateway by a
    // scheduling delay on a busy machine: allow for it.
    assert!(
        back + Duration::from_millis(250) >= up_again + dwell,
        "east served at {back:?}, before the dwell after {up_again:?}"
    );
    assert!(
        back <= up_again + dwell + Duration::from_millis(1500),
        "east served only at {back:?}, tunnel back at {up_again:?}"
    );
}

/// After the fault was healed at `healed`: no new connection failed, traffic left east
/// quickly, and came back after the dwell once east's tunnel was up again.
async fn judge_recovery(west: &Gateway, load: Load, fault: Duration, healed: Duration) {
    wait_peer(west, "east", PeerStatus::Up).await;
    let up_again = load.elapsed();
    let samples = load.finish().await;
    assert_eq!(new_failures(&samples, fault), Vec::<String>::new());
    let r = reroute(&samples, fault, healed, "east", Duration::from_millis(100));
    assert!(
        r.reroute <= Duration::from_secs(2),
        "reroute took {:?}",
        r.reroute
    );
    assert_fails_back(&samples, fault, up_again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_region_reroutes_with_no_failed_connections_and_fails_back() {
    let be = hello("east").await;
    let fed = federation(be.addr, true, |_| {}).await;
    let (west, relay) = (&fed.west, fed.relay());
    let target = listener(west);
    let established = long_lived(target).await;

    let load = load(target, 10);
    served_by(&load, "east", 20).await;
    relay.blackhole();
    let fault = struck(&load, established).await;
    // The route explains itself while east is out.
    let route = admin(west).route("default/svc").await.unwrap();
    assert!(route.is_ok(), "{route:?}");
    let route = route.unwrap();
    assert_eq!(route.primary.as_deref(), Some("north"), "{route:?}");
    let east_row = route.clusters.iter().find(|c| c.cluster == "east").unwrap();
    assert!(!east_row.eligible);
    assert_eq!(east_row.reason.as_deref(), Some("peer-down"), "{route:?}");

    let healed = load.elapsed();
    relay.restore();
    judge_recovery(west, load, fault, healed).await;
    let m = west.render_metrics();
    assert!(
        metric(
            &m,
            "strait_route_failovers_total{service=\"default/svc\",from=\"east\",to=\"north\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{m}"
    );
}

/// A `strait run` child process for `east`, on a fixed tunnel address.
struct Process {
    config: PathBuf,
    child: tokio::process::Child,
}

impl Process {
    fn spawn(config: &std::path::Path) -> Process {
        Process {
            config: config.to_owned(),
            child: spawn_strait(env!("CARGO_BIN_EXE_strait"), config),
        }
    }

    async fn kill(&mut self) {
        self.child.kill().await.expect("SIGKILL");
    }

    fn restart(&mut self) {
        *self = Process::spawn(&self.config);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_gateway_process_reroutes_with_no_failed_connections_and_fails_back() {
    let pki = TestPki::new();
    let (be, bn) = (hello("east").await, hello("north").await);
    // East is a real process; its tunnel port is picked free, then handed to it.
    let (probe, ae) = udp();
    drop(probe);
    pki.write("east", &pki.issue("east"));
    let mut east_config = pki.config("east", ae);
    exporting(&mut east_config, be.addr);
    let mut east = Process::spawn(&pki.write_config(&east_config));
    let (un, _) = udp();
    let north = pki.gateway("north", un, |c| exporting(c, bn.addr)).await;
    let west = west(&pki, ae, &north, |_| {}).await;
    let target = listener(&west);
    let established = long_lived(target).await;

    let load = load(target, 10);
    served_by(&load, "east", 20).await;
    east.kill().await;
    let fault = struck(&load, established).await;

    let healed = load.elapsed();
    east.restart();
    judge_recovery(&west, load, fault, healed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_backends_are_ejected_with_no_failed_connections() {
    let be = hello("east").await;
    let fed = federation(be.addr, false, |_| {}).await;
    let west = &fed.west;
    let load = load(listener(west), 3);
    served_by(&load, "east", 20).await;
    drop(be); // east's endpoints now refuse: east answers connect-failed
    let fault = load.elapsed();
    let samples = load.finish().await;
    // Connections the backend had already accepted die with it (existing connections);
    // every new one must be served.
    assert_eq!(new_failures(&samples, fault), Vec::<String>::new());
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at > fault).collect();
    assert!(
        after
            .iter()
            .filter(|s| s.result.as_deref() == Ok("north"))
            .count()
            > 50,
        "north took over"
    );
    let m = west.render_metrics();
    assert!(
        metric(
            &m,
            "strait_route_ejections_total{service=\"default/svc\",cluster=\"east\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "east was ejected: {m}"
    );
    assert!(
        metric(
            &m,
            "strait_route_retries_total{service=\"default/svc\",result=\"failed\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "connections were retried on north: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spill_limit_sends_the_overflow_to_the_next_cluster() {
    let be = hello("east").await;
    let fed = federation(be.addr, false, |c| {
        c.routing.default.max_connections_per_cluster = Some(2)
    })
    .await;
    let west = &fed.west;
    let target = listener(west);
    let _a = long_lived(target).await;
    let _b = long_lived(target).await;
    let (_, body) = http_get(target, "/").await;
    assert_eq!(body, "hello from north\n", "east is full");
    let m = west.render_metrics();
    assert!(
        metric(
            &m,
            "strait_route_saturated_total{service=\"default/svc\",cluster=\"east\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_policy_reloads_from_the_config_file() {
    let pki = TestPki::new();
    let (be, bn) = (hello("east").await, hello("north").await);
    let (ue, ae) = udp();
    let (un, _) = udp();
    let _east = pki.gateway("east", ue, |c| exporting(c, be.addr)).await;
    let north = pki.gateway("north", un, |c| exporting(c, bn.addr)).await;
    let west = west(&pki, ae, &north, |_| {}).await;
    let target = listener(&west);
    assert_eq!(http_get(target, "/").await.1, "hello from east\n");

    // Rewrite west's file: north first. The gateway picks it up while running.
    let mut rewritten = pki.config("west", west.tunnel_addr());
    west_config(&mut rewritten, ae, north.tunnel_addr());
    rewritten.routing.default.mode = Some(Mode::Priority);
    rewritten.routing.default.priority = Some(vec!["north".into(), "east".into()]);
    pki.write_config(&rewritten);
    let mut served = String::new();
    eventually(Duration::from_secs(5), "policy reloaded", async || {
        served = http_get(target, "/").await.1;
        served == "hello from north\n"
    })
    .await;
    assert_eq!(served, "hello from north\n", "policy reloaded");
    let route = admin(&west).route("default/svc").await.unwrap().unwrap();
    assert_eq!(route.mode, Mode::Priority, "{route:?}");
    assert_eq!(route.primary.as_deref(), Some("north"), "{route:?}");
    let nope = admin(&west).route("default/nope").await.unwrap();
    assert_eq!(nope.map_err(|r| r.code), Err(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_loss_towards_a_peer_is_caught_by_missing_probe_echoes() {
    let be = hello("east").await;
    let fed = federation(be.addr, true, |_| {}).await;
    let load = load(listener(&fed.west), 4);
    served_by(&load, "east", 20).await;
    // East's own keep-alives still reach west; only what west sends is lost.
    fed.relay().blackhole_to_target();
    let fault = load.elapsed();
    let samples = load.finish().await;
    assert_eq!(new_failures(&samples, fault), Vec::<String>::new());
    let r = reroute(
        &samples,
        fault,
        Duration::MAX,
        "east",
        Duration::from_millis(100),
    );
    assert!(
        r.reroute <= Duration::from_millis(1500),
        "reroute took {:?}",
        r.reroute
    );
}

/// A backend that records what each connection sent it, and answers nothing.
async fn recorder() -> (
    SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    tokio::task::JoinHandle<()>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
                sink.lock().unwrap().push(got);
            });
        }
    });
    (addr, seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_never_replays_the_request_on_the_next_cluster() {
    let (east_backend, east_saw, _t) = recorder().await;
    let fed = federation(east_backend, true, |_| {}).await;
    let west = &fed.west;
    // East still hears west and connects its endpoint, but its answers are lost.
    fed.relay().blackhole_from_target();
    let mut c = TcpStream::connect(listener(west)).await.unwrap();
    c.write_all(b"POST /pay HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    within(Duration::from_secs(5), c.read_to_string(&mut reply))
        .await
        .unwrap();
    assert!(reply.ends_with("hello from north\n"), "{reply:?}");
    let m = west.render_metrics();
    assert_eq!(
        metric(
            &m,
            "strait_streams_failed_total{service=\"default/svc\",peer=\"east\",side=\"outbound\",reason=\"peer-unresponsive\"}"
        ),
        Some(1.0),
        "east was tried first and given up on: {m}"
    );
    // East's endpoint got a connection (east answered ok into the void) but never the
    // request: with a cluster to fail over to, the bytes waited for an ok that never came.
    eventually(
        Duration::from_secs(5),
        "east's endpoint connection ended",
        async || !east_saw.lock().unwrap().is_empty(),
    )
    .await;
    assert!(
        east_saw.lock().unwrap().iter().all(Vec::is_empty),
        "{:?}",
        east_saw.lock().unwrap()
    );
}
