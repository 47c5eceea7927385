//! kindling-agent: the guest's PID 1. It mounts the system, configures the network,
//! generates the cluster PKI on first boot, starts and supervises containerd, etcd, the
//! Kubernetes control plane, kubelet, kube-proxy and CoreDNS, reports each phase on the
//! console, and shuts the node down in order when asked to power off.

mod addons;
mod control;
mod images;
mod init;
mod kube;
mod loadbalancer;
mod node;
mod paths;
mod phase;
mod pki;
mod ports;
mod seed;
mod selftest;
mod supervisor;

use node::NodeConfig;
use paths::Paths;

fn main() {
    if std::process::id() != 1 {
        eprintln!("kindling-agent runs as the VM's init (PID 1); boot the kindling root disk with `kindling boot`");
        std::process::exit(2);
    }
    // The kernel starts init without PATH; every component (and what it execs: runc,
    // the containerd shim, iptables, mount) looks its tools up there.
    std::env::set_var("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let signals = match init::power_signals() {
        Ok(s) => s,
        Err(e) => fatal(e),
    };
    // With SIGINT blocked above: from here Ctrl-Alt-Del (an orderly stop of
    // `kindling boot`) reaches us as SIGINT instead of rebooting the node on the spot.
    init::disable_ctrl_alt_del();
    if let Err(e) = init::mount_filesystems() {
        fatal(e);
    }
    // Reported once /proc is there to tell the time since kernel start.
    phase::report(phase::AGENT_START);
    init::sysctls();
    init::raise_fd_limit();
    let cfg = NodeConfig::from_cmdline(&init::cmdline());
    if let Err(e) = init::network(&cfg) {
        phase::log(format!("network setup: {e:#}"));
    }
    let reaper = supervisor::Reaper::start();
    {
        let reaper = reaper.clone();
        std::thread::spawn(move || init::grow_root_filesystem(&reaper));
    }
    let paths = Paths::new("/");
    let node = node::Node::default();
    let addons = addons::Addons::new(paths.clone(), reaper.clone(), addons::enabled_at_boot(cfg.addons.as_deref()));
    if let Err(e) = control::serve(paths.clone(), reaper.clone(), addons.clone(), init::in_container()) {
        phase::log(format!("control channel: {e:#}"));
    }
    if !init::in_container() {
        if let Err(e) = ports::parse(&cfg.expose).and_then(|p| ports::expose(&p, cfg.address())) {
            phase::log(format!("exposing ports on vsock: {e:#}"));
        }
    }
    {
        let (cfg, paths, reaper, node) = (cfg.clone(), paths.clone(), reaper.clone(), node.clone());
        std::thread::spawn(move || match node::bring_up(&cfg, &paths, reaper.clone(), &node, &addons) {
            Ok(node::BringUp::Complete) if cfg.selftest => {
                selftest::run(&paths, &reaper);
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(1), nix::sys::signal::Signal::SIGTERM);
            }
            Ok(node::BringUp::Complete) => {}
            Ok(node::BringUp::StoppedAfter(p)) => {
                phase::log(format!("bring-up stopped after {p}, as kindling.until asked"))
            }
            Err(e) => phase::log(format!("bring-up failed: {e:#}")),
        });
    }
    // Wait for a power request (SIGINT: Ctrl-Alt-Del); bring-up continues meanwhile.
    let reboot = matches!(signals.wait(), Ok(nix::sys::signal::Signal::SIGINT));
    phase::log("shutting down: kubelet, control plane, etcd, containerd");
    node.stop();
    init::power_off(reboot)
}

fn fatal(e: anyhow::Error) -> ! {
    phase::log(format!("fatal: {e:#}"));
    init::power_off(false)
}
