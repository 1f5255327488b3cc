//! This cluster's exports, read from Kubernetes: each `ServiceExport` names a Service of
//! the same namespace and name; the Service gives the ports and the type, its
//! EndpointSlices give the endpoints (with readiness) and the target ports.
//!
//! [`exports_from`] is the pure conversion, with one [`Verdict`] per `ServiceExport` (the
//! conditions the gateway writes back). `ServiceExport`s are read as dynamic objects and
//! parsed one by one, so one malformed object is reported on itself and never stops the
//! others (a typed watch would fail the whole list).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::DynamicObject;
use std::time::Duration;

use strait_common::config::{Endpoint, Export, Protocol, Selection, ServicePort};
use strait_common::units::HumanDuration;

use strait_discovery::model::{Service as CatalogService, resolve};
use strait_discovery::wire::MAX_SELECTION;

use crate::mcs::{condition, v1beta1};

/// Annotation on a `ServiceExport`: the clusters that may import it, comma-separated
/// (`*`, the default, for all).
pub const EXPORT_TO: &str = "strait.dev/export-to";
/// Annotation on a `ServiceExport`: this cluster's relative weight for the service
/// (canaries between clusters; default 1).
pub const WEIGHT: &str = "strait.dev/weight";

/// A `ServiceExport` as read, before its Service is looked up.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportObject {
    /// Namespace.
    pub namespace: String,
    /// Name (the Service's).
    pub name: String,
    /// `metadata.generation` (written back as `observedGeneration`).
    pub generation: Option<i64>,
    /// When it was created (the oldest export wins a conflict).
    pub created: Option<Time>,
    /// Its annotations.
    pub annotations: BTreeMap<String, String>,
    /// Its spec, or why it could not be read.
    pub spec: Result<v1beta1::ServiceExportSpec, String>,
}

impl ExportObject {
    /// Reads one object of either version; a spec that does not parse is kept as an error.
    pub fn from_dynamic(o: &DynamicObject) -> Option<ExportObject> {
        let spec = match o.data.get("spec") {
            None | Some(serde_json::Value::Null) => Ok(v1beta1::ServiceExportSpec::default()),
            Some(s) => serde_path_to_error::deserialize(s.clone())
                .map_err(|e| format!("spec.{}: {}", e.path(), e.inner())),
        };
        Some(ExportObject {
            namespace: o.metadata.namespace.clone()?,
            name: o.metadata.name.clone()?,
            generation: o.metadata.generation,
            created: o.metadata.creation_timestamp.clone(),
            annotations: o.metadata.annotations.clone().unwrap_or_default(),
            spec,
        })
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One condition the gateway sets on a `ServiceExport`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    /// `Valid`, `Ready` or `Conflict`.
    pub type_: &'static str,
    /// True or false.
    pub status: bool,
    /// Machine-readable reason.
    pub reason: String,
    /// For people.
    pub message: String,
}

impl Cond {
    fn new(type_: &'static str, status: bool, reason: &str, message: impl Into<String>) -> Cond {
        Cond {
            type_,
            status,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

/// What the gateway says about one `ServiceExport`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Generation the verdict is about.
    pub generation: Option<i64>,
    /// Its conditions.
    pub conditions: Vec<Cond>,
}

impl Verdict {
    /// Whether the export is valid (and so published).
    pub fn valid(&self) -> bool {
        self.conditions
            .iter()
            .any(|c| c.type_ == condition::VALID && c.status)
    }
}

/// The exports for `objects`, looking their Services and EndpointSlices up in `services`
/// and `slices`, and one verdict per object. Invalid exports are left out.
///
/// Endpoints at loopback, link-local, multicast or unspecified addresses are left out
/// unless `allow_local`: an EndpointSlice can name any address, and those would make the
/// gateway dial itself or the node's metadata service for the whole clusterset.
pub fn exports_from(
    objects: &[ExportObject],
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    allow_local: bool,
    gateways: &BTreeSet<IpAddr>,
) -> (Vec<Export>, Vec<Verdict>) {
    let by_name: BTreeMap<(&str, &str), &Service> = services
        .iter()
        .filter_map(|s| {
            Some((
                (
                    s.metadata.namespace.as_deref()?,
                    s.metadata.name.as_deref()?,
                ),
                s.as_ref(),
            ))
        })
        .collect();
    let mut exports = Vec::new();
    let mut verdicts = Vec::new();
    for o in objects {
        let service = by_name
            .get(&(o.namespace.as_str(), o.name.as_str()))
            .copied();
        let conditions = match export_of(o, service, slices, allow_local, gateways) {
            Ok((export, note)) => {
                exports.push(export);
                vec![
                    Cond::new(
                        condition::VALID,
                        true,
                        "Valid",
                        "the Service can be exported",
                    ),
                    Cond::new(
                        condition::READY,
                        true,
                        "Exported",
                        format!("published to the clusterset{note}"),
                    ),
                ]
            }
            Err((reason, message)) => vec![
                Cond::new(condition::VALID, false, reason, message),
                Cond::new(
                    condition::READY,
                    false,
                    "Failed",
                    "not exported: it is not valid",
                ),
            ],
        };
        verdicts.push(Verdict {
            namespace: o.namespace.clone(),
            name: o.name.clone(),
            generation: o.generation,
            conditions,
        });
    }
    exports.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    (exports, verdicts)
}

/// What the other clusters export, by `namespace/name`: (cluster, service) for each.
pub type Clusterset = BTreeMap<String, Vec<(String, CatalogService)>>;

/// The `Conflict` condition of this cluster's (`me`) valid `export`, against the other
/// clusters' exports of the same service in `clusterset`, by the MCS rule: the oldest
/// export decides, and every export of a conflicting service says so.
pub fn conflict(me: &str, export: &Export, clusterset: &Clusterset) -> Cond {
    let mine = strait_discovery::source::to_catalog(std::slice::from_ref(export), "");
    let Some(mine) = mine.values().next() else {
        return Cond::new(condition::CONFLICT, false, "NoConflicts", "");
    };
    let key = format!("{}/{}", export.namespace, export.name);
    let others = clusterset.get(&key).map(Vec::as_slice).unwrap_or_default();
    let all = std::iter::once((me, mine)).chain(
        others
            .iter()
            .filter(|(c, _)| c != me)
            .map(|(c, s)| (c.as_str(), s)),
    );
    let resolved = resolve(all);
    if resolved.conflicts.is_empty() {
        return Cond::new(
            condition::CONFLICT,
            false,
            "NoConflicts",
            format!("{} cluster(s) export it alike", others.len() + 1),
        );
    }
    Cond::new(
        condition::CONFLICT,
        true,
        &resolved.conflicts.join(","),
        format!(
            "the clusters exporting {key} disagree; the oldest export (cluster {}) decides what the clusterset sees",
            resolved.oldest
        ),
    )
}

/// One export, with a note on what of the Service is not carried; or the reason and
/// message of `Valid=False`.
fn export_of(
    o: &ExportObject,
    service: Option<&Service>,
    slices: &[Arc<EndpointSlice>],
    allow_local: bool,
    gateways: &BTreeSet<IpAddr>,
) -> Result<(Export, String), (&'static str, String)> {
    let selectors: Vec<BTreeMap<String, String>> = match &o.spec {
        Err(e) => {
            return Err((
                "Malformed",
                format!(
                    "the ServiceExport cannot be read ({e}); fix the field or recreate the object"
                ),
            ));
        }
        Ok(spec) => spec
            .cluster_selectors
            .iter()
            .map(|s| s.match_properties.clone())
            .collect(),
    };
    // What the catalog can carry (peers refuse more).
    let too_long = |m: &BTreeMap<String, String>| {
        m.len() > MAX_SELECTION || m.iter().any(|(k, v)| k.len() > 253 || v.len() > 253)
    };
    if selectors.len() > MAX_SELECTION || selectors.iter().any(too_long) {
        return Err((
            "InvalidClusterSelectors",
            format!(
                "spec.clusterSelectors has more than {MAX_SELECTION} selectors or properties, or a name or value longer than 253 bytes; shorten it"
            ),
        ));
    }
    let export_to = match o.annotations.get(EXPORT_TO) {
        None => vec!["*".to_owned()],
        Some(v) => {
            let clusters: Vec<String> = v
                .split(',')
                .map(|c| c.trim().to_owned())
                .filter(|c| !c.is_empty())
                .collect();
            if clusters.is_empty()
                || !clusters
                    .iter()
                    .all(|c| c == "*" || strait_common::identity::is_dns_label(c))
            {
                return Err((
                    "InvalidAnnotation",
                    format!(
                        "annotation {EXPORT_TO}=`{v}` is not a list of cluster ids; write e.g. `eu-west,ap-south` or `*`"
                    ),
                ));
            }
            clusters
        }
    };
    let weight = match o.annotations.get(WEIGHT) {
        None => 1,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(w) if (1..=1000).contains(&w) => w,
            _ => {
                return Err((
                    "InvalidAnnotation",
                    format!(
                        "annotation {WEIGHT}=`{v}` is not a weight; use a whole number from 1 to 1000"
                    ),
                ));
            }
        },
    };
    let Some(service) = service else {
        return Err((
            "NoService",
            format!(
                "there is no Service {}; create it, or delete this ServiceExport",
                o.key()
            ),
        ));
    };
    let spec = service.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        return Err((
            "InvalidServiceType",
            "an ExternalName Service cannot be exported; export a Service with endpoints".into(),
        ));
    }
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let mine: Vec<&EndpointSlice> = slices
        .iter()
        .map(|s| s.as_ref())
        .filter(|s| {
            s.metadata.namespace.as_deref() == Some(o.namespace.as_str())
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    .is_some_and(|n| *n == o.name)
        })
        .collect();
    let mut skipped = Vec::new();
    let mut ports = Vec::new();
    for p in spec.ports.unwrap_or_default() {
        let protocol = p.protocol.as_deref().unwrap_or("TCP");
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        if protocol != "TCP" {
            skipped.push(format!("{protocol} port {port} (strait carries TCP only)"));
            continue;
        }
        let name = p.name.clone().unwrap_or_default();
        // The slices carry the resolved number of a named target port.
        let from_slices = mine
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .find(|sp| sp.name.as_deref().unwrap_or("") == name)
            .and_then(|sp| sp.port)
            .and_then(|n| u16::try_from(n).ok());
        let target_port = from_slices.or(match &p.target_port {
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            _ => None,
        });
        ports.push(ServicePort {
            name,
            port,
            target_port,
            protocol: Protocol::Tcp,
        });
    }
    let mut endpoints = endpoints_of(&mine);
    let before = endpoints.len();
    endpoints.retain(|e| (allow_local || !is_local(e.address)) && !gateways.contains(&e.address));
    if endpoints.len() < before {
        skipped.push(format!(
            "{} endpoint(s) at loopback, link-local, metadata, multicast, unspecified or gateway addresses",
            before - endpoints.len()
        ));
    }
    // The API server defaults the timeout to 3 hours.
    let session_affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        let seconds = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref()?.timeout_seconds)
            .unwrap_or(10_800);
        HumanDuration(Duration::from_secs(
            u64::try_from(seconds).unwrap_or(10_800),
        ))
    });
    let note = if skipped.is_empty() {
        String::new()
    } else {
        format!("; not carried: {}", skipped.join(", "))
    };
    Ok((
        Export {
            name: o.name.clone(),
            namespace: o.namespace.clone(),
            ports,
            endpoints,
            export_to,
            weight,
            headless,
            session_affinity,
            exported_at_ms: o.created.as_ref().map_or(0, |t| t.0.as_millisecond()),
            // This cluster's properties are added by the source, which watches them.
            selection: Selection {
                selectors: selectors.clone(),
                properties: BTreeMap::new(),
            },
        },
        note,
    ))
}

/// Addresses no exported endpoint may have (unless allowed): this host, link-local
/// (cloud metadata), multicast, unspecified.
fn is_local(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_unspecified()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unspecified()
                || v6.is_unicast_link_local()
                // The AWS metadata service's IPv6 address (unique-local, not link-local).
                || v6 == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_local(IpAddr::V4(v4)))
        }
    }
}

/// The endpoints of `slices`, one per address. An endpoint is ready when its slice says so
/// (an absent `ready` means ready); terminating endpoints are never ready, even while
/// still serving. An address listed twice (a slice being replaced) is ready if either
/// entry is.
fn endpoints_of(slices: &[&EndpointSlice]) -> Vec<Endpoint> {
    let mut by_address: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
    for s in slices {
        if !matches!(s.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        for e in &s.endpoints {
            let Some(address) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let c = e.conditions.clone().unwrap_or_default();
            let ready = c.ready.unwrap_or(true) && !c.terminating.unwrap_or(false);
            let entry = by_address.entry(address).or_insert(Endpoint {
                address,
                hostname: e.hostname.clone(),
                ready,
            });
            entry.ready |= ready;
        }
    }
    by_address.into_values().collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(name: &str, annotations: &[(&str, &str)], spec: serde_json::Value) -> ExportObject {
        let o: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "multicluster.x-k8s.io/v1beta1",
            "kind": "ServiceExport",
            "metadata": {
                "name": name,
                "namespace": "shop",
                "generation": 3,
                "annotations": annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
            },
            "spec": spec,
        }))
        .unwrap();
        ExportObject::from_dynamic(&o).unwrap()
    }

    fn service(name: &str, spec: serde_json::Value) -> Arc<Service> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": { "name": name, "namespace": "shop" },
                "spec": spec,
            }))
            .unwrap(),
        )
    }

    fn slice(
        service: &str,
        ports: serde_json::Value,
        endpoints: serde_json::Value,
    ) -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {
                    "name": format!("{service}-abc"),
                    "namespace": "shop",
                    "labels": { "kubernetes.io/service-name": service },
                },
                "addressType": "IPv4",
                "ports": ports,
                "endpoints": endpoints,
            }))
            .unwrap(),
        )
    }

    fn reason(v: &Verdict) -> (bool, &str) {
        let c = v
            .conditions
            .iter()
            .find(|c| c.type_ == condition::VALID)
            .unwrap();
        (c.status, c.reason.as_str())
    }

    #[test]
    fn a_service_with_slices_becomes_an_export_with_resolved_ports_and_readiness() {
        let exports = [object("web", &[], json!({}))];
        let services = [service(
            "web",
            json!({ "clusterIP": "10.96.0.5", "ports": [
                { "name": "http", "port": 80, "targetPort": "http-alt" },
                { "name": "dns", "port": 53, "protocol": "UDP" },
            ]}),
        )];
        let slices = [slice(
            "web",
            json!([{ "name": "http", "port": 8080, "protocol": "TCP" }]),
            json!([
                { "addresses": ["10.1.0.1"], "conditions": { "ready": true } },
                { "addresses": ["10.1.0.2"], "conditions": { "ready": false } },
                { "addresses": ["10.1.0.3"], "conditions": { "ready": false, "serving": true, "terminating": true } },
                { "addresses": ["10.1.0.4"] },
                { "addresses": ["127.0.0.1"] },
                { "addresses": ["169.254.169.254"] },
            ]),
        )];
        let (out, verdicts) = exports_from(&exports, &services, &slices, false, &BTreeSet::new());
        assert_eq!(out.len(), 1);
        let e = &out[0];
        assert_eq!((e.namespace.as_str(), e.name.as_str()), ("shop", "web"));
        assert!(!e.headless);
        assert_eq!(
            e.ports.len(),
            1,
            "the UDP port is not carried: {:?}",
            e.ports
        );
        assert_eq!((e.ports[0].port, e.ports[0].target_port), (80, Some(8080)));
        let ready: Vec<(String, bool)> = e
            .endpoints
            .iter()
            .map(|ep| (ep.address.to_string(), ep.ready))
            .collect();
        assert_eq!(
            ready,
            [
                ("10.1.0.1".into(), true),
                ("10.1.0.2".into(), false),
                ("10.1.0.3".into(), false),
                ("10.1.0.4".into(), true),
            ]
        );
        assert_eq!(e.export_to, ["*"]);
        assert_eq!(e.weight, 1);
        assert_eq!(reason(&verdicts[0]), (true, "Valid"));
        let ready = verdicts[0]
            .conditions
            .iter()
            .find(|c| c.type_ == condition::READY)
            .unwrap();
        assert!(
            ready.status && ready.message.contains("UDP port 53"),
            "{ready:?}"
        );
        assert!(
            ready.message.contains("2 endpoint(s) at loopback"),
            "{ready:?}"
        );
        assert_eq!(verdicts[0].generation, Some(3));
        let (allowed, _) = exports_from(&exports, &services, &slices, true, &BTreeSet::new());
        assert_eq!(allowed[0].endpoints.len(), 6, "unless allowed");
        // The gateway pods themselves are never endpoints.
        let gateways = BTreeSet::from(["10.1.0.4".parse().unwrap()]);
        let (out, _) = exports_from(&exports, &services, &slices, true, &gateways);
        assert_eq!(out[0].endpoints.len(), 5);
    }

    #[test]
    fn headless_services_keep_hostnames_and_numeric_target_ports_need_no_slice() {
        let exports = [object("db", &[], json!({}))];
        let services = [service(
            "db",
            json!({ "clusterIP": "None", "ports": [{ "port": 5432, "targetPort": 15432 }] }),
        )];
        let slices = [slice(
            "db",
            json!([]),
            json!([{ "addresses": ["10.1.0.7"], "hostname": "db-0" }]),
        )];
        let (out, _) = exports_from(&exports, &services, &slices, false, &BTreeSet::new());
        assert!(out[0].headless);
        assert_eq!(out[0].ports[0].target_port, Some(15432));
        assert_eq!(out[0].endpoints[0].hostname.as_deref(), Some("db-0"));
    }

    #[test]
    fn invalid_exports_are_left_out_with_the_mcs_reason() {
        let exports = [
            object("missing", &[], json!({})),
            object("external", &[], json!({})),
            object("broken", &[], json!({ "exportedLabels": "not a map" })),
            object("annotated", &[(EXPORT_TO, "eu west")], json!({})),
            object("heavy", &[(WEIGHT, "zero")], json!({})),
            object(
                "ok",
                &[(EXPORT_TO, "eu-west, ap-south"), (WEIGHT, "5")],
                json!({}),
            ),
        ];
        let services = [
            service(
                "external",
                json!({ "type": "ExternalName", "externalName": "example.com" }),
            ),
            service("broken", json!({ "ports": [{ "port": 80 }] })),
            service("annotated", json!({ "ports": [{ "port": 80 }] })),
            service("heavy", json!({ "ports": [{ "port": 80 }] })),
            service("ok", json!({ "ports": [{ "port": 80 }] })),
        ];
        let (out, verdicts) = exports_from(&exports, &services, &[], false, &BTreeSet::new());
        let names: Vec<&str> = out.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["ok"], "only the valid export is published");
        assert_eq!(out[0].export_to, ["eu-west", "ap-south"]);
        assert_eq!(out[0].weight, 5);
        let reasons: Vec<(bool, &str)> = verdicts.iter().map(reason).collect();
        assert_eq!(
            reasons,
            [
                (false, "NoService"),
                (false, "InvalidServiceType"),
                (false, "Malformed"),
                (false, "InvalidAnnotation"),
                (false, "InvalidAnnotation"),
                (true, "Valid"),
            ]
        );
        let broken = &verdicts[2].conditions[0].message;
        assert!(
            broken.contains("spec.exportedLabels"),
            "names the field: {broken}"
        );
        assert!(verdicts[3].conditions[0].message.contains(EXPORT_TO));
    }
}
