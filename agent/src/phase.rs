//! Phase report: one console line per milestone, with seconds since the kernel started.

/// Seconds since the kernel started (/proc/uptime).
pub fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

static REACHED: std::sync::Mutex<Vec<(String, f64)>> = std::sync::Mutex::new(Vec::new());

/// Prints `kindling-agent: phase <name> <seconds>` to the console (stdout), and
/// remembers it for the control channel.
pub fn report(name: &str) {
    let t = uptime();
    REACHED.lock().unwrap().push((name.to_string(), t));
    println!("kindling-agent: phase {name} {t:.2}");
}

/// The phases reached so far, with their times.
pub fn reached() -> Vec<(String, f64)> {
    REACHED.lock().unwrap().clone()
}

pub fn log(msg: impl std::fmt::Display) {
    println!("kindling-agent: {msg}");
}
