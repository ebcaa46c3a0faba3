//! Entry points for the fuzz targets in `fuzz/` (not an API): the production virtio-fs queue
//! worker over a host directory share, driven on the caller's thread.

use std::path::Path;
use std::sync::Arc;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::PassthroughFs;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::fs::{FsCounters, QueueWorker};
use crate::devices::virtio::VirtioInterrupt;
use crate::fs_backends::{FsBackendError, Guard, Limits};

/// The FUSE server of a host directory share, as `fs_backends::device_for` builds it.
pub struct FsServer {
    server: Arc<Server<Arc<Guard<PassthroughFs>>>>,
    counters: Arc<FsCounters>,
    interrupt: Arc<VirtioInterrupt>,
}

impl FsServer {
    /// The share of host directory `dir` (read-only or writable within `limits`).
    pub fn dir_share(dir: &Path, readonly: bool, limits: Limits) -> Result<Self, FsBackendError> {
        let fs = crate::fs_backends::dir_share("fuzz", dir, readonly, limits)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        Ok(Self {
            server: Arc::new(Server::new(Arc::new(fs))),
            counters: Arc::new(FsCounters::default()),
            interrupt: Arc::new(VirtioInterrupt::new(irq)),
        })
    }

    /// Serves every chain available on `queue` as a request-queue worker does
    /// (`QueueWorker::process_queue`), on the calling thread, which should have entered its own
    /// filesystem context (`devices::virtio::fs::enter_fs_context`).
    pub fn process_queue(
        &self,
        mem: &GuestMemoryMmap,
        queue: Queue,
    ) -> Result<bool, virtio_queue::Error> {
        let mut worker = QueueWorker {
            tag: "fuzz".into(),
            index: 1,
            mem: mem.clone(),
            queue,
            event: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            stop: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            interrupt: self.interrupt.clone(),
            server: self.server.clone(),
            counters: self.counters.clone(),
            sync_root: None,
        };
        worker.process_queue()
    }

    /// Guest-triggered events seen so far.
    pub fn counters(&self) -> Arc<FsCounters> {
        self.counters.clone()
    }
}
