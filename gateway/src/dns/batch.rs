//! Batched UDP for the DNS server: `recvmmsg`/`sendmmsg` on Linux (one system call for
//! up to [`BATCH`] queries each way), one datagram per call elsewhere.

use std::net::SocketAddr;

use tokio::net::UdpSocket;

/// Queries read per system call.
pub const BATCH: usize = 32;
/// Largest request read; longer ones are cut and answered FORMERR (or not at all).
const MAX_REQUEST: usize = 4096;

/// Buffers for one batch: requests in, responses out.
pub struct Batch {
    requests: Vec<[u8; MAX_REQUEST]>,
    lens: [usize; BATCH],
    peers: [Option<SocketAddr>; BATCH],
    replies: Vec<(Vec<u8>, SocketAddr)>,
    #[cfg(target_os = "linux")]
    names: Box<[libc::sockaddr_storage; BATCH]>,
}

impl Batch {
    /// Empty buffers.
    pub fn new() -> Batch {
        Batch {
            requests: vec![[0u8; MAX_REQUEST]; BATCH],
            lens: [0; BATCH],
            peers: [None; BATCH],
            replies: Vec::with_capacity(BATCH),
            // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
            #[cfg(target_os = "linux")]
            names: Box::new(unsafe { std::mem::zeroed() }),
        }
    }

    /// Reads what is waiting (at least one datagram, or `WouldBlock`).
    #[cfg(target_os = "linux")]
    pub fn receive(&mut self, socket: &UdpSocket) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        let mut iov: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.requests[i].as_mut_ptr().cast(),
            iov_len: MAX_REQUEST,
        });
        // SAFETY: mmsghdr is plain old data; every pointer set below outlives the call.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            m.msg_hdr.msg_iov = &mut iov[i];
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: msgs holds BATCH initialised headers pointing at live buffers.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, m) in msgs.iter().enumerate().take(n) {
            self.lens[i] = (m.msg_len as usize).min(MAX_REQUEST);
            self.peers[i] = to_socket_addr(&self.names[i], m.msg_hdr.msg_namelen);
        }
        Ok(n)
    }

    /// Reads one datagram (or `WouldBlock`).
    #[cfg(not(target_os = "linux"))]
    pub fn receive(&mut self, socket: &UdpSocket) -> std::io::Result<usize> {
        let (len, from) = socket.try_recv_from(&mut self.requests[0])?;
        self.lens[0] = len;
        self.peers[0] = Some(from);
        Ok(1)
    }

    /// Answers the first `n` requests with `respond`; returns how many got a response.
    pub fn answer(&mut self, n: usize, respond: impl Fn(&[u8]) -> Option<Vec<u8>>) -> usize {
        self.replies.clear();
        for i in 0..n {
            let Some(peer) = self.peers[i] else { continue };
            if let Some(reply) = respond(&self.requests[i][..self.lens[i]]) {
                self.replies.push((reply, peer));
            }
        }
        self.replies.len()
    }

    /// Sends the responses: in one call where the socket takes them all, else one by one.
    pub async fn send(&mut self, socket: &UdpSocket) {
        #[cfg(target_os = "linux")]
        let sent = self.send_many(socket);
        #[cfg(not(target_os = "linux"))]
        let sent = 0;
        for (reply, peer) in &self.replies[sent..] {
            if let Err(e) = socket.send_to(reply, *peer).await {
                tracing::debug!(error = %e, %peer, "dns udp reply failed");
            }
        }
    }

    #[cfg(target_os = "linux")]
    fn send_many(&mut self, socket: &UdpSocket) -> usize {
        use std::os::fd::AsRawFd;
        let n = self.replies.len();
        if n == 0 {
            return 0;
        }
        let names: Vec<socket2::SockAddr> = self.replies.iter().map(|(_, p)| (*p).into()).collect();
        let mut iov: Vec<libc::iovec> = self
            .replies
            .iter_mut()
            .map(|(r, _)| libc::iovec {
                iov_base: r.as_mut_ptr().cast(),
                iov_len: r.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain old data; every pointer set below outlives the call.
        let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_name = names[i].as_ptr() as *mut libc::c_void;
            m.msg_hdr.msg_namelen = names[i].len();
            m.msg_hdr.msg_iov = &mut iov[i];
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: n initialised headers pointing at live buffers and addresses.
        let sent = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as u32,
                libc::MSG_DONTWAIT,
            )
        };
        drop(names);
        sent.max(0) as usize
    }
}

#[cfg(target_os = "linux")]
fn to_socket_addr(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    let len = len as usize;
    match i32::from(s.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}
