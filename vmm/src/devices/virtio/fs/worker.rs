//! One virtio-fs queue's worker: waits for the driver's notifications, turns each descriptor
//! chain into a FUSE request for the server, and returns the used buffers. A chain the server
//! cannot parse (or that points outside guest memory) is completed with nothing written.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::VirtioInterrupt;

pub(super) struct QueueWorker<F: FileSystem + Send + Sync + 'static> {
    pub tag: String,
    pub index: usize,
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub event: EventFd,
    pub interrupt: Arc<VirtioInterrupt>,
    pub server: Arc<Server<Arc<F>>>,
    /// Seccomp filter the worker installs on its own thread before serving the guest.
    pub seccomp: Option<Arc<crate::seccomp::ThreadFilter>>,
}

impl<F: FileSystem + Send + Sync + 'static> QueueWorker<F> {
    pub fn run(mut self) {
        if let Err(e) = super::enter_fs_context() {
            tracing::error!(
                "virtio-fs {} queue {}: cannot make a filesystem context: {e}",
                self.tag,
                self.index
            );
            return;
        }
        if let Some(filter) = &self.seccomp {
            if let Err(e) = crate::seccomp::apply_to_current_thread(filter) {
                tracing::error!(
                    "virtio-fs {} queue {}: not serving without its seccomp filter: {e}",
                    self.tag,
                    self.index
                );
                return;
            }
        }
        loop {
            if !self.wait_for_notification() {
                return;
            }
            match self.process_queue() {
                Ok(true) => self.interrupt.signal_used_queue(),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(
                        "virtio-fs {} queue {}: queue error, worker stops: {e:?}",
                        self.tag,
                        self.index
                    );
                    return;
                }
            }
        }
    }

    /// Blocks until the queue's eventfd fires; false when it can no longer be waited on.
    fn wait_for_notification(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.event.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: `pfd` is a valid pollfd for the duration of the call.
            let ret = unsafe { libc::poll(&mut pfd, 1, -1) };
            if ret > 0 {
                let _ = self.event.read();
                return true;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!("virtio-fs {}: poll failed: {err}", self.tag);
                return false;
            }
        }
    }

    /// Serves every available chain; returns whether the driver needs an interrupt.
    pub(super) fn process_queue(&mut self) -> Result<bool, virtio_queue::Error> {
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
            (Ok(reader), Ok(writer)) => {
                match self
                    .server
                    .handle_message(reader, writer.into(), None, None)
                {
                    Ok(written) => u32::try_from(written).unwrap_or(u32::MAX),
                    Err(e) => {
                        tracing::warn!("virtio-fs {}: bad request: {e}", self.tag);
                        0
                    }
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("virtio-fs {}: malformed descriptor chain: {e}", self.tag);
                0
            }
        }
    }
}
