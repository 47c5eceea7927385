//! The provisioner daemon's REST API types (JSON), shared by the server and its
//! clients (the CLI, the tests).
//!
//! kindling/openapi.yaml documents the same shapes (schemas VmSpec, Vm, Error, ...); the
//! daemon integration test checks the running server against that document. The
//! limits a spec is checked against are the VMM's (`kindling_vmm::config`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// API version prefix of every route.
pub const API_PREFIX: &str = "/v1";

/// A spec's vCPUs when it names none (also in openapi.yaml).
pub const DEFAULT_CPUS: u32 = 1;
/// A spec's memory when it names none (also in openapi.yaml).
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// How long `stop` waits for the VM to exit after SIGTERM before it sends SIGKILL.
pub const DEFAULT_STOP_TIMEOUT_SECS: u64 = 60;

fn default_cpus() -> u32 {
    DEFAULT_CPUS
}
fn default_memory_mib() -> u64 {
    DEFAULT_MEMORY_MIB
}

/// What a VM is made of: the body of `POST /v1/vms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
    /// Absolute path of the guest kernel (bzImage or ELF vmlinux).
    pub kernel: PathBuf,
    /// Absolute path of an initramfs archive, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `kindling boot`'s default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// vCPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// virtio-blk disks, in order /dev/vda, /dev/vdb, ...
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Give the VM a virtio-vsock device whose host side is `<vm dir>/vsock.sock`.
    #[serde(default)]
    pub vsock: bool,
    /// Host-to-guest TCP port forwards, `[ADDR:]HOSTPORT:GUESTPORT` or `[ADDR:]A-B:C-D`.
    #[serde(default)]
    pub forwards: Vec<String>,
    /// Forward the host ports the guest asks for (`kindling boot --guest-forwards`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guest_forwards: bool,
    /// Where the VM runs.
    #[serde(default)]
    pub runner: RunnerKind,
}

impl VmSpec {
    /// A spec with the defaults: 1 vCPU, 512 MiB, no disks, runner auto.
    pub fn new(name: impl Into<String>, kernel: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            cpus: DEFAULT_CPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            disks: Vec::new(),
            vsock: false,
            forwards: Vec::new(),
            guest_forwards: false,
            runner: RunnerKind::Auto,
        }
    }
}

/// One disk of a spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Absolute path of a raw disk image (or block device).
    pub path: PathBuf,
    /// Offered to the guest read-only; writes are refused.
    #[serde(default)]
    pub read_only: bool,
}

/// Where a VM runs (`kindling boot --runner`): auto picks KVM when it can boot a stock
/// kernel here, the emulated runner otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunnerKind {
    /// KVM when it can run a stock Linux guest, the emulated runner otherwise.
    #[default]
    Auto,
    /// This host's /dev/kvm; fails with the reason when it is not usable.
    Kvm,
    /// A level-1 VM under QEMU's emulator, running kindling on nested KVM.
    Emulated,
}

impl RunnerKind {
    /// Every value, in the order `--runner` lists them.
    pub const ALL: [RunnerKind; 3] = [RunnerKind::Auto, RunnerKind::Kvm, RunnerKind::Emulated];

    /// The name on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            RunnerKind::Auto => "auto",
            RunnerKind::Kvm => "kvm",
            RunnerKind::Emulated => "emulated",
        }
    }
}

impl std::str::FromStr for RunnerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("runner {s:?}: use one of auto, kvm, emulated"))
    }
}

impl std::fmt::Display for RunnerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of a VM's process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmStatus {
    /// Created, never started.
    Created,
    /// Its `kindling boot` process is alive (pid and start time match).
    Running,
    /// Its process has exited.
    Stopped,
    /// Its process has exited after writing a snapshot of the VM (`POST
    /// /v1/vms/{name}/snapshot`): the next start resumes it from there.
    Suspended,
}

impl std::fmt::Display for VmStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmStatus::Created => "created",
            VmStatus::Running => "running",
            VmStatus::Stopped => "stopped",
            VmStatus::Suspended => "suspended",
        })
    }
}

/// A VM as the daemon reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    /// The VM's name (its spec's).
    pub name: String,
    /// Whether its process runs.
    pub status: VmStatus,
    /// What it was created with.
    pub spec: VmSpec,
    /// The VM's `kindling boot` process while it runs (and the last one once stopped).
    pub pid: Option<u32>,
    /// Exit code of the last run, when the daemon saw the process exit (null when it
    /// was re-attached after a daemon restart, or when a signal ended it).
    pub exit_code: Option<i32>,
    /// The signal that ended the last run, when the daemon saw it.
    pub exit_signal: Option<i32>,
    /// The VM's directory: vm.json, console.log, vsock.sock.
    pub dir: PathBuf,
    /// The VM process's stdout and stderr (serial console and VMM messages).
    pub console_log: PathBuf,
    /// Host side of the VM's vsock device, when `spec.vsock` is true.
    pub vsock_socket: Option<PathBuf>,
    /// When it was created, in seconds since the Unix epoch.
    pub created_at: u64,
    /// When its last run started.
    pub started_at: Option<u64>,
    /// When its last run ended.
    pub stopped_at: Option<u64>,
    /// The snapshot the next start resumes from (status `suspended`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotInfo>,
    /// The current (or last) run was resumed from a snapshot rather than booted.
    #[serde(default)]
    pub resumed: bool,
}

/// A suspended VM's snapshot, in its directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The snapshot file (machine state and guest memory).
    pub path: PathBuf,
    /// Bytes it takes on disk (zero pages are holes).
    pub disk_bytes: u64,
    /// Guest memory it holds, in MiB.
    pub memory_mib: u64,
    /// When it was written, in seconds since the Unix epoch.
    pub taken_at: u64,
}

/// Body of `POST /v1/vms/{name}/start` (optional).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// Boot the VM afresh and drop its snapshot, if it has one (default: resume from it).
    #[serde(default)]
    pub cold: bool,
    /// On a resume, the guest's clocks go on from the snapshot's moment instead of moving
    /// on by the time it was away: no timer in the guest fires early, and something in
    /// the guest sets its wall clock (kindling's node agent does, when asked).
    #[serde(default)]
    pub keep_clock: bool,
}

/// Body of `POST /v1/vms/{name}/snapshot` (optional).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Seconds to wait for the snapshot to be written (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// How long a snapshot may take to be written before the daemon gives up on it.
pub const DEFAULT_SNAPSHOT_TIMEOUT_SECS: u64 = 600;

/// Body of `POST /v1/vms/{name}/stop` (optional).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Seconds to wait after SIGTERM before SIGKILL (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// Answer of `DELETE /v1/vms/{name}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// The VM that was deleted.
    pub name: String,
    /// Files the daemon removed.
    pub removed: Vec<PathBuf>,
    /// Files left in place: disks outside the VM directory, and files in it that the
    /// daemon does not know (then the directory is kept too).
    pub kept: Vec<PathBuf>,
}

/// Answer of `GET /v1/version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// kindling's version.
    pub version: String,
    /// "v1".
    pub api: String,
    /// The daemon's process id.
    pub pid: u32,
    /// Where it keeps its VMs.
    pub state_dir: PathBuf,
    /// The socket it serves on.
    pub socket: PathBuf,
    /// Which executable it runs (device, inode, size and modification time): a client
    /// of another build (kindling was reinstalled) restarts it. Absent from daemons
    /// before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
}

/// Every error body: a sentence that says what went wrong and what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The sentence.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_defaults_apply_and_unknown_fields_are_refused() {
        let s: VmSpec = serde_json::from_str(r#"{"name":"a","kernel":"/k"}"#).unwrap();
        assert_eq!(s, VmSpec::new("a", "/k"));
        let e = serde_json::from_str::<VmSpec>(r#"{"name":"a","kernel":"/k","cpu":2}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `cpu`"), "{e}");
        let s: VmSpec =
            serde_json::from_str(r#"{"name":"a","kernel":"/k","runner":"emulated","disks":[{"path":"/d"}]}"#).unwrap();
        assert_eq!(s.runner, RunnerKind::Emulated);
        assert!(!s.disks[0].read_only);
    }
}
