use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use proptest::prelude::*;

use super::zone::*;
use crate::desired::dns::EndpointEntry;

fn spec() -> Spec {
    Spec {
        zone: "clusterset.local".into(),
        ttl: 5,
        negative_ttl: 3,
        serial: 7,
    }
}

fn port(name: &str, port: u16) -> PortEntry {
    PortEntry {
        name: name.into(),
        port,
        protocol: "tcp".into(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn endpoint(cluster: &str, label: &str, address: &str, priority: u16) -> EndpointEntry {
    EndpointEntry {
        cluster: cluster.into(),
        label: label.into(),
        address: ip(address),
        priority,
    }
}

fn zone() -> Zone {
    Zone::build(
        &spec(),
        &[
            ServiceEntry {
                namespace: "shop".into(),
                name: "web".into(),
                ports: vec![port("http", 80), port("grpc", 9090), port("", 81)],
                kind: Kind::ClusterSetIp(ip("127.0.10.5")),
            },
            ServiceEntry {
                namespace: "shop".into(),
                name: "db".into(),
                ports: vec![port("pg", 5432)],
                kind: Kind::Headless(vec![
                    endpoint("eu-west", "db-1", "127.0.10.20", 2),
                    endpoint("us-west", "10-0-0-7", "127.0.10.21", 1),
                    endpoint("us-east", "db-0", "10.1.0.9", 0),
                ]),
            },
            ServiceEntry {
                namespace: "shop".into(),
                name: "empty".into(),
                ports: vec![port("pg", 5432)],
                kind: Kind::Headless(vec![]),
            },
            ServiceEntry {
                namespace: "shop".into(),
                name: "v6".into(),
                ports: vec![],
                kind: Kind::ClusterSetIp(ip("fd00::5")),
            },
        ],
    )
}

fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(0xBEEF)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn ask(z: &Zone, name: &str, qtype: RecordType) -> Message {
    let bytes = z
        .respond(&query(name, qtype, None), Transport::Udp)
        .expect("a response");
    Message::from_vec(&bytes).expect("a valid response")
}

fn rdata(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m.answers().iter().map(|r| r.data().to_string()).collect();
    v.sort();
    v
}

#[test]
fn cluster_set_ip_answers_a_srv_ptr_with_short_ttl_and_the_question_as_asked() {
    let z = zone();
    let plain = query("Web.Shop.SVC.clusterset.local.", RecordType::A, Some(1232));
    assert!(
        z.fast(&plain, Transport::Udp).is_some(),
        "the common case skips the full parse"
    );
    let m = ask(&z, "Web.Shop.SVC.clusterset.local.", RecordType::A);
    assert_eq!(m.id(), 0xBEEF);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.authoritative() && m.recursion_desired() && !m.recursion_available());
    assert_eq!(
        m.queries()[0].name().to_string(),
        "Web.Shop.SVC.clusterset.local.",
        "letter case kept (0x20)"
    );
    assert_eq!(rdata(&m), vec!["127.0.10.5"]);
    assert_eq!(m.answers()[0].ttl(), 5);

    let m = ask(
        &z,
        "_http._tcp.web.shop.svc.clusterset.local.",
        RecordType::SRV,
    );
    assert_eq!(rdata(&m), vec!["0 100 80 web.shop.svc.clusterset.local."]);
    assert_eq!(m.additionals().len(), 1, "target address in additional");
    assert_eq!(m.additionals()[0].data().to_string(), "127.0.10.5");

    let m = ask(&z, "web.shop.svc.clusterset.local.", RecordType::SRV);
    assert_eq!(
        rdata(&m),
        vec![
            "0 100 80 web.shop.svc.clusterset.local.",
            "0 100 9090 web.shop.svc.clusterset.local."
        ],
        "bare SRV lists every named port, and only named ones"
    );

    let m = ask(&z, "5.10.0.127.in-addr.arpa.", RecordType::PTR);
    assert_eq!(rdata(&m), vec!["web.shop.svc.clusterset.local."]);

    let m = ask(&z, "v6.shop.svc.clusterset.local.", RecordType::AAAA);
    assert_eq!(rdata(&m), vec!["fd00::5"]);

    let m = ask(&z, "dns-version.clusterset.local.", RecordType::TXT);
    assert_eq!(rdata(&m), vec!["1.0.0"]);
}

#[test]
fn headless_answers_every_endpoint_and_each_by_name_with_locality_priority() {
    let z = zone();
    let m = ask(&z, "db.shop.svc.clusterset.local.", RecordType::A);
    assert_eq!(rdata(&m), vec!["10.1.0.9", "127.0.10.20", "127.0.10.21"]);
    let m = ask(
        &z,
        "db-1.eu-west.db.shop.svc.clusterset.local.",
        RecordType::A,
    );
    assert_eq!(rdata(&m), vec!["127.0.10.20"]);
    let m = ask(
        &z,
        "10-0-0-7.us-west.db.shop.svc.clusterset.local.",
        RecordType::A,
    );
    assert_eq!(rdata(&m), vec!["127.0.10.21"]);
    let m = ask(
        &z,
        "_pg._tcp.db.shop.svc.clusterset.local.",
        RecordType::SRV,
    );
    assert_eq!(
        rdata(&m),
        vec![
            "0 100 5432 db-0.us-east.db.shop.svc.clusterset.local.",
            "1 100 5432 10-0-0-7.us-west.db.shop.svc.clusterset.local.",
            "2 100 5432 db-1.eu-west.db.shop.svc.clusterset.local.",
        ],
        "this cluster first, then the same region"
    );
    assert_eq!(m.additionals().len(), 3);
    let m = ask(&z, "empty.shop.svc.clusterset.local.", RecordType::A);
    assert_eq!(
        m.response_code(),
        ResponseCode::NXDomain,
        "no ready endpoints: the name does not exist"
    );
}

#[test]
fn negative_answers_tell_nxdomain_from_nodata_with_a_short_soa() {
    let z = zone();
    for (name, qtype, code) in [
        (
            "nope.shop.svc.clusterset.local.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        (
            "web.shop.svc.clusterset.local.",
            RecordType::AAAA,
            ResponseCode::NoError,
        ),
        (
            "web.shop.svc.clusterset.local.",
            RecordType::TXT,
            ResponseCode::NoError,
        ),
        // Empty non-terminals exist.
        (
            "shop.svc.clusterset.local.",
            RecordType::A,
            ResponseCode::NoError,
        ),
        (
            "us-west.db.shop.svc.clusterset.local.",
            RecordType::A,
            ResponseCode::NoError,
        ),
        (
            "_tcp.web.shop.svc.clusterset.local.",
            RecordType::SRV,
            ResponseCode::NoError,
        ),
        (
            "_ftp._tcp.web.shop.svc.clusterset.local.",
            RecordType::SRV,
            ResponseCode::NXDomain,
        ),
    ] {
        let m = ask(&z, name, qtype);
        assert_eq!(m.response_code(), code, "{name} {qtype}");
        assert!(m.answers().is_empty(), "{name} {qtype}");
        assert!(m.authoritative());
        let soa = &m.name_servers()[0];
        assert_eq!(soa.record_type(), RecordType::SOA, "{name} {qtype}");
        assert_eq!(soa.ttl(), 3);
        let RData::SOA(s) = soa.data() else {
            panic!("not an SOA")
        };
        assert_eq!(s.minimum(), 3);
        assert_eq!(s.serial(), 7);
        assert_eq!(
            Message::from_vec(
                &z.respond(&query(name, qtype, None), Transport::Udp)
                    .unwrap()
            )
            .unwrap()
            .queries()[0]
                .query_type(),
            qtype,
            "the question is echoed with its type"
        );
    }
    let m = ask(&z, "clusterset.local.", RecordType::SOA);
    assert_eq!(m.answers().len(), 1);
    let m = ask(&z, "clusterset.local.", RecordType::NS);
    assert_eq!(rdata(&m), vec!["ns.dns.clusterset.local."]);
}

#[test]
fn names_outside_the_zone_are_refused_and_transfers_too() {
    let z = zone();
    for (name, qtype) in [
        ("example.com.", RecordType::A),
        ("local.", RecordType::SOA),
        ("9.9.9.9.in-addr.arpa.", RecordType::PTR),
        ("clusterset.local.", RecordType::AXFR),
    ] {
        let m = ask(&z, name, qtype);
        assert_eq!(m.response_code(), ResponseCode::Refused, "{name}");
        assert!(!m.authoritative() || qtype == RecordType::AXFR);
        assert!(m.answers().is_empty());
    }
}

fn big_zone(endpoints: usize) -> Zone {
    Zone::build(
        &spec(),
        &[ServiceEntry {
            namespace: "shop".into(),
            name: "many".into(),
            ports: vec![port("pg", 5432)],
            kind: Kind::Headless(
                (0..endpoints)
                    .map(|i| {
                        endpoint(
                            "eu-west",
                            &format!("pod-{i}"),
                            &format!("127.0.{}.{}", 20 + i / 250, 1 + i % 250),
                            2,
                        )
                    })
                    .collect(),
            ),
        }],
    )
}

#[test]
fn large_answers_are_truncated_over_udp_and_whole_over_tcp() {
    let z = big_zone(200);
    let name = "many.shop.svc.clusterset.local.";
    let plain = z
        .respond(&query(name, RecordType::A, None), Transport::Udp)
        .unwrap();
    assert!(plain.len() <= 512);
    let m = Message::from_vec(&plain).unwrap();
    assert!(m.truncated() && m.answers().is_empty());
    assert_eq!(m.queries()[0].name().to_string(), name);

    let edns = z
        .respond(&query(name, RecordType::A, Some(4096)), Transport::Udp)
        .unwrap();
    assert!(edns.len() <= usize::from(MAX_UDP_PAYLOAD), "{}", edns.len());
    let m = Message::from_vec(&edns).unwrap();
    assert!(m.truncated());
    assert_eq!(
        m.extensions().as_ref().unwrap().max_payload(),
        MAX_UDP_PAYLOAD
    );

    let tcp = z
        .respond(&query(name, RecordType::A, None), Transport::Tcp)
        .unwrap();
    let m = Message::from_vec(&tcp).unwrap();
    assert!(!m.truncated());
    assert_eq!(m.answers().len(), 200);

    // A mid-size answer fits with EDNS0 but not without it.
    let z = big_zone(40);
    let m = Message::from_vec(
        &z.respond(&query(name, RecordType::A, Some(1232)), Transport::Udp)
            .unwrap(),
    )
    .unwrap();
    assert!(!m.truncated());
    assert_eq!(m.answers().len(), 40);
    assert!(m.extensions().is_some(), "OPT echoed");
    let m = Message::from_vec(
        &z.respond(&query(name, RecordType::A, None), Transport::Udp)
            .unwrap(),
    )
    .unwrap();
    assert!(m.truncated());
}

#[test]
fn edns_versions_other_than_zero_get_badvers() {
    let z = zone();
    let mut m = Message::from_vec(&query(
        "web.shop.svc.clusterset.local.",
        RecordType::A,
        Some(1232),
    ))
    .unwrap();
    m.extensions_mut().as_mut().unwrap().set_version(1);
    let r = Message::from_vec(&z.respond(&m.to_vec().unwrap(), Transport::Udp).unwrap()).unwrap();
    // BADVERS and BADSIG share the value 16; hickory names it BADSIG.
    assert_eq!(
        u16::from(r.response_code()),
        u16::from(ResponseCode::BADVERS)
    );
    assert!(r.extensions().is_some(), "the extended code rides in OPT");
    assert!(r.answers().is_empty());
}

#[test]
fn bad_requests_get_formerr_notimp_or_nothing() {
    let z = zone();
    let good = query("web.shop.svc.clusterset.local.", RecordType::A, None);
    // A response is never answered (no reflection loops).
    let mut response = good.clone();
    response[2] |= 0x80;
    assert_eq!(z.respond(&response, Transport::Udp), None);
    // Too short to carry an ID.
    assert_eq!(z.respond(&good[..11], Transport::Udp), None);
    // Every cut of a valid query: a bare header at most, never more than was sent.
    for n in 12..good.len() {
        let r = z.respond(&good[..n], Transport::Udp).unwrap();
        assert!(r.len() <= n, "cut at {n}: {} bytes back", r.len());
        let m = Message::from_vec(&r).unwrap();
        assert_eq!(m.response_code(), ResponseCode::FormErr);
        assert_eq!(m.id(), 0xBEEF);
    }
    // Two questions.
    let mut m = Message::from_vec(&good).unwrap();
    m.add_query(Query::query(Name::from_ascii("x.").unwrap(), RecordType::A));
    let r = Message::from_vec(&z.respond(&m.to_vec().unwrap(), Transport::Udp).unwrap()).unwrap();
    assert_eq!(r.response_code(), ResponseCode::FormErr);
    // Another opcode.
    let mut m = Message::from_vec(&good).unwrap();
    m.set_op_code(OpCode::Update);
    let r = Message::from_vec(&z.respond(&m.to_vec().unwrap(), Transport::Udp).unwrap()).unwrap();
    assert_eq!(r.response_code(), ResponseCode::NotImp);
    // Chaos class (version.bind and friends).
    let mut m = Message::from_vec(&good).unwrap();
    m.queries_mut()[0].set_query_class(DNSClass::CH);
    let r = Message::from_vec(&z.respond(&m.to_vec().unwrap(), Transport::Udp).unwrap()).unwrap();
    assert_eq!(r.response_code(), ResponseCode::Refused);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Arbitrary bytes never panic, and never get more back than a classic UDP answer;
    /// anything that does not parse gets at most a bare header.
    #[test]
    fn garbage_never_panics_or_amplifies(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let z = zone();
        if let Some(r) = z.respond(&bytes, Transport::Udp) {
            prop_assert!(r.len() <= 512);
            prop_assert!(bytes.len() >= 12);
            prop_assert_eq!(&r[0..2], &bytes[0..2]);
            if Message::from_vec(&bytes).is_err() {
                prop_assert_eq!(r.len(), 12);
            }
        }
    }

    /// Valid queries with random names, types and flags: a well-formed response that
    /// echoes the question, within the client's size.
    #[test]
    fn any_question_gets_a_well_formed_answer(
        labels in prop::collection::vec("[a-zA-Z0-9_][a-zA-Z0-9_-]{0,11}", 0..6),
        suffix in prop::sample::select(vec!["web.shop.svc.clusterset.local.", "clusterset.local.", "db.shop.svc.clusterset.local.", "example.org."]),
        qtype in prop::sample::select(vec![RecordType::A, RecordType::AAAA, RecordType::SRV, RecordType::TXT, RecordType::PTR, RecordType::ANY, RecordType::MX, RecordType::SOA]),
        edns in prop::option::of(0u16..5000),
    ) {
        let z = zone();
        let name = format!("{}{}{}", labels.join("."), if labels.is_empty() { "" } else { "." }, suffix);
        let req = query(&name, qtype, edns);
        let r = z.respond(&req, Transport::Udp).unwrap();
        let limit = edns.map_or(512, |e| usize::from(e.clamp(512, MAX_UDP_PAYLOAD)));
        prop_assert!(r.len() <= limit);
        let m = Message::from_vec(&r).unwrap();
        prop_assert_eq!(m.id(), 0xBEEF);
        prop_assert_eq!(m.message_type(), MessageType::Response);
        prop_assert_eq!(m.queries()[0].name().to_string(), name);
        prop_assert_eq!(m.queries()[0].query_type(), qtype);
        prop_assert_eq!(m.extensions().is_some(), edns.is_some());
        // The fast path, where it answers, says exactly what the full parse would.
        for t in [Transport::Udp, Transport::Tcp] {
            if let Some(fast) = z.fast(&req, t) {
                prop_assert_eq!(Some(fast), z.general(&req, t));
            }
        }
    }

    /// Random bytes after a valid question (cut or extra records) never make the fast
    /// path answer differently from the full parse.
    #[test]
    fn the_fast_path_never_disagrees_with_the_full_parse(
        suffix in prop::collection::vec(any::<u8>(), 0..40),
        arcount in 0u16..3,
        edns in prop::option::of(0u16..5000),
    ) {
        let z = zone();
        let mut req = query("web.shop.svc.clusterset.local.", RecordType::SRV, edns);
        req[10..12].copy_from_slice(&arcount.to_be_bytes());
        req.extend_from_slice(&suffix);
        if let Some(fast) = z.fast(&req, Transport::Udp) {
            prop_assert_eq!(Some(fast), z.general(&req, Transport::Udp));
        }
    }
}

/// A query framed for DNS over TCP.
fn tcp_query(id: u16, name: &str) -> Vec<u8> {
    let mut msg = Message::new();
    msg.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let bytes = msg.to_vec().unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    framed
}

/// Sends one query on `s` and reads its framed answer.
async fn ask_tcp(s: &mut tokio::net::TcpStream, id: u16) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(&tcp_query(id, "dns-version.clusterset.local."))
        .await?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut answer).await?;
    Ok(())
}

#[tokio::test]
async fn a_client_that_keeps_its_tcp_connection_busy_cannot_hold_the_last_slot() {
    use std::sync::Arc;
    use std::time::Duration;

    let registry = crate::metrics::Registry::new();
    let dns = Arc::new(super::Dns::new(
        strait_common::config::Dns::default(),
        super::DnsMetrics::new(&registry),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = super::TcpLimits {
        connections: 1,
        idle: Duration::from_secs(10),
        lifetime: Duration::from_millis(300),
    };
    let life = crate::lifetime::Lifetime::new();
    tokio::spawn(super::serve_tcp(dns, listener, limits, life.clone()));

    // The hog takes the only slot and keeps it busy, never idle.
    let mut hog = tokio::net::TcpStream::connect(addr).await.unwrap();
    ask_tcp(&mut hog, 1).await.unwrap();
    let busy = tokio::spawn(async move {
        let mut id = 2;
        while ask_tcp(&mut hog, id).await.is_ok() && id < 1000 {
            id += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        id
    });
    // Another client is served once the hog's lifetime is up.
    let mut other = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), ask_tcp(&mut other, 7))
        .await
        .expect("the waiting client is served within the hog's lifetime")
        .unwrap();
    let sent = busy.await.unwrap();
    assert!(
        sent < 1000,
        "the hog's connection was closed after its lifetime ({sent} queries)"
    );
    life.stop();
}
