//! The `kindling` command line.

pub mod boot;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "kindling", version, about = "KVM microVM provisioner: a Kubernetes node in a microVM", propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot one microVM in the foreground: its serial console on stdout, exit 0 when the
    /// guest powers off or reboots.
    Boot(boot::BootArgs),
    /// Boot-time benchmark: kindling vs QEMU's microvm booting the same kernel and
    /// initrd on the same KVM (both inside the level-1 VM under the emulated runner).
    Bench(crate::bench::BenchArgs),
    /// (internal) Inside the emulated runner's level-1 VM: run the boot it was given.
    #[command(name = "__l1-guest", hide = true)]
    L1Guest,
}
