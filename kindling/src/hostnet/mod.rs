//! The host side of a guest's network: what `kindling boot --net` sets up before the
//! VMM runs, and hands it as an open backend (the VMM's device model creates nothing
//! on the host).
//!
//! - [`tap`]: a tap device (root), its host address, IPv4 forwarding and NAT.
//! - [`passt`]: passt, started on a socketpair (no root).
//! - [`host`]: what the host's network looks like (default route, addresses, DNS).
//!
//! Either way the guest's address, gateway and DNS server reach it on the kernel
//! command line ([`kindling_proto::cmdline::NetParams`]).

pub mod host;
mod l1;
pub mod passt;
pub mod tap;

use std::io;

use kindling_proto::cmdline::NetParams;
use kindling_vmm::devices::virtio::net::Backend;

/// Why the host side of a network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetSetupError {
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
    #[error("in the level-1 VM: blocking the guest's way to the host's loopback failed ({0}); refusing to start the guest's network")]
    L1Block(String),
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

/// The kind of host network a VM gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetKind {
    /// A tap device kindling creates (root).
    Tap,
    /// A passt process kindling starts (no privileges needed).
    Passt,
}

impl NetKind {
    /// The `--net` value that asks for it.
    pub fn as_str(self) -> &'static str {
        match self {
            NetKind::Tap => "tap",
            NetKind::Passt => "passt",
        }
    }
}

/// Resolves `--net` to a kind of network and says why, for the stderr line every boot
/// prints. `emulated`: the VMM will run inside the emulated runner's level-1 VM, as root
/// with the tun module, so TAP works there whoever runs kindling here; passt must be
/// installed here to be shipped in.
pub fn choose(choice: NetChoice, emulated: bool) -> Result<(Option<NetKind>, String), NetSetupError> {
    let l1 = if emulated { " inside the level-1 VM" } else { "" };
    Ok(match choice {
        NetChoice::None => (None, "requested with --net none".into()),
        NetChoice::Tap if emulated => {
            (Some(NetKind::Tap), format!("requested with --net tap; created{l1}, where kindling runs as root"))
        }
        NetChoice::Tap => {
            tap::usable().map_err(|why| NetSetupError::TunOpen(io::Error::other(why)))?;
            (Some(NetKind::Tap), "requested with --net tap".into())
        }
        NetChoice::Passt => {
            passt::usable().map_err(|_| NetSetupError::NoPasst)?;
            (
                Some(NetKind::Passt),
                format!("requested with --net passt{}", if emulated { "; shipped into the level-1 VM" } else { "" }),
            )
        }
        NetChoice::Auto if emulated => {
            (Some(NetKind::Tap), "default: kindling runs as root inside the level-1 VM, which has /dev/net/tun".into())
        }
        NetChoice::Auto => match (tap::usable(), passt::usable()) {
            (Ok(()), _) => (Some(NetKind::Tap), "default: running as root and /dev/net/tun is usable".into()),
            (Err(why), Ok(())) => {
                (Some(NetKind::Passt), format!("default: TAP is not usable ({why}), passt is installed"))
            }
            (Err(tap), Err(passt)) => (
                None,
                format!(
                    "default: TAP is not usable ({tap}) and {passt} (apt-get install passt); the guest has no network"
                ),
            ),
        },
    })
}

/// A network set up on the host: the backend the VMM's device uses, the guest's
/// addressing, and a sentence saying what was done.
pub struct HostNet {
    pub backend: Box<dyn Backend>,
    pub guest: NetParams,
    pub summary: String,
}

/// Sets up the host side of a network of `kind`. `host_loopback`: the guest may reach
/// the services on the host's loopback through its gateway (off by default: other
/// clusters' API forwards and the user's local services live there).
pub fn setup(kind: NetKind, host_loopback: bool) -> Result<HostNet, NetSetupError> {
    let (backend, guest, summary): (Box<dyn Backend>, _, _) = match kind {
        NetKind::Tap => {
            let (tap, guest, summary) = tap::Tap::setup(host_loopback)?;
            (Box::new(tap), guest, summary)
        }
        NetKind::Passt => {
            let (passt, guest, summary) = passt::Passt::start(host_loopback)?;
            (Box::new(passt), guest, summary)
        }
    };
    Ok(HostNet { backend, guest, summary })
}

/// A locally administered unicast MAC for the guest: 06:6b:6c ("kl") and three bytes
/// that differ between the VMs of one host (the VMM's process ID).
pub fn guest_mac() -> [u8; 6] {
    let id = std::process::id();
    [0x06, 0x6b, 0x6c, (id >> 16) as u8, (id >> 8) as u8, id as u8]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_mac_is_local_and_unicast() {
        let mac = guest_mac();
        assert_eq!(mac[0] & 0x03, 0x02, "locally administered, unicast");
    }
}
