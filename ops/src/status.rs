//! `strait status`: a running gateway's view of the federation, read from its admin API.

use std::fmt::Write as _;
use std::net::SocketAddr;

use strait_common::api::{Member, Peer, Route};

use crate::client::Admin;

/// Prints members (or static peers), and imported services.
pub async fn print(admin: SocketAddr) -> anyhow::Result<()> {
    println!("{}", render(admin).await?);
    Ok(())
}

/// The status text.
pub async fn render(admin: SocketAddr) -> anyhow::Result<String> {
    let admin = Admin::new(admin);
    let services = admin.services().await?;
    let peers = admin.peers().await?;
    let members = admin.members().await?;
    let routes = admin.routes().await?;
    let cluster = services.cluster.as_str();
    let mut out = String::new();
    let rtt = |c: &str| {
        peers
            .iter()
            .find(|p| p.cluster == c)
            .and_then(|p| p.rtt_ms)
            .map_or("-".to_owned(), |r| format!("{r:.1}ms"))
    };
    match members {
        Ok(rows) => members_table(&mut out, cluster, &rows, rtt),
        Err(_) => peers_table(&mut out, cluster, &peers, rtt),
    }
    replicas_table(&mut out, &peers);
    let _ = writeln!(out, "\nimported services: {}\n", services.imports.len());
    let _ = writeln!(
        out,
        "{:<28} {:>6}  {:<24} ROUTE (best first; out of rotation in brackets)",
        "SERVICE", "PORT", "LISTEN"
    );
    for i in &services.imports {
        // One endpoint of a headless service is reached through its own cluster only.
        let only = i.endpoint.as_deref().and_then(|e| e.split('/').next());
        let route = routes
            .iter()
            .find(|r| r.service == i.service)
            .map(|r| route_line(r, only))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<28} {:>6}  {:<24} {}",
            i.service,
            i.port.to_string(),
            i.address.to_string(),
            route
        );
    }
    let _ = write!(out, "\nexported services: {}", services.exports.len());
    Ok(out)
}

fn members_table(out: &mut String, cluster: &str, rows: &[Member], rtt: impl Fn(&str) -> String) {
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
        let me = m.cluster == cluster;
        let state = if me {
            "self"
        } else if m.expired {
            "expired"
        } else if m.alive {
            "alive"
        } else {
            "suspect"
        };
        let heard = if me {
            "-".to_owned()
        } else {
            format!("{:.1}s ago", m.last_heard_seconds)
        };
        let _ = writeln!(
            out,
            "{:<14} {:<14} {:<8} {:>8} {:>9} {:>11} {:>6.1}",
            m.cluster,
            m.region,
            state,
            if me { "-".to_owned() } else { rtt(&m.cluster) },
            m.services.to_string(),
            heard,
            m.phi
        );
    }
}

fn peers_table(out: &mut String, cluster: &str, rows: &[Peer], rtt: impl Fn(&str) -> String) {
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
        let _ = writeln!(
            out,
            "{:<14} {:<22} {:<11} {:>8}  {}",
            p.cluster,
            p.address,
            p.status.as_str(),
            rtt(&p.cluster),
            p.last_error.as_deref().unwrap_or("")
        );
    }
}

/// One service's ranked clusters: `a, b [peer-down]`, with a ramping share as a percentage
/// and, for a cluster running replicas of which some take no connections, how many do
/// (`a 1/2`); `only` that cluster's when given.
fn route_line(r: &Route, only: Option<&str>) -> String {
    r.clusters
        .iter()
        .filter(|c| only.is_none_or(|o| o == c.cluster))
        .map(|c| {
            let name = if c.replicas > 1 && c.routable_replicas < c.replicas {
                format!("{} {}/{}", c.cluster, c.routable_replicas, c.replicas)
            } else {
                c.cluster.clone()
            };
            match &c.reason {
                Some(why) => format!("[{name}: {why}]"),
                None if c.share < 1.0 => format!("{name} ({:.0}%)", c.share * 100.0),
                None => name,
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The peers that are replicas of a cluster running several gateways, one row each.
fn replicas_table(out: &mut String, rows: &[Peer]) {
    let replicas: Vec<&Peer> = rows.iter().filter(|p| !p.replica.is_empty()).collect();
    if replicas.is_empty() {
        return;
    }
    let _ = writeln!(out, "\npeer replicas: {}\n", replicas.len());
    let _ = writeln!(
        out,
        "{:<24} {:<22} {:<11} {:>8} {:>6}  STATE",
        "CLUSTER/REPLICA", "ADDRESS", "TUNNEL", "RTT", "OPEN"
    );
    for p in replicas {
        let state = if p.draining {
            "draining"
        } else if p.responsive {
            "serving"
        } else {
            "out"
        };
        let _ = writeln!(
            out,
            "{:<24} {:<22} {:<11} {:>8} {:>6}  {state}",
            format!("{}/{}", p.cluster, p.replica),
            p.address,
            p.status.as_str(),
            p.rtt_ms.map_or("-".to_owned(), |r| format!("{r:.1}ms")),
            p.open_connections,
        );
    }
}

#[cfg(test)]
mod tests {
    use strait_common::api::RouteCluster;
    use strait_common::config::routing::{Mode, RoutePolicy};

    use super::*;

    fn cluster(name: &str, reason: Option<&str>, share: f64) -> RouteCluster {
        RouteCluster {
            cluster: name.into(),
            tier: 0,
            eligible: reason.is_none(),
            reason: reason.map(str::to_owned),
            detail: None,
            share,
            region: String::new(),
            zone: String::new(),
            peer: None,
            responsive: false,
            replicas: 1,
            routable_replicas: 1,
            rtt: None,
            ready_endpoints: None,
            weight: 1,
            active: 0,
            served: 0,
        }
    }

    #[test]
    fn a_route_line_names_clusters_best_first_and_a_headless_row_its_own_cluster() {
        let route = Route {
            service: "shop/pods".into(),
            mode: Mode::Locality,
            primary: Some("east".into()),
            clusters: vec![
                cluster("east", None, 1.0),
                cluster("north", None, 0.25),
                cluster("west", Some("peer-down"), 0.0),
            ],
            policy: RoutePolicy::default(),
        };
        assert_eq!(
            route_line(&route, None),
            "east, north (25%), [west: peer-down]"
        );
        assert_eq!(route_line(&route, Some("west")), "[west: peer-down]");
        // A cluster with a replica out says how many still take connections.
        let mut route = route;
        route.clusters[0].replicas = 2;
        route.clusters[0].routable_replicas = 1;
        assert_eq!(route_line(&route, Some("east")), "east 1/2");
    }
}
