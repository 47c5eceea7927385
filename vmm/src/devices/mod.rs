//! Emulated hardware the guest sees, and the buses vCPUs dispatch their exits to.

pub mod bus;
pub mod guest_log;
pub mod legacy;
pub mod virtio;

use std::sync::atomic::{AtomicU8, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the guest stopped running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitReason {
    /// The guest has not stopped (no reason recorded yet).
    Running = 0,
    /// ACPI S5 (poweroff).
    PowerOff = 1,
    /// i8042 or ACPI reset: the guest asked to reboot.
    Reset = 2,
    /// A vCPU hit something the VMM cannot continue from.
    Error = 3,
    /// A vCPU shut down (a triple fault) without the guest asking for a reset: a crash.
    TripleFault = 4,
    /// The host stopped the VM ([`crate::builder::VmControl::stop`]), whatever the
    /// guest was doing.
    Stopped = 5,
    /// The host took a snapshot of the VM and asked for the run to end
    /// ([`crate::builder::AfterSnapshot::Exit`]).
    Snapshotted = 6,
}

/// Signalled by devices and vCPUs when the guest stops; the event loop waits on it.
/// The first reason recorded wins.
pub struct ExitSignal {
    /// Written when a reason is requested; the event loop waits for it to become readable.
    pub evt: EventFd,
    reason: AtomicU8,
}

impl ExitSignal {
    /// A signal with no reason recorded yet ([`ExitReason::Running`]).
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { evt: EventFd::new(EFD_NONBLOCK)?, reason: AtomicU8::new(ExitReason::Running as u8) })
    }

    /// Records `reason` unless one was already recorded, and wakes the event loop.
    pub fn request(&self, reason: ExitReason) {
        let _ =
            self.reason.compare_exchange(ExitReason::Running as u8, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    /// The first reason recorded, or [`ExitReason::Running`] if none was.
    pub fn reason(&self) -> ExitReason {
        match self.reason.load(Ordering::SeqCst) {
            1 => ExitReason::PowerOff,
            2 => ExitReason::Reset,
            3 => ExitReason::Error,
            4 => ExitReason::TripleFault,
            5 => ExitReason::Stopped,
            6 => ExitReason::Snapshotted,
            _ => ExitReason::Running,
        }
    }
}
