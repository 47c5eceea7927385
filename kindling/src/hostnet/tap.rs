//! The host side of a TAP network: kindling creates a tap device (`kl-<pid>`, opened
//! by the VMM crate's [`TapBackend`]), gives its host side 172.30.N.1/24 (the guest is
//! 172.30.N.2, N the first /24 no interface uses yet), brings it up and enables IPv4
//! forwarding. When iptables or nft is installed, the guest subnet is masqueraded
//! behind the host's other interfaces, and the rules are removed when the VM ends
//! (rules a killed VMM left behind are removed by the next one). Without them the
//! guest still reaches the host itself, and whatever routes 172.30.N.0/24 back.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::io::{AsRawFd, RawFd};
use std::process::{Command, Stdio};

use kindling_proto::cmdline::NetParams;
use kindling_vmm::devices::virtio::net::tap::{IfReq, TapBackend};
use kindling_vmm::devices::virtio::net::Backend;

use super::host::{self, same_subnet};
use super::NetSetupError;
use crate::util::which;

/// The guest subnets are 172.30.N.0/24.
const SUBNET_BASE: [u8; 2] = [172, 30];
/// The prefix length of a guest subnet.
pub const SUBNET_PREFIX: u8 = 24;

/// Whether TAP can work here, for `--net auto`: Err says why not.
pub fn usable() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    OpenOptions::new().read(true).write(true).open("/dev/net/tun").map(drop).map_err(|e| format!("/dev/net/tun: {e}"))
}

/// NAT rules added for the guest subnet, removed on drop.
#[derive(Debug)]
enum Nat {
    Iptables { rules: Vec<Vec<String>> },
    Nft { table: String },
}

impl Nat {
    fn comment() -> String {
        format!("kindling-{}", std::process::id())
    }

    /// Adds masquerading and forwarding rules with whichever tool exists.
    fn setup(tap: &str, subnet: &str) -> Result<Option<Self>, String> {
        if let Some(iptables) = which("iptables") {
            remove_stale_iptables(&iptables);
            let c = Self::comment();
            let spec = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
            let rules = vec![
                spec(&format!("-t nat POSTROUTING -s {subnet} ! -o {tap} -m comment --comment {c} -j MASQUERADE")),
                spec(&format!("FORWARD -i {tap} -m comment --comment {c} -j ACCEPT")),
                spec(&format!(
                    "FORWARD -o {tap} -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment {c} -j ACCEPT"
                )),
            ];
            let mut nat = Nat::Iptables { rules: Vec::new() };
            for rule in rules {
                let (table, rest) = split_table(&rule);
                let op = if rest[0] == "POSTROUTING" { "-A" } else { "-I" };
                let mut args: Vec<String> = table.to_vec();
                args.push(op.into());
                args.extend(rest.iter().cloned());
                run(&iptables, &args)?;
                if let Nat::Iptables { rules } = &mut nat {
                    rules.push(rule);
                }
            }
            return Ok(Some(nat));
        }
        if let Some(nft) = which("nft") {
            remove_stale_nft(&nft);
            let table = format!("kindling_{}", std::process::id());
            let script = format!(
                "table ip {table} {{\n\
                 chain postrouting {{ type nat hook postrouting priority 100; policy accept; ip saddr {subnet} oifname != \"{tap}\" masquerade; }}\n\
                 chain forward {{ type filter hook forward priority 0; policy accept; iifname \"{tap}\" accept; oifname \"{tap}\" ct state related,established accept; }}\n\
                 }}\n"
            );
            run_stdin(&nft, &["-f", "-"], &script)?;
            return Ok(Some(Nat::Nft { table }));
        }
        Ok(None)
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        // A VMM that dropped root, or runs under its seccomp filter (no exec), cannot run
        // iptables or nft: the next `--net tap` removes the rules of a VMM that is gone.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || crate::sandbox::installed() {
            tracing::info!("NAT rules for the tap are left for the next `kindling boot --net tap` to remove");
            return;
        }
        match self {
            Nat::Iptables { rules } => {
                let Some(iptables) = which("iptables") else { return };
                for rule in rules.iter().rev() {
                    let (table, rest) = split_table(rule);
                    let mut args: Vec<String> = table.to_vec();
                    args.push("-D".into());
                    args.extend(rest.iter().cloned());
                    if let Err(e) = run(&iptables, &args) {
                        tracing::warn!("removing NAT rule: {e}");
                    }
                }
            }
            Nat::Nft { table } => {
                if let Some(nft) = which("nft") {
                    if let Err(e) = run(&nft, &["delete".into(), "table".into(), "ip".into(), table.clone()]) {
                        tracing::warn!("removing NAT table: {e}");
                    }
                }
            }
        }
    }
}

/// Splits a leading `-t TABLE` off an iptables rule.
fn split_table(rule: &[String]) -> (&[String], &[String]) {
    if rule.first().map(String::as_str) == Some("-t") && rule.len() > 2 {
        rule.split_at(2)
    } else {
        rule.split_at(0)
    }
}

fn run(prog: &std::path::Path, args: &[String]) -> Result<(), String> {
    let out =
        Command::new(prog).args(args).stdin(Stdio::null()).output().map_err(|e| format!("{}: {e}", prog.display()))?;
    if !out.status.success() {
        return Err(format!("{} {}: {}", prog.display(), args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

fn run_stdin(prog: &std::path::Path, args: &[&str], input: &str) -> Result<(), String> {
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", prog.display()))?;
    let _ = child.stdin.take().expect("piped").write_all(input.as_bytes());
    let out = child.wait_with_output().map_err(|e| format!("{}: {e}", prog.display()))?;
    if !out.status.success() {
        return Err(format!("{} {}: {}", prog.display(), args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes iptables rules tagged `kindling-<pid>` whose VMM is gone.
fn remove_stale_iptables(iptables: &std::path::Path) {
    for (table, chain) in [("nat", "POSTROUTING"), ("filter", "FORWARD")] {
        let Ok(out) = Command::new(iptables).args(["-t", table, "-S", chain]).output() else { continue };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
            let Some(pid) = words.iter().find_map(|w| w.strip_prefix("kindling-")?.parse::<u32>().ok()) else {
                continue;
            };
            if pid_alive(pid) || words.first().map(String::as_str) != Some("-A") {
                continue;
            }
            let mut args = vec!["-t".to_string(), table.to_string(), "-D".to_string()];
            args.extend(words[1..].iter().cloned());
            if run(iptables, &args).is_ok() {
                tracing::info!("removed a NAT rule left by kindling process {pid}");
            }
        }
    }
}

/// Deletes nft tables `kindling_<pid>` whose VMM is gone.
fn remove_stale_nft(nft: &std::path::Path) {
    let Ok(out) = Command::new(nft).args(["list", "tables", "ip"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.trim().strip_prefix("table ip ") else { continue };
        let Some(pid) = name.strip_prefix("kindling_").and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !pid_alive(pid) && run(nft, &["delete".into(), "table".into(), "ip".into(), name.to_string()]).is_ok() {
            tracing::info!("removed the NAT table left by kindling process {pid}");
        }
    }
}

/// A tap device with its host address and NAT rules; removes the rules when dropped
/// (the device goes with the VMM's descriptor).
pub struct Tap {
    backend: TapBackend,
    host_addr: Ipv4Addr,
    nat: Option<Nat>,
}

impl Tap {
    /// Creates and configures the tap device; returns it with the guest's addressing
    /// and a sentence describing what was set up.
    /// `host_loopback` matters inside the emulated runner's level-1 VM, whose gateway
    /// (QEMU's 10.0.2.2) is the user's host's loopback: blocked for the guest unless
    /// asked for. On a host, the guest's packets to 127.0.0.0/8 never reach loopback.
    pub fn setup(host_loopback: bool) -> Result<(Self, NetParams, String), NetSetupError> {
        let pid = std::process::id();
        let mut attempt = 0;
        let backend = loop {
            let name = if attempt == 0 { format!("kl-{pid}") } else { format!("kl-{pid}-{attempt}") };
            match TapBackend::open(&name) {
                Ok(b) => break b,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 15 => attempt += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::PermissionDenied => {
                    return Err(NetSetupError::TunOpen(e))
                }
                Err(err) => return Err(NetSetupError::TapCreate { name, err }),
            }
        };
        let name = backend.name().to_string();
        let host_addr = assign_subnet(&name)?;
        let o = host_addr.octets();
        let guest = NetParams {
            ip: Ipv4Addr::new(o[0], o[1], o[2], 2),
            prefix: SUBNET_PREFIX,
            gateway: host_addr,
            dns: host::routable_nameserver(),
        };
        let subnet = format!("{}.{}.{}.0/{SUBNET_PREFIX}", o[0], o[1], o[2]);
        let mut notes = Vec::new();
        if crate::util::inside_l1() && !host_loopback {
            super::l1::block_host_loopback(&subnet)?;
            notes.push("the host's loopback (10.0.2.2) is blocked for the guest".to_string());
        }
        match std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").map(|s| s.trim() == "1") {
            Ok(true) => {}
            _ => match std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
                Ok(()) => notes.push("enabled net.ipv4.ip_forward".to_string()),
                Err(e) => notes.push(format!("could not enable net.ipv4.ip_forward ({e})")),
            },
        }
        let nat = match Nat::setup(&name, &subnet) {
            Ok(Some(nat)) => {
                notes.push(match &nat {
                    Nat::Iptables { .. } => format!("NAT: iptables MASQUERADE for {subnet}"),
                    Nat::Nft { table } => format!("NAT: nft table {table} masquerades {subnet}"),
                });
                Some(nat)
            }
            Ok(None) => {
                notes.push(format!(
                    "no NAT: neither iptables nor nft is installed; the guest reaches this host ({host_addr}) and what routes {subnet} back"
                ));
                None
            }
            Err(e) => {
                notes.push(format!("no NAT: {e}"));
                None
            }
        };
        if guest.dns.is_none() {
            notes.push("no DNS server for the guest: /etc/resolv.conf names none reachable from it".into());
        }
        let summary = format!("tap {name}, host {host_addr}/{SUBNET_PREFIX}, guest {}; {}", guest.ip, notes.join("; "));
        Ok((Tap { backend, host_addr, nat }, guest, summary))
    }

    /// The tap's interface name.
    pub fn name(&self) -> &str {
        self.backend.name()
    }
}

/// The tap's own MAC address for subnet N: locally administered, unicast.
fn host_mac(n: u8) -> [u8; 6] {
    [0x06, 0x6b, 0x6c, 0x67, n, 0x01]
}

/// Gives the tap 172.30.N.1/24 for the first N that no other interface is in, and
/// brings it up. The first VM on a host always gets 172.30.0.0/24, so a node's address
/// stays the same from boot to boot. Two VMMs racing for one N both see the clash after
/// assigning, and move on.
fn assign_subnet(name: &str) -> Result<Ipv4Addr, NetSetupError> {
    let cfg = |what: &'static str| {
        let name = name.to_string();
        move |err| NetSetupError::TapConfig { name, what, err }
    };
    // SAFETY: a plain socket(2) call; the fd is owned by `sock` right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(cfg("socket")(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh fd nobody else owns.
    let sock: std::os::fd::OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
    let fd = sock.as_raw_fd();
    for n in 0..=255u8 {
        let host_addr = Ipv4Addr::new(SUBNET_BASE[0], SUBNET_BASE[1], n, 1);
        let taken = |addrs: &[host::IfAddr]| {
            addrs.iter().any(|a| a.iface != name && same_subnet(a.addr, host_addr, a.prefix.min(SUBNET_PREFIX)))
        };
        if taken(&host::ipv4_addresses()) {
            continue;
        }
        IfReq::with_addr(name, host_addr).ioctl(fd, libc::SIOCSIFADDR).map_err(cfg("SIOCSIFADDR"))?;
        let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(SUBNET_PREFIX)));
        IfReq::with_addr(name, mask).ioctl(fd, libc::SIOCSIFNETMASK).map_err(cfg("SIOCSIFNETMASK"))?;
        if taken(&host::ipv4_addresses()) {
            continue;
        }
        // The host side's MAC address follows from the subnet, as its IP address does:
        // a guest restored from a snapshot finds its gateway where its ARP cache says,
        // instead of waiting some 30 s for the entry to go stale.
        IfReq::with_hwaddr(name, host_mac(n)).ioctl(fd, libc::SIOCSIFHWADDR).map_err(cfg("SIOCSIFHWADDR"))?;
        let mut flags = IfReq::new(name);
        flags.ioctl(fd, libc::SIOCGIFFLAGS).map_err(cfg("SIOCGIFFLAGS"))?;
        let up = flags.short() | libc::IFF_UP as libc::c_short;
        IfReq::with_short(name, up).ioctl(fd, libc::SIOCSIFFLAGS).map_err(cfg("SIOCSIFFLAGS"))?;
        return Ok(host_addr);
    }
    Err(NetSetupError::NoSubnet)
}

impl Backend for Tap {
    fn fd(&self) -> RawFd {
        self.backend.fd()
    }
    fn offload_features(&self) -> u64 {
        self.backend.offload_features()
    }
    fn set_features(&mut self, acked: u64) {
        self.backend.set_features(acked)
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.backend.recv(buf)
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        self.backend.send(frame)
    }
    fn describe(&self) -> String {
        format!("tap {} ({})", self.backend.name(), self.host_addr)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // The NAT rules go first; the device itself disappears with our fd.
        self.nat.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cargo test -p kindling --lib -- --ignored tap_on_this_host` (as root).
    #[test]
    #[ignore = "needs root; adds a tap device and, with iptables or nft, NAT rules to this host (removed at the end)"]
    fn tap_on_this_host() {
        let (tap, guest, summary) = Tap::setup(false).unwrap();
        eprintln!("{summary}");
        let name = tap.name().to_string();
        assert!(host::ipv4_addresses().iter().any(|a| a.iface == name && a.addr == guest.gateway && a.prefix == 24));
        assert_eq!(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap().trim(), "1");
        let tag = format!("kindling-{}", std::process::id());
        let rules = || {
            let nat = Command::new("iptables")
                .args(["-t", "nat", "-S", "POSTROUTING"])
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default();
            let fwd = Command::new("iptables").args(["-S", "FORWARD"]).output().map(|o| o.stdout).unwrap_or_default();
            String::from_utf8_lossy(&[nat, fwd].concat()).lines().filter(|l| l.contains(&tag)).count()
        };
        if which("iptables").is_some() {
            assert!(summary.contains("iptables MASQUERADE"), "{summary}");
            assert_eq!(rules(), 3);
        }
        drop(tap);
        assert!(!host::ipv4_addresses().iter().any(|a| a.iface == name), "the tap is gone");
        if which("iptables").is_some() {
            assert_eq!(rules(), 0, "the NAT rules are gone");
        }
    }

    #[test]
    fn iptables_tables_split_off() {
        let r: Vec<String> = ["-t", "nat", "POSTROUTING", "-j", "MASQUERADE"].map(String::from).to_vec();
        assert_eq!(split_table(&r).1[0], "POSTROUTING");
        let r: Vec<String> = ["FORWARD", "-j", "ACCEPT"].map(String::from).to_vec();
        assert_eq!(split_table(&r).0.len(), 0);
    }
}
