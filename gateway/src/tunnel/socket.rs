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
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, rules: Arc<ArcSwapOption<PacketRules>>) -> Self {
        let (tx, rx) = mpsc::channel::<Delayed>(DELAY_QUEUE);
        tokio::spawn(send_delayed(Arc::downgrade(&inner), rules.clone(), rx));
        FaultSocket {
            inner,
            rules,
            delayed: tx,
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
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
