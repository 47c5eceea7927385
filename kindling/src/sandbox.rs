//! Seccomp filters for the processes that face a guest, built with rust-vmm's
//! seccompiler, as Firecracker's VMM does: the VMM process (`kindling boot` on KVM, and
//! inside the emulated runner's level-1 VM) and the emulated runner's relay process on
//! the host. They are installed once everything is set up, before the guest runs, with
//! `no_new_privs`; a forbidden system call kills the process.
//!
//! - Every thread of the VMM process ([`process_filter`], installed on all threads at
//!   once with TSYNC): the event loop, the forwards, the console log, the signal thread.
//!   No exec, no fork (clone only with CLONE_THREAD), no sockets but UNIX and IP ones,
//!   no mounts, namespaces, ptrace, BPF, keyrings or module loading. ioctl only with the
//!   requests listed in [`ioctls`]: those of the vCPU threads (which inherit this filter)
//!   and those of the event loop ([`ioctls::VMM`]: a snapshot's reads of the VM's state,
//!   the console's terminal mode, non-blocking vsock clients); no KVM_CREATE_*, no
//!   memory slots, no CPUID, no terminal injection (TIOCSTI).
//! - vCPU threads ([`vcpu_filter`]), on top: KVM_RUN and what the device emulation on a
//!   vCPU's thread needs (eventfd and console writes, disk I/O, sends on connected
//!   sockets, futexes, memory); no new sockets, threads or files; ioctl only with
//!   [`ioctls::VCPU`]'s requests (KVM_RUN, a snapshot's KVM_GET_* of the vCPU, the tap's
//!   TUNSETOFFLOAD).
//! - The emulated runner's host side ([`Process::Relay`]): the same process filter
//!   without any ioctl (it only relays bytes), once QEMU runs.
//!
//! `KINDLING_SECCOMP=log` logs would-be violations to the kernel log instead of
//! killing (to find what a new code path needs; under the emulated runner L1's are
//! shown on stderr; the log names the system call, not its arguments: an ioctl request
//! is found with `strace -f -e trace=ioctl`), `KINDLING_SECCOMP=off` installs none;
//! `KINDLING_TEST_SECCOMP_VIOLATION=SIDE` (`VMM`, `relay`, or `VMM-ioctl`, `relay-ioctl`,
//! `vCPU-ioctl`) makes a forbidden call (or ioctl request) right after that side's
//! filters are installed (for the test that checks they kill).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// What a violation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Kill the process (the default).
    Kill,
    /// Allow the call and log it (`KINDLING_SECCOMP=log`).
    Log,
}

/// The mode `KINDLING_SECCOMP` asks for.
pub fn mode() -> Mode {
    match std::env::var("KINDLING_SECCOMP").as_deref() {
        Ok("log") => Mode::Log,
        _ => Mode::Kill,
    }
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
#[error("seccomp filter: {0}")]
pub struct SandboxError(String);

fn err(e: impl std::fmt::Display) -> SandboxError {
    SandboxError(e.to_string())
}

/// System calls every thread of a kindling process makes once it runs.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sigaltstack,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_tgkill,
    libc::SYS_kill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_prlimit64,
    libc::SYS_getrlimit,
    libc::SYS_uname,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_ftruncate,
    // A snapshot punches holes for the zero pages it skips.
    libc::SYS_fallocate,
    // A sleep or timed wait interrupted by a stop (SIGSTOP, then SIGCONT; a debugger)
    // goes on through restart_syscall: without it a stopped VMM dies when continued.
    libc::SYS_restart_syscall,
    // The event loop's timers (the i8042's and the console's).
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// Sockets and their calls (the forwards, the vsock device's host side, the relay).
const SOCKETS: &[i64] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_shutdown,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
];

/// What a vCPU thread does, beyond KVM_RUN: the device emulation on its thread.
const VCPU: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_futex,
    libc::SYS_restart_syscall,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_pwrite64,
    libc::SYS_pread64,
    libc::SYS_lseek,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    // The stream network backend (passt) is read on the thread that services the queue.
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    // Duplicating and closing an eventfd the device emulation hands a queue, and the
    // event loop's registrations a device changes from a vCPU's MMIO write.
    libc::SYS_fcntl,
    libc::SYS_close,
    libc::SYS_epoll_ctl,
];

/// The ioctl requests the filters allow, as the kernel's headers define them. KVM's are
/// computed from their `<linux/kvm.h>` definitions (kvm-bindings has KVMIO and the
/// structures, whose sizes the numbers encode, but no request numbers); those of the
/// tap and block devices are the VMM's own constants, the terminal's libc's. A unit
/// test checks every number against the header's value.
pub mod ioctls {
    use kvm_bindings::{
        kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_list, kvm_msrs,
        kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
    };
    use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

    /// `_IO(KVMIO, nr)`.
    const fn io(nr: u32) -> u64 {
        ioctl_expr(_IOC_NONE, KVMIO, nr, 0) as u64
    }
    /// `_IOR(KVMIO, nr, T)`: the kernel writes a `T`.
    const fn ior<T>(nr: u32) -> u64 {
        ioctl_expr(_IOC_READ, KVMIO, nr, std::mem::size_of::<T>() as u32) as u64
    }
    /// `_IOWR(KVMIO, nr, T)`: the kernel reads and writes a `T`.
    const fn iowr<T>(nr: u32) -> u64 {
        ioctl_expr(_IOC_READ | _IOC_WRITE, KVMIO, nr, std::mem::size_of::<T>() as u32) as u64
    }

    /// Creating a VM: never allowed once the VMM runs (the tests' forbidden request).
    pub const KVM_CREATE_VM: u64 = io(0x01);
    /// On /dev/kvm: which MSRs a snapshot saves (asked at the first snapshot).
    pub const KVM_GET_MSR_INDEX_LIST: u64 = iowr::<kvm_msr_list>(0x02);
    /// On the VM, for a snapshot: the interrupt controllers' state.
    pub const KVM_GET_IRQCHIP: u64 = iowr::<kvm_irqchip>(0x62);
    /// On the VM, for a snapshot: the KVM clock.
    pub const KVM_GET_CLOCK: u64 = ior::<kvm_clock_data>(0x7c);
    /// On the VM, for a snapshot: the PIT's channels.
    pub const KVM_GET_PIT2: u64 = ior::<kvm_pit_state2>(0x9f);
    /// On a vCPU: running it (also with immediate_exit set, to pause it).
    pub const KVM_RUN: u64 = io(0x80);
    /// On a paused vCPU (a snapshot; a fatal error's message): its registers.
    pub const KVM_GET_REGS: u64 = ior::<kvm_regs>(0x81);
    /// On a paused vCPU: its segment and control registers.
    pub const KVM_GET_SREGS: u64 = ior::<kvm_sregs>(0x83);
    /// On a paused vCPU: its MSRs.
    pub const KVM_GET_MSRS: u64 = iowr::<kvm_msrs>(0x88);
    /// On a paused vCPU: its local APIC.
    pub const KVM_GET_LAPIC: u64 = ior::<kvm_lapic_state>(0x8e);
    /// On a paused vCPU: running, halted or waiting for INIT/SIPI.
    pub const KVM_GET_MP_STATE: u64 = ior::<kvm_mp_state>(0x98);
    /// On a paused vCPU: pending exceptions and interrupts.
    pub const KVM_GET_VCPU_EVENTS: u64 = ior::<kvm_vcpu_events>(0x9f);
    /// On a paused vCPU: its debug registers.
    pub const KVM_GET_DEBUGREGS: u64 = ior::<kvm_debugregs>(0xa1);
    /// On a paused vCPU: FPU and extended state.
    pub const KVM_GET_XSAVE: u64 = ior::<kvm_xsave>(0xa4);
    /// On a paused vCPU: XCR0.
    pub const KVM_GET_XCRS: u64 = ior::<kvm_xcrs>(0xa6);
    /// On a paused vCPU: tells the guest's kvmclock it was paused.
    pub const KVM_KVMCLOCK_CTRL: u64 = io(0xad);
    /// The tap's offloads, set when the guest's driver acks features (a vCPU's MMIO write).
    pub const TUNSETOFFLOAD: u64 = kindling_vmm::devices::virtio::net::tap::TUNSETOFFLOAD;
    /// Zeroing what a snapshot skips on a block device (the emulated runner's snapshot drive).
    pub const BLKZEROOUT: u64 = kindling_vmm::snapshot::BLKZEROOUT;

    /// What a vCPU thread issues: KVM_RUN (also with immediate_exit, when pausing), a
    /// paused vCPU's state for a snapshot (`vstate::state::VcpuState::save`) or for a
    /// fatal error's message, and the tap's offloads from the virtio-net device's feature
    /// ack. A restore's KVM_SET_* all run before the filters are installed.
    pub const VCPU: &[u64] = &[
        KVM_RUN,
        KVM_GET_REGS,
        KVM_GET_SREGS,
        KVM_GET_MSRS,
        KVM_GET_LAPIC,
        KVM_GET_MP_STATE,
        KVM_GET_VCPU_EVENTS,
        KVM_GET_DEBUGREGS,
        KVM_GET_XSAVE,
        KVM_GET_XCRS,
        KVM_KVMCLOCK_CTRL,
        TUNSETOFFLOAD,
    ];

    /// What the VMM's other threads issue once it runs: the event loop's snapshot (the
    /// VM's state, the MSR list, zeroing on a block device), the console (isatty's
    /// TCGETS, raw mode and back with TCSETS), and the vsock device's host clients made
    /// non-blocking (FIONBIO, what Rust's `set_nonblocking` issues).
    pub const VMM: &[u64] = &[
        KVM_GET_MSR_INDEX_LIST,
        KVM_GET_IRQCHIP,
        KVM_GET_CLOCK,
        KVM_GET_PIT2,
        BLKZEROOUT,
        libc::TCGETS,
        libc::TCSETS,
        libc::FIONBIO,
    ];
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).map_err(err)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SandboxError> {
    SeccompRule::new(conditions).map_err(err)
}

/// ioctl's request, the second argument: the kernel takes it as an `unsigned int`, so
/// only its low 32 bits are compared (whatever a caller leaves in the upper ones).
fn request(value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value).map_err(err)
}

/// The rules that allow ioctl with exactly these requests.
fn ioctl_rules<'a>(requests: impl IntoIterator<Item = &'a u64>) -> Result<Vec<SeccompRule>, SandboxError> {
    requests.into_iter().map(|&r| rule(vec![request(r)?])).collect()
}

/// Where a process filter runs: what beyond [`COMMON`] it allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Process {
    /// `kindling boot` on KVM: the VMM, its forwards, console log and signal thread.
    Vmm,
    /// `kindling boot` as PID 1 of the emulated runner's level-1 VM: the VMM, and at
    /// its end the exit status on QEMU's debug-exit port (ioperm) and power-off.
    VmmInL1 {
        /// QEMU's isa-debug-exit port, the one port it may open.
        exit_port: u16,
    },
    /// The emulated runner's host side: the relay, the forwards, QEMU's watch.
    Relay,
}

/// The rules of a process filter: [`COMMON`] and [`SOCKETS`] unconditionally, and
/// clone, socket, prctl and seccomp only in the forms kindling uses.
fn process_rules(process: Process) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &call in COMMON.iter().chain(SOCKETS) {
        rules.insert(call, Vec::new());
    }
    for call in [libc::SYS_openat, libc::SYS_mkdirat, libc::SYS_rmdir, libc::SYS_fchmod, libc::SYS_getdents64] {
        rules.insert(call, Vec::new());
    }
    // Threads only: clone with CLONE_THREAD; a fork would leave the VMM's shape.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(libc::SYS_clone, vec![rule(vec![cond(0, SeccompCmpOp::MaskedEq(thread), thread)?])?]);
    // clone3 passes its flags in memory, where a filter cannot look: the second filter
    // (see [`compile`]) refuses it with ENOSYS, and the C library falls back to clone.
    rules.insert(libc::SYS_clone3, Vec::new());
    // UNIX and IP sockets only: no netlink, packet or vsock sockets.
    let mut socket = Vec::new();
    for family in [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6] {
        socket.push(rule(vec![cond(0, SeccompCmpOp::Eq, family as u64)?])?);
    }
    rules.insert(libc::SYS_socket, socket);
    // Thread names, and no_new_privs before a vCPU thread adds its own filter.
    let mut prctl = Vec::new();
    for option in [libc::PR_SET_NAME, libc::PR_SET_NO_NEW_PRIVS, libc::PR_GET_NAME] {
        prctl.push(rule(vec![cond(0, SeccompCmpOp::Eq, option as u64)?])?);
    }
    rules.insert(libc::SYS_prctl, prctl);
    // Adding a filter only ever takes rights away.
    rules
        .insert(libc::SYS_seccomp, vec![rule(vec![cond(0, SeccompCmpOp::Eq, libc::SECCOMP_SET_MODE_FILTER as u64)?])?]);
    // ioctl: the VMM's requests and its vCPU threads' (they inherit this filter); the
    // relay issues none.
    if process != Process::Relay {
        let mut ioctl = ioctl_rules(ioctls::VCPU.iter().chain(ioctls::VMM))?;
        if let Process::VmmInL1 { .. } = process {
            // tcdrain(3) on the console before the exit status is reported: TCSBRK
            // with a non-zero argument only waits for the output to drain (zero would
            // send a break).
            ioctl.push(rule(vec![request(libc::TCSBRK)?, cond(2, SeccompCmpOp::Eq, 1)?])?);
        }
        rules.insert(libc::SYS_ioctl, ioctl);
    }
    if let Process::VmmInL1 { exit_port } = process {
        let port = u64::from(exit_port);
        rules.insert(libc::SYS_ioperm, vec![rule(vec![cond(0, SeccompCmpOp::Eq, port)?])?]);
        rules.insert(libc::SYS_reboot, vec![rule(vec![cond(2, SeccompCmpOp::Eq, libc::RB_POWER_OFF as u32 as u64)?])?]);
        rules.insert(libc::SYS_sync, Vec::new());
    }
    Ok(rules)
}

/// A filter's programs, installed in order (seccomp then takes, call by call, the most
/// restrictive of their answers).
pub type Programs = Vec<BpfProgram>;

fn mismatch(mode: Mode) -> SeccompAction {
    match mode {
        Mode::Kill => SeccompAction::KillProcess,
        Mode::Log => SeccompAction::Log,
    }
}

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>, mode: Mode) -> Result<BpfProgram, SandboxError> {
    let filter = SeccompFilter::new(rules, mismatch(mode), SeccompAction::Allow, TargetArch::x86_64).map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}

/// The filter of every thread of `process`: its rules, and clone3 refused with ENOSYS.
pub fn process_filter(process: Process, mode: Mode) -> Result<Programs, SandboxError> {
    let main = compile(process_rules(process)?, mode)?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(err)?;
    Ok(vec![main, BpfProgram::try_from(clone3).map_err(err)?])
}

/// The vCPU threads' filter, added on top of the process filter: [`VCPU`] only.
pub fn vcpu_filter(mode: Mode) -> Result<BpfProgram, SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &call in VCPU {
        rules.insert(call, Vec::new());
    }
    rules.insert(libc::SYS_ioctl, ioctl_rules(ioctls::VCPU)?);
    compile(rules, mode)
}

/// Installs `programs` on every thread of this process (TSYNC), with `no_new_privs`.
/// Unless `KINDLING_SECCOMP=off`; then it says so.
pub fn install_all_threads(programs: &Programs, what: &str) -> Result<(), SandboxError> {
    if std::env::var("KINDLING_SECCOMP").as_deref() == Ok("off") {
        tracing::warn!("{what}: KINDLING_SECCOMP=off: running without a seccomp filter");
        return Ok(());
    }
    for program in programs {
        seccompiler::apply_filter_all_threads(program).map_err(err)?;
        INSTALLED.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    tracing::debug!("{what}: seccomp filter installed ({:?})", mode());
    violate_for_tests(what);
    Ok(())
}

static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process runs under a filter of [`install_all_threads`] (then it can
/// start no program).
pub fn installed() -> bool {
    INSTALLED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Whether the filters are to be installed at all (`KINDLING_SECCOMP=off` says no).
pub fn enabled() -> bool {
    std::env::var("KINDLING_SECCOMP").as_deref() != Ok("off")
}

/// Whether `KINDLING_TEST_SECCOMP_VIOLATION` asks for a forbidden call somewhere.
pub fn violation_asked() -> bool {
    std::env::var_os("KINDLING_TEST_SECCOMP_VIOLATION").is_some()
}

/// `KINDLING_TEST_SECCOMP_VIOLATION=WHAT` (`VMM`, or `relay` for the emulated runner's
/// host side): once `WHAT`'s filter is in place, a call no filter allows (mount), so
/// that a test can see the process killed. `WHAT-ioctl` (`VMM-ioctl`, `relay-ioctl`,
/// `vCPU-ioctl`, the last on vCPU 0's thread): an allowed system call, ioctl, with a
/// request that side's filter refuses: KVM_CREATE_VM, or on a vCPU TCGETS, which the
/// process filter allows (for the console) and the vCPU's does not.
pub fn violate_for_tests(what: &str) {
    let Ok(asked) = std::env::var("KINDLING_TEST_SECCOMP_VIOLATION") else { return };
    if asked.eq_ignore_ascii_case(what) {
        eprintln!("kindling: KINDLING_TEST_SECCOMP_VIOLATION={what}: calling mount(2), which the filter forbids");
        // SAFETY: a plain system call with null pointers; the filter kills the process
        // before the kernel looks at them (without a filter it fails with EFAULT).
        unsafe { libc::syscall(libc::SYS_mount, 0usize, 0usize, 0usize, 0usize, 0usize) };
    } else if asked.eq_ignore_ascii_case(&format!("{what}-ioctl")) {
        let (name, request) = match what.eq_ignore_ascii_case("vcpu") {
            true => ("TCGETS", libc::TCGETS),
            false => ("KVM_CREATE_VM", ioctls::KVM_CREATE_VM),
        };
        eprintln!("kindling: KINDLING_TEST_SECCOMP_VIOLATION={asked}: calling ioctl({name}), which the filter forbids");
        // SAFETY: ioctl on no descriptor (-1) with a null argument: the filter kills the
        // process before the kernel looks at them (without a filter it fails with EBADF).
        unsafe { libc::syscall(libc::SYS_ioctl, -1i64, request, 0usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles() {
        for process in [Process::Vmm, Process::VmmInL1 { exit_port: 0xf4 }, Process::Relay] {
            for mode in [Mode::Kill, Mode::Log] {
                let programs = process_filter(process, mode).unwrap();
                assert_eq!(programs.len(), 2);
                assert!(programs.iter().all(|p| !p.is_empty() && p.len() < 4096), "BPF programs are at most 4096");
            }
        }
        assert!(!vcpu_filter(Mode::Kill).unwrap().is_empty());
    }

    /// Every request number the filters name is the one the kernel's headers define
    /// (values from <linux/kvm.h>, <linux/if_tun.h>, <linux/fs.h> and <asm/termbits.h>
    /// on x86_64, as a C program prints them).
    #[test]
    fn ioctl_requests_are_the_kernels() {
        use ioctls::*;
        let expected: &[(&str, u64, u64)] = &[
            ("KVM_CREATE_VM", KVM_CREATE_VM, 0xae01),
            ("KVM_GET_MSR_INDEX_LIST", KVM_GET_MSR_INDEX_LIST, 0xc004ae02),
            ("KVM_GET_IRQCHIP", KVM_GET_IRQCHIP, 0xc208ae62),
            ("KVM_GET_CLOCK", KVM_GET_CLOCK, 0x8030ae7c),
            ("KVM_GET_PIT2", KVM_GET_PIT2, 0x8070ae9f),
            ("KVM_RUN", KVM_RUN, 0xae80),
            ("KVM_GET_REGS", KVM_GET_REGS, 0x8090ae81),
            ("KVM_GET_SREGS", KVM_GET_SREGS, 0x8138ae83),
            ("KVM_GET_MSRS", KVM_GET_MSRS, 0xc008ae88),
            ("KVM_GET_LAPIC", KVM_GET_LAPIC, 0x8400ae8e),
            ("KVM_GET_MP_STATE", KVM_GET_MP_STATE, 0x8004ae98),
            ("KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS, 0x8040ae9f),
            ("KVM_GET_DEBUGREGS", KVM_GET_DEBUGREGS, 0x8080aea1),
            ("KVM_GET_XSAVE", KVM_GET_XSAVE, 0x9000aea4),
            ("KVM_GET_XCRS", KVM_GET_XCRS, 0x8188aea6),
            ("KVM_KVMCLOCK_CTRL", KVM_KVMCLOCK_CTRL, 0xaead),
            ("TUNSETOFFLOAD", TUNSETOFFLOAD, 0x400454d0),
            ("BLKZEROOUT", BLKZEROOUT, 0x127f),
            ("TCGETS", libc::TCGETS, 0x5401),
            ("TCSETS", libc::TCSETS, 0x5402),
            ("TCSBRK", libc::TCSBRK, 0x5409),
            ("FIONBIO", libc::FIONBIO, 0x5421),
        ];
        for &(name, ours, header) in expected {
            assert_eq!(ours, header, "{name}: {ours:#x}, the header says {header:#x}");
        }
        // What the vCPU threads issue, the process filter (which they inherit) allows.
        assert!(VCPU.iter().all(|r| !VMM.contains(r)), "the lists do not overlap");
        assert!(!VCPU.contains(&KVM_CREATE_VM) && !VMM.contains(&KVM_CREATE_VM));
    }

    const CHILD: &str = "KINDLING_TEST_SANDBOX_CHILD";

    /// In the child: the VMM's process filter, the allowed calls and requests, then the
    /// forbidden one `case` names.
    fn child_case(case: &str) -> ! {
        use std::os::fd::AsRawFd;
        // socketpair(2) is not allowed; the VMM's sockets come made, or from accept.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let programs = process_filter(Process::Vmm, Mode::Kill).unwrap();
        for p in &programs {
            seccompiler::apply_filter(p).unwrap();
        }
        // SAFETY: clone3 with a null argument, refused before the kernel reads it.
        let r = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
        assert_eq!((r, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::ENOSYS)));
        assert_eq!(std::thread::spawn(|| 7).join().unwrap(), 7);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), b"still allowed").unwrap();
        // Allowed requests work: FIONBIO (set_nonblocking), TCGETS (isatty).
        a.set_nonblocking(true).unwrap();
        // SAFETY: isatty on an open descriptor.
        assert_eq!(unsafe { libc::isatty(file.as_file().as_raw_fd()) }, 0, "TCGETS answers ENOTTY, not SIGSYS");
        // A sleep across a stop and a continue (restart_syscall) survives.
        println!("sleeping");
        std::thread::sleep(std::time::Duration::from_millis(1500));
        println!("slept through a stop");
        match case {
            "mount" => {
                println!("filter installed; making a forbidden call");
                std::env::set_var("KINDLING_TEST_SECCOMP_VIOLATION", "test");
                violate_for_tests("test");
            }
            "ioctl" => {
                println!("filter installed; making a forbidden ioctl request");
                std::env::set_var("KINDLING_TEST_SECCOMP_VIOLATION", "VMM-ioctl");
                violate_for_tests("VMM");
            }
            _ => {
                // A vCPU thread: its filter on top; TCGETS, fine on the event loop, is not.
                std::thread::spawn(|| {
                    seccompiler::apply_filter(&vcpu_filter(Mode::Kill).unwrap()).unwrap();
                    println!("vCPU filter installed; making a request only the event loop may make");
                    std::env::set_var("KINDLING_TEST_SECCOMP_VIOLATION", "vCPU-ioctl");
                    violate_for_tests("vCPU");
                })
                .join()
                .unwrap();
            }
        }
        unreachable!("the forbidden call returned under the filter");
    }

    /// The filter, installed in a child process (this test, run again): allowed calls
    /// and ioctl requests work, clone3 fails with ENOSYS (so threads still start, through
    /// clone), a sleep survives a stop and continue, and a forbidden call kills the
    /// process with SIGSYS: mount(2), an ioctl request no filter allows (KVM_CREATE_VM),
    /// or on a thread with the vCPU filter a request only the event loop may make.
    #[test]
    fn the_process_filter_allows_threads_and_kills_on_a_forbidden_call() {
        const TEST: &str = "sandbox::tests::the_process_filter_allows_threads_and_kills_on_a_forbidden_call";
        if let Ok(case) = std::env::var(CHILD) {
            child_case(&case);
        }
        use std::os::unix::process::ExitStatusExt;
        for (case, says) in [
            ("mount", "making a forbidden call"),
            ("ioctl", "calling ioctl(KVM_CREATE_VM)"),
            ("vcpu-ioctl", "calling ioctl(TCGETS)"),
        ] {
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
                .env(CHILD, case)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            // Stop and continue the child while it sleeps.
            let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut seen = String::new();
            while !seen.contains("sleeping") {
                if std::io::BufRead::read_line(&mut stdout, &mut seen).unwrap() == 0 {
                    break;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
            std::io::Read::read_to_string(&mut stdout, &mut seen).unwrap();
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            let all = format!("{seen}\n{stderr}");
            assert!(seen.contains("slept through a stop"), "{case}: {all}");
            assert!(all.contains(says), "{case}: {all}");
            assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{case}: {all}");
        }
    }
}
