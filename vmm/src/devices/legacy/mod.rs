//! Legacy PC devices: 8250 UART (console), i8042 (keyboard controller: reset line and
//! Ctrl-Alt-Del), ACPI power management.

pub mod acpi_pm;
pub mod i8042;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// A vm-superio interrupt line backed by an eventfd registered as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl vm_superio::Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
