//! KVM state: the VM file descriptor (memory, irqchip, PIT) and vCPU threads.

pub mod vcpu;
pub mod vm;
