//! A real Prometheus (Debian's `prometheus` package) for the tests: started on an
//! ephemeral loopback port against given scrape targets, with the project's rules, and
//! asked through its HTTP API. Also renders query results as an SVG chart, so a picture of
//! the dashboard is generated from real data rather than drawn.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The repository's `deploy/observability` directory.
pub fn observability_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability")
}

/// Where `program` is on PATH; panics naming the command that installs it.
pub fn installed(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{program}` is not installed: run the tests with scripts/test, which installs Debian's prometheus package")
        })
}

/// A running Prometheus; killed when dropped.
pub struct Prometheus {
    /// Its HTTP API.
    pub addr: SocketAddr,
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (job `strait`) every second and evaluating
    /// `rules` every second; returns once it answers ready.
    pub async fn start(targets: &[SocketAddr], rules: &Path) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - '{}'\nscrape_configs:\n  - job_name: strait\n    static_configs:\n      - targets: [{}]\n",
            rules.display(),
            list.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        // An ephemeral port: Prometheus takes an address, not a socket.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let child = tokio::process::Command::new(installed("prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            addr,
            _child: child,
            _dir: dir,
        };
        crate::eventually(Duration::from_secs(30), "prometheus ready", async || {
            get(p.addr, "/-/ready").await.is_ok_and(|(s, _)| s == 200)
        })
        .await;
        p
    }

    /// `GET /api/v1/<path>` and its `data`; panics on an error answer.
    pub async fn api(&self, path: &str) -> Value {
        let (status, body) = get(self.addr, &format!("/api/v1/{path}"))
            .await
            .unwrap_or_else(|e| panic!("prometheus {path}: {e}"));
        let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!("prometheus {path}: {e}: {}", String::from_utf8_lossy(&body))
        });
        assert!(
            status == 200 && v["status"] == "success",
            "prometheus {path}: {status} {v}"
        );
        v["data"].clone()
    }

    /// An instant query: its result vector.
    pub async fn query(&self, promql: &str) -> Vec<Value> {
        let data = self.api(&format!("query?query={}", encode(promql))).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// A range query over the last `span`, one point per `step` seconds.
    pub async fn query_range(&self, promql: &str, span: Duration, step: u64) -> Vec<Value> {
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let start = end - span.as_secs();
        let data = self
            .api(&format!(
                "query_range?query={}&start={start}&end={end}&step={step}",
                encode(promql)
            ))
            .await;
        data["result"].as_array().cloned().unwrap_or_default()
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A plain HTTP/1.0 GET: status and body.
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nhost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
        let status = std::str::from_utf8(&raw[..split])
            .ok()
            .and_then(|h| h.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("no HTTP status"))?;
        Ok((status, raw[split + 4..].to_vec()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("timed out")))
}

/// One chart: a title, a unit for the axis, and the series of a range query.
pub struct Panel {
    /// Shown above the chart.
    pub title: String,
    /// Axis unit: "" (plain), "/s", "s", "B/s".
    pub unit: &'static str,
    /// `(legend, points (unix seconds, value))`.
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

impl Panel {
    /// A panel from a range query's result, each series named by `legend` filled with its
    /// labels (`{{label}}` placeholders, as Grafana's legend format).
    pub fn from_range(title: &str, unit: &'static str, result: &[Value], legend: &str) -> Panel {
        let series = result
            .iter()
            .map(|s| {
                let mut name = legend.to_owned();
                if let Some(labels) = s["metric"].as_object() {
                    for (k, v) in labels {
                        name = name.replace(&format!("{{{{{k}}}}}"), v.as_str().unwrap_or(""));
                    }
                }
                let points = s["values"]
                    .as_array()
                    .map(|vs| {
                        vs.iter()
                            .filter_map(|p| {
                                let t = p[0].as_f64()?;
                                let v: f64 = p[1].as_str()?.parse().ok()?;
                                v.is_finite().then_some((t, v))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                (name, points)
            })
            .collect();
        Panel {
            title: title.to_owned(),
            unit,
            series,
        }
    }
}

const COLOURS: &[&str] = &[
    "#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1", "#ba43a9", "#705da0",
];

/// Renders `panels` two per row as one SVG picture, dark like Grafana's default theme.
pub fn render_svg(title: &str, panels: &[Panel]) -> String {
    let (w, h, pad) = (560.0, 300.0, 16.0);
    let rows = panels.len().div_ceil(2) as f64;
    let (width, height) = (2.0 * w + 3.0 * pad, rows * (h + pad) + pad + 40.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(
        s,
        r##"<rect width="100%" height="100%" fill="#111217"/><text x="{pad}" y="28" fill="#d8d9da" font-size="18">{}</text>"##,
        escape(title)
    );
    for (i, p) in panels.iter().enumerate() {
        let x0 = pad + (i % 2) as f64 * (w + pad);
        let y0 = 40.0 + pad + (i / 2) as f64 * (h + pad);
        chart(&mut s, p, x0, y0, w, h);
    }
    s.push_str("</svg>\n");
    s
}

fn chart(s: &mut String, p: &Panel, x0: f64, y0: f64, w: f64, h: f64) {
    let _ = writeln!(
        s,
        r##"<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="#181b1f" stroke="#2c3235"/><text x="{}" y="{}" fill="#d8d9da" font-size="14">{}</text>"##,
        x0 + 10.0,
        y0 + 20.0,
        escape(&p.title)
    );
    let (left, top, right, bottom) = (x0 + 60.0, y0 + 32.0, x0 + w - 12.0, y0 + h - 70.0);
    let points = p.series.iter().flat_map(|(_, v)| v.iter());
    let (mut t_min, mut t_max, mut v_max) = (f64::MAX, f64::MIN, 0.0f64);
    for &(t, v) in points {
        t_min = t_min.min(t);
        t_max = t_max.max(t);
        v_max = v_max.max(v);
    }
    if t_min >= t_max {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" fill="#8e8e8e">no data</text>"##,
            left + 10.0,
            (top + bottom) / 2.0
        );
        return;
    }
    let v_max = if v_max <= 0.0 { 1.0 } else { v_max * 1.1 };
    let x = |t: f64| left + (t - t_min) / (t_max - t_min) * (right - left);
    let y = |v: f64| bottom - v / v_max * (bottom - top);
    for k in 0..=4 {
        let v = v_max * k as f64 / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{right}" y1="{0:.1}" y2="{0:.1}" stroke="#2c3235"/><text x="{1}" y="{2:.1}" fill="#8e8e8e" text-anchor="end">{3}</text>"##,
            y(v),
            left - 6.0,
            y(v) + 4.0,
            axis(v, p.unit)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="{0}" fill="#8e8e8e">-{1:.0}s</text><text x="{right}" y="{0}" fill="#8e8e8e" text-anchor="end">now</text>"##,
        bottom + 16.0,
        t_max - t_min
    );
    for (i, (name, pts)) in p.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(t, v)| format!("{:.1},{:.1}", x(t), y(v)))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"##,
            path.join(" ")
        );
        let (lx, ly) = (
            x0 + 12.0 + (i % 3) as f64 * 180.0,
            bottom + 34.0 + (i / 3) as f64 * 16.0,
        );
        let _ = writeln!(
            s,
            r##"<rect x="{lx}" y="{0}" width="10" height="3" fill="{colour}"/><text x="{1}" y="{2}" fill="#d8d9da">{3}</text>"##,
            ly - 4.0,
            lx + 14.0,
            ly,
            escape(name)
        );
    }
}

fn axis(v: f64, unit: &str) -> String {
    match unit {
        "s" if v < 0.01 => format!("{:.1} ms", v * 1000.0),
        "s" if v < 1.0 => format!("{:.0} ms", v * 1000.0),
        "B/s" if v >= 1e6 => format!("{:.1} MB/s", v / 1e6),
        "B/s" if v >= 1e3 => format!("{:.0} kB/s", v / 1e3),
        _ if v >= 100.0 => format!("{v:.0}{unit}"),
        _ => format!("{v:.2}{unit}"),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
