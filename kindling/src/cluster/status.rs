//! `kindling status` and `kindling list`.

use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use super::*;

/// A cluster as `status` and `list` report it.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    pub name: String,
    /// created, running, stopped, suspended, or missing (a record whose VM is gone).
    pub status: String,
    /// A suspended cluster's snapshot: bytes on disk.
    pub snapshot_bytes: Option<u64>,
    /// When the snapshot was taken (seconds since the Unix epoch).
    pub snapshot_taken_at: Option<u64>,
    /// The running node was resumed from a snapshot rather than booted.
    pub resumed: Option<bool>,
    /// The node reported node-ready (only known while it runs and its agent answers).
    pub ready: Option<bool>,
    /// The Kubernetes node's name (the cluster's, or for a clone its base's).
    pub node: String,
    /// The cluster it was cloned from (`start --from`).
    pub cloned_from: Option<String>,
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

pub(super) fn status_of(paths: &Paths, r: &ClusterRecord, vm: Option<&Vm>, ask_agent: bool) -> ClusterStatus {
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
        snapshot_bytes: vm.and_then(|v| v.snapshot.as_ref()).map(|s| s.disk_bytes),
        snapshot_taken_at: vm.and_then(|v| v.snapshot.as_ref()).map(|s| s.taken_at),
        resumed: vm.filter(|v| v.status == VmStatus::Running).map(|v| v.resumed),
        ready: phases.as_ref().map(|p: &Vec<Phase>| p.iter().any(|p| p.name == READY_PHASE)),
        node: r.node_name().to_string(),
        cloned_from: r.cloned_from.clone(),
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
