//! `strait status`: a running gateway's view of the federation, read from its admin API.

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::admin::client::get;
use anyhow::bail;
use serde_json::Value;

/// Prints members (or static peers), and imported services.
pub async fn print(admin: SocketAddr) -> anyhow::Result<()> {
    println!("{}", render(admin).await?);
    Ok(())
}

/// The status text.
pub async fn render(admin: SocketAddr) -> anyhow::Result<String> {
    let (_, services) = get(admin, "/v1/services").await?;
    let (_, peers) = get(admin, "/v1/peers").await?;
    let (members_code, members) = get(admin, "/v1/members").await?;
    let (_, routes) = get(admin, "/v1/routes").await?;
    let Some(cluster) = services["cluster"].as_str() else {
        bail!("unexpected /v1/services answer")
    };
    let mut out = String::new();
    let rtt = |c: &str| {
        peers
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["cluster"] == c))
            .and_then(|p| p["rtt_ms"].as_f64())
            .map_or("-".to_owned(), |r| format!("{r:.1}ms"))
    };
    if members_code == 200 {
        let rows = members.as_array().cloned().unwrap_or_default();
        let _ = writeln!(
            out,
            "gateway {cluster}: {} members (discovery)\n",
            rows.len()
        );
        let _ = writeln!(
            out,
            "{:<14} {:<14} {:<8} {:>8} {:>9} {:>11} {:>6}",
            "CLUSTER", "REGION", "STATE", "RTT", "SERVICES", "LAST HEARD", "PHI"
        );
        for m in rows {
            let c = m["cluster"].as_str().unwrap_or("?");
            let state = if c == cluster {
                "self"
            } else if m["expired"] == true {
                "expired"
            } else if m["alive"] == true {
                "alive"
            } else {
                "suspect"
            };
            let heard = if c == cluster {
                "-".to_owned()
            } else {
                format!(
                    "{:.1}s ago",
                    m["last_heard_seconds"].as_f64().unwrap_or(0.0)
                )
            };
            let _ = writeln!(
                out,
                "{:<14} {:<14} {:<8} {:>8} {:>9} {:>11} {:>6.1}",
                c,
                m["region"].as_str().unwrap_or(""),
                state,
                if c == cluster { "-".to_owned() } else { rtt(c) },
                m["services"].to_string(),
                heard,
                m["phi"].as_f64().unwrap_or(0.0)
            );
        }
    } else {
        let rows = peers.as_array().cloned().unwrap_or_default();
        let _ = writeln!(
            out,
            "gateway {cluster}: {} static peers (no discovery)\n",
            rows.len()
        );
        let _ = writeln!(
            out,
            "{:<14} {:<22} {:<11} {:>8}  LAST ERROR",
            "CLUSTER", "ADDRESS", "TUNNEL", "RTT"
        );
        for p in rows {
            let c = p["cluster"].as_str().unwrap_or("?");
            let _ = writeln!(
                out,
                "{:<14} {:<22} {:<11} {:>8}  {}",
                c,
                p["address"].as_str().unwrap_or(""),
                p["status"].as_str().unwrap_or(""),
                rtt(c),
                p["last_error"].as_str().unwrap_or("")
            );
        }
    }
    let imports = services["imports"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "\nimported services: {}\n", imports.len());
    let _ = writeln!(
        out,
        "{:<28} {:>6}  {:<24} ROUTE (best first; out of rotation in brackets)",
        "SERVICE", "PORT", "LISTEN"
    );
    for i in imports {
        let service = i["service"].as_str().unwrap_or("");
        let route = routes
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["service"] == service))
            .map(route_line)
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<28} {:>6}  {:<24} {}",
            service,
            i["port"].to_string(),
            i["address"].as_str().unwrap_or(""),
            route
        );
    }
    let exports = services["exports"].as_array().map_or(0, Vec::len);
    let _ = write!(out, "\nexported services: {exports}");
    Ok(out)
}

/// One service's ranked clusters: `a, b [peer-down]`, with a ramping share as a percentage.
fn route_line(r: &Value) -> String {
    let clusters = r["clusters"].as_array().cloned().unwrap_or_default();
    clusters
        .iter()
        .map(|c| {
            let name = c["cluster"].as_str().unwrap_or("?");
            match c["reason"].as_str() {
                Some(why) => format!("[{name}: {why}]"),
                None => match c["share"].as_f64() {
                    Some(share) if share < 1.0 => format!("{name} ({:.0}%)", share * 100.0),
                    _ => name.to_owned(),
                },
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}
