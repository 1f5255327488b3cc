//! The object store: registered resources, objects, the global resourceVersion counter,
//! the watch-event history, watch subscribers, type-specific defaulting (Services,
//! Namespaces), finalizers and owner-reference garbage collection.
//!
//! Every operation here has the semantics of the corresponding API server verb; the HTTP
//! layer ([`crate::http`]) only parses requests and serialises results.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};

use crate::error::ApiError;
use crate::patch::{PatchKind, apply_patch};
use crate::selector::{FieldSelector, LabelSelector};

/// A resource type the fake serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// API group; empty for the core group (`/api/v1`).
    pub group: String,
    /// API version (`v1`, `v1beta1`).
    pub version: String,
    /// Kind (`Service`).
    pub kind: String,
    /// Plural used in URLs (`services`).
    pub plural: String,
    /// Namespaced (`true`) or cluster-scoped.
    pub namespaced: bool,
    /// Whether `.status` is a subresource: writes to the main resource then ignore
    /// `.status`, and writes to `/status` change only `.status`.
    pub status_subresource: bool,
}

impl Resource {
    /// Builds a resource description.
    pub fn new(
        group: &str,
        version: &str,
        kind: &str,
        plural: &str,
        namespaced: bool,
        status_subresource: bool,
    ) -> Self {
        Resource {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
            status_subresource,
        }
    }

    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// The resources registered in every [`crate::FakeApi`].
///
/// The two multicluster.x-k8s.io versions are stored separately: there is no conversion
/// between them, so an object created as v1alpha1 is not visible as v1beta1.
pub fn default_resources() -> Vec<Resource> {
    vec![
        Resource::new("", "v1", "Namespace", "namespaces", false, true),
        Resource::new("", "v1", "Service", "services", true, true),
        Resource::new("", "v1", "Pod", "pods", true, true),
        Resource::new("", "v1", "ConfigMap", "configmaps", true, false),
        Resource::new(
            "discovery.k8s.io",
            "v1",
            "EndpointSlice",
            "endpointslices",
            true,
            false,
        ),
        Resource::new("coordination.k8s.io", "v1", "Lease", "leases", true, false),
        Resource::new(
            "multicluster.x-k8s.io",
            "v1beta1",
            "ServiceExport",
            "serviceexports",
            true,
            true,
        ),
        Resource::new(
            "multicluster.x-k8s.io",
            "v1beta1",
            "ServiceImport",
            "serviceimports",
            true,
            true,
        ),
        Resource::new(
            "multicluster.x-k8s.io",
            "v1alpha1",
            "ServiceExport",
            "serviceexports",
            true,
            true,
        ),
        Resource::new(
            "multicluster.x-k8s.io",
            "v1alpha1",
            "ServiceImport",
            "serviceimports",
            true,
            true,
        ),
        Resource::new(
            "about.k8s.io",
            "v1alpha1",
            "ClusterProperty",
            "clusterproperties",
            false,
            false,
        ),
    ]
}

/// Index of a resource in [`Store::resources`].
pub(crate) type ResId = usize;
/// `(resource, namespace or "", name)`: sorts like etcd keys.
type Key = (ResId, String, String);

/// Watch event types stored in history (bookmarks and errors are synthesised per watch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One write, as kept in history and fanned out to watches.
#[derive(Debug)]
pub(crate) struct Event {
    pub res: ResId,
    pub ty: EventType,
    pub rv: u64,
    /// The object after the write (for DELETED: the last state, with the deletion's rv).
    pub object: Value,
    /// The object before the write (MODIFIED only), to detect selector transitions.
    pub old: Option<Value>,
}

/// Which part of an object a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// The main resource: `.status` is preserved when it is a subresource.
    Main,
    /// The `/status` subresource: only `.status` changes.
    Status,
    /// Everything (test-helper writes).
    All,
}

/// Query parameters of a list.
#[derive(Debug, Default, Clone)]
pub(crate) struct ListQuery {
    pub label: LabelSelector,
    pub field: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
}

/// Query parameters of a watch.
#[derive(Debug, Default, Clone)]
pub(crate) struct WatchQuery {
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
    pub send_initial_events: bool,
    pub allow_bookmarks: bool,
}

/// A PATCH request's body and options.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PatchRequest<'a> {
    pub kind: PatchKind,
    pub body: &'a [u8],
    pub part: Part,
    pub field_manager: Option<&'a str>,
}

/// `DeleteOptions` the fake honours.
#[derive(Debug, Default, Clone)]
pub(crate) struct DeleteOptions {
    pub propagation_policy: Option<String>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
}

/// Which objects a watch wants, and how to translate stored events for it.
#[derive(Debug, Clone)]
pub(crate) struct WatchFilter {
    pub namespace: Option<String>,
    pub label: LabelSelector,
    pub field: FieldSelector,
}

impl WatchFilter {
    fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && obj.pointer("/metadata/namespace").and_then(Value::as_str) != Some(ns.as_str())
        {
            return false;
        }
        self.label.matches(obj) && self.field.matches(obj)
    }

    /// What this watch sees of `ev`: like the real watch cache, an object that stops
    /// matching is sent as DELETED (its previous state at the new rv) and one that starts
    /// matching as ADDED.
    pub(crate) fn translate(&self, ev: &Event) -> Option<(EventType, Value)> {
        let now = self.matches(&ev.object);
        match ev.ty {
            EventType::Added | EventType::Deleted => now.then(|| (ev.ty, ev.object.clone())),
            EventType::Modified => {
                let before = ev.old.as_ref().is_some_and(|o| self.matches(o));
                match (before, now) {
                    (true, true) => Some((EventType::Modified, ev.object.clone())),
                    (false, true) => Some((EventType::Added, ev.object.clone())),
                    (true, false) => {
                        let mut old = ev.old.clone().unwrap_or_default();
                        set_rv(&mut old, ev.rv);
                        Some((EventType::Deleted, old))
                    }
                    (false, false) => None,
                }
            }
        }
    }
}

/// A registered watch: what to send first, then live events on `rx`.
pub(crate) struct Subscription {
    /// Events to send before live ones (replayed history or current state).
    pub initial: Vec<(EventType, Value)>,
    /// With `sendInitialEvents`: the rv of the `k8s.io/initial-events-end` bookmark.
    pub initial_end_rv: Option<u64>,
    /// Live events of this resource type (unfiltered; apply [`WatchFilter::translate`]).
    pub rx: mpsc::UnboundedReceiver<Arc<Event>>,
}

struct Subscriber {
    res: ResId,
    tx: mpsc::UnboundedSender<Arc<Event>>,
}

const FIRST_CLUSTER_IP: u32 = u32::from_be_bytes([10, 96, 0, 10]);
const CLUSTER_IP_MIN: u32 = u32::from_be_bytes([10, 96, 0, 1]);
const CLUSTER_IP_MAX: u32 = u32::from_be_bytes([10, 96, 255, 254]);
const NODE_PORT_MIN: u16 = 30000;
const NODE_PORT_MAX: u16 = 32767;

/// The in-memory API server state.
pub(crate) struct Store {
    pub resources: Vec<Resource>,
    objects: BTreeMap<Key, Value>,
    /// The global resourceVersion: the rv of the last write.
    pub rv: u64,
    history: VecDeque<Arc<Event>>,
    /// Watches and continue tokens from an rv `>= oldest_rv` can be served; older get 410.
    oldest_rv: u64,
    max_history: usize,
    subscribers: Vec<Subscriber>,
    cluster_ips: BTreeSet<u32>,
    next_cluster_ip: u32,
    node_ports: BTreeSet<u16>,
    /// Bumped (to the current rv) on every write, for `wait_until`.
    changed: watch::Sender<u64>,
    /// Resources whose HTTP paths answer 404, as on a server whose CRD lacks that version.
    pub unserved: BTreeSet<ResId>,
}

impl Store {
    /// An empty store with the default resources and the `default` and `kube-system`
    /// namespaces.
    pub fn new() -> Self {
        let (changed, _) = watch::channel(0);
        let mut store = Store {
            resources: default_resources(),
            unserved: BTreeSet::new(),
            objects: BTreeMap::new(),
            rv: 0,
            history: VecDeque::new(),
            oldest_rv: 0,
            max_history: 100_000,
            subscribers: Vec::new(),
            cluster_ips: BTreeSet::new(),
            next_cluster_ip: FIRST_CLUSTER_IP,
            node_ports: BTreeSet::new(),
            changed,
        };
        let ns = store.namespaces_res();
        for name in ["default", "kube-system"] {
            store
                .create(ns, None, json!({"metadata": {"name": name}}), Part::Main)
                .expect("pre-create namespace");
        }
        store
    }

    /// A receiver bumped on every write.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Registers (or replaces, by group/version/plural) a resource.
    pub fn register(&mut self, res: Resource) -> ResId {
        if let Some(id) = self.resource_by_path(&res.group, &res.version, &res.plural) {
            self.resources[id] = res;
            id
        } else {
            self.resources.push(res);
            self.resources.len() - 1
        }
    }

    pub fn resource_by_path(&self, group: &str, version: &str, plural: &str) -> Option<ResId> {
        self.resources
            .iter()
            .position(|r| r.group == group && r.version == version && r.plural == plural)
    }

    pub fn resource_by_kind(&self, api_version: &str, kind: &str) -> Option<ResId> {
        self.resources
            .iter()
            .position(|r| r.api_version() == api_version && r.kind == kind)
    }

    fn namespaces_res(&self) -> ResId {
        self.resource_by_path("", "v1", "namespaces")
            .expect("namespaces registered")
    }

    fn key(&self, res: ResId, ns: Option<&str>, name: &str) -> Key {
        let ns = if self.resources[res].namespaced {
            ns.unwrap_or("default")
        } else {
            ""
        };
        (res, ns.to_string(), name.to_string())
    }

    fn not_found(&self, res: ResId, name: &str) -> ApiError {
        let r = &self.resources[res];
        ApiError::not_found(&r.group, &r.plural, name)
    }

    // ---------------------------------------------------------------- reads

    /// GET one object.
    pub fn get(&self, res: ResId, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&self.key(res, ns, name))
            .cloned()
            .ok_or_else(|| self.not_found(res, name))
    }

    /// Objects of `res` (in `ns`, or all namespaces), in key order.
    fn iter_res<'a>(
        &'a self,
        res: ResId,
        ns: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a Key, &'a Value)> + 'a {
        let namespaced = self.resources[res].namespaced;
        self.objects
            .range((res, String::new(), String::new())..)
            .take_while(move |(k, _)| k.0 == res)
            .filter(move |(k, _)| !namespaced || ns.is_none_or(|ns| k.1 == ns))
    }

    /// Every object of `res` in `ns` (or all namespaces), unfiltered.
    pub fn objects_of(&self, res: ResId, ns: Option<&str>) -> Vec<Value> {
        self.iter_res(res, ns).map(|(_, v)| v.clone()).collect()
    }

    /// LIST, with selectors, pagination and resourceVersion semantics.
    pub fn list(&self, res: ResId, ns: Option<&str>, q: &ListQuery) -> Result<Value, ApiError> {
        let r = &self.resources[res];
        let (list_rv, after) = match &q.continue_token {
            Some(token) if !token.is_empty() => {
                let (rv, ns, name) = decode_continue(token).ok_or_else(|| {
                    ApiError::bad_request(format!("invalid continue token {token:?}"))
                })?;
                if rv < self.oldest_rv {
                    return Err(ApiError::expired(
                        "The provided continue parameter is too old to display a consistent list result. \
                         You can start a new list without the continue parameter.",
                    ));
                }
                (rv, Some((ns, name)))
            }
            _ => {
                if let Some(rv) = q.resource_version.as_deref().filter(|rv| !rv.is_empty()) {
                    let rv: u64 = rv.parse().map_err(|_| {
                        ApiError::bad_request(format!("invalid resource version {rv:?}"))
                    })?;
                    if q.resource_version_match.as_deref() == Some("Exact")
                        && rv != self.rv
                        && rv < self.oldest_rv
                    {
                        return Err(ApiError::expired(format!(
                            "too old resource version: {rv} ({})",
                            self.oldest_rv
                        )));
                    }
                }
                (self.rv, None)
            }
        };
        let mut items = self
            .iter_res(res, ns)
            .filter(|(k, _)| {
                after
                    .as_ref()
                    .is_none_or(|(ans, aname)| (&k.1, &k.2) > (ans, aname))
            })
            .filter(|(_, o)| q.label.matches(o) && q.field.matches(o))
            .map(|(k, o)| (k.clone(), o.clone()));
        let mut page: Vec<(Key, Value)> = match q.limit {
            Some(limit) if limit > 0 => items.by_ref().take(limit).collect(),
            _ => items.by_ref().collect(),
        };
        let remaining = items.count();
        let mut metadata = json!({"resourceVersion": list_rv.to_string()});
        if remaining > 0
            && let Some((last, _)) = page.last()
        {
            metadata["continue"] = encode_continue(list_rv, &last.1, &last.2).into();
            metadata["remainingItemCount"] = remaining.into();
        }
        Ok(json!({
            "kind": format!("{}List", r.kind),
            "apiVersion": r.api_version(),
            "metadata": metadata,
            "items": page.drain(..).map(|(_, o)| o).collect::<Vec<_>>(),
        }))
    }

    // ---------------------------------------------------------------- watch

    /// Registers a watch and computes what it must send first.
    ///
    /// Unset or `"0"` resourceVersion, or `sendInitialEvents=true`: synthetic ADDED
    /// events for the current state. Otherwise: history replay after the given rv, or
    /// `410 Expired` if that rv is older than the kept history.
    pub fn watch(
        &mut self,
        res: ResId,
        filter: &WatchFilter,
        q: &WatchQuery,
    ) -> Result<Subscription, ApiError> {
        if q.send_initial_events {
            if q.resource_version_match.as_deref() != Some("NotOlderThan") {
                return Err(ApiError::invalid(
                    "sendInitialEvents is forbidden for watch unless resourceVersionMatch is set to NotOlderThan",
                ));
            }
            if !q.allow_bookmarks {
                return Err(ApiError::invalid(
                    "sendInitialEvents requires setting allowWatchBookmarks to true",
                ));
            }
        }
        let rv = q
            .resource_version
            .as_deref()
            .filter(|rv| !rv.is_empty() && *rv != "0");
        let rv = rv
            .map(|rv| {
                rv.parse::<u64>()
                    .map_err(|_| ApiError::bad_request(format!("invalid resource version {rv:?}")))
            })
            .transpose()?;
        let (initial, initial_end_rv) = match rv {
            _ if q.send_initial_events => (self.current_state(res, filter), Some(self.rv)),
            None => (self.current_state(res, filter), None),
            Some(rv) => {
                if rv < self.oldest_rv {
                    return Err(ApiError::expired(format!(
                        "too old resource version: {rv} ({})",
                        self.oldest_rv
                    )));
                }
                let replay = self
                    .history
                    .iter()
                    .filter(|e| e.res == res && e.rv > rv)
                    .filter_map(|e| filter.translate(e))
                    .collect();
                (replay, None)
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.push(Subscriber { res, tx });
        Ok(Subscription {
            initial,
            initial_end_rv,
            rx,
        })
    }

    fn current_state(&self, res: ResId, filter: &WatchFilter) -> Vec<(EventType, Value)> {
        self.iter_res(res, filter.namespace.as_deref())
            .filter(|(_, o)| filter.matches(o))
            .map(|(_, o)| (EventType::Added, o.clone()))
            .collect()
    }

    /// Ends every open watch (their streams see their channel close).
    pub fn close_watches(&mut self) {
        self.subscribers.clear();
    }

    /// Forgets the event history: watches and continue tokens from any rv older than
    /// the current one now get `410 Expired`. Open watches are not affected.
    pub fn compact(&mut self) {
        self.history.clear();
        self.oldest_rv = self.rv;
    }

    // ---------------------------------------------------------------- writes

    /// Records a write: history, live watches, change notification.
    fn record(&mut self, ev: Event) {
        let ev = Arc::new(ev);
        self.history.push_back(ev.clone());
        while self.history.len() > self.max_history {
            if let Some(e) = self.history.pop_front() {
                self.oldest_rv = e.rv;
            }
        }
        self.subscribers
            .retain(|s| s.res != ev.res || s.tx.send(ev.clone()).is_ok());
        self.changed.send_replace(self.rv);
    }

    /// Stores `obj` under a fresh rv and records the event.
    fn commit(&mut self, key: Key, mut obj: Value, ty: EventType, old: Option<Value>) -> Value {
        self.rv += 1;
        set_rv(&mut obj, self.rv);
        if ty == EventType::Deleted {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key.clone(), obj.clone());
        }
        self.record(Event {
            res: key.0,
            ty,
            rv: self.rv,
            object: obj.clone(),
            old,
        });
        obj
    }

    /// CREATE (POST). With [`Part::All`], `.status` in the body is kept even when it is a
    /// subresource (test setup); otherwise it is dropped, as the real server does.
    pub fn create(
        &mut self,
        res: ResId,
        ns: Option<&str>,
        body: Value,
        part: Part,
    ) -> Result<Value, ApiError> {
        let r = self.resources[res].clone();
        let mut obj = body;
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        check_type(&r, &mut obj)?;
        let meta = metadata_mut(&mut obj);
        if meta
            .get("resourceVersion")
            .and_then(Value::as_str)
            .is_some_and(|rv| !rv.is_empty())
        {
            return Err(ApiError::new(
                500,
                "InternalError",
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let name = match meta
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            Some(name) => name.to_string(),
            None => match meta
                .get("generateName")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
            {
                Some(prefix) => {
                    let prefix = prefix.to_string();
                    let mut name = format!("{prefix}{}", random_suffix());
                    while self.objects.contains_key(&self.key(res, ns, &name)) {
                        name = format!("{prefix}{}", random_suffix());
                    }
                    name
                }
                None => {
                    return Err(ApiError::invalid(
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        validate_name(&name)?;
        let meta = metadata_mut(&mut obj);
        meta.insert("name".into(), name.clone().into());
        if r.namespaced {
            let ns = ns.ok_or_else(|| {
                ApiError::bad_request("a namespace is required for a namespaced resource")
            })?;
            if let Some(body_ns) = meta.get("namespace").and_then(Value::as_str)
                && !body_ns.is_empty()
                && body_ns != ns
            {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            meta.insert("namespace".into(), ns.into());
            let ns_res = self.namespaces_res();
            if !self.objects.contains_key(&self.key(ns_res, None, ns)) {
                return Err(ApiError::not_found("", "namespaces", ns));
            }
        } else {
            meta.remove("namespace");
        }
        let key = self.key(res, ns, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(&r.group, &r.plural, &name));
        }
        for field in [
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        ] {
            meta.remove(field);
        }
        meta.insert("uid".into(), new_uid().into());
        meta.insert("creationTimestamp".into(), now_rfc3339().into());
        meta.insert("generation".into(), 1.into());
        if r.status_subresource && part != Part::All {
            obj.as_object_mut().expect("object").remove("status");
        }
        match (r.group.as_str(), r.plural.as_str()) {
            ("", "services") => self.default_new_service(&mut obj)?,
            ("", "namespaces") => default_namespace(&mut obj, &name),
            _ => {}
        }
        Ok(self.commit(key, obj, EventType::Added, None))
    }

    /// REPLACE (PUT) of the main resource or `/status`.
    pub fn replace(
        &mut self,
        res: ResId,
        ns: Option<&str>,
        name: &str,
        body: Value,
        part: Part,
    ) -> Result<Value, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        let precondition = body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string);
        self.update(res, ns, name, body, part, precondition.as_deref())
    }

    /// PATCH of the main resource or `/status`. Returns the object and whether it was
    /// created (server-side apply of an absent object).
    pub fn patch(
        &mut self,
        res: ResId,
        ns: Option<&str>,
        name: &str,
        req: &PatchRequest<'_>,
    ) -> Result<(Value, bool), ApiError> {
        let PatchRequest {
            kind,
            body,
            part,
            field_manager,
        } = *req;
        if kind == PatchKind::Apply {
            if field_manager.is_none_or(str::is_empty) {
                return Err(ApiError::bad_request(
                    "PATCH: fieldManager is required for apply requests",
                ));
            }
            let applied: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding apply patch: {e}")))?;
            let r = &self.resources[res];
            if applied.get("apiVersion").and_then(Value::as_str) != Some(&r.api_version())
                || applied.get("kind").and_then(Value::as_str) != Some(&r.kind)
            {
                return Err(ApiError::bad_request(format!(
                    "apply patch must set apiVersion {:?} and kind {:?}",
                    r.api_version(),
                    r.kind
                )));
            }
            if let Some(body_name) = applied.pointer("/metadata/name").and_then(Value::as_str)
                && body_name != name
            {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({name})"
                )));
            }
            if !self.objects.contains_key(&self.key(res, ns, name)) && part == Part::Main {
                let mut obj = applied;
                metadata_mut(&mut obj).insert("name".into(), name.into());
                return self.create(res, ns, obj, Part::Main).map(|o| (o, true));
            }
        }
        let old = self.get(res, ns, name)?;
        let patched = apply_patch(&old, kind, body)?;
        let precondition = patched
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string);
        self.update(res, ns, name, patched, part, precondition.as_deref())
            .map(|o| (o, false))
    }

    /// The common update path of PUT and PATCH.
    fn update(
        &mut self,
        res: ResId,
        ns: Option<&str>,
        name: &str,
        mut candidate: Value,
        part: Part,
        precondition_rv: Option<&str>,
    ) -> Result<Value, ApiError> {
        let r = self.resources[res].clone();
        let key = self.key(res, ns, name);
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| self.not_found(res, name))?;
        let old_rv = old
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if let Some(rv) = precondition_rv
            && !rv.is_empty()
            && rv != old_rv
        {
            return Err(ApiError::conflict(
                &r.group,
                &r.plural,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        check_type(&r, &mut candidate)?;
        if let Some(body_name) = candidate.pointer("/metadata/name").and_then(Value::as_str)
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if r.namespaced
            && let Some(body_ns) = candidate
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
            && !body_ns.is_empty()
            && Some(body_ns) != old.pointer("/metadata/namespace").and_then(Value::as_str)
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let mut new = match part {
            Part::Status => {
                let mut new = old.clone();
                set_or_remove(&mut new, "status", candidate.get("status").cloned());
                new
            }
            Part::Main if r.status_subresource => {
                set_or_remove(&mut candidate, "status", old.get("status").cloned());
                candidate
            }
            Part::Main | Part::All => candidate,
        };
        // Server-managed metadata cannot be changed by clients.
        {
            let old_meta = old
                .get("metadata")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let meta = metadata_mut(&mut new);
            for field in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "resourceVersion",
            ] {
                match old_meta.get(field) {
                    Some(v) => meta.insert(field.into(), v.clone()),
                    None => meta.remove(field),
                };
            }
            meta.remove("managedFields");
            meta.remove("selfLink");
        }
        if r.group.is_empty() && r.plural == "services" {
            self.default_updated_service(&old, &mut new)?;
        }
        if new == old {
            return Ok(old); // no-op writes do not bump the resourceVersion
        }
        if spec_part(&new, r.status_subresource) != spec_part(&old, r.status_subresource) {
            let generation = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            metadata_mut(&mut new).insert("generation".into(), (generation + 1).into());
        }
        if is_deleting(&new) && finalizers(&new).is_empty() {
            return Ok(self.remove(key, new, false));
        }
        Ok(self.commit(key, new, EventType::Modified, Some(old)))
    }

    /// DELETE. Objects with finalizers get a `deletionTimestamp` and stay until their
    /// finalizers are removed; otherwise the object is removed, its dependents are
    /// garbage-collected (unless `propagationPolicy=Orphan`), and a namespace takes its
    /// contents with it.
    pub fn delete(
        &mut self,
        res: ResId,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        let r = self.resources[res].clone();
        let key = self.key(res, ns, name);
        let obj = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| self.not_found(res, name))?;
        let meta = |f: &str| {
            obj.pointer(&format!("/metadata/{f}"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        if let Some(uid) = opts.precondition_uid.as_deref().filter(|u| !u.is_empty())
            && uid != meta("uid")
        {
            return Err(ApiError::conflict(
                &r.group,
                &r.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta("uid")
                ),
            ));
        }
        if let Some(rv) = opts.precondition_rv.as_deref().filter(|u| !u.is_empty())
            && rv != meta("resourceVersion")
        {
            return Err(ApiError::conflict(
                &r.group,
                &r.plural,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta("resourceVersion")
                ),
            ));
        }
        let orphan = opts.propagation_policy.as_deref() == Some("Orphan");
        Ok(self.delete_key(key, orphan))
    }

    /// DELETE on a collection: deletes every matching object, returns them as a list.
    pub fn delete_collection(
        &mut self,
        res: ResId,
        ns: Option<&str>,
        q: &ListQuery,
        opts: &DeleteOptions,
    ) -> Value {
        let r = self.resources[res].clone();
        let keys: Vec<Key> = self
            .iter_res(res, ns)
            .filter(|(_, o)| q.label.matches(o) && q.field.matches(o))
            .map(|(k, _)| k.clone())
            .collect();
        let orphan = opts.propagation_policy.as_deref() == Some("Orphan");
        let mut items = Vec::new();
        for key in keys {
            // An earlier deletion may have garbage-collected this one already.
            if self.objects.contains_key(&key) {
                items.push(self.delete_key(key, orphan));
            }
        }
        json!({
            "kind": format!("{}List", r.kind),
            "apiVersion": r.api_version(),
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        })
    }

    /// Deletes (or starts deleting, with finalizers) the object at `key`.
    fn delete_key(&mut self, key: Key, orphan: bool) -> Value {
        let obj = self.objects.get(&key).cloned().expect("caller checked");
        if finalizers(&obj).is_empty() {
            return self.remove(key, obj, orphan);
        }
        if is_deleting(&obj) {
            return obj;
        }
        let mut new = obj.clone();
        let meta = metadata_mut(&mut new);
        meta.insert("deletionTimestamp".into(), now_rfc3339().into());
        meta.insert("deletionGracePeriodSeconds".into(), 0.into());
        self.commit(key, new, EventType::Modified, Some(obj))
    }

    /// Removes the object now: namespace contents first, then the object (DELETED), then
    /// its dependents (garbage collection) or, when orphaning, their owner references.
    fn remove(&mut self, key: Key, obj: Value, orphan: bool) -> Value {
        if key.0 == self.namespaces_res() {
            let contents: Vec<Key> = self
                .objects
                .keys()
                .filter(|k| self.resources[k.0].namespaced && k.1 == key.2)
                .cloned()
                .collect();
            for k in contents {
                if let Some(o) = self.objects.get(&k).cloned() {
                    self.remove(k, o, false);
                }
            }
        }
        self.release_allocations(&obj);
        let removed = self.commit(key, obj, EventType::Deleted, None);
        let uid = removed
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        self.collect_garbage(&uid, orphan);
        removed
    }

    /// Background garbage collection of the dependents of the removed object `uid`.
    /// Like the real collector, a dependent that still has another live owner is kept
    /// and only loses the dangling reference. With `orphan`, every dependent is kept.
    fn collect_garbage(&mut self, uid: &str, orphan: bool) {
        if uid.is_empty() {
            return;
        }
        let dependents: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, o)| owner_uids(o).iter().any(|u| u == uid))
            .map(|(k, _)| k.clone())
            .collect();
        for key in dependents {
            let Some(obj) = self.objects.get(&key).cloned() else {
                continue;
            };
            let refs: Vec<Value> = obj
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let live: Vec<Value> = refs
                .into_iter()
                .filter(|r| {
                    r.get("uid")
                        .and_then(Value::as_str)
                        .is_some_and(|u| u != uid && self.uid_exists(u))
                })
                .collect();
            if live.is_empty() && !orphan {
                self.delete_key(key, false);
            } else {
                let mut new = obj.clone();
                let meta = metadata_mut(&mut new);
                if live.is_empty() {
                    meta.remove("ownerReferences");
                } else {
                    meta.insert("ownerReferences".into(), Value::Array(live));
                }
                self.commit(key, new, EventType::Modified, Some(obj));
            }
        }
    }

    fn uid_exists(&self, uid: &str) -> bool {
        self.objects
            .values()
            .any(|o| o.pointer("/metadata/uid").and_then(Value::as_str) == Some(uid))
    }

    /// Test-helper "apply": create, or replace everything (spec and status, in one
    /// write, ignoring the body's resourceVersion).
    pub fn put(&mut self, res: ResId, ns: Option<&str>, mut obj: Value) -> Result<Value, ApiError> {
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if !name.is_empty() && self.objects.contains_key(&self.key(res, ns, &name)) {
            metadata_mut(&mut obj).remove("resourceVersion");
            self.update(res, ns, &name, obj, Part::All, None)
        } else {
            metadata_mut(&mut obj).remove("resourceVersion");
            self.create(res, ns, obj, Part::All)
        }
    }

    // ---------------------------------------------------------------- services

    fn default_new_service(&mut self, obj: &mut Value) -> Result<(), ApiError> {
        let spec = obj
            .as_object_mut()
            .expect("object")
            .entry("spec")
            .or_insert_with(|| json!({}));
        if !spec.is_object() {
            return Err(ApiError::bad_request("spec must be an object"));
        }
        let ty = spec
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_string();
        spec["type"] = ty.clone().into();
        spec.as_object_mut()
            .expect("object")
            .entry("sessionAffinity")
            .or_insert("None".into());
        if ty == "ExternalName" {
            let spec = spec.as_object_mut().expect("object");
            spec.remove("clusterIP");
            spec.remove("clusterIPs");
        } else {
            let requested = spec
                .get("clusterIP")
                .and_then(Value::as_str)
                .or_else(|| spec.pointer("/clusterIPs/0").and_then(Value::as_str))
                .unwrap_or("")
                .to_string();
            let ip = match requested.as_str() {
                "" => self.allocate_cluster_ip()?,
                "None" => "None".to_string(),
                ip => {
                    let addr: Ipv4Addr = ip.parse().map_err(|_| {
                        ApiError::invalid(format!(
                            "spec.clusterIPs[0]: Invalid value: {ip:?}: must be a valid IP address"
                        ))
                    })?;
                    let n = u32::from(addr);
                    if !(CLUSTER_IP_MIN..=CLUSTER_IP_MAX).contains(&n) {
                        return Err(ApiError::invalid(format!(
                            "spec.clusterIPs: Invalid value: [{ip:?}]: failed to allocate IP {ip}: provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/16"
                        )));
                    }
                    if !self.cluster_ips.insert(n) {
                        return Err(ApiError::invalid(format!(
                            "spec.clusterIPs: Invalid value: [{ip:?}]: failed to allocate IP {ip}: provided IP is already allocated"
                        )));
                    }
                    ip.to_string()
                }
            };
            let spec = spec.as_object_mut().expect("object");
            spec.insert("clusterIP".into(), ip.clone().into());
            spec.insert("clusterIPs".into(), json!([ip]));
            if ip != "None" {
                spec.entry("ipFamilies").or_insert(json!(["IPv4"]));
                spec.entry("ipFamilyPolicy").or_insert("SingleStack".into());
            }
            spec.entry("internalTrafficPolicy")
                .or_insert("Cluster".into());
        }
        self.default_ports(obj, None)?;
        obj.as_object_mut()
            .expect("object")
            .entry("status")
            .or_insert(json!({"loadBalancer": {}}));
        Ok(())
    }

    fn default_updated_service(&mut self, old: &Value, new: &mut Value) -> Result<(), ApiError> {
        let old_ip = old.pointer("/spec/clusterIP").cloned();
        let spec = new
            .as_object_mut()
            .expect("object")
            .entry("spec")
            .or_insert_with(|| json!({}));
        if !spec.is_object() {
            return Err(ApiError::bad_request("spec must be an object"));
        }
        let new_ip = spec.get("clusterIP").and_then(Value::as_str).unwrap_or("");
        if let Some(Value::String(old_ip)) = &old_ip {
            if new_ip.is_empty() {
                spec["clusterIP"] = old_ip.clone().into();
                spec["clusterIPs"] = old
                    .pointer("/spec/clusterIPs")
                    .cloned()
                    .unwrap_or(json!([old_ip]));
            } else if new_ip != old_ip {
                return Err(ApiError::invalid(format!(
                    "spec.clusterIPs[0]: Invalid value: {new_ip:?}: may not change once set"
                )));
            }
        }
        if spec.get("type").is_none() {
            spec["type"] = "ClusterIP".into();
        }
        self.default_ports(new, Some(old))
    }

    /// Port defaults: protocol TCP, targetPort = port, node ports for NodePort and
    /// LoadBalancer Services (kept from the old object when the port is unchanged).
    fn default_ports(&mut self, obj: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
        let ty = obj
            .pointer("/spec/type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_string();
        let wants_node_port = ty == "NodePort" || ty == "LoadBalancer";
        let old_ports: Vec<Value> = old
            .and_then(|o| o.pointer("/spec/ports"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let Some(ports) = obj.pointer_mut("/spec/ports").and_then(Value::as_array_mut) else {
            return Ok(());
        };
        let mut to_allocate = Vec::new();
        for (i, port) in ports.iter_mut().enumerate() {
            let Some(p) = port.as_object_mut() else {
                return Err(ApiError::bad_request("spec.ports entries must be objects"));
            };
            p.entry("protocol").or_insert("TCP".into());
            if let Some(number) = p.get("port").cloned() {
                p.entry("targetPort").or_insert(number);
            }
            if wants_node_port && p.get("nodePort").is_none() {
                let kept = old_ports
                    .iter()
                    .find(|o| {
                        o.get("port") == p.get("port") && o.get("protocol") == p.get("protocol")
                    })
                    .and_then(|o| o.get("nodePort").cloned());
                match kept {
                    Some(n) => {
                        p.insert("nodePort".into(), n);
                    }
                    None => to_allocate.push(i),
                }
            }
        }
        for i in to_allocate {
            let port = (NODE_PORT_MIN..=NODE_PORT_MAX)
                .find(|p| !self.node_ports.contains(p))
                .ok_or_else(|| ApiError::invalid("no node ports left"))?;
            self.node_ports.insert(port);
            if let Some(p) = obj.pointer_mut(&format!("/spec/ports/{i}")) {
                p["nodePort"] = port.into();
            }
        }
        if wants_node_port {
            obj["spec"]
                .as_object_mut()
                .expect("object")
                .entry("externalTrafficPolicy")
                .or_insert("Cluster".into());
        }
        Ok(())
    }

    fn allocate_cluster_ip(&mut self) -> Result<String, ApiError> {
        let size = CLUSTER_IP_MAX - CLUSTER_IP_MIN + 1;
        for _ in 0..size {
            let candidate = self.next_cluster_ip;
            self.next_cluster_ip = if candidate >= CLUSTER_IP_MAX {
                CLUSTER_IP_MIN
            } else {
                candidate + 1
            };
            if self.cluster_ips.insert(candidate) {
                return Ok(Ipv4Addr::from(candidate).to_string());
            }
        }
        Err(ApiError::new(
            500,
            "InternalError",
            "range is full: no cluster IPs left in 10.96.0.0/16",
        ))
    }

    fn release_allocations(&mut self, obj: &Value) {
        if obj.get("kind").and_then(Value::as_str) != Some("Service")
            || obj.get("apiVersion").and_then(Value::as_str) != Some("v1")
        {
            return;
        }
        if let Some(ip) = obj
            .pointer("/spec/clusterIP")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
        {
            self.cluster_ips.remove(&u32::from(ip));
        }
        for port in obj
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(n) = port.get("nodePort").and_then(Value::as_u64) {
                self.node_ports.remove(&(n as u16));
            }
        }
    }
}

// -------------------------------------------------------------------- helpers

fn default_namespace(obj: &mut Value, name: &str) {
    let meta = metadata_mut(obj);
    let labels = meta.entry("labels").or_insert_with(|| json!({}));
    if let Some(labels) = labels.as_object_mut() {
        labels.insert("kubernetes.io/metadata.name".into(), name.into());
    }
    let o = obj.as_object_mut().expect("object");
    o.insert("spec".into(), json!({"finalizers": ["kubernetes"]}));
    o.insert("status".into(), json!({"phase": "Active"}));
}

/// Checks or fills `apiVersion` and `kind` against the resource.
fn check_type(r: &Resource, obj: &mut Value) -> Result<(), ApiError> {
    let o = obj
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let api_version = r.api_version();
    match o.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => {
            o.insert("apiVersion".into(), api_version.into());
        }
        Some(v) if v == api_version => {}
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({api_version})"
            )));
        }
    }
    match o.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            o.insert("kind".into(), r.kind.clone().into());
        }
        Some(k) if k == r.kind => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                r.kind
            )));
        }
    }
    Ok(())
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    if name == "." || name == ".." || name.contains('/') || name.contains('%') {
        return Err(ApiError::invalid(format!(
            "metadata.name: Invalid value: {name:?}: may not contain '/' or '%'"
        )));
    }
    Ok(())
}

/// `metadata` as a mutable map, created if absent.
pub(crate) fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    let o = obj.as_object_mut().expect("object");
    let meta = o.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    meta.as_object_mut().expect("object")
}

fn set_rv(obj: &mut Value, rv: u64) {
    if obj.is_object() {
        metadata_mut(obj).insert("resourceVersion".into(), rv.to_string().into());
    }
}

fn set_or_remove(obj: &mut Value, field: &str, value: Option<Value>) {
    let o = obj.as_object_mut().expect("object");
    match value {
        Some(v) => o.insert(field.into(), v),
        None => o.remove(field),
    };
}

/// Everything that counts for `metadata.generation`: the object minus metadata (and
/// minus status when status is a subresource).
fn spec_part(obj: &Value, status_subresource: bool) -> Value {
    let mut o = obj.as_object().cloned().unwrap_or_default();
    o.remove("metadata");
    if status_subresource {
        o.remove("status");
    }
    Value::Object(o)
}

fn finalizers(obj: &Value) -> Vec<Value> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn is_deleting(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
}

fn owner_uids(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_string))
        .collect()
}

fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    let raw = format!("{rv}\u{0}{ns}\u{0}{name}");
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Option<(u64, String, String)> {
    if token.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let raw = String::from_utf8(bytes?).ok()?;
    let mut parts = raw.split('\u{0}');
    let rv = parts.next()?.parse().ok()?;
    Some((rv, parts.next()?.to_string(), parts.next()?.to_string()))
}

/// A random version-4 UUID.
fn new_uid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The 5-character suffix `generateName` appends (same alphabet as apimachinery).
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Now, as RFC 3339 with second precision (`metav1.Time`).
pub(crate) fn now_rfc3339() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_token_roundtrip() {
        let t = encode_continue(42, "ns", "name");
        assert_eq!(decode_continue(&t), Some((42, "ns".into(), "name".into())));
        assert_eq!(decode_continue("zz"), None);
    }

    #[test]
    fn uid_shape() {
        let u = new_uid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, new_uid());
    }

    #[test]
    fn timestamp_shape() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20);
        assert!(t.ends_with('Z'));
    }
}
