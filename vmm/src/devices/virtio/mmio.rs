//! virtio-mmio transport (virtio 1.x spec, section 4.2.2): one 4 KiB register window
//! per device, queue notifications through ioeventfd, interrupts through irqfd.

use std::os::unix::io::RawFd;
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::bus::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4b4c_4e44; // "KLND"

// Register offsets.
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// Queue notifications land here; the VMM registers an ioeventfd per queue on it.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

/// One device's virtio-mmio register window; it owns the queues, features, status and interrupt.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemoryMmap>,
    irq: EventFd,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
}

impl MmioTransport {
    /// A transport for `device` whose queues live in `mem` and which interrupts through `irq`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: Arc<GuestMemoryMmap>, irq: EventFd) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
            .collect();
        Self {
            device,
            mem,
            irq,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
        }
    }

    /// Number of virtqueues the device has.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// True once the driver finished setting the device up (DRIVER_OK, not failed).
    pub fn is_active(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET) == 0
    }

    /// Called by the event loop when queue `index` was notified.
    pub fn process_queue(&mut self, index: usize) {
        if !self.is_active() || index >= self.queues.len() || !self.queues[index].ready() {
            return;
        }
        let mem = self.mem.clone();
        if self.device.process_queue(index, &mut self.queues, &mem) {
            self.raise(VIRTIO_MMIO_INT_VRING);
        }
    }

    /// See [`VirtioDevice::host_events_fd`].
    pub fn host_events_fd(&self) -> Option<RawFd> {
        self.device.host_events_fd()
    }

    /// Called by the event loop when [`Self::host_events_fd`] is readable.
    pub fn process_host_events(&mut self) {
        let mem = self.mem.clone();
        // Before activation the queues are not the driver's yet: the device gets none.
        let queues: &mut [Queue] = if self.is_active() { &mut self.queues } else { &mut [] };
        if self.device.process_host_events(queues, &mem) {
            self.raise(VIRTIO_MMIO_INT_VRING);
        }
    }

    /// Flushes the device's backing store (see [`VirtioDevice::sync`]).
    pub fn sync_device(&mut self) {
        self.device.sync();
    }

    fn raise(&mut self, why: u32) {
        self.interrupt_status |= why;
        if let Err(e) = self.irq.write(1) {
            tracing::error!("virtio interrupt: {e}");
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let was_active = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
        self.status = value;
        if !was_active && value & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let needed = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        let mem = self.mem.clone();
        let bad_queue = self.queues.iter().position(|q| q.ready() && !q.is_valid(mem.as_ref()));
        if self.status & needed != needed || bad_queue.is_some() {
            tracing::warn!(
                "virtio device type {}: driver set DRIVER_OK with status {:#x} / invalid queue {:?}; marking NEEDS_RESET",
                self.device.device_type(),
                self.status,
                bad_queue
            );
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            self.raise(VIRTIO_MMIO_INT_CONFIG);
            return;
        }
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
        self.device.activate(self.driver_features);
        // Buffers may have been queued before the driver said DRIVER_OK.
        for i in 0..self.queues.len() {
            self.process_queue(i);
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        let setup_allowed = self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        let queue_writable = |t: &mut Self| setup_allowed && t.selected_queue().is_some_and(|q| !q.ready());
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES if setup_allowed && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                // Only bits the device offered can be acknowledged.
                let offered = self.device.features();
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
                    _ => {}
                }
                self.driver_features &= offered;
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM if queue_writable(self) => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            REG_QUEUE_READY if setup_allowed => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_NOTIFY => self.process_queue(value as usize),
            REG_INTERRUPT_ACK => self.interrupt_status &= !value,
            REG_STATUS => self.set_status(value),
            REG_QUEUE_DESC_LOW if queue_writable(self) => {
                self.selected_queue().unwrap().set_desc_table_address(Some(value), None)
            }
            REG_QUEUE_DESC_HIGH if queue_writable(self) => {
                self.selected_queue().unwrap().set_desc_table_address(None, Some(value))
            }
            REG_QUEUE_DRIVER_LOW if queue_writable(self) => {
                self.selected_queue().unwrap().set_avail_ring_address(Some(value), None)
            }
            REG_QUEUE_DRIVER_HIGH if queue_writable(self) => {
                self.selected_queue().unwrap().set_avail_ring_address(None, Some(value))
            }
            REG_QUEUE_DEVICE_LOW if queue_writable(self) => {
                self.selected_queue().unwrap().set_used_ring_address(Some(value), None)
            }
            REG_QUEUE_DEVICE_HIGH if queue_writable(self) => {
                self.selected_queue().unwrap().set_used_ring_address(None, Some(value))
            }
            _ => tracing::debug!(
                "virtio-mmio: ignored write {value:#x} to register {offset:#x} (status {:#x})",
                self.status
            ),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            let config = self.device.config();
            let start = (offset - REG_CONFIG) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = config.get(start + i).copied().unwrap_or(0);
            }
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            tracing::debug!("virtio-mmio: config space is read-only for this device");
        } else if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset % 4 == 0) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    struct Dummy {
        processed: usize,
    }
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            1 << 32
        }
        fn config(&self) -> &[u8] {
            &[1, 2, 3, 4]
        }
        fn process_queue(&mut self, _i: usize, _q: &mut [Queue], _m: &GuestMemoryMmap) -> bool {
            self.processed += 1;
            true
        }
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }
    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn driver_handshake_activates_and_garbage_does_not_panic() {
        let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let mut t = MmioTransport::new(Box::new(Dummy { processed: 0 }), mem, EventFd::new(0).unwrap());
        assert_eq!(r(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        // Driver asks for features the device does not have: they are masked.
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.driver_features, 1 << 32);
        // Queue setup, with addresses inside memory.
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 16);
        w(&mut t, REG_QUEUE_NUM, 16);
        w(&mut t, REG_QUEUE_DESC_LOW, 0x1000);
        w(&mut t, REG_QUEUE_DRIVER_LOW, 0x2000);
        w(&mut t, REG_QUEUE_DEVICE_LOW, 0x3000);
        w(&mut t, REG_QUEUE_READY, 1);
        w(&mut t, REG_STATUS, 1 | 2 | 8 | 4);
        assert!(t.is_active());
        // Hostile notifications and selections.
        w(&mut t, REG_QUEUE_NOTIFY, 7);
        w(&mut t, REG_QUEUE_SEL, 99);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0);
        t.read(0x101, &mut [0u8; 8]);
        t.write(0x3, &[1, 2]);
        // Reset brings everything back.
        w(&mut t, REG_STATUS, 0);
        assert!(!t.is_active());
        assert_eq!(r(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn queue_outside_memory_needs_reset() {
        let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let mut t = MmioTransport::new(Box::new(Dummy { processed: 0 }), mem, EventFd::new(0).unwrap());
        w(&mut t, REG_QUEUE_NUM, 16);
        w(&mut t, REG_QUEUE_DESC_LOW, 0xfff0_0000);
        w(&mut t, REG_QUEUE_READY, 1);
        w(&mut t, REG_STATUS, 1 | 2 | 8 | 4);
        assert!(!t.is_active());
        assert_ne!(r(&mut t, REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }
}
