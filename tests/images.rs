//! The guest image, built for real by `kindling images build` (cached by input hash, so
//! only the first run on a machine pays for the Go and Debian builds), then inspected
//! from outside: the root disk holds containerd, runc, the CNI plugins, Kubernetes,
//! etcd, the agent as init, and the preloaded OCI image archives, and every Kubernetes
//! component reports the pinned release.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;

fn build_all() -> Vec<(String, PathBuf)> {
    let out = kindling().args(["images", "build"]).stderr(Stdio::inherit()).output().unwrap();
    assert!(out.status.success(), "kindling images build failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_string(), PathBuf::from(parts.next()?)))
        })
        .collect()
}

fn debugfs(img: &std::path::Path, request: &str) -> String {
    let out = Command::new(system_tool("debugfs")).arg("-R").arg(request).arg(img).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Kubernetes release pinned in images/k8s/go.mod.
fn pinned_kubernetes() -> String {
    let gomod = std::fs::read_to_string(repo().join("images/k8s/go.mod")).unwrap();
    gomod
        .lines()
        .find_map(|l| l.trim().strip_prefix("k8s.io/kubernetes ").map(|v| v.trim().to_string()))
        .expect("go.mod requires k8s.io/kubernetes")
}

#[test]
fn root_disk_holds_the_node_and_components_report_the_pinned_release() {
    let outputs = build_all();
    let path = |name: &str| {
        outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("no {name} in {outputs:?}"))
    };

    let rootfs = path("rootfs");
    let usr_local = debugfs(&rootfs, "ls -l /usr/local/bin");
    for bin in [
        "kubernetes",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "kube-proxy",
        "kubectl",
        "etcd",
    ] {
        assert!(usr_local.contains(bin), "{bin} missing from /usr/local/bin:\n{usr_local}");
    }
    let usr_bin = debugfs(&rootfs, "ls -l /usr/bin");
    for bin in ["containerd", "runc", "iptables", "conntrack"] {
        assert!(usr_bin.contains(bin) || debugfs(&rootfs, "ls -l /usr/sbin").contains(bin), "{bin} missing");
    }
    let cni = debugfs(&rootfs, "ls -l /usr/lib/cni");
    for plugin in ["bridge", "host-local", "loopback", "portmap"] {
        assert!(cni.contains(plugin), "CNI plugin {plugin} missing:\n{cni}");
    }
    // The preloaded images are in containerd's store, unpacked (one overlayfs snapshot
    // per layer); only their index is beside it, not the archives.
    let images = debugfs(&rootfs, "ls -l /var/lib/kindling/images");
    assert!(images.contains("images.txt") && images.contains("images.env"), "{images}");
    assert!(!images.contains(".oci.tar"), "the archives are in the image:\n{images}");
    let store = debugfs(&rootfs, "ls -l /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots");
    let snapshots =
        store.lines().filter(|l| l.split_whitespace().last().is_some_and(|n| n.parse::<u32>().is_ok())).count();
    let index = std::fs::read_to_string(path("oci")).unwrap(); // the oci step's artifact: images.txt
    let archives: std::collections::BTreeSet<&str> =
        index.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(snapshots >= archives.len(), "{snapshots} snapshots for {} archives:\n{store}", archives.len());
    assert!(
        debugfs(&rootfs, "stat /var/lib/containerd/io.containerd.metadata.v1.bolt/meta.db").contains("Type: regular")
    );
    assert!(debugfs(&rootfs, "stat /sbin/kindling-agent").contains("Type: regular"), "agent not installed");
    assert!(debugfs(&rootfs, "stat /sbin/init").contains("Type: symlink"), "/sbin/init is not the agent link");

    // Each component, run from the k8s step's output, reports the pinned release.
    let pinned = pinned_kubernetes();
    let k8s_bin = path("k8s");
    for (bin, flag) in [
        ("kube-apiserver", "--version"),
        ("kube-controller-manager", "--version"),
        ("kube-scheduler", "--version"),
        ("kubelet", "--version"),
        ("kube-proxy", "--version"),
        ("kubectl", "version"),
    ] {
        let mut cmd = Command::new(k8s_bin.join(bin));
        cmd.arg(flag);
        if bin == "kubectl" {
            cmd.arg("--client");
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&pinned), "{bin} {flag} printed {text:?}, expected {pinned}");
    }
}

#[test]
fn a_second_build_with_nothing_changed_is_all_cached() {
    build_all();
    let out = kindling().args(["images", "build"]).output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains(": building"), "nothing should be rebuilt:\n{stderr}");
    assert_eq!(stderr.matches(": cached").count(), kindling::images::STEPS.len(), "{stderr}");
}
