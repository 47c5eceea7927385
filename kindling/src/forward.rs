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
use std::time::Duration;

use kindling_proto::forward::Forward;
use kindling_vmm::devices::virtio::vsock::connection::REQUEST_TIMEOUT;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("--forward {spec}: host port {port} is already in use (another program or another kindling VM); pick a free one, e.g. --forward {alt}:{guest}")]
    InUse { spec: String, port: u16, alt: u16, guest: u16 },
    #[error("--forward {spec}: cannot listen on {addr}: {err}")]
    Listen { spec: String, addr: SocketAddr, err: std::io::Error },
    #[error("vsock socket {path}: {err}")]
    Vsock { path: PathBuf, err: std::io::Error },
    #[error("guest port {port} refused the connection (nothing listens there, or the guest is not up yet): {reply}")]
    Refused { port: u32, reply: String },
}

/// Opens a stream to guest `port` through the vsock UNIX socket at `uds`.
pub fn connect_guest(uds: &Path, port: u32) -> Result<UnixStream, ForwardError> {
    let vsock_err = |err| ForwardError::Vsock { path: uds.to_path_buf(), err };
    let mut s = UnixStream::connect(uds).map_err(vsock_err)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(vsock_err)?;
    // Read the reply a byte at a time: what follows the newline is the guest's data.
    // The VMM answers (or closes) within its own deadline for the guest; wait longer.
    let deadline = REQUEST_TIMEOUT + Duration::from_secs(5);
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
pub fn start(specs: &[Forward], uds: &Path) -> Result<(), ForwardError> {
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
                    tracing::warn!(
                        "forward {spec}: host port {} is in use; guest port {guest_port} is not forwarded",
                        addr.port()
                    );
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

fn accept_loop(listeners: Vec<(TcpListener, u16)>, uds: PathBuf) {
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
        let ready: Vec<usize> = fds
            .iter()
            .enumerate()
            .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
            .map(|(i, _)| i)
            .collect();
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
            std::thread::spawn(move || match connect_guest(&uds, u32::from(port)) {
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
