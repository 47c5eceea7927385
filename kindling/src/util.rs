//! Small helpers that several parts of the binary share.

use std::path::{Path, PathBuf};

/// Which file `exe` is (device, inode, size, modification time): the same only for the
/// same installed executable, different once it is reinstalled.
pub fn exe_identity(exe: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(exe).ok()?;
    Some(format!("{}:{}:{}:{}.{:09}", m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// The first executable file called `name` in the directories of PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// [`which`], then /usr/sbin and /sbin: system tools (e2fsprogs' among them) live there,
/// and an ordinary user's PATH may lack them.
pub fn which_system(name: &str) -> Option<PathBuf> {
    which(name).or_else(|| ["/usr/sbin", "/sbin"].iter().map(|d| Path::new(d).join(name)).find(|p| p.is_file()))
}

/// The directory the emulated runner's level-1 VM unpacks a job into (its kindling,
/// the guest's kernel and initrd, the job's arguments).
pub const L1_JOB_DIR: &str = "/kindling";

/// True in the kindling that runs inside the emulated runner's level-1 VM (PID 1
/// there, with the job's files under [`L1_JOB_DIR`]).
pub fn inside_l1() -> bool {
    std::process::id() == 1 && Path::new(L1_JOB_DIR).join("args").is_file()
}

/// The user's home directory: `$HOME`, else the passwd entry's. Never a shared
/// directory such as /tmp, where another user could plant files first.
pub fn home_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let uid = nix::unistd::geteuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => user.dir,
        // No home anywhere: a path that cannot exist, so that what needs one fails
        // with its name instead of writing somewhere shared.
        _ => PathBuf::from(format!("/nonexistent/home-of-uid-{uid}")),
    }
}

/// Takes an exclusive flock on `file`, held until every descriptor of that open file is
/// closed (the kernel drops it when the holder dies, however it dies). With `wait`
/// false: Ok(false) when another holds it.
pub fn lock_exclusive(file: &std::fs::File, wait: bool) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let flags = if wait { libc::LOCK_EX } else { libc::LOCK_EX | libc::LOCK_NB };
    // SAFETY: flock on a descriptor the caller owns, borrowed for the call.
    if unsafe { libc::flock(file.as_raw_fd(), flags) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) && !wait {
        Ok(false)
    } else {
        Err(e)
    }
}

/// fsync of a directory, so that a rename in it survives a crash.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `data` to `path` so that a reader sees the old file or the new one, never a
/// part, and the new one survives a crash once this returns: a temporary file `tmp`
/// (created with `mode`), fsync, rename over `path`, fsync of the directory.
pub fn write_atomic(path: &Path, tmp: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        sync_dir(dir);
    }
    Ok(())
}

/// For a child's `pre_exec`: unblock every signal. `kindling boot` blocks SIGTERM and
/// SIGINT in all its threads (one thread takes them with sigwait) and a child inherits
/// that mask across exec: QEMU would then never see the SIGTERM its parent-death
/// signal sends, and would outlive a killed `kindling boot`. Only async-signal-safe
/// calls on a local set.
pub fn unblock_all_signals() -> std::io::Result<()> {
    // SAFETY: sigemptyset and pthread_sigmask on a set on this stack; both are
    // async-signal-safe.
    unsafe {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        match libc::pthread_sigmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut()) {
            0 => Ok(()),
            e => Err(std::io::Error::from_raw_os_error(e)),
        }
    }
}
