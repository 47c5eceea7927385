//! The cluster's credentials on the host: the kubeconfig context `start` writes, and
//! `kindling kubeconfig`. Both build the kubeconfig from the host's own identity files
//! ([`identity`](super::identity)); the only kubeconfig read from a guest is that of a
//! VM booted by hand (`--vsock`), and of it only checked certificate fields are used.

use std::path::PathBuf;

use anyhow::{bail, Result};

use super::identity::Identity;
use super::*;

/// Where the node keeps its copy of the cluster CA (agent/src/node.rs `Paths::pki`).
const NODE_CA: &str = "/var/lib/kindling/pki/ca.crt";

/// The host's identity of cluster `name`.
pub(super) fn identity(paths: &Paths, name: &str) -> Identity {
    Identity::new(identity_dir(paths, name))
}

/// Merges the cluster's context `<name>` into the user's kubeconfig, from the host's
/// identity files.
pub(super) fn write_kubeconfig(paths: &Paths, r: &ClusterRecord) -> Result<PathBuf> {
    let entries = identity(paths, &r.name).entries(&r.name, &r.api_url())?;
    let path = kubeconfig::default_path();
    kubeconfig::merge_into(&path, &entries)?;
    Ok(path)
}

/// Checks that the running node uses the host's CA for cluster `name` (a node whose
/// disk predates host-owned identities made its own). What the node answers is only
/// compared, never used.
pub(super) fn check_node_identity(agent: &Agent, paths: &Paths, name: &str) -> Result<()> {
    let ours = std::fs::read_to_string(identity_dir(paths, name).join("ca.crt"))?;
    let (code, theirs) = agent.exec_capture(&["cat", NODE_CA], CAPTURE_DEADLINE).map_err(|e| agent_error(e, name))?;
    if code != 0 || theirs.trim() != ours.trim() {
        bail!(
            "the node of cluster {name:?} does not use the CA kindling created for it (its disk predates host-owned cluster \
             identities, or was replaced); its API server cannot be trusted with this cluster's credentials: `{}`, then `{}`",
            command_for("delete", name),
            command_for("start", name)
        );
    }
    Ok(())
}

/// Where `kindling kubeconfig` gets the cluster's credentials from.
pub enum KubeconfigSource {
    /// A kindling cluster: its identity on the host; the server is its forwarded API
    /// port. The node need not run.
    Cluster,
    /// A VM from `kindling boot --vsock PATH`, its API server reached at `server`: the
    /// node's own admin kubeconfig, read through its agent and checked.
    Vsock { path: PathBuf, server: String },
}

/// `kindling kubeconfig`: the cluster's admin credentials as a kubeconfig whose
/// cluster, user and context are named `name`; with `merge`, merged into the user's
/// kubeconfig (returning its path) instead of returned as text.
pub fn kubeconfig(name: &str, source: &KubeconfigSource, merge: bool) -> Result<(String, Option<PathBuf>)> {
    let entries = match source {
        KubeconfigSource::Cluster => {
            let ctx = Ctx::connect()?;
            let (r, _) = ctx.cluster(name)?;
            let id = identity(&ctx.paths, name);
            if !id.exists() {
                bail!(
                    "cluster {name:?} has no identity on this host (it was created by an older kindling, whose nodes made their own); \
                     `{}`, then `{}`",
                    command_for("delete", name),
                    command_for("start", name)
                );
            }
            id.entries(name, &r.api_url())?
        }
        KubeconfigSource::Vsock { path, server } => {
            if !server.starts_with("https://") {
                bail!("--server {server:?}: give the host URL of the forwarded API server, e.g. https://127.0.0.1:16443 for --forward 16443:6443");
            }
            let agent = Agent::vsock(path).patient(AGENT_PATIENCE);
            let (code, text) = agent.exec_capture(&["cat", ADMIN_CONF], CAPTURE_DEADLINE).map_err(|e| {
                anyhow::anyhow!(
                    "{e}; is a VM booted from kindling's root disk running with --vsock {}? Its agent writes {ADMIN_CONF} once it starts",
                    path.display()
                )
            })?;
            if code != 0 {
                bail!("cannot read {ADMIN_CONF} in the node (exit {code}): {}", text.trim());
            }
            kubeconfig::Entries::from_untrusted_kubeconfig(name, &text, server)?
        }
    };
    if merge {
        let path = kubeconfig::default_path();
        kubeconfig::merge_into(&path, &entries)?;
        return Ok((String::new(), Some(path)));
    }
    Ok((kubeconfig::standalone(&entries)?, None))
}
