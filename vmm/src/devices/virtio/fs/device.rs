//! The virtio-fs device: its configuration space (tag, number of request queues), features,
//! activation, which hands each queue to a thread of the device's worker pool (started before
//! the vCPUs run), and reset, which stops the workers and ends the guest's FUSE session so
//! that the device can be activated again.

use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;

use vmm_sys_util::eventfd::EventFd;

use super::pool::WorkerPool;
use super::worker::{FsCounters, QueueWorker};
use crate::devices::log_limit::error_limited;
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, VirtioDevice, TYPE_FS, VIRTIO_F_VERSION_1,
};

/// The tag field of the config space is 36 bytes, not necessarily NUL-terminated.
pub const MAX_TAG_LEN: usize = 36;
const QUEUE_SIZE: u16 = 1024;
/// Most request queues a device offers (besides its hiprio queue). Linux maps guest CPUs onto
/// them, so a request that waits on a slow store holds up only its own CPU's queue.
pub const MAX_REQUEST_QUEUES: usize = 8;
/// How long a reset waits for the queue workers to finish the requests they are serving.
const WORKER_STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FsDeviceError {
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes of printable ASCII without spaces")]
    BadTag(String),
}

pub struct FsDevice<F: FileSystem + Send + Sync + 'static> {
    tag: String,
    config: Vec<u8>,
    /// hiprio, then the request queues.
    queue_sizes: Vec<u16>,
    fs: Arc<F>,
    server: Arc<Server<Arc<F>>>,
    acked_features: u64,
    /// Whether the queue workers install the seccomp filter (always, outside unit tests).
    seccomp: bool,
    /// Whether the filesystem fetches image chunks over the network itself (the workers'
    /// seccomp filter then allows network calls).
    network: bool,
    pool: Option<WorkerPool<F>>,
    /// While activated: the running queue workers and the event that stops them.
    stop: Option<EventFd>,
    /// How long a reset waits for the workers ([`WORKER_STOP_TIMEOUT`] outside unit tests).
    stop_timeout: Duration,
    counters: Arc<FsCounters>,
    /// See [`QueueWorker::sync_root`].
    sync_root: Option<Arc<std::os::fd::OwnedFd>>,
}

impl<F: FileSystem + Send + Sync + 'static> FsDevice<F> {
    pub fn new(tag: &str, fs: Arc<F>) -> Result<Self, FsDeviceError> {
        let valid = !tag.is_empty()
            && tag.len() <= MAX_TAG_LEN
            && tag.bytes().all(|b| b.is_ascii_graphic());
        if !valid {
            return Err(FsDeviceError::BadTag(tag.to_string()));
        }
        let mut config = vec![0u8; MAX_TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[MAX_TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        Ok(Self {
            tag: tag.to_string(),
            config,
            queue_sizes: vec![QUEUE_SIZE; 2],
            server: Arc::new(Server::new(fs.clone())),
            fs,
            acked_features: 0,
            seccomp: true,
            network: false,
            pool: None,
            stop: None,
            stop_timeout: WORKER_STOP_TIMEOUT,
            counters: Arc::new(FsCounters::default()),
            sync_root: None,
        })
    }

    /// The host directory whose filesystem the guest's `syncfs` flushes (a readable
    /// descriptor; the share's writable tree lives there).
    pub fn with_sync_root(mut self, root: Option<Arc<std::os::fd::OwnedFd>>) -> Self {
        self.sync_root = root;
        self
    }

    /// The device with `count` request queues (1 to [`MAX_REQUEST_QUEUES`], clamped), each
    /// served by its own worker thread. Set before the workers start.
    pub fn with_request_queues(mut self, count: usize) -> Self {
        let count = count.clamp(1, MAX_REQUEST_QUEUES);
        self.queue_sizes = vec![QUEUE_SIZE; count + 1];
        let field = u32::try_from(count).unwrap_or(1).to_le_bytes();
        self.config[MAX_TAG_LEN..].copy_from_slice(&field);
        self
    }

    /// Guest-triggered events seen by this device's workers.
    pub fn counters(&self) -> Arc<FsCounters> {
        self.counters.clone()
    }

    /// Signals the workers to stop and joins their threads, waiting at most `timeout` for a
    /// worker inside a long FUSE request; returns whether they are all gone. Workers still
    /// running are kept (with the stop event, which stays signalled) for a later attempt.
    /// Lets the workers fetch over the network (an image whose stores this process reaches).
    pub fn with_network_fetch(mut self, network: bool) -> Self {
        self.network = network;
        self
    }

    fn start_pool(&mut self) -> Result<&WorkerPool<F>, ActivateError> {
        if self.pool.is_none() {
            let filter = if self.seccomp {
                let kind = crate::seccomp::ThreadKind::FsWorker {
                    network: self.network,
                };
                let filter = crate::seccomp::filter(kind, crate::seccomp::Violation::Trap)
                    .map_err(|e| ActivateError::Device(e.to_string()))?;
                Some(Arc::new(filter))
            } else {
                None
            };
            let pool = WorkerPool::start(&self.tag, self.queue_sizes.len(), filter)
                .map_err(ActivateError::Worker)?;
            self.pool = Some(pool);
        }
        self.pool
            .as_ref()
            .ok_or_else(|| ActivateError::Device("no worker pool".into()))
    }

    /// Signals the stop event and waits for the workers to go idle; false when some are still
    /// serving after `timeout` (the stop event stays set, so they stop when they can).
    fn stop_workers(&mut self, timeout: Duration) -> bool {
        let Some(stop) = &self.stop else {
            return true;
        };
        if let Err(e) = stop.write(1) {
            error_limited!("virtio-fs {}: cannot stop the workers: {e}", self.tag);
            return false;
        }
        if let Some(pool) = &self.pool {
            if !pool.wait_idle(timeout) {
                error_limited!(
                    "virtio-fs {}: {} queue workers did not stop within {timeout:?}",
                    self.tag,
                    pool.serving()
                );
                return false;
            }
        }
        self.stop = None;
        true
    }
}

impl<F: FileSystem + Send + Sync + 'static> Drop for FsDevice<F> {
    fn drop(&mut self) {
        self.stop_workers(self.stop_timeout);
    }
}

impl<F: FileSystem + Send + Sync + 'static> VirtioDevice for FsDevice<F> {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The virtio-fs config space is read-only.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            queue_events,
            interrupt,
        } = activation;
        if queues.len() != self.queue_sizes.len() || queue_events.len() != queues.len() {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                needed: self.queue_sizes.len(),
            });
        }
        if self.stop.is_some() {
            return Err(ActivateError::Device(
                "virtio-fs device activated twice without a reset".into(),
            ));
        }
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let mut workers = Vec::with_capacity(queues.len());
        for (index, (queue, event)) in queues.into_iter().zip(queue_events).enumerate() {
            workers.push(QueueWorker {
                tag: self.tag.clone(),
                index,
                mem: mem.clone(),
                queue,
                event,
                stop: stop.try_clone().map_err(ActivateError::Worker)?,
                interrupt: interrupt.clone(),
                server: self.server.clone(),
                counters: self.counters.clone(),
                sync_root: self.sync_root.clone(),
            });
        }
        let pool = self.start_pool()?;
        let started = pool.activate(workers);
        self.stop = Some(stop);
        if !started {
            self.stop_workers(self.stop_timeout);
            return Err(ActivateError::Device(
                "a virtio-fs queue worker is gone (see its error)".into(),
            ));
        }
        Ok(())
    }

    fn start_workers(&mut self) -> Result<(), ActivateError> {
        self.start_pool().map(drop)
    }

    fn reset(&mut self) -> bool {
        let was_active = self.stop.is_some();
        if !self.stop_workers(self.stop_timeout) {
            return false;
        }
        if was_active {
            if let Some(pool) = &self.pool {
                if !pool.destroy(self.fs.clone(), self.stop_timeout) {
                    error_limited!("virtio-fs {}: cannot end the FUSE session", self.tag);
                    return false;
                }
            }
        }
        self.acked_features = 0;
        true
    }

    fn metrics(&self) -> Option<Arc<crate::devices::virtio::VirtioMetrics>> {
        Some(self.counters.virtio.clone())
    }
}

#[cfg(test)]
impl<F: FileSystem + Send + Sync + 'static> FsDevice<F> {
    /// The device without the workers' seccomp filter, for tests that cannot install one.
    pub fn without_seccomp(mut self) -> Self {
        self.seccomp = false;
        self
    }

    /// The device with a shorter wait for its workers on reset.
    pub fn with_stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }
}
