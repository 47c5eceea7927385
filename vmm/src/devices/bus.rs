//! Port-I/O and MMIO buses: map a guest address range to the device that owns it.
//! vCPU threads dispatch KVM_EXIT_IO / KVM_EXIT_MMIO here.

use std::sync::{Arc, Mutex};

/// A device reached through a bus; `offset` is relative to the range it was inserted at.
pub trait BusDevice: Send {
    /// Fills `data` with what the guest reads at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Takes what the guest writes at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Range {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// An address space (port I/O or MMIO) split into non-overlapping device ranges.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

/// A range the bus refused: it is empty or overlaps a device already there.
#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps a device already there")]
pub struct Overlap {
    /// Start of the refused range.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

impl Bus {
    /// Gives `device` the range `base..base + len`; fails if the range is empty or taken.
    pub fn insert(&mut self, device: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), Overlap> {
        if len == 0 || self.ranges.iter().any(|r| base < r.base + r.len && r.base < base + len) {
            return Err(Overlap { base, len });
        }
        self.ranges.push(Range { base, len, device });
        self.ranges.sort_by_key(|r| r.base);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Range, u64)> {
        let i = self.ranges.partition_point(|r| r.base <= addr).checked_sub(1)?;
        let r = &self.ranges[i];
        (addr < r.base + r.len).then(|| (r, addr - r.base))
    }

    /// Reads from the device at `addr`; unclaimed addresses read as all ones, like an
    /// empty ISA bus. Returns whether a device answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((r, offset)) => {
                r.device.lock().unwrap_or_else(|p| p.into_inner()).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; writes to unclaimed addresses are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((r, offset)) => {
                r.device.lock().unwrap_or_else(|p| p.into_inner()).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let mut bus = Bus::default();
        bus.insert(Arc::new(Mutex::new(Echo(10))), 0x3f8, 8).unwrap();
        bus.insert(Arc::new(Mutex::new(Echo(20))), 0x60, 5).unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x3fc, 8).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x3f9, &mut b));
        assert_eq!(b[0], 11);
        assert!(bus.write(0x64, &[7]));
        bus.read(0x60, &mut b);
        assert_eq!(b[0], 7);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b[0], 0xff);
    }
}
