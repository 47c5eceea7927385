//! The daemon's HTTP server: the REST API of kindling/openapi.yaml on a UNIX socket.
//!
//! Every error is `{"error": "..."}` with a sentence that says what to do; status codes:
//! 400 bad input, 404 unknown VM (or route), 405 wrong method, 409 name taken / already
//! running / not running, 500 otherwise.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::api::{
    self, Deleted, ErrorBody, SnapshotRequest, StartRequest, StopRequest, VersionInfo, Vm, VmSpec, VmStatus,
};
use super::state::{self, validate_spec, Paths, VmRecord};
use super::vm_process::{self, Launch, Stopped};

/// Every route the server answers (method, path); the conformance test checks that
/// openapi.yaml documents exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/version"),
    ("GET", "/v1/vms"),
    ("POST", "/v1/vms"),
    ("GET", "/v1/vms/{name}"),
    ("DELETE", "/v1/vms/{name}"),
    ("POST", "/v1/vms/{name}/start"),
    ("POST", "/v1/vms/{name}/stop"),
    ("POST", "/v1/vms/{name}/snapshot"),
    ("GET", "/v1/vms/{name}/console"),
];

/// Longest `timeout_secs` a stop accepts.
pub const MAX_STOP_TIMEOUT_SECS: u64 = 3600;
/// How much of console.log `GET .../console` returns at most (its end).
const CONSOLE_MAX_BYTES: u64 = 16 << 20;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }
    fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    fn conflict(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, m)
    }
    fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, m)
    }
    fn no_vm(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("no VM named {name:?}; list the VMs with GET /v1/vms (`kindling` lists them too)"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!("{}", self.message);
        } else {
            tracing::debug!("{}: {}", self.status, self.message);
        }
        (self.status, Json(ErrorBody { error: self.message })).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// One VM: its record, and a lock that serializes start, stop and delete.
struct VmSlot {
    op: tokio::sync::Mutex<()>,
    rec: Mutex<VmRecord>,
    /// Set by the exit watcher of a process this daemon started, once it has recorded
    /// the exit status.
    exited: Mutex<Option<watch::Receiver<bool>>>,
    /// Set (under `rec`) when the VM is deleted, so that late writers do not recreate it.
    deleted: AtomicBool,
}

impl VmSlot {
    fn new(rec: VmRecord) -> Arc<Self> {
        Arc::new(Self {
            op: tokio::sync::Mutex::new(()),
            rec: Mutex::new(rec),
            exited: Mutex::new(None),
            deleted: AtomicBool::new(false),
        })
    }
    fn rec(&self) -> MutexGuard<'_, VmRecord> {
        self.rec.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The daemon's state: the VMs, by name.
pub struct Daemon {
    paths: Paths,
    socket: PathBuf,
    /// The `kindling` executable that runs `kindling boot` (resolved at startup).
    exe: PathBuf,
    vms: Mutex<BTreeMap<String, Arc<VmSlot>>>,
}

impl Daemon {
    /// Loads every VM record and re-attaches: a VM whose process still runs (same pid
    /// and start time) stays `running`, the others become `stopped`.
    pub fn load(paths: Paths, socket: PathBuf, exe: PathBuf) -> Self {
        let (records, errors) = state::load_all(&paths);
        for e in errors {
            tracing::warn!("ignoring a VM record: {e}");
        }
        let mut vms = BTreeMap::new();
        for mut rec in records {
            if rec.status == VmStatus::Running {
                let alive = matches!((rec.pid, rec.pid_start_time), (Some(p), Some(t)) if vm_process::is_alive(p, t));
                if alive {
                    tracing::info!("VM {}: still running (pid {}), re-attached", rec.name(), rec.pid.unwrap_or(0));
                } else {
                    tracing::info!("VM {}: its process is gone; now stopped", rec.name());
                    rec.mark_stopped();
                    if let Err(e) = rec.save(&paths) {
                        tracing::warn!("VM {}: cannot update its record: {e}", rec.name());
                    }
                }
            }
            vms.insert(rec.name().to_string(), VmSlot::new(rec));
        }
        Self { paths, socket, exe, vms: Mutex::new(vms) }
    }

    fn vms(&self) -> MutexGuard<'_, BTreeMap<String, Arc<VmSlot>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, name: &str) -> ApiResult<Arc<VmSlot>> {
        self.vms().get(name).cloned().ok_or_else(|| ApiError::no_vm(name))
    }

    /// After waiting for a slot's lock: is it still the registered VM (not deleted)?
    fn still_there(&self, name: &str, slot: &Arc<VmSlot>) -> ApiResult<()> {
        match self.vms().get(name) {
            Some(s) if Arc::ptr_eq(s, slot) => Ok(()),
            _ => Err(ApiError::no_vm(name)),
        }
    }

    /// The record with its status brought up to date (a `running` VM whose process has
    /// exited becomes `stopped`).
    fn refresh(&self, slot: &VmSlot) -> VmRecord {
        let mut rec = slot.rec();
        if rec.status == VmStatus::Running {
            let alive = matches!((rec.pid, rec.pid_start_time), (Some(p), Some(t)) if vm_process::is_alive(p, t));
            if !alive {
                rec.mark_stopped();
                if !slot.deleted.load(Ordering::SeqCst) {
                    if let Err(e) = rec.save(&self.paths) {
                        tracing::warn!("VM {}: cannot update its record: {e}", rec.name());
                    }
                }
            }
        }
        rec.clone()
    }

    fn save(&self, rec: &VmRecord) -> ApiResult<()> {
        rec.save(&self.paths).map_err(|e| {
            ApiError::internal(format!(
                "VM {}: cannot write its record {}: {e}; check that the state directory is writable",
                rec.name(),
                self.paths.vm_json(rec.name()).display()
            ))
        })
    }

    /// Stops a running VM: SIGTERM, then SIGKILL after `timeout`.
    async fn stop_vm(&self, slot: &Arc<VmSlot>, timeout: Duration) -> ApiResult<()> {
        let rec = self.refresh(slot);
        let (Some(pid), Some(start)) = (rec.pid, rec.pid_start_time) else { return Ok(()) };
        if rec.status != VmStatus::Running {
            return Ok(());
        }
        tracing::info!("VM {}: stopping (pid {pid}, SIGTERM, SIGKILL after {timeout:?})", rec.name());
        let outcome = vm_process::stop(pid, start, timeout).await;
        if outcome == Stopped::Stuck {
            return Err(ApiError::internal(format!(
                "VM {}: its process {pid} did not exit even after SIGKILL (see `cat /proc/{pid}/stack`; it may be stuck in disk I/O); try again later",
                rec.name()
            )));
        }
        self.record_exit(slot, pid).await?;
        tracing::info!("VM {}: stopped ({outcome:?})", rec.name());
        Ok(())
    }

    /// After the VM process `pid` has exited: lets its watcher (for a process this daemon
    /// started) record the exit status, removes the run's TMPDIR and marks the record
    /// stopped; returns the exit code, when known.
    async fn record_exit(&self, slot: &Arc<VmSlot>, pid: u32) -> ApiResult<Option<i32>> {
        let exited = slot.exited.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(mut rx) = exited {
            let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|done| *done)).await;
        }
        let mut r = slot.rec();
        vm_process::remove_tmp(&self.paths, r.name());
        if r.status == VmStatus::Running && r.pid == Some(pid) {
            r.mark_stopped();
            self.save(&r)?;
        }
        Ok(r.exit_code)
    }
}

/// Waits for a VM process this daemon started, and records how it ended.
async fn watch_exit(
    d: Arc<Daemon>,
    slot: Arc<VmSlot>,
    mut child: tokio::process::Child,
    pid: u32,
    start: u64,
    done: watch::Sender<bool>,
) {
    let status = child.wait().await;
    {
        let mut rec = slot.rec();
        let name = rec.name().to_string();
        match &status {
            Ok(st) => tracing::info!("VM {name}: process {pid} exited ({st})"),
            Err(e) => tracing::warn!("VM {name}: waiting for process {pid} failed: {e}"),
        }
        if rec.pid == Some(pid) && rec.pid_start_time == Some(start) {
            rec.mark_stopped();
            if let Ok(st) = &status {
                rec.exit_code = st.code();
                rec.exit_signal = std::os::unix::process::ExitStatusExt::signal(st);
            }
            if !slot.deleted.load(Ordering::SeqCst) {
                if let Err(e) = rec.save(&d.paths) {
                    tracing::warn!("VM {name}: cannot record its exit: {e}");
                }
            }
        }
    }
    vm_process::reap_session(pid).await;
    if !slot.deleted.load(Ordering::SeqCst) && slot.rec().pid == Some(pid) {
        let name = slot.rec().name().to_string();
        vm_process::remove_tmp(&d.paths, &name);
        // The run's disks have moved on from the snapshot it resumed from.
        let _ = std::fs::remove_file(d.paths.snapshot_resumed(&name));
    }
    let _ = done.send(true);
}

fn vm_name(path: Result<UrlPath<String>, PathRejection>) -> ApiResult<String> {
    path.map(|UrlPath(n)| n).map_err(|e| ApiError::bad_request(format!("bad VM name in the URL: {e}")))
}

fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>, what: &str) -> ApiResult<Option<T>> {
    let body = body.map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| ApiError::bad_request(format!("the request body is not {what}: {e}")))
}

async fn version(State(d): State<Arc<Daemon>>) -> Json<VersionInfo> {
    Json(VersionInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        api: "v1".to_string(),
        pid: std::process::id(),
        state_dir: d.paths.state_dir.clone(),
        socket: d.socket.clone(),
        // The file this process runs, even when its path now names a newer one.
        build: crate::util::exe_identity(Path::new("/proc/self/exe")),
    })
}

async fn list(State(d): State<Arc<Daemon>>) -> Json<Vec<Vm>> {
    let slots: Vec<Arc<VmSlot>> = d.vms().values().cloned().collect();
    Json(slots.iter().map(|s| d.refresh(s).to_vm(&d.paths)).collect())
}

async fn create(
    State(d): State<Arc<Daemon>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Vm>)> {
    let what = "a VM spec: a JSON object with at least \"name\" and \"kernel\" (schema VmSpec in openapi.yaml)";
    let spec: VmSpec =
        parse_body(body, what)?.ok_or_else(|| ApiError::bad_request(format!("empty request body; send {what}")))?;
    validate_spec(&spec, &d.paths).map_err(ApiError::bad_request)?;
    let name = spec.name.clone();
    let mut vms = d.vms();
    if let Some(other) = vms.get(&name) {
        let status = other.rec().status;
        return Err(ApiError::conflict(format!(
            "a VM named {name:?} already exists ({status}); pick another name, or delete it first (DELETE /v1/vms/{name})"
        )));
    }
    let json = d.paths.vm_json(&name);
    if json.exists() {
        return Err(ApiError::conflict(format!(
            "a record for VM {name:?} exists at {} but the daemon could not load it (see its log); move that directory away or pick another name",
            json.display()
        )));
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(d.paths.vm_dir(&name)).map_err(|e| {
        ApiError::internal(format!(
            "cannot create {}: {e}; check that the state directory is writable",
            d.paths.vm_dir(&name).display()
        ))
    })?;
    let rec = VmRecord::new(spec);
    d.save(&rec)?;
    let vm = rec.to_vm(&d.paths);
    vms.insert(name.clone(), VmSlot::new(rec));
    tracing::info!("VM {name}: created");
    Ok((StatusCode::CREATED, Json(vm)))
}

async fn get_vm(State(d): State<Arc<Daemon>>, path: Result<UrlPath<String>, PathRejection>) -> ApiResult<Json<Vm>> {
    let name = vm_name(path)?;
    let slot = d.slot(&name)?;
    Ok(Json(d.refresh(&slot).to_vm(&d.paths)))
}

async fn start(
    State(d): State<Arc<Daemon>>,
    path: Result<UrlPath<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Vm>> {
    let name = vm_name(path)?;
    let req: StartRequest = parse_body(body, "a start request: {\"cold\": true} or nothing")?.unwrap_or_default();
    let slot = d.slot(&name)?;
    let _op = slot.op.lock().await;
    d.still_there(&name, &slot)?;
    let rec = d.refresh(&slot);
    if rec.status == VmStatus::Running {
        return Err(ApiError::conflict(format!(
            "VM {name:?} is already running (pid {}); stop it first (POST /v1/vms/{name}/stop)",
            rec.pid.unwrap_or(0)
        )));
    }
    // The files may have gone since the VM was created.
    validate_spec(&rec.spec, &d.paths).map_err(|m| ApiError::bad_request(format!("cannot start VM {name:?}: {m}")))?;
    let resume = take_snapshot_for_start(&d.paths, &name, req.cold)?;
    let launch = if resume { Launch::Resume { keep_clock: req.keep_clock } } else { Launch::Boot };
    let spawned = vm_process::spawn(&d.exe, &rec.spec, &d.paths, launch).map_err(|e| {
        ApiError::internal(format!("cannot start VM {name:?}: running `{} boot` failed: {e}", d.exe.display()))
    })?;
    let (pid, start) = (spawned.pid, spawned.start_time);
    let (tx, rx) = watch::channel(false);
    let vm = {
        let mut r = slot.rec();
        r.status = VmStatus::Running;
        r.pid = Some(pid);
        r.pid_start_time = Some(start);
        r.exit_code = None;
        r.exit_signal = None;
        r.started_at = Some(state::now_secs());
        r.stopped_at = None;
        r.snapshots = true;
        r.resumed = resume;
        if let Err(e) = d.save(&r) {
            for p in vm_process::session_members(pid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), nix::sys::signal::Signal::SIGKILL);
            }
            *r = rec;
            return Err(e);
        }
        r.to_vm(&d.paths)
    };
    *slot.exited.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx);
    tokio::spawn(watch_exit(d.clone(), slot.clone(), spawned.child, pid, start, tx));
    tracing::info!(
        "VM {name}: {} (pid {pid}); console in {}",
        if resume { "resuming from its snapshot" } else { "started" },
        d.paths.console_log(&name).display()
    );
    Ok(Json(vm))
}

/// Before a start: whether it resumes from the VM's snapshot. The snapshot is moved to
/// [`state::SNAPSHOT_RESUMED`], where the run reads its memory and which goes when the
/// run ends: once the VM runs, its disks move on and the snapshot no longer matches
/// them. A cold start drops it.
fn take_snapshot_for_start(paths: &Paths, name: &str, cold: bool) -> ApiResult<bool> {
    let snap = paths.snapshot(name);
    if !snap.exists() {
        return Ok(false);
    }
    let moved = if cold || state::snapshot_info(paths, name).is_none() {
        std::fs::remove_file(&snap)
    } else {
        std::fs::rename(&snap, paths.snapshot_resumed(name))
    };
    moved.map_err(|e| {
        ApiError::internal(format!(
            "cannot start VM {name:?}: cannot move its snapshot {}: {e}; check the VM directory's permissions",
            snap.display()
        ))
    })?;
    crate::util::sync_dir(&paths.vm_dir(name));
    Ok(!cold && paths.snapshot_resumed(name).exists())
}

/// `POST /v1/vms/{name}/snapshot`: the VMM pauses the VM, writes its snapshot (machine
/// state and memory, synced) and ends; the VM is then `suspended` and its next start
/// resumes it.
async fn snapshot(
    State(d): State<Arc<Daemon>>,
    path: Result<UrlPath<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Vm>> {
    let name = vm_name(path)?;
    let req: SnapshotRequest =
        parse_body(body, "a snapshot request: {\"timeout_secs\": N} or nothing")?.unwrap_or_default();
    let timeout = timeout_secs(req.timeout_secs, api::DEFAULT_SNAPSHOT_TIMEOUT_SECS)?;
    let slot = d.slot(&name)?;
    let _op = slot.op.lock().await;
    d.still_there(&name, &slot)?;
    let rec = d.refresh(&slot);
    require_running(&rec, &d.paths, "only a running VM can be snapshotted")?;
    let (Some(pid), Some(start), true) = (rec.pid, rec.pid_start_time, rec.snapshots) else {
        return Err(ApiError::conflict(format!(
            "VM {name:?} was started by an older kindling that cannot write snapshots; stop it and start it again"
        )));
    };
    tracing::info!("VM {name}: snapshot asked (pid {pid}, SIGUSR1)");
    let t0 = std::time::Instant::now();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGUSR1);
    if !vm_process::wait_exit(pid, start, timeout).await {
        return Err(ApiError::internal(format!(
            "VM {name:?}: no snapshot within {} s; the VM keeps running (its console says why: GET /v1/vms/{name}/console); \
             stop it instead (POST /v1/vms/{name}/stop)",
            timeout.as_secs()
        )));
    }
    vm_process::reap_session(pid).await;
    let exit_code = d.record_exit(&slot, pid).await?;
    let next = d.paths.snapshot_next(&name);
    let complete = std::fs::File::open(&next).is_ok_and(|f| kindling_vmm::snapshot::read_header(&f).is_ok());
    if !complete || exit_code.is_some_and(|c| c != 0) {
        let _ = std::fs::remove_file(&next);
        return Err(ApiError::internal(format!(
            "VM {name:?}: its snapshot failed ({}); the VM has stopped and its disks are as it left them: \
             the console says why (GET /v1/vms/{name}/console), and a start boots it afresh",
            match exit_code {
                Some(c) if c != 0 => format!("kindling boot exited with {c}"),
                _ => "no complete snapshot was written".to_string(),
            }
        )));
    }
    std::fs::rename(&next, d.paths.snapshot(&name))
        .map_err(|e| ApiError::internal(format!("VM {name:?}: cannot keep its snapshot {}: {e}", next.display())))?;
    crate::util::sync_dir(&d.paths.vm_dir(&name));
    tracing::info!("VM {name}: suspended; snapshot written in {:.1?}", t0.elapsed());
    Ok(Json(d.refresh(&slot).to_vm(&d.paths)))
}

async fn stop(
    State(d): State<Arc<Daemon>>,
    path: Result<UrlPath<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Vm>> {
    let name = vm_name(path)?;
    let req: StopRequest = parse_body(body, "a stop request: {\"timeout_secs\": N} or nothing")?.unwrap_or_default();
    let timeout = timeout_secs(req.timeout_secs, api::DEFAULT_STOP_TIMEOUT_SECS)?;
    let slot = d.slot(&name)?;
    let _op = slot.op.lock().await;
    d.still_there(&name, &slot)?;
    let rec = d.refresh(&slot);
    require_running(&rec, &d.paths, "nothing to stop")?;
    d.stop_vm(&slot, timeout).await?;
    Ok(Json(d.refresh(&slot).to_vm(&d.paths)))
}

/// A request's `timeout_secs` (or `default`), at most [`MAX_STOP_TIMEOUT_SECS`].
fn timeout_secs(asked: Option<u64>, default: u64) -> ApiResult<Duration> {
    let t = asked.unwrap_or(default);
    if t > MAX_STOP_TIMEOUT_SECS {
        return Err(ApiError::bad_request(format!("timeout_secs {t}: too long; use at most {MAX_STOP_TIMEOUT_SECS}")));
    }
    Ok(Duration::from_secs(t))
}

/// Refuses (409) a request that needs the VM running, saying `why` it does.
fn require_running(rec: &VmRecord, paths: &Paths, why: &str) -> ApiResult<()> {
    if rec.status == VmStatus::Running {
        return Ok(());
    }
    let name = rec.name();
    Err(ApiError::conflict(format!(
        "VM {name:?} is not running ({}); {why} (start it with POST /v1/vms/{name}/start)",
        rec.to_vm(paths).status
    )))
}

/// Is `path` directly inside `dir` (both resolved)?
fn directly_inside(path: &Path, dir: &Path) -> bool {
    let (Some(parent), Some(_)) = (path.parent(), path.file_name()) else { return false };
    match (parent.canonicalize(), dir.canonicalize()) {
        (Ok(p), Ok(d)) => p == d,
        _ => false,
    }
}

/// Removes the files of a VM that the daemon knows: its record, console log, vsock
/// socket, and the spec's disks that live in the VM directory. Disks elsewhere and
/// unknown files are kept (and then so is the directory).
fn remove_vm_files(paths: &Paths, spec: &VmSpec) -> Result<Deleted, String> {
    let dir = paths.vm_dir(&spec.name);
    let mut removable: Vec<PathBuf> = [
        state::CONSOLE_LOG,
        state::CONSOLE_LOG_OLD,
        state::VSOCK_SOCKET,
        state::VM_JSON_TMP,
        state::SNAPSHOT,
        state::SNAPSHOT_NEXT,
        state::SNAPSHOT_RESUMED,
    ]
    .iter()
    .map(|f| dir.join(f))
    .collect();
    let mut kept = Vec::new();
    for disk in &spec.disks {
        if directly_inside(&disk.path, &dir) {
            removable.push(dir.join(disk.path.file_name().expect("has a file name")));
        } else {
            kept.push(disk.path.clone());
        }
    }
    let mut removed = Vec::new();
    let remove = |p: &Path, removed: &mut Vec<PathBuf>| match std::fs::remove_file(p) {
        Ok(()) => {
            removed.push(p.to_path_buf());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove {}: {e}; check its permissions, then delete the VM again", p.display())),
    };
    for p in &removable {
        remove(p, &mut removed)?;
    }
    let tmp = paths.vm_tmp(&spec.name);
    match std::fs::remove_dir_all(&tmp) {
        Ok(()) => removed.push(tmp),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(format!(
                "cannot remove {}: {e}; check its permissions, then delete the VM again",
                tmp.display()
            ))
        }
    }
    // The record goes last: until then, a failed delete can be retried.
    remove(&dir.join(state::VM_JSON), &mut removed)?;
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            kept.push(e.path());
        }
    }
    if kept.iter().all(|k| !k.starts_with(&dir)) {
        std::fs::remove_dir(&dir).map_err(|e| format!("cannot remove the directory {}: {e}", dir.display()))?;
        removed.push(dir);
    } else {
        tracing::warn!("VM {}: kept {} because it holds files the daemon did not create", spec.name, dir.display());
    }
    Ok(Deleted { name: spec.name.clone(), removed, kept })
}

async fn delete_vm(
    State(d): State<Arc<Daemon>>,
    path: Result<UrlPath<String>, PathRejection>,
) -> ApiResult<Json<Deleted>> {
    let name = vm_name(path)?;
    let slot = d.slot(&name)?;
    let _op = slot.op.lock().await;
    d.still_there(&name, &slot)?;
    d.stop_vm(&slot, Duration::from_secs(api::DEFAULT_STOP_TIMEOUT_SECS)).await?;
    let spec = {
        let rec = slot.rec();
        slot.deleted.store(true, Ordering::SeqCst);
        rec.spec.clone()
    };
    match remove_vm_files(&d.paths, &spec) {
        Ok(deleted) => {
            d.vms().remove(&name);
            tracing::info!("VM {name}: deleted");
            Ok(Json(deleted))
        }
        Err(e) => {
            slot.deleted.store(false, Ordering::SeqCst);
            Err(ApiError::internal(format!("deleting VM {name:?}: {e}")))
        }
    }
}

/// The last `n` lines of `text` (all of it when `n` is None).
pub fn tail_lines(text: &str, n: Option<usize>) -> &str {
    let Some(n) = n else { return text };
    if n == 0 {
        return "";
    }
    let body = text.strip_suffix('\n').unwrap_or(text);
    match body.rmatch_indices('\n').nth(n - 1) {
        Some((i, _)) => &text[i + 1..],
        None => text,
    }
}

fn parse_tail(uri: &Uri) -> ApiResult<Option<usize>> {
    let mut tail = None;
    for pair in uri.query().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("tail", v)) => {
                tail = Some(v.parse::<usize>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "tail={v}: not a number of lines; use tail=N with N >= 0, or leave it out for the whole log"
                    ))
                })?)
            }
            _ => {
                return Err(ApiError::bad_request(format!("unknown query parameter {pair:?}; the only one is tail=N")))
            }
        }
    }
    Ok(tail)
}

async fn console(
    State(d): State<Arc<Daemon>>,
    path: Result<UrlPath<String>, PathRejection>,
    uri: Uri,
) -> ApiResult<Response> {
    let name = vm_name(path)?;
    let tail = parse_tail(&uri)?;
    d.slot(&name)?;
    let log = d.paths.console_log(&name);
    let bytes = match read_console(&log, CONSOLE_MAX_BYTES) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(ApiError::internal(format!("cannot read {}: {e}", log.display()))),
    };
    let text = String::from_utf8_lossy(&bytes);
    let out = tail_lines(&text, tail).to_string();
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], out).into_response())
}

/// The last `max` bytes of a console log: the end of its rotated half, then the log.
fn read_console(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let current = read_end(path, max)?;
    let older = max - current.len() as u64;
    let mut out = match read_end(&crate::logfile::RotatingLog::rotated(path), older) {
        Ok(v) if older > 0 => v,
        _ => Vec::new(),
    };
    out.extend(current);
    Ok(out)
}

/// The last `max` bytes of a file.
fn read_end(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len > max {
        f.seek(SeekFrom::Start(len - max))?;
    }
    let mut v = Vec::new();
    f.take(max).read_to_end(&mut v)?;
    Ok(v)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {method} {}; the API is under /v1 (see kindling/openapi.yaml)", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    let path = uri.path();
    let allowed: Vec<&str> = ROUTES.iter().filter(|(_, p)| route_matches(p, path)).map(|(m, _)| *m).collect();
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {path}; use {}", allowed.join(" or ")),
    )
}

fn route_matches(route: &str, path: &str) -> bool {
    let (r, p): (Vec<&str>, Vec<&str>) = (route.split('/').collect(), path.split('/').collect());
    r.len() == p.len() && r.iter().zip(&p).all(|(a, b)| a == b || (a.starts_with('{') && !b.is_empty()))
}

/// The routes of [`ROUTES`], answered by `d`.
pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{name}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{name}/start", post(start))
        .route("/v1/vms/{name}/stop", post(stop))
        .route("/v1/vms/{name}/snapshot", post(snapshot))
        .route("/v1/vms/{name}/console", get(console))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(d)
}

/// Holds the state directory's lock for the daemon's lifetime.
struct StateLock(#[allow(dead_code)] std::fs::File);

fn lock_state_dir(paths: &Paths) -> anyhow::Result<StateLock> {
    use std::io::{Read, Seek, Write};
    let path = paths.lock_file();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if !crate::util::lock_exclusive(&f, false).with_context(|| format!("cannot lock {}", path.display()))? {
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        anyhow::bail!(
            "another kindling daemon (pid {}) already manages the state directory {}; use that one, or stop it first",
            pid.trim(),
            paths.state_dir.display()
        );
    }
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{}", std::process::id())?;
    Ok(StateLock(f))
}

fn bind(socket: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    let len = socket.as_os_str().len();
    if len > state::MAX_SOCKET_PATH {
        anyhow::bail!(
            "socket path {} is {len} bytes, too long for a UNIX socket (at most {}); pass a shorter --socket",
            socket.display(),
            state::MAX_SOCKET_PATH
        );
    }
    if let Some(parent) = socket.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| format!("cannot create the socket's directory {}", parent.display()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            anyhow::bail!(
                "another daemon already answers on {}; stop it first, or pass --socket with another path",
                socket.display()
            );
        }
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "{} exists and is not a socket; remove it, or pass --socket with another path",
                socket.display()
            );
        }
        // A socket nobody answers on: left by a daemon that died.
        std::fs::remove_file(socket).with_context(|| format!("cannot remove the stale socket {}", socket.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(tokio::net::UnixListener::from_std(listener)?)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down (VMs keep running)"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down (VMs keep running)"),
    }
}

/// Runs the daemon until SIGTERM or SIGINT. VMs keep running when it exits.
pub async fn serve(paths: Paths, socket: PathBuf) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(paths.vms_dir())
        .with_context(|| format!("cannot create the state directory {}", paths.state_dir.display()))?;
    let _lock = lock_state_dir(&paths)?;
    let listener = bind(&socket)?;
    let ino = std::fs::metadata(&socket).map(|m| m.ino()).ok();
    let exe = std::env::current_exe().context("cannot locate the kindling executable")?;
    let daemon = Arc::new(Daemon::load(paths.clone(), socket.clone(), exe));
    let count = daemon.vms().len();
    tracing::info!(
        "kindling daemon {} listening on {} (state {}, {count} VMs)",
        env!("CARGO_PKG_VERSION"),
        socket.display(),
        paths.state_dir.display()
    );
    let result = axum::serve(listener, router(daemon)).with_graceful_shutdown(shutdown_signal()).await;
    // Remove the socket unless another daemon has replaced it meanwhile.
    if ino.is_some() && std::fs::metadata(&socket).map(|m| m.ino()).ok() == ino {
        let _ = std::fs::remove_file(&socket);
    }
    result.context("serving the API")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails() {
        assert_eq!(tail_lines("a\nb\nc\n", Some(2)), "b\nc\n");
        assert_eq!(tail_lines("a\nb\nc", Some(2)), "b\nc");
        assert_eq!(tail_lines("a\nb\n", Some(5)), "a\nb\n");
        assert_eq!(tail_lines("a\nb\n", Some(0)), "");
        assert_eq!(tail_lines("a\nb\n", None), "a\nb\n");
    }

    #[test]
    fn route_matching() {
        assert!(route_matches("/v1/vms/{name}/stop", "/v1/vms/x/stop"));
        assert!(!route_matches("/v1/vms/{name}", "/v1/vms/"));
        assert!(!route_matches("/v1/vms", "/v1/vms/x"));
    }

    /// Randomized request bodies and names against the real router, in process: every
    /// answer is one of the documented statuses (never a 500), with a JSON error body;
    /// a VM is recorded only for a valid spec, and the daemon still answers after.
    mod api_fuzz {
        use super::*;
        use proptest::prelude::*;
        use tower::ServiceExt;

        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<u64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(serde_json::Value::from),
                ".{0,40}".prop_map(serde_json::Value::from),
                Just(serde_json::Value::from("/dev/null")),
                Just(serde_json::Value::from("../../etc/passwd")),
            ];
            leaf.prop_recursive(3, 24, 6, |inner| {
                let keys = prop_oneof![
                    Just("name".to_string()),
                    Just("kernel".to_string()),
                    Just("cpus".to_string()),
                    Just("memory_mib".to_string()),
                    Just("disks".to_string()),
                    Just("path".to_string()),
                    Just("read_only".to_string()),
                    Just("forwards".to_string()),
                    Just("cmdline".to_string()),
                    Just("net".to_string()),
                    "[a-z_]{1,10}",
                ];
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                    proptest::collection::btree_map(keys, inner, 0..8)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn body() -> impl Strategy<Value = Vec<u8>> {
            // Near-valid specs too, so that creation, conflicts and limits are reached.
            let kernel = std::env::current_exe().unwrap();
            let spec = ("[a-z0-9-]{0,70}", any::<u32>(), any::<u64>()).prop_map(move |(name, cpus, mem)| {
                serde_json::json!({"name": name, "kernel": kernel, "cpus": cpus % 80, "memory_mib": mem % 70000})
                    .to_string()
                    .into_bytes()
            });
            prop_oneof![
                json_value().prop_map(|v| v.to_string().into_bytes()),
                proptest::collection::vec(any::<u8>(), 0..256),
                spec,
            ]
        }

        fn call(app: &Router, rt: &tokio::runtime::Runtime, method: &str, uri: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
            let Ok(req) = axum::http::Request::builder().method(method).uri(uri).body(axum::body::Body::from(body))
            else {
                return (0, Vec::new());
            };
            rt.block_on(async {
                let res = app.clone().oneshot(req).await.unwrap();
                let status = res.status().as_u16();
                let bytes = http_body_util::BodyExt::collect(res.into_body()).await.unwrap().to_bytes();
                (status, bytes.to_vec())
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { max_shrink_iters: 256, ..ProptestConfig::default() })]
            #[test]
            fn random_bodies_and_names_get_documented_answers(
                bodies in proptest::collection::vec(body(), 1..4),
                names in proptest::collection::vec("[a-zA-Z0-9._%-]{0,70}", 1..4),
            ) {
                let d = tempfile::tempdir().unwrap();
                let paths = Paths::new(d.path().join("state"));
                let daemon = Arc::new(Daemon::load(paths.clone(), d.path().join("sock"), "/nonexistent/kindling".into()));
                let app = router(daemon);
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let mut created = 0;
                for b in bodies {
                    let (status, reply) = call(&app, &rt, "POST", "/v1/vms", b);
                    prop_assert!([201, 400, 409, 413, 415].contains(&status), "POST /v1/vms: {status}");
                    let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
                    if status == 201 {
                        created += 1;
                        let name = reply["name"].as_str().unwrap().to_string();
                        prop_assert!(state::check_name(&name).is_ok(), "{name:?}");
                        prop_assert!(paths.vm_json(&name).exists());
                    } else {
                        prop_assert!(reply["error"].is_string(), "{reply}");
                    }
                }
                for n in names {
                    for (method, uri) in [
                        ("GET", format!("/v1/vms/{n}")),
                        ("GET", format!("/v1/vms/{n}/console?tail={n}")),
                        ("POST", format!("/v1/vms/{n}/stop")),
                        ("DELETE", format!("/v1/vms/{n}")),
                    ] {
                        let (status, _) = call(&app, &rt, method, &uri, Vec::new());
                        prop_assert!(status == 0 || [200, 400, 404, 409].contains(&status), "{method} {uri}: {status}");
                    }
                }
                // After all that, the daemon still creates a valid VM, once.
                let valid = serde_json::json!({"name": "fuzzvalid9", "kernel": std::env::current_exe().unwrap()});
                let (status, _) = call(&app, &rt, "POST", "/v1/vms", valid.to_string().into_bytes());
                prop_assert_eq!(status, 201);
                let (status, _) = call(&app, &rt, "POST", "/v1/vms", valid.to_string().into_bytes());
                prop_assert_eq!(status, 409);
                let (status, list) = call(&app, &rt, "GET", "/v1/vms", Vec::new());
                prop_assert_eq!(status, 200);
                let list: serde_json::Value = serde_json::from_slice(&list).unwrap();
                prop_assert!(list.as_array().unwrap().len() <= created + 1);
            }
        }
    }

    #[test]
    fn delete_removes_only_known_files_and_never_outside_disks() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path().join("state"));
        let dir = paths.vm_dir("vm");
        std::fs::create_dir_all(&dir).unwrap();
        let outside = d.path().join("outside.img");
        std::fs::write(&outside, b"disk").unwrap();
        let inside = dir.join("root.img");
        std::fs::write(&inside, b"disk").unwrap();
        let mut spec = VmSpec::new("vm", "/k");
        spec.disks = vec![
            api::DiskSpec { path: outside.clone(), read_only: false },
            api::DiskSpec { path: inside.clone(), read_only: false },
        ];
        VmRecord::new(spec.clone()).save(&paths).unwrap();
        std::fs::write(paths.console_log("vm"), b"log").unwrap();
        std::fs::create_dir_all(paths.vm_tmp("vm").join("kindling-l1-x")).unwrap();
        std::fs::write(paths.vm_tmp("vm").join("kindling-l1-x/initramfs.cpio"), b"big").unwrap();
        let del = remove_vm_files(&paths, &spec).unwrap();
        assert!(outside.exists(), "a disk outside the VM directory is never removed");
        assert!(!dir.exists());
        assert_eq!(del.kept, vec![outside.clone()]);
        assert!(del.removed.contains(&inside) && del.removed.contains(&dir), "{del:?}");

        // An unknown file keeps the directory (and itself).
        std::fs::create_dir_all(&dir).unwrap();
        VmRecord::new(spec.clone()).save(&paths).unwrap();
        std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
        let del = remove_vm_files(&paths, &spec).unwrap();
        assert!(dir.join("notes.txt").exists() && !paths.vm_json("vm").exists());
        assert!(del.kept.contains(&dir.join("notes.txt")));
    }
}
