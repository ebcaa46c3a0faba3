//! The virtio-rng device: no features beyond VERSION_1, no config space; activation hands its
//! one queue to the device's worker thread (started before the vCPUs run, under the rng
//! worker's seccomp filter); reset stops it; the rate limits can be replaced at run time.

use std::sync::Arc;

use super::worker::RngQueue;
use crate::devices::virtio::queue_worker::SingleQueueWorker;
use crate::devices::virtio::{
    ActivateError, Activation, VirtioDevice, VirtioMetrics, TYPE_RNG, VIRTIO_F_VERSION_1,
};

const QUEUE_SIZES: [u16; 1] = [256];

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("virtio-rng: cannot make its events: {0}")]
    Event(std::io::Error),
}

pub struct RngDevice {
    metrics: Arc<VirtioMetrics>,
    worker: SingleQueueWorker,
}

impl RngDevice {
    pub fn new(limits: Option<&vm_spec::RateLimiterSpec>) -> Result<Self, RngError> {
        let worker = SingleQueueWorker::new(
            "rng".to_string(),
            crate::seccomp::ThreadKind::RngWorker,
            limits,
        )
        .map_err(RngError::Event)?;
        Ok(Self {
            metrics: Arc::new(VirtioMetrics::default()),
            worker,
        })
    }
}

impl VirtioDevice for RngDevice {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, _features: u64) {}

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

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
        let server = RngQueue {
            mem,
            queue,
            limiter: self.worker.limiter().clone(),
            metrics: self.metrics.clone(),
        };
        self.worker.activate(server, event, interrupt)
    }

    fn start_workers(&mut self) -> Result<(), ActivateError> {
        self.worker.start().map(drop)
    }

    fn reset(&mut self) -> bool {
        self.worker.stop()
    }

    fn metrics(&self) -> Option<Arc<VirtioMetrics>> {
        Some(self.metrics.clone())
    }

    fn set_rate_limiter(&mut self, limits: &vm_spec::RateLimiterSpec) -> Result<(), String> {
        self.worker.limiter().update(limits)
    }
}

#[cfg(test)]
impl RngDevice {
    pub fn without_seccomp(mut self) -> Self {
        self.worker.without_seccomp();
        self
    }
}
