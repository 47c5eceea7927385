//! kindling: a KVM microVM provisioner.
//!
//! Layers, bottom up (one module each, so a line's layer is in its path):
//! - [`arch`]: x86_64 guest ABI — memory layout, boot protocol (kernel loading, boot
//!   parameters), CPU registers and CPUID, ACPI tables.
//! - [`vstate`]: KVM objects — the VM (memory slots, irqchip, PIT) and vCPU threads.
//! - [`devices`]: emulated hardware — I/O buses, legacy devices (8250 serial, i8042,
//!   ACPI power management) and virtio-mmio devices (block, vsock).
//! - [`builder`]: turns a validated [`config::VmConfig`] into a running microVM and
//!   drives its event loop until the guest powers off.
//! - [`runner`]: where the microVM runs — directly on KVM, or inside the emulated
//!   runner's level-1 VM when hardware virtualization is not usable.
//! - [`forward`]: host TCP ports forwarded to guest ports over vsock.
//! - [`images`]: builds the guest kernel and root disk from the recipes in images/.
//! - [`daemon`]: `kindling daemon`, the provisioner's REST API, and its client.
//! - [`cluster`]: Kubernetes clusters on the daemon's VMs (`kindling start` and co.).
//! - [`cli`]: the `kindling` command line.

pub mod arch;
pub mod bench;
pub mod builder;
pub mod cache;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod devices;
pub mod forward;
pub mod images;
pub mod runner;
pub mod vstate;
