//! Bounded, single-pass access to a descriptor chain's buffers.
//!
//! virtio-queue's `Reader` and `Writer` keep one slice per descriptor, and a chain can
//! have up to 65535 descriptors through one indirect table: a guest could make every
//! chain cost the VMM megabytes of allocation, and walking it again (to check
//! directions first) lets the guest change it in between. [`Segments::new`] walks a
//! chain once, takes at most a fixed number of descriptors (the device's limit, far
//! above what Linux uses), checks each one's direction and that it lies in guest
//! memory, and keeps (address, length) pairs. Copies then go through vm-memory's
//! bounds checks, into or out of the device's fixed buffers.

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// Why a chain was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// More descriptors than the device takes in one chain.
    #[error("descriptor chain has more than {0} descriptors")]
    TooManyDescriptors(usize),
    /// The chain iterator stopped early: a loop, a next index beyond the table, a bad
    /// indirect table, or more than 4 GiB in total.
    #[error("descriptor chain ends early (a loop, a bad next index, a bad indirect table, or over 4 GiB)")]
    Truncated,
    /// A device-writable descriptor where the device reads, or the reverse.
    #[error("descriptor chain has a device-{} descriptor where the device {}", if *.0 { "writable" } else { "readable" }, if *.0 { "reads" } else { "writes" })]
    WrongDirection(bool),
    /// A descriptor points outside guest memory.
    #[error("a descriptor points outside guest memory")]
    OutsideMemory,
    /// A copy went past the end of the chain.
    #[error("descriptor chain holds fewer bytes than needed")]
    TooShort,
}

/// The buffers of one chain, all in one direction.
pub struct Segments {
    segs: Vec<(GuestAddress, u32)>,
    len: usize,
}

impl Segments {
    /// Walks `chain` once: at most `max_descs` descriptors, all device-writable when
    /// `writable` (else all device-readable), all inside guest memory.
    pub fn new(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        writable: bool,
        max_descs: usize,
    ) -> Result<Self, ChainError> {
        let access = if writable { Permissions::Write } else { Permissions::Read };
        let mut segs = Vec::new();
        let mut len = 0usize;
        let mut ended = false;
        for (i, d) in chain.take(max_descs + 1).enumerate() {
            if i == max_descs {
                return Err(ChainError::TooManyDescriptors(max_descs));
            }
            if d.is_write_only() != writable {
                return Err(ChainError::WrongDirection(d.is_write_only()));
            }
            if !mem.check_range(d.addr(), d.len() as usize, access) {
                return Err(ChainError::OutsideMemory);
            }
            if d.len() > 0 {
                segs.push((d.addr(), d.len()));
            }
            // The iterator caps the total at 4 GiB, so this cannot overflow.
            len += d.len() as usize;
            ended = !d.has_next();
        }
        // The iterator stops at loops and malformed tables: the last descriptor it
        // yielded then still points onward (or it yielded none).
        if !ended {
            return Err(ChainError::Truncated);
        }
        Ok(Self { segs, len })
    }

    /// The chain's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the chain holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `buf.len()` bytes from the chain, starting `offset` bytes into it.
    pub fn read_at(&self, mem: &GuestMemoryMmap, offset: usize, buf: &mut [u8]) -> Result<(), ChainError> {
        let mut done = 0;
        self.each_piece(offset, buf.len(), |addr, range| {
            mem.read_slice(&mut buf[range.clone()], addr).map_err(|_| ChainError::OutsideMemory)?;
            done = range.end;
            Ok(())
        })?;
        debug_assert_eq!(done, buf.len());
        Ok(())
    }

    /// Copies `data` into the chain, starting `offset` bytes into it.
    pub fn write_at(&self, mem: &GuestMemoryMmap, offset: usize, data: &[u8]) -> Result<(), ChainError> {
        self.each_piece(offset, data.len(), |addr, range| {
            mem.write_slice(&data[range], addr).map_err(|_| ChainError::OutsideMemory)
        })
    }

    /// Calls `f` with the guest address and the range of `0..count` that each segment
    /// holds, for the `count` bytes starting `offset` bytes into the chain.
    fn each_piece(
        &self,
        offset: usize,
        count: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), ChainError>,
    ) -> Result<(), ChainError> {
        if offset.checked_add(count).is_none_or(|end| end > self.len) {
            return Err(ChainError::TooShort);
        }
        let mut skip = offset;
        let mut done = 0;
        for &(addr, len) in &self.segs {
            if done == count {
                break;
            }
            let len = len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(count - done);
            // In memory (checked in new), so the offset cannot overflow.
            f(GuestAddress(addr.0 + skip as u64), done..done + n)?;
            skip = 0;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_ring::{indirect_table, Ring};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::QueueT;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    fn segments(
        mem: &GuestMemoryMmap,
        descs: &[(u64, u32, u16)],
        writable: bool,
        max: usize,
    ) -> Result<Segments, ChainError> {
        let (mut ring, mut q) = Ring::new(mem, 0);
        ring.push(mem, descs);
        let chain = q.pop_descriptor_chain(mem).unwrap();
        Segments::new(chain, mem, writable, max)
    }

    #[test]
    fn reads_and_writes_across_segments_at_any_offset() {
        let m = mem();
        let w = VRING_DESC_F_WRITE as u16;
        let s = segments(&m, &[(0x10000, 3, w), (0x20000, 0, w), (0x30000, 5, w)], true, 8).unwrap();
        assert_eq!(s.len(), 8);
        s.write_at(&m, 0, b"abcdefgh").unwrap();
        let mut out = [0u8; 8];
        s.read_at(&m, 0, &mut out).unwrap();
        assert_eq!(&out, b"abcdefgh");
        let mut mid = [0u8; 4];
        s.read_at(&m, 2, &mut mid).unwrap();
        assert_eq!(&mid, b"cdef");
        s.write_at(&m, 7, b"Z").unwrap();
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x30004)).unwrap(), b'Z');
        assert_eq!(s.read_at(&m, 5, &mut mid), Err(ChainError::TooShort));
        assert_eq!(s.write_at(&m, usize::MAX, b"x"), Err(ChainError::TooShort));
        s.read_at(&m, 8, &mut []).unwrap();
    }

    #[test]
    fn refuses_what_the_device_cannot_take() {
        let m = mem();
        let w = VRING_DESC_F_WRITE as u16;
        assert_eq!(
            segments(&m, &[(0x10000, 4, 0), (0x20000, 4, w)], false, 8).err(),
            Some(ChainError::WrongDirection(true))
        );
        assert_eq!(segments(&m, &[(0x10000, 4, 0)], true, 8).err(), Some(ChainError::WrongDirection(false)));
        assert_eq!(segments(&m, &[(4 << 20, 4, 0)], false, 8).err(), Some(ChainError::OutsideMemory));
        assert_eq!(segments(&m, &[(u64::MAX - 1, 4, 0)], false, 8).err(), Some(ChainError::OutsideMemory));
        let many = vec![(0x10000, 1, 0); 9];
        assert_eq!(segments(&m, &many, false, 8).err(), Some(ChainError::TooManyDescriptors(8)));
        assert!(segments(&m, &many[..8], false, 8).is_ok());
        // Over 4 GiB in total (overlapping buffers): the iterator stops, the chain is cut short.
        let table = indirect_table(&m, 1 << 20, 1400, 0, 3 << 20, 0);
        assert_eq!(segments(&m, &[table], false, 2000).err(), Some(ChainError::Truncated));
        // 65535 descriptors through an indirect table: refused at the limit.
        let table = indirect_table(&m, 1 << 20, u16::MAX, 0x10000, 1, 0);
        assert_eq!(segments(&m, &[table], false, 64).err(), Some(ChainError::TooManyDescriptors(64)));
    }

    #[test]
    fn a_looping_chain_is_truncated() {
        let m = mem();
        let (mut ring, mut q) = Ring::new(&m, 0);
        let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        ring.write_desc(&m, 0, (0x10000, 4, next, 1));
        ring.write_desc(&m, 1, (0x10000, 4, next, 0));
        ring.publish(&m, 0);
        let chain = q.pop_descriptor_chain(&m).unwrap();
        assert_eq!(Segments::new(chain, &m, false, 1024).err(), Some(ChainError::Truncated));
    }
}
