//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), strategic merge
//! patch (simplified to a merge patch) and server-side apply (simplified to a merge).

use serde_json::Value;

use crate::error::ApiError;

/// The patch strategies the API server accepts, keyed by `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json`
    Merge,
    /// `application/strategic-merge-patch+json`: treated as a merge patch, so lists are
    /// replaced wholesale and `$patch`/`$setElementOrder` directives are not understood.
    StrategicMerge,
    /// `application/json-patch+json`
    Json,
    /// `application/apply-patch+yaml` (server-side apply). kube sends JSON, which is YAML.
    /// Applied as a merge of the applied configuration onto the live object: field
    /// ownership (`managedFields`) is not tracked, so fields a manager stops applying are
    /// not removed, and conflicts between managers are never reported.
    Apply,
}

impl PatchKind {
    /// Maps a `Content-Type` header to a patch kind.
    pub fn from_content_type(content_type: &str) -> Result<Self, ApiError> {
        let mime = content_type.split(';').next().unwrap_or("").trim();
        match mime {
            "application/merge-patch+json" => Ok(PatchKind::Merge),
            "application/strategic-merge-patch+json" => Ok(PatchKind::StrategicMerge),
            "application/json-patch+json" => Ok(PatchKind::Json),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(PatchKind::Apply),
            other => Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, got {other:?}"
                ),
            )),
        }
    }
}

/// Applies `body` (raw request bytes) of kind `kind` to a copy of `doc`.
pub fn apply_patch(doc: &Value, kind: PatchKind, body: &[u8]) -> Result<Value, ApiError> {
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    let mut out = doc.clone();
    match kind {
        PatchKind::Merge | PatchKind::StrategicMerge => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("merge patch must be a JSON object"));
            }
            json_patch::merge(&mut out, &patch);
        }
        PatchKind::Apply => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("apply patch must be an object"));
            }
            apply_merge(&mut out, &patch);
        }
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch)
                .map_err(|e| ApiError::bad_request(format!("error decoding json patch: {e}")))?;
            json_patch::patch(&mut out, &ops).map_err(|e| {
                ApiError::invalid(format!(
                    "the server rejected our request due to an error in our request: {e}"
                ))
            })?;
        }
    }
    Ok(out)
}

/// Server-side-apply approximation: objects merge recursively, everything else
/// (scalars, lists) is replaced by the applied value. Unlike a merge patch, `null` in
/// the applied configuration is ignored rather than deleting the field.
fn apply_merge(doc: &mut Value, applied: &Value) {
    match (doc, applied) {
        (Value::Object(d), Value::Object(a)) => {
            for (k, v) in a {
                if v.is_null() {
                    continue;
                }
                match d.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        apply_merge(existing, v)
                    }
                    _ => {
                        d.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (doc, applied) => *doc = applied.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_deletes_with_null() {
        let doc = json!({"a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2]});
        let out = apply_patch(&doc, PatchKind::Merge, br#"{"b": {"c": null}, "l": [3]}"#).unwrap();
        assert_eq!(out, json!({"a": 1, "b": {"d": 3}, "l": [3]}));
    }

    #[test]
    fn json_patch_ops_and_failed_test() {
        let doc = json!({"a": 1, "l": [1]});
        let ops = br#"[{"op":"test","path":"/a","value":1},{"op":"add","path":"/l/-","value":2},{"op":"replace","path":"/a","value":5},{"op":"remove","path":"/l/0"}]"#;
        assert_eq!(
            apply_patch(&doc, PatchKind::Json, ops).unwrap(),
            json!({"a": 5, "l": [2]})
        );
        let failing = br#"[{"op":"test","path":"/a","value":2}]"#;
        assert_eq!(
            apply_patch(&doc, PatchKind::Json, failing)
                .unwrap_err()
                .code,
            422
        );
        assert_eq!(
            apply_patch(&doc, PatchKind::Json, b"{").unwrap_err().code,
            400
        );
    }

    #[test]
    fn apply_ignores_null_and_merges_maps() {
        let doc = json!({"m": {"x": 1}, "k": 1});
        let out = apply_patch(&doc, PatchKind::Apply, br#"{"m": {"y": 2}, "k": null}"#).unwrap();
        assert_eq!(out, json!({"m": {"x": 1, "y": 2}, "k": 1}));
    }

    #[test]
    fn content_types() {
        assert_eq!(
            PatchKind::from_content_type("application/merge-patch+json").unwrap(),
            PatchKind::Merge
        );
        assert_eq!(
            PatchKind::from_content_type("application/apply-patch+yaml").unwrap(),
            PatchKind::Apply
        );
        assert_eq!(
            PatchKind::from_content_type("text/plain").unwrap_err().code,
            415
        );
    }
}
