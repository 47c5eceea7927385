//! `kindling stop`: an orderly power-off through the agent, then the VM process.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use super::*;

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

pub(super) fn stop_locked(ctx: &Ctx, name: &str, wait: Duration, say: &Say, final_line: bool) -> Result<StopReport> {
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
