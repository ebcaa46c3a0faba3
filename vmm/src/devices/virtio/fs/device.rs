//! The virtio-fs device: its configuration space (tag, number of request queues), features,
//! activation, which starts one worker thread per queue, and reset, which stops and joins them
//! and ends the guest's FUSE session so that the device can be activated again.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;

use vmm_sys_util::eventfd::EventFd;

use super::worker::{FsCounters, QueueWorker};
use crate::devices::log_limit::error_limited;
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, VirtioDevice, TYPE_FS, VIRTIO_F_VERSION_1,
};

/// The tag field of the config space is 36 bytes, not necessarily NUL-terminated.
pub const MAX_TAG_LEN: usize = 36;
const QUEUE_SIZE: u16 = 1024;
/// hiprio + one request queue.
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
const REQUEST_QUEUES: u32 = 1;
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
    fs: Arc<F>,
    server: Arc<Server<Arc<F>>>,
    acked_features: u64,
    /// Whether the queue workers install the seccomp filter (always, outside unit tests).
    seccomp: bool,
    /// While activated: the running queue workers and the event that stops them.
    workers: Vec<JoinHandle<()>>,
    stop: Option<EventFd>,
    /// How long a reset waits for the workers ([`WORKER_STOP_TIMEOUT`] outside unit tests).
    stop_timeout: Duration,
    counters: Arc<FsCounters>,
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
        config[MAX_TAG_LEN..].copy_from_slice(&REQUEST_QUEUES.to_le_bytes());
        Ok(Self {
            tag: tag.to_string(),
            config,
            server: Arc::new(Server::new(fs.clone())),
            fs,
            acked_features: 0,
            seccomp: true,
            workers: Vec::new(),
            stop: None,
            stop_timeout: WORKER_STOP_TIMEOUT,
            counters: Arc::new(FsCounters::default()),
        })
    }

    /// Guest-triggered events seen by this device's workers.
    pub fn counters(&self) -> Arc<FsCounters> {
        self.counters.clone()
    }

    /// Signals the workers to stop and joins their threads, waiting at most `timeout` for a
    /// worker inside a long FUSE request; returns whether they are all gone. Workers still
    /// running are kept (with the stop event, which stays signalled) for a later attempt.
    fn stop_workers(&mut self, timeout: Duration) -> bool {
        if let Some(stop) = &self.stop {
            if let Err(e) = stop.write(1) {
                error_limited!("virtio-fs {}: cannot stop the workers: {e}", self.tag);
                return false;
            }
        }
        let deadline = Instant::now() + timeout;
        while self.workers.iter().any(|w| !w.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let (done, running): (Vec<_>, Vec<_>) =
            self.workers.drain(..).partition(|w| w.is_finished());
        for worker in done {
            if worker.join().is_err() {
                error_limited!("virtio-fs {}: a queue worker panicked", self.tag);
            }
        }
        self.workers = running;
        if !self.workers.is_empty() {
            error_limited!(
                "virtio-fs {}: {} queue workers did not stop within {timeout:?}",
                self.tag,
                self.workers.len()
            );
            return false;
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
        &QUEUE_SIZES
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
        if queues.len() != QUEUE_SIZES.len() || queue_events.len() != queues.len() {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                needed: QUEUE_SIZES.len(),
            });
        }
        if self.stop.is_some() || !self.workers.is_empty() {
            return Err(ActivateError::Device(
                "virtio-fs device activated twice without a reset".into(),
            ));
        }
        let seccomp = if self.seccomp {
            Some(Arc::new(
                crate::seccomp::fs_worker_filter()
                    .map_err(|e| ActivateError::Device(e.to_string()))?,
            ))
        } else {
            None
        };
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let mut workers = Vec::with_capacity(queues.len());
        let mut spawn = |index, queue, event| -> Result<(), ActivateError> {
            let worker = QueueWorker {
                tag: self.tag.clone(),
                index,
                mem: mem.clone(),
                queue,
                event,
                stop: stop.try_clone().map_err(ActivateError::Worker)?,
                interrupt: interrupt.clone(),
                server: self.server.clone(),
                seccomp: seccomp.clone(),
                counters: self.counters.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("fs-{}-q{index}", self.tag))
                .spawn(move || worker.run())
                .map_err(ActivateError::Worker)?;
            workers.push(handle);
            Ok(())
        };
        let mut spawned = Ok(());
        for (index, (queue, event)) in queues.into_iter().zip(queue_events).enumerate() {
            spawned = spawn(index, queue, event);
            if spawned.is_err() {
                break;
            }
        }
        // Workers already started are stopped again if a later one could not start.
        self.workers = workers;
        self.stop = Some(stop);
        if spawned.is_err() {
            self.stop_workers(self.stop_timeout);
        }
        spawned
    }

    /// Stops and joins the queue workers, ends the guest's FUSE session (the filesystem
    /// forgets the guest's inodes and handles: the driver starts again with FUSE_INIT) and
    /// forgets the negotiated features. Fails, leaving the device as it is, when a worker is
    /// stuck in a request for longer than the stop timeout ([`WORKER_STOP_TIMEOUT`]).
    fn reset(&mut self) -> bool {
        let was_active = self.stop.is_some();
        if !self.stop_workers(self.stop_timeout) {
            return false;
        }
        if was_active {
            self.fs.destroy();
        }
        self.acked_features = 0;
        true
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
