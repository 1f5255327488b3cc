//! Memory the allocator holds but no longer uses goes back to the system. glibc's malloc
//! keeps what a burst of connections freed in its arenas: 10,000 connections through a
//! gateway left most of their memory resident after they closed (docs/BENCHMARKS.md,
//! soak). `malloc_trim` returns it; with other allocators there is nothing to do.
//!
//! Between those trims the heap keeps a working set ([`keep_freed_memory`]): a bulk
//! transfer frees and allocates its buffers continuously, and handing each back at once
//! made every new one fault its pages in again.
//!
//! Code works the same way: starting a gateway runs code it never runs again (command
//! line, configuration, TLS set-up), and the kernel maps code in 64 KiB runs around each
//! page touched, so an idle gateway had 12–14 MiB of its binary mapped while it ran about
//! 1 MiB of it. The same pass unmaps the read-only file pages ([`release_code_pages`]);
//! what runs is mapped again from the page cache at its next use.

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

/// A read-only mapping of a file, from `/proc/self/smaps`.
#[derive(Debug, PartialEq)]
struct FileMapping {
    start: usize,
    end: usize,
    /// Resident KiB.
    rss_kb: usize,
}

/// The mappings whose pages can be dropped and read again from their file unchanged:
/// file-backed, not writable, and holding no private (anonymous) page. That excludes what
/// the dynamic loader relocated before it made it read-only (RELRO), and code a debugger
/// patched.
fn releasable(smaps: &str) -> Vec<FileMapping> {
    let mut found = Vec::new();
    let mut current: Option<FileMapping> = None;
    let mut anonymous_kb = None;
    let mut finish = |m: Option<FileMapping>, anon: Option<usize>| {
        if let Some(m) = m
            && anon == Some(0)
            && m.rss_kb > 0
        {
            found.push(m);
        }
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some(key) = first.strip_suffix(':') {
            let kb = fields.next().and_then(|v| v.parse::<usize>().ok());
            match (key, current.as_mut()) {
                ("Rss", Some(m)) => m.rss_kb = kb.unwrap_or(0),
                ("Anonymous", Some(_)) => anonymous_kb = kb,
                _ => {}
            }
            continue;
        }
        // A mapping's header: `start-end perms offset dev inode [path]`.
        finish(current.take(), anonymous_kb.take());
        let perms = fields.next().unwrap_or("");
        let inode = fields.nth(2).unwrap_or("0");
        let path = fields.next().unwrap_or("");
        let readable_only = perms.starts_with('r') && perms.as_bytes().get(1) == Some(&b'-');
        if !readable_only || inode == "0" || !path.starts_with('/') {
            continue;
        }
        let Some((start, end)) = first.split_once('-') else {
            continue;
        };
        if let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) {
            current = Some(FileMapping {
                start,
                end,
                rss_kb: 0,
            });
        }
    }
    finish(current, anonymous_kb);
    found
}

/// Unmaps the resident pages of this process's read-only file mappings (its code and
/// constants, its libraries') that hold no private page; the pages stay in the page cache
/// and whatever runs next maps its own again. Returns the KiB that were resident.
pub fn release_code_pages() -> usize {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut released = 0;
    for m in releasable(&smaps) {
        // SAFETY: the range is a whole mapping of a file, not writable, with no private
        // page: MADV_DONTNEED only drops page-table entries, and every page reads back
        // from the file as it was. A mapping gone meanwhile makes the call fail (ENOMEM).
        let r = unsafe {
            libc::madvise(
                m.start as *mut libc::c_void,
                m.end - m.start,
                libc::MADV_DONTNEED,
            )
        };
        if r == 0 {
            released += m.rss_kb;
        }
    }
    released
}

/// Trims the heap and releases code pages, off the async workers (the trim walks every
/// arena, the release reads `/proc/self/smaps`).
async fn trim() {
    let _ = tokio::task::spawn_blocking(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
        unsafe {
            libc::malloc_trim(0);
        }
        let kib = release_code_pages();
        tracing::trace!(kib, "released code pages");
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unwritten_read_only_file_mappings_are_released() {
        let smaps = "\
5594fa71e000-5594faab4000 r--p 00000000 fe:00 8006361                    /usr/bin/strait
Size:               3672 kB
Rss:                1736 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
5594faab4000-5594fb95d000 r-xp 00395000 fe:00 8006361                    /usr/bin/strait
Rss:                8208 kB
Anonymous:             0 kB
5594fb95d000-5594fb9ca000 r--p 0123d000 fe:00 8006361                    /usr/bin/strait
Rss:                 436 kB
Anonymous:           436 kB
5594fb9ca000-5594fb9d1000 rw-p 012a9000 fe:00 8006361                    /usr/bin/strait
Rss:                  28 kB
Anonymous:            20 kB
7fc5d5958000-7fc5d6ad5000 rw-p 00000000 00:00 0
Rss:                1352 kB
Anonymous:          1352 kB
7fc5d6eff000-7fc5d7055000 r-xp 00026000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                1000 kB
Anonymous:             0 kB
7fc5d7055000-7fc5d7056000 ---p 00000000 00:00 0
Rss:                   0 kB
Anonymous:             0 kB
7fc5d71c7000-7fc5d71cb000 r--p 00000000 00:00 0                          [vvar]
Rss:                   0 kB
7fc5d71cd000-7fc5d71cf000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   8 kB
Anonymous:             0 kB
7fc5d8000000-7fc5d8001000 r--p 00000000 fe:00 42                         /tmp/not resident
Rss:                   0 kB
Anonymous:             0 kB
7fc5d9000000-7fc5d9001000 r--s 00000000 fe:00 43                         /tmp/cut short
Rss:                   4 kB
";
        let found = releasable(smaps);
        let at = |start: usize, end: usize, rss_kb: usize| FileMapping { start, end, rss_kb };
        assert_eq!(
            found,
            vec![
                at(0x5594fa71e000, 0x5594faab4000, 1736),
                at(0x5594faab4000, 0x5594fb95d000, 8208),
                at(0x7fc5d6eff000, 0x7fc5d7055000, 1000),
            ],
            "code and constants of the binary and libc; not RELRO (relocated), writable \
             data, anonymous memory, the vDSO, nothing resident, nor a mapping whose \
             private pages are unknown"
        );
    }

    /// Resident KiB of file pages of this process.
    fn rss_file_kb() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssFile:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }

    #[test]
    fn released_code_pages_leave_the_resident_set_and_private_pages_keep_their_content() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        // A read-only private mapping of a file whose page was written before it was made
        // read-only, like the loader's RELRO: its content exists only in memory.
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[b'f'; 4096]).unwrap();
        // SAFETY: a fresh private mapping of our own file, unmapped below.
        let page = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            *(p as *mut u8) = b'm';
            assert_eq!(libc::mprotect(p, 4096, libc::PROT_READ), 0);
            p as *const u8
        };
        let before = rss_file_kb();
        let released = release_code_pages();
        let after = rss_file_kb();
        assert!(released > 0, "this test binary's code was resident");
        assert!(
            after < before,
            "resident file pages {before} KiB -> {after} KiB"
        );
        // SAFETY: still mapped, one page long.
        assert_eq!(unsafe { *page }, b'm', "a private page was dropped");
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(page as *mut libc::c_void, 4096) };
    }
}
