//! A minimal client for the admin API (`strait status`, `strait drill`): one HTTP/1.1
//! request per connection, JSON in and out.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest one admin request may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `method path` (with a bearer `token` and a JSON `body`, when given) to the admin
/// API at `admin`; the status code and the JSON answer.
pub async fn request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    tokio::time::timeout(TIMEOUT, send(admin, method, path, token, body))
        .await
        .with_context(|| format!("{method} {path} on {admin}: no answer within {TIMEOUT:?}"))?
}

async fn send(
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut s = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| {
            format!("connecting to the admin API at {admin} (is the gateway running? is the address right?)")
        })?;
    let body = body.map(Value::to_string).unwrap_or_default();
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
    s.write_all(body.as_bytes()).await?;
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
    let json = serde_json::from_str(body)
        .with_context(|| format!("{method} {path} on {admin} did not return JSON"))?;
    Ok((code, json))
}

/// `GET path`, without a token.
pub async fn get(admin: SocketAddr, path: &str) -> anyhow::Result<(u16, Value)> {
    request(admin, "GET", path, None, None).await
}
