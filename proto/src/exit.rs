//! Exit statuses of `kindling boot`, which the daemon records and the cluster manager
//! acts on.

/// The guest powered off, or asked to reboot (a reboot ends the VM).
pub const OK: i32 = 0;
/// The VMM failed (bad input, a host resource it could not set up, a fatal vCPU error).
pub const VMM_ERROR: i32 = 1;
/// The guest crashed: a vCPU triple-faulted without a reset request. A supervisor may
/// restart such a VM; its disks hold everything the guest flushed.
pub const GUEST_CRASHED: i32 = 3;
/// The emulated runner's level-1 VM made no progress for its stall bound and was
/// stopped (the emulation's stall, not the guest's); a supervisor may retry.
pub const L1_STALLED: i32 = 4;
