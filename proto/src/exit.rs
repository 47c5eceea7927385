//! Exit statuses of `kindling boot`, which the daemon records and the cluster manager
//! acts on.

/// The guest powered off, or asked to reboot (a reboot ends the VM), or the VM was
/// stopped on SIGTERM: after the guest shut down when asked, or, when it did not within
/// the timeout, stopped anyway (its disks flushed, what it had not written lost).
pub const OK: i32 = 0;
/// The VMM failed (bad input, a host resource it could not set up, a fatal vCPU error).
pub const VMM_ERROR: i32 = 1;
/// The guest crashed: a vCPU triple-faulted without a reset request. A supervisor may
/// restart such a VM; its disks hold everything the guest flushed.
pub const GUEST_CRASHED: i32 = 3;
/// The emulated runner's level-1 VM made no progress for its stall bound and was
/// stopped (the emulation's stall, not the guest's); a supervisor may retry.
pub const L1_STALLED: i32 = 4;
