//! Drill reports for people: a terminal summary, and a self-contained HTML page with an
//! SVG timeline (per-cluster share of traffic, failures and p99 latency, with each fault's
//! start, end, detection, reroute and failback marked).

use std::fmt::Write as _;

use super::analysis::{LoadReport, Report, Verdict, all_clusters};

/// Colours for clusters, in order.
const PALETTE: &[&str] = &[
    "#4e79a7", "#59a14f", "#edc948", "#b07aa1", "#76b7b2", "#ff9da7", "#9c755f", "#bab0ac",
];
const WIDTH: f64 = 960.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const SHARE_H: f64 = 150.0;
const FAIL_H: f64 = 50.0;
const P99_H: f64 = 80.0;
const GAP: f64 = 26.0;
/// New connections that failed.
const FAILED: &str = "#d32f2f";
/// Connections in flight (or long-lived) that a fault broke.
const BROKEN: &str = "#f9a825";

/// The terminal summary.
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    let verdict = match r.verdict {
        Verdict::Passed => "PASSED",
        Verdict::Failed => "FAILED",
        Verdict::Aborted => "ABORTED",
    };
    let _ = writeln!(s, "\ndrill {}: {verdict} ({:.1}s)", r.name, r.duration_s);
    if let Some(why) = &r.abort_reason {
        let _ = writeln!(s, "  stopped early: {why}");
    }
    for l in &r.loads {
        let _ = writeln!(
            s,
            "  load {} -> {} ({}): {} new connections, {} failed, {} broken in flight at a fault, p50 {} p99 {} max {}{}",
            l.from,
            l.service,
            l.target,
            l.started,
            l.failed,
            l.broken_in_flight,
            opt_ms(l.p50_ms),
            opt_ms(l.p99_ms),
            opt_ms(l.max_ms),
            if l.connections > 0 {
                format!("; {} long-lived, {} breaks", l.connections, l.broken)
            } else {
                String::new()
            }
        );
        for (e, n) in &l.errors {
            let _ = writeln!(s, "      {n} x {e}");
        }
    }
    for f in &r.faults {
        let _ = writeln!(
            s,
            "  fault {:<32} {:<14} detected {}  rerouted {}  failback {}  failed {}  broken {}{}",
            f.label,
            format!("{:.2}s..{:.2}s", f.start_s, f.end_s),
            opt_s(f.detected_after_s),
            opt_s(f.rerouted_after_s),
            opt_s(f.failback_after_s),
            f.failed,
            f.broken,
            f.error
                .as_ref()
                .map(|e| format!("  NOT INJECTED: {e}"))
                .unwrap_or_default()
        );
    }
    for o in &r.objectives {
        let _ = writeln!(
            s,
            "  [{}] {:<24} limit {:<8} measured {}",
            if o.passed { "pass" } else { "FAIL" },
            o.name,
            o.limit,
            o.actual
        );
    }
    let _ = writeln!(
        s,
        "  faults undone afterwards: {}",
        if r.faults_undone {
            "yes"
        } else {
            "NO - check GET /v1/faults on each gateway"
        }
    );
    s
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |x| format!("{x:.1}ms"))
}

fn opt_s(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |x| format!("{x:.2}s"))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The timeline picture: one panel group per load.
pub fn svg(r: &Report) -> String {
    let clusters: Vec<String> = all_clusters(r).into_iter().collect();
    let colour = |c: &str| {
        let i = clusters.iter().position(|x| x == c).unwrap_or(0);
        PALETTE[i % PALETTE.len()]
    };
    let panel = SHARE_H + FAIL_H + P99_H + 3.0 * GAP + 20.0;
    let head = 56.0 + 16.0 * r.objectives.len() as f64;
    let height = head + panel * r.loads.len() as f64 + 40.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="Helvetica,Arial,sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let (vtext, vcol) = match r.verdict {
        Verdict::Passed => ("PASSED", "#2e7d32"),
        Verdict::Failed => ("FAILED", "#c62828"),
        Verdict::Aborted => ("ABORTED", "#ef6c00"),
    };
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="24" font-size="17" font-weight="bold">drill {} <tspan fill="{vcol}">{vtext}</tspan></text>"#,
        esc(&r.name)
    );
    for (i, o) in r.objectives.iter().enumerate() {
        let _ = writeln!(
            s,
            r##"<text x="{LEFT}" y="{}" fill="{}">{} {}: {} (limit {})</text>"##,
            44.0 + 16.0 * i as f64,
            if o.passed { "#2e7d32" } else { "#c62828" },
            if o.passed { "✔" } else { "✘" },
            esc(&o.name),
            esc(&o.actual),
            esc(&o.limit)
        );
    }
    let span = r.duration_s.max(0.001);
    let plot_w = WIDTH - LEFT - RIGHT;
    let x = |t: f64| LEFT + plot_w * (t / span).clamp(0.0, 1.0);
    let mut top = head;
    for l in &r.loads {
        load_panels(&mut s, r, l, top, &x, &colour);
        top += panel;
    }
    // Legend.
    let mut lx = LEFT;
    let ly = height - 18.0;
    let boxes = clusters.iter().map(|c| (c.as_str(), colour(c)));
    for (label, fill) in boxes.chain([("failed", FAILED), ("broken", BROKEN)]) {
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{}" width="12" height="12" fill="{fill}"/><text x="{}" y="{ly}">{}</text>"#,
            ly - 10.0,
            lx + 16.0,
            esc(label)
        );
        lx += 30.0 + 7.0 * label.len() as f64;
    }
    for (label, col, dash) in [
        ("fault", "#333", ""),
        ("detected", "#ef6c00", "4 3"),
        ("rerouted", "#2e7d32", "4 3"),
        ("failed back", "#1565c0", "4 3"),
    ] {
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{}" x2="{}" y2="{}" stroke="{col}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{}" y="{ly}">{label}</text>"#,
            ly - 4.0,
            lx + 18.0,
            ly - 4.0,
            lx + 22.0
        );
        lx += 36.0 + 7.0 * label.len() as f64;
    }
    s.push_str("</svg>\n");
    s
}

fn load_panels(
    s: &mut String,
    r: &Report,
    l: &LoadReport,
    top: f64,
    x: &dyn Fn(f64) -> f64,
    colour: &dyn Fn(&str) -> &'static str,
) {
    let bucket_w = l.timeline.get(1).map_or(0.25, |b| b.t - l.timeline[0].t);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="{}" font-weight="bold">{} → {} ({} new connections, {} failed; {} broken)</text>"#,
        top + 4.0,
        esc(&l.from),
        esc(&l.service),
        l.started,
        l.failed,
        l.broken_in_flight + l.broken
    );
    let share_top = top + 14.0;
    let fail_top = share_top + SHARE_H + GAP;
    let p99_top = fail_top + FAIL_H + GAP;
    let bottom = p99_top + P99_H;
    // Fault spans behind everything.
    for f in &r.faults {
        let _ = writeln!(
            s,
            r##"<rect x="{}" y="{share_top}" width="{}" height="{}" fill="#d32f2f" fill-opacity="0.08"/>"##,
            x(f.start_s),
            (x(f.end_s) - x(f.start_s)).max(1.0),
            bottom - share_top
        );
    }
    // Share of traffic per cluster: 100% stacked bars.
    for b in &l.timeline {
        let total: u64 = b.served.values().sum();
        if total == 0 {
            continue;
        }
        let mut y = share_top + SHARE_H;
        for (c, n) in &b.served {
            let h = SHARE_H * *n as f64 / total as f64;
            if h <= 0.0 {
                continue;
            }
            y -= h;
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{h:.1}" fill="{}"/>"#,
                x(b.t),
                (x(b.t + bucket_w) - x(b.t)).max(0.5),
                colour(c)
            );
        }
    }
    axis(s, share_top, SHARE_H, "share", "100%", "0%");
    // Failures per bucket.
    let max_fail = l
        .timeline
        .iter()
        .map(|b| b.failed + b.broken)
        .max()
        .unwrap_or(0)
        .max(1);
    // New connections that failed (red) under connections a fault broke (orange).
    for b in &l.timeline {
        let mut y = fail_top + FAIL_H;
        for (n, fill) in [(b.failed, FAILED), (b.broken, BROKEN)] {
            if n == 0 {
                continue;
            }
            let h = FAIL_H * n as f64 / max_fail as f64;
            y -= h;
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{h:.1}" fill="{fill}"/>"#,
                x(b.t),
                (x(b.t + bucket_w) - x(b.t)).max(0.5)
            );
        }
    }
    axis(s, fail_top, FAIL_H, "failed", &max_fail.to_string(), "0");
    // p99 latency line.
    let max_p99 = l
        .timeline
        .iter()
        .filter_map(|b| b.p99_ms)
        .fold(1.0_f64, f64::max);
    let points: Vec<String> = l
        .timeline
        .iter()
        .filter_map(|b| {
            b.p99_ms.map(|p| {
                format!(
                    "{:.1},{:.1}",
                    x(b.t + bucket_w / 2.0),
                    p99_top + P99_H - P99_H * p / max_p99
                )
            })
        })
        .collect();
    let _ = writeln!(
        s,
        r##"<polyline points="{}" fill="none" stroke="#6a1b9a" stroke-width="1.5"/>"##,
        points.join(" ")
    );
    axis(s, p99_top, P99_H, "p99", &format!("{max_p99:.0}ms"), "0");
    // Time axis.
    // Bounded by the drill's length, so a doctored report cannot make this loop forever.
    let span = l
        .timeline
        .last()
        .map_or(1.0, |b| b.t + bucket_w)
        .clamp(0.0, r.duration_s.clamp(1.0, 7200.0));
    let step = if span > 60.0 {
        10.0
    } else if span > 20.0 {
        5.0
    } else {
        1.0
    };
    let mut t = 0.0;
    while t <= span + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" y1="{bottom}" x2="{0:.1}" y2="{1}" stroke="#888"/><text x="{0:.1}" y="{2}" text-anchor="middle" fill="#555">{t:.0}s</text>"##,
            x(t),
            bottom + 4.0,
            bottom + 16.0
        );
        t += step;
    }
    // Fault markers.
    for f in &r.faults {
        // The fault's name at its start, "end" a row lower so short faults stay legible.
        let marks = [
            (Some(f.start_s), "#333", "", format!("{} ▶", f.label)),
            (Some(f.end_s), "#333", "", "end".to_owned()),
            (
                f.detected_after_s.map(|d| f.start_s + d),
                "#ef6c00",
                "4 3",
                String::new(),
            ),
            (
                f.rerouted_after_s.map(|d| f.start_s + d),
                "#2e7d32",
                "4 3",
                String::new(),
            ),
            (
                f.failback_after_s.map(|d| f.end_s + d),
                "#1565c0",
                "4 3",
                String::new(),
            ),
        ];
        for (at, col, dash, label) in marks {
            let Some(at) = at else { continue };
            let _ = writeln!(
                s,
                r#"<line x1="{0:.1}" y1="{share_top}" x2="{0:.1}" y2="{bottom}" stroke="{col}" stroke-width="1.5" stroke-dasharray="{dash}"/>"#,
                x(at)
            );
            if !label.is_empty() {
                let row = if label == "end" { 26.0 } else { 12.0 };
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{}" font-size="11" fill="{col}" stroke="#fff" stroke-width="3" paint-order="stroke">{}</text>"##,
                    x(at) + 3.0,
                    share_top + row,
                    esc(&label)
                );
            }
        }
    }
}

fn axis(s: &mut String, top: f64, h: f64, name: &str, hi: &str, lo: &str) {
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{top}" width="{}" height="{h}" fill="none" stroke="#bbb"/><text x="{}" y="{}" text-anchor="end" fill="#555">{hi}</text><text x="{}" y="{}" text-anchor="end" fill="#555">{lo}</text><text x="{}" y="{}" text-anchor="end" font-weight="bold" fill="#333">{name}</text>"##,
        WIDTH - LEFT - RIGHT,
        LEFT - 6.0,
        top + 10.0,
        LEFT - 6.0,
        top + h,
        LEFT - 6.0,
        top + h / 2.0 + 4.0
    );
}

/// A self-contained HTML page: the picture, then the figures as tables.
pub fn html(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>strait drill {}</title>\n<style>body{{font-family:Helvetica,Arial,sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse;margin:12px 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}.pass{{color:#2e7d32}}.fail{{color:#c62828}}</style></head><body>",
        esc(&r.name)
    );
    let _ = writeln!(s, "<p>{}</p>", esc(&r.description));
    s.push_str(&svg(r));
    s.push_str("<h3>Objectives</h3><table><tr><th>objective</th><th>limit</th><th>measured</th><th></th></tr>\n");
    for o in &r.objectives {
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
            esc(&o.name),
            esc(&o.limit),
            esc(&o.actual),
            if o.passed { "pass" } else { "fail" },
            if o.passed { "pass" } else { "FAIL" }
        );
    }
    s.push_str("</table><h3>Faults</h3><table><tr><th>fault</th><th>start</th><th>end</th><th>detected after</th><th>rerouted after</th><th>failed back after</th><th>failed connections</th><th>broken in flight</th></tr>\n");
    for f in &r.faults {
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{:.2}s</td><td>{:.2}s</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&f.label),
            f.start_s,
            f.end_s,
            opt_s(f.detected_after_s),
            opt_s(f.rerouted_after_s),
            opt_s(f.failback_after_s),
            f.failed,
            f.broken
        );
    }
    let _ = writeln!(s, "</table><pre>{}</pre></body></html>", esc(&summary(r)));
    s
}
