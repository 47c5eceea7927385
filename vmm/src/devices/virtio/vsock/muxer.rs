//! The host side of the device, in the style of Firecracker's "hybrid" vsock: guest
//! connections meet host programs on UNIX sockets.
//!
//! - Host to guest: a program connects to the socket `P` the VMM listens on and sends
//!   `CONNECT <port>\n`. The muxer opens a connection to guest port `<port>`. Once the guest
//!   accepts, the program reads `OK <hostport>\n` and then raw stream bytes follow. If
//!   the guest refuses, the program sees the socket close instead.
//! - Guest to host: a guest connection to CID 2, port N is connected to the socket
//!   `P_N` (e.g. `/run/vm.sock_1234`). When nobody listens there, the guest gets RST.
//!
//! Everything is non-blocking and driven by one epoll fd, which the VMM's event loop
//! watches: the listener, host clients that have not yet sent their CONNECT line,
//! connection streams, and a timerfd for the deadlines. Packets for the guest wait in
//! `rxq` until the guest supplies RX buffers. Each connection is queued at most once,
//! and queued RSTs are capped, so the queue stays bounded whatever the guest does.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, Outcome, Rx};
use super::packet::{Header, Op, TYPE_STREAM};
use super::{VsockError, HOST_CID};
use crate::devices::guest_log::{guest_error, guest_warn};

/// Connections plus host clients still sending their CONNECT line.
const MAX_CONNECTIONS: usize = 1024;
/// RSTs waiting for guest RX buffers; more are dropped (the guest's connect then times out).
const MAX_QUEUED_RSTS: usize = 1024;
/// Host ports for host-initiated connections are taken from here up, away from the low
/// port numbers that guest-initiated connections use.
pub const EPHEMERAL_PORT_BASE: u32 = 1 << 30;
/// `CONNECT 4294967295\r` is 19 bytes; anything much longer is not a CONNECT line.
const MAX_CONNECT_LINE: usize = 32;
/// How long a host client may take to send its CONNECT line.
const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(if cfg!(test) { 1 } else { 5 });
/// How long accepting pauses after accept(2) failed (e.g. out of file descriptors):
/// the listener stays readable, and retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(500);

const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const FIRST_TOKEN: u64 = 2;

/// A connection's address: host port and guest port (the CIDs are fixed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

/// A host client that has not finished its CONNECT line (its deadline is in the heap).
struct PendingConnect {
    stream: UnixStream,
    line: Vec<u8>,
}

enum Source {
    Pending(PendingConnect),
    Conn(ConnKey),
}

struct Entry {
    conn: Connection,
    token: u64,
    /// The events registered with epoll; None while not registered.
    polled: Option<EventSet>,
    /// Whether an `RxItem::Conn` for this connection is in `rxq`.
    queued: bool,
    /// The deadline already pushed to the timer heap.
    timed: Option<Instant>,
}

enum RxItem {
    Conn(ConnKey),
    Rst(ConnKey),
}

/// The host side of the device: the listening socket, the connections, and the packets waiting for the guest.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    /// (device, inode) of the socket we bound, so that Drop removes only our own file.
    uds_id: (u64, u64),
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_at: Option<Instant>,
    conns: HashMap<ConnKey, Entry>,
    sources: HashMap<u64, Source>,
    rxq: VecDeque<RxItem>,
    queued_rsts: usize,
    /// Deadlines by epoll token; entries go stale when a deadline changes or its owner
    /// goes away, and are skipped then.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    next_token: u64,
    next_local_port: u32,
}

impl Muxer {
    /// Listens on `uds_path`, replacing a stale socket file left by a VMM that died.
    pub fn new(uds_path: &Path, guest_cid: u64) -> Result<Self, VsockError> {
        let setup = |what: &'static str| move |err| VsockError::Setup { what, err };
        let epoll = Epoll::new().map_err(setup("epoll"))?;
        let timer = TimerFd::new().map_err(|e| VsockError::Setup { what: "timerfd", err: e.into() })?;
        remove_stale_socket(uds_path)?;
        let bind_err = |err| VsockError::Bind { path: uds_path.to_path_buf(), err };
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        let meta = std::fs::metadata(uds_path).map_err(bind_err)?;
        let muxer = Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            uds_id: (meta.dev(), meta.ino()),
            listener,
            epoll,
            timer,
            timer_at: None,
            conns: HashMap::new(),
            sources: HashMap::new(),
            rxq: VecDeque::new(),
            queued_rsts: 0,
            deadlines: BinaryHeap::new(),
            next_token: FIRST_TOKEN,
            next_local_port: EPHEMERAL_PORT_BASE,
        };
        // From here on, Drop removes the socket file if anything fails.
        muxer.listener.set_nonblocking(true).map_err(setup("listener"))?;
        muxer.watch(muxer.listener.as_raw_fd(), EventSet::IN, TOKEN_LISTENER).map_err(setup("epoll"))?;
        muxer.watch(muxer.timer.as_raw_fd(), EventSet::IN, TOKEN_TIMER).map_err(setup("epoll"))?;
        tracing::debug!("vsock: listening on {}", uds_path.display());
        Ok(muxer)
    }

    /// Readable when host sockets or timers need [`Self::process_host_events`].
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// True when packets for the guest are waiting for RX buffers.
    pub fn has_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// Handles one packet the guest sent.
    pub fn send_pkt(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid {
            // Not from the guest's address: an RST would go nowhere.
            tracing::debug!("vsock: dropping packet from CID {} (the guest is CID {})", hdr.src_cid, self.guest_cid);
            return;
        }
        let key = ConnKey { local_port: hdr.dst_port, peer_port: hdr.src_port };
        let op = match hdr.op() {
            Some(op) if hdr.dst_cid == HOST_CID && hdr.type_ == TYPE_STREAM => op,
            _ => {
                tracing::debug!("vsock: refusing packet {hdr:?}: not a stream packet for the host");
                return self.refuse(hdr);
            }
        };
        if let Some(entry) = self.conns.get_mut(&key) {
            let outcome = entry.conn.on_guest_packet(hdr, op, payload);
            self.apply(key, outcome);
        } else {
            match op {
                Op::Request => self.connect_to_host(key, hdr),
                Op::Rst => {}
                _ => self.queue_rst(key),
            }
        }
        self.rearm_timer();
    }

    /// Answers a packet that could not be accepted (malformed payload, unknown operation)
    /// with RST, resetting its connection if it has one.
    pub fn refuse(&mut self, hdr: &Header) {
        if hdr.src_cid != self.guest_cid {
            return;
        }
        let key = ConnKey { local_port: hdr.dst_port, peer_port: hdr.src_port };
        if self.conns.contains_key(&key) {
            self.remove(key, true);
        } else if hdr.op() != Some(Op::Rst) {
            self.queue_rst(key);
        }
    }

    /// The next packet for the guest, its RW payload read into `buf` (whose length is
    /// the room in the guest's buffer). None when nothing could be produced.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        let now = Instant::now();
        // Each item gets one try: a connection with data but a buffer too small for it
        // yields nothing, and must not be retried forever. An RST queued on the way
        // gets its try too.
        let mut budget = self.rxq.len();
        while budget > 0 {
            budget -= 1;
            let Some(item) = self.rxq.pop_front() else { break };
            match item {
                RxItem::Rst(key) => {
                    self.queued_rsts -= 1;
                    return Some((self.rst_header(key), 0));
                }
                RxItem::Conn(key) => {
                    let Some(entry) = self.conns.get_mut(&key) else { continue };
                    entry.queued = false;
                    match entry.conn.next_rx(buf, now) {
                        Rx::Packet(hdr, n) => {
                            self.refresh(key);
                            self.rearm_timer();
                            return Some((hdr, n));
                        }
                        Rx::Nothing => self.refresh(key),
                        Rx::Reset => {
                            self.remove(key, true);
                            budget += 1;
                        }
                    }
                }
            }
        }
        None
    }

    /// Accepts host clients, reads CONNECT lines, moves data on ready host streams and
    /// fires expired deadlines.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    guest_warn!("vsock: epoll wait: {e}");
                }
                return;
            }
        };
        let now = Instant::now();
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_LISTENER => self.accept_host_clients(now),
                TOKEN_TIMER => self.expire(now),
                token => match self.sources.get(&token) {
                    Some(Source::Pending(_)) => self.read_connect_line(token, now),
                    Some(&Source::Conn(key)) => {
                        if let Some(entry) = self.conns.get_mut(&key) {
                            let outcome = entry.conn.on_host_event(ev.event_set());
                            self.apply(key, outcome);
                        }
                    }
                    // Removed by an earlier event in this batch.
                    None => {}
                },
            }
        }
        self.rearm_timer();
    }

    /// The driver reset the device: every connection is gone for the guest. Host
    /// clients still typing their CONNECT line are kept.
    pub fn reset(&mut self) {
        for (_, entry) in self.conns.drain() {
            if entry.polled.is_some() {
                let _ =
                    self.epoll.ctl(ControlOperation::Delete, entry.conn.stream().as_raw_fd(), EpollEvent::default());
            }
        }
        self.sources.retain(|_, s| matches!(s, Source::Pending(_)));
        self.rxq.clear();
        self.queued_rsts = 0;
    }

    fn watch(&self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    fn new_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn apply(&mut self, key: ConnKey, outcome: Outcome) {
        match outcome {
            Outcome::Keep => self.refresh(key),
            Outcome::Reset => self.remove(key, true),
            Outcome::Close => self.remove(key, false),
        }
    }

    /// Brings epoll, the RX queue and the timer in line with the connection's state.
    fn refresh(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.get_mut(&key) else { return };
        let want = entry.conn.interest();
        if want != entry.polled {
            let fd = entry.conn.stream().as_raw_fd();
            let result = match (entry.polled, want) {
                (None, Some(ev)) => self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(ev, entry.token)),
                (Some(_), Some(ev)) => self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(ev, entry.token)),
                _ => self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()),
            };
            if let Err(e) = result {
                // Without epoll the connection would hang: drop it.
                guest_error!("vsock: epoll on a host stream: {e}");
                return self.remove(key, true);
            }
            entry.polled = want;
        }
        if entry.conn.has_rx() && !entry.queued {
            entry.queued = true;
            self.rxq.push_back(RxItem::Conn(key));
        }
        if let Some(at) = entry.conn.deadline().filter(|&at| entry.timed != Some(at)) {
            entry.timed = Some(at);
            self.deadlines.push(Reverse((at, entry.token)));
        }
    }

    fn insert(&mut self, key: ConnKey, conn: Connection) {
        let token = self.new_token();
        self.sources.insert(token, Source::Conn(key));
        self.conns.insert(key, Entry { conn, token, polled: None, queued: false, timed: None });
        self.refresh(key);
    }

    /// Drops a connection (closing its host stream), and tells the guest when `rst`.
    fn remove(&mut self, key: ConnKey, rst: bool) {
        let Some(entry) = self.conns.remove(&key) else { return };
        if entry.polled.is_some() {
            let _ = self.epoll.ctl(ControlOperation::Delete, entry.conn.stream().as_raw_fd(), EpollEvent::default());
        }
        self.sources.remove(&entry.token);
        tracing::debug!(
            "vsock: connection host:{} <-> guest:{} closed{}",
            key.local_port,
            key.peer_port,
            if rst { " with RST" } else { "" }
        );
        if rst {
            self.queue_rst(key);
        }
    }

    fn queue_rst(&mut self, key: ConnKey) {
        if self.queued_rsts >= MAX_QUEUED_RSTS {
            tracing::debug!("vsock: too many RSTs waiting for the guest; dropping one for port {}", key.peer_port);
            return;
        }
        self.queued_rsts += 1;
        self.rxq.push_back(RxItem::Rst(key));
    }

    fn rst_header(&self, key: ConnKey) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_: TYPE_STREAM,
            op: Op::Rst as u16,
            ..Header::default()
        }
    }

    fn connection_count(&self) -> usize {
        // `sources` holds one entry per connection and per pending host client.
        self.sources.len()
    }

    /// The guest asked for host port `hdr.dst_port`: connect to `P_<port>`.
    fn connect_to_host(&mut self, key: ConnKey, hdr: &Header) {
        if self.connection_count() >= MAX_CONNECTIONS {
            guest_warn!(
                "vsock: {MAX_CONNECTIONS} connections open; refusing the guest's connection to port {}",
                hdr.dst_port
            );
            return self.queue_rst(key);
        }
        let path = port_path(&self.uds_path, hdr.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                tracing::debug!("vsock: guest port {} connected to {}", hdr.src_port, path.display());
                let conn = Connection::guest_initiated(stream, self.guest_cid, hdr);
                self.insert(key, conn);
            }
            Err(e) => {
                tracing::debug!(
                    "vsock: guest connection to host port {}: {}: {e}; answering RST",
                    hdr.dst_port,
                    path.display()
                );
                self.queue_rst(key);
            }
        }
    }

    fn accept_host_clients(&mut self, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.connection_count() >= MAX_CONNECTIONS {
                        guest_warn!("vsock: {MAX_CONNECTIONS} connections open; closing a new host client");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        guest_warn!("vsock: host client: {e}");
                        continue;
                    }
                    let token = self.new_token();
                    if let Err(e) = self.watch(stream.as_raw_fd(), EventSet::IN, token) {
                        guest_error!("vsock: epoll on a host client: {e}");
                        continue;
                    }
                    self.sources.insert(token, Source::Pending(PendingConnect { stream, line: Vec::new() }));
                    self.deadlines.push(Reverse((now + CONNECT_LINE_TIMEOUT, token)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    guest_warn!("vsock: accepting on {}: {e}; pausing for {ACCEPT_BACKOFF:?}", self.uds_path.display());
                    let _ = self.epoll.ctl(ControlOperation::Delete, self.listener.as_raw_fd(), EpollEvent::default());
                    self.deadlines.push(Reverse((now + ACCEPT_BACKOFF, TOKEN_LISTENER)));
                    return;
                }
            }
        }
    }

    fn read_connect_line(&mut self, token: u64, now: Instant) {
        let Some(Source::Pending(pending)) = self.sources.get_mut(&token) else { return };
        let port = match read_line(pending) {
            Ok(None) => return,
            Ok(Some(line)) => parse_connect(&line),
            Err(why) => Err(why),
        };
        let Some(Source::Pending(pending)) = self.sources.remove(&token) else { return };
        let _ = self.epoll.ctl(ControlOperation::Delete, pending.stream.as_raw_fd(), EpollEvent::default());
        match port {
            Ok(port) => {
                let local_port = self.alloc_local_port(port);
                tracing::debug!("vsock: host client connecting to guest port {port} from host port {local_port}");
                let conn = Connection::host_initiated(pending.stream, self.guest_cid, local_port, port, now);
                self.insert(ConnKey { local_port, peer_port: port }, conn);
            }
            // Dropping the stream closes it: the client sees EOF instead of "OK".
            Err(why) => guest_warn!("vsock: closing host client on {}: {why}", self.uds_path.display()),
        }
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        // Ends quickly: far fewer connections exist than ports in the range.
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(EPHEMERAL_PORT_BASE);
            if !self.conns.contains_key(&ConnKey { local_port: port, peer_port }) {
                return port;
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        // Disarming resets the expiration count, which is what keeps epoll from
        // reporting the timer again; rearm_timer() sets the next deadline.
        if let Err(e) = self.timer.clear() {
            guest_warn!("vsock: timerfd: {e}");
        }
        self.timer_at = None;
        while let Some(&Reverse((at, token))) = self.deadlines.peek() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            if token == TOKEN_LISTENER {
                // The accept backoff is over.
                if let Err(e) = self.watch(self.listener.as_raw_fd(), EventSet::IN, TOKEN_LISTENER) {
                    guest_error!("vsock: cannot watch {} again: {e}", self.uds_path.display());
                }
                continue;
            }
            match self.sources.get(&token) {
                Some(Source::Pending(_)) => {
                    if let Some(Source::Pending(p)) = self.sources.remove(&token) {
                        let _ = self.epoll.ctl(ControlOperation::Delete, p.stream.as_raw_fd(), EpollEvent::default());
                        guest_warn!(
                            "vsock: host client sent no CONNECT line within {CONNECT_LINE_TIMEOUT:?}; closing it"
                        );
                    }
                }
                Some(&Source::Conn(key)) => {
                    if let Some(entry) = self.conns.get_mut(&key) {
                        let outcome = entry.conn.on_timeout(now);
                        self.apply(key, outcome);
                    }
                }
                _ => {}
            }
        }
    }

    fn rearm_timer(&mut self) {
        let next = self.deadlines.peek().map(|&Reverse((at, _))| at);
        if next == self.timer_at {
            return;
        }
        let result = match next {
            // A zero duration would disarm the timer instead of firing it.
            Some(at) => {
                self.timer.reset(at.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)), None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            guest_warn!("vsock: timerfd: {e}");
        }
        self.timer_at = next;
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Only our own socket: another VMM may have taken the path over since.
        let ours = std::fs::symlink_metadata(&self.uds_path).is_ok_and(|m| (m.dev(), m.ino()) == self.uds_id);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.uds_path) {
                tracing::warn!("vsock: removing {}: {e}", self.uds_path.display());
            }
        }
    }
}

/// `P_<port>`: where guest connections to host port `port` go.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = uds_path.as_os_str().to_owned();
    path.push(format!("_{port}"));
    path.into()
}

/// Removes a socket file nobody accepts connections on (left by a VMM that was killed);
/// refuses to touch anything else.
fn remove_stale_socket(path: &Path) -> Result<(), VsockError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(VsockError::Bind { path: path.to_path_buf(), err }),
    };
    if !meta.file_type().is_socket() {
        return Err(VsockError::NotASocket(path.to_path_buf()));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(VsockError::InUse(path.to_path_buf()));
    }
    tracing::debug!("vsock: removing stale socket {}", path.display());
    std::fs::remove_file(path).map_err(|err| VsockError::Bind { path: path.to_path_buf(), err })
}

/// connect(2) that cannot stall the event loop: an AF_UNIX connect completes at once or
/// fails, with EAGAIN when the listener's backlog is full.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}

/// Reads the CONNECT line byte by byte: whatever follows the newline is stream data for
/// the guest and must stay in the socket. Ok(None) means incomplete so far.
fn read_line(pending: &mut PendingConnect) -> Result<Option<Vec<u8>>, String> {
    let mut byte = [0u8; 1];
    loop {
        match pending.stream.read(&mut byte) {
            Ok(0) => return Err("it closed before sending `CONNECT <port>`".into()),
            Ok(_) if byte[0] == b'\n' => return Ok(Some(std::mem::take(&mut pending.line))),
            Ok(_) if pending.line.len() >= MAX_CONNECT_LINE => {
                return Err("its first line is too long for `CONNECT <port>`".into())
            }
            Ok(_) => pending.line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Parses `CONNECT <port>` (the newline already removed; a trailing CR is tolerated).
fn parse_connect(line: &[u8]) -> Result<u32, String> {
    let bad = || format!("expected `CONNECT <port>`, got {:?}", String::from_utf8_lossy(line));
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.strip_prefix(b"CONNECT ").ok_or_else(bad)?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    std::str::from_utf8(digits).ok().and_then(|d| d.parse().ok()).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Ok(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Ok(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT",
            b"CONNECT ",
            b"CONNECT +5",
            b"CONNECT 5 ",
            b"connect 5",
            b"\xff\xfe",
        ] {
            assert!(parse_connect(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn port_paths_append_the_port() {
        assert_eq!(port_path(Path::new("/tmp/v.sock"), 1234), PathBuf::from("/tmp/v.sock_1234"));
    }

    #[test]
    fn socket_file_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        // A stale socket (bound, then its owner went away) is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let muxer = Muxer::new(&path, 3).unwrap();
        // A live one is not.
        assert!(matches!(Muxer::new(&path, 3), Err(VsockError::InUse(_))));
        drop(muxer);
        assert!(!path.exists(), "the socket file goes with the device");
        // Neither is a regular file.
        std::fs::write(&path, b"data").unwrap();
        assert!(matches!(Muxer::new(&path, 3), Err(VsockError::NotASocket(_))));
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }
}
