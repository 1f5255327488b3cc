//! HTTP routing: maps Kubernetes REST paths and verbs onto [`crate::store::Store`].

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::Shared;
use crate::error::ApiError;
use crate::patch::PatchKind;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{DeleteOptions, ListQuery, Part, PatchRequest, ResId, WatchFilter, WatchQuery};
use crate::watch::{self, WatchSpec};

/// The router serving the whole API.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let line = match uri.query() {
        Some(q) if !q.is_empty() => format!("{method} {}?{q}", uri.path()),
        _ => format!("{method} {}", uri.path()),
    };
    tracing::debug!(request = %line, "fake-kube");
    shared.log_request(line);
    match route(&shared, &method, &uri, &headers, &body) {
        Ok(resp) => resp,
        Err(err) => json_response(err.code, &err.to_status()),
    }
}

fn json_response(code: u16, value: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(value).expect("serialisable");
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Query parameters, last occurrence wins.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(uri: &Uri) -> Self {
        Query(
            form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .into_owned()
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some("true" | "1"))
    }

    fn label(&self) -> Result<LabelSelector, ApiError> {
        LabelSelector::parse(self.get("labelSelector").unwrap_or(""))
    }

    fn field(&self) -> Result<FieldSelector, ApiError> {
        FieldSelector::parse(self.get("fieldSelector").unwrap_or(""))
    }
}

/// A parsed resource URL.
struct Target {
    res: ResId,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn not_found_path() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn route(
    shared: &Arc<Shared>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let segs: Vec<&str> = uri
        .path()
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    if *method == Method::GET {
        match segs.as_slice() {
            ["version"] => return Ok(json_response(200, &version())),
            ["api"] => {
                return Ok(json_response(
                    200,
                    &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}]}),
                ));
            }
            ["apis"] => return Ok(json_response(200, &shared.api_groups())),
            ["api", v] => return Ok(json_response(200, &shared.api_resources("", v)?)),
            ["apis", g, v] => return Ok(json_response(200, &shared.api_resources(g, v)?)),
            _ => {}
        }
    }
    let query = Query::parse(uri);
    if query.get("dryRun").is_some() {
        return Err(ApiError::bad_request(
            "dryRun is not supported by strait-fake-kube",
        ));
    }
    let target = parse_target(shared, &segs)?;
    let t = &target;
    let ns = t.namespace.as_deref();
    let part = if t.status { Part::Status } else { Part::Main };
    match (method.clone(), t.name.as_deref()) {
        (Method::GET, None) if query.flag("watch") => start_watch(shared, t, &query),
        (Method::GET, None) => {
            let q = list_query(&query)?;
            Ok(json_response(200, &shared.store().list(t.res, ns, &q)?))
        }
        (Method::GET, Some(name)) => Ok(json_response(200, &shared.store().get(t.res, ns, name)?)),
        (Method::POST, None) => {
            let obj = parse_body(body)?;
            Ok(json_response(
                201,
                &shared.store().create(t.res, ns, obj, Part::Main)?,
            ))
        }
        (Method::PUT, Some(name)) => {
            let obj = parse_body(body)?;
            Ok(json_response(
                200,
                &shared.store().replace(t.res, ns, name, obj, part)?,
            ))
        }
        (Method::PATCH, Some(name)) => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let kind = PatchKind::from_content_type(content_type)?;
            let req = PatchRequest {
                kind,
                body,
                part,
                field_manager: query.get("fieldManager"),
            };
            let (obj, created) = shared.store().patch(t.res, ns, name, &req)?;
            Ok(json_response(if created { 201 } else { 200 }, &obj))
        }
        (Method::DELETE, Some(name)) if !t.status => {
            let opts = delete_options(&query, body)?;
            Ok(json_response(
                200,
                &shared.store().delete(t.res, ns, name, &opts)?,
            ))
        }
        (Method::DELETE, None) => {
            let opts = delete_options(&query, body)?;
            let q = list_query(&query)?;
            Ok(json_response(
                200,
                &shared.store().delete_collection(t.res, ns, &q, &opts),
            ))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )),
    }
}

/// Resolves `/api/v1/...` or `/apis/{group}/{version}/...` to a resource and object.
fn parse_target(shared: &Shared, segs: &[&str]) -> Result<Target, ApiError> {
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(not_found_path()),
    };
    let (namespace, plural, name, sub) = match rest {
        ["namespaces", ns, sub] if matches!(*sub, "status" | "finalize") => {
            (None, "namespaces", Some(*ns), Some(*sub))
        }
        ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
        ["namespaces", ns, plural, name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
        [plural] => (None, *plural, None, None),
        [plural, name] => (None, *plural, Some(*name), None),
        [plural, name, sub] => (None, *plural, Some(*name), Some(*sub)),
        _ => return Err(not_found_path()),
    };
    let store = shared.store();
    let res = store
        .resource_by_path(group, version, plural)
        .filter(|r| !store.unserved.contains(r))
        .ok_or_else(not_found_path)?;
    let r = &store.resources[res];
    // A namespaced object needs a namespace; a cluster-scoped one must not have one.
    if (namespace.is_some() && !r.namespaced)
        || (r.namespaced && namespace.is_none() && name.is_some())
    {
        return Err(not_found_path());
    }
    let status = match sub {
        None => false,
        Some("status") if r.status_subresource => true,
        Some(_) => return Err(not_found_path()),
    };
    Ok(Target {
        res,
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
        status,
    })
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("the body of the request could not be decoded: {e}"))
    })?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request must be a JSON object",
        ));
    }
    Ok(value)
}

fn list_query(q: &Query) -> Result<ListQuery, ApiError> {
    Ok(ListQuery {
        label: q.label()?,
        field: q.field()?,
        limit: q
            .get("limit")
            .map(|l| {
                l.parse()
                    .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))
            })
            .transpose()?,
        continue_token: q.get("continue").map(str::to_string),
        resource_version: q.get("resourceVersion").map(str::to_string),
        resource_version_match: q.get("resourceVersionMatch").map(str::to_string),
    })
}

fn delete_options(q: &Query, body: &[u8]) -> Result<DeleteOptions, ApiError> {
    let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
    };
    let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    Ok(DeleteOptions {
        propagation_policy: s(body.get("propagationPolicy"))
            .or_else(|| q.get("propagationPolicy").map(str::to_string)),
        precondition_uid: s(body.pointer("/preconditions/uid")),
        precondition_rv: s(body.pointer("/preconditions/resourceVersion")),
    })
}

fn start_watch(shared: &Arc<Shared>, t: &Target, q: &Query) -> Result<Response, ApiError> {
    let filter = WatchFilter {
        namespace: t.namespace.clone(),
        label: q.label()?,
        field: q.field()?,
    };
    let wq = WatchQuery {
        resource_version: q.get("resourceVersion").map(str::to_string),
        resource_version_match: q.get("resourceVersionMatch").map(str::to_string),
        send_initial_events: q.flag("sendInitialEvents"),
        allow_bookmarks: q.flag("allowWatchBookmarks"),
    };
    let timeout = q
        .get("timeoutSeconds")
        .map(|s| {
            s.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {s:?}")))
        })
        .transpose()?
        .filter(|s| *s > 0)
        .map(Duration::from_secs);
    let (tx, rx) = mpsc::channel::<watch::Chunk>(64);
    let (subscription, spec) = {
        let mut store = shared.store();
        let r = &store.resources[t.res];
        let spec = WatchSpec {
            kind: r.kind.clone(),
            api_version: r.api_version(),
            filter: filter.clone(),
            timeout,
            bookmarks: wq.allow_bookmarks,
            bookmark_interval: shared.bookmark_interval(),
        };
        (store.watch(t.res, &filter, &wq), spec)
    };
    match subscription {
        Ok(sub) => {
            tokio::spawn(watch::run(shared.clone(), spec, sub, tx));
        }
        // Like the real server: 200, one ERROR event carrying the 410 Status, end.
        Err(err) if err.code == 410 => {
            tx.try_send(Ok(watch::error_line(&err)))
                .expect("fresh channel has room");
        }
        Err(err) => return Err(err),
    }
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .expect("valid response"))
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0-strait-fake-kube",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

impl Shared {
    /// `GET /apis`: an `APIGroupList` of every registered non-core group.
    fn api_groups(&self) -> Value {
        let store = self.store();
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for r in store.resources.iter().filter(|r| !r.group.is_empty()) {
            match groups.iter_mut().find(|(g, _)| *g == r.group) {
                Some((_, versions)) if !versions.contains(&r.version) => {
                    versions.push(r.version.clone())
                }
                Some(_) => {}
                None => groups.push((r.group.clone(), vec![r.version.clone()])),
            }
        }
        let groups: Vec<Value> = groups
            .into_iter()
            .map(|(name, versions)| {
                let vs: Vec<Value> = versions
                    .iter()
                    .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
                    .collect();
                json!({"name": name, "versions": vs, "preferredVersion": vs[0]})
            })
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    /// `GET /api/v1` or `/apis/{group}/{version}`: an `APIResourceList`.
    fn api_resources(&self, group: &str, version: &str) -> Result<Value, ApiError> {
        let store = self.store();
        let verbs = json!([
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch"
        ]);
        let mut resources = Vec::new();
        for r in store
            .resources
            .iter()
            .filter(|r| r.group == group && r.version == version)
        {
            resources.push(json!({
                "name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
                "kind": r.kind, "verbs": verbs,
            }));
            if r.status_subresource {
                resources.push(json!({
                    "name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
                    "kind": r.kind, "verbs": ["get", "patch", "update"],
                }));
            }
        }
        if resources.is_empty() {
            return Err(not_found_path());
        }
        let group_version = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        Ok(
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
        )
    }
}
