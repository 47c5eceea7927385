//! Phase report: one console line per milestone, with seconds since the kernel started
//! (the line and the phase names are `kindling_proto::phase`'s).

pub use kindling_proto::phase::{is_known, Phase, AGENT_START, ALL, NODE_READY};

/// Seconds since the kernel started (/proc/uptime).
pub fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

static REACHED: std::sync::Mutex<Vec<Phase>> = std::sync::Mutex::new(Vec::new());

/// Prints the phase line (`kindling-agent: phase <name> <seconds>`) to the console
/// (stdout), and remembers the phase for the control channel.
pub fn report(name: &str) {
    let t = uptime();
    REACHED.lock().unwrap().push(Phase { name: name.to_string(), seconds: t });
    println!("{}", kindling_proto::phase::line(name, t));
}

/// The phases reached so far, with their times.
pub fn reached() -> Vec<Phase> {
    REACHED.lock().unwrap().clone()
}

pub fn log(msg: impl std::fmt::Display) {
    println!("kindling-agent: {msg}");
}
