//! `strait install`: the manifests of one cluster's gateway, as multi-document YAML.
//!
//! The kustomize base in `deploy/kubernetes/base/` is the one source of truth. Its files
//! are compiled in with `include_str!` and printed as they are (comments included),
//! except for two things that depend on the cluster:
//!
//! - the ConfigMap's `strait.yaml`, whose `cluster`, `region`, `zone`, `trust_domain`
//!   and `discovery.seeds` lines are replaced (see [`config`]); the overlays in
//!   `deploy/kubernetes/overlays/` replace the same key with the same text;
//! - the two `ClusterProperty` objects naming the cluster and its clusterset, which the
//!   overlays add as resources.
//!
//! The CRDs come from [`crate::mcs::crds`]; `base/crds.yaml` holds exactly
//! [`crds_yaml`]. `kubernetes/tests/manifests.rs` checks that each overlay, rendered by
//! `kubectl kustomize`, is the same set of objects as [`render`] for its cluster.

use std::collections::BTreeMap;
use strait_common::identity::is_dns_label;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::core::ObjectMeta;

use crate::mcs::about::{CLUSTER_ID, CLUSTERSET, ClusterProperty, ClusterPropertySpec};

/// The image the base deploys, unless [`Options::image`] says otherwise.
pub const DEFAULT_IMAGE: &str = "ghcr.io/strait-dev/strait:0.1.0";
/// The clusterset name when none is given.
pub const DEFAULT_CLUSTERSET: &str = "strait-demo";
/// The SPIFFE trust domain when none is given.
pub const DEFAULT_TRUST_DOMAIN: &str = "strait.example";
/// The namespace everything runs in.
pub const NAMESPACE: &str = "strait-system";
/// The ConfigMap holding the gateway's config, and its key.
pub const CONFIG_MAP: (&str, &str) = ("strait-config", "strait.yaml");

/// Each base file's name and text, compiled in.
macro_rules! base_files {
    ($($file:literal),* $(,)?) => {
        &[$(($file, include_str!(concat!("../../deploy/kubernetes/base/", $file)))),*]
    };
}

/// The resources of `deploy/kubernetes/base/kustomization.yaml`, in its order, with
/// their text (a unit test checks the list against the kustomization).
const BASE: &[(&str, &str)] = base_files![
    "crds.yaml",
    "namespace.yaml",
    "serviceaccount.yaml",
    "rbac.yaml",
    "configmap.yaml",
    "deployment.yaml",
    "service.yaml",
    "pdb.yaml",
    "networkpolicy.yaml",
];

/// What makes one cluster's manifests differ from another's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The cluster id: a DNS-1123 label, unique in the clusterset (`us-east`).
    pub cluster: String,
    /// The region the cluster runs in (`us-east-1`), used for locality-aware routing.
    pub region: String,
    /// The zone; `None` means the region followed by `a` (`us-east-1a`).
    pub zone: Option<String>,
    /// The clusterset's name, published as the `clusterset.k8s.io` ClusterProperty.
    pub clusterset: String,
    /// The SPIFFE trust domain of the gateways' certificates.
    pub trust_domain: String,
    /// Gossip addresses of other clusters' gateways (`host:4434`) to join through.
    pub seeds: Vec<String>,
    /// The gateway image; `None` keeps [`DEFAULT_IMAGE`].
    pub image: Option<String>,
}

impl Options {
    /// Options for `cluster` in `region`, everything else at its default.
    pub fn new(cluster: impl Into<String>, region: impl Into<String>) -> Self {
        Options {
            cluster: cluster.into(),
            region: region.into(),
            zone: None,
            clusterset: DEFAULT_CLUSTERSET.to_owned(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            seeds: Vec::new(),
            image: None,
        }
    }

    /// The zone, defaulted from the region.
    pub fn zone(&self) -> String {
        self.zone
            .clone()
            .unwrap_or_else(|| format!("{}a", self.region))
    }

    /// Checks every option, with an error that says how to fix the first bad one.
    pub fn validate(&self) -> Result<()> {
        if !is_dns_label(&self.cluster) {
            bail!(
                "cluster id {:?} is not a DNS-1123 label: use 1 to 63 lowercase letters, digits \
                 and '-', starting and ending with a letter or digit (for example \"us-east\")",
                self.cluster
            );
        }
        ensure!(
            is_plain_word(&self.region),
            "region {:?} must be non-empty, without spaces or control characters (for example \
             \"us-east-1\")",
            self.region
        );
        let zone = self.zone();
        ensure!(
            is_plain_word(&zone),
            "zone {zone:?} must be non-empty, without spaces or control characters (for example \
             \"us-east-1a\"), or left out to default to the region followed by 'a'"
        );
        ensure!(
            is_dns_subdomain(&self.clusterset),
            "clusterset {:?} is not a DNS-1123 subdomain: use lowercase letters, digits, '-' and \
             '.' (for example \"{DEFAULT_CLUSTERSET}\")",
            self.clusterset
        );
        ensure!(
            !self.trust_domain.is_empty()
                && self.trust_domain.len() <= 255
                && self.trust_domain.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)
                }),
            "trust domain {:?} is not a SPIFFE trust domain: use lowercase letters, digits, '-', \
             '.' and '_' (for example \"{DEFAULT_TRUST_DOMAIN}\")",
            self.trust_domain
        );
        for seed in &self.seeds {
            check_seed(seed)?;
        }
        if let Some(image) = &self.image {
            ensure!(
                is_plain_word(image),
                "image {image:?} must be non-empty, without spaces (for example \
                 \"{DEFAULT_IMAGE}\")"
            );
        }
        Ok(())
    }
}

/// The CRDs of [`crate::mcs::crds`] as multi-document YAML, with a header; this is
/// exactly the content of `deploy/kubernetes/base/crds.yaml`.
pub fn crds_yaml() -> String {
    let mut out = String::from(
        "# Generated from kubernetes/src/mcs.rs (strait_kubernetes::install::crds_yaml); do not\n\
         # edit. Regenerate: STRAIT_BLESS=1 cargo test -p strait-kubernetes --test manifests\n",
    );
    for (i, crd) in crate::mcs::crds().iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml::to_string(crd).expect("a CRD serializes to YAML"));
    }
    out
}

/// The gateway config (`strait.yaml`) for a cluster: the base's, with the cluster's
/// values on the `cluster`, `region`, `zone`, `trust_domain` and `discovery.seeds`
/// lines. Comments and every other line stay as they are in the base.
pub fn config(options: &Options) -> Result<String> {
    options.validate()?;
    let base = base_config_map()?;
    let text = base_config_text(&base)?;
    let seeds = serde_json::to_string(&options.seeds).context("seeds serialize")?;
    let mut text = text.to_owned();
    for (indent, key, value) in [
        ("", "cluster", scalar(&options.cluster)),
        ("", "region", scalar(&options.region)),
        ("", "zone", scalar(&options.zone())),
        ("", "trust_domain", scalar(&options.trust_domain)),
        // JSON is YAML: quoted strings never need more thought.
        ("  ", "seeds", seeds),
    ] {
        text = set_value(&text, indent, key, &value)?;
    }
    check_config(&text, options)?;
    Ok(text)
}

/// All manifests of one cluster's gateway, as multi-document YAML: the CRDs, the base
/// with this cluster's config (and image, if given), and its `ClusterProperty`s. The
/// same objects as `kubectl kustomize deploy/kubernetes/overlays/<cluster>` for the
/// overlays' clusters.
pub fn render(options: &Options) -> Result<String> {
    let config = config(options)?;
    let header = format!(
        "# strait gateway of cluster {} ({}), clusterset {}: apply with `kubectl apply -f`.\n\
         # On a fresh cluster apply twice: the ClusterProperties need their CRD established.\n",
        options.cluster, options.region, options.clusterset
    );
    let mut docs = vec![header + &crds_yaml()];
    for (file, text) in BASE {
        match *file {
            // Generated from the Rust types; the file holds the same text.
            "crds.yaml" => {}
            "configmap.yaml" => {
                let mut map = base_config_map()?;
                map.data
                    .get_or_insert_with(BTreeMap::new)
                    .insert(CONFIG_MAP.1.to_owned(), config.clone());
                docs.push(serde_yaml::to_string(&map).context("the ConfigMap serializes")?);
            }
            "deployment.yaml" => docs.push(with_image(text, options.image.as_deref())?),
            _ => docs.push((*text).to_owned()),
        }
    }
    for (name, value) in [
        (CLUSTER_ID, &options.cluster),
        (CLUSTERSET, &options.clusterset),
    ] {
        docs.push(serde_yaml::to_string(&cluster_property(name, value)).context("serialize")?);
    }
    Ok(docs.join("---\n"))
}

/// A `ClusterProperty` as the overlays write it.
fn cluster_property(name: &str, value: &str) -> ClusterProperty {
    let mut property = ClusterProperty::new(
        name,
        ClusterPropertySpec {
            value: value.to_owned(),
        },
    );
    property.metadata = ObjectMeta {
        name: Some(name.to_owned()),
        labels: Some(BTreeMap::from([(
            "app.kubernetes.io/part-of".to_owned(),
            "strait".to_owned(),
        )])),
        ..ObjectMeta::default()
    };
    property
}

/// The base's ConfigMap.
fn base_config_map() -> Result<ConfigMap> {
    let text = base_file("configmap.yaml");
    serde_yaml::from_str(text).context("deploy/kubernetes/base/configmap.yaml is a ConfigMap")
}

/// The config text in a ConfigMap.
fn base_config_text(map: &ConfigMap) -> Result<&str> {
    map.data
        .as_ref()
        .and_then(|data| data.get(CONFIG_MAP.1))
        .map(String::as_str)
        .with_context(|| format!("the base ConfigMap has no {} key", CONFIG_MAP.1))
}

/// A base file's text by name.
fn base_file(name: &str) -> &'static str {
    BASE.iter()
        .find(|(file, _)| *file == name)
        .map(|(_, text)| *text)
        .unwrap_or_else(|| panic!("{name} is a base file"))
}

/// The Deployment's text with `image` in place of [`DEFAULT_IMAGE`].
fn with_image(deployment: &str, image: Option<&str>) -> Result<String> {
    let Some(image) = image else {
        return Ok(deployment.to_owned());
    };
    let old = format!("image: {DEFAULT_IMAGE}\n");
    ensure!(
        deployment.matches(&old).count() == 1,
        "deploy/kubernetes/base/deployment.yaml must name the image {DEFAULT_IMAGE} once"
    );
    Ok(deployment.replace(&old, &format!("image: {}\n", scalar(image))))
}

/// Replaces the value of the one line `{indent}{key}: value  # comment` in `text`,
/// keeping its comment. Exactly one such line must exist.
fn set_value(text: &str, indent: &str, key: &str, value: &str) -> Result<String> {
    let prefix = format!("{indent}{key}:");
    let mut found = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|line| match line.strip_prefix(&prefix) {
            Some(rest) if rest.is_empty() || rest.starts_with(' ') => {
                found += 1;
                // The comment with the blanks before it, as they were.
                let comment = rest
                    .find(" #")
                    .map_or("", |at| &rest[rest[..at].trim_end().len()..]);
                format!("{prefix} {value}{comment}")
            }
            _ => line.to_owned(),
        })
        .collect();
    ensure!(
        found == 1,
        "the base strait.yaml must have exactly one line starting {prefix:?}, found {found}"
    );
    let mut out = lines.join("\n");
    if text.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

/// Parses the substituted config back and checks it says what was asked: catches a
/// base whose lines are not shaped as [`set_value`] expects, and any quoting mistake.
fn check_config(text: &str, options: &Options) -> Result<()> {
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).context("the rendered strait.yaml is YAML")?;
    let get = |path: &[&str]| {
        path.iter()
            .try_fold(&value, |v, key| v.get(key))
            .cloned()
            .unwrap_or_default()
    };
    let string = |s: &str| serde_yaml::Value::String(s.to_owned());
    let seeds = serde_yaml::Value::Sequence(options.seeds.iter().map(|s| string(s)).collect());
    for (path, want) in [
        (&["cluster"][..], string(&options.cluster)),
        (&["region"], string(&options.region)),
        (&["zone"], string(&options.zone())),
        (&["trust_domain"], string(&options.trust_domain)),
        (&["discovery", "seeds"], seeds),
    ] {
        let got = get(path);
        ensure!(
            got == want,
            "strait.yaml {}: rendered {got:?}, wanted {want:?}",
            path.join(".")
        );
    }
    Ok(())
}

/// `s` as a YAML scalar that reads back as the string `s`: plain when that is safe,
/// JSON-quoted otherwise (`1`, `true`, `a: b` and the like).
fn scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._/:@".contains(&b))
        && !s.starts_with(['-', '.', ':', '@'])
        && serde_yaml::from_str::<serde_yaml::Value>(s).ok()
            == Some(serde_yaml::Value::String(s.to_owned()));
    if plain {
        s.to_owned()
    } else {
        serde_json::Value::String(s.to_owned()).to_string()
    }
}

/// A seed is `host:port` (IPv6 hosts in brackets).
fn check_seed(seed: &str) -> Result<()> {
    // `discovery.seeds` are socket addresses: a load balancer known only by host name
    // needs its address looked up first.
    ensure!(
        seed.parse::<std::net::SocketAddr>().is_ok(),
        "seed {seed:?} is not an ip:port: give each seed as an IP address and port, for example 203.0.113.7:4434 (look a host name up first)"
    );
    Ok(())
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 bytes.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Non-empty, printable, no whitespace.
fn is_plain_word(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| !c.is_whitespace() && !c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_list_is_the_kustomization() {
        #[derive(serde::Deserialize)]
        struct Kustomization {
            resources: Vec<String>,
        }
        let k: Kustomization = serde_yaml::from_str(include_str!(
            "../../deploy/kubernetes/base/kustomization.yaml"
        ))
        .unwrap();
        let ours: Vec<&str> = BASE.iter().map(|(file, _)| *file).collect();
        assert_eq!(
            k.resources, ours,
            "keep install::BASE in step with the kustomization"
        );
    }

    #[test]
    fn config_substitutes_and_keeps_comments() {
        let mut options = Options::new("eu-west", "eu-west-1");
        options.seeds = vec!["203.0.113.7:4434".into(), "[2001:db8::1]:4434".into()];
        let text = config(&options).unwrap();
        assert!(text.starts_with("cluster: eu-west\nregion: eu-west-1\nzone: eu-west-1a\n"));
        assert!(text.contains(
            "  seeds: [\"203.0.113.7:4434\",\"[2001:db8::1]:4434\"]  # the other clusters'"
        ));
    }

    #[test]
    fn scalars_read_back_as_strings() {
        for s in [
            "us-east-1",
            "1",
            "true",
            "null",
            "a: b",
            "x #y",
            "-a",
            "0x10",
            "ghcr.io/a/b:1",
        ] {
            let back: serde_yaml::Value = serde_yaml::from_str(&scalar(s)).unwrap();
            assert_eq!(back, serde_yaml::Value::String(s.into()), "{s}");
        }
        assert_eq!(scalar("us-east-1"), "us-east-1");
    }

    #[test]
    fn image_is_replaced() {
        let mut options = Options::new("us-east", "us-east-1");
        options.image = Some("registry.example/strait:dev".into());
        let out = render(&options).unwrap();
        assert!(out.contains("image: registry.example/strait:dev\n"));
        assert!(!out.contains(DEFAULT_IMAGE));
    }

    #[test]
    fn bad_options_say_how_to_fix_them() {
        let bad = |f: fn(&mut Options)| {
            let mut options = Options::new("us-east", "us-east-1");
            f(&mut options);
            render(&options).unwrap_err().to_string()
        };
        assert!(bad(|o| o.region.clear()).contains("us-east-1"));
        assert!(bad(|o| o.seeds = vec!["10.0.0.1".into()]).contains("ip:port"));
        assert!(bad(|o| o.seeds = vec!["gw.example:4434".into()]).contains("look a host name up"));
        assert!(bad(|o| o.trust_domain = "Strait.Example".into()).contains("lowercase"));
        assert!(bad(|o| o.clusterset = "demo set".into()).contains("subdomain"));
    }
}
