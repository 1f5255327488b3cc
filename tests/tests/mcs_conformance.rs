//! The Required cases of the MCS API conformance suite (sigs.k8s.io/mcs-api/conformance),
//! run against two clusters, each a fake API server (the real HTTP list/watch protocol)
//! and a real gateway in Kubernetes mode. As in the suite, every cluster of the
//! clusterset, the exporting one included, gets the ServiceImport.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};
use strait_tests::TestPki;
use strait_tests::kube::{KubeCluster, NS, answering};

const LIMIT: Duration = Duration::from_secs(20);
const MCS: &str = "multicluster.x-k8s.io/v1beta1";
const HELLO: &str = "hello";

async fn clusterset(pki: &TestPki) -> [KubeCluster; 2] {
    let a = KubeCluster::start(pki, "cluster-a", &[]).await;
    let seed = a.gateway.discovery_addr().unwrap();
    let b = KubeCluster::start(pki, "cluster-b", &[seed]).await;
    [a, b]
}

fn endpoint() -> (IpAddr, Option<&'static str>, bool) {
    ("127.0.0.1".parse().unwrap(), None, true)
}

/// Waits for `cluster`'s ServiceImport `hello` to satisfy `pred`; panics naming `what`.
async fn await_import(
    cluster: &KubeCluster,
    what: &str,
    pred: impl FnMut(&Value) -> bool,
) -> Value {
    cluster
        .api
        .wait_for(MCS, "ServiceImport", Some(NS), HELLO, LIMIT, pred)
        .await
        .unwrap_or_else(|| {
            panic!(
                "{}: {what}; ServiceImport now: {:#?}",
                cluster.name,
                cluster.service_import(HELLO)
            )
        })
}

async fn await_no_import(cluster: &KubeCluster, what: &str) {
    assert!(
        cluster
            .api
            .wait_until(LIMIT, |api| api
                .get(MCS, "ServiceImport", Some(NS), HELLO)
                .is_none())
            .await,
        "{}: {what}",
        cluster.name
    );
}

/// Waits until `cluster`'s ServiceExport `hello` has condition `type_` = (status, reason).
/// (Conditions are eventually consistent: the export may be seen before its Service.)
async fn await_condition(cluster: &KubeCluster, type_: &str, status: &str, reason: &str) {
    let want = Some((status.to_owned(), reason.to_owned()));
    let found = cluster
        .api
        .wait_until(LIMIT, |_| cluster.export_condition(HELLO, type_) == want)
        .await;
    assert!(
        found,
        "{}: ServiceExport {type_}={status} ({reason}); now {:?}",
        cluster.name,
        cluster.export_condition(HELLO, type_)
    );
}

fn ports(import: &Value) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = import["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("").to_owned(),
                p["port"].as_u64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn unexport(cluster: &KubeCluster) {
    assert!(cluster.api.delete(MCS, "ServiceExport", Some(NS), HELLO));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_import_exists_only_while_some_cluster_exports() {
    let pki = TestPki::new();
    let [a, b] = clusterset(&pki).await;
    a.export(HELLO, false, &[("http", 80, 8080)], &[endpoint()]);
    for c in [&a, &b] {
        await_import(c, "imported from a", |_| true).await;
    }
    b.export(HELLO, false, &[("http", 80, 8080)], &[endpoint()]);
    for c in [&a, &b] {
        await_import(c, "served by both clusters", |o| {
            o["status"]["clusters"]
                .as_array()
                .is_some_and(|l| l.len() == 2)
        })
        .await;
    }
    unexport(&a);
    for c in [&a, &b] {
        let import = await_import(c, "still exported by b", |o| {
            o["status"]["clusters"] == json!([{ "cluster": "cluster-b" }])
        })
        .await;
        assert_eq!(import["spec"]["type"], "ClusterSetIP");
    }
    unexport(&b);
    for c in [&a, &b] {
        await_no_import(c, "unexported everywhere: the ServiceImport goes").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_ip_export_gets_a_cluster_set_ip_import_in_every_cluster_with_its_ports_and_affinity()
 {
    let pki = TestPki::new();
    let [a, b] = clusterset(&pki).await;
    a.service(
        HELLO,
        false,
        &[("http", 80, 8080), ("metrics", 9090, 9090)],
        &[endpoint()],
    );
    let mut svc = a.api.get("v1", "Service", Some(NS), HELLO).unwrap();
    svc["spec"]["sessionAffinity"] = json!("ClientIP");
    svc["spec"]["sessionAffinityConfig"] = json!({ "clientIP": { "timeoutSeconds": 600 } });
    a.api.apply(svc);
    a.api.create(json!({
        "apiVersion": MCS, "kind": "ServiceExport",
        "metadata": { "name": HELLO, "namespace": NS },
    }));
    for c in [&a, &b] {
        // Eventually consistent: the export may be read before the Service's affinity.
        let import = await_import(
            c,
            "a ClusterSetIP import with an IP and the affinity",
            |o| {
                o["spec"]["ips"]
                    .as_array()
                    .is_some_and(|ips| !ips.is_empty())
                    && o["spec"]["sessionAffinity"] == "ClientIP"
            },
        )
        .await;
        assert_eq!(import["spec"]["type"], "ClusterSetIP");
        let ip = import["spec"]["ips"][0].as_str().unwrap();
        assert!(ip.parse::<IpAddr>().is_ok(), "{ip} is an IP");
        assert_eq!(
            ports(&import),
            [("http".into(), 80), ("metrics".into(), 9090)]
        );
        assert_eq!(import["spec"]["sessionAffinity"], "ClientIP");
        assert_eq!(
            import["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
            600
        );
    }
    await_condition(&a, "Conflict", "False", "NoConflicts").await;
    unexport(&a);
    for c in [&a, &b] {
        await_no_import(c, "unexported: the ServiceImport goes").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_are_the_union_and_a_conflicting_port_is_decided_by_the_oldest_export() {
    let pki = TestPki::new();
    let [a, b] = clusterset(&pki).await;
    // a exports first; b adds a port, and defines `http` differently.
    a.export(HELLO, false, &[("http", 80, 8080)], &[endpoint()]);
    await_import(&b, "a's export arrives", |_| true).await;
    b.export(
        HELLO,
        false,
        &[("http", 81, 8080), ("grpc", 90, 9000)],
        &[endpoint()],
    );
    for c in [&a, &b] {
        await_condition(c, "Conflict", "True", "PortConflict").await;
        let import = await_import(c, "ports resolved", |o| {
            o["status"]["clusters"]
                .as_array()
                .is_some_and(|l| l.len() == 2)
        })
        .await;
        assert_eq!(
            ports(&import),
            [("grpc".into(), 90), ("http".into(), 80)],
            "the union, with the oldest export's `http`"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_export_gets_a_headless_import_with_no_ip_and_a_type_mismatch_is_a_conflict() {
    let pki = TestPki::new();
    let [a, b] = clusterset(&pki).await;
    a.export(HELLO, true, &[("http", 80, 8080)], &[endpoint()]);
    for c in [&a, &b] {
        let import = await_import(c, "a Headless import", |_| true).await;
        assert_eq!(import["spec"]["type"], "Headless");
        assert!(
            import["spec"]["ips"].is_null(),
            "no clusterset IP for a headless import"
        );
    }
    // b exports the same service with a cluster IP: a's (older) headlessness stays.
    b.export(HELLO, false, &[("http", 80, 8080)], &[endpoint()]);
    for c in [&a, &b] {
        await_condition(c, "Conflict", "True", "TypeConflict").await;
        let import = await_import(c, "both clusters in the import", |o| {
            o["status"]["clusters"]
                .as_array()
                .is_some_and(|l| l.len() == 2)
        })
        .await;
        assert_eq!(
            import["spec"]["type"], "Headless",
            "the oldest export decides"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_name_service_is_not_valid_and_an_unexported_service_is_not_imported() {
    let pki = TestPki::new();
    let [a, b] = clusterset(&pki).await;
    a.api.create(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": HELLO, "namespace": NS },
        "spec": { "type": "ExternalName", "externalName": "example.com" },
    }));
    a.api.create(json!({
        "apiVersion": MCS, "kind": "ServiceExport",
        "metadata": { "name": HELLO, "namespace": NS },
    }));
    await_condition(&a, "Valid", "False", "InvalidServiceType").await;
    // A Service with endpoints but no ServiceExport.
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = backend.local_addr().unwrap();
    a.http_service("private", addr);
    // A third, exported service: once both clusters import it, they have seen the others.
    a.export("public", false, &[("http", 80, 8080)], &[endpoint()]);
    for c in [&a, &b] {
        assert!(
            c.api
                .wait_for(MCS, "ServiceImport", Some(NS), "public", LIMIT, |_| true)
                .await
                .is_some(),
            "{}: imports the exported service",
            c.name
        );
    }
    for c in [&a, &b] {
        assert!(
            c.service_import(HELLO).is_none(),
            "{}: no import of an invalid export",
            c.name
        );
        assert!(
            c.service_import("private").is_none(),
            "{}: no import of an unexported service",
            c.name
        );
    }
    assert!(
        b.gateway
            .listeners()
            .iter()
            .all(|l| l.service != format!("{NS}/private")),
        "nothing listens for an unexported service"
    );
}

/// KEP-5939: `clusterSelectors` on the exports order the clusters each importer prefers,
/// matched against the exporting clusters' `ClusterProperty` values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_selectors_prefer_the_clusters_they_match_and_are_reported_on_the_import() {
    const REGION: &str = "region.strait.dev";
    let property = |api: &strait_fake_kube::FakeApi, value: &str| {
        api.create(json!({
            "apiVersion": "about.k8s.io/v1alpha1", "kind": "ClusterProperty",
            "metadata": { "name": REGION }, "spec": { "value": value },
        }));
    };
    let pki = TestPki::new();
    // The importer is in "us": its selector must pick us-1, which sorts after eu-1 (the
    // pick without selectors, by RTT bucket then cluster id).
    let eu = KubeCluster::start_with(&pki, "eu-1", &[], |api| property(api, "eu")).await;
    let seed = eu.gateway.discovery_addr().unwrap();
    let us = KubeCluster::start_with(&pki, "us-1", &[seed], |api| property(api, "us")).await;
    let importer = KubeCluster::start_with(&pki, "us-2", &[seed], |api| property(api, "us")).await;
    for (cluster, name) in [(&us, "from us"), (&eu, "from eu")] {
        let addr = answering([127, 0, 0, 1], 0, name).await;
        cluster.http_service(HELLO, addr);
        cluster.api.create(json!({
            "apiVersion": MCS, "kind": "ServiceExport",
            "metadata": { "name": HELLO, "namespace": NS },
            "spec": { "clusterSelectors": [{ "matchProperties": { REGION: "@SameAsImporter@" } }] },
        }));
    }
    let expected = json!([{ "selector": 0, "clusters": ["us-1"] }]);
    await_import(
        &importer,
        "the importer is in us: its first selector picks us-1",
        |o| o["status"]["clusterSelectorResults"] == expected,
    )
    .await;
    // eu-1's own import: the same selector picks itself there.
    await_import(&eu, "eu-1's selector picks eu-1", |o| {
        o["status"]["clusterSelectorResults"] == json!([{ "selector": 0, "clusters": ["eu-1"] }])
    })
    .await;

    // The importer routes to us-1 first, and every connection lands there once us-1 takes
    // all new connections: its tunnel up and its ready endpoints in the catalog (until then
    // connections move on to the next cluster; us-1 may advertise the export before its
    // endpoints, as the API server's watches deliver them in either order), and, if it
    // was out meanwhile, back from the recovery dwell and slow start (up to 15 s).
    let route = strait_tests::admin(&importer.gateway)
        .route(&format!("{NS}/{HELLO}"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(route.clusters[0].cluster, "us-1", "{route:#?}");
    strait_tests::eventually(LIMIT * 2, "us-1 takes all new connections", async || {
        let route = strait_tests::admin(&importer.gateway)
            .route(&format!("{NS}/{HELLO}"))
            .await;
        route.is_ok_and(|r| {
            r.is_ok_and(|r| {
                r.primary.as_deref() == Some("us-1")
                    && r.clusters
                        .iter()
                        .any(|c| c.cluster == "us-1" && c.eligible && c.share >= 1.0)
            })
        })
    })
    .await;
    let (_, port) = importer.derived_service(HELLO).await;
    let through = SocketAddr::new(importer.pod_ip, port);
    let read = async || {
        let mut s = tokio::net::TcpStream::connect(through).await.ok()?;
        let mut out = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut s, &mut out)
            .await
            .ok()?;
        Some(out)
    };
    strait_tests::eventually(LIMIT, "the import answers", async || read().await.is_some()).await;
    let mut answers = std::collections::BTreeSet::new();
    for _ in 0..10 {
        answers.insert(read().await.unwrap_or_default());
    }
    assert_eq!(
        answers,
        std::collections::BTreeSet::from(["from us".to_owned()])
    );
}
