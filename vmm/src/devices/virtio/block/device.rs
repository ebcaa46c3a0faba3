//! The virtio-blk device: features (read-only, flush, discard, segment limit, indirect
//! descriptors, event indices), the config
//! space (capacity, discard limits), activation, which hands the queue to the device's worker
//! thread (started before the vCPUs run, under the block worker's seccomp filter), reset,
//! which stops the worker, and run-time replacement of the rate limits.

use std::sync::Arc;

use super::disk::DiskImage;
use super::request::{DiscardLimits, VIRTIO_BLK_ID_BYTES};
use super::worker::BlockQueue;
use crate::devices::virtio::queue_worker::SingleQueueWorker;
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, VirtioDevice, VirtioMetrics, TYPE_BLOCK,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

// Feature bits (virtio 1.2 section 5.2.3).
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;

pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Data buffers per request: the queue less the header and status descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Discard limits: 2 GiB per segment, 16 segments, 4 KiB granularity.
pub const DISCARD_LIMITS: DiscardLimits = DiscardLimits {
    max_sectors: 1 << 22,
    max_segments: 16,
};
const DISCARD_ALIGNMENT_SECTORS: u32 = 8;
/// struct virtio_blk_config up to write_zeroes_may_unmap and its padding.
const CONFIG_LEN: usize = 60;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("drive {id}: serial {serial:?} is longer than {VIRTIO_BLK_ID_BYTES} bytes")]
    Serial { id: String, serial: String },
    #[error("drive {id}: cannot make its events: {source}")]
    Event { id: String, source: std::io::Error },
}

pub struct BlockDevice {
    id: String,
    disk: Arc<DiskImage>,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
    config: [u8; CONFIG_LEN],
    avail_features: u64,
    acked_features: u64,
    metrics: Arc<VirtioMetrics>,
    worker: SingleQueueWorker,
}

impl BlockDevice {
    /// A device for `disk`; GET_ID answers `serial` (the id when absent).
    pub fn new(
        id: &str,
        disk: DiskImage,
        serial: Option<&str>,
        limits: Option<&vm_spec::RateLimiterSpec>,
    ) -> Result<Self, BlockError> {
        let serial_text = serial.unwrap_or(id);
        if serial_text.len() > VIRTIO_BLK_ID_BYTES {
            return Err(BlockError::Serial {
                id: id.to_string(),
                serial: serial_text.to_string(),
            });
        }
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        serial[..serial_text.len()].copy_from_slice(serial_text.as_bytes());
        let kind = crate::seccomp::ThreadKind::BlockWorker {
            disk_fd: disk.raw_fd(),
        };
        let worker =
            SingleQueueWorker::new(format!("blk-{id}"), kind, limits).map_err(|source| {
                BlockError::Event {
                    id: id.to_string(),
                    source,
                }
            })?;

        // Indirect descriptors let a large request take one ring entry (the driver may then
        // have several in flight); event indices let the driver and the worker skip the
        // notifications and interrupts the other side does not need.
        let mut avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_FLUSH;
        if disk.readonly() {
            avail_features |= VIRTIO_BLK_F_RO;
        } else {
            avail_features |= VIRTIO_BLK_F_DISCARD;
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&disk.sectors().to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[36..40].copy_from_slice(&DISCARD_LIMITS.max_sectors.to_le_bytes());
        config[40..44].copy_from_slice(&DISCARD_LIMITS.max_segments.to_le_bytes());
        config[44..48].copy_from_slice(&DISCARD_ALIGNMENT_SECTORS.to_le_bytes());
        Ok(Self {
            id: id.to_string(),
            disk: Arc::new(disk),
            serial,
            config,
            avail_features,
            acked_features: 0,
            metrics: Arc::new(VirtioMetrics::default()),
            worker,
        })
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing writable: the write-back toggle (CONFIG_WCE) is not offered.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            queue_events,
            interrupt,
        } = activation;
        let got = queues.len();
        let (Ok([queue]), Ok([event])) =
            (<[_; 1]>::try_from(queues), <[_; 1]>::try_from(queue_events))
        else {
            return Err(ActivateError::QueueCount {
                got,
                needed: QUEUE_SIZES.len(),
            });
        };
        let server = BlockQueue {
            id: self.id.clone(),
            mem,
            queue,
            disk: self.disk.clone(),
            serial: self.serial,
            discard: DISCARD_LIMITS,
            limiter: self.worker.limiter().clone(),
            metrics: self.metrics.clone(),
        };
        self.worker.activate(server, event, interrupt)
    }

    fn start_workers(&mut self) -> Result<(), ActivateError> {
        self.worker.start().map(drop)
    }

    fn reset(&mut self) -> bool {
        if !self.worker.stop() {
            return false;
        }
        self.acked_features = 0;
        true
    }

    fn metrics(&self) -> Option<Arc<VirtioMetrics>> {
        Some(self.metrics.clone())
    }

    fn set_rate_limiter(&mut self, limits: &vm_spec::RateLimiterSpec) -> Result<(), String> {
        self.worker.limiter().update(limits)
    }
}

#[cfg(test)]
impl BlockDevice {
    /// The device without the worker's seccomp filter, for tests that cannot install one.
    pub fn without_seccomp(mut self) -> Self {
        self.worker.without_seccomp();
        self
    }
}
