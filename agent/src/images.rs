//! The preloaded OCI archives and their import into containerd's k8s.io namespace.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;

use crate::phase;
use crate::supervisor::Reaper;

/// Imports the preloaded OCI archives into containerd's k8s.io namespace (idempotent),
/// except those named in `skip`.
pub fn import_images(reaper: &Reaper, ctr: &str, sock: &str, dir: &Path, skip: &[&str]) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        phase::log(format!("no preloaded images in {}", dir.display()));
        return Ok(());
    };
    let (_, have) = reaper.run(&[ctr, "--address", sock, "-n", "k8s.io", "images", "ls", "-q"])?;
    let marker = dir.join(".imported");
    let stamp = std::fs::read_to_string(&marker).unwrap_or_default();
    let mut archives: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .filter(|p| !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| skip.contains(&n)))
        .collect();
    archives.sort();
    let wanted: String = archives.iter().map(|a| a.display().to_string()).collect::<Vec<_>>().join("\n");
    if stamp == wanted && !have.trim().is_empty() {
        return Ok(());
    }
    for a in &archives {
        import_archive(reaper, ctr, sock, a, false)?;
    }
    let _ = std::fs::write(&marker, wanted);
    Ok(())
}

/// Imports one OCI archive into containerd's k8s.io namespace. Unpacked now when
/// `unpack` (the add-ons, after node-ready: a pod's first CreateContainer then finds
/// its layers ready, instead of unpacking them within the kubelet's 2-minute runtime
/// request timeout, which under emulation and beside other unpacks it can miss again
/// and again, each retry starting over), else on first use (bring-up, where the import
/// is on the way to node-ready).
pub fn import_archive(reaper: &Reaper, ctr: &str, sock: &str, archive: &Path, unpack: bool) -> Result<()> {
    let t = Instant::now();
    let file = archive.display().to_string();
    let mut argv = vec![ctr, "--address", sock, "-n", "k8s.io", "images", "import"];
    if !unpack {
        argv.push("--no-unpack");
    }
    argv.push(&file);
    let (code, out) = reaper.run(&argv)?;
    anyhow::ensure!(code == 0, "importing {}: {out}", archive.display());
    let how = if unpack { " (unpacked)" } else { "" };
    phase::log(format!("imported {}{how} in {:.1}s", archive.display(), t.elapsed().as_secs_f64()));
    Ok(())
}
