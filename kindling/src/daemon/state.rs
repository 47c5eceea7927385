//! The daemon's persisted state: where it lives, VM name rules, spec validation and the
//! per-VM record (`<state>/vms/<name>/vm.json`).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use kindling_proto::forward::Forward;
use kindling_vmm::config::{DiskConfig, VmConfig, VSOCK_PATH_MAX};

use super::api::{SnapshotInfo, Vm, VmSpec, VmStatus};

/// File names inside a VM's directory. These, and the disks of the spec that live in the
/// directory, are the only files `delete` removes.
pub const VM_JSON: &str = "vm.json";
pub const VM_JSON_TMP: &str = "vm.json.tmp";
pub const CONSOLE_LOG: &str = "console.log";
/// The console log's older half (the VM process rotates console.log at its cap).
pub const CONSOLE_LOG_OLD: &str = "console.log.1";
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// A suspended VM's snapshot: the next start resumes from it.
pub const SNAPSHOT: &str = "snapshot.snap";
/// Where a running VM's VMM writes a snapshot when asked (`kindling boot --snapshot-to`);
/// renamed to [`SNAPSHOT`] once it is complete.
pub const SNAPSHOT_NEXT: &str = "snapshot.next";
/// The snapshot a running VM was resumed from: its memory is read from it while the VM
/// runs, and it is removed when the VM ends (the disk has moved on from it).
pub const SNAPSHOT_RESUMED: &str = "snapshot.resumed";
/// The VM process's TMPDIR (the emulated runner keeps its level-1 initramfs there), so
/// that what a killed VM process leaves behind is in the VM directory, and removed.
pub const VM_TMP: &str = "tmp";

/// The state directory: `$KINDLING_STATE_DIR`, else `$XDG_STATE_HOME/kindling`, else
/// `~/.local/state/kindling`.
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KINDLING_STATE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("kindling");
    }
    crate::util::home_dir().join(".local/state/kindling")
}

/// The daemon's socket when none is given: `$XDG_RUNTIME_DIR/kindling/daemon.sock`, else
/// `<state>/daemon.sock`.
pub fn default_socket(state_dir: &Path) -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("kindling").join("daemon.sock"),
        None => state_dir.join("daemon.sock"),
    }
}

/// The socket a client talks to: `$KINDLING_SOCKET`, else [`default_socket`].
pub fn socket_from_env() -> PathBuf {
    match std::env::var_os("KINDLING_SOCKET").filter(|s| !s.is_empty()) {
        Some(s) => PathBuf::from(s),
        None => default_socket(&state_dir()),
    }
}

/// Paths under the state directory.
#[derive(Clone, Debug)]
pub struct Paths {
    pub state_dir: PathBuf,
}

impl Paths {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self { state_dir: state_dir.into() }
    }
    pub fn from_env() -> Self {
        Self::new(state_dir())
    }
    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.vms_dir().join(name)
    }
    pub fn vm_json(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join(VM_JSON)
    }
    pub fn console_log(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join(CONSOLE_LOG)
    }
    pub fn vsock_socket(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join(VSOCK_SOCKET)
    }
    pub fn snapshot(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join(SNAPSHOT)
    }
    pub fn snapshot_next(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join(SNAPSHOT_NEXT)
    }
    pub fn snapshot_resumed(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join(SNAPSHOT_RESUMED)
    }
    pub fn vm_tmp(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join(VM_TMP)
    }
    /// Where a daemon started on demand (by `Client::connect_or_spawn`) logs.
    pub fn daemon_log(&self) -> PathBuf {
        self.state_dir.join("daemon.log")
    }
    /// Held (flock) by the running daemon: one daemon per state directory.
    pub fn lock_file(&self) -> PathBuf {
        self.state_dir.join("daemon.lock")
    }
}

/// Checks a VM name: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "VM name {name:?} is not allowed: use 1 to 63 characters among lowercase letters a-z, digits 0-9 and '-', \
             starting with a letter or a digit (for example \"node-1\")"
        ))
    }
}

fn check_file(what: &str, field: &str, path: &Path, allow_block: bool) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!(
            "{what} {}: the path is relative; give \"{field}\" as an absolute path (the daemon does not run in your working directory)",
            path.display()
        ));
    }
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!("{what} {}: file not found; fix \"{field}\" to point at an existing file", path.display())
        }
        _ => format!("{what} {}: cannot access it ({e}); check the path and its permissions", path.display()),
    })?;
    let is_block = std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type());
    if meta.is_file() || (allow_block && is_block) {
        Ok(())
    } else if meta.is_dir() {
        Err(format!("{what} {}: is a directory; set \"{field}\" to a file inside it", path.display()))
    } else {
        Err(format!("{what} {}: not a regular file; set \"{field}\" to a regular file", path.display()))
    }
}

/// Longest UNIX socket path the kernel accepts (sun_path is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = kindling_vmm::config::UNIX_PATH_MAX;

/// The VMM's view of a spec: the config `kindling boot` builds from the arguments the
/// daemon passes it (without the vsock device, whose directory may not exist yet, and
/// without a network, which the spec does not have).
pub fn vm_config(spec: &VmSpec) -> VmConfig {
    VmConfig {
        kernel: spec.kernel.clone(),
        initrd: spec.initrd.clone(),
        cmdline: spec.cmdline.clone().unwrap_or_else(|| VmConfig::default_cmdline(!spec.disks.is_empty())),
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        disks: spec.disks.iter().map(|d| DiskConfig { path: d.path.clone(), read_only: d.read_only }).collect(),
        vsock: None,
        net: None,
    }
}

/// Checks a spec before a VM is created from it: the daemon's own rules (absolute
/// paths, each disk once, a socket path that fits), then the VMM's
/// ([`VmConfig::validate`], one set of limits for every way a VM is made). The message
/// names the offending value and the fix.
pub fn validate_spec(spec: &VmSpec, paths: &Paths) -> Result<(), String> {
    check_name(&spec.name)?;
    check_file("kernel", "kernel", &spec.kernel, false)?;
    if let Some(initrd) = &spec.initrd {
        check_file("initrd", "initrd", initrd, false)?;
    }
    for (i, d) in spec.disks.iter().enumerate() {
        check_file("disk", &format!("disks[{i}].path"), &d.path, true)?;
        if spec.disks[..i].iter().any(|o| o.path == d.path) {
            return Err(format!("disk {}: listed twice in \"disks\"; give each disk image once", d.path.display()));
        }
    }
    for f in &spec.forwards {
        f.parse::<Forward>()?;
    }
    if spec.vsock {
        let sock = paths.vsock_socket(&spec.name);
        let len = sock.as_os_str().len();
        if len > VSOCK_PATH_MAX {
            return Err(format!(
                "vsock: the VM's socket {} would be {len} bytes, too long for a UNIX socket with the VMM's per-port suffix \
                 (at most {VSOCK_PATH_MAX}); use a shorter VM name or a shorter state directory (KINDLING_STATE_DIR)",
                sock.display(),
            ));
        }
    }
    vm_config(spec).validate().map(drop).map_err(|e| format!("spec: {e}"))
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// What `vm.json` holds: the spec and the last known state of the VM's process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub status: VmStatus,
    /// The `kindling boot` process of the current (or last) run.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Its start time (/proc/<pid>/stat field 22, clock ticks since boot), so that a
    /// reused pid is not taken for the VM.
    #[serde(default)]
    pub pid_start_time: Option<u64>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub exit_signal: Option<i32>,
    pub created_at: u64,
    #[serde(default)]
    pub started_at: Option<u64>,
    #[serde(default)]
    pub stopped_at: Option<u64>,
    /// The current (or last) run's VMM writes a snapshot at SIGUSR1 (`--snapshot-to`):
    /// without it SIGUSR1 would kill it.
    #[serde(default)]
    pub snapshots: bool,
    /// The current (or last) run was resumed from a snapshot.
    #[serde(default)]
    pub resumed: bool,
}

impl VmRecord {
    pub fn new(spec: VmSpec) -> Self {
        Self {
            spec,
            status: VmStatus::Created,
            pid: None,
            pid_start_time: None,
            exit_code: None,
            exit_signal: None,
            created_at: now_secs(),
            started_at: None,
            stopped_at: None,
            snapshots: false,
            resumed: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Marks the run as over (exit status unknown unless set afterwards).
    pub fn mark_stopped(&mut self) {
        self.status = VmStatus::Stopped;
        self.stopped_at.get_or_insert_with(now_secs);
    }

    pub fn to_vm(&self, paths: &Paths) -> Vm {
        let name = self.name();
        let snapshot = (self.status != VmStatus::Running).then(|| snapshot_info(paths, name)).flatten();
        Vm {
            name: name.to_string(),
            status: if snapshot.is_some() { VmStatus::Suspended } else { self.status },
            spec: self.spec.clone(),
            pid: self.pid,
            exit_code: self.exit_code,
            exit_signal: self.exit_signal,
            dir: paths.vm_dir(name),
            console_log: paths.console_log(name),
            vsock_socket: self.spec.vsock.then(|| paths.vsock_socket(name)),
            created_at: self.created_at,
            started_at: self.started_at,
            stopped_at: self.stopped_at,
            snapshot,
            resumed: self.resumed,
        }
    }

    /// Writes `<vm dir>/vm.json` atomically (temporary file, fsync, rename).
    pub fn save(&self, paths: &Paths) -> std::io::Result<()> {
        let dir = paths.vm_dir(self.name());
        let mut text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        text.push(b'\n');
        crate::util::write_atomic(&dir.join(VM_JSON), &dir.join(VM_JSON_TMP), &text, 0o600)
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_slice(&raw).map_err(|e| format!("{}: not a valid VM record ({e})", path.display()))
    }
}

/// The VM's complete snapshot, if it has one (a suspended VM): only a file whose header
/// reads is one.
pub fn snapshot_info(paths: &Paths, name: &str) -> Option<SnapshotInfo> {
    use std::os::unix::fs::MetadataExt;
    let path = paths.snapshot(name);
    let f = std::fs::File::open(&path).ok()?;
    let header = kindling_vmm::snapshot::read_header(&f).ok()?;
    let meta = f.metadata().ok()?;
    Some(SnapshotInfo {
        path,
        disk_bytes: meta.blocks() * 512,
        memory_mib: header.memory_mib,
        taken_at: meta.mtime().max(0) as u64,
    })
}

/// Loads every `<state>/vms/*/vm.json`, sorted by name. Unreadable records are returned
/// as errors (the daemon logs them and carries on).
pub fn load_all(paths: &Paths) -> (Vec<VmRecord>, Vec<String>) {
    let mut records = Vec::new();
    let mut errors = Vec::new();
    let Ok(entries) = std::fs::read_dir(paths.vms_dir()) else { return (records, errors) };
    for e in entries.flatten() {
        let dir_name = e.file_name().to_string_lossy().to_string();
        let json = e.path().join(VM_JSON);
        if !json.is_file() {
            continue;
        }
        match VmRecord::load(&json) {
            Ok(r) if r.name() == dir_name => records.push(r),
            Ok(r) => errors.push(format!(
                "{}: names VM {:?} but lives in directory {dir_name:?}; skipped",
                json.display(),
                r.name()
            )),
            Err(e) => errors.push(e),
        }
    }
    records.sort_by(|a, b| a.name().cmp(b.name()));
    (records, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::api::DiskSpec;

    #[test]
    fn names() {
        for ok in ["a", "0", "node-1", "a-", &"x".repeat(63)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "A", "node_1", "a.b", "a/b", "é", &"x".repeat(64)] {
            let e = check_name(bad).unwrap_err();
            assert!(e.contains("lowercase letters a-z, digits 0-9 and '-'"), "{e}");
        }
    }

    #[test]
    fn validation_names_the_value_and_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        let kernel = d.path().join("vmlinuz");
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        std::fs::write(&kernel, &elf).unwrap();
        let mut spec = VmSpec::new("vm", &kernel);
        validate_spec(&spec, &paths).unwrap();

        spec.kernel = "/nonexistent/vmlinuz".into();
        let e = validate_spec(&spec, &paths).unwrap_err();
        assert!(e.contains("/nonexistent/vmlinuz") && e.contains("not found"), "{e}");
        spec.kernel = "vmlinuz".into();
        assert!(validate_spec(&spec, &paths).unwrap_err().contains("absolute"));
        spec.kernel = d.path().to_path_buf();
        assert!(validate_spec(&spec, &paths).unwrap_err().contains("is a directory"));
        spec.kernel = kernel.clone();

        spec.cpus = 33;
        assert!(validate_spec(&spec, &paths).unwrap_err().contains("1 to 32"));
        spec.cpus = 1;
        spec.memory_mib = 32;
        assert!(validate_spec(&spec, &paths).unwrap_err().contains("64 to 65536"));
        spec.memory_mib = 512;

        spec.disks = vec![DiskSpec { path: d.path().join("disk.img"), read_only: false }];
        let e = validate_spec(&spec, &paths).unwrap_err();
        assert!(e.contains("disk.img") && e.contains("disks[0].path"), "{e}");
        spec.disks = vec![
            DiskSpec { path: kernel.clone(), read_only: true },
            DiskSpec { path: kernel.clone(), read_only: true },
        ];
        assert!(validate_spec(&spec, &paths).unwrap_err().contains("listed twice"));
        spec.disks.clear();

        spec.forwards = vec!["nope".into()];
        assert!(validate_spec(&spec, &paths).is_err());
        spec.forwards.clear();

        let long = Paths::new(d.path().join("x".repeat(90)));
        spec.vsock = true;
        assert!(validate_spec(&spec, &long).unwrap_err().contains("too long for a UNIX socket"));
        validate_spec(&spec, &paths).unwrap();
    }

    #[test]
    fn records_round_trip_and_load_all_skips_strays() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        let mut r = VmRecord::new(VmSpec::new("b", "/k"));
        std::fs::create_dir_all(paths.vm_dir("b")).unwrap();
        r.save(&paths).unwrap();
        let mut a = VmRecord::new(VmSpec::new("a", "/k"));
        a.status = VmStatus::Running;
        a.pid = Some(42);
        std::fs::create_dir_all(paths.vm_dir("a")).unwrap();
        a.save(&paths).unwrap();
        std::fs::create_dir_all(paths.vm_dir("c")).unwrap(); // no vm.json: not a VM
        std::fs::create_dir_all(paths.vm_dir("d")).unwrap();
        std::fs::write(paths.vm_json("d"), b"{").unwrap();
        let (records, errors) = load_all(&paths);
        assert_eq!(records, vec![a, r.clone()]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        r.mark_stopped();
        let vm = r.to_vm(&paths);
        assert_eq!(vm.console_log, d.path().join("vms/b/console.log"));
        assert_eq!(vm.vsock_socket, None);
    }
}
