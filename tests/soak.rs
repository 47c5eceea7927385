//! The short soak CI runs: `scripts/soak --boots 4` (four boots of the node image in a
//! row, each to the agent's first phase, alternating with and without a guest network)
//! must see no stall. The long one (`scripts/soak --boots 50 --kill`) is in the README.

mod common;

use common::*;

#[test]
fn four_node_boots_in_a_row_do_not_stall() {
    // The images the soak boots (cached by input hash; built here when missing).
    let _ = (image_path("kernel"), image_path("rootfs"));
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("soak.json");
    let mut cmd = std::process::Command::new(repo().join("scripts/soak"));
    cmd.env("KINDLING", kindling_bin()).args(["--boots", "4", "--json"]).arg(&json);
    let out = run_with_timeout(cmd, std::time::Duration::from_secs(1500));
    let log = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let figures: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap_or_default())
        .unwrap_or_else(|e| panic!("scripts/soak wrote no figures ({e})\n{log}"));
    eprintln!("{figures}");
    assert_eq!(figures["boots"], 4, "{log}");
    assert_eq!(figures["stalls"], 0, "{log}");
    assert_eq!(figures["processes_left"], 0, "{log}");
    assert!(figures["seconds_per_boot_median"].as_f64().is_some_and(|s| s > 0.0), "{log}");
    assert_eq!(out.status.code(), Some(0), "{log}");
}
