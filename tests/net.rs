//! The guest's network, end to end: kindling's kernel boots a busybox initramfs whose
//! `kindling.run=` script configures eth0 from the `kindling.ip=`/`kindling.gw=` the
//! VMM put on the command line (as the guest agent does), then talks to a TCP listener
//! this test runs on the host: 256 KiB guest to host, 1 MiB host to guest.
//!
//! Where the guest finds the host depends on the backend and the runner:
//! - TAP: the gateway is the tap's host side, i.e. the VMM's host. The guest pings it.
//!   On KVM it connects to the listener there. Under the emulated runner the VMM's host
//!   is the level-1 VM, and the listener is on the real host's loopback; the guest
//!   reaches it at 10.0.2.2 (QEMU user networking's alias for the host's loopback),
//!   routed by L1. That crosses the tap, L1's routing and proxy ARP, and QEMU.
//! - passt: TCP to the gateway lands on the host's loopback. On KVM passt does that
//!   itself; inside L1 the gateway is QEMU's 10.0.2.2, which does it. Either way the
//!   listener on the real host's 127.0.0.1 is reached through passt.
//!
//! These boots pass `--host-loopback`; without it (the default) the guest must not reach
//! the host's loopback at all, which another boot per backend checks. A last boot checks
//! that `--net none` gives the guest no NIC and no addresses.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use kindling::runner::{choose, Runner, RunnerKind};

const TO_HOST: usize = 256 << 10;
const TO_GUEST: usize = 1 << 20;

fn emulated() -> bool {
    choose(RunnerKind::Auto).0 == Runner::Emulated
}

/// The guest's script (for `kindling.run=`: `+` is a space): configure eth0 from the
/// command line, then `body`.
fn guest_script(body: &str) -> String {
    let setup = "for a in $(cat /proc/cmdline);do case $a in kindling.ip=*)ip=${a#*=};;kindling.gw=*)gw=${a#*=};;kindling.dns=*)dns=${a#*=};;esac;done;\
                 echo NET-CONFIG ip=$ip gw=$gw dns=$dns mtu=$(cat /sys/class/net/eth0/mtu);\
                 ip addr add $ip dev eth0;ip link set eth0 up;ip route add default via $gw;";
    format!("{setup}{body}").replace(' ', "+")
}

/// The guest side of the exchange with `target`: send TO_HOST zero bytes, count what
/// comes back. nc's input stays open until nc exits (on the host's FIN): Debian
/// bookworm's passt mishandles a connection the guest half-closed first (it repeats
/// data and never sends its FIN).
fn exchange(target: &str, port: u16) -> String {
    format!("echo NET-RX=$( (head -c {TO_HOST} /dev/zero;while pidof nc>/dev/null;do usleep 100000;done)|nc {target} {port}|wc -c);")
}

/// What the host listener saw: the peer address, bytes received (all zero?), seconds.
struct Seen {
    peer: SocketAddr,
    received: usize,
    all_zero: bool,
    secs: f64,
}

/// Accepts one connection on `listener`: reads TO_HOST bytes, answers TO_GUEST bytes
/// and closes. Dropping the returned sender's partner (the test) ends the wait.
fn serve_once(listener: TcpListener) -> mpsc::Receiver<Seen> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut s, peer)) = listener.accept() else { return };
        let t0 = Instant::now();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut buf = vec![0u8; TO_HOST];
        let mut got = 0;
        while got < TO_HOST {
            match s.read(&mut buf[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        let all_zero = buf[..got].iter().all(|&b| b == 0);
        let reply: Vec<u8> = (0..TO_GUEST).map(|i| (i % 251) as u8).collect();
        let _ = s.write_all(&reply);
        let secs = t0.elapsed().as_secs_f64();
        drop(s);
        let _ = tx.send(Seen { peer, received: got, all_zero, secs });
    });
    rx
}

fn boot_with(net: &str, script: &str) -> (std::process::Output, String) {
    boot_with_flags(net, script, &["--host-loopback"])
}

fn boot_with_flags(net: &str, script: &str, flags: &[&str]) -> (std::process::Output, String) {
    let (kernel, initrd) = (our_kernel(), busybox_initramfs());
    let cmdline = format!("console=ttyS0 panic=1 quiet kindling.run={script}");
    let mut args = vec![
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--memory",
        "256",
        "--net",
        net,
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(flags);
    boot(&args)
}

/// Runs the exchange over `net` and checks both ends.
fn guest_reaches_the_host(net: &str, listen: &str, target: Option<&str>, extra: &str) -> String {
    let listener = TcpListener::bind((listen, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = serve_once(listener);
    let target = target.unwrap_or("$gw");
    let t0 = Instant::now();
    let (out, text) = boot_with(net, &guest_script(&format!("{extra}{}", exchange(target, port))));
    eprintln!("{net}: boot and exchange took {:.1}s", t0.elapsed().as_secs_f64());
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("kindling: net {net} (")), "the choice is announced:\n{text}");
    let seen = seen
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| panic!("the guest never connected to the host listener:\n{text}"));
    assert_eq!(seen.received, TO_HOST, "guest-to-host bytes:\n{text}");
    assert!(seen.all_zero, "guest-to-host data corrupted");
    assert!(text.contains(&format!("NET-RX={TO_GUEST}")), "host-to-guest bytes:\n{text}");
    eprintln!("{net}: exchange with {} took {:.2}s on the host side", seen.peer, seen.secs);
    text
}

#[test]
fn tap_guest_reaches_the_host() {
    let emulated = emulated();
    // SAFETY: geteuid has no preconditions.
    if !emulated && unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: on KVM, TAP needs root (the emulated runner has it inside its level-1 VM)");
        return;
    }
    let (listen, target) = if emulated { ("127.0.0.1", Some("10.0.2.2")) } else { ("0.0.0.0", None) };
    let text = guest_reaches_the_host("tap", listen, target, "ping -c 2 $gw;");
    assert!(text.contains("2 packets transmitted, 2 packets received"), "the guest pings the VMM's host:\n{text}");
    assert!(text.contains("NET-CONFIG ip=172.30."), "guest address in 172.30.N.2/24:\n{text}");
    assert!(text.contains("net: tap kl-"), "the tap device is described:\n{text}");
    // The VMM made the tap as root, then dropped root before the guest ran (the
    // exchange above went through the tap as the unprivileged user): it says so with its
    // credentials from /proc/thread-self/status. Inside the level-1 VM there is no sudo
    // caller: it becomes nobody.
    let creds = text
        .lines()
        .find_map(|l| l.split_once("dropped root after setup: ").map(|(_, c)| c.to_string()))
        .unwrap_or_else(|| panic!("the VMM, root for the tap, did not drop root:\n{text}"));
    let uids: Vec<&str> = creds.split(';').next().unwrap_or("").split_whitespace().skip(1).collect();
    assert_eq!(uids.len(), 4, "real, effective, saved and filesystem uid: {creds}");
    assert!(uids.iter().all(|u| *u != "0"), "still root: {creds}");
    if emulated {
        assert!(creds.starts_with("Uid: 65534 65534 65534 65534; Gid: 65534 65534 65534 65534; Groups:;"), "{creds}");
    }
    assert!(creds.contains("CapEff: 0000000000000000") && creds.contains("NoNewPrivs: 1"), "{creds}");
}

#[test]
fn passt_guest_reaches_the_host() {
    let text = guest_reaches_the_host("passt", "127.0.0.1", None, "");
    assert!(text.contains("mtu=65520"), "passt's MTU is offered:\n{text}");
    assert!(text.contains("net: passt (pid "), "{text}");
    assert!(!text.contains("virtio-net: passt"), "passt kept running:\n{text}");
}

/// Without `--host-loopback`, the guest cannot reach a service on the host's loopback
/// (other clusters' API forwards live there): through passt's gateway, and under the
/// emulated runner through QEMU's 10.0.2.2 from TAP or passt.
#[test]
fn the_hosts_loopback_is_closed_to_the_guest_by_default() {
    let emulated = emulated();
    let mut nets = vec!["passt"];
    // SAFETY: geteuid has no preconditions.
    if emulated || unsafe { libc::geteuid() } == 0 {
        nets.push("tap");
    }
    for net in nets {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = serve_once(listener);
        let target = if emulated { "10.0.2.2" } else { "$gw" };
        let probe = format!(
            "if echo x|nc -w 5 {target} {port} >/dev/null;then echo LOOPBACK-OPEN;else echo LOOPBACK-CLOSED;fi;"
        );
        let (out, text) = boot_with_flags(net, &guest_script(&probe), &[]);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains("LOOPBACK-CLOSED") && !text.contains("LOOPBACK-OPEN"),
            "{net}: the guest reached the host's loopback:\n{text}"
        );
        assert!(
            seen.recv_timeout(Duration::from_secs(1)).is_err(),
            "{net}: the host's loopback listener saw a connection"
        );
    }
}

#[test]
fn net_none_gives_no_nic() {
    let script = "ls /sys/class/net;grep -c kindling.ip= /proc/cmdline;echo NONE-DONE".replace(' ', "+");
    let (out, text) = boot_with("none", &script);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("kindling: net none (requested with --net none)"), "{text}");
    assert!(text.contains("NONE-DONE") && !text.contains("eth0"), "{text}");
    assert!(!text.contains("kindling.ip=") && !text.contains("net: "), "{text}");
}
