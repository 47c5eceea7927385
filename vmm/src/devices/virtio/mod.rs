//! virtio devices and their MMIO transport (virtio 1.x, "modern" register layout).

pub mod block;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub mod test_ring;
pub mod vsock;

use std::os::unix::io::RawFd;

use virtio_queue::{DescriptorChain, Queue, QueueT};
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
    /// driver asked to be notified.
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool;
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
    /// event (the fd is level-triggered) and keeps what it has for the guest. Returns
    /// true as [`Self::process_queue`] does.
    fn process_host_events(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> bool {
        false
    }
    /// The driver reset the device: forget everything tied to the driver's state.
    fn reset(&mut self) {}
}

/// Services every available chain of `queue` with `each`, which returns the length the
/// device wrote into the chain; each chain then goes back to the guest. Guest
/// notifications are off meanwhile and on again once the queue is empty (and looked at
/// once more, since the guest may have added buffers before it saw them on). Returns
/// true when used buffers were added and the driver wants to be notified. `device`
/// names the device in logs.
pub fn service_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    device: &str,
    mut each: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> bool {
    let mut used_any = false;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            tracing::warn!("{device}: {e}");
            return used_any;
        }
        // The chain iterator stops at loops (its TTL is the queue size) and at malformed
        // indirect tables: the device checks whatever it yields.
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = each(chain);
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("{device}: cannot return descriptor {head}: {e}");
                return used_any;
            }
            used_any = true;
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue, // more buffers arrived meanwhile
            Ok(false) => break,
            Err(e) => {
                tracing::warn!("{device}: {e}");
                break;
            }
        }
    }
    used_any && queue.needs_notification(mem).unwrap_or(true)
}
