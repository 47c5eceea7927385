//! The device as a guest driver sees it: split rings in real guest memory (laid out by
//! virtio-queue's mock), real UNIX sockets on the host side.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::BorrowedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::virtio::test_alloc::peak_alloc;
use crate::devices::virtio::test_ring::{indirect_table, within, Ring, MAX_INDIRECT, QSIZE};

use super::connection::{CONN_BUF_SIZE, REQUEST_TIMEOUT, SHUTDOWN_TIMEOUT};
use super::muxer::EPHEMERAL_PORT_BASE;
use super::packet::{Header, Op, HDR_LEN, SHUTDOWN_BOTH, SHUTDOWN_SEND, TYPE_STREAM};
use super::{port_path, Vsock, HOST_CID, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::{RingError, VirtioDevice};

const MEM_SIZE: u64 = 8 << 20;
const GUEST_CID: u64 = 3;
/// What Linux puts on its RX queue: room for a header and 4 KiB.
const RX_BUF: u32 = 4096 + HDR_LEN as u32;
const GUEST_BUF_ALLOC: u32 = 256 << 10;
const DATA_START: u64 = 1 << 20;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// A guest driver for the device under test.
struct Guest {
    mem: GuestMemoryMmap,
    dev: Vsock,
    queues: Vec<Queue>,
    rx: Ring,
    tx: Ring,
    rx_bufs: HashMap<u16, u64>,
    next_buf: u64,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

type Packet = (Header, Vec<u8>);

impl Guest {
    fn new() -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let (rx, rxq) = Ring::new(&mem, 0);
        let (tx, txq) = Ring::new(&mem, 0x10000);
        let (_, evq) = Ring::new(&mem, 0x20000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let dev = Vsock::new(GUEST_CID, &path).unwrap();
        Guest {
            mem,
            dev,
            queues: vec![rxq, txq, evq],
            rx,
            tx,
            rx_bufs: HashMap::new(),
            next_buf: DATA_START,
            path,
            _dir: dir,
        }
    }

    /// Guest memory for a buffer; old buffers are reused once the area is gone through.
    fn alloc(&mut self, len: u64) -> u64 {
        if self.next_buf + len > MEM_SIZE {
            self.next_buf = DATA_START;
        }
        let at = self.next_buf;
        self.next_buf += len.next_multiple_of(64);
        at
    }

    fn give_rx(&mut self, n: usize) {
        for _ in 0..n {
            let addr = self.alloc(u64::from(RX_BUF));
            let head = self.rx.push(&self.mem, &[(addr, RX_BUF, WRITE)]);
            self.rx_bufs.insert(head, addr);
        }
        self.dev.process_queue(RX_QUEUE, &mut self.queues, &self.mem).unwrap();
    }

    /// Publishes a raw TX chain and lets the device process it; returns the TX used
    /// entries it produced.
    fn send_raw(&mut self, descs: &[(u64, u32, u16)]) -> Vec<(u16, u32)> {
        self.tx.push(&self.mem, descs);
        self.dev.process_queue(TX_QUEUE, &mut self.queues, &self.mem).unwrap();
        self.tx.take_used(&self.mem)
    }

    fn send(&mut self, hdr: &Header, payload: &[u8]) {
        let len = HDR_LEN + payload.len();
        let addr = self.alloc(len as u64);
        self.mem.write_slice(&hdr.to_bytes(), GuestAddress(addr)).unwrap();
        self.mem.write_slice(payload, GuestAddress(addr + HDR_LEN as u64)).unwrap();
        let used = self.send_raw(&[(addr, len as u32, 0)]);
        assert_eq!(used, vec![(self.tx.next_desc.wrapping_sub(1) % QSIZE, 0)]);
    }

    /// Packets the device put in RX buffers so far.
    fn recv(&mut self) -> Vec<Packet> {
        let mut out = Vec::new();
        for (head, len) in self.rx.take_used(&self.mem) {
            let addr = self.rx_bufs.remove(&head).expect("a buffer we gave");
            assert!(len as usize >= HDR_LEN, "used length {len}");
            let mut raw = [0u8; HDR_LEN];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = Header::from_bytes(&raw);
            assert_eq!(len as usize, HDR_LEN + hdr.len as usize);
            let mut payload = vec![0u8; hdr.len as usize];
            self.mem.read_slice(&mut payload, GuestAddress(addr + HDR_LEN as u64)).unwrap();
            out.push((hdr, payload));
        }
        out
    }

    fn pump(&mut self) {
        self.dev.process_host_events(&mut self.queues, &self.mem).unwrap();
    }

    /// Pumps host events until the device delivered something (or 2 s passed).
    fn wait_rx(&mut self) -> Vec<Packet> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            self.pump();
            let got = self.recv();
            if !got.is_empty() || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn wait_one(&mut self) -> Packet {
        let mut got = self.wait_rx();
        assert_eq!(got.len(), 1, "expected one packet, got {got:?}");
        got.remove(0)
    }

    /// A host client that completed CONNECT to guest port 52; returns it and its host port.
    fn host_connection(&mut self) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(&self.path).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        client.write_all(b"CONNECT 52\n").unwrap();
        let (req, _) = self.wait_one();
        assert_eq!(req.op(), Some(Op::Request));
        self.send(&guest(Op::Response, 52, req.src_port), &[]);
        let expected = format!("OK {}\n", req.src_port);
        let mut line = vec![0u8; expected.len()];
        client.read_exact(&mut line).unwrap();
        assert_eq!(String::from_utf8(line).unwrap(), expected);
        (client, req.src_port)
    }
}

/// A packet from guest port `src_port` to host port `dst_port`.
fn guest(op: Op, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op: op as u16,
        buf_alloc: GUEST_BUF_ALLOC,
        ..Header::default()
    }
}

fn rw(src_port: u32, dst_port: u32, data: &[u8]) -> Header {
    Header { len: data.len() as u32, ..guest(Op::Rw, src_port, dst_port) }
}

fn shutdown(src_port: u32, dst_port: u32, flags: u32) -> Header {
    Header { flags, ..guest(Op::Shutdown, src_port, dst_port) }
}

fn assert_rst(p: &Packet, host_port: u32, guest_port: u32) {
    assert_eq!(p.0.op(), Some(Op::Rst), "{p:?}");
    assert_eq!((p.0.src_cid, p.0.dst_cid, p.0.src_port, p.0.dst_port), (HOST_CID, GUEST_CID, host_port, guest_port));
}

/// Level-triggered epoll must go quiet once the device handled everything it can: a
/// readable host events fd at this point means the VMM's event loop would spin.
fn assert_idle(g: &Guest) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    // SAFETY: the device owns the fd and outlives this call.
    let fd = unsafe { BorrowedFd::borrow_raw(g.dev.host_events_fd().unwrap()) };
    let ready = poll(&mut [PollFd::new(fd, PollFlags::POLLIN)], PollTimeout::ZERO).unwrap();
    assert_eq!(ready, 0, "host events fd still readable: the event loop would spin");
}

/// Reads until EOF while pumping the device; panics after 2 s.
fn wait_eof(g: &mut Guest, client: &mut UnixStream) {
    client.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 256];
    loop {
        g.pump();
        match client.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline, "host client was not closed");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn device_identity() {
    let g = Guest::new();
    assert_eq!(g.dev.device_type(), 19);
    assert_eq!(g.dev.queue_max_sizes().len(), 3);
    assert_eq!(g.dev.config(), &3u64.to_le_bytes());
    assert_eq!(g.dev.features(), 1 << 32);
}

#[test]
fn host_connect_reaches_the_guest_and_data_flows_both_ways() {
    let mut g = Guest::new();
    g.give_rx(8);
    let mut client = UnixStream::connect(&g.path).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = g.wait_one();
    assert_eq!(req.op(), Some(Op::Request));
    assert_eq!((req.src_cid, req.dst_cid, req.dst_port, req.type_), (HOST_CID, GUEST_CID, 52, TYPE_STREAM));
    assert_eq!(req.src_port, EPHEMERAL_PORT_BASE);
    assert_eq!(req.buf_alloc, CONN_BUF_SIZE);
    let host_port = req.src_port;

    g.send(&guest(Op::Response, 52, host_port), &[]);
    let mut line = [0u8; 14];
    client.read_exact(&mut line).unwrap();
    assert_eq!(&line, format!("OK {host_port}\n").as_bytes());

    g.send(&rw(52, host_port, b"hello"), b"hello");
    let mut got = [0u8; 5];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");

    client.write_all(b"world").unwrap();
    let (h, data) = g.wait_one();
    assert_eq!((h.op(), h.src_port, h.dst_port, data.as_slice()), (Some(Op::Rw), host_port, 52, &b"world"[..]));
    assert_eq!(h.fwd_cnt, 5, "the guest's 5 bytes reached the host");

    // Half close: the host stops sending but still receives.
    client.shutdown(Shutdown::Write).unwrap();
    let (h, _) = g.wait_one();
    assert_eq!((h.op(), h.flags), (Some(Op::Shutdown), SHUTDOWN_SEND));
    assert_idle(&g);
    g.send(&rw(52, host_port, b"bye"), b"bye");
    let mut got = [0u8; 3];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"bye");

    // The guest closes: RST answers, and the host client sees EOF.
    g.send(&shutdown(52, host_port, SHUTDOWN_BOTH), &[]);
    let (h, _) = g.wait_one();
    assert_eq!(h.op(), Some(Op::Rst));
    assert_eq!(client.read(&mut got).unwrap(), 0);
}

#[test]
fn data_after_the_connect_line_is_not_lost() {
    let mut g = Guest::new();
    g.give_rx(8);
    let mut client = UnixStream::connect(&g.path).unwrap();
    client.write_all(b"CONNECT 52\nearly bytes").unwrap();
    let (req, _) = g.wait_one();
    g.send(&guest(Op::Response, 52, req.src_port), &[]);
    let (h, data) = g.wait_one();
    assert_eq!((h.op(), data.as_slice()), (Some(Op::Rw), &b"early bytes"[..]));
}

#[test]
fn guest_connects_to_a_host_listener() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(port_path(&g.path, 1234)).unwrap();
    g.give_rx(8);
    g.send(&guest(Op::Request, 5000, 1234), &[]);
    let (h, _) = g.wait_one();
    assert_eq!((h.op(), h.src_port, h.dst_port), (Some(Op::Response), 1234, 5000));
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();

    g.send(&rw(5000, 1234, b"ping"), b"ping");
    let mut got = [0u8; 4];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    host.write_all(b"pong").unwrap();
    let (h, data) = g.wait_one();
    assert_eq!((h.op(), data.as_slice()), (Some(Op::Rw), &b"pong"[..]));

    // The host closes: SHUTDOWN of both directions, then the guest's RST ends it.
    drop(host);
    let (h, _) = g.wait_one();
    assert_eq!((h.op(), h.flags), (Some(Op::Shutdown), SHUTDOWN_BOTH));
    assert_idle(&g);
    g.send(&guest(Op::Rst, 5000, 1234), &[]);
    assert!(g.recv().is_empty(), "no answer to RST");
    // The connection is gone: more data is answered with RST.
    g.send(&rw(5000, 1234, b"late"), b"late");
    assert_rst(&g.wait_one(), 1234, 5000);
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let mut g = Guest::new();
    g.give_rx(2);
    g.send(&guest(Op::Request, 5000, 4321), &[]);
    assert_rst(&g.wait_one(), 4321, 5000);
    // A stale socket file nobody listens on is the same.
    drop(UnixListener::bind(port_path(&g.path, 4321)).unwrap());
    g.send(&guest(Op::Request, 5001, 4321), &[]);
    assert_rst(&g.wait_one(), 4321, 5001);
}

#[test]
fn bad_connect_lines_are_closed() {
    let mut g = Guest::new();
    g.give_rx(4);
    let long = "CONNECT ".to_string() + &"1".repeat(40);
    for (line, close_write) in [
        ("HELLO\n", false),
        ("CONNECT abc\n", false),
        ("CONNECT 99999999999\n", false),
        (long.as_str(), false),
        ("CONNECT 5", true),
    ] {
        let mut client = UnixStream::connect(&g.path).unwrap();
        client.write_all(line.as_bytes()).unwrap();
        if close_write {
            client.shutdown(Shutdown::Write).unwrap();
        }
        wait_eof(&mut g, &mut client);
        assert!(g.recv().is_empty(), "{line:?} reached the guest");
        assert_idle(&g);
    }
    // The device still serves good clients.
    g.host_connection();
}

#[test]
fn host_client_that_never_sends_a_line_is_closed() {
    let mut g = Guest::new();
    let mut client = UnixStream::connect(&g.path).unwrap();
    let t0 = Instant::now();
    wait_eof(&mut g, &mut client);
    assert!(t0.elapsed() >= Duration::from_millis(500));
}

#[test]
fn unanswered_request_times_out() {
    let mut g = Guest::new();
    g.give_rx(4);
    let mut client = UnixStream::connect(&g.path).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = g.wait_one();
    let t0 = Instant::now();
    wait_eof(&mut g, &mut client);
    assert!(t0.elapsed() >= REQUEST_TIMEOUT / 2);
    assert_rst(&g.wait_one(), req.src_port, 52);
}

#[test]
fn unanswered_shutdown_ends_in_rst() {
    let mut g = Guest::new();
    g.give_rx(4);
    let (client, port) = g.host_connection();
    drop(client);
    let (h, _) = g.wait_one();
    assert_eq!((h.op(), h.flags), (Some(Op::Shutdown), SHUTDOWN_BOTH));
    let t0 = Instant::now();
    assert_rst(&g.wait_one(), port, 52);
    assert!(t0.elapsed() >= SHUTDOWN_TIMEOUT / 2);
}

#[test]
fn requests_wait_for_the_driver() {
    let mut g = Guest::new();
    let mut client = UnixStream::connect(&g.path).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    // Before activation the transport passes no queues; the event is still consumed.
    // (Briefly: the REQUEST this makes times out after REQUEST_TIMEOUT, 200 ms here,
    // and a busy machine must not push assert_idle past that.)
    let deadline = Instant::now() + Duration::from_millis(30);
    while Instant::now() < deadline {
        assert!(!g.dev.process_host_events(&mut [], &g.mem).unwrap());
    }
    assert_idle(&g);
    g.give_rx(1);
    assert_eq!(g.recv()[0].0.op(), Some(Op::Request));
}

#[test]
fn device_reset_closes_host_connections() {
    let mut g = Guest::new();
    g.give_rx(4);
    let (mut client, _) = g.host_connection();
    g.dev.reset();
    wait_eof(&mut g, &mut client);
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut g = Guest::new();
    g.give_rx(16);
    let listener = UnixListener::bind(port_path(&g.path, 7)).unwrap();
    // The guest can take 6000 bytes: one full packet and part of another.
    g.send(&Header { buf_alloc: 6000, ..guest(Op::Request, 9, 7) }, &[]);
    assert_eq!(g.wait_one().0.op(), Some(Op::Response));
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&[0xaa; 10_000]).unwrap();
    // Collects RW bytes until the device asks for credit.
    let drain = |g: &mut Guest| {
        let mut got = 0;
        loop {
            let packets = g.wait_rx();
            assert!(!packets.is_empty(), "stalled after {got} bytes");
            for (h, data) in packets {
                match h.op() {
                    Some(Op::Rw) => got += data.len(),
                    Some(Op::CreditRequest) => return got,
                    other => panic!("{other:?}"),
                }
            }
        }
    };
    assert_eq!(drain(&mut g), 6000);
    g.pump();
    assert!(g.recv().is_empty(), "nothing beyond the credit");
    assert_idle(&g);
    // The guest consumed it all: room for the remaining 4000 (and 2000 more).
    g.send(&Header { buf_alloc: 6000, fwd_cnt: 6000, ..guest(Op::CreditUpdate, 9, 7) }, &[]);
    let mut rest = 0;
    while rest < 4000 {
        for (h, data) in g.wait_rx() {
            assert_eq!(h.op(), Some(Op::Rw));
            rest += data.len();
        }
    }
    assert_eq!(rest, 4000);
}

/// A megabyte each way through a guest that follows the credit protocol, with the host
/// side reading slowly: exercises buffering, EPOLLOUT flushing, credit updates and ring
/// wrap-around.
#[test]
fn bulk_transfer_both_ways() {
    const TOTAL: usize = 1 << 20;
    let mut g = Guest::new();
    g.give_rx(64);
    let (client, port) = g.host_connection();
    let pattern = |i: usize| (i * 7 % 251) as u8;

    let mut reader = client.try_clone().unwrap();
    let host_reader = std::thread::spawn(move || {
        let mut seen = 0;
        let mut buf = vec![0u8; 8192];
        while seen < TOTAL {
            std::thread::sleep(Duration::from_micros(200));
            let n = reader.read(&mut buf).unwrap();
            assert_ne!(n, 0, "EOF after {seen} bytes");
            assert!(buf[..n].iter().enumerate().all(|(i, &b)| b == pattern(seen + i)), "corrupt data at {seen}");
            seen += n;
        }
    });
    let mut writer = client.try_clone().unwrap();
    let host_writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..TOTAL).map(|i| pattern(i) ^ 0xff).collect();
        writer.write_all(&data).unwrap();
    });

    // The guest: sends within the host's advertised credit, consumes what arrives and
    // returns credit for it.
    let (mut sent, mut received) = (0usize, 0usize);
    let (mut host_buf_alloc, mut host_fwd_cnt) = (CONN_BUF_SIZE, 0u32);
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent < TOTAL || received < TOTAL {
        assert!(Instant::now() < deadline, "stuck: sent {sent}, received {received}");
        let credit = host_buf_alloc as usize - (sent - host_fwd_cnt as usize);
        let n = credit.min(4096).min(TOTAL - sent);
        if n > 0 {
            let chunk: Vec<u8> = (sent..sent + n).map(pattern).collect();
            let hdr = Header { fwd_cnt: received as u32, ..rw(52, port, &chunk) };
            g.send(&hdr, &chunk);
            sent += n;
        }
        g.pump();
        let packets = g.recv();
        let consumed = packets.len();
        for (h, data) in packets {
            host_buf_alloc = h.buf_alloc;
            host_fwd_cnt = h.fwd_cnt;
            match h.op() {
                Some(Op::Rw) => {
                    assert!(
                        data.iter().enumerate().all(|(i, &b)| b == pattern(received + i) ^ 0xff),
                        "corrupt data at {received}"
                    );
                    received += data.len();
                }
                Some(Op::CreditUpdate) => {}
                Some(Op::CreditRequest) => {
                    g.send(&Header { fwd_cnt: received as u32, ..guest(Op::CreditUpdate, 52, port) }, &[]);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        if consumed > 0 {
            // Tell the host what we consumed, as Linux does after reading.
            g.send(&Header { fwd_cnt: received as u32, ..guest(Op::CreditUpdate, 52, port) }, &[]);
            g.give_rx(consumed);
        } else if n == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    // What the host has not read yet is still in the device's buffer: keep it moving.
    while !host_reader.is_finished() {
        assert!(Instant::now() < deadline, "host got stuck reading");
        g.pump();
        std::thread::sleep(Duration::from_micros(200));
    }
    host_reader.join().unwrap();
    host_writer.join().unwrap();
}

#[test]
fn hostile_tx_chains_are_dropped_or_answered_with_rst() {
    let mut g = Guest::new();
    g.give_rx(32);
    let at = g.alloc(4096);
    let put = |g: &mut Guest, hdr: &Header| g.mem.write_slice(&hdr.to_bytes(), GuestAddress(at)).unwrap();
    let dropped = |g: &mut Guest, descs: &[(u64, u32, u16)]| {
        assert_eq!(g.send_raw(descs).len(), 1, "the chain is returned");
        assert!(g.recv().is_empty());
    };

    put(&mut g, &guest(Op::Rw, 5, 6));
    // Shorter than a header.
    dropped(&mut g, &[(at, 10, 0)]);
    // Device-writable descriptors in TX.
    dropped(&mut g, &[(at, HDR_LEN as u32, WRITE)]);
    dropped(&mut g, &[(at, 20, 0), (at + 20, 24, WRITE)]);
    // Outside guest memory, straddling its end, and near the top of the address space.
    dropped(&mut g, &[(MEM_SIZE + 4096, HDR_LEN as u32, 0)]);
    dropped(&mut g, &[(MEM_SIZE - 20, HDR_LEN as u32, 0)]);
    dropped(&mut g, &[(u64::MAX - 10, HDR_LEN as u32, 0)]);
    // Descriptors that loop: the chain iterator stops at the queue size and the chain is
    // returned. (Its header claims a foreign CID, so that nothing answers.)
    put(&mut g, &Header { src_cid: 9, ..guest(Op::Request, 5, 6) });
    let head = g.tx.next_desc;
    g.tx.write_desc(&g.mem, head, (at, 8, VRING_DESC_F_NEXT as u16, head + 1));
    g.tx.write_desc(&g.mem, head + 1, (at + 8, 8, VRING_DESC_F_NEXT as u16, head));
    g.tx.next_desc += 2;
    g.tx.publish(&g.mem, head);
    g.dev.process_queue(TX_QUEUE, &mut g.queues, &g.mem).unwrap();
    assert_eq!(g.tx.take_used(&g.mem).len(), 1);
    assert!(g.recv().is_empty());
    // Spoofed source CID: no answer.
    dropped(&mut g, &[(at, HDR_LEN as u32, 0)]);
    // RST for a connection that does not exist: nothing to say.
    put(&mut g, &guest(Op::Rst, 5, 6));
    dropped(&mut g, &[(at, HDR_LEN as u32, 0)]);

    // Readable headers with something wrong get RST.
    let answered = |g: &mut Guest, hdr: Header, descs: &[(u64, u32, u16)]| {
        put(g, &hdr);
        assert_eq!(g.send_raw(descs).len(), 1);
        let got = g.recv();
        assert_eq!(got.len(), 1, "{hdr:?}: {got:?}");
        assert_rst(&got[0], hdr.dst_port, hdr.src_port);
    };
    let h = HDR_LEN as u32;
    answered(&mut g, Header { len: 100, ..guest(Op::Rw, 5, 6) }, &[(at, h + 10, 0)]);
    answered(&mut g, Header { len: u32::MAX, ..guest(Op::Rw, 5, 6) }, &[(at, h, 0)]);
    answered(&mut g, Header { len: 70_000, ..guest(Op::Rw, 5, 6) }, &[(at, h, 0), (at, 40_000, 0), (at, 40_000, 0)]);
    answered(&mut g, Header { op: 0, ..guest(Op::Rw, 5, 6) }, &[(at, h, 0)]);
    answered(&mut g, Header { op: 99, ..guest(Op::Rw, 5, 6) }, &[(at, h, 0)]);
    answered(&mut g, Header { type_: 2, ..guest(Op::Request, 5, 6) }, &[(at, h, 0)]);
    answered(&mut g, Header { dst_cid: 7, ..guest(Op::Request, 5, 6) }, &[(at, h, 0)]);
    answered(&mut g, guest(Op::Rw, 5, 6), &[(at, h, 0)]);
    answered(&mut g, guest(Op::CreditRequest, 5, 6), &[(at, h, 0)]);
    // A header split over descriptors is fine (here: a REQUEST nobody listens for).
    answered(&mut g, guest(Op::Request, 5, 6), &[(at, 3, 0), (at + 3, 30, 0), (at + 33, 11, 0)]);
}

#[test]
fn hostile_packets_reset_only_their_connection() {
    let mut g = Guest::new();
    g.give_rx(16);
    let (mut a, port_a) = g.host_connection();
    let (mut b, port_b) = g.host_connection();
    // Payload longer than the chain, on connection a.
    let at = g.alloc(4096);
    g.mem.write_slice(&Header { len: 1000, ..guest(Op::Rw, 52, port_a) }.to_bytes(), GuestAddress(at)).unwrap();
    g.send_raw(&[(at, HDR_LEN as u32 + 10, 0)]);
    assert_rst(&g.wait_one(), port_a, 52);
    wait_eof(&mut g, &mut a);
    // A second REQUEST on an established connection is a protocol error too.
    g.send(&guest(Op::Request, 52, port_b), &[]);
    assert_rst(&g.wait_one(), port_b, 52);
    wait_eof(&mut g, &mut b);
    // Others are unaffected.
    let (mut c, port_c) = g.host_connection();
    g.send(&rw(52, port_c, b"ok"), b"ok");
    let mut got = [0u8; 2];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ok");
}

#[test]
fn hostile_rx_buffers_are_returned_empty_and_the_packet_waits() {
    let mut g = Guest::new();
    // An RST is waiting for a buffer.
    g.send(&guest(Op::Rw, 5, 6), b"");
    let bad: [&[(u64, u32, u16)]; 5] = [
        &[(DATA_START, RX_BUF, 0)],                           // device-readable
        &[(DATA_START, 20, WRITE)],                           // too small for a header
        &[(MEM_SIZE + 4096, RX_BUF, WRITE)],                  // outside memory
        &[(MEM_SIZE - 100, RX_BUF, WRITE)],                   // straddling its end
        &[(DATA_START, 20, WRITE), (DATA_START + 64, 30, 0)], // readable after writable
    ];
    for descs in bad {
        g.rx.push(&g.mem, descs);
        g.dev.process_queue(RX_QUEUE, &mut g.queues, &g.mem).unwrap();
        assert_eq!(g.rx.take_used(&g.mem).iter().map(|u| u.1).collect::<Vec<_>>(), vec![0]);
    }
    // Header split over two small writable descriptors: usable.
    let head = g.rx.push(&g.mem, &[(DATA_START, 20, WRITE), (DATA_START + 20, 24, WRITE)]);
    g.rx_bufs.insert(head, DATA_START);
    g.dev.process_queue(RX_QUEUE, &mut g.queues, &g.mem).unwrap();
    assert_rst(&g.recv()[0], 6, 5);
}

/// The TX loop used to spin on a driver's avail.idx more than the queue size ahead.
#[test]
fn tx_avail_idx_beyond_the_queue_size_is_an_error_not_a_spin() {
    let mut g = Guest::new();
    g.tx.set_avail_idx(&g.mem, g.tx.avail_idx.wrapping_add(QSIZE + 1));
    let r = within(Duration::from_secs(2), move || g.dev.process_queue(TX_QUEUE, &mut g.queues, &g.mem));
    assert!(matches!(r, Err(RingError::AvailIdxAhead { .. })), "{r:?}");
}

#[test]
fn rx_avail_idx_beyond_the_queue_size_is_an_error() {
    let mut g = Guest::new();
    // A packet for the guest: the RST answering a connection to nowhere.
    g.send(&guest(Op::Request, 52, 9999), &[]);
    g.rx.set_avail_idx(&g.mem, g.rx.avail_idx.wrapping_add(QSIZE + 1));
    let r = within(Duration::from_secs(2), move || g.dev.process_queue(RX_QUEUE, &mut g.queues, &g.mem));
    assert!(matches!(r, Err(RingError::AvailIdxAhead { .. })), "{r:?}");
}

/// Indirect tables of 65535 descriptors must not size an allocation.
#[test]
fn chains_of_65535_descriptors_allocate_nothing_of_their_size() {
    let mut g = Guest::new();
    let at = g.alloc(HDR_LEN as u64);
    g.mem.write_slice(&guest(Op::Request, 52, 9999).to_bytes(), GuestAddress(at)).unwrap();
    let table = indirect_table(&g.mem, 6 << 20, MAX_INDIRECT, at, 1, 0);
    let (used, peak) = peak_alloc(|| g.send_raw(&[table]));
    assert_eq!(used.len(), 1, "dropped and returned");
    assert!(peak < 64 << 10, "TX allocated {peak} bytes for one chain");

    // An RST for the guest, and an RX buffer of 65535 one-byte descriptors.
    g.send(&guest(Op::Rw, 52, 9999), &[]);
    let table = indirect_table(&g.mem, 6 << 20, MAX_INDIRECT, DATA_START, 1, WRITE);
    g.rx.push(&g.mem, &[table]);
    let ((), peak) = peak_alloc(|| g.dev.process_queue(RX_QUEUE, &mut g.queues, &g.mem).map(|_| ()).unwrap());
    assert!(peak < 64 << 10, "RX allocated {peak} bytes for one chain");
}

mod props {
    use super::*;
    use crate::devices::virtio::test_fuzz::{config, raw_ring, run_bounded, taken};
    use proptest::prelude::*;

    /// Two connections' buffers (CONN_BUF_SIZE each, at twice that while a VecDeque
    /// grows) and the muxer's tables; nothing a packet says may add more.
    const MAX_ALLOC: usize = 4 * CONN_BUF_SIZE as usize + (256 << 10);
    /// The host port a program listens on.
    const LISTENING: u32 = 1234;

    /// One packet from the guest: mostly well addressed, with any operation, length,
    /// flags and credit, laid out over one to three descriptors.
    #[derive(Clone, Debug)]
    struct Pkt {
        hdr: Header,
        payload: usize,
        splits: Vec<usize>,
        writable: Option<usize>,
    }

    fn pkt() -> impl Strategy<Value = Pkt> {
        let cid = |good: u64| prop_oneof![8 => Just(good), 1 => any::<u64>()];
        let port = prop_oneof![Just(52u32), Just(53u32)];
        let dst =
            prop_oneof![4 => Just(LISTENING), 1 => Just(9999u32), 1 => Just(EPHEMERAL_PORT_BASE), 1 => any::<u32>()];
        let op = prop_oneof![8 => 1u16..=7, 1 => any::<u16>()];
        let flags = prop_oneof![3 => 0u32..4, 1 => any::<u32>()];
        let credit = prop_oneof![Just(GUEST_BUF_ALLOC), 0u32..64, any::<u32>()];
        let payload = prop_oneof![4 => 0usize..64, 1 => 0usize..5000];
        let len = prop_oneof![4 => Just(None), 1 => any::<u32>().prop_map(Some)];
        let type_ = prop_oneof![8 => Just(TYPE_STREAM), 1 => any::<u16>()];
        let head = (cid(GUEST_CID), cid(HOST_CID), port, dst, op, type_, flags);
        let rest = (
            credit.clone(),
            credit,
            payload,
            len,
            prop::collection::vec(0usize..6000, 0..3),
            prop::option::of(0usize..3),
        );
        (head, rest).prop_map(
            |(
                (src_cid, dst_cid, src_port, dst_port, op, type_, flags),
                (buf_alloc, fwd_cnt, payload, len, splits, writable),
            )| Pkt {
                hdr: Header {
                    src_cid,
                    dst_cid,
                    src_port,
                    dst_port,
                    len: len.unwrap_or(payload as u32),
                    type_,
                    op,
                    flags,
                    buf_alloc,
                    fwd_cnt,
                },
                payload,
                splits,
                writable,
            },
        )
    }

    impl Guest {
        /// Publishes `p` as its descriptors say and lets the device process it.
        fn send_pkt(&mut self, p: &Pkt) -> Result<bool, RingError> {
            let len = HDR_LEN + p.payload;
            let addr = self.alloc(len as u64);
            self.mem.write_slice(&p.hdr.to_bytes(), GuestAddress(addr)).unwrap();
            let data: Vec<u8> = (0..p.payload).map(|i| i as u8).collect();
            self.mem.write_slice(&data, GuestAddress(addr + HDR_LEN as u64)).unwrap();
            let mut cuts: Vec<usize> = p.splits.iter().map(|&s| s.min(len)).collect();
            cuts.sort_unstable();
            let mut descs = Vec::new();
            let mut at = 0;
            for cut in cuts.into_iter().chain([len]) {
                descs.push((addr + at as u64, (cut - at) as u32, 0u16));
                at = cut;
            }
            if let Some(i) = p.writable.filter(|&i| i < descs.len()) {
                descs[i].2 = WRITE;
            }
            self.tx.push(&self.mem, &descs);
            self.dev.process_queue(TX_QUEUE, &mut self.queues, &self.mem)
        }

        /// Checks the RX used ring: each entry a whole packet from the host.
        fn check_rx(&mut self) -> Result<(), TestCaseError> {
            for (head, len) in self.rx.take_used(&self.mem) {
                let addr = self.rx_bufs.remove(&head).expect("a buffer we gave");
                if len == 0 {
                    continue; // returned unused
                }
                let mut raw = [0u8; HDR_LEN];
                self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
                let hdr = Header::from_bytes(&raw);
                prop_assert_eq!(len as usize, HDR_LEN + hdr.len as usize);
                prop_assert!(len <= RX_BUF);
                prop_assert_eq!((hdr.src_cid, hdr.dst_cid, hdr.type_), (HOST_CID, GUEST_CID, TYPE_STREAM));
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(config())]

        /// Random packets, host side listening on one port: no panic, no hang, no
        /// allocation sized by the guest; every TX chain comes back, and every RX
        /// buffer used holds one well-formed packet for the guest.
        #[test]
        fn random_packets(pkts in prop::collection::vec(pkt(), 1..12), rx_bufs in 0usize..8) {
            let mut g = Guest::new();
            let listener = UnixListener::bind(port_path(&g.path, LISTENING)).unwrap();
            listener.set_nonblocking(true).unwrap();
            g.give_rx(rx_bufs);
            let (ok, mut g) = run_bounded(MAX_ALLOC, move || {
                let mut ok = true;
                for p in &pkts {
                    ok &= g.send_pkt(p).is_ok();
                    ok &= g.dev.process_host_events(&mut g.queues, &g.mem).is_ok();
                }
                (ok, g)
            });
            prop_assert!(ok, "a well-formed ring is never reported broken");
            prop_assert_eq!(g.tx.take_used(&g.mem).len() as u16, taken(&g.queues[TX_QUEUE], 0));
            prop_assert_eq!(taken(&g.queues[TX_QUEUE], 0), g.tx.avail_idx, "every packet published is taken");
            let rx_taken = taken(&g.queues[RX_QUEUE], 0);
            let before = g.rx_bufs.len();
            g.check_rx()?;
            prop_assert_eq!((before - g.rx_bufs.len()) as u16, rx_taken, "every RX chain taken is returned");
            drop(listener);
        }

        /// Any TX and RX ring: as above, or the ring is reported broken.
        #[test]
        fn any_rings(tx in raw_ring(), rx in raw_ring()) {
            let mut g = Guest::new();
            tx.write(&g.mem, &mut g.tx);
            rx.write(&g.mem, &mut g.rx);
            let (ok, mut g) = run_bounded(MAX_ALLOC, move || {
                let ok = g.dev.process_queue(TX_QUEUE, &mut g.queues, &g.mem).is_ok()
                    && g.dev.process_host_events(&mut g.queues, &g.mem).is_ok()
                    && g.dev.process_queue(RX_QUEUE, &mut g.queues, &g.mem).is_ok();
                (ok, g)
            });
            if ok {
                prop_assert_eq!(g.tx.take_used(&g.mem).len() as u16, taken(&g.queues[TX_QUEUE], 0));
                prop_assert_eq!(g.rx.take_used(&g.mem).len() as u16, taken(&g.queues[RX_QUEUE], 0));
            }
        }
    }
}
