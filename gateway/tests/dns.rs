//! The DNS server of a real local federation (the demo's three regions on loopback), asked
//! by a real DNS client (hickory-client) over UDP and TCP: every record form, negative
//! answers, and answers that follow the catalog when an endpoint turns unready or a
//! cluster goes down. Garbage on the DNS port gets no crash and no amplified reply.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use hickory_client::client::{Client, ClientHandle};
use hickory_client::proto::op::ResponseCode;
use hickory_client::proto::rr::{DNSClass, Name, RData, RecordType};
use hickory_client::proto::runtime::TokioRuntimeProvider;
use hickory_client::proto::tcp::TcpClientStream;
use hickory_client::proto::udp::UdpClientStream;
use hickory_client::proto::xfer::DnsResponse;
use strait_common::Config;
use strait_common::pki::write_atomic;
use strait_gateway::demo::{self, Demo, DemoArgs};
use strait_tests::{eventually, metric, within};

async fn federation() -> Demo {
    strait_gateway::raise_fd_limit();
    let d = demo::start(DemoArgs::ephemeral(3)).await.unwrap();
    assert!(
        d.wait_converged(Duration::from_secs(15)).await,
        "discovery did not converge"
    );
    d
}

async fn udp_client(addr: SocketAddr) -> Client {
    let stream = UdpClientStream::builder(addr, TokioRuntimeProvider::default()).build();
    let (client, bg) = Client::connect(stream).await.unwrap();
    tokio::spawn(bg);
    client
}

async fn tcp_client(addr: SocketAddr) -> Client {
    let (stream, sender) = TcpClientStream::new(addr, None, None, TokioRuntimeProvider::default());
    let (client, bg) = Client::new(stream, sender, None).await.unwrap();
    tokio::spawn(bg);
    client
}

async fn ask(c: &mut Client, name: &str, t: RecordType) -> DnsResponse {
    c.query(Name::from_str(name).unwrap(), DNSClass::IN, t)
        .await
        .unwrap_or_else(|e| panic!("{name} {t}: {e}"))
}

fn answers(r: &DnsResponse) -> BTreeSet<String> {
    r.answers().iter().map(|a| a.data().to_string()).collect()
}

fn addresses(r: &DnsResponse) -> BTreeSet<IpAddr> {
    r.answers()
        .iter()
        .filter_map(|a| match a.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

async fn http_get(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_form_over_udp_and_tcp() {
    let d = federation().await;
    let here = &d.regions[0];
    let g = here.gateway();
    let dns = g.dns_addr().expect("the demo serves DNS");
    let cluster_ip = g.listener("demo/hello", 8080).unwrap().ip();
    for mut c in [udp_client(dns).await, tcp_client(dns).await] {
        let r = ask(&mut c, "hello.demo.svc.clusterset.local.", RecordType::A).await;
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert!(r.authoritative());
        assert_eq!(
            addresses(&r),
            BTreeSet::from([cluster_ip]),
            "the ClusterSetIP"
        );
        assert_eq!(r.answers()[0].ttl(), 5, "default TTL");

        let r = ask(
            &mut c,
            "_http._tcp.hello.demo.svc.clusterset.local.",
            RecordType::SRV,
        )
        .await;
        assert_eq!(
            answers(&r),
            BTreeSet::from(["0 100 8080 hello.demo.svc.clusterset.local.".to_owned()])
        );
        let r = ask(&mut c, "hello.demo.svc.clusterset.local.", RecordType::SRV).await;
        assert_eq!(r.answers().len(), 1, "bare SRV: one per named port");

        let reverse = Name::from(cluster_ip).to_string();
        let r = ask(&mut c, &reverse, RecordType::PTR).await;
        assert_eq!(
            answers(&r),
            BTreeSet::from(["hello.demo.svc.clusterset.local.".to_owned()])
        );

        let r = ask(&mut c, "dns-version.clusterset.local.", RecordType::TXT).await;
        assert_eq!(answers(&r), BTreeSet::from(["1.0.0".to_owned()]));

        // Headless: this region's pod at its own address, the others' at local forwarding
        // addresses, each also by `<hostname>.<cluster>`.
        let r = ask(
            &mut c,
            "hello-pods.demo.svc.clusterset.local.",
            RecordType::A,
        )
        .await;
        assert_eq!(addresses(&r).len(), 3, "{:?}", answers(&r));
        let r = ask(
            &mut c,
            "_http._tcp.hello-pods.demo.svc.clusterset.local.",
            RecordType::SRV,
        )
        .await;
        let mut srv: Vec<(u16, String)> = r
            .answers()
            .iter()
            .filter_map(|a| match a.data() {
                RData::SRV(s) => Some((s.priority(), s.target().to_string())),
                _ => None,
            })
            .collect();
        srv.sort();
        assert_eq!(srv.len(), 3);
        assert_eq!(
            srv[0],
            (
                0,
                format!(
                    "hello-0.{}.hello-pods.demo.svc.clusterset.local.",
                    here.cluster
                )
            ),
            "this cluster first"
        );
        assert!(srv[1..].iter().all(|(p, _)| *p > 0));

        // Negative answers: the name exists without that type, and names that do not exist.
        let r = ask(&mut c, "hello.demo.svc.clusterset.local.", RecordType::AAAA).await;
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert!(r.answers().is_empty());
        assert_eq!(r.name_servers()[0].record_type(), RecordType::SOA);
        let r = ask(&mut c, "nope.demo.svc.clusterset.local.", RecordType::A).await;
        assert_eq!(r.response_code(), ResponseCode::NXDomain);
        assert_eq!(r.name_servers()[0].record_type(), RecordType::SOA);
        let r = ask(&mut c, "example.com.", RecordType::A).await;
        assert_eq!(r.response_code(), ResponseCode::Refused);
    }
    // Each answer above is counted by transport and response code.
    let m = g.render_metrics();
    for transport in ["udp", "tcp"] {
        for (rcode, n) in [("NXDOMAIN", 1.0), ("REFUSED", 1.0), ("SERVFAIL", 0.0)] {
            let series = format!(
                "strait_dns_responses_total{{transport=\"{transport}\",rcode=\"{rcode}\"}}"
            );
            assert_eq!(metric(&m, &series), Some(n), "{series}\n{m}");
        }
        let ok =
            format!("strait_dns_responses_total{{transport=\"{transport}\",rcode=\"NOERROR\"}}");
        assert!(metric(&m, &ok).is_some_and(|n| n >= 3.0), "{ok}\n{m}");
    }

    // Each remote pod's own address reaches exactly that pod, through the tunnel.
    let mut c = udp_client(dns).await;
    for other in &d.regions[1..] {
        let name = format!(
            "hello-0.{}.hello-pods.demo.svc.clusterset.local.",
            other.cluster
        );
        let r = ask(&mut c, &name, RecordType::A).await;
        let ip = *addresses(&r).iter().next().expect("one address");
        let body = http_get(SocketAddr::new(ip, 8080)).await;
        assert!(
            body.contains(&format!("hello from {}", other.cluster)),
            "{name} → {ip}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_follow_the_catalog_when_an_endpoint_turns_unready_or_a_cluster_goes_down() {
    let mut d = federation().await;
    let dns = d.regions[0].gateway().dns_addr().unwrap();
    let (b, c) = (d.regions[1].cluster.clone(), d.regions[2].cluster.clone());
    let mut client = udp_client(dns).await;
    let pods = "hello-pods.demo.svc.clusterset.local.";
    let pod_of = |cluster: &str| format!("hello-0.{cluster}.hello-pods.demo.svc.clusterset.local.");
    let cluster_ip = ask(
        &mut client,
        "hello.demo.svc.clusterset.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(
        addresses(&ask(&mut client, pods, RecordType::A).await).len(),
        3
    );

    // b's pod turns unready in b's config: gone from the answer, and its name is NXDOMAIN.
    let path = &d.regions[1].config_path;
    let mut config = Config::load(path).unwrap();
    // Only the headless export turns unready; hello stays ready.
    let pods_export = config
        .exports
        .iter_mut()
        .find(|e| e.name == "hello-pods")
        .expect("demo config shape");
    for endpoint in &mut pods_export.endpoints {
        endpoint.ready = false;
    }
    let yaml = serde_yaml::to_string(&config).unwrap();
    write_atomic(path, yaml.as_bytes(), false).unwrap();
    let took = eventually(Duration::from_secs(10), "b's pod left DNS", async || {
        ask(&mut client, &pod_of(&b), RecordType::A)
            .await
            .response_code()
            == ResponseCode::NXDomain
    })
    .await;
    eprintln!("unready endpoint left DNS in {took:?}");
    assert_eq!(
        addresses(&ask(&mut client, pods, RecordType::A).await).len(),
        2
    );

    // c goes down: once the federation sees it, its pod goes too; the ClusterSetIP stays.
    d.take_down(&c).await.unwrap();
    let took = eventually(Duration::from_secs(15), "c's pod left DNS", async || {
        ask(&mut client, &pod_of(&c), RecordType::A)
            .await
            .response_code()
            == ResponseCode::NXDomain
    })
    .await;
    eprintln!("a down cluster's endpoint left DNS in {took:?}");
    let left = ask(&mut client, pods, RecordType::A).await;
    assert_eq!(addresses(&left).len(), 1, "only this cluster's own pod");
    assert_eq!(
        answers(
            &ask(
                &mut client,
                "hello.demo.svc.clusterset.local.",
                RecordType::A
            )
            .await
        ),
        answers(&cluster_ip),
        "the ClusterSetIP does not move"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_dns_port_gets_no_crash_and_no_amplification() {
    let d = federation().await;
    let dns = d.regions[0].gateway().dns_addr().unwrap();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut sent = 0usize;
    let mut buf = [0u8; 2048];
    for i in 0..2000 {
        let len = (next() % 300) as usize;
        let mut pkt: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 2 == 0 && len >= 3 {
            pkt[2] &= 0x7f; // a query, not a response: these do get answers
        }
        sock.send_to(&pkt, dns).await.unwrap();
        sent += 1;
        // Whatever comes back is never bigger than what was sent (a header at most for
        // what does not parse).
        while let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(1), sock.recv_from(&mut buf)).await
        {
            assert!(n <= 512, "{n}-byte reply to garbage");
        }
    }
    // Cut-off TCP frames and a frame of garbage: the connection closes, the server lives.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut t = tokio::net::TcpStream::connect(dns).await.unwrap();
    t.write_all(&[0x00, 0x40, 1, 2, 3]).await.unwrap();
    drop(t);
    let mut t = tokio::net::TcpStream::connect(dns).await.unwrap();
    t.write_all(&[0x00, 0x05, 0x81, 0x80, 0, 0, 0])
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = within(Duration::from_secs(5), t.read_to_end(&mut rest)).await;
    assert!(
        rest.is_empty(),
        "a response on the request path gets nothing back"
    );
    // Still answering, over both transports.
    let mut c = udp_client(dns).await;
    let r = ask(&mut c, "dns-version.clusterset.local.", RecordType::TXT).await;
    assert_eq!(
        r.response_code(),
        ResponseCode::NoError,
        "after {sent} packets"
    );
    let mut c = tcp_client(dns).await;
    let r = ask(&mut c, "dns-version.clusterset.local.", RecordType::TXT).await;
    assert_eq!(r.response_code(), ResponseCode::NoError);
}
