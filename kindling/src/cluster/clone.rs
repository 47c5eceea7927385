//! `kindling start --name NEW --from BASE`: a new cluster from the snapshot of the
//! suspended cluster BASE, back in the time of a resume instead of a boot.
//!
//! The clone gets a copy of BASE's disk (sparse: only what BASE wrote takes room) as it
//! was at the suspend, BASE's memory snapshot as a hard link (the VMM maps a snapshot
//! privately, so no clone ever writes to it, and a later suspend of the clone writes a
//! file of its own), and its own record with host ports of its own. What it shares with
//! BASE is what its memory holds: the cluster CA and service-account keys (so the
//! identity files are copied, and BASE's admin credentials work on every clone), the
//! node's name and its address inside the VM.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::*;

/// Prepares the clone `o.name` of `base` (record, identity, disk, VM and snapshot) so
/// that starting it resumes it. `existing` is the clone's record left by an
/// interrupted clone of the same base, which is redone.
pub(super) fn clone_prepare(
    ctx: &Ctx,
    o: &StartOptions,
    existing: Option<ClusterRecord>,
    base: &str,
    say: &Say,
) -> Result<(ClusterRecord, Vm)> {
    let name = o.name.as_str();
    check_name(base).map_err(|e| anyhow::anyhow!("--from: {e:#}"))?;
    if base == name {
        bail!("--from {base}: a cluster cannot be cloned onto itself; give the clone another --name");
    }
    // BASE must not start (or be deleted) while its disk and snapshot are copied.
    let _base_lock = Lock::cluster(&ctx.paths, base)?;
    let (base_record, base_vm) = ctx.cluster(base).map_err(|e| anyhow::anyhow!("--from {base}: {e:#}"))?;
    let base_vm = base_vm.with_context(|| {
        format!("--from {base}: cluster {base:?} has no VM (its first start did not finish); start it, then suspend it with `kindling stop`")
    })?;
    match base_vm.status {
        VmStatus::Suspended => {}
        VmStatus::Running => bail!(
            "--from {base}: cluster {base:?} is running; a clone starts from a suspended cluster: `{}` suspends it, then run this again",
            command_for("stop", base)
        ),
        other => bail!(
            "--from {base}: cluster {base:?} is {other} without a snapshot (it was shut down, or its snapshot did not resume): \
             `{}`, then `{}` suspends it",
            command_for("start", base),
            command_for("stop", base)
        ),
    }
    let base_identity = identity(&ctx.paths, base);
    if !base_identity.exists() {
        bail!("--from {base}: cluster {base:?} has no identity files in {}", base_identity.dir.display());
    }
    let base_disk = base_vm.spec.disks.first().map(|d| d.path.clone()).context("--from: the base VM has no disk")?;
    if let Some(r) = existing {
        say.line(format!("clone: redoing the interrupted clone {name:?} of {base:?}"));
        remove_clone_files(ctx, &r.name);
    }

    let record = {
        let _ports = Lock::ports(&ctx.paths)?;
        let mut r = new_record(&ctx.paths, name, base_record.disk_size_gib)?;
        r.addons = base_record.addons.clone();
        r.node = Some(base_record.node_name().to_string());
        r.cloned_from = Some(base.to_string());
        save_record(&ctx.paths, &r)?;
        r
    };
    let result = (|| -> Result<Vm> {
        copy_identity(&base_identity.dir, &identity(&ctx.paths, name).dir)?;
        let vm_dir = ctx.paths.vm_dir(name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&vm_dir)
            .with_context(|| format!("cannot create {}", vm_dir.display()))?;
        let disk_file = disk_path(&ctx.paths, name);
        let size = std::fs::metadata(&base_disk).with_context(|| format!("{}", base_disk.display()))?.len();
        say.line(format!(
            "clone: copying the disk of cluster {base:?} ({:.1} GiB written of {} GiB, sparse)",
            disk::allocated(&base_disk) as f64 / disk::GIB as f64,
            size / disk::GIB
        ));
        disk::sparse_copy(&base_disk, &disk_file, 0, "copying the base cluster's disk")?;
        note_free_space(&vm_dir, record.disk_size_gib, say);
        let seed = write_seed(ctx, name)?;
        let spec = spec_for(
            name,
            base_vm.spec.kernel.clone(),
            disk_file,
            seed,
            &record,
            base_vm.spec.cpus,
            base_vm.spec.memory_mib,
            base_vm.spec.runner,
            None,
        );
        ctx.client.create(&spec).map_err(|e| match e {
            ClientError::Api { status: 409, .. } => name_taken(name),
            e => e.into(),
        })?;
        let (from, to) = (ctx.paths.snapshot(base), ctx.paths.snapshot(name));
        let shared = share_snapshot(&from, &to)?;
        say.line(format!(
            "clone: {} the memory snapshot of cluster {base:?}",
            if shared { "sharing (a hard link to)" } else { "copying" }
        ));
        ctx.vm(name)?.context("the clone's VM is gone")
    })();
    match result {
        Ok(vm) if vm.status == VmStatus::Suspended => Ok((record, vm)),
        Ok(vm) => {
            remove_clone(ctx, &record.name);
            bail!("the clone's VM is {} instead of suspended: its snapshot does not read; nothing was kept", vm.status)
        }
        Err(e) => {
            remove_clone(ctx, &record.name);
            Err(e.context(format!("cloning {base:?} to {name:?} failed; nothing of {name:?} was kept")))
        }
    }
}

/// Copies the identity files (the CA, the admin credentials, the service-account keys)
/// with their modes, into a new 0700 directory.
fn copy_identity(from: &Path, to: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(to);
    std::fs::DirBuilder::new().mode(0o700).create(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let dest = to.join(entry.file_name());
        std::fs::copy(entry.path(), &dest).with_context(|| format!("cannot copy {}", entry.path().display()))?;
        let mode = entry.metadata()?.permissions().mode() & 0o644;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Links the base's snapshot into the clone's VM directory (both belong to this user,
/// on one filesystem); copies it where a link cannot be made. True when linked.
fn share_snapshot(from: &Path, to: &Path) -> Result<bool> {
    let _ = std::fs::remove_file(to);
    match std::fs::hard_link(from, to) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV) | Some(libc::EPERM) | Some(libc::EMLINK)) => {
            disk::sparse_copy(from, to, 0, "copying the memory snapshot")?;
            Ok(false)
        }
        Err(e) => Err(e).with_context(|| format!("cannot link {} to {}", from.display(), to.display())),
    }
}

/// Removes what a clone that did not come about left: its VM (through the daemon),
/// record and identity.
fn remove_clone(ctx: &Ctx, name: &str) {
    if ctx.vm(name).ok().flatten().is_some() {
        let _ = ctx.client.delete(name);
    }
    remove_clone_files(ctx, name);
}

fn remove_clone_files(ctx: &Ctx, name: &str) {
    let _ = std::fs::remove_dir_all(ctx.paths.vm_dir(name));
    let _ = std::fs::remove_dir_all(identity(&ctx.paths, name).dir);
    let _ = std::fs::remove_file(record_path(&ctx.paths, name));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_clone_gets_the_identity_with_its_modes_and_a_link_to_the_snapshot() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.pki");
        std::fs::DirBuilder::new().mode(0o700).create(&base).unwrap();
        for (f, mode) in [("ca.crt", 0o644), ("ca.key", 0o600), ("sa.key", 0o600)] {
            std::fs::write(base.join(f), f).unwrap();
            std::fs::set_permissions(base.join(f), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let clone = d.path().join("clone.pki");
        copy_identity(&base, &clone).unwrap();
        assert_eq!(std::fs::metadata(&clone).unwrap().permissions().mode() & 0o777, 0o700);
        for (f, mode) in [("ca.crt", 0o644), ("ca.key", 0o600), ("sa.key", 0o600)] {
            assert_eq!(std::fs::read_to_string(clone.join(f)).unwrap(), f);
            assert_eq!(std::fs::metadata(clone.join(f)).unwrap().permissions().mode() & 0o777, mode, "{f}");
        }

        let (snap, linked) = (d.path().join("base.snap"), d.path().join("clone.snap"));
        std::fs::write(&snap, b"memory").unwrap();
        std::fs::write(&linked, b"stale").unwrap();
        assert!(share_snapshot(&snap, &linked).unwrap());
        assert_eq!(std::fs::metadata(&snap).unwrap().ino(), std::fs::metadata(&linked).unwrap().ino());
        // The clone's start moves its link away and its end removes it: the base keeps
        // its snapshot.
        std::fs::rename(&linked, d.path().join("clone.resumed")).unwrap();
        std::fs::remove_file(d.path().join("clone.resumed")).unwrap();
        assert_eq!(std::fs::read(&snap).unwrap(), b"memory");
        assert!(share_snapshot(&d.path().join("missing"), &linked).is_err());
    }
}
