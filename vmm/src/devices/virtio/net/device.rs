//! The virtio-net device: moves frames between the virtqueues and a [`Backend`].
//!
//! Chains are read and written through [`Segments`] (one walk, at most
//! [`MAX_CHAIN_DESCS`] descriptors), never virtio-queue's Reader and Writer.
//!
//! TX (guest to host): each chain is copied whole into a bounce buffer, checked, and
//! handed to the backend. When the backend cannot take a frame (passt's socket is
//! full), that frame waits, the TX queue is left alone, and processing resumes when
//! the socket is writable.
//!
//! RX (host to guest): one frame at a time is read from the backend and written into
//! guest buffers, spread over several of them when VIRTIO_NET_F_MRG_RXBUF was
//! negotiated. When the guest has no room, the frame waits and the backend is no
//! longer polled for input until the guest adds buffers. So at most one frame per
//! direction is held, and a guest that stops reading only stalls its own network.
//!
//! The device owns an epoll fd (its [`VirtioDevice::host_events_fd`]): the backend's fd,
//! with the interest the state above calls for, and an eventfd the device signals to
//! itself when it stopped for fairness with work left.

use std::os::unix::io::{AsRawFd, RawFd};

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Backend, NetError, MAX_BUFFER_LEN, MIN_FRAME_LEN, RX_QUEUE, TX_QUEUE, VNET_HDR_LEN};
use crate::devices::guest_log::guest_error;
use crate::devices::virtio::chain::{ChainError, Segments};
use crate::devices::virtio::{
    add_used, pop_chain, RingError, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;
/// Descriptors the device takes in one chain, either direction. Linux uses at most
/// MAX_SKB_FRAGS + 2 (45 + 2 at the largest MAX_SKB_FRAGS it can be built with); a
/// longer chain is dropped, so that no chain costs more than this to look at.
pub const MAX_CHAIN_DESCS: usize = 64;
/// Frames moved per direction before the device yields to the event loop (it signals
/// itself to come back).
const BUDGET: usize = 256;

const TOKEN_BACKEND: u64 = 0;
const TOKEN_KICK: u64 = 1;

/// Why a TX chain was dropped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// The chain is malformed: a device-writable descriptor, too many descriptors, a
    /// loop, a bad next index or indirect table, or a buffer outside guest memory.
    #[error("TX {0}")]
    BadChain(#[from] ChainError),
    /// The chain holds fewer bytes (given) than a header and an Ethernet header.
    #[error("chain holds {0} bytes, less than a header and an Ethernet header")]
    TooShort(usize),
    /// The chain holds more bytes (given) than a header and the largest frame.
    #[error("chain holds {0} bytes, more than a header and the largest frame")]
    TooLong(usize),
    /// The frame asks for an offload the driver did not negotiate.
    #[error("frame asks for an offload that was not negotiated (flags {flags:#x}, gso_type {gso_type:#x})")]
    Offload {
        /// The header's flags.
        flags: u8,
        /// The header's gso_type.
        gso_type: u8,
    },
}

/// Why an RX chain could not take a frame; it is returned to the guest unused.
#[derive(Debug, PartialEq, Eq)]
enum RxChainError {
    BadChain(ChainError),
    TooSmall(usize),
}

/// Counters, for the log line at the end and for the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Guest frames the backend took.
    pub tx_frames: u64,
    /// Guest frames dropped: malformed, refused by the backend, or sent after it failed.
    pub tx_dropped: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames from the backend dropped: of an impossible size, or too big for the guest's buffers.
    pub rx_dropped: u64,
    /// Guest RX chains returned unused because they were malformed.
    pub rx_bad_chains: u64,
}

/// The virtio-net device, in front of one [`Backend`].
pub struct Net {
    backend: Box<dyn Backend>,
    /// virtio_net_config: mac[6], status (le16), max_virtqueue_pairs (le16), mtu (le16).
    config: [u8; 12],
    offered: u64,
    acked: u64,
    epoll: Epoll,
    kick: EventFd,
    /// `kick` was signalled and not yet consumed.
    kicked: bool,
    /// The events registered for the backend fd; None when it is not registered.
    polled: Option<EventSet>,
    /// A frame (header included) read from the backend and not yet delivered.
    rx_buf: Vec<u8>,
    rx_len: usize,
    /// A TX frame the backend could not take yet.
    tx_buf: Vec<u8>,
    tx_pending: usize,
    /// The backend failed for good (passt exited): frames are dropped from now on.
    dead: bool,
    stats: Stats,
}

impl Net {
    /// A device for `backend` with MAC address `mac`; its link is up.
    pub fn new(backend: Box<dyn Backend>, mac: [u8; 6]) -> Result<Self, NetError> {
        let setup = |what: &'static str| move |err| NetError::Setup { what, err };
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        let mut offered = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | backend.offload_features();
        if let Some(mtu) = backend.mtu() {
            config[10..12].copy_from_slice(&mtu.to_le_bytes());
            offered |= 1 << VIRTIO_NET_F_MTU;
        }
        let epoll = Epoll::new().map_err(setup("epoll"))?;
        let kick = EventFd::new(EFD_NONBLOCK).map_err(setup("eventfd"))?;
        epoll
            .ctl(ControlOperation::Add, kick.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_KICK))
            .map_err(setup("epoll"))?;
        let mut net = Self {
            backend,
            config,
            offered,
            acked: 0,
            epoll,
            kick,
            kicked: false,
            polled: None,
            rx_buf: vec![0; MAX_BUFFER_LEN],
            rx_len: 0,
            tx_buf: vec![0; MAX_BUFFER_LEN],
            tx_pending: 0,
            dead: false,
            stats: Stats::default(),
        };
        net.update_interest();
        Ok(net)
    }

    /// The device's counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked & (1 << bit) != 0
    }

    /// Polls the backend for input only while there is no undelivered frame, and for
    /// output only while a frame waits to be sent.
    fn update_interest(&mut self) {
        let mut want = EventSet::empty();
        if !self.dead {
            if self.rx_len == 0 {
                want |= EventSet::IN;
            }
            if self.tx_pending > 0 || self.backend.wants_write() {
                want |= EventSet::OUT;
            }
        }
        // An fd registered with no events still reports hang-ups, which would spin the
        // event loop: an fd with nothing to wait for is not registered at all.
        let want = (!want.is_empty()).then_some(want);
        if want == self.polled {
            return;
        }
        let fd = self.backend.fd();
        let result = match (self.polled, want) {
            (None, Some(ev)) => self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(ev, TOKEN_BACKEND)),
            (Some(_), Some(ev)) => self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(ev, TOKEN_BACKEND)),
            (Some(_), None) => self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()),
            (None, None) => Ok(()),
        };
        match result {
            Ok(()) => self.polled = want,
            Err(e) => guest_error!("virtio-net: epoll: {e}"),
        }
    }

    /// Makes the event loop come back: work was left for fairness, or is buffered where
    /// no fd reports it.
    fn kick(&mut self) {
        if !self.kicked {
            self.kicked = true;
            let _ = self.kick.write(1);
        }
    }

    fn backend_failed(&mut self, e: &std::io::Error) {
        if !self.dead {
            tracing::error!(
                "virtio-net: {} failed: {e}; the guest's network is down from now on",
                self.backend.describe()
            );
            self.dead = true;
        }
    }

    /// Copies a TX chain into `tx_buf` and checks it; returns its length.
    fn read_tx_chain(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<usize, TxError> {
        // One walk of the chain, of at most MAX_CHAIN_DESCS descriptors; the guest may
        // rewrite the descriptors meanwhile, but every copy is bounds-checked and the
        // frame is validated after it.
        let segs = Segments::new(chain, mem, false, MAX_CHAIN_DESCS)?;
        let len = segs.len();
        if len < VNET_HDR_LEN + MIN_FRAME_LEN {
            return Err(TxError::TooShort(len));
        }
        if len > MAX_BUFFER_LEN {
            return Err(TxError::TooLong(len));
        }
        segs.read_at(mem, 0, &mut self.tx_buf[..len])?;
        self.check_offloads()?;
        Ok(len)
    }

    /// A frame may only ask for the offloads the driver negotiated (the backend was
    /// told to expect exactly those).
    fn check_offloads(&self) -> Result<(), TxError> {
        let (flags, gso_type) = (self.tx_buf[0], self.tx_buf[1]);
        let bad = || TxError::Offload { flags, gso_type };
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 && !self.acked(VIRTIO_NET_F_CSUM) {
            return Err(bad());
        }
        if gso_type & VIRTIO_NET_HDR_GSO_ECN as u8 != 0 && !self.acked(VIRTIO_NET_F_HOST_ECN) {
            return Err(bad());
        }
        let allowed = match u32::from(gso_type & !(VIRTIO_NET_HDR_GSO_ECN as u8)) {
            VIRTIO_NET_HDR_GSO_NONE => true,
            VIRTIO_NET_HDR_GSO_TCPV4 => self.acked(VIRTIO_NET_F_HOST_TSO4),
            VIRTIO_NET_HDR_GSO_TCPV6 => self.acked(VIRTIO_NET_F_HOST_TSO6),
            VIRTIO_NET_HDR_GSO_UDP => self.acked(VIRTIO_NET_F_HOST_UFO),
            _ => false,
        };
        if !allowed {
            return Err(bad());
        }
        Ok(())
    }

    /// Sends the frame that waited for the backend; true once it is gone.
    fn send_pending_tx(&mut self) -> bool {
        if self.tx_pending == 0 {
            return true;
        }
        if self.dead {
            self.tx_pending = 0;
            self.stats.tx_dropped += 1;
            return true;
        }
        match self.backend.flush().and_then(|empty| {
            if empty {
                self.backend.send(&self.tx_buf[..self.tx_pending])
            } else {
                Ok(false)
            }
        }) {
            Ok(true) => {
                self.tx_pending = 0;
                self.stats.tx_frames += 1;
                true
            }
            Ok(false) => false,
            Err(e) => {
                self.backend_failed(&e);
                self.tx_pending = 0;
                self.stats.tx_dropped += 1;
                true
            }
        }
    }

    /// Sends every frame the guest queued, until the backend pushes back. TX buffers
    /// are only read, so they are returned with length 0.
    fn process_tx(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        let Some(queue) = queues.get_mut(TX_QUEUE).filter(|q| q.ready()) else { return Ok(false) };
        if !self.send_pending_tx() {
            self.update_interest();
            return Ok(false);
        }
        let result = self.drain_tx(queue, mem);
        self.update_interest();
        result
    }

    fn drain_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        let mut used_any = false;
        let mut budget = BUDGET;
        'outer: loop {
            queue.disable_notification(mem).map_err(RingError::Access)?;
            while let Some(chain) = pop_chain(queue, mem)? {
                let head = chain.head_index();
                match self.read_tx_chain(chain, mem) {
                    Ok(_) if self.dead => self.stats.tx_dropped += 1,
                    Ok(len) => match self.backend.send(&self.tx_buf[..len]) {
                        Ok(true) => self.stats.tx_frames += 1,
                        Ok(false) => self.tx_pending = len,
                        Err(e) => {
                            // A frame the kernel refuses (e.g. a bad GSO header) is the
                            // guest's problem; a dead passt is ours.
                            if e.kind() == std::io::ErrorKind::InvalidInput {
                                tracing::debug!("virtio-net: backend refused TX frame {head}: {e}");
                            } else if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET | libc::EBADF)) {
                                self.backend_failed(&e);
                            } else {
                                tracing::debug!("virtio-net: TX frame {head} not sent: {e}");
                            }
                            self.stats.tx_dropped += 1;
                        }
                    },
                    Err(why) => {
                        tracing::debug!("virtio-net: dropping TX chain {head}: {why}");
                        self.stats.tx_dropped += 1;
                    }
                }
                add_used(queue, mem, head, 0)?;
                used_any = true;
                if self.tx_pending > 0 {
                    // The backend is full: the rest waits until it is writable (the
                    // guest's notifications stay off meanwhile).
                    break 'outer;
                }
                budget -= 1;
                if budget == 0 {
                    self.kick();
                    break 'outer;
                }
            }
            // More buffers may have arrived meanwhile; pop_chain said the ring was
            // empty, so a true here means the guest really published more.
            if !queue.enable_notification(mem).map_err(RingError::Access)? {
                break;
            }
        }
        Ok(used_any && queue.needs_notification(mem).unwrap_or(true))
    }

    /// Receives frames from the backend into guest buffers until either runs out.
    fn process_rx(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        let queue = queues.get_mut(RX_QUEUE).filter(|q| q.ready());
        let Some(queue) = queue else {
            // Not active yet (or waiting for a reset): hold one frame, stop polling,
            // deliver on activation.
            if self.rx_len == 0 {
                self.receive_one();
            }
            self.update_interest();
            return Ok(false);
        };
        let result = self.fill_rx(queue, mem);
        self.update_interest();
        result
    }

    fn fill_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        let mut used_any = false;
        let mut budget = BUDGET;
        let mut rearmed = 0;
        loop {
            if self.rx_len == 0 {
                if budget == 0 {
                    self.kick();
                    break;
                }
                budget -= 1;
                if !self.receive_one() {
                    break;
                }
            }
            match self.deliver(queue, mem)? {
                Delivery::Done => {
                    self.rx_len = 0;
                    self.stats.rx_frames += 1;
                    used_any = true;
                }
                Delivery::Dropped { used } => {
                    self.rx_len = 0;
                    self.stats.rx_dropped += 1;
                    used_any |= used;
                }
                Delivery::NoRoom { used } => {
                    used_any |= used;
                    // Ask for a notification when the guest adds buffers; look again
                    // if it did so meanwhile (a few times: a guest cannot keep us here).
                    if arm_rx_notification(queue, mem) && rearmed < 4 {
                        rearmed += 1;
                        continue;
                    }
                    break;
                }
            }
        }
        Ok(used_any && queue.needs_notification(mem).unwrap_or(true))
    }

    /// Reads one frame from the backend into `rx_buf`; false when there was none.
    fn receive_one(&mut self) -> bool {
        if self.dead {
            return false;
        }
        loop {
            match self.backend.recv(&mut self.rx_buf) {
                Ok(Some(n)) if (VNET_HDR_LEN + MIN_FRAME_LEN..=MAX_BUFFER_LEN).contains(&n) => {
                    self.rx_len = n;
                    return true;
                }
                Ok(Some(n)) => {
                    tracing::debug!("virtio-net: dropping a {n}-byte frame from the backend");
                    self.stats.rx_dropped += 1;
                }
                Ok(None) => return false,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.backend_failed(&e);
                    return false;
                }
            }
        }
    }

    /// Writes the frame in `rx_buf` into the guest's RX buffers.
    fn deliver(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Delivery, RingError> {
        let len = self.rx_len;
        let mergeable = self.acked(VIRTIO_NET_F_MRG_RXBUF);
        // Buffers that can hold (part of) the frame, and malformed ones to give back.
        let mut good: Vec<(u16, Segments)> = Vec::new();
        let mut bad: Vec<u16> = Vec::new();
        let mut room = 0usize;
        while room < len {
            if !mergeable && !good.is_empty() {
                break;
            }
            let Some(chain) = pop_chain(queue, mem)? else { break };
            let head = chain.head_index();
            match rx_segments(chain, mem) {
                Ok(segs) => {
                    room += segs.len();
                    good.push((head, segs));
                }
                Err(why) => {
                    tracing::debug!("virtio-net: unusable RX buffer {head}: {why:?}");
                    self.stats.rx_bad_chains += 1;
                    bad.push(head);
                }
            }
        }
        // Malformed buffers go back first, so that a frame's buffers stay together in
        // the used ring (a mergeable frame is the next num_buffers used entries).
        let mut used = false;
        for &head in &bad {
            add_used(queue, mem, head, 0)?;
            used = true;
        }
        if room < len {
            if !mergeable && !good.is_empty() {
                // The guest posts buffers too small for this frame (without mergeable
                // buffers it must post full-sized ones): it can never take it.
                tracing::debug!("virtio-net: dropping a {len}-byte frame: RX buffer holds {room}");
                queue.set_next_avail(queue.next_avail().wrapping_sub(good.len() as u16));
                return Ok(Delivery::Dropped { used });
            }
            if bad.is_empty() {
                // Not enough room yet: leave the buffers to the guest, and wait for more.
                queue.set_next_avail(queue.next_avail().wrapping_sub(good.len() as u16));
            } else {
                // Good buffers came after malformed ones, which are already gone: they
                // cannot be pushed back, so they are returned empty.
                for (head, _) in &good {
                    add_used(queue, mem, *head, 0)?;
                    used = true;
                }
            }
            return Ok(Delivery::NoRoom { used });
        }
        self.rx_buf[10..12].copy_from_slice(&(good.len() as u16).to_le_bytes());
        let mut offset = 0;
        for (head, segs) in &good {
            let n = segs.len().min(len - offset);
            if let Err(e) = segs.write_at(mem, 0, &self.rx_buf[offset..offset + n]) {
                // Bounds were checked when the segments were taken; this cannot fail.
                tracing::debug!("virtio-net: writing RX buffer {head}: {e}");
            }
            offset += n;
            add_used(queue, mem, *head, n as u32)?;
        }
        Ok(Delivery::Done)
    }
}

enum Delivery {
    Done,
    /// The frame can never be delivered; `used` says whether buffers were returned.
    Dropped {
        used: bool,
    },
    /// The guest has no room for the frame now.
    NoRoom {
        used: bool,
    },
}

/// Out of RX buffers: with EVENT_IDX, asks the driver to notify on the next buffer it
/// makes available (avail_event = its current avail index, not our next_avail: buffers
/// already published but too few for the frame must not count). Without EVENT_IDX,
/// RX notifications are never suppressed. Returns true when buffers arrived meanwhile.
fn arm_rx_notification(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    use std::sync::atomic::{fence, Ordering};
    use vm_memory::{Address, Bytes, GuestAddress};
    if !queue.event_idx_enabled() {
        return false;
    }
    let Ok(seen) = queue.avail_idx(mem, Ordering::Acquire) else { return false };
    let avail_event = GuestAddress(queue.used_ring()).checked_add(4 + 8 * u64::from(queue.size()));
    let Some(at) = avail_event else { return false };
    if mem.write_obj(seen.0.to_le(), at).is_err() {
        return false;
    }
    fence(Ordering::SeqCst);
    queue.avail_idx(mem, Ordering::Acquire).is_ok_and(|now| now != seen)
}

/// Checks that an RX chain is entirely device-writable, inside guest memory, of at most
/// [`MAX_CHAIN_DESCS`] descriptors, and has room for at least the header.
fn rx_segments(chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> Result<Segments, RxChainError> {
    let segs = Segments::new(chain, mem, true, MAX_CHAIN_DESCS).map_err(RxChainError::BadChain)?;
    match segs.len() {
        n if n < VNET_HDR_LEN => Err(RxChainError::TooSmall(n)),
        _ => Ok(segs),
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn activate(&mut self, acked: u64) {
        self.acked = acked & self.offered;
        self.backend.set_features(self.acked);
        let offloads = [
            (VIRTIO_NET_F_GUEST_CSUM, "guest-csum"),
            (VIRTIO_NET_F_GUEST_TSO4, "guest-tso4"),
            (VIRTIO_NET_F_GUEST_TSO6, "guest-tso6"),
            (VIRTIO_NET_F_CSUM, "csum"),
            (VIRTIO_NET_F_HOST_TSO4, "tso4"),
            (VIRTIO_NET_F_HOST_TSO6, "tso6"),
            (VIRTIO_NET_F_MRG_RXBUF, "mrg-rxbuf"),
            (VIRTIO_NET_F_MTU, "mtu"),
        ];
        let on: Vec<&str> = offloads.iter().filter(|(b, _)| self.acked(*b)).map(|(_, n)| *n).collect();
        tracing::debug!("virtio-net: driver ready ({}); features: {}", self.backend.describe(), on.join(" "));
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        match index {
            RX_QUEUE => self.process_rx(queues, mem),
            TX_QUEUE => self.process_tx(queues, mem),
            _ => Ok(false),
        }
    }

    fn host_events_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_host_events(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        // Everything is level-triggered: whatever is ready is handled below, and what
        // is not handled stays ready. (The inner epoll needs no epoll_wait: a nested
        // epoll fd only reports its fds that are ready when it is polled.)
        let kicked = std::mem::take(&mut self.kicked);
        if kicked {
            let _ = self.kick.read();
        }
        let mut notify = false;
        if self.tx_pending > 0 || self.backend.wants_write() || kicked {
            if self.dead {
                self.tx_pending = 0;
            } else if let Err(e) = self.backend.flush() {
                self.backend_failed(&e);
            }
            if !queues.is_empty() {
                notify |= self.process_tx(queues, mem)?;
            }
        }
        notify |= self.process_rx(queues, mem)?;
        if self.backend.has_buffered_rx() && self.rx_len == 0 && !self.dead {
            self.kick();
        }
        Ok(notify)
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.rx_len = 0;
        self.tx_pending = 0;
        self.backend.set_features(0);
        self.update_interest();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let s = self.stats;
        tracing::debug!(
            "virtio-net: {}: {} frames sent ({} dropped), {} received ({} dropped, {} bad RX buffers)",
            self.backend.describe(),
            s.tx_frames,
            s.tx_dropped,
            s.rx_frames,
            s.rx_dropped,
            s.rx_bad_chains
        );
    }
}
