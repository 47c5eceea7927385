//! `kindling delete`: the VM, its disk, the record and the kubeconfig entries.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use super::*;

/// What `delete` did.
#[derive(Clone, Debug, Serialize)]
pub struct DeleteReport {
    pub name: String,
    pub removed: Vec<PathBuf>,
    pub kept: Vec<PathBuf>,
    /// The kubeconfig whose entries named after the cluster were removed.
    pub kubeconfig: Option<PathBuf>,
}

/// `kindling delete`: stops the cluster, deletes its VM (disk included), its record and
/// its kubeconfig entries.
pub fn delete(name: &str, say: &Say) -> Result<DeleteReport> {
    let ctx = Ctx::connect()?;
    let lock = Lock::cluster(&ctx.paths, name)?;
    let (_, vm) = ctx.cluster(name)?;
    let mut removed = Vec::new();
    let mut kept = Vec::new();
    if let Some(vm) = vm {
        if vm.status == VmStatus::Running {
            stop_locked(&ctx, name, Duration::from_secs(DEFAULT_STOP_WAIT_SECS), false, say, false)?;
        }
        let d = ctx.client.delete(name)?;
        removed.extend(d.removed);
        kept.extend(d.kept);
    }
    for p in [parked_disk(&ctx.paths, name), record_path(&ctx.paths, name)] {
        match std::fs::remove_file(&p) {
            Ok(()) => removed.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot remove {}", p.display()))),
        }
    }
    let pki = identity_dir(&ctx.paths, name);
    if pki.is_dir() {
        std::fs::remove_dir_all(&pki).with_context(|| format!("cannot remove {}", pki.display()))?;
        removed.push(pki);
    }
    // A first start interrupted before the VM existed leaves its directory.
    let dir = ctx.paths.vm_dir(name);
    if dir.is_dir() && !ctx.paths.vm_json(name).exists() {
        for f in [DISK_FILE, "disk.partial", SEED_FILE] {
            if std::fs::remove_file(dir.join(f)).is_ok() {
                removed.push(dir.join(f));
            }
        }
        if std::fs::remove_dir(&dir).is_ok() {
            removed.push(dir);
        }
    }
    let path = kubeconfig::default_path();
    let kubeconfig = kubeconfig::remove_from(&path, name)?.then_some(path);
    lock.remove();
    say.line(format!("cluster {name:?} deleted"));
    if let Some(k) = &kubeconfig {
        say.line(format!("  removed context, cluster and user {name:?} from {}", k.display()));
    }
    for k in &kept {
        say.line(format!("  kept {} (not created by kindling)", k.display()));
    }
    Ok(DeleteReport { name: name.to_string(), removed, kept, kubeconfig })
}
