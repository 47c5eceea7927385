//! The device as a guest driver sees it: split rings in real guest memory (laid out by
//! virtio-queue's mock), and on the host side the real qemu stream protocol backend on
//! a socketpair, the test playing passt.

use std::io::{Read, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::virtio::test_alloc::peak_alloc;
use crate::devices::virtio::test_ring::{indirect_table, within, Ring, MAX_INDIRECT, QSIZE};

use super::stream::{StreamBackend, PASST_MTU};
use super::{Backend, Net, MAX_FRAME_LEN, RX_QUEUE, TX_QUEUE, VNET_HDR_LEN};
use crate::devices::virtio::{RingError, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

const MEM_SIZE: u64 = 16 << 20;
const DATA_START: u64 = 1 << 20;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// What Linux posts as a mergeable RX buffer (a page).
const RX_BUF: u32 = 4096;

/// Guest memory, the device, its queues, and the passt end of its socket.
struct Guest {
    mem: GuestMemoryMmap,
    dev: Net,
    queues: Vec<Queue>,
    rx: Ring,
    tx: Ring,
    /// RX buffers given and not returned: head -> (addr, len).
    rx_bufs: std::collections::HashMap<u16, (u64, u32)>,
    next_buf: u64,
    passt: UnixStream,
}

const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_RING_F_EVENT_IDX);

impl Guest {
    fn with_backend(backend: Box<dyn Backend>, passt: UnixStream, features: u64) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let (rx, mut rxq) = Ring::new(&mem, 0);
        let (tx, mut txq) = Ring::new(&mem, 0x10000);
        let mut dev = Net::new(backend, [6, 0x6b, 0x6c, 1, 2, 3]).unwrap();
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        rxq.set_event_idx(event_idx);
        txq.set_event_idx(event_idx);
        dev.activate(features & dev.features());
        passt.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        Guest { mem, dev, queues: vec![rxq, txq], rx, tx, rx_bufs: Default::default(), next_buf: DATA_START, passt }
    }

    fn new(features: u64) -> Self {
        let (ours, passt) = UnixStream::pair().unwrap();
        Self::with_backend(Box::new(StreamBackend::new(ours, Some(PASST_MTU)).unwrap()), passt, features)
    }

    fn alloc(&mut self, len: u64) -> u64 {
        if self.next_buf + len > MEM_SIZE {
            self.next_buf = DATA_START;
        }
        let at = self.next_buf;
        self.next_buf += len.next_multiple_of(64);
        at
    }

    fn give_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let addr = self.alloc(u64::from(len));
            let head = self.rx.push(&self.mem, &[(addr, len, WRITE)]);
            self.rx_bufs.insert(head, (addr, len));
        }
        self.dev.process_queue(RX_QUEUE, &mut self.queues, &self.mem).unwrap();
    }

    /// Publishes a raw TX chain, lets the device process it; returns the used entries.
    fn send_raw(&mut self, descs: &[(u64, u32, u16)]) -> Vec<(u16, u32)> {
        self.tx.push(&self.mem, descs);
        self.dev.process_queue(TX_QUEUE, &mut self.queues, &self.mem).unwrap();
        self.tx.take_used(&self.mem)
    }

    /// Sends `frame` with header `hdr` as the guest would: header and frame in one buffer.
    fn send_with(&mut self, hdr: [u8; VNET_HDR_LEN], frame: &[u8]) -> Vec<(u16, u32)> {
        let addr = self.alloc((VNET_HDR_LEN + frame.len()) as u64);
        self.mem.write_slice(&hdr, GuestAddress(addr)).unwrap();
        self.mem.write_slice(frame, GuestAddress(addr + VNET_HDR_LEN as u64)).unwrap();
        self.send_raw(&[(addr, (VNET_HDR_LEN + frame.len()) as u32, 0)])
    }

    fn send(&mut self, frame: &[u8]) {
        let used = self.send_with([0; VNET_HDR_LEN], frame);
        assert_eq!(used.len(), 1);
    }

    /// Frames (header, frame) the device delivered so far, reassembled from mergeable
    /// buffers by num_buffers as Linux does.
    fn recv(&mut self) -> Vec<([u8; VNET_HDR_LEN], Vec<u8>)> {
        let mut out = Vec::new();
        let used = self.rx.take_used(&self.mem);
        let mut i = 0;
        while i < used.len() {
            let (head, len) = used[i];
            let (addr, _) = self.rx_bufs.remove(&head).expect("a buffer we gave");
            let mut bytes = vec![0u8; len as usize];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            assert!(bytes.len() >= VNET_HDR_LEN, "used length {len}");
            let hdr: [u8; VNET_HDR_LEN] = bytes[..VNET_HDR_LEN].try_into().unwrap();
            let num_buffers = u16::from_le_bytes([hdr[10], hdr[11]]) as usize;
            assert!(
                num_buffers >= 1 && i + num_buffers <= used.len(),
                "num_buffers {num_buffers} of {}",
                used.len() - i
            );
            let mut frame = bytes[VNET_HDR_LEN..].to_vec();
            for &(h, l) in &used[i + 1..i + num_buffers] {
                let (a, _) = self.rx_bufs.remove(&h).expect("a buffer we gave");
                let mut more = vec![0u8; l as usize];
                self.mem.read_slice(&mut more, GuestAddress(a)).unwrap();
                frame.extend_from_slice(&more);
            }
            out.push((hdr, frame));
            i += num_buffers;
        }
        out
    }

    fn pump(&mut self) -> bool {
        self.dev.process_host_events(&mut self.queues, &self.mem).unwrap()
    }

    /// Pumps until `n` frames arrived (or 2 s passed).
    fn wait_frames(&mut self, n: usize) -> Vec<([u8; VNET_HDR_LEN], Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut got = Vec::new();
        while got.len() < n && Instant::now() < deadline {
            self.pump();
            got.extend(self.recv());
            std::thread::sleep(Duration::from_millis(1));
        }
        got
    }

    /// passt's side: sends one frame with its length prefix.
    fn passt_send(&mut self, frame: &[u8]) {
        self.passt.write_all(&(frame.len() as u32).to_be_bytes()).unwrap();
        self.passt.write_all(frame).unwrap();
    }

    /// passt's side: reads one frame.
    fn passt_recv(&mut self) -> Vec<u8> {
        let mut len = [0u8; 4];
        self.passt.read_exact(&mut len).unwrap();
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        self.passt.read_exact(&mut frame).unwrap();
        frame
    }

    /// True when nothing more reached passt's side.
    fn passt_quiet(&mut self) -> bool {
        !readable(std::os::unix::io::AsRawFd::as_raw_fd(&self.passt))
    }
}

/// An Ethernet frame of `len` bytes with a recognisable pattern.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect();
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f
}

fn readable(fd: i32) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    // SAFETY: the device owns the fd and outlives this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    poll(&mut [PollFd::new(fd, PollFlags::POLLIN)], PollTimeout::ZERO).unwrap() > 0
}

/// Level-triggered epoll must go quiet once the device handled what it can.
fn assert_idle(g: &Guest) {
    assert!(!readable(g.dev.host_events_fd().unwrap()), "host events fd still readable: the event loop would spin");
}

#[test]
fn identity_config_and_features() {
    let g = Guest::new(FEATURES);
    assert_eq!(g.dev.device_type(), 1);
    assert_eq!(g.dev.queue_max_sizes(), &[256, 256]);
    let c = g.dev.config();
    assert_eq!(&c[..6], &[6, 0x6b, 0x6c, 1, 2, 3]);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([c[10], c[11]]), PASST_MTU);
    let f = g.dev.features();
    assert_ne!(f & (1 << VIRTIO_NET_F_MTU), 0);
    assert_ne!(f & (1 << VIRTIO_NET_F_MRG_RXBUF), 0);
    assert_eq!(
        f & ((1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4)),
        0,
        "passt takes no offloads"
    );
}

#[test]
fn frames_flow_both_ways_over_the_stream_protocol() {
    let mut g = Guest::new(FEATURES);
    g.give_rx(16, RX_BUF);
    // Guest to passt: the header is stripped, the length prefixed.
    let f = frame(60, 1);
    g.send(&f);
    assert_eq!(g.passt_recv(), f);
    let big = frame(PASST_MTU as usize + 14, 2);
    g.send(&big);
    assert_eq!(g.passt_recv(), big);
    // passt to guest: a zero header with num_buffers.
    let f = frame(1514, 3);
    g.passt_send(&f);
    let got = g.wait_frames(1);
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].0[..10], &[0; 10]);
    assert_eq!(got[0].1, f);
    assert_idle(&g);
    assert_eq!((g.dev.stats().tx_frames, g.dev.stats().rx_frames), (2, 1));
}

#[test]
fn a_64k_frame_spreads_over_mergeable_buffers() {
    let mut g = Guest::new(FEATURES);
    g.give_rx(20, RX_BUF);
    let f = frame(PASST_MTU as usize + 14, 9);
    g.passt_send(&f);
    g.passt_send(&frame(100, 10));
    let got = g.wait_frames(2);
    assert_eq!(got.len(), 2);
    let n = u16::from_le_bytes([got[0].0[10], got[0].0[11]]) as usize;
    assert_eq!(n, (VNET_HDR_LEN + f.len()).div_ceil(RX_BUF as usize), "num_buffers");
    assert_eq!(got[0].1, f);
    assert_eq!(got[1].1, frame(100, 10));
}

#[test]
fn frame_waits_for_room_and_the_backend_is_not_polled_meanwhile() {
    let mut g = Guest::new(FEATURES);
    // 3 pages of room, a 64 KiB frame: it must wait, not be cut.
    g.give_rx(3, RX_BUF);
    let f = frame(30000, 4);
    g.passt_send(&f);
    g.passt_send(&frame(64, 5));
    g.pump();
    assert!(g.recv().is_empty(), "no partial frame");
    assert_idle(&g);
    // The device asked to be notified when the driver adds any buffer: avail_event is
    // the driver's avail index, not the first unused buffer.
    assert_eq!(g.rx.avail_event(&g.mem), g.rx.avail_idx);
    g.give_rx(8, RX_BUF);
    let got = g.wait_frames(2);
    assert_eq!(got.iter().map(|x| x.1.clone()).collect::<Vec<_>>(), vec![f, frame(64, 5)]);
    assert_idle(&g);
}

#[test]
fn before_activation_one_frame_is_held_and_nothing_spins() {
    let (ours, mut passt) = UnixStream::pair().unwrap();
    let mut dev = Net::new(Box::new(StreamBackend::new(ours, None).unwrap()), [2, 0, 0, 0, 0, 1]).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    passt.write_all(&64u32.to_be_bytes()).unwrap();
    passt.write_all(&frame(64, 0)).unwrap();
    assert!(readable(dev.host_events_fd().unwrap()));
    assert!(!dev.process_host_events(&mut [], &mem).unwrap());
    assert!(!readable(dev.host_events_fd().unwrap()), "the held frame stops polling");
    dev.reset();
}

#[test]
fn without_mergeable_buffers_a_frame_too_big_for_a_buffer_is_dropped() {
    let mut g = Guest::new(FEATURES & !(1 << VIRTIO_NET_F_MRG_RXBUF));
    g.give_rx(2, 1526);
    g.passt_send(&frame(5000, 1));
    g.passt_send(&frame(1514, 2));
    let got = g.wait_frames(1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, frame(1514, 2), "the big one was dropped, its buffer kept");
    assert_eq!(g.dev.stats().rx_dropped, 1);
}

#[test]
fn hostile_tx_chains_are_dropped_and_returned() {
    let mut g = Guest::new(FEATURES);
    let ok = frame(60, 1);
    let a = g.alloc(256);
    g.mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(a)).unwrap();
    g.mem.write_slice(&ok, GuestAddress(a + VNET_HDR_LEN as u64)).unwrap();
    let full = (VNET_HDR_LEN + ok.len()) as u32;
    type Chain = Vec<(u64, u32, u16)>;
    let cases: Vec<(&str, Chain)> = vec![
        ("device-writable descriptor", vec![(a, full, WRITE)]),
        ("writable after readable", vec![(a, 12, 0), (a + 12, 60, WRITE)]),
        ("header only", vec![(a, 12, 0)]),
        ("shorter than an Ethernet header", vec![(a, 12 + 13, 0)]),
        ("empty descriptors", vec![(a, 0, 0), (a, 0, 0)]),
        ("outside memory", vec![(MEM_SIZE - 10, 100, 0)]),
        ("address overflow", vec![(u64::MAX - 8, 100, 0)]),
        ("longer than the largest frame", vec![(a, 40000, 0), (a, 40000, 0)]),
        ("4 GiB", vec![(a, u32::MAX, 0), (a, u32::MAX, 0)]),
    ];
    for (what, descs) in cases {
        let used = g.send_raw(&descs);
        assert_eq!(used.len(), 1, "{what}: returned");
        assert_eq!(used[0].1, 0, "{what}: used length");
        assert!(g.passt_quiet(), "{what}: nothing reached passt");
    }
    // Offloads that were not negotiated.
    let mut csum = [0u8; VNET_HDR_LEN];
    csum[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    assert_eq!(g.send_with(csum, &ok).len(), 1);
    let mut tso = [0u8; VNET_HDR_LEN];
    tso[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    assert_eq!(g.send_with(tso, &ok).len(), 1);
    let mut unknown = [0u8; VNET_HDR_LEN];
    unknown[1] = 0x42;
    assert_eq!(g.send_with(unknown, &ok).len(), 1);
    assert!(g.passt_quiet(), "offloaded frames never reach passt");
    // A chain that loops: the iterator's TTL ends it; it is returned.
    let head = g.tx.next_desc;
    g.tx.write_desc(&g.mem, head, (a, 30, VRING_DESC_F_NEXT as u16, head + 1));
    g.tx.write_desc(&g.mem, head + 1, (a, 30, VRING_DESC_F_NEXT as u16, head));
    g.tx.next_desc += 2;
    g.tx.publish(&g.mem, head);
    g.dev.process_queue(TX_QUEUE, &mut g.queues, &g.mem).unwrap();
    assert_eq!(g.tx.take_used(&g.mem).len(), 1, "looping chain returned");
    // An indirect descriptor pointing at garbage.
    let table = g.alloc(64);
    g.mem.write_slice(&[0xff; 64], GuestAddress(table)).unwrap();
    assert_eq!(g.send_raw(&[(table, 64, VRING_DESC_F_INDIRECT as u16)]).len(), 1);
    // A next index beyond the queue.
    let head = g.tx.next_desc;
    g.tx.write_desc(&g.mem, head, (a, full, VRING_DESC_F_NEXT as u16, 999));
    g.tx.next_desc += 1;
    g.tx.publish(&g.mem, head);
    g.dev.process_queue(TX_QUEUE, &mut g.queues, &g.mem).unwrap();
    assert_eq!(g.tx.take_used(&g.mem).len(), 1, "cut-off chain returned");
    assert!(g.passt_quiet(), "a chain cut off by a bad next index is not sent");
    // After all that, a good frame still goes through, split over two descriptors.
    let used = g.send_raw(&[(a, 12, 0), (a + 12, 60, 0)]);
    assert_eq!(used.len(), 1);
    assert_eq!(g.passt_recv(), ok);
    assert_idle(&g);
}

#[test]
fn hostile_rx_chains_are_returned_empty_and_the_frame_waits_for_a_good_one() {
    let mut g = Guest::new(FEATURES);
    let a = g.alloc(8192);
    let bad: Vec<Vec<(u64, u32, u16)>> = vec![
        vec![(a, 4096, 0)],                       // device-readable
        vec![(a, 100, WRITE), (a + 100, 100, 0)], // readable after writable
        vec![(MEM_SIZE - 100, 4096, WRITE)],      // outside memory
        vec![(u64::MAX - 8, 4096, WRITE)],        // address overflow
        vec![(a, 11, WRITE)],                     // smaller than the header
        vec![(a, 0, WRITE)],                      // empty
    ];
    let n_bad = bad.len();
    for d in &bad {
        g.rx.push(&g.mem, d);
    }
    g.dev.process_queue(RX_QUEUE, &mut g.queues, &g.mem).unwrap();
    g.passt_send(&frame(1000, 7));
    g.pump();
    let used = g.rx.take_used(&g.mem);
    assert_eq!(used.len(), n_bad);
    assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
    g.give_rx(1, RX_BUF);
    let got = g.wait_frames(1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, frame(1000, 7));
    assert_eq!(g.dev.stats().rx_bad_chains, n_bad as u64);
    assert_idle(&g);
}

#[test]
fn a_full_socket_pauses_tx_without_losing_or_reordering_frames() {
    let mut g = Guest::new(FEATURES);
    // Fill the socket: passt does not read.
    let mut sent = 0u32;
    let mut tx_left = false;
    while sent < 200 {
        let mut f = frame(60000, 0);
        f[14..18].copy_from_slice(&sent.to_be_bytes());
        let used = g.send_with([0; VNET_HDR_LEN], &f);
        sent += 1;
        if used.is_empty() {
            tx_left = true; // the device stopped taking chains
            break;
        }
    }
    assert!(tx_left || g.dev.stats().tx_frames < u64::from(sent), "the socket never filled up");
    // While blocked, the device waits for writability only (nothing to read).
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < sent as usize && Instant::now() < deadline {
        let f = g.passt_recv();
        got.push(u32::from_be_bytes(f[14..18].try_into().unwrap()));
        g.pump();
        g.tx.take_used(&g.mem);
    }
    assert_eq!(got, (0..sent).collect::<Vec<_>>(), "every frame, in order");
    assert_idle(&g);
}

#[test]
fn garbage_lengths_from_the_backend_are_skipped() {
    let mut g = Guest::new(FEATURES);
    g.give_rx(4, RX_BUF);
    // A length beyond any frame, then its "payload", then a good frame.
    g.passt.write_all(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes()).unwrap();
    let junk = vec![0xee; MAX_FRAME_LEN + 1];
    let mut writer = g.passt.try_clone().unwrap();
    let t = std::thread::spawn(move || writer.write_all(&junk).unwrap());
    let deadline = Instant::now() + Duration::from_secs(2);
    while !t.is_finished() && Instant::now() < deadline {
        g.pump();
    }
    t.join().unwrap();
    g.passt.write_all(&5u32.to_be_bytes()).unwrap();
    g.passt.write_all(&[1, 2, 3, 4, 5]).unwrap();
    g.passt_send(&frame(80, 3));
    let got = g.wait_frames(1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, frame(80, 3));
}

#[test]
fn a_dead_backend_does_not_spin_the_event_loop() {
    let mut g = Guest::new(FEATURES);
    g.give_rx(4, RX_BUF);
    let (_, dead) = UnixStream::pair().unwrap();
    drop(std::mem::replace(&mut g.passt, dead));
    assert!(readable(g.dev.host_events_fd().unwrap()), "the hang-up is reported");
    g.pump();
    assert_idle(&g);
    // The guest can still send; frames are dropped and buffers returned.
    g.send(&frame(60, 1));
    assert_eq!(g.dev.stats().tx_dropped, 1);
    assert_idle(&g);
}

/// A driver that moves avail.idx more than the queue size ahead used to make the TX
/// loop spin: virtio-queue's iterator refused the ring (and logged), and
/// enable_notification kept saying more was there.
#[test]
fn tx_avail_idx_beyond_the_queue_size_is_an_error_not_a_spin() {
    let mut g = Guest::new(FEATURES);
    g.send(&frame(60, 1));
    assert_eq!(g.passt_recv(), frame(60, 1));
    g.tx.set_avail_idx(&g.mem, g.tx.avail_idx.wrapping_add(QSIZE + 1));
    let r = within(Duration::from_secs(2), move || g.dev.process_queue(TX_QUEUE, &mut g.queues, &g.mem));
    assert!(matches!(r, Err(RingError::AvailIdxAhead { .. })), "{r:?}");
}

#[test]
fn rx_avail_idx_beyond_the_queue_size_is_an_error_not_a_stall() {
    let mut g = Guest::new(FEATURES);
    g.give_rx(1, RX_BUF);
    g.rx.set_avail_idx(&g.mem, g.rx.avail_idx.wrapping_add(QSIZE));
    g.passt_send(&frame(60, 1));
    let r = within(Duration::from_secs(2), move || {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match g.dev.process_host_events(&mut g.queues, &g.mem) {
                Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                other => return other,
            }
        }
    });
    assert!(matches!(r, Err(RingError::AvailIdxAhead { .. })), "{r:?}");
}

/// An avail entry naming a descriptor beyond the table cannot be returned through the
/// used ring (add_used refuses it): the device reports it instead of dropping it.
#[test]
fn head_index_beyond_the_table_is_an_error() {
    let mut g = Guest::new(FEATURES);
    g.tx.publish(&g.mem, QSIZE + 3);
    let r = g.dev.process_queue(TX_QUEUE, &mut g.queues, &g.mem);
    assert!(matches!(r, Err(RingError::HeadOutOfRange { head, .. }) if head == QSIZE + 3), "{r:?}");
}

/// Indirect tables of 65535 descriptors must not size an allocation (virtio-queue's
/// Reader and Writer keep one slice per descriptor).
#[test]
fn chains_of_65535_descriptors_allocate_nothing_of_their_size() {
    let mut g = Guest::new(FEATURES);
    let table = indirect_table(&g.mem, 8 << 20, MAX_INDIRECT, DATA_START, 1, 0);
    let (used, peak) = peak_alloc(|| g.send_raw(&[table]));
    assert_eq!(used.len(), 1, "dropped and returned");
    assert!(peak < 64 << 10, "TX allocated {peak} bytes for one chain");
    assert!(g.passt_quiet());

    let table = indirect_table(&g.mem, 8 << 20, MAX_INDIRECT, DATA_START, 1, WRITE);
    g.rx.push(&g.mem, &[table]);
    g.passt_send(&frame(60, 1));
    let (_, peak) = peak_alloc(|| {
        let deadline = Instant::now() + Duration::from_millis(200);
        while g.rx.take_used(&g.mem).is_empty() && Instant::now() < deadline {
            g.pump();
        }
    });
    assert!(peak < 64 << 10, "RX allocated {peak} bytes for one chain");
}

mod props {
    use super::*;
    use crate::devices::virtio::test_fuzz::{config, guest_memory, raw_ring, run_bounded, taken, RawRing};
    use proptest::prelude::*;

    /// Frames and offloads, allocation included: the device's two bounce buffers are
    /// allocated before, and nothing a chain says may add more than this.
    const MAX_ALLOC: usize = 1 << 20;

    /// Feature sets a driver may accept.
    fn features() -> impl Strategy<Value = u64> {
        let base = 1u64 << VIRTIO_F_VERSION_1;
        prop_oneof![
            Just(FEATURES),
            Just(base),
            Just(base | (1 << VIRTIO_NET_F_MRG_RXBUF)),
            Just(FEATURES | (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4) | (1 << VIRTIO_NET_F_GUEST_CSUM)),
        ]
    }

    /// A device behind a stream backend whose passt end does not block, guest memory,
    /// and the RX and TX rings, with `raw` written into ring `which`.
    fn setup(features: u64, raw: &RawRing, which: usize) -> (Net, UnixStream, GuestMemoryMmap, Vec<Queue>, Ring) {
        let (ours, passt) = UnixStream::pair().unwrap();
        passt.set_nonblocking(true).unwrap();
        let mut dev =
            Net::new(Box::new(StreamBackend::new(ours, Some(PASST_MTU)).unwrap()), [2, 0, 0, 0, 0, 1]).unwrap();
        let mem = guest_memory();
        let (mut rx, mut rxq) = Ring::new(&mem, 0);
        let (mut tx, mut txq) = Ring::new(&mem, 0x10000);
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        rxq.set_event_idx(event_idx);
        txq.set_event_idx(event_idx);
        dev.activate(features & dev.features());
        let ring = if which == RX_QUEUE { &mut rx } else { &mut tx };
        raw.write(&mem, ring);
        let ring = if which == RX_QUEUE { rx } else { tx };
        (dev, passt, mem, vec![rxq, txq], ring)
    }

    fn drain(passt: &mut UnixStream) {
        let mut buf = [0u8; 65536];
        while matches!(passt.read(&mut buf), Ok(n) if n > 0) {}
    }

    proptest! {
        #![proptest_config(config())]

        /// Any TX ring: no panic, no hang, no allocation sized by the guest; every
        /// chain taken is returned (or the ring is reported broken).
        #[test]
        fn any_tx_ring(raw in raw_ring(), features in features()) {
            let (mut dev, mut passt, mem, mut queues, mut ring) = setup(features, &raw, TX_QUEUE);
            let (ok, queues, mem) = run_bounded(MAX_ALLOC, move || {
                let mut ok = dev.process_queue(TX_QUEUE, &mut queues, &mem).is_ok();
                // The backend takes what it can; the rest goes when it is writable.
                for _ in 0..4 {
                    drain(&mut passt);
                    ok &= dev.process_host_events(&mut queues, &mem).is_ok();
                }
                (ok, queues, mem)
            });
            if ok {
                prop_assert_eq!(ring.take_used(&mem).len() as u16, taken(&queues[TX_QUEUE], 0));
            }
        }

        /// Any RX ring, with frames of any length from the backend: as above, and every
        /// used length fits in a frame.
        #[test]
        fn any_rx_ring(
            raw in raw_ring(),
            features in features(),
            frames in prop::collection::vec(prop_oneof![14..200usize, 1500..1515usize, 0..70_000usize], 0..3),
        ) {
            let (mut dev, mut passt, mem, mut queues, mut ring) = setup(features, &raw, RX_QUEUE);
            for (i, &len) in frames.iter().enumerate() {
                // The socket takes what fits; a frame cut short is the backend's to handle.
                let _ = passt.write_all(&(len as u32).to_be_bytes());
                let _ = passt.write_all(&frame(len.max(14), i as u8)[..len]);
            }
            let (ok, queues, mem) = run_bounded(MAX_ALLOC, move || {
                let mut ok = dev.process_queue(RX_QUEUE, &mut queues, &mem).is_ok();
                for _ in 0..4 {
                    ok &= dev.process_host_events(&mut queues, &mem).is_ok();
                }
                drop(passt);
                (ok, queues, mem)
            });
            if ok {
                let used = ring.take_used(&mem);
                prop_assert_eq!(used.len() as u16, taken(&queues[RX_QUEUE], 0));
                prop_assert!(used.iter().all(|&(_, len)| len as usize <= VNET_HDR_LEN + MAX_FRAME_LEN));
            }
        }
    }
}
