//! ACPI fixed hardware (see arch::acpi's FADT): the PM1a event block (status, never
//! set, and enable, a plain register the guest can read back), the PM1a control block (SCI_EN always set; SLP_TYP=S5 with
//! SLP_EN powers the VM off) and the reset register.

use std::sync::Arc;

use crate::arch::{acpi, layout};
use crate::devices::bus::BusDevice;
use crate::devices::{ExitReason, ExitSignal};

/// Covers PM1a_EVT (4 bytes), PM1a_CNT (2 bytes, at +4) and the reset register (+8).
pub const ACPI_PM_PORT: u64 = layout::ACPI_PM1A_EVT_PORT as u64;
/// Length of that port range, through the reset register.
pub const ACPI_PM_LEN: u64 = (layout::ACPI_RESET_PORT - layout::ACPI_PM1A_EVT_PORT) as u64 + 1;
const CNT_OFFSET: u64 = (layout::ACPI_PM1A_CNT_PORT - layout::ACPI_PM1A_EVT_PORT) as u64;
const RESET_OFFSET: u64 = (layout::ACPI_RESET_PORT - layout::ACPI_PM1A_EVT_PORT) as u64;

const EN_OFFSET: u64 = 2;

/// The ACPI PM device's state in a snapshot (the status and control registers read
/// constants).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AcpiPmState {
    /// PM1 enable.
    pub pm1_enable: u16,
}

/// The ACPI PM1a event and control blocks and the reset register, on port I/O.
pub struct AcpiPm {
    exit: Arc<ExitSignal>,
    pm1_enable: u16,
}

impl AcpiPm {
    /// A device that reports power-off and reset through `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit, pm1_enable: 0 }
    }

    /// The one register with state (PM1 enable), for a snapshot.
    pub fn state(&self) -> AcpiPmState {
        AcpiPmState { pm1_enable: self.pm1_enable }
    }

    /// Puts a snapshot's state back.
    pub fn restore(&mut self, s: &AcpiPmState) {
        self.pm1_enable = s.pm1_enable;
    }
}

fn put_u16(data: &mut [u8], value: u16) {
    let n = data.len().min(2);
    data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            EN_OFFSET => put_u16(data, self.pm1_enable),
            CNT_OFFSET => put_u16(data, acpi::PM1_CNT_SCI_EN),
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            // ACPICA enables fixed events (e.g. the global lock) and reads the bits back.
            EN_OFFSET if data.len() >= 2 => self.pm1_enable = u16::from_le_bytes([data[0], data[1]]),
            CNT_OFFSET if data.len() >= 2 => {
                let value = u16::from_le_bytes([data[0], data[1]]);
                let sleep_type = (value >> acpi::PM1_CNT_SLP_TYP_SHIFT) & 0x7;
                if value & acpi::PM1_CNT_SLP_EN != 0 && sleep_type == acpi::S5_SLEEP_TYPE {
                    self.exit.request(ExitReason::PowerOff);
                }
            }
            RESET_OFFSET if data.first() == Some(&layout::ACPI_RESET_VALUE) => self.exit.request(ExitReason::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cnt(v: u16) -> [u8; 2] {
        v.to_le_bytes()
    }

    #[test]
    fn s5_powers_off_and_reset_resets() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = AcpiPm::new(exit.clone());
        let mut b = [0u8; 2];
        pm.read(CNT_OFFSET, &mut b);
        assert_eq!(u16::from_le_bytes(b) & acpi::PM1_CNT_SCI_EN, 1, "always in ACPI mode");
        pm.write(EN_OFFSET, &[0x20, 0x01]);
        pm.read(EN_OFFSET, &mut b);
        assert_eq!(b, [0x20, 0x01], "enable bits read back");
        pm.write(CNT_OFFSET, &cnt((1 << acpi::PM1_CNT_SLP_TYP_SHIFT) | acpi::PM1_CNT_SLP_EN)); // S1: ignored
        pm.write(CNT_OFFSET, &[0x34]); // short write: ignored
        assert_eq!(exit.reason(), ExitReason::Running);
        pm.write(CNT_OFFSET, &cnt((acpi::S5_SLEEP_TYPE << acpi::PM1_CNT_SLP_TYP_SHIFT) | acpi::PM1_CNT_SLP_EN));
        assert_eq!(exit.reason(), ExitReason::PowerOff);
        let exit = Arc::new(ExitSignal::new().unwrap());
        AcpiPm::new(exit.clone()).write(RESET_OFFSET, &[layout::ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), ExitReason::Reset);
    }

    #[test]
    fn the_enable_register_survives_a_snapshot() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(EN_OFFSET, &[0x20, 0x01]);
        let json = serde_json::to_string(&pm.state()).unwrap();
        let mut other = AcpiPm::new(exit);
        other.restore(&serde_json::from_str(&json).unwrap());
        let mut b = [0u8; 2];
        other.read(EN_OFFSET, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x120);
    }
}
