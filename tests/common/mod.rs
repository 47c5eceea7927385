//! Shared helpers for kindling's integration tests: real kernels, real images, the real
//! `kindling` binary. Nothing is mocked; a missing prerequisite fails the test with the
//! command that provides it.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The `kindling` binary of this build: next to the test executables' `deps/` folder
/// (`cargo build` puts it there; scripts/test builds it before the tests).
pub fn kindling_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test executable's path");
        let bin = exe.parent().and_then(Path::parent).map(|d| d.join("kindling")).expect("a target directory");
        assert!(
            bin.is_file(),
            "{} not found: build it first with `cargo build -p kindling` (scripts/test does)",
            bin.display()
        );
        bin
    })
    .clone()
}

pub fn kindling() -> Command {
    Command::new(kindling_bin())
}

/// Debian's stock cloud kernel, as extracted by scripts/setup.
pub fn debian_kernel() -> PathBuf {
    kindling::runner::emulated::find_l1_kernel()
        .unwrap_or_else(|e| panic!("{e} (the tests boot Debian's stock kernel too)"))
        .vmlinuz()
}

fn run_script(script: &str, args: &[&str]) -> PathBuf {
    let out = Command::new(repo().join(script)).args(args).stderr(Stdio::inherit()).output().expect(script);
    assert!(out.status.success(), "{script} failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim().lines().last().unwrap())
}

/// A step's artifact from `kindling images build STEP` (cached by input hash).
pub fn image_path(step: &str) -> PathBuf {
    let st = kindling().args(["images", "build", step]).stdout(Stdio::null()).status().unwrap();
    assert!(st.success(), "kindling images build {step} failed");
    let out = kindling().args(["images", "path", step]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// kindling's own guest kernel (bzImage).
pub fn our_kernel() -> PathBuf {
    image_path("kernel")
}

/// A busybox initramfs whose /init prints KINDLING-INIT-OK and KINDLING-NPROC=N, runs
/// the `kindling.run=` command-line script, then powers off.
/// Built once per test process: tests run in parallel threads, and two builds into
/// the same path would race.
pub fn busybox_initramfs() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("kindling-test-initramfs-{}", std::process::id()));
            run_script("scripts/busybox-initramfs", &[dir.join("initramfs.cpio.gz").to_str().unwrap()])
        })
        .clone()
}

/// An ext4 image (made without mounting) holding busybox and `init` as /init.
pub fn ext4_root(dir: &Path, init: &str) -> PathBuf {
    let root = dir.join("root");
    for d in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static (apt-get install busybox-static)");
    let init_path = root.join("init");
    std::fs::write(&init_path, init).unwrap();
    std::fs::set_permissions(&init_path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let img = dir.join("disk.img");
    let st = Command::new(system_tool("mkfs.ext4"))
        .args(["-q", "-L", "kindling-test", "-d"])
        .arg(&root)
        .arg(&img)
        .arg("64M")
        .status()
        .expect("mkfs.ext4 (apt-get install e2fsprogs)");
    assert!(st.success());
    img
}

/// A system tool (e2fsprogs') by name, found in /usr/sbin or /sbin too: an ordinary
/// user's PATH may lack them.
pub fn system_tool(name: &str) -> PathBuf {
    kindling::util::which_system(name).unwrap_or_else(|| panic!("{name} not found; install e2fsprogs"))
}

/// Reads a file out of an ext4 image from outside, with debugfs.
pub fn ext4_cat(img: &Path, path: &str) -> Option<String> {
    let out = Command::new(system_tool("debugfs")).arg("-R").arg(format!("cat {path}")).arg(img).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let err = String::from_utf8_lossy(&out.stderr);
    (!err.contains("not found")).then_some(text)
}

/// Runs `cmd` with no stdin, collecting output; kills it after `limit`.
pub fn run_with_timeout(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        stdout.read_to_end(&mut v).ok();
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        stderr.read_to_end(&mut v).ok();
        v
    });
    let status = wait_or_kill(&mut child, limit);
    Output { status, stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap() }
}

/// Waits for `child` to exit; kills it once `limit` has passed.
pub fn wait_or_kill(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            return child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Boots with `args`, under the runner `auto` picks here, within 10 minutes.
pub fn boot(args: &[&str]) -> (Output, String) {
    let mut cmd = kindling();
    cmd.arg("boot").args(args);
    let out = run_with_timeout(cmd, Duration::from_secs(600));
    let text = format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// A child process killed (and reaped) when the guard is dropped, so that a failing
/// assertion does not leave a VM running on the machine's CPUs.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
