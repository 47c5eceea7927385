//! The host side of a passt network: user-mode networking without root. passt
//! translates the guest's frames to ordinary sockets on the host, so the guest reaches
//! whatever the host reaches, and no privilege is needed.
//!
//! kindling starts `passt --foreground --fd N` on one end of a socketpair (so there is
//! no socket path to race for, and passt exits when the VMM closes its end); the VMM
//! crate's [`StreamBackend`] speaks the qemu stream protocol on the other. The guest
//! gets what passt copies from the host: the host's address and prefix on its
//! default-route interface, and the host's gateway. A DNS server on the host's loopback
//! (systemd-resolved) is offered as the gateway address, which passt forwards
//! (`--dns-forward`).

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use kindling_proto::cmdline::NetParams;
use kindling_vmm::devices::virtio::net::stream::{StreamBackend, PASST_MTU};
use kindling_vmm::devices::virtio::net::Backend;

use super::host;
use super::NetSetupError;
use crate::util::{inside_l1, which};

/// A passt process and the stream to it. Dropping it ends passt.
pub struct Passt {
    stream: StreamBackend,
    child: Child,
}

/// Whether passt can work here, for `--net auto`: Err says why not.
pub fn usable() -> Result<(), String> {
    which("passt").map(drop).ok_or_else(|| "no passt binary on PATH".into())
}

impl Passt {
    /// Starts passt; returns it with the guest's addressing and a sentence describing it.
    /// With `host_loopback`, TCP to the gateway reaches the host's loopback services
    /// (passt's default); without it, the guest cannot reach them (`--no-map-gw`, and
    /// inside the emulated runner's level-1 VM, QEMU's gateway is blocked too).
    pub fn start(host_loopback: bool) -> Result<(Self, NetParams, String), NetSetupError> {
        let bin = which("passt").ok_or(NetSetupError::NoPasst)?;
        let route = host::default_route().ok_or(NetSetupError::NoRoute)?;
        let addr = host::ipv4_addresses().into_iter().find(|a| a.iface == route.iface).ok_or(NetSetupError::NoRoute)?;
        let (dns, forward_dns) = match host::nameservers().first() {
            Some(d) if !d.is_loopback() => (Some(*d), false),
            Some(_) => (Some(route.gateway), true),
            None => (None, false),
        };
        let guest = NetParams { ip: addr.addr, prefix: addr.prefix, gateway: route.gateway, dns };

        let (ours, theirs) =
            UnixStream::pair().map_err(|err| NetSetupError::PasstStart { what: "a socketpair", err })?;
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
        // passt maps TCP to the gateway address onto the host's loopback, where the
        // user's other services listen (other clusters' forwards among them): only on
        // request. Inside the emulated runner's level-1 VM the mapping would lead to
        // L1's own loopback, where nothing listens; there QEMU's gateway 10.0.2.2 is
        // the user's host's loopback, and it is blocked for passt's connections
        // (made from an address of their own) unless asked for.
        let in_l1 = inside_l1();
        if in_l1 || !host_loopback {
            cmd.arg("--no-map-gw");
        }
        if in_l1 && !host_loopback {
            super::l1::block_host_loopback(super::l1::PASST_OUTBOUND)?;
            cmd.args(["--outbound", super::l1::PASST_OUTBOUND]);
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
                crate::util::unblock_all_signals()?;
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if on_rootfs {
                    let root = c"/".as_ptr();
                    let tmp = c"/tmp".as_ptr();
                    check(libc::unshare(libc::CLONE_NEWNS))?;
                    check(libc::mount(
                        std::ptr::null(),
                        root,
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ))?;
                    check(libc::mount(root, tmp, std::ptr::null(), libc::MS_BIND | libc::MS_REC, std::ptr::null()))?;
                    check(libc::chdir(tmp))?;
                    check(libc::mount(c".".as_ptr(), root, std::ptr::null(), libc::MS_MOVE, std::ptr::null()))?;
                    check(libc::chroot(c".".as_ptr()))?;
                    check(libc::chdir(root))?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|err| NetSetupError::PasstStart { what: "passt", err })?;
        drop(theirs);
        let stream = StreamBackend::new(ours, Some(PASST_MTU))
            .map_err(|err| NetSetupError::PasstStart { what: "the socket", err })?;
        let dns_note = match (dns, forward_dns) {
            (Some(d), true) => format!("DNS {d} (forwarded by passt to the host's resolver)"),
            (Some(d), false) => format!("DNS {d}"),
            (None, _) => "no DNS (/etc/resolv.conf names none)".into(),
        };
        let gw_note = match (host_loopback, in_l1) {
            (false, _) => "the gateway itself, not this host's loopback (--host-loopback allows that)",
            (true, true) => "the user's host's loopback through QEMU",
            (true, false) => "this host's loopback",
        };
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
            Ok(Some(status)) => {
                io::Error::new(e.kind(), format!("{e}; passt exited ({status}); its messages are above"))
            }
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
        m.lines().any(|l| {
            l.split_whitespace().nth(4) == Some("/") && l.split(" - ").nth(1).is_some_and(|t| t.starts_with("rootfs "))
        })
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use kindling_vmm::devices::virtio::net::{MAX_BUFFER_LEN, VNET_HDR_LEN};

    use super::*;

    /// The real passt, started as the VMM starts it: an ARP request for the gateway gets
    /// passt's answer through the stream protocol (skipped where passt is not installed).
    #[test]
    fn real_passt_answers_arp_for_the_gateway() {
        if usable().is_err() {
            eprintln!("skipped: passt is not installed (apt-get install passt)");
            return;
        }
        let (mut passt, guest, summary) = match Passt::start(false) {
            Ok(p) => p,
            Err(NetSetupError::NoRoute) => {
                eprintln!("skipped: this host has no default route for passt to copy");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        eprintln!("{summary}");
        let mac = [0x06, 0x6b, 0x6c, 0, 0, 1];
        let mut arp = vec![0u8; VNET_HDR_LEN];
        arp.extend_from_slice(&[0xff; 6]);
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&guest.ip.octets());
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&guest.gateway.octets());
        assert!(passt.send(&arp).unwrap());
        let mut buf = vec![0u8; MAX_BUFFER_LEN];
        let deadline = Instant::now() + Duration::from_secs(5);
        let reply = loop {
            if let Some(n) = passt.recv(&mut buf).unwrap() {
                break buf[VNET_HDR_LEN..n].to_vec();
            }
            assert!(Instant::now() < deadline, "no ARP reply from passt");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(&reply[..6], &mac, "addressed to the guest");
        assert_eq!(&reply[12..14], &[0x08, 0x06], "an ARP frame");
        assert_eq!(&reply[20..22], &[0, 2], "a reply");
        assert_eq!(&reply[28..32], &guest.gateway.octets(), "for the gateway");
    }
}
