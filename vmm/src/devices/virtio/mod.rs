//! virtio devices and their MMIO transport (virtio 1.x, "modern" register layout).

pub mod block;
pub mod mmio;

use virtio_queue::Queue;
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
    /// Services the available descriptors of queue `index`. Returns true when used
    /// buffers were added and the driver asked to be notified.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
    /// Makes everything the device acknowledged durable (called when the VM stops).
    fn sync(&mut self) {}
}
