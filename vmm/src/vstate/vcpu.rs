//! vCPUs: configuration (CPUID, registers) and one thread each running KVM_RUN,
//! dispatching port I/O and MMIO exits to the buses. vCPU 0 logs its first entry into
//! the guest ([`FIRST_ENTRY_LOG`]), which benchmarks time the VMM's start by.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::vm::{Vm, VmError};
use crate::arch::{cpuid, kernel::BootEntry, regs};
use crate::devices::bus::Bus;
use crate::devices::{ExitReason, ExitSignal};

/// Why a vCPU could not be created, configured or started.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("creating vCPU {index}: {err}")]
    Create {
        /// The vCPU's index.
        index: u8,
        /// KVM's error.
        err: kvm_ioctls::Error,
    },
    /// A KVM ioctl on the vCPU failed.
    #[error("vCPU {index}: {op}: {err}")]
    Kvm {
        /// The vCPU's index.
        index: u8,
        /// The ioctl's name.
        op: &'static str,
        /// KVM's error.
        err: kvm_ioctls::Error,
    },
    /// Setting up the vCPU's registers, FPU, MSRs or LAPIC failed (the `u8` is its index).
    #[error("vCPU {index}: {0}", index = .1)]
    Regs(regs::RegsError, u8),
    /// The vCPU's thread could not be started.
    #[error("starting vCPU thread: {0}")]
    Thread(std::io::Error),
    /// An error of the VM the vCPUs belong to.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// What vCPU 0 logs (at info level) just before its first KVM_RUN: the moment the
/// guest's first instruction runs, which benchmarks time from outside the process.
pub const FIRST_ENTRY_LOG: &str = "vCPU 0: entering the guest (first KVM_RUN)";

/// Signal used to kick a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// A vCPU, configured and ready to [`spawn`](Self::spawn).
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `index` of `count`; the boot vCPU (index 0) starts at `boot`.
    pub fn new(vm: &Vm, index: u8, count: u8, boot: Option<BootEntry>) -> Result<Self, VcpuError> {
        let fd = vm.fd.create_vcpu(u64::from(index)).map_err(|err| VcpuError::Create { index, err })?;
        let mut cpuid = vm.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|err| VcpuError::Kvm {
            index,
            op: "KVM_GET_SUPPORTED_CPUID",
            err,
        })?;
        let caps = cpuid::HostCaps { tsc_deadline: vm.kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) };
        cpuid::customize(&mut cpuid, index, count, caps);
        fd.set_cpuid2(&cpuid).map_err(|err| VcpuError::Kvm { index, op: "KVM_SET_CPUID2", err })?;
        regs::setup_common(&fd).map_err(|e| VcpuError::Regs(e, index))?;
        if let Some(boot) = boot {
            regs::setup_boot_vcpu(&fd, boot.entry.0, boot.zero_page.0).map_err(|e| VcpuError::Regs(e, index))?;
        }
        Ok(Self { index, fd })
    }

    /// Runs the vCPU on its own thread until the guest stops or `stop` is set.
    pub fn spawn(
        mut self,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitSignal>,
        stop: Arc<AtomicBool>,
        filter: Option<Arc<seccompiler::BpfProgram>>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        // Idempotent: the handler only exists so the kick signal interrupts KVM_RUN.
        let _ = register_signal_handler(kick_signal(), noop_handler);
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || {
                // The guest never runs on this thread without its filter.
                if let Some(filter) = filter {
                    if let Err(e) = seccompiler::apply_filter(&filter) {
                        tracing::error!("vCPU {}: installing its seccomp filter: {e}", self.index);
                        exit.request(ExitReason::Error);
                        return;
                    }
                }
                if self.index == 0 {
                    tracing::info!("{FIRST_ENTRY_LOG}");
                }
                while !stop.load(Ordering::Acquire) {
                    if let Some(reason) = self.run_once(&pio, &mmio) {
                        exit.request(reason);
                        break;
                    }
                }
            })
            .map_err(VcpuError::Thread)
    }

    /// One KVM_RUN; returns why the guest stopped, if it did.
    fn run_once(&mut self, pio: &Bus, mmio: &Bus) -> Option<ExitReason> {
        let index = self.index;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                pio.read(u64::from(port), data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Shutdown) => {
                tracing::warn!("vCPU {index}: shutdown (triple fault) without a reset request");
                Some(ExitReason::TripleFault)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitReason::PowerOff),
                KVM_SYSTEM_EVENT_RESET => Some(ExitReason::Reset),
                KVM_SYSTEM_EVENT_CRASH => {
                    tracing::error!("vCPU {index}: guest crashed");
                    Some(ExitReason::Error)
                }
                other => {
                    tracing::warn!("vCPU {index}: ignoring system event {other}");
                    None
                }
            },
            Ok(VcpuExit::Hlt) => {
                tracing::info!("vCPU {index}: halted with interrupts off");
                Some(ExitReason::PowerOff)
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                tracing::error!("vCPU {index}: KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})");
                Some(ExitReason::Error)
            }
            Ok(VcpuExit::InternalError) => {
                tracing::error!(
                    "vCPU {index}: KVM internal error (emulation failure in the guest); {}",
                    self.describe()
                );
                Some(ExitReason::Error)
            }
            Ok(other) => {
                tracing::error!("vCPU {index}: unexpected exit {other:?}");
                Some(ExitReason::Error)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => {
                tracing::error!("vCPU {index}: KVM_RUN failed: {e}; {}", self.describe());
                Some(ExitReason::Error)
            }
        }
    }

    /// Where the vCPU is, for fatal-error messages.
    fn describe(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip, r.rsp, s.cr0, s.cr3, s.cr4, s.efer
            ),
            _ => "registers unavailable".into(),
        }
    }
}

/// Stops vCPU threads: sets `stop` and kicks each thread until it leaves KVM_RUN.
pub fn stop_all(threads: Vec<JoinHandle<()>>, stop: &AtomicBool) {
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(2);
    for t in threads {
        while !t.is_finished() && Instant::now() < deadline {
            let _ = t.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(2));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            tracing::warn!("a vCPU thread did not stop in time; leaving it to process exit");
        }
    }
}
