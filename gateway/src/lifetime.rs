//! How long a gateway's tasks live: one stop signal that every task watches, and a tracker
//! that lets the gateway wait for them to end. Stopping is a signal handed to each
//! component, not a side effect of dropping something.

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// A gateway's (or one part's) lifetime. Clones share it; [`Lifetime::child`] makes one
/// that ends with its parent or on its own (a listener closed, a peer removed).
#[derive(Clone, Debug, Default)]
pub struct Lifetime {
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Lifetime {
    /// A new lifetime, running until [`Lifetime::stop`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A lifetime that ends when this one does, or earlier when stopped itself; its tasks
    /// are waited for with this one's.
    pub fn child(&self) -> Self {
        Self {
            stop: self.stop.child_token(),
            tasks: self.tasks.clone(),
        }
    }

    /// Ends the lifetime: every task spawned in it (and in its children) stops at its
    /// next await point.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Whether it has ended.
    #[cfg(test)]
    pub fn is_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// `task`, ended early when the lifetime ends.
    pub fn bound<F: Future<Output = ()>>(&self, task: F) -> impl Future<Output = ()> + use<F> {
        let stop = self.stop.clone();
        async move {
            tokio::select! {
                // Stop wins a tie: a task woken for work and for the stop at once stops (a
                // peer task would otherwise dial the closed endpoint and count the
                // failure). A step already running when the stop comes finishes.
                biased;
                _ = stop.cancelled() => {}
                _ = task => {}
            }
        }
    }

    /// Spawns `task` for the length of this lifetime, in the current tracing span.
    pub fn spawn<F: Future<Output = ()> + Send + 'static>(&self, task: F) {
        self.tasks.spawn(self.bound(task).in_current_span());
    }

    /// Waits (at most `limit`) for every task spawned in this lifetime to end; call after
    /// [`Lifetime::stop`].
    pub async fn wait(&self, limit: std::time::Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(limit, self.tasks.wait()).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn stopping_ends_tasks_and_children_but_a_child_stops_alone() {
        let life = Lifetime::new();
        let child = life.child();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<&str>();
        for (name, l) in [("parent", &life), ("child", &child)] {
            let tx = tx.clone();
            let guard = Sent(tx, name);
            l.spawn(async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            });
        }
        child.stop();
        assert_eq!(rx.recv().await, Some("child"));
        assert!(
            !life.is_stopped(),
            "a child's stop leaves the parent running"
        );
        life.stop();
        assert_eq!(rx.recv().await, Some("parent"));
        assert!(life.wait(Duration::from_secs(5)).await, "every task ended");
    }

    #[tokio::test]
    async fn a_task_stopped_while_it_has_work_does_no_more() {
        // Without the bias this fails about every other round; twenty rounds catch it.
        for _ in 0..20 {
            stopped_with_work_pending().await;
        }
    }

    async fn stopped_with_work_pending() {
        let life = Lifetime::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let steps = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = steps.clone();
        life.spawn(async move {
            while rx.recv().await.is_some() {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        tx.send(1).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(5), async {
                while steps.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .is_ok(),
            "the task runs"
        );
        // Work and the stop arrive together: the stop wins.
        tx.send(2).unwrap();
        life.stop();
        assert!(life.wait(Duration::from_secs(5)).await);
        assert_eq!(steps.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// Reports its name when dropped (its task ended).
    struct Sent(
        tokio::sync::mpsc::UnboundedSender<&'static str>,
        &'static str,
    );

    impl Drop for Sent {
        fn drop(&mut self) {
            let _ = self.0.send(self.1);
        }
    }
}
