//! Kubernetes clusters on top of the daemon: what `kindling start`, `stop`, `delete`,
//! `status`, `list`, `logs`, `exec`, `ip`, `image load`, `service` and `kubectl` do.
//!
//! A cluster is one daemon VM booting kindling's kernel and root disk, plus a small
//! record, `<state>/clusters/<name>.json`, holding what must stay stable across restarts:
//! the host port of its API server, where its NodePort range lands on the host, and its
//! add-ons.
//! Its disk is `<state>/vms/<name>/disk.ext4` (so the daemon's delete removes it). The
//! node is driven through its agent over vsock ([`agent`]): phases while it starts, the
//! admin kubeconfig, commands, logs, power-off and image imports.
//!
//! One file per verb, as kind splits its commands:
//! - [`start`](mod@start), [`stop`](mod@stop), [`delete`](mod@delete), [`status`](mod@status)
//!   (and `list`);
//! - [`node`]: exec, logs, ip, image load, service, kubectl;
//! - [`credentials`]: the kubeconfig context and `kindling kubeconfig`;
//! - [`addons`](mod@addons): `kindling addons list | enable | disable`.
//!
//! What they share:
//! - [`record`]: the cluster record, its paths and locks;
//! - [`agent`]: the client of the node's agent;
//! - [`disk`]: the sparse copy of the root disk, grown to `--disk-size`;
//! - [`ports`]: the API server port and the NodePort range on the host;
//! - [`kubeconfig`]: merging the cluster's context into the user's kubeconfig.

mod addons;
pub mod agent;
mod clone;
mod credentials;
mod delete;
pub mod disk;
pub mod identity;
pub mod kubeconfig;
mod node;
pub mod ports;
mod record;
mod start;
mod status;
mod stop;

pub use addons::{addons, set_addon, AddonReport, AddonStatus};
use credentials::*;
pub use credentials::{kubeconfig, KubeconfigSource};
pub use delete::{delete, DeleteReport};
use node::*;
pub use node::{exec, image_load, ingress_urls, ip, kubectl, logs, node_ip_from, node_ip_from_cmdline, service_urls};
use record::*;
pub use record::{all_records, clusters_dir, load_record, ClusterRecord};
use start::*;
pub use start::{start, StartOptions, StartReport};
pub use status::{list, status, ClusterStatus};
use stop::*;
pub use stop::{stop, StopReport};

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Result};

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
/// How often `start` starts again a VM whose level-1 VM stalled (emulated runner).
pub const STALL_RETRIES: u32 = 1;
/// How long `stop` waits for an orderly power-off before stopping the VM process.
pub const DEFAULT_STOP_WAIT_SECS: u64 = 120;
/// The disk's file name in the VM directory.
pub const DISK_FILE: &str = "disk.ext4";
/// The seed disk's file name in the VM directory.
pub const SEED_FILE: &str = "seed.img";
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
}
