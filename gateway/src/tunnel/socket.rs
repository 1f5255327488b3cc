//! The tunnel's UDP socket with a fault layer: packets to or from chosen peers can be
//! dropped, lost at random or sent late. With no fault active it costs one atomic load per
//! batch of packets.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rand::Rng;
use tokio::sync::mpsc;

use strait_common::api::Direction;

/// Packets on their way to the delay queue at most.
const DELAY_QUEUE: usize = 8192;
/// Bytes held back by delay faults at most; beyond that packets are dropped, as a router
/// queue would drop them.
const DELAY_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq)]
enum Action {
    Drop,
    Lose(f64),
    Delay(Duration),
}

#[derive(Debug, Clone, PartialEq)]
struct Rule {
    /// Peer addresses it applies to; `None`: every address.
    peers: Option<Vec<SocketAddr>>,
    direction: Direction,
    action: Action,
}

/// What happens to packets, as decided by the active faults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PacketRules {
    rules: Vec<Rule>,
}

/// The fate of one packet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Passes untouched.
    Pass,
    /// Vanishes.
    Drop,
    /// Leaves this much later (outgoing packets only).
    Delay(Duration),
}

impl PacketRules {
    /// Drops every packet to/from `peers` (all when `None`).
    pub fn drop(&mut self, peers: Option<Vec<SocketAddr>>, direction: Direction) {
        self.push(peers, direction, Action::Drop);
    }

    /// Drops a random `fraction` of packets to/from `peers`.
    pub fn lose(&mut self, peers: Option<Vec<SocketAddr>>, fraction: f64, direction: Direction) {
        self.push(peers, direction, Action::Lose(fraction));
    }

    /// Sends packets to `peers` `latency` late.
    pub fn delay(&mut self, peers: Option<Vec<SocketAddr>>, latency: Duration) {
        self.push(peers, Direction::To, Action::Delay(latency));
    }

    fn push(&mut self, peers: Option<Vec<SocketAddr>>, direction: Direction, action: Action) {
        self.rules.push(Rule {
            peers,
            direction,
            action,
        });
    }

    /// Whether no rule is set.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The fate of a packet to (`outgoing`) or from `addr`; `roll` draws in 0..1 for loss.
    pub fn verdict(
        &self,
        addr: SocketAddr,
        outgoing: bool,
        roll: &mut impl FnMut() -> f64,
    ) -> Verdict {
        let addr = canonical(addr);
        let mut delay = Duration::ZERO;
        for r in &self.rules {
            let way = match r.direction {
                Direction::Both => true,
                Direction::To => outgoing,
                Direction::From => !outgoing,
            };
            let whom = r
                .peers
                .as_ref()
                .is_none_or(|ps| ps.iter().any(|p| canonical(*p) == addr));
            if !(way && whom) {
                continue;
            }
            match r.action {
                Action::Drop => return Verdict::Drop,
                Action::Lose(p) if roll() < p => return Verdict::Drop,
                Action::Lose(_) => {}
                Action::Delay(d) => delay = delay.max(d),
            }
        }
        if delay.is_zero() {
            Verdict::Pass
        } else {
            Verdict::Delay(delay)
        }
    }
}

/// IPv4-mapped IPv6 addresses (dual-stack sockets) compare equal to their IPv4 form.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A packet held back by a delay fault.
#[derive(PartialEq, Eq)]
struct Delayed {
    due: Instant,
    destination: SocketAddr,
    contents: Vec<u8>,
    segment_size: Option<usize>,
    src_ip: Option<std::net::IpAddr>,
}

impl Ord for Delayed {
    /// Earliest due first (for the max-heap).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.due.cmp(&self.due)
    }
}

impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Sends held-back packets when due, earliest first (a short delay to one peer is not
/// stuck behind a long one to another). A packet whose peer has since been blackholed or
/// killed is dropped then, as it would be on the wire.
async fn send_delayed(
    // Weak: the socket closes when the endpoint lets go of it, not when this task notices.
    inner: std::sync::Weak<dyn AsyncUdpSocket>,
    rules: Arc<ArcSwapOption<PacketRules>>,
    mut rx: mpsc::Receiver<Delayed>,
) {
    let mut heap = std::collections::BinaryHeap::<Delayed>::new();
    let mut bytes = 0usize;
    loop {
        let next = heap.peek().map(|d| d.due);
        tokio::select! {
            got = rx.recv() => match got {
                Some(d) if bytes + d.contents.len() <= DELAY_BYTES => {
                    bytes += d.contents.len();
                    heap.push(d);
                }
                Some(_) => {}
                None => return,
            },
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now).into()), if next.is_some() => {
                let now = Instant::now();
                while heap.peek().is_some_and(|d| d.due <= now) {
                    let Some(d) = heap.pop() else { break };
                    bytes -= d.contents.len();
                    let dropped = rules.load().as_ref().is_some_and(|r| {
                        r.verdict(d.destination, true, &mut || 1.0) == Verdict::Drop
                    });
                    if dropped {
                        continue;
                    }
                    let Some(inner) = inner.upgrade() else { return };
                    // A full socket buffer loses the packet, as a congested link would.
                    let _ = inner.try_send(&Transmit {
                        destination: d.destination,
                        ecn: None,
                        contents: &d.contents,
                        segment_size: d.segment_size,
                        src_ip: d.src_ip,
                    });
                }
            }
        }
    }
}

/// Wraps the runtime's UDP socket; consults the rules on every send and receive.
pub struct FaultSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    rules: Arc<ArcSwapOption<PacketRules>>,
    delayed: mpsc::Sender<Delayed>,
    /// Most datagrams one GSO send may carry (see [`gso_segments`]).
    max_segments: usize,
}

/// Most bytes one segmented (GSO) send may carry: the kernel refuses a batch whose total
/// exceeds an IP packet's 64 KiB (`EMSGSIZE`), and quinn-udp drops the whole batch then.
const GSO_MAX_BYTES: usize = 65_000;

/// How many datagrams of up to `max_udp_payload` bytes one GSO send may carry, at most
/// `offered` (the socket's own limit). quinn batches up to ten full-size datagrams; at
/// jumbo-frame sizes (ten of 8,952 bytes) that batch is over the kernel's limit and every
/// full batch would be lost.
pub(super) fn gso_segments(offered: usize, max_udp_payload: u16) -> usize {
    offered
        .min(GSO_MAX_BYTES / usize::from(max_udp_payload.max(1)))
        .max(1)
}

impl FaultSocket {
    /// Holders of the runtime's socket besides this one: the endpoint's I/O pollers.
    pub(super) fn other_users(&self) -> usize {
        Arc::strong_count(&self.inner) - 1
    }
}

impl fmt::Debug for FaultSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultSocket")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl FaultSocket {
    /// Wraps `inner`; must be called inside a tokio runtime (delayed packets are sent by a
    /// task that lives as long as the socket).
    /// Datagrams are at most `max_udp_payload` bytes.
    pub fn new(
        inner: Arc<dyn AsyncUdpSocket>,
        rules: Arc<ArcSwapOption<PacketRules>>,
        max_udp_payload: u16,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Delayed>(DELAY_QUEUE);
        tokio::spawn(send_delayed(Arc::downgrade(&inner), rules.clone(), rx));
        let max_segments = gso_segments(inner.max_transmit_segments(), max_udp_payload);
        FaultSocket {
            inner,
            rules,
            delayed: tx,
            max_segments,
        }
    }
}

impl AsyncUdpSocket for FaultSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        let guard = self.rules.load();
        let Some(rules) = guard.as_ref() else {
            return self.inner.try_send(t);
        };
        let mut rng = rand::rng();
        let mut roll = || rng.random::<f64>();
        // A batch (GSO) is judged packet by packet, so loss hits single packets.
        let size = t.segment_size.unwrap_or(t.contents.len()).max(1);
        let verdicts: Vec<Verdict> = t
            .contents
            .chunks(size)
            .map(|_| rules.verdict(t.destination, true, &mut roll))
            .collect();
        if verdicts.iter().all(|v| *v == Verdict::Pass) {
            return self.inner.try_send(t);
        }
        for (chunk, v) in t.contents.chunks(size).zip(verdicts) {
            match v {
                Verdict::Drop => {}
                Verdict::Pass => {
                    let one = Transmit {
                        destination: t.destination,
                        ecn: t.ecn,
                        contents: chunk,
                        segment_size: None,
                        src_ip: t.src_ip,
                    };
                    // Part of the batch is already gone: losing the rest to a full buffer
                    // is just more loss, and WouldBlock would make quinn resend all of it.
                    let _ = self.inner.try_send(&one);
                }
                Verdict::Delay(d) => {
                    let _ = self.delayed.try_send(Delayed {
                        due: Instant::now() + d,
                        destination: t.destination,
                        contents: chunk.to_vec(),
                        segment_size: None,
                        src_ip: t.src_ip,
                    });
                }
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let polled = self.inner.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(n)) = &polled {
            let guard = self.rules.load();
            if let Some(rules) = guard.as_ref() {
                let mut rng = rand::rng();
                let mut roll = || rng.random::<f64>();
                for m in &mut meta[..*n] {
                    // An empty buffer is skipped by the endpoint: the packet never arrived.
                    // (A coalesced receive is judged as one.)
                    if rules.verdict(m.addr, false, &mut roll) == Verdict::Drop {
                        m.len = 0;
                    }
                }
            }
        }
        polled
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        // The socket's own limit can drop later (quinn-udp lowers it when GSO fails).
        self.inner.max_transmit_segments().min(self.max_segments)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gso_batch_of_full_size_datagrams_fits_an_ip_packet() {
        // quinn offers ten; ten of 1,452 bytes fit, ten jumbo frames (8,952) do not.
        assert_eq!(gso_segments(10, 1452), 10);
        assert_eq!(gso_segments(10, 8952), 7);
        assert_eq!(gso_segments(10, 6500), 10);
        // At the largest payload, one datagram per send: no GSO.
        assert_eq!(gso_segments(10, 65527), 1);
        // Never more than the socket offers (no GSO there: one).
        assert_eq!(gso_segments(1, 1200), 1);
        // A batch (more than one datagram) always fits in one IPv4 packet's payload.
        for payload in [1200u16, 1452, 4000, 8952, 9000, 16000, 40000, 65527] {
            let n = gso_segments(64, payload);
            assert!(
                n == 1 || n * usize::from(payload) <= 65_507,
                "{n} of {payload}"
            );
        }
    }

    #[tokio::test]
    async fn the_tunnel_socket_offers_quinn_no_batch_over_the_kernel_limit() {
        let runtime = quinn::default_runtime().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let inner = runtime.wrap_udp_socket(udp).unwrap();
        let offered = inner.max_transmit_segments();
        let socket = FaultSocket::new(inner, Arc::new(ArcSwapOption::empty()), 8952);
        let segments = socket.max_transmit_segments();
        assert!(segments >= 1 && segments <= offered);
        assert!(
            segments * 8952 <= 65_507,
            "{segments} segments of 8,952 bytes"
        );
    }
}
