//! The emulated runner: runs `kindling boot` inside a level-1 (L1) VM that QEMU emulates
//! with TCG, exposing AMD SVM + nested paging so Debian's stock kvm-amd module gives L1 a
//! real /dev/kvm. The user's guest is then an L2 VM under kindling's own VMM.
//!
//! L1 is: Debian's cloud kernel (`vmlinuz`), and an initramfs of busybox-static, the KVM
//! modules, an /init script, and — appended per run — this very (static) executable, the
//! guest's kernel/initrd and the boot arguments. Disks become L1 virtio drives
//! (/dev/vda, ...). L2's console is L1's serial console, which is our stdio; L1 reports
//! kindling's exit status through QEMU's isa-debug-exit port.
//!
//! The guest's vsock reaches the host through a relay ([`relay`]): this process offers
//! the vsock UNIX socket (and any `--forward` ports) on the host and passes each
//! connection, handshake included, to a TCP port QEMU's user networking forwards into
//! L1 (`hostfwd`, with L1 otherwise cut off: `restrict=on`), where kindling passes it
//! on to the L2 VMM's vsock socket once the connection proved it knows the VM's token.
//! Guest-initiated vsock connections stay inside L1.
//!
//! Snapshots: a snapshot file is one piece ([`kindling_vmm::snapshot`]) so that it can
//! be an L1 virtio drive after the guest's disks. `--snapshot-to FILE` makes FILE at
//! its full sparse size here (state reserve and memory) and the VMM in L1 writes it as
//! /dev/vdN when the host's SIGUSR1 reaches it through the relay (`snapshot` verb);
//! `--restore FILE` hands FILE in read-only, and the VMM in L1 maps the guest's memory
//! from the drive.
//!
//! With `--net`, L1's NIC gets outbound networking too (QEMU user networking without
//! `restrict`; default route 10.0.2.2, DNS 10.0.2.3), and the L2 VMM sets up the
//! guest's network inside L1, where it runs as root: a tap device (L1 loads the tun
//! module), or passt, which is shipped in with its libraries. L1 has no iptables, so a
//! TAP guest is not NATed there; instead L1 answers ARP for the guest's subnet on its
//! NIC (proxy ARP) and routes, and QEMU's user networking, which terminates every
//! connection on the host's sockets whatever its source address, is the NAT.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kindling_proto::forward::Forward;
use kindling_vmm::config::VmConfig;

use super::l1watch::{self, Watch};
use super::relay::{self, HostRelay, Token};
use crate::archive::Archive;
use crate::cache;
use crate::hostnet::NetKind;
use crate::util::which;

/// images/l1/modules.txt: the modules L1 loads, in dependency order (shared with scripts/setup).
const L1_MODULE_LIST: &str = include_str!("../../../images/l1/modules.txt");

/// File names of the modules L1 loads, in load order.
pub fn l1_modules() -> impl Iterator<Item = &'static str> {
    L1_MODULE_LIST
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.rsplit('/').next().unwrap_or(l))
}
/// Where scripts/setup installs the L1 kernel for every user (root installs).
pub const SYSTEM_L1_DIR: &str = "/usr/local/lib/kindling/l1-kernel";
/// QEMU's isa-debug-exit port, where kindling in L1 writes the guest's exit status.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// AMD EPYC with SVM and nested paging, minus the features TCG cannot emulate (which
/// QEMU would otherwise warn about at every start).
const L1_CPU: &str =
    "EPYC,+svm,+npt,-rdseed,-sha-ni,-fxsr-opt,-misalignsse,-3dnowprefetch,-osvw,-topoext,-nrip-save,-xsavec";
/// Status values are offset so that QEMU's own exit code 1 (an error) never decodes
/// to a guest status: QEMU exits with ((value << 1) | 1).
const STATUS_OFFSET: i32 = 16;
/// Memory L1 needs besides the L2 guest's: its kernel, the initramfs (held twice while
/// unpacking) and the VMM.
const L1_OVERHEAD_MIB: u64 = 512;
/// The TCP port in L1 where the vsock relay listens (QEMU forwards a host port to it).
const L1_RELAY_PORT: u16 = 1100;
/// The L2 VMM's vsock socket inside L1.
const L1_VSOCK_PATH: &str = "/kindling/vsock.sock";
/// The relay's token inside L1 (see [`relay`]).
const L1_TOKEN_FILE: &str = "/kindling/relay-token";

/// L1's init. Its kernel console, and so this script's output, is ttyS1: the progress
/// channel ([`l1watch`]); steps go into the kernel log too. kindling runs with its
/// output on ttyS0, the L2 guest's console.
const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
step() { echo "kindling-l1: step $1" > /dev/kmsg; }
step init
for m in $(cat /lib/modules/order); do
  insmod /lib/modules/$m || echo "kindling-l1: loading $m failed"
done
[ -c /dev/kvm ] || echo "kindling-l1: no /dev/kvm after loading the KVM modules"
step modules
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0
  # QEMU user networking: outbound (when not restricted) and DNS; proxy ARP lets it
  # reach a routed guest subnet behind L1 (see the module documentation).
  ip route add default via 10.0.2.2
  echo 1 > /proc/sys/net/ipv4/conf/eth0/proxy_arp
fi
mkdir -p /etc && echo "nameserver 10.0.2.3" > /etc/resolv.conf
step network
exec /kindling/kindling __l1-guest </dev/ttyS0 >/dev/ttyS0 2>&1
"#;

#[derive(Debug, thiserror::Error)]
pub enum EmulatedError {
    #[error("emulated runner needs qemu-system-x86_64; install it with `apt-get install qemu-system-x86` (scripts/setup does)")]
    NoQemu,
    #[error("emulated runner: no level-1 kernel found in {searched}; run scripts/setup (it extracts Debian's linux-image-*-cloud-amd64 there)")]
    NoL1Kernel { searched: String },
    #[error("emulated runner needs busybox-static at /bin/busybox; install it with `apt-get install busybox-static`")]
    NoBusybox,
    #[error("emulated runner: this kindling executable ({0}) is dynamically linked and cannot run inside the level-1 VM; build it with the workspace's .cargo/config.toml (crt-static)")]
    NotStatic(PathBuf),
    #[error("emulated runner: {what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("emulated runner: the level-1 VM stopped without reporting kindling's exit status (QEMU exit code {0}); see the console output above")]
    NoStatus(i32),
    #[error("emulated runner: QEMU was killed by a signal")]
    Killed,
    #[error("vsock socket {0} is in use by a running VM; pick another path or stop that VM")]
    VsockInUse(PathBuf),
    #[error(transparent)]
    Forward(#[from] crate::forward::ForwardError),
    #[error("emulated runner: {0}")]
    Job(String),
    #[error("emulated runner: {0}")]
    Stalled(Box<super::l1watch::Stall>),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EmulatedError {
    let what = what.into();
    move |err| EmulatedError::Io { what, err }
}

/// Debian's cloud kernel and its KVM modules, as extracted by scripts/setup.
pub struct L1Kernel {
    pub dir: PathBuf,
}

impl L1Kernel {
    /// Debian's stock cloud kernel (also the tests' stock guest kernel).
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    /// The kernel's symbols, which scripts/setup reads from its /proc/kallsyms (Debian's
    /// System.map is a stub); they name where a stalled L1's vCPUs were.
    pub fn system_map(&self) -> Option<PathBuf> {
        Some(self.dir.join("System.map")).filter(|p| p.is_file())
    }
    fn module(&self, name: &str) -> PathBuf {
        self.dir.join("modules").join(name)
    }
    fn is_complete(dir: &Path) -> bool {
        dir.join("vmlinuz").is_file() && l1_modules().all(|m| dir.join("modules").join(m).is_file())
    }
}

fn l1_search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("KINDLING_L1_KERNEL_DIR") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(cache::dir().join("l1-kernel"));
    dirs.push(PathBuf::from(SYSTEM_L1_DIR));
    dirs
}

/// Finds the newest complete L1 kernel: `<dir>/<version>/{vmlinuz,modules/*.ko}`.
pub fn find_l1_kernel() -> Result<L1Kernel, EmulatedError> {
    let dirs = l1_search_dirs();
    for base in &dirs {
        if L1Kernel::is_complete(base) {
            return Ok(L1Kernel { dir: base.clone() });
        }
        let Ok(entries) = std::fs::read_dir(base) else { continue };
        let mut versions: Vec<PathBuf> =
            entries.flatten().map(|e| e.path()).filter(|p| L1Kernel::is_complete(p)).collect();
        versions.sort();
        if let Some(dir) = versions.pop() {
            return Ok(L1Kernel { dir });
        }
    }
    Err(EmulatedError::NoL1Kernel {
        searched: dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
    })
}

/// True when the ELF file has no PT_INTERP program header (statically linked).
pub fn is_static_elf(path: &Path) -> std::io::Result<bool> {
    let data = std::fs::read(path)?;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| data.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    let u64_at = |o: usize| data.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    if data.get(..5) != Some(b"\x7fELF\x02") {
        return Ok(false);
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return Ok(false);
    };
    const PT_INTERP: u32 = 3;
    Ok((0..usize::from(phnum)).all(|i| u32_at(phoff as usize + i * usize::from(phentsize)) != Some(PT_INTERP)))
}

/// The cached part of L1's initramfs: busybox, KVM modules, /init.
fn base_initramfs(l1: &L1Kernel) -> Result<PathBuf, EmulatedError> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() || !is_static_elf(busybox).unwrap_or(false) {
        return Err(EmulatedError::NoBusybox);
    }
    let mut key = cache::Key::new("l1-initramfs-v4");
    key.add(INIT_SCRIPT.as_bytes());
    key.add_file(busybox).map_err(io("reading /bin/busybox"))?;
    for m in l1_modules() {
        key.add_file(&l1.module(m)).map_err(io(format!("reading {}", l1.module(m).display())))?;
    }
    let path = cache::dir().join("l1").join(format!("base-{}.cpio", key.finish()));
    if path.is_file() {
        return Ok(path);
    }
    cache::write_atomic(&path, |tmp| {
        let mut a = Archive::new(std::io::BufWriter::new(std::fs::File::create(tmp)?));
        for d in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
            a.dir(d)?;
        }
        a.file("bin/busybox", 0o755, busybox)?;
        a.entry("init", 0o100755, INIT_SCRIPT.as_bytes())?;
        let order: Vec<&str> = l1_modules().collect();
        for m in &order {
            a.file(&format!("lib/modules/{m}"), 0o644, &l1.module(m))?;
        }
        a.entry("lib/modules/order", 0o100644, order.join("\n").as_bytes())?;
        a.finish()?.flush()
    })
    .map_err(io(format!("writing {}", path.display())))?;
    Ok(path)
}

/// `kindling boot` arguments for the VMM inside L1, with paths as L1 sees them.
pub fn l1_boot_args(config: &VmConfig, net: Option<NetKind>, host_loopback: bool) -> Vec<String> {
    let mut args = vec!["--kernel".into(), "/kindling/kernel".into()];
    if config.initrd.is_some() {
        args.extend(["--initrd".into(), "/kindling/initrd".into()]);
    }
    args.extend([
        "--cmdline".into(),
        config.cmdline.clone(),
        "--cpus".into(),
        config.cpus.to_string(),
        "--memory".into(),
        config.memory_mib.to_string(),
        "--runner".into(),
        "kvm".into(),
    ]);
    for (i, d) in config.disks.iter().enumerate() {
        let letter = (b'a' + i as u8) as char;
        args.extend(["--disk".into(), format!("/dev/vd{letter}{}", if d.read_only { ",ro" } else { "" })]);
    }
    if config.vsock.is_some() {
        args.extend(["--vsock".into(), L1_VSOCK_PATH.into()]);
    }
    // Always explicit: inside L1, `auto` would not know what the user was told here.
    args.extend(["--net".into(), net.map_or("none", NetKind::as_str).into()]);
    if host_loopback {
        args.push("--host-loopback".into());
    }
    args
}

/// What kindling does inside the level-1 VM: `kindling MODE ARGS`, with the files it
/// needs shipped in besides the guest's kernel and initrd.
#[derive(Clone, Debug)]
pub struct L1Job {
    /// The subcommand run inside L1: `boot` or `bench`.
    pub mode: &'static str,
    /// Its arguments, with paths as L1 sees them (the kernel is /kindling/kernel, the
    /// initrd /kindling/initrd, disks /dev/vda...).
    pub args: Vec<String>,
    /// Ship QEMU, its libraries and firmware in (the benchmark's peer).
    pub with_qemu: bool,
    /// Ship passt and its libraries in (a guest network through passt).
    pub with_passt: bool,
    /// Memory L1 needs besides the guest's and its own overhead (MiB).
    pub extra_memory_mib: u64,
    /// Give L1 outbound networking (QEMU user networking without `restrict`).
    pub network: bool,
    /// More files to ship in: (host path, path inside L1 under /kindling/, e.g.
    /// `firecracker` for /kindling/firecracker), made executable.
    pub files: Vec<(PathBuf, &'static str)>,
    /// Drives after the guest's disks: (host file, read-only): a snapshot to write or
    /// to restore.
    pub extra_drives: Vec<(PathBuf, bool)>,
    /// Ship the guest's kernel and initrd in (not for a restore).
    pub ship_kernel: bool,
}

impl L1Job {
    /// `kindling boot` of `config` inside L1, with a network of `net`.
    pub fn boot(config: &VmConfig, net: Option<NetKind>, host_loopback: bool) -> Self {
        L1Job {
            mode: "boot",
            args: l1_boot_args(config, net, host_loopback),
            with_qemu: false,
            with_passt: net == Some(NetKind::Passt),
            extra_memory_mib: 0,
            network: net.is_some(),
            files: Vec::new(),
            extra_drives: Vec::new(),
            ship_kernel: true,
        }
    }

    /// The L1 device name of the next extra drive, after `config`'s disks.
    fn next_drive(&self, config_disks: usize) -> String {
        let letter = (b'a' + (config_disks + self.extra_drives.len()) as u8) as char;
        format!("/dev/vd{letter}")
    }

    /// Makes `path` a drive the VMM in L1 writes its snapshot to (at SIGUSR1): a new
    /// sparse file as large as a snapshot of `config` can be.
    pub fn snapshot_to(&mut self, path: &Path, config: &VmConfig, resume: bool) -> Result<(), EmulatedError> {
        let size = kindling_vmm::snapshot::size_needed(SNAPSHOT_STATE_RESERVE, config.memory_mib << 20);
        // It will hold all of the guest's memory: the owner's alone.
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(io(format!("creating {}", path.display())))?;
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io(format!("restricting {}", path.display())))?;
        f.set_len(size).map_err(io(format!("sizing {}", path.display())))?;
        let dev = self.next_drive(config.disks.len());
        self.args.extend([
            "--snapshot-to".into(),
            dev,
            "--snapshot-then".into(),
            if resume { "resume" } else { "exit" }.into(),
        ]);
        self.extra_drives.push((path.to_path_buf(), false));
        Ok(())
    }

    /// Makes the VMM in L1 restore the snapshot `path` (read-only) instead of booting
    /// a kernel; `config` is the VM's, sized from the snapshot.
    pub fn restore(&mut self, path: &Path, config: &VmConfig) {
        let dev = self.next_drive(config.disks.len());
        // No kernel, initrd or command line: they are in the snapshot's memory; its
        // size and vCPUs are the snapshot's too.
        let mut args = Vec::new();
        let mut it = std::mem::take(&mut self.args).into_iter();
        while let Some(a) = it.next() {
            if matches!(a.as_str(), "--kernel" | "--initrd" | "--cmdline" | "--cpus" | "--memory") {
                it.next();
            } else {
                args.push(a);
            }
        }
        args.extend(["--restore".into(), dev]);
        self.args = args;
        self.extra_drives.push((path.to_path_buf(), true));
        self.ship_kernel = false;
    }
}

/// Room for the machine state in a snapshot drive (the state of a VM with many vCPUs
/// is well below it; the file is sparse, so the room costs nothing).
const SNAPSHOT_STATE_RESERVE: u64 = 6 << 20;

/// Removes the drive `--snapshot-to` made if no snapshot was written to it.
pub fn discard_unwritten_snapshot(path: &Path) {
    let mut magic = [0u8; 8];
    let written = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| magic == kindling_vmm::snapshot::MAGIC);
    if !written {
        let _ = std::fs::remove_file(path);
    }
}

/// The environment variables the kindling inside L1 takes from this side (the
/// seccomp mode, and the test that checks the filter kills).
const L1_ENV: &[&str] = &["KINDLING_SECCOMP", "KINDLING_TEST_SECCOMP_VIOLATION"];

/// The per-run part of L1's initramfs: kindling itself, the guest kernel/initrd, the
/// job and its arguments (and for a benchmark, QEMU with everything it loads).
fn run_archive(config: &VmConfig, job: &L1Job, token: &Token, exe: &Path, dest: &Path) -> std::io::Result<()> {
    let mut a = Archive::new(std::io::BufWriter::new(std::fs::File::create(dest)?));
    a.dir("kindling")?;
    a.file("kindling/kindling", 0o755, exe)?;
    if job.ship_kernel {
        a.file("kindling/kernel", 0o644, &config.kernel)?;
        if let Some(initrd) = &config.initrd {
            a.file("kindling/initrd", 0o644, initrd)?;
        }
    }
    if job.with_passt {
        add_passt_bundle(&mut a)?;
    }
    if job.with_qemu {
        add_qemu_bundle(&mut a)?;
    }
    for (src, name) in &job.files {
        a.file(&format!("kindling/{name}"), 0o755, src)?;
    }
    a.entry("kindling/mode", 0o100644, job.mode.as_bytes())?;
    a.entry(L1_TOKEN_FILE.trim_start_matches('/'), 0o100600, token.as_str().as_bytes())?;
    a.entry("kindling/args", 0o100644, job.args.join("\0").as_bytes())?;
    // Tests: hang the L1 side at this step (see l1watch::step).
    if let Ok(stall) = std::env::var("KINDLING_TEST_L1_STALL") {
        a.entry("kindling/test-stall", 0o100644, stall.as_bytes())?;
    }
    let filter = std::env::var("RUST_LOG").unwrap_or_default();
    a.entry("kindling/log-filter", 0o100644, filter.as_bytes())?;
    let env: String =
        L1_ENV.iter().filter_map(|name| Some(format!("{name}={}\n", std::env::var(name).ok()?))).collect();
    a.entry("kindling/env", 0o100644, env.as_bytes())?;
    a.finish()?.flush()
}

/// The files an ELF executable loads, from ldd: absolute paths (loader included).
fn shared_libraries(exe: &Path) -> std::io::Result<Vec<PathBuf>> {
    let ldd = Command::new("ldd").arg(exe).output()?;
    Ok(String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|line| {
            // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// passt (and its AVX2 build, which it execs when the CPU has AVX2) as /bin/passt, with
/// its libraries at the paths its loader expects (L1 has none of its own).
fn add_passt_bundle<W: Write>(a: &mut Archive<W>) -> std::io::Result<()> {
    let passt = which("passt").ok_or_else(|| std::io::Error::other("passt not found (apt-get install passt)"))?;
    a.file("bin/passt", 0o755, &passt)?;
    let avx2 = passt.with_file_name("passt.avx2");
    if avx2.is_file() {
        a.file("bin/passt.avx2", 0o755, &avx2)?;
    }
    for lib in shared_libraries(&passt)? {
        let rel = lib.to_string_lossy().trim_start_matches('/').to_string();
        let mut dir = String::new();
        for part in Path::new(&rel).parent().into_iter().flat_map(|p| p.components()) {
            dir = if dir.is_empty() {
                part.as_os_str().to_string_lossy().into()
            } else {
                format!("{dir}/{}", part.as_os_str().to_string_lossy())
            };
            a.dir(&dir)?;
        }
        a.file(&rel, 0o755, &lib)?;
    }
    Ok(())
}

/// QEMU's binary, its dynamic loader and libraries (from ldd) and the microvm firmware.
fn add_qemu_bundle<W: Write>(a: &mut Archive<W>) -> std::io::Result<()> {
    let qemu = which("qemu-system-x86_64").ok_or_else(|| std::io::Error::other("qemu-system-x86_64 not found"))?;
    let root = L1_QEMU_DIR.trim_start_matches('/');
    a.dir(root)?;
    a.dir(&format!("{root}/lib"))?;
    a.dir(&format!("{root}/share"))?;
    a.file(&format!("{root}/qemu-system-x86_64"), 0o755, &qemu)?;
    for lib in shared_libraries(&qemu)? {
        let name = lib.file_name().and_then(|n| n.to_str()).unwrap_or("lib");
        a.file(&format!("{root}/lib/{name}"), 0o755, &lib)?;
    }
    // pvh.bin: the option ROM that boots an ELF vmlinux (PVH entry).
    for fw in ["bios-microvm.bin", "linuxboot_dma.bin", "kvmvapic.bin", "pvh.bin"] {
        let p = Path::new("/usr/share/qemu").join(fw);
        if p.exists() {
            a.file(&format!("{root}/share/{fw}"), 0o644, &p)?;
        }
    }
    Ok(())
}

/// Maps QEMU's exit code back to kindling's exit status inside L1.
pub fn decode_exit(qemu_code: i32) -> Option<i32> {
    (qemu_code & 1 == 1 && qemu_code >> 1 >= STATUS_OFFSET).then(|| (qemu_code >> 1) - STATUS_OFFSET)
}

pub fn encode_status(status: i32) -> u8 {
    (status.clamp(0, 127 - STATUS_OFFSET) + STATUS_OFFSET) as u8
}

/// Where the benchmark's QEMU (binary, loader, libraries, firmware) lands inside L1.
pub const L1_QEMU_DIR: &str = "/kindling/qemu";

/// Set to 1 to keep `--cpus N` (N of 2 or more) under the emulated runner.
pub const SMP_ENV: &str = "KINDLING_EMULATED_SMP";

/// The vCPUs the emulated runner gives a guest asked to have `asked`, and, when that is
/// fewer, the warning that says why. QEMU 7.2's emulated nested SVM does not carry a
/// busy guest with 2 or more vCPUs: 11 of 12 2-vCPU node boots tried here failed within
/// 10-80 s (the guest's vCPU triple-faulted, the level-1 VM reset, or interrupts
/// between the guest's vCPUs were lost and RCU stalled), while 1-vCPU nodes get Ready
/// and pass the end-to-end tests. Short multi-vCPU boots do work, so `SMP_ENV=1` keeps
/// what was asked.
pub fn guest_cpus(asked: u32) -> (u32, Option<String>) {
    if asked <= 1 || std::env::var(SMP_ENV).is_ok_and(|v| v == "1") {
        return (asked, None);
    }
    let why = format!(
        "--cpus {asked}: the emulated runner gives the guest 1 vCPU; QEMU's emulated nested virtualization \
         crashes or stalls busy guests with more (set {SMP_ENV}=1 to keep {asked}, e.g. for a short boot)"
    );
    (1, Some(why))
}

/// Boots `config` in an L1 VM, with a guest network of `net` set up inside L1; returns
/// kindling's exit status from inside it. With a vsock device, its host socket and
/// `forwards` are served here, relayed into L1.
pub fn run(
    config: &VmConfig,
    net: Option<NetKind>,
    host_loopback: bool,
    forwards: &[Forward],
) -> Result<i32, EmulatedError> {
    run_job(config, &L1Job::boot(config, net, host_loopback), forwards)
}

/// How long after its own shutdown timeout the VMM in L1 has to end the level-1 VM
/// before this side stops QEMU.
pub const L1_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// The host's requests to a running level-1 VM, from any thread: an orderly stop (the
/// VMM in L1 asks its guest to shut down, through the relay), or a stop (QEMU gets
/// SIGTERM, flushes its disks and exits). A request made before the level-1 VM runs
/// is carried out once it does.
#[derive(Default)]
pub struct L1Control {
    /// The relay port and token, once the level-1 VM is starting.
    relay: std::sync::Mutex<Option<(u16, Token)>>,
    /// QEMU's pid once it runs.
    qemu: std::sync::Mutex<Option<u32>>,
    shutdown: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    /// The seccomp filter this process takes once QEMU runs.
    seccomp: Option<crate::sandbox::Programs>,
}

impl L1Control {
    /// A control whose process installs `programs` (on all its threads) once QEMU runs:
    /// from then on it only relays.
    pub fn with_seccomp(programs: crate::sandbox::Programs) -> Self {
        Self { seccomp: Some(programs), ..Self::default() }
    }

    /// Asks the VMM in L1 for its orderly stop (its guest shuts down in order).
    pub fn request_shutdown(&self) {
        self.shutdown.store(true, std::sync::atomic::Ordering::SeqCst);
        self.send_shutdown();
    }

    fn send_shutdown(&self) {
        let relay = self.relay.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some((port, token)) = relay {
            let _ = std::thread::Builder::new().name("l1-shutdown".into()).spawn(move || {
                if let Err(e) = relay::ask_shutdown(port, &token, std::time::Duration::from_secs(120)) {
                    tracing::warn!("asking the level-1 VM for an orderly stop: {e}");
                }
            });
        }
    }

    /// Asks the VMM in L1 for a snapshot (it has `--snapshot-to`).
    pub fn request_snapshot(&self) {
        let relay = self.relay.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match relay {
            Some((port, token)) => {
                let _ = std::thread::Builder::new().name("l1-snapshot".into()).spawn(move || {
                    if let Err(e) = relay::ask(port, &token, relay::SNAPSHOT, std::time::Duration::from_secs(120)) {
                        tracing::warn!("asking the level-1 VM for a snapshot: {e}");
                    }
                });
            }
            None => tracing::warn!("the level-1 VM is not running yet: no snapshot taken"),
        }
    }

    /// Stops the level-1 VM now.
    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(pid) = *self.qemu.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
        }
    }

    fn started(&self, relay_port: u16, token: Token, qemu: u32) {
        *self.relay.lock().unwrap_or_else(|e| e.into_inner()) = Some((relay_port, token));
        *self.qemu.lock().unwrap_or_else(|e| e.into_inner()) = Some(qemu);
        if self.shutdown.load(std::sync::atomic::Ordering::SeqCst) {
            self.send_shutdown();
        }
        if self.stop.load(std::sync::atomic::Ordering::SeqCst) {
            self.stop();
        }
    }
}

/// How long L1 may be silent before kindling looks for the stale-code loop (L1 writes a
/// heartbeat every 10 s; its kernel prints as it boots).
const NUDGE_AFTER: Duration = Duration::from_secs(30);
/// How often, at most, one level-1 VM gets its translations dropped.
const MAX_NUDGES: u32 = 5;

/// Tests: `KINDLING_TEST_L1_NUDGE=<step>` drops QEMU's translations once the level-1 VM
/// reports that step, on a healthy L1 (it must go on as if nothing happened).
fn test_nudge_step() -> Option<String> {
    std::env::var("KINDLING_TEST_L1_NUDGE").ok().filter(|s| !s.is_empty())
}

/// A free TCP port on the host's loopback (for QEMU's hostfwd).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The prefix of a run's work directory (in TMPDIR): its L1 initramfs, logs and sockets.
const WORK_PREFIX: &str = "kindling-l1-";
/// In a work directory: the file its run holds an flock on while it lives.
const WORK_OWNER: &str = "owner.lock";

/// Marks `dir` as in use for as long as the returned file is open: an flock on
/// [`WORK_OWNER`], taken before the name exists (so a sweep never sees it unlocked).
fn hold_work_dir(dir: &Path) -> std::io::Result<std::fs::File> {
    let tmp = dir.join(format!("{WORK_OWNER}.new"));
    let f = std::fs::File::create(&tmp)?;
    crate::util::lock_exclusive(&f, true)?;
    std::fs::rename(&tmp, dir.join(WORK_OWNER))?;
    Ok(f)
}

/// Removes the work directories in `tmp` that runs left behind: a SIGKILLed `kindling
/// boot` cannot remove its own (about 220 MiB each, mostly the initramfs), and dozens
/// filled a developer's disk. Only directories of this user (not symlinks) whose owner
/// lock nobody holds; returns how many went.
fn sweep_stale_work_dirs(tmp: &Path) -> usize {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let uid = nix::unistd::geteuid().as_raw();
    let Ok(entries) = std::fs::read_dir(tmp) else { return 0 };
    let mut removed = 0;
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(WORK_PREFIX) {
            continue;
        }
        let dir = e.path();
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() && m.uid() == uid => {}
            _ => continue,
        }
        let lock = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(dir.join(WORK_OWNER));
        let Ok(lock) = lock else { continue };
        if crate::util::lock_exclusive(&lock, false).unwrap_or(false) && std::fs::remove_dir_all(&dir).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Runs `job` for the guest `config` (its kernel, initrd, disks, vsock) in an L1 VM;
/// returns kindling's exit status from inside it.
pub fn run_job(config: &VmConfig, job: &L1Job, forwards: &[Forward]) -> Result<i32, EmulatedError> {
    run_job_with(config, job, forwards, &L1Control::default())
}

/// [`run_job`], taking the host's requests through `control`.
pub fn run_job_with(
    config: &VmConfig,
    job: &L1Job,
    forwards: &[Forward],
    control: &L1Control,
) -> Result<i32, EmulatedError> {
    let t0 = Instant::now();
    let qemu = which("qemu-system-x86_64").ok_or(EmulatedError::NoQemu)?;
    let l1 = find_l1_kernel()?;
    let exe = std::env::current_exe().map_err(io("locating the kindling executable"))?;
    if !is_static_elf(&exe).map_err(io(format!("reading {}", exe.display())))? {
        return Err(EmulatedError::NotStatic(exe));
    }
    let base = base_initramfs(&l1)?;
    let work = tempfile::Builder::new().prefix(WORK_PREFIX).tempdir().map_err(io("creating a temporary directory"))?;
    let _owner = hold_work_dir(work.path()).map_err(io("locking the level-1 work directory"))?;
    let swept = sweep_stale_work_dirs(&std::env::temp_dir());
    if swept > 0 {
        tracing::info!("emulated runner: removed {swept} work directories left by killed runs");
    }
    let initramfs = work.path().join("initramfs.cpio");
    let per_run = work.path().join("run.cpio");
    let token = Token::generate().map_err(io("making the relay's token"))?;
    run_archive(config, job, &token, &exe, &per_run).map_err(io("packing the guest kernel and initrd for L1"))?;
    concat(&[&base, &per_run], &initramfs).map_err(io("writing the L1 initramfs"))?;
    eprintln!(
        "kindling: emulated runner: level-1 initramfs ready in {:.1}s (L1 kernel {})",
        t0.elapsed().as_secs_f64(),
        l1.dir.display()
    );

    let l1_mem = config.memory_mib + L1_OVERHEAD_MIB + job.extra_memory_mib;
    // The relay: QEMU forwards a free host port to L1's relay port, which carries the
    // guest's vsock (when it has one) and the host's requests. With a guest network, L1
    // needs outbound networking as well.
    let mut relay = None;
    let restrict = if job.network { "off" } else { "on" };
    let port = free_port().map_err(io("picking a port for the relay"))?;
    if let Some(vsock) = &config.vsock {
        if std::os::unix::net::UnixStream::connect(&vsock.uds_path).is_ok() {
            return Err(EmulatedError::VsockInUse(vsock.uds_path.clone()));
        }
        relay = Some(
            HostRelay::start(&vsock.uds_path, port, token.clone())
                .map_err(io(format!("serving {}", vsock.uds_path.display())))?,
        );
        crate::forward::start(forwards, &vsock.uds_path)?;
    }
    let netdev =
        Some(format!("user,id=relay,restrict={restrict},hostfwd=tcp:127.0.0.1:{port}-10.0.2.15:{L1_RELAY_PORT}"));
    if job.network {
        eprintln!(
            "kindling: emulated runner: the guest's network is set up inside the level-1 VM; its outside is QEMU user networking, where 10.0.2.2 is this host's loopback{}",
            if job.with_passt { "" } else { " (no iptables in L1: no NAT there; L1 routes the guest subnet to QEMU, which proxies every connection)" }
        );
    }
    // KINDLING_L1_CPU overrides the level-1 CPU model (for diagnosing emulation issues).
    let cpu = std::env::var("KINDLING_L1_CPU").unwrap_or_else(|_| L1_CPU.to_string());
    // At least two L1 vCPUs: kindling's device thread (disk I/O) then runs beside a
    // single guest vCPU instead of taking turns with it.
    let l1_cpus = config.cpus.max(2);
    let qemu_command = |l1_log: &Path, qmp: &Path, gdb: &Path| {
        let mut cmd = Command::new(&qemu);
        if let Some(n) = &netdev {
            cmd.args(["-netdev", n, "-device", "virtio-net-pci,netdev=relay,romfile="]);
        }
        cmd.args(["-M", "q35,accel=tcg", "-cpu", &cpu])
            .args(["-smp", &l1_cpus.to_string(), "-m", &format!("{l1_mem}M")])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            // QEMU's own seccomp sandbox: no exec or fork, no privilege changes, no
            // obsolete system calls, no scheduler or resource changes. The guest (and the
            // level-1 VM) reach QEMU's device emulation; this bounds what a hole there gets.
            .args(["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"])
            .args(["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"])
            .args(["-device", &format!("isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=0x04")])
            .arg("-kernel")
            .arg(l1.vmlinuz())
            .arg("-initrd")
            .arg(&initramfs)
            // ttyS1, L1's kernel console and progress channel, goes to a file the watch
            // follows; QMP answers where the vCPUs are when L1 stalls.
            .args([
                "-chardev",
                &format!("file,id=l1log,path={},append=on", qemu_escape(l1_log)),
                "-serial",
                "chardev:l1log",
            ])
            .args(["-qmp", &format!("unix:{},server=on,wait=off", qemu_escape(qmp))])
            // The gdbstub, only ever used to make QEMU drop stale translations (see
            // l1watch::drop_translations); its socket, like QMP's, is in this private
            // directory.
            .args(["-gdb", &format!("unix:{},server=on,wait=off", qemu_escape(gdb))])
            // nokaslr: a stalled vCPU's RIP maps onto System.map.
            .args(["-append", "console=ttyS1 loglevel=6 panic=-1 tsc=reliable nokaslr"]);
        for d in &config.disks {
            let mut spec = format!("file={},if=virtio,format=raw,cache=writeback,discard=unmap", qemu_escape(&d.path));
            if d.read_only {
                spec.push_str(",readonly=on");
            }
            cmd.arg("-drive").arg(spec);
        }
        for (path, read_only) in &job.extra_drives {
            // Zero pages the VMM skips or zeroes stay holes in the host's file.
            let mut spec = format!(
                "file={},if=virtio,format=raw,cache=writeback,discard=unmap,detect-zeroes=unmap",
                qemu_escape(path)
            );
            if *read_only {
                spec.push_str(",readonly=on");
            }
            cmd.arg("-drive").arg(spec);
        }
        // The level-1 VM ends with this process, however it ends: killed, QEMU (and the
        // guest in it) would otherwise run on, unseen, taking the machine's CPUs. SIGTERM
        // lets QEMU flush its disks, and QEMU must not inherit this process's blocked
        // SIGTERM. The thread that forks waits for QEMU here, so the parent-death signal
        // cannot fire early.
        // SAFETY: prctl is a plain system call, async-signal-safe between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                crate::util::unblock_all_signals()?;
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        cmd
    };
    eprintln!("kindling: emulated runner: starting the level-1 VM (QEMU TCG, {l1_cpus} vCPUs, {l1_mem} MiB)");
    let bound = l1watch::stall_bound();
    let mut sandboxed = false;
    let mut attempt = 1;
    let test_nudge = test_nudge_step();
    let (status, watch) = 'attempts: loop {
        let l1_log = work.path().join(format!("l1-{attempt}.log"));
        let qmp = work.path().join(format!("qmp-{attempt}.sock"));
        let gdb = work.path().join(format!("gdb-{attempt}.sock"));
        let watch = Watch::start(&l1_log).map_err(io("following the level-1 VM's log"))?;
        let mut child = qemu_command(&l1_log, &qmp, &gdb).spawn().map_err(io("starting qemu-system-x86_64"))?;
        control.started(port, token.clone(), child.id());
        // How many times, in this silence, the stale translations were dropped.
        let mut nudged_at: Option<Duration> = None;
        let mut nudges = 0;
        let status = loop {
            if let Some(status) = child.try_wait().map_err(io("waiting for qemu-system-x86_64"))? {
                break status;
            }
            // This process takes its seccomp filter when the guest is about to run
            // (from then on it only relays): until then it may still have to start
            // the level-1 VM again, and nothing of the guest has run.
            if !sandboxed && watch.reached("vm-run") {
                sandboxed = true;
                if let Some(programs) = &control.seccomp {
                    if let Err(e) = crate::sandbox::install_all_threads(programs, "relay") {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(EmulatedError::Io {
                            what: "installing the seccomp filter".into(),
                            err: std::io::Error::other(e),
                        });
                    }
                }
            }
            let silent = watch.silent_for();
            if silent < NUDGE_AFTER {
                nudged_at = None;
            } else if nudges < MAX_NUDGES && nudged_at.is_none_or(|t| silent >= t + NUDGE_AFTER) && silent < bound {
                // L1 has gone quiet: when its vCPUs loop on stale code, have QEMU
                // drop its translations; L1 then goes on where it was.
                nudged_at = Some(silent);
                let report = l1watch::vcpu_report(&qmp, l1.system_map().as_deref());
                if let Some(addr) = report.stale_code_loop() {
                    nudges += 1;
                    match l1watch::drop_translations(&gdb, &qmp, addr) {
                        Ok(()) => tracing::warn!(
                            "the level-1 VM was looping on stale code at {addr:#x} (QEMU's TCG ran an old \
                             translation of code the L1 kernel had patched; {report}); QEMU dropped its \
                             translations and L1 goes on"
                        ),
                        Err(e) => tracing::warn!(
                            "the level-1 VM is looping on stale code at {addr:#x}; making QEMU drop its \
                             translations failed: {e}"
                        ),
                    }
                }
            }
            if let Some(step) = &test_nudge {
                if nudges == 0 && watch.reached(step) {
                    // Tests: the translation drop at a step, on a healthy L1.
                    nudges += 1;
                    let addr = l1watch::symbol_address(l1.system_map().as_deref(), "do_idle").unwrap_or(0);
                    match l1watch::drop_translations(&gdb, &qmp, addr) {
                        Ok(()) => eprintln!("kindling: test: QEMU dropped its translations at {addr:#x}"),
                        Err(e) => eprintln!("kindling: test: dropping translations at {addr:#x} failed: {e}"),
                    }
                }
            }
            if silent > bound {
                let stall = watch.stall(&l1watch::vcpu_report(&qmp, l1.system_map().as_deref()));
                let _ = child.kill();
                let _ = child.wait();
                // Before the guest runs nothing of it has happened: start L1 again,
                // once. (After, kindling start retries the whole boot.)
                if attempt == 1 && !watch.reached("vm-run") {
                    tracing::warn!("{stall}");
                    eprintln!(
                        "kindling: emulated runner: the level-1 VM stalled before the guest started (last step: {}); starting it again",
                        stall.last_step
                    );
                    attempt += 1;
                    continue 'attempts;
                }
                return Err(EmulatedError::Stalled(Box::new(stall)));
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        break (status, watch);
    };
    watch.settle();
    drop(relay);
    let code = status.code().ok_or(EmulatedError::Killed)?;
    tracing::debug!("level-1 VM exited with {code} after {:?}", t0.elapsed());
    decode_exit(code).ok_or(EmulatedError::NoStatus(code))
}

/// Inside L1 (`kindling __l1-guest`, exec'd by /init): runs the job (`boot` or `bench`,
/// from /kindling/mode) with its arguments on L1's KVM and reports the exit status to
/// the host through QEMU's isa-debug-exit port.
pub fn l1_guest_main(run: impl FnOnce(&str, Vec<String>) -> i32) -> ! {
    // Before any thread starts: `kindling boot` takes SIGTERM (its orderly stop) with
    // sigwait, and here it is PID 1, for which the kernel discards a signal that a
    // thread leaves unblocked with its default action.
    let mut term = nix::sys::signal::SigSet::empty();
    term.add(nix::sys::signal::Signal::SIGTERM);
    term.add(nix::sys::signal::Signal::SIGUSR1);
    let _ = term.thread_block();
    for line in std::fs::read_to_string("/kindling/env").unwrap_or_default().lines() {
        if let Some((name, value)) = line.split_once('=').filter(|(name, _)| L1_ENV.contains(name)) {
            std::env::set_var(name, value);
        }
    }
    l1watch::step("kindling");
    l1watch::start_heartbeat();
    let mode = std::fs::read_to_string("/kindling/mode").unwrap_or_else(|_| "boot".into());
    let status = match std::fs::read("/kindling/args") {
        Ok(raw) => {
            let args: Vec<String> = String::from_utf8_lossy(&raw).split('\0').map(str::to_owned).collect();
            wait_for_disks(&args);
            l1watch::step("disks");
            let vsock = args.iter().any(|a| a == "--vsock").then_some(L1_VSOCK_PATH);
            match std::fs::read_to_string(L1_TOKEN_FILE).ok().as_deref().and_then(Token::parse) {
                // An orderly stop asked for through the relay is this VMM's SIGTERM.
                // A snapshot asked for through the relay is its SIGUSR1.
                Some(token) => relay::serve_in_l1(
                    L1_RELAY_PORT,
                    token,
                    vsock,
                    || {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGTERM);
                    },
                    || {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGUSR1);
                    },
                ),
                None => eprintln!("kindling-l1: relay: no token in {L1_TOKEN_FILE}; the host cannot reach this VM"),
            }
            run(mode.trim(), args)
        }
        Err(e) => {
            eprintln!("kindling-l1: cannot read /kindling/args: {e}");
            1
        }
    };
    report_status(status);
    // Not reached when QEMU honours the write; power off so QEMU exits anyway.
    // SAFETY: plain reboot(2) syscall.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    std::process::exit(status)
}

/// virtio_blk probes asynchronously: give L1's /dev/vdX nodes a moment to appear.
fn wait_for_disks(args: &[String]) {
    let disks: Vec<PathBuf> = args
        .windows(2)
        .filter(|w| matches!(w[0].as_str(), "--disk" | "--restore" | "--snapshot-to"))
        .map(|w| PathBuf::from(w[1].trim_end_matches(",ro")))
        .collect();
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    while !disks.iter().all(|d| d.exists()) && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn report_status(status: i32) {
    let value = encode_status(status);
    // The console is a UART: wait until everything written has left it, or QEMU exits
    // with the last lines (usually the error) still queued.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    // SAFETY: tcdrain on the standard descriptors; no memory is passed.
    unsafe {
        libc::tcdrain(libc::STDOUT_FILENO);
        libc::tcdrain(libc::STDERR_FILENO);
    }
    if let Err(e) = grant_exit_port() {
        eprintln!("kindling-l1: ioperm failed: {e}");
        return;
    }
    // SAFETY: the debug-exit port is granted to this thread (above, or before the VMM
    // dropped root); the `out` touches only that port, which QEMU implements.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") DEBUG_EXIT_PORT, in("al") value, options(nomem, nostack));
    }
}

/// Whether this thread holds the debug-exit port (see [`grant_exit_port`]).
static EXIT_PORT_GRANTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Inside L1, on the main thread: grants it the debug-exit port (ioperm needs
/// CAP_SYS_RAWIO), once; the VMM does it before it drops root, so that the exit status
/// can still be reported after. The grant is the thread's and outlives the drop.
pub fn grant_exit_port() -> std::io::Result<()> {
    use std::sync::atomic::Ordering;
    if EXIT_PORT_GRANTED.load(Ordering::SeqCst) {
        return Ok(());
    }
    // SAFETY: ioperm changes this thread's I/O permission bitmap; no memory is passed.
    if unsafe { libc::ioperm(u64::from(DEBUG_EXIT_PORT), 4, 1) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    EXIT_PORT_GRANTED.store(true, Ordering::SeqCst);
    Ok(())
}

/// QEMU's -drive option separates with commas; a literal comma is doubled.
fn qemu_escape(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

fn concat(parts: &[&Path], dest: &Path) -> std::io::Result<()> {
    let mut out = std::fs::File::create(dest)?;
    for p in parts {
        std::io::copy(&mut std::fs::File::open(p)?, &mut out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_removes_work_dirs_nobody_holds_and_keeps_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let mk = |name: &str| {
            let d = tmp.path().join(name);
            std::fs::create_dir(&d).unwrap();
            d
        };
        let live = mk("kindling-l1-live");
        let _held = hold_work_dir(&live).unwrap();
        let dead = mk("kindling-l1-dead");
        drop(hold_work_dir(&dead).unwrap());
        std::fs::write(dead.join("initramfs.cpio"), b"big").unwrap();
        let unmarked = mk("kindling-l1-old-version");
        let other = mk("something-else");
        std::fs::write(other.join(WORK_OWNER), b"").unwrap();
        // A symlink to a dead run's directory elsewhere is not followed.
        let elsewhere = tempfile::tempdir().unwrap();
        drop(hold_work_dir(elsewhere.path()).unwrap());
        std::os::unix::fs::symlink(elsewhere.path(), tmp.path().join("kindling-l1-link")).unwrap();

        assert_eq!(sweep_stale_work_dirs(tmp.path()), 1);
        assert!(!dead.exists());
        assert!(live.join(WORK_OWNER).exists() && unmarked.exists() && other.exists());
        assert!(elsewhere.path().join(WORK_OWNER).exists());
        assert_eq!(sweep_stale_work_dirs(tmp.path()), 0);
    }

    #[test]
    fn busy_guests_get_one_vcpu_unless_smp_is_asked_for() {
        assert_eq!(guest_cpus(1), (1, None));
        let (n, why) = guest_cpus(4);
        assert_eq!(n, 1);
        assert!(why.unwrap().contains("--cpus 4: the emulated runner gives the guest 1 vCPU; QEMU"));
        std::env::set_var(SMP_ENV, "1");
        assert_eq!(guest_cpus(4), (4, None));
        std::env::remove_var(SMP_ENV);
    }

    #[test]
    fn exit_status_round_trips_and_qemu_errors_do_not_decode() {
        for s in [0, 1, 2, 100] {
            let qemu_code = (i32::from(encode_status(s)) << 1) | 1;
            assert_eq!(decode_exit(qemu_code), Some(s));
        }
        assert_eq!(decode_exit(0), None, "L1 powered off without a status");
        assert_eq!(decode_exit(1), None, "QEMU's own error exit");
    }

    #[test]
    fn l1_args_map_disks_to_virtio_drives() {
        let config = VmConfig {
            kernel: "/k".into(),
            initrd: None,
            cmdline: "console=ttyS0 a=b".into(),
            cpus: 2,
            memory_mib: 256,
            disks: vec![
                kindling_vmm::config::DiskConfig { path: "/x.img".into(), read_only: false },
                kindling_vmm::config::DiskConfig { path: "/y,z.img".into(), read_only: true },
            ],
            vsock: None,
            net: None,
        };
        let args = l1_boot_args(&config, None, false);
        assert!(args.windows(2).any(|w| w == ["--disk", "/dev/vda"]));
        assert!(args.windows(2).any(|w| w == ["--disk", "/dev/vdb,ro"]));
        assert!(args.windows(2).any(|w| w == ["--cmdline", "console=ttyS0 a=b"]));
        assert!(args.windows(2).any(|w| w == ["--net", "none"]), "the network choice is explicit inside L1");
        assert_eq!(qemu_escape(Path::new("/y,z.img")), "/y,,z.img");
    }

    #[test]
    fn snapshot_drives_follow_the_disks_and_a_restore_boots_no_kernel() {
        let d = tempfile::tempdir().unwrap();
        let config = VmConfig {
            kernel: "/k".into(),
            initrd: Some("/i".into()),
            cmdline: "console=ttyS0".into(),
            cpus: 1,
            memory_mib: 64,
            disks: vec![kindling_vmm::config::DiskConfig { path: "/x.img".into(), read_only: false }],
            vsock: None,
            net: None,
        };
        let mut job = L1Job::boot(&config, None, false);
        let to = d.path().join("to.snap");
        job.snapshot_to(&to, &config, false).unwrap();
        job.restore(Path::new("/from.snap"), &config);
        assert!(job.args.windows(2).any(|w| w == ["--snapshot-to", "/dev/vdb"]), "{:?}", job.args);
        assert!(job.args.windows(2).any(|w| w == ["--restore", "/dev/vdc"]), "{:?}", job.args);
        for gone in ["--kernel", "--initrd", "--cmdline", "--cpus", "--memory"] {
            assert!(!job.args.iter().any(|a| a == gone), "{gone} with --restore: {:?}", job.args);
        }
        assert!(!job.ship_kernel);
        assert_eq!(job.extra_drives, vec![(to.clone(), false), (PathBuf::from("/from.snap"), true)]);
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&to).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), kindling_vmm::snapshot::size_needed(SNAPSHOT_STATE_RESERVE, 64 << 20));
        discard_unwritten_snapshot(&to);
        assert!(!to.exists(), "a drive no snapshot was written to is removed");
    }

    #[test]
    fn static_detection() {
        assert!(!is_static_elf(Path::new("/bin/sh")).unwrap(), "Debian's /bin/sh is dynamically linked");
        assert!(is_static_elf(&std::env::current_exe().unwrap()).unwrap(), "tests are built crt-static too");
    }
}
