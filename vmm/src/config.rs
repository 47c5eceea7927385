//! What a user asks for when booting a microVM, validated before anything is built.
//!
//! Every rejection names the offending value and how to fix it: these messages are
//! what a user sees on the terminal.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::arch::layout;

/// Largest guest the VMM agrees to build (vCPUs). The MADT uses 8-bit APIC IDs.
pub const MAX_VCPUS: u8 = 64;
/// Smallest memory a Linux guest can boot in with our layout.
pub const MIN_MEMORY_MIB: u64 = 32;
/// The x86 kernel's default COMMAND_LINE_SIZE (including the terminating NUL).
pub const CMDLINE_MAX: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("kernel image {0}: file not found; pass --kernel with the path of a bzImage or ELF vmlinux")]
    KernelMissing(PathBuf),
    #[error("kernel image {path}: cannot read it ({err}); check the path and its permissions")]
    KernelUnreadable { path: PathBuf, err: std::io::Error },
    #[error("kernel image {0}: not a Linux kernel (neither a bzImage with a 'HdrS' boot header nor an ELF vmlinux); pass the kernel's bzImage/vmlinuz or vmlinux")]
    KernelNotLinux(PathBuf),
    #[error("initrd {0}: file not found; pass --initrd with the path of an initramfs archive, or leave it out")]
    InitrdMissing(PathBuf),
    #[error("disk {0}: file not found; create the image first (e.g. `truncate -s 1G {0}` then `mkfs.ext4 {0}`) or fix the path")]
    DiskMissing(PathBuf),
    #[error("disk {0}: is a directory, not a disk image; pass a raw image file or block device")]
    DiskIsDirectory(PathBuf),
    #[error("disk option '{0}': unknown flag; the form is PATH or PATH,ro")]
    DiskOption(String),
    #[error("--cpus 0: a VM needs at least one vCPU; use --cpus 1 or more (up to {MAX_VCPUS})")]
    NoCpus,
    #[error("--cpus {0}: too many vCPUs; kindling supports up to {MAX_VCPUS}")]
    TooManyCpus(u32),
    #[error("--memory {0}: too little memory for a Linux guest; use --memory {MIN_MEMORY_MIB} or more (MiB)")]
    TooLittleMemory(u64),
    #[error("--memory {0}: more than this VMM maps (max {max} MiB)", max = layout::MAX_MEMORY_MIB)]
    TooMuchMemory(u64),
    #[error("kernel command line is {len} bytes with the VMM's device entries; the kernel accepts at most {max}; shorten --cmdline", max = CMDLINE_MAX - 1)]
    CmdlineTooLong { len: usize },
    #[error("--cmdline contains a NUL or non-ASCII byte; the kernel command line must be printable ASCII")]
    CmdlineInvalid,
    #[error("vsock guest CID {0}: CIDs 0-2 are reserved (2 is the host) and {max} means any; use 3 or more", max = u32::MAX)]
    VsockCid(u32),
    #[error("vsock socket {}: exists and is not a UNIX socket; remove it or pass another --vsock path", .0.display())]
    VsockNotSocket(PathBuf),
    #[error("vsock socket {}: directory {} does not exist; create it or pass another --vsock path", path.display(), dir.display())]
    VsockNoDir { path: PathBuf, dir: PathBuf },
    #[error("vsock socket {}: the path is {len} bytes, but with the `_<port>` suffix used for guest connections it must fit {max}; pass a shorter --vsock path", path.display(), max = VSOCK_PATH_MAX)]
    VsockPathTooLong { path: PathBuf, len: usize },
}

/// One virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

impl DiskConfig {
    /// Parses `PATH` or `PATH,ro`.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let mut parts = spec.rsplitn(2, ',');
        let last = parts.next().unwrap_or_default();
        match parts.next() {
            Some(path) if last == "ro" => Ok(Self { path: path.into(), read_only: true }),
            Some(path) if last == "rw" => Ok(Self { path: path.into(), read_only: false }),
            Some(_) => Err(ConfigError::DiskOption(spec.to_string())),
            None => Ok(Self { path: spec.into(), read_only: false }),
        }
    }
}

/// The length a UNIX socket path can have (sun_path is 108 bytes with the NUL).
const UNIX_PATH_MAX: usize = 107;
/// Longest `--vsock` path: `P_<port>` must fit too, for any 32-bit port.
pub const VSOCK_PATH_MAX: usize = UNIX_PATH_MAX - "_4294967295".len();

/// A virtio-vsock device whose host side is UNIX sockets (see
/// [`crate::devices::virtio::vsock`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID.
    pub guest_cid: u32,
    /// The VMM listens here. A host program connects and sends `CONNECT <port>\n` to
    /// reach guest port `<port>`. Guest connections to host port N go to `<uds_path>_N`.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// The CID `kindling boot --vsock` gives the guest.
    pub const DEFAULT_GUEST_CID: u32 = 3;

    pub fn new(uds_path: PathBuf) -> Self {
        Self { guest_cid: Self::DEFAULT_GUEST_CID, uds_path }
    }

    /// Checks what can be checked before binding. A stale socket file is fine: the device
    /// replaces it when nothing listens on it any more.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid < 3 || self.guest_cid == u32::MAX {
            return Err(ConfigError::VsockCid(self.guest_cid));
        }
        let path = &self.uds_path;
        let len = path.as_os_str().len();
        if len > VSOCK_PATH_MAX {
            return Err(ConfigError::VsockPathTooLong { path: path.clone(), len });
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(ConfigError::VsockNoDir { path: path.clone(), dir: dir.to_path_buf() });
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => Err(ConfigError::VsockNotSocket(path.clone())),
            _ => Ok(()),
        }
    }
}

/// Where a virtio-net device's frames go (see [`crate::devices::virtio::net`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetBackend {
    /// A tap device the VMM creates (root).
    Tap,
    /// A passt process the VMM starts (no privileges needed).
    Passt,
}

impl NetBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            NetBackend::Tap => "tap",
            NetBackend::Passt => "passt",
        }
    }
}

/// A virtio-net device. The guest's address, gateway and DNS server are appended to
/// the kernel command line (`kindling.ip= kindling.gw= kindling.dns=`) once the
/// backend is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub backend: NetBackend,
}

/// Kernel image formats the loader understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf,
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory_mib: u64,
    pub disks: Vec<DiskConfig>,
    pub vsock: Option<VsockConfig>,
    pub net: Option<NetConfig>,
}

impl VmConfig {
    /// Checks everything that can be checked before touching KVM; returns the kernel format.
    pub fn validate(&self) -> Result<KernelFormat, ConfigError> {
        if self.cpus == 0 {
            return Err(ConfigError::NoCpus);
        }
        if self.cpus > MAX_VCPUS {
            return Err(ConfigError::TooManyCpus(self.cpus.into()));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::TooLittleMemory(self.memory_mib));
        }
        if self.memory_mib > layout::MAX_MEMORY_MIB {
            return Err(ConfigError::TooMuchMemory(self.memory_mib));
        }
        if !self.cmdline.bytes().all(|b| b.is_ascii() && b != 0) {
            return Err(ConfigError::CmdlineInvalid);
        }
        let len = self.full_cmdline_len();
        if len >= CMDLINE_MAX {
            return Err(ConfigError::CmdlineTooLong { len });
        }
        let format = kernel_format(&self.kernel)?;
        if let Some(initrd) = &self.initrd {
            if !initrd.is_file() {
                return Err(ConfigError::InitrdMissing(initrd.clone()));
            }
        }
        for disk in &self.disks {
            if disk.path.is_dir() {
                return Err(ConfigError::DiskIsDirectory(disk.path.clone()));
            }
            if !disk.path.exists() {
                return Err(ConfigError::DiskMissing(disk.path.clone()));
            }
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        Ok(format)
    }
}

impl VmConfig {
    /// Number of virtio devices: the disks in order, then vsock, then net.
    pub fn virtio_device_count(&self) -> usize {
        self.disks.len() + usize::from(self.vsock.is_some()) + usize::from(self.net.is_some())
    }

    /// The command line's length once the VMM appended one `virtio_mmio.device=` entry
    /// per device and, with a network, the guest's addresses at their longest (the
    /// builder appends exactly these, or less).
    pub fn full_cmdline_len(&self) -> usize {
        let net = if self.net.is_some() { crate::devices::virtio::net::MAX_CMDLINE_ARGS_LEN } else { 0 };
        let devices: usize = (0..self.virtio_device_count())
            .map(|i| match layout::virtio_mmio_slot(i) {
                Some((addr, irq)) => virtio_mmio_arg(addr, irq).len() + 1,
                None => 0,
            })
            .sum();
        self.cmdline.len() + devices + net
    }
}

/// The kernel parameter describing one virtio-mmio device window.
pub fn virtio_mmio_arg(addr: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{addr:#x}:{irq}")
}

/// Sniffs the kernel image: a bzImage carries "HdrS" at 0x202, an ELF starts with \x7fELF.
pub fn kernel_format(path: &Path) -> Result<KernelFormat, ConfigError> {
    let mut file = File::open(path).map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound => ConfigError::KernelMissing(path.to_path_buf()),
        _ => ConfigError::KernelUnreadable { path: path.to_path_buf(), err },
    })?;
    if path.is_dir() {
        return Err(ConfigError::KernelNotLinux(path.to_path_buf()));
    }
    let mut head = [0u8; 0x206];
    let n = read_up_to(&mut file, &mut head)
        .map_err(|err| ConfigError::KernelUnreadable { path: path.to_path_buf(), err })?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(ConfigError::KernelNotLinux(path.to_path_buf()))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        match file.read(&mut buf[total..])? {
            0 => break,
            n => total += n,
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(kernel: PathBuf) -> VmConfig {
        VmConfig { kernel, initrd: None, cmdline: "console=ttyS0".into(), cpus: 1, memory_mib: 128, disks: vec![], vsock: None, net: None }
    }

    #[test]
    fn disk_spec_parsing() {
        assert_eq!(DiskConfig::parse("/a/b.img").unwrap(), DiskConfig { path: "/a/b.img".into(), read_only: false });
        assert_eq!(DiskConfig::parse("/a/b.img,ro").unwrap(), DiskConfig { path: "/a/b.img".into(), read_only: true });
        assert!(matches!(DiskConfig::parse("/a/b.img,rx"), Err(ConfigError::DiskOption(_))));
    }

    #[test]
    fn rejects_non_kernels_and_bad_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"this is not a kernel").unwrap();
        assert!(matches!(base(junk.clone()).validate(), Err(ConfigError::KernelNotLinux(_))));
        assert!(matches!(base(dir.path().join("nope")).validate(), Err(ConfigError::KernelMissing(_))));

        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, &elf).unwrap();
        assert_eq!(base(k.clone()).validate().unwrap(), KernelFormat::Elf);
        let mut c = base(k.clone());
        c.cpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::NoCpus)));
        let mut c = base(k.clone());
        c.memory_mib = 0;
        assert!(matches!(c.validate(), Err(ConfigError::TooLittleMemory(0))));
        let mut c = base(k.clone());
        c.disks.push(DiskConfig { path: dir.path().join("missing.img"), read_only: false });
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("missing.img") && err.contains("not found"), "{err}");

        let disk = dir.path().join("d.img");
        std::fs::write(&disk, b"").unwrap();
        let mut c = base(k.clone());
        c.disks.push(DiskConfig { path: disk, read_only: false });
        c.cmdline = "x".repeat(CMDLINE_MAX - 10);
        assert!(matches!(c.validate(), Err(ConfigError::CmdlineTooLong { .. })), "device entries count too");
    }

    #[test]
    fn vsock_checks_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let sock = |name: &str| VsockConfig::new(dir.path().join(name));
        assert_eq!(sock("v.sock").validate().map_err(|e| e.to_string()), Ok(()));
        let mut low = sock("v.sock");
        low.guest_cid = 2;
        assert!(matches!(low.validate(), Err(ConfigError::VsockCid(2))));
        let err = VsockConfig::new(dir.path().join("nodir/v.sock")).validate().unwrap_err().to_string();
        assert!(err.contains("nodir") && err.contains("does not exist"), "{err}");
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let err = sock("file").validate().unwrap_err().to_string();
        assert!(err.contains("not a UNIX socket"), "{err}");
        // A stale socket passes: the device replaces it.
        drop(std::os::unix::net::UnixListener::bind(dir.path().join("stale")).unwrap());
        assert!(sock("stale").validate().is_ok());
        assert!(matches!(sock(&"x".repeat(VSOCK_PATH_MAX)).validate(), Err(ConfigError::VsockPathTooLong { .. })));
        assert!(VsockConfig::new("v.sock".into()).validate().is_ok(), "a bare name lives in the current directory");
    }

    #[test]
    fn vsock_device_counts_towards_the_command_line() {
        let mut c = base("/k".into());
        let without = c.full_cmdline_len();
        c.vsock = Some(VsockConfig::new("/tmp/v.sock".into()));
        assert!(c.full_cmdline_len() > without);
    }

    #[test]
    fn net_device_and_guest_addresses_count_towards_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, &elf).unwrap();
        let mut c = base(k);
        let without = c.full_cmdline_len();
        c.net = Some(NetConfig { backend: NetBackend::Passt });
        let reserved = crate::devices::virtio::net::MAX_CMDLINE_ARGS_LEN;
        assert!(c.full_cmdline_len() > without + reserved, "a device entry and the addresses");
        // A command line that fits without the network no longer fits with it.
        c.cmdline = "x".repeat(CMDLINE_MAX - without - 1 + "console=ttyS0".len());
        c.net = None;
        assert!(c.validate().is_ok(), "{:?}", c.full_cmdline_len());
        c.net = Some(NetConfig { backend: NetBackend::Tap });
        assert!(matches!(c.validate(), Err(ConfigError::CmdlineTooLong { .. })));
    }
}
