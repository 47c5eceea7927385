//! Seccomp filters for the processes that face a guest, built with rust-vmm's
//! seccompiler, as Firecracker's VMM does: the VMM process (`kindling boot` on KVM, and
//! inside the emulated runner's level-1 VM) and the emulated runner's relay process on
//! the host. They are installed once everything is set up, before the guest runs, with
//! `no_new_privs`; a forbidden system call kills the process.
//!
//! - Every thread of the VMM process ([`process_filter`], installed on all threads at
//!   once with TSYNC): the event loop, the forwards, the console log, the signal thread.
//!   No exec, no fork (clone only with CLONE_THREAD), no sockets but UNIX and IP ones,
//!   no mounts, namespaces, ptrace, BPF, keyrings or module loading.
//! - vCPU threads ([`vcpu_filter`]), on top: KVM_RUN and what the device emulation on a
//!   vCPU's thread needs (eventfd and console writes, disk I/O, sends on connected
//!   sockets, futexes, memory); no new sockets, threads or files.
//! - The emulated runner's host side ([`Process::Relay`]): the same process filter,
//!   once QEMU runs.
//!
//! `KINDLING_SECCOMP=log` logs would-be violations to the kernel log instead of
//! killing (to find what a new code path needs; under the emulated runner L1's are
//! shown on stderr), `KINDLING_SECCOMP=off` installs none;
//! `KINDLING_TEST_SECCOMP_VIOLATION=VMM|relay` makes a forbidden call right after that side's filters are installed (for the test
//! that checks they kill).

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
    libc::SYS_ioctl,
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
    libc::SYS_ioctl,
    libc::SYS_futex,
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

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).map_err(err)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SandboxError> {
    SeccompRule::new(conditions).map_err(err)
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
    }
    tracing::debug!("{what}: seccomp filter installed ({:?})", mode());
    violate_for_tests(what);
    Ok(())
}

/// Whether the filters are to be installed at all (`KINDLING_SECCOMP=off` says no).
pub fn enabled() -> bool {
    std::env::var("KINDLING_SECCOMP").as_deref() != Ok("off")
}

/// `KINDLING_TEST_SECCOMP_VIOLATION=WHAT` (`VMM`, or `relay` for the emulated runner's
/// host side): once `WHAT`'s filter is in place, a call no filter allows (mount), so
/// that a test can see the process killed.
pub fn violate_for_tests(what: &str) {
    if std::env::var("KINDLING_TEST_SECCOMP_VIOLATION").is_ok_and(|v| v.eq_ignore_ascii_case(what)) {
        eprintln!("kindling: KINDLING_TEST_SECCOMP_VIOLATION={what}: calling mount(2), which the filter forbids");
        // SAFETY: a plain system call with null pointers; the filter kills the process
        // before the kernel looks at them (without a filter it fails with EFAULT).
        unsafe { libc::syscall(libc::SYS_mount, 0usize, 0usize, 0usize, 0usize, 0usize) };
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

    /// The filter, installed in a child process (this test, run again): allowed calls
    /// work, clone3 fails with ENOSYS (so threads still start, through clone), and a
    /// forbidden call kills the process with SIGSYS.
    #[test]
    fn the_process_filter_allows_threads_and_kills_on_a_forbidden_call() {
        const CHILD: &str = "KINDLING_TEST_SANDBOX_CHILD";
        if std::env::var_os(CHILD).is_some() {
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
            println!("filter installed; making a forbidden call");
            std::env::set_var("KINDLING_TEST_SECCOMP_VIOLATION", "test");
            violate_for_tests("test");
            unreachable!("mount(2) returned under the filter");
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "sandbox::tests::the_process_filter_allows_threads_and_kills_on_a_forbidden_call"])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("making a forbidden call"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    }
}
