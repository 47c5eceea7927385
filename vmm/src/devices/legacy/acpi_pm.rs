//! ACPI hardware-reduced power management registers (see arch::acpi's FADT): the
//! sleep control register (S5 = power off), the sleep status register, and the reset
//! register.

use std::sync::Arc;

use crate::arch::{acpi, layout};
use crate::devices::bus::BusDevice;
use crate::devices::{ExitReason, ExitSignal};

/// Covers the sleep control, sleep status and reset ports.
pub const ACPI_PM_PORT: u64 = layout::ACPI_SLEEP_CONTROL_PORT as u64;
pub const ACPI_PM_LEN: u64 = 3;

pub struct AcpiPm {
    exit: Arc<ExitSignal>,
}

impl AcpiPm {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let port = ACPI_PM_PORT + offset;
        if port == u64::from(layout::ACPI_SLEEP_CONTROL_PORT)
            && value & acpi::SLEEP_CONTROL_SLP_EN != 0
            && (value >> 2) & 0x7 == acpi::S5_SLEEP_TYPE
        {
            self.exit.request(ExitReason::PowerOff);
        } else if port == u64::from(layout::ACPI_RESET_PORT) && value == layout::ACPI_RESET_VALUE {
            self.exit.request(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_resets() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(0, &[(1 << 2) | acpi::SLEEP_CONTROL_SLP_EN]); // S1: ignored
        assert_eq!(exit.reason(), ExitReason::Running);
        pm.write(0, &[(acpi::S5_SLEEP_TYPE << 2) | acpi::SLEEP_CONTROL_SLP_EN]);
        assert_eq!(exit.reason(), ExitReason::PowerOff);
        let exit = Arc::new(ExitSignal::new().unwrap());
        AcpiPm::new(exit.clone()).write(2, &[layout::ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), ExitReason::Reset);
    }
}
