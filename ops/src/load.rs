//! A bounded load generator for failover benchmarks, tests and drills: opens new
//! connections at a fixed rate (open loop, so a slow gateway cannot slow the load down),
//! sends one HTTP request on each, and records when it started, how long it took, and
//! which cluster answered (when the answer says `hello from <cluster>`, as the demo
//! backends do). [`Steady`] keeps long-lived connections open and notes each break.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// What to generate.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Where to connect (a service listener).
    pub target: SocketAddr,
    /// New connections per second.
    pub rate: f64,
    /// How long to keep starting connections.
    pub duration: Duration,
    /// Longest a connection may take before it counts as failed.
    pub timeout: Duration,
}

/// One connection's outcome.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it started, from the start of the load.
    pub at: Duration,
    /// Time to the complete answer (or to the failure).
    pub latency: Duration,
    /// The cluster that answered (empty when the answer does not say), or why it failed.
    pub result: Result<String, String>,
}

impl Sample {
    /// When it ended, from the start of the load.
    pub fn end(&self) -> Duration {
        self.at + self.latency
    }
}

/// A running load. Stops by itself after `duration` (plus `timeout` for the stragglers).
pub struct Load {
    started: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    task: JoinHandle<()>,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Most connections one load starts, whatever the rate and duration.
pub const MAX_CONNECTIONS: usize = 1_000_000;

impl Load {
    /// Starts generating.
    pub fn start(spec: LoadSpec) -> Load {
        let started = Instant::now();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sink = samples.clone();
        let task = tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / spec.rate.max(0.001));
            let total = ((spec.duration.as_secs_f64() * spec.rate) as usize).min(MAX_CONNECTIONS);
            let mut running = tokio::task::JoinSet::new();
            for i in 0..total {
                let due = started + period.mul_f64(i as f64);
                tokio::time::sleep_until(due.into()).await;
                let sink = sink.clone();
                let spec = spec.clone();
                running.spawn(async move {
                    let t = Instant::now();
                    let result = tokio::time::timeout(spec.timeout, hello(spec.target))
                        .await
                        .unwrap_or_else(|_| Err(format!("no answer within {:?}", spec.timeout)));
                    let sample = Sample {
                        at: t.duration_since(started),
                        latency: t.elapsed(),
                        result,
                    };
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(sample);
                });
                // Reap finished connections as we go, so the set stays small.
                while running.try_join_next().is_some() {}
            }
            while running.join_next().await.is_some() {}
        });
        Load {
            started,
            samples,
            task,
        }
    }

    /// Time since the load started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The outcomes so far, in completion order.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits for the load to end; every outcome, in start order.
    pub async fn finish(mut self) -> Vec<Sample> {
        let _ = (&mut self.task).await;
        let mut v = self.samples();
        v.sort_by_key(|s| s.at);
        v
    }
}

/// One request; the answering cluster (empty when the answer does not name one). Any
/// complete HTTP answer counts as success: the gateway's part is done once the service
/// answers.
async fn hello(target: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    s.write_all(b"GET / HTTP/1.1\r\nhost: strait\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    s.read_to_end(&mut buf)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or_else(|| format!("no HTTP answer ({} bytes)", buf.len()))?;
    if !text.starts_with("HTTP/") {
        return Err(format!("not an HTTP answer ({} bytes)", buf.len()));
    }
    Ok(body
        .trim()
        .strip_prefix("hello from ")
        .map(str::to_owned)
        .unwrap_or_default())
}

/// Long-lived connections to keep open.
#[derive(Debug, Clone)]
pub struct SteadySpec {
    /// Where to connect (a listener of an echo service).
    pub target: SocketAddr,
    /// How many connections.
    pub connections: usize,
    /// How long to keep them.
    pub duration: Duration,
    /// Longest an echo may take before the connection counts as broken.
    pub timeout: Duration,
}

/// A long-lived connection that broke (and was opened again).
#[derive(Debug, Clone)]
pub struct Break {
    /// When, from the start of the load.
    pub at: Duration,
    /// Why.
    pub error: String,
}

/// Running long-lived connections: each sends an 8-byte ping every 100 ms and expects it
/// echoed; a connection that fails is counted and replaced. Stops after `duration`.
pub struct Steady {
    breaks: Arc<Mutex<Vec<Break>>>,
    tasks: tokio::task::JoinSet<()>,
}

/// Time between pings on a long-lived connection.
const PING_EVERY: Duration = Duration::from_millis(100);

impl Steady {
    /// Opens the connections.
    pub fn start(spec: SteadySpec) -> Steady {
        let started = Instant::now();
        let breaks = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        let end = started + spec.duration;
        for _ in 0..spec.connections.min(1000) {
            let breaks = breaks.clone();
            let spec = spec.clone();
            tasks.spawn(async move {
                while Instant::now() < end {
                    let why = tokio::time::timeout_at(end.into(), keep(&spec, end)).await;
                    let Ok(Err(error)) = why else { return };
                    breaks
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Break {
                            at: started.elapsed(),
                            error,
                        });
                    tokio::time::sleep(PING_EVERY).await;
                }
            });
        }
        Steady { breaks, tasks }
    }

    /// The breaks so far.
    pub fn breaks(&self) -> Vec<Break> {
        self.breaks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits for the end; every break.
    pub async fn finish(mut self) -> Vec<Break> {
        while self.tasks.join_next().await.is_some() {}
        self.breaks()
    }
}

/// One long-lived connection until `end`; why it broke, if it did.
async fn keep(spec: &SteadySpec, end: Instant) -> Result<(), String> {
    let mut s = tokio::time::timeout(spec.timeout, TcpStream::connect(spec.target))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    let mut seq: u64 = 0;
    while Instant::now() < end {
        seq += 1;
        let ping = seq.to_be_bytes();
        let mut pong = [0u8; 8];
        let exchange = async {
            s.write_all(&ping).await?;
            s.read_exact(&mut pong).await.map(|_| ())
        };
        match tokio::time::timeout(spec.timeout, exchange).await {
            Ok(Ok(())) if pong == ping => {}
            Ok(Ok(())) => return Err("echo answered with other bytes".to_owned()),
            Ok(Err(e)) => return Err(format!("connection broke: {e}")),
            Err(_) => return Err(format!("no echo within {:?}", spec.timeout)),
        }
        tokio::time::sleep(PING_EVERY).await;
    }
    Ok(())
}

/// Summary of a fault's effect on a load: failures after it, and when traffic settled.
#[derive(Debug, Clone, PartialEq)]
pub struct Reroute {
    /// Connections started after the fault that failed.
    pub failed: usize,
    /// Time from the fault until the end of the last connection it slowed down or failed
    /// (started after the fault, answered by the faulty cluster or slower than `slow`).
    /// After that moment every new connection went straight to a healthy cluster.
    pub reroute: Duration,
}

/// Measures a fault on the `bad` cluster from `fault` until `healed` (times from the start
/// of the load): a connection started in between counts as affected when it failed, was
/// answered by `bad`, or took longer than `slow`.
pub fn reroute(
    samples: &[Sample],
    fault: Duration,
    healed: Duration,
    bad: &str,
    slow: Duration,
) -> Reroute {
    let after: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= fault && s.at < healed)
        .collect();
    let failed = after.iter().filter(|s| s.result.is_err()).count();
    let last = after
        .iter()
        .filter(|s| match &s.result {
            Err(_) => true,
            Ok(c) => c == bad || s.latency > slow,
        })
        .map(|s| s.end())
        .max();
    Reroute {
        failed,
        reroute: last.map_or(Duration::ZERO, |l| l.saturating_sub(fault)),
    }
}
