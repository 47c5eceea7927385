//! A VM's process: `kindling boot` spawned in its own session, found again after a
//! daemon restart (pid plus start time), and stopped (SIGTERM, then SIGKILL).
//!
//! The process is the daemon's child only until the daemon exits: it runs in its own
//! session with no terminal, so it outlives the daemon, and a restarted daemon
//! recognizes it by its pid *and* its start time (/proc/<pid>/stat field 22), which a
//! reused pid does not share.
//!
//! The VM process's session id is its pid. The emulated runner's QEMU runs in that
//! session too, so when the VM process is gone, whatever is left of its session is
//! cleaned up, and SIGKILL after the stop timeout goes to the whole session.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use super::api::VmSpec;
use super::state::{now_secs, Paths};

/// The fields of /proc/<pid>/stat the daemon uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// R, S, D, Z (zombie), X (dead), ...
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    /// Field 22: clock ticks since boot when the process started.
    pub start_time: u64,
}

/// Parses the text of /proc/<pid>/stat. The command name (field 2) may contain spaces
/// and parentheses, so fields are counted from its last ')'.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); field N is f[N - 3].
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        session: f.get(3)?.parse().ok()?,
        start_time: f.get(19)?.parse().ok()?,
    })
}

pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The start time of a live process, to record beside its pid.
pub fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|s| s.start_time)
}

/// True while the process `pid` that started at `start_time` runs. A zombie counts as
/// exited: it no longer runs, and only its parent can reap it.
pub fn is_alive(pid: u32, start_time: u64) -> bool {
    match proc_stat(pid) {
        Some(s) => s.start_time == start_time && !matches!(s.state, 'Z' | 'X' | 'x'),
        None => false,
    }
}

/// Live processes of session `sid` (the VM process and what it started, like QEMU).
pub fn session_members(sid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| proc_stat(*pid).is_some_and(|s| s.session == sid as i32 && !matches!(s.state, 'Z' | 'X' | 'x')))
        .collect()
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// How a VM process starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// A boot of the spec's kernel.
    Boot,
    /// A restore from the VM's snapshot (which holds the kernel, memory and vCPUs); with
    /// `keep_clock`, the guest's clocks go on from the snapshot's moment.
    Resume { keep_clock: bool },
}

/// The `kindling boot` arguments for `spec`, launched as `launch` says. Either way
/// SIGUSR1 makes the VMM write a snapshot to [`Paths::snapshot_next`] and end.
pub fn boot_args(spec: &VmSpec, paths: &Paths, launch: Launch) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["boot".into()];
    if let Launch::Resume { keep_clock } = launch {
        a.extend(["--restore".into(), paths.snapshot_resumed(&spec.name).into()]);
        if keep_clock {
            a.extend(["--restore-clock".into(), "keep".into()]);
        }
    } else {
        a.extend(["--kernel".into(), spec.kernel.clone().into()]);
        if let Some(initrd) = &spec.initrd {
            a.extend(["--initrd".into(), initrd.clone().into()]);
        }
        if let Some(cmdline) = &spec.cmdline {
            a.extend(["--cmdline".into(), cmdline.into()]);
        }
        a.extend([
            "--cpus".into(),
            spec.cpus.to_string().into(),
            "--memory".into(),
            spec.memory_mib.to_string().into(),
        ]);
    }
    a.extend(["--snapshot-to".into(), paths.snapshot_next(&spec.name).into()]);
    for d in &spec.disks {
        // Always with a flag, so that a comma inside the path is not read as one.
        let mut disk = d.path.clone().into_os_string();
        disk.push(if d.read_only { ",ro" } else { ",rw" });
        a.extend(["--disk".into(), disk]);
    }
    if spec.vsock {
        a.extend(["--vsock".into(), paths.vsock_socket(&spec.name).into()]);
    }
    for f in &spec.forwards {
        a.extend(["--forward".into(), f.into()]);
    }
    if spec.guest_forwards {
        a.push("--guest-forwards".into());
    }
    a.extend(["--runner".into(), spec.runner.as_str().into()]);
    a.extend(["--console-log".into(), paths.console_log(&spec.name).into()]);
    a
}

/// A freshly started VM process.
pub struct Spawned {
    pub pid: u32,
    pub start_time: u64,
    /// The daemon's handle, to learn the exit status while the daemon lives.
    pub child: tokio::process::Child,
}

/// Starts `exe boot ...` for `spec`: own session, stdin /dev/null, stdout and stderr
/// appended to the VM's console.log until the VM process takes it over
/// (`--console-log`, which caps and rotates it), working directory the VM's directory.
pub fn spawn(exe: &Path, spec: &VmSpec, paths: &Paths, launch: Launch) -> std::io::Result<Spawned> {
    let dir = paths.vm_dir(&spec.name);
    let args = boot_args(spec, paths, launch);
    let mut log = OpenOptions::new().create(true).append(true).open(paths.console_log(&spec.name))?;
    let shown: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    writeln!(
        log,
        "=== kindling daemon: starting VM {} at {} (unix time): {} {}",
        spec.name,
        now_secs(),
        exe.display(),
        shown.join(" ")
    )?;
    if spec.vsock {
        // A socket left by an earlier run would make the VMM's bind fail.
        let _ = std::fs::remove_file(paths.vsock_socket(&spec.name));
    }
    // A snapshot a run did not finish is no snapshot. The file is made (empty) here
    // rather than by the VMM, which may have dropped root by the time it writes it and
    // then could not create a file in this directory.
    {
        use std::os::unix::fs::OpenOptionsExt;
        let next = paths.snapshot_next(&spec.name);
        let _ = std::fs::remove_file(&next);
        OpenOptions::new().write(true).create_new(true).mode(0o600).open(&next)?;
    }
    let tmp = paths.vm_tmp(&spec.name);
    remove_tmp(paths, &spec.name);
    std::fs::create_dir(&tmp)?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(&args)
        .current_dir(&dir)
        .env("TMPDIR", &tmp)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(false);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pid = child.id().ok_or_else(|| std::io::Error::other("the VM process exited before its pid was known"))?;
    // Our unreaped child: its /proc entry stays until we wait for it.
    let start_time = start_time(pid)
        .ok_or_else(|| std::io::Error::other(format!("cannot read /proc/{pid}/stat of the VM process")))?;
    Ok(Spawned { pid, start_time, child })
}

/// Removes the VM's TMPDIR (call it once nothing of the VM's session runs).
pub fn remove_tmp(paths: &Paths, name: &str) {
    let tmp = paths.vm_tmp(name);
    if let Err(e) = std::fs::remove_dir_all(&tmp) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("VM {name}: cannot remove {}: {e}", tmp.display());
        }
    }
}

/// Waits until the process is gone; false if it still runs after `limit`.
pub async fn wait_exit(pid: u32, start_time: u64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !is_alive(pid, start_time) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ends what is left of the session of an exited VM process (e.g. QEMU under the
/// emulated runner when `kindling boot` died): SIGTERM, then SIGKILL after 3 s. Call
/// it right after the VM process was seen to exit, while the session id is still its.
pub async fn reap_session(sid: u32) {
    let left = session_members(sid);
    if left.is_empty() {
        return;
    }
    tracing::warn!("VM process {sid} exited but left processes {left:?} in its session; terminating them");
    for pid in &left {
        signal(*pid, nix::sys::signal::Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && !session_members(sid).is_empty() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for pid in session_members(sid) {
        signal(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

/// How a stop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// It had already exited.
    AlreadyGone,
    /// It exited after SIGTERM, within the timeout.
    Exited,
    /// It was still running at the timeout; its session got SIGKILL.
    Killed,
    /// Even SIGKILL did not end it within 10 s (e.g. stuck in uninterruptible I/O).
    Stuck,
}

/// SIGTERM to the VM process (the VMM then asks the guest to shut down in order); after
/// `timeout`, SIGKILL to its whole session.
pub async fn stop(pid: u32, start_time: u64, timeout: Duration) -> Stopped {
    if !is_alive(pid, start_time) {
        reap_session(pid).await;
        return Stopped::AlreadyGone;
    }
    signal(pid, nix::sys::signal::Signal::SIGTERM);
    let outcome = if wait_exit(pid, start_time, timeout).await {
        Stopped::Exited
    } else {
        tracing::warn!("VM process {pid} still runs {timeout:?} after SIGTERM; sending SIGKILL to its session");
        for p in session_members(pid) {
            signal(p, nix::sys::signal::Signal::SIGKILL);
        }
        if is_alive(pid, start_time) {
            signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
        if wait_exit(pid, start_time, Duration::from_secs(10)).await {
            Stopped::Killed
        } else {
            return Stopped::Stuck;
        }
    };
    reap_session(pid).await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::api::{DiskSpec, RunnerKind};

    #[test]
    fn stat_parsing_counts_fields_after_the_command_name() {
        let line =
            "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(s, ProcStat { state: 'S', ppid: 1, pgrp: 1234, session: 1234, start_time: 987654 });
        assert_eq!(parse_stat("1 (x) S 1"), None);
        let me = proc_stat(std::process::id()).unwrap();
        assert!(is_alive(std::process::id(), me.start_time));
        assert!(!is_alive(std::process::id(), me.start_time + 1), "another start time is another process");
    }

    #[test]
    fn boot_arguments() {
        let paths = Paths::new("/state");
        let mut spec = VmSpec::new("vm", "/k");
        spec.initrd = Some("/i".into());
        spec.cmdline = Some("console=ttyS0 x=1".into());
        spec.disks =
            vec![DiskSpec { path: "/d,1".into(), read_only: false }, DiskSpec { path: "/e".into(), read_only: true }];
        spec.runner = RunnerKind::Emulated;
        let a: Vec<String> =
            boot_args(&spec, &paths, Launch::Boot).into_iter().map(|s| s.into_string().unwrap()).collect();
        assert_eq!(
            a.join(" "),
            "boot --kernel /k --initrd /i --cmdline console=ttyS0 x=1 --cpus 1 --memory 512 --snapshot-to /state/vms/vm/snapshot.next \
             --disk /d,1,rw --disk /e,ro --runner emulated --console-log /state/vms/vm/console.log"
        );
        spec.vsock = true;
        spec.forwards = vec!["8080:80".into()];
        let a: Vec<String> =
            boot_args(&spec, &paths, Launch::Boot).into_iter().map(|s| s.into_string().unwrap()).collect();
        assert!(a.join(" ").ends_with("--vsock /state/vms/vm/vsock.sock --forward 8080:80 --runner emulated --console-log /state/vms/vm/console.log"), "{a:?}");
        // A resume: the snapshot holds the kernel, its command line, memory and vCPUs.
        let a: Vec<String> = boot_args(&spec, &paths, Launch::Resume { keep_clock: true })
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert!(
            a.join(" ").starts_with(
                "boot --restore /state/vms/vm/snapshot.resumed --restore-clock keep --snapshot-to /state/vms/vm/snapshot.next --disk /d,1,rw"
            ),
            "{a:?}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn spawned_process_is_its_own_session_and_stop_ends_it() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        std::fs::create_dir_all(paths.vm_dir("t")).unwrap();
        // A stand-in for `kindling boot`: a shell that ignores SIGTERM and has a child.
        let exe = d.path().join("fake-kindling");
        std::fs::write(&exe, "#!/bin/sh\ntrap '' TERM\necho started \"$@\"\nsleep 300 &\nwait\n").unwrap();
        std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        // ETXTBSY: another test thread may fork while the script is open for writing.
        let mut tries = 0;
        let mut s = loop {
            match spawn(&exe, &VmSpec::new("t", "/k"), &paths, Launch::Boot) {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => tries += 1,
                r => break r.unwrap(),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let st = proc_stat(s.pid).unwrap();
        assert_eq!(st.session, s.pid as i32, "the VM process leads its own session");
        let t0 = Instant::now();
        while session_members(s.pid).len() < 2 && t0.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(session_members(s.pid).len(), 2);
        let waiter = tokio::spawn(async move { s.child.wait().await.unwrap() });
        assert_eq!(stop(s.pid, s.start_time, Duration::from_millis(300)).await, Stopped::Killed);
        assert!(session_members(s.pid).is_empty(), "the whole session is gone");
        assert!(!waiter.await.unwrap().success());
        let log = std::fs::read_to_string(paths.console_log("t")).unwrap();
        assert!(
            log.contains("=== kindling daemon: starting VM t") && log.contains("started boot --kernel /k"),
            "{log}"
        );
        assert_eq!(stop(s.pid, s.start_time, Duration::from_secs(1)).await, Stopped::AlreadyGone);
    }
}
