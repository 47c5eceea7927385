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

use kindling_proto::forward::{
    parse_guest_forwards, Forward, GuestForward, GUEST_FORWARDS_PORT, MAX_GUEST_FORWARDS_BYTES,
};
use kindling_vmm::devices::virtio::vsock::connection::REQUEST_TIMEOUT;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("--forward {spec}: host port {port} is already in use (another program or another kindling VM); pick a free one, e.g. --forward {alt}:{guest}")]
    InUse { spec: String, port: u16, alt: u16, guest: u16 },
    #[error("--forward {spec}: cannot listen on {addr}: {err}")]
    Listen { spec: String, addr: SocketAddr, err: std::io::Error },
    #[error("vsock socket {path}: {err}")]
    Vsock { path: PathBuf, err: std::io::Error },
    #[error("starting the forwards' thread: {err}")]
    Thread { err: std::io::Error },
    #[error("guest port {port} refused the connection (nothing listens there, or the guest is not up yet): {reply}")]
    Refused { port: u32, reply: String },
}

/// Sockets this process connects to through a descriptor (see [`keep_reachable`]).
static BY_DESCRIPTOR: std::sync::Mutex<Vec<(PathBuf, std::os::fd::OwnedFd)>> = std::sync::Mutex::new(Vec::new());

/// Keeps the socket `uds` reachable for this process's forwards once the VMM dropped
/// root (see `privileges`): an O_PATH descriptor of it, through which
/// `/proc/self/fd/N` connects without searching the directories on the way there (a
/// 0700 directory of root's, such as a root daemon's VM directory). Connecting still
/// needs write permission on the socket itself, which is handed to the VMM's user.
pub fn keep_reachable(uds: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let fd = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH | libc::O_CLOEXEC).open(uds)?;
    BY_DESCRIPTOR.lock().unwrap_or_else(|e| e.into_inner()).push((uds.to_path_buf(), fd.into()));
    Ok(())
}

/// Where to connect to reach `uds`: its descriptor's `/proc/self/fd/N` when
/// [`keep_reachable`] kept one, else the path itself.
fn reachable(uds: &Path) -> PathBuf {
    use std::os::fd::AsRawFd;
    let kept = BY_DESCRIPTOR.lock().unwrap_or_else(|e| e.into_inner());
    match kept.iter().find(|(p, _)| p == uds) {
        Some((_, fd)) => PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
        None => uds.to_path_buf(),
    }
}

/// Opens a stream to guest `port` through the vsock UNIX socket at `uds`.
pub fn connect_guest(uds: &Path, port: u32) -> Result<UnixStream, ForwardError> {
    let vsock_err = |err| ForwardError::Vsock { path: uds.to_path_buf(), err };
    let mut s = UnixStream::connect(reachable(uds)).map_err(vsock_err)?;
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

/// Connections one forward (a port, or a range such as the NodePorts) carries at once;
/// more wait in the listen queue. Any local user can open them, so they are bounded:
/// one forward cannot starve another, and all of them together leave room on the
/// guest's vsock device (1024 connections) for the VM owner's own connections.
pub const MAX_PER_FORWARD: usize = 256;
/// Connections all forwards of a VM carry at once.
pub const MAX_FORWARDED: usize = 512;

/// A counted budget of connections; a slot is given back when dropped.
#[derive(Clone, Debug)]
pub struct ConnLimit {
    used: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    max: usize,
}

/// A connection's place in a [`ConnLimit`].
#[derive(Debug)]
pub struct Slot(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl ConnLimit {
    /// A budget of `max` connections.
    pub fn new(max: usize) -> Self {
        Self { used: Default::default(), max }
    }

    /// A slot, or None when all `max` are taken.
    pub fn take(&self) -> Option<Slot> {
        use std::sync::atomic::Ordering;
        self.used.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.max).then_some(n + 1)).ok()?;
        Some(Slot(self.used.clone()))
    }

    /// Slots in use.
    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Binds every forward's host address up front, so a port in use fails the boot before
/// the VM starts, then serves them all from one thread for the life of the process.
/// In a range, ports already in use are skipped with a warning (a NodePort range is
/// forwarded best-effort); a single port in use is an error.
pub fn start(specs: &[Forward], uds: &Path) -> Result<(), ForwardError> {
    raise_fd_limit();
    let total = ConnLimit::new(MAX_FORWARDED);
    let mut listeners = Vec::new();
    for spec in specs {
        let per_forward = ConnLimit::new(MAX_PER_FORWARD);
        for (addr, guest_port) in spec.pairs() {
            match TcpListener::bind(addr) {
                Ok(l) => listeners.push(Listener { listener: l, guest_port, limit: per_forward.clone() }),
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
        .spawn(move || accept_loop(listeners, uds, total))
        .map_err(|err| ForwardError::Thread { err })?;
    Ok(())
}

/// One forwarded host port.
struct Listener {
    listener: TcpListener,
    guest_port: u16,
    /// The budget of the forward this port belongs to.
    limit: ConnLimit,
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

fn accept_loop(listeners: Vec<Listener>, uds: PathBuf, total: ConnLimit) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    loop {
        // A forward whose budget is spent is not polled: its connections wait in the
        // listen queue until one of its own closes.
        let mut polled = Vec::new();
        let mut fds = Vec::new();
        for (i, l) in listeners.iter().enumerate() {
            if has_room(&l.limit, &total) {
                fds.push(PollFd::new(l.listener.as_fd(), PollFlags::POLLIN));
                polled.push(i);
            }
        }
        if fds.is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(50));
            continue;
        }
        if let Err(e) = poll(&mut fds, PollTimeout::from(100u16)) {
            if e != nix::errno::Errno::EINTR {
                tracing::error!("forwards: poll: {e}");
                return;
            }
            continue;
        }
        let ready: Vec<usize> = fds
            .iter()
            .zip(&polled)
            .filter(|(f, _)| f.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, i)| *i)
            .collect();
        drop(fds);
        for i in ready {
            let Listener { listener, guest_port: port, limit } = &listeners[i];
            accept_and_carry(listener, &uds, *port, limit, &total);
        }
    }
}

/// Whether a forward may take one more connection: its own budget `limit` and the
/// budget `total` it shares with others both have room.
fn has_room(limit: &ConnLimit, total: &ConnLimit) -> bool {
    limit.used() < limit.max && total.used() < total.max
}

/// Accepts one connection on `listener` within both budgets and carries it to guest
/// `port`.
fn accept_and_carry(listener: &TcpListener, uds: &Path, port: u16, limit: &ConnLimit, total: &ConnLimit) {
    let (Some(slot), Some(total_slot)) = (limit.take(), total.take()) else { return };
    match listener.accept() {
        Ok((conn, peer)) => carry(conn, peer, uds, port, (slot, total_slot)),
        Err(e) => {
            // Out of descriptors, say: the listener stays readable, so pause rather
            // than spin.
            tracing::warn!("forward to guest port {port}: accept: {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Carries the accepted `conn` to guest `port` on a thread of its own, holding `slots`
/// until it ends.
fn carry(conn: TcpStream, peer: SocketAddr, uds: &Path, port: u16, slots: (Slot, Slot)) {
    let uds = uds.to_path_buf();
    let spawned = std::thread::Builder::new().name("forward".into()).spawn(move || {
        let _slots = slots;
        match connect_guest(&uds, u32::from(port)) {
            Ok(guest) => splice(conn, guest),
            Err(e) => {
                tracing::warn!("forward {peer} -> guest port {port}: {e}");
                let _ = conn.shutdown(Shutdown::Both);
            }
        }
    });
    // Out of threads: this connection is dropped (closed), the forward goes on.
    if let Err(e) = spawned {
        tracing::warn!("forward to guest port {port}: cannot start a thread: {e}");
    }
}

/// How often the guest's list of forwards is asked for.
const GUEST_POLL: Duration = Duration::from_secs(2);
/// Connections all of a guest's own forwards carry at once: with [`MAX_FORWARDED`],
/// three quarters of the vsock device's 1024.
pub const MAX_GUEST_FORWARDED: usize = 256;

/// Follows the forwards the guest asks for (`kindling boot --guest-forwards`): every
/// [`GUEST_POLL`] asks vsock port [`GUEST_FORWARDS_PORT`] for the list, listens on
/// 127.0.0.1 for each new host port, and stops listening on those no longer listed
/// (their open connections go on). A guest that does not answer keeps what it had:
/// while it boots, or is paused for a snapshot. A list that breaks the rules
/// ([`parse_guest_forwards`]) is refused whole and said once. A host port in use is
/// said once and tried again while listed.
pub fn follow_guest(uds: &Path) -> Result<(), ForwardError> {
    let uds = uds.to_path_buf();
    std::thread::Builder::new()
        .name("guest-forwards".into())
        .spawn(move || {
            let total = ConnLimit::new(MAX_GUEST_FORWARDED);
            let mut open: std::collections::BTreeMap<GuestForward, GuestListener> = Default::default();
            let mut said = String::new();
            loop {
                std::thread::sleep(GUEST_POLL);
                let wanted = match guest_list(&uds) {
                    Ok(w) => w,
                    Err(e) => {
                        if e != said {
                            tracing::debug!("guest forwards: {e}");
                            said = e;
                        }
                        continue;
                    }
                };
                open.retain(|f, _| {
                    let keep = wanted.contains(f);
                    if !keep {
                        tracing::info!(
                            "guest forward 127.0.0.1:{} -> guest port {}: no longer asked for, closed",
                            f.host_port,
                            f.guest_port
                        );
                    }
                    keep
                });
                for f in wanted {
                    if open.contains_key(&f) {
                        continue;
                    }
                    match GuestListener::start(f, &uds, &total) {
                        Ok(l) => {
                            tracing::info!(
                                "guest forward 127.0.0.1:{} -> guest port {}: listening",
                                f.host_port,
                                f.guest_port
                            );
                            open.insert(f, l);
                        }
                        Err(e) => {
                            let e =
                                format!("guest forward 127.0.0.1:{} -> guest port {}: {e}", f.host_port, f.guest_port);
                            if e != said {
                                tracing::warn!("{e}");
                                said = e;
                            }
                        }
                    }
                }
            }
        })
        .map_err(|err| ForwardError::Thread { err })?;
    Ok(())
}

/// The guest's list, read through a short-lived vsock connection (bounded in size and time).
fn guest_list(uds: &Path) -> Result<Vec<GuestForward>, String> {
    let mut s = connect_guest(uds, GUEST_FORWARDS_PORT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let mut text = Vec::new();
    (&mut s)
        .take(MAX_GUEST_FORWARDS_BYTES as u64 + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("reading the guest's forward list: {e}"))?;
    parse_guest_forwards(&text)
}

/// A host port listening for one of the guest's forwards, until dropped.
struct GuestListener {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for GuestListener {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl GuestListener {
    fn start(f: GuestForward, uds: &Path, total: &ConnLimit) -> std::io::Result<Self> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let listener = TcpListener::bind(SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, f.host_port)))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, uds, total, limit) =
            (stop.clone(), uds.to_path_buf(), total.clone(), ConnLimit::new(MAX_PER_FORWARD));
        std::thread::Builder::new().name("guest-forward".into()).spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                if !has_room(&limit, &total) {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                // Polled, so that a stop is seen within 200 ms (the sandbox allows no
                // ioctl for a non-blocking listener).
                match poll(&mut fds, PollTimeout::from(200u16)) {
                    Ok(0) => continue,
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::error!("guest forward to guest port {}: poll: {e}", f.guest_port);
                        return;
                    }
                }
                accept_and_carry(&listener, &uds, f.guest_port, &limit, &total);
            }
        })?;
        Ok(Self { stop })
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
    let t = std::thread::Builder::new().name("splice".into()).spawn(move || {
        let _ = std::io::copy(&mut a2, &mut b2);
        b2.shutdown_write();
    });
    let Ok(t) = t else {
        // Out of threads: give up this connection rather than the process.
        a.shutdown_both();
        b.shutdown_both();
        return;
    };
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

    /// A guest that lists its forwards on vsock port 1025 (what `list` holds at the time)
    /// and echoes, upper-cased, on any other port.
    fn listing_guest(dir: &Path, list: std::sync::Arc<std::sync::Mutex<String>>) -> PathBuf {
        let path = dir.join("g.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let list = list.clone();
                std::thread::spawn(move || {
                    let mut line = Vec::new();
                    let mut b = [0u8];
                    while c.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                        line.push(b[0]);
                    }
                    let _ = c.write_all(b"OK 1073741824\n");
                    if line == format!("CONNECT {GUEST_FORWARDS_PORT}").as_bytes() {
                        let _ = c.write_all(list.lock().unwrap().as_bytes());
                        return;
                    }
                    let mut data = vec![0u8; 5];
                    if c.read_exact(&mut data).is_ok() {
                        let _ = c.write_all(&data.to_ascii_uppercase());
                    }
                });
            }
        });
        path
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Polls `check` every 100 ms for up to 10 s.
    fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let t0 = std::time::Instant::now();
        while !check() {
            assert!(t0.elapsed() < Duration::from_secs(10), "{what}: not within 10 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn echo(port: u16) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"hello").ok()?;
        let mut got = vec![0u8; 5];
        s.read_exact(&mut got).ok()?;
        String::from_utf8(got).ok()
    }

    /// The guest's list opens host ports while it holds them; a list that breaks the
    /// rules changes nothing; an emptied list closes them.
    #[test]
    fn the_guests_forwards_follow_its_list() {
        let dir = tempfile::tempdir().unwrap();
        let list = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let uds = listing_guest(dir.path(), list.clone());
        let (a, b) = (free_port(), free_port());
        follow_guest(&uds).unwrap();
        *list.lock().unwrap() = format!("{a} 31000\n{b} 31001\n");
        eventually("both listed ports answer", || echo(a).as_deref() == Some("HELLO") && echo(b).is_some());
        // Refused whole: a privileged port. What was open stays open.
        *list.lock().unwrap() = format!("{a} 31000\n80 31002\n");
        std::thread::sleep(GUEST_POLL * 2);
        assert_eq!(echo(b).as_deref(), Some("HELLO"), "a refused list closed a port");
        *list.lock().unwrap() = format!("{a} 31000\n");
        eventually("the port no longer listed closes", || TcpStream::connect(("127.0.0.1", b)).is_err());
        assert_eq!(echo(a).as_deref(), Some("HELLO"));
        list.lock().unwrap().clear();
        eventually("an empty list closes every port", || TcpStream::connect(("127.0.0.1", a)).is_err());
    }

    /// A VMM that dropped root still reaches its vsock socket in a 0700 directory of
    /// root's (a root daemon's VM directory), through the descriptor kept before the
    /// drop; by path it cannot. In a child process (this test run again), as root.
    #[test]
    fn the_socket_stays_reachable_after_root_is_dropped() {
        const CHILD: &str = "KINDLING_TEST_FORWARD_CHILD";
        const TEST: &str = "forward::tests::the_socket_stays_reachable_after_root_is_dropped";
        if std::env::var_os(CHILD).is_some() {
            let d = tempfile::tempdir().unwrap();
            std::fs::set_permissions(d.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
            let uds = fake_guest(d.path(), true);
            let target = crate::privileges::Target { uid: 4321, gid: 4321 };
            crate::privileges::give(target, &uds).unwrap();
            keep_reachable(&uds).unwrap();
            crate::privileges::drop_to(target).unwrap();
            let by_path = UnixStream::connect(&uds).map(drop).map_err(|e| e.kind());
            assert_eq!(by_path, Err(std::io::ErrorKind::PermissionDenied), "the directory is root's");
            let mut s = connect_guest(&uds, 6443).unwrap();
            s.write_all(b"still here").unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            let mut back = String::new();
            s.read_to_string(&mut back).unwrap();
            println!("the guest answered {back}");
            return;
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", TEST, "--nocapture"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("the guest answered STILL HERE"), "{stdout}");
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

    /// Local users cannot take more than a forward's budget: connections past it wait
    /// in the listen queue, and each forward has its own budget.
    #[test]
    fn a_flood_of_connections_is_bounded_per_forward() {
        let d = tempfile::tempdir().unwrap();
        // A guest that accepts and holds every connection.
        let path = d.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = held.clone();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut line = Vec::new();
                let mut b = [0u8];
                while c.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                let _ = c.write_all(b"OK 1\n");
                h.lock().unwrap().push((String::from_utf8_lossy(&line).into_owned(), c));
            }
        });
        let ports: Vec<u16> =
            (0..2).map(|_| TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
        start(&[format!("{}:6443", ports[0]).parse().unwrap(), format!("{}:30000", ports[1]).parse().unwrap()], &path)
            .unwrap();
        let flood: Vec<TcpStream> =
            (0..MAX_PER_FORWARD + 40).filter_map(|_| TcpStream::connect(("127.0.0.1", ports[1])).ok()).collect();
        let count = |port: &str| held.lock().unwrap().iter().filter(|(l, _)| l.ends_with(port)).count();
        let t0 = std::time::Instant::now();
        while count("30000") < MAX_PER_FORWARD && t0.elapsed() < std::time::Duration::from_secs(20) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert_eq!(count("30000"), MAX_PER_FORWARD, "the flooded forward carries at most its budget");
        // The other forward still gets through.
        let _api = TcpStream::connect(("127.0.0.1", ports[0])).unwrap();
        let t0 = std::time::Instant::now();
        while count("6443") < 1 && t0.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(count("6443"), 1, "another forward is not starved");
        drop(flood);
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
