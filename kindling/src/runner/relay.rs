//! The emulated runner's relay: how the host reaches the guest's vsock device in the
//! level-1 VM. On the host, the VM's vsock UNIX socket (in the VM owner's 0700
//! directory) accepts connections and passes each one to a TCP port that QEMU's user
//! networking forwards into L1 (`hostfwd`); in L1, kindling passes it on to the L2
//! VMM's vsock socket.
//!
//! QEMU's forwarded port listens on the host's loopback, where every local user can
//! connect. So the relay authenticates: the host makes a random 256-bit token per VM
//! and hands it to L1 in its initramfs (a file only the VM's owner can read); each
//! relayed connection starts with a line `<token> <verb>`, and L1 drops a connection
//! whose token is wrong (compared in constant time) or late. The verbs: `vsock` (the
//! rest of the connection goes to the L2 VMM's vsock socket), `shutdown` (the
//! kindling in L1 gets SIGTERM, its orderly stop, and answers `ok`) and `snapshot`
//! (it gets SIGUSR1, which writes the snapshot `--snapshot-to` names, and answers `ok`). Relayed
//! connections are bounded in number on both sides.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::forward::{splice, ConnLimit};

/// The token's length in bytes (hex on the wire).
const TOKEN_BYTES: usize = 32;
/// How long L1 waits for a connection's token line.
const TOKEN_DEADLINE: Duration = Duration::from_secs(10);
/// Relayed connections at once, per VM: every forward's, and room beyond them for the
/// owner's own (the agent channel); the guest's vsock device takes 1024.
pub const MAX_RELAYED: usize = crate::forward::MAX_FORWARDED + 128;

/// A relay token, as hex.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// A new random token, from the kernel's random source.
    pub fn generate() -> std::io::Result<Self> {
        let mut raw = [0u8; TOKEN_BYTES];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
        Ok(Self(hex::encode(raw)))
    }

    /// The token as written to a file or the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A token read back from `text` (its first line).
    pub fn parse(text: &str) -> Option<Self> {
        let t = text.lines().next()?.trim();
        (t.len() == 2 * TOKEN_BYTES && t.bytes().all(|b| b.is_ascii_hexdigit())).then(|| Self(t.to_string()))
    }

    /// Compares in time that does not depend on where `other` differs.
    fn matches(&self, other: &[u8]) -> bool {
        let ours = self.0.as_bytes();
        other.len() == ours.len() && ours.iter().zip(other).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// Host side: the vsock socket at `uds`; removes it when dropped.
pub struct HostRelay {
    uds: PathBuf,
}

impl HostRelay {
    /// Serves `uds`, passing each connection, after the token's line, to
    /// `127.0.0.1:relay_port`.
    pub fn start(uds: &Path, relay_port: u16, token: Token) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(uds);
        let listener = UnixListener::bind(uds)?;
        let limit = ConnLimit::new(MAX_RELAYED);
        std::thread::Builder::new().name("vsock-relay".into()).spawn(move || {
            for conn in listener.incoming() {
                let conn = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("vsock relay: accept: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let Some(slot) = limit.take() else {
                    tracing::warn!("vsock relay: {MAX_RELAYED} connections are open; refusing another");
                    continue;
                };
                let token = token.clone();
                let spawned = std::thread::Builder::new().name("vsock-relay-conn".into()).spawn(move || {
                    let _slot = slot;
                    match TcpStream::connect(("127.0.0.1", relay_port)) {
                        Ok(mut l1) => {
                            if l1.write_all(format!("{} {VSOCK}\n", token.as_str()).as_bytes()).is_ok() {
                                splice(conn, l1);
                            }
                        }
                        Err(e) => tracing::warn!("vsock relay: cannot reach the level-1 VM: {e}"),
                    }
                });
                if let Err(e) = spawned {
                    tracing::warn!("vsock relay: cannot start a thread for a connection: {e}");
                }
            }
        })?;
        Ok(Self { uds: uds.to_path_buf() })
    }
}

impl Drop for HostRelay {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

/// The verb of a connection to the guest's vsock.
const VSOCK: &str = "vsock";
/// The verb asking the VMM in L1 to stop in order.
pub const SHUTDOWN: &str = "shutdown";
/// The verb asking the VMM in L1 for a snapshot.
pub const SNAPSHOT: &str = "snapshot";
/// The longest verb.
const MAX_VERB: usize = 16;

/// Reads the first line of `conn` (at most the token, a space and a verb) within the
/// deadline; the verb when the token is `token`.
fn authenticated(conn: &mut TcpStream, token: &Token) -> Option<String> {
    conn.set_read_timeout(Some(TOKEN_DEADLINE)).ok()?;
    let mut line = Vec::with_capacity(2 * TOKEN_BYTES + 1 + MAX_VERB);
    let mut byte = [0u8];
    loop {
        match conn.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) if line.len() < 2 * TOKEN_BYTES + 1 + MAX_VERB => line.push(byte[0]),
            _ => return None,
        }
    }
    let (given, verb) = line.split_at(line.iter().position(|&b| b == b' ').unwrap_or(line.len()));
    if !token.matches(given) {
        return None;
    }
    conn.set_read_timeout(None).ok()?;
    Some(String::from_utf8_lossy(verb).trim().to_string())
}

/// Host side: asks the kindling in L1 for its orderly stop, through the relay port;
/// retries until L1 answers (it may not be listening yet) or `patience` runs out.
pub fn ask_shutdown(relay_port: u16, token: &Token, patience: Duration) -> std::io::Result<()> {
    ask(relay_port, token, SHUTDOWN, patience)
}

/// Host side: sends `verb` ([`SHUTDOWN`], [`SNAPSHOT`]) to the kindling in L1 through the
/// relay port; retries until L1 acknowledges (it may not be listening yet) or
/// `patience` runs out.
pub fn ask(relay_port: u16, token: &Token, verb: &str, patience: Duration) -> std::io::Result<()> {
    let t0 = std::time::Instant::now();
    loop {
        let attempt = (|| -> std::io::Result<()> {
            let mut s = TcpStream::connect(("127.0.0.1", relay_port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(format!("{} {verb}\n", token.as_str()).as_bytes())?;
            let mut answer = [0u8; 3];
            s.read_exact(&mut answer)?;
            if &answer == b"ok\n" {
                Ok(())
            } else {
                Err(std::io::Error::other("the level-1 VM did not acknowledge"))
            }
        })();
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) if t0.elapsed() >= patience => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Inside L1: serves `port`, passing each authenticated `vsock` connection to the L2
/// VMM's vsock socket `vsock` (when the VM has one), and calling `on_shutdown` for an
/// authenticated `shutdown` request and `on_snapshot` for a `snapshot` one.
pub fn serve_in_l1(port: u16, token: Token, vsock: Option<&'static str>, on_shutdown: fn(), on_snapshot: fn()) {
    let listener = match std::net::TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kindling-l1: vsock relay: cannot listen on port {port}: {e}");
            return;
        }
    };
    let limit = ConnLimit::new(MAX_RELAYED);
    let started = std::thread::Builder::new().name("l1-relay".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            let Some(slot) = limit.take() else { continue };
            let token = token.clone();
            let _ = std::thread::Builder::new().name("l1-relay-conn".into()).spawn(move || {
                let _slot = slot;
                // Dropped unless it knows the token: not the VM's owner.
                match authenticated(&mut conn, &token).as_deref() {
                    Some(VSOCK) => match vsock.map(UnixStream::connect) {
                        Some(Ok(v)) => splice(conn, v),
                        Some(Err(e)) => eprintln!("kindling-l1: vsock relay: {}: {e}", vsock.unwrap_or("")),
                        None => {}
                    },
                    Some(SHUTDOWN) => {
                        on_shutdown();
                        let _ = conn.write_all(b"ok\n");
                    }
                    Some(SNAPSHOT) => {
                        on_snapshot();
                        let _ = conn.write_all(b"ok\n");
                    }
                    _ => {}
                }
            });
        }
    });
    if let Err(e) = started {
        eprintln!("kindling-l1: vsock relay: cannot start: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn tokens_are_random_and_parse_back() {
        let a = Token::generate().unwrap();
        let b = Token::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(Token::parse(&format!("{}\n", a.as_str())), Some(a.clone()));
        assert_eq!(Token::parse("short"), None);
        assert!(a.matches(a.as_str().as_bytes()) && !a.matches(b.as_str().as_bytes()) && !a.matches(b""));
    }

    /// The whole relay on real sockets: the host side, L1's side (on a loopback port)
    /// and a stand-in for the L2 VMM's socket. The owner's connection gets through;
    /// another local user's, straight to the TCP port, does not reach the VMM.
    #[test]
    fn only_connections_with_the_token_reach_the_vmm() {
        let d = tempfile::tempdir().unwrap();
        let vmm: &'static str = Box::leak(d.path().join("l2.sock").to_str().unwrap().to_string().into_boxed_str());
        let l2 = UnixListener::bind(vmm).unwrap();
        let reached = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r = reached.clone();
        std::thread::spawn(move || {
            for mut c in l2.incoming().flatten() {
                r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut line = [0u8; 6];
                if c.read_exact(&mut line).is_ok() {
                    let _ = c.write_all(&line.to_ascii_uppercase());
                }
            }
        });
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let token = Token::generate().unwrap();
        let token2 = token.clone();
        static SHUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        serve_in_l1(port, token.clone(), Some(vmm), || SHUT.store(true, std::sync::atomic::Ordering::SeqCst), || {});
        let uds = d.path().join("vsock.sock");
        let _relay = HostRelay::start(&uds, port, token).unwrap();

        let mut owner = UnixStream::connect(&uds).unwrap();
        owner.write_all(b"hello\n").unwrap();
        let mut back = [0u8; 6];
        owner.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"HELLO\n");

        for attempt in [
            b"CONNECT 1024\n".to_vec(),
            format!("{} vsock\n", "0".repeat(64)).into_bytes(),
            format!("{} shutdown\n", "0".repeat(64)).into_bytes(),
            vec![b'a'; 4096],
        ] {
            let mut intruder = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let _ = intruder.write_all(&attempt);
            intruder.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 16];
            assert!(matches!(intruder.read(&mut buf), Ok(0) | Err(_)), "an intruder got an answer");
        }
        assert_eq!(reached.load(std::sync::atomic::Ordering::SeqCst), 1, "only the owner's connection reached the VMM");
        assert!(!SHUT.load(std::sync::atomic::Ordering::SeqCst), "an intruder cannot stop the VM");
        // The owner can: the request is acknowledged once L1 took it.
        ask_shutdown(port, &token2, Duration::from_secs(10)).unwrap();
        assert!(SHUT.load(std::sync::atomic::Ordering::SeqCst));
    }
}
