//! What all virtio devices share: the device trait the transport drives, activation (queues,
//! their notification eventfds, the interrupt) and reset, the device status bits, and the
//! virtio-mmio transport itself. Each device lives in its own folder.

pub mod block;
pub mod fs;
pub mod interrupt;
pub mod metrics;
pub mod mmio;
pub mod net;
pub mod queue_worker;
pub mod rng;
#[cfg(test)]
pub mod test_utils;
pub mod vsock;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use interrupt::VirtioInterrupt;
pub use metrics::VirtioMetrics;

/// Virtio device ids (virtio 1.2, section 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = 26;

/// Device status bits (virtio 1.2 section 2.1), set by the driver in this order, except
/// NEEDS_RESET which only the device sets.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// Feature bit every modern device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Ring feature bits (virtio 1.2 section 6). INDIRECT_DESC: a descriptor may point to a table
/// of descriptors (the `virtio-queue` chain iterator follows it). EVENT_IDX: each side tells
/// the other, by ring index, when it next wants to be notified; the transport turns it on in
/// the activated queues, and a device offers it only when its worker suppresses notifications
/// through `virtio-queue`'s `enable_notification`/`needs_notification`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Everything a device needs to start serving its queues.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<virtio_queue::Queue>,
    /// One eventfd per queue, signalled when the driver notifies that queue (ioeventfd).
    pub queue_events: Vec<EventFd>,
    pub interrupt: std::sync::Arc<VirtioInterrupt>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up {got} queues, the device needs {needed}")]
    QueueCount { got: usize, needed: usize },
    #[error("cannot start the device's worker: {0}")]
    Worker(std::io::Error),
    #[error("{0}")]
    Device(String),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    fn avail_features(&self) -> u64;
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Starts the threads the device will serve its queues on, before the vCPUs run (so a
    /// vCPU never creates a thread); activation then hands them their queues.
    fn start_workers(&mut self) -> Result<(), ActivateError> {
        Ok(())
    }
    /// Returns the device to its state before activation: its workers are stopped and their
    /// threads joined (none touches the old queues afterwards), negotiated features are
    /// forgotten, and it can be activated again. Also called on a device never activated.
    /// Returns false when the device could not be reset; the transport then reports
    /// DEVICE_NEEDS_RESET and refuses to activate it again.
    fn reset(&mut self) -> bool;
    /// The device's counters, for the control API's metrics.
    fn metrics(&self) -> Option<std::sync::Arc<VirtioMetrics>> {
        None
    }
    /// Replaces the device's rate limits at run time (control API). Devices without a rate
    /// limiter refuse, naming why.
    fn set_rate_limiter(&mut self, _limits: &vm_spec::RateLimiterSpec) -> Result<(), String> {
        Err("this device has no rate limiter".to_string())
    }
    /// Replaces the per-direction rate limits of a device that has them (network).
    fn set_rx_tx_rate_limiter(
        &mut self,
        _limits: &vm_spec::NetRateLimiterSpec,
    ) -> Result<(), String> {
        Err(
            "this device has no per-direction (rx, tx) rate limiter; give {bandwidth, ops}"
                .to_string(),
        )
    }
    /// Counters of the device's own beyond [`VirtioMetrics`] (named by the device).
    fn extra_metrics(&self) -> Option<std::sync::Arc<dyn metrics::ExtraMetrics>> {
        None
    }
}

/// Reads `data.len()` bytes at `offset` from a config space, zero past its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start < config.len() {
        let end = config.len().min(start + data.len());
        data[..end - start].copy_from_slice(&config[start..end]);
    }
}
