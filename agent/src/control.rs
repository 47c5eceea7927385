//! The agent's control channel: how the host asks the guest to do things. In a VM it
//! listens on vsock port [`VSOCK_PORT`]; in a container on the UNIX socket
//! [`UNIX_SOCKET`]. One request per connection, as one JSON line; replies are JSON lines:
//!
//! | request | replies |
//! | --- | --- |
//! | `{"op":"ping"}` | `{"ok":true}` |
//! | `{"op":"phases"}` | `{"phases":[{"name":"agent-start","seconds":1.2},…]}` |
//! | `{"op":"exec","argv":["kubectl","get","nodes"]}` | `{"out":"…"}`… then `{"exit":0}` |
//! | `{"op":"logs","component":"etcd","follow":false}` | `{"out":"…"}`… then `{"exit":0}` |
//! | `{"op":"poweroff"}` | `{"ok":true}`, then an orderly shutdown |
//!
//! A bad request gets `{"error":"…"}`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::json;

use crate::node::Paths;
use crate::phase;
use crate::supervisor::Reaper;

/// vsock port the agent listens on (the host connects to guest CID 3, this port).
pub const VSOCK_PORT: u32 = 1024;
/// Where the agent listens when it is a container's init.
pub const UNIX_SOCKET: &str = "/run/kindling/agent.sock";

#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Ping,
    Phases,
    Exec { argv: Vec<String> },
    Logs { component: String, #[serde(default)] follow: bool },
    Poweroff,
}

/// Starts the listener thread: vsock in a VM, a UNIX socket in a container.
pub fn serve(paths: Paths, reaper: Arc<Reaper>, container: bool) -> Result<()> {
    let ctx = Arc::new(Ctx { paths, reaper });
    if container {
        let path = ctx.paths.root.join(UNIX_SOCKET.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().unwrap())?;
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
        std::thread::Builder::new().name("control".into()).spawn(move || {
            for conn in listener.incoming().flatten() {
                let ctx = ctx.clone();
                std::thread::spawn(move || handle(&ctx, conn));
            }
        })?;
    } else {
        let fd = vsock_listen(VSOCK_PORT).context("listening on vsock (is there a virtio-vsock device?)")?;
        std::thread::Builder::new().name("control".into()).spawn(move || loop {
            match nix::sys::socket::accept(std::os::fd::AsRawFd::as_raw_fd(&fd)) {
                // SAFETY: accept returned a new descriptor that nothing else owns.
                Ok(conn) => {
                    let conn = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(conn) });
                    let ctx = ctx.clone();
                    std::thread::spawn(move || handle(&ctx, conn));
                }
                Err(e) => {
                    phase::log(format!("control: accept: {e}"));
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        })?;
    }
    Ok(())
}

fn vsock_listen(port: u32) -> nix::Result<OwnedFd> {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};
    let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    listen(&fd, Backlog::new(16)?)?;
    Ok(fd)
}

struct Ctx {
    paths: Paths,
    reaper: Arc<Reaper>,
}

fn send(out: &mut impl Write, v: serde_json::Value) -> std::io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    out.write_all(line.as_bytes())
}

fn handle<S: Read + Write + TryCloneStream>(ctx: &Ctx, conn: S) {
    let Ok(mut out) = conn.try_clone_stream() else { return };
    let mut line = String::new();
    if BufReader::new(conn).read_line(&mut line).is_err() {
        return;
    }
    let _ = match serde_json::from_str::<Request>(line.trim()) {
        Ok(req) => dispatch(ctx, req, &mut out),
        Err(e) => send(&mut out, json!({ "error": format!("bad request {:?}: {e}", line.trim()) })),
    };
}

fn dispatch(ctx: &Ctx, req: Request, out: &mut impl Write) -> std::io::Result<()> {
    match req {
        Request::Ping => send(out, json!({ "ok": true })),
        Request::Phases => {
            let phases: Vec<_> = phase::reached().into_iter().map(|(name, seconds)| json!({ "name": name, "seconds": seconds })).collect();
            send(out, json!({ "phases": phases }))
        }
        Request::Exec { argv } if argv.is_empty() => send(out, json!({ "error": "exec needs a command" })),
        Request::Exec { argv } => {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            match ctx.reaper.run_streaming(&argv, &mut |chunk| send(out, json!({ "out": String::from_utf8_lossy(chunk) }))) {
                Ok(code) => send(out, json!({ "exit": code })),
                Err(e) => send(out, json!({ "error": format!("{}: {e}", argv[0]) })),
            }
        }
        Request::Logs { component, follow } => {
            let Some(log) = component_log(&ctx.paths, &component) else {
                return send(out, json!({ "error": format!("no component {component:?}; see /var/log/kindling") }));
            };
            stream_file(&log, follow, out)?;
            send(out, json!({ "exit": 0 }))
        }
        Request::Poweroff => {
            send(out, json!({ "ok": true }))?;
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(1), nix::sys::signal::Signal::SIGTERM);
            Ok(())
        }
    }
}

/// The log of a component, refusing names that would leave the log directory.
fn component_log(paths: &Paths, component: &str) -> Option<PathBuf> {
    let ok = !component.is_empty() && component.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let p = paths.logs().join(format!("{component}.log"));
    (ok && p.is_file()).then_some(p)
}

/// Sends a file's contents; with `follow`, keeps sending what is appended until the
/// peer goes away.
fn stream_file(path: &Path, follow: bool, out: &mut impl Write) -> std::io::Result<()> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n > 0 {
            send(out, json!({ "out": String::from_utf8_lossy(&buf[..n]) }))?;
        } else if follow {
            std::thread::sleep(Duration::from_millis(250));
        } else {
            return Ok(());
        }
    }
}

/// A connection whose write half can be cloned off its read half.
pub trait TryCloneStream: Sized {
    fn try_clone_stream(&self) -> std::io::Result<Self>;
}

impl TryCloneStream for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
}

impl TryCloneStream for std::fs::File {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_are_refused() {
        assert_eq!(serde_json::from_str::<Request>(r#"{"op":"exec","argv":["ls","/"]}"#).unwrap(), Request::Exec { argv: vec!["ls".into(), "/".into()] });
        assert_eq!(serde_json::from_str::<Request>(r#"{"op":"logs","component":"etcd"}"#).unwrap(), Request::Logs { component: "etcd".into(), follow: false });
        assert!(serde_json::from_str::<Request>(r#"{"op":"format-disk"}"#).is_err());
        assert!(serde_json::from_str::<Request>("not json").is_err());
    }

    #[test]
    fn log_names_cannot_escape_the_log_directory() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        std::fs::create_dir_all(paths.logs()).unwrap();
        std::fs::write(paths.logs().join("etcd.log"), "x").unwrap();
        assert!(component_log(&paths, "etcd").is_some());
        assert!(component_log(&paths, "../../etc/shadow").is_none());
        assert!(component_log(&paths, "missing").is_none());
    }

}
