//! Guest TCP ports offered to the host on the same vsock port numbers: the API server
//! (6443) and the NodePort range by default, or `kindling.expose=6443,30000-32767`.
//! The host's `kindling boot --forward HOST:GUEST` carries a host TCP connection to
//! vsock port GUEST; here it continues as a TCP connection to the node's address, where
//! the API server listens and kube-proxy routes NodePorts. That keeps the VMM
//! Kubernetes-agnostic and needs no guest network device.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::phase;

/// What is exposed when the command line does not say.
pub const DEFAULT_EXPOSE: &str = "6443,30000-32767";

/// Parses `6443,30000-32767` into port numbers.
pub fn parse(spec: &str) -> Result<Vec<u32>> {
    let mut ports = Vec::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u32, u32) =
            (a.parse().with_context(|| format!("port {a:?}"))?, b.parse().with_context(|| format!("port {b:?}"))?);
        anyhow::ensure!(a >= 1 && a <= b && b <= 65535, "bad port range {part:?}");
        ports.extend(a..=b);
    }
    Ok(ports)
}

/// Listens on vsock for every port and relays accepted connections to `addr:port`.
pub fn expose(ports: &[u32], addr: &str) -> Result<()> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll")?;
    let mut listeners = Vec::with_capacity(ports.len());
    for &port in ports {
        let fd = listen(port).with_context(|| format!("listening on vsock port {port}"))?;
        epoll.add(&fd, EpollEvent::new(EpollFlags::EPOLLIN, u64::from(port)))?;
        listeners.push((port, fd));
    }
    let addr = addr.to_string();
    std::thread::Builder::new().name("ports".into()).spawn(move || {
        let mut events = vec![EpollEvent::empty(); 64];
        loop {
            let n = match epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return phase::log(format!("exposed ports: epoll: {e}")),
            };
            for ev in &events[..n] {
                let port = ev.data() as u32;
                let Some((_, l)) = listeners.iter().find(|(p, _)| *p == port) else { continue };
                let Ok(conn) = nix::sys::socket::accept4(l.as_raw_fd(), nix::sys::socket::SockFlag::SOCK_CLOEXEC)
                else {
                    continue;
                };
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                let conn = Vsock(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(conn) });
                let addr = addr.clone();
                std::thread::spawn(move || relay(conn, &addr, port));
            }
        }
    })?;
    Ok(())
}

fn listen(port: u32) -> nix::Result<OwnedFd> {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};
    let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    listen(&fd, Backlog::new(64)?)?;
    Ok(fd)
}

/// An accepted vsock stream (blocking).
struct Vsock(OwnedFd);

impl Vsock {
    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
    fn shutdown(&self, how: nix::sys::socket::Shutdown) {
        let _ = nix::sys::socket::shutdown(self.0.as_raw_fd(), how);
    }
}

impl Read for Vsock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        nix::unistd::read(self.0.as_fd(), buf).map_err(std::io::Error::from)
    }
}

impl Write for Vsock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        nix::unistd::write(&self.0, buf).map_err(std::io::Error::from)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Connects to the guest TCP port and copies both ways; each side's end of data is
/// passed on as a half-close.
fn relay(vsock: Vsock, addr: &str, port: u32) {
    let tcp = match TcpStream::connect_timeout(
        &match format!("{addr}:{port}").parse() {
            Ok(a) => a,
            Err(_) => return,
        },
        Duration::from_secs(10),
    ) {
        Ok(t) => t,
        Err(_) => return vsock.shutdown(nix::sys::socket::Shutdown::Both), // nothing listens (yet)
    };
    let (Ok(mut v2), Ok(mut t2)) = (vsock.try_clone(), tcp.try_clone()) else { return };
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut v2, &mut t2);
        let _ = t2.shutdown(Shutdown::Write);
    });
    let (mut vsock, mut tcp) = (vsock, tcp);
    let _ = std::io::copy(&mut tcp, &mut vsock);
    vsock.shutdown(nix::sys::socket::Shutdown::Write);
    let _ = up.join();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists_parse() {
        assert_eq!(parse("6443").unwrap(), [6443]);
        assert_eq!(parse(DEFAULT_EXPOSE).unwrap().len(), 1 + 2768);
        assert_eq!(parse("").unwrap(), Vec::<u32>::new());
        for bad in ["0", "5-3", "70000", "x", "1-x"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
