//! Graceful drain: how a gateway leaves without breaking what it carries (SIGTERM, or
//! `POST /v1/drain`).
//!
//! ```text
//! start ─► /ready fails, replica record says draining, GOAWAY on every tunnel connection,
//!   │      new tunnel streams refused `draining` (peers retry on a sibling or elsewhere)
//!   ├─ accept_for ─► service listeners close (load balancers have seen /ready by then)
//!   └─ no proxied connection open, or grace over ─► drained: the gateway exits
//! ```
//!
//! Peers learn it twice: at once on each tunnel connection (a GOAWAY stream, and the
//! status of any stream that raced it), and through gossip (the replica record), which
//! also reaches peers with no connection to it yet.

use std::sync::Arc;
use std::time::Duration;

use strait_common::config::Drain as DrainConfig;
use tokio::sync::watch;

/// How often the drain checks whether connections are still open.
const POLL: Duration = Duration::from_millis(100);

/// Where a gateway's drain stands; clones share it.
#[derive(Clone, Debug)]
pub(crate) struct Drain {
    started: Arc<watch::Sender<bool>>,
    done: Arc<watch::Sender<bool>>,
}

impl Drain {
    pub fn new() -> Self {
        Self {
            started: Arc::new(watch::channel(false).0),
            done: Arc::new(watch::channel(false).0),
        }
    }

    /// Starts draining; whether this call started it (a second one changes nothing).
    pub fn start(&self) -> bool {
        !self.started.send_replace(true)
    }

    /// Whether it is draining (or drained).
    pub fn is_draining(&self) -> bool {
        *self.started.borrow()
    }

    /// Follows whether it is draining.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.started.subscribe()
    }

    /// Whether the drain is over.
    pub fn is_over(&self) -> bool {
        *self.done.borrow()
    }

    /// Waits until the drain is over.
    pub async fn drained(&self) {
        let mut done = self.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }
}

/// What a drain acts on.
pub(crate) struct Draining {
    /// Timings.
    pub config: DrainConfig,
    /// Closes the service listeners (after `accept_for`); how many there were.
    pub close_listeners: Box<dyn FnOnce() -> usize + Send + Sync>,
    /// Service listeners bound now (a gateway with none, one that only exports, need
    /// not wait `accept_for`).
    pub listeners: Box<dyn Fn() -> usize + Send + Sync>,
    /// Its replica record says draining.
    pub node: Option<Arc<strait_discovery::node::Node>>,
    /// Proxied connections open now (client connections and inbound streams).
    pub open: Box<dyn Fn() -> usize + Send + Sync>,
}

/// Waits for the drain to start, carries it out, and returns once it is over (the gateway
/// then stops).
pub(crate) async fn run(drain: Drain, d: Draining) {
    let mut started = drain.subscribe();
    if started.wait_for(|s| *s).await.is_err() {
        return;
    }
    let begun = tokio::time::Instant::now();
    tracing::warn!(
        grace = ?d.config.grace.0,
        accept_for = ?d.config.accept_for.0,
        open = (d.open)(),
        "draining: new tunnel streams refused, peers told to go elsewhere"
    );
    if let Some(n) = &d.node {
        n.set_draining(true);
    }
    let grace_over = begun + d.config.grace.0;
    if (d.listeners)() > 0 {
        tokio::time::sleep_until(begun + d.config.accept_for.0).await;
    }
    (d.close_listeners)();
    let mut tick = tokio::time::interval(POLL);
    loop {
        let open = (d.open)();
        if open == 0 {
            tracing::info!(after = ?begun.elapsed(), "drained: no connection open");
            break;
        }
        if tokio::time::Instant::now() >= grace_over {
            tracing::warn!(open, grace = ?d.config.grace.0, "drain grace over: closing the connections still open");
            break;
        }
        tick.tick().await;
    }
    drain.done.send_replace(true);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use strait_common::units::HumanDuration;

    fn draining(open: Arc<AtomicUsize>, grace: u64, accept_for: u64) -> Draining {
        Draining {
            config: DrainConfig {
                grace: HumanDuration(Duration::from_secs(grace)),
                accept_for: HumanDuration(Duration::from_secs(accept_for)),
            },
            close_listeners: Box::new(|| 1),
            listeners: Box::new(|| 1),
            node: None,
            open: Box::new(move || open.load(Ordering::Relaxed)),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn it_ends_when_the_last_connection_does_or_at_the_grace() {
        let open = Arc::new(AtomicUsize::new(2));
        let drain = Drain::new();
        let task = tokio::spawn(run(drain.clone(), draining(open.clone(), 30, 5)));
        assert!(drain.start() && !drain.start(), "started once");
        let t0 = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert!(!task.is_finished(), "two connections still open");
        open.store(0, Ordering::Relaxed);
        drain.drained().await;
        let took = t0.elapsed();
        assert!(
            (Duration::from_secs(8)..Duration::from_secs(9)).contains(&took),
            "{took:?}"
        );

        // Connections that never end are cut at the grace.
        let drain = Drain::new();
        tokio::spawn(run(
            drain.clone(),
            draining(Arc::new(AtomicUsize::new(1)), 30, 5),
        ));
        let t0 = tokio::time::Instant::now();
        drain.start();
        drain.drained().await;
        let took = t0.elapsed();
        assert!(
            (Duration::from_secs(30)..Duration::from_secs(31)).contains(&took),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn listeners_keep_accepting_for_accept_for_even_when_nothing_is_open() {
        let drain = Drain::new();
        let task = tokio::spawn(run(
            drain.clone(),
            draining(Arc::new(AtomicUsize::new(0)), 30, 5),
        ));
        let t0 = tokio::time::Instant::now();
        drain.start();
        drain.drained().await;
        assert!(t0.elapsed() >= Duration::from_secs(5));
        task.await.unwrap();

        // A gateway with no listener (it only exports) has no client to wait for.
        let drain = Drain::new();
        let mut d = draining(Arc::new(AtomicUsize::new(0)), 30, 5);
        d.listeners = Box::new(|| 0);
        tokio::spawn(run(drain.clone(), d));
        let t0 = tokio::time::Instant::now();
        drain.start();
        drain.drained().await;
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    }
}
