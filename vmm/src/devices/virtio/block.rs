//! virtio-blk over a raw image file (virtio 1.x spec, section 5.2).
//!
//! Requests come from the guest and are untrusted: a request has at most SEG_MAX + 2
//! descriptors (longer chains are dropped unread), every descriptor is checked for
//! direction and length, every address goes through vm-memory's bounds checks, and a
//! request that cannot be answered is completed with zero length instead of panicking.
//! Copies go through one bounce buffer of the device's; nothing is allocated per request.
//! No crate on crates.io parses virtio-blk requests against virtio-queue 0.18 (rust-vmm's
//! virtio-blk crate is unpublished), so the parsing lives here.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::{RingError, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use crate::devices::guest_log::guest_error;

/// The virtio-blk sector size, in bytes.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the device's one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request the driver may use (advertised as seg_max).
const SEG_MAX: u32 = 126;
/// Largest data transfer accepted in one request.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;
/// Descriptors the device takes in one request: header, SEG_MAX data segments and the
/// status byte. Linux keeps to seg_max; a longer chain (an indirect table can hold
/// 65535 descriptors) is dropped without being looked at further.
const MAX_DESCS: usize = SEG_MAX as usize + 2;
/// Bounce buffer size for copies between the image and guest memory.
const CHUNK: usize = 128 << 10;
const HEADER_LEN: u32 = 16;

/// Why a disk image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image could not be opened or its size found.
    #[error("disk {path}: {err}; check the path and its permissions (or add ,ro for a read-only disk)")]
    Open {
        /// The image's path.
        path: String,
        /// The I/O error.
        err: std::io::Error,
    },
    /// The image could not be locked: another process holds a conflicting lock.
    #[error("disk {path} is in use by another kindling VM (it holds the lock); stop that VM, or open both with ,ro")]
    Locked {
        /// The image's path.
        path: String,
    },
    /// The image is smaller than one sector.
    #[error(
        "disk {path} is {size} bytes, smaller than one {SECTOR_SIZE}-byte sector; give it a size (e.g. truncate -s 1G)"
    )]
    Empty {
        /// The image's path.
        path: String,
        /// Its size in bytes.
        size: u64,
    },
}

/// A virtio-blk device backed by an image file or block device.
pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    config: Vec<u8>,
    /// The descriptors of the request being executed (at most [`MAX_DESCS`]).
    descs: Vec<Descriptor>,
    /// Bounce buffer between the image and guest memory, [`CHUNK`] bytes.
    bounce: Vec<u8>,
}

/// Why a chain could not even be answered with a status byte.
#[derive(Debug, PartialEq, Eq)]
enum Drop {
    TooShort,
    /// More than [`MAX_DESCS`] descriptors.
    TooManyDescriptors,
    /// The chain iterator stopped early (a loop, over 4 GiB in total, or a descriptor
    /// outside memory): the last descriptor we saw still points onward.
    Truncated,
    NoStatus,
}

impl Block {
    /// Opens the image (locked: exclusive read-write, shared read-only).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|err| DiskError::Open { path: name.clone(), err })?;
        let op = if read_only { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
            return Err(DiskError::Locked { path: name });
        }
        let meta = file.metadata().map_err(|err| DiskError::Open { path: name.clone(), err })?;
        let size = if meta.file_type().is_file() {
            meta.len()
        } else {
            // Block device: its size is where seeking to the end lands.
            use std::io::{Seek, SeekFrom};
            (&file).seek(SeekFrom::End(0)).map_err(|err| DiskError::Open { path: name.clone(), err })?
        };
        if size < SECTOR_SIZE {
            return Err(DiskError::Empty { path: name, size });
        }
        if size % SECTOR_SIZE != 0 {
            tracing::warn!(
                "disk {name}: size {size} is not a multiple of {SECTOR_SIZE}; the tail is not visible to the guest"
            );
        }
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let serial = format!("kl-{:x}-{:x}", meta.dev(), meta.ino());
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Self::from_file(file, read_only, size / SECTOR_SIZE, id))
    }

    fn from_file(file: File, read_only: bool, capacity_sectors: u64, id: [u8; 20]) -> Self {
        // virtio_blk_config: capacity (le64), size_max (le32), seg_max (le32).
        let mut config = Vec::with_capacity(16);
        config.extend_from_slice(&capacity_sectors.to_le_bytes());
        config.extend_from_slice(&0u32.to_le_bytes());
        config.extend_from_slice(&SEG_MAX.to_le_bytes());
        Self {
            file,
            read_only,
            capacity_sectors,
            id,
            config,
            descs: Vec::with_capacity(MAX_DESCS + 1),
            bounce: vec![0; CHUNK],
        }
    }

    /// Executes one request; returns the number of bytes written into guest memory.
    fn execute(&mut self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> Result<u32, Drop> {
        let (status, rest) = descs.split_last().ok_or(Drop::TooShort)?;
        if status.has_next() {
            return Err(Drop::Truncated);
        }
        if !status.is_write_only() || status.len() < 1 {
            return Err(Drop::NoStatus);
        }
        let (code, written) = match rest.split_first() {
            Some((header, data)) if !header.is_write_only() && header.len() >= HEADER_LEN => {
                match self.request(header, data, mem) {
                    Ok(written) => (VIRTIO_BLK_S_OK, written),
                    Err(code) => (code, 0),
                }
            }
            _ => (VIRTIO_BLK_S_IOERR, 0),
        };
        mem.write_obj(code as u8, status.addr()).map_err(|_| Drop::NoStatus)?;
        Ok(written + 1)
    }

    /// Runs a request whose header descriptor is well formed; Err carries the status.
    fn request(&mut self, header: &Descriptor, data: &[Descriptor], mem: &GuestMemoryMmap) -> Result<u32, u32> {
        let req_type: u32 = mem.read_obj(header.addr()).map_err(|_| VIRTIO_BLK_S_IOERR)?;
        let sector_addr = header.addr().checked_add(8).ok_or(VIRTIO_BLK_S_IOERR)?;
        let sector: u64 = mem.read_obj(sector_addr).map_err(|_| VIRTIO_BLK_S_IOERR)?;
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        match req_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let to_guest = req_type == VIRTIO_BLK_T_IN;
                if data.iter().any(|d| d.is_write_only() != to_guest) || total > MAX_REQUEST_BYTES {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                if !to_guest && self.read_only {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let end = sector
                    .checked_mul(SECTOR_SIZE)
                    .and_then(|start| start.checked_add(total))
                    .ok_or(VIRTIO_BLK_S_IOERR)?;
                if end > self.capacity_sectors * SECTOR_SIZE || total % SECTOR_SIZE != 0 {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let mut offset = sector * SECTOR_SIZE;
                for d in data {
                    self.copy(d.addr(), d.len() as usize, offset, to_guest, mem).map_err(|_| VIRTIO_BLK_S_IOERR)?;
                    offset += u64::from(d.len());
                }
                Ok(if to_guest { total as u32 } else { 0 })
            }
            VIRTIO_BLK_T_FLUSH => {
                // The guest asked for durability: everything acknowledged so far hits the disk.
                if !self.read_only {
                    self.file.sync_all().map_err(|e| {
                        guest_error!("disk flush (fsync) failed: {e}");
                        VIRTIO_BLK_S_IOERR
                    })?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let d = data.first().filter(|d| d.is_write_only()).ok_or(VIRTIO_BLK_S_IOERR)?;
                let n = (d.len() as usize).min(self.id.len());
                mem.write_slice(&self.id[..n], d.addr()).map_err(|_| VIRTIO_BLK_S_IOERR)?;
                Ok(n as u32)
            }
            _ => Err(VIRTIO_BLK_S_UNSUPP),
        }
    }

    fn copy(
        &mut self,
        addr: GuestAddress,
        len: usize,
        offset: u64,
        to_guest: bool,
        mem: &GuestMemoryMmap,
    ) -> Result<(), ()> {
        let buf = &mut self.bounce;
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(CHUNK);
            let at = addr.checked_add(done as u64).ok_or(())?;
            let file_off = offset + done as u64;
            if to_guest {
                self.file.read_exact_at(&mut buf[..n], file_off).map_err(|e| guest_error!("disk read: {e}"))?;
                mem.write_slice(&buf[..n], at).map_err(|_| ())?;
            } else {
                mem.read_slice(&mut buf[..n], at).map_err(|_| ())?;
                self.file.write_all_at(&buf[..n], file_off).map_err(|e| guest_error!("disk write: {e}"))?;
            }
            done += n;
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn sync(&mut self) {
        if !self.read_only {
            if let Err(e) = self.file.sync_all() {
                tracing::error!("disk sync at shutdown failed: {e}");
            }
        }
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        let Some(queue) = queues.get_mut(index) else { return Ok(false) };
        super::service_queue(queue, mem, |chain| {
            let head = chain.head_index();
            let mut descs = std::mem::take(&mut self.descs);
            descs.clear();
            descs.extend(chain.take(MAX_DESCS + 1));
            let result =
                if descs.len() > MAX_DESCS { Err(Drop::TooManyDescriptors) } else { self.execute(&descs, mem) };
            self.descs = descs;
            result.unwrap_or_else(|why| {
                tracing::debug!("virtio-blk: dropped malformed request {head}: {why:?}");
                0
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_alloc::peak_alloc;
    use crate::devices::virtio::test_ring::{indirect_table, within, Ring, MAX_INDIRECT, QSIZE};
    use std::time::Duration;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const MEM: usize = 1 << 20;
    const HDR: u64 = 0x8000;
    const DATA: u64 = 0x9000;
    const STATUS: u64 = 0xa000;

    fn disk(sectors: u64, read_only: bool) -> (Block, tempfile::NamedTempFile) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(sectors * SECTOR_SIZE).unwrap();
        let file = OpenOptions::new().read(true).write(true).open(f.path()).unwrap();
        (Block::from_file(file, read_only, sectors, *b"test-disk-id-0000000"), f)
    }

    fn desc(addr: u64, len: u32, write: bool, next: Option<u16>) -> RawDescriptor {
        let mut flags = if write { VRING_DESC_F_WRITE } else { 0 } as u16;
        if next.is_some() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next.unwrap_or(0)))
    }

    /// Builds a queue holding one chain of `descs`, runs the device, returns
    /// (status byte, used length).
    fn run(block: &mut Block, mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (u8, u32) {
        let mq = MockSplitQueue::new(mem, 16);
        mq.build_desc_chain(descs).unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        assert!(block.process_queue(0, std::slice::from_mut(&mut q), mem).unwrap());
        let used_len: u32 = mem.read_obj(mq.used_addr().unchecked_add(8)).unwrap();
        (mem.read_obj(GuestAddress(STATUS)).unwrap(), used_len)
    }

    fn header(mem: &GuestMemoryMmap, t: u32, sector: u64) {
        mem.write_obj(t, GuestAddress(HDR)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    /// header, optional data, status: (addr, len, device-writable); linked in order.
    fn chain(hdr: (u64, u32, bool), data: Option<(u64, u32, bool)>, status: (u64, u32, bool)) -> Vec<RawDescriptor> {
        [Some(hdr), data, Some(status)].into_iter().flatten().map(|(a, l, w)| desc(a, l, w, None)).collect()
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    #[test]
    fn write_then_read_round_trips_through_the_image() {
        let (mut b, f) = disk(8, false);
        let m = mem();
        m.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 3);
        assert_eq!(run(&mut b, &m, &chain((HDR, 16, false), Some((DATA, 512, false)), (STATUS, 1, true))), (0, 1));
        let on_disk = std::fs::read(f.path()).unwrap();
        assert_eq!(&on_disk[3 * 512..4 * 512], &[0xab; 512][..]);

        m.write_slice(&[0; 512], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_IN, 3);
        assert_eq!(run(&mut b, &m, &chain((HDR, 16, false), Some((DATA, 512, true)), (STATUS, 1, true))), (0, 513));
        let mut back = [0u8; 512];
        m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, [0xab; 512]);
    }

    #[test]
    fn flush_and_get_id() {
        let (mut b, _f) = disk(8, false);
        let m = mem();
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(run(&mut b, &m, &chain((HDR, 16, false), None, (STATUS, 1, true))).0, VIRTIO_BLK_S_OK as u8);
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(run(&mut b, &m, &chain((HDR, 16, false), Some((DATA, 20, true)), (STATUS, 1, true))), (0, 21));
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"test-disk-id-0000000");
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let (mut b, f) = disk(8, true);
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let st = run(&mut b, &m, &chain((HDR, 16, false), Some((DATA, 512, false)), (STATUS, 1, true)));
        assert_eq!(st.0, VIRTIO_BLK_S_IOERR as u8);
        assert!(std::fs::read(f.path()).unwrap().iter().all(|&x| x == 0));
        assert_ne!(b.features() & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn hostile_chains_get_an_error_or_are_dropped() {
        let (mut b, _f) = disk(8, false);
        let m = mem();
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        // Past the end of the disk.
        header(&m, VIRTIO_BLK_T_IN, 8);
        assert_eq!(run(&mut b, &m, &chain((HDR, 16, false), Some((DATA, 512, true)), (STATUS, 1, true))).0, ioerr);
        // Sector number that overflows when multiplied.
        header(&m, VIRTIO_BLK_T_IN, u64::MAX / 2);
        assert_eq!(run(&mut b, &m, &chain((HDR, 16, false), Some((DATA, 512, true)), (STATUS, 1, true))).0, ioerr);
        // Data buffer outside guest memory.
        header(&m, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            run(&mut b, &m, &chain((HDR, 16, false), Some((MEM as u64 - 256, 512, true)), (STATUS, 1, true))).0,
            ioerr
        );
        // Wrong direction: a read whose data buffer is device-readable.
        assert_eq!(run(&mut b, &m, &chain((HDR, 16, false), Some((DATA, 512, false)), (STATUS, 1, true))).0, ioerr);
        // Header outside guest memory.
        assert_eq!(
            run(&mut b, &m, &chain((u64::MAX - 8, 16, false), Some((DATA, 512, true)), (STATUS, 1, true))).0,
            ioerr
        );
        // Header too short, and zero-length data.
        assert_eq!(run(&mut b, &m, &chain((HDR, 4, false), Some((DATA, 512, true)), (STATUS, 1, true))).0, ioerr);
        header(&m, VIRTIO_BLK_T_IN, 0);
        assert_eq!(run(&mut b, &m, &chain((HDR, 16, false), Some((DATA, 0, true)), (STATUS, 1, true))).0, 0);
        // Not a multiple of the sector size.
        assert_eq!(run(&mut b, &m, &chain((HDR, 16, false), Some((DATA, 100, true)), (STATUS, 1, true))).0, ioerr);
        // Oversized: a chain of more than 4 GiB is cut short by the iterator, and dropped.
        assert_eq!(
            run(&mut b, &m, &chain((HDR, 16, false), Some((DATA, u32::MAX, true)), (STATUS, 1, true))),
            (0xff, 0)
        );
        // Large but within 4 GiB: refused with an error, not attempted.
        let big = (MAX_REQUEST_BYTES + SECTOR_SIZE) as u32;
        assert_eq!(run(&mut b, &m, &chain((HDR, 16, false), Some((DATA, big, true)), (STATUS, 1, true))).0, ioerr);
        // Unknown request type.
        header(&m, 0x77, 0);
        assert_eq!(run(&mut b, &m, &chain((HDR, 16, false), None, (STATUS, 1, true))).0, VIRTIO_BLK_S_UNSUPP as u8);
        // Status descriptor the device cannot write: dropped with used length 0.
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(run(&mut b, &m, &chain((HDR, 16, false), None, (STATUS, 1, false))), (0xff, 0));
        // Status outside memory.
        assert_eq!(run(&mut b, &m, &chain((HDR, 16, false), None, (MEM as u64 + 4096, 1, true))), (0xff, 0));
        // Single-descriptor chain.
        assert_eq!(run(&mut b, &m, &[desc(STATUS, 1, true, None)]), (ioerr, 1));
    }

    #[test]
    fn looping_chain_terminates() {
        let (mut b, _f) = disk(8, false);
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        // 0 -> 1 -> 0 -> ... : the iterator's TTL ends it; the device must return.
        let descs = [desc(HDR, 16, false, Some(1)), desc(DATA, 512, true, Some(0))];
        let mq = MockSplitQueue::new(&m, 16);
        mq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        assert!(b.process_queue(0, std::slice::from_mut(&mut q), &m).unwrap());
        let used_idx: u16 = m.read_obj(mq.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used_idx, 1, "the looping chain was completed, not left hanging");
    }

    /// A driver claiming more chains than the queue has entries used to make the
    /// device spin: the iterator refused the ring and enable_notification said "more".
    #[test]
    fn avail_idx_beyond_the_queue_size_does_not_spin() {
        let (mut b, _f) = disk(8, false);
        let mem = mem();
        let (mut ring, mut q) = Ring::new(&mem, 0);
        mem.write_obj(VIRTIO_BLK_T_FLUSH, GuestAddress(0x8000)).unwrap();
        ring.push(&mem, &[(0x8000, 16, 0), (0x9000, 1, VRING_DESC_F_WRITE as u16)]);
        // The driver claims QSIZE + 1 more chains than it could have published.
        ring.set_avail_idx(&mem, ring.avail_idx.wrapping_add(QSIZE + 1));
        let result = within(Duration::from_secs(2), move || b.process_queue(0, std::slice::from_mut(&mut q), &mem));
        assert!(matches!(result, Err(RingError::AvailIdxAhead { .. })), "{result:?}");
    }

    /// An indirect table of 65535 descriptors must not size an allocation: the device
    /// takes at most SEG_MAX data segments and drops longer chains.
    #[test]
    fn a_chain_of_65535_descriptors_allocates_nothing_of_its_size() {
        let (mut b, _f) = disk(8, false);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let (mut ring, mut q) = Ring::new(&mem, 0);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let table = indirect_table(&mem, 1 << 20, MAX_INDIRECT, DATA, 1, VRING_DESC_F_WRITE as u16);
        // The header first: table entry 0 is rewritten as a readable 16-byte header.
        mem.write_obj(HDR, GuestAddress(1 << 20)).unwrap();
        mem.write_obj(16u32, GuestAddress((1 << 20) + 8)).unwrap();
        mem.write_obj(VRING_DESC_F_NEXT as u16, GuestAddress((1 << 20) + 12)).unwrap();
        ring.push(&mem, &[table]);
        let (r, peak) = peak_alloc(|| b.process_queue(0, std::slice::from_mut(&mut q), &mem));
        assert!(r.is_ok());
        assert_eq!(ring.take_used(&mem), vec![(0, 0)], "dropped and returned");
        assert!(peak < 64 << 10, "allocated {peak} bytes for one request");
    }

    mod props {
        use super::*;
        use crate::devices::virtio::test_fuzz::{
            config, guest_memory, raw_ring, run_bounded, taken, NSLOTS, SLOTS, SLOT_SIZE,
        };
        use proptest::prelude::*;

        /// Request headers for the slots: mostly real request types and sectors on the disk.
        fn headers() -> impl Strategy<Value = Vec<(u32, u64)>> {
            let t = prop_oneof![
                Just(VIRTIO_BLK_T_IN),
                Just(VIRTIO_BLK_T_OUT),
                Just(VIRTIO_BLK_T_FLUSH),
                Just(VIRTIO_BLK_T_GET_ID),
                any::<u32>()
            ];
            let sector = prop_oneof![3 => 0..20u64, 1 => any::<u64>()];
            prop::collection::vec((t, sector), NSLOTS as usize)
        }

        proptest! {
            #![proptest_config(config())]

            /// Any ring: no panic, no hang, no allocation sized by the guest, and every
            /// chain taken is returned (or the ring is reported broken).
            #[test]
            fn any_ring(raw in raw_ring(), hdrs in headers(), read_only in any::<bool>()) {
                let (mut b, _f) = disk(16, read_only);
                let mem = guest_memory();
                let (mut ring, mut q) = Ring::new(&mem, 0);
                raw.write(&mem, &mut ring);
                for (i, (t, sector)) in hdrs.iter().enumerate() {
                    let at = SLOTS + i as u64 * SLOT_SIZE;
                    mem.write_obj(*t, GuestAddress(at)).unwrap();
                    mem.write_obj(*sector, GuestAddress(at + 8)).unwrap();
                }
                let (result, q, mem) = run_bounded(256 << 10, move || {
                    let r = b.process_queue(0, std::slice::from_mut(&mut q), &mem);
                    (r, q, mem)
                });
                let used = ring.take_used(&mem).len() as u16;
                if result.is_ok() {
                    prop_assert_eq!(used, taken(&q, 0), "every chain taken is returned");
                    prop_assert_eq!(used, ring.avail_idx, "and every chain published is taken");
                }
            }
        }
    }
}
