//! The guest agent's control channel. The host connects to the agent (vsock port
//! [`VSOCK_PORT`] of the guest; the UNIX socket [`UNIX_SOCKET`] when the agent is a
//! container's init), sends one [`Request`] as a JSON line, and reads [`Reply`] lines
//! until the connection closes or a final reply comes:
//!
//! | request | replies |
//! | --- | --- |
//! | `{"op":"ping"}` | `{"ok":true}` |
//! | `{"op":"phases"}` | `{"phases":[{"name":"agent-start","seconds":1.2},…]}` |
//! | `{"op":"exec","argv":["kubectl","get","nodes"]}` | `{"out":N}` + N bytes, …, then `{"exit":0}` |
//! | `{"op":"logs","component":"etcd","follow":false}` | `{"out":N}` + N bytes, …, then `{"exit":0}` |
//! | `{"op":"poweroff"}` | `{"ok":true}`, then an orderly shutdown |
//! | `{"op":"import","bytes":N}` + N raw bytes | `{"out":N}` + N bytes, …, then `{"exit":0}` |
//! | `{"op":"addon","name":"storage-provisioner","enable":false}` | `{"out":N}` + N bytes (progress), …, then `{"exit":0}` |
//! | `{"op":"addons"}` | `{"addons":[{"name":"storage-provisioner","enabled":true,"deployed":true,"running":true}]}` |
//!
//! Output travels as raw bytes after an `{"out":N}` line, so it arrives byte for byte
//! (binary output, and characters split between chunks, are not altered). A refused
//! request gets `{"error":"…"}`.
//!
//! Both sides treat the other as untrusted: a line is at most [`MAX_LINE`] bytes, an
//! output chunk at most [`MAX_CHUNK`] bytes, argv at most [`MAX_ARGS`] words.

use serde::{Deserialize, Serialize};

use crate::addon::AddonState;
use crate::phase::Phase;

/// vsock port the agent listens on.
pub const VSOCK_PORT: u32 = 1024;
/// Where the agent listens when it is a container's init (under the container's root).
pub const UNIX_SOCKET: &str = "/run/kindling/agent.sock";
/// The longest request or reply line, newline included (an exec argv can carry a
/// manifest).
pub const MAX_LINE: usize = 1 << 20;
/// The largest output chunk that follows an `{"out":N}` line.
pub const MAX_CHUNK: usize = 64 * 1024;
/// The most words an `exec` argv may have.
pub const MAX_ARGS: usize = 4096;

/// One request per connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Is the agent there? Answered `{"ok":true}`.
    Ping,
    /// The phases reached so far.
    Phases,
    /// Runs a command in the node; its stdout and stderr (merged) stream back.
    Exec {
        /// The command and its arguments (no shell).
        argv: Vec<String>,
    },
    /// A component's log (`/var/log/kindling/<component>.log`); with `follow`, what is
    /// appended too, until the connection ends.
    Logs {
        /// `etcd`, `kubelet`, ...: the log's file name without `.log`.
        component: String,
        /// Keep sending what is appended.
        #[serde(default)]
        follow: bool,
    },
    /// An orderly shutdown of the node, then power-off.
    Poweroff,
    /// `bytes` raw bytes of an OCI or docker image archive follow the request line.
    Import {
        /// The archive's size.
        bytes: u64,
    },
    /// Enables (deploys) or disables (removes) an add-on of `crate::addon` now, or after
    /// node-ready when the node is not Ready yet; the exit code says whether it was done.
    Addon {
        /// The add-on's name.
        name: String,
        /// Deploy it (true) or remove it (false).
        enable: bool,
    },
    /// The state of every add-on, as the agent sees it.
    Addons,
}

impl Request {
    /// The request as the line sent on the wire (newline included).
    pub fn to_line(&self) -> String {
        line(self)
    }

    /// Parses a request line; the error says what was wrong with it.
    pub fn parse(line: &str) -> Result<Self, String> {
        serde_json::from_str(line.trim_end()).map_err(|e| format!("bad request {:?}: {e}", truncated(line.trim_end())))
    }
}

/// One reply line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Reply {
    /// The request was done.
    Ok(bool),
    /// The phases reached so far, in order.
    Phases(Vec<Phase>),
    /// Every add-on's state, in the catalogue's order.
    Addons(Vec<AddonState>),
    /// N raw bytes of output follow this line.
    Out(u32),
    /// The command ended with this exit code (final).
    Exit(i32),
    /// The request was refused or failed; the sentence says why (final).
    Error(String),
}

impl Reply {
    /// The reply as the line sent on the wire (newline included).
    pub fn to_line(&self) -> String {
        line(self)
    }

    /// Parses a reply line; the error says what was wrong with it.
    pub fn parse(line: &str) -> Result<Self, String> {
        serde_json::from_str(line.trim_end())
            .map_err(|e| format!("unexpected reply {:?}: {e}", truncated(line.trim_end())))
    }
}

/// At most 200 characters of `s`, for error messages about untrusted input.
fn truncated(s: &str) -> String {
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

fn line(v: &impl Serialize) -> String {
    // These types always serialize: no maps with non-string keys, and serde_json
    // writes non-finite floats as null.
    let mut s = serde_json::to_string(v).expect("the agent protocol's types always serialize");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_have_their_documented_shape() {
        assert_eq!(Request::Ping.to_line(), "{\"op\":\"ping\"}\n");
        assert_eq!(
            Request::Exec { argv: vec!["ls".into(), "/\"x\"".into()] }.to_line(),
            "{\"op\":\"exec\",\"argv\":[\"ls\",\"/\\\"x\\\"\"]}\n"
        );
        assert_eq!(Request::Import { bytes: 1 << 20 }.to_line(), "{\"op\":\"import\",\"bytes\":1048576}\n");
        assert_eq!(Reply::Ok(true).to_line(), "{\"ok\":true}\n");
        assert_eq!(Reply::Out(12).to_line(), "{\"out\":12}\n");
        assert_eq!(Reply::Exit(-1).to_line(), "{\"exit\":-1}\n");
        assert_eq!(Reply::Error("no \u{1}".into()).to_line(), "{\"error\":\"no \\u0001\"}\n");
        let p = Reply::Phases(vec![Phase { name: "agent-start".into(), seconds: 1.25 }]);
        assert_eq!(p.to_line(), "{\"phases\":[{\"name\":\"agent-start\",\"seconds\":1.25}]}\n");
    }

    #[test]
    fn lines_parse_back_and_bad_ones_are_refused() {
        for r in [
            Request::Ping,
            Request::Phases,
            Request::Poweroff,
            Request::Exec { argv: vec!["a b".into()] },
            Request::Logs { component: "etcd".into(), follow: true },
            Request::Import { bytes: 7 },
            Request::Addon { name: "storage-provisioner".into(), enable: false },
            Request::Addons,
        ] {
            assert_eq!(serde_json::from_str::<Request>(&r.to_line()).unwrap(), r);
        }
        let state = AddonState { name: "a".into(), enabled: true, deployed: Some(true), running: None };
        for r in [
            Reply::Ok(true),
            Reply::Out(3),
            Reply::Exit(2),
            Reply::Error("x".into()),
            Reply::Phases(vec![]),
            Reply::Addons(vec![state]),
        ] {
            assert_eq!(serde_json::from_str::<Reply>(&r.to_line()).unwrap(), r);
        }
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"logs","component":"etcd"}"#).unwrap(),
            Request::Logs { component: "etcd".into(), follow: false }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"import"}"#).is_err(), "the size is required");
        assert!(serde_json::from_str::<Request>(r#"{"op":"import","bytes":-1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"format-disk"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"addon","name":"x"}"#).is_err(), "enable is required");
        assert_eq!(
            Request::Addon { name: "x".into(), enable: true }.to_line(),
            "{\"op\":\"addon\",\"name\":\"x\",\"enable\":true}\n"
        );
        assert!(Request::parse("not json").unwrap_err().contains("bad request"));
        assert!(serde_json::from_str::<Reply>(r#"{"what":1}"#).is_err());
        assert!(serde_json::from_str::<Reply>(r#"{"out":-1}"#).is_err());
    }
}
