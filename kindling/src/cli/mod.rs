//! The `kindling` command line.

pub mod boot;
pub mod cluster;

use std::ffi::OsString;

use clap::{Args, FromArgMatches, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kindling",
    version,
    about = "KVM microVM provisioner: a Kubernetes node in a microVM",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses `argv` (program name first), exiting with clap's message on an error or
    /// for --help and --version. `kindling boot`, the VMM process of every VM, is parsed
    /// by its subcommand alone: building the whole command tree is most of the cost of
    /// parsing, about 60 ms of a VM's ~300 ms to its first instruction inside the
    /// emulated runner's level-1 VM. Help, version and errors take the full parser, so
    /// what the user sees is the same.
    pub fn parse_argv(argv: impl IntoIterator<Item = OsString>) -> Self {
        let argv: Vec<OsString> = argv.into_iter().collect();
        let wants_help = |a: &OsString| ["-h", "--help", "-V", "--version"].iter().any(|h| a == h);
        if argv.get(1).is_some_and(|a| a == "boot") && !argv[2..].iter().any(wants_help) {
            let boot = boot::BootArgs::augment_args(clap::Command::new("boot"));
            if let Ok(args) = boot.try_get_matches_from(&argv[1..]).and_then(|m| boot::BootArgs::from_arg_matches(&m)) {
                return Cli { command: Command::Boot(args) };
            }
        }
        Cli::parse_from(argv)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The cluster commands: start, status, list, stop, delete, logs, kubectl, exec, ip,
    /// image, service, kubeconfig, addons.
    #[command(flatten)]
    Cluster(cluster::ClusterCommand),
    /// Boot one microVM in the foreground: its serial console on stdout, exit 0 when the
    /// guest powers off or reboots.
    Boot(boot::BootArgs),
    /// Boot-time benchmark: kindling vs QEMU's microvm booting the same kernel and
    /// initrd on the same KVM (both inside the level-1 VM under the emulated runner).
    Bench(crate::bench::BenchArgs),
    /// Build the guest kernel and root disk (cached; only what changed is rebuilt).
    #[command(subcommand)]
    Images(ImagesCommand),
    /// Serve the provisioner API (create, start, stop, delete microVMs) on a UNIX
    /// socket, in the foreground; VMs keep running when it exits.
    Daemon(crate::daemon::DaemonArgs),
    /// (internal) Inside the emulated runner's level-1 VM: run the boot it was given.
    #[command(name = "__l1-guest", hide = true)]
    L1Guest,
}

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// Build the steps given (default: all): kernel, k8s, etcd, coredns, local-path-provisioner, oci, rootfs.
    Build { steps: Vec<String> },
    /// Print the path of a built step's artifact (e.g. `kernel` -> its bzImage).
    Path { step: String },
}

/// `kindling images ...`
pub fn images(cmd: &ImagesCommand) -> anyhow::Result<i32> {
    match cmd {
        ImagesCommand::Build { steps } => {
            let outputs = crate::images::build(steps)?;
            for (name, dir) in &outputs {
                let step = crate::images::STEPS.iter().find(|s| s.name == *name).expect("known step");
                let artifact = dir.join(step.artifact);
                let mib = crate::images::size_of(&artifact) as f64 / (1 << 20) as f64;
                println!("{name:<8} {} ({mib:.1} MiB)", artifact.display());
            }
            Ok(0)
        }
        ImagesCommand::Path { step } => {
            println!("{}", crate::images::artifact_path(step)?.display());
            Ok(0)
        }
    }
}
