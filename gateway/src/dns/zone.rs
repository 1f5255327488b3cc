//! The `clusterset.local` zone as answers, without I/O: built from the federated catalog
//! (see [`Zone::build`]), then asked with raw request bytes ([`Zone::respond`]).
//!
//! Every answer for a name that exists is encoded once, when the zone is built: a query
//! then costs a parse, a hash lookup and a copy in which the request's ID, RD flag and
//! question (with the client's letter case) are patched in. Responses to names that do not
//! exist, or outside the zone, are built per query.
//!
//! Records follow the Kubernetes Multi-Cluster Services DNS specification (schema 1.0.0).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinEncodable;

/// The MCS DNS schema version, served as `dns-version.<zone>` TXT.
pub const SCHEMA_VERSION: &str = "1.0.0";
/// Largest UDP answer we send, whatever the client offers (the DNS flag day 2020 value:
/// no IP fragmentation).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// A UDP answer without EDNS0 is limited to this.
const CLASSIC_UDP: usize = 512;
const HEADER_LEN: usize = 12;
/// An OPT record with no options: root name, type, payload, rcode/version/flags, rdlen.
const OPT_LEN: usize = 11;

/// Zone-wide settings.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The zone, e.g. `clusterset.local`.
    pub zone: String,
    /// TTL of positive answers, seconds.
    pub ttl: u32,
    /// TTL of negative answers (SOA minimum), seconds.
    pub negative_ttl: u32,
    /// SOA serial; bumped by the caller on every rebuild.
    pub serial: u32,
}

pub use crate::desired::dns::{Kind, PortEntry, ServiceEntry};

/// A built zone, ready to answer.
#[derive(Debug)]
pub struct Zone {
    apex: Name,
    soa: Record,
    /// Lowercase wire-form names → encoded answers.
    nodes: HashMap<Vec<u8>, Node>,
}

/// The encoded answers of one name.
#[derive(Debug, Default)]
struct Node {
    by_type: HashMap<u16, Prebuilt>,
    /// NOERROR with no answer and the SOA (the name exists, not with this type).
    nodata: Option<Prebuilt>,
}

/// An encoded response with ID 0 and the question in lowercase.
#[derive(Debug)]
struct Prebuilt {
    full: Vec<u8>,
    /// Question length in wire form (the bytes after the header the request patches in).
    qname_len: usize,
}

/// Records of one owner name while building.
#[derive(Default)]
struct Pending {
    records: Vec<Record>,
    /// Additional-section records per type (SRV targets' addresses).
    additional: Vec<Record>,
}

/// Whether a query came over UDP (size-limited) or TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Datagram: answers above the client's limit are truncated (TC set).
    Udp,
    /// Stream: up to 65,535 bytes.
    Tcp,
}

impl Zone {
    /// Builds the zone from the services. Names are lowercase; the service list order does
    /// not matter.
    pub fn build(spec: &Spec, services: &[ServiceEntry]) -> Zone {
        let apex = fqdn(&spec.zone);
        let ttl = spec.ttl;
        let ns_name = child(&apex, &["ns", "dns"]);
        let soa_data = SOA::new(
            ns_name.clone(),
            child(&apex, &["hostmaster"]),
            spec.serial,
            60,
            30,
            3600,
            spec.negative_ttl,
        );
        let soa = Record::from_rdata(
            apex.clone(),
            spec.negative_ttl,
            RData::SOA(soa_data.clone()),
        );
        let mut pending: BTreeMap<Name, Pending> = BTreeMap::new();
        let mut add = |name: &Name, rdata: RData| {
            pending
                .entry(name.clone())
                .or_default()
                .records
                .push(Record::from_rdata(name.clone(), ttl, rdata));
        };
        add(&apex, RData::SOA(soa_data));
        add(&apex, RData::NS(NS(ns_name)));
        add(
            &child(&apex, &["dns-version"]),
            RData::TXT(TXT::new(vec![SCHEMA_VERSION.to_owned()])),
        );
        let mut srv_extra: Vec<(Name, Record)> = Vec::new();
        let mut ptr: Vec<(IpAddr, Name)> = Vec::new();
        for s in services {
            let svc = child(&apex, &[&s.name, &s.namespace, "svc"]);
            let named: Vec<&PortEntry> = s.ports.iter().filter(|p| !p.name.is_empty()).collect();
            match &s.kind {
                Kind::ClusterSetIp(ip) => {
                    add(&svc, address(*ip));
                    ptr.push((*ip, svc.clone()));
                    for p in &named {
                        let srv = RData::SRV(SRV::new(0, 100, p.port, svc.clone()));
                        add(&port_name(&svc, p), srv.clone());
                        add(&svc, srv);
                    }
                    srv_extra.push((
                        svc.clone(),
                        Record::from_rdata(svc.clone(), ttl, address(*ip)),
                    ));
                }
                Kind::Headless(endpoints) => {
                    if endpoints.is_empty() {
                        continue;
                    }
                    // One A/AAAA per address, even if two endpoints share it.
                    let addrs: BTreeSet<IpAddr> = endpoints.iter().map(|e| e.address).collect();
                    for ip in addrs {
                        add(&svc, address(ip));
                    }
                    for e in endpoints {
                        let host = child(&svc, &[&e.label, &e.cluster]);
                        add(&host, address(e.address));
                        ptr.push((e.address, host.clone()));
                        let extra = Record::from_rdata(host.clone(), ttl, address(e.address));
                        for p in &named {
                            let srv = RData::SRV(SRV::new(e.priority, 100, p.port, host.clone()));
                            add(&port_name(&svc, p), srv.clone());
                            add(&svc, srv);
                        }
                        srv_extra.push((host, extra));
                    }
                }
            }
        }
        // PTR only for addresses with one owner: a local endpoint address shared by two
        // services would otherwise answer with both.
        let mut owners: BTreeMap<IpAddr, BTreeSet<Name>> = BTreeMap::new();
        for (ip, name) in ptr {
            owners.entry(ip).or_default().insert(name);
        }
        for (ip, names) in owners {
            for n in names {
                add(&Name::from(ip), RData::PTR(PTR(n)));
            }
        }
        // Additional section: the address of every SRV target in this zone.
        let targets: HashMap<Name, Vec<Record>> =
            srv_extra.into_iter().fold(HashMap::new(), |mut m, (n, r)| {
                let v: &mut Vec<Record> = m.entry(n).or_default();
                if !v.contains(&r) {
                    v.push(r);
                }
                m
            });
        for p in pending.values_mut() {
            let mut seen = BTreeSet::new();
            for r in &p.records {
                if let RData::SRV(srv) = r.data()
                    && seen.insert(srv.target().clone())
                    && let Some(extra) = targets.get(srv.target())
                {
                    p.additional.extend(extra.iter().cloned());
                }
            }
        }
        // Every ancestor inside the zone exists (empty non-terminals answer NODATA).
        let owners: Vec<Name> = pending.keys().cloned().collect();
        for name in owners {
            let mut n = name.base_name();
            while apex.zone_of(&n) && n != apex {
                pending.entry(n.clone()).or_default();
                n = n.base_name();
            }
        }
        let mut nodes = HashMap::with_capacity(pending.len());
        for (name, p) in &pending {
            nodes.insert(key_of(name), encode_node(name, p, &soa));
        }
        Zone { apex, soa, nodes }
    }

    /// The response to one request, or `None` when no response must be sent (too short to
    /// carry an ID, or itself a response). Never longer than the client's limit over UDP.
    pub fn respond(&self, request: &[u8], transport: Transport) -> Option<Vec<u8>> {
        if request.len() < HEADER_LEN || request[2] & 0x80 != 0 {
            return None;
        }
        if let Some(answer) = self.fast(request, transport) {
            return Some(answer);
        }
        self.general(request, transport)
    }

    /// Every request the fast path leaves: parsed in full by hickory-proto.
    pub(super) fn general(&self, request: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let Ok(msg) = Message::from_vec(request) else {
            return Some(header_only(request, ResponseCode::FormErr));
        };
        let edns = msg.extensions().as_ref();
        let limit = match (transport, edns) {
            (Transport::Tcp, _) => usize::from(u16::MAX),
            (Transport::Udp, None) => CLASSIC_UDP,
            (Transport::Udp, Some(e)) => usize::from(e.max_payload().clamp(512, MAX_UDP_PAYLOAD)),
        };
        if msg.op_code() != OpCode::Query {
            return Some(self.per_query(&msg, ResponseCode::NotImp, limit));
        }
        if msg.queries().len() != 1 {
            return Some(self.per_query(&msg, ResponseCode::FormErr, limit));
        }
        if edns.is_some_and(|e| e.version() > 0) {
            return Some(self.per_query(&msg, ResponseCode::BADVERS, limit));
        }
        let q = &msg.queries()[0];
        // The question is the first name in the message: a compression pointer there can
        // only point into the header, so it is malformed.
        let Some(qname_len) = plain_qname_len(request) else {
            return Some(self.per_query(&msg, ResponseCode::FormErr, limit));
        };
        if matches!(q.query_class(), DNSClass::IN | DNSClass::ANY) {
            let key = request[HEADER_LEN..HEADER_LEN + qname_len].to_ascii_lowercase();
            if let Some(node) = self.nodes.get(&key) {
                let answer = node.by_type.get(&u16::from(q.query_type()));
                let pre = match (answer, q.query_type()) {
                    (Some(a), _) => Some(a),
                    (None, RecordType::AXFR | RecordType::IXFR) => None,
                    (None, _) => node.nodata.as_ref(),
                };
                if let Some(pre) = pre {
                    return Some(patch(pre, request, qname_len, edns.is_some(), limit));
                }
            }
        }
        let code = self.negative_code(q);
        Some(self.per_query(&msg, code, limit))
    }

    /// The common case without a full parse: one plain question in class IN (or ANY), at
    /// most an OPT record of version 0, and a name with a prebuilt answer. `None` sends
    /// the request down the general path, which gives the same answer for anything this
    /// accepts (a property test checks it).
    pub(super) fn fast(&self, request: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let counts = |i: usize| u16::from_be_bytes([request[i], request[i + 1]]);
        // Opcode QUERY, one question, no answer or authority, at most one additional.
        if request[2] & 0x78 != 0 || counts(4) != 1 || counts(6) != 0 || counts(8) != 0 {
            return None;
        }
        let qname_len = plain_qname_len(request)?;
        let qend = HEADER_LEN + qname_len;
        let tail = request.get(qend..qend + 4)?;
        let qtype = u16::from_be_bytes([tail[0], tail[1]]);
        let qclass = u16::from_be_bytes([tail[2], tail[3]]);
        if !matches!(qclass, 1 | 255) || matches!(qtype, 251 | 252) || qname_len > 255 {
            return None;
        }
        let rest = &request[qend + 4..];
        let edns = match counts(10) {
            0 if rest.is_empty() => None,
            1 => Some(plain_opt(rest)?),
            _ => return None,
        };
        let limit = match (transport, edns) {
            (Transport::Tcp, _) => usize::from(u16::MAX),
            (Transport::Udp, None) => CLASSIC_UDP,
            (Transport::Udp, Some(size)) => usize::from(size.clamp(512, MAX_UDP_PAYLOAD)),
        };
        let mut key = [0u8; 255];
        let key = &mut key[..qname_len];
        key.copy_from_slice(&request[HEADER_LEN..qend]);
        key.make_ascii_lowercase();
        let node = self.nodes.get(&key[..])?;
        let pre = node.by_type.get(&qtype).or(node.nodata.as_ref())?;
        Some(patch(pre, request, qname_len, edns.is_some(), limit))
    }

    /// Why a question has no prebuilt answer.
    fn negative_code(&self, q: &Query) -> ResponseCode {
        let in_zone = self.apex.zone_of(q.name());
        if !in_zone || !matches!(q.query_class(), DNSClass::IN | DNSClass::ANY) {
            return ResponseCode::Refused;
        }
        if matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR) {
            // No zone transfers: the zone is generated per gateway.
            return ResponseCode::Refused;
        }
        ResponseCode::NXDomain
    }

    /// A response built per query: header flags, the question, an SOA for negative answers
    /// in the zone, and OPT when the client sent one.
    fn per_query(&self, req: &Message, code: ResponseCode, limit: usize) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(req.id())
            .set_message_type(MessageType::Response)
            .set_op_code(req.op_code())
            .set_recursion_desired(req.recursion_desired())
            .set_response_code(code);
        if req.op_code() == OpCode::Query && req.queries().len() == 1 {
            m.add_query(req.queries()[0].clone());
            let q = &req.queries()[0];
            let authoritative = code != ResponseCode::Refused && self.apex.zone_of(q.name());
            m.set_authoritative(authoritative);
            if authoritative && code == ResponseCode::NXDomain {
                m.add_name_server(self.soa.clone());
            }
        }
        if req.extensions().is_some() {
            let mut opt = Edns::new();
            opt.set_max_payload(MAX_UDP_PAYLOAD);
            m.set_edns(opt);
        }
        let bytes = m
            .to_vec()
            .unwrap_or_else(|_| header_only_id(req.id(), ResponseCode::ServFail));
        if bytes.len() > limit {
            return truncated(m);
        }
        bytes
    }
}

/// `name` under `apex`, with `labels` from the most specific (`["a", "b"]` → `a.b.<apex>`).
fn child(apex: &Name, labels: &[&str]) -> Name {
    let mut n = apex.clone();
    for l in labels.iter().rev() {
        n = Name::from_labels([l.as_bytes()])
            .and_then(|c| c.append_domain(&n))
            .unwrap_or_else(|_| n.clone());
    }
    n
}

fn fqdn(s: &str) -> Name {
    let mut n = Name::from_ascii(s.to_ascii_lowercase()).unwrap_or_else(|_| Name::root());
    n.set_fqdn(true);
    n
}

fn port_name(svc: &Name, p: &PortEntry) -> Name {
    child(svc, &[&format!("_{}", p.name), &format!("_{}", p.protocol)])
}

fn address(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    }
}

/// Lowercase wire form of a name: the lookup key.
fn key_of(name: &Name) -> Vec<u8> {
    name.to_lowercase().to_bytes().unwrap_or_default()
}

/// Wire length of the question name when it is written without compression pointers.
fn plain_qname_len(request: &[u8]) -> Option<usize> {
    let mut i = HEADER_LEN;
    loop {
        let len = usize::from(*request.get(i)?);
        if len == 0 {
            return Some(i + 1 - HEADER_LEN);
        }
        if len & 0xC0 != 0 {
            return None;
        }
        i += 1 + len;
    }
}

/// The payload size of a well-formed OPT record of version 0 that ends the message, or
/// `None` for anything else (left to the general path).
fn plain_opt(rest: &[u8]) -> Option<u16> {
    let (head, mut options) = (rest.get(..11)?, &rest[11..]);
    let version = head[6];
    let rdlen = usize::from(u16::from_be_bytes([head[9], head[10]]));
    if head[0] != 0 || head[1..3] != [0, 41] || version != 0 || options.len() != rdlen {
        return None;
    }
    while !options.is_empty() {
        let len = usize::from(u16::from_be_bytes([*options.get(2)?, *options.get(3)?]));
        options = options.get(4 + len..)?;
    }
    Some(u16::from_be_bytes([head[3], head[4]]))
}

/// Encodes every answer of one name.
fn encode_node(name: &Name, p: &Pending, soa: &Record) -> Node {
    let mut types: BTreeMap<u16, Vec<&Record>> = BTreeMap::new();
    for r in &p.records {
        types.entry(u16::from(r.record_type())).or_default().push(r);
    }
    let mut node = Node::default();
    let any: Vec<&Record> = p.records.iter().collect();
    for (t, records) in types {
        let extra: &[Record] = if t == u16::from(RecordType::SRV) {
            &p.additional
        } else {
            &[]
        };
        node.by_type.insert(
            t,
            prebuild(
                name,
                RecordType::from(t),
                ResponseCode::NoError,
                &records,
                &[],
                extra,
            ),
        );
    }
    if !any.is_empty() {
        node.by_type.insert(
            u16::from(RecordType::ANY),
            prebuild(name, RecordType::ANY, ResponseCode::NoError, &any, &[], &[]),
        );
    }
    node.nodata = Some(prebuild(
        name,
        RecordType::NULL,
        ResponseCode::NoError,
        &[],
        std::slice::from_ref(soa),
        &[],
    ));
    node
}

fn prebuild(
    name: &Name,
    qtype: RecordType,
    code: ResponseCode,
    answers: &[&Record],
    authority: &[Record],
    additional: &[Record],
) -> Prebuilt {
    let mut m = Message::new();
    m.set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_response_code(code)
        .add_query(Query::query(name.clone(), qtype))
        .add_answers(answers.iter().map(|r| (*r).clone()))
        .add_name_servers(authority.iter().cloned())
        .add_additionals(additional.iter().cloned());
    let full = m.to_vec().unwrap_or_default();
    Prebuilt {
        qname_len: key_of(name).len(),
        full,
    }
}

/// A prebuilt response for this request: its ID, RD flag, question bytes and OPT.
fn patch(pre: &Prebuilt, request: &[u8], qname_len: usize, edns: bool, limit: usize) -> Vec<u8> {
    let qend = HEADER_LEN + qname_len;
    let fits = pre.full.len() + if edns { OPT_LEN } else { 0 } <= limit;
    let mut out = if fits {
        let mut out = Vec::with_capacity(pre.full.len() + OPT_LEN);
        out.extend_from_slice(&pre.full);
        out
    } else {
        // Header and question only, TC set: the client retries over TCP.
        let mut out = pre.full[..qend + 4].to_vec();
        out[2] |= 0x02;
        out[6..12].fill(0);
        out
    };
    debug_assert_eq!(pre.qname_len, qname_len);
    out[0..2].copy_from_slice(&request[0..2]);
    out[2] = (out[2] & !0x01) | (request[2] & 0x01);
    // The question as asked, letter case included (resolvers using 0x20 check it); the
    // query type and class too, since NODATA templates carry placeholders.
    out[HEADER_LEN..qend + 4].copy_from_slice(&request[HEADER_LEN..qend + 4]);
    if edns {
        out.extend_from_slice(&[0, 0, 41]);
        out.extend_from_slice(&MAX_UDP_PAYLOAD.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let ar = u16::from_be_bytes([out[10], out[11]]) + 1;
        out[10..12].copy_from_slice(&ar.to_be_bytes());
    }
    out
}

/// A response of header and question only, TC set, with OPT if present.
fn truncated(mut m: Message) -> Vec<u8> {
    m.take_answers();
    m.take_name_servers();
    m.take_additionals();
    m.set_truncated(true);
    m.to_vec()
        .unwrap_or_else(|_| header_only_id(m.id(), ResponseCode::ServFail))
}

/// A bare header answering `request`'s ID: for requests that cannot be parsed. Never longer
/// than the request.
fn header_only(request: &[u8], code: ResponseCode) -> Vec<u8> {
    header_only_id(u16::from_be_bytes([request[0], request[1]]), code)
}

fn header_only_id(id: u16, code: ResponseCode) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    out[0..2].copy_from_slice(&id.to_be_bytes());
    out[2] = 0x80;
    out[3] = code.low();
    out
}
