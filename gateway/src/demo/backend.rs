//! Sample backends for the demo and the tests: an HTTP responder and a TCP echo server.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A backend server on a loopback port; stops when dropped.
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    async fn spawn<F, Fut>(handler: F) -> std::io::Result<Backend>
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let _ = s.set_nodelay(true);
                tokio::spawn(handler(s));
            }
        });
        Ok(Backend { addr, task })
    }

    /// Echoes every byte back; closes its write side after the client closes its own.
    pub async fn echo() -> std::io::Result<Backend> {
        Self::spawn(|mut s| async move {
            let (mut r, mut w) = s.split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
        })
        .await
    }

    /// Answers every HTTP/1.1 request on a connection with `body` (keep-alive supported).
    pub async fn http_hello(body: String) -> std::io::Result<Backend> {
        let body: Arc<str> = body.into();
        Self::spawn(move |s| {
            let body = body.clone();
            async move { serve_http(s, &body).await }
        })
        .await
    }
}

async fn serve_http(mut s: TcpStream, body: &str) {
    let mut buf = Vec::with_capacity(4096);
    loop {
        let Some(end) = find_header_end(&buf) else {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > 64 * 1024 {
                return;
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let close = head.contains("connection: close");
        buf.drain(..end);
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        if s.write_all(resp.as_bytes()).await.is_err() || close {
            return;
        }
    }
}

fn find_header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}
