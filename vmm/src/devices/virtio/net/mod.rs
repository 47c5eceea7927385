//! virtio-net (virtio 1.x spec, section 5.1): one RX and one TX queue, a MAC address and
//! link status in the config space, mergeable RX buffers, and checksum/TSO offloads
//! when the backend can take offloaded frames.
//!
//! Layers:
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice). It moves frames between
//!   the virtqueues and a [`Backend`], and checks every chain the guest hands it.
//! - [`tap`]: a TAP device the VMM creates (root), with IFF_VNET_HDR so that offloaded
//!   frames pass through as they are. The host side gets an address, forwarding, and
//!   NAT when iptables or nft is installed.
//! - [`passt`]: rootless. The VMM spawns passt and speaks the qemu stream protocol to
//!   it (each frame prefixed by its 32-bit big-endian length). passt cannot take
//!   offloaded frames, so none are offered, but a 64 KiB MTU is.
//! - [`host`]: what the host's network looks like (default route, addresses, DNS).
//!
//! The guest is untrusted: a chain that is too short or too long, has descriptors in
//! the wrong direction or outside memory, or asks for an offload that was not
//! negotiated is dropped, and its buffer is returned. No guest input can panic the VMM
//! or make it allocate beyond fixed per-device buffers.

pub mod device;
pub mod host;
pub mod passt;
pub mod tap;

#[cfg(test)]
mod tests;

use std::io;
use std::net::Ipv4Addr;
use std::os::unix::io::RawFd;

pub use device::Net;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// `struct virtio_net_hdr_v1`: with VIRTIO_F_VERSION_1 it always carries num_buffers.
pub const VNET_HDR_LEN: usize = 12;
/// Smallest frame: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// Largest frame: a 64 KiB (GSO) IP packet with its Ethernet header and a VLAN tag,
/// as in Firecracker. Longer TX chains are dropped; the backends never deliver longer.
pub const MAX_FRAME_LEN: usize = 65550;
/// Header plus the largest frame: the per-direction bounce buffer.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

/// The longest text [`GuestNet::cmdline_args`] produces (the config reserves it).
pub const MAX_CMDLINE_ARGS_LEN: usize =
    " kindling.ip=255.255.255.255/32 kindling.gw=255.255.255.255 kindling.dns=255.255.255.255".len();

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("--net tap: /dev/net/tun: {0}; TAP needs root (or CAP_NET_ADMIN) and the tun module; use --net passt as an ordinary user")]
    TunOpen(io::Error),
    #[error("--net tap: creating the tap device {name}: {err}")]
    TapCreate { name: String, err: io::Error },
    #[error("--net tap: configuring {name}: {what}: {err}")]
    TapConfig { name: String, what: &'static str, err: io::Error },
    #[error("--net tap: every subnet 172.30.0.0/24 .. 172.30.255.0/24 is taken by another interface")]
    NoSubnet,
    #[error("--net passt: the passt binary was not found on PATH; install it (`apt-get install passt`) or use --net tap as root")]
    NoPasst,
    #[error("--net passt: the host has no IPv4 default route with an address; passt gives the guest the host's address and gateway, so it needs one (or use --net tap / --net none)")]
    NoRoute,
    #[error("--net passt: starting {what}: {err}")]
    PasstStart { what: &'static str, err: io::Error },
    #[error("virtio-net: setting up {what}: {err}")]
    Setup { what: &'static str, err: io::Error },
}

/// The guest's side of the network, as the VMM hands it over on the kernel command
/// line (`kindling.ip=A/P kindling.gw=G kindling.dns=D`, read by the guest agent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNet {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Option<Ipv4Addr>,
}

impl GuestNet {
    /// The kernel parameters, each with a leading space, skipping those the user
    /// already set in `user_cmdline` (the user's value wins).
    pub fn cmdline_args(&self, user_cmdline: &str) -> String {
        let set = |key: &str| user_cmdline.split_whitespace().any(|p| p.starts_with(key));
        let mut out = String::new();
        if !set("kindling.ip=") {
            out.push_str(&format!(" kindling.ip={}/{}", self.ip, self.prefix));
        }
        if !set("kindling.gw=") {
            out.push_str(&format!(" kindling.gw={}", self.gateway));
        }
        if let (Some(dns), false) = (self.dns, set("kindling.dns=")) {
            out.push_str(&format!(" kindling.dns={dns}"));
        }
        out
    }
}

/// Where guest frames go. Frames in both directions are `virtio_net_hdr_v1` (12 bytes)
/// followed by the Ethernet frame; a backend without headers of its own (passt) adds
/// a zero header on receive and strips it on send.
pub trait Backend: Send {
    /// Polled by the device for readability (frames for the guest) and, while
    /// [`Self::wants_write`], for writability.
    fn fd(&self) -> RawFd;
    /// Offload feature bits (VIRTIO_NET_F_*) this backend can honour.
    fn offload_features(&self) -> u64 {
        0
    }
    /// An MTU to offer the guest (VIRTIO_NET_F_MTU), if not the Ethernet default.
    fn mtu(&self) -> Option<u16> {
        None
    }
    /// The driver's features are known: enable the offloads the guest can receive.
    fn set_features(&mut self, _acked: u64) {}
    /// Reads one frame (header included) into `buf`, which has room for
    /// [`MAX_BUFFER_LEN`] bytes. Ok(None) when nothing is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// True when frames are buffered in the process, so that `fd` being unreadable
    /// does not mean there is nothing to receive.
    fn has_buffered_rx(&self) -> bool {
        false
    }
    /// Sends one frame (header included). Ok(false): it cannot be taken now; call
    /// again once `fd` is writable.
    fn send(&mut self, frame: &[u8]) -> io::Result<bool>;
    /// True while the backend holds outgoing bytes it could not write yet.
    fn wants_write(&self) -> bool {
        false
    }
    /// Writes what [`Self::send`] buffered. Ok(true) once nothing is left.
    fn flush(&mut self) -> io::Result<bool> {
        Ok(true)
    }
    /// For log lines.
    fn describe(&self) -> String;
}

/// `kindling boot --net`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NetChoice {
    /// TAP when running as root with a usable /dev/net/tun, else passt when it is
    /// installed, else no network.
    Auto,
    /// A tap device with NAT (needs root).
    Tap,
    /// passt, user-mode networking (no privileges needed).
    Passt,
    /// No network device.
    None,
}

/// Resolves `--net` to a backend and says why, for the stderr line every boot prints.
/// `emulated`: the VMM will run inside the emulated runner's level-1 VM, as root with
/// the tun module, so TAP works there whoever runs kindling here; passt must be
/// installed here to be shipped in.
pub fn choose(choice: NetChoice, emulated: bool) -> Result<(Option<crate::config::NetBackend>, String), NetError> {
    use crate::config::NetBackend;
    let l1 = if emulated { " inside the level-1 VM" } else { "" };
    Ok(match choice {
        NetChoice::None => (None, "requested with --net none".into()),
        NetChoice::Tap if emulated => (Some(NetBackend::Tap), format!("requested with --net tap; created{l1}, where kindling runs as root")),
        NetChoice::Tap => {
            tap::usable().map_err(|why| NetError::TunOpen(io::Error::other(why)))?;
            (Some(NetBackend::Tap), "requested with --net tap".into())
        }
        NetChoice::Passt => {
            passt::usable().map_err(|_| NetError::NoPasst)?;
            (Some(NetBackend::Passt), format!("requested with --net passt{}", if emulated { "; shipped into the level-1 VM" } else { "" }))
        }
        NetChoice::Auto if emulated => (
            Some(NetBackend::Tap),
            "default: kindling runs as root inside the level-1 VM, which has /dev/net/tun".into(),
        ),
        NetChoice::Auto => match (tap::usable(), passt::usable()) {
            (Ok(()), _) => (Some(NetBackend::Tap), "default: running as root and /dev/net/tun is usable".into()),
            (Err(why), Ok(())) => (Some(NetBackend::Passt), format!("default: TAP is not usable ({why}), passt is installed")),
            (Err(tap), Err(passt)) => (
                None,
                format!("default: TAP is not usable ({tap}) and {passt} (apt-get install passt); the guest has no network"),
            ),
        },
    })
}

/// A locally administered unicast MAC for the guest: 06:6b:6c ("kl") and three bytes
/// that differ between the VMs of one host (the VMM's process ID).
pub fn guest_mac() -> [u8; 6] {
    let id = std::process::id();
    [0x06, 0x6b, 0x6c, (id >> 16) as u8, (id >> 8) as u8, id as u8]
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn cmdline_args_fit_the_reserved_length_and_respect_the_user() {
        let g = GuestNet {
            ip: Ipv4Addr::new(255, 255, 255, 255),
            prefix: 32,
            gateway: Ipv4Addr::new(255, 255, 255, 255),
            dns: Some(Ipv4Addr::new(255, 255, 255, 255)),
        };
        assert_eq!(g.cmdline_args("console=ttyS0").len(), MAX_CMDLINE_ARGS_LEN);
        let g = GuestNet { ip: Ipv4Addr::new(172, 30, 4, 2), prefix: 24, gateway: Ipv4Addr::new(172, 30, 4, 1), dns: None };
        assert_eq!(g.cmdline_args(""), " kindling.ip=172.30.4.2/24 kindling.gw=172.30.4.1");
        assert_eq!(g.cmdline_args("kindling.ip=10.0.0.5/8"), " kindling.gw=172.30.4.1");
        let mac = guest_mac();
        assert_eq!(mac[0] & 0x03, 0x02, "locally administered, unicast");
    }
}
