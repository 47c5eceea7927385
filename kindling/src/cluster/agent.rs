//! The host side of the guest agent's control channel (`kindling_proto::agent`): one
//! request line per connection to the agent's vsock port, reached through the VM's
//! vsock socket with the `CONNECT <port>` handshake; replies are lines too, output as
//! raw bytes after an `{"out":N}` line.
//!
//! The guest is untrusted: a reply line longer than [`agent::MAX_LINE`], an output
//! chunk larger than [`agent::MAX_CHUNK`] or a reply that does not parse ends the
//! request with an error; quick requests and captures have a deadline; captured output
//! is capped.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kindling_proto::agent::{self, Reply, Request};
pub use kindling_proto::phase::Phase;

/// The agent's vsock port.
pub const AGENT_PORT: u32 = agent::VSOCK_PORT;
/// The deadline of requests that answer at once (ping, phases, poweroff).
const QUICK_TIMEOUT: Duration = Duration::from_secs(20);
/// The most output [`Agent::exec_capture`] keeps.
pub const MAX_CAPTURE: usize = 16 << 20;

/// Why a request to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No connection: the VM is not up yet, its agent is not listening, or vsock is broken.
    #[error("the node's agent is not reachable: {0}")]
    Unreachable(String),
    /// The agent answered `{"error": …}`.
    #[error("the node's agent refused the request: {0}")]
    Refused(String),
    /// The connection ended, timed out, or carried something that is not a reply.
    #[error("the connection to the node's agent broke: {0}")]
    Broken(String),
}

/// What the agent client's calls return.
pub type Result<T> = std::result::Result<T, AgentError>;

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

fn broken(e: impl std::fmt::Display) -> AgentError {
    AgentError::Broken(e.to_string())
}

/// An open request: the write half and the buffered replies.
struct Conn {
    stream: UnixStream,
    replies: BufReader<UnixStream>,
    deadline: Option<Instant>,
}

impl Conn {
    /// Before each read: the time left until the deadline, as the socket's timeout.
    fn arm(&mut self) -> Result<()> {
        let Some(deadline) = self.deadline else { return Ok(()) };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(AgentError::Broken("no answer in time".into()));
        }
        self.replies.get_ref().set_read_timeout(Some(left)).map_err(broken)
    }

    fn io_error(e: std::io::Error) -> AgentError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                AgentError::Broken("no answer in time".into())
            }
            _ => broken(e),
        }
    }

    /// The next reply line; None when the connection closed.
    fn next(&mut self) -> Result<Option<Reply>> {
        self.arm()?;
        let mut line = Vec::new();
        let n =
            (&mut self.replies).take(agent::MAX_LINE as u64).read_until(b'\n', &mut line).map_err(Self::io_error)?;
        if n == 0 {
            return Ok(None);
        }
        if line.last() != Some(&b'\n') {
            return Err(if n >= agent::MAX_LINE {
                AgentError::Broken(format!("a reply line longer than {} bytes", agent::MAX_LINE))
            } else {
                AgentError::Broken("the connection closed in the middle of a reply".into())
            });
        }
        let text =
            std::str::from_utf8(&line).map_err(|_| AgentError::Broken("a reply line that is not UTF-8".into()))?;
        Reply::parse(text).map(Some).map_err(AgentError::Broken)
    }

    /// The first reply; the connection closing without one is an error.
    fn one(&mut self) -> Result<Reply> {
        match self.next()? {
            Some(Reply::Error(e)) => Err(AgentError::Refused(e)),
            Some(r) => Ok(r),
            None => Err(AgentError::Broken("the agent closed the connection without answering".into())),
        }
    }

    /// Hands output chunks to `on_out` until `{"exit"}`.
    fn stream(&mut self, on_out: &mut dyn FnMut(&[u8])) -> Result<i32> {
        let mut chunk = vec![0u8; agent::MAX_CHUNK];
        loop {
            match self.next()? {
                Some(Reply::Out(n)) => {
                    let n = n as usize;
                    if n > agent::MAX_CHUNK {
                        return Err(AgentError::Broken(format!(
                            "an output chunk of {n} bytes (at most {})",
                            agent::MAX_CHUNK
                        )));
                    }
                    self.arm()?;
                    self.replies.read_exact(&mut chunk[..n]).map_err(Self::io_error)?;
                    on_out(&chunk[..n]);
                }
                Some(Reply::Exit(c)) => return Ok(c),
                Some(Reply::Error(e)) => return Err(AgentError::Refused(e)),
                Some(other) => return Err(AgentError::Broken(format!("unexpected reply {other:?}"))),
                None => {
                    return Err(AgentError::Broken(
                        "the connection closed before the command finished (did the VM stop?)".into(),
                    ))
                }
            }
        }
    }
}

impl Agent {
    /// A client that reaches the agent through `transport`.
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
            Transport::Unix(p) => {
                return UnixStream::connect(p).map_err(|e| AgentError::Unreachable(format!("{}: {e}", p.display())))
            }
        };
        let t0 = Instant::now();
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

    /// Sends `request`; the replies must all have come within `deadline`.
    fn open(&self, request: &Request, deadline: Option<Duration>) -> Result<Conn> {
        let mut stream = self.connect()?;
        stream.set_write_timeout(Some(QUICK_TIMEOUT)).map_err(broken)?;
        stream.write_all(request.to_line().as_bytes()).map_err(broken)?;
        let replies = BufReader::new(stream.try_clone().map_err(broken)?);
        Ok(Conn { stream, replies, deadline: deadline.map(|d| Instant::now() + d) })
    }

    /// Checks that the agent answers.
    pub fn ping(&self) -> Result<()> {
        match self.open(&Request::Ping, Some(QUICK_TIMEOUT))?.one()? {
            Reply::Ok(true) => Ok(()),
            r => Err(AgentError::Broken(format!("unexpected reply {r:?}"))),
        }
    }

    /// The phases the node has reached, in order.
    pub fn phases(&self) -> Result<Vec<Phase>> {
        match self.open(&Request::Phases, Some(QUICK_TIMEOUT))?.one()? {
            Reply::Phases(p) => Ok(p),
            r => Err(AgentError::Broken(format!("unexpected reply {r:?}"))),
        }
    }

    /// Asks the node to shut down in order and power off.
    pub fn poweroff(&self) -> Result<()> {
        match self.open(&Request::Poweroff, Some(QUICK_TIMEOUT))?.one()? {
            Reply::Ok(true) => Ok(()),
            r => Err(AgentError::Broken(format!("unexpected reply {r:?}"))),
        }
    }

    /// Runs `argv` in the guest, handing its output (stdout and stderr, merged, byte for
    /// byte) to `on_out` as it comes; returns its exit code. No deadline: the command
    /// runs as long as the user lets it.
    pub fn exec(&self, argv: &[String], on_out: &mut dyn FnMut(&[u8])) -> Result<i32> {
        self.open(&Request::Exec { argv: argv.to_vec() }, None)?.stream(on_out)
    }

    /// Runs `argv` in the guest and collects its output (at most [`MAX_CAPTURE`] bytes;
    /// more is an error), within `deadline`.
    pub fn exec_capture(&self, argv: &[&str], deadline: Duration) -> Result<(i32, String)> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let mut out = Vec::new();
        let mut too_much = false;
        let code = self.open(&Request::Exec { argv }, Some(deadline))?.stream(&mut |b| {
            if out.len() + b.len() > MAX_CAPTURE {
                too_much = true;
            } else {
                out.extend_from_slice(b);
            }
        })?;
        if too_much {
            return Err(AgentError::Broken(format!("the command's output is larger than {} MiB", MAX_CAPTURE >> 20)));
        }
        Ok((code, String::from_utf8_lossy(&out).into_owned()))
    }

    /// A component's log (`/var/log/kindling/<component>.log`); with `follow`, until the
    /// connection ends.
    pub fn logs(&self, component: &str, follow: bool, on_out: &mut dyn FnMut(&[u8])) -> Result<i32> {
        self.open(&Request::Logs { component: component.to_string(), follow }, None)?.stream(on_out)
    }

    /// Sends `len` bytes of `archive` (an OCI or docker image archive) to the guest's
    /// containerd (namespace k8s.io); hands ctr's output to `on_out`, returns its exit
    /// code. The bytes go from a thread while the replies are read, so a failing import
    /// is reported at once.
    pub fn import(&self, archive: &mut (dyn Read + Send), len: u64, on_out: &mut dyn FnMut(&[u8])) -> Result<i32> {
        let mut conn = self.open(&Request::Import { bytes: len }, None)?;
        let mut sink = conn.stream.try_clone().map_err(broken)?;
        sink.set_write_timeout(None).map_err(broken)?;
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

impl Agent {
    /// Enables (deploys) or disables (removes) an add-on in the node now; its progress
    /// lines go to `on_out`; the exit code says whether it was done. Within `deadline`.
    pub fn addon(&self, name: &str, enable: bool, deadline: Duration, on_out: &mut dyn FnMut(&[u8])) -> Result<i32> {
        self.open(&Request::Addon { name: name.to_string(), enable }, Some(deadline))?.stream(on_out)
    }

    /// Every add-on's state as the node's agent sees it.
    pub fn addons(&self) -> Result<Vec<kindling_proto::addon::AddonState>> {
        match self.open(&Request::Addons, Some(ADDONS_TIMEOUT))?.one()? {
            Reply::Addons(a) => Ok(a),
            r => Err(AgentError::Broken(format!("unexpected reply {r:?}"))),
        }
    }
}

/// The deadline of `{"op":"addons"}` (the agent asks its API server for each add-on).
const ADDONS_TIMEOUT: Duration = Duration::from_secs(120);

/// The vsock socket of a VM directory.
pub fn vsock_socket(vm_dir: &Path) -> PathBuf {
    vm_dir.join(crate::daemon::state::VSOCK_SOCKET)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::os::unix::net::UnixListener;

    /// `{"out":N}` and the N bytes.
    fn out(bytes: &[u8]) -> Vec<u8> {
        let mut v = Reply::Out(bytes.len() as u32).to_line().into_bytes();
        v.extend_from_slice(bytes);
        v
    }

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
                    let exit0 = Reply::Exit(0).to_line().into_bytes();
                    let reply: Vec<u8> = match req["op"].as_str().unwrap() {
                        "ping" | "poweroff" => b"{\"ok\":true}\n".to_vec(),
                        "phases" => b"{\"phases\":[{\"name\":\"agent-start\",\"seconds\":1.25},{\"name\":\"etcd-ready\",\"seconds\":12.8}]}\n".to_vec(),
                        "exec" if req["argv"][0] == "false" => b"{\"exit\":1}\n".to_vec(),
                        // Binary output, and a character split between two chunks.
                        "exec" if req["argv"][0] == "binary" => [out(&[0, 0xff, 0xe2, 0x82]), out(&[0xac, b'\n']), exit0].concat(),
                        "exec" if req["argv"][0] == "long-line" => vec![b'{'; agent::MAX_LINE + 10],
                        "exec" if req["argv"][0] == "huge-chunk" => Reply::Out(u32::MAX).to_line().into_bytes(),
                        "exec" if req["argv"][0] == "flood" => {
                            let chunk = vec![b'x'; agent::MAX_CHUNK];
                            let mut v = Vec::new();
                            for _ in 0..(MAX_CAPTURE / agent::MAX_CHUNK + 2) {
                                v.extend(out(&chunk));
                            }
                            [v, exit0].concat()
                        }
                        "exec" if req["argv"][0] == "silent" => {
                            std::thread::sleep(Duration::from_secs(5));
                            Vec::new()
                        }
                        "exec" => {
                            let ran = format!("ran {}\n", req["argv"][0].as_str().unwrap());
                            [out(ran.as_bytes()), out(b"second chunk"), exit0].concat()
                        }
                        "logs" => b"{\"error\":\"no component \\\"x\\\"; see /var/log/kindling\"}\n".to_vec(),
                        "import" => {
                            let n = req["bytes"].as_u64().unwrap();
                            let mut data = Vec::new();
                            (&mut r).take(n).read_to_end(&mut data).unwrap();
                            let sum: u64 = data.iter().map(|b| u64::from(*b)).sum();
                            [out(format!("got {} bytes, sum {sum}\n", data.len()).as_bytes()), exit0].concat()
                        }
                        _ => b"{\"error\":\"bad request\"}\n".to_vec(),
                    };
                    let _ = w.write_all(&reply);
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
        assert_eq!(
            a.phases().unwrap(),
            vec![
                Phase { name: "agent-start".into(), seconds: 1.25 },
                Phase { name: "etcd-ready".into(), seconds: 12.8 }
            ]
        );
        let t = Duration::from_secs(10);
        assert_eq!(a.exec_capture(&["hostname"], t).unwrap(), (0, "ran hostname\nsecond chunk".to_string()));
        assert_eq!(a.exec_capture(&["false"], t).unwrap().0, 1);
        let mut bytes = Vec::new();
        assert_eq!(a.exec(&["binary".into()], &mut |b| bytes.extend_from_slice(b)).unwrap(), 0);
        assert_eq!(bytes, [0, 0xff, 0xe2, 0x82, 0xac, b'\n'], "byte for byte, across chunks");
        let e = a.logs("x", false, &mut |_| {}).unwrap_err();
        assert!(matches!(e, AgentError::Refused(ref m) if m.contains("no component")), "{e}");
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 256) as u8).collect();
        let mut out = String::new();
        let mut reader: &[u8] = &data;
        let code =
            a.import(&mut reader, data.len() as u64, &mut |s| out.push_str(&String::from_utf8_lossy(s))).unwrap();
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
    fn a_hostile_agent_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        let a = Agent::new(Transport::Unix(fake_agent(d.path())));
        let t = Duration::from_secs(10);
        let e = a.exec_capture(&["long-line"], t).unwrap_err();
        assert!(e.to_string().contains(&format!("longer than {} bytes", agent::MAX_LINE)), "{e}");
        let e = a.exec_capture(&["huge-chunk"], t).unwrap_err();
        assert!(e.to_string().contains("output chunk of 4294967295 bytes"), "{e}");
        let e = a.exec_capture(&["flood"], Duration::from_secs(60)).unwrap_err();
        assert!(e.to_string().contains("larger than 16 MiB"), "{e}");
        let t0 = Instant::now();
        let e = a.exec_capture(&["silent"], Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("no answer in time") && t0.elapsed() < Duration::from_secs(4), "{e}");
    }
}
