//! The whole node, end to end: kindling's kernel and root disk (from `kindling images
//! build`, cached) boot under kindling's VMM; the agent reports every phase up to
//! dns-ready; the in-guest self-test then runs a busybox pod to completion, round-trips
//! a ConfigMap and a Secret, and resolves kubernetes.default from a pod; the agent
//! powers the VM off. Meanwhile the host reaches the API server through `--forward`:
//! `curl /readyz`, and `kubectl get nodes` with the kubeconfig `kindling kubeconfig`
//! fetched over vsock. Under the emulated runner this takes many minutes.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A running `kindling boot` whose stdout and stderr are collected as they come.
struct Booting {
    child: std::process::Child,
    log: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Booting {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kindling boot");
        let log = Arc::new(Mutex::new(String::new()));
        let pipes: Vec<Box<dyn Read + Send>> =
            vec![Box::new(child.stdout.take().unwrap()), Box::new(child.stderr.take().unwrap())];
        let readers = pipes
            .into_iter()
            .map(|p| {
                let log = log.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(p);
                    let mut line = Vec::new();
                    while r.read_until(b'\n', &mut line).map(|n| n > 0).unwrap_or(false) {
                        log.lock().unwrap().push_str(&String::from_utf8_lossy(&line));
                        line.clear();
                    }
                })
            })
            .collect();
        Self { child, log, readers }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`; false if the VM ended or `limit` passed.
    fn wait_for(&mut self, needle: &str, limit: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if self.log().contains(needle) {
                return true;
            }
            if self.child.try_wait().unwrap().is_some() {
                return self.log().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        false
    }

    /// Waits for the VM to end (killing it after `limit`); its exit code and whole log.
    fn finish(mut self, limit: Duration) -> (Option<i32>, String) {
        let status = wait_or_kill(&mut self.child, limit);
        for r in self.readers.drain(..) {
            r.join().ok();
        }
        (status.code(), self.log())
    }
}

impl Drop for Booting {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Runs `cmd` (killed after 3 minutes), returning (success, stdout + stderr).
fn output_of(cmd: Command) -> (bool, String) {
    let out = run_with_timeout(cmd, Duration::from_secs(180));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// A host port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn node_gets_ready_and_passes_the_in_guest_selftest() {
    let kernel = image_path("kernel");
    let rootfs = image_path("rootfs");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("node.ext4");
    let st = std::process::Command::new("cp").arg("--sparse=always").arg(&rootfs).arg(&disk).status().unwrap();
    assert!(st.success());

    // The API server forwarded to the host, as a user would boot the image by hand.
    let vsock = dir.path().join("node.sock");
    let port = free_port();
    let mut cmd = kindling();
    cmd.args(["boot", "--kernel", kernel.to_str().unwrap(), "--disk", disk.to_str().unwrap()])
        .args(["--cpus", "1", "--memory", "2048"])
        .args(["--vsock", vsock.to_str().unwrap(), "--forward", &format!("{port}:6443")])
        .args(["--cmdline", "console=ttyS0 panic=1 root=/dev/vda rw kindling.selftest=1"]);
    let mut vm = Booting::spawn(cmd);
    let ready = vm.wait_for("kindling-agent: phase node-ready", Duration::from_secs(40 * 60));
    assert!(ready, "the node never reported node-ready\n{}", tail(&vm.log()));

    // From the host, while the self-test runs: /readyz through the forward, and kubectl
    // with the kubeconfig `kindling kubeconfig` fetches through the agent.
    // /readyz checks etcd with a short timeout, which a busy emulated node right after
    // node-ready can miss once: asked again for up to 3 minutes.
    let server = format!("https://127.0.0.1:{port}");
    let t0 = Instant::now();
    loop {
        let mut curl = Command::new("curl");
        curl.args(["-ksS", "--max-time", "60", &format!("{server}/readyz")]);
        let (ok, readyz) = output_of(curl);
        if ok && readyz.trim() == "ok" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(180), "curl {server}/readyz for 3 minutes, last: {readyz}");
        std::thread::sleep(Duration::from_secs(5));
    }
    let mut fetch = kindling();
    fetch.args(["kubeconfig", "--name", "node", "--vsock", vsock.to_str().unwrap(), "--server", &server]);
    let (ok, kc) = output_of(fetch);
    assert!(ok && kc.contains("current-context: node") && kc.contains(&server), "kindling kubeconfig:\n{kc}");
    let kc_path = dir.path().join("kubeconfig");
    std::fs::write(&kc_path, kc).unwrap();
    let kubectl = kindling::util::which("kubectl").expect("kubectl on PATH (scripts/setup installs it)");
    let mut get_nodes = Command::new(kubectl);
    get_nodes.arg("--kubeconfig").arg(&kc_path).args(["--request-timeout=120s", "get", "nodes", "--no-headers"]);
    let (ok, nodes) = output_of(get_nodes);
    assert!(ok && nodes.split_whitespace().nth(1) == Some("Ready"), "kubectl get nodes:\n{nodes}");

    let (code, log) = vm.finish(Duration::from_secs(30 * 60));
    let phases: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("kindling-agent: phase "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for l in log.lines().filter(|l| l.starts_with("kindling-agent: phase ")) {
        eprintln!("{l}");
    }
    for p in kindling_proto::phase::ALL {
        assert!(phases.contains(&p), "phase {p} never reported; phases {phases:?}\n{}", tail(&log));
    }
    for check in ["busybox-pod", "configmap", "secret", "dns"] {
        assert!(log.contains(&format!("selftest {check}: ok")), "selftest {check} did not pass\n{}", tail(&log));
    }
    assert!(log.contains("kindling-agent: selftest passed"), "{}", tail(&log));
    assert_eq!(code, Some(0), "the agent powers the VM off after the self-test\n{}", tail(&log));
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}
