//! The node's bring-up phases. The agent prints one console line per phase it reaches,
//! `kindling-agent: phase <name> <seconds since the kernel started>`, and answers the
//! `phases` request with the same list; the host reads either.

use serde::{Deserialize, Serialize};

/// The agent's first phase: PID 1 runs and /proc is mounted.
pub const AGENT_START: &str = "agent-start";
/// The phase `kindling start` waits for: the node is Ready in the API.
pub const NODE_READY: &str = "node-ready";

/// Every phase, in the order the agent reaches them: PID 1 runs; etcd is healthy;
/// containerd answers; the preloaded images are imported; the API server's /readyz is
/// ok; the kubelet has registered the Node; the Node is Ready; CoreDNS's pod (the first
/// pod) runs; CoreDNS is available.
pub const ALL: [&str; 9] = [
    AGENT_START,
    "etcd-ready",
    "containerd-ready",
    "images-ready",
    "apiserver-ready",
    "kubelet-registered",
    NODE_READY,
    "coredns-running",
    "dns-ready",
];

/// What starts every phase line on the console.
pub const LINE_PREFIX: &str = "kindling-agent: phase ";

/// A phase the node reached.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    /// One of [`ALL`].
    pub name: String,
    /// Seconds since the guest kernel started.
    pub seconds: f64,
}

/// True when `name` is one of [`ALL`].
pub fn is_known(name: &str) -> bool {
    ALL.contains(&name)
}

/// The console line for a phase (without the newline).
pub fn line(name: &str, seconds: f64) -> String {
    format!("{LINE_PREFIX}{name} {seconds:.2}")
}

/// The phases in console text, in order, each at its first report; other lines, and
/// phase lines that do not parse, are skipped.
pub fn from_console(text: &str) -> Vec<Phase> {
    let mut out: Vec<Phase> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.split(LINE_PREFIX).nth(1) else { continue };
        let mut it = rest.split_whitespace();
        let (Some(name), Some(secs)) = (it.next(), it.next()) else { continue };
        let Ok(seconds) = secs.parse::<f64>() else { continue };
        if seconds.is_finite() && !out.iter().any(|p| p.name == name) {
            out.push(Phase { name: name.to_string(), seconds });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_round_trip() {
        let text = format!(
            "[    1.0] random\n{}\r\nkindling-agent: imported x\n{}\n{}\nkindling-agent: phase broken\nkindling-agent: phase x NaN\n",
            line(AGENT_START, 1.2),
            line("etcd-ready", 12.8),
            line("etcd-ready", 99.0)
        );
        assert_eq!(
            from_console(&text),
            vec![Phase { name: AGENT_START.into(), seconds: 1.2 }, Phase { name: "etcd-ready".into(), seconds: 12.8 }]
        );
        assert!(is_known(NODE_READY) && !is_known("ready"));
    }
}
