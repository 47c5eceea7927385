//! kindling's virtual machine monitor, as a library: it turns a validated
//! [`config::VmConfig`] and the host resources it names (disk files, a vsock socket
//! path, an open network backend) into a running KVM microVM.
//!
//! Layers, bottom up (one module each, so a line's layer is in its path):
//! - [`arch`]: x86_64 guest ABI — memory layout, boot protocol (kernel loading, boot
//!   parameters), CPU registers and CPUID, ACPI tables.
//! - [`vstate`]: KVM objects — the VM (memory slots, irqchip, PIT) and vCPU threads.
//! - [`devices`]: emulated hardware — I/O buses, legacy devices (8250 serial, i8042,
//!   ACPI power management) and virtio-mmio devices (block, net, vsock).
//! - [`config`]: what a VM is made of, and its validation (one set of limits).
//! - [`builder`]: turns a validated config into a running microVM and drives its
//!   event loop until the guest powers off.
//!
//! Nothing here parses command lines, serves APIs or starts host programs: the
//! `kindling` binary does that and hands this crate ready resources (ARCHITECTURE.md).

pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod snapshot;
pub mod vstate;
