//! vsock packets in guest memory: the 44-byte header (virtio spec 5.10.6) and the checks
//! that turn an untrusted descriptor chain into a header plus payload, or refuse it.
//!
//! TX chains (guest to host) must be entirely device-readable and RX chains (host to
//! guest) entirely device-writable, of at most [`MAX_CHAIN_DESCS`] descriptors, all
//! inside guest memory: the chain is walked once, into bounded
//! [`Segments`], before a single byte is copied.

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use crate::devices::virtio::chain::{ChainError, Segments};

/// Size of `struct virtio_vsock_hdr` on the wire (packed, little endian).
pub const HDR_LEN: usize = 44;
/// Largest payload in one packet, as in Linux (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE): a bigger
/// `len` is a malformed packet, and host-to-guest packets never carry more.
pub const MAX_PAYLOAD: usize = 64 << 10;
/// Descriptors the device takes in one chain. Linux uses one or two (header and
/// payload), and at most MAX_SKB_FRAGS + 1 for a paged packet.
pub const MAX_CHAIN_DESCS: usize = 64;

/// The socket type of stream connections (VIRTIO_VSOCK_TYPE_STREAM).
pub const TYPE_STREAM: u16 = 1;
/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// The sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both directions are shut.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Packet operations; 0 (INVALID) and anything above 7 are not operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Opens a connection.
    Request = 1,
    /// Accepts a REQUEST.
    Response = 2,
    /// Refuses or resets a connection.
    Rst = 3,
    /// Shuts one or both directions (the SHUTDOWN flags).
    Shutdown = 4,
    /// Carries stream data.
    Rw = 5,
    /// Tells the peer the sender's buffer space (`buf_alloc`, `fwd_cnt`).
    CreditUpdate = 6,
    /// Asks the peer for a credit update.
    CreditRequest = 7,
}

impl Op {
    /// The operation `op` stands for, if any.
    pub fn from_raw(op: u16) -> Option<Self> {
        Some(match op {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Rst,
            4 => Self::Shutdown,
            5 => Self::Rw,
            6 => Self::CreditUpdate,
            7 => Self::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`. Fields are kept raw (`op` included) so that a packet with an
/// unknown operation can still be answered with RST.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// The sender's context ID.
    pub src_cid: u64,
    /// The receiver's context ID.
    pub dst_cid: u64,
    /// The sender's port.
    pub src_port: u32,
    /// The receiver's port.
    pub dst_port: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// The operation, raw (see [`Op`]).
    pub op: u16,
    /// Operation flags: the SHUTDOWN flags for [`Op::Shutdown`].
    pub flags: u32,
    /// The sender's receive buffer size, for credit.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed so far, for credit.
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes a header from its wire form.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().expect("2 bytes"));
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header in its wire form.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The operation, if `op` is a known one.
    pub fn op(&self) -> Option<Op> {
        Op::from_raw(self.op)
    }
}

/// Why a descriptor chain was refused as a packet or an RX buffer.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The chain is malformed: a descriptor in the wrong direction, too many
    /// descriptors, a loop or bad indirect table, or a buffer outside guest memory.
    #[error(transparent)]
    BadChain(#[from] ChainError),
    /// The chain holds fewer bytes (given) than a header.
    #[error("chain holds {0} bytes, less than the {HDR_LEN}-byte header")]
    TooShort(usize),
    /// The header announces more payload than the chain holds.
    #[error("header announces {len} payload bytes but the chain holds {avail}")]
    LenBeyondChain {
        /// The payload length the header announces.
        len: u32,
        /// The bytes the chain holds after the header.
        avail: usize,
    },
    /// The announced payload is over [`MAX_PAYLOAD`] or the caller's buffer.
    #[error("payload of {0} bytes is over the {MAX_PAYLOAD}-byte packet limit")]
    PayloadTooLong(u32),
}

type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

/// A guest-to-host packet's chain, its header read.
pub struct TxPacket<'m> {
    /// The packet's header.
    pub hdr: Header,
    segs: Segments,
    mem: &'m GuestMemoryMmap,
}

/// Reads the header of a guest-to-host packet.
pub fn read_header<'m>(chain: Chain<'m>, mem: &'m GuestMemoryMmap) -> Result<TxPacket<'m>, PacketError> {
    let segs = Segments::new(chain, mem, false, MAX_CHAIN_DESCS)?;
    if segs.len() < HDR_LEN {
        return Err(PacketError::TooShort(segs.len()));
    }
    let mut raw = [0u8; HDR_LEN];
    segs.read_at(mem, 0, &mut raw)?;
    Ok(TxPacket { hdr: Header::from_bytes(&raw), segs, mem })
}

impl TxPacket<'_> {
    /// Copies an RW packet's payload into `scratch` and returns it; other operations
    /// carry no payload (any bytes after their header are ignored).
    pub fn read_payload<'s>(&self, scratch: &'s mut [u8]) -> Result<&'s [u8], PacketError> {
        if self.hdr.op() != Some(Op::Rw) {
            return Ok(&[]);
        }
        let len = self.hdr.len as usize;
        if len > MAX_PAYLOAD || len > scratch.len() {
            return Err(PacketError::PayloadTooLong(self.hdr.len));
        }
        let avail = self.segs.len() - HDR_LEN;
        if len > avail {
            return Err(PacketError::LenBeyondChain { len: self.hdr.len, avail });
        }
        self.segs.read_at(self.mem, HDR_LEN, &mut scratch[..len])?;
        Ok(&scratch[..len])
    }
}

/// A guest RX buffer, checked to be device-writable and large enough for a header.
pub struct RxBuffer<'m> {
    segs: Segments,
    mem: &'m GuestMemoryMmap,
}

impl<'m> RxBuffer<'m> {
    /// Checks `chain` as an RX buffer: all device-writable, with room for a header.
    pub fn new(chain: Chain<'m>, mem: &'m GuestMemoryMmap) -> Result<Self, PacketError> {
        let segs = Segments::new(chain, mem, true, MAX_CHAIN_DESCS)?;
        match segs.len() {
            n if n < HDR_LEN => Err(PacketError::TooShort(n)),
            _ => Ok(Self { segs, mem }),
        }
    }

    /// Payload bytes that fit after the header (capped at the packet limit).
    pub fn payload_capacity(&self) -> usize {
        (self.segs.len() - HDR_LEN).min(MAX_PAYLOAD)
    }

    /// Writes the packet; returns the used length to report. `payload` must fit
    /// [`Self::payload_capacity`]; the segments were bounds-checked when taken.
    pub fn fill(self, hdr: &Header, payload: &[u8]) -> Result<u32, PacketError> {
        debug_assert_eq!(hdr.len as usize, payload.len());
        self.segs.write_at(self.mem, 0, &hdr.to_bytes())?;
        self.segs.write_at(self.mem, HDR_LEN, payload)?;
        Ok((HDR_LEN + payload.len()) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_little_endian() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 52,
            len: 7,
            type_: TYPE_STREAM,
            op: Op::Rw as u16,
            flags: SHUTDOWN_BOTH,
            buf_alloc: 1 << 18,
            fwd_cnt: 99,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
        assert_eq!(Header { op: 0, ..h }.op(), None);
        assert_eq!(Header { op: 8, ..h }.op(), None);
    }
}
