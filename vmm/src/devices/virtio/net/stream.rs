//! The stream backend: frames on a connected stream socket in the qemu stream protocol
//! (each Ethernet frame prefixed by its length as a 32-bit big-endian number), which is
//! what passt speaks on `--fd N`. Starting passt is the host's business (the `kindling`
//! binary's `hostnet`); the device model only reads and writes the socket.
//!
//! The peer cannot take frames with offloads (partial checksums, TSO), so none are
//! offered; a large MTU (passt's 65520 bytes) makes bulk transfers as cheap in frames
//! as TSO would. The peer is not trusted either: a frame length outside
//! [`MIN_FRAME_LEN`]..=[`MAX_FRAME_LEN`] is skipped, never buffered.

use std::io::{self, IoSlice, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use super::{Backend, MAX_FRAME_LEN, MIN_FRAME_LEN, VNET_HDR_LEN};
use crate::devices::guest_log::guest_warn;

/// passt's default MTU (65535 minus the Ethernet header, rounded down to 32 bits).
pub const PASST_MTU: u16 = 65520;
/// Room for at least one largest frame with its length prefix, plus more frames.
const RBUF_LEN: usize = 4 + MAX_FRAME_LEN + (64 << 10);

/// The qemu stream protocol on a connected stream socket, non-blocking.
pub struct StreamBackend {
    sock: UnixStream,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    /// Bytes of a frame with an impossible length that are still to be discarded.
    skip: usize,
    /// The unwritten rest of a frame (prefix included) after a short write.
    wbuf: Vec<u8>,
    wpos: usize,
    mtu: Option<u16>,
}

impl StreamBackend {
    /// Speaks the protocol on `sock` (made non-blocking), offering the guest `mtu`.
    pub fn new(sock: UnixStream, mtu: Option<u16>) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        Ok(Self {
            sock,
            rbuf: vec![0; RBUF_LEN].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            skip: 0,
            wbuf: Vec::new(),
            wpos: 0,
            mtu,
        })
    }

    /// The length prefix at the read position, if all four bytes are buffered.
    fn next_len(&self) -> Option<usize> {
        let b = self.rbuf.get(self.rstart..self.rstart + 4).filter(|_| self.rend - self.rstart >= 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
}

impl Backend for StreamBackend {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn mtu(&self) -> Option<u16> {
        self.mtu
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            let avail = self.rend - self.rstart;
            if self.skip > 0 {
                let n = self.skip.min(avail);
                self.rstart += n;
                self.skip -= n;
            } else if let Some(len) = self.next_len() {
                if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len) {
                    guest_warn!("virtio-net: the stream peer sent a frame of {len} bytes; skipping it");
                    self.rstart += 4;
                    self.skip = len;
                    continue;
                }
                if avail >= 4 + len {
                    let frame = &self.rbuf[self.rstart + 4..self.rstart + 4 + len];
                    buf[..VNET_HDR_LEN].fill(0);
                    buf[VNET_HDR_LEN..VNET_HDR_LEN + len].copy_from_slice(frame);
                    self.rstart += 4 + len;
                    return Ok(Some(VNET_HDR_LEN + len));
                }
            }
            // Need more bytes: make room for a whole frame after the read position.
            if self.rstart == self.rend {
                self.rstart = 0;
                self.rend = 0;
            } else if self.rbuf.len() - self.rend < 4 + MAX_FRAME_LEN {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            match self.sock.read(&mut self.rbuf[self.rend..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the stream peer (passt) closed the connection",
                    ))
                }
                Ok(n) => self.rend += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn has_buffered_rx(&self) -> bool {
        let avail = self.rend - self.rstart;
        if self.skip > 0 {
            return avail > 0;
        }
        match self.next_len() {
            Some(len) if (MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len) => avail >= 4 + len,
            Some(_) => true,
            None => false,
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        if !self.flush()? {
            return Ok(false);
        }
        let eth = &frame[VNET_HDR_LEN..];
        let prefix = (eth.len() as u32).to_be_bytes();
        let total = prefix.len() + eth.len();
        loop {
            match self.sock.write_vectored(&[IoSlice::new(&prefix), IoSlice::new(eth)]) {
                Ok(n) if n == total => return Ok(true),
                Ok(n) => {
                    // A short write: the rest must follow before any other frame.
                    self.wbuf.clear();
                    self.wbuf.extend_from_slice(&prefix[n.min(4)..]);
                    self.wbuf.extend_from_slice(&eth[n.saturating_sub(4)..]);
                    self.wpos = 0;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn wants_write(&self) -> bool {
        self.wpos < self.wbuf.len()
    }

    fn flush(&mut self) -> io::Result<bool> {
        while self.wpos < self.wbuf.len() {
            match self.sock.write(&self.wbuf[self.wpos..]) {
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        Ok(true)
    }

    fn describe(&self) -> String {
        "qemu stream socket".into()
    }
}
