//! Where a microVM runs.
//!
//! - `kvm`: this process is the VMM, on the host's /dev/kvm.
//! - `emulated`: when hardware virtualization is not usable here (no /dev/kvm, no
//!   permission, or a PVM /dev/kvm that only runs PVM-patched kernels), the same static
//!   `kindling` binary runs as the VMM inside a level-1 VM that QEMU emulates (TCG, with
//!   AMD SVM and nested paging), where Debian's stock KVM modules provide a real /dev/kvm.

pub mod emulated;
pub mod l1watch;
pub mod relay;

use std::path::Path;

pub use kindling_proto::api::RunnerKind;

/// `--runner auto|kvm|emulated` for clap: the values of [`RunnerKind`], listed in the
/// help and completed by shells.
pub fn runner_arg() -> impl clap::builder::TypedValueParser<Value = RunnerKind> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(RunnerKind::ALL.map(RunnerKind::as_str))
        .map(|s| s.parse::<RunnerKind>().expect("one of the possible values"))
}

/// The runner a VM ends up on, once `auto` is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runner {
    /// This process is the VMM, on the host's /dev/kvm.
    Kvm,
    /// The VMM runs inside the emulated runner's level-1 VM.
    Emulated,
}

impl Runner {
    /// Its name, as `--runner` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Runner::Kvm => "kvm",
            Runner::Emulated => "emulated",
        }
    }
}

/// What the host's KVM can do for us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvmStatus {
    Usable,
    /// Not usable; the sentence says why.
    Unusable(String),
}

/// Probes /dev/kvm without creating a VM.
pub fn probe_kvm() -> KvmStatus {
    probe_kvm_at(Path::new("/dev/kvm"), Path::new("/sys/module"))
}

fn probe_kvm_at(dev: &Path, sys_module: &Path) -> KvmStatus {
    if !dev.exists() {
        return KvmStatus::Unusable(
            "there is no /dev/kvm (no hardware virtualization, or the kvm module is not loaded)".into(),
        );
    }
    if sys_module.join("kvm_pvm").exists() {
        return KvmStatus::Unusable(
            "/dev/kvm is PVM (module kvm_pvm), which boots only PVM-patched guest kernels, not a stock Linux".into(),
        );
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => KvmStatus::Usable,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => KvmStatus::Unusable(
            "no permission on /dev/kvm (for the fast path: `sudo usermod -aG kvm $USER`, then log in again)".into(),
        ),
        Err(e) => KvmStatus::Unusable(format!("/dev/kvm cannot be opened: {e}")),
    }
}

/// Picks the runner and says why, for the stderr line every boot prints.
pub fn choose(choice: RunnerKind) -> (Runner, String) {
    match choice {
        RunnerKind::Kvm => (Runner::Kvm, "requested with --runner kvm".into()),
        RunnerKind::Emulated => (Runner::Emulated, "requested with --runner emulated".into()),
        RunnerKind::Auto => match probe_kvm() {
            KvmStatus::Usable => (Runner::Kvm, "/dev/kvm is usable".into()),
            KvmStatus::Unusable(why) => (Runner::Emulated, format!("{why}; running under emulation instead (slower)")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_names_the_reason() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("kvm");
        let sys = d.path().join("module");
        std::fs::create_dir(&sys).unwrap();
        assert!(matches!(probe_kvm_at(&dev, &sys), KvmStatus::Unusable(w) if w.contains("no /dev/kvm")));
        std::fs::write(&dev, b"").unwrap();
        assert_eq!(probe_kvm_at(&dev, &sys), KvmStatus::Usable);
        std::fs::create_dir(sys.join("kvm_pvm")).unwrap();
        assert!(matches!(probe_kvm_at(&dev, &sys), KvmStatus::Unusable(w) if w.contains("PVM")));
    }
}
