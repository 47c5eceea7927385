//! The passt backend: user-mode networking without root. passt translates the guest's
//! frames to ordinary sockets on the host, so the guest reaches whatever the host
//! reaches, and no privilege is needed.
//!
//! The VMM starts `passt --foreground --fd N` on one end of a socketpair (so there is no
//! socket path to race for, and passt exits when the VMM closes its end) and speaks the
//! qemu stream protocol on the other: each Ethernet frame is prefixed by its length as
//! a 32-bit big-endian number. The guest gets what passt copies from the host: the
//! host's address and prefix on its default-route interface, and the host's gateway.
//! A DNS server on the host's loopback (systemd-resolved) is offered as the gateway
//! address, which passt forwards (`--dns-forward`).
//!
//! passt cannot take frames with offloads (partial checksums, TSO), so none are
//! offered; the guest gets passt's 65520-byte MTU instead, which makes bulk transfers
//! as cheap in frames as TSO would.

use std::io::{self, IoSlice, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use super::host;
use super::{Backend, GuestNet, NetError, MAX_FRAME_LEN, MIN_FRAME_LEN, VNET_HDR_LEN};

/// passt's default MTU (65535 minus the Ethernet header, rounded down to 32 bits).
pub const PASST_MTU: u16 = 65520;
/// Room for at least one largest frame with its length prefix, plus more frames.
const RBUF_LEN: usize = 4 + MAX_FRAME_LEN + (64 << 10);

/// The qemu stream protocol on a connected stream socket, non-blocking.
pub struct StreamBackend {
    sock: UnixStream,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    /// Bytes of a frame with an impossible length that are still to be discarded.
    skip: usize,
    /// The unwritten rest of a frame (prefix included) after a short write.
    wbuf: Vec<u8>,
    wpos: usize,
    mtu: Option<u16>,
}

impl StreamBackend {
    pub fn new(sock: UnixStream, mtu: Option<u16>) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        Ok(Self { sock, rbuf: vec![0; RBUF_LEN].into_boxed_slice(), rstart: 0, rend: 0, skip: 0, wbuf: Vec::new(), wpos: 0, mtu })
    }

    /// The length prefix at the read position, if all four bytes are buffered.
    fn next_len(&self) -> Option<usize> {
        let b = self.rbuf.get(self.rstart..self.rstart + 4).filter(|_| self.rend - self.rstart >= 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
}

impl Backend for StreamBackend {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn mtu(&self) -> Option<u16> {
        self.mtu
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            let avail = self.rend - self.rstart;
            if self.skip > 0 {
                let n = self.skip.min(avail);
                self.rstart += n;
                self.skip -= n;
            } else if let Some(len) = self.next_len() {
                if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len) {
                    tracing::warn!("virtio-net: passt sent a frame of {len} bytes; skipping it");
                    self.rstart += 4;
                    self.skip = len;
                    continue;
                }
                if avail >= 4 + len {
                    let frame = &self.rbuf[self.rstart + 4..self.rstart + 4 + len];
                    buf[..VNET_HDR_LEN].fill(0);
                    buf[VNET_HDR_LEN..VNET_HDR_LEN + len].copy_from_slice(frame);
                    self.rstart += 4 + len;
                    return Ok(Some(VNET_HDR_LEN + len));
                }
            }
            // Need more bytes: make room for a whole frame after the read position.
            if self.rstart == self.rend {
                self.rstart = 0;
                self.rend = 0;
            } else if self.rbuf.len() - self.rend < 4 + MAX_FRAME_LEN {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            match self.sock.read(&mut self.rbuf[self.rend..]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "passt closed the connection")),
                Ok(n) => self.rend += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn has_buffered_rx(&self) -> bool {
        let avail = self.rend - self.rstart;
        if self.skip > 0 {
            return avail > 0;
        }
        match self.next_len() {
            Some(len) if (MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len) => avail >= 4 + len,
            Some(_) => true,
            None => false,
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        if !self.flush()? {
            return Ok(false);
        }
        let eth = &frame[VNET_HDR_LEN..];
        let prefix = (eth.len() as u32).to_be_bytes();
        let total = prefix.len() + eth.len();
        loop {
            match self.sock.write_vectored(&[IoSlice::new(&prefix), IoSlice::new(eth)]) {
                Ok(n) if n == total => return Ok(true),
                Ok(n) => {
                    // A short write: the rest must follow before any other frame.
                    self.wbuf.clear();
                    self.wbuf.extend_from_slice(&prefix[n.min(4)..]);
                    self.wbuf.extend_from_slice(&eth[n.saturating_sub(4)..]);
                    self.wpos = 0;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn wants_write(&self) -> bool {
        self.wpos < self.wbuf.len()
    }

    fn flush(&mut self) -> io::Result<bool> {
        while self.wpos < self.wbuf.len() {
            match self.sock.write(&self.wbuf[self.wpos..]) {
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        Ok(true)
    }

    fn describe(&self) -> String {
        "qemu stream socket".into()
    }
}

/// A passt process and the stream to it. Dropping it ends passt.
pub struct Passt {
    stream: StreamBackend,
    child: Child,
}

/// Whether passt can work here, for `--net auto`: Err says why not.
pub fn usable() -> Result<(), String> {
    crate::runner::emulated::which("passt").map(drop).ok_or_else(|| "no passt binary on PATH".into())
}

impl Passt {
    /// Starts passt; returns it with the guest's addressing and a sentence describing it.
    pub fn start() -> Result<(Self, GuestNet, String), NetError> {
        let bin = crate::runner::emulated::which("passt").ok_or(NetError::NoPasst)?;
        let route = host::default_route().ok_or(NetError::NoRoute)?;
        let addr = host::ipv4_addresses().into_iter().find(|a| a.iface == route.iface).ok_or(NetError::NoRoute)?;
        let (dns, forward_dns) = match host::nameservers().first() {
            Some(d) if !d.is_loopback() => (Some(*d), false),
            Some(_) => (Some(route.gateway), true),
            None => (None, false),
        };
        let guest = GuestNet { ip: addr.addr, prefix: addr.prefix, gateway: route.gateway, dns };

        let (ours, theirs) = UnixStream::pair().map_err(|err| NetError::PasstStart { what: "a socketpair", err })?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(&bin);
        cmd.args(["--foreground", "--quiet", "--stderr", "--ipv4-only"])
            .args(["--fd", &fd.to_string()])
            .args(["--address", &addr.addr.to_string(), "--netmask", &addr.prefix.to_string()])
            .args(["--gateway", &route.gateway.to_string(), "--interface", &route.iface])
            .args(["--mtu", &PASST_MTU.to_string()]);
        if forward_dns {
            cmd.args(["--dns-forward", &route.gateway.to_string()]);
        }
        // passt maps TCP to the gateway address onto the host's loopback. Inside the
        // emulated runner's level-1 VM that would be L1's own loopback, where nothing
        // listens; its gateway (QEMU's 10.0.2.2) already leads to the user's host's
        // loopback, so there the gateway is left as it is.
        let in_l1 = crate::runner::emulated::inside_l1();
        if in_l1 {
            cmd.arg("--no-map-gw");
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // As root passt drops to "nobody"; numeric IDs need no /etc/passwd (the
            // emulated runner's level-1 VM has none).
            cmd.args(["--runas", "65534:65534"]);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
        let on_rootfs = root_is_rootfs();
        // SAFETY: only async-signal-safe calls (plain system calls on static strings)
        // between fork and exec: fcntl to let the socket cross exec, prctl so that
        // passt dies with us, and the chroot described at `root_is_rootfs`.
        unsafe {
            cmd.pre_exec(move || {
                let check = |r: libc::c_int| if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
                check(libc::fcntl(fd, libc::F_SETFD, 0))?;
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if on_rootfs {
                    let root = c"/".as_ptr();
                    let tmp = c"/tmp".as_ptr();
                    check(libc::unshare(libc::CLONE_NEWNS))?;
                    check(libc::mount(std::ptr::null(), root, std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()))?;
                    check(libc::mount(root, tmp, std::ptr::null(), libc::MS_BIND | libc::MS_REC, std::ptr::null()))?;
                    check(libc::chdir(tmp))?;
                    check(libc::mount(c".".as_ptr(), root, std::ptr::null(), libc::MS_MOVE, std::ptr::null()))?;
                    check(libc::chroot(c".".as_ptr()))?;
                    check(libc::chdir(root))?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|err| NetError::PasstStart { what: "passt", err })?;
        drop(theirs);
        let stream = StreamBackend::new(ours, Some(PASST_MTU)).map_err(|err| NetError::PasstStart { what: "the socket", err })?;
        let dns_note = match (dns, forward_dns) {
            (Some(d), true) => format!("DNS {d} (forwarded by passt to the host's resolver)"),
            (Some(d), false) => format!("DNS {d}"),
            (None, _) => "no DNS (/etc/resolv.conf names none)".into(),
        };
        let gw_note = if in_l1 { "the user's host's loopback through QEMU" } else { "this host's loopback" };
        let summary = format!(
            "passt (pid {}), guest {}/{} gateway {} as the host has them on {} (TCP to the gateway reaches {gw_note}), {dns_note}, MTU {PASST_MTU}",
            child.id(),
            guest.ip,
            guest.prefix,
            guest.gateway,
            route.iface
        );
        Ok((Self { stream, child }, guest, summary))
    }

    fn exit_note(&mut self, e: io::Error) -> io::Error {
        std::thread::sleep(std::time::Duration::from_millis(50));
        match self.child.try_wait() {
            Ok(Some(status)) => io::Error::new(e.kind(), format!("{e}; passt exited ({status}); its messages are above")),
            _ => e,
        }
    }
}

/// True when `/` is the initramfs itself (the emulated runner's level-1 VM). passt
/// sandboxes itself with pivot_root(2), which the kernel refuses on that mount. So, in
/// a mount namespace of its own, passt gets what switch_root(8) gives a booted system:
/// a recursive bind mount of `/` moved on top of `/`, and chroot into it. That root is
/// an ordinary mount with the same files, and, being on top of the namespace's root,
/// does not count as a chroot (which would forbid passt's user namespace). Its /tmp
/// looks empty inside, where passt mounts its own tmpfs.
fn root_is_rootfs() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines().any(|l| l.split_whitespace().nth(4) == Some("/") && l.split(" - ").nth(1).is_some_and(|t| t.starts_with("rootfs ")))
    })
}

impl Backend for Passt {
    fn fd(&self) -> RawFd {
        self.stream.fd()
    }
    fn mtu(&self) -> Option<u16> {
        self.stream.mtu()
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.stream.recv(buf).map_err(|e| self.exit_note(e))
    }
    fn has_buffered_rx(&self) -> bool {
        self.stream.has_buffered_rx()
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        self.stream.send(frame)
    }
    fn wants_write(&self) -> bool {
        self.stream.wants_write()
    }
    fn flush(&mut self) -> io::Result<bool> {
        self.stream.flush()
    }
    fn describe(&self) -> String {
        format!("passt (pid {})", self.child.id())
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
