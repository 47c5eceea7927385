//! COM1 (0x3f8, IRQ 4): the guest console, vm-superio's 8250 UART.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::IrqTrigger;
use crate::devices::bus::BusDevice;

/// COM1's base I/O port.
pub const COM1_PORT: u64 = 0x3f8;
/// Number of UART registers (I/O ports).
pub const COM_PORT_LEN: u64 = 8;

/// The UART's state in a snapshot (vm-superio's `SerialState`, which has no serde
/// support): DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR, and the receive FIFO.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// The registers, in the order above.
    pub registers: [u8; 9],
    /// Received bytes the guest has not read.
    pub in_buffer: Vec<u8>,
}

/// The guest console: an 8250 UART whose output goes to a host writer and whose input the host queues.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    /// A UART that interrupts through `irq` and writes guest output to `out`.
    pub fn new(irq: IrqTrigger, out: Box<dyn Write + Send>) -> Self {
        Self { uart: Serial::new(irq, out) }
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in a snapshot's `state`, interrupting through `irq`, writing to `out`.
    pub fn restore(state: &SerialSnapshot, irq: IrqTrigger, out: Box<dyn Write + Send>) -> Result<Self, String> {
        let r = state.registers;
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: state.in_buffer.clone(),
        };
        Serial::from_state(&s, irq, NoEvents, out)
            .map(|uart| Self { uart })
            .map_err(|e| format!("the serial port: {e:?}"))
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.uart.fifo_capacity());
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, v) {
                // The host side of the console went away (e.g. a closed pipe): the guest
                // keeps running, its output is dropped.
                tracing::debug!("serial output: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn the_uart_state_round_trips_with_its_pending_input() {
        let irq = || IrqTrigger(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut a = SerialConsole::new(irq(), Box::new(std::io::sink()));
        a.write(3, &[0x03]); // LCR: 8 bits
        a.write(1, &[0x01]); // IER: received data interrupt
        a.enqueue_input(b"typed");
        let state = a.state();
        let json = serde_json::to_string(&state).unwrap();
        let mut b =
            SerialConsole::restore(&serde_json::from_str(&json).unwrap(), irq(), Box::new(std::io::sink())).unwrap();
        assert_eq!(b.state(), state);
        let mut byte = [0u8];
        b.read(0, &mut byte);
        assert_eq!(byte[0], b't', "the guest reads the input it had not read yet");
        let mut hostile = state;
        hostile.in_buffer = vec![0; 1 << 20];
        assert!(SerialConsole::restore(&hostile, irq(), Box::new(std::io::sink())).is_err(), "a FIFO over its size");
    }
}
