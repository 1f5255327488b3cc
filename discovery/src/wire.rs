//! The gossip wire format (generated from `proto/`) and checked conversions to the
//! catalog model. Everything from the network is validated here, so the state machine
//! only ever sees well-formed names, addresses and ports.

use std::net::{IpAddr, SocketAddr};

use strait_common::identity::is_dns_label;

use crate::model::{Endpoint, MemberInfo, Port, Selection, Service, ServiceKey};
use crate::seal::{Chain, Seal};
use crate::state::{Delta, Digest, Entry, OriginDelta, OriginDigest, ReplicaDigest, ReplicaRecord};

/// Generated protobuf and gRPC code.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("strait.discovery.v1");
}

/// Most origins one message may describe.
pub const MAX_ORIGINS: usize = 4096;
/// Most entries, ports or endpoints in one collection of a message.
pub const MAX_ITEMS: usize = 65_536;
/// Most KEP-5939 selectors per export, and properties per selector or cluster.
pub const MAX_SELECTION: usize = 32;
/// Largest origin signature (RSA-4096 is 512 bytes).
pub const MAX_SIGNATURE: usize = 1024;
/// Most certificates in an origin's chain, and the largest one.
pub const MAX_CHAIN: usize = 4;
/// Largest certificate of an origin's chain.
pub const MAX_CERT: usize = 16 << 10;

/// Why a gossip message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed gossip message: {field}: {problem}")]
pub struct WireError {
    /// Where in the message.
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

fn bad(field: impl Into<String>, problem: impl Into<String>) -> WireError {
    WireError {
        field: field.into(),
        problem: problem.into(),
    }
}

fn label(field: &str, v: &str) -> Result<(), WireError> {
    if is_dns_label(v) {
        Ok(())
    } else {
        Err(bad(
            field,
            format!("`{}` is not a DNS label", v.escape_debug()),
        ))
    }
}

fn limit<T>(field: &str, v: &[T], max: usize) -> Result<(), WireError> {
    if v.len() > max {
        Err(bad(
            field,
            format!("{} items exceed the limit of {max}", v.len()),
        ))
    } else {
        Ok(())
    }
}

/// Digest to wire.
pub fn digest_to_pb(d: &Digest) -> pb::Digest {
    pb::Digest {
        origins: d
            .iter()
            .map(|(c, o)| pb::OriginDigest {
                cluster: c.clone(),
                generation: o.generation,
                version: o.version,
                heartbeat: o.heartbeat,
                cert: o.cert,
            })
            .collect(),
        replicas: d
            .replicas
            .iter()
            .map(|((cluster, replica), r)| pb::ReplicaDigest {
                cluster: cluster.clone(),
                replica: replica.clone(),
                generation: r.generation,
                beat: r.beat,
                cert: r.cert,
            })
            .collect(),
    }
}

/// Digest from wire, checked.
pub fn digest_from_pb(d: pb::Digest) -> Result<Digest, WireError> {
    limit("digest.origins", &d.origins, MAX_ORIGINS)?;
    limit("digest.replicas", &d.replicas, MAX_ORIGINS)?;
    let origins = d
        .origins
        .into_iter()
        .map(|o| {
            label("digest.origins.cluster", &o.cluster)?;
            Ok((
                o.cluster,
                OriginDigest {
                    cert: o.cert,
                    generation: o.generation,
                    version: o.version,
                    heartbeat: o.heartbeat,
                },
            ))
        })
        .collect::<Result<_, WireError>>()?;
    let replicas = d
        .replicas
        .into_iter()
        .map(|r| {
            label("digest.replicas.cluster", &r.cluster)?;
            label("digest.replicas.replica", &r.replica)?;
            Ok((
                (r.cluster, r.replica),
                ReplicaDigest {
                    generation: r.generation,
                    beat: r.beat,
                    cert: r.cert,
                },
            ))
        })
        .collect::<Result<_, WireError>>()?;
    Ok(Digest { origins, replicas })
}

fn member_to_pb(m: &MemberInfo) -> pb::Member {
    pb::Member {
        region: m.region.clone(),
        zone: m.zone.clone(),
        tunnel_addr: m.tunnel_addr.to_string(),
        gossip_addr: m.gossip_addr.to_string(),
    }
}

fn member_from_pb(at: &str, cluster: &str, m: pb::Member) -> Result<MemberInfo, WireError> {
    Ok(MemberInfo {
        region: m.region,
        zone: m.zone,
        tunnel_addr: addr(&format!("{at}.member.tunnel_addr"), &m.tunnel_addr)?,
        gossip_addr: addr(&format!("{at}.member.gossip_addr"), &m.gossip_addr)?,
        cluster: cluster.to_owned(),
    })
}

fn seal_to_pb(s: &Seal) -> pb::Seal {
    pb::Seal {
        cert: s.cert,
        scheme: s.scheme.into(),
        signature: s.signature.clone(),
        content: s.content.map(|c| c.to_vec()).unwrap_or_default(),
    }
}

fn chain_to_pb(c: Option<&Chain>) -> Vec<Vec<u8>> {
    c.map(|c| c.certs.to_vec()).unwrap_or_default()
}

/// Delta to wire.
pub fn delta_to_pb(d: &Delta) -> pb::Delta {
    pb::Delta {
        origins: d
            .origins
            .iter()
            .map(|o| pb::OriginDelta {
                cluster: o.cluster.clone(),
                member: o.info.as_ref().map(member_to_pb),
                generation: o.generation,
                heartbeat: o.heartbeat,
                full: o.full,
                entries: o
                    .entries
                    .iter()
                    .map(|(k, e)| pb::Entry {
                        namespace: k.namespace.clone(),
                        name: k.name.clone(),
                        version: e.version,
                        service: e.service.as_ref().map(service_to_pb),
                    })
                    .collect(),
                seal: o.seal.as_ref().map(seal_to_pb),
                chain: chain_to_pb(o.chain.as_ref()),
            })
            .collect(),
        replicas: d
            .replicas
            .iter()
            .map(|r| pb::Replica {
                cluster: r.info.cluster.clone(),
                replica: r.replica.clone(),
                member: Some(member_to_pb(&r.info)),
                generation: r.generation,
                beat: r.beat,
                draining: r.draining,
                seal: r.seal.as_ref().map(seal_to_pb),
                chain: chain_to_pb(r.chain.as_ref()),
            })
            .collect(),
    }
}

pub(crate) fn service_to_pb(s: &Service) -> pb::Service {
    pb::Service {
        ports: s
            .ports
            .iter()
            .map(|p| pb::Port {
                name: p.name.clone(),
                port: p.port.into(),
                protocol: p.protocol.clone(),
            })
            .collect(),
        endpoints: s
            .endpoints
            .iter()
            .map(|e| pb::Endpoint {
                address: e.address.to_string(),
                hostname: e.hostname.clone().unwrap_or_default(),
                ready: e.ready,
                zone: e.zone.clone(),
            })
            .collect(),
        export_to: s.export_to.clone(),
        weight: s.weight,
        headless: s.headless,
        session_affinity_seconds: s.session_affinity,
        exported_at_ms: s.exported_at_ms,
        cluster_selectors: s
            .selection
            .selectors
            .iter()
            .map(|m| pb::Selector {
                match_properties: m.clone().into_iter().collect(),
            })
            .collect(),
        cluster_properties: s.selection.properties.clone().into_iter().collect(),
    }
}

/// Delta from wire, checked.
pub fn delta_from_pb(d: pb::Delta) -> Result<Delta, WireError> {
    limit("delta.origins", &d.origins, MAX_ORIGINS)?;
    let origins = d
        .origins
        .into_iter()
        .map(origin_from_pb)
        .collect::<Result<_, _>>()?;
    limit("delta.replicas", &d.replicas, MAX_ORIGINS)?;
    let replicas = d
        .replicas
        .into_iter()
        .map(replica_from_pb)
        .collect::<Result<_, _>>()?;
    Ok(Delta { origins, replicas })
}

fn replica_from_pb(r: pb::Replica) -> Result<ReplicaRecord, WireError> {
    label("replica.cluster", &r.cluster)?;
    label("replica.replica", &r.replica)?;
    let at = format!("replica[{}/{}]", r.cluster, r.replica);
    let member = r
        .member
        .ok_or_else(|| bad(format!("{at}.member"), "a replica must describe itself"))?;
    Ok(ReplicaRecord {
        info: member_from_pb(&at, &r.cluster, member)?,
        replica: r.replica,
        generation: r.generation,
        beat: r.beat,
        draining: r.draining,
        seal: r.seal.map(|s| seal_from_pb(&at, s)).transpose()?,
        chain: chain_from_pb(&at, r.chain)?,
    })
}

fn seal_from_pb(at: &str, s: pb::Seal) -> Result<Seal, WireError> {
    let scheme = u16::try_from(s.scheme)
        .map_err(|_| bad(format!("{at}.seal.scheme"), "not a signature scheme"))?;
    if s.signature.is_empty() || s.signature.len() > MAX_SIGNATURE {
        return Err(bad(
            format!("{at}.seal.signature"),
            format!("{} bytes (1..={MAX_SIGNATURE})", s.signature.len()),
        ));
    }
    let content = match s.content.len() {
        0 => None,
        32 => s.content.try_into().ok(),
        n => {
            return Err(bad(
                format!("{at}.seal.content"),
                format!("{n} bytes (a SHA-256 hash is 32)"),
            ));
        }
    };
    Ok(Seal {
        cert: s.cert,
        scheme,
        signature: s.signature,
        content,
    })
}

fn chain_from_pb(at: &str, chain: Vec<Vec<u8>>) -> Result<Option<Chain>, WireError> {
    limit(&format!("{at}.chain"), &chain, MAX_CHAIN)?;
    if chain.iter().any(|c| c.is_empty() || c.len() > MAX_CERT) {
        return Err(bad(
            format!("{at}.chain"),
            format!("certificates must be 1..={MAX_CERT} bytes"),
        ));
    }
    Ok((!chain.is_empty()).then(|| Chain::new(chain)))
}

fn origin_from_pb(o: pb::OriginDelta) -> Result<OriginDelta, WireError> {
    label("origin.cluster", &o.cluster)?;
    let at = format!("origin[{}]", o.cluster);
    let info = match o.member {
        Some(m) => Some(member_from_pb(&at, &o.cluster, m)?),
        None if o.full => {
            return Err(bad(
                format!("{at}.member"),
                "a full origin update must describe the member",
            ));
        }
        None => None,
    };
    limit(&format!("{at}.entries"), &o.entries, MAX_ITEMS)?;
    let mut entries = Vec::with_capacity(o.entries.len());
    let mut last = 0;
    for e in o.entries {
        let key_at = format!(
            "{at}.entries[{}/{}]",
            e.namespace.escape_debug(),
            e.name.escape_debug()
        );
        label(&format!("{key_at}.namespace"), &e.namespace)?;
        label(&format!("{key_at}.name"), &e.name)?;
        if e.version == 0 || e.version < last {
            return Err(bad(
                format!("{key_at}.version"),
                "entries must carry ascending, non-zero versions",
            ));
        }
        last = e.version;
        let service = e.service.map(|s| service_from_pb(&key_at, s)).transpose()?;
        entries.push((
            ServiceKey {
                namespace: e.namespace,
                name: e.name,
            },
            Entry {
                version: e.version,
                service,
            },
        ));
    }
    let seal = o.seal.map(|s| seal_from_pb(&at, s)).transpose()?;
    let chain = chain_from_pb(&at, o.chain)?;
    Ok(OriginDelta {
        cluster: o.cluster,
        info,
        generation: o.generation,
        heartbeat: o.heartbeat,
        full: o.full,
        entries,
        seal,
        chain,
    })
}

fn service_from_pb(at: &str, s: pb::Service) -> Result<Service, WireError> {
    limit(&format!("{at}.ports"), &s.ports, MAX_ITEMS)?;
    limit(&format!("{at}.endpoints"), &s.endpoints, MAX_ITEMS)?;
    limit(&format!("{at}.export_to"), &s.export_to, MAX_ITEMS)?;
    let ports = s
        .ports
        .into_iter()
        .map(|p| {
            let port = u16::try_from(p.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    bad(
                        format!("{at}.ports.port"),
                        format!("{} is not a port", p.port),
                    )
                })?;
            if !p.name.is_empty() {
                label(&format!("{at}.ports.name"), &p.name)?;
            }
            Ok(Port {
                name: p.name,
                port,
                protocol: p.protocol,
            })
        })
        .collect::<Result<_, WireError>>()?;
    let endpoints = s
        .endpoints
        .into_iter()
        .map(|e| {
            let address: IpAddr = e.address.parse().map_err(|_| {
                bad(
                    format!("{at}.endpoints.address"),
                    format!("`{}` is not an IP address", e.address.escape_debug()),
                )
            })?;
            let hostname = (!e.hostname.is_empty()).then_some(e.hostname);
            if let Some(h) = &hostname {
                label(&format!("{at}.endpoints.hostname"), h)?;
            }
            Ok(Endpoint {
                address,
                hostname,
                ready: e.ready,
                zone: e.zone,
            })
        })
        .collect::<Result<_, WireError>>()?;
    for c in &s.export_to {
        if c != "*" {
            label(&format!("{at}.export_to"), c)?;
        }
    }
    let selection = selection_from_pb(s.cluster_selectors, s.cluster_properties);
    Ok(Service {
        ports,
        endpoints,
        export_to: s.export_to,
        weight: s.weight,
        headless: s.headless,
        session_affinity: s.session_affinity_seconds,
        exported_at_ms: s.exported_at_ms,
        selection,
    })
}

/// Whether a KEP-5939 selection is within the limits a receiver keeps.
pub(crate) fn selection_fits(s: &Selection) -> bool {
    let fits = |m: &std::collections::BTreeMap<String, String>| {
        m.len() <= MAX_SELECTION && m.iter().all(|(k, v)| k.len() <= 253 && v.len() <= 253)
    };
    s.selectors.len() <= MAX_SELECTION && s.selectors.iter().all(fits) && fits(&s.properties)
}

/// KEP-5939 selection from the wire. Over the limits it is dropped (selectors then match
/// nothing for that export) rather than refusing the whole delta: one oversized export
/// must not silence its cluster. (An origin drops it the same way before it signs.)
fn selection_from_pb(
    selectors: Vec<pb::Selector>,
    properties: std::collections::BTreeMap<String, String>,
) -> Selection {
    let s = Selection {
        selectors: selectors.into_iter().map(|s| s.match_properties).collect(),
        properties,
    };
    if selection_fits(&s) {
        s
    } else {
        Selection::default()
    }
}

fn addr(field: &str, v: &str) -> Result<SocketAddr, WireError> {
    v.parse()
        .map_err(|_| bad(field, format!("`{}` is not an address", v.escape_debug())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Catalog, CatalogConfig};

    fn member(c: &str) -> MemberInfo {
        MemberInfo {
            cluster: c.into(),
            region: "r".into(),
            zone: "z".into(),
            tunnel_addr: "127.0.0.1:1".parse().unwrap(),
            gossip_addr: "127.0.0.1:2".parse().unwrap(),
        }
    }

    #[test]
    fn round_trips_a_real_delta() {
        let mut c = Catalog::new(member("a"), 7, CatalogConfig::default());
        let svc = Service {
            ports: vec![Port {
                name: "http".into(),
                port: 80,
                protocol: "TCP".into(),
            }],
            endpoints: vec![Endpoint {
                address: "10.0.0.1".parse().unwrap(),
                hostname: Some("web-0".into()),
                ready: true,
                zone: "z1".into(),
            }],
            export_to: vec!["*".into()],
            weight: 3,
            headless: false,
            session_affinity: None,
            exported_at_ms: 0,
            selection: Default::default(),
        };
        c.set_local(
            [(ServiceKey::new("shop", "web"), svc)]
                .into_iter()
                .collect(),
        );
        c.set_local(Default::default());
        c.set_local(
            [(
                ServiceKey::new("shop", "db"),
                Service {
                    ports: vec![],
                    endpoints: vec![],
                    export_to: vec!["b".into()],
                    weight: 1,
                    headless: false,
                    session_affinity: None,
                    exported_at_ms: 0,
                    selection: Default::default(),
                },
            )]
            .into_iter()
            .collect(),
        );
        let delta = c.delta_for(&Digest::new());
        assert_eq!(delta_from_pb(delta_to_pb(&delta)).unwrap(), delta);
        let digest = c.digest();
        assert_eq!(digest_from_pb(digest_to_pb(&digest)).unwrap(), digest);
    }

    #[test]
    fn rejects_malformed_fields_with_their_location() {
        let origin = |f: &dyn Fn(&mut pb::OriginDelta)| {
            let mut o = pb::OriginDelta {
                cluster: "a".into(),
                member: Some(pb::Member {
                    region: "r".into(),
                    zone: String::new(),
                    tunnel_addr: "127.0.0.1:1".into(),
                    gossip_addr: "127.0.0.1:2".into(),
                }),
                generation: 1,
                heartbeat: 1,
                full: true,
                entries: vec![pb::Entry {
                    namespace: "default".into(),
                    name: "web".into(),
                    version: 1,
                    service: Some(pb::Service {
                        ports: vec![pb::Port {
                            name: "http".into(),
                            port: 80,
                            protocol: "TCP".into(),
                        }],
                        endpoints: vec![],
                        export_to: vec!["*".into()],
                        weight: 1,
                        headless: false,
                        session_affinity_seconds: None,
                        exported_at_ms: 0,
                        ..Default::default()
                    }),
                }],
                seal: None,
                chain: vec![],
            };
            f(&mut o);
            delta_from_pb(pb::Delta {
                origins: vec![o],
                replicas: vec![],
            })
        };
        assert!(origin(&|_| {}).is_ok());
        type Mutation = Box<dyn Fn(&mut pb::OriginDelta)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "origin.cluster",
                Box::new(|o| o.cluster = "Bad Name".into()),
            ),
            (
                "member.tunnel_addr",
                Box::new(|o| o.member.as_mut().unwrap().tunnel_addr = "nowhere".into()),
            ),
            ("member", Box::new(|o| o.member = None)),
            ("name", Box::new(|o| o.entries[0].name = "../etc".into())),
            ("version", Box::new(|o| o.entries[0].version = 0)),
            (
                "ports.port",
                Box::new(|o| o.entries[0].service.as_mut().unwrap().ports[0].port = 70_000),
            ),
            (
                "endpoints.address",
                Box::new(|o| {
                    o.entries[0]
                        .service
                        .as_mut()
                        .unwrap()
                        .endpoints
                        .push(pb::Endpoint {
                            address: "10.0.0.300".into(),
                            hostname: String::new(),
                            ready: true,
                            zone: String::new(),
                        })
                }),
            ),
        ];
        for (field, f) in cases {
            let e = origin(&*f).expect_err(field);
            assert!(e.field.ends_with(field), "{field}: {e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096)) {
            use prost::Message;
            if let Ok(d) = pb::Delta::decode(bytes.as_slice()) {
                let _ = delta_from_pb(d);
            }
            if let Ok(d) = pb::Digest::decode(bytes.as_slice()) {
                let _ = digest_from_pb(d);
            }
        }
    }
}
