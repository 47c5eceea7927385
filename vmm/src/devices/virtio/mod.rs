//! virtio devices and their MMIO transport (virtio 1.x, "modern" register layout).
//!
//! Devices take chains through [`pop_chain`] and give them back through [`add_used`]
//! (or [`service_queue`], which does both in the usual loop). A driver that breaks a
//! ring's rules, rather than a chain's, gets a [`RingError`]: the transport then marks
//! the device DEVICE_NEEDS_RESET and leaves it alone until the driver resets it.
//! Chains are read through [`chain::Segments`], which bounds what one chain can cost.
//!
//! Log lines a guest (or a host peer) can repeat at will, at warn level and above, go
//! through the rate-limited macros of [`crate::devices::guest_log`]; debug lines are
//! not limited, being off unless asked for.

pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub mod test_alloc;
#[cfg(test)]
pub mod test_fuzz;
#[cfg(test)]
pub mod test_ring;
pub mod vsock;

use std::os::unix::io::RawFd;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// What a device model implements; the transport owns queues, features and status.
pub trait VirtioDevice: Send {
    /// VIRTIO_ID_* of the device.
    fn device_type(&self) -> u32;
    /// Maximum size of each of the device's virtqueues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// Device configuration space, read through the transport at offset 0x100.
    fn config(&self) -> &[u8];
    /// Services the available descriptors of queue `index`, which the driver notified.
    /// All queues are passed because a device may answer on another queue (vsock
    /// replies to a TX packet on RX). Returns true when used buffers were added and the
    /// driver asked to be notified; Err when the driver broke a ring, after which the
    /// transport stops servicing the device until the driver resets it.
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, RingError>;
    /// The driver set DRIVER_OK; `driver_features` are the features it accepted (a
    /// subset of [`Self::features`]). Called before the queues are first processed.
    fn activate(&mut self, _driver_features: u64) {}
    /// Makes everything the device acknowledged durable (called when the VM stops).
    fn sync(&mut self) {}
    /// A file descriptor that becomes readable when the device has work that no queue
    /// notification announces (vsock: host sockets). The event loop watches it and
    /// calls [`Self::process_host_events`].
    fn host_events_fd(&self) -> Option<RawFd> {
        None
    }
    /// Handles what made [`Self::host_events_fd`] readable. `queues` is empty while the
    /// driver has not activated the device. In that case the device still consumes the
    /// event (the fd is level-triggered) and keeps what it has for the guest; so it
    /// does while the device needs a reset. Returns what [`Self::process_queue`] does.
    fn process_host_events(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        Ok(false)
    }
    /// The driver reset the device: forget everything tied to the driver's state.
    fn reset(&mut self) {}
    /// The VM was restored from a snapshot and the device activated again: tell the
    /// driver what did not survive (vsock: every connection, with a transport reset
    /// event). Returns as [`Self::process_queue`] does.
    fn restored(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        Ok(false)
    }
}

/// The driver broke a virtqueue's rules in a way the device cannot answer on the ring
/// itself. The transport then stops servicing the device and sets DEVICE_NEEDS_RESET
/// (virtio 1.x, 2.1.2) until the driver resets it: going on would mean either spinning
/// on a ring that never empties or guessing which of its entries are real.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// avail.idx is further ahead of the device than the queue has entries.
    #[error(
        "avail idx {avail_idx} is {} entries ahead of the device's next entry {next_avail}, more than the queue's {size}; \
         the driver must reset the device",
        avail_idx.wrapping_sub(*next_avail)
    )]
    AvailIdxAhead {
        /// The avail ring's idx as read.
        avail_idx: u16,
        /// The next avail entry the device would take.
        next_avail: u16,
        /// The queue size the driver set.
        size: u16,
    },
    /// An avail ring entry names a descriptor beyond the descriptor table, so the chain
    /// cannot be returned through the used ring.
    #[error(
        "avail ring entry names descriptor {head}, outside the {size}-entry table; the driver must reset the device"
    )]
    HeadOutOfRange {
        /// The head index the entry holds.
        head: u16,
        /// The queue size the driver set.
        size: u16,
    },
    /// avail.idx announced an entry that could not be read (or moved backwards).
    #[error("avail idx announced entry {next_avail} but it cannot be read; the driver must reset the device")]
    EntryUnreadable {
        /// The avail entry that was to be read.
        next_avail: u16,
    },
    /// A ring could not be read or written through guest memory.
    #[error("ring access failed ({0}); the driver must reset the device")]
    Access(virtio_queue::Error),
}

/// Takes the next available chain of `queue`, after checking what virtio-queue 0.18
/// does not report: an avail idx more than the queue size ahead (its iterator only
/// logs that, and says nothing is available while `enable_notification` says there
/// is, which spins a caller) and a head index outside the descriptor table (which
/// `add_used` would refuse). Ok(None) when the driver made nothing more available.
pub fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, RingError> {
    let size = queue.size();
    let next_avail = queue.next_avail();
    let avail_idx = queue.avail_idx(mem, Ordering::Acquire).map_err(RingError::Access)?.0;
    match avail_idx.wrapping_sub(next_avail) {
        0 => return Ok(None),
        n if n > size => return Err(RingError::AvailIdxAhead { avail_idx, next_avail, size }),
        _ => {}
    }
    let chain = match queue.iter(mem) {
        Ok(mut avail) => avail.next(),
        // The guest moved avail.idx again since the read above.
        Err(virtio_queue::Error::InvalidAvailRingIndex) => {
            let avail_idx = queue.avail_idx(mem, Ordering::Acquire).map_err(RingError::Access)?.0;
            return Err(RingError::AvailIdxAhead { avail_idx, next_avail, size });
        }
        Err(e) => return Err(RingError::Access(e)),
    };
    // avail.idx only grows, so an entry announced above is still there; it is missing
    // only when the guest moved the index back, or the ring is outside memory.
    let chain = chain.ok_or(RingError::EntryUnreadable { next_avail })?;
    if chain.head_index() >= size {
        return Err(RingError::HeadOutOfRange { head: chain.head_index(), size });
    }
    Ok(Some(chain))
}

/// Returns chain `head` (which [`pop_chain`] yielded) to the driver with `len` bytes
/// written.
pub fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> Result<(), RingError> {
    queue.add_used(mem, head, len).map_err(RingError::Access)
}

/// Services every available chain of `queue` with `each`, which returns the length the
/// device wrote into the chain; each chain then goes back to the guest. Guest
/// notifications are off meanwhile and on again once the queue is empty (and looked at
/// once more, since the guest may have added buffers before it saw them on). Returns
/// true when used buffers were added and the driver wants to be notified.
///
/// Every round of the loop takes at least one chain or ends it: [`pop_chain`] says
/// Ok(None) only when avail.idx equals the device's position, so `enable_notification`
/// finds more only when the guest really published more, and a broken ring is an
/// error instead of an endless "nothing yet, but more is there".
pub fn service_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut each: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> Result<bool, RingError> {
    let mut used_any = false;
    loop {
        queue.disable_notification(mem).map_err(RingError::Access)?;
        while let Some(chain) = pop_chain(queue, mem)? {
            let head = chain.head_index();
            let len = each(chain);
            add_used(queue, mem, head, len)?;
            used_any = true;
        }
        if !queue.enable_notification(mem).map_err(RingError::Access)? {
            break;
        }
    }
    Ok(used_any && queue.needs_notification(mem).unwrap_or(true))
}
