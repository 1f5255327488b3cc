//! Label and field selectors, with the syntax and semantics of `labels.Parse` and
//! `fields.ParseSelector` in apimachinery.

use serde_json::Value;

use crate::error::ApiError;

/// One label requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    /// `key`
    Exists(String),
    /// `!key`
    NotExists(String),
    /// `key=v`, `key==v`, `key in (v1,v2)`
    In(String, Vec<String>),
    /// `key!=v`, `key notin (v1,v2)`: also matches when the label is absent.
    NotIn(String, Vec<String>),
    /// `key>N`
    Gt(String, i64),
    /// `key<N`
    Lt(String, i64),
}

/// A parsed label selector: every requirement must hold (comma means AND).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    reqs: Vec<LabelReq>,
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e,!f,g in (x,y),h notin (z)`; empty matches everything.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let bad = |why: &str| {
            ApiError::bad_request(format!(
                "unable to parse requirement: {why} in selector {s:?}"
            ))
        };
        let mut reqs = Vec::new();
        for term in split_top_level(s) {
            let term = term.trim();
            if term.is_empty() {
                if s.trim().is_empty() {
                    continue;
                }
                return Err(bad("empty requirement"));
            }
            let req = if let Some(key) = term.strip_prefix('!') {
                LabelReq::NotExists(valid_key(key.trim()).ok_or_else(|| bad("invalid key"))?)
            } else if let Some((key, rest)) = split_word_op(term, "notin") {
                LabelReq::NotIn(
                    valid_key(key).ok_or_else(|| bad("invalid key"))?,
                    parse_set(rest).ok_or_else(|| bad("invalid set"))?,
                )
            } else if let Some((key, rest)) = split_word_op(term, "in") {
                LabelReq::In(
                    valid_key(key).ok_or_else(|| bad("invalid key"))?,
                    parse_set(rest).ok_or_else(|| bad("invalid set"))?,
                )
            } else if let Some((key, value)) = term.split_once("!=") {
                LabelReq::NotIn(
                    valid_key(key.trim()).ok_or_else(|| bad("invalid key"))?,
                    vec![value.trim().to_string()],
                )
            } else if let Some((key, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                LabelReq::In(
                    valid_key(key.trim()).ok_or_else(|| bad("invalid key"))?,
                    vec![value.trim().to_string()],
                )
            } else if let Some((key, value)) = term.split_once('>') {
                LabelReq::Gt(
                    valid_key(key.trim()).ok_or_else(|| bad("invalid key"))?,
                    value.trim().parse().map_err(|_| bad("invalid integer"))?,
                )
            } else if let Some((key, value)) = term.split_once('<') {
                LabelReq::Lt(
                    valid_key(key.trim()).ok_or_else(|| bad("invalid key"))?,
                    value.trim().parse().map_err(|_| bad("invalid integer"))?,
                )
            } else {
                LabelReq::Exists(valid_key(term).ok_or_else(|| bad("invalid key"))?)
            };
            reqs.push(req);
        }
        Ok(LabelSelector { reqs })
    }

    /// Whether the selector has no requirements.
    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.reqs.iter().all(|req| match req {
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::In(k, vs) => get(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|v| vs.iter().all(|x| x != v)),
            LabelReq::Gt(k, n) => get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v > *n),
            LabelReq::Lt(k, n) => get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v < *n),
        })
    }
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// Splits `key in (..)` / `key notin (..)` on the whitespace-delimited operator word.
fn split_word_op<'a>(term: &'a str, op: &str) -> Option<(&'a str, &'a str)> {
    let paren = term.find('(')?;
    let head = term[..paren].trim_end();
    let key = head.strip_suffix(op)?;
    if !key.ends_with(char::is_whitespace) {
        return None;
    }
    Some((key.trim(), &term[paren..]))
}

fn parse_set(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(inner.split(',').map(|v| v.trim().to_string()).collect())
}

fn valid_key(key: &str) -> Option<String> {
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    ok.then(|| key.to_string())
}

/// A parsed field selector (`metadata.name=x,metadata.namespace!=y`).
///
/// `metadata.name` and `metadata.namespace` are supported for every resource, as on a
/// real server. Other dotted paths (`spec.nodeName`, `status.phase`, `type`) are looked up
/// generically as strings; a real server only allows a per-type list and answers 400
/// for the rest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    reqs: Vec<(String, bool, String)>,
}

impl FieldSelector {
    /// Parses the selector; empty matches everything.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for term in s.split(',') {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let (field, eq, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{s}'; can't understand '{term}'"
                )));
            };
            reqs.push((field.trim().to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector { reqs })
    }

    /// The name this selector pins with `metadata.name=x`, if any.
    pub fn pinned_name(&self) -> Option<&str> {
        self.reqs
            .iter()
            .find(|(f, eq, _)| *eq && f == "metadata.name")
            .map(|(_, _, v)| v.as_str())
    }

    /// Whether the object satisfies every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs.iter().all(|(field, eq, want)| {
            let pointer = format!("/{}", field.replace('.', "/"));
            let have = match obj.pointer(&pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                _ => String::new(),
            };
            (have == *want) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "n", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn label_selector_operators() {
        let o = obj(json!({"app": "web", "tier": "front", "n": "7"}));
        let yes = [
            "",
            "app=web",
            "app==web",
            "app!=db",
            "missing!=x",
            "app",
            "!missing",
            "app in (db, web)",
            "app notin (db)",
            "missing notin (db)",
            "app=web,tier=front",
            "app in (web,db),tier",
            "n>5",
            "n<8",
        ];
        for s in yes {
            assert!(
                LabelSelector::parse(s).unwrap().matches(&o),
                "{s} should match"
            );
        }
        let no = [
            "app=db",
            "app!=web",
            "missing",
            "!app",
            "app in (db)",
            "app notin (web,db)",
            "missing in (x)",
            "app=web,tier=back",
            "n>7",
        ];
        for s in no {
            assert!(
                !LabelSelector::parse(s).unwrap().matches(&o),
                "{s} should not match"
            );
        }
    }

    #[test]
    fn label_selector_rejects_garbage() {
        assert_eq!(LabelSelector::parse("a=b,,c").unwrap_err().code, 400);
        assert_eq!(LabelSelector::parse("a in x").unwrap_err().code, 400);
        assert_eq!(LabelSelector::parse("n>x").unwrap_err().code, 400);
    }

    #[test]
    fn field_selector() {
        let o = obj(json!({}));
        assert!(FieldSelector::parse("metadata.name=n").unwrap().matches(&o));
        assert!(
            FieldSelector::parse("metadata.name==n,metadata.namespace=ns")
                .unwrap()
                .matches(&o)
        );
        assert!(
            !FieldSelector::parse("metadata.name!=n")
                .unwrap()
                .matches(&o)
        );
        assert!(
            !FieldSelector::parse("metadata.namespace=other")
                .unwrap()
                .matches(&o)
        );
        assert_eq!(
            FieldSelector::parse("metadata.name=x")
                .unwrap()
                .pinned_name(),
            Some("x")
        );
        assert_eq!(FieldSelector::parse("bogus").unwrap_err().code, 400);
    }
}
