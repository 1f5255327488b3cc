//! The real kube client and kube-runtime against the fake API server.
//!
//! No sleeps for synchronisation: tests wait on watch streams or `FakeApi::wait_until`,
//! always under a timeout.

use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::{Value, json};
use strait_fake_kube::FakeApi;

const T: Duration = Duration::from_secs(10);

fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"ports": [{"name": "http", "port": 80}], "selector": {"app": name}},
    }))
    .unwrap()
}

fn api_err(e: kube::Error) -> Box<kube::core::Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn next<S: Stream + Unpin>(s: &mut S) -> S::Item {
    tokio::time::timeout(T, s.next())
        .await
        .expect("stream item before timeout")
        .expect("stream not ended")
}

#[tokio::test]
async fn typed_service_crud() {
    let fake = FakeApi::start().await;
    let svcs: Api<Service> = Api::default_namespaced(fake.client());

    let created = svcs
        .create(&PostParams::default(), &service("web"))
        .await
        .unwrap();
    let meta = &created.metadata;
    assert!(meta.uid.as_deref().is_some_and(|u| u.len() == 36));
    assert!(meta.creation_timestamp.is_some());
    assert_eq!(meta.generation, Some(1));
    assert_eq!(meta.namespace.as_deref(), Some("default"));
    let spec = created.spec.as_ref().unwrap();
    let ip = spec.cluster_ip.clone().unwrap();
    assert!(ip.starts_with("10.96."), "{ip}");
    assert_eq!(spec.cluster_ips.as_deref(), Some(&[ip.clone()][..]));
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    let port = &spec.ports.as_ref().unwrap()[0];
    assert_eq!(port.protocol.as_deref(), Some("TCP"));
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(80))
    );

    // A second Service gets a different address.
    let other = svcs
        .create(&PostParams::default(), &service("db"))
        .await
        .unwrap();
    assert_ne!(other.spec.unwrap().cluster_ip.unwrap(), ip);

    let got = svcs.get("web").await.unwrap();
    assert_eq!(
        got.metadata.resource_version,
        created.metadata.resource_version
    );

    let list = svcs.list(&ListParams::default()).await.unwrap();
    let names: Vec<_> = list
        .items
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["db", "web"]);
    let list_rv: u64 = list.metadata.resource_version.unwrap().parse().unwrap();
    assert_eq!(list_rv, fake.resource_version());

    // Replace: spec change bumps generation, keeps uid and the allocated ClusterIP.
    let mut replaced = got.clone();
    replaced.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 8080;
    replaced.spec.as_mut().unwrap().cluster_ip = None;
    replaced.spec.as_mut().unwrap().cluster_ips = None;
    let replaced = svcs
        .replace("web", &PostParams::default(), &replaced)
        .await
        .unwrap();
    assert_eq!(replaced.metadata.generation, Some(2));
    assert_eq!(replaced.metadata.uid, created.metadata.uid);
    assert_eq!(
        replaced.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some(ip.as_str())
    );
    assert_ne!(
        replaced.metadata.resource_version,
        got.metadata.resource_version
    );

    // Stale resourceVersion: 409 Conflict.
    let err = api_err(
        svcs.replace("web", &PostParams::default(), &got)
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));

    // Merge patch.
    let patched = svcs
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"tier": "front"}}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.labels.as_ref().unwrap()["tier"], "front");
    assert_eq!(patched.metadata.labels.as_ref().unwrap()["app"], "web");
    assert_eq!(
        patched.metadata.generation,
        Some(2),
        "metadata-only change keeps generation"
    );

    // JSON patch, including a `test` that fails with 422.
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/labels/tier", "value": "front"},
        {"op": "add", "path": "/metadata/annotations", "value": {"a": "1"}},
        {"op": "replace", "path": "/spec/ports/0/port", "value": 9090},
        {"op": "remove", "path": "/metadata/labels/tier"},
    ]))
    .unwrap();
    let patched = svcs
        .patch("web", &PatchParams::default(), &Patch::Json::<()>(ops))
        .await
        .unwrap();
    assert_eq!(patched.metadata.annotations.as_ref().unwrap()["a"], "1");
    assert!(
        !patched
            .metadata
            .labels
            .as_ref()
            .unwrap()
            .contains_key("tier")
    );
    assert_eq!(
        patched.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
        9090
    );
    assert_eq!(patched.metadata.generation, Some(3));
    let failing: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/metadata/name", "value": "nope"}]))
            .unwrap();
    let err = api_err(
        svcs.patch("web", &PatchParams::default(), &Patch::Json::<()>(failing))
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 422);

    // Server-side apply: merges into an existing object, creates a missing one, and
    // requires a field manager.
    let ssa = PatchParams::apply("strait-test");
    let applied = svcs
        .patch(
            "web",
            &ssa,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "labels": {"ssa": "yes"}}})),
        )
        .await
        .unwrap();
    assert_eq!(applied.metadata.labels.as_ref().unwrap()["ssa"], "yes");
    assert_eq!(applied.metadata.labels.as_ref().unwrap()["app"], "web");
    let fresh = svcs
        .patch("fresh", &ssa, &Patch::Apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "fresh"}, "spec": {"ports": [{"port": 53, "protocol": "UDP"}]}})))
        .await
        .unwrap();
    assert!(
        fresh
            .spec
            .unwrap()
            .cluster_ip
            .unwrap()
            .starts_with("10.96.")
    );
    let err = api_err(
        svcs.patch(
            "fresh",
            &PatchParams::default(),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Service"})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(err.code, 400);

    // Patching a missing object: 404.
    let err = api_err(
        svcs.patch("ghost", &PatchParams::default(), &Patch::Merge(json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (404, "NotFound"));

    // Delete returns the object; then 404 on get and on a second delete.
    let deleted = svcs.delete("web", &DeleteParams::default()).await.unwrap();
    assert_eq!(
        deleted.left().unwrap().metadata.name.as_deref(),
        Some("web")
    );
    let err = api_err(svcs.get("web").await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (404, "NotFound"));
    assert_eq!(err.details.as_ref().unwrap().name, "web");
    assert_eq!(
        api_err(
            svcs.delete("web", &DeleteParams::default())
                .await
                .unwrap_err()
        )
        .code,
        404
    );
    assert!(fake.get("v1", "Service", Some("default"), "web").is_none());

    let log = fake.requests();
    assert!(
        log.iter()
            .any(|l| l == "POST /api/v1/namespaces/default/services"),
        "{log:?}"
    );
    assert!(
        log.iter().any(
            |l| l.starts_with("PATCH /api/v1/namespaces/default/services/fresh?")
                && l.contains("fieldManager=strait-test")
        ),
        "{log:?}"
    );
}

#[tokio::test]
async fn cluster_ip_rules() {
    let fake = FakeApi::start().await;
    let svcs: Api<Service> = Api::default_namespaced(fake.client());
    let pp = PostParams::default();
    let mut headless = service("headless");
    headless.spec.as_mut().unwrap().cluster_ip = Some("None".into());
    let headless = svcs.create(&pp, &headless).await.unwrap();
    assert_eq!(headless.spec.unwrap().cluster_ip.as_deref(), Some("None"));

    let mut fixed = service("fixed");
    fixed.spec.as_mut().unwrap().cluster_ip = Some("10.96.5.5".into());
    assert_eq!(
        svcs.create(&pp, &fixed)
            .await
            .unwrap()
            .spec
            .unwrap()
            .cluster_ip
            .as_deref(),
        Some("10.96.5.5")
    );

    let mut dup = service("dup");
    dup.spec.as_mut().unwrap().cluster_ip = Some("10.96.5.5".into());
    assert_eq!(api_err(svcs.create(&pp, &dup).await.unwrap_err()).code, 422);
    let mut outside = service("outside");
    outside.spec.as_mut().unwrap().cluster_ip = Some("192.168.0.1".into());
    assert_eq!(
        api_err(svcs.create(&pp, &outside).await.unwrap_err()).code,
        422
    );

    // Changing an allocated ClusterIP is rejected; deleting releases it.
    let err = api_err(
        svcs.patch(
            "fixed",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"clusterIP": "10.96.7.7"}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(err.code, 422);
    svcs.delete("fixed", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        svcs.create(&pp, &dup).await.is_ok(),
        "address released on delete"
    );

    let mut np = service("np");
    np.spec.as_mut().unwrap().type_ = Some("NodePort".into());
    let np = svcs.create(&pp, &np).await.unwrap();
    let node_port = np.spec.unwrap().ports.unwrap()[0].node_port.unwrap();
    assert!((30000..=32767).contains(&node_port));
}

#[tokio::test]
async fn create_errors_and_namespaces() {
    let fake = FakeApi::start().await;
    let client = fake.client();
    let svcs: Api<Service> = Api::default_namespaced(client.clone());
    svcs.create(&PostParams::default(), &service("web"))
        .await
        .unwrap();
    let err = api_err(
        svcs.create(&PostParams::default(), &service("web"))
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "AlreadyExists"));

    let elsewhere: Api<Service> = Api::namespaced(client.clone(), "team-a");
    let err = api_err(
        elsewhere
            .create(&PostParams::default(), &service("web"))
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (404, "NotFound"));
    assert_eq!(err.details.as_ref().unwrap().kind, "namespaces");

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "team-a"}})).unwrap();
    let ns = namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Active"));
    elsewhere
        .create(&PostParams::default(), &service("web"))
        .await
        .unwrap();
    let names: Vec<_> = namespaces
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|n| n.metadata.name.unwrap())
        .collect();
    assert_eq!(names, ["default", "kube-system", "team-a"]);

    // generateName.
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"generateName": "cfg-"}})).unwrap();
    let cm = cms.create(&PostParams::default(), &cm).await.unwrap();
    let name = cm.metadata.name.unwrap();
    assert!(name.starts_with("cfg-") && name.len() == 9, "{name}");

    // Malformed JSON: 400 BadRequest as a Status.
    let req = http::Request::post("/api/v1/namespaces/default/configmaps")
        .header("content-type", "application/json")
        .body(b"{not json".to_vec())
        .unwrap();
    let err = api_err(client.request::<Value>(req).await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (400, "BadRequest"));

    // Deleting a namespace deletes what is in it.
    namespaces
        .delete("team-a", &DeleteParams::default())
        .await
        .unwrap();
    assert!(fake.list("v1", "Service", Some("team-a")).is_empty());
    assert_eq!(fake.list("v1", "Service", None).len(), 1);

    // Discovery-ish endpoints answer.
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
}

#[tokio::test]
async fn status_subresource() {
    let fake = FakeApi::start().await;
    let svcs: Api<Service> = Api::default_namespaced(fake.client());
    svcs.create(&PostParams::default(), &service("lb"))
        .await
        .unwrap();

    let lb = json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}, "spec": {"ports": [{"port": 1}]}});
    let after = svcs
        .patch_status("lb", &PatchParams::default(), &Patch::Merge(&lb))
        .await
        .unwrap();
    assert_eq!(
        after
            .status
            .unwrap()
            .load_balancer
            .unwrap()
            .ingress
            .unwrap()[0]
            .ip
            .as_deref(),
        Some("192.0.2.1")
    );
    assert_eq!(
        after.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
        80,
        "status write leaves spec"
    );
    assert_eq!(after.metadata.generation, Some(1));

    // A main-resource patch cannot change status.
    let cleared = json!({"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}}, "metadata": {"labels": {"x": "y"}}});
    let after = svcs
        .patch("lb", &PatchParams::default(), &Patch::Merge(&cleared))
        .await
        .unwrap();
    assert_eq!(
        after
            .status
            .unwrap()
            .load_balancer
            .unwrap()
            .ingress
            .unwrap()[0]
            .ip
            .as_deref(),
        Some("192.0.2.1")
    );
    assert_eq!(after.metadata.labels.unwrap()["x"], "y");

    // Replace of /status with a stale resourceVersion conflicts.
    let mut stale = svcs.get("lb").await.unwrap();
    stale.metadata.resource_version = Some("1".into());
    let err = api_err(
        svcs.replace_status("lb", &PostParams::default(), &stale)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 409);

    // A no-op write keeps the resourceVersion and emits nothing.
    let rv = fake.resource_version();
    svcs.patch(
        "lb",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
    )
    .await
    .unwrap();
    assert_eq!(fake.resource_version(), rv);

    assert!(
        fake.requests()
            .iter()
            .any(|l| l.starts_with("PATCH /api/v1/namespaces/default/services/lb/status"))
    );
}

#[tokio::test]
async fn watcher_sees_init_and_changes() {
    let fake = FakeApi::start().await;
    fake.set_bookmark_interval(Duration::from_millis(50));
    let svcs: Api<Service> = Api::default_namespaced(fake.client());
    svcs.create(&PostParams::default(), &service("pre"))
        .await
        .unwrap();

    let mut events = watcher(svcs.clone(), watcher::Config::default()).boxed();
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::Init
    ));
    match next(&mut events).await.unwrap() {
        watcher::Event::InitApply(s) => assert_eq!(s.metadata.name.as_deref(), Some("pre")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::InitDone
    ));

    svcs.create(&PostParams::default(), &service("new"))
        .await
        .unwrap();
    match next(&mut events).await.unwrap() {
        watcher::Event::Apply(s) => assert_eq!(s.metadata.name.as_deref(), Some("new")),
        other => panic!("{other:?}"),
    }
    let rv = fake.resource_version();
    svcs.patch(
        "new",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"v": "2"}}})),
    )
    .await
    .unwrap();
    match next(&mut events).await.unwrap() {
        watcher::Event::Apply(s) => {
            assert_eq!(s.metadata.labels.unwrap()["v"], "2");
            assert!(s.metadata.resource_version.unwrap().parse::<u64>().unwrap() > rv);
        }
        other => panic!("{other:?}"),
    }
    svcs.delete("new", &DeleteParams::default()).await.unwrap();
    match next(&mut events).await.unwrap() {
        watcher::Event::Delete(s) => assert_eq!(s.metadata.name.as_deref(), Some("new")),
        other => panic!("{other:?}"),
    }
    let watches: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|l| l.contains("watch=true"))
        .collect();
    assert_eq!(
        watches.len(),
        1,
        "one watch connection served everything: {watches:?}"
    );
    assert!(watches[0].contains("allowWatchBookmarks=true"));

    // The server ends the watch (as on a timeout): the watcher re-watches from its last
    // resourceVersion without re-listing, and misses nothing.
    fake.close_watches();
    fake.create(serde_json::to_value(service("after")).unwrap());
    match next(&mut events).await.unwrap() {
        watcher::Event::Apply(s) => assert_eq!(s.metadata.name.as_deref(), Some("after")),
        other => panic!("{other:?}"),
    }
    let log = fake.requests();
    assert_eq!(
        log.iter().filter(|l| l.contains("watch=true")).count(),
        2,
        "{log:?}"
    );
    assert_eq!(
        log.iter()
            .filter(|l| l.starts_with("GET") && !l.contains("watch=true"))
            .count(),
        1,
        "{log:?}"
    );
}

#[tokio::test]
async fn raw_watch_bookmarks_and_expiry() {
    let fake = FakeApi::start().await;
    fake.set_bookmark_interval(Duration::from_millis(50));
    let svcs: Api<Service> = Api::default_namespaced(fake.client());
    svcs.create(&PostParams::default(), &service("a"))
        .await
        .unwrap();
    let rv = svcs
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();

    let mut stream = svcs
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match next(&mut stream).await.unwrap() {
        WatchEvent::Bookmark(b) => {
            assert_eq!(b.metadata.resource_version, rv);
            assert_eq!(b.types.kind, "Service");
        }
        other => panic!("expected a bookmark, got {other:?}"),
    }
    svcs.create(&PostParams::default(), &service("b"))
        .await
        .unwrap();
    loop {
        match next(&mut stream).await.unwrap() {
            WatchEvent::Added(s) => break assert_eq!(s.metadata.name.as_deref(), Some("b")),
            WatchEvent::Bookmark(_) => continue,
            other => panic!("{other:?}"),
        }
    }

    // Replay from an old resourceVersion returns history.
    let mut replay = svcs
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .unwrap()
        .boxed();
    assert!(
        matches!(next(&mut replay).await.unwrap(), WatchEvent::Added(s) if s.metadata.name.as_deref() == Some("b"))
    );

    // After compaction: HTTP 200, then one ERROR event with a 410 Expired Status, then end.
    fake.compact();
    let mut expired = svcs
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match next(&mut expired).await.unwrap() {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected 410, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(T, expired.next())
            .await
            .unwrap()
            .is_none()
    );

    // timeoutSeconds ends the stream.
    let mut short = svcs
        .watch(&WatchParams::default().timeout(1).disable_bookmarks(), "0")
        .await
        .unwrap()
        .boxed();
    assert!(matches!(
        next(&mut short).await.unwrap(),
        WatchEvent::Added(_)
    ));
    assert!(matches!(
        next(&mut short).await.unwrap(),
        WatchEvent::Added(_)
    ));
    assert!(
        tokio::time::timeout(T, short.next())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn reflector_relists_after_410() {
    let fake = FakeApi::start().await;
    let svcs: Api<Service> = Api::default_namespaced(fake.client());
    for name in ["a", "b"] {
        svcs.create(&PostParams::default(), &service(name))
            .await
            .unwrap();
    }
    let (reader, writer) = reflector::store::<Service>();
    let mut stream = reflector(
        writer,
        watcher(svcs.clone(), watcher::Config::default()).default_backoff(),
    )
    .boxed();
    let names = || {
        let mut n: Vec<String> = reader
            .state()
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        n.sort();
        n
    };
    let mut errors = Vec::new();
    drive(&mut stream, &mut errors, || names() == ["a", "b"]).await;

    // The server vanishes; meanwhile the store changes and its history is compacted.
    fake.set_reachable(false);
    assert!(fake.delete("v1", "Service", Some("default"), "a"));
    fake.create(serde_json::to_value(service("c")).unwrap());
    fake.compact();
    let lists_before = fake
        .requests()
        .iter()
        .filter(|l| l.starts_with("GET") && !l.contains("watch=true"))
        .count();
    fake.set_reachable(true);

    // The watcher resumes from its old resourceVersion, gets 410 Expired, re-lists, and
    // the reflector's store ends up right.
    drive(&mut stream, &mut errors, || names() == ["b", "c"]).await;
    assert!(
        errors
            .iter()
            .any(|e| matches!(e, watcher::Error::WatchError(s) if s.code == 410)),
        "{errors:?}"
    );
    let lists_after = fake
        .requests()
        .iter()
        .filter(|l| l.starts_with("GET") && !l.contains("watch=true"))
        .count();
    assert!(lists_after > lists_before, "the watcher re-listed");

    // And it keeps watching afterwards.
    svcs.create(&PostParams::default(), &service("d"))
        .await
        .unwrap();
    drive(&mut stream, &mut errors, || names() == ["b", "c", "d"]).await;
}

/// Polls a reflector stream (each item is applied to its store before it is yielded)
/// until `done` holds, collecting errors; panics after the timeout.
async fn drive<S>(stream: &mut S, errors: &mut Vec<watcher::Error>, mut done: impl FnMut() -> bool)
where
    S: Stream<Item = Result<watcher::Event<Service>, watcher::Error>> + Unpin,
{
    tokio::time::timeout(T, async {
        while !done() {
            match stream.next().await {
                Some(Err(e)) => errors.push(e),
                Some(Ok(_)) => {}
                None => panic!("reflector stream ended"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out; errors so far: {errors:?}"));
}

#[tokio::test]
async fn streaming_list_watcher() {
    let fake = FakeApi::start().await;
    let svcs: Api<Service> = Api::default_namespaced(fake.client());
    svcs.create(&PostParams::default(), &service("a"))
        .await
        .unwrap();
    let mut events = watcher(svcs.clone(), watcher::Config::default().streaming_lists()).boxed();
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::Init
    ));
    assert!(
        matches!(next(&mut events).await.unwrap(), watcher::Event::InitApply(s) if s.metadata.name.as_deref() == Some("a"))
    );
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::InitDone
    ));
    svcs.create(&PostParams::default(), &service("b"))
        .await
        .unwrap();
    assert!(
        matches!(next(&mut events).await.unwrap(), watcher::Event::Apply(s) if s.metadata.name.as_deref() == Some("b"))
    );
    let log = fake.requests();
    assert!(
        log.iter().any(|l| l.contains("sendInitialEvents=true")),
        "{log:?}"
    );
    assert!(
        !log.iter()
            .any(|l| l.starts_with("GET") && !l.contains("watch=true")),
        "no list call: {log:?}"
    );
}

#[tokio::test]
async fn label_selector_watch_transitions() {
    let fake = FakeApi::start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(fake.client());
    let cm = |name: &str, app: &str| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {"app": app}}})).unwrap()
    };
    cms.create(&PostParams::default(), &cm("one", "web"))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &cm("two", "db"))
        .await
        .unwrap();
    let lp = ListParams::default().labels("app in (web),app!=db");
    assert_eq!(cms.list(&lp).await.unwrap().items.len(), 1);

    let wp = WatchParams::default().labels("app=web").disable_bookmarks();
    let mut stream = cms.watch(&wp, "0").await.unwrap().boxed();
    assert!(
        matches!(next(&mut stream).await.unwrap(), WatchEvent::Added(c) if c.metadata.name.as_deref() == Some("one"))
    );

    let relabel = |app: &str| Patch::Merge(json!({"metadata": {"labels": {"app": app}}}));
    // Non-matching changes are invisible; leaving the selection is DELETED; entering is ADDED.
    cms.patch(
        "two",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "v"}})),
    )
    .await
    .unwrap();
    let left = cms
        .patch("one", &PatchParams::default(), &relabel("db"))
        .await
        .unwrap();
    match next(&mut stream).await.unwrap() {
        WatchEvent::Deleted(c) => {
            assert_eq!(c.metadata.name.as_deref(), Some("one"));
            assert_eq!(c.metadata.resource_version, left.metadata.resource_version);
        }
        other => panic!("{other:?}"),
    }
    cms.patch("two", &PatchParams::default(), &relabel("web"))
        .await
        .unwrap();
    assert!(
        matches!(next(&mut stream).await.unwrap(), WatchEvent::Added(c) if c.metadata.name.as_deref() == Some("two"))
    );
    cms.patch(
        "two",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "w"}})),
    )
    .await
    .unwrap();
    assert!(
        matches!(next(&mut stream).await.unwrap(), WatchEvent::Modified(c) if c.metadata.name.as_deref() == Some("two"))
    );

    // The same through kube-runtime's watcher with a selector.
    let mut events = watcher(cms.clone(), watcher::Config::default().labels("app=db")).boxed();
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::Init
    ));
    assert!(
        matches!(next(&mut events).await.unwrap(), watcher::Event::InitApply(c) if c.metadata.name.as_deref() == Some("one"))
    );
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::InitDone
    ));
    cms.patch("one", &PatchParams::default(), &relabel("web"))
        .await
        .unwrap();
    assert!(
        matches!(next(&mut events).await.unwrap(), watcher::Event::Delete(c) if c.metadata.name.as_deref() == Some("one"))
    );
}

#[tokio::test]
async fn pagination() {
    let fake = FakeApi::start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(fake.client());
    for i in 0..5 {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("cm-{i}")}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let mut names = Vec::new();
    let mut lp = ListParams::default().limit(2);
    let mut pages = 0;
    let mut first_rv = None;
    loop {
        let page = cms.list(&lp).await.unwrap();
        pages += 1;
        first_rv.get_or_insert(page.metadata.resource_version.clone());
        assert_eq!(page.metadata.resource_version, *first_rv.as_ref().unwrap());
        names.extend(page.items.into_iter().map(|c| c.metadata.name.unwrap()));
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, ["cm-0", "cm-1", "cm-2", "cm-3", "cm-4"]);

    // The watcher pages too.
    let (reader, writer) = reflector::store::<ConfigMap>();
    let stream = reflector(
        writer,
        watcher(cms.clone(), watcher::Config::default().page_size(2)).default_backoff(),
    );
    tokio::spawn(stream.for_each(|_| async {}));
    tokio::time::timeout(T, reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reader.state().len(), 5);

    // A continue token older than the history: 410.
    let page = cms.list(&ListParams::default().limit(2)).await.unwrap();
    let token = page.metadata.continue_.unwrap();
    cms.delete("cm-4", &DeleteParams::default()).await.unwrap();
    fake.compact();
    let err = api_err(
        cms.list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (410, "Expired"));
}

#[tokio::test]
async fn owner_reference_gc_and_finalizers() {
    let fake = FakeApi::start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(fake.client());
    let owner = fake
        .create(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}));
    let other = fake
        .create(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other"}}));
    let oref = |o: &Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "name": o["metadata"]["name"], "uid": o["metadata"]["uid"]});
    let child = fake.create(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "child", "ownerReferences": [oref(&owner)]}}));
    fake.create(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "grandchild", "ownerReferences": [oref(&child)]}}));
    fake.create(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared", "ownerReferences": [oref(&owner), oref(&other)]}}));

    cms.delete("owner", &DeleteParams::default()).await.unwrap();
    assert!(
        fake.get("v1", "Service", Some("default"), "child")
            .is_none(),
        "dependent collected"
    );
    assert!(
        fake.get("v1", "ConfigMap", Some("default"), "grandchild")
            .is_none(),
        "recursively"
    );
    let shared = fake
        .get("v1", "ConfigMap", Some("default"), "shared")
        .expect("still has a live owner");
    let refs = shared["metadata"]["ownerReferences"].as_array().unwrap();
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0]["name"], "other");

    // Orphan propagation keeps dependents and drops their reference.
    cms.delete("other", &DeleteParams::orphan()).await.unwrap();
    let shared = fake
        .get("v1", "ConfigMap", Some("default"), "shared")
        .unwrap();
    assert!(shared["metadata"].get("ownerReferences").is_none());

    // Finalizers hold deletion until removed.
    fake.create(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "held", "finalizers": ["strait.io/x"]}}));
    cms.delete("held", &DeleteParams::default()).await.unwrap();
    let held = cms.get("held").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    cms.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(
        fake.wait_for(
            "v1",
            "ConfigMap",
            Some("default"),
            "held",
            Duration::from_millis(1),
            |_| true
        )
        .await
        .is_none()
    );
    assert_eq!(api_err(cms.get("held").await.unwrap_err()).code, 404);
}

#[tokio::test]
async fn dynamic_service_export_with_status() {
    let fake = FakeApi::start().await;
    let gvk = GroupVersionKind::gvk("multicluster.x-k8s.io", "v1beta1", "ServiceExport");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "serviceexports");
    let exports: Api<DynamicObject> = Api::namespaced_with(fake.client(), "default", &ar);
    let obj = DynamicObject::new("web", &ar).data(json!({"spec": {}}));
    let created = exports.create(&PostParams::default(), &obj).await.unwrap();
    assert_eq!(
        created.types.as_ref().unwrap().api_version,
        "multicluster.x-k8s.io/v1beta1"
    );
    assert_eq!(created.metadata.generation, Some(1));

    let cond = json!({"status": {"conditions": [{"type": "Valid", "status": "True", "reason": "Ok", "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z"}]}});
    let after = exports
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&cond))
        .await
        .unwrap();
    assert_eq!(after.data["status"]["conditions"][0]["type"], "Valid");
    assert_eq!(after.metadata.generation, Some(1));
    let after = exports
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": null, "metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        after.data["status"]["conditions"][0]["type"], "Valid",
        "main resource cannot clear status"
    );

    let listed = exports.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert!(fake.requests().iter().any(|l| l.starts_with(
        "PATCH /apis/multicluster.x-k8s.io/v1beta1/namespaces/default/serviceexports/web/status"
    )));

    // v1alpha1 is a separate store.
    let alpha = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("multicluster.x-k8s.io", "v1alpha1", "ServiceExport"),
        "serviceexports",
    );
    let alpha_exports: Api<DynamicObject> = Api::namespaced_with(fake.client(), "default", &alpha);
    assert!(
        alpha_exports
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // Cluster-scoped ClusterProperty.
    let cp_ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("about.k8s.io", "v1alpha1", "ClusterProperty"),
        "clusterproperties",
    );
    let props: Api<DynamicObject> = Api::all_with(fake.client(), &cp_ar);
    props
        .create(
            &PostParams::default(),
            &DynamicObject::new("cluster.clusterset.k8s.io", &cp_ar)
                .data(json!({"spec": {"value": "east"}})),
        )
        .await
        .unwrap();
    let got = fake
        .get(
            "about.k8s.io/v1alpha1",
            "ClusterProperty",
            None,
            "cluster.clusterset.k8s.io",
        )
        .unwrap();
    assert_eq!(got["spec"]["value"], "east");
    assert!(got["metadata"].get("namespace").is_none());
}

#[tokio::test]
async fn unreachable_and_wait_for() {
    let fake = FakeApi::start().await;
    let svcs: Api<Service> = Api::default_namespaced(fake.client());
    fake.set_reachable(false);
    let err = tokio::time::timeout(T, svcs.list(&ListParams::default()))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        !matches!(err, kube::Error::Api(_)),
        "a transport error, not an API answer: {err:?}"
    );
    fake.set_reachable(true);
    assert!(
        svcs.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    let writer = svcs.clone();
    tokio::spawn(async move {
        writer
            .create(&PostParams::default(), &service("later"))
            .await
            .unwrap()
    });
    let obj = fake
        .wait_for("v1", "Service", Some("default"), "later", T, |o| {
            o["spec"]["clusterIP"].is_string()
        })
        .await
        .expect("created");
    assert_eq!(obj["metadata"]["name"], "later");
    assert!(
        !fake
            .wait_until(Duration::from_millis(20), |f| f
                .list("v1", "Pod", None)
                .len()
                == 1)
            .await
    );
}

#[tokio::test]
async fn direct_store_api() {
    let fake = FakeApi::start().await;
    let svcs: Api<Service> = Api::default_namespaced(fake.client());
    let mut events = svcs
        .watch(&WatchParams::default().disable_bookmarks(), "0")
        .await
        .unwrap()
        .boxed();

    let created = fake.apply(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
        "spec": {"ports": [{"port": 80}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.7"}]}},
    }));
    assert!(matches!(
        next(&mut events).await.unwrap(),
        WatchEvent::Added(_)
    ));
    assert_eq!(
        created["status"]["loadBalancer"]["ingress"][0]["ip"], "192.0.2.7",
        "apply keeps status"
    );

    let replaced = fake.apply(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "resourceVersion": "1"},
        "spec": {"ports": [{"port": 81}]},
    }));
    assert_eq!(replaced["metadata"]["uid"], created["metadata"]["uid"]);
    assert_eq!(
        replaced["metadata"]["creationTimestamp"],
        created["metadata"]["creationTimestamp"]
    );
    assert_eq!(replaced["metadata"]["generation"], 2);
    assert_eq!(replaced["spec"]["clusterIP"], created["spec"]["clusterIP"]);
    assert!(replaced.get("status").is_none());
    match next(&mut events).await.unwrap() {
        WatchEvent::Modified(s) => assert_eq!(s.spec.unwrap().ports.unwrap()[0].port, 81),
        other => panic!("{other:?}"),
    }

    let err = fake
        .try_create(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}))
        .unwrap_err();
    assert_eq!((err.code, err.reason), (409, "AlreadyExists"));
    assert_eq!(fake.list("v1", "Service", Some("default")).len(), 1);
    assert!(fake.delete("v1", "Service", None, "s"));
    assert!(matches!(
        next(&mut events).await.unwrap(),
        WatchEvent::Deleted(_)
    ));
    assert!(!fake.delete("v1", "Service", None, "s"));
}
