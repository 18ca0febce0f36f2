//! The vhost-user side of weft-blk: features, config space, queue processing with
//! EVENT_IDX, and a serve loop that accepts QEMU again after it disconnects.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::request::{self, MAX_SEGMENTS, MAX_SEGMENT_SECTORS, SECTOR};
use super::BlockDevice;
use crate::cow::BLOCK;

/// Requests of one batch processed at once (threads).
const PARALLEL_REQUESTS: usize = 8;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: the device speaks vhost-user protocol features.
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// Per-device counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Requests answered with an error or unsupported status.
    pub errors: AtomicU64,
}

/// Queue shape of a served disk.
#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// Number of request queues (one worker thread each).
    pub queues: usize,
    /// Largest queue size the device accepts.
    pub queue_size: usize,
}

impl Default for QueueConfig {
    fn default() -> QueueConfig {
        QueueConfig {
            queues: 2,
            queue_size: 256,
        }
    }
}

/// One vhost-user connection's backend (a new one per connection: the worker
/// threads and their exit events belong to one connection).
#[derive(Clone)]
pub struct BlkBackend {
    dev: Arc<dyn BlockDevice>,
    cfg: QueueConfig,
    event_idx: Arc<AtomicBool>,
    mem: Arc<RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>>,
    exits: Arc<Vec<EventFd>>,
    counters: Arc<Counters>,
}

impl BlkBackend {
    /// A backend serving `dev`.
    pub fn new(
        dev: Arc<dyn BlockDevice>,
        cfg: QueueConfig,
        counters: Arc<Counters>,
    ) -> io::Result<BlkBackend> {
        let exits = (0..cfg.queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(BlkBackend {
            dev,
            cfg,
            event_idx: Arc::new(AtomicBool::new(false)),
            mem: Arc::new(RwLock::new(None)),
            exits: Arc::new(exits),
            counters,
        })
    }

    /// The virtio-blk config space (virtio 1.2, 5.2.4), 60 bytes.
    pub fn config_space(&self) -> Vec<u8> {
        config_space(
            self.dev.size(),
            self.cfg.queues as u16,
            self.cfg.queue_size as u32,
        )
    }

    fn process_queue(&self, vring: &VringRwLock) -> io::Result<()> {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mem = self
            .mem
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                io::Error::other("a queue was kicked before the memory table was set")
            })?;
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let chains: Vec<_> = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem.memory())
                .map_err(io::Error::other)?
                .collect();
            let any = !chains.is_empty();
            // The requests of one batch run in parallel and complete in any order
            // (virtio allows it): a read waiting on the disk does not hold up the rest.
            let dev = self.dev.as_ref();
            let done = crate::par::map(chains, PARALLEL_REQUESTS, |c| {
                (c.head_index(), request::process(c, dev))
            });
            for (head, out) in done {
                self.counters.requests.fetch_add(1, Ordering::Relaxed);
                if out.status != Some(request::S_OK) {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                }
                vring.add_used(head, out.used).map_err(io::Error::other)?;
            }
            if any {
                let notify = if event_idx {
                    vring.needs_notification().map_err(io::Error::other)?
                } else {
                    true
                };
                if notify {
                    vring.signal_used_queue()?;
                }
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }

    fn exit_all(&self) {
        for e in self.exits.iter() {
            let _ = e.write(1);
        }
    }
}

/// The config space bytes for a disk of `size` bytes.
pub fn config_space(size: u64, queues: u16, queue_size: u32) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    let put32 = |c: &mut [u8], at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
    c[0..8].copy_from_slice(&(size / SECTOR).to_le_bytes()); // capacity
    put32(&mut c, 12, queue_size.saturating_sub(2).max(1)); // seg_max
                                                            // Logical blocks stay 512 bytes (BLK_SIZE is not offered: a guest file system
                                                            // with 1 KiB blocks must still mount); the topology says 4 KiB blocks (the write
                                                            // layer's) are the efficient unit, and partial blocks are filled on write.
    put32(&mut c, 20, SECTOR as u32); // blk_size (unused without BLK_SIZE)
    c[24] = 3; // physical_block_exp: 4096 = 512 << 3
    c[26..28].copy_from_slice(&((BLOCK / SECTOR) as u16).to_le_bytes()); // min_io_size
    c[34..36].copy_from_slice(&queues.to_le_bytes()); // num_queues
    put32(&mut c, 36, MAX_SEGMENT_SECTORS); // max_discard_sectors
    put32(&mut c, 40, MAX_SEGMENTS); // max_discard_seg
    put32(&mut c, 44, (BLOCK / SECTOR) as u32); // discard_sector_alignment
    put32(&mut c, 48, MAX_SEGMENT_SECTORS); // max_write_zeroes_sectors
    put32(&mut c, 52, MAX_SEGMENTS); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.cfg.queues
    }

    fn max_queue_size(&self) -> usize {
        self.cfg.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VHOST_USER_F_PROTOCOL_FEATURES
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ;
        if self.dev.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config_space();
        let start = (offset as usize).min(c.len());
        let end = start.saturating_add(size as usize).min(c.len());
        let mut out = c[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.cfg.queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<EventFd> {
        self.exits
            .get(thread_index)
            .and_then(|e| e.try_clone().ok())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let vring = vrings
            .get(device_event as usize)
            .ok_or_else(|| io::Error::other(format!("event for unknown queue {device_event}")))?;
        self.process_queue(vring)
    }
}

/// Serves `dev` on the vhost-user socket `socket` until `stop` is set: one QEMU
/// connection at a time; when QEMU disconnects (it stopped, or restarts and will
/// connect again) the disk is flushed and the socket accepts the next connection.
/// `ready` is called once the socket listens.
pub fn serve(
    dev: Arc<dyn BlockDevice>,
    socket: &Path,
    cfg: QueueConfig,
    counters: Arc<Counters>,
    stop: &AtomicBool,
    mut ready: impl FnMut(),
) -> io::Result<()> {
    let listener = Listener::new(socket, true).map_err(io::Error::other)?;
    ready();
    // vhost-user-backend's `start` consumes a listener; accept on one socket again
    // and again by handing it a duplicate of the listening descriptor each time.
    let fd = listener_fd(&listener)?;
    while !stop.load(Ordering::Relaxed) {
        let backend = BlkBackend::new(Arc::clone(&dev), cfg, Arc::clone(&counters))?;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("weft-blk".into(), backend.clone(), mem)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let l = dup_listener(&fd)?;
        daemon
            .start(l)
            .map_err(|e| io::Error::other(e.to_string()))?;
        tracing::info!("weft-blk: a front-end connected");
        let res = daemon.wait();
        backend.exit_all();
        if let Err(e) = dev.flush() {
            tracing::error!("weft-blk: flush after disconnect failed: {e}");
        }
        match res {
            Ok(()) => tracing::info!("weft-blk: the front-end disconnected"),
            Err(e) => tracing::info!("weft-blk: the connection ended: {e}"),
        }
    }
    drop(listener);
    Ok(())
}

fn listener_fd(listener: &Listener) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: the listener owns this descriptor and outlives the borrow; it is
    // duplicated at once into a descriptor of our own.
    let fd = unsafe { BorrowedFd::borrow_raw(listener.as_raw_fd()) };
    fd.try_clone_to_owned()
}

fn dup_listener(fd: &std::os::fd::OwnedFd) -> io::Result<Listener> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let raw = fd.try_clone()?.into_raw_fd();
    // SAFETY: `raw` is a listening socket descriptor we own (just duplicated); the
    // Listener takes it over and, made this way, has no path to unlink on drop.
    Ok(unsafe { Listener::from_raw_fd(raw) })
}
