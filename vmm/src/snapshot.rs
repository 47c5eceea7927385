//! The snapshot file: one file (or block device) holding a paused VM, which
//! [`crate::builder::MicroVm`] writes and restores from.
//!
//! ```text
//! 0            "KINDLSNP", then the header's length (u32, little endian) and the header (JSON)
//! 4096         the machine state (JSON): vCPUs, VM, devices, the config it was built from
//! 2 MiB-aligned guest memory, the RAM ranges one after the other; pages that are all
//!              zero are not written, so the file is sparse
//! ```
//!
//! The header says what the snapshot needs to be restored: the format, the VMM's
//! version, the CPU it ran on and the devices it had. [`Header::check`] compares all of
//! them with this VMM and host before anything is built, so a snapshot that does not
//! fit is refused with a sentence saying why, never half restored. Restoring maps the
//! memory privately and lazily ([`map_memory`]): a page is read from the file the first
//! time the guest touches it, and what the guest writes stays in this process, so one
//! snapshot can back many clones at once.
//!
//! The file is one piece so that the emulated runner can hand it to the level-1 VM as a
//! disk: inside L1 the same code reads and writes the block device.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use crate::arch::layout;

/// The file's first bytes.
pub const MAGIC: [u8; 8] = *b"KINDLSNP";
/// The format this VMM writes and reads; bumped whenever the state's layout changes.
pub const FORMAT: u32 = 1;
/// Where the machine state starts.
const STATE_OFFSET: u64 = 4096;
/// The alignment of the memory image (huge-page friendly).
const MEMORY_ALIGN: u64 = 2 << 20;
/// Guest pages are compared to zero and written in this unit.
const PAGE: usize = 4096;
/// The largest header or state this VMM reads (a corrupted file must not make it
/// allocate gigabytes).
const MAX_JSON: u64 = 64 << 20;

/// Why a snapshot could not be written, read or used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing the file failed.
    #[error("snapshot {what}: {err}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        err: std::io::Error,
    },
    /// The file is not a kindling snapshot, or is damaged.
    #[error("{0}; this is not a usable kindling snapshot (take a new one)")]
    Corrupt(String),
    /// The snapshot was taken by another VMM, on another CPU or with other devices.
    #[error("the snapshot does not fit: {0}; boot the VM afresh instead")]
    Mismatch(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let what = what.into();
    move |err| SnapshotError::Io { what, err }
}

/// The CPU a snapshot's vCPUs ran on, as this VMM presented it to the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuIdentity {
    /// The vendor string (CPUID leaf 0).
    pub vendor: String,
    /// Family, model and stepping (CPUID leaf 1, EAX).
    pub signature: u32,
    /// A hash of every CPUID entry the guest saw: its features.
    pub features: String,
}

impl CpuIdentity {
    /// The identity of a vCPU with CPUID `entries` (as the VMM set them).
    pub fn of(entries: &[kvm_bindings::kvm_cpuid_entry2]) -> Self {
        let leaf = |f: u32| entries.iter().find(|e| e.function == f && e.index == 0);
        let vendor = leaf(0)
            .map(|e| {
                let b: Vec<u8> = [e.ebx, e.edx, e.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
                String::from_utf8_lossy(&b).into_owned()
            })
            .unwrap_or_default();
        let signature = leaf(1).map_or(0, |e| e.eax);
        // FNV-1a over every entry: stable across builds and Rust versions.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for e in entries {
            for w in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] {
                for b in w.to_le_bytes() {
                    h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
                }
            }
        }
        Self { vendor, signature, features: format!("{h:016x}") }
    }
}

impl std::fmt::Display for CpuIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} signature {:#x} features {}",
            self.vendor,
            self.signature,
            &self.features[..self.features.len().min(12)]
        )
    }
}

/// What a snapshot needs to be restored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// [`FORMAT`] of the writer.
    pub format: u32,
    /// The writing VMM's version.
    pub vmm_version: String,
    /// The CPU the guest saw.
    pub cpu: CpuIdentity,
    /// The devices, in slot order (`virtio-blk`, `vsock`, `virtio-net`, ...).
    pub devices: Vec<String>,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Where the machine state is, and its length.
    pub state_offset: u64,
    /// The machine state's length.
    pub state_len: u64,
    /// Where the memory image starts.
    pub memory_offset: u64,
}

/// This VMM's version, as headers record it.
pub fn vmm_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

impl Header {
    /// Refuses a snapshot this VMM cannot restore on this host with `cpu` and
    /// `devices`: another format or VMM version, another CPU, other devices.
    pub fn check(&self, cpu: &CpuIdentity, devices: &[String]) -> Result<(), SnapshotError> {
        self.check_devices(devices)?;
        if &self.cpu != cpu {
            return Err(SnapshotError::Mismatch(format!(
                "it was taken on a CPU presented as {}, this one is {cpu}",
                self.cpu
            )));
        }
        Ok(())
    }

    /// [`Self::check`] without the CPU: what can be checked where the VM will not run
    /// (the emulated runner's host, before it starts the level-1 VM).
    pub fn check_devices(&self, devices: &[String]) -> Result<(), SnapshotError> {
        if self.format != FORMAT {
            return Err(SnapshotError::Mismatch(format!(
                "it has format {}, this kindling reads format {FORMAT}",
                self.format
            )));
        }
        if self.vmm_version != vmm_version() {
            return Err(SnapshotError::Mismatch(format!(
                "it was taken by kindling {}, this is kindling {}",
                self.vmm_version,
                vmm_version()
            )));
        }
        if self.devices != devices {
            return Err(SnapshotError::Mismatch(format!(
                "it has the devices [{}], this VM would have [{}]",
                self.devices.join(", "),
                devices.join(", ")
            )));
        }
        Ok(())
    }
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Writes a snapshot to `file` (a new file, or a block device as large as
/// [`size_needed`]): the header, the machine `state` (already serialized) and guest
/// memory, skipping zero pages; then syncs it. `header` gets its offsets filled in.
pub fn write(file: &File, mut header: Header, state: &[u8], mem: &GuestMemoryMmap) -> Result<Header, SnapshotError> {
    header.state_offset = STATE_OFFSET;
    header.state_len = state.len() as u64;
    header.memory_offset = align_up(STATE_OFFSET + header.state_len, MEMORY_ALIGN);
    let head = serde_json::to_vec(&header).map_err(|e| SnapshotError::Corrupt(e.to_string()))?;
    if 12 + head.len() as u64 > STATE_OFFSET {
        return Err(SnapshotError::Corrupt("the header is longer than its 4 KiB".into()));
    }
    let mut first = Vec::with_capacity(STATE_OFFSET as usize);
    first.extend_from_slice(&MAGIC);
    first.extend_from_slice(&(head.len() as u32).to_le_bytes());
    first.extend_from_slice(&head);
    first.resize(STATE_OFFSET as usize, 0);
    file.write_all_at(&first, 0).map_err(io("writing the header"))?;
    file.write_all_at(state, STATE_OFFSET).map_err(io("writing the machine state"))?;
    let is_file = file.metadata().map_err(io("reading its type"))?.is_file();
    let mut offset = header.memory_offset;
    for region in mem.iter() {
        let len = region.len() as usize;
        // SAFETY: the region is a live mapping of `len` bytes; the vCPUs are paused, so
        // nothing writes to it while it is read here (a stray device write could only
        // make the copy of a page stale, never unsound: the memory is plain bytes).
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr() as *const u8, len) };
        let mut page = 0;
        while page < len {
            // Write runs of non-zero pages in one call.
            let start = page;
            while page < len && !is_zero(&bytes[page..page + PAGE.min(len - page)]) {
                page += PAGE;
            }
            if page > start {
                file.write_all_at(&bytes[start..page.min(len)], offset + start as u64)
                    .map_err(io("writing guest memory"))?;
            }
            let zeros = page;
            while page < len && is_zero(&bytes[page..page + PAGE.min(len - page)]) {
                page += PAGE;
            }
            // A block device may hold an older snapshot: zero what this one skips.
            if page > zeros && !is_file {
                zero_out(file, offset + zeros as u64, (page.min(len) - zeros) as u64)?;
            }
        }
        offset += len as u64;
    }
    // Trailing zero pages were not written: a file still needs its full length (a block
    // device has it already).
    if is_file {
        file.set_len(offset).map_err(io("setting its length"))?;
    }
    file.sync_all().map_err(io("syncing"))?;
    Ok(header)
}

/// BLKZEROOUT, `_IO(0x12, 127)` in <linux/fs.h> (libc does not export it): zeroes a
/// range of a block device. `kindling`'s seccomp filters allow it by this name.
pub const BLKZEROOUT: libc::c_ulong = vmm_sys_util::ioctl::ioctl_expr(vmm_sys_util::ioctl::_IOC_NONE, 0x12, 127, 0);

/// Zeroes `len` bytes of the block device `file` at `offset`: a hole punched (the
/// device may unmap the range; the emulated runner's QEMU drive then punches a hole in
/// its file), or, where the device cannot, zeroes written (BLKZEROOUT).
fn zero_out(file: &File, offset: u64, len: u64) -> Result<(), SnapshotError> {
    use std::os::unix::io::AsRawFd;
    let failed = |err| SnapshotError::Io { what: "zeroing skipped pages".into(), err };
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(failed(std::io::Error::other("range out of bounds")));
    };
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let r =
        unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, n) };
    if r == 0 {
        return Ok(());
    }
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64s (start, length) from the pointer, which points
    // to `range`, alive for the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT as _, range.as_ptr()) };
    if r != 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The bytes a snapshot of `mem_bytes` of memory with a state of `state_len` bytes
/// takes (the size of a block device to hold it).
pub fn size_needed(state_len: u64, mem_bytes: u64) -> u64 {
    align_up(STATE_OFFSET + state_len, MEMORY_ALIGN) + mem_bytes
}

fn is_zero(b: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the
        // aligned middle of the slice.
        unsafe { b.align_to::<u64>() }
    };
    prefix.iter().all(|&x| x == 0) && words.iter().all(|&x| x == 0) && suffix.iter().all(|&x| x == 0)
}

/// Reads a snapshot's header and machine state.
pub fn read(file: &mut File) -> Result<(Header, Vec<u8>), SnapshotError> {
    let header = read_header(file)?;
    let mut state = Vec::new();
    let mut reader = std::io::Read::by_ref(file);
    std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(header.state_offset)).map_err(io("seeking"))?;
    reader.take(header.state_len).read_to_end(&mut state).map_err(io("reading the machine state"))?;
    if state.len() as u64 != header.state_len {
        return Err(SnapshotError::Corrupt("the file ends inside the machine state".into()));
    }
    Ok((header, state))
}

/// Reads a snapshot's header only (what it needs, and where its parts are), checking
/// that the parts' places are in range.
pub fn read_header(file: &File) -> Result<Header, SnapshotError> {
    let mut first = vec![0u8; STATE_OFFSET as usize];
    file.read_exact_at(&mut first, 0).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            SnapshotError::Corrupt("the file is shorter than a snapshot's header".into())
        }
        _ => SnapshotError::Io { what: "reading the header".into(), err: e },
    })?;
    if first[..8] != MAGIC {
        return Err(SnapshotError::Corrupt("the file does not start with a snapshot's magic".into()));
    }
    let len = u32::from_le_bytes([first[8], first[9], first[10], first[11]]) as usize;
    if 12 + len > first.len() {
        return Err(SnapshotError::Corrupt("the header's length is out of range".into()));
    }
    let header: Header =
        serde_json::from_slice(&first[12..12 + len]).map_err(|e| SnapshotError::Corrupt(format!("the header: {e}")))?;
    if header.state_len > MAX_JSON || header.state_offset != STATE_OFFSET {
        return Err(SnapshotError::Corrupt("the machine state's place is out of range".into()));
    }
    if header.memory_offset < align_up(STATE_OFFSET + header.state_len, MEMORY_ALIGN)
        || header.memory_mib == 0
        || header.memory_mib > layout::MAX_MEMORY_MIB
    {
        return Err(SnapshotError::Corrupt("the memory image's place or size is out of range".into()));
    }
    Ok(header)
}

/// Maps the snapshot's guest memory from `file` privately (copy on write) and lazily:
/// the RAM ranges of `header.memory_mib`, one after the other from
/// `header.memory_offset`. The file must be at least that long.
pub fn map_memory(file: &File, header: &Header) -> Result<Arc<GuestMemoryMmap>, SnapshotError> {
    let mem_bytes = header.memory_mib << 20;
    let len = file.metadata().map_err(io("reading its size"))?.len();
    // A block device reports 0 here; its size is checked by the mapping itself.
    if len != 0 && len < header.memory_offset + mem_bytes {
        return Err(SnapshotError::Corrupt(format!(
            "the file is {len} bytes, shorter than its {} MiB of memory",
            header.memory_mib
        )));
    }
    let mut offset = header.memory_offset;
    let mut regions = Vec::new();
    for (start, size) in layout::ram_ranges(mem_bytes) {
        let fo = vm_memory::FileOffset::new(file.try_clone().map_err(io("duplicating the descriptor"))?, offset);
        let region = MmapRegion::build(
            Some(fo),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| SnapshotError::Io {
            what: "mapping guest memory".into(),
            err: std::io::Error::other(e.to_string()),
        })?;
        regions.push(
            GuestRegionMmap::new(region, GuestAddress(start))
                .ok_or_else(|| SnapshotError::Corrupt("a memory range wraps around".into()))?,
        );
        offset += size;
    }
    GuestMemoryMmap::from_regions(regions)
        .map(Arc::new)
        .map_err(|e| SnapshotError::Corrupt(format!("the memory ranges: {e}")))
}

/// The most extents [`data_extents`] returns (and [`parse_extents`] takes): closer
/// extents are merged to stay under it, which reads a few zero pages more.
pub const MAX_EXTENTS: usize = 4096;

/// Where a snapshot file (a regular, sparse file) holds memory: the data ranges of its
/// memory image as (file offset, length), from SEEK_DATA and SEEK_HOLE, merged across
/// the smallest gaps to at most [`MAX_EXTENTS`]. Empty where the file system cannot say.
pub fn data_extents(file: &File, header: &Header) -> Vec<(u64, u64)> {
    use std::os::unix::io::AsRawFd;
    let (start, end) = (header.memory_offset, header.memory_offset + (header.memory_mib << 20));
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let mut at = start;
    while at < end {
        let Ok(off) = libc::off_t::try_from(at) else { break };
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 || data as u64 >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { (hole as u64).min(end) };
        extents.push((data as u64, hole - data as u64));
        at = hole;
    }
    merge_to(extents, MAX_EXTENTS)
}

/// Merges neighbouring extents across the smallest gaps until at most `max` are left:
/// every gap up to the one that has to go is closed, in one pass.
fn merge_to(extents: Vec<(u64, u64)>, max: usize) -> Vec<(u64, u64)> {
    if extents.len() <= max {
        return extents;
    }
    let gap = |w: &[(u64, u64)]| w[1].0 - (w[0].0 + w[0].1);
    let mut gaps: Vec<u64> = extents.windows(2).map(gap).collect();
    gaps.sort_unstable();
    // Closing the smallest len - max gaps leaves max extents; ties may close a few more.
    let limit = gaps[extents.len() - max - 1];
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(max);
    for (o, l) in extents {
        match out.last_mut() {
            Some(last) if o - (last.0 + last.1) <= limit => last.1 = o + l - last.0,
            _ => out.push((o, l)),
        }
    }
    out
}

/// Writes extents as `OFFSET:LENGTH,...` (what `kindling boot --restore-prefetch` takes).
pub fn format_extents(extents: &[(u64, u64)]) -> String {
    extents.iter().map(|(o, l)| format!("{o}:{l}")).collect::<Vec<_>>().join(",")
}

/// Reads `OFFSET:LENGTH,...`: at most [`MAX_EXTENTS`], each inside the memory image of
/// `header`, in order and not overlapping.
pub fn parse_extents(text: &str, header: &Header) -> Result<Vec<(u64, u64)>, String> {
    let (start, end) = (header.memory_offset, header.memory_offset + (header.memory_mib << 20));
    let mut out: Vec<(u64, u64)> = Vec::new();
    for item in text.split(',').filter(|i| !i.is_empty()) {
        if out.len() == MAX_EXTENTS {
            return Err(format!("more than {MAX_EXTENTS} extents"));
        }
        let (o, l) = item.split_once(':').ok_or_else(|| format!("{item:?} is not OFFSET:LENGTH"))?;
        let (o, l): (u64, u64) = match (o.parse(), l.parse()) {
            (Ok(o), Ok(l)) => (o, l),
            _ => return Err(format!("{item:?} is not OFFSET:LENGTH in bytes")),
        };
        let after = out.last().map_or(start, |(po, pl)| po + pl);
        if o < after || l == 0 || o.checked_add(l).is_none_or(|e| e > end) {
            return Err(format!("extent {item:?} is outside the memory image or out of order"));
        }
        out.push((o, l));
    }
    Ok(out)
}

/// Reads the given extents of a snapshot once, in large sequential reads, so that the
/// guest's first touch of a page finds it in the page cache instead of waiting for a
/// read of its own (under the emulated runner each such read is a trip through the
/// level-1 VM's virtio disk). Returns the bytes read; stops at the first error.
pub fn prefetch(file: &File, extents: &[(u64, u64)]) -> std::io::Result<u64> {
    const CHUNK: usize = 2 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    for &(offset, len) in extents {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let got = file.read_at(&mut buf[..n], offset + done)?;
            if got == 0 {
                return Ok(total);
            }
            done += got as u64;
            total += got as u64;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// A new sparse file as long as a snapshot with `h`'s memory (in its own directory).
    fn sparse_file(h: &Header) -> (tempfile::TempDir, File) {
        let d = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(d.path().join("s")).unwrap();
        f.set_len(h.memory_offset + (h.memory_mib << 20)).unwrap();
        (d, f)
    }

    #[test]
    fn data_extents_are_merged_to_the_bound() {
        let mut h = header();
        h.memory_offset = 2 << 20;
        let n = MAX_EXTENTS as u64 + 10;
        h.memory_mib = (n * 8192).div_ceil(1 << 20);
        let (_d, f) = sparse_file(&h);
        for i in 0..n {
            f.write_all_at(&[7u8; 4096], h.memory_offset + i * 8192).unwrap();
        }
        let ext = data_extents(&f, &h);
        if ext.is_empty() {
            return; // a file system that does not track holes
        }
        assert!(ext.len() <= MAX_EXTENTS, "{} extents", ext.len());
        // Every written page is still covered.
        for i in 0..n {
            let at = h.memory_offset + i * 8192;
            assert!(ext.iter().any(|(o, l)| *o <= at && at + 4096 <= o + l), "page {i} left out");
        }
        parse_extents(&format_extents(&ext), &h).unwrap();
    }

    #[test]
    fn data_extents_find_the_written_pages_and_parse_back() {
        let mut h = header();
        h.memory_offset = 2 << 20;
        h.memory_mib = 4;
        let (_d, f) = sparse_file(&h);
        f.write_all_at(&[1u8; 8192], h.memory_offset + (1 << 20)).unwrap();
        f.write_all_at(&[2u8; 4096], h.memory_offset + (3 << 20)).unwrap();
        let ext = data_extents(&f, &h);
        // Where the file system tracks holes (ext4, tmpfs, xfs): the two written ranges,
        // at file-system block granularity.
        if !ext.is_empty() {
            assert!(
                ext.iter()
                    .any(|(o, l)| *o <= h.memory_offset + (1 << 20) && o + l >= h.memory_offset + (1 << 20) + 8192),
                "{ext:?}"
            );
            assert!(ext.iter().all(|(o, _)| *o >= h.memory_offset), "{ext:?}");
            assert!(ext.iter().map(|(_, l)| l).sum::<u64>() < 4 << 20, "the holes are left out: {ext:?}");
        }
        let text = format_extents(&ext);
        assert_eq!(parse_extents(&text, &h).unwrap(), ext);
        assert_eq!(prefetch(&f, &ext).unwrap(), ext.iter().map(|(_, l)| l).sum::<u64>());
        // Hostile or mistaken lists are refused with the reason.
        let o = h.memory_offset;
        assert!(parse_extents(&format!("{}:4096", o - 4096), &h).unwrap_err().contains("outside"));
        assert!(parse_extents(&format!("{o}:{}", 5 << 20), &h).unwrap_err().contains("outside"));
        assert!(parse_extents(&format!("{}:4096,{o}:4096", o + 8192), &h).unwrap_err().contains("out of order"));
        assert!(parse_extents(&format!("{o}:{}", u64::MAX), &h).is_err());
        assert!(parse_extents("12", &h).unwrap_err().contains("OFFSET:LENGTH"));
        let many: Vec<String> = (0..=MAX_EXTENTS as u64).map(|i| format!("{}:1", o + i * 2)).collect();
        assert!(parse_extents(&many.join(","), &h).unwrap_err().contains("more than"));
    }

    fn header() -> Header {
        Header {
            format: FORMAT,
            vmm_version: vmm_version(),
            cpu: CpuIdentity { vendor: "AuthenticAMD".into(), signature: 0x800f12, features: "abc".into() },
            devices: vec!["virtio-blk".into(), "vsock".into()],
            memory_mib: 8,
            vcpus: 1,
            state_offset: 0,
            state_len: 0,
            memory_offset: 0,
        }
    }

    #[test]
    fn memory_round_trips_sparse_and_restores_lazily_and_privately() {
        let d = tempfile::tempdir().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_slice(b"far away", GuestAddress(6 << 20)).unwrap();
        let path = d.path().join("snap");
        let f = File::create(&path).unwrap();
        let h = write(&f, header(), b"{\"state\":1}", &mem).unwrap();
        drop(f);
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.blocks() * 512 < 1 << 20, "zero pages are not written: {} bytes on disk", meta.blocks() * 512);
        let mut f = File::open(&path).unwrap();
        let (h2, state) = read(&mut f).unwrap();
        assert_eq!((h2, state.as_slice()), (h.clone(), &b"{\"state\":1}"[..]));
        // The file is opened read-only: writes go to private copies.
        let restored = map_memory(&f, &h).unwrap();
        let mut buf = [0u8; 10];
        restored.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(&buf, b"first page");
        restored.read_slice(&mut buf[..8], GuestAddress(6 << 20)).unwrap();
        assert_eq!(&buf[..8], b"far away");
        restored.write_slice(b"changed", GuestAddress(0)).unwrap();
        let again = map_memory(&f, &h).unwrap();
        again.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(&buf, b"first page", "one clone's writes are its own");
    }

    #[test]
    fn other_vmms_cpus_devices_and_damaged_files_are_refused() {
        let h = header();
        let cpu = h.cpu.clone();
        let devices = h.devices.clone();
        h.check(&cpu, &devices).unwrap();
        let mut other = h.clone();
        other.vmm_version = "0.0.0".into();
        assert!(other.check(&cpu, &devices).unwrap_err().to_string().contains("taken by kindling 0.0.0"));
        let other_cpu = CpuIdentity { features: "xyz".into(), ..cpu.clone() };
        assert!(h.check(&other_cpu, &devices).unwrap_err().to_string().contains("CPU presented as"));
        assert!(h.check(&cpu, &["virtio-blk".to_string()]).unwrap_err().to_string().contains("devices"));

        let d = tempfile::tempdir().unwrap();
        for (name, bytes) in [
            ("short", b"KIND".to_vec()),
            ("magic", vec![0u8; 8192]),
            ("length", [MAGIC.to_vec(), u32::MAX.to_le_bytes().to_vec(), vec![0; 8192]].concat()),
        ] {
            let p = d.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            let e = read(&mut File::open(&p).unwrap()).unwrap_err().to_string();
            assert!(e.contains("not a usable kindling snapshot"), "{name}: {e}");
        }
    }

    #[test]
    fn hostile_headers_are_refused_without_panic_or_huge_allocations() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hostile");
        let put = |h: &Header| {
            let json = serde_json::to_vec(h).unwrap();
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&(json.len() as u32).to_le_bytes());
            b.extend_from_slice(&json);
            b.resize(8192, 0);
            std::fs::write(&p, b).unwrap();
        };
        let base = Header { state_offset: STATE_OFFSET, state_len: 10, memory_offset: MEMORY_ALIGN, ..header() };
        for (what, h) in [
            ("state_len", Header { state_len: u64::MAX, ..base.clone() }),
            ("state_offset", Header { state_offset: u64::MAX, ..base.clone() }),
            ("memory_offset", Header { memory_offset: 0, ..base.clone() }),
            ("memory_mib", Header { memory_mib: u64::MAX, ..base.clone() }),
            ("no memory", Header { memory_mib: 0, ..base.clone() }),
        ] {
            put(&h);
            let e = read(&mut File::open(&p).unwrap()).unwrap_err().to_string();
            assert!(e.contains("out of range"), "{what}: {e}");
        }
        // In range but the file ends early: the state and the memory are missing.
        put(&Header { state_len: 1 << 20, ..base.clone() });
        assert!(read(&mut File::open(&p).unwrap()).unwrap_err().to_string().contains("ends inside"));
        put(&base);
        let mut f = File::open(&p).unwrap();
        let (h, _) = read(&mut f).unwrap();
        assert!(map_memory(&f, &h).unwrap_err().to_string().contains("shorter than its 8 MiB"));
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_after_the_magic_never_panic(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..6000)) {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("random");
            std::fs::write(&p, [MAGIC.as_slice(), &tail].concat()).unwrap();
            let _ = read(&mut File::open(&p).unwrap());
        }
    }
}
