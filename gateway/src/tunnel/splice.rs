//! Copies bytes between a TCP connection and a QUIC stream in both directions, mapping
//! TCP half-close to stream finish and TCP reset to stream reset, and back.

use bytes::BytesMut;
use quinn::{ReadError, RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

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

async fn tcp_to_quic(
    r: &mut ReadHalf<'_>,
    send: &mut SendStream,
    buf_size: usize,
    moved: &mut u64,
) -> End {
    let mut buf = BytesMut::with_capacity(buf_size);
    loop {
        buf.reserve(buf_size);
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
                // write_chunk hands the buffer to quinn without copying.
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
    buf_size: usize,
    moved: &mut u64,
) -> End {
    // One buffer gathers many QUIC frames so each TCP write is large.
    let mut buf = vec![0u8; buf_size];
    loop {
        match recv.read(&mut buf).await {
            Ok(Some(n)) => {
                if let Err(e) = w.write_all(&buf[..n]).await {
                    tracing::debug!(error = %e, "tcp write failed");
                    return End::Reset;
                }
                *moved += n as u64;
            }
            Ok(None) => {
                return if w.shutdown().await.is_ok() {
                    End::Finished
                } else {
                    End::Reset
                };
            }
            Err(
                ReadError::Reset(_)
                | ReadError::ConnectionLost(_)
                | ReadError::ClosedStream
                | ReadError::IllegalOrderedRead
                | ReadError::ZeroRttRejected,
            ) => {
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
