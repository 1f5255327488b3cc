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

use std::ops::Range;
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

/// Whether [`release_code_pages`] is turned off: `STRAIT_RELEASE_CODE=0` keeps every code
/// page the gateway touched mapped (for someone comparing RSS with another build, or
/// wary of the minor faults after each pass).
fn code_release_off() -> bool {
    switched_off(std::env::var("STRAIT_RELEASE_CODE").ok().as_deref())
}

/// Whether a switch's value turns it off: `0`.
fn switched_off(value: Option<&str>) -> bool {
    value.is_some_and(|v| v.trim() == "0")
}

/// One program header of a loaded object: its type, flags and place (relative to the
/// object's load address).
#[derive(Debug, Clone, Copy)]
struct Segment {
    kind: u32,
    flags: u32,
    vaddr: usize,
    /// Bytes read from the file (the rest of `memsz` is zeros the loader wrote).
    filesz: usize,
    memsz: usize,
}

/// The whole pages of `segments` (loaded at `base`) that hold only read-only content read
/// from the file: code and constants. Pages shared with a writable segment or the RELRO region
/// (data the loader relocated before making it read-only: it exists only in memory) are
/// left out, so every page kept reads back from the file as it is.
fn read_only_pages(base: usize, segments: &[Segment], page: usize) -> Vec<Range<usize>> {
    let down = |a: usize| a / page * page;
    let up = |a: usize| a.div_ceil(page) * page;
    let protected: Vec<Range<usize>> = segments
        .iter()
        .filter(|s| {
            (s.kind == libc::PT_LOAD && s.flags & libc::PF_W != 0) || s.kind == libc::PT_GNU_RELRO
        })
        .map(|s| down(base + s.vaddr)..up(base + s.vaddr + s.memsz))
        .collect();
    let mut pages = Vec::new();
    for s in segments
        .iter()
        .filter(|s| s.kind == libc::PT_LOAD && s.flags & libc::PF_W == 0)
    {
        let whole = up(base + s.vaddr)..down(base + s.vaddr + s.filesz);
        let mut left: Vec<Range<usize>> = std::iter::once(whole).collect();
        for p in &protected {
            left = left
                .into_iter()
                .flat_map(|r| [r.start..r.end.min(p.start), r.start.max(p.end)..r.end])
                .collect();
        }
        pages.extend(left.into_iter().filter(|r| r.start < r.end));
    }
    pages
}

/// `/proc/self/pagemap` flags of a page: present, swapped, file-backed.
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
const FILE: u64 = 1 << 61;

/// The runs of `pages` (starting at `start`, one `/proc/self/pagemap` entry each) that hold
/// no private copy: a page a debugger's breakpoint or a uprobe wrote (present and not
/// file-backed, or swapped out) stays, since dropping it would drop the probe.
fn file_page_runs(start: usize, entries: &[u64], page: usize) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for (i, &e) in entries.iter().enumerate() {
        let private = (e & PRESENT != 0 && e & FILE == 0) || e & SWAPPED != 0;
        if private {
            continue;
        }
        let at = start + i * page;
        match runs.last_mut() {
            Some(r) if r.end == at => r.end = at + page,
            _ => runs.push(at..at + page),
        }
    }
    runs
}

/// [`file_page_runs`] of `r`, read from `/proc/self/pagemap` (`None` if it cannot be read).
fn unmodified_runs(
    pagemap: &std::fs::File,
    r: &Range<usize>,
    page: usize,
) -> Option<Vec<Range<usize>>> {
    use std::os::unix::fs::FileExt;
    let n = r.len() / page;
    let mut raw = vec![0u8; n * 8];
    pagemap
        .read_exact_at(&mut raw, (r.start / page * 8) as u64)
        .ok()?;
    let entries: Vec<u64> = raw
        .chunks_exact(8)
        .map(|b| u64::from_ne_bytes(b.try_into().unwrap_or_default()))
        .collect();
    Some(file_page_runs(r.start, &entries, page))
}

/// The system's page size.
fn page_size() -> usize {
    // SAFETY: sysconf with a valid name.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// The program's own code and constants ([`read_only_pages`]), found once: the
/// executable is loaded before `main` and never unloaded. Libraries are left alone (one
/// loaded later could be unloaded between finding its pages and releasing them).
fn program_pages() -> &'static [Range<usize>] {
    static PAGES: std::sync::OnceLock<Vec<Range<usize>>> = std::sync::OnceLock::new();
    PAGES.get_or_init(|| {
        unsafe extern "C" fn first(
            info: *mut libc::dl_phdr_info,
            _size: libc::size_t,
            out: *mut libc::c_void,
        ) -> libc::c_int {
            // SAFETY: glibc passes a valid `dl_phdr_info` whose `dlpi_phdr` points at
            // `dlpi_phnum` program headers, and `out` is the Vec below.
            let (info, out) = unsafe { (&*info, &mut *out.cast::<Vec<Range<usize>>>()) };
            let phdrs = if info.dlpi_phdr.is_null() {
                &[][..]
            } else {
                // SAFETY: as above.
                unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
            };
            let segments: Vec<Segment> = phdrs
                .iter()
                .map(|p| Segment {
                    kind: p.p_type,
                    flags: p.p_flags,
                    vaddr: p.p_vaddr as usize,
                    filesz: p.p_filesz as usize,
                    memsz: p.p_memsz as usize,
                })
                .collect();
            *out = read_only_pages(info.dlpi_addr as usize, &segments, page_size());
            // The program is the first object reported: stop.
            1
        }
        let mut pages: Vec<Range<usize>> = Vec::new();
        // SAFETY: the callback only reads what glibc hands it and writes `pages`.
        unsafe { libc::dl_iterate_phdr(Some(first), (&raw mut pages).cast()) };
        pages
    })
}

/// Unmaps the program's code and constants from this process's page tables
/// ([`program_pages`]); the pages stay in the page cache, and whatever runs next maps its
/// own again (a minor fault). Returns the bytes released (resident or not). Nothing with
/// `STRAIT_RELEASE_CODE=0`.
pub fn release_code_pages() -> usize {
    if code_release_off() {
        return 0;
    }
    // Pages a debugger or a uprobe wrote are private copies: they must stay.
    let Ok(pagemap) = std::fs::File::open("/proc/self/pagemap") else {
        return 0;
    };
    let page = page_size();
    let mut released = 0;
    for r in program_pages() {
        let Some(runs) = unmodified_runs(&pagemap, r, page) else {
            return released;
        };
        for run in runs {
            // SAFETY: whole pages of the executable's read-only loaded segments, which live
            // as long as the process and hold only file content (no RELRO, no writable
            // page, no page written since it was mapped): MADV_DONTNEED drops page-table
            // entries, and each page reads back unchanged.
            let r = unsafe {
                libc::madvise(
                    run.start as *mut libc::c_void,
                    run.len(),
                    libc::MADV_DONTNEED,
                )
            };
            if r == 0 {
                released += run.len();
            }
        }
    }
    released
}

/// Trims the heap and releases code pages, off the async workers (the trim walks every
/// arena, the release reads `/proc/self/pagemap`).
async fn trim() {
    let _ = tokio::task::spawn_blocking(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
        unsafe {
            libc::malloc_trim(0);
        }
        let bytes = release_code_pages();
        tracing::trace!(bytes, "released code pages");
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_read_only_loaded_pages_are_released() {
        let load = |flags, vaddr, memsz| Segment {
            kind: libc::PT_LOAD,
            flags,
            vaddr,
            filesz: memsz,
            memsz,
        };
        // The layout of the release binary (lld): headers and constants, code, then data
        // whose first part is RELRO; plus a non-loaded header that must be ignored.
        let segments = [
            Segment {
                kind: libc::PT_PHDR,
                flags: libc::PF_R,
                vaddr: 0x40,
                filesz: 0x380,
                memsz: 0x380,
            },
            load(libc::PF_R, 0, 0x39_9300),
            load(libc::PF_R | libc::PF_X, 0x39_a300, 0xea_eb10),
            load(libc::PF_R | libc::PF_W, 0x124_9e10, 0x6_c1f0),
            Segment {
                kind: libc::PT_GNU_RELRO,
                flags: libc::PF_R,
                vaddr: 0x124_9e10,
                filesz: 0x6_c1f0,
                memsz: 0x6_c1f0,
            },
        ];
        let base = 0x5594_fa71_e000;
        assert_eq!(
            read_only_pages(base, &segments, 0x1000),
            vec![base..base + 0x39_9000, base + 0x39_b000..base + 0x124_8000,],
            "whole pages only: a page the code shares with its neighbours stays"
        );
        // A read-only segment sharing pages with a writable one loses those pages.
        let shared = [
            load(libc::PF_R | libc::PF_X, 0, 0x5000),
            load(libc::PF_R | libc::PF_W, 0x3800, 0x1000),
        ];
        assert_eq!(
            read_only_pages(0, &shared, 0x1000),
            vec![0..0x3000],
            "the pages the data segment touches stay"
        );
        // Zeros the loader wrote past the file's bytes are not in the file; a segment
        // smaller than a page has no whole page.
        let zero_filled = [
            Segment {
                filesz: 0x2800,
                ..load(libc::PF_R, 0, 0x4000)
            },
            load(libc::PF_R, 0x8100, 0x200),
        ];
        assert_eq!(read_only_pages(0, &zero_filled, 0x1000), vec![0..0x2000]);
    }

    #[test]
    fn strait_release_code_0_turns_the_release_off() {
        assert!(switched_off(Some("0")));
        assert!(switched_off(Some(" 0\n")));
        for on in [None, Some(""), Some("1"), Some("no")] {
            assert!(!switched_off(on), "{on:?}");
        }
    }

    #[test]
    fn pages_a_debugger_or_a_uprobe_wrote_are_kept() {
        let file = PRESENT | FILE;
        let never_touched = 0;
        let written = PRESENT; // a private copy: present, not file-backed
        let swapped = SWAPPED;
        let entries = [file, never_touched, written, file, file, swapped, file];
        assert_eq!(
            file_page_runs(0x10_000, &entries, 0x1000),
            vec![0x10_000..0x12_000, 0x13_000..0x15_000, 0x16_000..0x17_000]
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

    /// A pointer the loader relocated (position-independent code keeps it in RELRO).
    static RELOCATED: &str = "relocated before main";

    /// This process's `/proc/self/pagemap` entry for the page at `addr`.
    fn pagemap_entry(addr: usize) -> u64 {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 8];
        std::fs::File::open("/proc/self/pagemap")
            .unwrap()
            .read_exact_at(&mut b, (addr / page_size() * 8) as u64)
            .unwrap();
        u64::from_ne_bytes(b)
    }

    #[test]
    fn released_code_pages_leave_the_resident_set_and_relocated_data_stays() {
        // The program's first page (its ELF header, no Rust object) written as a debugger
        // writes a breakpoint: with the same bytes, so nothing changes but its privacy.
        let header = program_pages()[0].start;
        let page = page_size();
        // SAFETY: one whole page of our own read-only mapping, made writable for one
        // volatile rewrite of a byte with its own value, then read-only again.
        unsafe {
            let p = header as *mut libc::c_void;
            assert_eq!(
                libc::mprotect(p, page, libc::PROT_READ | libc::PROT_WRITE),
                0
            );
            let b = header as *mut u8;
            b.write_volatile(b.read_volatile());
            assert_eq!(libc::mprotect(p, page, libc::PROT_READ), 0);
        }
        let written = pagemap_entry(header);
        assert!(
            written & PRESENT != 0 && written & FILE == 0,
            "{written:#x}"
        );
        assert!(!program_pages().is_empty(), "the program's code was found");
        let before = rss_file_kb();
        let released = release_code_pages();
        let after = rss_file_kb();
        assert!(released > 0, "the program's code was released");
        assert!(
            after < before,
            "resident file pages {before} KiB -> {after} KiB"
        );
        // Had the RELRO page been dropped, this pointer would read back unrelocated.
        assert_eq!(*std::hint::black_box(&RELOCATED), "relocated before main");
        let after = pagemap_entry(header);
        assert!(
            after & PRESENT != 0 && after & FILE == 0,
            "the written page was dropped: {after:#x}"
        );
    }
}
