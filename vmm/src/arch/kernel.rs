//! Linux boot protocol: loads the kernel, initrd and command line into guest memory and
//! fills the boot_params ("zero page") the kernel reads at its 64-bit entry point.
//!
//! Both formats enter in 64-bit mode: a bzImage at its `startup_64` (load address +
//! 0x200), an ELF vmlinux at its ELF entry. See the kernel's Documentation/x86/boot.rst.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::layout;

/// Kernel image formats the loader understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A bzImage, with the boot protocol's setup header.
    BzImage,
    /// An ELF vmlinux.
    Elf,
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// "HdrS": boot protocol header magic.
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG: u16 = 0xaa55;
/// Loader type 0xff: "undefined" boot loader, as the protocol asks of VMMs.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const LOADFLAG_LOADED_HIGH: u8 = 0x01;
const LOADFLAG_CAN_USE_HEAP: u8 = 0x80;
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Why the kernel, initrd or boot parameters could not be put in guest memory.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image could not be opened.
    #[error("kernel image {path}: {err}")]
    OpenKernel {
        /// The kernel image's path.
        path: String,
        /// Why it could not be opened.
        err: std::io::Error,
    },
    /// The kernel loader rejected the image or could not place it in guest memory.
    #[error("kernel image {path}: {err}; is it a complete x86_64 bzImage or vmlinux, and does it fit in --memory?")]
    LoadKernel {
        /// The kernel image's path.
        path: String,
        /// The loader's error.
        err: linux_loader::loader::Error,
    },
    /// The initrd could not be opened or read into guest memory.
    #[error("initrd {path}: {err}")]
    ReadInitrd {
        /// The initrd's path.
        path: String,
        /// Why it could not be read.
        err: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the highest address it may use.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}; raise --memory")]
    InitrdTooBig {
        /// The initrd's path.
        path: String,
        /// Its size in bytes.
        size: u64,
        /// The address it had to end below.
        limit: u64,
    },
    /// The command line could not be made a C string or written into guest memory.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// The boot parameters (or another boot structure) could not be written into guest memory.
    #[error("writing boot parameters into guest memory: {0}")]
    BootParams(String),
}

/// Where the vCPU starts and where its boot parameters are.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    /// The kernel's 64-bit entry point.
    pub entry: GuestAddress,
    /// The boot_params the kernel expects in RSI.
    pub zero_page: GuestAddress,
}

/// Loads kernel + initrd + cmdline, writes boot_params, returns the 64-bit entry point.
pub fn load(
    mem: &GuestMemoryMmap,
    format: KernelFormat,
    kernel_path: &Path,
    initrd_path: Option<&Path>,
    cmdline: &Cmdline,
    rsdp: GuestAddress,
) -> Result<BootEntry, BootError> {
    let load_err = |err| BootError::LoadKernel { path: kernel_path.display().to_string(), err };
    let mut kernel = File::open(kernel_path)
        .map_err(|err| BootError::OpenKernel { path: kernel_path.display().to_string(), err })?;
    let highmem = Some(GuestAddress(layout::HIMEM_START));
    let (result, entry) = match format {
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut kernel, highmem).map_err(load_err)?;
            (r, r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET))
        }
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut kernel, highmem).map_err(load_err)?;
            (r, r.kernel_load)
        }
    };

    let mut hdr = result.setup_header.unwrap_or_else(|| setup_header {
        boot_flag: BOOT_FLAG,
        header: HDRS_MAGIC,
        kernel_alignment: 0x0100_0000,
        initrd_addr_max: 0x7fff_ffff,
        ..Default::default()
    });
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.loadflags |= LOADFLAG_LOADED_HIGH | LOADFLAG_CAN_USE_HEAP;
    hdr.heap_end_ptr = 0xfe00;
    hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    hdr.cmdline_size = cmdline_len(cmdline)? as u32 + 1;
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;

    if let Some(initrd) = initrd_path {
        let (addr, size) = load_initrd(mem, initrd, u64::from(hdr.initrd_addr_max), result.kernel_end)?;
        hdr.ramdisk_image = addr.raw_value() as u32;
        hdr.ramdisk_size = size as u32;
    }

    let mut params = boot_params { hdr, acpi_rsdp_addr: rsdp.raw_value(), ..Default::default() };
    let e820 = e820_map(mem);
    params.e820_table[..e820.len()].copy_from_slice(&e820);
    params.e820_entries = e820.len() as u8;

    let zero_page = GuestAddress(layout::ZERO_PAGE_START);
    let bp = BootParams::new::<boot_params>(&params, zero_page);
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .map_err(|e| BootError::BootParams(e.to_string()))?;
    Ok(BootEntry { entry, zero_page })
}

fn cmdline_len(cmdline: &Cmdline) -> Result<usize, BootError> {
    cmdline.as_cstring().map(|c| c.as_bytes().len()).map_err(|e| BootError::Cmdline(e.to_string()))
}

/// Places the initrd page-aligned at the highest address below the MMIO gap, the
/// kernel's `initrd_addr_max`, and the end of the first RAM range, above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    addr_max: u64,
    kernel_end: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let name = path.display().to_string();
    let mut file = File::open(path).map_err(|err| BootError::ReadInitrd { path: name.clone(), err })?;
    let size = file.metadata().map_err(|err| BootError::ReadInitrd { path: name.clone(), err })?.len();
    let low_end = mem.iter().next().map(|r| r.len()).unwrap_or(0);
    let limit = low_end.min(addr_max.saturating_add(1)).min(layout::MMIO_GAP_START);
    let start = limit.checked_sub(size).map(|a| a & !0xfff).filter(|&a| a >= kernel_end.max(layout::HIMEM_START));
    let Some(start) = start else {
        return Err(BootError::InitrdTooBig { path: name, size, limit });
    };
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .map_err(|e| BootError::ReadInitrd { path: name, err: std::io::Error::other(e.to_string()) })?;
    Ok((GuestAddress(start), size))
}

/// The e820 map the guest sees: low RAM, the BIOS/ACPI area (reserved), RAM from 1 MiB.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, type_: u32| boot_e820_entry { addr, size, r#type: type_ };
    let mut map = vec![
        entry(0, layout::EBDA_START, E820_RAM),
        entry(layout::EBDA_START, layout::HIMEM_START - layout::EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(layout::HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}

/// Writes `bytes` at `addr` (helper shared with ACPI and register setup).
pub fn write_at(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr)).map_err(|e| BootError::BootParams(e.to_string()))
}
