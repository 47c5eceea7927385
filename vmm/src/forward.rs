//! Host TCP ports forwarded to guest ports over vsock (`kindling boot --forward`).
//!
//! A forward listens on a host address; each accepted connection opens a stream to the
//! guest through the VMM's vsock UNIX socket with Firecracker's hybrid-vsock handshake
//! (`CONNECT <port>\n`, answered `OK <n>\n`), then copies bytes both ways. It needs no
//! root, no TAP and no guest network, and works the same through the emulated runner,
//! whose outer process offers the vsock socket by relaying to the level-1 VM.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// `[ADDR:]HOSTPORT:GUESTPORT`, or a range `[ADDR:]A-B:C-D` of equal length; ADDR
/// defaults to 127.0.0.1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardSpec {
    /// The first host address (a range continues with the following ports).
    pub host: SocketAddr,
    pub guest_port: u32,
    /// Number of consecutive ports (1 for a single port).
    pub count: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("--forward {0:?}: expected [ADDR:]HOSTPORT:GUESTPORT, e.g. 16443:6443 or 0.0.0.0:8080:80")]
    Syntax(String),
    #[error("--forward {spec}: host port {port} is already in use (another program or another kindling VM); pick a free one, e.g. --forward {alt}:{guest}")]
    InUse { spec: String, port: u16, alt: u16, guest: u32 },
    #[error("--forward {spec}: cannot listen on {addr}: {err}")]
    Listen { spec: String, addr: SocketAddr, err: std::io::Error },
    #[error("vsock socket {path}: {err}")]
    Vsock { path: PathBuf, err: std::io::Error },
    #[error("guest port {port} refused the connection (nothing listens there, or the guest is not up yet): {reply}")]
    Refused { port: u32, reply: String },
}

impl FromStr for ForwardSpec {
    type Err = ForwardError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ForwardError::Syntax(s.to_string());
        // "A-B" or "A" -> (A, B - A + 1)
        let range = |r: &str| -> Result<(u32, u32), ForwardError> {
            let (a, b) = match r.split_once('-') {
                Some((a, b)) => (a.parse::<u32>().map_err(|_| bad())?, b.parse::<u32>().map_err(|_| bad())?),
                None => {
                    let a = r.parse::<u32>().map_err(|_| bad())?;
                    (a, a)
                }
            };
            if a == 0 || b > 65535 || b < a {
                return Err(bad());
            }
            Ok((a, b - a + 1))
        };
        let (host, guest) = s.rsplit_once(':').ok_or_else(bad)?;
        let (guest_port, guest_count) = range(guest)?;
        let (addr, host_ports) = match host.rsplit_once(':') {
            None => (std::net::IpAddr::from([127, 0, 0, 1]), host),
            Some((addr, ports)) => (addr.trim_start_matches('[').trim_end_matches(']').parse().map_err(|_| bad())?, ports),
        };
        let (host_port, host_count) = range(host_ports)?;
        if host_count != guest_count {
            return Err(bad());
        }
        Ok(Self { host: SocketAddr::new(addr, host_port as u16), guest_port, count: host_count as u16 })
    }
}

impl std::fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.count <= 1 {
            write!(f, "{}:{}", self.host, self.guest_port)
        } else {
            let last = |p: u32| p + u32::from(self.count) - 1;
            write!(f, "{}-{}:{}-{}", self.host, last(u32::from(self.host.port())), self.guest_port, last(self.guest_port))
        }
    }
}

impl ForwardSpec {
    /// (host address, guest port) of every port in the spec.
    pub fn pairs(&self) -> impl Iterator<Item = (SocketAddr, u32)> + '_ {
        (0..self.count).map(move |i| (SocketAddr::new(self.host.ip(), self.host.port() + i), self.guest_port + u32::from(i)))
    }
}

/// Opens a stream to guest `port` through the vsock UNIX socket at `uds`.
pub fn connect_guest(uds: &Path, port: u32) -> Result<UnixStream, ForwardError> {
    let vsock_err = |err| ForwardError::Vsock { path: uds.to_path_buf(), err };
    let mut s = UnixStream::connect(uds).map_err(vsock_err)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(vsock_err)?;
    // Read the reply a byte at a time: what follows the newline is the guest's data.
    // The VMM answers (or closes) within its own deadline for the guest; wait longer.
    let deadline = crate::devices::virtio::vsock::connection::REQUEST_TIMEOUT + Duration::from_secs(5);
    s.set_read_timeout(Some(deadline)).map_err(vsock_err)?;
    let mut reply = Vec::new();
    let mut byte = [0u8];
    let mut ended = "";
    while reply.len() < 64 {
        match s.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => reply.push(byte[0]),
            Ok(_) => {
                ended = "(closed without an answer: the guest refused it or did not answer in time)";
                break;
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                ended = "(no answer in time)";
                break;
            }
            Err(e) if reply.is_empty() => return Err(vsock_err(e)),
            Err(_) => break,
        }
    }
    let reply = if reply.is_empty() { ended.to_string() } else { String::from_utf8_lossy(&reply).into_owned() };
    if !reply.starts_with("OK ") {
        return Err(ForwardError::Refused { port, reply });
    }
    s.set_read_timeout(None).map_err(vsock_err)?;
    Ok(s)
}

/// Binds every forward's host address up front, so a port in use fails the boot before
/// the VM starts, then serves them all from one thread for the life of the process.
/// In a range, ports already in use are skipped with a warning (a NodePort range is
/// forwarded best-effort); a single port in use is an error.
pub fn start(specs: &[ForwardSpec], uds: &Path) -> Result<(), ForwardError> {
    raise_fd_limit();
    let mut listeners = Vec::new();
    for spec in specs {
        for (addr, guest_port) in spec.pairs() {
            match TcpListener::bind(addr) {
                Ok(l) => listeners.push((l, guest_port)),
                Err(err) if err.raw_os_error() == Some(libc::EMFILE) && spec.count > 1 => {
                    tracing::warn!(
                        "forward {spec}: out of file descriptors at host port {} (raise `ulimit -n`); the rest of the range is not forwarded",
                        addr.port()
                    );
                    break;
                }
                Err(err) if err.kind() == std::io::ErrorKind::AddrInUse && spec.count > 1 => {
                    tracing::warn!("forward {spec}: host port {} is in use; guest port {guest_port} is not forwarded", addr.port());
                }
                Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
                    return Err(ForwardError::InUse {
                        spec: spec.to_string(),
                        port: addr.port(),
                        alt: addr.port().checked_add(1).unwrap_or(1024),
                        guest: guest_port,
                    })
                }
                Err(err) => return Err(ForwardError::Listen { spec: spec.to_string(), addr, err }),
            }
        }
    }
    if listeners.is_empty() {
        return Ok(());
    }
    let uds = uds.to_path_buf();
    std::thread::Builder::new()
        .name("forwards".into())
        .spawn(move || accept_loop(listeners, uds))
        .expect("spawning the forward thread");
    Ok(())
}

/// A forward takes one descriptor per port (thousands for a NodePort range), and a
/// user's soft limit is often 1024: raise it to the hard limit, as servers do.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!("raising the open-file limit to {hard}: {e}");
            }
        }
    }
}

fn accept_loop(listeners: Vec<(TcpListener, u32)>, uds: PathBuf) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    loop {
        let mut fds: Vec<PollFd> = listeners.iter().map(|(l, _)| PollFd::new(l.as_fd(), PollFlags::POLLIN)).collect();
        if let Err(e) = poll(&mut fds, PollTimeout::NONE) {
            if e != nix::errno::Errno::EINTR {
                tracing::error!("forwards: poll: {e}");
                return;
            }
            continue;
        }
        let ready: Vec<usize> = fds.iter().enumerate().filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty())).map(|(i, _)| i).collect();
        drop(fds);
        for i in ready {
            let (listener, port) = &listeners[i];
            let (conn, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, say: the listener stays readable, so pause
                    // rather than spin.
                    tracing::warn!("forward to guest port {port}: accept: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            let (uds, port) = (uds.clone(), *port);
            std::thread::spawn(move || match connect_guest(&uds, port) {
                Ok(guest) => splice(conn, guest),
                Err(e) => {
                    tracing::warn!("forward {peer} -> guest port {port}: {e}");
                    let _ = conn.shutdown(Shutdown::Both);
                }
            });
        }
    }
}

/// Either end of a forwarded connection.
pub trait Stream: Read + Write + Send + 'static {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>>;
    fn shutdown_write(&self);
    fn shutdown_both(&self);
}

/// TCP and UNIX streams are both sockets: the same three calls.
macro_rules! socket_stream {
    ($($t:ty),*) => {$(
        impl Stream for $t {
            fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>> {
                Ok(Box::new(self.try_clone()?))
            }
            fn shutdown_write(&self) {
                let _ = self.shutdown(Shutdown::Write);
            }
            fn shutdown_both(&self) {
                let _ = self.shutdown(Shutdown::Both);
            }
        }
    )*};
}
socket_stream!(TcpStream, UnixStream);

/// Copies bytes both ways until both directions are done; each direction's end is
/// passed on as a half-close, so request/response protocols see their EOF.
pub fn splice(a: impl Stream, b: impl Stream) {
    let (Ok(mut a2), Ok(mut b2)) = (a.try_clone_box(), b.try_clone_box()) else {
        a.shutdown_both();
        b.shutdown_both();
        return;
    };
    let (mut a, mut b) = (a, b);
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut a2, &mut b2);
        b2.shutdown_write();
    });
    let _ = std::io::copy(&mut b, &mut a);
    a.shutdown_write();
    let _ = t.join();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn specs_parse_with_and_without_an_address() {
        let s: ForwardSpec = "16443:6443".parse().unwrap();
        assert_eq!((s.host.to_string(), s.guest_port, s.count), ("127.0.0.1:16443".to_string(), 6443, 1));
        let r: ForwardSpec = "30000-32767:30000-32767".parse().unwrap();
        assert_eq!((r.count, r.pairs().last().unwrap().1), (2768, 32767));
        assert_eq!(r.to_string(), "127.0.0.1:30000-32767:30000-32767");
        let s: ForwardSpec = "0.0.0.0:8080:80".parse().unwrap();
        assert_eq!(s.host.to_string(), "0.0.0.0:8080");
        let s: ForwardSpec = "[::1]:8080:80".parse().unwrap();
        assert_eq!(s.host.to_string(), "[::1]:8080");
        for bad in ["", "6443", "a:b", "1:0", "1:70000", "70000:1", "x.y:1:2", "1-3:1-2", "5-1:5-1"] {
            assert!(bad.parse::<ForwardSpec>().is_err(), "{bad}");
        }
    }

    /// A stand-in for the VMM's vsock socket with a real UNIX listener: answers the
    /// handshake like the device does, then echoes, upper-cased.
    fn fake_guest(dir: &Path, accept: bool) -> PathBuf {
        let path = dir.join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut line = Vec::new();
                let mut b = [0u8];
                while c.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                assert_eq!(line, b"CONNECT 6443");
                if !accept {
                    continue; // dropped: the device closes refused connections
                }
                c.write_all(b"OK 1073741824\n").unwrap();
                let mut data = Vec::new();
                c.read_to_end(&mut data).unwrap();
                c.write_all(&data.to_ascii_uppercase()).unwrap();
            }
        });
        path
    }

    #[test]
    fn forwards_a_tcp_connection_with_half_close() {
        let d = tempfile::tempdir().unwrap();
        let uds = fake_guest(d.path(), true);
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        start(&[format!("{port}:6443").parse().unwrap()], &uds).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"hello guest").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = String::new();
        c.read_to_string(&mut back).unwrap();
        assert_eq!(back, "HELLO GUEST");
    }

    #[test]
    fn a_port_in_use_is_refused_up_front_and_a_refusing_guest_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let uds = fake_guest(d.path(), false);
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = start(&[format!("{port}:6443").parse().unwrap()], &uds).unwrap_err();
        assert!(err.to_string().contains("already in use"), "{err}");
        assert!(matches!(connect_guest(&uds, 6443), Err(ForwardError::Refused { .. })));
        assert!(matches!(connect_guest(&d.path().join("missing.sock"), 6443), Err(ForwardError::Vsock { .. })));
    }
}
