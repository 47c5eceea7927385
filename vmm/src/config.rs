//! What a microVM is made of, validated before anything is built. This is the one
//! place with the VM's limits: `kindling boot`, the daemon and the cluster manager all
//! build a [`VmConfig`] and call [`VmConfig::validate`].
//!
//! Every rejection names the offending value and how to fix it: these messages are
//! what a user sees on the terminal.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::arch::kernel::KernelFormat;
use crate::arch::layout;

/// Smallest and largest guest the VMM agrees to build (vCPUs), as Firecracker (the MADT
/// would take up to 254).
pub const MIN_VCPUS: u32 = 1;
/// Largest number of vCPUs a guest may have.
pub const MAX_VCPUS: u32 = 32;
/// Smallest memory a Linux guest boots in comfortably with our layout, and the most
/// this VMM is meant to give a microVM.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Most memory a guest may have, in MiB.
pub const MAX_MEMORY_MIB: u64 = 65536;
/// The x86 kernel's default COMMAND_LINE_SIZE (including the terminating NUL).
pub const CMDLINE_MAX: usize = 2048;

/// Why a [`VmConfig`] was rejected; each message says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The kernel image does not exist.
    #[error("kernel image {0}: file not found; pass --kernel with the path of a bzImage or ELF vmlinux")]
    KernelMissing(PathBuf),
    /// The kernel image could not be opened or read.
    #[error("kernel image {path}: cannot read it ({err}); check the path and its permissions")]
    KernelUnreadable {
        /// The kernel image's path.
        path: PathBuf,
        /// Why it could not be opened or read.
        err: std::io::Error,
    },
    /// The kernel image is neither a bzImage nor an ELF vmlinux.
    #[error("kernel image {0}: not a Linux kernel (neither a bzImage with a 'HdrS' boot header nor an ELF vmlinux); pass the kernel's bzImage/vmlinuz or vmlinux")]
    KernelNotLinux(PathBuf),
    /// The initrd does not exist (or is not a regular file).
    #[error("initrd {0}: file not found; pass --initrd with the path of an initramfs archive, or leave it out")]
    InitrdMissing(PathBuf),
    /// A disk image does not exist.
    #[error("disk {0}: file not found; create the image first (e.g. `truncate -s 1G {0}` then `mkfs.ext4 {0}`) or fix the path")]
    DiskMissing(PathBuf),
    /// A disk path names a directory.
    #[error("disk {0}: is a directory, not a disk image; pass a raw image file or block device")]
    DiskIsDirectory(PathBuf),
    /// A disk spec ends in a flag other than `ro` or `rw`.
    #[error("disk option '{0}': unknown flag; the form is PATH or PATH,ro")]
    DiskOption(String),
    /// The VM was given no vCPUs.
    #[error("--cpus 0: a VM needs at least one vCPU; use {MIN_VCPUS} to {MAX_VCPUS} vCPUs")]
    NoCpus,
    /// The VM was given more than [`MAX_VCPUS`] vCPUs.
    #[error("--cpus {0}: too many vCPUs; use {MIN_VCPUS} to {MAX_VCPUS} vCPUs")]
    TooManyCpus(u32),
    /// The VM was given less than [`MIN_MEMORY_MIB`] MiB of memory.
    #[error("--memory {0}: too little memory for a Linux guest; use {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB")]
    TooLittleMemory(u64),
    /// The VM was given more than [`MAX_MEMORY_MIB`] MiB of memory.
    #[error("--memory {0}: more than a microVM gets here; use {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB")]
    TooMuchMemory(u64),
    /// The command line, with the VMM's device entries, does not fit [`CMDLINE_MAX`].
    #[error("kernel command line is {len} bytes with the VMM's device entries; the kernel accepts at most {max}; shorten --cmdline", max = CMDLINE_MAX - 1)]
    CmdlineTooLong {
        /// Its length in bytes, device entries included.
        len: usize,
    },
    /// The command line contains a NUL or non-ASCII byte.
    #[error("--cmdline contains a NUL or non-ASCII byte; the kernel command line must be printable ASCII")]
    CmdlineInvalid,
    /// The vsock guest CID is reserved (0 to 2) or the wildcard `u32::MAX`.
    #[error("vsock guest CID {0}: CIDs 0-2 are reserved (2 is the host) and {max} means any; use 3 or more", max = u32::MAX)]
    VsockCid(u32),
    /// The vsock socket path exists and is not a UNIX socket.
    #[error("vsock socket {}: exists and is not a UNIX socket; remove it or pass another --vsock path", .0.display())]
    VsockNotSocket(PathBuf),
    /// The vsock socket's directory does not exist.
    #[error("vsock socket {}: directory {} does not exist; create it or pass another --vsock path", path.display(), dir.display())]
    VsockNoDir {
        /// The socket path.
        path: PathBuf,
        /// Its directory, which is missing.
        dir: PathBuf,
    },
    /// The vsock socket path is too long to take the `_<port>` suffix (see [`VSOCK_PATH_MAX`]).
    #[error("vsock socket {}: the path is {len} bytes, but with the `_<port>` suffix used for guest connections it must fit {max}; pass a shorter --vsock path", path.display(), max = VSOCK_PATH_MAX)]
    VsockPathTooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
}

/// One virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image file or block device.
    pub path: PathBuf,
    /// Whether the guest gets the disk read-only (`,ro`).
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
pub const UNIX_PATH_MAX: usize = 107;
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

    /// A device listening on `uds_path`, with the default guest CID.
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

/// A virtio-net device. Its backend (an open tap, a passt socket) is a host resource
/// handed to [`crate::builder::MicroVm::build`] with the config; the guest's addresses,
/// if any, are already on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address (locally administered, unicast).
    pub mac: [u8; 6],
}

/// A microVM: kernel, vCPUs, memory and devices.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The kernel image (bzImage or ELF vmlinux).
    pub kernel: PathBuf,
    /// The initramfs archive, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line, complete but for the `virtio_mmio.device=` entries the
    /// VMM appends.
    pub cmdline: String,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Guest RAM, in MiB.
    pub memory_mib: u64,
    /// The virtio-blk disks, in slot order.
    pub disks: Vec<DiskConfig>,
    /// The virtio-vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// The virtio-net device, if any (its backend comes in [`crate::builder::HostResources`]).
    pub net: Option<NetConfig>,
}

impl VmConfig {
    /// Checks everything that can be checked before touching KVM; returns the kernel format.
    pub fn validate(&self) -> Result<KernelFormat, ConfigError> {
        check_size(self.cpus, self.memory_mib)?;
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
    /// The command line used when none is given: serial console, reboot (ending the VM)
    /// a second after a panic, and the first disk as the root filesystem.
    pub fn default_cmdline(has_disk: bool) -> String {
        let mut c = String::from("console=ttyS0 panic=1");
        if has_disk {
            c.push_str(" root=/dev/vda rw");
        }
        c
    }

    /// Number of virtio devices: the disks in order, then vsock, then net.
    pub fn virtio_device_count(&self) -> usize {
        self.disks.len() + usize::from(self.vsock.is_some()) + usize::from(self.net.is_some())
    }

    /// The command line's length once the VMM appended one `virtio_mmio.device=` entry
    /// per device (the builder appends exactly these).
    pub fn full_cmdline_len(&self) -> usize {
        let devices: usize = (0..self.virtio_device_count())
            .map(|i| match layout::virtio_mmio_slot(i) {
                Some((addr, irq)) => virtio_mmio_arg(addr, irq).len() + 1,
                None => 0,
            })
            .sum();
        self.cmdline.len() + devices
    }
}

/// Checks a VM's vCPUs and memory against the limits (part of [`VmConfig::validate`],
/// for callers that check a size before the rest of the VM exists).
pub fn check_size(cpus: u32, memory_mib: u64) -> Result<(), ConfigError> {
    if cpus == 0 {
        return Err(ConfigError::NoCpus);
    }
    if cpus > MAX_VCPUS {
        return Err(ConfigError::TooManyCpus(cpus));
    }
    if memory_mib < MIN_MEMORY_MIB {
        return Err(ConfigError::TooLittleMemory(memory_mib));
    }
    if memory_mib > MAX_MEMORY_MIB {
        return Err(ConfigError::TooMuchMemory(memory_mib));
    }
    Ok(())
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
        VmConfig {
            kernel,
            initrd: None,
            cmdline: "console=ttyS0".into(),
            cpus: 1,
            memory_mib: 128,
            disks: vec![],
            vsock: None,
            net: None,
        }
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

    /// A file that passes for an ELF vmlinux (its magic), in `dir`.
    fn fake_elf(dir: &Path) -> PathBuf {
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        let k = dir.join("vmlinux");
        std::fs::write(&k, &elf).unwrap();
        k
    }

    #[test]
    fn a_net_device_counts_towards_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = base(fake_elf(dir.path()));
        let without = c.full_cmdline_len();
        c.net = Some(NetConfig { mac: [6, 0, 0, 0, 0, 1] });
        assert!(c.full_cmdline_len() > without, "a device entry");
        // A command line that fits without the network no longer fits with it.
        c.cmdline = "x".repeat(CMDLINE_MAX - without - 1 + "console=ttyS0".len());
        c.net = None;
        assert!(c.validate().is_ok(), "{:?}", c.full_cmdline_len());
        c.net = Some(NetConfig { mac: [6, 0, 0, 0, 0, 1] });
        assert!(matches!(c.validate(), Err(ConfigError::CmdlineTooLong { .. })));
    }

    #[test]
    fn limits_are_named_with_their_range() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = base(fake_elf(dir.path()));
        c.cpus = MAX_VCPUS + 1;
        assert!(c.validate().unwrap_err().to_string().contains("1 to 32"));
        c.cpus = 1;
        c.memory_mib = MAX_MEMORY_MIB + 1;
        assert!(c.validate().unwrap_err().to_string().contains("64 to 65536"));
        c.memory_mib = MIN_MEMORY_MIB;
        assert!(c.validate().is_ok());
    }
}
