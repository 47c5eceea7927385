//! One stream connection between a guest port and a host UNIX stream: its state machine
//! and credit flow control (virtio spec 5.10.6.3) in both directions.
//!
//! Credit, in short: each side advertises `buf_alloc` (its receive buffer) and `fwd_cnt`
//! (bytes it has consumed so far) in every header. A sender keeps
//! `sent - peer_fwd_cnt <= peer_buf_alloc`.
//! - Host to guest: we read from the host stream only as much as the guest has room
//!   for, straight into its RX buffer, so nothing is buffered on this side.
//! - Guest to host: bytes the host stream does not take at once wait in `to_host`, whose
//!   size is the `buf_alloc` we advertise. A guest that sends more has broken the
//!   protocol and gets RST.
//!
//! Closing, as the Linux driver expects it:
//! - The host stream reaching EOF becomes SHUTDOWN(SEND) to the guest. The guest can
//!   still send, which keeps half-closed host clients working.
//! - The host closing its end completely (EPOLLHUP) becomes SHUTDOWN(RCV|SEND), once
//!   the remaining data is delivered. The guest answers with RST; if it does not, we send
//!   RST ourselves after [`SHUTDOWN_TIMEOUT`].
//! - The guest's SHUTDOWN(SEND) shuts the host stream's write side once the buffered
//!   data is written. SHUTDOWN(RCV|SEND) from the guest is answered with RST after that.
//! - I/O errors on the host stream, and protocol violations, reset the connection.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::MsgFlags;
use vmm_sys_util::epoll::EventSet;

use super::packet::{Header, Op, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::HOST_CID;
use crate::devices::guest_log::guest_warn;

/// Guest-to-host bytes one connection may hold back when the host reads slower than
/// the guest writes. Advertised as `buf_alloc`.
pub const CONN_BUF_SIZE: u32 = 256 << 10;
/// Once this much buffer space was freed without telling the guest, tell it: a guest
/// that ran out of credit would otherwise wait forever.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;

/// How long the guest has to answer a host-initiated REQUEST. Short in tests, which
/// wait for it. Firecracker allows 2 s; a node busy under emulation (kubelet starting
/// its pods, measured) took longer than that, so a listening agent looked absent.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(if cfg!(test) { 200 } else { 10_000 });
/// How long the guest has to answer our SHUTDOWN(RCV|SEND) with RST.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_millis(if cfg!(test) { 200 } else { 2000 });

/// What the muxer does with a connection after it handled an event.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub enum Outcome {
    /// Keep the connection.
    Keep,
    /// Close the host stream and send RST to the guest.
    Reset,
    /// Close the host stream; the guest has already dropped the connection (it sent RST).
    Close,
}

/// The result of asking a connection for its next packet to the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum Rx {
    /// A header, and for RW the number of payload bytes placed in the caller's buffer.
    Packet(Header, usize),
    /// No packet for the guest now.
    Nothing,
    /// Reading the host stream failed: reset the connection.
    Reset,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    LocalInit,
    Established,
    /// We sent SHUTDOWN(RCV|SEND) and wait for the guest's RST until the deadline.
    Closing,
}

/// One stream connection between a guest port and a host UNIX stream.
pub struct Connection {
    stream: UnixStream,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    state: State,
    deadline: Option<Instant>,

    // Control packets owed to the guest.
    send_request: bool,
    send_response: bool,
    send_credit_update: bool,
    send_credit_request: bool,
    /// SHUTDOWN flags decided so far, and those the guest has already been sent.
    shutdown_flags: u32,
    shutdown_sent: u32,
    /// SHUTDOWN flags received from the guest.
    guest_shut: u32,

    // The host stream.
    /// epoll reported it readable, and no read has since returned EAGAIN.
    host_readable: bool,
    /// A read returned end of file: the host sends nothing more.
    host_eof: bool,
    /// The host closed its end (EPOLLHUP): nothing can be written to it any more.
    host_hup: bool,
    /// Our write side is shut, after the guest's SHUTDOWN(SEND).
    host_write_shut: bool,

    // Guest to host: we are the receiver.
    to_host: VecDeque<u8>,
    /// Leading bytes of `to_host` that the VMM wrote itself (the "OK" line); they are
    /// not guest data, so they do not count against credit.
    to_host_own: usize,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,

    // Host to guest: we are the sender.
    sent_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
}

impl Connection {
    /// A host client asked for guest port `peer_port`: REQUEST it, with a deadline.
    pub fn host_initiated(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32, now: Instant) -> Self {
        let mut c = Self::new(stream, guest_cid, local_port, peer_port, State::LocalInit);
        c.send_request = true;
        c.deadline = Some(now + REQUEST_TIMEOUT);
        c
    }

    /// The guest's REQUEST `hdr` was accepted by a host listener: RESPONSE owed.
    pub fn guest_initiated(stream: UnixStream, guest_cid: u64, hdr: &Header) -> Self {
        let mut c = Self::new(stream, guest_cid, hdr.dst_port, hdr.src_port, State::Established);
        c.send_response = true;
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        c
    }

    fn new(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32, state: State) -> Self {
        Self {
            stream,
            guest_cid,
            local_port,
            peer_port,
            state,
            deadline: None,
            send_request: false,
            send_response: false,
            send_credit_update: false,
            send_credit_request: false,
            shutdown_flags: 0,
            shutdown_sent: 0,
            guest_shut: 0,
            host_readable: false,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
            to_host: VecDeque::new(),
            to_host_own: 0,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            sent_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
        }
    }

    /// The host stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// When an awaited answer from the guest (to REQUEST or SHUTDOWN) is due, if one is.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The epoll events to watch on the host stream; None once the host hung up (epoll
    /// would report the hangup forever, and there is nothing left to wait for).
    pub fn interest(&self) -> Option<EventSet> {
        if self.host_hup {
            return None;
        }
        let mut events = EventSet::empty();
        if self.can_send_data() && !self.host_readable {
            events |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            events |= EventSet::OUT;
        }
        Some(events)
    }

    /// True when [`Self::next_rx`] may have a packet for the guest.
    pub fn has_rx(&self) -> bool {
        self.send_request
            || self.send_response
            || (self.host_readable && self.can_send_data())
            || self.shutdown_flags != self.shutdown_sent
            || self.send_credit_update
            || self.send_credit_request
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        // A guest reporting fwd_cnt ahead of what we sent makes this wrap: it then gets
        // nothing, which only hurts itself.
        let in_flight = (self.sent_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.guest_shut & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// Handles a packet the guest sent on this connection (`op` is `hdr.op`, decoded).
    pub fn on_guest_packet(&mut self, hdr: &Header, op: Op, payload: &[u8]) -> Outcome {
        // Every header carries the guest's credit state.
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match (self.state, op) {
            (_, Op::Rst) => return Outcome::Close,
            (State::LocalInit, Op::Response) => {
                self.state = State::Established;
                self.deadline = None;
                // The host client learns the connection is up before any data.
                let line = format!("OK {}\n", self.local_port);
                self.to_host_own = line.len();
                self.to_host.extend(line.as_bytes());
                if let Err(e) = self.flush() {
                    tracing::debug!("vsock {}: host stream: {e}", self.local_port);
                    return Outcome::Reset;
                }
            }
            (State::LocalInit, _) | (_, Op::Request | Op::Response) => {
                tracing::debug!("vsock {}: unexpected {op:?} in state {:?}", self.local_port, self.state);
                return Outcome::Reset;
            }
            (_, Op::Rw) => {
                if self.guest_shut & SHUTDOWN_SEND != 0 || self.host_hup || self.host_write_shut {
                    tracing::debug!("vsock {}: data after the stream was shut", self.local_port);
                    return Outcome::Reset;
                }
                let buffered = self.to_host.len() - self.to_host_own;
                if buffered + payload.len() > CONN_BUF_SIZE as usize {
                    guest_warn!(
                        "vsock {}: guest sent {} bytes with {buffered} of {CONN_BUF_SIZE} buffered: credit overrun, resetting",
                        self.local_port,
                        payload.len()
                    );
                    return Outcome::Reset;
                }
                if let Err(e) = self.write_to_host(payload) {
                    tracing::debug!("vsock {}: host stream: {e}", self.local_port);
                    return Outcome::Reset;
                }
            }
            // The header fields read above are the update.
            (_, Op::CreditUpdate) => {}
            (_, Op::CreditRequest) => self.send_credit_update = true,
            (_, Op::Shutdown) => self.guest_shut |= hdr.flags & SHUTDOWN_BOTH,
        }
        self.settle()
    }

    /// Handles epoll events on the host stream.
    pub fn on_host_event(&mut self, events: EventSet) -> Outcome {
        if events.contains(EventSet::ERROR) {
            tracing::debug!("vsock {}: host stream error", self.local_port);
            return Outcome::Reset;
        }
        if events.contains(EventSet::HANG_UP) {
            // Unread data may remain: keep reading until EOF. What the guest still had
            // on its way to the host has nowhere to go.
            self.host_hup = true;
            self.host_readable = true;
            self.to_host.clear();
            self.to_host_own = 0;
        }
        if events.contains(EventSet::IN) {
            self.host_readable = true;
        }
        if events.contains(EventSet::OUT) {
            if let Err(e) = self.flush() {
                tracing::debug!("vsock {}: host stream: {e}", self.local_port);
                return Outcome::Reset;
            }
        }
        self.settle()
    }

    /// Called when the deadline passed: an unanswered REQUEST or SHUTDOWN ends in RST.
    pub fn on_timeout(&mut self, now: Instant) -> Outcome {
        match self.deadline {
            Some(at) if at <= now => {
                tracing::debug!("vsock {}: guest did not answer in {:?} state; resetting", self.local_port, self.state);
                Outcome::Reset
            }
            _ => Outcome::Keep,
        }
    }

    /// The next packet for the guest, in protocol order: connection setup, data, then
    /// SHUTDOWN (which must follow the last data), then credit messages. For RW, up to
    /// `buf.len()` bytes (further limited by the guest's credit) are read from the host
    /// stream into `buf`.
    pub fn next_rx(&mut self, buf: &mut [u8], now: Instant) -> Rx {
        if self.send_request {
            self.send_request = false;
            return self.packet(Op::Request, 0, 0);
        }
        if self.send_response {
            self.send_response = false;
            return self.packet(Op::Response, 0, 0);
        }
        if self.host_readable && self.can_send_data() {
            let max = buf.len().min(self.peer_credit() as usize);
            // A guest buffer with no room past the header cannot carry data; control
            // packets below can still use it.
            if max > 0 {
                match self.stream.read(&mut buf[..max]) {
                    Ok(0) => {
                        self.host_eof = true;
                        self.decide_shutdown();
                    }
                    Ok(n) => {
                        self.sent_cnt += n as u32;
                        if self.peer_credit() == 0 {
                            self.send_credit_request = true;
                        }
                        return self.packet(Op::Rw, 0, n);
                    }
                    // Level-triggered epoll reports it again if it was a fluke.
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {
                        self.host_readable = false;
                    }
                    Err(e) => {
                        tracing::debug!("vsock {}: reading host stream: {e}", self.local_port);
                        return Rx::Reset;
                    }
                }
            }
        }
        if self.shutdown_flags != self.shutdown_sent {
            self.shutdown_sent = self.shutdown_flags;
            if self.shutdown_sent == SHUTDOWN_BOTH {
                self.state = State::Closing;
                self.deadline = Some(now + SHUTDOWN_TIMEOUT);
            }
            return self.packet(Op::Shutdown, self.shutdown_flags, 0);
        }
        if self.send_credit_update {
            return self.packet(Op::CreditUpdate, 0, 0);
        }
        if self.send_credit_request {
            self.send_credit_request = false;
            return self.packet(Op::CreditRequest, 0, 0);
        }
        Rx::Nothing
    }

    fn packet(&mut self, op: Op, flags: u32, len: usize) -> Rx {
        // Every packet tells the guest our fwd_cnt: a separate update is no longer owed.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.send_credit_update = false;
        let hdr = Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: len as u32,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        };
        Rx::Packet(hdr, len)
    }

    /// Applies what follows from the shutdown state after any event.
    fn settle(&mut self) -> Outcome {
        if self.to_host.is_empty() {
            if self.guest_shut == SHUTDOWN_BOTH {
                // The guest closed and all its data reached the host: it expects RST.
                return Outcome::Reset;
            }
            if self.guest_shut & SHUTDOWN_SEND != 0 && !self.host_write_shut && !self.host_hup {
                // The host client sees EOF but may keep sending.
                if let Err(e) = self.stream.shutdown(Shutdown::Write) {
                    tracing::debug!("vsock {}: shutting host stream: {e}", self.local_port);
                }
                self.host_write_shut = true;
            }
        }
        self.decide_shutdown();
        Outcome::Keep
    }

    fn decide_shutdown(&mut self) {
        if self.state == State::LocalInit {
            return;
        }
        if self.host_eof {
            self.shutdown_flags |= SHUTDOWN_SEND;
        }
        // After a hangup the host receives nothing more either; tell the guest once the
        // data before the hangup is delivered (or the guest will not read it anyway).
        if self.host_hup && (self.host_eof || self.guest_shut & SHUTDOWN_RCV != 0) {
            self.shutdown_flags |= SHUTDOWN_BOTH;
        }
    }

    /// Writes guest data to the host stream, keeping what it does not take yet.
    fn write_to_host(&mut self, data: &[u8]) -> io::Result<()> {
        let mut written = 0;
        if self.to_host.is_empty() {
            while written < data.len() {
                match self.send(&data[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            self.account_written(written);
        }
        self.to_host.extend(&data[written..]);
        Ok(())
    }

    /// Writes as much of `to_host` as the host stream takes.
    fn flush(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.send(front) {
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.account_written(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// One send(2) that never raises SIGPIPE (a host client that went away must not
    /// kill the VMM) and retries on EINTR.
    fn send(&self, data: &[u8]) -> io::Result<usize> {
        loop {
            match nix::sys::socket::send(self.stream.as_raw_fd(), data, MsgFlags::MSG_NOSIGNAL) {
                Ok(0) if !data.is_empty() => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn account_written(&mut self, n: usize) {
        let own = n.min(self.to_host_own);
        self.to_host_own -= own;
        self.fwd_cnt += (n - own) as u32;
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.send_credit_update = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const GUEST: u64 = 3;

    fn guest_hdr(op: Op, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 52,
            dst_port: 1 << 30,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn next(c: &mut Connection, buf: &mut [u8]) -> Option<(Op, u32, usize)> {
        match c.next_rx(buf, Instant::now()) {
            Rx::Packet(h, n) => Some((h.op().unwrap(), h.flags, n)),
            Rx::Nothing => None,
            Rx::Reset => panic!("unexpected reset"),
        }
    }

    /// A host-initiated connection the guest has accepted.
    fn established(buf_alloc: u32) -> (Connection, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut c = Connection::host_initiated(ours, GUEST, 1 << 30, 52, Instant::now());
        assert_eq!(next(&mut c, &mut []), Some((Op::Request, 0, 0)));
        assert_eq!(c.on_guest_packet(&guest_hdr(Op::Response, 0, buf_alloc, 0), Op::Response, &[]), Outcome::Keep);
        (c, host)
    }

    #[test]
    fn host_to_guest_data_never_exceeds_guest_credit() {
        let (mut c, mut host) = established(10);
        host.write_all(&[7u8; 100]).unwrap();
        assert_eq!(c.on_host_event(EventSet::IN), Outcome::Keep);
        let mut buf = [0u8; 4096];
        assert_eq!(next(&mut c, &mut buf), Some((Op::Rw, 0, 10)));
        // Out of credit: ask for an update, then stay quiet and stop polling for input.
        assert_eq!(next(&mut c, &mut buf), Some((Op::CreditRequest, 0, 0)));
        assert_eq!(next(&mut c, &mut buf), None);
        assert!(!c.has_rx());
        assert_eq!(c.interest(), Some(EventSet::empty()));
        // The guest consumed 4 bytes: exactly 4 more may go.
        assert_eq!(c.on_guest_packet(&guest_hdr(Op::CreditUpdate, 0, 10, 4), Op::CreditUpdate, &[]), Outcome::Keep);
        assert_eq!(next(&mut c, &mut buf), Some((Op::Rw, 0, 4)));
    }

    #[test]
    fn guest_credit_overrun_resets() {
        let (mut c, host) = established(1 << 16);
        // The host never reads: its socket buffer fills, then ours, then the guest
        // oversteps the buf_alloc we advertised.
        let chunk = vec![1u8; 64 << 10];
        let mut outcome = Outcome::Keep;
        for _ in 0..256 {
            outcome = c.on_guest_packet(&guest_hdr(Op::Rw, chunk.len() as u32, 1 << 16, 0), Op::Rw, &chunk);
            if outcome != Outcome::Keep {
                break;
            }
            assert!(c.to_host.len() <= CONN_BUF_SIZE as usize + 16, "buffer stays bounded");
        }
        assert_eq!(outcome, Outcome::Reset);
        drop(host);
    }

    #[test]
    fn fwd_cnt_counts_guest_bytes_only_and_updates_are_sent() {
        let (mut c, mut host) = established(1 << 16);
        let mut line = [0u8; 14];
        std::io::Read::read_exact(&mut host, &mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
        let data = vec![5u8; CREDIT_UPDATE_THRESHOLD as usize];
        assert_eq!(c.on_guest_packet(&guest_hdr(Op::Rw, data.len() as u32, 1 << 16, 0), Op::Rw, &data), Outcome::Keep);
        assert_eq!(c.fwd_cnt.0, CREDIT_UPDATE_THRESHOLD);
        assert_eq!(next(&mut c, &mut []), Some((Op::CreditUpdate, 0, 0)));
        assert_eq!(next(&mut c, &mut []), None);
    }

    #[test]
    fn protocol_violations_reset() {
        let (ours, _host) = UnixStream::pair().unwrap();
        let mut c = Connection::host_initiated(ours, GUEST, 1 << 30, 52, Instant::now());
        // Data before the guest accepted the connection.
        assert_eq!(c.on_guest_packet(&guest_hdr(Op::Rw, 1, 100, 0), Op::Rw, b"x"), Outcome::Reset);
        let (mut c, _host) = established(100);
        assert_eq!(c.on_guest_packet(&guest_hdr(Op::Request, 0, 100, 0), Op::Request, &[]), Outcome::Reset);
        let (mut c, _host) = established(100);
        assert_eq!(c.on_guest_packet(&guest_hdr(Op::Rst, 0, 100, 0), Op::Rst, &[]), Outcome::Close);
        let (mut c, _host) = established(100);
        let shut = Header { flags: SHUTDOWN_SEND, ..guest_hdr(Op::Shutdown, 0, 100, 0) };
        assert_eq!(c.on_guest_packet(&shut, Op::Shutdown, &[]), Outcome::Keep);
        assert_eq!(
            c.on_guest_packet(&guest_hdr(Op::Rw, 1, 100, 0), Op::Rw, b"x"),
            Outcome::Reset,
            "data after SHUTDOWN(SEND)"
        );
    }

    #[test]
    fn unanswered_request_times_out() {
        let (ours, _host) = UnixStream::pair().unwrap();
        let t0 = Instant::now();
        let mut c = Connection::host_initiated(ours, GUEST, 1 << 30, 52, t0);
        assert_eq!(c.on_timeout(t0), Outcome::Keep);
        assert_eq!(c.on_timeout(t0 + REQUEST_TIMEOUT), Outcome::Reset);
    }
}
