//! The guest agent's bring-up at native speed: the real root disk from `kindling images
//! build rootfs`, loop-mounted in a fresh mount namespace, with the agent as PID 1 of
//! fresh PID, UTS, IPC and network namespaces (`unshare`), the way a container manager
//! runs an init (`container` set in its environment). Real containerd, etcd and
//! kube-apiserver run; the agent stops after apiserver-ready (`kindling.until`), because
//! kubelet needs the cgroup hierarchy a VM has and a host shares.
//!
//! Checked: PID 1 duties (mounts, hostname, loopback and node address, network sysctls,
//! reaping), PKI written with private keys 0600, the phase report in order, per-component
//! logs, a killed etcd restarted by the supervisor, orderly shutdown on SIGTERM
//! (control plane, then etcd, then containerd), the control channel (ping, phases,
//! exec, logs, poweroff) on its UNIX socket, and a second boot of the same disk that
//! reuses the PKI and still has the cluster objects of the first.
//!
//! Needs root (namespaces, loop devices); the test says so and does nothing otherwise.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const HOSTNAME: &str = "hosttest";

/// One run of the agent as a container's init.
struct Container {
    unshare: Child,
    lines: Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Container {
    fn start(disk: &Path, mnt: &Path) -> Self {
        let script = r#"set -e
mount --make-rprivate /
mount -o loop "$1" "$2"
exec chroot "$2" /sbin/init"#;
        let mut unshare = Command::new("unshare")
            .args([
                "--mount",
                "--uts",
                "--ipc",
                "--net",
                "--pid",
                "--fork",
                "--kill-child",
                "--",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .arg(disk)
            .arg(mnt)
            .env("container", "kindling-test")
            .env("KINDLING_CMDLINE", format!("kindling.hostname={HOSTNAME} kindling.until=apiserver-ready"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux)");
        let (tx, lines) = channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(unshare.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(unshare.stderr.take().unwrap()),
        ] {
            let (tx, log) = (tx.clone(), log.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        Self { unshare, lines, log }
    }

    /// Everything the container printed so far.
    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for an output line containing `needle`.
    fn expect(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no line with {needle:?} within {timeout:?}; output:\n{}", self.log()),
            }
        }
    }

    /// The agent's PID as the host sees it: the child of unshare.
    fn agent_pid(&self) -> u32 {
        let pid = self.unshare.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        children.split_whitespace().next().expect("unshare has a child").parse().unwrap()
    }

    /// Runs a command inside the container (its namespaces and root).
    fn exec(&self, argv: &[&str]) -> (bool, String) {
        let out = Command::new("nsenter")
            .args([
                "--target",
                &self.agent_pid().to_string(),
                "--mount",
                "--uts",
                "--ipc",
                "--net",
                "--pid",
                "--root",
                "--wd",
                "--",
            ])
            .args(argv)
            .env("PATH", "/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin")
            .output()
            .expect("nsenter (util-linux)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    fn kubectl(&self, args: &[&str]) -> (bool, String) {
        let mut argv = vec!["kubectl", "--kubeconfig", "/etc/kindling/admin.conf"];
        argv.extend_from_slice(args);
        self.exec(&argv)
    }

    /// Host PIDs of the container's processes.
    fn processes(&self) -> Vec<u32> {
        let ns = std::fs::read_link(format!("/proc/{}/ns/pid", self.agent_pid())).unwrap();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|n| n == ns))
            .collect()
    }

    fn find(&self, comm: &str) -> Option<u32> {
        self.processes()
            .into_iter()
            .find(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm))
    }

    /// One request on the agent's control channel (its UNIX socket, reached through
    /// the container's root); returns the reply lines.
    fn control(&self, request: &str) -> Vec<String> {
        let sock = format!("/proc/{}/root/run/kindling/agent.sock", self.agent_pid());
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap_or_else(|e| panic!("{sock}: {e}"));
        std::io::Write::write_all(&mut s, format!("{request}\n").as_bytes()).unwrap();
        BufReader::new(s).lines().map_while(Result::ok).collect()
    }

    /// SIGTERM to the agent (a power-off request), or with `via_control` the control
    /// channel's poweroff; returns its exit status and everything it printed.
    fn power_off(mut self, via_control: bool) -> (std::process::ExitStatus, String) {
        if via_control {
            assert_eq!(self.control(r#"{"op":"poweroff"}"#), [r#"{"ok":true}"#]);
        } else {
            let st = Command::new("kill").args(["-TERM", &self.agent_pid().to_string()]).status().unwrap();
            assert!(st.success());
        }
        self.expect("powering off", Duration::from_secs(90));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.unshare.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(200)); // let the readers drain
                return (status, self.log.lock().unwrap().join("\n"));
            }
            assert!(Instant::now() < deadline, "the agent said it powers off but did not exit:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

fn phases(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split("kindling-agent: phase ").nth(1))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn position(log: &str, needle: &str) -> usize {
    log.find(needle).unwrap_or_else(|| panic!("{needle:?} missing from:\n{log}"))
}

#[test]
fn agent_brings_up_the_control_plane_supervises_it_and_shuts_down_in_order() {
    if !is_root() {
        eprintln!("agent_host: skipped, needs root (namespaces and a loop mount); CI runs it as root");
        return;
    }
    let rootfs = image_path("rootfs");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("node.ext4");
    let mnt: PathBuf = dir.path().join("root");
    std::fs::create_dir(&mnt).unwrap();
    assert!(Command::new("cp").arg("--sparse=always").arg(&rootfs).arg(&disk).status().unwrap().success());

    // First boot: fresh PKI, control plane up.
    let c = Container::start(&disk, &mnt);
    c.expect("phase apiserver-ready", Duration::from_secs(300));
    c.expect("bring-up stopped after apiserver-ready", Duration::from_secs(10));
    let log = c.log();
    assert_eq!(
        phases(&log),
        ["agent-start", "etcd-ready", "containerd-ready", "images-ready", "apiserver-ready"],
        "{log}"
    );
    assert!(log.contains("PKI: wrote"), "first boot writes the PKI:\n{log}");

    // PID 1 duties, seen from inside.
    assert_eq!(c.exec(&["cat", "/proc/sys/kernel/hostname"]).1.trim(), HOSTNAME);
    assert_eq!(c.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]).1.trim(), "1");
    let (_, addrs) = c.exec(&["ip", "-o", "addr", "show", "dev", "lo"]);
    assert!(addrs.contains("10.0.2.15/32") && addrs.contains("127.0.0.1/8"), "{addrs}");
    let (ok, mounts) = c.exec(&["cat", "/proc/self/mounts"]);
    assert!(ok);
    for m in [" /proc proc", " /sys sysfs", " /dev devtmpfs", " /run tmpfs", " /tmp tmpfs"] {
        assert!(mounts.contains(m), "{m} not mounted:\n{mounts}");
    }
    let (ok, modes) = c.exec(&["sh", "-c", "stat -c '%a %n' /var/lib/kindling/pki/*.key"]);
    assert!(ok && modes.lines().count() >= 5, "{modes}");
    for l in modes.lines() {
        assert!(l.starts_with("600 "), "private key not 0600: {l}");
    }
    let (ok, hosts) = c.exec(&["cat", "/etc/hosts"]);
    assert!(ok && hosts.contains(HOSTNAME), "{hosts}");

    // The control channel: phases, a command run inside, a component's log.
    assert_eq!(c.control(r#"{"op":"ping"}"#), [r#"{"ok":true}"#]);
    let phases_reply = c.control(r#"{"op":"phases"}"#).join("");
    assert!(phases_reply.contains(r#""name":"apiserver-ready""#), "{phases_reply}");
    let exec = c.control(r#"{"op":"exec","argv":["cat","/proc/sys/kernel/hostname"]}"#);
    // Output is an {"out":N} line and N raw bytes (here the hostname and its newline).
    assert_eq!(
        exec,
        [format!(r#"{{"out":{}}}"#, HOSTNAME.len() + 1), HOSTNAME.to_string(), r#"{"exit":0}"#.to_string()]
    );
    let logs = c.control(r#"{"op":"logs","component":"etcd"}"#).join("\n");
    assert!(logs.contains("kindling-agent: starting etcd") && logs.ends_with(r#"{"exit":0}"#), "{logs}");
    assert!(c.control(r#"{"op":"logs","component":"../pki/ca"}"#)[0].starts_with(r#"{"error""#));
    assert!(c.control("rm -rf /")[0].starts_with(r#"{"error":"bad request"#));

    // The API server answers, and takes a cluster object that must survive a reboot.
    let (ok, ready) = c.kubectl(&["get", "--raw=/readyz"]);
    assert!(ok && ready.trim() == "ok", "{ready}");
    let (ok, out) = c.kubectl(&["create", "configmap", "survivor", "--from-literal=boot=first"]);
    assert!(ok, "{out}");
    for name in ["containerd", "etcd", "kube-apiserver"] {
        let (ok, size) = c.exec(&["stat", "-c", "%s", &format!("/var/log/kindling/{name}.log")]);
        assert!(ok && size.trim().parse::<u64>().unwrap() > 0, "{name}.log empty or missing: {size}");
    }
    // The preloaded images are in containerd, every one of images.txt, complete and
    // unpacked (the root disk's build did it; the agent imported nothing).
    let (ok, images) = c.exec(&["ctr", "-n", "k8s.io", "images", "ls", "-q"]);
    let (_, index) = c.exec(&["cat", "/var/lib/kindling/images/images.txt"]);
    assert!(index.lines().count() >= 5, "the image index: {index:?}");
    for name in index.lines().filter_map(|l| l.split_whitespace().nth(1)) {
        assert!(ok && images.lines().any(|l| l.trim() == name), "{name} is not in containerd:\n{images}");
    }
    let (ok, check) = c.exec(&["ctr", "-n", "k8s.io", "images", "check", "--snapshotter", "overlayfs"]);
    assert!(ok && check.lines().skip(1).all(|l| l.contains(" complete ") && l.trim_end().ends_with("true")), "{check}");
    assert!(c.log().contains("preloaded images in containerd's store, unpacked"), "{}", c.log());

    // Supervision: a killed etcd comes back, and the API server with it.
    let etcd = c.find("etcd").expect("etcd runs");
    assert!(Command::new("kill").args(["-KILL", &etcd.to_string()]).status().unwrap().success());
    c.expect("etcd exited with 137; restarting", Duration::from_secs(30));
    let t0 = Instant::now();
    while c.find("etcd").is_none_or(|p| p == etcd) || !c.kubectl(&["get", "configmap", "survivor"]).0 {
        assert!(t0.elapsed() < Duration::from_secs(90), "etcd not back after a kill:\n{}", c.log());
        std::thread::sleep(Duration::from_secs(1));
    }
    // PID 1 reaps: nothing in the container is a zombie.
    for p in c.processes() {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().and_then(|s| s.split_whitespace().next()).unwrap_or("?");
        assert_ne!(state, "Z", "zombie in the container: {stat}");
    }

    // Orderly shutdown: API server before etcd before containerd.
    let (status, log) = c.power_off(false);
    assert!(status.success(), "agent exit {status}:\n{log}");
    let (api, etcd, containerd) = (
        position(&log, "kube-apiserver stopped"),
        position(&log, "etcd stopped"),
        position(&log, "containerd stopped"),
    );
    assert!(api < etcd && etcd < containerd, "shutdown order wrong:\n{log}");

    // Second boot of the same disk: same PKI, same cluster state.
    let c = Container::start(&disk, &mnt);
    c.expect("phase apiserver-ready", Duration::from_secs(300));
    assert!(!c.log().contains("PKI: wrote"), "second boot must reuse the PKI:\n{}", c.log());
    let (ok, v) = c.kubectl(&["get", "configmap", "survivor", "-o=jsonpath={.data.boot}"]);
    assert!(ok && v.trim() == "first", "cluster object lost across a reboot: {v}");
    let (status, log) = c.power_off(true);
    assert!(status.success(), "{log}");
}
