//! virtio-net (virtio 1.x spec, section 5.1): one RX and one TX queue, a MAC address and
//! link status in the config space, mergeable RX buffers, and checksum/TSO offloads
//! when the backend can take offloaded frames.
//!
//! Layers:
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice). It moves frames between
//!   the virtqueues and a [`Backend`], and checks every chain the guest hands it.
//! - [`tap`]: a tap device opened by name, with IFF_VNET_HDR so that offloaded frames
//!   pass through as they are.
//! - [`stream`]: a stream socket speaking the qemu stream protocol (each frame prefixed
//!   by its 32-bit big-endian length), as passt does. No offloads, but a 64 KiB MTU.
//!
//! Creating the tap, giving it addresses and NAT, or starting passt happens on the host
//! side (the `kindling` binary); this module receives the open backend.
//!
//! The guest is untrusted: a chain that is too short or too long, has more than
//! [`device::MAX_CHAIN_DESCS`] descriptors or descriptors in the wrong direction or
//! outside memory, or asks for an offload that was not negotiated is dropped, and its
//! buffer is returned. A broken ring is reported to the transport (NEEDS_RESET). No
//! guest input can panic the VMM or make it allocate beyond fixed per-device buffers.

pub mod device;
pub mod stream;
pub mod tap;

#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::io::RawFd;

pub use device::Net;

/// Index of the receive queue (host to guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest to host).
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

/// Errors of the virtio-net device itself.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Creating the device's epoll fd or eventfd failed.
    #[error("virtio-net: setting up {what}: {err}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The I/O error.
        err: io::Error,
    },
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
