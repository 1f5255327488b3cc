//! Fuzzes the DNS request path (the fast path and the full parse) with arbitrary bytes
//! against a zone with every record form: it must never panic, never answer a response,
//! answer with the request's ID, and never exceed the UDP limit.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use strait_gateway::fuzzing::{
    EndpointEntry, Kind, PortEntry, ServiceEntry, Spec, Transport, Zone,
};

static ZONE: LazyLock<Zone> = LazyLock::new(|| {
    let port = |name: &str, port| PortEntry {
        name: name.into(),
        port,
        protocol: "tcp".into(),
    };
    let endpoint = |label: &str, last| EndpointEntry {
        cluster: "us-east".into(),
        label: label.into(),
        address: [127, 0, 10, last].into(),
        priority: 1,
    };
    let services = vec![
        ServiceEntry {
            namespace: "shop".into(),
            name: "web".into(),
            ports: vec![port("http", 80), port("grpc", 9000)],
            kind: Kind::ClusterSetIp([127, 0, 10, 1].into()),
        },
        ServiceEntry {
            namespace: "shop".into(),
            name: "db".into(),
            ports: vec![port("pg", 5432)],
            kind: Kind::Headless(vec![endpoint("db-0", 2), endpoint("db-1", 3)]),
        },
    ];
    let spec = Spec {
        zone: "clusterset.local".into(),
        ttl: 5,
        negative_ttl: 5,
        serial: 1,
    };
    Zone::build(&spec, &services)
});

fuzz_target!(|data: &[u8]| {
    for transport in [Transport::Udp, Transport::Tcp] {
        if let Some(answer) = ZONE.respond(data, transport) {
            assert!(
                data.len() >= 12 && data[2] & 0x80 == 0,
                "answered what must not be"
            );
            assert_eq!(
                answer[..2],
                data[..2],
                "the answer carries the request's ID"
            );
            assert!(answer[2] & 0x80 != 0, "an answer is a response");
            if transport == Transport::Udp {
                assert!(answer.len() <= 1232, "UDP answer of {} bytes", answer.len());
            }
        }
    }
});
