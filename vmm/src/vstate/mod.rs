//! KVM state: the VM file descriptor (memory, irqchip, PIT), vCPU threads, and the
//! state of both that a snapshot saves.

pub mod state;
pub mod vcpu;
pub mod vm;
