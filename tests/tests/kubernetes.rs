//! Kubernetes mode end to end: clusters that are each a fake API server (the real HTTP
//! list/watch protocol) plus a real gateway using kube-rs, federated over real QUIC and
//! gossip on loopback.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use hickory_client::client::{Client, ClientHandle};
use hickory_client::proto::rr::{DNSClass, Name, RData, RecordType};
use hickory_client::proto::runtime::TokioRuntimeProvider;
use hickory_client::proto::udp::UdpClientStream;
use serde_json::Value;
use strait_tests::kube::{KubeCluster, NS, answering};
use strait_tests::{TestPki, eventually};
use tokio::io::AsyncReadExt;

const LIMIT: Duration = Duration::from_secs(20);
const SI: &str = "multicluster.x-k8s.io/v1beta1";

/// A backend on loopback answering `name`.
async fn backend(name: &'static str) -> SocketAddr {
    answering([127, 0, 0, 1], 0, name).await
}

async fn read_from(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

async fn dns_addresses(server: SocketAddr, name: &str) -> BTreeSet<IpAddr> {
    let stream = UdpClientStream::builder(server, TokioRuntimeProvider::default()).build();
    let (mut client, bg) = Client::connect(stream).await.unwrap();
    tokio::spawn(bg);
    let r = client
        .query(Name::from_str(name).unwrap(), DNSClass::IN, RecordType::A)
        .await
        .unwrap();
    r.answers()
        .iter()
        .filter_map(|a| match a.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect()
}

/// Two clusters: `east` (exporting) and `west` (importing through east's gossip).
async fn pair(pki: &TestPki) -> (KubeCluster, KubeCluster) {
    let east = KubeCluster::start(pki, "east", &[]).await;
    let seed = east.gateway.discovery_addr().unwrap();
    let west = KubeCluster::start(pki, "west", &[seed]).await;
    (east, west)
}

fn target_port(service: &Value) -> u16 {
    service["spec"]["ports"][0]["targetPort"].as_u64().unwrap() as u16
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_export_becomes_an_import_reachable_through_the_gateway_and_goes_with_it() {
    let pki = TestPki::new();
    let (east, west) = pair(&pki).await;
    let web = backend("east web").await;
    east.export(
        "web",
        false,
        &[("http", 80, web.port())],
        &[(web.ip(), None, true)],
    );

    // The exporting cluster's controller reports the export valid and exported.
    eventually(LIMIT, "ServiceExport Valid and Ready", async || {
        east.export_condition("web", "Valid") == Some(("True".into(), "Valid".into()))
            && east.export_condition("web", "Ready") == Some(("True".into(), "Exported".into()))
    })
    .await;
    assert!(
        east.api
            .requests()
            .iter()
            .any(|r| r.starts_with("PATCH") && r.contains("/serviceexports/web/status")),
        "status goes through the status subresource"
    );

    // The importing cluster gets a ServiceImport with the derived Service's cluster IP.
    let import = west
        .api
        .wait_for(SI, "ServiceImport", Some(NS), "web", LIMIT, |o| {
            o["spec"]["ips"].as_array().is_some_and(|a| !a.is_empty())
                && o["status"]["clusters"][0]["cluster"] == "east"
        })
        .await
        .expect("a ServiceImport with an IP and its cluster");
    assert_eq!(import["spec"]["type"], "ClusterSetIP");
    assert_eq!(import["spec"]["ports"][0]["port"], 80);
    let services = west.derived("v1", "Service", "web");
    assert_eq!(services.len(), 1, "one derived Service: {services:#?}");
    let derived = &services[0];
    assert_eq!(import["spec"]["ips"][0], derived["spec"]["clusterIP"]);
    let owner = &derived["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["kind"].as_str(), owner["uid"].clone()),
        (Some("ServiceImport"), import["metadata"]["uid"].clone())
    );
    let port = target_port(derived);
    assert!(
        (20_000..=20_099).contains(&port),
        "gateway port from import_ports: {port}"
    );

    // Its EndpointSlice points at the gateway pod on that port, labelled as MCS says.
    let slices = west.derived("discovery.k8s.io/v1", "EndpointSlice", "web");
    assert_eq!(slices.len(), 1, "{slices:#?}");
    let labels = &slices[0]["metadata"]["labels"];
    assert_eq!(labels["multicluster.kubernetes.io/source-cluster"], "east");
    assert_eq!(labels["endpointslice.kubernetes.io/managed-by"], "strait");
    assert_eq!(
        labels["kubernetes.io/service-name"],
        derived["metadata"]["name"]
    );
    assert_eq!(
        slices[0]["endpoints"][0]["addresses"][0],
        west.pod_ip.to_string()
    );
    assert_eq!(slices[0]["ports"][0]["port"], port);

    // What kube-proxy would do (clusterIP:80 → pod:port) reaches east's endpoint.
    let through = SocketAddr::new(west.pod_ip, port);
    eventually(
        LIMIT,
        "a connection through west's gateway reaches east's web",
        async || read_from(through).await.is_ok_and(|s| s == "east web"),
    )
    .await;

    // The exporting cluster imports its own service too (as the MCS API has it); its
    // gateway dials its own endpoint directly, no tunnel.
    let (_, own_port) = east.derived_service("web").await;
    let local = SocketAddr::new(east.pod_ip, own_port);
    eventually(
        LIMIT,
        "east's own import reaches its endpoint",
        async || read_from(local).await.is_ok_and(|s| s == "east web"),
    )
    .await;

    // DNS answers the clusterset IP.
    let ip: IpAddr = derived["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let dns = west.gateway.dns_addr().unwrap();
    eventually(
        LIMIT,
        "web.shop.svc.clusterset.local answers the ServiceImport IP",
        async || dns_addresses(dns, "web.shop.svc.clusterset.local.").await == BTreeSet::from([ip]),
    )
    .await;

    // Withdrawing the export removes everything strait wrote for it.
    assert!(east.api.delete(SI, "ServiceExport", Some(NS), "web"));
    assert!(
        west.api
            .wait_until(LIMIT, |api| {
                api.get(SI, "ServiceImport", Some(NS), "web").is_none()
                    && west.derived("v1", "Service", "web").is_empty()
                    && west
                        .derived("discovery.k8s.io/v1", "EndpointSlice", "web")
                        .is_empty()
            })
            .await,
        "import and derived objects deleted"
    );
    eventually(LIMIT, "the listener closes", async || {
        read_from(through).await.is_err()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_export_gets_one_address_per_endpoint_and_unready_endpoints_leave_dns() {
    let pki = TestPki::new();
    let (east, west) = pair(&pki).await;
    let db0 = answering([127, 0, 0, 2], 0, "db-0").await;
    let db1 = answering([127, 0, 0, 3], db0.port(), "db-1").await;
    let ports = [("pg", 5432, db0.port())];
    east.export(
        "db",
        true,
        &ports,
        &[
            (db0.ip(), Some("db-0"), true),
            (db1.ip(), Some("db-1"), true),
        ],
    );

    let import = west
        .api
        .wait_for(SI, "ServiceImport", Some(NS), "db", LIMIT, |_| true)
        .await
        .expect("a ServiceImport");
    assert_eq!(import["spec"]["type"], "Headless");
    assert!(
        import["spec"]["ips"].is_null(),
        "a headless import has no IP"
    );
    assert!(
        west.api
            .wait_until(LIMIT, |_| {
                west.derived("v1", "Service", "db")
                    .iter()
                    .filter(|s| s["spec"]["clusterIP"].is_string())
                    .count()
                    == 2
            })
            .await,
        "one derived Service per remote endpoint"
    );
    let derived = west.derived("v1", "Service", "db");
    let ip_of = |host: &str| -> (IpAddr, u16) {
        let s = derived
            .iter()
            .find(|s| {
                s["metadata"]["annotations"]["strait.dev/import-key"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!(
                        "/{}",
                        if host == "db-0" { db0.ip() } else { db1.ip() }
                    ))
            })
            .unwrap();
        (
            s["spec"]["clusterIP"].as_str().unwrap().parse().unwrap(),
            target_port(s),
        )
    };
    let (ip0, port0) = ip_of("db-0");
    let (ip1, port1) = ip_of("db-1");
    assert_ne!(port0, port1, "each endpoint has a gateway port of its own");

    // Each endpoint's own gateway port reaches exactly that endpoint.
    for (port, name) in [(port0, "db-0"), (port1, "db-1")] {
        let at = SocketAddr::new(west.pod_ip, port);
        eventually(
            LIMIT,
            &format!("{name} through west's gateway"),
            async || read_from(at).await.is_ok_and(|s| s == name),
        )
        .await;
    }

    // DNS names every ready endpoint, and each by hostname.
    let dns = west.gateway.dns_addr().unwrap();
    eventually(LIMIT, "db answers both endpoints", async || {
        dns_addresses(dns, "db.shop.svc.clusterset.local.").await == BTreeSet::from([ip0, ip1])
    })
    .await;
    assert_eq!(
        dns_addresses(dns, "db-1.east.db.shop.svc.clusterset.local.").await,
        BTreeSet::from([ip1])
    );

    // db-1 turns unready in east's EndpointSlice: it leaves west's answer.
    east.set_endpoints(
        "db",
        &ports,
        &[
            (db0.ip(), Some("db-0"), true),
            (db1.ip(), Some("db-1"), false),
        ],
    );
    eventually(LIMIT, "the unready endpoint leaves DNS", async || {
        dns_addresses(dns, "db.shop.svc.clusterset.local.").await == BTreeSet::from([ip0])
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_api_servers_and_malformed_exports_never_stop_the_data_plane() {
    let pki = TestPki::new();
    let (east, west) = pair(&pki).await;
    let web = backend("east web").await;
    east.export(
        "web",
        false,
        &[("http", 80, web.port())],
        &[(web.ip(), None, true)],
    );
    let (_, port) = west.derived_service("web").await;
    let through = SocketAddr::new(west.pod_ip, port);
    eventually(LIMIT, "traffic flows", async || {
        read_from(through).await.is_ok_and(|s| s == "east web")
    })
    .await;

    // Both API servers vanish: traffic keeps flowing, and the error shows in /ready.
    east.api.set_reachable(false);
    west.api.set_reachable(false);
    let admin = strait_tests::admin(&east.gateway);
    eventually(LIMIT, "east's /ready reports the API error", async || {
        let (code, ready) = admin.ready().await.unwrap();
        let k = ready.kubernetes.expect("kubernetes detail");
        code == 200 && ready.ready && k.synced && k.error.is_some()
    })
    .await;
    let metrics = admin.metrics().await.unwrap();
    assert!(
        strait_tests::metric(&metrics, "strait_kubernetes_watch_errors_total").unwrap_or(0.0)
            >= 1.0,
        "{metrics}"
    );
    for _ in 0..5 {
        assert_eq!(
            read_from(through).await.unwrap(),
            "east web",
            "served from the last known state"
        );
    }

    // They come back; a malformed ServiceExport is reported on itself and changes nothing else.
    east.api.set_reachable(true);
    west.api.set_reachable(true);
    let other = backend("east other").await;
    east.http_service("broken", other);
    east.api.create(serde_json::json!({
        "apiVersion": SI,
        "kind": "ServiceExport",
        "metadata": { "name": "broken", "namespace": NS },
        "spec": { "exportedLabels": ["not", "a", "map"] },
    }));
    eventually(
        LIMIT,
        "the malformed export is marked invalid",
        async || {
            east.export_condition("broken", "Valid") == Some(("False".into(), "Malformed".into()))
        },
    )
    .await;
    eventually(LIMIT, "east's API error clears", async || {
        admin
            .ready()
            .await
            .unwrap()
            .1
            .kubernetes
            .unwrap()
            .error
            .is_none()
    })
    .await;
    // A valid export made after it: once west imports that, it has seen both.
    east.export(
        "after",
        false,
        &[("http", 80, other.port())],
        &[(other.ip(), None, true)],
    );
    assert!(
        west.api
            .wait_for(SI, "ServiceImport", Some(NS), "after", LIMIT, |_| true)
            .await
            .is_some()
    );
    assert!(
        west.service_import("broken").is_none(),
        "an invalid export is not imported"
    );
    assert_eq!(read_from(through).await.unwrap(), "east web");
    assert_eq!(
        east.export_condition("web", "Valid"),
        Some(("True".into(), "Valid".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_bind_the_same_ports_one_writes_and_another_takes_over_when_it_stops() {
    let pki = TestPki::new();
    let (east, west) = pair(&pki).await;
    let seed = east.gateway.discovery_addr().unwrap();
    let (second, second_ip) = west.replica(&pki, 1, &[seed]).await;
    let web = backend("east web").await;
    east.export(
        "web",
        false,
        &[("http", 80, web.port())],
        &[(web.ip(), None, true)],
    );

    // One derived Service; its slice lists both replicas' pods.
    assert!(
        west.api
            .wait_until(LIMIT, |_| {
                west.derived("discovery.k8s.io/v1", "EndpointSlice", "web")
                    .first()
                    .and_then(|s| s["endpoints"].as_array().map(Vec::len))
                    == Some(2)
            })
            .await,
        "the derived slice points at both replicas"
    );
    let port = target_port(&west.derived("v1", "Service", "web")[0]);
    for pod in [west.pod_ip, second_ip] {
        let at = SocketAddr::new(pod, port);
        eventually(
            LIMIT,
            &format!("replica {pod} serves the recorded port"),
            async || read_from(at).await.is_ok_and(|s| s == "east web"),
        )
        .await;
    }

    // Exactly one replica writes.
    let leaders = async || {
        let mut n = Vec::new();
        for g in [&west.gateway, &second] {
            if strait_tests::admin(g)
                .ready()
                .await
                .unwrap()
                .1
                .kubernetes
                .unwrap()
                .leader
            {
                n.push(g.admin_addr());
            }
        }
        n
    };
    eventually(LIMIT, "one writer", async || leaders().await.len() == 1).await;
    assert_eq!(
        lease_holder(&west.api),
        "west-gateway-0",
        "the first replica took it"
    );

    // The writer stops; the other takes the Lease over and keeps the imports current.
    let KubeCluster { api, gateway, .. } = west;
    gateway.shutdown().await;
    eventually(LIMIT, "the second replica writes", async || {
        strait_tests::admin(&second)
            .ready()
            .await
            .unwrap()
            .1
            .kubernetes
            .unwrap()
            .leader
    })
    .await;
    assert_eq!(lease_holder(&api), "west-gateway-1");
    let other = backend("east other").await;
    east.export(
        "other",
        false,
        &[("http", 80, other.port())],
        &[(other.ip(), None, true)],
    );
    assert!(
        api.wait_for(SI, "ServiceImport", Some(NS), "other", LIMIT, |_| true)
            .await
            .is_some(),
        "the new writer creates imports"
    );
}

fn lease_holder(api: &strait_fake_kube::FakeApi) -> String {
    api.get(
        "coordination.k8s.io/v1",
        "Lease",
        Some("strait-system"),
        "strait-gateway-writer",
    )
    .unwrap()["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_serving_only_v1alpha1_service_exports_is_read_and_gets_its_status() {
    const ALPHA: &str = "multicluster.x-k8s.io/v1alpha1";
    let pki = TestPki::new();
    let east = KubeCluster::start_with(&pki, "east", &[], |api| {
        api.stop_serving(SI, "ServiceExport");
    })
    .await;
    let seed = east.gateway.discovery_addr().unwrap();
    let west = KubeCluster::start(&pki, "west", &[seed]).await;
    let web = backend("east web").await;
    east.http_service("web", web);
    east.api.create(serde_json::json!({
        "apiVersion": ALPHA,
        "kind": "ServiceExport",
        "metadata": { "name": "web", "namespace": NS },
    }));
    assert!(
        west.api
            .wait_for(SI, "ServiceImport", Some(NS), "web", LIMIT, |_| true)
            .await
            .is_some(),
        "a v1alpha1 export is imported"
    );
    let status = east
        .api
        .wait_for(ALPHA, "ServiceExport", Some(NS), "web", LIMIT, |o| {
            o["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Valid" && c["status"] == "True")
            })
        })
        .await;
    assert!(status.is_some(), "its status is written in v1alpha1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_strait_did_not_write_are_left_alone_and_a_new_writer_deletes_nothing_before_it_settles()
 {
    let pki = TestPki::new();
    let east = KubeCluster::start(&pki, "east", &[]).await;
    // West's API holds a ServiceImport someone else wrote, and one strait wrote before a
    // restart for a service nobody exports any more.
    let foreign = serde_json::json!({
        "apiVersion": SI, "kind": "ServiceImport",
        "metadata": { "name": "web", "namespace": NS, "labels": { "owner": "another-mcs" } },
        "spec": { "type": "ClusterSetIP", "ports": [{ "port": 80 }] },
    });
    let leftover = serde_json::json!({
        "apiVersion": SI, "kind": "ServiceImport",
        "metadata": { "name": "gone", "namespace": NS, "labels": { "app.kubernetes.io/managed-by": "strait" } },
        "spec": { "type": "ClusterSetIP", "ports": [{ "port": 80 }] },
    });
    let seed = east.gateway.discovery_addr().unwrap();
    // A long lease: the leftover must outlive the first passes by far.
    let west = KubeCluster::start_leased(
        &pki,
        "west",
        &[seed],
        |api| {
            api.create(foreign.clone());
            api.create(leftover.clone());
        },
        Duration::from_secs(15),
    )
    .await;
    let web = backend("east web").await;
    east.export(
        "web",
        false,
        &[("http", 80, web.port())],
        &[(web.ip(), None, true)],
    );
    east.export(
        "shop-front",
        false,
        &[("http", 80, web.port())],
        &[(web.ip(), None, true)],
    );

    // West writes the other import; the foreign one is reported, not taken over.
    assert!(
        west.api
            .wait_for(SI, "ServiceImport", Some(NS), "shop-front", LIMIT, |_| true)
            .await
            .is_some()
    );
    let admin = strait_tests::admin(&west.gateway);
    eventually(
        LIMIT,
        "west reports the foreign ServiceImport",
        async || {
            admin
                .ready()
                .await
                .unwrap()
                .1
                .kubernetes
                .unwrap()
                .error
                .is_some_and(|e| e.contains("not written by strait"))
        },
    )
    .await;
    let web_import = west.service_import("web").unwrap();
    assert_eq!(web_import["metadata"]["labels"]["owner"], "another-mcs");
    assert!(web_import["metadata"]["labels"]["app.kubernetes.io/managed-by"].is_null());
    assert!(
        west.derived("v1", "Service", "web").is_empty(),
        "nothing derived from a foreign import"
    );
    // The leftover survives the first passes (the writer has not settled: its view of
    // the federation may still be filling) ...
    assert!(west.service_import("gone").is_some());
    // ... and goes once the writer has settled (the discovery lease, 15 s here).
    assert!(
        west.api
            .wait_until(Duration::from_secs(40), |api| api
                .get(SI, "ServiceImport", Some(NS), "gone")
                .is_none())
            .await,
        "the settled writer deletes the withdrawn import"
    );
    assert!(
        west.service_import("web").is_some(),
        "never the foreign one"
    );
}
