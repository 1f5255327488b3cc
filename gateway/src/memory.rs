//! Memory the allocator holds but no longer uses goes back to the system. glibc's malloc
//! keeps what a burst of connections freed in its arenas: 10,000 connections through a
//! gateway left most of their memory resident after they closed (docs/BENCHMARKS.md,
//! soak). `malloc_trim` returns it; with other allocators there is nothing to do.

use std::time::Duration;

/// How often freed memory is handed back.
pub const EVERY: Duration = Duration::from_secs(10);

/// Hands freed memory back every `every`, for as long as it runs.
pub async fn give_back(every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        trim().await;
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
async fn trim() {
    // It walks every arena: off the async workers.
    let _ = tokio::task::spawn_blocking(|| {
        // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
        unsafe { libc::malloc_trim(0) }
    })
    .await;
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
async fn trim() {}
