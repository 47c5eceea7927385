//! The add-ons a node can run on top of Kubernetes, defined once for the host (`kindling
//! addons list`) and the agent (which deploys the enabled ones after node-ready).
//! Their images are built from pinned sources at image-build time (`images/`) and
//! preloaded into the root disk; nothing is pulled at run time.

/// One add-on: its name on the command line, the upstream version its image is built
/// from, whether a new cluster has it, and what it gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addon {
    /// The name `kindling addons` takes.
    pub name: &'static str,
    /// The upstream version its image is built from.
    pub version: &'static str,
    /// Whether a new cluster has it.
    pub default_on: bool,
    /// What it gives, in one line.
    pub gives: &'static str,
}

/// `storage-provisioner`: Rancher's local-path-provisioner and the default StorageClass
/// `standard` (volumes are directories on the node's disk).
pub const STORAGE_PROVISIONER: &str = "storage-provisioner";

/// Every add-on, in the order `addons list` shows them. A version here must match the
/// pin in `images/` (the `kindling` crate's tests check it).
pub const ALL: &[Addon] = &[Addon {
    name: STORAGE_PROVISIONER,
    version: "v0.0.30",
    default_on: true,
    gives: "default StorageClass \"standard\" (rancher.io/local-path): PVCs bind to directories on the node's disk",
}];

/// The add-on called `name`.
pub fn find(name: &str) -> Option<&'static Addon> {
    ALL.iter().find(|a| a.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        for a in ALL {
            assert_eq!(find(a.name), Some(a));
            assert_eq!(ALL.iter().filter(|b| b.name == a.name).count(), 1);
        }
        assert!(find("nope").is_none());
    }
}
