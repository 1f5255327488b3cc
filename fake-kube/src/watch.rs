//! Streaming one watch: initial events, live events, bookmarks, `timeoutSeconds`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Shared;
use crate::error::ApiError;
use crate::store::{Subscription, WatchFilter};

/// One chunk of a watch response body.
pub(crate) type Chunk = Result<Bytes, std::io::Error>;

/// Everything a watch stream needs besides its subscription.
pub(crate) struct WatchSpec {
    pub kind: String,
    pub api_version: String,
    pub filter: WatchFilter,
    pub timeout: Option<Duration>,
    pub bookmarks: bool,
    pub bookmark_interval: Duration,
}

/// One newline-terminated watch event.
pub(crate) fn event_line(ty: &str, object: &Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({"type": ty, "object": object})).expect("serialisable");
    line.push(b'\n');
    Bytes::from(line)
}

/// The single ERROR event of a watch whose resourceVersion is too old.
pub(crate) fn error_line(err: &ApiError) -> Bytes {
    event_line("ERROR", &err.to_status())
}

fn bookmark(spec: &WatchSpec, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": spec.kind, "apiVersion": spec.api_version, "metadata": metadata}),
    )
}

/// Feeds the response body `out` until the timeout, the client going away, or the
/// store closing the subscription (then the stream ends normally, as on a server-side
/// watch timeout).
pub(crate) async fn run(
    shared: Arc<Shared>,
    spec: WatchSpec,
    sub: Subscription,
    out: mpsc::Sender<Chunk>,
) {
    let Subscription {
        initial,
        initial_end_rv,
        mut rx,
    } = sub;
    for (ty, obj) in initial {
        if out.send(Ok(event_line(ty.as_str(), &obj))).await.is_err() {
            return;
        }
    }
    if let Some(rv) = initial_end_rv
        && out.send(Ok(bookmark(&spec, rv, true))).await.is_err()
    {
        return;
    }
    let deadline = spec.timeout.map(|t| Instant::now() + t);
    let mut ticker = tokio::time::interval_at(
        Instant::now() + spec.bookmark_interval,
        spec.bookmark_interval,
    );
    loop {
        let line = tokio::select! {
            _ = sleep_until(deadline) => return,
            _ = out.closed() => return,
            msg = rx.recv() => match msg {
                Some(ev) => match spec.filter.translate(&ev) {
                    Some((ty, obj)) => event_line(ty.as_str(), &obj),
                    None => continue,
                },
                None => return,
            },
            _ = ticker.tick(), if spec.bookmarks => {
                // Only when every event up to the store's rv has been taken off the
                // channel, so a bookmark never claims an event the client has not seen.
                let rv = {
                    let store = shared.store();
                    rx.is_empty().then_some(store.rv)
                };
                match rv {
                    Some(rv) => bookmark(&spec, rv, false),
                    None => continue,
                }
            }
        };
        if out.send(Ok(line)).await.is_err() {
            return;
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
