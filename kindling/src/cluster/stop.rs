//! `kindling stop`: by default a suspend (the node's filesystems synced, then its VM
//! snapshotted by the daemon, so that `kindling start` resumes it in seconds); with
//! `--shutdown`, or when the snapshot fails, an orderly power-off through the agent,
//! then the VM process.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use super::*;

/// What `stop` did.
#[derive(Clone, Debug, Serialize)]
pub struct StopReport {
    pub name: String,
    pub was_running: bool,
    /// The node shut down through its agent (otherwise the VM process was stopped).
    pub orderly: bool,
    /// The VM was suspended to a snapshot (the next start resumes it).
    pub suspended: bool,
    /// The snapshot's size on disk, in bytes.
    pub snapshot_bytes: Option<u64>,
    pub seconds: f64,
}

impl StopReport {
    /// A report; a snapshot's size means the VM was suspended.
    fn new(name: &str, was_running: bool, orderly: bool, snapshot_bytes: Option<u64>, seconds: f64) -> Self {
        let suspended = snapshot_bytes.is_some();
        StopReport { name: name.to_string(), was_running, orderly, suspended, snapshot_bytes, seconds }
    }
}

/// How long the node may take to sync its filesystems before a suspend.
const SYNC_DEADLINE: Duration = Duration::from_secs(60);

/// `kindling stop`: a suspend (or with `shutdown` a power-off through the agent), then
/// the daemon's stop as a fallback.
pub fn stop(name: &str, wait: Duration, shutdown: bool, say: &Say) -> Result<StopReport> {
    let ctx = Ctx::connect()?;
    let _lock = Lock::cluster(&ctx.paths, name)?;
    stop_locked(&ctx, name, wait, !shutdown, say, true)
}

pub(super) fn stop_locked(
    ctx: &Ctx,
    name: &str,
    wait: Duration,
    suspend: bool,
    say: &Say,
    final_line: bool,
) -> Result<StopReport> {
    let t0 = Instant::now();
    let (_, vm) = ctx.cluster(name)?;
    let Some(vm) = vm.filter(|v| v.status == VmStatus::Running) else {
        say.line(format!("cluster {name:?} is not running"));
        return Ok(StopReport::new(name, false, false, None, 0.0));
    };
    let agent = Agent::vsock(agent::vsock_socket(&vm.dir)).patient(AGENT_PATIENCE);
    if suspend {
        match suspend_vm(ctx, name, &agent, say) {
            Ok(bytes) => {
                let secs = t0.elapsed().as_secs_f64();
                if final_line {
                    say.line(format!(
                        "cluster {name:?} suspended in {secs:.1} s (snapshot {:.0} MiB); `{}` resumes it \
                         (`kindling stop --shutdown{}` powers it off instead)",
                        bytes as f64 / (1u64 << 20) as f64,
                        command_for("start", name),
                        if name == DEFAULT_NAME { String::new() } else { format!(" --name {name}") }
                    ));
                }
                return Ok(StopReport::new(name, true, true, Some(bytes), secs));
            }
            Err(e) => {
                say.line(format!("suspending cluster {name:?} failed: {e:#}; shutting it down instead"));
                if ctx.client.get(name)?.status != VmStatus::Running {
                    let secs = t0.elapsed().as_secs_f64();
                    say.line(format!(
                        "cluster {name:?} stopped in {secs:.1} s; its data is kept (`{}` boots it again)",
                        command_for("start", name)
                    ));
                    return Ok(StopReport::new(name, true, false, None, secs));
                }
            }
        }
    }
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
    Ok(StopReport::new(name, true, orderly, None, secs))
}

/// Syncs the node's filesystems (so that a cold boot after a refused snapshot finds the
/// disk as the guest last wrote it), then has the daemon snapshot the VM; returns the
/// snapshot's size on disk.
fn suspend_vm(ctx: &Ctx, name: &str, agent: &Agent, say: &Say) -> Result<u64> {
    say.line(format!("suspending cluster {name:?}: syncing the node's disk, then saving its memory to a snapshot"));
    match agent.exec_capture(&["sync"], SYNC_DEADLINE) {
        Ok((0, _)) => {}
        Ok((code, out)) => anyhow::bail!("`sync` in the node exited with {code}: {}", out.trim()),
        Err(e) => anyhow::bail!("the node's agent did not sync its disk: {e}"),
    }
    let vm = ctx.client.snapshot(name, None)?;
    let info = vm.snapshot.context("the daemon reports no snapshot after a suspend")?;
    Ok(info.disk_bytes)
}
