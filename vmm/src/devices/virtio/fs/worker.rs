//! One virtio-fs queue's worker: waits for the driver's notifications (or the device's stop
//! event, on reset), turns each descriptor chain into a FUSE request for the server, and
//! returns the used buffers. A chain the server cannot parse (or that points outside guest
//! memory) is completed with nothing written, counted, and logged at a limited rate.
//!
//! One request is answered here rather than by the FUSE server, which does not know it:
//! `FUSE_SYNCFS` (the guest's `sync`/`syncfs`), which flushes the host filesystem holding the
//! share's writable tree ([`QueueWorker::sync_root`]), so data the guest synced is on the
//! node's disk before the guest hears so.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{ByteValued, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::log_limit::{error_limited, warn_limited};
use crate::devices::virtio::{VirtioInterrupt, VirtioMetrics};

/// Guest-triggered events of one virtio-fs device (the control API's metrics).
#[derive(Debug, Default)]
pub struct FsCounters {
    /// The counters every virtio device keeps: requests, bytes answered, errors.
    pub virtio: Arc<VirtioMetrics>,
    /// Chains whose buffers could not be mapped (outside guest memory, wrong direction).
    pub malformed_chains: AtomicU64,
    /// Requests the FUSE server could not decode or answer.
    pub bad_requests: AtomicU64,
    /// Queue errors that stopped a worker (bad ring addresses or indices).
    pub queue_errors: AtomicU64,
    /// Workers serving a queue now (0 once a reset has stopped them).
    pub workers_serving: AtomicU64,
}

pub(crate) struct QueueWorker<F: FileSystem + Send + Sync + 'static> {
    pub tag: String,
    pub index: usize,
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub event: EventFd,
    /// Signalled when the device is reset: the worker returns.
    pub stop: EventFd,
    pub interrupt: Arc<VirtioInterrupt>,
    pub server: Arc<Server<Arc<F>>>,
    pub counters: Arc<FsCounters>,
    /// A readable descriptor of a directory on the host filesystem that holds the share's
    /// writable tree (`FUSE_SYNCFS` flushes that filesystem); None for a read-only share.
    pub sync_root: Option<Arc<OwnedFd>>,
}

/// `FUSE_SYNCFS` (Linux 5.15+; virtiofs sends it on the guest's `sync` and `syncfs`).
pub(crate) const FUSE_SYNCFS: u32 = 50;

impl<F: FileSystem + Send + Sync + 'static> QueueWorker<F> {
    /// Serves the queue until the device's stop event fires or the queue breaks. Runs on a
    /// pool thread that has its filesystem context and seccomp filter already.
    pub fn run(mut self) {
        self.counters
            .workers_serving
            .fetch_add(1, Ordering::Relaxed);
        self.serve_queue();
        self.counters
            .workers_serving
            .fetch_sub(1, Ordering::Relaxed);
    }

    fn serve_queue(&mut self) {
        loop {
            if !self.wait_for_notification() {
                return;
            }
            match self.process_queue() {
                Ok(true) => self.interrupt.signal_used_queue(),
                Ok(false) => {}
                Err(e) => {
                    self.counters.queue_errors.fetch_add(1, Ordering::Relaxed);
                    error_limited!(
                        "virtio-fs {} queue {}: queue error, worker stops: {e:?}",
                        self.tag,
                        self.index
                    );
                    return;
                }
            }
        }
    }

    /// Blocks until the queue's eventfd fires; false when the device is stopping or the
    /// eventfd can no longer be waited on.
    fn wait_for_notification(&self) -> bool {
        let mut pfds = [
            libc::pollfd {
                fd: self.event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `pfds` is a valid array of two pollfds for the duration of the call.
            let ret = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
            if ret > 0 {
                if pfds[1].revents != 0 {
                    return false;
                }
                let _ = self.event.read();
                return true;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                error_limited!("virtio-fs {}: poll failed: {err}", self.tag);
                return false;
            }
        }
    }

    /// Serves every available chain; returns whether the driver needs an interrupt.
    pub(crate) fn process_queue(&mut self) -> Result<bool, virtio_queue::Error> {
        let mut used_any = false;
        loop {
            self.queue.disable_notification(&self.mem)?;
            while let Some(chain) = self.queue.iter(&self.mem)?.next() {
                let head = chain.head_index();
                let written = self.serve(chain);
                self.queue.add_used(&self.mem, head, written)?;
                used_any = true;
            }
            if !self.queue.enable_notification(&self.mem)? {
                break;
            }
        }
        Ok(used_any && self.queue.needs_notification(&self.mem)?)
    }

    fn serve(&self, chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let reader = Reader::from_descriptor_chain(&self.mem, chain.clone());
        let writer = VirtioFsWriter::new(&self.mem, chain);
        match (reader, writer) {
            (Ok(reader), Ok(mut writer)) => {
                let header = reader.clone().read_obj::<InHeader>().ok();
                if let Some(header) = header.filter(|h| h.opcode == FUSE_SYNCFS) {
                    return self.syncfs(&header, &mut writer);
                }
                match self
                    .server
                    .handle_message(reader, writer.into(), None, None)
                {
                    Ok(written) => {
                        let metrics = &self.counters.virtio;
                        VirtioMetrics::add(&metrics.requests, 1);
                        VirtioMetrics::add(&metrics.bytes_read, written as u64);
                        u32::try_from(written).unwrap_or(u32::MAX)
                    }
                    Err(e) => {
                        VirtioMetrics::add(&self.counters.virtio.errors, 1);
                        self.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                        warn_limited!("virtio-fs {}: bad request: {e}", self.tag);
                        0
                    }
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                VirtioMetrics::add(&self.counters.virtio.errors, 1);
                self.counters
                    .malformed_chains
                    .fetch_add(1, Ordering::Relaxed);
                warn_limited!("virtio-fs {}: malformed descriptor chain: {e}", self.tag);
                0
            }
        }
    }
}

impl<F: FileSystem + Send + Sync + 'static> QueueWorker<F> {
    /// Answers `FUSE_SYNCFS`: `syncfs(2)` of the filesystem holding the writable tree (nothing
    /// to do on a read-only share), then the reply header with its result.
    fn syncfs(&self, header: &InHeader, writer: &mut VirtioFsWriter<'_>) -> u32 {
        let error = match &self.sync_root {
            // SAFETY: a valid open descriptor owned by the worker for the duration of the call.
            Some(root) => match unsafe { libc::syncfs(root.as_raw_fd()) } {
                0 => 0,
                _ => -std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO),
            },
            None => 0,
        };
        let reply = OutHeader {
            len: std::mem::size_of::<OutHeader>() as u32,
            error,
            unique: header.unique,
        };
        let metrics = &self.counters.virtio;
        match writer.write_all(reply.as_slice()) {
            Ok(()) => {
                VirtioMetrics::add(&metrics.requests, 1);
                reply.len
            }
            Err(e) => {
                VirtioMetrics::add(&metrics.errors, 1);
                self.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                warn_limited!("virtio-fs {}: syncfs reply not written: {e}", self.tag);
                0
            }
        }
    }
}
