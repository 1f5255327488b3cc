//! Opening a stream to a peer gateway: send the header, wait for the remote's status.

use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream};

use super::header::{self, HeaderError, Status, StreamRequest, StreamResponse};

/// Why a stream to a peer did not become usable. Only early bytes (sent with the header)
/// can have gone out; [`OpenError::ambiguous`] tells whether they may have been delivered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// No tunnel connection to the peer is established.
    #[error("no tunnel connection to peer")]
    PeerDown,
    /// The remote gateway answered with a non-ok status.
    #[error("remote answered {}: {detail}", status.label())]
    Refused {
        /// The remote's status.
        status: Status,
        /// The remote's explanation.
        detail: String,
    },
    /// The stream could not be opened or was lost before the status arrived.
    #[error("stream failed: {0}")]
    Stream(String),
    /// The remote did not answer in time.
    #[error("remote did not answer within {0:?}")]
    Timeout(Duration),
    /// Given up while waiting for the answer: the peer stopped answering probes.
    #[error("peer stopped answering while the stream was opening")]
    Abandoned,
    /// The remote's answer was not a valid header.
    #[error(transparent)]
    Protocol(#[from] HeaderError),
}

impl OpenError {
    /// Whether another cluster may be tried: true for every failure before the remote's ok
    /// (with early bytes in flight, only if the failure is not [`OpenError::ambiguous`]; the
    /// caller checks that).
    pub fn retryable(&self) -> bool {
        match self {
            OpenError::PeerDown
            | OpenError::Stream(_)
            | OpenError::Timeout(_)
            | OpenError::Abandoned
            | OpenError::Protocol(_) => true,
            OpenError::Refused { status, .. } => *status != Status::Ok,
        }
    }

    /// Whether the remote may have acted on the request although we saw no answer (early
    /// bytes sent with the header may have reached an endpoint): a timeout or a lost
    /// stream after the header went out. Refusals and a missing connection are not.
    pub fn ambiguous(&self) -> bool {
        matches!(
            self,
            OpenError::Stream(_)
                | OpenError::Timeout(_)
                | OpenError::Abandoned
                | OpenError::Protocol(_)
        )
    }

    /// Short reason label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            OpenError::PeerDown => "peer-down",
            OpenError::Refused { status, .. } => status.label(),
            OpenError::Stream(_) => "stream-error",
            OpenError::Timeout(_) => "timeout",
            OpenError::Abandoned => "peer-unresponsive",
            OpenError::Protocol(_) => "protocol-error",
        }
    }
}

/// Opens a stream on `conn`, asks for `req`, and returns the stream once the remote says ok.
///
/// `early` is payload the client already sent: it follows the header in the same packet.
/// The remote delivers it only after connecting an endpoint (after answering ok), so on a
/// refusal it was delivered nowhere and may be sent to another cluster. On a timeout it may
/// have been delivered (the ok may be in flight): see [`OpenError::ambiguous`].
pub async fn open_stream(
    conn: &Connection,
    req: &StreamRequest,
    early: &[u8],
    timeout: Duration,
) -> Result<(SendStream, RecvStream), OpenError> {
    open_stream_until(conn, req, early, timeout, std::future::pending()).await
}

/// [`open_stream`] that gives up as [`OpenError::Abandoned`] when `abandon` completes first
/// (the peer stopped answering), or as [`OpenError::PeerDown`] if that happens while the
/// stream still waits for the peer's credit to open (nothing sent). A stream given up on
/// is reset, not finished, so the remote never takes it for a complete request.
pub async fn open_stream_until(
    conn: &Connection,
    req: &StreamRequest,
    early: &[u8],
    timeout: Duration,
    abandon: impl std::future::Future<Output = ()>,
) -> Result<(SendStream, RecvStream), OpenError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut abandon = std::pin::pin!(abandon);
    // Opening waits for the peer's stream credit; a peer that stopped answering never
    // grants more, so the wait ends with it (nothing was sent: as good as down).
    let (mut send, mut recv) = tokio::select! {
        biased;
        opened = tokio::time::timeout_at(deadline, conn.open_bi()) => opened
            // The peer is at its stream limit: nothing was sent, the next may serve it.
            .map_err(|_| OpenError::Refused {
                status: Status::Overloaded,
                detail: format!("no stream credit from the peer within {timeout:?}"),
            })?
            .map_err(|e| OpenError::Stream(e.to_string()))?,
        () = &mut abandon => return Err(OpenError::PeerDown),
    };
    let exchange = async {
        let mut first = header::encode(req);
        first.extend_from_slice(early);
        send.write_all(&first)
            .await
            .map_err(|e| OpenError::Stream(e.to_string()))?;
        let resp: StreamResponse = read_frame(&mut recv).await?;
        Ok::<_, OpenError>(resp)
    };
    let answered = tokio::select! {
        r = tokio::time::timeout_at(deadline, exchange) => r.unwrap_or(Err(OpenError::Timeout(timeout))),
        () = &mut abandon => Err(OpenError::Abandoned),
    };
    match answered {
        Ok(resp) if resp.status() == Status::Ok => Ok((send, recv)),
        Ok(resp) => Err(OpenError::Refused {
            status: resp.status(),
            detail: resp.detail,
        }),
        Err(e) => {
            let _ = send.reset(super::codes::ABANDONED);
            Err(e)
        }
    }
}

/// Reads one header frame from a stream.
pub async fn read_frame<M: prost::Message + Default>(
    recv: &mut RecvStream,
) -> Result<M, OpenError> {
    let mut prefix = [0u8; header::PREFIX_LEN];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| OpenError::Stream(e.to_string()))?;
    let len = header::parse_prefix(prefix)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| OpenError::Stream(e.to_string()))?;
    Ok(header::decode_body(&body)?)
}

/// Writes a response frame and, for refusals, finishes the stream.
pub async fn respond(
    send: &mut SendStream,
    resp: &StreamResponse,
) -> Result<(), quinn::WriteError> {
    send.write_all(&header::encode(resp)).await?;
    if resp.status() != Status::Ok {
        let _ = send.finish();
    }
    Ok(())
}
