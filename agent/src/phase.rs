//! Phase report: one console line per milestone, with seconds since the kernel started.

/// Seconds since the kernel started (/proc/uptime).
pub fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Prints `kindling-agent: phase <name> <seconds>` to the console (stdout).
pub fn report(name: &str) {
    println!("kindling-agent: phase {name} {:.2}", uptime());
}

pub fn log(msg: impl std::fmt::Display) {
    println!("kindling-agent: {msg}");
}
