//! The Multi-Cluster Services API (`multicluster.x-k8s.io`, KEP-1645) and the About API
//! (`about.k8s.io`, KEP-2149) as Rust types. No maintained crate carries v1beta1, so they
//! are defined here; `strait install` prints their CRDs from these definitions.
//!
//! v1beta1 is what strait writes and prefers to read. v1alpha1 `ServiceExport`s are still
//! read (clusters that installed an older MCS release); their status is written in
//! v1alpha1. `ServiceExport.spec.clusterSelectors` is KEP-5939 (alpha).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::SessionAffinityConfig;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The MCS API group.
pub const GROUP: &str = "multicluster.x-k8s.io";

/// Condition types of a `ServiceExport`.
pub mod condition {
    /// The export names an existing Service of a type that can be exported.
    pub const VALID: &str = "Valid";
    /// The export is in the federated catalog.
    pub const READY: &str = "Ready";
    /// Some property differs from the other clusters' exports of the same service.
    pub const CONFLICT: &str = "Conflict";
}

/// Well-known labels on the EndpointSlices of an imported service (KEP-1645).
pub mod label {
    /// The cluster the endpoints came from.
    pub const SOURCE_CLUSTER: &str = "multicluster.kubernetes.io/source-cluster";
    /// The imported service the slice belongs to.
    pub const SERVICE_NAME: &str = "multicluster.kubernetes.io/service-name";
    /// Who manages a slice (`endpointslice.kubernetes.io/managed-by`).
    pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
}

/// v1beta1: what strait writes and prefers to read.
pub mod v1beta1 {
    use super::*;

    /// Declares that the Service of the same namespace and name may be consumed from
    /// other clusters of the clusterset.
    #[derive(
        CustomResource, Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema,
    )]
    #[kube(
        group = "multicluster.x-k8s.io",
        version = "v1beta1",
        kind = "ServiceExport",
        namespaced,
        status = "ServiceExportStatus",
        shortname = "svcex",
        category = "multicluster"
    )]
    #[serde(rename_all = "camelCase")]
    pub struct ServiceExportSpec {
        /// Labels to put on the derived objects in importing clusters.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub exported_labels: BTreeMap<String, String>,
        /// Annotations to put on the derived objects in importing clusters.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub exported_annotations: BTreeMap<String, String>,
        /// KEP-5939: which clusters' exports an importer prefers, in order. Each selector
        /// matches clusters by their `ClusterProperty` values; the first selector that
        /// matches a healthy cluster wins.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub cluster_selectors: Vec<ClusterSelector>,
    }

    /// KEP-5939: one entry of `clusterSelectors`.
    #[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct ClusterSelector {
        /// `ClusterProperty` name → value; every entry must match. The value
        /// `@SameAsImporter@` matches the importing cluster's own value.
        #[serde(default)]
        pub match_properties: BTreeMap<String, String>,
    }

    /// Status of a `ServiceExport`, written by the gateway.
    #[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct ServiceExportStatus {
        /// `Valid`, `Ready` and `Conflict`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub conditions: Vec<Condition>,
    }

    /// A service imported from the clusterset, written by the gateway in every cluster
    /// that imports it.
    #[derive(
        CustomResource, Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema,
    )]
    #[kube(
        group = "multicluster.x-k8s.io",
        version = "v1beta1",
        kind = "ServiceImport",
        namespaced,
        status = "ServiceImportStatus",
        shortname = "svcim",
        category = "multicluster"
    )]
    #[serde(rename_all = "camelCase")]
    pub struct ServiceImportSpec {
        /// The union of the exporting clusters' ports.
        #[serde(default)]
        pub ports: Vec<ServicePort>,
        /// The clusterset IP (for `ClusterSetIP`): where pods reach the service.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub ips: Vec<String>,
        /// `ClusterSetIP` or `Headless`.
        #[serde(rename = "type")]
        pub type_: ImportType,
        /// `ClientIP` or `None`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub session_affinity: Option<String>,
        /// Session affinity settings.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub session_affinity_config: Option<SessionAffinityConfig>,
    }

    /// How an imported service is addressed.
    #[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
    pub enum ImportType {
        /// One virtual IP for the whole service.
        #[default]
        ClusterSetIP,
        /// One address per endpoint, no virtual IP.
        Headless,
    }

    /// One port of an imported service.
    #[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct ServicePort {
        /// Port name.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        pub name: String,
        /// `TCP` (strait carries TCP).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub protocol: Option<String>,
        /// Application protocol hint.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub app_protocol: Option<String>,
        /// The service port.
        pub port: i32,
    }

    /// Status of a `ServiceImport`.
    #[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct ServiceImportStatus {
        /// The clusters exporting the service.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub clusters: Vec<ClusterStatus>,
        /// KEP-5939: for each of the service's `clusterSelectors`, the clusters it selects.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub cluster_selector_results: Vec<ClusterSelectorResult>,
        /// Conditions.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub conditions: Vec<Condition>,
    }

    /// One exporting cluster.
    #[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
    pub struct ClusterStatus {
        /// Its cluster id.
        pub cluster: String,
    }

    /// KEP-5939: the clusters one selector picked.
    #[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct ClusterSelectorResult {
        /// Index into `clusterSelectors`.
        pub selector: u32,
        /// The clusters it matched.
        #[serde(default)]
        pub clusters: Vec<String>,
    }
}

/// v1alpha1: read for clusters that installed an older MCS release.
pub mod v1alpha1 {
    use super::*;

    /// The v1alpha1 `ServiceExport` (empty spec).
    #[derive(
        CustomResource, Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema,
    )]
    #[kube(
        group = "multicluster.x-k8s.io",
        version = "v1alpha1",
        kind = "ServiceExport",
        namespaced,
        status = "super::v1beta1::ServiceExportStatus"
    )]
    pub struct ServiceExportSpec {}
}

/// The About API: properties of this cluster (`ClusterProperty`, cluster-scoped).
pub mod about {
    use super::*;

    /// The property naming this cluster within its clusterset.
    pub const CLUSTER_ID: &str = "cluster.clusterset.k8s.io";
    /// The property naming the clusterset.
    pub const CLUSTERSET: &str = "clusterset.k8s.io";

    /// One property of this cluster; its name is the property's name.
    #[derive(
        CustomResource, Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema,
    )]
    #[kube(group = "about.k8s.io", version = "v1alpha1", kind = "ClusterProperty")]
    pub struct ClusterPropertySpec {
        /// The value.
        pub value: String,
    }
}

/// The CRDs of the types above: `ServiceExport` (v1beta1 stored, v1alpha1 still served),
/// `ServiceImport` and `ClusterProperty`.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    let exports = kube::core::crd::merge_crds(
        vec![
            v1beta1::ServiceExport::crd(),
            v1alpha1::ServiceExport::crd(),
        ],
        "v1beta1",
    )
    .expect("the two ServiceExport versions describe one kind");
    vec![
        exports,
        v1beta1::ServiceImport::crd(),
        about::ClusterProperty::crd(),
    ]
}
