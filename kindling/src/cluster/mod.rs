//! Kubernetes clusters on top of the daemon: what `kindling start`, `stop`, `delete`,
//! `status`, `list`, `logs`, `exec`, `ip`, `image load`, `service` and `kubectl` do.
//!
//! A cluster is one daemon VM booting kindling's kernel and root disk, plus a small
//! record, `<state>/clusters/<name>.json`, holding what must stay stable across restarts:
//! the host port of its API server and where its NodePort range lands on the host.
//! Its disk is `<state>/vms/<name>/disk.ext4` (so the daemon's delete removes it). The
//! node is driven through its agent over vsock ([`agent`]): phases while it starts, the
//! admin kubeconfig, commands, logs, power-off and image imports.
//!
//! - [`disk`]: the sparse copy of the root disk, grown to `--disk-size`.
//! - [`ports`]: the API server port and the NodePort range on the host.
//! - [`kubeconfig`]: merging the cluster's context into the user's kubeconfig.

pub mod agent;
pub mod disk;
pub mod kubeconfig;
pub mod ports;

use std::io::{Read, Seek, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use kindling_proto::phase;

use crate::daemon::api::{DiskSpec, RunnerKind, Vm, VmSpec, VmStatus};
use crate::daemon::client::{Client, ClientError};
use crate::daemon::state::{self, Paths};
use agent::{Agent, AgentError, Phase};

/// The cluster name when `--name` is not given.
pub const DEFAULT_NAME: &str = "kindling";
pub const DEFAULT_CPUS: u32 = 2;
pub const DEFAULT_MEMORY_MIB: u64 = 4096;
pub const DEFAULT_DISK_GIB: u64 = 20;
/// How long `start` waits for the node to be Ready by default (the emulated runner
/// needs many minutes).
pub const DEFAULT_WAIT_SECS: u64 = 45 * 60;
/// How often `start` restarts a guest that crashed before it was Ready.
pub const CRASH_RESTARTS: u32 = 2;
/// How long `stop` waits for an orderly power-off before stopping the VM process.
pub const DEFAULT_STOP_WAIT_SECS: u64 = 120;
/// The disk's file name in the VM directory.
pub const DISK_FILE: &str = "disk.ext4";
/// The node's admin kubeconfig (written by the agent).
pub const ADMIN_CONF: &str = "/etc/kindling/admin.conf";
/// The phase `start` waits for.
pub const READY_PHASE: &str = phase::NODE_READY;
/// How long requests to a running node's agent retry a refused vsock connection (a
/// node busy under emulation can answer the VMM's connection request late).
const AGENT_PATIENCE: Duration = Duration::from_secs(30);
/// How long a command the cluster code runs in the node to read something may take.
const CAPTURE_DEADLINE: Duration = Duration::from_secs(60);
/// The node's address when its command line does not set kindling.ip.
pub const DEFAULT_NODE_IP: &str = "10.0.2.15";
/// Images a cluster boots.
const IMAGE_STEPS: [&str; 2] = ["kernel", "rootfs"];

/// `kindling <verb>` for a cluster, with `--name` only when it is not the default.
pub fn command_for(verb: &str, name: &str) -> String {
    if name == DEFAULT_NAME {
        format!("kindling {verb}")
    } else {
        format!("kindling {verb} --name {name}")
    }
}

fn not_found(name: &str) -> anyhow::Error {
    anyhow::anyhow!("no cluster named {name:?}; create it with `{}`", command_for("start", name))
}

fn not_running(name: &str, status: &str) -> anyhow::Error {
    anyhow::anyhow!("cluster {name:?} is not running ({status}); start it with `{}`", command_for("start", name))
}

/// Checks a cluster name: a daemon VM name that is also a valid node hostname.
pub fn check_name(name: &str) -> Result<()> {
    state::check_name(name).map_err(|e| anyhow::anyhow!("{}", e.replacen("VM name", "cluster name", 1)))?;
    if name.ends_with('-') {
        bail!("cluster name {name:?} is not allowed: it becomes the node's hostname, which must end with a letter or a digit");
    }
    Ok(())
}

/// What a cluster keeps besides its VM: `<state>/clusters/<name>.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub name: String,
    /// Host port forwarded to the API server (127.0.0.1).
    pub api_port: u16,
    /// Host port of NodePort 30000; the range continues from it (30000: 1:1).
    pub node_port_base: u16,
    pub disk_size_gib: u64,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
}

impl ClusterRecord {
    pub fn api_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }
    pub fn node_port_range(&self) -> String {
        format!("127.0.0.1:{}-{}", self.node_port_base, self.node_port_base + (ports::NODE_PORT_COUNT - 1))
    }
}

/// Where the cluster records live.
pub fn clusters_dir(paths: &Paths) -> PathBuf {
    paths.state_dir.join("clusters")
}

fn record_path(paths: &Paths, name: &str) -> PathBuf {
    clusters_dir(paths).join(format!("{name}.json"))
}

/// Where `start` parks a disk while it recreates the VM (to change its spec).
fn parked_disk(paths: &Paths, name: &str) -> PathBuf {
    clusters_dir(paths).join(format!("{name}.{DISK_FILE}"))
}

fn disk_path(paths: &Paths, name: &str) -> PathBuf {
    paths.vm_dir(name).join(DISK_FILE)
}

pub fn load_record(paths: &Paths, name: &str) -> Result<Option<ClusterRecord>> {
    let p = record_path(paths, name);
    match std::fs::read(&p) {
        Ok(raw) => serde_json::from_slice(&raw).map(Some).with_context(|| {
            format!("{}: not a valid cluster record; move it away to forget the cluster", p.display())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
}

fn save_record(paths: &Paths, r: &ClusterRecord) -> Result<()> {
    let dir = clusters_dir(paths);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let p = record_path(paths, &r.name);
    let tmp = p.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(r).map_err(std::io::Error::other)?)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p)
    };
    write().map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSPC) => disk::disk_full("writing the cluster record", &dir, None),
        _ => anyhow::Error::new(e).context(format!("cannot write {}", p.display())),
    })
}

/// Every cluster record, by name.
pub fn all_records(paths: &Paths) -> Vec<ClusterRecord> {
    let mut out: Vec<ClusterRecord> = std::fs::read_dir(clusters_dir(paths))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.strip_suffix(".json")?.to_string();
            load_record(paths, &name).ok().flatten().filter(|r| r.name == name)
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// An exclusive lock (flock) on a file, released when dropped.
struct Lock {
    file: std::fs::File,
    path: PathBuf,
}

impl Lock {
    fn acquire(path: PathBuf, busy: impl FnOnce() -> String, wait: bool) -> Result<Self> {
        use std::os::fd::AsRawFd;
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open the lock {}", path.display()))?;
        let flags = if wait { libc::LOCK_EX } else { libc::LOCK_EX | libc::LOCK_NB };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), flags) } != 0 {
            bail!("{}", busy());
        }
        Ok(Self { file, path })
    }

    /// The lock of one cluster: start, stop and delete take it.
    fn cluster(paths: &Paths, name: &str) -> Result<Self> {
        let path = clusters_dir(paths).join(format!("{name}.lock"));
        Self::acquire(
            path,
            || {
                format!("another kindling command (start, stop or delete) is working on cluster {name:?} right now; wait for it to finish, then try again")
            },
            false,
        )
    }

    /// Serializes the choice of host ports between clusters.
    fn ports(paths: &Paths) -> Result<Self> {
        Self::acquire(clusters_dir(paths).join(".ports.lock"), String::new, true)
    }

    /// Removes the lock file (delete: nothing of the cluster stays).
    fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.file);
    }
}

/// Where progress goes: stdout, or stderr when stdout carries JSON.
#[derive(Clone, Copy, Debug)]
pub struct Say {
    pub to_stderr: bool,
}

impl Say {
    pub fn line(&self, s: impl std::fmt::Display) {
        if self.to_stderr {
            eprintln!("{s}");
        } else {
            println!("{s}");
            let _ = std::io::stdout().flush();
        }
    }
}

/// A connection to the daemon (started on demand) and its state directory.
pub struct Ctx {
    pub client: Client,
    pub paths: Paths,
}

impl Ctx {
    pub fn connect() -> Result<Self> {
        let client = Client::connect_or_spawn()?;
        let version = client.version()?;
        Ok(Self { client, paths: Paths::new(version.state_dir) })
    }

    /// The VM of a cluster, None when the daemon has none of that name.
    pub fn vm(&self, name: &str) -> Result<Option<Vm>> {
        match self.client.get(name) {
            Ok(vm) => Ok(Some(vm)),
            Err(ClientError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A cluster's record and VM; an error when there is no such cluster, or when the
    /// name belongs to a VM that is not a cluster.
    pub fn cluster(&self, name: &str) -> Result<(ClusterRecord, Option<Vm>)> {
        check_name(name)?;
        let record = load_record(&self.paths, name)?;
        let vm = self.vm(name)?;
        match (record, vm) {
            (Some(r), vm) => Ok((r, vm)),
            (None, Some(_)) => Err(name_taken(name)),
            (None, None) => Err(not_found(name)),
        }
    }

    /// A cluster whose VM runs, with its agent.
    pub fn running(&self, name: &str) -> Result<(ClusterRecord, Vm, Agent)> {
        let (r, vm) = self.cluster(name)?;
        let vm = vm.ok_or_else(|| not_running(name, "its VM does not exist"))?;
        if vm.status != VmStatus::Running {
            return Err(not_running(name, &vm.status.to_string()));
        }
        let agent = Agent::vsock(agent::vsock_socket(&vm.dir)).patient(AGENT_PATIENCE);
        Ok((r, vm, agent))
    }
}

fn name_taken(name: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "the name {name:?} is already taken by a VM that is not a kindling cluster (created through the daemon's API); \
         pick another name with --name, or delete that VM first (DELETE /v1/vms/{name})"
    )
}

/// What `start` was asked for; None: the default on a first start, unchanged on a restart.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    pub name: String,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk_size_gib: Option<u64>,
    pub runner: Option<RunnerKind>,
    pub wait: Option<Duration>,
    /// Bring the node up only to this phase (`kindling.until`) and wait for it instead
    /// of node-ready: for tests, and for a control plane where kubelet cannot run.
    pub until: Option<String>,
}

/// What `start` did.
#[derive(Clone, Debug, Serialize)]
pub struct StartReport {
    pub name: String,
    /// It was running already: nothing was done.
    pub already_running: bool,
    /// A stopped cluster was started again (its disk kept).
    pub restarted: bool,
    pub api_server: String,
    pub node_ports: String,
    pub kubeconfig: Option<PathBuf>,
    pub context: String,
    /// The phase waited for (node-ready unless `--until` said otherwise).
    pub target_phase: String,
    pub phases: Vec<Phase>,
    /// Wall-clock seconds the command took.
    pub seconds: f64,
}

fn runner_name(r: RunnerKind) -> &'static str {
    r.as_str()
}

/// Says which runner `auto` (or the choice) leads to; refuses `kvm` where it cannot work.
/// Says which runner the cluster will use and why; returns true for the emulated one.
fn check_runner(kind: RunnerKind, say: &Say) -> Result<bool> {
    use crate::runner::{probe_kvm, KvmStatus};
    let status = probe_kvm();
    let emulated =
        kind == RunnerKind::Emulated || (kind == RunnerKind::Auto && matches!(status, KvmStatus::Unusable(_)));
    match (kind, status) {
        (RunnerKind::Kvm, KvmStatus::Unusable(why)) => {
            bail!("--runner kvm: {why}; leave out --runner to run the cluster under the emulated runner (slower), or fix /dev/kvm")
        }
        (RunnerKind::Kvm, KvmStatus::Usable) | (RunnerKind::Auto, KvmStatus::Usable) => say.line("runner: kvm (/dev/kvm is usable)"),
        (RunnerKind::Emulated, _) => say.line("runner: emulated (requested with --runner emulated); expect a node to take many minutes to get Ready"),
        (RunnerKind::Auto, KvmStatus::Unusable(why)) => say.line(format!(
            "runner: emulated, because {why}; the node runs under QEMU's emulator inside a level-1 VM and takes many minutes to get Ready"
        )),
    }
    Ok(emulated)
}

/// vCPUs for a new cluster: 1 under the emulated runner, which cannot carry a busy
/// guest with more ([`crate::runner::emulated::guest_cpus`]).
fn cpus_for(asked: Option<u32>, emulated: bool, say: &Say) -> u32 {
    match asked {
        Some(c) if emulated => {
            let (cpus, clamped) = crate::runner::emulated::guest_cpus(c);
            if let Some(warning) = clamped {
                say.line(format!("warning: {warning}"));
            }
            cpus
        }
        Some(c) => c,
        None if emulated => crate::runner::emulated::guest_cpus(DEFAULT_CPUS).0,
        None => DEFAULT_CPUS,
    }
}

fn build_images(say: &Say) -> Result<(PathBuf, PathBuf)> {
    say.line("images: building or reusing kernel and rootfs (cached; a first build takes long)");
    let steps: Vec<String> = IMAGE_STEPS.iter().map(|s| s.to_string()).collect();
    let outputs = crate::images::build(&steps)?;
    let artifact = |name: &str| -> Result<PathBuf> {
        let (_, dir) =
            outputs.iter().find(|(n, _)| *n == name).with_context(|| format!("images: step {name} was not built"))?;
        let step = crate::images::STEPS.iter().find(|s| s.name == name).expect("known step");
        Ok(dir.join(step.artifact))
    };
    Ok((artifact("kernel")?, artifact("rootfs")?))
}

fn cmdline(name: &str, until: Option<&str>) -> String {
    use kindling_proto::cmdline::{param, HOSTNAME, UNTIL};
    let mut c = format!("console=ttyS0 panic=1 root=/dev/vda rw {}", param(HOSTNAME, name));
    if let Some(u) = until {
        c.push_str(&format!(" {}", param(UNTIL, u)));
    }
    c
}

#[allow(clippy::too_many_arguments)]
fn spec_for(
    name: &str,
    kernel: PathBuf,
    disk: PathBuf,
    r: &ClusterRecord,
    cpus: u32,
    memory_mib: u64,
    runner: RunnerKind,
    until: Option<&str>,
) -> VmSpec {
    let mut spec = VmSpec::new(name, kernel);
    spec.cmdline = Some(cmdline(name, until));
    spec.cpus = cpus;
    spec.memory_mib = memory_mib;
    spec.disks = vec![DiskSpec { path: disk, read_only: false }];
    spec.vsock = true;
    spec.forwards = ports::forwards(r.api_port, r.node_port_base);
    spec.runner = runner;
    spec
}

/// The least memory a Kubernetes node gets (the VMM's own minimum is lower).
const MIN_NODE_MEMORY_MIB: u64 = 1024;

fn check_resources(o: &StartOptions) -> Result<()> {
    use kindling_vmm::config::{check_size, MAX_MEMORY_MIB};
    // The VMM's limits, with a node's memory where the option is not given.
    check_size(o.cpus.unwrap_or(1), o.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB))?;
    if let Some(m) = o.memory_mib.filter(|m| *m < MIN_NODE_MEMORY_MIB) {
        bail!("--memory {m}: out of range; a Kubernetes node needs {MIN_NODE_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB (2048 or more is comfortable)");
    }
    if let Some(d) = o.disk_size_gib {
        if !(1..=4096).contains(&d) {
            bail!("--disk-size {d}: out of range; use 1 to 4096 GiB");
        }
    }
    if let Some(u) = &o.until {
        if !phase::is_known(u) {
            bail!("--until {u}: not a phase; use one of {}", phase::ALL.join(", "));
        }
    }
    Ok(())
}

/// Chooses the host ports of a new cluster, avoiding those of the other clusters.
fn new_record(paths: &Paths, name: &str, disk_size_gib: u64) -> Result<ClusterRecord> {
    let others: Vec<ClusterRecord> = all_records(paths).into_iter().filter(|r| r.name != name).collect();
    let api_ports: Vec<u16> = others.iter().map(|r| r.api_port).collect();
    let bases: Vec<u16> = others.iter().map(|r| r.node_port_base).collect();
    let api_port = ports::choose_api_port(ports::FIRST_API_PORT, &api_ports).with_context(|| {
        format!(
            "no free host port for the API server between {} and {}; free one of them (see `ss -ltn`)",
            ports::FIRST_API_PORT,
            ports::FIRST_API_PORT + 999
        )
    })?;
    let mut reserved_ports = api_ports.clone();
    reserved_ports.push(api_port);
    let node_port_base = match ports::choose_node_port_base(&ports::NODE_PORT_BASES, &bases, &reserved_ports) {
        Some(b) => b,
        // Every candidate has a busy port: take the first one no cluster holds; the busy
        // ports are skipped by the forward (and reported before the start).
        None => ports::NODE_PORT_BASES
            .iter()
            .copied()
            .find(|b| !bases.iter().any(|o| o == b))
            .context("every host range for NodePorts is taken by other clusters; delete one of them")?,
    };
    Ok(ClusterRecord { name: name.to_string(), api_port, node_port_base, disk_size_gib, created_at: state::now_secs() })
}

/// Refuses a start whose API port is taken; warns about busy NodePort host ports.
fn check_ports(r: &ClusterRecord, say: &Say) -> Result<()> {
    if !ports::is_free(r.api_port) {
        bail!(
            "host port {p} (the API server port of cluster {n:?}) is in use by another program; find it with `ss -ltnp 'sport = :{p}'` \
             and stop it, or delete the cluster (`{d}`) and start it again to get another port",
            p = r.api_port,
            n = r.name,
            d = command_for("delete", &r.name)
        );
    }
    let busy = ports::busy_ports(r.node_port_base, ports::NODE_PORT_COUNT);
    if !busy.is_empty() {
        let list: Vec<String> = busy.iter().take(5).map(|p| p.to_string()).collect();
        let more = if busy.len() > 5 { format!(" and {} more", busy.len() - 5) } else { String::new() };
        say.line(format!(
            "note: host ports {}{more} of the NodePort range {} are in use by other programs; NodePorts mapped there are not reachable from the host",
            list.join(", "),
            r.node_port_range()
        ));
    }
    Ok(())
}

/// Says how much room the disk may take, when the host has less.
fn note_free_space(dir: &Path, size_gib: u64, say: &Say) {
    if let Ok(free) = disk::free_space(dir) {
        if free < size_gib * disk::GIB {
            say.line(format!(
                "note: the cluster's disk may grow to {size_gib} GiB, but only {:.1} GiB are free in {}; the node fails when the host disk fills up",
                free as f64 / disk::GIB as f64,
                dir.display()
            ));
        }
    }
}

/// `kindling start`.
pub fn start(o: &StartOptions, say: &Say) -> Result<StartReport> {
    let t0 = Instant::now();
    let name = o.name.as_str();
    check_name(name)?;
    check_resources(o)?;
    let ctx = Ctx::connect()?;
    let _lock = Lock::cluster(&ctx.paths, name)?;
    let record = load_record(&ctx.paths, name)?;
    let vm = ctx.vm(name)?;
    if record.is_none() && vm.is_some() {
        return Err(name_taken(name));
    }
    if let (Some(r), Some(vm)) = (&record, &vm) {
        if vm.status == VmStatus::Running {
            say.line(format!(
                "cluster {name:?} is already running (API server {}); see `{}`",
                r.api_url(),
                command_for("status", name)
            ));
            return Ok(StartReport {
                name: name.to_string(),
                already_running: true,
                restarted: false,
                api_server: r.api_url(),
                node_ports: r.node_port_range(),
                kubeconfig: None,
                context: name.to_string(),
                target_phase: o.until.clone().unwrap_or_else(|| READY_PHASE.to_string()),
                phases: Vec::new(),
                seconds: t0.elapsed().as_secs_f64(),
            });
        }
    }
    let restarted = vm.is_some();
    let (record, vm) = match vm {
        Some(vm) => restart_prepare(&ctx, o, record.expect("checked above"), vm, say)?,
        None => first_start_prepare(&ctx, o, record, say)?,
    };
    check_ports(&record, say)?;
    let console_offset = std::fs::metadata(&vm.console_log).map(|m| m.len()).unwrap_or(0);
    say.line(format!(
        "starting cluster {name:?}: {} vCPU{}, {} MiB, disk {} GiB, API server {}",
        vm.spec.cpus,
        if vm.spec.cpus == 1 { "" } else { "s" },
        vm.spec.memory_mib,
        record.disk_size_gib,
        record.api_url()
    ));
    let target = o.until.clone().unwrap_or_else(|| READY_PHASE.to_string());
    let what = if target == READY_PHASE { "the node to be Ready".to_string() } else { format!("phase {target}") };
    let wait = o.wait.unwrap_or(Duration::from_secs(DEFAULT_WAIT_SECS));
    let mut attempt = 0;
    let phases = loop {
        let console_offset = if attempt == 0 {
            console_offset
        } else {
            std::fs::metadata(&vm.console_log).map(|m| m.len()).unwrap_or(0)
        };
        ctx.client.start(name)?;
        say.line(format!(
            "waiting for {what} (phases in seconds since the guest kernel started; console: `{}`)",
            command_for("logs", name)
        ));
        match wait_ready(&ctx, name, &vm, console_offset, &target, wait, say) {
            Ok(phases) => break phases,
            // A guest crash (triple fault) is restarted: the node's state is on its disk.
            // Under the emulated runner, nested virtualization does this now and then.
            Err(e)
                if attempt < CRASH_RESTARTS
                    && ctx
                        .vm(name)
                        .ok()
                        .flatten()
                        .is_some_and(|v| v.exit_code == Some(kindling_proto::exit::GUEST_CRASHED)) =>
            {
                attempt += 1;
                say.line(format!(
                    "the guest crashed (a vCPU triple-faulted; the console is in `{}`); restarting it, attempt {attempt} of {CRASH_RESTARTS}",
                    command_for("logs", name)
                ));
                tracing::debug!("crash before Ready: {e:#}");
            }
            Err(e) => return Err(e),
        }
    };
    let agent = Agent::vsock(agent::vsock_socket(&vm.dir)).patient(AGENT_PATIENCE);
    // The agent writes admin.conf right after agent-start.
    let kubeconfig = if target == "agent-start" { None } else { Some(write_kubeconfig(&agent, &record)?) };
    Ok(StartReport {
        name: name.to_string(),
        already_running: false,
        restarted,
        api_server: record.api_url(),
        node_ports: record.node_port_range(),
        kubeconfig,
        context: name.to_string(),
        target_phase: target,
        phases,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// First start (or a start after an interrupted one): images, record, disk, VM.
fn first_start_prepare(
    ctx: &Ctx,
    o: &StartOptions,
    record: Option<ClusterRecord>,
    say: &Say,
) -> Result<(ClusterRecord, Vm)> {
    let name = o.name.as_str();
    let runner = o.runner.unwrap_or_default();
    let emulated = check_runner(runner, say)?;
    let (kernel, rootfs) = build_images(say)?;
    let created_record = record.is_none();
    let record = match record {
        Some(mut r) => {
            if let Some(d) = o.disk_size_gib {
                r.disk_size_gib = d;
            }
            r
        }
        None => {
            let _ports = Lock::ports(&ctx.paths)?;
            let r = new_record(&ctx.paths, name, o.disk_size_gib.unwrap_or(DEFAULT_DISK_GIB))?;
            save_record(&ctx.paths, &r)?;
            r
        }
    };
    let vm_dir = ctx.paths.vm_dir(name);
    let result = (|| -> Result<Vm> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&vm_dir).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOSPC) => disk::disk_full("creating the VM directory", &ctx.paths.state_dir, None),
            _ => anyhow::Error::new(e).context(format!("cannot create {}", vm_dir.display())),
        })?;
        let disk_file = disk_path(&ctx.paths, name);
        let parked = parked_disk(&ctx.paths, name);
        let size = record.disk_size_gib * disk::GIB;
        if !disk_file.exists() && parked.exists() {
            say.line(format!("disk: recovering {} (left by an interrupted start)", parked.display()));
            std::fs::rename(&parked, &disk_file).with_context(|| format!("cannot move {} back", parked.display()))?;
        }
        if disk_file.exists() {
            say.line(format!("disk: reusing {}", disk_file.display()));
            if disk::grow(&disk_file, size)? {
                say.line(format!("disk: grown to {} GiB", record.disk_size_gib));
            }
        } else {
            say.line(format!(
                "disk: copying the root disk to {} ({} GiB, sparse)",
                disk_file.display(),
                record.disk_size_gib
            ));
            disk::create(&rootfs, &disk_file, size)?;
        }
        note_free_space(&vm_dir, record.disk_size_gib, say);
        save_record(&ctx.paths, &record)?;
        let spec = spec_for(
            name,
            kernel.clone(),
            disk_file,
            &record,
            cpus_for(o.cpus, emulated, say),
            o.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
            runner,
            o.until.as_deref(),
        );
        ctx.client.create(&spec).map_err(|e| match e {
            ClientError::Api { status: 409, .. } => name_taken(name),
            e => e.into(),
        })
    })();
    match result {
        Ok(vm) => Ok((record, vm)),
        Err(e) => {
            // A first start that failed leaves nothing behind but a complete disk.
            if created_record && !disk_path(&ctx.paths, name).exists() {
                let _ = std::fs::remove_file(record_path(&ctx.paths, name));
                let _ = std::fs::remove_dir(&vm_dir);
            }
            Err(e)
        }
    }
}

/// Restart of a stopped cluster: same disk. Applies explicit changes (a larger disk,
/// other vCPUs, memory or runner) and a kernel that has gone from the image cache, by
/// recreating the VM around the kept disk.
fn restart_prepare(
    ctx: &Ctx,
    o: &StartOptions,
    mut record: ClusterRecord,
    vm: Vm,
    say: &Say,
) -> Result<(ClusterRecord, Vm)> {
    let name = o.name.as_str();
    say.line(format!("cluster {name:?} exists ({}); starting it again with its data", vm.status));
    let runner = o.runner.unwrap_or(vm.spec.runner);
    check_runner(runner, say)?;
    let disk_file = vm.spec.disks.first().map(|d| d.path.clone()).unwrap_or_else(|| disk_path(&ctx.paths, name));
    if let Some(gib) = o.disk_size_gib {
        let len = std::fs::metadata(&disk_file).map(|m| m.len()).unwrap_or(0);
        if gib * disk::GIB > len {
            say.line(format!("disk: growing to {gib} GiB"));
            disk::grow(&disk_file, gib * disk::GIB)?;
            record.disk_size_gib = gib;
            save_record(&ctx.paths, &record)?;
        } else if gib * disk::GIB < len {
            say.line(format!(
                "note: the disk stays {} GiB: disks only grow (delete the cluster to start smaller)",
                len / disk::GIB
            ));
        }
    }
    let cpus = o.cpus.unwrap_or(vm.spec.cpus);
    let memory_mib = o.memory_mib.unwrap_or(vm.spec.memory_mib);
    let mut kernel = vm.spec.kernel.clone();
    let mut why = Vec::new();
    if !kernel.is_file() {
        say.line(format!(
            "the cluster's kernel {} is no longer in the image cache; using the current one",
            kernel.display()
        ));
        kernel = build_images(say)?.0;
        why.push("kernel");
    }
    if cpus != vm.spec.cpus {
        why.push("vCPUs");
    }
    if memory_mib != vm.spec.memory_mib {
        why.push("memory");
    }
    if runner != vm.spec.runner {
        why.push("runner");
    }
    let spec = spec_for(name, kernel, disk_file.clone(), &record, cpus, memory_mib, runner, o.until.as_deref());
    if why.is_empty() && spec.forwards == vm.spec.forwards && spec.cmdline == vm.spec.cmdline {
        return Ok((record, vm));
    }
    if why.is_empty() {
        why.push("settings");
    }
    say.line(format!("updating the VM's {} (the disk is kept)", why.join(", ")));
    let vm = recreate(ctx, name, &disk_file, &spec)?;
    Ok((record, vm))
}

/// Replaces a stopped VM's spec: parks the disk outside the VM directory (the daemon's
/// delete removes disks inside it), deletes and recreates the VM, puts the disk back.
/// An interruption leaves the disk parked, and the next start picks it up.
fn recreate(ctx: &Ctx, name: &str, disk_file: &Path, spec: &VmSpec) -> Result<Vm> {
    let parked = parked_disk(&ctx.paths, name);
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(clusters_dir(&ctx.paths))?;
    std::fs::rename(disk_file, &parked).with_context(|| format!("cannot move {} aside", disk_file.display()))?;
    let result = (|| -> Result<Vm> {
        ctx.client.delete(name)?;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(ctx.paths.vm_dir(name))?;
        std::fs::rename(&parked, disk_file)
            .with_context(|| format!("cannot move {} back to {}", parked.display(), disk_file.display()))?;
        Ok(ctx.client.create(spec)?)
    })();
    if result.is_err() && parked.exists() && ctx.vm(name).ok().flatten().is_some() {
        // The delete failed: the VM is still there, so is its directory.
        let _ = std::fs::rename(&parked, disk_file);
    }
    result
}

/// The console's phase lines written since `offset` (when the agent is not reachable).
fn console_phases(console_log: &Path, offset: u64) -> Vec<Phase> {
    let Ok(mut f) = std::fs::File::open(console_log) else { return Vec::new() };
    if f.seek(std::io::SeekFrom::Start(offset)).is_err() {
        return Vec::new();
    }
    let mut text = Vec::new();
    let _ = f.take(64 << 20).read_to_end(&mut text);
    phase::from_console(&String::from_utf8_lossy(&text))
}

/// Why a VM stopped, for the messages.
fn exit_text(vm: &Vm) -> String {
    match (vm.exit_code, vm.exit_signal) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("ended by signal {s}"),
        (None, None) => "exit status unknown".into(),
    }
}

fn stopped_while_starting(ctx: &Ctx, vm: &Vm) -> anyhow::Error {
    let tail = ctx.client.console(&vm.name, Some(30)).unwrap_or_else(|e| format!("(cannot read the console: {e})"));
    anyhow::anyhow!(
        "the VM of cluster {name:?} stopped while starting ({}); the last 30 lines of its console:\n{}\n(whole console: `{}`; the VMM's own errors are among these lines)",
        exit_text(vm),
        tail.trim_end(),
        command_for("logs", &vm.name),
        name = vm.name,
    )
}

/// Polls the agent's phases until `target` (node-ready), printing each new phase.
fn wait_ready(
    ctx: &Ctx,
    name: &str,
    vm: &Vm,
    console_offset: u64,
    target: &str,
    timeout: Duration,
    say: &Say,
) -> Result<Vec<Phase>> {
    let agent = Agent::vsock(agent::vsock_socket(&vm.dir));
    let t0 = Instant::now();
    let mut shown: Vec<Phase> = Vec::new();
    let mut next_note = Duration::from_secs(30);
    let mut ready_on_console: Option<Instant> = None;
    loop {
        let now = ctx.client.get(name)?;
        if now.status != VmStatus::Running {
            return Err(stopped_while_starting(ctx, &now));
        }
        let (phases, agent_error) = match agent.phases() {
            Ok(p) => (p, None),
            Err(e) => (console_phases(&vm.console_log, console_offset), Some(e)),
        };
        for p in phases {
            if !shown.iter().any(|s| s.name == p.name) {
                say.line(format!("  {:<18}{:>8.1} s", p.name, p.seconds));
                shown.push(p);
            }
        }
        if shown.iter().any(|p| p.name == target) {
            match &agent_error {
                None => return Ok(shown),
                Some(e) => {
                    let since = *ready_on_console.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(90) {
                        bail!(
                            "the node reports {target} on its console, but its agent does not answer over vsock ({e}); \
                             the cluster runs, but kindling cannot fetch its kubeconfig: see `{}`, then `{}`",
                            command_for("logs", name),
                            command_for("stop", name)
                        );
                    }
                }
            }
        }
        let elapsed = t0.elapsed();
        if elapsed > timeout {
            let last = shown.last().map(|p| p.name.as_str()).unwrap_or("none yet");
            bail!(
                "the node has not reached {target} after {} s (last phase: {last}); it keeps running: look at `{}` and `kindling logs kubelet{}`, \
                 then `{}` again with a longer --wait, or `{}`",
                elapsed.as_secs(),
                command_for("logs", name),
                if name == DEFAULT_NAME { String::new() } else { format!(" --name {name}") },
                command_for("start", name),
                command_for("delete", name)
            );
        }
        if elapsed >= next_note {
            let hint = match &agent_error {
                Some(_) if shown.is_empty() => " — the node is booting",
                Some(_) => " — the agent does not answer over vsock yet",
                None => "",
            };
            say.line(format!("  still waiting ({} s){hint}", elapsed.as_secs()));
            next_note += Duration::from_secs(30);
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Fetches the node's admin kubeconfig and merges it as context `<name>`.
fn write_kubeconfig(agent: &Agent, r: &ClusterRecord) -> Result<PathBuf> {
    let entries = admin_entries(agent, &r.name, &r.api_url(), |e| {
        anyhow::Error::new(e).context("fetching the node's admin kubeconfig")
    })?;
    let path = kubeconfig::default_path();
    kubeconfig::merge_into(&path, &entries)?;
    Ok(path)
}

/// The node's admin kubeconfig (read through its agent) as entries named `name`,
/// pointing at `server`; `unreachable` words an agent error.
fn admin_entries(
    agent: &Agent,
    name: &str,
    server: &str,
    unreachable: impl FnOnce(AgentError) -> anyhow::Error,
) -> Result<kubeconfig::Entries> {
    let (code, text) = agent.exec_capture(&["cat", ADMIN_CONF], CAPTURE_DEADLINE).map_err(unreachable)?;
    if code != 0 {
        bail!("cannot read {ADMIN_CONF} in the node (exit {code}): {}", text.trim());
    }
    kubeconfig::Entries::from_admin_conf(name, &text, server)
}

/// What `stop` did.
#[derive(Clone, Debug, Serialize)]
pub struct StopReport {
    pub name: String,
    pub was_running: bool,
    /// The node shut down through its agent (otherwise the VM process was stopped).
    pub orderly: bool,
    pub seconds: f64,
}

/// `kindling stop`: power-off through the agent, then the daemon's stop as a fallback.
pub fn stop(name: &str, wait: Duration, say: &Say) -> Result<StopReport> {
    let ctx = Ctx::connect()?;
    let _lock = Lock::cluster(&ctx.paths, name)?;
    stop_locked(&ctx, name, wait, say, true)
}

fn stop_locked(ctx: &Ctx, name: &str, wait: Duration, say: &Say, final_line: bool) -> Result<StopReport> {
    let t0 = Instant::now();
    let (_, vm) = ctx.cluster(name)?;
    let Some(vm) = vm.filter(|v| v.status == VmStatus::Running) else {
        say.line(format!("cluster {name:?} is not running"));
        return Ok(StopReport { name: name.to_string(), was_running: false, orderly: false, seconds: 0.0 });
    };
    let agent = Agent::vsock(agent::vsock_socket(&vm.dir)).patient(AGENT_PATIENCE);
    let mut orderly = false;
    match agent.poweroff() {
        Ok(()) => {
            say.line(format!(
                "stopping cluster {name:?}: the node is shutting down (kubelet, control plane, etcd, containerd)"
            ));
            let mut next_note = Duration::from_secs(30);
            while t0.elapsed() < wait {
                std::thread::sleep(Duration::from_millis(500));
                if ctx.client.get(name)?.status != VmStatus::Running {
                    orderly = true;
                    break;
                }
                if t0.elapsed() >= next_note {
                    say.line(format!("  still stopping ({} s)", t0.elapsed().as_secs()));
                    next_note += Duration::from_secs(30);
                }
            }
            if !orderly {
                say.line(format!("the node did not power off within {} s; stopping its VM process", wait.as_secs()));
            }
        }
        Err(e) => say.line(format!("stopping cluster {name:?}: {e}; stopping its VM process instead")),
    }
    if !orderly {
        match ctx.client.stop(name, Some(Duration::from_secs(30))) {
            Ok(_) => {}
            // It exited meanwhile.
            Err(ClientError::Api { status: 409, .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if final_line {
        say.line(format!(
            "cluster {name:?} stopped in {secs:.1} s; its data is kept (`{}` starts it again)",
            command_for("start", name)
        ));
    }
    Ok(StopReport { name: name.to_string(), was_running: true, orderly, seconds: secs })
}

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
            stop_locked(&ctx, name, Duration::from_secs(DEFAULT_STOP_WAIT_SECS), say, false)?;
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
    // A first start interrupted before the VM existed leaves its directory.
    let dir = ctx.paths.vm_dir(name);
    if dir.is_dir() && !ctx.paths.vm_json(name).exists() {
        for f in [DISK_FILE, "disk.partial"] {
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

/// A cluster as `status` and `list` report it.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    pub name: String,
    /// created, running, stopped, or missing (a record whose VM is gone).
    pub status: String,
    /// The node reported node-ready (only known while it runs and its agent answers).
    pub ready: Option<bool>,
    pub api_server: String,
    /// Host addresses of the NodePorts 30000-32767.
    pub node_ports: String,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk: Option<PathBuf>,
    pub disk_size_gib: u64,
    /// Bytes the sparse disk occupies on the host.
    pub disk_allocated_bytes: Option<u64>,
    pub runner: Option<String>,
    pub pid: Option<u32>,
    pub started_at: Option<u64>,
    pub vm_dir: PathBuf,
    pub console_log: Option<PathBuf>,
    /// The kubeconfig context named after the cluster, when the kubeconfig has it.
    pub context: Option<String>,
    pub kubeconfig: PathBuf,
    /// Phases reached by the running node, from its agent.
    pub phases: Option<Vec<Phase>>,
    pub agent_error: Option<String>,
}

fn status_of(paths: &Paths, r: &ClusterRecord, vm: Option<&Vm>, ask_agent: bool) -> ClusterStatus {
    let kubeconfig = kubeconfig::default_path();
    let context =
        kubeconfig::load(&kubeconfig).ok().filter(|d| kubeconfig::has_context(d, &r.name)).map(|_| r.name.clone());
    let disk = vm.and_then(|v| v.spec.disks.first()).map(|d| d.path.clone());
    let (mut phases, mut agent_error) = (None, None);
    if let Some(vm) = vm.filter(|v| ask_agent && v.status == VmStatus::Running) {
        match Agent::vsock(agent::vsock_socket(&vm.dir)).phases() {
            Ok(p) => phases = Some(p),
            Err(e) => agent_error = Some(e.to_string()),
        }
    }
    ClusterStatus {
        name: r.name.clone(),
        status: vm.map(|v| v.status.to_string()).unwrap_or_else(|| "missing".into()),
        ready: phases.as_ref().map(|p: &Vec<Phase>| p.iter().any(|p| p.name == READY_PHASE)),
        api_server: r.api_url(),
        node_ports: r.node_port_range(),
        cpus: vm.map(|v| v.spec.cpus),
        memory_mib: vm.map(|v| v.spec.memory_mib),
        disk_allocated_bytes: disk.as_deref().map(disk::allocated),
        disk,
        disk_size_gib: r.disk_size_gib,
        runner: vm.map(|v| runner_name(v.spec.runner).to_string()),
        pid: vm.filter(|v| v.status == VmStatus::Running).and_then(|v| v.pid),
        started_at: vm.and_then(|v| v.started_at),
        vm_dir: paths.vm_dir(&r.name),
        console_log: vm.map(|v| v.console_log.clone()),
        context,
        kubeconfig,
        phases,
        agent_error,
    }
}

/// `kindling status`.
pub fn status(name: &str) -> Result<ClusterStatus> {
    let ctx = Ctx::connect()?;
    let (r, vm) = ctx.cluster(name)?;
    Ok(status_of(&ctx.paths, &r, vm.as_ref(), true))
}

/// `kindling list`: every cluster (VMs created otherwise are not listed).
pub fn list() -> Result<Vec<ClusterStatus>> {
    let ctx = Ctx::connect()?;
    let vms = ctx.client.list()?;
    Ok(all_records(&ctx.paths)
        .iter()
        .map(|r| status_of(&ctx.paths, r, vms.iter().find(|v| v.name == r.name), false))
        .collect())
}

/// Writes agent output to stdout as it comes, byte for byte.
fn print_out(b: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(b);
    let _ = out.flush();
}

fn agent_error(e: AgentError, name: &str) -> anyhow::Error {
    match e {
        AgentError::Refused(m) if m.contains("unknown variant") => anyhow::anyhow!(
            "the node's agent does not know this request ({m}): the cluster's root disk predates this kindling; \
             rebuild it with `kindling images build`, then `{}` and `{}`",
            command_for("delete", name),
            command_for("start", name)
        ),
        e => anyhow::anyhow!("{e}; check that the node is up with `{}`", command_for("status", name)),
    }
}

/// `kindling exec -- CMD...`: runs in the guest, output streamed; returns its exit code.
pub fn exec(name: &str, argv: &[String]) -> Result<i32> {
    let ctx = Ctx::connect()?;
    let (_, _, agent) = ctx.running(name)?;
    agent.exec(argv, &mut |s| print_out(s)).map_err(|e| agent_error(e, name))
}

/// `kindling logs`: the console (no component), or a component's log from the agent.
pub fn logs(name: &str, component: Option<&str>, follow: bool) -> Result<i32> {
    let ctx = Ctx::connect()?;
    if let Some(c) = component {
        let (_, _, agent) = ctx.running(name)?;
        return agent.logs(c, follow, &mut |s| print_out(s)).map_err(|e| match e {
            AgentError::Refused(m) if m.starts_with("no component") => {
                anyhow::anyhow!("{m}; components: containerd, etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy")
            }
            e => agent_error(e, name),
        });
    }
    let (_, vm) = ctx.cluster(name)?;
    let vm = vm.ok_or_else(|| not_running(name, "its VM does not exist"))?;
    if !follow {
        print_out(ctx.client.console(name, None)?.as_bytes());
        return Ok(0);
    }
    // Follow: read the console file from its start, then what is appended, until the VM
    // has stopped and everything is shown.
    let mut f = std::fs::File::open(&vm.console_log)
        .with_context(|| format!("cannot read the console log {}", vm.console_log.display()))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_check = Instant::now();
    let mut running = true;
    loop {
        let n = f.read(&mut buf)?;
        if n > 0 {
            let mut out = std::io::stdout().lock();
            if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                return Ok(0); // stdout closed (e.g. piped to head)
            }
            continue;
        }
        if !running {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(250));
        if last_check.elapsed() > Duration::from_secs(2) {
            last_check = Instant::now();
            running = ctx.client.get(name)?.status == VmStatus::Running;
        }
    }
}

/// Picks the node's address from `ip -4 -o addr show`: eth0's, else a non-loopback
/// address on another interface than the pod bridge, else one on lo outside 127/8 (the
/// agent puts the node address there when the VM has no network device).
pub fn node_ip_from(ip_output: &str) -> Option<String> {
    let addrs: Vec<(String, String)> = ip_output
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|w| *w == "inet")?;
            let ifname = f.get(1)?.trim_end_matches(':').split('@').next()?.to_string();
            let addr = f.get(i + 1)?.split('/').next()?.to_string();
            Some((ifname, addr))
        })
        .filter(|(_, a)| !a.starts_with("127."))
        .collect();
    let pick = |pred: &dyn Fn(&str) -> bool| addrs.iter().find(|(i, _)| pred(i)).map(|(_, a)| a.clone());
    pick(&|i| i == "eth0")
        .or_else(|| pick(&|i| i != "lo" && i != "cni0" && !i.starts_with("veth") && !i.starts_with("kube-")))
        .or_else(|| pick(&|i| i == "lo"))
}

/// The node address the command line gives (kindling.ip=ADDR/PREFIX), else the default.
pub fn node_ip_from_cmdline(cmdline: Option<&str>) -> String {
    use kindling_proto::cmdline::{params, IP};
    params(cmdline.unwrap_or(""))
        .find(|(k, _)| *k == IP)
        .map(|(_, v)| v.split('/').next().unwrap_or(v).to_string())
        .unwrap_or_else(|| DEFAULT_NODE_IP.to_string())
}

/// `kindling ip`: the node's address as the node sees it.
pub fn ip(name: &str) -> Result<String> {
    let ctx = Ctx::connect()?;
    let (_, vm, agent) = ctx.running(name)?;
    match agent.exec_capture(&["ip", "-4", "-o", "addr", "show"], CAPTURE_DEADLINE) {
        Ok((0, out)) => Ok(node_ip_from(&out).unwrap_or_else(|| node_ip_from_cmdline(vm.spec.cmdline.as_deref()))),
        Ok((code, out)) => bail!("`ip -4 -o addr show` failed in the node (exit {code}): {}", out.trim()),
        Err(e) => Err(agent_error(e, name)),
    }
}

/// Where `kindling kubeconfig` gets the node's admin kubeconfig from.
pub enum KubeconfigSource {
    /// A kindling cluster; the server is its forwarded API port.
    Cluster,
    /// A VM from `kindling boot --vsock PATH`, its API server reached at `server`.
    Vsock { path: PathBuf, server: String },
}

/// `kindling kubeconfig`: the node's admin credentials as a kubeconfig whose cluster,
/// user and context are named `name`; with `merge`, merged into the user's kubeconfig
/// (returning its path) instead of returned as text.
pub fn kubeconfig(name: &str, source: &KubeconfigSource, merge: bool) -> Result<(String, Option<PathBuf>)> {
    let (agent, server) = match source {
        KubeconfigSource::Cluster => {
            let ctx = Ctx::connect()?;
            let (r, _, agent) = ctx.running(name)?;
            (agent, r.api_url())
        }
        KubeconfigSource::Vsock { path, server } => {
            if !server.starts_with("https://") {
                bail!("--server {server:?}: give the host URL of the forwarded API server, e.g. https://127.0.0.1:16443 for --forward 16443:6443");
            }
            (Agent::vsock(path).patient(AGENT_PATIENCE), server.clone())
        }
    };
    let entries = admin_entries(&agent, name, &server, |e| {
        match source {
        KubeconfigSource::Cluster => agent_error(e, name),
        KubeconfigSource::Vsock { path, .. } => anyhow::anyhow!(
            "{e}; is a VM booted from kindling's root disk running with --vsock {}? Its agent writes {ADMIN_CONF} once it starts",
            path.display()
        ),
    }
    })?;
    if merge {
        let path = kubeconfig::default_path();
        kubeconfig::merge_into(&path, &entries)?;
        return Ok((String::new(), Some(path)));
    }
    Ok((kubeconfig::standalone(&entries)?, None))
}

/// `kindling image load ARCHIVE`: into the node's containerd (namespace k8s.io).
pub fn image_load(name: &str, archive: &Path, say: &Say) -> Result<i32> {
    let mut f =
        std::fs::File::open(archive).with_context(|| format!("image archive {}: cannot open it", archive.display()))?;
    let meta = f.metadata()?;
    if !meta.is_file() || meta.len() == 0 {
        bail!(
            "image archive {}: not a non-empty file; give an OCI or docker archive (`docker save -o app.tar IMAGE`)",
            archive.display()
        );
    }
    let ctx = Ctx::connect()?;
    let (_, _, agent) = ctx.running(name)?;
    let t0 = Instant::now();
    say.line(format!(
        "loading {} ({:.1} MiB) into cluster {name:?}",
        archive.display(),
        meta.len() as f64 / (1 << 20) as f64
    ));
    let code = agent.import(&mut f, meta.len(), &mut |s| print_out(s)).map_err(|e| agent_error(e, name))?;
    if code == 0 {
        say.line(format!(
            "loaded in {:.1} s; pods can use its image names with imagePullPolicy: IfNotPresent (or Never)",
            t0.elapsed().as_secs_f64()
        ));
    }
    Ok(code)
}

/// `kindling service NAME --url`: host URLs of a NodePort service.
pub fn service_urls(name: &str, service: &str, namespace: &str) -> Result<Vec<String>> {
    let ctx = Ctx::connect()?;
    let (r, _, agent) = ctx.running(name)?;
    let jsonpath = r#"jsonpath={.spec.type}{" "}{.spec.ports[*].nodePort}"#;
    let (code, out) = agent
        .exec_capture(
            &["kubectl", "--kubeconfig", ADMIN_CONF, "-n", namespace, "get", "service", service, "-o", jsonpath],
            CAPTURE_DEADLINE,
        )
        .map_err(|e| agent_error(e, name))?;
    if code != 0 {
        bail!(
            "{} (list the services with `kindling kubectl{} -- get services -A`)",
            out.trim(),
            if name == DEFAULT_NAME { String::new() } else { format!(" --name {name}") }
        );
    }
    node_port_urls(&out, &r, service, namespace)
}

fn node_port_urls(out: &str, r: &ClusterRecord, service: &str, namespace: &str) -> Result<Vec<String>> {
    let mut words = out.split_whitespace();
    let kind = words.next().unwrap_or("");
    let node_ports: Vec<u16> = words.filter_map(|w| w.parse().ok()).collect();
    if node_ports.is_empty() {
        bail!(
            "service {service:?} in namespace {namespace:?} is of type {kind} and has no NodePort; make it one with \
             `kubectl --context {} -n {namespace} patch service {service} -p '{{\"spec\":{{\"type\":\"NodePort\"}}}}'`",
            r.name
        );
    }
    node_ports
        .iter()
        .map(|&np| {
            ports::host_port_for(np, r.node_port_base)
                .map(|hp| format!("http://127.0.0.1:{hp}"))
                .with_context(|| format!("NodePort {np} is outside 30000-32767, the range forwarded to the host"))
        })
        .collect()
}

/// `kindling kubectl -- ARGS`: the host's kubectl with `--context <name>`.
pub fn kubectl(name: &str, args: &[String]) -> Result<i32> {
    check_name(name)?;
    let Some(kubectl) = crate::util::which("kubectl") else {
        bail!("kubectl is not on your PATH; install it with scripts/setup (it installs kubectl), or put a kubectl on PATH");
    };
    let path = kubeconfig::default_path();
    let doc = kubeconfig::load(&path)?;
    if !kubeconfig::has_context(&doc, name) {
        bail!(
            "the kubeconfig {} has no context {name:?}; `{}` writes it (a running cluster keeps it)",
            path.display(),
            command_for("start", name)
        );
    }
    let status = std::process::Command::new(&kubectl)
        .arg("--context")
        .arg(name)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {}", kubectl.display()))?;
    Ok(status.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_are_vm_names_that_make_hostnames() {
        check_name("kindling").unwrap();
        check_name("dev-2").unwrap();
        let e = check_name("Dev").unwrap_err().to_string();
        assert!(e.starts_with("cluster name \"Dev\" is not allowed"), "{e}");
        assert!(check_name("dev-").unwrap_err().to_string().contains("hostname"));
    }

    #[test]
    fn commands_name_the_cluster_unless_it_is_the_default() {
        assert_eq!(command_for("stop", "kindling"), "kindling stop");
        assert_eq!(command_for("stop", "dev"), "kindling stop --name dev");
        assert_eq!(
            not_found("dev").to_string(),
            "no cluster named \"dev\"; create it with `kindling start --name dev`"
        );
    }

    #[test]
    fn records_round_trip_and_list_in_order() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        assert_eq!(load_record(&paths, "a").unwrap(), None);
        let r = |name: &str, port| ClusterRecord {
            name: name.into(),
            api_port: port,
            node_port_base: 30000,
            disk_size_gib: 20,
            created_at: 1,
        };
        save_record(&paths, &r("b", 16444)).unwrap();
        save_record(&paths, &r("a", 16443)).unwrap();
        std::fs::write(clusters_dir(&paths).join("junk.json"), "{").unwrap();
        std::fs::write(clusters_dir(&paths).join("b.lock"), "").unwrap();
        assert_eq!(load_record(&paths, "a").unwrap(), Some(r("a", 16443)));
        assert_eq!(all_records(&paths), vec![r("a", 16443), r("b", 16444)]);
        assert!(load_record(&paths, "junk").unwrap_err().to_string().contains("not a valid cluster record"));
        assert_eq!(r("a", 16443).api_url(), "https://127.0.0.1:16443");
        assert_eq!(r("a", 16443).node_port_range(), "127.0.0.1:30000-32767");
    }

    #[test]
    fn a_new_cluster_avoids_the_ports_of_the_others() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        let first = new_record(&paths, "a", 20).unwrap();
        assert!(first.api_port >= ports::FIRST_API_PORT);
        save_record(&paths, &first).unwrap();
        let second = new_record(&paths, "b", 20).unwrap();
        assert_ne!(second.api_port, first.api_port, "a stopped cluster keeps its API port");
        assert_ne!(second.node_port_base, first.node_port_base, "and its NodePort range");
        // A record's own ports do not count against it (a restart after a lost VM).
        assert_eq!(new_record(&paths, "a", 20).unwrap().api_port, first.api_port);
    }

    #[test]
    fn the_spec_boots_the_node_with_vsock_and_forwards() {
        let r = ClusterRecord {
            name: "dev".into(),
            api_port: 16444,
            node_port_base: 20000,
            disk_size_gib: 20,
            created_at: 0,
        };
        let s = spec_for("dev", "/k".into(), "/s/vms/dev/disk.ext4".into(), &r, 2, 4096, RunnerKind::Auto, None);
        assert_eq!(s.cmdline.as_deref(), Some("console=ttyS0 panic=1 root=/dev/vda rw kindling.hostname=dev"));
        assert!(s.vsock);
        assert_eq!(s.forwards, ["127.0.0.1:16444:6443", "127.0.0.1:20000-22767:30000-32767"]);
        assert_eq!(s.disks, vec![DiskSpec { path: "/s/vms/dev/disk.ext4".into(), read_only: false }]);
        assert_eq!((s.cpus, s.memory_mib), (2, 4096));
        let s = spec_for("dev", "/k".into(), "/d".into(), &r, 1, 1024, RunnerKind::Emulated, Some("apiserver-ready"));
        assert!(s.cmdline.unwrap().ends_with("kindling.hostname=dev kindling.until=apiserver-ready"));
        assert_eq!(s.runner, RunnerKind::Emulated);
    }

    #[test]
    fn resources_are_checked_before_anything_runs() {
        let o = |cpus, memory_mib, disk_size_gib| StartOptions {
            name: "k".into(),
            cpus,
            memory_mib,
            disk_size_gib,
            ..Default::default()
        };
        check_resources(&o(Some(2), Some(4096), Some(20))).unwrap();
        check_resources(&o(None, None, None)).unwrap();
        assert!(check_resources(&o(Some(0), None, None)).unwrap_err().to_string().contains("--cpus 0"));
        assert!(check_resources(&o(None, Some(512), None)).unwrap_err().to_string().contains("needs 1024"));
        assert!(check_resources(&o(None, None, Some(0))).unwrap_err().to_string().contains("--disk-size 0"));
        let until = |u: &str| StartOptions { name: "k".into(), until: Some(u.into()), ..Default::default() };
        check_resources(&until("apiserver-ready")).unwrap();
        assert!(check_resources(&until("ready"))
            .unwrap_err()
            .to_string()
            .contains("use one of agent-start, etcd-ready"));
    }

    #[test]
    fn node_address_from_ip_output() {
        let with_eth0 = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n\
                         2: eth0    inet 10.0.2.15/24 brd 10.0.2.255 scope global eth0\\       valid_lft forever\n\
                         3: cni0    inet 10.244.0.1/24 brd 10.244.0.255 scope global cni0\\       valid_lft forever\n";
        assert_eq!(node_ip_from(with_eth0).as_deref(), Some("10.0.2.15"));
        let on_lo = "1: lo    inet 127.0.0.1/8 scope host lo\n1: lo    inet 10.0.2.15/32 scope global lo\n3: cni0    inet 10.244.0.1/24 scope global cni0\n";
        assert_eq!(node_ip_from(on_lo).as_deref(), Some("10.0.2.15"));
        assert_eq!(node_ip_from("1: lo    inet 127.0.0.1/8 scope host lo\n"), None);
        assert_eq!(node_ip_from_cmdline(Some("console=ttyS0 kindling.ip=192.168.7.2/24")), "192.168.7.2");
        assert_eq!(node_ip_from_cmdline(None), "10.0.2.15");
    }

    #[test]
    fn service_urls_map_node_ports_to_host_ports() {
        let r = ClusterRecord {
            name: "dev".into(),
            api_port: 16443,
            node_port_base: 20000,
            disk_size_gib: 20,
            created_at: 0,
        };
        assert_eq!(
            node_port_urls("NodePort 30080 31000", &r, "web", "default").unwrap(),
            ["http://127.0.0.1:20080", "http://127.0.0.1:21000"]
        );
        let e = node_port_urls("ClusterIP ", &r, "web", "default").unwrap_err().to_string();
        assert!(e.contains("type ClusterIP and has no NodePort") && e.contains("--context dev"), "{e}");
    }

    #[test]
    fn console_phases_start_after_the_offset() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("console.log");
        std::fs::write(&log, "kindling-agent: phase agent-start 1.0\nkindling-agent: phase node-ready 300.0\n")
            .unwrap();
        let offset = std::fs::metadata(&log).unwrap().len();
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"kindling-agent: phase agent-start 1.5\n").unwrap();
        assert_eq!(console_phases(&log, offset), vec![Phase { name: "agent-start".into(), seconds: 1.5 }]);
        assert_eq!(console_phases(&log, 0).len(), 2);
    }
}
