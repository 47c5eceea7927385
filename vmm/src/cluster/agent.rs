//! The host side of the guest agent's control channel (agent/src/control.rs): one JSON
//! request line per connection to vsock port 1024, reached through the VM's vsock
//! socket with the `CONNECT 1024` handshake; the replies are JSON lines (`{"out":…}`
//! chunks then `{"exit":N}`, or `{"ok":true}`, `{"phases":[…]}`, `{"error":…}`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The agent's vsock port.
pub const AGENT_PORT: u32 = 1024;
/// Read timeout of requests that answer at once (ping, phases, poweroff).
const QUICK_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No connection: the VM is not up yet, its agent is not listening, or vsock is broken.
    #[error("the node's agent is not reachable: {0}")]
    Unreachable(String),
    /// The agent answered `{"error": …}`.
    #[error("the node's agent refused the request: {0}")]
    Refused(String),
    #[error("the connection to the node's agent broke: {0}")]
    Broken(String),
}

pub type Result<T> = std::result::Result<T, AgentError>;

/// A phase the node reached, in seconds since the guest kernel started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub seconds: f64,
}

/// How to reach the agent.
#[derive(Clone, Debug)]
pub enum Transport {
    /// The VMM's vsock UNIX socket (Firecracker-style `CONNECT <port>` handshake).
    Vsock(PathBuf),
    /// The agent's own UNIX socket (when it runs as a container's init).
    Unix(PathBuf),
}

/// A client of one VM's agent.
#[derive(Clone, Debug)]
pub struct Agent {
    transport: Transport,
    /// How long a refused connection is retried (see [`Agent::patient`]).
    patience: Duration,
}

/// One reply line.
#[derive(Debug, PartialEq)]
enum Reply {
    Out(String),
    Exit(i32),
    Ok,
    Phases(Vec<Phase>),
    Error(String),
}

fn parse_reply(line: &str) -> Result<Reply> {
    let v: Value = serde_json::from_str(line).map_err(|e| AgentError::Broken(format!("unexpected reply {line:?}: {e}")))?;
    if let Some(s) = v.get("out").and_then(Value::as_str) {
        return Ok(Reply::Out(s.to_string()));
    }
    if let Some(c) = v.get("exit").and_then(Value::as_i64) {
        return Ok(Reply::Exit(c as i32));
    }
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Ok(Reply::Error(e.to_string()));
    }
    if let Some(p) = v.get("phases") {
        let phases = serde_json::from_value(p.clone()).map_err(|e| AgentError::Broken(format!("unexpected phases {p}: {e}")))?;
        return Ok(Reply::Phases(phases));
    }
    if v.get("ok").and_then(Value::as_bool) == Some(true) {
        return Ok(Reply::Ok);
    }
    Err(AgentError::Broken(format!("unexpected reply {line:?}")))
}

/// An open request: the write half and the buffered replies.
struct Conn {
    stream: UnixStream,
    replies: BufReader<UnixStream>,
}

impl Conn {
    fn next(&mut self) -> Result<Option<Reply>> {
        let mut line = String::new();
        match self.replies.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => parse_reply(line.trim_end()).map(Some),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                Err(AgentError::Broken("no answer in time".into()))
            }
            Err(e) => Err(AgentError::Broken(e.to_string())),
        }
    }

    /// The first reply; the connection closing without one is an error.
    fn one(&mut self) -> Result<Reply> {
        match self.next()? {
            Some(Reply::Error(e)) => Err(AgentError::Refused(e)),
            Some(r) => Ok(r),
            None => Err(AgentError::Broken("the agent closed the connection without answering".into())),
        }
    }

    /// Hands `{"out"}` chunks to `on_out` until `{"exit"}`.
    fn stream(&mut self, on_out: &mut dyn FnMut(&str)) -> Result<i32> {
        loop {
            match self.next()? {
                Some(Reply::Out(s)) => on_out(&s),
                Some(Reply::Exit(c)) => return Ok(c),
                Some(Reply::Error(e)) => return Err(AgentError::Refused(e)),
                Some(other) => return Err(AgentError::Broken(format!("unexpected reply {other:?}"))),
                None => return Err(AgentError::Broken("the connection closed before the command finished (did the VM stop?)".into())),
            }
        }
    }
}

impl Agent {
    pub fn new(transport: Transport) -> Self {
        Self { transport, patience: Duration::ZERO }
    }

    /// Retries a refused connection for up to `patience`. For a node known to be up: a
    /// guest busy under emulation can miss the VMM's deadline for accepting a vsock
    /// connection, and the next try gets through. Retrying is safe because nothing of
    /// the request has been sent when the connection is refused.
    pub fn patient(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// The agent of the VM whose vsock socket is `uds`.
    pub fn vsock(uds: impl Into<PathBuf>) -> Self {
        Self::new(Transport::Vsock(uds.into()))
    }

    fn connect(&self) -> Result<UnixStream> {
        let uds = match &self.transport {
            Transport::Vsock(uds) => uds,
            Transport::Unix(p) => return UnixStream::connect(p).map_err(|e| AgentError::Unreachable(format!("{}: {e}", p.display()))),
        };
        let t0 = std::time::Instant::now();
        loop {
            match crate::forward::connect_guest(uds, AGENT_PORT) {
                Ok(s) => return Ok(s),
                Err(e @ crate::forward::ForwardError::Refused { .. }) if t0.elapsed() < self.patience => {
                    tracing::debug!("agent: {e}; trying again");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(AgentError::Unreachable(e.to_string())),
            }
        }
    }

    fn open(&self, request: &Value, timeout: Option<Duration>) -> Result<Conn> {
        let mut stream = self.connect()?;
        let broken = |e: std::io::Error| AgentError::Broken(e.to_string());
        stream.set_read_timeout(timeout).map_err(broken)?;
        let mut line = request.to_string();
        line.push('\n');
        stream.write_all(line.as_bytes()).map_err(broken)?;
        let replies = BufReader::new(stream.try_clone().map_err(broken)?);
        Ok(Conn { stream, replies })
    }

    pub fn ping(&self) -> Result<()> {
        match self.open(&json!({"op": "ping"}), Some(QUICK_TIMEOUT))?.one()? {
            Reply::Ok => Ok(()),
            r => Err(AgentError::Broken(format!("unexpected reply {r:?}"))),
        }
    }

    /// The phases the node has reached, in order.
    pub fn phases(&self) -> Result<Vec<Phase>> {
        match self.open(&json!({"op": "phases"}), Some(QUICK_TIMEOUT))?.one()? {
            Reply::Phases(p) => Ok(p),
            r => Err(AgentError::Broken(format!("unexpected reply {r:?}"))),
        }
    }

    /// Asks the node to shut down in order and power off.
    pub fn poweroff(&self) -> Result<()> {
        match self.open(&json!({"op": "poweroff"}), Some(QUICK_TIMEOUT))?.one()? {
            Reply::Ok => Ok(()),
            r => Err(AgentError::Broken(format!("unexpected reply {r:?}"))),
        }
    }

    /// Runs `argv` in the guest, handing its output (stdout and stderr, merged) to
    /// `on_out` as it comes; returns its exit code.
    pub fn exec(&self, argv: &[String], on_out: &mut dyn FnMut(&str)) -> Result<i32> {
        self.open(&json!({"op": "exec", "argv": argv}), None)?.stream(on_out)
    }

    /// Runs `argv` in the guest and collects its output.
    pub fn exec_capture(&self, argv: &[&str]) -> Result<(i32, String)> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let mut out = String::new();
        let code = self.exec(&argv, &mut |s| out.push_str(s))?;
        Ok((code, out))
    }

    /// A component's log (`/var/log/kindling/<component>.log`); with `follow`, until the
    /// connection ends.
    pub fn logs(&self, component: &str, follow: bool, on_out: &mut dyn FnMut(&str)) -> Result<i32> {
        self.open(&json!({"op": "logs", "component": component, "follow": follow}), None)?.stream(on_out)
    }

    /// Sends `len` bytes of `archive` (an OCI or docker image archive) to the guest's
    /// containerd (namespace k8s.io); hands ctr's output to `on_out`, returns its exit
    /// code. The bytes go from a thread while the replies are read, so a failing import
    /// is reported at once.
    pub fn import(&self, archive: &mut (dyn Read + Send), len: u64, on_out: &mut dyn FnMut(&str)) -> Result<i32> {
        let mut conn = self.open(&json!({"op": "import", "bytes": len}), None)?;
        let mut sink = conn.stream.try_clone().map_err(|e| AgentError::Broken(e.to_string()))?;
        std::thread::scope(|scope| {
            let sender = scope.spawn(move || -> std::io::Result<u64> {
                let copied = std::io::copy(&mut Read::take(archive, len), &mut sink)?;
                Ok(copied)
            });
            let result = conn.stream(on_out);
            // Unblock a sender the agent stopped reading from (the import failed early).
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            let sent = sender.join();
            match (result, sent) {
                (Ok(code), Ok(Ok(n))) if n < len && code == 0 => {
                    Err(AgentError::Broken(format!("the archive ended after {n} of {len} bytes")))
                }
                (r, _) => r,
            }
        })
    }
}

/// Phases from the console lines `kindling-agent: phase <name> <seconds>` (how the
/// agent reports them before vsock answers).
pub fn phases_from_console(text: &str) -> Vec<Phase> {
    let mut out: Vec<Phase> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.split("kindling-agent: phase ").nth(1) else { continue };
        let mut it = rest.split_whitespace();
        let (Some(name), Some(secs)) = (it.next(), it.next()) else { continue };
        let Ok(seconds) = secs.parse::<f64>() else { continue };
        if !out.iter().any(|p| p.name == name) {
            out.push(Phase { name: name.to_string(), seconds });
        }
    }
    out
}

/// The vsock socket of a VM directory.
pub fn vsock_socket(vm_dir: &Path) -> PathBuf {
    vm_dir.join(crate::daemon::state::VSOCK_SOCKET)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A stand-in for the agent on a UNIX socket (the `Transport::Unix` the agent serves
    /// as a container's init): reads one request line, answers with `answer(request)`;
    /// an import's bytes are counted and echoed back in an out line.
    fn fake_agent(dir: &Path) -> PathBuf {
        let path = dir.join("agent.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut w = c.try_clone().unwrap();
                    let mut r = BufReader::new(c);
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    let req: Value = serde_json::from_str(&line).unwrap();
                    let reply = match req["op"].as_str().unwrap() {
                        "ping" | "poweroff" => "{\"ok\":true}\n".to_string(),
                        "phases" => "{\"phases\":[{\"name\":\"agent-start\",\"seconds\":1.25},{\"name\":\"etcd-ready\",\"seconds\":12.8}]}\n".into(),
                        "exec" if req["argv"][0] == "false" => "{\"exit\":1}\n".into(),
                        "exec" => format!("{{\"out\":\"ran {}\\n\"}}\n{{\"out\":\"second chunk\"}}\n{{\"exit\":0}}\n", req["argv"][0].as_str().unwrap()),
                        "logs" => "{\"error\":\"no component \\\"x\\\"; see /var/log/kindling\"}\n".into(),
                        "import" => {
                            let n = req["bytes"].as_u64().unwrap();
                            let mut data = Vec::new();
                            (&mut r).take(n).read_to_end(&mut data).unwrap();
                            let sum: u64 = data.iter().map(|b| u64::from(*b)).sum();
                            format!("{{\"out\":\"got {} bytes, sum {sum}\\n\"}}\n{{\"exit\":0}}\n", data.len())
                        }
                        _ => "{\"error\":\"bad request\"}\n".into(),
                    };
                    w.write_all(reply.as_bytes()).unwrap();
                });
            }
        });
        path
    }

    #[test]
    fn requests_and_replies() {
        let d = tempfile::tempdir().unwrap();
        let a = Agent::new(Transport::Unix(fake_agent(d.path())));
        a.ping().unwrap();
        a.poweroff().unwrap();
        assert_eq!(a.phases().unwrap(), vec![Phase { name: "agent-start".into(), seconds: 1.25 }, Phase { name: "etcd-ready".into(), seconds: 12.8 }]);
        assert_eq!(a.exec_capture(&["hostname"]).unwrap(), (0, "ran hostname\nsecond chunk".to_string()));
        assert_eq!(a.exec_capture(&["false"]).unwrap().0, 1);
        let e = a.logs("x", false, &mut |_| {}).unwrap_err();
        assert!(matches!(e, AgentError::Refused(ref m) if m.contains("no component")), "{e}");
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 256) as u8).collect();
        let mut out = String::new();
        let mut reader: &[u8] = &data;
        let code = a.import(&mut reader, data.len() as u64, &mut |s| out.push_str(s)).unwrap();
        let sum: u64 = data.iter().map(|b| u64::from(*b)).sum();
        assert_eq!((code, out), (0, format!("got 1000000 bytes, sum {sum}\n")));
    }

    /// A VMM vsock socket whose guest refuses the first `refusals` connections (closes
    /// them without answering, as the VMM does when the guest misses its deadline), then
    /// accepts and answers a ping.
    fn flaky_vsock(dir: &Path, refusals: usize) -> PathBuf {
        let path = dir.join("vsock.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for (i, c) in l.incoming().flatten().enumerate() {
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                assert_eq!(line, format!("CONNECT {AGENT_PORT}\n"));
                if i < refusals {
                    continue; // dropped: closed without an answer
                }
                let mut w = c;
                w.write_all(b"OK 1073741824\n").unwrap();
                line.clear();
                r.read_line(&mut line).unwrap();
                assert!(line.contains("ping"), "{line}");
                w.write_all(b"{\"ok\":true}\n").unwrap();
            }
        });
        path
    }

    #[test]
    fn a_patient_agent_retries_a_refused_connection() {
        let d = tempfile::tempdir().unwrap();
        let uds = flaky_vsock(d.path(), 2);
        let e = Agent::vsock(&uds).ping().unwrap_err();
        assert!(e.to_string().contains("closed without an answer"), "{e}");
        Agent::vsock(&uds).patient(Duration::from_secs(10)).ping().unwrap();
        // Patience ends: the error is the last refusal.
        let d = tempfile::tempdir().unwrap();
        let uds = flaky_vsock(d.path(), usize::MAX);
        let t0 = std::time::Instant::now();
        let e = Agent::vsock(&uds).patient(Duration::from_secs(2)).ping().unwrap_err();
        assert!(matches!(e, AgentError::Unreachable(_)) && t0.elapsed() >= Duration::from_secs(2), "{e}");
    }

    #[test]
    fn an_absent_agent_is_unreachable() {
        let d = tempfile::tempdir().unwrap();
        let e = Agent::vsock(d.path().join("vsock.sock")).phases().unwrap_err();
        assert!(matches!(e, AgentError::Unreachable(_)), "{e}");
        let e = Agent::new(Transport::Unix(d.path().join("none"))).ping().unwrap_err();
        assert!(e.to_string().starts_with("the node's agent is not reachable"), "{e}");
    }

    #[test]
    fn replies_parse() {
        assert_eq!(parse_reply(r#"{"out":"x"}"#).unwrap(), Reply::Out("x".into()));
        assert_eq!(parse_reply(r#"{"exit":3}"#).unwrap(), Reply::Exit(3));
        assert_eq!(parse_reply(r#"{"ok":true}"#).unwrap(), Reply::Ok);
        assert_eq!(parse_reply(r#"{"error":"no"}"#).unwrap(), Reply::Error("no".into()));
        assert!(parse_reply("garbage").is_err());
        assert!(parse_reply(r#"{"what":1}"#).is_err());
    }

    #[test]
    fn console_phase_lines() {
        let text = "[    1.0] random\nkindling-agent: phase agent-start 1.20\r\nkindling-agent: imported x\n\
                    kindling-agent: phase etcd-ready 12.80\nkindling-agent: phase etcd-ready 99\nkindling-agent: phase broken\n";
        assert_eq!(
            phases_from_console(text),
            vec![Phase { name: "agent-start".into(), seconds: 1.2 }, Phase { name: "etcd-ready".into(), seconds: 12.8 }]
        );
    }
}
