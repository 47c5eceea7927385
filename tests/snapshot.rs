//! Snapshots end to end: a real guest is snapshotted at SIGUSR1 by one `kindling boot`
//! and restored from the file by another, and goes on from where it was; damaged and
//! mismatched snapshots are refused with the reason. Under the emulated runner both
//! directions go through the level-1 VM's drive.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use common::*;

/// The guest counts in a shell variable (RAM only) and prints each value, with its wall
/// clock.
const COUNTER: &str = "console=ttyS0 panic=1 kindling.run=i=0;while+[+$i+-lt+100000+];do+i=$((i-(-1)));\
                       echo+KINDLING-COUNT=$i+$(date+-u+-Iseconds);sleep+0.2;done";

/// How long the snapshot sits on disk before it is restored.
const AWAY: Duration = Duration::from_secs(10);

/// Starts `kindling boot ARGS`; every stdout and stderr line goes to the receiver.
fn start(args: &[&str]) -> (KillOnDrop, Receiver<String>) {
    let mut child: Child = kindling()
        .arg("boot")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kindling boot");
    let (tx, rx) = channel();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    (KillOnDrop(child), rx)
}

/// Reads lines (keeping them in `log`) until `want` matches one, within `limit`.
fn wait_for<T>(
    rx: &Receiver<String>,
    log: &mut String,
    limit: Duration,
    mut want: impl FnMut(&str) -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + limit;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = rx.recv_timeout(left) else { return None };
        log.push_str(&line);
        log.push('\n');
        if let Some(v) = want(&line) {
            return Some(v);
        }
    }
    None
}

fn count(line: &str) -> Option<u64> {
    line.trim().strip_prefix("KINDLING-COUNT=")?.split_whitespace().next()?.parse().ok()
}

/// The guest's wall clock on a count line, as seconds of the day (UTC).
fn clock(line: &str) -> Option<i64> {
    let iso = line.trim().strip_prefix("KINDLING-COUNT=")?.split_whitespace().nth(1)?;
    let hms = iso.get(11..19)?;
    let mut parts = hms.split(':').map(|p| p.parse::<i64>().ok());
    Some(parts.next()?? * 3600 + parts.next()?? * 60 + parts.next()??)
}

/// Reads the rest of the output until the process ends.
fn drain(rx: &Receiver<String>, log: &mut String, limit: Duration) {
    let _ = wait_for(rx, log, limit, |_| None::<()>);
}

/// Prints the VMM's own figure line (snapshot or restore time) for the record.
fn report(log: &str, what: &str) {
    if let Some(line) = log.lines().find(|l| l.contains(what)) {
        eprintln!("VMM: {}", line.trim());
    }
}

fn wait_exit(child: &mut KillOnDrop, limit: Duration) -> Option<i32> {
    wait_or_kill(&mut child.0, limit).code()
}

#[test]
fn a_snapshotted_guest_goes_on_counting_after_a_restore_from_the_file() {
    let kernel = debian_kernel();
    let initrd = busybox_initramfs();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("vm.snap");
    let snap_s = snap.to_str().unwrap();
    // A vsock device too: its connections are reset on restore, the device comes back.
    let vsock = dir.path().join("v.sock");
    let vsock_s = vsock.to_str().unwrap();
    let (kernel_s, initrd_s) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());

    // 1. Boot, let it count, snapshot at SIGUSR1: the VM ends with status 0.
    let t0 = Instant::now();
    let (mut vm, rx) = start(&[
        "--kernel",
        kernel_s,
        "--initrd",
        initrd_s,
        "--cmdline",
        COUNTER,
        "--memory",
        "256",
        "--net",
        "none",
        "--snapshot-to",
        snap_s,
        "--vsock",
        vsock_s,
    ]);
    let mut log = String::new();
    let first = wait_for(&rx, &mut log, Duration::from_secs(600), |l| count(l).filter(|&n| n >= 5));
    assert!(first.is_some(), "the guest did not count to 5\n{log}");
    eprintln!("booted and counting after {:.1?}", t0.elapsed());
    let asked = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(vm.0.id() as i32), nix::sys::signal::Signal::SIGUSR1).unwrap();
    let status = wait_exit(&mut vm, Duration::from_secs(300));
    drain(&rx, &mut log, Duration::from_secs(5));
    eprintln!("snapshot and exit {:.1?} after SIGUSR1", asked.elapsed());
    assert_eq!(status, Some(0), "the snapshot must end kindling boot with 0\n{log}");
    assert!(log.contains("snapshot written to"), "{log}");
    let last = log.lines().filter_map(count).max().unwrap();
    let meta = std::fs::metadata(&snap).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(meta.len() >= 256 << 20, "the file holds all of memory: {} bytes", meta.len());
    assert!(
        meta.blocks() * 512 < meta.len() * 3 / 4,
        "zero pages are not written: {} of {} bytes",
        meta.blocks() * 512,
        meta.len()
    );
    report(&log, "snapshot written to");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "the guest's memory is the owner's alone");

    let clock_last = log.lines().filter(|l| count(l) == Some(last)).find_map(clock).expect("a clock on the line");

    // 2. Restore it in a new kindling boot, a while later: the count goes on from where
    // it was, and the guest's wall clock moved on by the time the snapshot was away.
    std::thread::sleep(AWAY);
    let t1 = Instant::now();
    let (vm, rx) = start(&["--restore", snap_s, "--net", "none", "--vsock", vsock_s]);
    let mut log2 = String::new();
    let next = wait_for(&rx, &mut log2, Duration::from_secs(600), |l| count(l).zip(clock(l)));
    let away = asked.elapsed().as_secs_f64();
    eprintln!("restored and counting after {:.1?}", t1.elapsed());
    let (next, clock_next) = next.unwrap_or_else(|| panic!("the restored guest did not count\n{log2}"));
    assert!(
        next > last && next <= last + 2,
        "the restored count {next} does not continue the snapshot's {last}\n{log2}"
    );
    let guest_away = (clock_next - clock_last).rem_euclid(86_400) as f64;
    eprintln!("away {away:.1}s; the guest's wall clock moved {guest_away}s");
    assert!(
        (guest_away - away).abs() <= 3.0,
        "the guest's wall clock moved {guest_away}s while the snapshot was away {away:.1}s\n{log2}"
    );
    let later = wait_for(&rx, &mut log2, Duration::from_secs(120), |l| count(l).filter(|&n| n >= next + 5));
    assert!(later.is_some(), "the restored guest stopped counting\n{log2}");
    report(&log2, "microVM restored from");
    drop(vm);

    // 2b. With --restore-clock keep the guest's clocks go on from the snapshot's moment:
    // to the guest no time passed while it was away.
    std::thread::sleep(AWAY);
    let (vm, rx) = start(&["--restore", snap_s, "--restore-clock", "keep", "--net", "none", "--vsock", vsock_s]);
    let mut log3 = String::new();
    let kept = wait_for(&rx, &mut log3, Duration::from_secs(600), |l| count(l).zip(clock(l)));
    let (kept, clock_kept) =
        kept.unwrap_or_else(|| panic!("the guest restored keeping its clock did not count\n{log3}"));
    assert!(kept > last && kept <= last + 2, "the count {kept} does not continue the snapshot's {last}\n{log3}");
    let moved = (clock_kept - clock_last).rem_euclid(86_400);
    assert!(
        moved <= 3,
        "with --restore-clock keep the guest's wall clock moved {moved}s (away {:.0}s)\n{log3}",
        asked.elapsed().as_secs_f64()
    );
    drop(vm);

    // 3. The same snapshot with other devices (a disk it did not have) is refused.
    let extra = dir.path().join("extra.img");
    std::fs::write(&extra, vec![0u8; 1 << 20]).unwrap();
    let (out, text) =
        boot(&["--restore", snap_s, "--net", "none", "--vsock", vsock_s, "--disk", extra.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("the snapshot does not fit: it has the devices [vsock cid 3]"), "{text}");
    assert!(text.contains("boot the VM afresh instead"), "the error says what to do\n{text}");
    assert!(!text.contains("panicked"), "{text}");

    // 4. Its machine state damaged behind a good header: refused where the VMM reads it.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&snap).unwrap();
        f.write_all_at(br#"{"vcpus":[{"regs":7}],"vm":"#, 4096).unwrap();
    }
    let (out, text) = boot(&["--restore", snap_s, "--net", "none", "--vsock", vsock_s]);
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("its machine state"), "the error names the problem\n{text}");
    assert!(text.contains("not a usable kindling snapshot (take a new one)"), "and the fix\n{text}");
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn damaged_snapshots_are_refused_with_the_reason_and_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "shorter than a snapshot's header"),
        ("not-a-snapshot", vec![0x7f; 8192], "does not start with a snapshot's magic"),
        (
            "huge-header-length",
            [b"KINDLSNP".to_vec(), u32::MAX.to_le_bytes().to_vec(), vec![0; 8192]].concat(),
            "header's length is out of range",
        ),
        (
            "garbage-header",
            [b"KINDLSNP".to_vec(), 5u32.to_le_bytes().to_vec(), b"{{{{{".to_vec(), vec![0; 8192]].concat(),
            "the header",
        ),
    ];
    for (name, bytes, why) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let (out, text) = boot(&["--restore", p.to_str().unwrap(), "--net", "none"]);
        assert_ne!(out.status.code(), Some(0), "{name}: {text}");
        assert!(text.contains(why), "{name}: the error names the problem\n{text}");
        assert!(text.contains("not a usable kindling snapshot (take a new one)"), "{name}: and the fix\n{text}");
        assert!(!text.contains("panicked"), "{name}: {text}");
    }
    // A header from a hostile writer: lengths and sizes far out of range.
    let header = serde_json::json!({
        "format": 1, "vmm_version": "0.1.0",
        "cpu": {"vendor": "x", "signature": 0, "features": "0"},
        "devices": [], "memory_mib": u64::MAX, "vcpus": u32::MAX,
        "state_offset": 4096, "state_len": u64::MAX, "memory_offset": u64::MAX
    })
    .to_string();
    let mut bytes = b"KINDLSNP".to_vec();
    bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(8192, 0);
    let p = dir.path().join("hostile");
    std::fs::write(&p, bytes).unwrap();
    let (out, text) = boot(&["--restore", p.to_str().unwrap(), "--net", "none"]);
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("out of range"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}

/// Answers every connection's first line `X` with `PONG-X`, on `listener`, until the
/// test ends.
fn pong(listener: std::net::TcpListener) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut line = String::new();
            let _ = BufReader::new(&conn).read_line(&mut line);
            let _ = std::io::Write::write_all(&mut conn, format!("PONG-{}\n", line.trim()).as_bytes());
        }
    });
}

/// What the network guest prints: its count, and whether the host answered it.
fn net_count(line: &str) -> Option<(u64, bool)> {
    let rest = line.trim().strip_prefix("KINDLING-NET=")?;
    let mut words = rest.split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    Some((n, words.next() == Some(&format!("PONG-c{n}"))))
}

#[test]
fn a_restored_guest_keeps_its_devices_talks_over_a_new_network_backend_and_reseeds_its_rng() {
    let emulated = kindling::runner::choose(kindling::runner::RunnerKind::Auto).0 == kindling::runner::Runner::Emulated;
    // kindling's kernel: virtio-mmio, virtio-net and vsock built in (Debian's stock
    // kernel has them as modules, and no virtio-mmio devices from the command line).
    let kernel = our_kernel();
    let initrd = busybox_initramfs();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("vm.snap");
    let vsock = dir.path().join("v.sock");
    // The host answers on a TCP port: on the host's loopback under the emulated runner
    // (the guest reaches it as QEMU's 10.0.2.2, through the level-1 VM's routing and
    // --host-loopback), else at the tap's host side, the guest's gateway.
    let listener = std::net::TcpListener::bind(if emulated { "127.0.0.1:0" } else { "0.0.0.0:0" }).unwrap();
    let port = listener.local_addr().unwrap().port();
    pong(listener);
    let target = if emulated { "10.0.2.2" } else { "$gw" };
    let script = format!(
        "for+a+in+$(cat+/proc/cmdline);do+case+$a+in+kindling.ip=*)ip=${{a#*=}};;kindling.gw=*)gw=${{a#*=}};;esac;done;\
         ip+addr+add+$ip+dev+eth0;ip+link+set+eth0+up;ip+route+add+default+via+$gw;\
         i=0;while+true;do+i=$((i-(-1)));echo+KINDLING-NET=$i+$(echo+c$i|nc+-w+2+{target}+{port});sleep+0.5;done"
    );
    // Not quiet: the kernel's notice that it reseeded its random number generator at the
    // new VM Generation ID is part of what is checked.
    let cmdline = format!("console=ttyS0 panic=1 kindling.run={script}");
    let (snap_s, vsock_s) = (snap.to_str().unwrap(), vsock.to_str().unwrap());
    let devices = ["--net", "tap", "--host-loopback", "--vsock", vsock_s];

    let mut args = vec!["--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()];
    args.extend(["--cmdline", &cmdline, "--memory", "256", "--snapshot-to", snap_s]);
    args.extend(devices);
    let (mut vm, rx) = start(&args);
    let mut log = String::new();
    let answered = wait_for(&rx, &mut log, Duration::from_secs(600), |l| net_count(l).filter(|&(n, ok)| ok && n >= 2));
    assert!(answered.is_some(), "the guest's network did not reach the host\n{log}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(vm.0.id() as i32), nix::sys::signal::Signal::SIGUSR1).unwrap();
    assert_eq!(wait_exit(&mut vm, Duration::from_secs(300)), Some(0), "{log}");
    drain(&rx, &mut log, Duration::from_secs(5));
    let last = log.lines().filter_map(net_count).map(|(n, _)| n).max().unwrap();

    let mut args = vec!["--restore", snap_s];
    args.extend(devices);
    let (vm, rx) = start(&args);
    let mut log2 = String::new();
    let t0 = Instant::now();
    let back = wait_for(&rx, &mut log2, Duration::from_secs(600), |l| net_count(l).filter(|&(_, ok)| ok));
    let (n, _) = back.unwrap_or_else(|| panic!("the restored guest's network did not reach the host\n{log2}"));
    eprintln!(
        "the restored guest reached the host at count {n} (snapshot at {last}), {:.1?} after launch",
        t0.elapsed()
    );
    for l in log2.lines().filter(|l| l.contains("KINDLING-NET=") || l.contains("nc: ")) {
        eprintln!("guest: {l}");
    }
    // At once: a connection the snapshot cut may time out, the next one gets through
    // (the tap's host side keeps its MAC address, so the guest's ARP entry holds).
    assert!(n > last && n <= last + 2, "the count goes on, and the network with it: {n} after {last}\n{log2}");
    assert!(!log2.contains("NEEDS_RESET"), "every device came back in working order\n{log2}");
    assert!(!log2.contains("no event buffer"), "the guest's vsock driver got its transport reset\n{log2}");
    assert!(
        log2.contains("crng reseeded due to virtual machine fork"),
        "the VM Generation ID changed and the guest reseeded its random number generator\n{log2}"
    );
    assert!(!log.contains("virtual machine fork"), "a fresh boot is no fork\n{log}");
    drop(vm);
}
