//! `/v1/faults` on the admin API: list, inject and undo drill faults. Every request needs
//! `Authorization: Bearer <token>` with the token from `faults.token_file`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use strait_common::api::{ApiError, Undone};

use super::{FaultError, FaultRequest, Faults};

/// The fault routes, to merge into the admin router.
pub fn routes<S>(faults: Arc<Faults>) -> Router<S> {
    Router::new()
        .route("/v1/faults", get(list).post(inject).delete(undo_all))
        .route("/v1/faults/{id}", delete(undo))
        .with_state(faults)
}

fn error(code: StatusCode, problem: &str, fix: &str) -> Response {
    (code, Json(ApiError::new(problem, fix))).into_response()
}

/// `None` when the request may go on; the refusal otherwise. (The admin token guards
/// `/v1/drain` too.)
pub(crate) fn refuse(s: &Faults, headers: &HeaderMap) -> Option<Response> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented.map(|t| s.token.authorized(t.trim())) {
        _ if !s.token.is_on() => Some(error(
            StatusCode::NOT_FOUND,
            "fault injection is off on this gateway",
            "add `faults: {token_file: <file>}` to the gateway config and restart it",
        )),
        None => Some(error(
            StatusCode::UNAUTHORIZED,
            "no `Authorization: Bearer <token>` header",
            "send the token from the gateway's faults.token_file",
        )),
        Some(Ok(true)) => None,
        Some(_) => Some(error(
            StatusCode::UNAUTHORIZED,
            "wrong token",
            "send the token from the gateway's faults.token_file",
        )),
    }
}

async fn list(State(s): State<Arc<Faults>>, headers: HeaderMap) -> Response {
    if let Some(r) = refuse(&s, &headers) {
        return r;
    }
    Json(s.list()).into_response()
}

async fn inject(State(s): State<Arc<Faults>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = refuse(&s, &headers) {
        return r;
    }
    let mut de = serde_json::Deserializer::from_slice(&body);
    let req: FaultRequest = match serde_path_to_error::deserialize(&mut de) {
        Ok(r) => r,
        Err(e) => {
            let field = e.path().to_string();
            return (
                StatusCode::BAD_REQUEST,
                Json(ApiError::field(
                    e.into_inner().to_string(),
                    field,
                    "send {\"fault\": {\"kind\": ..., ...}, \"duration\": \"10s\"} (see docs/DRILLS.md)",
                )),
            )
                .into_response();
        }
    };
    match s.inject(req) {
        Ok(active) => (StatusCode::CREATED, Json(active)).into_response(),
        Err(FaultError::Invalid {
            field,
            problem,
            fix,
        }) => (
            StatusCode::BAD_REQUEST,
            Json(ApiError::field(problem, field, fix)),
        )
            .into_response(),
        Err(e) => error(StatusCode::CONFLICT, &e.to_string(), ""),
    }
}

async fn undo(State(s): State<Arc<Faults>>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Some(r) = refuse(&s, &headers) {
        return r;
    }
    if s.undo(id) {
        Json(Undone { undone: vec![id] }).into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            &format!("no active fault {id}"),
            "it may have ended already; GET /v1/faults lists the active ones",
        )
    }
}

async fn undo_all(State(s): State<Arc<Faults>>, headers: HeaderMap) -> Response {
    if let Some(r) = refuse(&s, &headers) {
        return r;
    }
    Json(Undone {
        undone: s.undo_all(),
    })
    .into_response()
}
