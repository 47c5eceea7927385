//! Test support shared by the virtio device tests: a split ring in real guest memory,
//! driven by hand as a guest driver would.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Entries per ring.
pub const QSIZE: u16 = 256;

/// One split ring, driven by hand so that its indexes can wrap.
///
/// MockSplitQueue lays out the descriptor table and the avail ring. Its used ring is
/// moved: virtio-queue 0.18 computes the avail ring's end in entries instead of bytes,
/// so the mock's used ring overlaps avail entries from `size / 2` on, which a test
/// that wraps the ring would run into.
pub struct Ring {
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the avail ring.
    pub avail: u64,
    /// Guest address of the (moved) used ring.
    pub used: u64,
    /// The descriptor [`Self::push`] writes next.
    pub next_desc: u16,
    /// The avail ring's idx as last published.
    pub avail_idx: u16,
    /// The used ring's idx up to which [`Self::take_used`] has returned entries.
    pub used_seen: u16,
}

impl Ring {
    /// A ring at `base`, and the queue the device uses for it.
    pub fn new(mem: &GuestMemoryMmap, base: u64) -> (Self, Queue) {
        let mq = MockSplitQueue::create(mem, GuestAddress(base), QSIZE);
        let mut queue: Queue = mq.create_queue().unwrap();
        // flags, idx, ring, used_event; then 4-byte alignment.
        let used = (mq.avail_addr().0 + 6 + 2 * u64::from(QSIZE)).next_multiple_of(4);
        queue.try_set_used_ring_address(GuestAddress(used)).unwrap();
        let ring = Ring {
            desc: mq.desc_table_addr().0,
            avail: mq.avail_addr().0,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        (ring, queue)
    }

    /// Writes descriptor `index` as (addr, len, flags, next).
    pub fn write_desc(&self, mem: &GuestMemoryMmap, index: u16, (addr, len, flags, next): (u64, u32, u16, u16)) {
        let at = self.desc + 16 * u64::from(index);
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Publishes a chain of (addr, len, flags), linked in order; returns its head.
    pub fn push(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = (head + i as u16) % QSIZE;
            let next = (index + 1) % QSIZE;
            let flags = if i + 1 < descs.len() { flags | VRING_DESC_F_NEXT as u16 } else { flags };
            self.write_desc(mem, index, (addr, len, flags, next));
        }
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        self.publish(mem, head);
        head
    }

    /// Makes chain `head` available to the device: next avail entry, then the avail idx.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// Used entries (head, len) added since the last call.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % QSIZE);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// The device's avail_event (EVENT_IDX): the driver notifies when it passes it.
    pub fn avail_event(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 4 + 8 * u64::from(QSIZE))).unwrap()
    }
}

impl Ring {
    /// Writes the avail ring's idx as a (possibly hostile) driver would, without
    /// publishing anything.
    pub fn set_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.avail_idx = idx;
        mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }
}

/// Runs `f` on a thread of its own and returns its result, or panics when it has not
/// returned within `limit` (the thread is left behind: a test that hit this hangs no
/// further, but the thread may spin until the test binary exits).
pub fn within<T: Send + 'static>(limit: std::time::Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("did not return within {limit:?}: the VMM would hang")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the servicing thread panicked"),
    }
}

/// The most descriptors an indirect table can hold (its length field is 16 times that,
/// and virtio-queue takes up to u16::MAX entries).
pub const MAX_INDIRECT: u16 = u16::MAX;

/// Writes an indirect table at `at` of `n` linked descriptors, each `len` bytes at
/// `addr` with `flags`; returns the descriptor that points to it, for [`Ring::push`].
pub fn indirect_table(mem: &GuestMemoryMmap, at: u64, n: u16, addr: u64, len: u32, flags: u16) -> (u64, u32, u16) {
    for i in 0..n {
        let d = at + 16 * u64::from(i);
        let f = if i + 1 < n { flags | VRING_DESC_F_NEXT as u16 } else { flags };
        mem.write_obj(addr, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(f, GuestAddress(d + 12)).unwrap();
        mem.write_obj(i.wrapping_add(1), GuestAddress(d + 14)).unwrap();
    }
    (at, 16 * u32::from(n), VRING_DESC_F_INDIRECT as u16)
}
