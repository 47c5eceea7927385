//! vCPUs: configuration (CPUID, registers) and one thread each running KVM_RUN,
//! dispatching port I/O and MMIO exits to the buses. vCPU 0 logs its first entry into
//! the guest ([`FIRST_ENTRY_LOG`]), which benchmarks time the VMM's start by.
//!
//! The event loop pauses the vCPUs for a snapshot through each thread's
//! [`VcpuHandle`], as Firecracker does: it sends a request and kicks the thread with a
//! signal until it answers (a kick that lands before KVM_RUN is not lost: the next one
//! comes 2 ms later). A paused thread first finishes the exit it was handling (one
//! KVM_RUN with `immediate_exit` set, so KVM completes a pending port or MMIO read and
//! returns at once), then only saves its state or resumes when asked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::state::{StateError, VcpuState};
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

/// The CPUID vCPU `index` of `count` gets: what KVM supports, with kindling's topology.
pub fn guest_cpuid(vm: &Vm, index: u8, count: u8) -> Result<kvm_bindings::CpuId, VcpuError> {
    let mut cpuid = vm.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|err| VcpuError::Kvm {
        index,
        op: "KVM_GET_SUPPORTED_CPUID",
        err,
    })?;
    let caps = cpuid::HostCaps { tsc_deadline: vm.kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) };
    cpuid::customize(&mut cpuid, index, count, caps);
    Ok(cpuid)
}

/// A vCPU, configured and ready to [`spawn`](Self::spawn).
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `index` of `count`; the boot vCPU (index 0) starts at `boot`.
    pub fn new(vm: &Vm, index: u8, count: u8, boot: Option<BootEntry>) -> Result<Self, VcpuError> {
        let fd = vm.fd.create_vcpu(u64::from(index)).map_err(|err| VcpuError::Create { index, err })?;
        let cpuid = guest_cpuid(vm, index, count)?;
        fd.set_cpuid2(&cpuid).map_err(|err| VcpuError::Kvm { index, op: "KVM_SET_CPUID2", err })?;
        regs::setup_common(&fd).map_err(|e| VcpuError::Regs(e, index))?;
        if let Some(boot) = boot {
            regs::setup_boot_vcpu(&fd, boot.entry.0, boot.zero_page.0).map_err(|e| VcpuError::Regs(e, index))?;
        }
        Ok(Self { index, fd })
    }

    /// Puts a snapshot's state back into this vCPU (its CPUID is set already).
    pub fn restore(&self, state: &VcpuState) -> Result<(), StateError> {
        state.restore(&self.fd)
    }

    /// Runs the vCPU on its own thread until the guest stops or `stop` is set; the
    /// handle pauses it, saves its state and resumes it.
    pub fn spawn(
        mut self,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitSignal>,
        stop: Arc<AtomicBool>,
        filter: Option<Arc<seccompiler::BpfProgram>>,
        after_filter: Option<fn(u8)>,
    ) -> Result<VcpuHandle, VcpuError> {
        // Idempotent: the handler only exists so the kick signal interrupts KVM_RUN.
        let _ = register_signal_handler(kick_signal(), noop_handler);
        let (req_tx, req_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let index = self.index;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || {
                // The guest never runs on this thread without its filter.
                if let Some(filter) = filter {
                    if let Err(e) = seccompiler::apply_filter(&filter) {
                        tracing::error!("vCPU {}: installing its seccomp filter: {e}", self.index);
                        exit.request(ExitReason::Error);
                        return;
                    }
                    if let Some(after) = after_filter {
                        after(self.index);
                    }
                }
                if self.index == 0 {
                    tracing::info!("{FIRST_ENTRY_LOG}");
                }
                while !stop.load(Ordering::Acquire) {
                    if let Ok(Request::Pause) = req_rx.try_recv() {
                        if !self.paused(&req_rx, &resp_tx, &stop) {
                            break;
                        }
                        continue;
                    }
                    if let Some(reason) = self.run_once(&pio, &mmio) {
                        exit.request(reason);
                        break;
                    }
                }
            })
            .map_err(VcpuError::Thread)?;
        Ok(VcpuHandle { index, thread, requests: req_tx, answers: resp_rx })
    }

    /// Paused: finishes the exit in progress, says so, then saves state when asked
    /// until told to resume (true) or to stop (false).
    fn paused(&mut self, requests: &Receiver<Request>, answers: &Sender<Answer>, stop: &AtomicBool) -> bool {
        // KVM completes a pending port/MMIO read into the registers on the next
        // KVM_RUN; with immediate_exit set that run returns EINTR without entering the
        // guest, and the registers saved next are complete.
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        if answers.send(Answer::Paused).is_err() {
            return false;
        }
        loop {
            match requests.recv_timeout(Duration::from_millis(100)) {
                Ok(Request::Save(msrs)) => {
                    if answers.send(Answer::Saved(VcpuState::save(&self.fd, &msrs).map(Box::new))).is_err() {
                        return false;
                    }
                }
                Ok(Request::Resume) => return true,
                Ok(Request::Pause) => {
                    if answers.send(Answer::Paused).is_err() {
                        return false;
                    }
                }
                Err(RecvTimeoutError::Timeout) if !stop.load(Ordering::Acquire) => {}
                Err(_) => return false,
            }
        }
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

/// What the event loop asks of a vCPU thread.
enum Request {
    Pause,
    Save(Arc<Vec<u32>>),
    Resume,
}

/// What a vCPU thread answers.
enum Answer {
    Paused,
    Saved(Result<Box<VcpuState>, StateError>),
}

/// Why vCPUs could not be paused or their state saved.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// The thread ended (the guest stopped) or did not answer.
    #[error("vCPU {0} did not pause within {1:?} (the guest may be stopping)")]
    NoAnswer(u8, Duration),
    /// Saving its state failed.
    #[error("saving vCPU {0}'s state: {1}")]
    State(u8, StateError),
}

/// How long a vCPU has to answer a pause.
const PAUSE_DEADLINE: Duration = Duration::from_secs(5);

/// A running vCPU thread.
pub struct VcpuHandle {
    index: u8,
    thread: JoinHandle<()>,
    requests: Sender<Request>,
    answers: Receiver<Answer>,
}

impl VcpuHandle {
    fn ask(&self, request: Request) -> Result<Answer, PauseError> {
        let no_answer = || PauseError::NoAnswer(self.index, PAUSE_DEADLINE);
        self.requests.send(request).map_err(|_| no_answer())?;
        let deadline = Instant::now() + PAUSE_DEADLINE;
        loop {
            let _ = self.thread.kill(kick_signal());
            match self.answers.recv_timeout(Duration::from_millis(2)) {
                Ok(a) => return Ok(a),
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => return Err(no_answer()),
            }
        }
    }
}

/// Pauses every vCPU: each has left KVM_RUN with its exit complete when this returns.
pub fn pause_all(handles: &[VcpuHandle]) -> Result<(), PauseError> {
    for h in handles {
        match h.ask(Request::Pause)? {
            Answer::Paused => {}
            Answer::Saved(_) => return Err(PauseError::NoAnswer(h.index, PAUSE_DEADLINE)),
        }
    }
    Ok(())
}

/// The state of every (paused) vCPU, with the MSRs in `msrs`.
pub fn save_all(handles: &[VcpuHandle], msrs: &Arc<Vec<u32>>) -> Result<Vec<VcpuState>, PauseError> {
    let mut states = Vec::with_capacity(handles.len());
    for h in handles {
        // A paused thread blocks in recv; no kick needed, but ask() kicks harmlessly.
        match h.ask(Request::Save(msrs.clone()))? {
            Answer::Saved(Ok(s)) => states.push(*s),
            Answer::Saved(Err(e)) => return Err(PauseError::State(h.index, e)),
            Answer::Paused => return Err(PauseError::NoAnswer(h.index, PAUSE_DEADLINE)),
        }
    }
    Ok(states)
}

/// Resumes every paused vCPU.
pub fn resume_all(handles: &[VcpuHandle]) {
    for h in handles {
        let _ = h.requests.send(Request::Resume);
    }
}

/// Stops vCPU threads: sets `stop` and kicks each thread until it leaves KVM_RUN.
pub fn stop_all(threads: Vec<VcpuHandle>, stop: &AtomicBool) {
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(2);
    for h in threads {
        let t = h.thread;
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
