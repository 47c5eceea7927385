//! The whole node, end to end: kindling's kernel and root disk (from `kindling images
//! build`, cached) boot under kindling's VMM; the agent reports every phase up to
//! dns-ready; the in-guest self-test then runs a busybox pod to completion, round-trips
//! a ConfigMap and a Secret, and resolves kubernetes.default from a pod; the agent
//! powers the VM off. Under the emulated runner this takes many minutes.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn node_gets_ready_and_passes_the_in_guest_selftest() {
    let kernel = image_path("kernel");
    let rootfs = image_path("rootfs");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("node.ext4");
    let st = std::process::Command::new("cp").arg("--sparse=always").arg(&rootfs).arg(&disk).status().unwrap();
    assert!(st.success());

    let mut cmd = kindling();
    cmd.args(["boot", "--kernel", kernel.to_str().unwrap(), "--disk", disk.to_str().unwrap()])
        .args(["--cpus", "1", "--memory", "2048"])
        .args(["--cmdline", "console=ttyS0 panic=1 root=/dev/vda rw kindling.selftest=1"]);
    let out = run_with_timeout(cmd, Duration::from_secs(45 * 60));
    let log = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let phases: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("kindling-agent: phase "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for l in log.lines().filter(|l| l.starts_with("kindling-agent: phase ")) {
        eprintln!("{l}");
    }
    for p in ["agent-start", "etcd-ready", "containerd-ready", "apiserver-ready", "node-ready", "dns-ready"] {
        assert!(phases.contains(&p), "phase {p} never reported; phases {phases:?}\n{}", tail(&log));
    }
    for check in ["busybox-pod", "configmap", "secret", "dns"] {
        assert!(log.contains(&format!("selftest {check}: ok")), "selftest {check} did not pass\n{}", tail(&log));
    }
    assert!(log.contains("kindling-agent: selftest passed"), "{}", tail(&log));
    assert_eq!(out.status.code(), Some(0), "the agent powers the VM off after the self-test\n{}", tail(&log));
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}
