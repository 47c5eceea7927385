//! `kindling boot`: one microVM in the foreground.
//!
//! An orderly stop on the KVM runner: SIGTERM (and SIGINT when stdin is not a
//! terminal; on a terminal the console is raw and Ctrl-C belongs to the guest) asks the
//! guest to shut down with Ctrl-Alt-Del, then waits up to `--shutdown-timeout` seconds
//! for it to power off or reboot before stopping the VM anyway (a second signal stops
//! it at once). Either way the disks are flushed, the vsock socket removed, and the exit
//! status is 0. The signals are blocked in every thread before any is started and taken
//! by one thread with sigwait, which only sets a flag and writes an eventfd the VMM's
//! event loop watches: no code runs in a signal handler, and a signal that arrives
//! before the VM runs is acted on when it does. Inside the emulated runner's level-1 VM
//! this is the code that runs (there kindling is PID 1, which is why the signals must be
//! blocked rather than left to a default action that init never gets).
//!
//! Run as root (`--net tap` needs it for the tap), the VMM drops root once the VM is
//! built, before its seccomp filters go in and the guest runs (see
//! [`crate::privileges`]).
//!
//! Snapshots, as Firecracker users know them, without an API socket: with
//! `--snapshot-to FILE`, SIGUSR1 pauses the VM, writes its snapshot to FILE (one file:
//! state and sparse memory, synced) and ends the VM (`--snapshot-then resume` keeps it
//! running). `--restore FILE` starts the VM from such a file instead of a kernel; the
//! host resources (disks, --vsock, --net) are given again and must match what the
//! snapshot was taken with. Under the emulated runner the file is a virtio disk of the
//! level-1 VM, so the snapshot is written to (and restored from) this host's file.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use kindling_proto::cmdline::NetParams;
use kindling_proto::exit;
use kindling_proto::forward::Forward;
use kindling_vmm::builder::{AfterSnapshot, Console, HostResources, MicroVm, RestoreClock, VmControl};
use kindling_vmm::config::{DiskConfig, NetConfig, VmConfig, VsockConfig};
use kindling_vmm::devices::virtio::net::Backend;
use kindling_vmm::devices::ExitReason;
use nix::sys::signal::{SigSet, Signal};

use crate::sandbox;

use crate::hostnet::{self, NetChoice, NetKind};
use crate::runner::{self, emulated, l1watch, Runner, RunnerKind};

#[derive(Debug, Clone, Args)]
pub struct BootArgs {
    /// Guest kernel: a bzImage (vmlinuz) or an ELF vmlinux (not with --restore).
    #[arg(long, value_name = "PATH", required_unless_present = "restore", conflicts_with = "restore")]
    pub kernel: Option<PathBuf>,
    /// initramfs archive handed to the kernel.
    #[arg(long, value_name = "PATH", conflicts_with = "restore")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; kindling appends its virtio-mmio device entries.
    /// Default: "console=ttyS0 panic=1", plus "root=/dev/vda rw" when a disk is given.
    #[arg(long, value_name = "STR", conflicts_with = "restore")]
    pub cmdline: Option<String>,
    /// Number of vCPUs (the emulated runner gives the guest 1; KINDLING_EMULATED_SMP=1
    /// keeps N).
    #[arg(long, value_name = "N", default_value_t = 1, conflicts_with = "restore")]
    pub cpus: u32,
    /// Guest memory in MiB (with --restore: the snapshot's).
    #[arg(long, value_name = "MIB", default_value_t = 512, conflicts_with = "restore")]
    pub memory: u64,
    /// A raw disk image as a virtio-blk device, in order /dev/vda, /dev/vdb, ...;
    /// append ",ro" for read-only.
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    pub disks: Vec<String>,
    /// A virtio-vsock device (guest CID 3) whose host side is the UNIX socket PATH.
    /// Host programs connect to PATH and send "CONNECT <port>\n" to reach a guest port;
    /// the guest's connections to host port N go to PATH_N.
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,
    /// Forward host TCP connections to a guest port over vsock: [ADDR:]HOSTPORT:GUESTPORT
    /// (ADDR defaults to 127.0.0.1), or a range A-B:C-D. Repeatable. Without --vsock, a
    /// private vsock socket is made for it.
    #[arg(long = "forward", value_name = "[ADDR:]HOST:GUEST")]
    pub forwards: Vec<Forward>,
    /// Let the guest ask for host ports: it lists `HOSTPORT GUESTPORT` lines on vsock
    /// port 1025, and 127.0.0.1:HOSTPORT (1024 and up, at most 32) is forwarded to
    /// guest port GUESTPORT while listed. A cluster's node lists its LoadBalancer
    /// Services there. Without --vsock, a private vsock socket is made for it.
    #[arg(long)]
    pub guest_forwards: bool,
    /// The guest's network (virtio-net): tap (root: a tap device with NAT), passt
    /// (user-mode, no root), none, or auto: tap when root with /dev/net/tun, else passt
    /// when installed, else none. The guest's address, gateway and DNS server are
    /// appended to the kernel command line (kindling.ip= kindling.gw= kindling.dns=).
    #[arg(long, value_enum, value_name = "auto|tap|passt|none", default_value_t = NetChoice::Auto)]
    pub net: NetChoice,
    /// Let the guest reach this host's loopback services through its gateway (passt's
    /// gateway mapping; under the emulated runner QEMU's 10.0.2.2). Off by default:
    /// other clusters' API forwards and your local services listen there.
    #[arg(long)]
    pub host_loopback: bool,
    /// Send the console and the VMM's messages to PATH instead of stdout and stderr,
    /// rotated to PATH.1 at --console-log-max (the daemon's VMs use it).
    #[arg(long, value_name = "PATH")]
    pub console_log: Option<PathBuf>,
    /// The cap of --console-log's file (and of PATH.1), in MiB.
    #[arg(long, value_name = "MIB", default_value_t = crate::logfile::DEFAULT_MAX_MIB)]
    pub console_log_max: u64,
    /// Where the VM runs: auto picks KVM when it can boot a stock kernel here.
    #[arg(long, value_parser = runner::runner_arg(), default_value = "auto")]
    pub runner: RunnerKind,
    /// On SIGTERM (or SIGINT when stdin is not a terminal) the guest is asked to shut
    /// down (Ctrl-Alt-Del) and given this many seconds before the VM is stopped anyway;
    /// either way the disks are flushed and kindling exits with 0. At most a day.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_SHUTDOWN_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(0..=MAX_SHUTDOWN_TIMEOUT_SECS))]
    pub shutdown_timeout: u64,
    /// On SIGUSR1, pause the VM and write a snapshot of it to FILE (replaced if it
    /// exists), then end the VM (exit status 0) or, with `--snapshot-then resume`, let it
    /// run on. Under the emulated runner FILE is made at its full (sparse) size when the
    /// VM starts, and removed again if no snapshot was written.
    #[arg(long, value_name = "FILE")]
    pub snapshot_to: Option<PathBuf>,
    /// What the VM does after a snapshot: exit or resume.
    #[arg(long, value_enum, value_name = "exit|resume", default_value_t = SnapshotThen::Exit, requires = "snapshot_to")]
    pub snapshot_then: SnapshotThen,
    /// Start the VM from a snapshot FILE (from --snapshot-to) instead of booting a kernel:
    /// its memory size and vCPUs come from the snapshot; --disk, --vsock and --net must
    /// be the devices it was taken with (disks of the same sizes and modes, in order).
    /// FILE must stay in place while the VM runs: memory is read from it as the guest
    /// touches it.
    #[arg(long, value_name = "FILE")]
    pub restore: Option<PathBuf>,
    /// With --restore: the guest's clocks move on by the time the snapshot was away
    /// (`advance`: its wall clock is right, and every timer that fell due meanwhile
    /// fires at once), or go on from the snapshot's moment (`keep`: to the guest no time
    /// passed; something in it sets its wall clock, as kindling's node agent does).
    #[arg(long, value_enum, value_name = "advance|keep", default_value_t = RestoreClockArg::Advance, requires = "restore")]
    pub restore_clock: RestoreClockArg,
    /// (internal) With --restore: read these ranges of the snapshot (OFFSET:LENGTH,...)
    /// once in the background, so the guest's first touches find its memory cached. The
    /// emulated runner passes the data ranges of the host's sparse file to the VMM in
    /// the level-1 VM, whose snapshot drive cannot say where its holes are.
    #[arg(long, value_name = "EXTENTS", hide = true, requires = "restore")]
    pub restore_prefetch: Option<String>,
}

/// `--restore-clock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RestoreClockArg {
    /// The clocks move on by the time away.
    Advance,
    /// The clocks go on from the snapshot's moment.
    Keep,
}

impl RestoreClockArg {
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreClockArg::Advance => "advance",
            RestoreClockArg::Keep => "keep",
        }
    }
}

impl From<RestoreClockArg> for RestoreClock {
    fn from(c: RestoreClockArg) -> Self {
        match c {
            RestoreClockArg::Advance => RestoreClock::Advance,
            RestoreClockArg::Keep => RestoreClock::Keep,
        }
    }
}

/// `--snapshot-then`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SnapshotThen {
    /// The VM ends once its snapshot is written.
    Exit,
    /// The VM runs on.
    Resume,
}

impl From<SnapshotThen> for AfterSnapshot {
    fn from(t: SnapshotThen) -> Self {
        match t {
            SnapshotThen::Exit => AfterSnapshot::Exit,
            SnapshotThen::Resume => AfterSnapshot::Resume,
        }
    }
}

/// How long an orderly stop waits for the guest by default.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 60;
/// The longest `--shutdown-timeout` (a day), which keeps the deadline arithmetic in range.
pub const MAX_SHUTDOWN_TIMEOUT_SECS: u64 = 86_400;

impl BootArgs {
    /// The VM these arguments describe, validated; without its network device, which
    /// [`run`] adds once the runner and the backend are chosen.
    pub fn to_config(&self) -> anyhow::Result<VmConfig> {
        let disks = self.disks.iter().map(|d| DiskConfig::parse(d)).collect::<Result<Vec<_>, _>>()?;
        let mut config = VmConfig {
            kernel: self.kernel.clone().unwrap_or_default(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone().unwrap_or_else(|| VmConfig::default_cmdline(!self.disks.is_empty())),
            cpus: self.cpus,
            memory_mib: self.memory,
            disks,
            vsock: self.vsock.clone().map(VsockConfig::new),
            net: None,
        };
        if let Some(path) = &self.restore {
            // The snapshot says how large the VM is; its kernel is in its memory.
            let header = snapshot_header(path)?;
            config.memory_mib = header.memory_mib;
            config.cpus = header.vcpus;
            kindling_vmm::config::check_size(config.cpus, config.memory_mib)?;
            return Ok(config);
        }
        config.validate()?;
        Ok(config)
    }
}

/// The header of the snapshot at `path`, or why it is not a usable snapshot.
pub fn snapshot_header(path: &Path) -> anyhow::Result<kindling_vmm::snapshot::Header> {
    let mut f = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("--restore {}: {e}", path.display()))?;
    let (header, _) =
        kindling_vmm::snapshot::read(&mut f).map_err(|e| anyhow::anyhow!("--restore {}: {e}", path.display()))?;
    Ok(header)
}

/// `config` with a network device, its command line carrying the guest's addresses
/// `guest` (at their longest when the network is not set up yet).
pub fn with_network(config: &VmConfig, guest: Option<&NetParams>) -> VmConfig {
    let mut c = config.clone();
    c.cmdline.push_str(&guest.unwrap_or(&NetParams::LONGEST).args(&config.cmdline));
    c.net = Some(NetConfig { mac: hostnet::guest_mac() });
    c
}

/// Runs the boot; returns the process exit status.
pub fn run(args: &BootArgs) -> anyhow::Result<i32> {
    // First, before any thread exists (the console log's is the first): one thread
    // takes the stop signals, and every later thread inherits the mask.
    let mut signals = stop_signals(std::io::stdin().is_terminal());
    if args.snapshot_to.is_some() {
        signals.add(Signal::SIGUSR1);
    }
    signals.thread_block()?;
    if let Some(path) = &args.console_log {
        crate::logfile::capture_output(path, args.console_log_max << 20)
            .map_err(|e| anyhow::anyhow!("--console-log {}: {e}", path.display()))?;
    }
    let mut config = args.to_config()?;
    // Forwards travel over vsock: give the VM a private socket when none was asked for.
    let private = tempfile::Builder::new().prefix("kindling-vsock-").tempdir()?;
    if (!args.forwards.is_empty() || args.guest_forwards) && config.vsock.is_none() {
        config.vsock = Some(VsockConfig::new(private.path().join("vsock.sock")));
    }
    let (runner, why) = runner::choose(args.runner);
    let (net, net_why) = hostnet::choose(args.net, runner == Runner::Emulated)?;
    // Checked again with the network: its device and the guest's addresses lengthen
    // the command line.
    if net.is_some() && args.restore.is_none() {
        with_network(&config, None).validate()?;
    }
    // A snapshot with other devices is refused here, before a level-1 VM is started
    // for it (the VMM checks again, with the CPU, before it builds anything).
    if let Some(path) = &args.restore {
        let devices = if net.is_some() { with_network(&config, None) } else { config.clone() };
        let ids = kindling_vmm::builder::device_identities(&devices)?;
        snapshot_header(path)?.check_devices(&ids).map_err(|e| anyhow::anyhow!("--restore {}: {e}", path.display()))?;
    }
    // Both runners: the follower asks the vsock socket every 2 s and waits out the time
    // before it answers (the VMM, or under the emulated runner the relay, makes it later).
    if let (true, Some(v)) = (args.guest_forwards, &config.vsock) {
        crate::forward::follow_guest(&v.uds_path)?;
    }
    eprintln!("kindling: runner {} ({why})", runner.as_str());
    eprintln!("kindling: net {} ({net_why})", net.map_or("none", NetKind::as_str));
    match runner {
        Runner::Kvm => {
            let control = Arc::new(VmControl::new()?);
            let (ask, stop, snap) = (control.clone(), control.clone(), control.clone());
            let (snapshot_to, then) = (args.snapshot_to.clone(), args.snapshot_then.into());
            start_signal_thread(
                signals,
                Duration::from_secs(args.shutdown_timeout),
                move || ask.request_shutdown(),
                move || stop.stop(),
                move || {
                    if let Some(path) = &snapshot_to {
                        snap.snapshot(path.clone(), then);
                    }
                },
            )?;
            let mut backend = None;
            if let Some(kind) = net {
                l1watch::step("net-setup");
                let host = hostnet::setup(kind, args.host_loopback)?;
                tracing::info!("net: {}", host.summary);
                config = with_network(&config, Some(&host.guest));
                backend = Some(host.backend);
            }
            if let Some(v) = &config.vsock {
                crate::forward::start(&args.forwards, &v.uds_path)?;
            }
            let later = LaterWrites {
                vsock: config.vsock.as_ref().map(|v| v.uds_path.clone()),
                // The private socket's directory is kindling's; so is L1's /kindling.
                vsock_dir_is_ours: config.vsock.as_ref().is_some_and(|v| v.uds_path.starts_with(private.path()))
                    || crate::util::inside_l1(),
                console_log: args.console_log.clone(),
                snapshot_to: args.snapshot_to.clone(),
            };
            let prefetch = restore_prefetch(args)?;
            boot_on_kvm(
                &config,
                args.restore.as_deref(),
                args.restore_clock.into(),
                prefetch,
                backend,
                &control,
                &later,
            )
        }
        Runner::Emulated => {
            // A restore keeps the snapshot's vCPUs (they are in its state).
            let (cpus, clamped) =
                if args.restore.is_some() { (config.cpus, None) } else { emulated::guest_cpus(config.cpus) };
            if let Some(warning) = clamped {
                eprintln!("kindling: {warning}");
                config.cpus = cpus;
            }
            // The VMM inside the level-1 VM does the orderly stop: it gets the timeout,
            // and the request through the relay; this side stops QEMU only when that
            // VMM has not ended the level-1 VM a while after its own timeout.
            let mut job = emulated::L1Job::boot(&config, net, args.host_loopback);
            job.args.extend(["--shutdown-timeout".to_string(), args.shutdown_timeout.to_string()]);
            if let Some(path) = &args.snapshot_to {
                job.snapshot_to(path, &config, args.snapshot_then == SnapshotThen::Resume)?;
            }
            if let Some(path) = &args.restore {
                job.restore(path, &config);
                job.args.extend(["--restore-clock".to_string(), args.restore_clock.as_str().to_string()]);
                // Inside L1 each page the guest touches first would be a read of its
                // own through the drive: hand in where the snapshot's data is, to be
                // read ahead in large pieces.
                let extents = std::fs::File::open(path)
                    .ok()
                    .and_then(|f| Some(kindling_vmm::snapshot::data_extents(&f, &snapshot_header(path).ok()?)))
                    .unwrap_or_default();
                if !extents.is_empty() {
                    job.args
                        .extend(["--restore-prefetch".to_string(), kindling_vmm::snapshot::format_extents(&extents)]);
                }
            }
            let l1 = Arc::new(match sandbox::enabled() {
                true => emulated::L1Control::with_seccomp(sandbox::process_filter(
                    sandbox::Process::Relay,
                    sandbox::mode(),
                )?),
                false => emulated::L1Control::default(),
            });
            let (ask, stop, snap) = (l1.clone(), l1.clone(), l1.clone());
            start_signal_thread(
                signals,
                Duration::from_secs(args.shutdown_timeout) + emulated::L1_STOP_GRACE,
                move || ask.request_shutdown(),
                move || stop.stop(),
                move || snap.request_snapshot(),
            )?;
            match emulated::run_job_with(&config, &job, &args.forwards, &l1) {
                // QEMU ended with the level-1 VM reset and no status reported: L1 itself
                // crashed (its emulated nested virtualization), which ends the guest too.
                Err(emulated::EmulatedError::NoStatus(0)) => {
                    eprintln!(
                        "kindling: the level-1 VM reset without reporting the guest's status: treated as a guest crash"
                    );
                    Ok(exit::GUEST_CRASHED)
                }
                // The level-1 VM went silent and was stopped: a distinct status, so that
                // a supervisor (kindling start) can retry.
                Err(emulated::EmulatedError::Stalled(stall)) => {
                    tracing::error!("{stall}");
                    Ok(exit::L1_STALLED)
                }
                r => {
                    let status = r?;
                    if let Some(path) = &args.snapshot_to {
                        emulated::discard_unwritten_snapshot(path);
                    }
                    Ok(status)
                }
            }
        }
    }
}

/// The signals that ask for an orderly stop: SIGTERM, and SIGINT unless stdin is a
/// terminal.
fn stop_signals(stdin_is_terminal: bool) -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    if !stdin_is_terminal {
        set.add(Signal::SIGINT);
    }
    set
}

/// Starts the thread that takes `signals` (blocked by the caller, so in every thread it
/// starts from then on): SIGUSR1 calls `snapshot`, whenever it comes; the first other
/// calls `ask` (ask the guest to shut down); `timeout` later, or at the next signal, it
/// calls `stop` (stop the VM).
fn start_signal_thread(
    signals: SigSet,
    timeout: Duration,
    ask: impl FnOnce() + Send + 'static,
    stop: impl FnOnce() + Send + 'static,
    snapshot: impl Fn() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("stop-signals".into()).spawn(move || {
        let first = loop {
            match signals.wait() {
                Ok(Signal::SIGUSR1) => {
                    eprintln!("kindling: SIGUSR1: taking a snapshot");
                    snapshot();
                }
                Ok(sig) => break sig,
                Err(_) => return,
            }
        };
        eprintln!(
            "kindling: {}: asking the guest to shut down (Ctrl-Alt-Del); the VM is stopped in {}s if it has not",
            first.as_str(),
            timeout.as_secs()
        );
        ask();
        let deadline = Instant::now() + timeout;
        loop {
            match wait_timeout(&signals, deadline.saturating_duration_since(Instant::now())) {
                Some(Signal::SIGUSR1) => {
                    eprintln!("kindling: SIGUSR1: taking a snapshot");
                    snapshot();
                    continue;
                }
                Some(again) => eprintln!("kindling: {} again: stopping the VM now", again.as_str()),
                None => {
                    eprintln!("kindling: the guest did not shut down within {}s: stopping the VM", timeout.as_secs())
                }
            }
            break;
        }
        stop();
    })
}

/// sigtimedwait: the next of `signals` (blocked in this thread), or None after `timeout`.
fn wait_timeout(signals: &SigSet, timeout: Duration) -> Option<Signal> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ts = libc::timespec { tv_sec: left.as_secs() as libc::time_t, tv_nsec: left.subsec_nanos().into() };
        // SAFETY: sigtimedwait reads the signal set and the timespec, both alive for the
        // call, and writes no siginfo (null).
        let n = unsafe { libc::sigtimedwait(signals.as_ref(), std::ptr::null_mut(), &ts) };
        if n > 0 {
            return Signal::try_from(n).ok();
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) || left.is_zero() {
            return None; // EAGAIN: the timeout passed
        }
    }
}

/// What the VMM writes once it runs, which must stay within its reach when it drops
/// root (see [`crate::privileges`]).
struct LaterWrites {
    /// The vsock socket: host programs connect to it (the forwards, in this process;
    /// the relay in L1), and it is removed at exit.
    vsock: Option<PathBuf>,
    /// Whether the socket's directory is kindling's own (the private one made for
    /// forwards; L1's /kindling), so it can be handed over too.
    vsock_dir_is_ours: bool,
    /// `--console-log` and its older file: written through descriptors opened at the
    /// start (rotations too), handed over so that the user owns what the VMM writes.
    console_log: Option<PathBuf>,
    /// `--snapshot-to`: created (or replaced) at SIGUSR1.
    snapshot_to: Option<PathBuf>,
}

/// Root is not needed once the VM is built: hands what the VMM writes later to the
/// target user and drops to it (see [`crate::privileges`]). Nothing to do when not root.
fn drop_root(later: &LaterWrites) -> anyhow::Result<()> {
    use crate::privileges::{self, check_reachable};
    let Some(target) = privileges::target() else { return Ok(()) };
    let give = |path: &Path| {
        privileges::give(target, path)
            .map_err(|e| anyhow::anyhow!("handing {} to uid {}: {e}", path.display(), target.uid))
    };
    let parent = |p: &Path| p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    if let Some(sock) = &later.vsock {
        give(sock)?;
        if later.vsock_dir_is_ours {
            give(&parent(sock))?;
        }
        // The forwards connect to it from this process, whatever its directory.
        crate::forward::keep_reachable(sock).map_err(|e| anyhow::anyhow!("{}: {e}", sock.display()))?;
    }
    if let Some(log) = &later.console_log {
        give(log)?;
        give(&crate::logfile::RotatingLog::rotated(log))?;
    }
    if let Some(snap) = &later.snapshot_to {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(snap) {
            // Inside L1 the snapshot drive is the VMM's own; a host's block device is
            // left as it is.
            Ok(m) if m.file_type().is_block_device() => {
                if crate::util::inside_l1() {
                    give(snap)?;
                }
            }
            // It is replaced at the snapshot anyway.
            Ok(_) => give(snap)?,
            Err(_) => {}
        }
    }
    if crate::util::inside_l1() {
        // The exit status is reported through an I/O port only root may open.
        emulated::grant_exit_port().map_err(|e| anyhow::anyhow!("granting the debug-exit port: {e}"))?;
    }
    privileges::drop_to(target)?;
    tracing::info!("dropped root after setup: {}", privileges::credentials());
    // What will not work as the target, said now rather than when it fails.
    if let Some(sock) = &later.vsock {
        check_reachable(&parent(sock), libc::W_OK | libc::X_OK, "the socket cannot be removed when the VM ends");
    }
    if let Some(snap) = &later.snapshot_to {
        match snap.exists() {
            true => check_reachable(snap, libc::W_OK, "the snapshot cannot be written"),
            false => check_reachable(&parent(snap), libc::W_OK | libc::X_OK, "the snapshot cannot be created"),
        }
    }
    Ok(())
}

/// The snapshot file and the ranges of it to read ahead.
type Prefetch = (std::fs::File, Vec<(u64, u64)>);

/// `--restore-prefetch`: checks the ranges against the snapshot and returns the file to
/// read them from, with the ranges; read in the background once the VM is built.
fn restore_prefetch(args: &BootArgs) -> anyhow::Result<Option<Prefetch>> {
    let (Some(path), Some(text)) = (&args.restore, &args.restore_prefetch) else { return Ok(None) };
    let header = snapshot_header(path)?;
    let extents =
        kindling_vmm::snapshot::parse_extents(text, &header).map_err(|e| anyhow::anyhow!("--restore-prefetch: {e}"))?;
    let file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("--restore {}: {e}", path.display()))?;
    Ok(Some((file, extents)))
}

fn boot_on_kvm(
    config: &VmConfig,
    restore: Option<&Path>,
    restore_clock: RestoreClock,
    prefetch: Option<Prefetch>,
    net: Option<Box<dyn Backend>>,
    control: &VmControl,
    later: &LaterWrites,
) -> anyhow::Result<i32> {
    let t0 = Instant::now();
    let console = Console { output: Box::new(std::io::stdout()), input: Some(libc::STDIN_FILENO) };
    l1watch::step("vm-build");
    let host = HostResources { console, net };
    let mut vm = match restore {
        Some(path) => MicroVm::restore(path, config, host, restore_clock)
            .map_err(|e| anyhow::anyhow!("--restore {}: {e}", path.display()))?,
        None => MicroVm::build(config, host)?,
    };
    if let Some((file, extents)) = prefetch {
        // Alongside the guest, under the same filters once they are in (it only reads).
        std::thread::Builder::new().name("prefetch".into()).spawn(move || {
            let t = Instant::now();
            match kindling_vmm::snapshot::prefetch(&file, &extents) {
                Ok(n) => {
                    tracing::info!("read {} MiB of the snapshot ahead in {:.1} s", n >> 20, t.elapsed().as_secs_f64())
                }
                Err(e) => tracing::warn!("reading the snapshot ahead: {e} (the guest reads it as it goes)"),
            }
        })?;
    }
    // Everything is open and every helper thread runs: from here on the process only
    // serves the guest, without root and under its seccomp filters.
    drop_root(later)?;
    if sandbox::enabled() {
        let process = if crate::util::inside_l1() {
            sandbox::Process::VmmInL1 { exit_port: emulated::DEBUG_EXIT_PORT }
        } else {
            sandbox::Process::Vmm
        };
        sandbox::install_all_threads(&sandbox::process_filter(process, sandbox::mode())?, "VMM")?;
        vm.set_vcpu_filter(sandbox::vcpu_filter(sandbox::mode())?);
        if sandbox::violation_asked() {
            vm.after_vcpu_filter(|index| {
                if index == 0 {
                    sandbox::violate_for_tests("vCPU");
                }
            });
        }
    }
    tracing::info!("microVM ready to run in {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
    l1watch::step("vm-run");
    let reason = vm.run_with_control(control)?;
    let secs = t0.elapsed().as_secs_f64();
    match reason {
        ExitReason::Snapshotted => {
            eprintln!("kindling: snapshot written; the VM ended after {secs:.2}s");
            Ok(exit::OK)
        }
        ExitReason::PowerOff | ExitReason::Running => {
            eprintln!("kindling: guest powered off after {secs:.2}s");
            Ok(exit::OK)
        }
        ExitReason::Reset => {
            eprintln!("kindling: guest rebooted after {secs:.2}s; stopping (reboot ends the VM)");
            Ok(exit::OK)
        }
        ExitReason::Stopped => {
            eprintln!("kindling: VM stopped after {secs:.2}s; its disks are flushed");
            Ok(exit::OK)
        }
        ExitReason::TripleFault => {
            eprintln!("kindling: the guest crashed (a vCPU triple-faulted) after {secs:.2}s; stopping");
            Ok(exit::GUEST_CRASHED)
        }
        ExitReason::Error => {
            anyhow::bail!("the VM stopped on a fatal vCPU error after {secs:.2}s (see the log lines above)")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::os::unix::thread::JoinHandleExt;
    use std::path::Path;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use clap::Parser;

    use crate::cli::{Cli, Command};
    use crate::daemon::api::{DiskSpec, VmSpec};
    use crate::daemon::state::Paths;
    use crate::daemon::vm_process::{boot_args, Launch};

    use super::{start_signal_thread, stop_signals};

    /// The stop-signal thread with real signals, sent to that thread alone (so the rest
    /// of the test process never sees them): the first asks, the timeout or a second
    /// signal stops.
    #[test]
    fn a_stop_signal_asks_the_guest_then_the_timeout_or_a_second_signal_stops() {
        let signals = stop_signals(false);
        assert!(signals.contains(nix::sys::signal::SIGTERM) && signals.contains(nix::sys::signal::SIGINT));
        assert!(!stop_signals(true).contains(nix::sys::signal::SIGINT), "on a terminal Ctrl-C goes to the guest");
        // Blocked in this test's thread, so in the signal thread it starts.
        signals.thread_block().unwrap();
        for (second, timeout) in [(None, Duration::from_millis(300)), (Some(libc::SIGTERM), Duration::from_secs(60))] {
            let (tx, rx) = mpsc::channel();
            let (ask, stop) = (tx.clone(), tx);
            let thread = start_signal_thread(
                signals,
                timeout,
                move || ask.send("ask").unwrap(),
                move || stop.send("stop").unwrap(),
                || {},
            )
            .unwrap();
            let kill = |sig| {
                // SAFETY: the thread is alive until joined below (it ends only after
                // `stop`, which the test waits for first).
                assert_eq!(unsafe { libc::pthread_kill(thread.as_pthread_t(), sig) }, 0);
            };
            kill(libc::SIGINT);
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok("ask"));
            let asked = Instant::now();
            if let Some(sig) = second {
                kill(sig);
            }
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok("stop"));
            match second {
                None => assert!(asked.elapsed() >= Duration::from_millis(250), "stopped before the timeout"),
                Some(_) => assert!(asked.elapsed() < Duration::from_secs(10), "a second signal stops at once"),
            }
            thread.join().unwrap();
        }
    }

    /// The boot subcommand's own parser (the VMM's fast start) reads what the full one
    /// does.
    #[test]
    fn the_boot_fast_path_parses_as_the_full_parser() {
        let argv: Vec<OsString> = ["kindling", "boot", "--kernel", "/k", "--disk", "/d,ro", "--memory", "64"]
            .into_iter()
            .chain(["--forward", "8080:80", "--net", "none", "--shutdown-timeout", "5", "--cpus", "2"])
            .map(OsString::from)
            .collect();
        let Command::Boot(fast) = Cli::parse_argv(argv.clone()).command else { panic!("not boot") };
        let Command::Boot(full) = Cli::try_parse_from(argv).unwrap().command else { panic!("not boot") };
        assert_eq!(format!("{fast:?}"), format!("{full:?}"));
        assert_eq!(fast.shutdown_timeout, 5);
    }

    /// The daemon's boot arguments are `kindling boot` arguments, and a comma in a disk
    /// path survives.
    #[test]
    fn the_daemons_boot_arguments_parse_as_boot_arguments() {
        let mut spec = VmSpec::new("vm", "/k");
        spec.disks =
            vec![DiskSpec { path: "/d,1".into(), read_only: false }, DiskSpec { path: "/e".into(), read_only: true }];
        let argv =
            std::iter::once(OsString::from("kindling")).chain(boot_args(&spec, &Paths::new("/state"), Launch::Boot));
        let Command::Boot(boot) = Cli::try_parse_from(argv).unwrap().command else { panic!("not boot") };
        let disks: Vec<_> = boot.disks.iter().map(|d| kindling_vmm::config::DiskConfig::parse(d).unwrap()).collect();
        assert_eq!((disks[0].path.as_path(), disks[0].read_only), (Path::new("/d,1"), false));
        assert_eq!((disks[1].path.as_path(), disks[1].read_only), (Path::new("/e"), true));
        assert_eq!(boot.memory, 512);
        assert_eq!(boot.snapshot_to.as_deref(), Some(Path::new("/state/vms/vm/snapshot.next")));
        // A resume parses too (clap refuses a kernel or memory next to --restore).
        let argv = std::iter::once(OsString::from("kindling")).chain(boot_args(
            &spec,
            &Paths::new("/state"),
            Launch::Resume { keep_clock: true },
        ));
        let Command::Boot(boot) = Cli::try_parse_from(argv).unwrap().command else { panic!("not boot") };
        assert_eq!(boot.restore.as_deref(), Some(Path::new("/state/vms/vm/snapshot.resumed")));
        assert_eq!(boot.disks.len(), 2);
        assert_eq!(boot.restore_clock, super::RestoreClockArg::Keep);
    }
}
