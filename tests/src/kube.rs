//! Kubernetes clusters for tests: a fake API server (the real HTTP list/watch protocol)
//! and a real gateway in Kubernetes mode talking to it through kube-rs, on loopback.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};
use strait_common::config::{Kubernetes, PortRange};
use strait_fake_kube::FakeApi;
use strait_gateway::Gateway;

use crate::{TestPki, discovery, udp};

/// The namespace of the test services.
pub const NS: &str = "shop";

/// One cluster: its API server, its gateway, and the address the gateway's import
/// listeners bind (a loopback address of its own, as a pod has its own IP).
pub struct KubeCluster {
    /// Cluster id.
    pub name: String,
    /// The fake API server.
    pub api: FakeApi,
    /// The gateway.
    pub gateway: Gateway,
    /// The gateway "pod" address.
    pub pod_ip: IpAddr,
}

impl KubeCluster {
    /// Starts the API server (with namespaces `shop` and `strait-system`, and the gateway
    /// Service's EndpointSlice naming the pod address), then the gateway, joining the
    /// federation through `seeds`.
    pub async fn start(pki: &TestPki, name: &str, seeds: &[SocketAddr]) -> KubeCluster {
        Self::start_with(pki, name, seeds, |_| {}).await
    }

    /// The discovery lease of test clusters: also how long a new writer waits before it
    /// deletes withdrawn imports.
    pub const LEASE: Duration = Duration::from_secs(5);

    /// Like [`KubeCluster::start`], with `prepare` run on the API server before the
    /// gateway starts (to change what it serves).
    pub async fn start_with(
        pki: &TestPki,
        name: &str,
        seeds: &[SocketAddr],
        prepare: impl FnOnce(&FakeApi),
    ) -> KubeCluster {
        Self::start_leased(pki, name, seeds, prepare, Self::LEASE).await
    }

    /// Like [`KubeCluster::start_with`], with the discovery lease `lease`.
    pub async fn start_leased(
        pki: &TestPki,
        name: &str,
        seeds: &[SocketAddr],
        prepare: impl FnOnce(&FakeApi),
        lease: Duration,
    ) -> KubeCluster {
        let api = FakeApi::start().await;
        for ns in [NS, "strait-system"] {
            api.create(
                json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns } }),
            );
        }
        prepare(&api);
        let (gateway, pod_ip) = replica(pki, &api, name, 0, seeds, lease).await;
        KubeCluster {
            name: name.into(),
            api,
            gateway,
            pod_ip,
        }
    }

    /// Starts replica number `n` (> 0) of this cluster's gateway, on the same API server,
    /// with a pod address of its own; the gateway and that address.
    pub async fn replica(
        &self,
        pki: &TestPki,
        n: usize,
        seeds: &[SocketAddr],
    ) -> (Gateway, IpAddr) {
        replica(pki, &self.api, &self.name, n, seeds, Self::LEASE).await
    }
}

/// Starts replica `n` of cluster `name`'s gateway against `api`, adding its "pod" to the
/// gateway Service's EndpointSlice.
async fn replica(
    pki: &TestPki,
    api: &FakeApi,
    name: &str,
    n: usize,
    seeds: &[SocketAddr],
    lease: Duration,
) -> (Gateway, IpAddr) {
    let pod_ip = random_loopback();
    add_pod(api, pod_ip);
    let (socket, _) = udp();
    let gateway = pki
        .gateway(name, socket, |c| {
            c.discovery = Some(discovery(seeds, lease));
            let mut k = Kubernetes::new(Some(api.url()));
            k.listen = pod_ip;
            k.import_ports = PortRange {
                first: 20_000,
                last: 20_099,
            };
            k.replica = Some(format!("{name}-gateway-{n}"));
            k.lease = strait_common::units::HumanDuration(Duration::from_secs(3));
            // The test backends listen on loopback.
            k.allow_local_endpoints = true;
            c.kubernetes = Some(k);
            c.listen.dns = Some(SocketAddr::new(pod_ip, 0));
        })
        .await;
    (gateway, pod_ip)
}

impl KubeCluster {
    /// Creates Service `name` (ports: (name, port, target port)), one EndpointSlice with
    /// `endpoints` (address, hostname, ready), and its `ServiceExport`.
    pub fn export(
        &self,
        name: &str,
        headless: bool,
        ports: &[(&str, u16, u16)],
        endpoints: &[(IpAddr, Option<&str>, bool)],
    ) {
        self.service(name, headless, ports, endpoints);
        self.api.create(json!({
            "apiVersion": "multicluster.x-k8s.io/v1beta1",
            "kind": "ServiceExport",
            "metadata": { "name": name, "namespace": NS },
        }));
    }

    /// Creates Service `name` and its EndpointSlice, without exporting it.
    pub fn service(
        &self,
        name: &str,
        headless: bool,
        ports: &[(&str, u16, u16)],
        endpoints: &[(IpAddr, Option<&str>, bool)],
    ) {
        let mut spec = json!({
            "ports": ports.iter().map(|(n, p, t)| json!({ "name": n, "port": p, "targetPort": t, "protocol": "TCP" })).collect::<Vec<_>>(),
        });
        if headless {
            spec["clusterIP"] = json!("None");
        }
        self.api.create(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": name, "namespace": NS },
            "spec": spec,
        }));
        self.set_endpoints(name, ports, endpoints);
    }

    /// A ClusterIP Service `name` with port `http` 80 and one ready endpoint, `backend`.
    pub fn http_service(&self, name: &str, backend: std::net::SocketAddr) {
        self.service(
            name,
            false,
            &[("http", 80, backend.port())],
            &[(backend.ip(), None, true)],
        );
    }

    /// Creates or replaces the EndpointSlice of Service `name`.
    pub fn set_endpoints(
        &self,
        name: &str,
        ports: &[(&str, u16, u16)],
        endpoints: &[(IpAddr, Option<&str>, bool)],
    ) {
        self.api.apply(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{name}-x1"),
                "namespace": NS,
                "labels": { "kubernetes.io/service-name": name },
            },
            "addressType": "IPv4",
            "ports": ports.iter().map(|(n, _, t)| json!({ "name": n, "port": t, "protocol": "TCP" })).collect::<Vec<_>>(),
            "endpoints": endpoints.iter().map(|(a, h, ready)| {
                let mut e = json!({ "addresses": [a.to_string()], "conditions": { "ready": ready } });
                if let Some(h) = h {
                    e["hostname"] = json!(h);
                }
                e
            }).collect::<Vec<_>>(),
        }));
    }

    /// Waits (bounded) for the derived Service of imported service `name` to have its
    /// cluster IP; that IP and the gateway port of its first port.
    pub async fn derived_service(&self, name: &str) -> (IpAddr, u16) {
        let ready = self
            .api
            .wait_until(Duration::from_secs(20), |_| {
                self.derived("v1", "Service", name)
                    .first()
                    .is_some_and(|s| s["spec"]["clusterIP"].is_string())
            })
            .await;
        assert!(ready, "{}: a derived Service for {name}", self.name);
        let s = &self.derived("v1", "Service", name)[0];
        let ip = s["spec"]["clusterIP"]
            .as_str()
            .and_then(|ip| ip.parse().ok());
        let port = s["spec"]["ports"][0]["targetPort"].as_u64();
        (ip.expect("an IP"), port.expect("a port") as u16)
    }

    /// The `ServiceImport` `name`, if there is one.
    pub fn service_import(&self, name: &str) -> Option<Value> {
        self.api.get(
            "multicluster.x-k8s.io/v1beta1",
            "ServiceImport",
            Some(NS),
            name,
        )
    }

    /// Objects of `kind` that strait derived for imported service `name`.
    pub fn derived(&self, api_version: &str, kind: &str, name: &str) -> Vec<Value> {
        self.api
            .list(api_version, kind, Some(NS))
            .into_iter()
            .filter(|o| {
                o["metadata"]["labels"]["multicluster.kubernetes.io/service-name"] == name
                    && o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "strait"
            })
            .collect()
    }

    /// The `ServiceExport` `name`'s condition `type_`: (status, reason).
    pub fn export_condition(&self, name: &str, type_: &str) -> Option<(String, String)> {
        let e = self.api.get(
            "multicluster.x-k8s.io/v1beta1",
            "ServiceExport",
            Some(NS),
            name,
        )?;
        let c = e["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)?
            .clone();
        Some((
            c["status"].as_str()?.to_owned(),
            c["reason"].as_str()?.to_owned(),
        ))
    }
}

/// Adds a ready gateway "pod" at `pod_ip` to the gateway Service's EndpointSlice.
fn add_pod(api: &FakeApi, pod_ip: IpAddr) {
    let name = "strait-gateway-abc";
    let mut slice = api
        .get(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            Some("strait-system"),
            name,
        )
        .unwrap_or_else(|| {
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": name,
                    "namespace": "strait-system",
                    "labels": { "kubernetes.io/service-name": "strait-gateway" },
                },
                "addressType": "IPv4",
                "endpoints": [],
                "ports": [{ "name": "tunnel", "port": 4433, "protocol": "UDP" }],
            })
        });
    slice["endpoints"]
        .as_array_mut()
        .expect("endpoints")
        .push(json!({ "addresses": [pod_ip.to_string()], "conditions": { "ready": true } }));
    api.apply(slice);
}

/// A random 127.x.y.z, so parallel tests' gateway "pods" never share ports.
fn random_loopback() -> IpAddr {
    use rand::Rng;
    let mut rng = rand::rng();
    IpAddr::from([
        127,
        rng.random_range(100..250u8),
        rng.random(),
        rng.random_range(2..250u8),
    ])
}

/// A TCP server on `ip:port` (port 0: any) that answers each connection with `name` and
/// closes it, so a test sees which cluster's endpoint it reached.
pub async fn answering(ip: [u8; 4], port: u16, name: &'static str) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind(SocketAddr::from((ip, port)))
        .await
        .expect("bind a backend");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
            });
        }
    });
    addr
}
