//! x86_64 guest ABI: where things live in guest memory and how the CPU starts.

pub mod acpi;
pub mod cpuid;
pub mod kernel;
pub mod layout;
pub mod regs;
