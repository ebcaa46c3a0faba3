//! The virtio-fs device: its configuration space (tag, number of request queues), features,
//! and activation, which starts one worker thread per queue.

use std::sync::Arc;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;

use super::worker::QueueWorker;
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, VirtioDevice, TYPE_FS, VIRTIO_F_VERSION_1,
};

/// The tag field of the config space is 36 bytes, not necessarily NUL-terminated.
pub const MAX_TAG_LEN: usize = 36;
const QUEUE_SIZE: u16 = 1024;
/// hiprio + one request queue.
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
const REQUEST_QUEUES: u32 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FsDeviceError {
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes of printable ASCII without spaces")]
    BadTag(String),
}

pub struct FsDevice<F: FileSystem + Send + Sync + 'static> {
    tag: String,
    config: Vec<u8>,
    server: Option<Arc<Server<Arc<F>>>>,
    acked_features: u64,
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
            server: Some(Arc::new(Server::new(fs))),
            acked_features: 0,
        })
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
        let server = self
            .server
            .clone()
            .ok_or_else(|| ActivateError::Device("virtio-fs server is gone".into()))?;
        let seccomp = Arc::new(
            crate::seccomp::fs_worker_filter().map_err(|e| ActivateError::Device(e.to_string()))?,
        );
        for (index, (queue, event)) in queues.into_iter().zip(queue_events).enumerate() {
            let worker = QueueWorker {
                tag: self.tag.clone(),
                index,
                mem: mem.clone(),
                queue,
                event,
                interrupt: interrupt.clone(),
                server: server.clone(),
                seccomp: Some(seccomp.clone()),
            };
            std::thread::Builder::new()
                .name(format!("fs-{}-q{index}", self.tag))
                .spawn(move || worker.run())
                .map_err(ActivateError::Worker)?;
        }
        Ok(())
    }
}
