//! virtio-mmio transport (virtio 1.x spec, section 4.2.2): one 4 KiB register window
//! per device, queue notifications through ioeventfd, interrupts through irqfd.
//!
//! The driver is untrusted. Status only gains bits until the driver writes 0 (a
//! reset). Queue registers go through virtio-queue's `try_` setters, so a bad value is
//! ignored without virtio-queue logging it; at DRIVER_OK every ready queue must lie in
//! guest memory. When the driver breaks a ring (a [`RingError`] from the device), or
//! sets DRIVER_OK on a setup that cannot work, the device gets DEVICE_NEEDS_RESET and a
//! configuration change interrupt, and its queues are not serviced again until the
//! driver resets it. Its host events are still consumed meanwhile (without queues), so
//! that a level-triggered fd cannot spin the event loop.

use std::os::unix::io::RawFd;
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::{RingError, VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::bus::BusDevice;
use crate::devices::guest_log::{guest_error, guest_warn};

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

/// One virtqueue's place and progress, as a snapshot keeps it (virtio-queue's
/// `QueueState`, which has no serde support).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    /// The device's maximum size.
    pub max_size: u16,
    /// The next available-ring entry the device reads.
    pub next_avail: u16,
    /// The next used-ring entry the device writes.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX is in use.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// The driver made it ready.
    pub ready: bool,
    /// The descriptor table's guest address.
    pub desc_table: u64,
    /// The available ring's guest address.
    pub avail_ring: u64,
    /// The used ring's guest address.
    pub used_ring: u64,
}

/// A transport's registers and queues, as a snapshot keeps them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// The device's type (checked on restore).
    pub device_type: u32,
    /// Its queues.
    pub queues: Vec<QueueSnapshot>,
    /// QueueSel.
    pub queue_sel: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// The device status.
    pub status: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
}

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

    /// The transport's registers and queues, for a snapshot (the device is quiescent:
    /// the event loop is not running it).
    pub fn state(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueSnapshot {
                        max_size: s.max_size,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        event_idx_enabled: s.event_idx_enabled,
                        size: s.size,
                        ready: s.ready,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                    }
                })
                .collect(),
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt_status,
        }
    }

    /// Puts a snapshot's registers and queues back, for a device of the same type: an
    /// active device is activated again with the features the driver had accepted,
    /// then told it was restored (vsock resets its connections), its queues are
    /// serviced once (a notification in flight was lost), and a pending interrupt is
    /// raised again. The state comes from a snapshot file, so it is
    /// checked like a driver's writes: a queue that does not fit is an error.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), String> {
        if state.device_type != self.device.device_type() || state.queues.len() != self.queues.len() {
            return Err(format!(
                "a device of type {} with {} queues cannot take the state of type {} with {} queues",
                self.device.device_type(),
                self.queues.len(),
                state.device_type,
                state.queues.len()
            ));
        }
        for (q, s) in self.queues.iter_mut().zip(&state.queues) {
            let device_max = q.max_size();
            let qs = virtio_queue::QueueState {
                max_size: s.max_size,
                next_avail: s.next_avail,
                next_used: s.next_used,
                event_idx_enabled: s.event_idx_enabled,
                size: s.size,
                ready: s.ready,
                desc_table: s.desc_table,
                avail_ring: s.avail_ring,
                used_ring: s.used_ring,
            };
            *q = Queue::try_from(qs).map_err(|e| format!("a queue of the snapshot: {e}"))?;
            if q.max_size() != device_max {
                return Err("a queue's maximum size differs from the device's".into());
            }
            // virtio-queue's conversion does not check the size the driver chose; the
            // size register's setter would have refused these.
            if s.size > device_max || (s.size != 0 && !s.size.is_power_of_two()) {
                return Err(format!("a queue of size {} does not fit the device's {device_max}", s.size));
            }
        }
        self.queue_sel = state.queue_sel;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features & self.device.features();
        self.status = state.status;
        self.interrupt_status = state.interrupt_status;
        if self.is_active() {
            for i in 0..self.queues.len() {
                check_queue(&self.queues[i], &self.mem).map_err(|why| format!("queue {i}: {why}"))?;
            }
            self.device.activate(self.driver_features);
            let mem = self.mem.clone();
            let notify = self.device.restored(&mut self.queues, &mem);
            self.after_processing(notify);
            // A notification the snapshotted VMM had not handled yet is lost with its
            // ioeventfd: every queue is looked at once, as if notified.
            for i in 0..self.queues.len() {
                self.process_queue(i);
            }
        }
        if self.interrupt_status != 0 {
            let _ = self.irq.write(1);
        }
        Ok(())
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
        let result = self.device.process_queue(index, &mut self.queues, &mem);
        self.after_processing(result);
    }

    /// See [`VirtioDevice::host_events_fd`].
    pub fn host_events_fd(&self) -> Option<RawFd> {
        self.device.host_events_fd()
    }

    /// Called by the event loop when [`Self::host_events_fd`] is readable.
    pub fn process_host_events(&mut self) {
        let mem = self.mem.clone();
        // Before activation the queues are not the driver's yet, and once the device
        // needs a reset they are not to be touched: the device gets none, and still
        // consumes its host events (they are level-triggered).
        let queues: &mut [Queue] = if self.is_active() { &mut self.queues } else { &mut [] };
        let result = self.device.process_host_events(queues, &mem);
        self.after_processing(result);
    }

    fn after_processing(&mut self, result: Result<bool, RingError>) {
        match result {
            Ok(true) => self.raise(VIRTIO_MMIO_INT_VRING),
            Ok(false) => {}
            Err(e) => self.needs_reset(&e),
        }
    }

    /// The driver broke the device's rules: DEVICE_NEEDS_RESET, announced with a
    /// configuration change interrupt (virtio 1.x, 2.1.2 and 4.2.2.1). The queues are
    /// not serviced again until the driver writes 0 to Status.
    fn needs_reset(&mut self, why: &dyn std::fmt::Display) {
        guest_warn!(
            "virtio device type {}: {why}; the device is marked NEEDS_RESET and stopped until the guest resets it",
            self.device.device_type()
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    /// Flushes the device's backing store (see [`VirtioDevice::sync`]).
    pub fn sync_device(&mut self) {
        self.device.sync();
    }

    fn raise(&mut self, why: u32) {
        self.interrupt_status |= why;
        if let Err(e) = self.irq.write(1) {
            guest_error!("virtio interrupt: {e}");
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
        // NEEDS_RESET is the device's to set (virtio 1.x, 2.1.2): the driver's write
        // neither sets nor clears it.
        let value = (value & !VIRTIO_CONFIG_S_NEEDS_RESET) | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET);
        // The driver only ever adds bits (virtio 1.x, 3.1.1); clearing one takes a
        // reset. Accepting a clear would let it take NEEDS_RESET back without one, or
        // take DRIVER_OK away and reconfigure queues under a running device.
        if value & self.status != self.status {
            tracing::debug!("virtio-mmio: ignored status {value:#x}: it clears bits of {:#x}", self.status);
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
        if self.status & needed != needed {
            let status = self.status;
            return self.needs_reset(&format_args!(
                "driver set DRIVER_OK with status {status:#x}, without ACKNOWLEDGE, DRIVER and FEATURES_OK"
            ));
        }
        for i in 0..self.queues.len() {
            if let Err(why) = check_queue(&self.queues[i], &self.mem) {
                return self.needs_reset(&format_args!("driver set DRIVER_OK with queue {i} unusable: {why}"));
            }
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
                let q = self.selected_queue().expect("queue_writable checked it");
                // try_set_size: set_size would log through the `log` crate, unlimited.
                if u16::try_from(value).map_or(true, |size| q.try_set_size(size).is_err()) {
                    tracing::debug!("virtio-mmio: ignored QueueNum {value}: not a power of two up to {}", q.max_size());
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
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH
                if queue_writable(self) =>
            {
                let q = self.selected_queue().expect("queue_writable checked it");
                let high = offset & 4 != 0;
                let merge = |old: u64| {
                    if high {
                        (old & 0xffff_ffff) | (u64::from(value) << 32)
                    } else {
                        (old & !0xffff_ffff) | u64::from(value)
                    }
                };
                // The try_ setters: the others log misalignment through `log`, unlimited.
                let result = match offset & !4 {
                    REG_QUEUE_DESC_LOW => q.try_set_desc_table_address(GuestAddress(merge(q.desc_table()))),
                    REG_QUEUE_DRIVER_LOW => q.try_set_avail_ring_address(GuestAddress(merge(q.avail_ring()))),
                    _ => q.try_set_used_ring_address(GuestAddress(merge(q.used_ring()))),
                };
                if let Err(e) = result {
                    tracing::debug!("virtio-mmio: ignored write {value:#x} to register {offset:#x}: {e}");
                }
            }
            _ => tracing::debug!(
                "virtio-mmio: ignored write {value:#x} to register {offset:#x} (status {:#x})",
                self.status
            ),
        }
    }
}

/// Whether `q` may be used as the driver set it up: a ready queue must have its three
/// parts inside guest memory. This is virtio-queue's `is_valid`, which logs through the
/// `log` crate (unlimited) and misses an avail ring at address 0 (its iterator then
/// refuses to run, which callers cannot tell from an empty queue).
fn check_queue(q: &Queue, mem: &GuestMemoryMmap) -> Result<(), String> {
    if !q.ready() {
        return Ok(());
    }
    let size = u64::from(q.size());
    let parts = [
        ("descriptor table", q.desc_table(), 16 * size, Permissions::Read),
        // flags, idx, ring, used_event
        ("avail ring", q.avail_ring(), 6 + 2 * size, Permissions::Read),
        // flags, idx, ring, avail_event
        ("used ring", q.used_ring(), 6 + 8 * size, Permissions::Write),
    ];
    for (what, addr, len, access) in parts {
        if !mem.check_range(GuestAddress(addr), len as usize, access) {
            return Err(format!("its {what} ({len} bytes at {addr:#x}) is not inside guest memory"));
        }
    }
    if q.avail_ring() == 0 {
        return Err("its avail ring is at address 0".into());
    }
    Ok(())
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
    use crate::devices::virtio::test_ring::{within, Ring, QSIZE};
    use std::time::Duration;
    use vm_memory::Bytes;

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
        fn process_queue(&mut self, _i: usize, _q: &mut [Queue], _m: &GuestMemoryMmap) -> Result<bool, RingError> {
            self.processed += 1;
            Ok(true)
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

    fn activated(mem: &Arc<GuestMemoryMmap>) -> MmioTransport {
        let mut t = MmioTransport::new(Box::new(Dummy { processed: 0 }), mem.clone(), EventFd::new(0).unwrap());
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(&mut t, REG_QUEUE_NUM, 16);
        w(&mut t, REG_QUEUE_DESC_LOW, 0x1000);
        w(&mut t, REG_QUEUE_DRIVER_LOW, 0x2000);
        w(&mut t, REG_QUEUE_DEVICE_LOW, 0x3000);
        w(&mut t, REG_QUEUE_READY, 1);
        w(&mut t, REG_STATUS, 1 | 2 | 8 | 4);
        t
    }

    #[test]
    fn transport_state_round_trips_through_json_and_hostile_state_is_refused() {
        let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let t = activated(&mem);
        let state = t.state();
        let json = serde_json::to_string(&state).unwrap();
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let raised = irq.try_clone().unwrap();
        let mut back = MmioTransport::new(Box::new(Dummy { processed: 0 }), mem.clone(), irq);
        back.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert!(raised.read().unwrap() >= 1, "the queue was serviced (a lost notification) and the driver told");
        assert!(back.is_active(), "an active device is active again");
        assert_eq!(back.state(), state);
        assert_eq!(back.driver_features, 1 << 32);

        let fresh = || MmioTransport::new(Box::new(Dummy { processed: 0 }), mem.clone(), EventFd::new(0).unwrap());
        let hostile = |f: &dyn Fn(&mut TransportState)| {
            let mut s = state.clone();
            f(&mut s);
            fresh().restore(&s).unwrap_err()
        };
        assert!(hostile(&|s| s.device_type = 3).contains("cannot take the state"));
        assert!(hostile(&|s| s.queues.push(s.queues[0].clone())).contains("cannot take the state"));
        assert!(hostile(&|s| s.queues[0].size = 1000).contains("queue"));
        assert!(hostile(&|s| s.queues[0].max_size = 1 << 15).contains("queue"));
        assert!(hostile(&|s| s.queues[0].desc_table = u64::MAX - 8).contains("queue"));
        assert!(hostile(&|s| s.queues[0].used_ring = (1 << 20) - 4).contains("not inside guest memory"));
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

    /// The driver's side of bringing up queue 0 on `ring`, then DRIVER_OK.
    fn bring_up(t: &mut MmioTransport, ring: &Ring) {
        w(t, REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
        w(t, REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK);
        w(t, REG_QUEUE_SEL, 0);
        w(t, REG_QUEUE_NUM, u32::from(QSIZE));
        for (low, addr) in
            [(REG_QUEUE_DESC_LOW, ring.desc), (REG_QUEUE_DRIVER_LOW, ring.avail), (REG_QUEUE_DEVICE_LOW, ring.used)]
        {
            w(t, low, addr as u32);
            w(t, low + 4, (addr >> 32) as u32);
        }
        w(t, REG_QUEUE_READY, 1);
        w(t, REG_STATUS, 1 | 2 | 8 | 4);
        assert!(t.is_active(), "status {:#x}", r(t, REG_STATUS));
    }

    /// Publishes a FLUSH request on `ring`.
    fn flush(mem: &GuestMemoryMmap, ring: &mut Ring) {
        mem.write_obj(virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH, GuestAddress(0x8000)).unwrap();
        ring.push(mem, &[(0x8000, 16, 0), (0x9000, 1, virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16)]);
    }

    #[test]
    fn a_broken_ring_stops_the_device_until_the_driver_resets_it() {
        let disk = tempfile::NamedTempFile::new().unwrap();
        disk.as_file().set_len(4096).unwrap();
        let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let dev = crate::devices::virtio::block::Block::open(disk.path(), false).unwrap();
        let mut t = MmioTransport::new(Box::new(dev), mem.clone(), EventFd::new(0).unwrap());
        let (mut ring, _) = Ring::new(&mem, 0x10000);
        bring_up(&mut t, &ring);
        flush(&mem, &mut ring);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(ring.take_used(&mem).len(), 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        w(&mut t, REG_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);

        // The driver claims more chains than the queue has entries.
        ring.set_avail_idx(&mem, ring.avail_idx.wrapping_add(QSIZE + 1));
        let mut t = within(Duration::from_secs(2), move || {
            w(&mut t, REG_QUEUE_NOTIFY, 0);
            t
        });
        assert_ne!(r(&mut t, REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG, "configuration change interrupt");
        assert!(!t.is_active());

        // Neither a status write without the bit nor a repaired ring brings it back.
        w(&mut t, REG_STATUS, 1 | 2 | 8 | 4);
        assert_ne!(r(&mut t, REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0, "NEEDS_RESET is sticky");
        ring.set_avail_idx(&mem, ring.avail_idx.wrapping_sub(QSIZE + 1));
        flush(&mem, &mut ring);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        t.process_host_events();
        assert!(ring.take_used(&mem).is_empty(), "not serviced while it needs a reset");

        // A reset does.
        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
        let (mut ring, _) = Ring::new(&mem, 0x20000);
        bring_up(&mut t, &ring);
        flush(&mem, &mut ring);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(ring.take_used(&mem).len(), 1);
    }

    #[test]
    fn status_writes_cannot_clear_bits() {
        let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let mut t = MmioTransport::new(Box::new(Dummy { processed: 0 }), mem, EventFd::new(0).unwrap());
        w(&mut t, REG_STATUS, 1 | 2 | 8);
        w(&mut t, REG_STATUS, 1);
        assert_eq!(r(&mut t, REG_STATUS), 1 | 2 | 8);
        w(&mut t, REG_STATUS, 1 | 2 | 8 | 4);
        assert!(t.is_active());
        // Taking DRIVER_OK away (to reconfigure queues under a running device) is ignored.
        w(&mut t, REG_STATUS, 1 | 2 | 8);
        assert!(t.is_active());
        w(&mut t, REG_QUEUE_NUM, 4);
        assert_eq!(t.queues[0].size(), 16);
        // NEEDS_RESET is the device's bit: the driver cannot set it.
        w(&mut t, REG_STATUS, 1 | 2 | 8 | 4 | VIRTIO_CONFIG_S_NEEDS_RESET);
        assert_eq!(r(&mut t, REG_STATUS), 1 | 2 | 8 | 4);
    }

    #[test]
    fn invalid_queue_setup_is_ignored_without_logging_through_virtio_queue() {
        let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let mut t = MmioTransport::new(Box::new(Dummy { processed: 0 }), mem, EventFd::new(0).unwrap());
        for bad in [0, 3, 17, 32, 0x1_0010] {
            w(&mut t, REG_QUEUE_NUM, bad);
            assert_eq!(t.queues[0].size(), 16, "QueueNum {bad}");
        }
        w(&mut t, REG_QUEUE_NUM, 8);
        assert_eq!(t.queues[0].size(), 8);
        w(&mut t, REG_QUEUE_DESC_LOW, 0x1008); // not 16-byte aligned
        w(&mut t, REG_QUEUE_DRIVER_LOW, 0x2001);
        w(&mut t, REG_QUEUE_DEVICE_LOW, 0x3002);
        w(&mut t, REG_QUEUE_DESC_HIGH, 1);
        let q = &t.queues[0];
        assert_eq!((q.desc_table(), q.avail_ring(), q.used_ring()), (1 << 32, 0, 0));
        // An avail ring at 0 would make virtio-queue refuse to iterate: refused up front.
        w(&mut t, REG_QUEUE_DESC_HIGH, 0);
        w(&mut t, REG_QUEUE_DESC_LOW, 0x1000);
        w(&mut t, REG_QUEUE_DEVICE_LOW, 0x3000);
        w(&mut t, REG_QUEUE_READY, 1);
        w(&mut t, REG_STATUS, 1 | 2 | 8 | 4);
        assert!(!t.is_active());
        assert_ne!(r(&mut t, REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    /// A driver repeating what makes the transport complain gets a bounded number of
    /// lines: none through virtio-queue's `log` calls, BURST of its own.
    #[test]
    fn hostile_register_writes_log_a_bounded_number_of_lines() {
        let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let mut t = MmioTransport::new(Box::new(Dummy { processed: 0 }), mem, EventFd::new(0).unwrap());
        let (lines, log_records) = crate::devices::guest_log::testing::count_logs(|| {
            for i in 0..2000u32 {
                w(&mut t, REG_STATUS, 0);
                w(&mut t, REG_QUEUE_NUM, i | 1);
                w(&mut t, REG_QUEUE_DESC_LOW, i | 1);
                w(&mut t, REG_QUEUE_DRIVER_LOW, i | 1);
                w(&mut t, REG_QUEUE_DEVICE_LOW, i | 1);
                w(&mut t, REG_QUEUE_READY, 1);
                // DRIVER_OK without FEATURES_OK, on a queue outside memory.
                w(&mut t, REG_STATUS, 1 | 2 | 4);
                assert_ne!(r(&mut t, REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
            }
        });
        assert_eq!(log_records, 0, "virtio-queue logged");
        // The limiter is per call site and shared with tests running in parallel, which
        // can only leave fewer lines; one more is the "suppressed" line.
        assert!(lines <= crate::devices::guest_log::BURST as usize + 1, "{lines} lines");
    }

    mod props {
        use super::*;
        use crate::devices::virtio::test_fuzz::{config, guest_memory, run_bounded};
        use proptest::prelude::*;
        use std::os::unix::net::UnixStream;

        const REGS: [u64; 26] = [
            REG_MAGIC,
            REG_VERSION,
            REG_DEVICE_ID,
            REG_VENDOR_ID,
            REG_DEVICE_FEATURES,
            REG_DEVICE_FEATURES_SEL,
            REG_DRIVER_FEATURES,
            REG_DRIVER_FEATURES_SEL,
            REG_QUEUE_SEL,
            REG_QUEUE_NUM_MAX,
            REG_QUEUE_NUM,
            REG_QUEUE_READY,
            REG_QUEUE_NOTIFY,
            REG_INTERRUPT_STATUS,
            REG_INTERRUPT_ACK,
            REG_STATUS,
            REG_QUEUE_DESC_LOW,
            REG_QUEUE_DESC_HIGH,
            REG_QUEUE_DRIVER_LOW,
            REG_QUEUE_DRIVER_HIGH,
            REG_QUEUE_DEVICE_LOW,
            REG_QUEUE_DEVICE_HIGH,
            REG_CONFIG_GENERATION,
            REG_CONFIG,
            REG_CONFIG + 4,
            REG_CONFIG + 8,
        ];
        /// Ring `i` of the device lives at `RING_BASE * (i + 1)`.
        const RING_BASE: u64 = 0x10000;

        /// What a hostile driver does to the transport.
        #[derive(Clone, Debug)]
        enum Op {
            /// A read of `size` bytes.
            Read(u64, usize),
            /// A 4-byte write.
            Write(u64, u32),
            /// A write of another size (ignored by the transport, which must survive it).
            WriteBytes(u64, Vec<u8>),
            /// The whole driver handshake, every queue on its ring, every feature taken.
            BringUp,
            /// A FLUSH-like chain on ring `i` (what each device makes of it is its affair).
            Push(usize),
            /// avail.idx of ring `i` set to anything (the next Push writes it right again).
            Corrupt(usize, u16),
            /// A notification of queue `i`.
            Notify(usize),
            /// The event loop saw the device's host events fd readable.
            HostEvents,
        }

        fn offset() -> impl Strategy<Value = u64> {
            prop_oneof![4 => prop::sample::select(REGS.to_vec()), 1 => 0..0x180u64, 1 => any::<u64>()]
        }

        fn value() -> impl Strategy<Value = u32> {
            prop_oneof![
                4 => 0..16u32,
                1 => Just(0xf),
                1 => (0..3u64).prop_map(|i| (RING_BASE * (i + 1)) as u32),
                1 => prop::sample::select(vec![16u32, 64, 128, 256, 257, 1024]),
                1 => any::<u32>(),
            ]
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => (offset(), prop::sample::select(vec![1usize, 2, 4, 8])).prop_map(|(o, n)| Op::Read(o, n)),
                6 => (offset(), value()).prop_map(|(o, v)| Op::Write(o, v)),
                1 => (offset(), prop::collection::vec(any::<u8>(), 0..9)).prop_map(|(o, b)| Op::WriteBytes(o, b)),
                2 => Just(Op::BringUp),
                3 => (0..3usize).prop_map(Op::Push),
                1 => (0..3usize, any::<u16>()).prop_map(|(i, v)| Op::Corrupt(i, v)),
                2 => (0..3usize).prop_map(Op::Notify),
                1 => Just(Op::HostEvents),
            ]
        }

        /// Devices behind the transport, with what must outlive them.
        fn device(kind: u8) -> (Box<dyn VirtioDevice>, Box<dyn std::any::Any + Send>) {
            match kind {
                0 => {
                    let f = tempfile::NamedTempFile::new().unwrap();
                    f.as_file().set_len(64 << 10).unwrap();
                    (Box::new(crate::devices::virtio::block::Block::open(f.path(), false).unwrap()), Box::new(f))
                }
                1 => {
                    let (ours, peer) = UnixStream::pair().unwrap();
                    peer.set_nonblocking(true).unwrap();
                    let backend = crate::devices::virtio::net::stream::StreamBackend::new(ours, None).unwrap();
                    (
                        Box::new(crate::devices::virtio::net::Net::new(Box::new(backend), [2, 0, 0, 0, 0, 1]).unwrap()),
                        Box::new(peer),
                    )
                }
                _ => {
                    let dir = tempfile::tempdir().unwrap();
                    let dev = crate::devices::virtio::vsock::Vsock::new(3, &dir.path().join("v.sock")).unwrap();
                    (Box::new(dev), Box::new(dir))
                }
            }
        }

        fn used_idx(mem: &GuestMemoryMmap, ring: &Ring) -> u16 {
            mem.read_obj(GuestAddress(ring.used + 2)).unwrap()
        }

        fn apply(t: &mut MmioTransport, mem: &GuestMemoryMmap, rings: &mut [Ring], op: &Op) {
            match op {
                Op::Read(o, n) => t.read(*o, &mut vec![0u8; *n]),
                Op::Write(o, v) => w(t, *o, *v),
                Op::WriteBytes(o, b) => t.write(*o, b),
                Op::BringUp => {
                    w(t, REG_STATUS, 0);
                    w(t, REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
                    for sel in 0..2 {
                        w(t, REG_DEVICE_FEATURES_SEL, sel);
                        let f = r(t, REG_DEVICE_FEATURES);
                        w(t, REG_DRIVER_FEATURES_SEL, sel);
                        w(t, REG_DRIVER_FEATURES, f);
                    }
                    w(t, REG_STATUS, 1 | 2 | 8);
                    for (i, ring) in rings.iter_mut().enumerate().take(t.queue_count()) {
                        *ring = Ring::new(mem, RING_BASE * (i as u64 + 1)).0;
                        w(t, REG_QUEUE_SEL, i as u32);
                        w(t, REG_QUEUE_NUM, u32::from(QSIZE));
                        for (low, addr) in [
                            (REG_QUEUE_DESC_LOW, ring.desc),
                            (REG_QUEUE_DRIVER_LOW, ring.avail),
                            (REG_QUEUE_DEVICE_LOW, ring.used),
                        ] {
                            w(t, low, addr as u32);
                            w(t, low + 4, (addr >> 32) as u32);
                        }
                        w(t, REG_QUEUE_READY, 1);
                    }
                    w(t, REG_STATUS, 1 | 2 | 8 | 4);
                }
                Op::Push(i) => {
                    let ring = &mut rings[*i];
                    let at = 0x80000 + 0x1000 * *i as u64;
                    mem.write_obj(virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH, GuestAddress(at)).unwrap();
                    let write = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
                    ring.push(mem, &[(at, 44, 0), (at + 0x100, 1024, write)]);
                    w(t, REG_QUEUE_NOTIFY, *i as u32);
                }
                Op::Corrupt(i, v) => mem.write_obj(*v, GuestAddress(rings[*i].avail + 2)).unwrap(),
                Op::Notify(i) => w(t, REG_QUEUE_NOTIFY, *i as u32),
                Op::HostEvents => t.process_host_events(),
            }
        }

        proptest! {
            #![proptest_config(config())]

            /// Any sequence of register accesses and ring changes, against each device:
            /// no panic, no hang, no allocation sized by the guest; NEEDS_RESET stays
            /// until the driver writes 0 to Status, and meanwhile no used ring moves.
            #[test]
            fn any_register_sequence(kind in 0u8..3, ops in prop::collection::vec(op(), 0..40)) {
                let mem = Arc::new(guest_memory());
                let (dev, keep) = device(kind);
                let t = MmioTransport::new(dev, mem.clone(), EventFd::new(0).unwrap());
                let rings = (0..3).map(|i| Ring::new(&mem, RING_BASE * (i + 1)).0).collect::<Vec<_>>();
                let failure = run_bounded(1 << 20, move || {
                    let (mut t, mut rings) = (t, rings);
                    let mut frozen: Option<Vec<u16>> = None;
                    for (n, op) in ops.iter().enumerate() {
                        apply(&mut t, &mem, &mut rings, op);
                        let status = r(&mut t, REG_STATUS);
                        let resets = matches!(op, Op::BringUp | Op::Write(REG_STATUS, 0));
                        let used: Vec<u16> = rings.iter().map(|ring| used_idx(&mem, ring)).collect();
                        match &frozen {
                            Some(_) if resets => frozen = None,
                            Some(_) if status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 => {
                                return Some(format!("op {n} {op:?} cleared NEEDS_RESET without a reset"));
                            }
                            Some(before) if *before != used => {
                                return Some(format!("op {n} {op:?}: a used ring moved while NEEDS_RESET"));
                            }
                            _ => {}
                        }
                        if status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 && frozen.is_none() {
                            if r(&mut t, REG_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG == 0
                                && !matches!(op, Op::Write(REG_INTERRUPT_ACK, _))
                            {
                                return Some(format!("op {n} {op:?}: NEEDS_RESET without a configuration interrupt"));
                            }
                            frozen = Some(used);
                        }
                    }
                    drop(keep);
                    None
                });
                prop_assert!(failure.is_none(), "{}", failure.unwrap());
            }
        }
    }
}
