//! The agent's control channel: how the host asks the guest to do things. In a VM it
//! listens on vsock port [`VSOCK_PORT`]; in a container on the UNIX socket
//! [`UNIX_SOCKET`]. One request per connection, as one JSON line; the requests and
//! replies are `kindling_proto::agent`'s (the host builds them from the same types).
//!
//! `import` is followed, on the same connection, by exactly N bytes of an OCI or docker
//! image archive, which go to `ctr -n k8s.io images import --all-platforms` (through a
//! FIFO, so the archive is never stored whole in the guest): kubelet can then run the
//! image without a registry. A bad request gets `{"error":"…"}`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use kindling_proto::agent::{Reply, Request, MAX_ARGS, MAX_CHUNK, MAX_LINE, UNIX_SOCKET, VSOCK_PORT};

use crate::addons::Addons;
use crate::paths::Paths;
use crate::phase;
use crate::supervisor::Reaper;

/// Starts the listener thread: vsock in a VM, a UNIX socket in a container.
pub fn serve(paths: Paths, reaper: Arc<Reaper>, addons: Arc<Addons>, container: bool) -> Result<()> {
    let ctx = Arc::new(Ctx { paths, reaper, addons });
    if container {
        let path = ctx.paths.root.join(UNIX_SOCKET.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().unwrap())?;
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("listening on {}", path.display()))?;
        std::thread::Builder::new().name("control".into()).spawn(move || {
            for conn in listener.incoming().flatten() {
                let ctx = ctx.clone();
                std::thread::spawn(move || handle(&ctx, conn));
            }
        })?;
    } else {
        let fd = vsock_listen(VSOCK_PORT).context("listening on vsock (is there a virtio-vsock device?)")?;
        std::thread::Builder::new().name("control".into()).spawn(move || loop {
            match accept_from_host(std::os::fd::AsRawFd::as_raw_fd(&fd)) {
                Ok(Some(conn)) => {
                    let ctx = ctx.clone();
                    if let Err(e) =
                        std::thread::Builder::new().name("control-conn".into()).spawn(move || handle(&ctx, conn))
                    {
                        phase::log(format!("control: cannot start a thread: {e}"));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    phase::log(format!("control: accept: {e}"));
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        })?;
    }
    Ok(())
}

/// Accepts one vsock connection; Ok(None) when it does not come from the host (CID 2)
/// and was closed. Inside the guest, vsock loopback (from the guest's own CID, or
/// CID 1) reaches the listener too: a pod, or anything else in the node, must not get
/// the agent's root shell. (Pods run with seccomp's RuntimeDefault profile, which also
/// refuses them AF_VSOCK sockets.)
pub(crate) fn accept_from_host(listener: std::os::fd::RawFd) -> nix::Result<Option<std::fs::File>> {
    use nix::sys::socket::{getpeername, VsockAddr};
    let conn = nix::sys::socket::accept(listener)?;
    // SAFETY: accept returned a new descriptor that nothing else owns.
    let conn = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(conn) });
    match getpeername::<VsockAddr>(std::os::fd::AsRawFd::as_raw_fd(&conn)) {
        Ok(peer) if peer.cid() == libc::VMADDR_CID_HOST => Ok(Some(conn)),
        Ok(peer) => {
            phase::log(format!(
                "control: refused a connection from vsock CID {} (only the host may connect)",
                peer.cid()
            ));
            Ok(None)
        }
        Err(e) => {
            phase::log(format!("control: refused a connection whose peer is unknown ({e})"));
            Ok(None)
        }
    }
}

pub(crate) fn vsock_listen(port: u32) -> nix::Result<OwnedFd> {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};
    let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    listen(&fd, Backlog::new(16)?)?;
    Ok(fd)
}

struct Ctx {
    paths: Paths,
    reaper: Arc<Reaper>,
    addons: Arc<Addons>,
}

fn send(out: &mut impl Write, reply: Reply) -> std::io::Result<()> {
    out.write_all(reply.to_line().as_bytes())
}

fn error(out: &mut impl Write, msg: impl Into<String>) -> std::io::Result<()> {
    send(out, Reply::Error(msg.into()))
}

/// Sends output as `{"out":N}` lines, each followed by at most [`MAX_CHUNK`] raw bytes.
fn send_out(out: &mut impl Write, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let n = bytes.len().min(MAX_CHUNK);
        let mut frame = Reply::Out(n as u32).to_line().into_bytes();
        frame.extend_from_slice(&bytes[..n]);
        out.write_all(&frame)?;
        bytes = &bytes[n..];
    }
    Ok(())
}

/// How long a peer may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn handle<S: Read + Write + TryCloneStream + Send>(ctx: &Ctx, conn: S) {
    let Ok(mut out) = conn.try_clone_stream() else { return };
    let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
    // The reader stays: what follows the request line (an import's bytes) is in its buffer.
    let mut input = BufReader::new(conn);
    let mut line = Vec::new();
    match (&mut input).take(MAX_LINE as u64).read_until(b'\n', &mut line) {
        Ok(_) if line.last() == Some(&b'\n') => {}
        Ok(_) => {
            let _ = error(&mut out, format!("the request must be one line of at most {MAX_LINE} bytes"));
            return;
        }
        Err(_) => return,
    }
    let _ = input.get_ref().set_read_timeout(None);
    let _ =
        match std::str::from_utf8(&line).map_err(|_| "the request is not UTF-8".to_string()).and_then(Request::parse) {
            Ok(Request::Exec { argv }) if argv.len() > MAX_ARGS => {
                error(&mut out, format!("exec takes at most {MAX_ARGS} words"))
            }
            Ok(req) => dispatch(ctx, req, &mut input, &mut out),
            Err(e) => error(&mut out, e),
        };
}

fn dispatch(ctx: &Ctx, req: Request, input: &mut (dyn Read + Send), out: &mut impl Write) -> std::io::Result<()> {
    match req {
        Request::Ping => send(out, Reply::Ok(true)),
        Request::Phases => send(out, Reply::Phases(phase::reached())),
        Request::Exec { argv } if argv.is_empty() => error(out, "exec needs a command"),
        Request::Exec { argv } => {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            match ctx.reaper.run_streaming(&argv, &mut |chunk| send_out(out, chunk)) {
                Ok(code) => send(out, Reply::Exit(code)),
                Err(e) => error(out, format!("{}: {e}", argv[0])),
            }
        }
        Request::Logs { component, follow } => {
            let Some(log) = component_log(&ctx.paths, &component) else {
                return error(out, format!("no component {component:?}; see /var/log/kindling"));
            };
            stream_file(&log, follow, out)?;
            send(out, Reply::Exit(0))
        }
        Request::Poweroff => {
            send(out, Reply::Ok(true))?;
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(1), nix::sys::signal::Signal::SIGTERM);
            Ok(())
        }
        Request::Import { bytes: 0 } => {
            error(out, "import needs the archive's size: {\"op\":\"import\",\"bytes\":N}, then N bytes")
        }
        Request::Import { bytes } => {
            let ctr = ctx.paths.bin("ctr");
            let sock = ctx.paths.containerd_socket().display().to_string();
            let fifo_dir = ctx.paths.root.join("run/kindling");
            let run = |fifo: &Path, on_output: &mut dyn FnMut(&[u8]) -> std::io::Result<()>| {
                let fifo = fifo.display().to_string();
                let argv =
                    [ctr.as_str(), "--address", &sock, "-n", "k8s.io", "images", "import", "--all-platforms", &fifo];
                ctx.reaper.run_streaming(&argv, on_output)
            };
            import(&fifo_dir, bytes, input, out, run)
        }
        Request::Addon { name, enable } => {
            // Progress lines go out as they come; a client that went away does not stop
            // the work (it is recorded and done either way).
            let result = ctx.addons.set(&name, enable, &mut |line| {
                let _ = send_out(out, format!("{line}\n").as_bytes());
            });
            match result {
                Ok(()) => send(out, Reply::Exit(0)),
                Err(e) => error(out, format!("add-on {name}: {e:#}")),
            }
        }
        Request::Addons => send(out, Reply::Addons(ctx.addons.states())),
    }
}

/// What the FIFO writer of an import saw.
#[derive(Debug, PartialEq)]
enum Fed {
    /// All the bytes went to the importer.
    All,
    /// The connection ended after this many bytes.
    InputEnded(u64),
    /// The importer stopped reading (it exited) after this many bytes.
    ReaderGone(u64),
    /// The importer never opened its input.
    NeverOpened,
}

/// Feeds `bytes` bytes of `input` to a command through a FIFO (its input file) while
/// `run` runs it and streams its output back; replies with its exit code. The command
/// may stop reading early (it failed): the writer notices and gives up.
fn import(
    fifo_dir: &Path,
    bytes: u64,
    input: &mut (dyn Read + Send),
    out: &mut impl Write,
    run: impl FnOnce(&Path, &mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<i32>,
) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    std::fs::create_dir_all(fifo_dir)?;
    let fifo = fifo_dir.join(format!("import-{}-{}.fifo", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst)));
    let _ = std::fs::remove_file(&fifo);
    if let Err(e) = nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)) {
        return error(out, format!("import: mkfifo {}: {e}", fifo.display()));
    }
    let done = AtomicBool::new(false);
    let (result, fed) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| feed_fifo(&fifo, bytes, input, &done));
        let result = run(&fifo, &mut |chunk| send_out(out, chunk));
        done.store(true, Ordering::SeqCst);
        (result, writer.join().unwrap_or(Fed::NeverOpened))
    });
    let _ = std::fs::remove_file(&fifo);
    match (result, fed) {
        (Err(e), _) => error(out, format!("import: running ctr: {e}")),
        (Ok(_), Fed::InputEnded(n)) => error(
            out,
            format!("import: the connection ended after {n} of the {bytes} bytes announced; send the whole archive"),
        ),
        (Ok(code), _) => send(out, Reply::Exit(code)),
    }
}

/// Opens the FIFO for writing once the importer has opened it for reading (polling, so
/// that an importer that exits first does not leave this thread blocked), then copies.
fn feed_fifo(fifo: &Path, bytes: u64, input: &mut (dyn Read + Send), done: &std::sync::atomic::AtomicBool) -> Fed {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::unix::fs::OpenOptionsExt;
    let file = loop {
        match std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(fifo) {
            Ok(f) => break f,
            // ENXIO: no reader yet.
            Err(_) if done.load(std::sync::atomic::Ordering::SeqCst) => return Fed::NeverOpened,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    if fcntl(&file, FcntlArg::F_SETFL(OFlag::empty())).is_err() {
        return Fed::ReaderGone(0);
    }
    let mut file = file;
    let mut buf = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        let want = buf.len().min((bytes - sent) as usize);
        let n = match input.read(&mut buf[..want]) {
            Ok(0) | Err(_) => return Fed::InputEnded(sent),
            Ok(n) => n,
        };
        if file.write_all(&buf[..n]).is_err() {
            return Fed::ReaderGone(sent);
        }
        sent += n as u64;
    }
    Fed::All
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
            send_out(out, &buf[..n])?;
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
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl TryCloneStream for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, t)
    }
}

/// A vsock connection (a socket, read and written as a file).
impl TryCloneStream for std::fs::File {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        let tv = match t {
            Some(d) => nix::sys::time::TimeVal::new(d.as_secs() as _, d.subsec_micros() as _),
            None => nix::sys::time::TimeVal::new(0, 0),
        };
        nix::sys::socket::setsockopt(self, nix::sys::socket::sockopt::ReceiveTimeout, &tv).map_err(std::io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_ctx(paths: Paths) -> Ctx {
        let reaper = Reaper::idle();
        let addons = Addons::new(paths.clone(), reaper.clone(), Default::default());
        Ctx { paths, reaper, addons }
    }

    /// Splits what the agent wrote into replies, output frames joined: (the replies
    /// other than output, all output bytes).
    fn decode(mut wire: &[u8]) -> (Vec<Reply>, Vec<u8>) {
        let (mut replies, mut output) = (Vec::new(), Vec::new());
        while !wire.is_empty() {
            let nl = wire.iter().position(|&b| b == b'\n').expect("a reply line");
            let reply = Reply::parse(std::str::from_utf8(&wire[..nl]).unwrap()).unwrap();
            wire = &wire[nl + 1..];
            match reply {
                Reply::Out(n) => {
                    assert!(n as usize <= MAX_CHUNK);
                    output.extend_from_slice(&wire[..n as usize]);
                    wire = &wire[n as usize..];
                }
                r => replies.push(r),
            }
        }
        (replies, output)
    }

    #[test]
    fn output_is_sent_byte_for_byte_in_bounded_chunks() {
        let data: Vec<u8> = (0..(3 * MAX_CHUNK + 7)).map(|i| (i % 256) as u8).collect();
        let mut wire = Vec::new();
        send_out(&mut wire, &data).unwrap();
        send(&mut wire, Reply::Exit(0)).unwrap();
        assert_eq!(decode(&wire), (vec![Reply::Exit(0)], data));
    }

    /// A control connection over a real socket pair: a request longer than a line may
    /// be is refused, and so is a request that is not one.
    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let ctx = test_ctx(Paths::new("/nonexistent"));
        for (req, expect) in [
            (vec![b'{'; MAX_LINE + 1], "one line of at most"),
            (b"{\"op\":\"format-disk\"}\n".to_vec(), "bad request"),
            (b"not json\n".to_vec(), "bad request"),
            (
                format!("{{\"op\":\"exec\",\"argv\":[{}\"x\"]}}\n", "\"a\",".repeat(MAX_ARGS)).into_bytes(),
                "at most 4096 words",
            ),
        ] {
            let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
            let writer = std::thread::spawn(move || {
                let _ = b.write_all(&req);
                let mut reply = String::new();
                let _ = b.read_to_string(&mut reply);
                reply
            });
            handle(&ctx, a);
            let reply = writer.join().unwrap();
            assert!(matches!(Reply::parse(&reply), Ok(Reply::Error(ref e)) if e.contains(expect)), "{reply}");
        }
    }

    mod request_fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Request lines: random bytes, and JSON objects close to real requests.
        fn request() -> impl Strategy<Value = Vec<u8>> {
            let op = prop_oneof![
                Just("ping".to_string()),
                Just("phases".to_string()),
                Just("logs".to_string()),
                "[a-z-]{0,12}"
            ];
            let value = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                ".{0,300}".prop_map(serde_json::Value::from),
                Just(serde_json::Value::from("../../../../etc/shadow")),
                Just(serde_json::Value::from("etcd")),
            ];
            let key = prop_oneof![Just("component".to_string()), Just("follow".to_string()), "[a-z]{1,8}"];
            let object = (op, proptest::collection::btree_map(key, value, 0..4)).prop_map(|(op, fields)| {
                let mut m: serde_json::Map<String, serde_json::Value> = fields.into_iter().collect();
                m.insert("op".into(), op.into());
                let mut line = serde_json::Value::Object(m).to_string().into_bytes();
                line.push(b'\n');
                line
            });
            prop_oneof![object, proptest::collection::vec(any::<u8>(), 0..600)]
        }

        proptest! {
            #![proptest_config(ProptestConfig { max_shrink_iters: 256, ..ProptestConfig::default() })]
            /// Whatever arrives on a control connection, the agent answers with well
            /// formed reply lines (or nothing) and returns; no panic, no hang, and no
            /// file outside its log directory is read.
            #[test]
            fn any_request_gets_well_formed_replies(req in request()) {
                // Never fuzz the requests that act on the machine running the test, nor
                // a followed log (it streams until the client hangs up, by design).
                if let Ok(Request::Exec { .. } | Request::Poweroff | Request::Import { .. } | Request::Addon { .. } | Request::Logs { follow: true, .. }) =
                    std::str::from_utf8(&req).map_err(|_| String::new()).and_then(Request::parse)
                {
                    return Ok(());
                }
                let d = tempfile::tempdir().unwrap();
                let paths = Paths::new(d.path());
                std::fs::create_dir_all(paths.logs()).unwrap();
                std::fs::write(paths.logs().join("etcd.log"), "etcd says hello\n").unwrap();
                let ctx = test_ctx(paths);
                let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
                let writer = std::thread::spawn(move || {
                    let _ = b.write_all(&req);
                    let _ = b.shutdown(std::net::Shutdown::Write);
                    let mut reply = Vec::new();
                    let _ = b.read_to_end(&mut reply);
                    reply
                });
                handle(&ctx, a);
                let wire = writer.join().unwrap();
                let (replies, output) = decode(&wire);
                prop_assert!(replies.len() <= 2, "{replies:?}");
                prop_assert!(output.is_empty() || output == b"etcd says hello\n", "{:?}", String::from_utf8_lossy(&output));
            }
        }
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

    /// Runs `import` with a real importer process (`sh -c SCRIPT sh FIFO COPY`) reading
    /// the FIFO, the way ctr does; returns the reply lines and what it wrote to COPY.
    fn import_with(script: &str, announced: u64, data: &[u8]) -> (Vec<Reply>, Vec<u8>, Option<Vec<u8>>) {
        let d = tempfile::tempdir().unwrap();
        let fifo_dir = d.path().join("run");
        let mut input: &[u8] = data;
        let mut out = Vec::new();
        let copy = d.path().join("copy");
        let run = |fifo: &Path, on_output: &mut dyn FnMut(&[u8]) -> std::io::Result<()>| {
            let o = std::process::Command::new("sh").arg("-c").arg(script).arg("sh").arg(fifo).arg(&copy).output()?;
            on_output(&o.stdout)?;
            Ok(o.status.code().unwrap_or(-1))
        };
        import(&fifo_dir, announced, &mut input, &mut out, run).unwrap();
        let (replies, output) = decode(&out);
        assert_eq!(std::fs::read_dir(&fifo_dir).unwrap().count(), 0, "the FIFO is removed");
        (replies, output, std::fs::read(&copy).ok())
    }

    #[test]
    fn import_streams_exactly_the_announced_bytes_through_a_fifo() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        // The bytes after the archive must not be read: they are not the importer's.
        let mut with_trailer = data.clone();
        with_trailer.extend_from_slice(b"TRAILER");
        let (replies, output, copy) = import_with(r#"cat "$1" >"$2"; echo imported"#, data.len() as u64, &with_trailer);
        assert_eq!(replies.last().unwrap(), &Reply::Exit(0), "{replies:?}");
        assert!(String::from_utf8_lossy(&output).contains("imported"), "{output:?}");
        assert_eq!(copy.unwrap(), data);
    }

    #[test]
    fn import_reports_an_importer_that_fails_or_a_short_archive_without_hanging() {
        // Exits without ever opening its input.
        let (replies, _, _) = import_with("echo 'ctr: bad flag'; exit 3", 1000, &[7u8; 1000]);
        assert_eq!(replies.last().unwrap(), &Reply::Exit(3), "{replies:?}");
        // Reads a little, then gives up.
        let (replies, _, _) = import_with(r#"head -c 10 "$1" >/dev/null; exit 1"#, 5_000_000, &vec![1u8; 5_000_000]);
        assert_eq!(replies.last().unwrap(), &Reply::Exit(1), "{replies:?}");
        // The connection ends early.
        let (replies, _, _) = import_with(r#"cat "$1" >/dev/null"#, 100, &[0u8; 40]);
        let Some(Reply::Error(err)) = replies.last() else { panic!("{replies:?}") };
        assert!(err.contains("after 40 of the 100 bytes"), "{err}");
    }
}
