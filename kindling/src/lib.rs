//! kindling: the `kindling` binary's library — everything above the VMM.
//!
//! - [`cli`]: the command line.
//! - [`runner`]: where a microVM runs: on this host's KVM, or inside the emulated
//!   runner's level-1 VM when hardware virtualization is not usable.
//! - [`hostnet`]: the host side of a guest's network (tap devices, NAT, passt).
//! - [`forward`]: host TCP ports forwarded to guest ports over vsock.
//! - [`daemon`]: `kindling daemon`, the provisioner's REST API, and its client.
//! - [`cluster`]: Kubernetes clusters on the daemon's VMs (`kindling start` and co.).
//! - [`images`], [`cache`]: the guest kernel and root disk, built from images/ and
//!   cached by a hash of their inputs.
//! - [`bench`]: `kindling bench`.
//! - [`logfile`]: the size-capped console log of a VM process.
//! - [`archive`]: newc cpio archives (initramfs, seed disks).
//! - [`util`]: small helpers shared by the above.
//!
//! The VMM itself is the `kindling-vmm` crate, and the contracts with the guest agent
//! and the daemon's clients are in `kindling-proto`; see ARCHITECTURE.md.

pub mod archive;
pub mod bench;
pub mod cache;
pub mod cli;
pub mod cluster;
pub mod daemon;
pub mod forward;
pub mod hostnet;
pub mod images;
pub mod logfile;
pub mod privileges;
pub mod runner;
pub mod sandbox;
pub mod util;
