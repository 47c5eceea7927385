//! Builds a microVM from a [`VmConfig`] and runs it: memory, ACPI, kernel, devices,
//! vCPUs, then the event loop (console input, virtio queue notifications, device host
//! events, host requests, guest exit).
//!
//! The host talks to a running VM through a [`VmControl`]: any thread (kindling's
//! signal thread) sets a flag and writes its eventfd, which the event loop watches, so
//! a request made before or while the loop runs is never lost. A shutdown request
//! types Ctrl-Alt-Del on the guest's i8042 keyboard, retried on every wakeup of the
//! loop until the guest's driver has enabled the keyboard; a stop request ends the VM
//! at once ([`ExitReason::Stopped`]). Either way the disks are flushed and the vsock
//! socket removed on the way out. How long to wait between the two is the caller's
//! policy.
//!
//! Snapshots ([`VmControl::snapshot`]): the event loop pauses every vCPU (see
//! `vstate::vcpu`), saves vCPU, VM and device state and memory into the one-file
//! snapshot ([`crate::snapshot`]) from its own thread, so no device runs meanwhile, and
//! resumes or ends the VM ([`ExitReason::Snapshotted`]). [`MicroVm::restore`] checks the
//! snapshot's header against this host and the devices it is given before building
//! anything, maps memory lazily, puts state back in the order interrupts need (VM, then
//! vCPUs, then devices, which may interrupt), and writes a new VM Generation ID, whose
//! change the guest learns through the ACPI GED's interrupt.

use std::fs::File;
use std::io::Write;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::IoEventAddress;
use linux_loader::cmdline::Cmdline;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::{acpi, kernel, layout, regs};
use crate::config::{ConfigError, VmConfig, CMDLINE_MAX};
use crate::devices::bus::Bus;
use crate::devices::legacy::acpi_pm::{AcpiPm, AcpiPmState, ACPI_PM_LEN, ACPI_PM_PORT};
use crate::devices::legacy::i8042::{CtrlAltDelError, I8042State, I8042, I8042_KBD_IRQ, I8042_PORT, I8042_PORT_LEN};
use crate::devices::legacy::serial::{SerialConsole, SerialSnapshot, COM1_PORT, COM_PORT_LEN};
use crate::devices::legacy::IrqTrigger;
use crate::devices::virtio::block::{Block, DiskError};
use crate::devices::virtio::mmio::{MmioTransport, TransportState, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::{self, Net, NetError};
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::devices::virtio::VirtioDevice;
use crate::devices::{ExitReason, ExitSignal};
use crate::snapshot::{self, CpuIdentity, Header, SnapshotError};
use crate::vstate::state::{self as kvm_state, VcpuState, VmState};
use crate::vstate::vcpu::{self, Vcpu, VcpuError, VcpuHandle};
use crate::vstate::vm::{Vm, VmError};

/// Why a microVM could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Opening KVM or creating the VM, its memory or its irqchip failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Creating or starting a vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A disk image could not be opened.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The vsock device could not be set up.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The network device could not be set up.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Loading the kernel, initrd or command line failed.
    #[error(transparent)]
    Boot(#[from] kernel::BootError),
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// The boot GDT and page tables could not be written.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// There are more virtio devices than interrupt lines for them.
    #[error(
        "too many virtio devices: at most {0} fit the interrupt lines; remove some --disk (or --vsock, --net none)"
    )]
    TooManyDevices(usize),
    /// A network device came without a backend, or a backend without a device.
    #[error("the config has a network device but no backend was given for it (or a backend without the device)")]
    NetBackendMismatch,
    /// A snapshot could not be read, did not fit, or could not be restored.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Setting up an eventfd, irqfd, bus range, epoll or the like failed.
    #[error("setting up {what}: {err}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The error, as text.
        err: String,
    },
}

fn setup<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> BuildError {
    move |e| BuildError::Setup { what, err: e.to_string() }
}

/// Where the guest console goes and comes from.
pub struct Console {
    /// Where guest console output is written.
    pub output: Box<dyn Write + Send>,
    /// Read end for console input (stdin), if any.
    pub input: Option<RawFd>,
}

/// The host resources a VM uses besides the files its config names, set up by the
/// caller: the console, and the open backend of the network device.
pub struct HostResources {
    /// The guest console.
    pub console: Console,
    /// The backend of [`VmConfig::net`]'s device (a tap, a passt socket).
    pub net: Option<Box<dyn net::Backend>>,
}

/// Requests the host makes of a running VM, safe to make from any thread (each sets a
/// flag, then wakes the event loop through an eventfd: async-signal-safe, and a
/// request made before [`MicroVm::run_with_control`] starts is seen when it does).
pub struct VmControl {
    evt: EventFd,
    shutdown: AtomicBool,
    stop: AtomicBool,
    snapshot: Mutex<Option<SnapshotRequest>>,
}

/// What the VM does once its snapshot is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterSnapshot {
    /// The vCPUs run on.
    Resume,
    /// The run ends with [`ExitReason::Snapshotted`].
    Exit,
}

/// A snapshot the host asked for.
#[derive(Clone, Debug)]
struct SnapshotRequest {
    path: PathBuf,
    then: AfterSnapshot,
}

impl VmControl {
    /// A control with nothing requested.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            shutdown: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            snapshot: Mutex::new(None),
        })
    }

    /// Asks for a snapshot into `path` (a new file, replaced if it exists, or a block
    /// device at least [`snapshot::size_needed`] long): the event loop pauses the vCPUs,
    /// writes the snapshot and syncs it, then resumes or ends the VM as `then` says. If
    /// writing fails the VM runs on and the error is logged. Not async-signal-safe (it
    /// takes a lock): call it from a thread, as kindling's signal thread does.
    pub fn snapshot(&self, path: PathBuf, then: AfterSnapshot) {
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Some(SnapshotRequest { path, then });
        let _ = self.evt.write(1);
    }

    /// Asks the guest to shut down: Ctrl-Alt-Del on its keyboard, typed as soon as the
    /// guest's driver has enabled the keyboard. Linux reboots at once on Ctrl-Alt-Del
    /// unless init disabled that (kindling's agent does); then init gets SIGINT and
    /// shuts down in order. The VM runs until the guest powers off or resets, or until
    /// [`stop`](Self::stop).
    pub fn request_shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    /// Stops the VM now, whatever the guest is doing: the run ends with
    /// [`ExitReason::Stopped`] (after flushing the disks, as every run does).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }
}

/// Epoll tokens.
const TOKEN_EXIT: u64 = 0;
const TOKEN_INPUT: u64 = 1;
const TOKEN_CONTROL: u64 = 2;
const TOKEN_QUEUE_BASE: u64 = 16;
/// Above every queue token: a device's host events fd (see `VirtioDevices::host_events`).
const TOKEN_HOST_EVENTS_BASE: u64 = 1 << 32;

/// Ctrl-A then x quits, as in QEMU, when the console is a terminal.
const ESCAPE: u8 = 0x01;

/// A microVM built from a config, ready to [`run`](Self::run).
pub struct MicroVm {
    vm: Vm,
    /// Guest RAM; KVM's memory slots point into it, so it lives as long as the VM.
    mem: Arc<vm_memory::GuestMemoryMmap>,
    exit: Arc<ExitSignal>,
    serial: Arc<Mutex<SerialConsole>>,
    i8042: Arc<Mutex<I8042>>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    virtio: VirtioDevices,
    vcpus: Vec<Vcpu>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    input: Option<RawFd>,
    /// The seccomp filter each vCPU thread installs before it first enters the guest.
    vcpu_filter: Option<Arc<seccompiler::BpfProgram>>,
    /// Called on each vCPU thread (with its index) once its filter is in place.
    after_vcpu_filter: Option<fn(u8)>,
    /// What a snapshot of this VM says about it (format, CPU, devices, size).
    identity: Header,
    /// The guest's MAC address (a restore keeps it: the guest's driver read it once).
    net_mac: Option<[u8; 6]>,
    /// The GED's irqfd, registered for the VM's life.
    _ged_irq: EventFd,
    /// When [`Self::build`] began; the logs time boot steps from it.
    pub started: Instant,
}

/// A paused machine's state, as a snapshot holds it (JSON, after the header).
#[derive(serde::Serialize, serde::Deserialize)]
struct MachineState {
    vcpus: Vec<VcpuState>,
    vm: VmState,
    serial: SerialSnapshot,
    i8042: I8042State,
    acpi_pm: AcpiPmState,
    /// The virtio-mmio transports, in slot order. The devices behind them keep no
    /// state of their own that survives a restore: block requests complete within a
    /// queue notification, a network frame in flight is dropped (as a network may),
    /// and vsock connections are reset.
    virtio: Vec<TransportState>,
    net_mac: Option<[u8; 6]>,
}

/// Everything but the vCPUs and the kernel: buses, legacy devices, virtio devices.
struct Machine {
    exit: Arc<ExitSignal>,
    /// The Generic Event Device's interrupt: a new VM Generation ID.
    ged_irq: EventFd,
    serial: Arc<Mutex<SerialConsole>>,
    i8042: Arc<Mutex<I8042>>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    virtio: VirtioDevices,
    pio: Bus,
    mmio: Bus,
    /// The kernel command line entries of the virtio devices, in slot order.
    cmdline_args: Vec<String>,
}

/// Builds the devices of `config` on `vm` and `mem`; the serial port starts from
/// `serial` when restoring.
fn assemble(
    config: &VmConfig,
    vm: &Vm,
    mem: &Arc<vm_memory::GuestMemoryMmap>,
    output: Box<dyn Write + Send>,
    serial_state: Option<&SerialSnapshot>,
    net: Option<(Box<dyn net::Backend>, [u8; 6])>,
) -> Result<Machine, BuildError> {
    let exit = Arc::new(ExitSignal::new().map_err(setup("exit eventfd"))?);
    let mut pio = Bus::default();
    let mut mmio = Bus::default();
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(setup("serial irq"))?;
    vm.fd.register_irqfd(&serial_irq, layout::SERIAL_IRQ).map_err(setup("serial irqfd"))?;
    let serial = match serial_state {
        None => SerialConsole::new(IrqTrigger(serial_irq), output),
        Some(state) => SerialConsole::restore(state, IrqTrigger(serial_irq), output)
            .map_err(|e| SnapshotError::Corrupt(format!("its serial port state: {e}")))?,
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(serial.clone(), COM1_PORT, COM_PORT_LEN).map_err(setup("serial port"))?;
    let kbd_irq = EventFd::new(EFD_NONBLOCK).map_err(setup("i8042 irq"))?;
    vm.fd.register_irqfd(&kbd_irq, I8042_KBD_IRQ).map_err(setup("i8042 irqfd"))?;
    let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone(), kbd_irq)));
    pio.insert(i8042.clone(), I8042_PORT, I8042_PORT_LEN).map_err(setup("i8042 port"))?;
    let ged_irq = EventFd::new(EFD_NONBLOCK).map_err(setup("GED irq"))?;
    vm.fd.register_irqfd(&ged_irq, layout::GED_IRQ).map_err(setup("GED irqfd"))?;
    let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(exit.clone())));
    pio.insert(acpi_pm.clone(), ACPI_PM_PORT, ACPI_PM_LEN).map_err(setup("ACPI PM ports"))?;

    // Slots in the order config.full_cmdline_len() counts them: disks, vsock, net.
    let mut virtio = VirtioDevices::default();
    let mut cmdline_args = Vec::new();
    for disk in &config.disks {
        let block = Block::open(&disk.path, disk.read_only)?;
        cmdline_args.push(virtio.attach(vm, mem, &mut mmio, Box::new(block))?);
    }
    if let Some(vsock) = &config.vsock {
        let device = Vsock::new(u64::from(vsock.guest_cid), &vsock.uds_path)?;
        cmdline_args.push(virtio.attach(vm, mem, &mut mmio, Box::new(device))?);
    }
    if let Some((backend, mac)) = net {
        tracing::info!("net: {}", backend.describe());
        let device = Net::new(backend, mac)?;
        cmdline_args.push(virtio.attach(vm, mem, &mut mmio, Box::new(device))?);
    }
    Ok(Machine { exit, ged_irq, serial, i8042, acpi_pm, virtio, pio, mmio, cmdline_args })
}

/// Writes a new random VM Generation ID where the guest's ACPI tables say it is.
fn new_generation_id(mem: &vm_memory::GuestMemoryMmap) -> Result<(), BuildError> {
    use vm_memory::Bytes;
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most `id.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        return Err(setup("VM generation ID")(std::io::Error::last_os_error()));
    }
    mem.write_slice(&id, vm_memory::GuestAddress(layout::VMGENID_ADDR)).map_err(setup("VM generation ID"))
}

/// The CPU vCPU 0 of `cpus` is presented as: what a snapshot must have been taken on.
fn cpu_identity(vm: &Vm, cpus: u8) -> Result<CpuIdentity, BuildError> {
    let cpuid = vcpu::guest_cpuid(vm, 0, cpus)?;
    Ok(CpuIdentity::of(cpuid.as_slice()))
}

/// The devices of `config` as a snapshot's header names them: kind, and what the
/// guest learned of each when it probed it (a disk's size and mode, the vsock CID).
pub fn device_identities(config: &VmConfig) -> Result<Vec<String>, BuildError> {
    let mut ids = Vec::new();
    for d in &config.disks {
        let size = disk_size(&d.path)?;
        ids.push(format!("virtio-blk {} {size} bytes", if d.read_only { "ro" } else { "rw" }));
    }
    if let Some(v) = &config.vsock {
        ids.push(format!("vsock cid {}", v.guest_cid));
    }
    if config.net.is_some() {
        ids.push("virtio-net".into());
    }
    Ok(ids)
}

fn disk_size(path: &Path) -> Result<u64, BuildError> {
    use std::io::{Seek, SeekFrom};
    let open = |err| DiskError::Open { path: path.display().to_string(), err };
    let mut f = File::open(path).map_err(open)?;
    Ok(f.seek(SeekFrom::End(0)).map_err(open)?)
}

/// What a restored guest's clocks do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestoreClock {
    /// They move on by the time the snapshot was away (KVM_CLOCK_REALTIME), so the
    /// guest's wall clock is right; every timer that fell due meanwhile fires at once.
    #[default]
    Advance,
    /// They go on from the snapshot's moment: to the guest the time away never
    /// happened (no timer fires early, no timeout expires), and something in the guest
    /// sets its wall clock (kindling's node agent does, when the host asks).
    Keep,
}

impl MicroVm {
    /// Validates the config and builds everything short of running vCPUs.
    pub fn build(config: &VmConfig, host: HostResources) -> Result<Self, BuildError> {
        let started = Instant::now();
        let format = config.validate()?;
        let HostResources { console, net: net_backend } = host;
        if config.net.is_some() != net_backend.is_some() {
            return Err(BuildError::NetBackendMismatch);
        }
        // validate() bounds the count well below 256.
        let cpus = u8::try_from(config.cpus).map_err(|_| ConfigError::TooManyCpus(config.cpus))?;
        let vm = Vm::new()?;
        let identity = Header {
            format: snapshot::FORMAT,
            vmm_version: snapshot::vmm_version(),
            cpu: cpu_identity(&vm, cpus)?,
            devices: device_identities(config)?,
            memory_mib: config.memory_mib,
            vcpus: config.cpus,
            state_offset: 0,
            state_len: 0,
            memory_offset: 0,
        };
        let mem = vm.create_memory(config.memory_mib)?;
        vm.setup_irqchip()?;
        let net_mac = config.net.as_ref().map(|n| n.mac);
        let net = net_backend.zip(net_mac);
        let machine = assemble(config, &vm, &mem, console.output, None, net)?;

        // validate() already checked the length including the device entries.
        let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(setup("command line"))?;
        let too_long = || ConfigError::CmdlineTooLong { len: config.full_cmdline_len() };
        cmdline.insert_str(&config.cmdline).map_err(|_| too_long())?;
        for arg in &machine.cmdline_args {
            cmdline.insert_str(arg).map_err(|_| too_long())?;
        }
        tracing::debug!(
            "kernel command line: {}",
            cmdline.as_cstring().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
        );

        let rsdp = acpi::write_tables(&mem, cpus)?;
        new_generation_id(&mem)?;
        regs::write_boot_tables(&mem)?;
        let boot = kernel::load(&mem, format, &config.kernel, config.initrd.as_deref(), &cmdline, rsdp)?;
        let vcpus =
            (0..cpus).map(|i| Vcpu::new(&vm, i, cpus, (i == 0).then_some(boot))).collect::<Result<Vec<_>, _>>()?;
        tracing::debug!("microVM built in {:?}", started.elapsed());
        Ok(Self::from_parts(vm, mem, machine, vcpus, console.input, identity, net_mac, started))
    }

    /// Restores the VM a snapshot file (or block device) at `path` holds, with the
    /// devices of `config` (its disks, vsock and network, which must be those the
    /// snapshot was taken with; its kernel, initrd and command line are not used) and
    /// the host's resources. The snapshot is refused, with what does not fit and what
    /// to do, before anything is built: another format or kindling version, another
    /// CPU, other devices, another size. Memory is mapped privately and lazily from the
    /// file, so the file must stay in place while the VM runs. Every vsock connection
    /// is reset (the guest gets a transport reset event); the network device gets the
    /// new backend and keeps the guest's MAC address. The guest's clocks move on by the
    /// time since the snapshot, or with [`RestoreClock::Keep`] go on from the
    /// snapshot's moment.
    pub fn restore(
        path: &Path,
        config: &VmConfig,
        host: HostResources,
        clock: RestoreClock,
    ) -> Result<Self, BuildError> {
        let started = Instant::now();
        let mut file =
            File::open(path).map_err(|err| SnapshotError::Io { what: format!("opening {}", path.display()), err })?;
        let (header, state) = snapshot::read(&mut file)?;
        let HostResources { console, net: net_backend } = host;
        if config.net.is_some() != net_backend.is_some() {
            return Err(BuildError::NetBackendMismatch);
        }
        if header.memory_mib != config.memory_mib || header.vcpus != config.cpus {
            return Err(SnapshotError::Mismatch(format!(
                "it has {} MiB and {} vCPUs, this VM {} MiB and {} vCPUs",
                header.memory_mib, header.vcpus, config.memory_mib, config.cpus
            ))
            .into());
        }
        crate::config::check_size(config.cpus, config.memory_mib)?;
        let cpus = u8::try_from(config.cpus).map_err(|_| ConfigError::TooManyCpus(config.cpus))?;
        let vm = Vm::new()?;
        header.check(&cpu_identity(&vm, cpus)?, &device_identities(config)?)?;
        let state: MachineState =
            serde_json::from_slice(&state).map_err(|e| SnapshotError::Corrupt(format!("its machine state: {e}")))?;
        if state.vcpus.len() != usize::from(cpus) || state.virtio.len() != header.devices.len() {
            return Err(SnapshotError::Corrupt(format!(
                "its state has {} vCPUs and {} devices, its header {} and {}",
                state.vcpus.len(),
                state.virtio.len(),
                header.vcpus,
                header.devices.len()
            ))
            .into());
        }
        let t_read = started.elapsed();

        let mem = snapshot::map_memory(&file, &header)?;
        vm.register_memory(&mem)?;
        vm.setup_irqchip()?;
        let mac = state.net_mac.or(config.net.as_ref().map(|n| n.mac));
        let net = match (net_backend, mac) {
            (Some(b), Some(m)) => Some((b, m)),
            _ => None,
        };
        let machine = assemble(config, &vm, &mem, console.output, Some(&state.serial), net)?;
        let restoring = |what: &str| {
            let what = what.to_string();
            move |e: kvm_state::StateError| SnapshotError::Corrupt(format!("restoring {what}: {e}"))
        };
        // The interrupt controllers first, then the vCPUs' LAPICs, then the devices,
        // which may raise interrupts as they come back.
        state
            .vm
            .restore(&vm.fd, clock == RestoreClock::Advance)
            .map_err(restoring("the VM's interrupt controllers and clock"))?;
        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for (i, s) in state.vcpus.iter().enumerate() {
            let v = Vcpu::new(&vm, i as u8, cpus, None)?;
            v.restore(s).map_err(restoring(&format!("vCPU {i}")))?;
            vcpus.push(v);
        }
        machine.i8042.lock().unwrap().restore(&state.i8042).map_err(SnapshotError::Corrupt)?;
        machine.acpi_pm.lock().unwrap().restore(&state.acpi_pm);
        for (i, (t, s)) in machine.virtio.transports.iter().zip(&state.virtio).enumerate() {
            t.lock().unwrap().restore(s).map_err(|e| SnapshotError::Corrupt(format!("device {i}: {e}")))?;
        }
        // A new generation: the guest's vmgenid driver sees the ID change at the GED's
        // interrupt, and reseeds its random number generator.
        new_generation_id(&mem)?;
        machine.ged_irq.write(1).map_err(setup("GED interrupt"))?;
        tracing::info!(
            "microVM restored from {} in {:.1} ms (header and state read in {:.1} ms; memory mapped lazily)",
            path.display(),
            started.elapsed().as_secs_f64() * 1e3,
            t_read.as_secs_f64() * 1e3
        );
        let identity = Header { state_offset: 0, state_len: 0, memory_offset: 0, ..header };
        Ok(Self::from_parts(vm, mem, machine, vcpus, console.input, identity, mac, started))
    }

    /// The VM from its parts, built ([`Self::build`]) or restored ([`Self::restore`]).
    #[allow(clippy::too_many_arguments)]
    fn from_parts(
        vm: Vm,
        mem: Arc<vm_memory::GuestMemoryMmap>,
        machine: Machine,
        vcpus: Vec<Vcpu>,
        input: Option<RawFd>,
        identity: Header,
        net_mac: Option<[u8; 6]>,
        started: Instant,
    ) -> Self {
        let Machine { exit, ged_irq, serial, i8042, acpi_pm, virtio, pio, mmio, .. } = machine;
        Self {
            vm,
            mem,
            exit,
            serial,
            i8042,
            acpi_pm,
            virtio,
            vcpus,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            input,
            identity,
            net_mac,
            _ged_irq: ged_irq,
            vcpu_filter: None,
            after_vcpu_filter: None,
            started,
        }
    }

    /// Has every vCPU thread install `filter` (a seccomp BPF program, on top of what the
    /// process already has) before it first enters the guest; a thread that cannot
    /// install it stops the VM with [`ExitReason::Error`] instead of running unfiltered.
    pub fn set_vcpu_filter(&mut self, filter: seccompiler::BpfProgram) {
        self.vcpu_filter = Some(Arc::new(filter));
    }

    /// Has every vCPU thread call `after` with its index once its filter (see
    /// [`Self::set_vcpu_filter`]) is in place, before it first enters the guest: kindling's
    /// test switch that makes a call the filter forbids there.
    pub fn after_vcpu_filter(&mut self, after: fn(u8)) {
        self.after_vcpu_filter = Some(after);
    }

    /// Runs the guest until it powers off, resets or fails.
    pub fn run(self) -> Result<ExitReason, BuildError> {
        let control = VmControl::new().map_err(setup("control eventfd"))?;
        self.run_with_control(&control)
    }

    /// Runs the guest until it powers off, resets or fails, or until `control` stops
    /// it; a shutdown request on `control` asks the guest to shut down, a snapshot
    /// request pauses it and writes a snapshot.
    pub fn run_with_control(self, control: &VmControl) -> Result<ExitReason, BuildError> {
        let MicroVm {
            vm,
            mem,
            exit,
            serial,
            i8042,
            acpi_pm,
            virtio,
            vcpus,
            pio,
            mmio,
            input,
            identity,
            net_mac,
            _ged_irq,
            vcpu_filter,
            after_vcpu_filter,
            started,
        } = self;
        let epoll = Epoll::new().map_err(setup("epoll"))?;
        let add = |fd: RawFd, token: u64| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token));
        add(exit.evt.as_raw_fd(), TOKEN_EXIT).map_err(setup("epoll"))?;
        add(control.evt.as_raw_fd(), TOKEN_CONTROL).map_err(setup("epoll"))?;
        for (i, (_, _, evt)) in virtio.queues.iter().enumerate() {
            add(evt.as_raw_fd(), TOKEN_QUEUE_BASE + i as u64).map_err(setup("epoll"))?;
        }
        for (i, (_, fd)) in virtio.host_events.iter().enumerate() {
            add(*fd, TOKEN_HOST_EVENTS_BASE + i as u64).map_err(setup("epoll"))?;
        }
        let _raw = input.and_then(RawTerminal::enter);
        let escape_enabled = _raw.is_some();
        if let Some(fd) = input {
            if let Err(e) = add(fd, TOKEN_INPUT) {
                tracing::debug!("console input not available: {e}");
            }
        }

        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for v in vcpus {
            threads.push(v.spawn(
                pio.clone(),
                mmio.clone(),
                exit.clone(),
                stop.clone(),
                vcpu_filter.clone(),
                after_vcpu_filter,
            )?);
        }
        tracing::debug!("vCPUs running {:?} after start", started.elapsed());
        let parts = SnapshotParts {
            vm: &vm,
            mem: &mem,
            serial: &serial,
            i8042: &i8042,
            acpi_pm: &acpi_pm,
            virtio: &virtio,
            identity: &identity,
            net_mac,
            msrs: Arc::new(Vec::new()),
        };
        let mut msrs: Option<Arc<Vec<u32>>> = None;

        let mut events = vec![EpollEvent::default(); 32];
        let mut saw_escape = false;
        let mut input_paused = false;
        let mut shutdown = ShutdownRequest::default();
        'event_loop: loop {
            // A pending Ctrl-Alt-Del is retried on every wakeup (at least every 100 ms).
            if shutdown.pending {
                shutdown.try_deliver(&mut i8042.lock().unwrap(), started);
            }
            let n = match epoll.wait(100, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(setup("epoll wait")(e)),
            };
            // Resume console input once the guest drained the UART FIFO.
            if let (Some(fd), true) = (input, input_paused) {
                if serial.lock().unwrap().input_capacity() > 0 {
                    input_paused = add(fd, TOKEN_INPUT).is_err();
                }
            }
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => break 'event_loop,
                    TOKEN_CONTROL => {
                        if shutdown.on_control(control, &mut i8042.lock().unwrap(), &exit, started) {
                            break 'event_loop;
                        }
                        let request = control.snapshot.lock().unwrap_or_else(|e| e.into_inner()).take();
                        if let Some(request) = request {
                            let list = match &msrs {
                                Some(l) => l.clone(),
                                None => {
                                    let l = Arc::new(kvm_state::saveable_msrs(&vm.kvm).unwrap_or_default());
                                    msrs = Some(l.clone());
                                    l
                                }
                            };
                            let parts = SnapshotParts { msrs: list, ..parts.clone() };
                            match parts.take(&threads, &request.path) {
                                Ok(()) if request.then == AfterSnapshot::Exit => {
                                    exit.request(ExitReason::Snapshotted);
                                    break 'event_loop;
                                }
                                Ok(()) => tracing::info!("snapshot taken; the VM runs on"),
                                Err(e) => tracing::error!(
                                    "snapshot to {} failed: {e}; the VM runs on",
                                    request.path.display()
                                ),
                            }
                            vcpu::resume_all(&threads);
                        }
                    }
                    TOKEN_INPUT => {
                        let fd = input.expect("input token only registered with input");
                        let mut console = serial.lock().unwrap();
                        let room = console.input_capacity();
                        if room == 0 {
                            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                            input_paused = true;
                            continue;
                        }
                        let mut buf = [0u8; 64];
                        let want = room.min(buf.len());
                        // SAFETY: reading into a stack buffer of at least `want` bytes.
                        let got = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), want) };
                        if got <= 0 {
                            // EOF or error: no more console input.
                            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                            continue;
                        }
                        let bytes = &buf[..got as usize];
                        if escape_enabled {
                            for &b in bytes {
                                if saw_escape && b == b'x' {
                                    eprintln!("\r\nkindling: Ctrl-A x pressed, stopping the VM\r");
                                    exit.request(ExitReason::PowerOff);
                                }
                                saw_escape = b == ESCAPE && !saw_escape;
                            }
                        }
                        console.enqueue_input(bytes);
                    }
                    token if token >= TOKEN_HOST_EVENTS_BASE => {
                        let (transport, _) = &virtio.host_events[(token - TOKEN_HOST_EVENTS_BASE) as usize];
                        transport.lock().unwrap().process_host_events();
                    }
                    token => {
                        let (transport, q, evt) = &virtio.queues[(token - TOKEN_QUEUE_BASE) as usize];
                        let _ = evt.read();
                        transport.lock().unwrap().process_queue(*q);
                    }
                }
            }
        }
        let reason = exit.reason();
        tracing::debug!("guest stopped ({reason:?}) after {:?}", started.elapsed());
        vcpu::stop_all(threads, &stop);
        // Disks: whatever the guest wrote reaches stable storage before we report success.
        for d in &virtio.transports {
            d.lock().unwrap().sync_device();
        }
        // Devices go first (vsock removes its socket file), then, with the vCPUs
        // stopped, the memory after the VM that maps it.
        drop(virtio);
        drop(vm);
        drop(mem);
        Ok(reason)
    }
}

/// What a snapshot reads, borrowed from the running VM's parts.
#[derive(Clone)]
struct SnapshotParts<'a> {
    vm: &'a Vm,
    mem: &'a Arc<vm_memory::GuestMemoryMmap>,
    serial: &'a Arc<Mutex<SerialConsole>>,
    i8042: &'a Arc<Mutex<I8042>>,
    acpi_pm: &'a Arc<Mutex<AcpiPm>>,
    virtio: &'a VirtioDevices,
    identity: &'a Header,
    net_mac: Option<[u8; 6]>,
    msrs: Arc<Vec<u32>>,
}

impl SnapshotParts<'_> {
    /// Pauses the vCPUs (the caller resumes them), saves the machine's state and
    /// memory into `path`, syncs it. The devices are quiescent meanwhile: only this
    /// thread, the event loop, runs them.
    fn take(&self, threads: &[VcpuHandle], path: &Path) -> Result<(), SnapshotError> {
        let t0 = Instant::now();
        let failed = |e: vcpu::PauseError| SnapshotError::Io { what: "pausing".into(), err: std::io::Error::other(e) };
        vcpu::pause_all(threads).map_err(failed)?;
        let paused = t0.elapsed();
        // What the guest wrote to its disks before the snapshot is on stable storage
        // with it (a restore may come after a host crash).
        for t in &self.virtio.transports {
            t.lock().unwrap().sync_device();
        }
        let vcpus = vcpu::save_all(threads, &self.msrs).map_err(failed)?;
        let vm = VmState::save(&self.vm.fd)
            .map_err(|e| SnapshotError::Io { what: "saving the VM's state".into(), err: std::io::Error::other(e) })?;
        let state = MachineState {
            vcpus,
            vm,
            serial: self.serial.lock().unwrap().state(),
            i8042: self.i8042.lock().unwrap().state(),
            acpi_pm: self.acpi_pm.lock().unwrap().state(),
            virtio: self.virtio.transports.iter().map(|t| t.lock().unwrap().state()).collect(),
            net_mac: self.net_mac,
        };
        let json = serde_json::to_vec(&state).map_err(|e| SnapshotError::Corrupt(e.to_string()))?;
        let file = open_for_snapshot(path, snapshot::size_needed(json.len() as u64, self.identity.memory_mib << 20))?;
        let header = snapshot::write(&file, self.identity.clone(), &json, self.mem)?;
        tracing::info!(
            "snapshot written to {}: vCPUs paused in {:.1} ms, {} KiB of state, {} MiB of memory, {:.1} ms in all",
            path.display(),
            paused.as_secs_f64() * 1e3,
            header.state_len / 1024,
            header.memory_mib,
            t0.elapsed().as_secs_f64() * 1e3
        );
        Ok(())
    }
}

/// Opens `path` to write a snapshot of `needed` bytes: a block device as it is (if it
/// is large enough), anything else created (mode 0600) or truncated.
fn open_for_snapshot(path: &Path, needed: u64) -> Result<File, SnapshotError> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileTypeExt;
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |err| SnapshotError::Io { what, err }
    };
    if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()) {
        let mut f = std::fs::OpenOptions::new().write(true).open(path).map_err(io("opening"))?;
        let size = f.seek(SeekFrom::End(0)).map_err(io("sizing"))?;
        if size < needed {
            return Err(SnapshotError::Io {
                what: format!("writing {}", path.display()),
                err: std::io::Error::other(format!("the device has {size} bytes, the snapshot needs {needed}")),
            });
        }
        return Ok(f);
    }
    // The file holds all of the guest's memory (its keys among it): the owner's alone.
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::fs::PermissionsExt;
    let f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path);
    let f = f.map_err(io("creating"))?;
    // An existing file keeps its mode on open.
    f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io("restricting"))?;
    Ok(f)
}

/// A shutdown request on its way to the guest's keyboard.
#[derive(Default)]
struct ShutdownRequest {
    pending: bool,
    /// What was last said about a refusal, so the log says it once.
    reported: Option<CtrlAltDelError>,
}

impl ShutdownRequest {
    /// The control eventfd fired: takes the requests. Returns true when the VM is to
    /// stop now (the exit reason is then recorded).
    fn on_control(&mut self, control: &VmControl, i8042: &mut I8042, exit: &ExitSignal, started: Instant) -> bool {
        let _ = control.evt.read();
        if control.stop.load(Ordering::SeqCst) {
            tracing::info!("stopping the VM, as the host asked");
            exit.request(ExitReason::Stopped);
            return true;
        }
        if control.shutdown.swap(false, Ordering::SeqCst) {
            self.pending = true;
            self.try_deliver(i8042, started);
        }
        false
    }

    fn try_deliver(&mut self, i8042: &mut I8042, started: Instant) {
        if !self.pending {
            return;
        }
        match i8042.send_ctrl_alt_del() {
            Ok(()) => {
                tracing::info!(
                    "asked the guest to shut down (Ctrl-Alt-Del on its keyboard) {:.1?} after start",
                    started.elapsed()
                );
                self.pending = false;
                self.reported = None;
            }
            Err(e) => {
                if self.reported.as_ref() != Some(&e) {
                    tracing::info!("shutdown request: {e}; Ctrl-Alt-Del is retried until the guest takes it");
                    self.reported = Some(e);
                }
            }
        }
    }
}

/// The virtio devices and what the event loop watches for them.
#[derive(Default)]
struct VirtioDevices {
    /// In slot order.
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// (transport, queue index, ioeventfd) for every virtio queue.
    queues: Vec<(Arc<Mutex<MmioTransport>>, usize, EventFd)>,
    /// (transport, fd) for devices that also react to host-side events; the fd is owned
    /// by the device, which lives as long as its transport here.
    host_events: Vec<(Arc<Mutex<MmioTransport>>, RawFd)>,
}

impl VirtioDevices {
    /// Puts `device` in the next virtio-mmio slot: interrupt through an irqfd, queue
    /// notifications through one ioeventfd per queue. Returns the slot's kernel command
    /// line entry.
    fn attach(
        &mut self,
        vm: &Vm,
        mem: &Arc<vm_memory::GuestMemoryMmap>,
        mmio: &mut Bus,
        device: Box<dyn VirtioDevice>,
    ) -> Result<String, BuildError> {
        let slot = self.transports.len();
        let (addr, irq) = layout::virtio_mmio_slot(slot).ok_or(BuildError::TooManyDevices(slot))?;
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(setup("virtio irq"))?;
        vm.fd.register_irqfd(&irq_evt, irq).map_err(setup("virtio irqfd"))?;
        let transport = Arc::new(Mutex::new(MmioTransport::new(device, mem.clone(), irq_evt)));
        mmio.insert(transport.clone(), addr, layout::VIRTIO_MMIO_SIZE).map_err(setup("virtio-mmio window"))?;
        let (queue_count, host_events_fd) = {
            let t = transport.lock().unwrap();
            (t.queue_count(), t.host_events_fd())
        };
        for q in 0..queue_count {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(setup("virtio ioeventfd"))?;
            vm.fd
                .register_ioevent(&evt, &IoEventAddress::Mmio(addr + REG_QUEUE_NOTIFY), q as u32)
                .map_err(setup("virtio ioeventfd"))?;
            self.queues.push((transport.clone(), q, evt));
        }
        if let Some(fd) = host_events_fd {
            self.host_events.push((transport.clone(), fd));
        }
        self.transports.push(transport);
        Ok(crate::config::virtio_mmio_arg(addr, irq))
    }
}

/// Puts a terminal in raw mode (guest gets every key, including Ctrl-C) and restores it.
struct RawTerminal {
    fd: RawFd,
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    fn enter(fd: RawFd) -> Option<Self> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        // SAFETY: fd is the process's stdin, open for the whole run.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if !nix::unistd::isatty(borrowed).unwrap_or(false) {
            return None;
        }
        let saved = tcgetattr(borrowed).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        // Keep output post-processing so host-side messages stay readable.
        raw.output_flags = saved.output_flags;
        tcsetattr(borrowed, SetArg::TCSANOW, &raw).ok()?;
        Some(Self { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        use nix::sys::termios::{tcsetattr, SetArg};
        // SAFETY: as in enter().
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        let _ = tcsetattr(borrowed, SetArg::TCSANOW, &self.saved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;

    fn i8042() -> (I8042, EventFd, Arc<ExitSignal>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        (I8042::new(exit.clone(), irq.try_clone().unwrap()), irq, exit)
    }

    /// Reads what the guest's keyboard driver would, until the output buffer is empty.
    fn drain(dev: &mut I8042) -> Vec<u8> {
        let mut v = Vec::new();
        let mut b = [0u8];
        loop {
            dev.read(4, &mut b);
            if b[0] & 1 == 0 || v.len() > 32 {
                return v;
            }
            dev.read(0, &mut b);
            v.push(b[0]);
        }
    }

    /// What Linux's i8042 and atkbd drivers leave behind: keyboard interface and
    /// interrupt on in the command byte, scanning enabled.
    fn guest_enables_keyboard(dev: &mut I8042) {
        dev.write(4, &[0x60]);
        dev.write(0, &[0x25]); // keyboard interrupt, system flag, aux off; no translation
        dev.write(0, &[0xf4]);
        assert_eq!(drain(dev), [0xfa]);
    }

    #[test]
    fn a_shutdown_request_before_the_guest_driver_is_typed_once_it_is_there() {
        let control = VmControl::new().unwrap();
        let (mut dev, irq, exit) = i8042();
        let mut shutdown = ShutdownRequest::default();
        // Requested from another thread, before the loop looks: the eventfd keeps it.
        std::thread::scope(|s| {
            s.spawn(|| control.request_shutdown());
        });
        assert!(
            !shutdown.on_control(&control, &mut dev, &exit, Instant::now()),
            "a shutdown request does not stop the VM"
        );
        assert!(shutdown.pending, "the guest has no keyboard driver yet: the request waits");
        assert_eq!(shutdown.reported, Some(CtrlAltDelError::KeyboardNotEnabled));
        assert!(irq.read().is_err(), "nothing typed, no interrupt");
        guest_enables_keyboard(&mut dev);
        let _ = irq.read();
        // The loop's next wakeup delivers it.
        shutdown.try_deliver(&mut dev, Instant::now());
        assert!(!shutdown.pending);
        assert_eq!(irq.read().unwrap(), 1, "IRQ 1 raised");
        let keys = drain(&mut dev);
        assert_eq!(keys[..4], [0x14, 0x11, 0xe0, 0x71], "Ctrl, Alt, Delete pressed (set 2)");
        // Delivered once: later wakeups type nothing more.
        shutdown.try_deliver(&mut dev, Instant::now());
        assert!(drain(&mut dev).is_empty());
        assert_eq!(exit.reason(), ExitReason::Running);
    }

    #[test]
    fn a_stop_request_ends_the_run_with_stopped() {
        let control = VmControl::new().unwrap();
        let (mut dev, _irq, exit) = i8042();
        let mut shutdown = ShutdownRequest::default();
        control.request_shutdown();
        control.stop();
        assert!(shutdown.on_control(&control, &mut dev, &exit, Instant::now()));
        assert_eq!(exit.reason(), ExitReason::Stopped);
        assert_eq!(exit.evt.read().unwrap(), 1, "the loop's exit eventfd is written too");
    }
}
