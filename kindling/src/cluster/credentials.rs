//! The cluster's credentials on the host: the kubeconfig context `start` writes, and
//! `kindling kubeconfig`.

use std::path::PathBuf;

use anyhow::{bail, Result};

use super::*;

/// Fetches the node's admin kubeconfig and merges it as context `<name>`.
pub(super) fn write_kubeconfig(agent: &Agent, r: &ClusterRecord) -> Result<PathBuf> {
    let entries = admin_entries(agent, &r.name, &r.api_url(), |e| {
        anyhow::Error::new(e).context("fetching the node's admin kubeconfig")
    })?;
    let path = kubeconfig::default_path();
    kubeconfig::merge_into(&path, &entries)?;
    Ok(path)
}

/// The node's admin kubeconfig (read through its agent) as entries named `name`,
/// pointing at `server`; `unreachable` words an agent error.
pub(super) fn admin_entries(
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
