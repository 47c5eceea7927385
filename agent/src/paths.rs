//! Where the node keeps things (under a root directory, so the same code runs in the VM
//! and in host tests), and what the rootfs recipe recorded about its images.

use std::collections::HashMap;
use std::path::PathBuf;

/// Where the node keeps things, under `root`.
#[derive(Clone, Debug)]
pub struct Paths {
    pub root: PathBuf,
}

impl Paths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// `p` (an absolute path in the node) under the root.
    pub fn at(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }
    pub fn pki(&self) -> PathBuf {
        self.at("/var/lib/kindling/pki")
    }
    pub fn config(&self) -> PathBuf {
        self.at("/etc/kindling")
    }
    pub fn logs(&self) -> PathBuf {
        self.at("/var/log/kindling")
    }
    pub fn images(&self) -> PathBuf {
        self.at("/var/lib/kindling/images")
    }
    pub fn etcd_data(&self) -> PathBuf {
        self.at("/var/lib/etcd")
    }
    pub fn kubeconfig(&self, name: &str) -> PathBuf {
        self.config().join(format!("{name}.conf"))
    }
    pub fn containerd_socket(&self) -> PathBuf {
        self.at("/run/containerd/containerd.sock")
    }
    pub fn bin(&self, name: &str) -> String {
        for dir in ["/usr/local/bin", "/usr/bin", "/usr/sbin", "/sbin"] {
            let p = self.at(dir).join(name);
            if p.exists() {
                return p.display().to_string();
            }
        }
        name.to_string()
    }
}

/// Image names the rootfs recipe recorded in /etc/kindling/versions.env.
pub fn versions(paths: &Paths) -> HashMap<String, String> {
    std::fs::read_to_string(paths.config().join("versions.env"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}
