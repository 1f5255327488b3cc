//! Signals to a gateway's process, for the `signal` fault: only after proving the process
//! is that gateway's alone and on this host. The pid a gateway reports is checked against
//! every other gateway of the federation (the in-process demo runs them all in one
//! process), against the drill's own, and against the kernel's view of who holds the
//! gateway's admin socket here (a pid from another PID namespace, such as a container's,
//! names a different process on this host). The signal goes through a pidfd opened before
//! that check, so a pid reused meanwhile is never hit.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::scenario::Signal;
use crate::client::Admin;

/// A process proven to be one gateway's alone, held by a pidfd.
pub(super) struct GatewayProcess {
    pid: u32,
    fd: OwnedFd,
}

impl GatewayProcess {
    /// The process of the gateway whose admin API is `admin` and reports `pid`, once it is
    /// sure to be that gateway's alone and on this host; `others`: every other gateway of
    /// the federation. The error says why not, for people.
    pub(super) async fn find(
        admin: SocketAddr,
        pid: u32,
        others: &[SocketAddr],
    ) -> Result<Self, String> {
        if !admin.ip().is_loopback() {
            return Err(format!(
                "a signal needs the gateway on this host, and its admin address {admin} is not loopback"
            ));
        }
        match pid {
            0 => return Err("it does not report its process id (an older gateway)".into()),
            1 => {
                return Err(
                    "it reports pid 1 (a container's init): signal it through its runtime".into(),
                );
            }
            p if p == std::process::id() => {
                return Err("it runs in the drill's own process".into());
            }
            _ => {}
        }
        for other in others {
            match Admin::new(*other).ready().await {
                Ok((_, ready)) if ready.pid == pid => {
                    return Err(format!(
                        "it shares process {pid} with the gateway at {other}: these gateways run in one process (the in-process `strait demo`); signals need a process per gateway (`strait demo --processes`)"
                    ));
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(format!(
                        "cannot tell whether the gateway at {other} shares its process: {e:#}"
                    ));
                }
            }
        }
        let fd = pidfd_open(pid).map_err(|e| format!("pid {pid}: {e}"))?;
        if !holds_listener(pid, admin.port()) {
            return Err(format!(
                "pid {pid} holds no socket listening on {admin} here (a gateway in another PID or network namespace, such as a container?)"
            ));
        }
        Ok(GatewayProcess { pid, fd })
    }

    /// Its pid.
    pub(super) fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends it `signal` (nothing when it has exited meanwhile: ESRCH).
    pub(super) fn signal(&self, signal: Signal) -> Result<(), String> {
        // SAFETY: pidfd_send_signal(2) with a pidfd we own, a signal number, no siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal.number(),
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().to_string())
        }
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) with plain integers; a non-negative result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just opened, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether process `pid` has an open socket that listens on TCP `port` in this network
/// namespace (`/proc/net/tcp{,6}` names the socket's inode, `/proc/<pid>/fd` its holders).
fn holds_listener(pid: u32, port: u16) -> bool {
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|table| listening_inodes(&table, port))
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|link| {
            let link = link.to_string_lossy();
            inodes.iter().any(|i| link == format!("socket:[{i}]"))
        })
}

/// The inodes of the sockets in a `/proc/net/tcp` table that listen on `port`.
pub(super) fn listening_inodes(table: &str, port: u16) -> Vec<String> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = f.get(1)?;
            let p = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            (p == port && *f.get(3)? == LISTEN).then(|| f.get(9).map(|s| (*s).to_owned()))?
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_found_by_port_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1CE9 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1CE9 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1\n   2: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0\n";
        // 0x1CE9 = 7401: the listener, not the connection on the same port.
        assert_eq!(listening_inodes(table, 7401), ["4242"]);
        assert_eq!(listening_inodes(table, 8080), ["4444"]);
        assert!(listening_inodes(table, 9).is_empty());
    }

    #[tokio::test]
    async fn a_process_is_proven_to_hold_the_admin_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(holds_listener(std::process::id(), port));
        drop(listener);
        assert!(!holds_listener(std::process::id(), port));
        // The drill's own process is never signalled, even when it holds the socket.
        let admin = SocketAddr::from(([127, 0, 0, 1], port));
        let own = GatewayProcess::find(admin, std::process::id(), &[]).await;
        assert!(own.err().unwrap().contains("drill's own process"));
        let remote = GatewayProcess::find("192.0.2.1:7401".parse().unwrap(), 4242, &[]).await;
        assert!(remote.err().unwrap().contains("not loopback"));
        let init = GatewayProcess::find(admin, 1, &[]).await;
        assert!(init.err().unwrap().contains("pid 1"));
    }
}
