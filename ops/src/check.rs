//! `strait check`: a preflight of one gateway, as `linkerd check` does for a mesh. Each
//! check is a line: passed, or failed with what to do. It reads the config file (and the
//! files it names), then asks the running gateway through its admin API and its DNS
//! server.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use strait_common::GatewayId;
use strait_common::api::{Member, PeerStatus};
use strait_common::config::{Config, bind_warnings, file_warnings};
use strait_common::pki::Identity;

use crate::client::Admin;

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked (`config`, `certificate`, `peer eu-west`, ...).
    pub check: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn pass(check: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            check: check.into(),
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            check: check.into(),
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Where the running gateway answers, when the config does not say (port 0 there).
#[derive(Debug, Clone, Copy, Default)]
pub struct Targets {
    /// The admin API (default: `listen.admin`).
    pub admin: Option<SocketAddr>,
    /// The DNS server (default: `listen.dns`, when its port is not 0).
    pub dns: Option<SocketAddr>,
}

/// A certificate expiring sooner than this fails the check.
const EXPIRY_MARGIN: Duration = Duration::from_secs(7 * 86_400);

/// Runs every check against the gateway configured in `config_file`.
pub async fn run(config_file: &Path, targets: Targets) -> Vec<Check> {
    let mut out = Vec::new();
    let config = match Config::load(config_file) {
        Ok(c) => {
            out.push(Check::pass(
                "config",
                format!("{} is valid (cluster {})", config_file.display(), c.cluster),
            ));
            c
        }
        Err(e) => {
            out.push(Check::fail(
                "config",
                e.to_string(),
                "fix each field as its error says; `strait config check` shows the same",
            ));
            return out;
        }
    };
    for (field, problem, fix) in bind_warnings(&config) {
        out.push(Check::fail(format!("address {field}"), problem, fix));
    }
    for (field, problem, fix) in file_warnings(&config) {
        out.push(Check::fail(format!("file {field}"), problem, fix));
    }
    out.push(certificate(&config));
    let admin_addr = targets.admin.unwrap_or(config.listen.admin);
    let token = config
        .faults
        .as_ref()
        .and_then(|f| std::fs::read_to_string(&f.token_file).ok())
        .map(|t| t.trim().to_owned());
    let admin = match &token {
        Some(t) => Admin::with_token(admin_addr, t.clone()),
        None => Admin::new(admin_addr),
    };
    match admin.ready().await {
        Ok((200, _)) => out.push(Check::pass(
            "gateway",
            format!("running and ready (admin API {admin_addr})"),
        )),
        Ok((code, ready)) => out.push(Check::fail(
            "gateway",
            format!("not ready (HTTP {code}): {ready:?}"),
            "see the gateway's log; /ready says which part is not ready",
        )),
        Err(e) => {
            out.push(Check::fail(
                "gateway",
                format!("the admin API {admin_addr} does not answer: {e}"),
                "start the gateway (`strait run --config ...`), or point --admin at its admin address",
            ));
            return out;
        }
    }
    out.extend(peers(&admin).await);
    if config.discovery.is_some() {
        out.push(match admin.members().await {
            Ok(Ok(members)) => clocks(&members),
            Ok(Err(refused)) => {
                Check::fail("clocks", format!("{refused:?}"), "see the gateway's log")
            }
            Err(e) => Check::fail("clocks", e.to_string(), "see the gateway's log"),
        });
    }
    let imported = imports(&admin, &config, &mut out).await;
    let dns = targets.dns.or(config.listen.dns.filter(|a| a.port() != 0));
    if let Some(dns) = dns {
        for service in &imported {
            out.push(dns_answer(dns, &config.dns.zone, service).await);
        }
    }
    out.push(faults(&admin, &config).await);
    out
}

/// The certificate chains to the CA, names this cluster, and is not about to expire.
fn certificate(config: &Config) -> Check {
    let me = GatewayId::new(&config.trust_domain, &config.cluster);
    match Identity::load(&config.tls.ca, &config.tls.cert, &config.tls.key, &me) {
        Ok(id) => {
            let left = id
                .not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            let days = left.as_secs() / 86_400;
            if left < EXPIRY_MARGIN {
                Check::fail(
                    "certificate",
                    format!("{me} expires in {days} day(s)"),
                    "issue a new one (`strait pki issue`) and write it over tls.cert and tls.key: the gateway picks it up without a restart",
                )
            } else {
                Check::pass(
                    "certificate",
                    format!("{me}, chains to tls.ca, expires in {days} days"),
                )
            }
        }
        Err(e) => Check::fail(
            "certificate",
            e.to_string(),
            "issue this cluster's certificate with `strait pki issue --cluster <cluster>` and point tls.* at it",
        ),
    }
}

/// Clocks further apart than this fail the check: export times decide MCS conflicts
/// (oldest export wins), and a freshly issued certificate is not yet valid on a host whose
/// clock is behind.
const MAX_CLOCK_OFFSET_MS: f64 = 1000.0;

/// The members' clocks agree with this gateway's (as gossip measured them). An offset
/// counts only beyond its uncertainty (half the round trip of the exchange that measured
/// it: a cold exchange includes the TCP and TLS handshakes).
fn clocks(members: &[Member]) -> Check {
    let measured: Vec<(&str, f64, f64)> = members
        .iter()
        .filter_map(|m| {
            let offset = m.clock_offset_ms?;
            Some((
                m.cluster.as_str(),
                offset,
                m.clock_uncertainty_ms.unwrap_or(0.0),
            ))
        })
        .collect();
    let beyond = |(_, o, u): &(&str, f64, f64)| (o.abs() - u).max(0.0);
    let Some(&(worst, offset, uncertainty)) = measured
        .iter()
        .max_by(|a, b| beyond(a).total_cmp(&beyond(b)))
    else {
        return Check::pass("clocks", "no member exchanged with yet");
    };
    let detail = format!(
        "{} member(s) measured; largest offset {worst} {offset:+.0} ms (±{uncertainty:.0} ms)",
        measured.len()
    );
    if offset.abs() - uncertainty > MAX_CLOCK_OFFSET_MS {
        Check::fail(
            "clocks",
            detail,
            format!(
                "synchronise the clocks of this host and {worst}'s (NTP: chrony or systemd-timesyncd); export times decide MCS conflicts and new certificates are refused by a host whose clock is behind"
            ),
        )
    } else {
        Check::pass("clocks", detail)
    }
}

/// One line per peer: its tunnel is up, or why not.
async fn peers(admin: &Admin) -> Vec<Check> {
    match admin.peers().await {
        Ok(peers) => peers
            .into_iter()
            .map(|p| {
                let name = format!("peer {}", p.cluster);
                if p.status == PeerStatus::Up {
                    let rtt = p.rtt_ms.map(|r| format!(", RTT {r:.1} ms")).unwrap_or_default();
                    Check::pass(name, format!("tunnel up to {}{rtt}", p.address))
                } else {
                    Check::fail(
                        name,
                        format!(
                            "tunnel {:?} to {}{}",
                            p.status,
                            p.address,
                            p.last_error.map(|e| format!(": {e}")).unwrap_or_default()
                        ),
                        "check that the peer runs, that its tunnel port (UDP) is reachable from here, and that its certificate names that cluster",
                    )
                }
            })
            .collect(),
        Err(e) => vec![Check::fail("peers", e.to_string(), "see the gateway's log")],
    }
}

/// Every configured import has its listeners; the imported services (for the DNS checks).
async fn imports(admin: &Admin, config: &Config, out: &mut Vec<Check>) -> BTreeSet<String> {
    let services = match admin.services().await {
        Ok(s) => s,
        Err(e) => {
            out.push(Check::fail(
                "imports",
                e.to_string(),
                "see the gateway's log",
            ));
            return BTreeSet::new();
        }
    };
    for imp in &config.imports {
        let name = format!("{}/{}", imp.namespace, imp.name);
        for p in &imp.ports {
            let bound = services
                .imports
                .iter()
                .find(|l| l.service == name && l.port == p.port);
            out.push(match bound {
                Some(l) => Check::pass(format!("import {name}:{}", p.port), format!("listening on {}", l.address)),
                None => Check::fail(
                    format!("import {name}:{}", p.port),
                    format!("no listener on {}", imp.address),
                    "see the gateway's log for the bind error; `strait config check` warns about addresses this host cannot bind",
                ),
            });
        }
    }
    let discovered = services.imports.iter().filter(|l| {
        !config
            .imports
            .iter()
            .any(|i| format!("{}/{}", i.namespace, i.name) == l.service)
    });
    let count = discovered.clone().count();
    if count > 0 {
        out.push(Check::pass(
            "imports",
            format!("{count} listener(s) for services learned from the federation"),
        ));
    }
    services.imports.into_iter().map(|l| l.service).collect()
}

/// The DNS server answers `<name>.<ns>.svc.<zone>` for an imported service.
async fn dns_answer(server: SocketAddr, zone: &str, service: &str) -> Check {
    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};
    let (ns, name) = service.split_once('/').unwrap_or(("", service));
    let fqdn = format!("{name}.{ns}.svc.{}.", zone.trim_end_matches('.'));
    let check = format!("dns {fqdn}");
    let Ok(qname) = Name::from_ascii(&fqdn) else {
        return Check::fail(check, "not a DNS name", "rename the service");
    };
    let mut msg = Message::new();
    msg.set_id(rand::random())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(qname, RecordType::A));
    let asked = async {
        let socket = tokio::net::UdpSocket::bind(SocketAddr::new(
            if server.is_ipv4() {
                [0, 0, 0, 0].into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            },
            0,
        ))
        .await?;
        socket
            .send_to(&msg.to_vec().map_err(std::io::Error::other)?, server)
            .await?;
        let mut buf = vec![0u8; 4096];
        let n = socket.recv(&mut buf).await?;
        Message::from_vec(&buf[..n]).map_err(std::io::Error::other)
    };
    match tokio::time::timeout(Duration::from_secs(2), asked).await {
        Ok(Ok(answer))
            if answer.response_code() == ResponseCode::NoError && !answer.answers().is_empty() =>
        {
            let ips: Vec<String> = answer
                .answers()
                .iter()
                .map(|r| r.data().to_string())
                .collect();
            Check::pass(check, format!("answers {}", ips.join(", ")))
        }
        Ok(Ok(answer)) => Check::fail(
            check,
            format!("answered {} with no address", answer.response_code()),
            "the service has no ready endpoint in a live cluster; `strait status` shows why",
        ),
        Ok(Err(e)) => Check::fail(check, e.to_string(), "check listen.dns"),
        Err(_) => Check::fail(
            check,
            format!("no answer from {server} in 2 s"),
            "check listen.dns, and that the gateway runs",
        ),
    }
}

/// Drill faults in force (a forgotten fault breaks traffic on purpose).
async fn faults(admin: &Admin, config: &Config) -> Check {
    if config.faults.is_none() {
        return Check::pass("faults", "fault injection is off");
    }
    match admin.faults().await {
        Ok(Ok(active)) if active.is_empty() => Check::pass("faults", "no drill fault in force"),
        Ok(Ok(active)) => Check::fail(
            "faults",
            format!(
                "{} drill fault(s) in force: {}",
                active.len(),
                active
                    .iter()
                    .map(|f| f.fault.kind().to_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "undo them with `strait drill` (or DELETE /v1/faults), or wait until they expire",
        ),
        Ok(Err(refused)) => {
            Check::fail("faults", format!("{refused:?}"), "check faults.token_file")
        }
        Err(e) => Check::fail("faults", e.to_string(), "see the gateway's log"),
    }
}

/// The checks as lines for a person: `✓ name: detail`, or `✗ name: detail` and the fix.
pub fn render(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        s.push_str(&format!(
            "{} {}: {}\n",
            if c.ok { "✓" } else { "✗" },
            c.check,
            c.detail
        ));
        if let Some(fix) = &c.fix {
            s.push_str(&format!("    fix: {fix}\n"));
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    s.push_str(&if failed == 0 {
        format!("all {} checks passed\n", checks.len())
    } else {
        format!("{failed} of {} checks failed\n", checks.len())
    });
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(cluster: &str, clock_offset_ms: Option<f64>) -> Member {
        Member {
            cluster: cluster.into(),
            region: "r".into(),
            zone: String::new(),
            alive: true,
            expired: false,
            phi: 0.0,
            last_heard_seconds: 0.0,
            generation: 1,
            version: 1,
            services: 0,
            tunnel_addr: "127.0.0.1:1".into(),
            gossip_addr: "127.0.0.1:2".into(),
            rtt_ms: None,
            clock_offset_ms,
            clock_uncertainty_ms: clock_offset_ms.map(|_| 5.0),
        }
    }

    #[test]
    fn clocks_fail_beyond_a_second_naming_the_member_furthest_off() {
        let close = [
            member("me", None),
            member("a", Some(12.0)),
            member("b", Some(-40.0)),
        ];
        let c = clocks(&close);
        assert!(c.ok, "{c:?}");
        assert_eq!(
            c.detail,
            "2 member(s) measured; largest offset b -40 ms (±5 ms)"
        );
        let far = [member("a", Some(12.0)), member("b", Some(-2500.0))];
        let c = clocks(&far);
        assert!(!c.ok);
        assert!(c.detail.contains("b -2500 ms"), "{c:?}");
        assert!(c.fix.unwrap().contains("NTP"));
        assert!(clocks(&[member("me", None)]).ok);
        // Measured over a cold exchange: 1.1 s off, give or take 0.2 s, is not proof.
        let mut cold = member("c", Some(1100.0));
        cold.clock_uncertainty_ms = Some(200.0);
        assert!(clocks(&[cold]).ok);
    }
}
