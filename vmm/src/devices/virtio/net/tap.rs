//! The TAP backend: frames to and from a tap device opened by name, as Firecracker's
//! device does. The device is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (created
//! when no interface has that name yet, and gone when the VMM closes it); its
//! addresses, routes and NAT are the host's business (the `kindling` binary's
//! `hostnet`), not the device model's.
//!
//! With IFF_VNET_HDR every frame carries a virtio_net_hdr, so checksum and TSO offloads
//! pass through unchanged in both directions; TUNSETOFFLOAD tells the kernel which
//! offloaded frames the guest can receive.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
};

use vmm_sys_util::ioctl::{ioctl_expr, _IOC_WRITE};

use super::{Backend, VNET_HDR_LEN};
use crate::devices::guest_log::guest_warn;

// The tun driver's requests, as <linux/if_tun.h> defines them (libc does not export
// them): _IOW('T', nr, int) for TUNSETIFF and TUNSETVNETHDRSZ, _IOW('T', nr, unsigned
// int) for TUNSETOFFLOAD. `kindling`'s seccomp filters allow TUNSETOFFLOAD by this name.
const TUN_IOCTL: libc::c_uint = b'T' as libc::c_uint;
const INT_SIZE: libc::c_uint = std::mem::size_of::<libc::c_int>() as libc::c_uint;
const TUNSETIFF: libc::c_ulong = ioctl_expr(_IOC_WRITE, TUN_IOCTL, 202, INT_SIZE);
/// TUNSETOFFLOAD, which the device issues whenever the guest's driver acks features or
/// resets (on the vCPU thread that wrote the register).
pub const TUNSETOFFLOAD: libc::c_ulong = ioctl_expr(_IOC_WRITE, TUN_IOCTL, 208, INT_SIZE);
const TUNSETVNETHDRSZ: libc::c_ulong = ioctl_expr(_IOC_WRITE, TUN_IOCTL, 216, INT_SIZE);
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

/// `struct ifreq`: the interface name, then a 24-byte union. Also what the host side
/// configures a tap's address and flags with (SIOCSIFADDR and friends).
#[repr(C)]
pub struct IfReq {
    /// The interface name, NUL-terminated.
    pub name: [u8; libc::IFNAMSIZ],
    /// The union: flags, an address, or whatever the request carries.
    pub data: [u8; 24],
}

impl IfReq {
    /// A request for interface `name` (cut to IFNAMSIZ - 1 bytes) with an empty union.
    pub fn new(name: &str) -> Self {
        let mut r = IfReq { name: [0; libc::IFNAMSIZ], data: [0; 24] };
        let n = name.len().min(libc::IFNAMSIZ - 1);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }

    /// A short (flags) in the union.
    pub fn with_short(name: &str, v: libc::c_short) -> Self {
        let mut r = Self::new(name);
        r.data[..2].copy_from_slice(&v.to_ne_bytes());
        r
    }

    /// A `struct sockaddr_in` in the union.
    pub fn with_addr(name: &str, addr: Ipv4Addr) -> Self {
        let mut r = Self::new(name);
        r.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        r.data[4..8].copy_from_slice(&addr.octets());
        r
    }

    /// A `struct sockaddr` with an Ethernet hardware address in the union (SIOCSIFHWADDR).
    pub fn with_hwaddr(name: &str, mac: [u8; 6]) -> Self {
        let mut r = Self::new(name);
        r.data[..2].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
        r.data[2..8].copy_from_slice(&mac);
        r
    }

    /// The short at the start of the union (flags, after SIOCGIFFLAGS).
    pub fn short(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }

    /// Issues the interface ioctl `req` (one that takes a `struct ifreq`) on `fd`.
    pub fn ioctl(&mut self, fd: RawFd, req: libc::c_ulong) -> io::Result<()> {
        // SAFETY: `self` is a live `struct ifreq` of the kernel's size and layout (see
        // the layout test); the kernel reads and writes at most that much.
        if unsafe { libc::ioctl(fd, req as _, self as *mut Self) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// An open tap device.
pub struct TapBackend {
    file: File,
    name: String,
}

impl TapBackend {
    /// Opens the tap `name` (creating it when no interface has that name), with a
    /// virtio-net header on every frame and no offloads until the driver accepts some.
    /// EBUSY: another process holds a device of that name.
    pub fn open(name: &str) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        IfReq::with_short(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).ioctl(file.as_raw_fd(), TUNSETIFF)?;
        let mut hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, a live local.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ as _, &mut hdr_len as *mut libc::c_int) } < 0 {
            return Err(io::Error::last_os_error());
        }
        set_offload(file.as_raw_fd(), 0)?;
        Ok(Self { file, name: name.to_string() })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn set_offload(fd: RawFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
    if unsafe { libc::ioctl(fd, TUNSETOFFLOAD as _, libc::c_ulong::from(flags)) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Backend for TapBackend {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn offload_features(&self) -> u64 {
        (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6)
    }

    fn set_features(&mut self, acked: u64) {
        let has = |bit: u32| acked & (1 << bit) != 0;
        let mut flags = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= TUN_F_TSO6;
            }
        }
        if let Err(e) = set_offload(self.file.as_raw_fd(), flags) {
            guest_warn!("tap {}: TUNSETOFFLOAD {flags:#x}: {e}", self.name);
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        loop {
            match self.file.write(frame) {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    }

    fn describe(&self) -> String {
        format!("tap {}", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        let r = IfReq::with_addr("kl-1", Ipv4Addr::new(172, 30, 5, 1));
        assert_eq!(&r.name[..5], b"kl-1\0");
        assert_eq!(&r.data[4..8], &[172, 30, 5, 1]);
        assert_eq!(IfReq::with_short("x", 0x1234).short(), 0x1234);
    }
}
