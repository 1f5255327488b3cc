//! The layout keeps the architecture: inside `gateway/src` no file depends on itself
//! through others (the import graph has no cycle), and no component knows the assembly
//! (`app.rs`): only the crate root, the demo and the binary (through the public API) do. A module and its own submodules may refer to
//! each other freely; that is one component, not a cycle. Unit tests (`mod tests`) are
//! left out: what is checked is the code that ships.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path (`["tunnel", "peers"]`) and the file that holds it.
type Modules = BTreeMap<Vec<String>, PathBuf>;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn modules() -> Modules {
    fn walk(dir: &Path, prefix: &[String], out: &mut Modules) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                let mut p = prefix.to_vec();
                p.push(name);
                walk(&path, &p, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let mut p = prefix.to_vec();
                // The crate root is `[]`; the binary is `main`; `x/mod.rs` is `x`.
                if name != "mod" && !(prefix.is_empty() && name == "lib") {
                    p.push(name);
                }
                out.insert(p, path);
            }
        }
    }
    let mut out = Modules::new();
    walk(&src(), &[], &mut out);
    out
}

/// The module a path (`crate::a::b::Item`, already split) refers to: its longest prefix
/// that is a module.
fn resolve(modules: &Modules, path: &[String]) -> Vec<String> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| modules.contains_key(p))
        .unwrap_or_default()
}

/// Paths a file refers to, as module paths, comments left out.
fn references(modules: &Modules, me: &[String], text: &str) -> BTreeSet<Vec<String>> {
    let shipped = text
        .split("#[cfg(test)]\nmod tests {")
        .next()
        .unwrap_or_default()
        .split("#[cfg(test)]\npub(crate) mod tests {")
        .next()
        .unwrap_or_default();
    let code: String = shipped
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    for (at, _) in code
        .match_indices("crate::")
        .chain(code.match_indices("super::"))
    {
        if at > 0 && code[..at].ends_with(ident) {
            continue;
        }
        let rest = &code[at..];
        let mut segs: Vec<String> = Vec::new();
        let mut it = rest.split("::");
        let head = it.next().unwrap_or("");
        for s in it {
            let s: String = s.chars().take_while(|c| ident(*c)).collect();
            if s.is_empty() {
                break;
            }
            segs.push(s);
        }
        let base: Vec<String> = if head == "crate" {
            Vec::new()
        } else {
            // `super` of a module's own file is its parent module.
            me[..me.len().saturating_sub(1)].to_vec()
        };
        let mut full = base;
        full.extend(segs);
        // A `use crate::{a, b::c}` group names several modules.
        if let Some(group) = rest
            .strip_prefix(head)
            .and_then(|r| r.strip_prefix("::{"))
            .and_then(|r| r.split_once('}'))
            .map(|(g, _)| g)
        {
            let base: Vec<String> = if head == "crate" {
                Vec::new()
            } else {
                me[..me.len().saturating_sub(1)].to_vec()
            };
            for item in group.split(',') {
                let mut p = base.clone();
                p.extend(item.split("::").map(|s| s.trim().to_owned()));
                out.insert(resolve(modules, &p));
            }
            continue;
        }
        out.insert(resolve(modules, &full));
    }
    out
}

/// Whether `a` is `b` or one of them contains the other.
fn related(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Component → the components it uses: every file of a top-level module counts for it.
fn graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let modules = modules();
    let root: Vec<String> = Vec::new();
    let app = vec!["app".to_owned()];
    let component = |m: &[String]| m.iter().take(1).cloned().collect::<Vec<_>>();
    let mut out: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (m, path) in modules
        .iter()
        .filter(|(m, _)| m.last().is_none_or(|n| n != "tests"))
    {
        let text = std::fs::read_to_string(path).unwrap();
        let me = component(m);
        let deps: BTreeSet<Vec<String>> = references(&modules, m, &text)
            .into_iter()
            // The crate root re-exports `Gateway` from the assembly.
            .map(|d| {
                if d == root {
                    app.clone()
                } else {
                    component(&d)
                }
            })
            .filter(|d| !related(d, &me) && *d != root)
            .collect();
        out.entry(me).or_default().extend(deps);
    }
    out
}

#[test]
fn inside_the_crate_only_the_demo_knows_the_assembly() {
    let app = vec!["app".to_owned()];
    let knowing: Vec<_> = graph()
        .into_iter()
        .filter(|(_, deps)| deps.contains(&app))
        .map(|(m, _)| m.join("::"))
        .collect();
    assert_eq!(knowing, vec!["demo"], "modules that import app.rs");
}

#[test]
fn the_import_graph_has_no_cycle() {
    let g = graph();
    assert!(g.len() > 12, "found the components: {:?}", g.keys());
    // Depth-first search; a back edge is a cycle.
    fn visit(
        g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        m: &Vec<String>,
        path: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(i) = path.iter().position(|p| p == m) {
            let cycle: Vec<String> = path[i..]
                .iter()
                .chain(std::iter::once(m))
                .map(|p| p.join("::"))
                .collect();
            panic!("import cycle: {}", cycle.join(" -> "));
        }
        path.push(m.clone());
        for d in g.get(m).into_iter().flatten() {
            // Descend to the file that holds it (its module or an ancestor module).
            let target = (0..=d.len())
                .rev()
                .map(|n| d[..n].to_vec())
                .find(|p| g.contains_key(p))
                .unwrap_or_default();
            visit(g, &target, path, done);
        }
        path.pop();
        done.insert(m.clone());
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        visit(&g, m, &mut Vec::new(), &mut done);
    }
}
