//! Soak: many connections through one gateway pair, and what they leave behind.
//!
//! `west` imports an echo service from `east`; both are real `strait run` processes, the
//! echo backend is a Python asyncio server (a process of its own: the client sockets here
//! and the backend's would not fit one process's file limit). Phases:
//! 1. 10,000 connections opened and held, each echoing 8 bytes through the tunnel;
//! 2. all closed;
//! 3. 100,000 more, churned 256 at a time (open, echo 8 bytes, close).
//!
//! After each phase (once west and east report no active connection) it reads each
//! gateway's RSS and open file descriptors from /proc, and its tasks from its metrics.
//!
//! Run: `cargo bench -p strait-gateway --bench soak` (options after `--`:
//! `--concurrent N` (default 10000), `--churn M` (default 100000)).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use strait_ops::client::Admin;
use strait_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A port free on loopback now (for configs that need the number up front).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free udp port")
}

/// Resident memory (KiB) and open file descriptors of `pid`.
fn usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

/// The sum of a gateway's `strait_active_connections` series.
async fn active(admin: &Admin) -> f64 {
    let text = admin.metrics().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("strait_active_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const ECHO: &str = r#"
import asyncio, sys
async def echo(r, w):
    try:
        while True:
            b = await r.read(65536)
            if not b:
                break
            w.write(b)
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def main():
    s = await asyncio.start_server(echo, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    async with s:
        await s.serve_forever()
asyncio.run(main())
"#;

/// One connection through `target`: opened, 8 bytes echoed; the stream.
async fn echoed(target: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(target).await?;
    s.write_all(b"soak1234").await?;
    let mut b = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut b))
        .await
        .map_err(|_| std::io::Error::other("no echo within 30 s"))??;
    Ok(s)
}

struct Row {
    phase: String,
    west: (u64, usize),
    east: (u64, usize),
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let concurrent = opt("--concurrent", 10_000);
    let churn = opt("--churn", 100_000);
    strait_gateway::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(soak(concurrent, churn));
}

async fn soak(concurrent: usize, churn: usize) {
    let backend_port = free_port();
    let _backend = tokio::process::Command::new("python3")
        .args(["-c", ECHO, &backend_port.to_string()])
        .kill_on_drop(true)
        .spawn()
        .expect("python3 echo backend");
    let backend = SocketAddr::from(([127, 0, 0, 1], backend_port));
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(backend).await.is_err() {
        assert!(Instant::now() < deadline, "the echo backend did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let pki = TestPki::new();
    let (east_tunnel, west_tunnel) = (free_udp(), free_udp());
    let (east_admin, west_admin) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let listen = free_port();
    pki.write("east", &pki.issue("east"));
    pki.write("west", &pki.issue("west"));
    let mut east = pki.config("east", east_tunnel);
    east.listen.admin = east_admin;
    east.listen.discovery = None;
    east.exports.push(export("echo", 7000, backend, &["*"]));
    let mut west = pki.config("west", west_tunnel);
    west.listen.admin = west_admin;
    west.listen.discovery = None;
    import_from(&mut west, "echo", 7000, &[("east", east_tunnel)]);
    west.imports[0].ports[0].listen_port = Some(listen);
    let bin = env!("CARGO_BIN_EXE_strait");
    let east_proc = spawn_strait(bin, &pki.write_config(&east));
    let west_proc = spawn_strait(bin, &pki.write_config(&west));
    let (east_pid, west_pid) = (east_proc.id().unwrap(), west_proc.id().unwrap());
    let target = SocketAddr::from(([127, 0, 0, 1], listen));
    let (wa, ea) = (Admin::new(west_admin), Admin::new(east_admin));
    let deadline = Instant::now() + Duration::from_secs(30);
    while echoed(target).await.is_err() {
        assert!(Instant::now() < deadline, "west never served echo");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut rows = Vec::new();
    let settle = async |rows: &mut Vec<Row>, phase: String| {
        // Connections closed by the clients end at both gateways a little later.
        let deadline = Instant::now() + Duration::from_secs(120);
        while active(&wa).await + active(&ea).await > 0.0 {
            assert!(
                Instant::now() < deadline,
                "connections never ended ({phase})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // What the gateways keep once freed memory was handed back (every
        // `memory::EVERY`), and timers and buffers are gone.
        tokio::time::sleep(strait_gateway::memory::EVERY + Duration::from_secs(2)).await;
        rows.push(Row {
            phase,
            west: usage(west_pid),
            east: usage(east_pid),
        });
    };
    settle(&mut rows, "idle, after one connection".into()).await;

    let started = Instant::now();
    let mut held = Vec::with_capacity(concurrent);
    for chunk in (0..concurrent).collect::<Vec<_>>().chunks(250) {
        let opened: Vec<_> = chunk.iter().map(|_| tokio::spawn(echoed(target))).collect();
        for o in opened {
            held.push(o.await.unwrap().expect("a held connection"));
        }
    }
    let open_took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    rows.push(Row {
        phase: format!(
            "{concurrent} connections open (in {:.1} s)",
            open_took.as_secs_f64()
        ),
        west: usage(west_pid),
        east: usage(east_pid),
    });
    drop(held);
    settle(&mut rows, format!("the {concurrent} closed")).await;

    let started = Instant::now();
    let mut failed = 0usize;
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..churn {
        let permit = sem.clone().acquire_owned().await.unwrap();
        tasks.spawn(async move {
            let r = echoed(target).await.map(drop);
            drop(permit);
            r
        });
        while let Some(done) = tasks.try_join_next() {
            failed += usize::from(!matches!(done, Ok(Ok(()))));
        }
    }
    while let Some(done) = tasks.join_next().await {
        failed += usize::from(!matches!(done, Ok(Ok(()))));
    }
    let churn_took = started.elapsed();
    settle(
        &mut rows,
        format!(
            "{churn} churned ({:.0}/s, {failed} failed)",
            churn as f64 / churn_took.as_secs_f64()
        ),
    )
    .await;

    println!("| phase | west RSS (MiB) | west fds | east RSS (MiB) | east fds |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {} | {:.1} | {} |",
            r.phase,
            r.west.0 as f64 / 1024.0,
            r.west.1,
            r.east.0 as f64 / 1024.0,
            r.east.1
        );
    }
    let base = &rows[0];
    let open = &rows[1];
    println!(
        "\nper open connection: west {:.1} KiB, east {:.1} KiB",
        (open.west.0 as f64 - base.west.0 as f64) / concurrent as f64,
        (open.east.0 as f64 - base.east.0 as f64) / concurrent as f64
    );
}
