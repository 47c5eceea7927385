//! Dropping root once the host side is set up: `kindling boot` run as root (`--net tap`
//! needs CAP_NET_ADMIN for the tap; inside the emulated runner's level-1 VM it is init)
//! gives up root after the VM is built, before its seccomp filters go in and before the
//! guest runs. Everything root was needed for is open by then: /dev/kvm, the VM and its
//! vCPUs, the disks, the tap, the vsock socket (bound), the forwards' listeners.
//!
//! Whom it becomes ([`target`]):
//! - the user who ran `sudo kindling boot` (`SUDO_UID`, `SUDO_GID`): the VM's files (its
//!   snapshot, console log, vsock socket) are theirs, they can reach the socket, and a
//!   VMM taken over by its guest gets what `kindling boot --net passt` run by that user
//!   would have anyway;
//! - otherwise (root's own shell, a daemon run as root, the level-1 VM) 65534, the
//!   kernel's overflow uid that distributions name `nobody`/`nogroup`, which owns no
//!   files. Several such VMMs share it; the kernel marks a process that changed its
//!   credentials non-dumpable, so they cannot ptrace each other or open each other's
//!   `/proc/<pid>/mem` (seccomp refuses ptrace in any case).
//!
//! Supplementary groups are cleared, then gid and uid set (real, effective and saved:
//! no way back), which clears every capability; `no_new_privs` is set. What the VMM
//! writes later is handed to the target first ([`give`]): the vsock socket (and its
//! directory when kindling made it), the console log, the snapshot file or, in the
//! level-1 VM, the snapshot drive. The console log rotates through descriptors opened
//! at the start, and the forwards reach the vsock socket through one (`forward::
//! keep_reachable`), so neither needs its directory. What it cannot reach as the target
//! (a directory of root's where a snapshot is created or the vsock socket is removed at
//! exit) is named in a warning ([`check_reachable`]).

use std::path::Path;

/// The uid and gid `kindling boot` drops to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// The user ID.
    pub uid: u32,
    /// The group ID.
    pub gid: u32,
}

/// `nobody` and `nogroup`: the kernel's overflow IDs.
pub const NOBODY: Target = Target { uid: 65534, gid: 65534 };

/// Why the drop failed.
#[derive(Debug, thiserror::Error)]
#[error("dropping root to uid {uid} gid {gid}: {what}: {err}")]
pub struct DropError {
    uid: u32,
    gid: u32,
    what: &'static str,
    err: std::io::Error,
}

/// Whom a process running as root drops to; `None` when it does not run as root.
pub fn target() -> Option<Target> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let uid = std::env::var("SUDO_UID").ok();
    let gid = std::env::var("SUDO_GID").ok();
    Some(target_for(uid.as_deref(), gid.as_deref()))
}

/// The sudo caller given by `SUDO_UID` and `SUDO_GID`, when both are IDs other than
/// root's; else [`NOBODY`].
pub fn target_for(sudo_uid: Option<&str>, sudo_gid: Option<&str>) -> Target {
    let id = |s: Option<&str>| s.and_then(|s| s.trim().parse::<u32>().ok()).filter(|&n| n != 0 && n != u32::MAX);
    match (id(sudo_uid), id(sudo_gid)) {
        (Some(uid), Some(gid)) => Target { uid, gid },
        _ => NOBODY,
    }
}

/// Makes `path` (a file or directory kindling made or will write) the target's. A
/// missing path is left alone.
pub fn give(target: Target, path: &Path) -> std::io::Result<()> {
    match std::os::unix::fs::lchown(path, Some(target.uid), Some(target.gid)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Drops every privilege for good: no supplementary groups, `target`'s gid and uid as
/// real, effective and saved IDs (on every thread: the C library's wrappers change them
/// all), `no_new_privs`. Then checks that root cannot be taken back.
pub fn drop_to(target: Target) -> Result<(), DropError> {
    let failed =
        |what: &'static str| move |err: std::io::Error| DropError { uid: target.uid, gid: target.gid, what, err };
    let os = |r: libc::c_int| if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
    // SAFETY: plain system calls (through the C library's all-threads wrappers); no
    // memory is passed but a null group list of length zero.
    unsafe {
        os(libc::setgroups(0, std::ptr::null())).map_err(failed("setgroups"))?;
        os(libc::setresgid(target.gid, target.gid, target.gid)).map_err(failed("setresgid"))?;
        os(libc::setresuid(target.uid, target.uid, target.uid)).map_err(failed("setresuid"))?;
        os(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)).map_err(failed("PR_SET_NO_NEW_PRIVS"))?;
        // Root is gone for good: taking it back fails.
        if libc::setuid(0) == 0 || libc::geteuid() == 0 || libc::getegid() == 0 {
            return Err(failed("checking")(std::io::Error::other("root could be taken back")));
        }
    }
    Ok(())
}

/// The credential lines of this thread's `/proc/thread-self/status` (Uid, Gid, Groups,
/// CapEff, NoNewPrivs; the last is per thread) on one line, for the log.
pub fn credentials() -> String {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    status
        .lines()
        .filter(|l| ["Uid:", "Gid:", "Groups:", "CapEff:", "NoNewPrivs:"].iter().any(|f| l.starts_with(f)))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Once dropped: whether this process can still do `what` at `path` (`access(2)`
/// mode), saying what will not work if not.
pub fn check_reachable(path: &Path, mode: libc::c_int, what: &str) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return };
    // SAFETY: access reads the NUL-terminated path, alive for the call.
    if unsafe { libc::access(c.as_ptr(), mode) } != 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        tracing::warn!("{}: {e} for uid {uid} (root was dropped after setup): {what}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sudo_caller_or_nobody() {
        assert_eq!(target_for(Some("1000"), Some("1001")), Target { uid: 1000, gid: 1001 });
        assert_eq!(target_for(None, None), NOBODY);
        assert_eq!(target_for(Some("1000"), None), NOBODY, "both or neither");
        assert_eq!(target_for(Some("0"), Some("0")), NOBODY, "sudo from root is root: nobody");
        assert_eq!(target_for(Some("x"), Some("-1")), NOBODY, "garbage is not an ID");
        assert_eq!(target_for(Some("4294967295"), Some("5")), NOBODY, "(uid_t)-1 means no change");
    }

    /// The drop itself, in a child process (this test run again) when the test runs as
    /// root: afterwards the IDs are the target's, the groups and capabilities gone, and
    /// root cannot be taken back.
    #[test]
    fn a_dropped_process_cannot_take_root_back() {
        const CHILD: &str = "KINDLING_TEST_PRIVILEGES_CHILD";
        if std::env::var_os(CHILD).is_some() {
            drop_to(Target { uid: 4321, gid: 4322 }).unwrap();
            println!("{}", credentials());
            // SAFETY: setuid with no memory.
            assert_ne!(unsafe { libc::setuid(0) }, 0);
            return;
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "privileges::tests::a_dropped_process_cannot_take_root_back", "--nocapture"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("Uid: 4321 4321 4321 4321; Gid: 4322 4322 4322 4322; Groups:;"), "{stdout}");
        assert!(stdout.contains("CapEff: 0000000000000000"), "{stdout}");
        assert!(stdout.contains("NoNewPrivs: 1"), "{stdout}");
    }
}
