//! The virtio-vsock device: moves packets between the virtqueues and the [`Muxer`].
//!
//! TX (guest to host) is drained whenever the guest notifies it. RX (host to guest) is
//! filled whenever there is something to send and the guest left buffers. That happens
//! after TX processing (replies), when the guest adds buffers, and on host socket
//! events. The event queue carries one event only: a transport reset after the VM was
//! restored from a snapshot, when every connection of the snapshot is gone (the host
//! sockets of the saved VM are not there any more); the guest then drops them, and its
//! listeners accept new ones.

use std::os::unix::io::RawFd;
use std::path::Path;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::muxer::Muxer;
use super::packet::{self, RxBuffer, MAX_PAYLOAD};
use super::{VsockError, RX_QUEUE, TX_QUEUE};
use crate::devices::guest_log::guest_warn;
use crate::devices::virtio::chain::Segments;
use crate::devices::virtio::{add_used, pop_chain, service_queue, RingError, VirtioDevice, VIRTIO_F_VERSION_1};

const QUEUE_SIZE: u16 = 256;

/// The virtio-vsock device; its host side is a [`Muxer`].
pub struct Vsock {
    muxer: Muxer,
    /// virtio_vsock_config: guest_cid (le64).
    config: [u8; 8],
    /// Payload bounce buffer, for both directions.
    scratch: Vec<u8>,
}

impl Vsock {
    /// A device for guest `guest_cid`, listening for host clients on `uds_path`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        Ok(Self {
            muxer: Muxer::new(uds_path, guest_cid)?,
            config: guest_cid.to_le_bytes(),
            scratch: vec![0; MAX_PAYLOAD],
        })
    }

    /// Hands every packet the guest queued to the muxer. TX buffers are only read, so
    /// they are returned with length 0.
    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        service_queue(queue, mem, |chain| {
            let head = chain.head_index();
            match packet::read_header(chain, mem) {
                Ok(pkt) => match pkt.read_payload(&mut self.scratch) {
                    Ok(payload) => self.muxer.send_pkt(&pkt.hdr, payload),
                    Err(e) => {
                        tracing::debug!("vsock: refusing packet {:?}: {e}", pkt.hdr);
                        self.muxer.refuse(&pkt.hdr);
                    }
                },
                Err(e) => tracing::debug!("vsock: dropping TX chain {head}: {e}"),
            }
            0
        })
    }

    /// Fills guest RX buffers with whatever the muxer has for the guest.
    fn fill_rx(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        let Some(queue) = queues.get_mut(RX_QUEUE).filter(|q| q.ready()) else { return Ok(false) };
        let mut used_any = false;
        while self.muxer.has_rx() {
            let Some(chain) = pop_chain(queue, mem)? else { break };
            let head = chain.head_index();
            let len = match RxBuffer::new(chain, mem) {
                Ok(buf) => {
                    let room = buf.payload_capacity();
                    let Some((hdr, n)) = self.muxer.next_rx(&mut self.scratch[..room]) else {
                        // Nothing could use this buffer after all: leave it to the guest.
                        queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                        break;
                    };
                    buf.fill(&hdr, &self.scratch[..n]).unwrap_or_else(|e| {
                        guest_warn!("vsock: writing RX buffer {head}: {e}");
                        0
                    })
                }
                Err(e) => {
                    // Returned empty, so that the guest can reuse it; the packet waits
                    // for the next buffer.
                    tracing::debug!("vsock: unusable RX buffer {head}: {e}");
                    0
                }
            };
            add_used(queue, mem, head, len)?;
            used_any = true;
        }
        Ok(used_any && queue.needs_notification(mem).unwrap_or(true))
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        match index {
            TX_QUEUE => {
                let tx_notify = match queues.get_mut(TX_QUEUE) {
                    Some(q) => self.process_tx(q, mem)?,
                    None => false,
                };
                // Replies (RESPONSE, RST, credit updates) go out right away.
                Ok(self.fill_rx(queues, mem)? | tx_notify)
            }
            RX_QUEUE => self.fill_rx(queues, mem),
            // The event queue (index 2) only carries the restore's reset, sent then.
            _ => Ok(false),
        }
    }

    fn host_events_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_host_events(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        self.muxer.process_host_events();
        self.fill_rx(queues, mem)
    }

    fn reset(&mut self) {
        self.muxer.reset();
    }

    fn restored(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        self.muxer.reset();
        let Some(queue) = queues.get_mut(EVENT_QUEUE).filter(|q| q.ready()) else { return Ok(false) };
        let Some(chain) = pop_chain(queue, mem)? else {
            guest_warn!("vsock: no event buffer for the transport reset after a restore");
            return Ok(false);
        };
        let head = chain.head_index();
        // struct virtio_vsock_event { le32 id; }, id VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
        let len = match Segments::new(chain, mem, true, 4) {
            Ok(segs) if segs.len() >= 4 => segs.write_at(mem, 0, &TRANSPORT_RESET.to_le_bytes()).map_or(0, |_| 4),
            _ => 0,
        };
        add_used(queue, mem, head, len)?;
        Ok(queue.needs_notification(mem).unwrap_or(true))
    }
}

/// The event queue's index.
const EVENT_QUEUE: usize = 2;
/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
const TRANSPORT_RESET: u32 = 0;
