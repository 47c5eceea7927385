//! The add-ons a node can run on top of Kubernetes, defined once for the host (`kindling
//! addons list`) and the agent (which deploys the enabled ones after node-ready).
//! Their images are built from pinned sources at image-build time (`images/`) and
//! preloaded into the root disk; nothing is pulled at run time.

use serde::{Deserialize, Serialize};

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

/// `metrics-server`: the resource metrics API (`metrics.k8s.io`) behind `kubectl top`
/// and the HorizontalPodAutoscaler.
pub const METRICS_SERVER: &str = "metrics-server";

/// `ingress`: Traefik as the Ingress controller (IngressClass `traefik`, the default),
/// its ports 80 and 443 on the host's loopback through a LoadBalancer Service.
pub const INGRESS: &str = "ingress";

/// The namespace of `ingress`.
pub const INGRESS_NAMESPACE: &str = "ingress";
/// The name of `ingress`'s LoadBalancer Service (and of its Deployment).
pub const INGRESS_SERVICE: &str = "traefik";

/// Every add-on, in the order `addons list` shows them. A version here must match the
/// pin in `images/` (the `kindling` crate's tests check it).
pub const ALL: &[Addon] = &[
    Addon {
        name: STORAGE_PROVISIONER,
        version: "v0.0.30",
        default_on: true,
        gives: "default StorageClass \"standard\" (rancher.io/local-path): PVCs bind to directories on the node's disk",
    },
    Addon {
        name: METRICS_SERVER,
        version: "v0.8.0",
        default_on: false,
        gives: "resource metrics (metrics.k8s.io): `kubectl top nodes|pods` and CPU/memory autoscaling",
    },
    Addon {
        name: INGRESS,
        version: "v3.6.12",
        default_on: false,
        gives: "Ingress controller (Traefik, default IngressClass \"traefik\"): Ingresses answer on the host, `kindling ingress --url`",
    },
];

/// The add-on called `name`.
pub fn find(name: &str) -> Option<&'static Addon> {
    ALL.iter().find(|a| a.name == name)
}

/// The add-on called `name`, or an error that names the known ones.
pub fn lookup(name: &str) -> Result<&'static Addon, String> {
    find(name).ok_or_else(|| {
        let known: Vec<&str> = ALL.iter().map(|a| a.name).collect();
        format!("no add-on named {name:?}; the add-ons are: {}", known.join(", "))
    })
}

/// A comma-separated list of add-on names (`--addons a,b`, `kindling.addons=a,b`), in
/// the order given, without repeats; empty items are skipped, an unknown name is an
/// error that names the known ones.
pub fn parse_list(list: &str) -> Result<Vec<&'static Addon>, String> {
    let mut out: Vec<&'static Addon> = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let a = lookup(name)?;
        if !out.contains(&a) {
            out.push(a);
        }
    }
    Ok(out)
}

/// What the node's agent says of an add-on (`{"op":"addons"}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddonState {
    /// The add-on's name.
    pub name: String,
    /// Whether the agent is to run it (from its boot parameters and later requests).
    pub enabled: bool,
    /// Its objects are in the cluster (its Deployment exists); None: unknown (the node
    /// is not Ready, or its API server does not answer).
    pub deployed: Option<bool>,
    /// Its Deployment has an available replica; None: unknown.
    pub running: Option<bool>,
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

    #[test]
    fn lists_parse_and_unknown_names_say_which_are_known() {
        let l = parse_list("storage-provisioner, ,storage-provisioner,").unwrap();
        assert_eq!(l.iter().map(|a| a.name).collect::<Vec<_>>(), [STORAGE_PROVISIONER]);
        assert!(parse_list("").unwrap().is_empty());
        let e = parse_list("storage-provisioner,dashbord").unwrap_err();
        assert!(e.starts_with("no add-on named \"dashbord\"; the add-ons are: storage-provisioner"), "{e}");
        assert_eq!(
            lookup("x").unwrap_err(),
            format!("no add-on named \"x\"; the add-ons are: {STORAGE_PROVISIONER}, {METRICS_SERVER}, {INGRESS}")
        );
        let both = parse_list("metrics-server,storage-provisioner").unwrap();
        assert_eq!(both.iter().map(|a| a.name).collect::<Vec<_>>(), [METRICS_SERVER, STORAGE_PROVISIONER]);
    }
}
