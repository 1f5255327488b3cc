//! Live progress of a running drill: what the runner knows each second (elapsed, connections,
//! failures, which cluster serves, the faults in force), drawn as one status line redrawn in
//! place on a terminal, or as plain lines on change and every few seconds when piped, so CI
//! logs stay line-oriented. Rendering is pure ([`line`], [`redraw`], [`plain_due`]);
//! [`Reporter`] only decides when to write.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

/// How often a plain (piped) reporter prints when nothing changed.
pub const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// Back to the line's start and clear it, then turn off wrapping so a line wider than the
/// terminal is cut at the edge instead of spilling onto a row the next redraw cannot reach.
const REDRAW: &str = "\r\x1b[2K\x1b[?7l";
/// Wrapping back on.
const WRAP_ON: &str = "\x1b[?7h";

/// A drill in progress, as its status line shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Time since the drill started.
    pub elapsed: Duration,
    /// The drill's planned length.
    pub total: Duration,
    /// New connections finished so far, all loads together.
    pub connections: usize,
    /// Of those, how many failed (new ones: started after every fault under way began).
    pub failed: usize,
    /// Of those, how many were in flight when a fault began and broke.
    pub broken: usize,
    /// Long-lived connection breaks so far; `None` when the drill keeps none open.
    pub breaks: Option<usize>,
    /// Connections each cluster took in the last second (the source gateways' counters).
    pub served: BTreeMap<String, u64>,
    /// The faults in force now, by label (`kill-tunnel us-east`).
    pub faults: Vec<String>,
}

impl Progress {
    /// The cluster that took most of the last second's connections (by name on a tie).
    pub fn serving(&self) -> Option<&str> {
        self.served
            .iter()
            .filter(|(_, n)| **n > 0)
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(c, _)| c.as_str())
    }
}

/// The status line, without escape codes:
/// `[ 5s/20s] 1234 connections, 0 failed, served by east; faults: kill-tunnel west`.
pub fn line(p: &Progress) -> String {
    let total = p.total.as_secs();
    let elapsed = p.elapsed.min(p.total).as_secs();
    let width = total.to_string().len();
    let mut breaks = String::new();
    if p.broken > 0 {
        let _ = write!(breaks, ", {} broken in flight", p.broken);
    }
    if let Some(b) = p.breaks {
        let _ = write!(breaks, ", {b} breaks");
    }
    let faults = if p.faults.is_empty() {
        "none".to_owned()
    } else {
        p.faults.join(", ")
    };
    format!(
        "[{elapsed:>width$}s/{total}s] {} connections, {} failed{breaks}, served by {}; faults: {faults}",
        p.connections,
        p.failed,
        served_by(&p.served),
    )
}

/// The status line for a terminal: replaces the line the cursor is on.
pub fn redraw(p: &Progress) -> String {
    format!("{REDRAW}{}{WRAP_ON}", line(p))
}

/// Whether a plain reporter prints `now`, having last printed `last`: the first time, when
/// the serving cluster or the faults change, and when elapsed enters a new [`PLAIN_EVERY`].
pub fn plain_due(last: Option<&Progress>, now: &Progress) -> bool {
    let Some(last) = last else { return true };
    let period = |p: &Progress| p.elapsed.as_secs() / PLAIN_EVERY.as_secs();
    last.serving() != now.serving() || last.faults != now.faults || period(last) != period(now)
}

/// `east`, or `east 62%, west 38%` when several clusters took connections, most first;
/// `nobody` when none did.
fn served_by(served: &BTreeMap<String, u64>) -> String {
    let mut taken: Vec<(&String, u64)> = served
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(c, n)| (c, *n))
        .collect();
    match taken[..] {
        [] => "nobody".to_owned(),
        [(one, _)] => one.clone(),
        _ => {
            taken.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            let sum: u64 = taken.iter().map(|t| t.1).sum();
            taken
                .iter()
                .map(|(c, n)| format!("{c} {:.0}%", *n as f64 * 100.0 / sum as f64))
                .collect::<Vec<_>>()
                .join(", ")
        }
    }
}

/// Writes a drill's progress: in place on a terminal, as plain lines otherwise. Write
/// errors are ignored; progress is a courtesy and must not stop a drill.
pub struct Reporter<W: Write> {
    out: W,
    terminal: bool,
    latest: Option<Progress>,
    printed: Option<Progress>,
}

impl<W: Write> Reporter<W> {
    /// A reporter writing to `out`; `terminal` when `out` is one (redraw in place).
    pub fn new(out: W, terminal: bool) -> Reporter<W> {
        Reporter {
            out,
            terminal,
            latest: None,
            printed: None,
        }
    }

    /// Shows `p` now (terminal) or when it is due (plain).
    pub fn update(&mut self, p: &Progress) {
        self.latest = Some(p.clone());
        if self.terminal {
            let _ = write!(self.out, "{}", redraw(p));
            let _ = self.out.flush();
            self.printed = Some(p.clone());
        } else if plain_due(self.printed.as_ref(), p) {
            self.print_plain(p);
        }
    }

    /// Ends the progress: the terminal's status line stays and the cursor moves below it;
    /// a plain reporter prints the last state if it has not yet.
    pub fn finish(mut self) -> W {
        match self.latest.take() {
            Some(_) if self.terminal => {
                let _ = writeln!(self.out);
            }
            Some(p) if self.printed.as_ref() != Some(&p) => self.print_plain(&p),
            _ => {}
        }
        let _ = self.out.flush();
        self.out
    }

    fn print_plain(&mut self, p: &Progress) {
        let _ = writeln!(self.out, "{}", line(p));
        let _ = self.out.flush();
        self.printed = Some(p.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Progress {
        Progress {
            elapsed: Duration::from_millis(secs * 1000 + 300),
            total: Duration::from_secs(20),
            connections: 1234,
            failed: 0,
            broken: 0,
            breaks: None,
            served: BTreeMap::from([("east".to_owned(), 200), ("west".to_owned(), 0)]),
            faults: Vec::new(),
        }
    }

    fn faulted(secs: u64) -> Progress {
        Progress {
            faults: vec!["blackhole east <-> west".to_owned()],
            ..at(secs)
        }
    }

    #[test]
    fn the_line_says_time_counts_server_and_faults() {
        assert_eq!(
            line(&faulted(5)),
            "[ 5s/20s] 1234 connections, 0 failed, served by east; faults: blackhole east <-> west"
        );
        assert_eq!(
            line(&at(12)),
            "[12s/20s] 1234 connections, 0 failed, served by east; faults: none"
        );
    }

    #[test]
    fn the_line_shows_shares_breaks_and_nobody() {
        let split = Progress {
            served: BTreeMap::from([
                ("east".to_owned(), 38),
                ("west".to_owned(), 62),
                ("south".to_owned(), 0),
            ]),
            breaks: Some(2),
            failed: 7,
            faults: vec!["kill-tunnel east".to_owned(), "delay 200ms west".to_owned()],
            ..at(3)
        };
        assert_eq!(
            line(&split),
            "[ 3s/20s] 1234 connections, 7 failed, 2 breaks, served by west 62%, east 38%; \
             faults: kill-tunnel east, delay 200ms west"
        );
        assert_eq!(split.serving(), Some("west"));
        let dark = Progress {
            served: BTreeMap::new(),
            ..at(0)
        };
        assert_eq!(
            line(&dark),
            "[ 0s/20s] 1234 connections, 0 failed, served by nobody; faults: none"
        );
        assert_eq!(dark.serving(), None);
        let crash = Progress {
            broken: 1,
            ..split.clone()
        };
        assert_eq!(
            line(&crash),
            "[ 3s/20s] 1234 connections, 7 failed, 1 broken in flight, 2 breaks, served by \
             west 62%, east 38%; faults: kill-tunnel east, delay 200ms west"
        );
    }

    #[test]
    fn elapsed_never_reads_past_the_total() {
        let late = Progress {
            elapsed: Duration::from_millis(23_400),
            ..at(0)
        };
        assert!(line(&late).starts_with("[20s/20s] "), "{}", line(&late));
    }

    #[test]
    fn a_terminal_redraws_one_line_in_place() {
        let r = redraw(&faulted(5));
        assert!(r.starts_with("\r\x1b[2K"), "{r:?}");
        assert!(r.contains(&line(&faulted(5))));
        assert!(r.ends_with(WRAP_ON), "wrapping is turned back on: {r:?}");
        assert!(!r.contains('\n'));

        let mut rep = Reporter::new(Vec::new(), true);
        for s in 0..3 {
            rep.update(&at(s));
        }
        let out = String::from_utf8(rep.finish()).unwrap();
        assert_eq!(out.matches('\r').count(), 3, "{out:?}");
        assert_eq!(out.matches('\n').count(), 1, "{out:?}");
        assert!(out.ends_with("faults: none\x1b[?7h\n"), "{out:?}");
    }

    #[test]
    fn plain_lines_come_on_change_and_every_few_seconds() {
        assert!(plain_due(None, &at(0)));
        assert!(!plain_due(Some(&at(0)), &at(1)), "nothing changed");
        assert!(plain_due(Some(&at(4)), &at(5)), "a new {PLAIN_EVERY:?}");
        assert!(plain_due(Some(&at(1)), &faulted(2)), "a fault came");
        assert!(plain_due(Some(&faulted(2)), &at(3)), "it went");
        let moved = Progress {
            served: BTreeMap::from([("east".to_owned(), 3), ("west".to_owned(), 90)]),
            ..at(2)
        };
        assert!(plain_due(Some(&at(1)), &moved), "another cluster serves");
        let counted = Progress {
            connections: 2000,
            failed: 1,
            ..at(2)
        };
        assert!(!plain_due(Some(&at(1)), &counted), "counts alone wait");
    }

    #[test]
    fn piped_progress_is_plain_lines_without_escape_codes() {
        let mut rep = Reporter::new(Vec::new(), false);
        for s in 0..12 {
            rep.update(&if (3..6).contains(&s) {
                faulted(s)
            } else {
                at(s)
            });
        }
        let out = String::from_utf8(rep.finish()).unwrap();
        assert!(!out.contains('\x1b') && !out.contains('\r'), "{out:?}");
        let lines: Vec<&str> = out.lines().map(|l| &l[..9]).collect();
        // Start, fault in, new period (5s), fault out, new period (10s), the last state.
        assert_eq!(
            lines,
            [
                "[ 0s/20s]",
                "[ 3s/20s]",
                "[ 5s/20s]",
                "[ 6s/20s]",
                "[10s/20s]",
                "[11s/20s]"
            ],
            "{out}"
        );
        assert!(out.ends_with('\n'));
    }

    #[test]
    fn nothing_shown_means_nothing_written() {
        assert!(Reporter::new(Vec::new(), true).finish().is_empty());
        assert!(Reporter::new(Vec::new(), false).finish().is_empty());
    }
}
