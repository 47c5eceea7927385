//! i8042 keyboard controller (ports 0x60, 0x64): only its CPU-reset line matters to a
//! microVM; Linux pulses it (0xfe to port 0x64) to reboot.

use std::sync::Arc;

use vm_superio::I8042Device;

use crate::devices::bus::BusDevice;
use crate::devices::{ExitReason, ExitSignal};

/// The data port; the command/status port is 0x64.
pub const I8042_PORT: u64 = 0x60;
/// Ports 0x60 to 0x64.
pub const I8042_PORT_LEN: u64 = 5;

/// The i8042's CPU reset line: pulsing it requests [`ExitReason::Reset`].
pub struct ResetLine(pub Arc<ExitSignal>);

impl vm_superio::Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitReason::Reset);
        Ok(())
    }
}

/// The i8042 controller on its ports.
pub struct I8042(I8042Device<ResetLine>);

impl I8042 {
    /// A controller whose reset line requests a reset through `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self(I8042Device::new(ResetLine(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            let _ = self.0.write(offset as u8, v);
        }
    }
}
