//! The one client for a gateway's admin API (`strait status`, `strait drill`, the tests):
//! one HTTP/1.1 request per connection, answers read into the [`strait_common::api`] model.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use strait_common::api::{
    ActiveFault, ApiError, CatalogEntry, FaultRequest, Identity, Member, Peer, Ready, Route,
    Services, Undone,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest one admin request may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A gateway's answer other than success: its HTTP status and the API's error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// HTTP status code.
    pub code: u16,
    /// What the gateway said.
    pub error: ApiError,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}: ", self.code)?;
        if let Some(field) = &self.error.field {
            write!(f, "field `{field}`: ")?;
        }
        write!(f, "{}", self.error.error)?;
        match &self.error.fix {
            Some(fix) if !fix.is_empty() => write!(f, " ({fix})"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for Refused {}

/// What a call that the gateway may refuse returns: the answer, or the refusal.
pub type Reply<T> = Result<T, Refused>;

/// The admin API of one gateway.
#[derive(Debug, Clone)]
pub struct Admin {
    addr: SocketAddr,
    token: Option<String>,
}

impl Admin {
    /// The admin API at `addr`, without a token (read-only calls).
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, token: None }
    }

    /// The admin API at `addr` with the fault-injection token.
    pub fn with_token(addr: SocketAddr, token: impl Into<String>) -> Self {
        Self {
            addr,
            token: Some(token.into()),
        }
    }

    /// Where it is.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET /ready` (503 with the same body when not ready).
    pub async fn ready(&self) -> anyhow::Result<(u16, Ready)> {
        let (code, body) = self.raw("GET", "/ready", None::<&()>).await?;
        Ok((code, self.decode("/ready", &body)?))
    }

    /// `GET /v1/services`.
    pub async fn services(&self) -> anyhow::Result<Services> {
        Ok(self.call("GET", "/v1/services", None::<&()>).await??)
    }

    /// `GET /v1/peers`.
    pub async fn peers(&self) -> anyhow::Result<Vec<Peer>> {
        Ok(self.call("GET", "/v1/peers", None::<&()>).await??)
    }

    /// `GET /v1/identity`.
    pub async fn identity(&self) -> anyhow::Result<Identity> {
        Ok(self.call("GET", "/v1/identity", None::<&()>).await??)
    }

    /// `GET /v1/members`; refused (404) on a gateway without discovery.
    pub async fn members(&self) -> anyhow::Result<Reply<Vec<Member>>> {
        self.call("GET", "/v1/members", None::<&()>).await
    }

    /// `GET /v1/catalog`; refused (404) on a gateway without discovery.
    pub async fn catalog(&self) -> anyhow::Result<Reply<Vec<CatalogEntry>>> {
        self.call("GET", "/v1/catalog", None::<&()>).await
    }

    /// `GET /v1/routes`: every imported service.
    pub async fn routes(&self) -> anyhow::Result<Vec<Route>> {
        Ok(self.call("GET", "/v1/routes", None::<&()>).await??)
    }

    /// `GET /v1/routes/<ns>/<name>`; refused (404) when the service is not imported.
    pub async fn route(&self, service: &str) -> anyhow::Result<Reply<Route>> {
        self.call("GET", &format!("/v1/routes/{service}"), None::<&()>)
            .await
    }

    /// `GET /metrics`: the Prometheus text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let (code, body) = self.raw("GET", "/metrics", None::<&()>).await?;
        if code != 200 {
            bail!("GET /metrics on {}: HTTP {code}", self.addr);
        }
        Ok(body)
    }

    /// `GET /v1/faults` (needs the token).
    pub async fn faults(&self) -> anyhow::Result<Reply<Vec<ActiveFault>>> {
        self.call("GET", "/v1/faults", None::<&()>).await
    }

    /// `POST /v1/faults` (needs the token).
    pub async fn inject(&self, request: &FaultRequest) -> anyhow::Result<Reply<ActiveFault>> {
        self.call("POST", "/v1/faults", Some(request)).await
    }

    /// `DELETE /v1/faults/<id>` (needs the token); refused (404) when it is not active.
    pub async fn undo(&self, id: u64) -> anyhow::Result<Reply<Undone>> {
        self.call("DELETE", &format!("/v1/faults/{id}"), None::<&()>)
            .await
    }

    /// `DELETE /v1/faults` (needs the token): undoes every fault.
    pub async fn undo_all(&self) -> anyhow::Result<Reply<Undone>> {
        self.call("DELETE", "/v1/faults", None::<&()>).await
    }

    /// `POST /v1/drain` (needs the token): the gateway drains, then exits.
    pub async fn drain(&self) -> anyhow::Result<Reply<strait_common::api::Draining>> {
        self.call("POST", "/v1/drain", None::<&()>).await
    }

    /// One call: the decoded answer on a 2xx status, else the gateway's error body.
    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<Reply<T>> {
        let (code, text) = self.raw(method, path, body).await?;
        if (200..300).contains(&code) {
            return Ok(Ok(self.decode(path, &text)?));
        }
        let error = serde_json::from_str(&text).unwrap_or_else(|_| ApiError::plain(text.trim()));
        Ok(Err(Refused { code, error }))
    }

    fn decode<T: DeserializeOwned>(&self, path: &str, text: &str) -> anyhow::Result<T> {
        serde_json::from_str(text).with_context(|| {
            format!(
                "{path} on {} answered what this strait does not understand (another version?)",
                self.addr
            )
        })
    }

    async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<(u16, String)> {
        let body = body.map(serde_json::to_vec).transpose()?;
        request(
            self.addr,
            method,
            path,
            self.token.as_deref(),
            body.as_deref(),
        )
        .await
    }
}

/// Sends `method path` (with a bearer `token` and a JSON `body`, when given) to the admin
/// API at `admin`; the status code and the body as text. [`Admin`] decodes it; tests that
/// send malformed requests on purpose use this directly.
pub async fn request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(TIMEOUT, send(admin, method, path, token, body))
        .await
        .with_context(|| format!("{method} {path} on {admin}: no answer within {TIMEOUT:?}"))?
}

async fn send(
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| {
            format!("connecting to the admin API at {admin} (is the gateway running? is the address right?)")
        })?;
    let body = body.unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {admin}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("content-type: application/json\r\n");
    }
    if let Some(t) = token {
        head.push_str(&format!("authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("malformed HTTP response from the admin API at {admin}");
    };
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_owned()))
}
