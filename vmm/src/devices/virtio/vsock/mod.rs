//! virtio-vsock (virtio 1.x spec, section 5.10): stream sockets between the guest and
//! host programs, with the host side on UNIX sockets as in Firecracker.
//!
//! Layers, bottom up:
//! - [`packet`]: the packet header, and reading/writing packets in guest descriptor
//!   chains. Every field the guest controls is checked here.
//! - [`connection`]: one connection's state machine and its credit flow control.
//! - [`muxer`]: the host side. It listens on the UNIX socket `P`, connects guest
//!   connections to `P_<port>`, and routes packets to connections. It also owns the
//!   epoll fd that reports host-side events.
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice) that moves packets between
//!   the virtqueues and the muxer.
//!
//! The guest is untrusted. Malformed chains are dropped, and packets that cannot be
//! accepted are answered with RST. Memory per connection is bounded: at most
//! [`connection::CONN_BUF_SIZE`] bytes waiting for the host, and nothing waiting for
//! the guest (host data is read only when the guest has room for it).

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use device::Vsock;
pub use muxer::port_path;

/// The host's context ID; the guest's is configured (3 or more).
pub const HOST_CID: u64 = 2;
/// Queue order fixed by the spec (the third, the event queue, is unused).
pub const RX_QUEUE: usize = 0;
/// Index of the TX queue (guest to host).
pub const TX_QUEUE: usize = 1;

/// Why the vsock device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The socket could not be bound, or a stale one not checked or removed.
    #[error("vsock socket {}: {err}; check that its directory exists and is writable, or pass another --vsock path", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        err: std::io::Error,
    },
    /// The socket path exists and is not a UNIX socket.
    #[error("vsock socket {}: exists and is not a UNIX socket; remove it or pass another --vsock path", .0.display())]
    NotASocket(PathBuf),
    /// Something accepts connections on the socket path: a running VM uses it.
    #[error("vsock socket {} is in use by a running VM (it accepts connections); stop that VM or pass another --vsock path", .0.display())]
    InUse(PathBuf),
    /// Creating the epoll fd or timerfd, or setting up the listener, failed.
    #[error("vsock: setting up {what}: {err}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The I/O error.
        err: std::io::Error,
    },
}
