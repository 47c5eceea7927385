//! Bad input: each case exits non-zero with one line that names the problem and the fix.

mod common;

use common::*;

fn fails_with(args: &[&str], expect: &[&str]) {
    let mut cmd = kindling();
    cmd.arg("boot").args(args);
    let out = run_with_timeout(cmd, std::time::Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "must fail: {args:?}\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly one line expected, got:\n{stderr}");
    for e in expect {
        assert!(lines[0].contains(e), "{:?} should mention {e:?}", lines[0]);
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn junk_file(dir: &std::path::Path) -> String {
    let p = dir.join("not-a-kernel");
    std::fs::write(&p, vec![0x42u8; 4096]).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn missing_kernel() {
    fails_with(&["--kernel", "/nonexistent/vmlinuz"], &["/nonexistent/vmlinuz", "not found", "--kernel"]);
}

#[test]
fn file_that_is_not_a_kernel() {
    let d = tempfile::tempdir().unwrap();
    let k = junk_file(d.path());
    fails_with(&["--kernel", &k], &["not a Linux kernel", "bzImage"]);
}

#[test]
fn missing_disk() {
    let kernel = debian_kernel();
    fails_with(
        &["--kernel", kernel.to_str().unwrap(), "--disk", "/nonexistent/disk.img"],
        &["/nonexistent/disk.img", "not found"],
    );
}

#[test]
fn over_long_command_line() {
    let kernel = debian_kernel();
    let long = "x".repeat(3000);
    fails_with(&["--kernel", kernel.to_str().unwrap(), "--cmdline", &long], &["command line", "shorten --cmdline"]);
}

#[test]
fn zero_memory() {
    let kernel = debian_kernel();
    fails_with(&["--kernel", kernel.to_str().unwrap(), "--memory", "0"], &["--memory 0", "MiB"]);
}

#[test]
fn zero_cpus() {
    let kernel = debian_kernel();
    fails_with(&["--kernel", kernel.to_str().unwrap(), "--cpus", "0"], &["--cpus 0", "at least one"]);
}

#[test]
fn bad_disk_flag() {
    let kernel = debian_kernel();
    fails_with(&["--kernel", kernel.to_str().unwrap(), "--disk", "/tmp/x.img,rx"], &["unknown flag", "PATH,ro"]);
}
