//! Host and guest over vsock, end to end: kindling's kernel boots an initramfs whose
//! init is the real guest agent (`kindling.until=agent-start`: no Kubernetes, just PID 1
//! and its control channel on vsock port 1024). The host reaches it through the VMM's
//! vsock UNIX socket (Firecracker's `CONNECT <port>` handshake) and through a TCP port
//! forwarded with `--forward`; under the emulated runner both cross the level-1 VM's
//! relay. Checked: requests and replies both ways, a 100 KB request (many packets and
//! credit updates), streamed command output, a guest TCP server reached from a host
//! port (the agent exposes guest TCP ports on vsock, as it does for the API server and
//! NodePorts), and power-off through the channel.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kindling_proto::agent::Reply;

/// An initramfs: busybox, the agent as /sbin/kindling-agent, and an /init that execs it.
fn agent_initramfs(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    for d in ["bin", "sbin", "dev", "proc", "sys", "tmp", "run", "etc", "var"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static (apt-get install busybox-static)");
    let agent = kindling_bin().as_path().with_file_name("kindling-agent");
    std::fs::copy(&agent, root.join("sbin/kindling-agent"))
        .unwrap_or_else(|e| panic!("{}: {e}; run `cargo build --workspace` first", agent.display()));
    std::fs::write(root.join("init"), "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexec /sbin/kindling-agent\n")
        .unwrap();
    std::fs::set_permissions(root.join("init"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = dir.join("agent.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && find . | cpio -o -H newc --quiet > {}", root.display(), out.display()))
        .status()
        .unwrap();
    assert!(st.success(), "cpio (apt-get install cpio)");
    out
}

/// One control request over a stream that has passed the vsock handshake (or a TCP
/// forward); returns the reply lines.
fn request(mut s: impl Read + Write, req: &str) -> Vec<String> {
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    BufReader::new(s).lines().map_while(Result::ok).collect()
}

/// One exec request: its replies (output frames removed) and its output bytes.
fn exec(mut s: impl Read + Write, req: &str) -> (Vec<Reply>, Vec<u8>) {
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut wire = Vec::new();
    let _ = s.read_to_end(&mut wire);
    let (mut replies, mut output, mut rest) = (Vec::new(), Vec::new(), &wire[..]);
    while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
        let reply = Reply::parse(std::str::from_utf8(&rest[..nl]).unwrap()).unwrap();
        rest = &rest[nl + 1..];
        match reply {
            Reply::Out(n) => {
                output.extend_from_slice(&rest[..n as usize]);
                rest = &rest[n as usize..];
            }
            r => replies.push(r),
        }
    }
    (replies, output)
}

/// Connects to guest port 1024 through the vsock socket.
fn vsock_connect(uds: &Path) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"CONNECT 1024\n")?;
    let mut line = Vec::new();
    let mut b = [0u8];
    while s.read(&mut b)? == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    if !line.starts_with(b"OK ") {
        return Err(std::io::Error::other(format!("handshake answered {:?}", String::from_utf8_lossy(&line))));
    }
    Ok(s)
}

#[test]
fn host_and_guest_agent_talk_over_vsock_and_a_forwarded_port() {
    let dir = tempfile::tempdir().unwrap();
    let initrd = agent_initramfs(dir.path());
    let uds = dir.path().join("v.sock");
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (port, web) = (free(), free());
    let log = std::fs::File::create(dir.path().join("console.log")).unwrap();
    let mut vm = KillOnDrop(
        kindling()
            .args([
                "boot",
                "--kernel",
                our_kernel().to_str().unwrap(),
                "--initrd",
                initrd.to_str().unwrap(),
                "--memory",
                "512",
            ])
            .args(["--cmdline", "console=ttyS0 panic=1 kindling.until=agent-start kindling.expose=8080"])
            .arg("--vsock")
            .arg(&uds)
            .args(["--forward", &format!("{port}:1024"), "--forward", &format!("{web}:8080")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let console =
        || String::from_utf8_lossy(&std::fs::read(dir.path().join("console.log")).unwrap_or_default()).into_owned();

    // The agent answers once the guest is up.
    let t0 = Instant::now();
    loop {
        if let Ok(s) = vsock_connect(&uds) {
            if request(s, r#"{"op":"ping"}"#) == [r#"{"ok":true}"#] {
                break;
            }
        }
        assert!(vm.0.try_wait().unwrap().is_none(), "the VM exited early:\n{}", console());
        assert!(t0.elapsed() < Duration::from_secs(300), "no answer on vsock port 1024 after 5 min:\n{}", console());
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("agent answered on vsock {:.1}s after boot", t0.elapsed().as_secs_f64());

    let phases = request(vsock_connect(&uds).unwrap(), r#"{"op":"phases"}"#).join("");
    assert!(phases.contains(r#""name":"agent-start""#), "{phases}");
    // Guest to host: streamed output of a command run in the guest, byte for byte.
    let (replies, output) = exec(
        vsock_connect(&uds).unwrap(),
        r#"{"op":"exec","argv":["sh","-c","head -c 300000 /dev/zero | tr '\\0' x"]}"#,
    );
    assert_eq!(output, vec![b'x'; 300_000], "guest-to-host stream lost data");
    assert_eq!(replies, [Reply::Exit(0)]);
    // Host to guest: a 100 KB request line.
    let big = "y".repeat(100_000);
    let (replies, output) = exec(
        vsock_connect(&uds).unwrap(),
        &format!(r#"{{"op":"exec","argv":["sh","-c","echo ${{#1}}","_","{big}"]}}"#),
    );
    assert_eq!((replies, output), (vec![Reply::Exit(0)], b"100000\n".to_vec()), "host-to-guest stream lost data");
    // The forwarded TCP port reaches the same guest port.
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(request(tcp, r#"{"op":"ping"}"#), [r#"{"ok":true}"#]);
    // A guest TCP server, exposed by the agent on vsock 8080 and forwarded to the host:
    // host TCP -> vsock (through L1 under emulation) -> agent -> guest TCP.
    let out = request(
        vsock_connect(&uds).unwrap(),
        r#"{"op":"exec","argv":["sh","-c","mkdir -p /tmp/www && echo served-from-the-guest > /tmp/www/index.html && httpd -p 8080 -h /tmp/www"]}"#,
    );
    assert_eq!(out.last().map(String::as_str), Some(r#"{"exit":0}"#), "{out:?}");
    let mut http = std::net::TcpStream::connect(("127.0.0.1", web)).unwrap();
    http.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    http.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
    let mut page = String::new();
    let _ = http.read_to_string(&mut page);
    assert!(page.starts_with("HTTP/1.") && page.contains("served-from-the-guest"), "{page}");
    // A port nobody listens on is refused, not hung.
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"CONNECT 4242\n").unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(!reply.starts_with("OK"), "{reply}");

    // Power-off through the channel ends the VM cleanly.
    assert_eq!(request(vsock_connect(&uds).unwrap(), r#"{"op":"poweroff"}"#), [r#"{"ok":true}"#]);
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = vm.0.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "VM still running after poweroff:\n{}", console());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "{status}:\n{}", console());
    assert!(console().contains("kindling-agent: powering off"), "{}", console());
    assert!(!uds.exists(), "the vsock socket is removed when the VM ends");
}
