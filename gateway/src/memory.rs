//! Memory the allocator holds but no longer uses goes back to the system. glibc's malloc
//! keeps what a burst of connections freed in its arenas: 10,000 connections through a
//! gateway left most of their memory resident after they closed (docs/BENCHMARKS.md,
//! soak). `malloc_trim` returns it; with other allocators there is nothing to do.
//!
//! Between those trims the heap keeps a working set ([`keep_freed_memory`]): a bulk
//! transfer frees and allocates its buffers continuously, and handing each back at once
//! made every new one fault its pages in again.

use std::time::Duration;

/// Least free memory glibc keeps at the top of a heap before it gives it back to the
/// kernel, and least size it serves from `mmap` rather than the heap. glibc's defaults
/// (128 KiB each, raised only as large mmap'd blocks are freed) gave back and took again,
/// page by page, the buffers a bulk transfer allocates and frees per read and per received
/// batch: page faults took ~7% of the gateways' CPU on one iperf3 stream. 4 MiB keeps that
/// working set; it costs up to that much resident memory per heap under load, until the
/// next periodic trim ([`EVERY`]). Measurements: docs/BENCHMARKS.md (issue 15, step 3).
const HEAP_KEEP: usize = 4 << 20;

/// glibc's own mmap threshold, kept: blocks above it come from `mmap`. Raising it to
/// [`HEAP_KEEP`] served large zeroed startup buffers from the heap, which writes their
/// zeros: ~0.5 MiB more idle RSS (1.0 on one gateway), for no measured gain.
const MMAP_FROM: usize = 128 << 10;

/// Sets glibc's heap trim threshold to [`HEAP_KEEP`] and its mmap threshold to
/// [`MMAP_FROM`], each raised to twice the largest read buffer (`tunnel.copy_buffer`) when
/// that is larger (at most 32 MiB, glibc's ceiling), so reads come from the heap. Setting
/// either turns off glibc's own adjustment of both, so both are set. An operator's own
/// `GLIBC_TUNABLES` (`glibc.malloc.trim_threshold` / `mmap_threshold`) or
/// `MALLOC_TRIM_THRESHOLD_` / `MALLOC_MMAP_THRESHOLD_` wins: then nothing is set. Call
/// before any other thread starts (glibc reads these settings without a lock). On 64-bit
/// glibc only: a 32-bit one refuses an mmap threshold over 512 KiB (the call then changes
/// nothing).
pub fn keep_freed_memory(copy_buffer: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let operator_set = ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"]
            .iter()
            .any(|v| std::env::var_os(v).is_some())
            || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| {
                t.contains("malloc.trim_threshold") || t.contains("malloc.mmap_threshold")
            });
        if !operator_set {
            let read = copy_buffer.saturating_mul(2);
            let mmap_from = read.clamp(MMAP_FROM, 32 << 20) as libc::c_int;
            let keep = read.clamp(HEAP_KEEP, 32 << 20) as libc::c_int;
            // SAFETY: mallopt only sets allocator parameters; called before other threads.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, mmap_from);
                libc::mallopt(libc::M_TRIM_THRESHOLD, keep);
            }
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = copy_buffer;
}

/// How often freed memory is handed back.
pub const EVERY: Duration = Duration::from_secs(10);

/// Hands freed memory back now (what starting the gateway freed, which the heap would
/// otherwise keep up to its trim threshold) and then every `every`, for as long as it runs.
pub async fn give_back(every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
