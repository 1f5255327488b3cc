//! The manifests in `deploy/kubernetes/` against the Rust side and Kubernetes' schemas:
//!
//! - `base/crds.yaml` is exactly `install::crds_yaml()` (the CRDs of `mcs.rs`);
//! - every manifest file validates with `kubernetes-validate --strict` against the
//!   oldest Kubernetes we support and the one `k8s-openapi` is built for. That tool has
//!   no schema for CRD instances (`ClusterProperty`): those are checked by
//!   deserializing into `mcs::about::ClusterProperty` and comparing the round trip;
//! - each overlay, rendered by `kubectl kustomize`, validates and is the same set of
//!   objects as `install::render` for its cluster;
//! - `install::render` refuses a bad cluster id and says how to fix it.
//!
//! `kubernetes-validate` (PyPI) and `kubectl` must be installed: `scripts/test` installs
//! them. Without them these tests fail, they do not skip.
//!
//! `STRAIT_BLESS=1` rewrites the generated files (`base/crds.yaml`, each overlay's
//! `strait-config.yaml`) instead of comparing them. `KUBECTL=/path/to/kubectl` picks
//! another kubectl (for example an old one, to check its kustomize).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use strait_kubernetes::install::{self, Options};
use strait_kubernetes::mcs::about::ClusterProperty;

/// Oldest supported (mixed-protocol LoadBalancer Services are GA since 1.26), and the
/// version `k8s-openapi` is built for.
const KUBERNETES_VERSIONS: &[&str] = &["1.26.0", "1.34.0"];

/// The overlays: directory (= cluster id) and region.
const OVERLAYS: &[(&str, &str)] = &[
    ("us-east", "us-east-1"),
    ("eu-west", "eu-west-1"),
    ("ap-south", "ap-south-1"),
];

/// Kinds `kubernetes-validate` has no schema for, each checked here instead.
const CUSTOM_KINDS: &[&str] = &["ClusterProperty"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

fn bless() -> bool {
    std::env::var_os("STRAIT_BLESS").is_some_and(|v| v == "1")
}

/// Writes `want` to `path` under `STRAIT_BLESS=1`, else asserts the file holds it.
fn check_generated(path: &Path, want: &str) {
    if bless() {
        std::fs::write(path, want).unwrap();
        return;
    }
    let got = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        got == want,
        "{} is out of date; regenerate it with \
         STRAIT_BLESS=1 cargo test -p strait-kubernetes --test manifests",
        path.display()
    );
}

// ---------------------------------------------------------------------------------------
// Tools

/// Finds `name` on PATH or where pip puts scripts (~/.local/bin, the interpreter's
/// scripts directory, pyenv's shims); fails with what to do when it is nowhere.
fn tool(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    if let Some(home) = &home {
        dirs.push(home.join(".local/bin"));
    }
    let pyenv = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".pyenv")));
    if let Some(pyenv) = pyenv {
        dirs.push(pyenv.join("shims"));
    }
    let scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output();
    if let Ok(out) = scripts {
        dirs.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed (looked on PATH, in ~/.local/bin, pyenv's shims and \
             python3's scripts directory): run scripts/test, which installs it"
            )
        })
}

fn kubectl() -> PathBuf {
    std::env::var_os("KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| tool("kubectl"))
}

/// Runs kubernetes-validate on `files` for every supported Kubernetes version: strict
/// schemas, no errors, and a missing schema only for [`CUSTOM_KINDS`].
fn validate(files: &[PathBuf]) {
    let validator = tool("kubernetes-validate");
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(&validator)
            .args(["--strict", "--kubernetes-version", version])
            .args(files)
            .output()
            .expect("kubernetes-validate runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "kubernetes-validate {version} failed:\n{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with("INFO ")) {
            let custom = line.starts_with("WARN ")
                && line.contains("Couldn't find schema for kind")
                && CUSTOM_KINDS
                    .iter()
                    .any(|k| line.contains(&format!("kind {k} ")));
            assert!(
                custom,
                "kubernetes-validate {version}: unexpected output: {line}"
            );
        }
    }
}

/// Checks the objects `kubernetes-validate` cannot: each must deserialize into its Rust
/// type and serialize back to the same document (no unknown or misspelt fields).
fn check_custom(docs: &[serde_yaml::Value]) -> usize {
    let mut checked = 0;
    for doc in docs.iter().filter(|d| kind(d) == "ClusterProperty") {
        let property: ClusterProperty = serde_yaml::from_value(doc.clone())
            .unwrap_or_else(|e| panic!("not a ClusterProperty ({e}): {doc:?}"));
        let back = serde_yaml::to_value(&property).unwrap();
        assert_eq!(
            canonical(&back),
            canonical(doc),
            "ClusterProperty round trip"
        );
        let name = property.metadata.name.as_deref().unwrap_or_default();
        assert!(
            [
                strait_kubernetes::mcs::about::CLUSTER_ID,
                strait_kubernetes::mcs::about::CLUSTERSET
            ]
            .contains(&name),
            "unexpected ClusterProperty {name}"
        );
        checked += 1;
    }
    checked
}

/// `kubectl kustomize dir`.
fn kustomize(dir: &Path) -> String {
    let out = Command::new(kubectl())
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

// ---------------------------------------------------------------------------------------
// YAML helpers

/// The non-empty documents of a multi-document YAML text.
fn documents(text: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .filter(|v: &serde_yaml::Value| !v.is_null())
        .collect()
}

fn kind(doc: &serde_yaml::Value) -> &str {
    doc.get("kind").and_then(|k| k.as_str()).unwrap_or_default()
}

/// `kind namespace/name` of an object, for messages.
fn id(doc: &serde_yaml::Value) -> String {
    let meta = |key: &str| {
        doc.get("metadata")
            .and_then(|m| m.get(key))
            .and_then(|v| v.as_str())
            .unwrap_or("")
    };
    format!("{} {}/{}", kind(doc), meta("namespace"), meta("name"))
}

/// A document as JSON with sorted keys: equal strings mean equal content.
fn canonical(doc: &serde_yaml::Value) -> String {
    fn convert(v: &serde_yaml::Value) -> serde_json::Value {
        use serde_yaml::Value as Y;
        match v {
            Y::Null => serde_json::Value::Null,
            Y::Bool(b) => (*b).into(),
            // 0.0 and 0 are the same number (serde_yaml and kustomize print floats
            // differently).
            Y::Number(n) => match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 1e15 && !n.is_i64() && !n.is_u64() => {
                    (f as i64).into()
                }
                _ => serde_json::to_value(n).unwrap(),
            },
            Y::String(s) => s.as_str().into(),
            Y::Sequence(items) => items.iter().map(convert).collect(),
            Y::Mapping(map) => {
                let sorted: BTreeMap<String, serde_json::Value> = map
                    .iter()
                    .map(|(k, v)| (k.as_str().expect("string keys").to_owned(), convert(v)))
                    .collect();
                serde_json::to_value(sorted).unwrap()
            }
            Y::Tagged(tagged) => convert(&tagged.value),
        }
    }
    convert(doc).to_string()
}

/// Asserts two sets of objects are equal, ignoring order, naming the objects that differ.
fn assert_same_objects(label: &str, got: &[serde_yaml::Value], want: &[serde_yaml::Value]) {
    let index = |docs: &[serde_yaml::Value]| -> BTreeMap<String, String> {
        let map: BTreeMap<_, _> = docs.iter().map(|d| (id(d), canonical(d))).collect();
        assert_eq!(map.len(), docs.len(), "{label}: an object appears twice");
        map
    };
    let (got, want) = (index(got), index(want));
    let mut problems = Vec::new();
    for (key, value) in &want {
        match got.get(key) {
            None => problems.push(format!("missing {key}")),
            Some(g) if g != value => {
                problems.push(format!("differs {key}: {}", first_difference(g, value)))
            }
            Some(_) => {}
        }
    }
    problems.extend(
        got.keys()
            .filter(|k| !want.contains_key(*k))
            .map(|k| format!("extra {k}")),
    );
    assert!(problems.is_empty(), "{label}:\n{}", problems.join("\n"));
}

/// Where two canonical documents first differ, as a JSON pointer with both values.
fn first_difference(got: &str, want: &str) -> String {
    fn walk(path: String, a: &serde_json::Value, b: &serde_json::Value) -> Option<String> {
        use serde_json::Value as J;
        match (a, b) {
            (J::Object(x), J::Object(y)) => {
                let keys: std::collections::BTreeSet<_> = x.keys().chain(y.keys()).collect();
                keys.into_iter().find_map(|k| {
                    let (va, vb) = (x.get(k).unwrap_or(&J::Null), y.get(k).unwrap_or(&J::Null));
                    walk(format!("{path}/{k}"), va, vb)
                })
            }
            (J::Array(x), J::Array(y)) if x.len() == y.len() => x
                .iter()
                .zip(y)
                .enumerate()
                .find_map(|(i, (va, vb))| walk(format!("{path}/{i}"), va, vb)),
            _ if a == b => None,
            _ => Some(format!("at {path}: kustomize {a}, install::render {b}")),
        }
    }
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
    walk(String::new(), &parse(got), &parse(want)).unwrap_or_default()
}

fn write_temp(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

/// Every `.yaml` file under `dir`, sorted, recursively.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn crds_file_is_generated_from_the_types() {
    check_generated(&root().join("base/crds.yaml"), &install::crds_yaml());
}

/// The overlays' ConfigMap patches carry `install::config` for their cluster.
#[test]
fn overlay_config_patches_are_generated() {
    for (cluster, region) in OVERLAYS {
        let config = install::config(&Options::new(*cluster, *region)).unwrap();
        let indented: String = config.lines().map(|l| format!("    {l}\n")).collect();
        let patch = format!(
            "# The gateway config of cluster {cluster}: the base's, as `strait install --cluster \
             {cluster}\n# --region {region}` writes it. Regenerate with\n\
             # STRAIT_BLESS=1 cargo test -p strait-kubernetes --test manifests\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {}\n  namespace: {}\n\
             data:\n  {}: |\n{indented}",
            install::CONFIG_MAP.0,
            install::NAMESPACE,
            install::CONFIG_MAP.1,
        );
        check_generated(
            &root().join(format!("overlays/{cluster}/strait-config.yaml")),
            &patch,
        );
    }
}

/// Only fields that kustomize v2 (kubectl 1.14 to 1.20) and v5 both understand.
#[test]
fn kustomizations_stay_simple() {
    const KNOWN: &[&str] = &["resources", "bases", "patchesStrategicMerge"];
    let files: Vec<_> = yaml_files(&root())
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "kustomization.yaml"))
        .collect();
    assert_eq!(files.len(), 1 + OVERLAYS.len());
    for file in files {
        let doc: serde_yaml::Mapping =
            serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        for key in doc.keys() {
            let key = key.as_str().unwrap_or_default();
            assert!(
                KNOWN.contains(&key),
                "{}: {key} is not in {KNOWN:?}",
                file.display()
            );
        }
    }
}

/// Every manifest file (not the kustomizations, not the CoreDNS stanza) validates.
#[test]
fn manifest_files_validate() {
    let files: Vec<_> = yaml_files(&root())
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    assert!(
        files.len() >= 9 + 2 * OVERLAYS.len(),
        "found only {files:?}"
    );
    validate(&files);
    let docs: Vec<_> = files
        .iter()
        .flat_map(|f| documents(&std::fs::read_to_string(f).unwrap()))
        .collect();
    assert_eq!(
        check_custom(&docs),
        2 * OVERLAYS.len(),
        "ClusterProperties checked"
    );
}

/// Each overlay renders (kustomize) to what `strait install` prints for its cluster.
#[test]
fn overlays_equal_install_render() {
    for (cluster, region) in OVERLAYS {
        let rendered = kustomize(&root().join("overlays").join(cluster));
        let file = write_temp(&rendered);
        validate(&[file.path().to_owned()]);
        let got = documents(&rendered);
        assert_eq!(check_custom(&got), 2);
        let want = documents(&install::render(&Options::new(*cluster, *region)).unwrap());
        assert_same_objects(
            &format!("overlay {cluster} vs install::render"),
            &got,
            &want,
        );
    }
}

/// The base alone renders too, and `install::render` with every option set validates.
#[test]
fn base_and_custom_render_validate() {
    let base = kustomize(&root().join("base"));
    let base_file = write_temp(&base);
    let mut options = Options::new("lab-1", "lab");
    options.zone = Some("rack-7".into());
    options.clusterset = "lab.example".into();
    options.trust_domain = "lab.example".into();
    options.seeds = vec!["203.0.113.7:4434".into(), "[2001:db8::7]:4434".into()];
    options.image = Some("registry.example/strait:dev".into());
    let rendered = install::render(&options).unwrap();
    let custom_file = write_temp(&rendered);
    validate(&[base_file.path().to_owned(), custom_file.path().to_owned()]);
    assert_eq!(check_custom(&documents(&rendered)), 2);
    assert!(rendered.contains("lab.example"));
}

#[test]
fn bad_cluster_id_is_refused_with_the_fix() {
    for bad in ["US-East", "us_east", "-us-east", "", &"a".repeat(64)] {
        let err = install::render(&Options::new(bad, "us-east-1"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("DNS-1123 label") && err.contains("lowercase letters, digits and '-'"),
            "{bad:?}: {err}"
        );
    }
    let err = install::render(&Options::new("us-east", ""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("region"), "{err}");
}
