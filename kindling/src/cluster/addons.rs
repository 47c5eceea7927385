//! `kindling addons list`: a cluster's add-ons (`kindling_proto::addon`, the catalogue
//! the node's agent deploys from) and whether each is on. Their images are built with
//! the root disk and preloaded; the agent deploys the enabled ones after node-ready.
//!
//! Every add-on is what its default says for now: enabling or disabling one per
//! cluster (remembered in the cluster record across stop and start) is not there yet.

use anyhow::Result;
use serde::Serialize;

use kindling_proto::addon;

use super::Ctx;

/// One line of `kindling addons list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AddonStatus {
    pub name: &'static str,
    /// The upstream version its image is built from.
    pub version: &'static str,
    /// Whether the cluster runs it.
    pub enabled: bool,
    /// Whether a new cluster runs it.
    pub default: bool,
    pub gives: &'static str,
}

/// The add-ons of the cluster `name` (which must exist).
pub fn addons(name: &str) -> Result<Vec<AddonStatus>> {
    Ctx::connect()?.cluster(name)?;
    Ok(catalogue())
}

fn catalogue() -> Vec<AddonStatus> {
    addon::ALL
        .iter()
        .map(|a| AddonStatus {
            name: a.name,
            version: a.version,
            enabled: a.default_on,
            default: a.default_on,
            gives: a.gives,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_is_on_by_default() {
        let all = catalogue();
        let s = all.iter().find(|a| a.name == addon::STORAGE_PROVISIONER).expect("listed");
        assert!(s.enabled && s.default);
    }

    /// The catalogue's version is the one images/ builds (the recipe's go.mod pin).
    #[test]
    fn versions_match_the_recipes_pins() {
        let s = addon::find(addon::STORAGE_PROVISIONER).unwrap();
        let gomod = include_str!("../../../images/local-path-provisioner/go.mod");
        let pin = format!("require github.com/rancher/local-path-provisioner {}\n", s.version);
        assert!(gomod.contains(&pin), "images/local-path-provisioner/go.mod does not pin {}", s.version);
    }
}
