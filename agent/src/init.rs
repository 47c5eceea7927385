//! PID 1 duties: filesystems, hostname, network, sysctls, signals, power-off.
//!
//! Ctrl-Alt-Del is how `kindling boot` asks the node to stop (on SIGTERM it types it on
//! the VM's keyboard). The agent turns the kernel's immediate Ctrl-Alt-Del reboot off at
//! start, so the kernel sends init SIGINT instead, and SIGINT is an orderly shutdown
//! like SIGTERM (ending in a reboot, which ends the VM just as a power-off does).
//!
//! The agent also runs as the init of a container on a host (fresh mount, UTS, IPC,
//! network and PID namespaces; the `container` environment variable set, as systemd
//! expects of container managers), which is how its bring-up is tested at native speed.
//! There it leaves alone what is shared with the host: the kernel-wide sysctls, the
//! cgroup hierarchy, the root file system's read-only state at power-off and the power
//! itself.

use std::time::Duration;

use anyhow::{Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::node::NodeConfig;
use crate::phase;

/// True when the agent is the init of a container rather than of a VM.
pub fn in_container() -> bool {
    std::env::var_os("container").is_some()
}

/// The kernel command line, or in a container the `KINDLING_CMDLINE` variable (the
/// host's /proc/cmdline is not ours).
pub fn cmdline() -> String {
    match std::env::var("KINDLING_CMDLINE") {
        Ok(c) if in_container() => c,
        _ => std::fs::read_to_string("/proc/cmdline").unwrap_or_default(),
    }
}

/// Raises the open-file limit to the kernel's maximum: the agent listens on thousands
/// of vsock ports, and containerd and kubelet (which inherit it) expect a high limit
/// as under systemd.
pub fn raise_fd_limit() {
    let max =
        std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1 << 20);
    if let Err(e) = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, max, max) {
        phase::log(format!("raising the open-file limit to {max}: {e}"));
    }
}

/// Mounts the API filesystems and the writable runtime directories.
pub fn mount_filesystems() -> Result<()> {
    let m = |src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>| -> Result<()> {
        std::fs::create_dir_all(target).ok();
        match mount(Some(src), target, Some(fstype), flags, data) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EBUSY) => Ok(()), // already mounted (e.g. devtmpfs automount)
            Err(e) => Err(e).with_context(|| format!("mounting {fstype} on {target}")),
        }
    };
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    m("proc", "/proc", "proc", nosuid, None)?;
    m("sysfs", "/sys", "sysfs", nosuid, None)?;
    m("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    m("devpts", "/dev/pts", "devpts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("gid=5,mode=620,ptmxmode=666"))?;
    m("tmpfs", "/dev/shm", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, None)?;
    if !in_container() {
        m("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, Some("nsdelegate"))?;
    }
    m("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
    m("tmpfs", "/tmp", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"))?;
    // The root disk was mounted by the kernel; make sure it is writable. (A container's
    // root is writable already and need not be a mount point.)
    if !in_container() {
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REMOUNT, None::<&str>).context("remounting / read-write")?;
    }
    // Pods get their own mount propagation, as under systemd.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_SHARED | MsFlags::MS_REC, None::<&str>).ok();
    // Delegate every cgroup v2 controller to child cgroups (kubelet, containerd).
    if in_container() {
        return Ok(());
    }
    if let Ok(controllers) = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers") {
        let enable: Vec<String> = controllers.split_whitespace().map(|c| format!("+{c}")).collect();
        std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", enable.join(" ")).ok();
    }
    Ok(())
}

/// Kernel settings Kubernetes networking expects. In a container only the network
/// namespace's own (`net/`) settings are ours to change.
pub fn sysctls() {
    let container = in_container();
    for (key, value) in [
        ("net/ipv4/ip_forward", "1"),
        ("net/bridge/bridge-nf-call-iptables", "1"),
        ("net/bridge/bridge-nf-call-ip6tables", "1"),
        ("net/ipv4/conf/all/route_localnet", "1"),
        ("vm/overcommit_memory", "1"),
        ("kernel/panic_on_oops", "1"),
        ("kernel/panic", "10"),
        ("fs/inotify/max_user_instances", "8192"),
        ("fs/inotify/max_user_watches", "524288"),
    ] {
        if container && !key.starts_with("net/") {
            continue;
        }
        if let Err(e) = std::fs::write(format!("/proc/sys/{key}"), value) {
            phase::log(format!("sysctl {key}={value}: {e}"));
        }
    }
}

/// Hostname, /etc/hosts and resolv.conf, loopback, and the node address: on eth0 when
/// the VM has a NIC, otherwise on lo so the components still have a stable address.
pub fn network(cfg: &NodeConfig) -> Result<()> {
    nix::unistd::sethostname(&cfg.hostname).context("setting the hostname")?;
    std::fs::write("/etc/hostname", format!("{}\n", cfg.hostname)).ok();
    std::fs::write("/etc/hosts", format!("127.0.0.1 localhost\n{} {}\n", cfg.address(), cfg.hostname)).ok();
    std::fs::write("/etc/resolv.conf", format!("nameserver {}\n", cfg.dns)).ok();
    let ip = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("ip").args(args).output().context("running ip (iproute2)")?;
        anyhow::ensure!(
            out.status.success() || String::from_utf8_lossy(&out.stderr).contains("File exists"),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    };
    ip(&["link", "set", "lo", "up"])?;
    if std::path::Path::new("/sys/class/net/eth0").exists() {
        ip(&["addr", "add", &cfg.ip, "dev", "eth0"])?;
        ip(&["link", "set", "eth0", "up"])?;
        if let Some(gw) = &cfg.gateway {
            ip(&["route", "add", "default", "via", gw])?;
        }
    } else {
        let host = format!("{}/32", cfg.address());
        ip(&["addr", "add", &host, "dev", "lo"])?;
        phase::log(format!("no network device: node address {} lives on lo", cfg.address()));
    }
    Ok(())
}

/// Signals PID 1 acts on, each an orderly shutdown: SIGTERM/SIGUSR2/SIGPWR power off,
/// SIGINT (Ctrl-Alt-Del, see [`disable_ctrl_alt_del`]) reboots. Blocked here and taken
/// with sigwait; call this before anything else.
pub fn power_signals() -> Result<nix::sys::signal::SigSet> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGUSR2, Signal::SIGPWR, Signal::SIGINT] {
        set.add(s);
    }
    set.thread_block().context("blocking power signals")?;
    Ok(set)
}

/// Turns the kernel's Ctrl-Alt-Del reboot off (reboot(LINUX_REBOOT_CMD_CAD_OFF)): the
/// kernel then signals init with SIGINT, which [`power_signals`] blocked for sigwait,
/// instead of rebooting at once with unwritten data lost. Not in a container, where the
/// setting is the host's (and the call is refused).
pub fn disable_ctrl_alt_del() {
    if in_container() {
        return;
    }
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        phase::log(format!("turning the Ctrl-Alt-Del reboot off: {e}; Ctrl-Alt-Del will reboot without a shutdown"));
    }
}

/// Final step of an orderly shutdown: sync, unmount, power off (or reboot).
pub fn power_off(reboot: bool) -> ! {
    phase::log(if reboot { "rebooting" } else { "powering off" });
    nix::unistd::sync();
    for target in ["/tmp", "/run", "/dev/shm", "/dev/pts", "/sys/fs/cgroup"] {
        let _ = umount2(target, MntFlags::MNT_DETACH);
    }
    if in_container() {
        // The root may be a host file system, and power is the host's: just end.
        std::process::exit(0);
    }
    let _ = mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, None::<&str>);
    nix::unistd::sync();
    std::thread::sleep(Duration::from_millis(100));
    let how =
        if reboot { nix::sys::reboot::RebootMode::RB_AUTOBOOT } else { nix::sys::reboot::RebootMode::RB_POWER_OFF };
    let _ = nix::sys::reboot::reboot(how);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The root disk.
const ROOT_DEVICE: &str = "/dev/vda";

/// Grows the root filesystem online to fill its disk when the disk has grown (`kindling
/// start --disk-size` grows only the disk file: the host runs no filesystem tools on a
/// disk the guest wrote). Runs `resize2fs` only when the disk is more than 5% larger
/// than the filesystem, so a booted node does not pay for it again.
pub fn grow_root_filesystem(reaper: &crate::supervisor::Reaper) {
    if in_container() {
        return;
    }
    let disk = std::fs::read_to_string("/sys/block/vda/size")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|sectors| sectors * 512);
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    let fs = nix::sys::statvfs::statvfs("/").ok().map(|st| st.blocks() as u64 * st.fragment_size() as u64);
    let (Some(disk), Some(fs)) = (disk, fs) else { return };
    if disk <= fs + fs / 20 {
        return;
    }
    let t = std::time::Instant::now();
    match reaper.run(&["resize2fs", ROOT_DEVICE]) {
        Ok((0, _)) => {
            phase::log(format!("grew / from {} to {} MiB in {:.1}s", fs >> 20, disk >> 20, t.elapsed().as_secs_f64()))
        }
        Ok((code, out)) => phase::log(format!("resize2fs {ROOT_DEVICE} failed (exit {code}): {}", out.trim())),
        Err(e) => phase::log(format!("resize2fs {ROOT_DEVICE}: {e}")),
    }
}
