//! A size-capped console log: `kindling boot --console-log PATH` sends everything the
//! process and its children (QEMU under the emulated runner, passt) write to stdout and
//! stderr (the guest's serial console, the VMM's log lines) through a pipe into PATH,
//! which is rotated to `PATH.1` whenever it reaches its cap. The guest controls how much
//! its console prints, so the host disk it may take is bounded: at most twice the cap.
//! Both files are opened when the log is, and a rotation copies the log into `PATH.1`
//! and empties it, through those descriptors: it needs no write access to their
//! directory, which a VMM that dropped root (a root daemon's VM directory) lacks.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// The default cap of each of the two files.
pub const DEFAULT_MAX_MIB: u64 = 16;

/// A log file whose contents move to `<path>.1` (replacing the previous ones) when it
/// reaches `max` bytes.
pub struct RotatingLog {
    max: u64,
    file: File,
    len: u64,
    /// `<path>.1`, open for the rotations.
    older: File,
}

impl RotatingLog {
    /// Opens `path` for appending and `<path>.1` for the rotations (mode 0600 when they
    /// are created).
    pub fn open(path: &Path, max: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).read(true).append(true).mode(0o600).open(path)?;
        let older =
            OpenOptions::new().create(true).write(true).truncate(false).mode(0o600).open(Self::rotated(path))?;
        let len = file.metadata()?.len();
        Ok(Self { max: max.max(4096), file, len, older })
    }

    /// The file that holds the older lines.
    pub fn rotated(path: &Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".1");
        PathBuf::from(p)
    }

    /// Copies the log over `<path>.1` and empties it, through the open descriptors:
    /// pread and pwrite (not `io::copy`, whose copy_file_range the VMM's seccomp filter
    /// does not allow).
    fn rotate(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.older.set_len(0)?;
        let mut buf = vec![0u8; 64 << 10];
        let mut at = 0u64;
        while at < self.len {
            let want = buf.len().min((self.len - at) as usize);
            let n = self.file.read_at(&mut buf[..want], at)?;
            if n == 0 {
                break;
            }
            self.older.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        self.older.sync_data()?;
        // Appends go to the end, which is 0 from here on.
        self.file.set_len(0)?;
        self.len = 0;
        Ok(())
    }
}

impl Write for RotatingLog {
    fn write(&mut self, mut buf: &[u8]) -> std::io::Result<usize> {
        let total = buf.len();
        while !buf.is_empty() {
            if self.len >= self.max {
                self.rotate()?;
            }
            let room = (self.max - self.len).min(buf.len() as u64) as usize;
            self.file.write_all(&buf[..room])?;
            self.len += room as u64;
            buf = &buf[room..];
        }
        Ok(total)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

static DRAIN: Mutex<Option<std::thread::JoinHandle<()>>> = Mutex::new(None);

/// Sends this process's stdout and stderr (and what its children inherit) to a
/// [`RotatingLog`] at `path`. Call [`finish`] before exiting so the last lines land.
pub fn capture_output(path: &Path, max: u64) -> std::io::Result<()> {
    let mut log = RotatingLog::open(path, max)?;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    let mut read = File::from(read);
    let handle = std::thread::Builder::new().name("console-log".into()).spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match read.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    // A full host disk loses lines, not the VM.
                    let _ = log.write_all(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = log.file.sync_data();
    })?;
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: dup2 onto the standard descriptors, which this process owns; the
        // pipe's write end stays open in `write` until the end of this function.
        if unsafe { libc::dup2(write.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    drop::<OwnedFd>(write);
    *DRAIN.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
    Ok(())
}

/// Ends [`capture_output`]: points stdout and stderr at /dev/null, so the pipe closes
/// once children have exited too, and waits (at most two seconds) for the log to get
/// everything written before.
pub fn finish() {
    let Some(handle) = DRAIN.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
    let _ = std::io::stdout().flush();
    if let Ok(null) = OpenOptions::new().write(true).open("/dev/null") {
        for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
            // SAFETY: as in capture_output; `null` is open for the duration.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !handle.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if handle.is_finished() {
        let _ = handle.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_rotated_at_its_cap_and_keeps_two_files() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("console.log");
        let mut log = RotatingLog::open(&path, 4096).unwrap();
        let line = [b'x'; 1000];
        for _ in 0..20 {
            log.write_all(&line).unwrap();
        }
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(len(&path) <= 4096, "{}", len(&path));
        assert_eq!(len(&RotatingLog::rotated(&path)), 4096);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2, "only the log and one older file");
        // 20000 bytes written: the newest are in the log.
        assert_eq!(len(&path), 20000 % 4096);
    }

    /// A rotation goes through the open files, not their paths: it works once the
    /// directory is out of reach (here moved away; for a VMM that dropped root, a
    /// directory of root's), and the older file holds the lines before the newest.
    #[test]
    fn a_rotation_needs_no_access_to_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let (first, moved) = (d.path().join("vm"), d.path().join("moved"));
        std::fs::create_dir(&first).unwrap();
        let mut log = RotatingLog::open(&first.join("console.log"), 4096).unwrap();
        std::fs::rename(&first, &moved).unwrap();
        for i in 0..5u8 {
            log.write_all(&[b'a' + i; 1000]).unwrap();
        }
        assert!(!first.exists(), "nothing was made at the old path");
        let older = std::fs::read(moved.join("console.log.1")).unwrap();
        let newer = std::fs::read(moved.join("console.log")).unwrap();
        assert_eq!(older.len(), 4096);
        assert_eq!((&older[..1000], &older[3000..4000]), (&[b'a'; 1000][..], &[b'd'; 1000][..]));
        assert_eq!(newer.len(), 5000 - 4096);
        assert!(newer.iter().all(|&b| b == b'e'));
    }
}
