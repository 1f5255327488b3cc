//! Copies bytes between a TCP connection and a QUIC stream in both directions, mapping
//! TCP half-close to stream finish and TCP reset to stream reset, and back.

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
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
        let down = quic_to_tcp(&mut recv, &mut w, &mut out.quic_to_tcp);
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

/// Most received chunks gathered into one TCP write.
const GATHER: usize = 32;

async fn quic_to_tcp(recv: &mut RecvStream, w: &mut WriteHalf<'_>, moved: &mut u64) -> End {
    // The chunks are the received packets' own buffers: nothing is copied on the way to
    // the socket, everything that has arrived goes out in one gathered write, and the
    // connection holds no buffer while it waits. A slow TCP reader holds at most one
    // read's chunks (up to `GATHER`, each keeping its received batch alive) beyond what
    // the stream's flow-control window lets the peer send.
    let mut chunks: [Bytes; GATHER] = std::array::from_fn(|_| Bytes::new());
    loop {
        match recv.read_chunks(&mut chunks).await {
            Ok(None) => {
                return if w.shutdown().await.is_ok() {
                    End::Finished
                } else {
                    End::Reset
                };
            }
            Ok(Some(n)) => {
                let len: usize = chunks[..n].iter().map(Bytes::len).sum();
                if let Err(e) = write_all_gathered(w, &mut chunks[..n]).await {
                    tracing::debug!(error = %e, "tcp write failed");
                    return End::Reset;
                }
                *moved += len as u64;
            }
            Err(e) => {
                tracing::debug!(error = %e, "stream read failed");
                return End::Reset;
            }
        }
    }
}

/// Writes all of `chunks` with gathered writes, releasing each chunk once it is written.
async fn write_all_gathered(w: &mut WriteHalf<'_>, chunks: &mut [Bytes]) -> std::io::Result<()> {
    let mut first = 0;
    loop {
        while first < chunks.len() && chunks[first].is_empty() {
            first += 1;
        }
        if first == chunks.len() {
            return Ok(());
        }
        let written = {
            let mut slices = [IoSlice::new(&[]); GATHER];
            let pending = &chunks[first..];
            for (slice, chunk) in slices.iter_mut().zip(pending) {
                *slice = IoSlice::new(chunk);
            }
            w.write_vectored(&slices[..pending.len().min(GATHER)])
                .await?
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = written;
        while left > 0 {
            let chunk = &mut chunks[first];
            if chunk.len() <= left {
                left -= chunk.len();
                *chunk = Bytes::new();
                first += 1;
            } else {
                chunk.advance(left);
                left = 0;
            }
        }
    }
}

/// Makes closing `tcp` send RST instead of FIN, so the other side sees an abort as an abort.
/// (Linger zero never blocks, unlike other linger values.)
pub fn abort_on_close(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// A connected loopback TCP pair: (client, server).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    /// Gathered writes that the socket takes only in part resume mid-chunk, in order,
    /// and write every byte once.
    #[tokio::test]
    async fn gathered_writes_resume_mid_chunk_and_keep_the_byte_order() {
        let (mut client, mut server) = tcp_pair().await;
        // A small send buffer: the gathered write is taken a piece at a time.
        socket2::SockRef::from(&client)
            .set_send_buffer_size(4096)
            .unwrap();
        // Chunks of uneven sizes, each byte numbered by its position in the whole.
        let sizes = [1usize, 7000, 0, 65536, 3, 40000, 12345, 1, 100_000];
        let total: usize = sizes.iter().sum();
        let mut at = 0usize;
        let mut chunks: Vec<Bytes> = sizes
            .iter()
            .map(|&n| {
                let c: Vec<u8> = (at..at + n).map(|i| (i % 251) as u8).collect();
                at += n;
                Bytes::from(c)
            })
            .collect();
        let read = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        {
            let (_, mut w) = client.split();
            write_all_gathered(&mut w, &mut chunks).await.unwrap();
            w.shutdown().await.unwrap();
        }
        let got = read.await.unwrap();
        assert_eq!(got.len(), total);
        assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        assert!(
            chunks.iter().all(Bytes::is_empty),
            "each chunk released once written"
        );
    }

    /// Nothing to write is no write (not a zero-length write taken for a closed socket),
    /// and more chunks than one gathered write takes are all written, in order.
    #[tokio::test]
    async fn gathered_writes_skip_empty_chunks_and_take_any_number() {
        let (mut client, mut server) = tcp_pair().await;
        let mut chunks: Vec<Bytes> = (0..GATHER * 3)
            .map(|i| Bytes::from(vec![i as u8; i % 3]))
            .collect();
        let expected: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
        {
            let (_, mut w) = client.split();
            write_all_gathered(&mut w, &mut [Bytes::new(), Bytes::new()])
                .await
                .unwrap();
            write_all_gathered(&mut w, &mut chunks).await.unwrap();
            w.shutdown().await.unwrap();
        }
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expected);
    }
}
