//! A cluster's disk: a sparse copy of the root disk image (`kindling images path
//! rootfs`) in the VM's directory, its file grown to `--disk-size`. Written as
//! `<name>.partial` and renamed, so a disk that exists is complete.
//!
//! Only the file grows here: the node's agent grows the filesystem to fill the disk,
//! online, when it boots. The host runs no filesystem tool on a disk the guest has
//! written (a crafted filesystem is a way into e2fsprogs), not even on the pristine
//! copy, so there is one way a disk grows.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

pub const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Room kept beyond the copy itself.
const SLACK: u64 = 64 * MIB;

/// Free bytes for an unprivileged user on the filesystem holding `dir`.
pub fn free_space(dir: &Path) -> Result<u64> {
    let st =
        nix::sys::statvfs::statvfs(dir).with_context(|| format!("cannot check the free space in {}", dir.display()))?;
    #[allow(clippy::unnecessary_cast)]
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Bytes a file occupies on disk (sparse files count only their data).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

/// The error for a full host disk, naming the place and what to do.
pub fn disk_full(what: &str, dir: &Path, need: Option<u64>) -> anyhow::Error {
    let free = free_space(dir).map(mib).unwrap_or(0);
    let need = need.map(|n| format!(" needs about {} MiB and", mib(n))).unwrap_or_default();
    anyhow::anyhow!(
        "the host disk is full: {what}{need} only {free} MiB are free in {}; free some space there (see `df -h {}`), then run the command again",
        dir.display(),
        dir.display()
    )
}

/// Runs a tool; Ok(exit code) with its output, or an error naming it.
fn run(cmd: &mut Command, what: &str) -> Result<(i32, String)> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.code().unwrap_or(-1), text.trim().to_string()))
}

fn is_enospc(text: &str) -> bool {
    text.contains("No space left on device")
}

/// Makes `dest` a sparse copy of `image` grown to `size` bytes. Refuses a size smaller
/// than the image, and says so when the host lacks the space.
pub fn create(image: &Path, dest: &Path, size: u64) -> Result<()> {
    let image_len = std::fs::metadata(image).with_context(|| format!("root disk image {}", image.display()))?.len();
    if size < image_len {
        bail!(
            "--disk-size {} GiB is smaller than the root disk image ({:.1} GiB); use --disk-size {} or more",
            size / GIB,
            image_len as f64 / GIB as f64,
            image_len.div_ceil(GIB)
        );
    }
    sparse_copy(image, dest, size, "copying the root disk")
}

/// Makes `dest` a sparse copy of `from` (only written blocks take room), grown to `size`
/// bytes when that is larger. The copy is made beside `dest` and renamed into place, so
/// `dest` is whole or absent; a host without the room gets [`disk_full`] naming `what`.
pub fn sparse_copy(from: &Path, dest: &Path, size: u64, what: &str) -> Result<()> {
    let dir = dest.parent().context("the destination has no directory")?;
    let need = allocated(from) + SLACK;
    if free_space(dir)? < need {
        return Err(disk_full(what, dir, Some(need)));
    }
    let partial = dest.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    let result = (|| -> Result<()> {
        let (code, text) = run(Command::new("cp").arg("--sparse=always").arg(from).arg(&partial), "cp")?;
        if code != 0 {
            if is_enospc(&text) {
                return Err(disk_full(what, dir, Some(need)));
            }
            bail!("copying {} to {} failed: {text}", from.display(), partial.display());
        }
        grow(&partial, size)?;
        std::fs::rename(&partial, dest)
            .with_context(|| format!("cannot rename {} to {}", partial.display(), dest.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Grows the disk file at `path` to `size` bytes (sparse); does nothing when it is
/// already that large. Returns whether it grew. The node grows its filesystem into the
/// new room at its next boot.
pub fn grow(path: &Path, size: u64) -> Result<bool> {
    let len = std::fs::metadata(path).with_context(|| format!("disk {}", path.display()))?.len();
    if size <= len {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    f.set_len(size).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSPC) => disk_full("growing the disk", dir, None),
        _ => anyhow::Error::new(e).context(format!("cannot grow {}", path.display())),
    })?;
    f.sync_all().with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// e2fsprogs' tools live in /sbin, which an ordinary user's PATH may lack.
    fn tool(name: &str) -> Result<PathBuf> {
        crate::util::which_system(name)
            .with_context(|| format!("{name} not found; install e2fsprogs (`sudo apt-get install e2fsprogs`)"))
    }

    /// A small real ext4 image, made without mounting.
    fn ext4(dir: &Path, mib: u64) -> PathBuf {
        let img = dir.join("rootfs.ext4");
        let content = dir.join("content");
        std::fs::create_dir_all(content.join("etc")).unwrap();
        std::fs::write(content.join("etc/hello"), "kept\n").unwrap();
        let st = Command::new(tool("mkfs.ext4").unwrap())
            .args(["-q", "-d"])
            .arg(&content)
            .arg(&img)
            .arg(format!("{mib}M"))
            .status()
            .unwrap();
        assert!(st.success());
        img
    }

    /// The filesystem's size in bytes (block count times block size).
    fn fs_bytes(img: &Path) -> u64 {
        let out = Command::new(tool("dumpe2fs").unwrap()).arg("-h").arg(img).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| -> u64 {
            let line = text.lines().find(|l| l.starts_with(name)).unwrap();
            line.split_whitespace().last().unwrap().parse().unwrap()
        };
        field("Block count:") * field("Block size:")
    }

    /// The file grows; the filesystem in it is left as it was, for the guest to grow.
    #[test]
    fn a_copy_is_sparse_grown_and_keeps_the_files() {
        let d = tempfile::tempdir().unwrap();
        let img = ext4(d.path(), 32);
        let vm = d.path().join("vm");
        std::fs::create_dir(&vm).unwrap();
        let disk = vm.join("disk.ext4");
        create(&img, &disk, 256 * MIB).unwrap();
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), 256 * MIB);
        assert!(allocated(&disk) < 64 * MIB, "sparse: {} bytes allocated", allocated(&disk));
        assert_eq!(fs_bytes(&disk), 32 * MIB, "the host does not touch the filesystem");
        assert!(!vm.join("disk.partial").exists());
        let out = Command::new(tool("debugfs").unwrap()).arg("-R").arg("cat /etc/hello").arg(&disk).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n");
        // Growing again to the same size changes nothing; a larger size grows it.
        assert!(!grow(&disk, 256 * MIB).unwrap());
        assert!(grow(&disk, 320 * MIB).unwrap());
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), 320 * MIB);
        assert_eq!(fs_bytes(&disk), 32 * MIB);
    }

    #[test]
    fn too_small_a_size_is_refused_and_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let img = ext4(d.path(), 32);
        let disk = d.path().join("disk.ext4");
        let e = create(&img, &disk, 16 * MIB).unwrap_err().to_string();
        assert!(e.contains("smaller than the root disk image") && e.contains("--disk-size 1 "), "{e}");
        assert!(!disk.exists() && !d.path().join("disk.partial").exists());
    }

    #[test]
    fn a_full_disk_is_named() {
        let e = disk_full("copying the root disk", Path::new("/tmp"), Some(3 * GIB)).to_string();
        assert!(e.starts_with("the host disk is full: copying the root disk needs about 3072 MiB and only "), "{e}");
        assert!(e.contains("`df -h /tmp`"), "{e}");
    }
}
