//! The guest network's outside inside the emulated runner's level-1 VM: QEMU's user
//! networking, whose gateway 10.0.2.2 is the user's host's loopback. L1 has no
//! iptables; policy routing does the blocking instead: traffic from the guest's subnet
//! (TAP) or from passt's own outbound address to 10.0.2.2 meets a blackhole route.
//! L1's own traffic (the vsock relay's replies) comes from 10.0.2.15 and is not
//! affected.

use std::process::Command;

use super::NetSetupError;

/// QEMU user networking's alias for the host's loopback.
const HOST_LOOPBACK_ALIAS: &str = "10.0.2.2";
/// The routing table of the blackhole route.
const TABLE: &str = "100";
/// The address passt's outbound connections come from in L1 (a second address of
/// L1's NIC), so that they can be told from L1's own.
pub const PASST_OUTBOUND: &str = "10.0.2.16";

fn ip(args: &[&str]) -> Result<(), NetSetupError> {
    let out = Command::new("ip").args(args).output().map_err(|e| NetSetupError::L1Block(format!("ip: {e}")))?;
    if !out.status.success() {
        return Err(NetSetupError::L1Block(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Blocks traffic from `from` (an address or a subnet) to the host's loopback alias.
pub fn block_host_loopback(from: &str) -> Result<(), NetSetupError> {
    if from == PASST_OUTBOUND {
        let _ = ip(&["addr", "add", &format!("{PASST_OUTBOUND}/24"), "dev", "eth0"]);
    }
    ip(&["route", "replace", "blackhole", &format!("{HOST_LOOPBACK_ALIAS}/32"), "table", TABLE])?;
    ip(&["rule", "add", "from", from, "table", TABLE, "priority", TABLE])
}
