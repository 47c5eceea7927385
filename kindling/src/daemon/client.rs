//! A client of the daemon's API, for the `kindling` CLI (and the tests).
//!
//! It is a small HTTP/1.1 client over a blocking `std::os::unix::net::UnixStream`, one
//! request per connection (`Connection: close`). The CLI is synchronous and makes a few
//! requests per command, so this avoids starting an async runtime in every CLI command
//! for hyper's client, and no maintained blocking HTTP client crate speaks HTTP over a
//! UNIX socket without a custom transport of about this size. It understands what the
//! daemon's server (hyper, through axum) sends: Content-Length or chunked bodies.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::api::{self, Deleted, ErrorBody, SnapshotRequest, StartRequest, StopRequest, VersionInfo, Vm, VmSpec};
use super::state::{self, Paths};

/// How long a daemon of another build has to exit before one of this build starts.
const DAEMON_STOP_WAIT: Duration = Duration::from_secs(30);
/// How long `connect_or_spawn` waits for a daemon it started.
pub const SPAWN_WAIT: Duration = Duration::from_secs(5);
/// Read timeout of requests that do not wait for a VM.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Added to a stop's own timeout: the SIGKILL grace and the daemon's bookkeeping.
const STOP_MARGIN: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("daemon not reachable at {}: {reason}; start it with `kindling daemon` and see its log at {}", socket.display(), log.display())]
    Unreachable { socket: PathBuf, log: PathBuf, reason: String },
    /// The daemon refused the request; `message` says what to do.
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("bad answer from the daemon at {}: {message}", socket.display())]
    Protocol { socket: PathBuf, message: String },
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// An HTTP response as received.
#[derive(Clone, Debug)]
pub struct RawResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// Talks to one daemon socket.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into() }
    }

    /// The socket of `$KINDLING_SOCKET`, else the default one.
    pub fn from_env() -> Self {
        Self::new(state::socket_from_env())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn log_hint(&self) -> PathBuf {
        Paths::from_env().daemon_log()
    }

    /// A client of a daemon that answers now.
    pub fn connect() -> Result<Self> {
        let c = Self::from_env();
        c.version()?;
        Ok(c)
    }

    /// A client of the running daemon; when none answers, starts `kindling daemon`
    /// (detached, logging to `<state>/daemon.log`) and waits up to 5 s for it.
    pub fn connect_or_spawn() -> Result<Self> {
        let c = Self::from_env();
        let paths = Paths::from_env();
        let exe = std::env::current_exe().map_err(|e| ClientError::Unreachable {
            socket: c.socket.clone(),
            log: paths.daemon_log(),
            reason: format!("cannot locate the kindling executable: {e}"),
        })?;
        c.ensure_daemon(&exe, &paths)?;
        Ok(c)
    }

    /// Makes sure a daemon answers on this client's socket: when none does, starts
    /// `<exe> daemon --socket <socket>` with the state directory of `paths` (in its own
    /// session, logging to `<state>/daemon.log`) and waits up to 5 s for it.
    /// A daemon of another build than `exe` (kindling was reinstalled, or a daemon from
    /// before an upgrade still runs) is stopped first and started again from `exe`: its
    /// API may not take this client's requests. Its VMs keep running meanwhile.
    pub fn ensure_daemon(&self, exe: &Path, paths: &Paths) -> Result<VersionInfo> {
        let log_path = paths.daemon_log();
        if let Ok(v) = self.version() {
            if v.build.is_some() && v.build == crate::util::exe_identity(exe) {
                return Ok(v);
            }
            tracing::info!(
                "the running daemon (pid {}, kindling {}) is another build than {}: restarting it (its VMs keep running)",
                v.pid,
                v.version,
                exe.display()
            );
            self.stop_daemon(v.pid, paths).map_err(|reason| ClientError::Unreachable {
                socket: self.socket.clone(),
                log: log_path.clone(),
                reason,
            })?;
        }
        let unreachable =
            |reason: String| ClientError::Unreachable { socket: self.socket.clone(), log: log_path.clone(), reason };
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        // Only the user: the daemon's log and the VMs' files are nobody else's.
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&paths.state_dir).map_err(|e| {
            unreachable(format!("cannot create the state directory {}: {e}", paths.state_dir.display()))
        })?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| unreachable(format!("cannot open {}: {e}", log_path.display())))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("daemon")
            .arg("--socket")
            .arg(&self.socket)
            .env("KINDLING_STATE_DIR", &paths.state_dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|e| unreachable(e.to_string()))?)
            .stderr(log);
        // SAFETY: setsid is async-signal-safe; the daemon leaves our session and terminal.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setsid();
                Ok(())
            });
        }
        let mut child =
            cmd.spawn().map_err(|e| unreachable(format!("cannot start `{} daemon`: {e}", exe.display())))?;
        let t0 = Instant::now();
        let mut last = String::from("it did not answer");
        while t0.elapsed() < SPAWN_WAIT {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = std::fs::read(&log_path).ok().map(|b| {
                    let b = &b[(log_start as usize).min(b.len())..];
                    String::from_utf8_lossy(b).trim().lines().last().unwrap_or("").to_string()
                });
                return Err(unreachable(format!(
                    "the daemon it started exited at once ({status}){}",
                    tail.filter(|t| !t.is_empty()).map(|t| format!(": {t}")).unwrap_or_default()
                )));
            }
            match self.version() {
                Ok(v) => {
                    // Reap it if it exits while this process still runs.
                    std::thread::spawn(move || child.wait());
                    return Ok(v);
                }
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::spawn(move || child.wait());
        Err(unreachable(format!("a daemon was started but did not answer within {}s ({last})", SPAWN_WAIT.as_secs())))
    }

    /// Stops the daemon `pid` that answers on this socket (SIGTERM) and waits until it
    /// no longer answers.
    fn stop_daemon(&self, pid: u32, paths: &Paths) -> std::result::Result<(), String> {
        let pid_t = i32::try_from(pid).map_err(|_| format!("the daemon reported pid {pid}"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid_t), nix::sys::signal::Signal::SIGTERM).map_err(|e| {
            format!("cannot stop the running daemon of another build (pid {pid}): {e}; stop it with `kill {pid}`")
        })?;
        let t0 = Instant::now();
        // It ends once its requests in flight have been answered.
        while t0.elapsed() < DAEMON_STOP_WAIT {
            // Gone once it no longer holds the state directory's lock.
            let free = std::fs::File::open(paths.lock_file())
                .map_or(true, |f| crate::util::lock_exclusive(&f, false).unwrap_or(false));
            if free && self.version().is_err() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "the running daemon of another build (pid {pid}) did not exit within {}s of SIGTERM (a long request may be in flight); \
             try again, or `kill {pid}`",
            DAEMON_STOP_WAIT.as_secs()
        ))
    }

    /// One HTTP request; any status is returned as is.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>, timeout: Duration) -> Result<RawResponse> {
        let unreachable = |e: std::io::Error| ClientError::Unreachable {
            socket: self.socket.clone(),
            log: self.log_hint(),
            reason: e.to_string(),
        };
        let protocol = |message: String| ClientError::Protocol { socket: self.socket.clone(), message };
        let mut s = UnixStream::connect(&self.socket).map_err(unreachable)?;
        s.set_read_timeout(Some(timeout)).map_err(unreachable)?;
        s.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(unreachable)?;
        let body = body.unwrap_or_default();
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: kindling\r\nConnection: close\r\nAccept: application/json\r\n");
        if !body.is_empty() || method == "POST" || method == "PUT" {
            req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut raw = req.into_bytes();
        raw.extend_from_slice(body);
        s.write_all(&raw).map_err(|e| protocol(format!("sending {method} {path}: {e}")))?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                protocol(format!("no answer to {method} {path} within {}s", timeout.as_secs()))
            }
            _ => protocol(format!("reading the answer to {method} {path}: {e}")),
        })?;
        parse_response(&answer).map_err(|m| protocol(format!("{method} {path}: {m}")))
    }

    /// A JSON request; a non-2xx answer becomes [`ClientError::Api`].
    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<T> {
        let r = self.request(method, path, body.as_deref(), timeout)?;
        let r = self.check(r)?;
        serde_json::from_slice(&r.body).map_err(|e| ClientError::Protocol {
            socket: self.socket.clone(),
            message: format!("{method} {path}: unexpected JSON ({e})"),
        })
    }

    fn check(&self, r: RawResponse) -> Result<RawResponse> {
        if (200..300).contains(&r.status) {
            return Ok(r);
        }
        let message = match serde_json::from_slice::<ErrorBody>(&r.body) {
            Ok(e) => e.error,
            Err(_) => format!("the daemon answered {}: {}", r.status, String::from_utf8_lossy(&r.body).trim()),
        };
        Err(ClientError::Api { status: r.status, message })
    }

    pub fn version(&self) -> Result<VersionInfo> {
        self.call("GET", "/v1/version", None, Duration::from_secs(5))
    }

    pub fn list(&self) -> Result<Vec<Vm>> {
        self.call("GET", "/v1/vms", None, REQUEST_TIMEOUT)
    }

    /// Creates a VM (relative paths in the spec are taken from this process's working
    /// directory, since the daemon's is another).
    pub fn create(&self, spec: &VmSpec) -> Result<Vm> {
        let mut spec = spec.clone();
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                if let Ok(a) = std::path::absolute(&*p) {
                    *p = a;
                }
            }
        };
        abs(&mut spec.kernel);
        if let Some(i) = spec.initrd.as_mut() {
            abs(i);
        }
        for d in &mut spec.disks {
            abs(&mut d.path);
        }
        let body = serde_json::to_vec(&spec).expect("a spec serializes");
        self.call("POST", "/v1/vms", Some(body), REQUEST_TIMEOUT)
    }

    pub fn get(&self, name: &str) -> Result<Vm> {
        self.call("GET", &format!("/v1/vms/{}", encode(name)), None, REQUEST_TIMEOUT)
    }

    pub fn start(&self, name: &str) -> Result<Vm> {
        self.start_with(name, &StartRequest::default())
    }

    /// Starts a VM: resumes it from its snapshot if it has one, unless `req.cold` (which
    /// drops the snapshot and boots afresh).
    pub fn start_with(&self, name: &str, req: &StartRequest) -> Result<Vm> {
        let body = serde_json::to_vec(req).expect("serializes");
        self.call("POST", &format!("/v1/vms/{}/start", encode(name)), Some(body), REQUEST_TIMEOUT)
    }

    /// Suspends a running VM: its VMM writes a snapshot and ends (within `timeout`, the
    /// daemon's default of 600 s when None).
    pub fn snapshot(&self, name: &str, timeout: Option<Duration>) -> Result<Vm> {
        let req = SnapshotRequest { timeout_secs: timeout.map(|t| t.as_secs()) };
        let wait = timeout.unwrap_or(Duration::from_secs(api::DEFAULT_SNAPSHOT_TIMEOUT_SECS)) + STOP_MARGIN;
        let body = serde_json::to_vec(&req).expect("serializes");
        self.call("POST", &format!("/v1/vms/{}/snapshot", encode(name)), Some(body), wait)
    }

    /// Stops a VM: SIGTERM, then SIGKILL after `timeout` (the daemon's default, 60 s,
    /// when None).
    pub fn stop(&self, name: &str, timeout: Option<Duration>) -> Result<Vm> {
        let req = StopRequest { timeout_secs: timeout.map(|t| t.as_secs()) };
        let wait = timeout.unwrap_or(Duration::from_secs(api::DEFAULT_STOP_TIMEOUT_SECS)) + STOP_MARGIN;
        let body = serde_json::to_vec(&req).expect("serializes");
        self.call("POST", &format!("/v1/vms/{}/stop", encode(name)), Some(body), wait)
    }

    /// Deletes a VM, stopping it first when it runs.
    pub fn delete(&self, name: &str) -> Result<Deleted> {
        let wait = Duration::from_secs(api::DEFAULT_STOP_TIMEOUT_SECS) + STOP_MARGIN;
        self.call("DELETE", &format!("/v1/vms/{}", encode(name)), None, wait)
    }

    /// The VM's console log (its last `tail` lines when given).
    pub fn console(&self, name: &str, tail: Option<usize>) -> Result<String> {
        let mut path = format!("/v1/vms/{}/console", encode(name));
        if let Some(n) = tail {
            path.push_str(&format!("?tail={n}"));
        }
        let r = self.request("GET", &path, None, REQUEST_TIMEOUT)?;
        let r = self.check(r)?;
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }
}

/// Percent-encodes a path segment (VM names are plain, but a bad one must not change
/// the route).
fn encode(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parses a whole HTTP/1.1 response (read until the server closed the connection).
pub fn parse_response(raw: &[u8]) -> std::result::Result<RawResponse, String> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no complete HTTP header")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "HTTP header is not UTF-8")?;
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (proto, code) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if !proto.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 status line: {status_line:?}"));
    }
    let status: u16 = code.parse().map_err(|_| format!("bad status line {status_line:?}"))?;
    let (mut length, mut chunked, mut content_type) = (None, false, None);
    for line in lines {
        let Some((k, v)) = line.split_once(':') else { continue };
        let v = v.trim();
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = Some(v.parse::<usize>().map_err(|_| format!("bad Content-Length {v:?}"))?),
            "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
            "content-type" => content_type = Some(v.to_string()),
            _ => {}
        }
    }
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n).ok_or_else(|| format!("body cut short: {} of {n} bytes", rest.len()))?.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(RawResponse { status, content_type, body })
}

fn dechunk(mut data: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").ok_or("chunked body cut short")?;
        let size_text = std::str::from_utf8(&data[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| format!("bad chunk size {size_text:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data.get(..size).ok_or("chunk cut short")?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).ok_or("chunk cut short")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_and_chunked_bodies() {
        let r =
            parse_response(b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
                .unwrap();
        assert_eq!(
            (r.status, r.content_type.as_deref(), r.body.as_slice()),
            (201, Some("application/json"), &b"{}"[..])
        );
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, b"abcde");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab").is_err());
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
    }

    #[test]
    fn unreachable_daemon_says_how_to_start_it() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("none.sock");
        let e = Client::new(&sock).list().unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with(&format!("daemon not reachable at {}: ", sock.display())), "{msg}");
        assert!(msg.contains("start it with `kindling daemon` and see its log at "), "{msg}");
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode("node-1"), "node-1");
        assert_eq!(encode("../x y"), "..%2Fx%20y");
    }
}
