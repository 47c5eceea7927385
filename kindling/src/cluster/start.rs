//! `kindling start`, in ordered steps as kind's `create`: check the options and the
//! runner, build (or reuse) the images, prepare the record, disk and VM (a first
//! start, or a restart that keeps the disk and may recreate the VM around it), boot,
//! wait for the node's phases, write the kubeconfig context, report.

use std::io::{Read, Seek};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::*;

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
    /// Add-ons to enable besides those the cluster has (`--addons a,b`): on a new
    /// cluster, in addition to the defaults; on an existing one, in addition to what it
    /// runs (recorded, and deployed now if it is running). Never disables one.
    pub addons: Vec<String>,
    /// Clone the new cluster from this suspended one (`--from BASE`).
    pub from: Option<String>,
}

/// What `start` did.
#[derive(Clone, Debug, Serialize)]
pub struct StartReport {
    pub name: String,
    /// It was running already: nothing was done.
    pub already_running: bool,
    /// A stopped cluster was started again (its disk kept).
    pub restarted: bool,
    /// It was resumed from the snapshot of a suspend (not booted).
    pub resumed: bool,
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

impl StartReport {
    /// The report of a start of the cluster `r` as `o` asked for it, begun at `t0`: its
    /// addresses and target, with nothing done yet.
    pub(super) fn of(r: &ClusterRecord, o: &StartOptions, t0: Instant) -> Self {
        StartReport {
            name: r.name.clone(),
            already_running: false,
            restarted: false,
            resumed: false,
            api_server: r.api_url(),
            node_ports: r.node_port_range(),
            kubeconfig: None,
            context: r.name.clone(),
            target_phase: o.until.clone().unwrap_or_else(|| READY_PHASE.to_string()),
            phases: Vec::new(),
            seconds: t0.elapsed().as_secs_f64(),
        }
    }
}

pub(super) fn runner_name(r: RunnerKind) -> &'static str {
    r.as_str()
}

/// Says which runner `auto` (or the choice) leads to; refuses `kvm` where it cannot work.
/// Says which runner the cluster will use and why; returns true for the emulated one.
pub(super) fn check_runner(kind: RunnerKind, say: &Say) -> Result<bool> {
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
pub(super) fn cpus_for(asked: Option<u32>, emulated: bool, say: &Say) -> u32 {
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

pub(super) fn build_images(say: &Say) -> Result<(PathBuf, PathBuf)> {
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

/// The node's command line: its hostname, the add-ons it runs (`kindling.addons=`,
/// always given, empty for none), and `--until`.
pub(super) fn cmdline(name: &str, addons: &[&str], until: Option<&str>) -> String {
    use kindling_proto::cmdline::{param, ADDONS, HOSTNAME, UNTIL};
    let mut c =
        format!("console=ttyS0 panic=1 root=/dev/vda rw {} {}", param(HOSTNAME, name), param(ADDONS, addons.join(",")));
    if let Some(u) = until {
        c.push_str(&format!(" {}", param(UNTIL, u)));
    }
    c
}

#[allow(clippy::too_many_arguments)]
pub(super) fn spec_for(
    name: &str,
    kernel: PathBuf,
    disk: PathBuf,
    seed: PathBuf,
    r: &ClusterRecord,
    cpus: u32,
    memory_mib: u64,
    runner: RunnerKind,
    until: Option<&str>,
) -> VmSpec {
    let mut spec = VmSpec::new(name, kernel);
    spec.cmdline = Some(cmdline(r.node_name(), &r.enabled_addons(), until));
    spec.cpus = cpus;
    spec.memory_mib = memory_mib;
    spec.disks = vec![DiskSpec { path: disk, read_only: false }, DiskSpec { path: seed, read_only: true }];
    spec.vsock = true;
    spec.forwards = ports::forwards(r.api_port, r.node_port_base);
    // The node's LoadBalancer Services, on the host's loopback.
    spec.guest_forwards = true;
    spec.runner = runner;
    spec
}

/// The least memory a Kubernetes node gets (the VMM's own minimum is lower).
pub(super) const MIN_NODE_MEMORY_MIB: u64 = 1024;

pub(super) fn check_resources(o: &StartOptions) -> Result<()> {
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
    start_addons(o)?;
    Ok(())
}

/// `--addons`, checked: an unknown name is an error that lists the add-ons.
pub(super) fn start_addons(o: &StartOptions) -> Result<Vec<&'static kindling_proto::addon::Addon>> {
    kindling_proto::addon::parse_list(&o.addons.join(",")).map_err(|e| anyhow::anyhow!("--addons: {e}"))
}

/// Records `--addons` in `r` (enabled, besides what it has); the ones newly enabled.
pub(super) fn record_start_addons(o: &StartOptions, r: &mut ClusterRecord) -> Result<Vec<&'static str>> {
    Ok(start_addons(o)?.into_iter().filter(|a| r.set_addon(a, true)).map(|a| a.name).collect())
}

/// Refuses a start whose API port is taken; warns about busy NodePort host ports.
pub(super) fn check_ports(r: &ClusterRecord, say: &Say) -> Result<()> {
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
pub(super) fn note_free_space(dir: &Path, size_gib: u64, say: &Say) {
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
    if let Some(base) = &o.from {
        // A clone is a new cluster; only one whose cloning was interrupted (a record of
        // a clone of this base, no VM) is done again.
        let interrupted =
            vm.is_none() && record.as_ref().is_some_and(|r| r.cloned_from.as_deref() == Some(base.as_str()));
        if record.is_some() && !interrupted {
            bail!(
                "--from {base}: cluster {name:?} exists already; a clone is a new cluster: leave out --from to start {name:?}, \
                 or `{}` first",
                command_for("delete", name)
            );
        }
    }
    if let (Some(r), Some(vm)) = (&record, &vm) {
        if vm.status == VmStatus::Running {
            say.line(format!(
                "cluster {name:?} is already running (API server {}); see `{}`",
                r.api_url(),
                command_for("status", name)
            ));
            // `--addons` on a running cluster enables them now, as minikube does.
            let mut r = r.clone();
            let added = record_start_addons(o, &mut r)?;
            if !added.is_empty() {
                save_record(&ctx.paths, &r)?;
                addons::deploy_on_running(&r, vm, &added, say)?;
            }
            let mut report = StartReport::of(&r, o, t0);
            report.already_running = true;
            return Ok(report);
        }
    }
    let restarted = vm.is_some();
    let (mut record, mut vm) = match (vm, &o.from) {
        (Some(vm), _) => restart_prepare(&ctx, o, record.expect("checked above"), vm, say)?,
        (None, Some(base)) => clone::clone_prepare(&ctx, o, record, base, say)?,
        (None, None) => first_start_prepare(&ctx, o, record, say)?,
    };
    check_ports(&record, say)?;
    let console_offset = std::fs::metadata(&vm.console_log).map(|m| m.len()).unwrap_or(0);
    let mut resuming = vm.status == VmStatus::Suspended;
    match &vm.snapshot {
        Some(snap) if resuming => say.line(format!(
            "resuming cluster {name:?} from its snapshot ({:.0} MiB, taken {} s ago), API server {}",
            snap.disk_bytes as f64 / (1u64 << 20) as f64,
            crate::daemon::state::now_secs().saturating_sub(snap.taken_at),
            record.api_url()
        )),
        _ => say.line(format!(
            "starting cluster {name:?}: {} vCPU{}, {} MiB, disk {} GiB, API server {}",
            vm.spec.cpus,
            if vm.spec.cpus == 1 { "" } else { "s" },
            vm.spec.memory_mib,
            record.disk_size_gib,
            record.api_url()
        )),
    }
    let target = o.until.clone().unwrap_or_else(|| READY_PHASE.to_string());
    let what = if target == READY_PHASE { "the node to be Ready".to_string() } else { format!("phase {target}") };
    let wait = o.wait.unwrap_or(Duration::from_secs(DEFAULT_WAIT_SECS));
    let mut attempt = 0;
    let mut stalls = 0;
    let phases = loop {
        let console_offset = if attempt == 0 {
            console_offset
        } else {
            std::fs::metadata(&vm.console_log).map(|m| m.len()).unwrap_or(0)
        };
        // A cold start drops a snapshot the VM may still have (one that did not resume).
        // A resume keeps the guest's clocks where the suspend left them (the agent sets
        // the wall clock below): had they jumped by the time away, every timeout in
        // the node would fire at once and each component reconnect and list anew.
        let req = crate::daemon::api::StartRequest { cold: !resuming, keep_clock: true };
        ctx.client.start_with(name, &req)?;
        if resuming {
            match wait_resumed(&ctx, name, record.node_name(), &vm, wait, say) {
                Ok(phases) => {
                    addons::sync_on_node(&record, &vm, say);
                    break phases;
                }
                Err(ResumeError::Ended(why)) => {
                    say.line(format!(
                        "the snapshot did not resume: {why}; booting the node afresh instead (its disk is as the suspend left it)"
                    ));
                    resuming = false;
                    // The VM's spec may lag behind the cluster's (add-ons changed while
                    // it was suspended): brought up to date for the boot.
                    let stopped = ctx.vm(name)?.with_context(|| format!("the VM of cluster {name:?} is gone"))?;
                    (record, vm) = restart_prepare(&ctx, o, record, stopped, say)?;
                    continue;
                }
                Err(ResumeError::Failed(e)) => return Err(e),
            }
        }
        say.line(format!(
            "waiting for {what} (phases in seconds since the guest kernel started; console: `{}`)",
            command_for("logs", name)
        ));
        let result = wait_ready(&ctx, name, &vm, console_offset, &target, wait, say);
        let exit_code = || ctx.vm(name).ok().flatten().and_then(|v| v.exit_code);
        match result {
            Ok(phases) => break phases,
            // The emulated runner stopped a level-1 VM that went silent (its error, with
            // where L1 stopped, is in the console): retried once.
            Err(e) if stalls < STALL_RETRIES && exit_code() == Some(kindling_proto::exit::L1_STALLED) => {
                stalls += 1;
                say.line(format!(
                    "the emulated runner's level-1 VM stalled and was stopped (details in `{}`); starting it again",
                    command_for("logs", name)
                ));
                tracing::debug!("stall before Ready: {e:#}");
            }
            // A guest crash (triple fault) is restarted: the node's state is on its disk.
            // Under the emulated runner, nested virtualization does this now and then.
            Err(e) if attempt < CRASH_RESTARTS && exit_code() == Some(kindling_proto::exit::GUEST_CRASHED) => {
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
    let kubeconfig = if target == phase::AGENT_START {
        None
    } else {
        let agent = Agent::vsock(agent::vsock_socket(&vm.dir)).patient(AGENT_PATIENCE);
        check_node_identity(&agent, &ctx.paths, name)?;
        Some(write_kubeconfig(&ctx.paths, &record)?)
    };
    Ok(StartReport { restarted, resumed: resuming, kubeconfig, phases, ..StartReport::of(&record, o, t0) })
}

/// Why a resume did not bring the node back.
pub(super) enum ResumeError {
    /// The resumed run ended (a snapshot the VMM refused ends it at once): a cold boot
    /// is the way on.
    Ended(String),
    /// It runs, but the node did not get Ready.
    Failed(anyhow::Error),
}

/// Waits until a resumed node is Ready for real: its agent answers (and sets the node's
/// wall clock, which the resume left at the suspend's moment), and its kubelet has
/// renewed the lease of `node` since (the lease from before the suspend proves nothing)
/// with the node's Ready condition True. Returns the agent's phases.
pub(super) fn wait_resumed(
    ctx: &Ctx,
    name: &str,
    node: &str,
    vm: &Vm,
    timeout: Duration,
    say: &Say,
) -> Result<Vec<Phase>, ResumeError> {
    let agent = Agent::vsock(agent::vsock_socket(&vm.dir));
    let t0 = Instant::now();
    let mut since = String::new();
    let mut answered = false;
    let mut last_error: String;
    loop {
        let now = ctx.client.get(name).map_err(|e| ResumeError::Failed(e.into()))?;
        if now.status != VmStatus::Running {
            return Err(ResumeError::Ended(ended_reason(ctx, &now)));
        }
        match agent.phases() {
            Ok(phases) => {
                if !answered {
                    say.line(format!(
                        "  {:<18}{:>8.1} s after the resume",
                        "agent answers",
                        t0.elapsed().as_secs_f64()
                    ));
                    since = set_node_clock(&agent).map_err(ResumeError::Failed)?;
                    answered = true;
                }
                match node_renewed_since(&agent, node, &since) {
                    Ok(true) => {
                        say.line(format!(
                            "  {:<18}{:>8.1} s after the resume",
                            "node Ready",
                            t0.elapsed().as_secs_f64()
                        ));
                        return Ok(phases);
                    }
                    Ok(false) => last_error = "its kubelet has not renewed the node's lease yet".into(),
                    Err(e) => last_error = e.to_string(),
                }
            }
            Err(e) => last_error = format!("its agent does not answer over vsock yet ({e})"),
        }
        if t0.elapsed() > timeout {
            return Err(ResumeError::Failed(anyhow::anyhow!(
                "the resumed node is not Ready after {} s: {last_error}; look at `{}`, or boot it afresh: `kindling stop --shutdown{n}`, then `{}`",
                t0.elapsed().as_secs(),
                command_for("logs", name),
                command_for("start", name),
                n = if name == DEFAULT_NAME { String::new() } else { format!(" --name {name}") }
            )));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Sets the node's wall clock to this host's (`date -s` in the node, to the
/// microsecond); returns the time set, in RFC 3339.
fn set_node_clock(agent: &Agent) -> Result<String> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let at = format!("@{}.{:06}", now.as_secs(), now.subsec_micros());
    match agent.exec_capture(&["date", "-u", "-s", &at], Duration::from_secs(30)) {
        Ok((0, _)) => Ok(rfc3339_utc(now.as_secs())),
        Ok((code, out)) => bail!("setting the node's clock (`date -s {at}`) exited with {code}: {}", out.trim()),
        Err(e) => bail!("setting the node's clock: {e}"),
    }
}

/// Has the node's lease been renewed at or after `since` (RFC 3339, UTC), with the
/// node's Ready condition True? One kubectl in the node answers both.
fn node_renewed_since(agent: &Agent, node: &str, since: &str) -> Result<bool> {
    let template =
        r#"{range .items[*]}{.kind}={.spec.renewTime}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#;
    let (node_ref, lease_ref) = (format!("node/{node}"), format!("lease/{node}"));
    let argv = [
        "kubectl",
        "--kubeconfig",
        ADMIN_CONF,
        "-n",
        "kube-node-lease",
        "get",
        &node_ref,
        &lease_ref,
        "-o",
        &format!("jsonpath={template}"),
    ];
    let (code, out) = agent.exec_capture(&argv, Duration::from_secs(30))?;
    if code != 0 {
        bail!("kubectl in the node: {}", out.trim());
    }
    Ok(lease_fresh_and_ready(&out, since))
}

/// Reads `Node=True` / `Lease=<renewTime>` lines: Ready, and renewed at or after `since`
/// (both RFC 3339 in UTC, compared to the second).
fn lease_fresh_and_ready(out: &str, since: &str) -> bool {
    let value = |kind: &str| out.lines().find_map(|l| l.trim().strip_prefix(kind)?.strip_prefix('='));
    let ready = value("Node") == Some("True");
    let renewed = value("Lease").and_then(|t| t.get(..19)).is_some_and(|t| Some(t) >= since.get(..19));
    ready && renewed
}

/// Seconds since the Unix epoch as RFC 3339 in UTC (`2026-12-01T18:05:09Z`), the way
/// Kubernetes writes times.
fn rfc3339_utc(secs: u64) -> String {
    // Days to a civil date (Howard Hinnant's algorithm, for the proleptic Gregorian calendar).
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Longest console line quoted in a message.
const QUOTED_LINE_MAX: usize = 300;

/// A console line as a message quotes it. The console carries the guest's output too:
/// no control characters (escape sequences, carriage returns) reach the terminal, and
/// at most [`QUOTED_LINE_MAX`] characters.
fn printable(line: &str) -> String {
    line.chars().filter(|c| !c.is_control()).take(QUOTED_LINE_MAX).collect()
}

/// Why a resumed run ended: its exit status where that says it (a crash, a stall of
/// the level-1 VM), else the VMM's error about the snapshot in the console's last
/// lines, else the exit status.
fn ended_reason(ctx: &Ctx, vm: &Vm) -> String {
    use kindling_proto::exit;
    match vm.exit_code {
        Some(exit::GUEST_CRASHED) => return "the resumed guest crashed (a vCPU triple-faulted)".into(),
        Some(exit::L1_STALLED) => return "the emulated runner's level-1 VM stalled".into(),
        _ => {}
    }
    let tail = ctx.client.console(&vm.name, Some(40)).unwrap_or_default();
    snapshot_error_in(&tail).unwrap_or_else(|| format!("its VM process ended ({})", exit_text(vm)))
}

/// The VMM's error about the snapshot among a console's lines (the last one): an ERROR
/// line naming `--restore` or the snapshot, not a progress line that mentions it.
fn snapshot_error_in(tail: &str) -> Option<String> {
    tail.lines()
        .rev()
        .map(str::trim)
        .filter(|l| !l.starts_with("INFO ") && !l.starts_with("WARN ") && !l.starts_with("DEBUG "))
        .find(|l| l.contains("--restore") || l.contains("snapshot"))
        .map(|l| printable(l.trim_start_matches("ERROR ").trim_start_matches("kindling: ")))
}

/// The cluster's identity (created on its first start) on the node's seed disk; returns
/// the seed's path.
pub(super) fn write_seed(ctx: &Ctx, name: &str) -> Result<PathBuf> {
    let id = identity(&ctx.paths, name);
    id.ensure()?;
    let seed = seed_path(&ctx.paths, name);
    id.write_seed(&seed)?;
    Ok(seed)
}

/// First start (or a start after an interrupted one): images, record, disk, VM.
pub(super) fn first_start_prepare(
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
    let mut record = match record {
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
    record_start_addons(o, &mut record)?;
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
        let seed = write_seed(ctx, name)?;
        let spec = spec_for(
            name,
            kernel.clone(),
            disk_file,
            seed,
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
pub(super) fn restart_prepare(
    ctx: &Ctx,
    o: &StartOptions,
    mut record: ClusterRecord,
    vm: Vm,
    say: &Say,
) -> Result<(ClusterRecord, Vm)> {
    let name = o.name.as_str();
    say.line(format!("cluster {name:?} exists ({}); starting it again with its data", vm.status));
    let added = record_start_addons(o, &mut record)?;
    if !added.is_empty() {
        save_record(&ctx.paths, &record)?;
        say.line(format!("add-ons: enabling {} (--addons)", added.join(", ")));
    }
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
    if !identity(&ctx.paths, name).exists() {
        bail!(
            "cluster {name:?} was created by an older kindling, whose nodes made their own identity; the host now owns it: \
             `{}`, then `{}` (its data is not kept)",
            command_for("delete", name),
            command_for("start", name)
        );
    }
    let seed = write_seed(ctx, name)?;
    let spec = spec_for(name, kernel, disk_file.clone(), seed, &record, cpus, memory_mib, runner, o.until.as_deref());
    if why.is_empty()
        && spec.forwards == vm.spec.forwards
        && spec.guest_forwards == vm.spec.guest_forwards
        && spec.cmdline == vm.spec.cmdline
        && spec.disks == vm.spec.disks
    {
        return Ok((record, vm));
    }
    let same_but_addons = why.is_empty()
        && spec.forwards == vm.spec.forwards
        && spec.guest_forwards == vm.spec.guest_forwards
        && spec.disks == vm.spec.disks
        && without_addons(spec.cmdline.as_deref()) == without_addons(vm.spec.cmdline.as_deref());
    if same_but_addons && vm.status == VmStatus::Suspended {
        // The running node takes add-on changes through its agent: resume it and tell
        // it after (its recorded command line catches up at its next cold boot).
        say.line("the cluster's add-ons changed while it was suspended: its node applies them after the resume");
        return Ok((record, vm));
    }
    if why.is_empty() && spec.cmdline != vm.spec.cmdline {
        why.push("command line (add-ons)");
    }
    if why.is_empty() {
        why.push("settings");
    }
    say.line(format!(
        "updating the VM's {} (the disk is kept{})",
        why.join(", "),
        if vm.status == VmStatus::Suspended {
            "; its snapshot no longer fits and is dropped, so the node boots afresh"
        } else {
            ""
        }
    ));
    let vm = recreate(ctx, name, &disk_file, &spec)?;
    Ok((record, vm))
}

/// A command line without its `kindling.addons=` word.
fn without_addons(cmdline: Option<&str>) -> Vec<&str> {
    let prefix = kindling_proto::cmdline::param(kindling_proto::cmdline::ADDONS, "");
    cmdline.unwrap_or("").split_whitespace().filter(|w| !w.starts_with(&prefix)).collect()
}

/// Replaces a stopped VM's spec: parks the disk outside the VM directory (the daemon's
/// delete removes disks inside it), deletes and recreates the VM, puts the disk back and
/// writes the seed disk again.
/// An interruption leaves the disk parked, and the next start picks it up.
pub(super) fn recreate(ctx: &Ctx, name: &str, disk_file: &Path, spec: &VmSpec) -> Result<Vm> {
    let parked = parked_disk(&ctx.paths, name);
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(clusters_dir(&ctx.paths))?;
    std::fs::rename(disk_file, &parked).with_context(|| format!("cannot move {} aside", disk_file.display()))?;
    let result = (|| -> Result<Vm> {
        ctx.client.delete(name)?;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(ctx.paths.vm_dir(name))?;
        std::fs::rename(&parked, disk_file)
            .with_context(|| format!("cannot move {} back to {}", parked.display(), disk_file.display()))?;
        // The delete removed the seed disk with the VM directory's other disks.
        write_seed(ctx, name)?;
        Ok(ctx.client.create(spec)?)
    })();
    if result.is_err() && parked.exists() && ctx.vm(name).ok().flatten().is_some() {
        // The delete failed: the VM is still there, so is its directory.
        let _ = std::fs::rename(&parked, disk_file);
    }
    result
}

/// The console's phase lines written since `offset` (when the agent is not reachable).
pub(super) fn console_phases(console_log: &Path, offset: u64) -> Vec<Phase> {
    let Ok(mut f) = std::fs::File::open(console_log) else { return Vec::new() };
    if f.seek(std::io::SeekFrom::Start(offset)).is_err() {
        return Vec::new();
    }
    let mut text = Vec::new();
    let _ = f.take(64 << 20).read_to_end(&mut text);
    phase::from_console(&String::from_utf8_lossy(&text))
}

/// Why a VM stopped, for the messages.
pub(super) fn exit_text(vm: &Vm) -> String {
    match (vm.exit_code, vm.exit_signal) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("ended by signal {s}"),
        (None, None) => "exit status unknown".into(),
    }
}

pub(super) fn stopped_while_starting(ctx: &Ctx, vm: &Vm) -> anyhow::Error {
    let tail = ctx.client.console(&vm.name, Some(30)).unwrap_or_else(|e| format!("(cannot read the console: {e})"));
    anyhow::anyhow!(
        "the VM of cluster {name:?} stopped while starting ({}); the last 30 lines of its console:\n{}\n(whole console: `{}`; the VMM's own errors are among these lines)",
        exit_text(vm),
        tail.trim_end().lines().map(printable).collect::<Vec<_>>().join("\n"),
        command_for("logs", &vm.name),
        name = vm.name,
    )
}

/// Polls the agent's phases until `target` (node-ready), printing each new phase.
pub(super) fn wait_ready(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_that_ended_is_explained_by_the_vmms_error_not_by_a_progress_line() {
        let crash = " INFO microVM restored from /dev/vdd in 357.8 ms\n INFO read 678 MiB of the snapshot ahead in 7.4 s\n WARN vCPU 0: shutdown (triple fault)\n";
        assert_eq!(snapshot_error_in(crash), None);
        let refused =
            " INFO x\nERROR --restore /v/snapshot.resumed: it was taken by kindling 0.0.9, this is kindling 0.1.0\n";
        assert_eq!(
            snapshot_error_in(refused).as_deref(),
            Some("--restore /v/snapshot.resumed: it was taken by kindling 0.0.9, this is kindling 0.1.0")
        );
    }

    #[test]
    fn quoted_console_lines_lose_control_characters_and_stop_at_300_characters() {
        assert_eq!(printable("ok \u{1b}[2J\u{1b}]0;owned\u{7}\r done"), "ok [2J]0;owned done");
        let long = "é".repeat(1000);
        assert_eq!(printable(&long).chars().count(), QUOTED_LINE_MAX);
    }

    #[test]
    fn the_spec_boots_the_node_with_vsock_and_forwards() {
        let r = ClusterRecord {
            name: "dev".into(),
            api_port: 16444,
            node_port_base: 20000,
            disk_size_gib: 20,
            created_at: 0,
            addons: Default::default(),
            node: None,
            cloned_from: None,
        };
        let s = spec_for(
            "dev",
            "/k".into(),
            "/s/vms/dev/disk.ext4".into(),
            "/s/vms/dev/seed.img".into(),
            &r,
            2,
            4096,
            RunnerKind::Auto,
            None,
        );
        assert_eq!(
            s.cmdline.as_deref(),
            Some("console=ttyS0 panic=1 root=/dev/vda rw kindling.hostname=dev kindling.addons=storage-provisioner")
        );
        assert!(s.vsock);
        assert_eq!(s.forwards, ["127.0.0.1:16444:6443", "127.0.0.1:20000-22767:30000-32767"]);
        assert_eq!(
            s.disks,
            vec![
                DiskSpec { path: "/s/vms/dev/disk.ext4".into(), read_only: false },
                DiskSpec { path: "/s/vms/dev/seed.img".into(), read_only: true }
            ]
        );
        assert_eq!((s.cpus, s.memory_mib), (2, 4096));
        let s = spec_for(
            "dev",
            "/k".into(),
            "/d".into(),
            "/s".into(),
            &r,
            1,
            1024,
            RunnerKind::Emulated,
            Some("apiserver-ready"),
        );
        assert!(s
            .cmdline
            .unwrap()
            .ends_with("kindling.hostname=dev kindling.addons=storage-provisioner kindling.until=apiserver-ready"));
        assert_eq!(s.runner, RunnerKind::Emulated);
        // A cluster whose add-ons are all disabled tells its node so (an empty list).
        let mut none = r.clone();
        none.set_addon(kindling_proto::addon::find("storage-provisioner").unwrap(), false);
        let s = spec_for("dev", "/k".into(), "/d".into(), "/s".into(), &none, 1, 1024, RunnerKind::Auto, None);
        assert!(s.cmdline.unwrap().ends_with("kindling.hostname=dev kindling.addons="));
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
        let addons = |a: &[&str]| StartOptions {
            name: "k".into(),
            addons: a.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        check_resources(&addons(&["storage-provisioner"])).unwrap();
        let e = check_resources(&addons(&["storage-provisioner", "ingres"])).unwrap_err().to_string();
        assert_eq!(
            e,
            "--addons: no add-on named \"ingres\"; the add-ons are: storage-provisioner, metrics-server, ingress"
        );
        let mut r = new_record(&Paths::new("/nonexistent"), "k", 20).unwrap();
        r.set_addon(kindling_proto::addon::find("storage-provisioner").unwrap(), false);
        assert_eq!(record_start_addons(&addons(&["storage-provisioner"]), &mut r).unwrap(), ["storage-provisioner"]);
        assert!(record_start_addons(&addons(&["storage-provisioner"]), &mut r).unwrap().is_empty(), "already on");
        assert!(check_resources(&until("ready"))
            .unwrap_err()
            .to_string()
            .contains("use one of agent-start, etcd-ready"));
    }

    #[test]
    fn command_lines_are_compared_without_their_add_ons() {
        let a = cmdline("dev", &["storage-provisioner"], None);
        let b = cmdline("dev", &[], None);
        assert_ne!(a, b);
        assert_eq!(without_addons(Some(&a)), without_addons(Some(&b)));
        assert_ne!(without_addons(Some(&a)), without_addons(Some(&cmdline("dev", &[], Some("agent-start")))));
    }

    #[test]
    fn times_are_written_as_kubernetes_writes_them() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_796_148_309), "2026-12-01T18:05:09Z");
    }

    #[test]
    fn a_resumed_node_is_ready_once_its_lease_is_renewed() {
        let since = "2026-12-01T18:05:09Z";
        assert!(lease_fresh_and_ready("Node=True\nLease=2026-12-01T18:05:12.123456Z\n", since));
        assert!(lease_fresh_and_ready("Lease=2026-12-01T18:05:09.000001Z\nNode=True\n", since));
        // The lease from before the suspend.
        assert!(!lease_fresh_and_ready("Node=True\nLease=2026-12-01T17:59:58.999999Z\n", since));
        assert!(!lease_fresh_and_ready("Node=Unknown\nLease=2026-12-01T18:05:12.123456Z\n", since));
        assert!(!lease_fresh_and_ready("Node=True\n", since));
        assert!(!lease_fresh_and_ready("", since));
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
