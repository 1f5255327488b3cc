//! Copies bytes between a TCP connection and a QUIC stream in both directions, mapping
//! TCP half-close to stream finish and TCP reset to stream reset, and back.

use bytes::BytesMut;
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use super::StreamMetrics;
use super::codes;

/// How one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Orderly end (EOF / finish), carried to the other side.
    Finished,
    /// Abortive end (reset, lost connection); the whole proxied connection is torn down.
    Reset,
}

/// Bytes moved by a spliced connection, and whether it ended abortively.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes from the TCP side into the stream.
    pub tcp_to_quic: u64,
    /// Bytes from the stream to the TCP side.
    pub quic_to_tcp: u64,
    /// Whether either side was reset.
    pub reset: bool,
}

/// Which side of the tunnel a proxied connection is on, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A local client through a listener towards a peer.
    Outbound,
    /// A peer's stream towards a local endpoint.
    Inbound,
}

impl Side {
    /// The `direction` label.
    pub fn label(self) -> &'static str {
        match self {
            Side::Outbound => "outbound",
            Side::Inbound => "inbound",
        }
    }
}

/// Splices and accounts for one proxied connection: streams opened, active connections,
/// and bytes in each direction (`sent` = towards the service). `early` bytes were already
/// sent with the stream header.
pub(crate) async fn splice_counted(
    metrics: &StreamMetrics,
    service: &str,
    peer: &str,
    side: Side,
    conn: (TcpStream, SendStream, RecvStream),
    buf_size: usize,
    early: u64,
) {
    metrics.opened(service, peer, side);
    let active = metrics.active(service, peer, side);
    active.increment(1.0);
    let (tcp, send, recv) = conn;
    let moved = splice(tcp, send, recv, buf_size).await;
    active.decrement(1.0);
    let (towards_service, from_service) = match side {
        Side::Outbound => (early + moved.tcp_to_quic, moved.quic_to_tcp),
        Side::Inbound => (moved.quic_to_tcp, moved.tcp_to_quic),
    };
    metrics.bytes(service, peer, side, towards_service, from_service);
}

/// Runs both directions until both finished or either side reset.
pub async fn splice(
    mut tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    buf_size: usize,
) -> Spliced {
    let mut out = Spliced::default();
    let (up_end, down_end) = {
        let (mut r, mut w) = tcp.split();
        let up = tcp_to_quic(&mut r, &mut send, buf_size, &mut out.tcp_to_quic);
        let down = quic_to_tcp(&mut recv, &mut w, buf_size, &mut out.quic_to_tcp);
        tokio::pin!(up, down);
        let (mut up_end, mut down_end) = (None, None);
        // Either direction may finish first (half-close); a reset on either side ends both.
        while up_end.is_none() || down_end.is_none() {
            tokio::select! {
                e = &mut up, if up_end.is_none() => up_end = Some(e),
                e = &mut down, if down_end.is_none() => down_end = Some(e),
            }
            if up_end == Some(End::Reset) || down_end == Some(End::Reset) {
                break;
            }
        }
        (up_end, down_end)
    };
    if up_end == Some(End::Reset) || down_end == Some(End::Reset) {
        out.reset = true;
        let _ = send.reset(codes::TCP_RESET);
        let _ = recv.stop(codes::TCP_RESET);
        abort_on_close(&tcp);
    }
    out
}

/// First read size of a direction; doubles on every read that fills it, up to the
/// configured copy buffer. Request/response traffic stays in small buffers, bulk transfers
/// reach large ones within a few reads.
const INITIAL_CHUNK: usize = 8 << 10;

async fn tcp_to_quic(
    r: &mut ReadHalf<'_>,
    send: &mut SendStream,
    max_chunk: usize,
    moved: &mut u64,
) -> End {
    let mut chunk = INITIAL_CHUNK.min(max_chunk);
    let mut buf = BytesMut::new();
    loop {
        // Each chunk is handed to quinn (write_chunk, no copy) and lives until acknowledged,
        // so every read needs fresh space.
        buf.reserve(chunk);
        match r.read_buf(&mut buf).await {
            Ok(0) => {
                return if send.finish().is_ok() {
                    End::Finished
                } else {
                    End::Reset
                };
            }
            Ok(n) => {
                *moved += n as u64;
                if n >= chunk {
                    chunk = (chunk * 2).min(max_chunk);
                }
                if let Err(e) = send.write_chunk(buf.split().freeze()).await {
                    tracing::debug!(error = %e, "stream write failed");
                    return End::Reset;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "tcp read failed");
                return End::Reset;
            }
        }
    }
}

async fn quic_to_tcp(
    recv: &mut RecvStream,
    w: &mut WriteHalf<'_>,
    max_chunk: usize,
    moved: &mut u64,
) -> End {
    // One reused buffer gathers many QUIC frames so each TCP write is large; it grows
    // only while reads keep filling it.
    let mut buf = BytesMut::with_capacity(INITIAL_CHUNK.min(max_chunk));
    loop {
        buf.clear();
        match recv.read_buf(&mut buf).await {
            Ok(0) => {
                return if w.shutdown().await.is_ok() {
                    End::Finished
                } else {
                    End::Reset
                };
            }
            Ok(n) => {
                if let Err(e) = w.write_all(&buf[..n]).await {
                    tracing::debug!(error = %e, "tcp write failed");
                    return End::Reset;
                }
                *moved += n as u64;
                if n == buf.capacity() && n < max_chunk {
                    buf.clear();
                    buf.reserve((n * 2).min(max_chunk));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "stream read failed");
                return End::Reset;
            }
        }
    }
}

/// Makes closing `tcp` send RST instead of FIN, so the other side sees an abort as an abort.
/// (Linger zero never blocks, unlike other linger values.)
pub fn abort_on_close(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}
