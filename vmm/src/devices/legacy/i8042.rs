//! i8042 keyboard controller (ports 0x60 and 0x64, IRQ 1) with a PS/2 keyboard and no
//! auxiliary (mouse) port.
//!
//! Why a model of our own: vm-superio's `I8042Device` implements only the CPU reset
//! line, so every read returns 0 and Linux's probe waits out its timeouts (about 1.2 s
//! for "Can't read CTR"), and no maintained crate offers more. Firecracker's device
//! (not a library) emulates the controller just far enough for its guests; this one
//! follows the 8042's documented behaviour, as far as a guest with nothing but a
//! virtual keyboard can tell:
//!
//! - **Status register** (read 0x64): output buffer full, system flag, command/data
//!   (whether the last write went to 0x64), keyboard not inhibited. The input buffer
//!   is never busy: every write is handled at once.
//! - **Controller commands** (write 0x64): read and write the command byte (CTR) and
//!   the rest of the 32 bytes of internal RAM, controller self-test (0x55) and keyboard
//!   interface test (0x00), keyboard and aux port enable and disable (CTR bits), the
//!   output port (read and write; clearing bit 0 resets the CPU), writing the keyboard
//!   output buffer, and the pulse commands: 0xFE, the one Linux reboots with, pulses
//!   the reset line and requests [`ExitReason::Reset`]. There is no aux port: its
//!   interface test reports a stuck clock line, and the aux loopback answers on the
//!   keyboard side, so a driver probing for a mouse gives up at once instead of after
//!   a timeout (with our ACPI tables Linux does not even probe: they list no mouse).
//! - **The keyboard** (write 0x60 outside a command): ACKs what Linux's atkbd sends
//!   (reset with its self-test result, identify as an MF2 keyboard, scan code set 2,
//!   LEDs, typematic rate, enable and disable scanning, echo), resend otherwise.
//! - **Data port** (read 0x60): a 16-byte output queue. Controller replies go first,
//!   as the real controller holds the keyboard off while it answers; keyboard bytes
//!   follow in order. When the CTR's translation bit is set, keyboard bytes are
//!   translated from set 2 to set 1 on their way in, as the 8042 does (for the bytes
//!   this keyboard ever sends).
//! - **IRQ 1**, an irqfd edge, for each keyboard byte that reaches the head of the
//!   queue while the CTR enables the keyboard interrupt. Controller replies are polled
//!   by drivers and raise no interrupt.
//! - [`I8042::send_ctrl_alt_del`]: the host asks the guest to shut down the way
//!   Firecracker's SendCtrlAltDel does, by typing Ctrl-Alt-Del (presses, then
//!   releases). It is refused until the guest's driver has enabled the keyboard
//!   interface, its interrupt and scanning (Linux's atkbd enables scanning last), so
//!   the keys cannot be flushed away by a driver still probing.
//!
//! Everything the guest controls is bounded: the queue has a fixed capacity (a byte
//! that does not fit is dropped), RAM indices are masked to 32 bytes, and a command
//! waits for at most one parameter byte.

use std::collections::VecDeque;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::devices::{ExitReason, ExitSignal};

/// The data port; the command/status port is 0x64.
pub const I8042_PORT: u64 = 0x60;
/// Ports 0x60 to 0x64 (0x61 to 0x63 belong to other devices and read as 0xff here).
pub const I8042_PORT_LEN: u64 = 5;
/// The command/status port, 0x64.
pub const I8042_COMMAND_PORT: u64 = I8042_PORT + STATUS_OFFSET;
/// The keyboard's ISA interrupt line.
pub const I8042_KBD_IRQ: u32 = 1;

const DATA_OFFSET: u64 = 0;
const STATUS_OFFSET: u64 = 4;

/// Bytes the output queue holds (the 8042 has one output register; the keyboard
/// buffers the rest, which this models together).
pub const OUTPUT_CAPACITY: usize = 16;
const RAM_SIZE: usize = 32;

// Status register bits.
const STR_OBF: u8 = 0x01;
const STR_SYSFLAG: u8 = 0x04;
const STR_CMDDAT: u8 = 0x08;
const STR_KEYLOCK: u8 = 0x10; // set: keyboard not inhibited

// Command byte (CTR) bits.
const CTR_KBDINT: u8 = 0x01;
const CTR_SYSFLAG: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;
/// As firmware leaves it: keyboard interrupt on, self-test passed, aux off; no
/// translation, so the guest sees scan code set 2 (Linux keeps what it finds).
const CTR_INITIAL: u8 = CTR_KBDINT | CTR_SYSFLAG | CTR_AUXDIS;

// Controller commands (port 0x64).
const CMD_READ_RAM: u8 = 0x20; // 0x20-0x3f: RAM byte (0x20 is the CTR)
const CMD_WRITE_RAM: u8 = 0x60; // 0x60-0x7f
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTPUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_FIRST: u8 = 0xf0; // 0xf0-0xff: pulse the output port bits that are 0

const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_OK: u8 = 0x00;
/// Aux interface test result: clock line stuck high (nothing is connected).
const AUX_CLOCK_STUCK_HIGH: u8 = 0x02;
/// Output port bit 0: the CPU reset line (active low); bit 1: A20.
const OUTP_RESET_LINE: u8 = 0x01;
const OUTP_INITIAL: u8 = 0x03;

// Keyboard commands and replies.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_TYPEMATIC: u8 = 0xf3;
const KBD_ENABLE: u8 = 0xf4;
const KBD_DISABLE: u8 = 0xf5; // and set defaults
const KBD_DEFAULTS: u8 = 0xf6;
const KBD_RESEND: u8 = 0xfe;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_BAT_OK: u8 = 0xaa;
const KBD_ID: [u8; 2] = [0xab, 0x83]; // MF2 keyboard
const SCANCODE_SET_2: u8 = 2;

/// Set 2: press Ctrl, Alt, Delete (E0 71), then release them in reverse (F0 prefix).
const CTRL_ALT_DEL: [u8; 11] = [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14];
const SET2_EXTENDED: u8 = 0xe0;
const SET2_BREAK: u8 = 0xf0;

/// Set 2 to set 1, for the set 2 codes this keyboard sends (its ID's second byte and
/// Ctrl-Alt-Del's keys); other bytes (replies, prefixes) pass unchanged.
fn translate(code: u8) -> u8 {
    match code {
        0x14 => 0x1d, // left Ctrl
        0x11 => 0x38, // left Alt
        0x71 => 0x53, // Delete (after E0)
        0x83 => 0x41, // ID byte 2, as translating controllers report it
        other => other,
    }
}

/// Who put a byte into the output queue; only keyboard bytes raise IRQ 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Controller,
    Keyboard,
}

/// Why [`I8042::send_ctrl_alt_del`] could not type the keys.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CtrlAltDelError {
    /// The guest has not (yet) enabled its keyboard: no driver has enabled the
    /// keyboard interface, its interrupt and scanning. The request can be tried again.
    #[error("the guest has not enabled its keyboard (no i8042/atkbd driver yet, or it disabled the keyboard)")]
    KeyboardNotEnabled,
    /// The output queue has no room for the whole sequence (the guest is not reading).
    #[error("the keyboard's output buffer is full (the guest is not reading its keyboard)")]
    BufferFull,
}

/// The keyboard behind the controller's first port.
#[derive(Debug)]
struct Keyboard {
    /// A command byte waiting for its parameter (LEDs, typematic, scan code set).
    awaiting: Option<u8>,
    /// Scanning on (the power-on default; a reset and enable keep it on, disable
    /// stops it).
    scanning: bool,
    /// A driver enabled scanning since the last reset or disable: someone listens.
    enabled_by_guest: bool,
    /// The last byte sent, for the resend command.
    last_sent: u8,
}

/// The i8042's state in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    /// The status register.
    pub status: u8,
    /// The internal RAM (byte 0: the command byte).
    pub ram: Vec<u8>,
    /// The output port.
    pub outp: u8,
    /// A controller command waiting for its parameter.
    pub awaiting: Option<u8>,
    /// The output queue: (byte, from the keyboard).
    pub out: Vec<(u8, bool)>,
    /// What port 0x60 reads when the queue is empty.
    pub last_read: u8,
    /// Translation: a break prefix was seen.
    pub xlate_break: bool,
    /// The keyboard's command waiting for its parameter.
    pub kbd_awaiting: Option<u8>,
    /// The keyboard is scanning.
    pub kbd_scanning: bool,
    /// A driver enabled the keyboard.
    pub kbd_enabled_by_guest: bool,
    /// The keyboard's last byte sent.
    pub kbd_last_sent: u8,
}

/// The i8042 controller on its ports, with a keyboard.
pub struct I8042 {
    exit: Arc<ExitSignal>,
    irq: EventFd,
    status: u8,
    /// Internal RAM; byte 0 is the command byte (CTR).
    ram: [u8; RAM_SIZE],
    outp: u8,
    /// A controller command waiting for its parameter byte on port 0x60.
    awaiting: Option<u8>,
    out: VecDeque<(u8, Source)>,
    /// What port 0x60 reads when the queue is empty (the last byte read, as the
    /// output register keeps it).
    last_read: u8,
    /// Translation state: a set 2 break prefix was seen, the next code gets bit 7.
    xlate_break: bool,
    kbd: Keyboard,
}

impl I8042 {
    /// A controller whose reset line requests a reset through `exit` and whose
    /// keyboard interrupt writes `irq` (an eventfd registered as IRQ 1's irqfd).
    pub fn new(exit: Arc<ExitSignal>, irq: EventFd) -> Self {
        let mut ram = [0u8; RAM_SIZE];
        ram[0] = CTR_INITIAL;
        Self {
            exit,
            irq,
            status: STR_SYSFLAG | STR_KEYLOCK,
            ram,
            outp: OUTP_INITIAL,
            awaiting: None,
            out: VecDeque::with_capacity(OUTPUT_CAPACITY),
            last_read: 0,
            xlate_break: false,
            kbd: Keyboard { awaiting: None, scanning: true, enabled_by_guest: false, last_sent: 0 },
        }
    }

    /// The controller's and keyboard's registers and output queue, for a snapshot.
    pub fn state(&self) -> I8042State {
        I8042State {
            status: self.status,
            ram: self.ram.to_vec(),
            outp: self.outp,
            awaiting: self.awaiting,
            out: self.out.iter().map(|&(b, s)| (b, s == Source::Keyboard)).collect(),
            last_read: self.last_read,
            xlate_break: self.xlate_break,
            kbd_awaiting: self.kbd.awaiting,
            kbd_scanning: self.kbd.scanning,
            kbd_enabled_by_guest: self.kbd.enabled_by_guest,
            kbd_last_sent: self.kbd.last_sent,
        }
    }

    /// Puts a snapshot's state back. It comes from a file, so it is checked: the RAM
    /// has its size and the output queue at most its capacity. A keyboard byte at the
    /// head of the queue interrupts the guest again (the edge was lost with the old VM).
    pub fn restore(&mut self, s: &I8042State) -> Result<(), String> {
        let ram: [u8; RAM_SIZE] = s
            .ram
            .as_slice()
            .try_into()
            .map_err(|_| format!("the i8042's RAM has {} bytes, not {RAM_SIZE}", s.ram.len()))?;
        if s.out.len() > OUTPUT_CAPACITY {
            return Err(format!("the i8042's output queue has {} bytes, more than {OUTPUT_CAPACITY}", s.out.len()));
        }
        self.status = s.status;
        self.ram = ram;
        self.outp = s.outp;
        self.awaiting = s.awaiting;
        self.out = s.out.iter().map(|&(b, kbd)| (b, if kbd { Source::Keyboard } else { Source::Controller })).collect();
        self.last_read = s.last_read;
        self.xlate_break = s.xlate_break;
        self.kbd = Keyboard {
            awaiting: s.kbd_awaiting,
            scanning: s.kbd_scanning,
            enabled_by_guest: s.kbd_enabled_by_guest,
            last_sent: s.kbd_last_sent,
        };
        self.interrupt_if_keyboard_byte_ready();
        Ok(())
    }

    fn ctr(&self) -> u8 {
        self.ram[0]
    }

    /// Types Ctrl-Alt-Del (presses, then releases) and interrupts the guest, which
    /// Linux turns into a reboot, or into SIGINT for init when init disabled the
    /// Ctrl-Alt-Del reboot (as kindling's agent does). All or nothing.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), CtrlAltDelError> {
        let ctr = self.ctr();
        let listening = ctr & CTR_KBDINT != 0 && ctr & CTR_KBDDIS == 0 && self.kbd.enabled_by_guest;
        if !listening || !self.kbd.scanning {
            return Err(CtrlAltDelError::KeyboardNotEnabled);
        }
        if !self.keyboard_send(&CTRL_ALT_DEL) {
            return Err(CtrlAltDelError::BufferFull);
        }
        Ok(())
    }

    /// Whether the guest's driver has enabled the keyboard, so that
    /// [`send_ctrl_alt_del`](Self::send_ctrl_alt_del) can reach it.
    pub fn keyboard_enabled(&self) -> bool {
        let ctr = self.ctr();
        ctr & CTR_KBDINT != 0 && ctr & CTR_KBDDIS == 0 && self.kbd.enabled_by_guest && self.kbd.scanning
    }

    /// Queues bytes from the keyboard (translated when the CTR asks), all or none;
    /// interrupts the guest if they are now at the head of the queue.
    fn keyboard_send(&mut self, set2: &[u8]) -> bool {
        let translating = self.ctr() & CTR_XLATE != 0;
        let mut bytes = [0u8; OUTPUT_CAPACITY];
        let mut n = 0;
        let mut brk = self.xlate_break;
        for &b in set2 {
            let byte = if translating {
                if b == SET2_BREAK {
                    brk = true;
                    continue;
                }
                let t = translate(b);
                if b == SET2_EXTENDED {
                    t
                } else {
                    let t = if brk { t | 0x80 } else { t };
                    brk = false;
                    t
                }
            } else {
                b
            };
            if n == bytes.len() {
                return false;
            }
            bytes[n] = byte;
            n += 1;
        }
        if self.out.len() + n > OUTPUT_CAPACITY {
            return false;
        }
        self.xlate_break = brk;
        let was_empty = self.out.is_empty();
        for &b in &bytes[..n] {
            self.out.push_back((b, Source::Keyboard));
        }
        if let Some(&last) = set2.last() {
            self.kbd.last_sent = last;
        }
        self.status |= STR_OBF;
        if was_empty {
            self.interrupt_if_keyboard_byte_ready();
        }
        true
    }

    /// A controller reply: ahead of any keyboard bytes, replacing an unread earlier
    /// reply (the controller has a single output register for its own answers).
    fn controller_reply(&mut self, byte: u8) {
        if self.out.front().is_some_and(|&(_, s)| s == Source::Controller) {
            self.out.pop_front();
        }
        if self.out.len() == OUTPUT_CAPACITY {
            // Full of keyboard bytes the guest does not read: the newest makes room.
            self.out.pop_back();
        }
        self.out.push_front((byte, Source::Controller));
        self.status |= STR_OBF;
    }

    fn interrupt_if_keyboard_byte_ready(&self) {
        if self.ctr() & CTR_KBDINT != 0 && self.out.front().is_some_and(|&(_, s)| s == Source::Keyboard) {
            if let Err(e) = self.irq.write(1) {
                tracing::warn!("i8042: raising IRQ 1: {e}");
            }
        }
    }

    fn read_data(&mut self) -> u8 {
        if let Some((byte, _)) = self.out.pop_front() {
            self.last_read = byte;
        }
        if self.out.is_empty() {
            self.status &= !STR_OBF;
        } else {
            self.interrupt_if_keyboard_byte_ready();
        }
        self.last_read
    }

    fn write_command(&mut self, cmd: u8) {
        self.status |= STR_CMDDAT;
        self.awaiting = None;
        match cmd {
            CMD_READ_RAM..=0x3f => self.controller_reply(self.ram[usize::from(cmd & 0x1f)]),
            CMD_WRITE_RAM..=0x7f
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_OUTPUT
            | CMD_WRITE_AUX_OUTPUT
            | CMD_WRITE_AUX => self.awaiting = Some(cmd),
            CMD_AUX_DISABLE => self.ram[0] |= CTR_AUXDIS,
            CMD_AUX_ENABLE => self.ram[0] &= !CTR_AUXDIS,
            CMD_AUX_TEST => self.controller_reply(AUX_CLOCK_STUCK_HIGH),
            CMD_SELF_TEST => {
                self.status |= STR_SYSFLAG;
                self.controller_reply(SELF_TEST_OK);
            }
            CMD_KBD_TEST => self.controller_reply(INTERFACE_OK),
            CMD_KBD_DISABLE => self.ram[0] |= CTR_KBDDIS,
            CMD_KBD_ENABLE => self.ram[0] &= !CTR_KBDDIS,
            CMD_READ_OUTPUT_PORT => self.controller_reply(self.outp),
            CMD_PULSE_FIRST..=0xff if cmd & OUTP_RESET_LINE == 0 => self.exit.request(ExitReason::Reset),
            _ => {} // the other pulse commands pulse nothing that exists; unknown commands are ignored
        }
    }

    fn write_data(&mut self, byte: u8) {
        self.status &= !STR_CMDDAT;
        match self.awaiting.take() {
            Some(cmd @ CMD_WRITE_RAM..=0x7f) => {
                let index = usize::from(cmd & 0x1f);
                self.ram[index] = byte;
                if index == 0 {
                    // Setting the system flag in the CTR sets it in the status register.
                    self.status = (self.status & !STR_SYSFLAG) | (byte & CTR_SYSFLAG);
                    // Enabling the interrupt with keyboard bytes waiting delivers them.
                    self.interrupt_if_keyboard_byte_ready();
                }
            }
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.outp = byte;
                if byte & OUTP_RESET_LINE == 0 {
                    self.exit.request(ExitReason::Reset);
                }
            }
            Some(CMD_WRITE_KBD_OUTPUT) => {
                self.keyboard_send(&[byte]);
            }
            // No aux port: answered as keyboard data, which tells a prober (Linux's
            // i8042_check_aux) at once that the loopback failed.
            Some(CMD_WRITE_AUX_OUTPUT) => {
                self.keyboard_send(&[byte]);
            }
            Some(_) => {} // a byte for the absent aux device
            None => self.keyboard_command(byte),
        }
    }

    /// A byte the guest sends the keyboard.
    fn keyboard_command(&mut self, byte: u8) {
        if let Some(cmd) = self.kbd.awaiting.take() {
            match (cmd, byte) {
                (KBD_SCANCODE_SET, 0) => self.keyboard_send(&[KBD_ACK, SCANCODE_SET_2]),
                (KBD_SCANCODE_SET, SCANCODE_SET_2) | (KBD_SET_LEDS, _) | (KBD_TYPEMATIC, _) => {
                    self.keyboard_send(&[KBD_ACK])
                }
                // Sets 1 and 3 are not offered.
                _ => self.keyboard_send(&[KBD_RESEND]),
            };
            return;
        }
        match byte {
            KBD_SET_LEDS | KBD_TYPEMATIC | KBD_SCANCODE_SET => {
                self.kbd.awaiting = Some(byte);
                self.keyboard_send(&[KBD_ACK]);
            }
            KBD_ECHO => {
                self.keyboard_send(&[KBD_ECHO]);
            }
            KBD_GET_ID => {
                self.keyboard_send(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]);
            }
            KBD_ENABLE => {
                self.kbd.scanning = true;
                self.kbd.enabled_by_guest = true;
                self.keyboard_send(&[KBD_ACK]);
            }
            KBD_DISABLE => {
                self.kbd.scanning = false;
                self.kbd.enabled_by_guest = false;
                self.keyboard_send(&[KBD_ACK]);
            }
            KBD_DEFAULTS | 0xf7..=0xfd => {
                self.keyboard_send(&[KBD_ACK]);
            }
            KBD_RESEND => {
                let last = self.kbd.last_sent;
                self.keyboard_send(&[last]);
            }
            KBD_RESET => {
                self.kbd.scanning = true;
                self.kbd.enabled_by_guest = false;
                self.keyboard_send(&[KBD_ACK, KBD_BAT_OK]);
            }
            _ => {
                self.keyboard_send(&[KBD_RESEND]);
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The ports are a byte wide; anything else reads as an empty bus.
        let value = match (offset, data.len()) {
            (DATA_OFFSET, 1) => self.read_data(),
            (STATUS_OFFSET, 1) => self.status,
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA_OFFSET, &[byte]) => self.write_data(byte),
            (STATUS_OFFSET, &[cmd]) => self.write_command(cmd),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CMD: u64 = STATUS_OFFSET;
    const DATA: u64 = DATA_OFFSET;

    struct Rig {
        dev: I8042,
        exit: Arc<ExitSignal>,
        irq: EventFd,
    }

    impl Rig {
        fn new() -> Self {
            let exit = Arc::new(ExitSignal::new().unwrap());
            let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
            let dev = I8042::new(exit.clone(), irq.try_clone().unwrap());
            Self { dev, exit, irq }
        }
        fn out(&mut self, offset: u64, v: u8) {
            self.dev.write(offset, &[v]);
        }
        fn inb(&mut self, offset: u64) -> u8 {
            let mut b = [0u8];
            self.dev.read(offset, &mut b);
            b[0]
        }
        fn status(&mut self) -> u8 {
            self.inb(CMD)
        }
        /// Reads every byte waiting, as a polling driver does.
        fn drain(&mut self) -> Vec<u8> {
            let mut v = Vec::new();
            while self.status() & STR_OBF != 0 {
                v.push(self.inb(DATA));
                assert!(v.len() <= OUTPUT_CAPACITY, "the queue must be bounded");
            }
            v
        }
        /// Interrupts raised since the last call.
        fn irqs(&self) -> u64 {
            self.irq.read().unwrap_or(0)
        }
        fn command(&mut self, cmd: u8) -> u8 {
            self.out(CMD, cmd);
            assert_ne!(self.status() & STR_OBF, 0, "command {cmd:#x} must answer at once");
            self.inb(DATA)
        }
        fn write_ctr(&mut self, ctr: u8) {
            self.out(CMD, CMD_WRITE_RAM);
            self.out(DATA, ctr);
        }
        /// What Linux's i8042 and atkbd drivers do at boot, in order.
        fn linux_probe(&mut self) {
            self.drain();
            let ctr = self.command(CMD_READ_RAM);
            assert_eq!(self.command(CMD_READ_RAM), ctr, "a stable CTR");
            self.write_ctr((ctr | CTR_KBDDIS) & !CTR_KBDINT);
            self.write_ctr((ctr & !CTR_KBDDIS) | CTR_KBDINT);
            // atkbd: identify, deactivate while setting up, then activate.
            self.out(DATA, KBD_GET_ID);
            assert_eq!(self.drain(), [KBD_ACK, 0xab, 0x83]);
            self.out(DATA, KBD_DISABLE);
            assert_eq!(self.drain(), [KBD_ACK]);
            self.out(DATA, KBD_SET_LEDS);
            self.out(DATA, 0);
            assert_eq!(self.drain(), [KBD_ACK, KBD_ACK]);
            self.out(DATA, KBD_TYPEMATIC);
            self.out(DATA, 0x20);
            assert_eq!(self.drain(), [KBD_ACK, KBD_ACK]);
            self.out(DATA, KBD_ENABLE);
            assert_eq!(self.drain(), [KBD_ACK]);
            self.irqs();
        }
    }

    #[test]
    fn status_and_command_byte_read_back() {
        let mut r = Rig::new();
        let st = r.status();
        assert_eq!(st & STR_OBF, 0, "nothing to read at power-on");
        assert_ne!(st & STR_KEYLOCK, 0, "keyboard not inhibited");
        assert_ne!(st & STR_SYSFLAG, 0, "POST passed");
        assert_eq!(r.command(CMD_READ_RAM), CTR_INITIAL);
        assert_ne!(r.status() & STR_CMDDAT, 0, "last write went to the command port");
        r.write_ctr(0x47);
        assert_eq!(r.status() & STR_CMDDAT, 0);
        assert_eq!(r.command(CMD_READ_RAM), 0x47);
        // The rest of RAM, indices masked to 32 bytes.
        r.out(CMD, 0x7f);
        r.out(DATA, 0x99);
        assert_eq!(r.command(0x3f), 0x99);
        assert_eq!(r.command(CMD_READ_RAM), 0x47, "RAM writes leave the CTR alone");
        // The system flag follows the CTR.
        r.write_ctr(0x00);
        assert_eq!(r.status() & STR_SYSFLAG, 0);
        assert_eq!(r.irqs(), 0, "controller replies are polled, not interrupts");
    }

    #[test]
    fn self_tests_and_port_enables() {
        let mut r = Rig::new();
        assert_eq!(r.command(CMD_SELF_TEST), SELF_TEST_OK);
        assert_eq!(r.command(CMD_KBD_TEST), INTERFACE_OK);
        assert_eq!(r.command(CMD_AUX_TEST), AUX_CLOCK_STUCK_HIGH, "no mouse is connected");
        r.out(CMD, CMD_KBD_DISABLE);
        assert_ne!(r.command(CMD_READ_RAM) & CTR_KBDDIS, 0);
        r.out(CMD, CMD_KBD_ENABLE);
        assert_eq!(r.command(CMD_READ_RAM) & CTR_KBDDIS, 0);
        r.out(CMD, CMD_AUX_ENABLE);
        assert_eq!(r.command(CMD_READ_RAM) & CTR_AUXDIS, 0);
        r.out(CMD, CMD_AUX_DISABLE);
        assert_ne!(r.command(CMD_READ_RAM) & CTR_AUXDIS, 0);
        assert_eq!(r.command(CMD_READ_OUTPUT_PORT), OUTP_INITIAL);
        // The aux loopback answers as keyboard data: a mouse probe fails at once.
        r.out(CMD, CMD_WRITE_AUX_OUTPUT);
        r.out(DATA, 0x5a);
        assert_eq!(r.drain(), [0x5a]);
        // A byte for the absent mouse vanishes.
        r.out(CMD, CMD_WRITE_AUX);
        r.out(DATA, 0xf4);
        assert!(r.drain().is_empty());
        assert_eq!(r.exit.reason(), ExitReason::Running);
    }

    #[test]
    fn reset_pulse_and_output_port_reset_the_cpu() {
        let mut r = Rig::new();
        r.out(CMD, 0xff); // pulses nothing
        r.out(CMD, 0xfd); // bit 1 (A20) only
        assert_eq!(r.exit.reason(), ExitReason::Running);
        r.out(CMD, 0xfe);
        assert_eq!(r.exit.reason(), ExitReason::Reset);

        let mut r = Rig::new();
        r.out(CMD, CMD_WRITE_OUTPUT_PORT);
        r.out(DATA, 0x03);
        assert_eq!(r.exit.reason(), ExitReason::Running);
        assert_eq!(r.command(CMD_READ_OUTPUT_PORT), 0x03);
        r.out(CMD, CMD_WRITE_OUTPUT_PORT);
        r.out(DATA, 0x02);
        assert_eq!(r.exit.reason(), ExitReason::Reset, "clearing bit 0 asserts the reset line");
    }

    #[test]
    fn keyboard_answers_and_interrupts_when_enabled() {
        let mut r = Rig::new();
        r.out(DATA, KBD_RESET);
        assert_eq!(r.irqs(), 1, "the reply's first byte interrupts");
        assert_eq!(r.inb(DATA), KBD_ACK);
        assert_eq!(r.irqs(), 1, "so does each byte that follows");
        assert_eq!(r.inb(DATA), KBD_BAT_OK);
        assert_eq!(r.status() & STR_OBF, 0);
        assert_eq!(r.irqs(), 0);
        r.out(DATA, KBD_ECHO);
        assert_eq!(r.drain(), [KBD_ECHO]);
        r.out(DATA, KBD_SCANCODE_SET);
        r.out(DATA, 0);
        assert_eq!(r.drain(), [KBD_ACK, KBD_ACK, SCANCODE_SET_2]);
        r.out(DATA, KBD_SCANCODE_SET);
        r.out(DATA, 3);
        assert_eq!(r.drain(), [KBD_ACK, KBD_RESEND], "only set 2 is offered");
        r.out(DATA, 0x01);
        assert_eq!(r.drain(), [KBD_RESEND], "unknown commands ask for a resend");
        // With the keyboard interrupt off in the CTR, bytes are polled only.
        r.write_ctr(CTR_INITIAL & !CTR_KBDINT);
        r.irqs();
        r.out(DATA, KBD_ENABLE);
        assert_eq!(r.irqs(), 0);
        // Enabling the interrupt with a byte waiting delivers it.
        r.write_ctr(CTR_INITIAL);
        assert_eq!(r.irqs(), 1);
        assert_eq!(r.drain(), [KBD_ACK]);
        // An empty data port keeps reading its last byte.
        assert_eq!(r.inb(DATA), KBD_ACK);
    }

    #[test]
    fn controller_replies_go_ahead_of_keyboard_bytes() {
        let mut r = Rig::new();
        r.out(DATA, KBD_GET_ID);
        r.out(CMD, CMD_READ_RAM);
        assert_eq!(r.inb(DATA), CTR_INITIAL, "the command's answer comes next");
        assert_eq!(r.drain(), [KBD_ACK, 0xab, 0x83]);
    }

    #[test]
    fn ctrl_alt_del_waits_for_the_guest_driver() {
        let mut r = Rig::new();
        assert_eq!(r.dev.send_ctrl_alt_del(), Err(CtrlAltDelError::KeyboardNotEnabled), "no driver yet");
        r.linux_probe();
        assert!(r.dev.keyboard_enabled());
        r.dev.send_ctrl_alt_del().unwrap();
        assert_eq!(r.irqs(), 1);
        assert_eq!(r.drain(), CTRL_ALT_DEL, "set 2: Ctrl, Alt, Delete, then their releases");
        // Disabled keyboard, interrupt or scanning: refused.
        r.out(CMD, CMD_KBD_DISABLE);
        assert_eq!(r.dev.send_ctrl_alt_del(), Err(CtrlAltDelError::KeyboardNotEnabled));
        r.out(CMD, CMD_KBD_ENABLE);
        r.out(DATA, KBD_DISABLE);
        r.drain();
        assert_eq!(r.dev.send_ctrl_alt_del(), Err(CtrlAltDelError::KeyboardNotEnabled));
        r.out(DATA, KBD_ENABLE);
        r.drain();
        r.dev.send_ctrl_alt_del().unwrap();
        assert_eq!(r.dev.send_ctrl_alt_del(), Err(CtrlAltDelError::BufferFull), "all or nothing");
        assert_eq!(r.drain(), CTRL_ALT_DEL);
    }

    #[test]
    fn translation_gives_set_1() {
        let mut r = Rig::new();
        r.linux_probe();
        r.write_ctr(CTR_INITIAL | CTR_XLATE);
        r.out(DATA, KBD_GET_ID);
        assert_eq!(r.drain(), [KBD_ACK, 0xab, 0x41]);
        r.dev.send_ctrl_alt_del().unwrap();
        assert_eq!(r.drain(), [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);
    }

    #[test]
    fn a_guest_that_never_reads_cannot_grow_the_queue() {
        let mut r = Rig::new();
        for _ in 0..1000 {
            r.out(DATA, KBD_GET_ID);
            r.out(CMD, CMD_READ_RAM);
        }
        assert!(r.dev.out.len() <= OUTPUT_CAPACITY);
        assert_eq!(r.inb(DATA), CTR_INITIAL);
        let rest = r.drain();
        assert!(rest.len() < OUTPUT_CAPACITY);
        // Wide and stray accesses change nothing.
        let mut wide = [0u8; 2];
        r.dev.read(DATA, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        r.dev.write(CMD, &[0xfe, 0xfe]);
        r.dev.write(1, &[0xfe]);
        let mut b = [0u8];
        r.dev.read(2, &mut b);
        assert_eq!(b[0], 0xff);
        assert_eq!(r.exit.reason(), ExitReason::Running);
    }

    #[test]
    fn state_round_trips_into_a_new_controller_and_hostile_state_is_refused() {
        let mut a = Rig::new();
        a.linux_probe();
        a.dev.send_ctrl_alt_del().unwrap();
        let state = a.dev.state();
        let json = serde_json::to_string(&state).unwrap();
        let mut b = Rig::new();
        b.dev.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(b.dev.state(), state);
        assert!(b.dev.keyboard_enabled(), "the guest's driver setup survives");
        assert_eq!(b.irqs(), 1, "the queued keys interrupt the new VM's guest again");
        assert_eq!(b.drain(), a.drain(), "the queued keys are read the same");

        let mut hostile = state.clone();
        hostile.out = vec![(0, true); 1 << 20];
        assert!(b.dev.restore(&hostile).unwrap_err().contains("output queue"));
        let mut hostile = state;
        hostile.ram = vec![0; 1 << 20];
        assert!(b.dev.restore(&hostile).unwrap_err().contains("RAM"));
    }
}
