//! `kindling addons list | enable NAME | disable NAME`: a cluster's add-ons
//! (`kindling_proto::addon`, the catalogue the node's agent deploys from). Their images
//! are built with the root disk and preloaded; nothing is pulled.
//!
//! The cluster record holds each choice ([`ClusterRecord::addons`]), so it is kept across
//! stop and start; every start tells the node which add-ons it runs (`kindling.addons=`
//! on its command line, from the record), and its agent deploys those after node-ready
//! and removes the others. On a running cluster `enable` and `disable` also ask the
//! agent (`{"op":"addon"}`) to do it now; on a stopped one they are only recorded, and
//! the next start does them. `disable` removes what `enable` added; the storage add-on's
//! volumes and their data stay (the agent's `addons.rs` says what becomes of them).
//!
//! Why the boot parameter rather than a request once the node is up: the node knows
//! which add-ons it runs from its first instruction, with no window in which it deploys
//! a default the host is about to turn off, and without the host having to be there (a
//! start interrupted after the boot, a guest restarted after a crash, a node booted by
//! hand with `kindling boot`). A change to it recreates a stopped VM around its disk,
//! which `start` already does for any change to the VM's spec.

use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use kindling_proto::addon;

use super::*;

/// How long an enable or disable may take in the node (importing the image, applying
/// or deleting, under emulation).
const SET_DEADLINE: Duration = Duration::from_secs(15 * 60);

/// One line of `kindling addons list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AddonStatus {
    pub name: &'static str,
    /// The upstream version its image is built from.
    pub version: &'static str,
    /// Whether the cluster runs it (its record: the choice, else the default).
    pub enabled: bool,
    /// Whether a new cluster runs it.
    pub default: bool,
    /// Its objects are in the cluster; null when not known (the cluster is not running,
    /// its node is not Ready, or its agent did not answer).
    pub deployed: Option<bool>,
    /// Its Deployment has an available replica; null when not known.
    pub running: Option<bool>,
    pub gives: &'static str,
}

impl AddonStatus {
    /// What the node says of it, in a word: running, starting, not deployed, ...
    pub fn state(&self) -> &'static str {
        match (self.enabled, self.deployed, self.running) {
            (_, None, _) => "-",
            (_, Some(true), Some(true)) => "running",
            (true, Some(true), _) => "starting",
            (false, Some(true), _) => "removing",
            (true, Some(false), _) => "deploying",
            (false, Some(false), _) => "not deployed",
        }
    }
}

/// The add-ons of the cluster `name` (which must exist): the record's choices, and, when
/// it runs, what its node says of them.
pub fn addons(name: &str) -> Result<Vec<AddonStatus>> {
    let ctx = Ctx::connect()?;
    let (record, vm) = ctx.cluster(name)?;
    let node = match vm.filter(|v| v.status == VmStatus::Running) {
        Some(vm) => match Agent::vsock(agent::vsock_socket(&vm.dir)).patient(AGENT_PATIENCE).addons() {
            Ok(states) => states,
            Err(e) => {
                tracing::warn!("cluster {name:?}: cannot ask its node about its add-ons: {e}");
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    Ok(statuses(&record, &node))
}

fn statuses(record: &ClusterRecord, node: &[addon::AddonState]) -> Vec<AddonStatus> {
    addon::ALL
        .iter()
        .map(|a| {
            let on_node = node.iter().find(|s| s.name == a.name);
            AddonStatus {
                name: a.name,
                version: a.version,
                enabled: record.addon_enabled(a),
                default: a.default_on,
                deployed: on_node.and_then(|s| s.deployed),
                running: on_node.and_then(|s| s.running),
                gives: a.gives,
            }
        })
        .collect()
}

/// What `addons enable|disable` did.
#[derive(Clone, Debug, Serialize)]
pub struct AddonReport {
    pub cluster: String,
    pub addon: &'static str,
    pub enabled: bool,
    /// The record changed (it was not already so).
    pub changed: bool,
    /// The node did it now (the cluster runs); false: recorded for the next start.
    pub applied_now: bool,
}

/// `kindling addons enable|disable ADDON`: records the choice, and does it now on a
/// running cluster.
pub fn set_addon(name: &str, addon_name: &str, enable: bool, say: &Say) -> Result<AddonReport> {
    let a = addon::lookup(addon_name).map_err(|e| anyhow::anyhow!("{e}"))?;
    check_name(name)?;
    let ctx = Ctx::connect()?;
    let _lock = Lock::cluster(&ctx.paths, name)?;
    let (mut record, vm) = ctx.cluster(name)?;
    let changed = record.set_addon(a, enable);
    save_record(&ctx.paths, &record)?;
    let verb = if enable { "enabled" } else { "disabled" };
    let mut report =
        AddonReport { cluster: name.to_string(), addon: a.name, enabled: enable, changed, applied_now: false };
    match vm.filter(|v| v.status == VmStatus::Running) {
        Some(vm) => {
            say.line(format!(
                "add-on {}: {verb} for cluster {name:?}{}; the node {} it now",
                a.name,
                if changed { "" } else { " (it already was)" },
                if enable { "deploys" } else { "removes" }
            ));
            set_on_node(&vm, name, a.name, enable, say)?;
            report.applied_now = true;
            if !enable && a.name == addon::STORAGE_PROVISIONER {
                say.line(
                    "note: existing PersistentVolumes and their data are kept; new claims stay Pending until it is enabled again",
                );
            }
        }
        None => say.line(format!(
            "add-on {}: {verb} for cluster {name:?}{}; the cluster is not running, so its node {} it at the next start (`{}`)",
            a.name,
            if changed { "" } else { " (it already was)" },
            if enable { "deploys" } else { "removes" },
            command_for("start", name)
        )),
    }
    Ok(report)
}

/// Asks the running node's agent to enable or disable `addon` now, its progress lines
/// going to `say`.
fn set_on_node(vm: &Vm, name: &str, addon: &str, enable: bool, say: &Say) -> Result<()> {
    let agent = Agent::vsock(agent::vsock_socket(&vm.dir)).patient(AGENT_PATIENCE);
    let mut pending = Vec::new();
    let mut on_out = |b: &[u8]| {
        pending.extend_from_slice(b);
        while let Some(nl) = pending.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            say.line(format!("  {}", String::from_utf8_lossy(&line[..nl]).trim_end()));
        }
    };
    let code = agent.addon(addon, enable, SET_DEADLINE, &mut on_out).map_err(|e| agent_error(e, name)).with_context(
        || {
            format!(
                "add-on {addon}: recorded for cluster {name:?}, but its node did not {} it now; the next start does (`{}` after `{}`)",
                if enable { "deploy" } else { "remove" },
                command_for("start", name),
                command_for("stop", name)
            )
        },
    )?;
    anyhow::ensure!(code == 0, "add-on {addon}: the node's agent ended with exit code {code}");
    Ok(())
}

/// After a resume: has the node run what the record says, for add-ons changed while it
/// was suspended (the node says what it was told; only the differences are sent). A
/// failure is said, not fatal: the next start tells the node again.
pub(super) fn sync_on_node(r: &ClusterRecord, vm: &Vm, say: &Say) {
    let agent = Agent::vsock(agent::vsock_socket(&vm.dir)).patient(AGENT_PATIENCE);
    let node = match agent.addons() {
        Ok(n) => n,
        Err(e) => {
            say.line(format!("note: the resumed node does not say which add-ons it runs ({e}); `kindling addons list` shows it later"));
            return;
        }
    };
    for a in addon::ALL {
        let want = r.addon_enabled(a);
        if node.iter().any(|n| n.name == a.name && n.enabled != want) {
            say.line(format!("add-on {}: {} on the resumed node", a.name, if want { "enabling" } else { "disabling" }));
            if let Err(e) = set_on_node(vm, &r.name, a.name, want, say) {
                say.line(format!("note: {e:#}"));
            }
        }
    }
}

/// `start --addons` on a running cluster: enables the add-ons `added` (already in the
/// record) on its node now.
pub(super) fn deploy_on_running(r: &ClusterRecord, vm: &Vm, added: &[&str], say: &Say) -> Result<()> {
    for a in added {
        say.line(format!("add-on {a}: enabled for cluster {:?} (--addons); the node deploys it now", r.name));
        set_on_node(vm, &r.name, a, true, say)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ClusterRecord {
        ClusterRecord {
            name: "k".into(),
            api_port: 16443,
            node_port_base: 30000,
            disk_size_gib: 20,
            created_at: 0,
            addons: Default::default(),
            node: None,
            cloned_from: None,
        }
    }

    #[test]
    fn storage_is_on_by_default_and_the_record_decides() {
        let mut r = record();
        let all = statuses(&r, &[]);
        let s = all.iter().find(|a| a.name == addon::STORAGE_PROVISIONER).expect("listed");
        assert!(s.enabled && s.default);
        assert_eq!((s.deployed, s.running, s.state()), (None, None, "-"), "nothing known without a node");
        r.set_addon(addon::find(addon::STORAGE_PROVISIONER).unwrap(), false);
        let node = [addon::AddonState {
            name: addon::STORAGE_PROVISIONER.into(),
            enabled: false,
            deployed: Some(true),
            running: Some(false),
        }];
        let s = statuses(&r, &node).into_iter().find(|a| a.name == addon::STORAGE_PROVISIONER).unwrap();
        assert!(!s.enabled && s.default);
        assert_eq!((s.deployed, s.running, s.state()), (Some(true), Some(false), "removing"));
    }

    /// The catalogue's version is the one images/ builds (the recipe's go.mod pin).
    #[test]
    fn versions_match_the_recipes_pins() {
        let recipes = [
            (
                addon::STORAGE_PROVISIONER,
                include_str!("../../../images/local-path-provisioner/go.mod"),
                "github.com/rancher/local-path-provisioner",
            ),
            (
                addon::METRICS_SERVER,
                include_str!("../../../images/metrics-server/go.mod"),
                "sigs.k8s.io/metrics-server",
            ),
        ];
        for (name, gomod, module) in recipes {
            let a = addon::find(name).unwrap();
            let pin = format!("require {module} {}\n", a.version);
            assert!(gomod.contains(&pin), "the go.mod of add-on {name} does not pin {module} {}", a.version);
        }
        // Traefik builds inside its own module (its replaces), pinned in the recipe.
        let traefik = include_str!("../../../images/traefik/build.sh");
        let a = addon::find(addon::INGRESS).unwrap();
        assert!(traefik.contains(&format!("\nversion={}\n", a.version)), "images/traefik pins another version");
        assert_eq!(recipes.len() + 1, addon::ALL.len(), "every add-on's recipe is checked");
    }
}
