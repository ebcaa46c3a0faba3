//! The virtio-net device: its features (MAC, checksum and segmentation offloads both ways,
//! mergeable receive buffers, indirect descriptors, event indices), the config space (the
//! MAC), activation, which hands the two queues to the interface's worker thread (started
//! before the vCPUs run, under the net worker's seccomp filter), reset, which stops it, and
//! run-time replacement of each direction's rate limits.

use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::tap::Backend;
use super::worker::{NetMetrics, NetQueues, Session};
use crate::devices::log_limit::error_limited;
use crate::devices::virtio::metrics::ExtraMetrics;
use crate::devices::virtio::queue_worker::{WorkerThread, WORKER_STOP_TIMEOUT};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, VirtioDevice, VirtioMetrics, TYPE_NET,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::rate_limiter::SharedRateLimiter;
use vm_spec::{MacAddr, NetRateLimiterSpec, RateLimiterSpec};

// Feature bits (virtio 1.2 section 5.1.3).
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_GUEST_UFO: u64 = 1 << 10;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_HOST_UFO: u64 = 1 << 14;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;

/// struct virtio_net_hdr with VERSION_1 (num_buffers included).
pub const VNET_HDR_LEN: usize = 12;

pub const QUEUE_SIZE: u16 = 256;
/// receiveq, transmitq (no control queue).
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
/// mac[6], status (unused without VIRTIO_NET_F_STATUS), max_virtqueue_pairs.
const CONFIG_LEN: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("net {id}: {source}")]
    Tap {
        id: String,
        source: super::tap::TapError,
    },
    #[error("net {id}: cannot make its events: {source}")]
    Event { id: String, source: std::io::Error },
}

pub struct NetDevice {
    id: String,
    backend: Arc<dyn Backend>,
    config: [u8; CONFIG_LEN],
    avail_features: u64,
    acked_features: u64,
    metrics: Arc<VirtioMetrics>,
    net_metrics: Arc<NetMetrics>,
    rx_limiter: SharedRateLimiter,
    tx_limiter: SharedRateLimiter,
    epoll: Arc<Epoll>,
    rx_timer: Arc<Mutex<TimerFd>>,
    tx_timer: Arc<Mutex<TimerFd>>,
    thread: Option<WorkerThread>,
    /// The stop event of the current activation.
    stop: Option<EventFd>,
    /// Whether the worker installs its seccomp filter (always, outside unit tests).
    seccomp: bool,
}

impl NetDevice {
    /// The interface `id` over `backend` (an open tap), with `mac` offered to the guest.
    pub fn new(
        id: &str,
        backend: Arc<dyn Backend>,
        mac: Option<MacAddr>,
        limits: Option<&NetRateLimiterSpec>,
    ) -> Result<Self, NetError> {
        let event = |source| NetError::Event {
            id: id.to_string(),
            source,
        };
        let limits = limits.copied().unwrap_or_default();
        let mut avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6
            | VIRTIO_NET_F_GUEST_UFO
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_HOST_UFO
            | VIRTIO_NET_F_MRG_RXBUF;
        let mut config = [0u8; CONFIG_LEN];
        if let Some(mac) = mac {
            avail_features |= VIRTIO_NET_F_MAC;
            config[..6].copy_from_slice(&mac.0);
        }
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        Ok(Self {
            id: id.to_string(),
            backend,
            config,
            avail_features,
            acked_features: 0,
            metrics: Arc::new(VirtioMetrics::default()),
            net_metrics: Arc::new(NetMetrics::default()),
            rx_limiter: SharedRateLimiter::new(limits.rx.as_ref()).map_err(event)?,
            tx_limiter: SharedRateLimiter::new(limits.tx.as_ref()).map_err(event)?,
            epoll: Arc::new(Epoll::new().map_err(event)?),
            rx_timer: Arc::new(Mutex::new(
                TimerFd::new()
                    .map_err(std::io::Error::from)
                    .map_err(event)?,
            )),
            tx_timer: Arc::new(Mutex::new(
                TimerFd::new()
                    .map_err(std::io::Error::from)
                    .map_err(event)?,
            )),
            thread: None,
            stop: None,
            seccomp: true,
        })
    }

    fn start_thread(&mut self) -> Result<&mut WorkerThread, ActivateError> {
        if self.thread.is_none() {
            let filter = if self.seccomp {
                let kind = crate::seccomp::ThreadKind::NetWorker {
                    tap_fd: self.backend.as_raw_fd(),
                };
                let filter = crate::seccomp::filter(kind, crate::seccomp::Violation::Trap)
                    .map_err(|e| ActivateError::Device(e.to_string()))?;
                Some(Arc::new(filter))
            } else {
                None
            };
            let thread = WorkerThread::start(format!("net-{}", self.id), filter)
                .map_err(ActivateError::Worker)?;
            self.thread = Some(thread);
        }
        self.thread
            .as_mut()
            .ok_or_else(|| ActivateError::Device("no worker thread".into()))
    }

    /// Signals the stop event and waits for the worker; false when it is still serving.
    fn stop_worker(&mut self) -> bool {
        let Some(stop) = &self.stop else {
            return true;
        };
        if let Err(e) = stop.write(1) {
            error_limited!("net {}: cannot stop the worker: {e}", self.id);
            return false;
        }
        if let Some(thread) = &mut self.thread {
            if !thread.wait_done(WORKER_STOP_TIMEOUT) {
                error_limited!(
                    "net {}: the worker did not stop within {WORKER_STOP_TIMEOUT:?}",
                    self.id
                );
                return false;
            }
        }
        self.stop = None;
        true
    }

    /// The features the driver acknowledged (tests).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        TYPE_NET
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
        // The MAC is the spec's: VIRTIO_NET_F_CTRL_MAC_ADDR is not offered.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            queue_events,
            interrupt,
        } = activation;
        let got = queues.len();
        let (Ok([rx, tx]), Ok([rx_queue, tx_queue])) =
            (<[_; 2]>::try_from(queues), <[_; 2]>::try_from(queue_events))
        else {
            return Err(ActivateError::QueueCount {
                got,
                needed: QUEUE_SIZES.len(),
            });
        };
        if self.stop.is_some() {
            return Err(ActivateError::Device(format!(
                "net {} activated twice without a reset",
                self.id
            )));
        }
        let queues = NetQueues::new(
            self.id.clone(),
            mem,
            rx,
            tx,
            self.backend.clone(),
            self.acked_features,
            (self.rx_limiter.clone(), self.tx_limiter.clone()),
            (self.net_metrics.clone(), self.metrics.clone()),
        );
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let session = Session {
            epoll: self.epoll.clone(),
            rx_queue,
            tx_queue,
            stop: stop.try_clone().map_err(ActivateError::Worker)?,
            rx_timer: self.rx_timer.clone(),
            tx_timer: self.tx_timer.clone(),
            interrupt,
        };
        let started = self
            .start_thread()?
            .run(move || super::worker::run(queues, session));
        self.stop = Some(stop);
        if !started {
            self.stop_worker();
            return Err(ActivateError::Device(format!(
                "the net {} worker is gone (see its error)",
                self.id
            )));
        }
        Ok(())
    }

    fn start_workers(&mut self) -> Result<(), ActivateError> {
        self.start_thread().map(drop)
    }

    fn reset(&mut self) -> bool {
        if !self.stop_worker() {
            return false;
        }
        self.acked_features = 0;
        true
    }

    fn metrics(&self) -> Option<Arc<VirtioMetrics>> {
        Some(self.metrics.clone())
    }

    fn extra_metrics(&self) -> Option<Arc<dyn ExtraMetrics>> {
        Some(self.net_metrics.clone())
    }

    /// `{}` lifts both directions' limits; anything else must name the direction.
    fn set_rate_limiter(&mut self, limits: &RateLimiterSpec) -> Result<(), String> {
        if *limits != RateLimiterSpec::default() {
            return Err(
                "a network interface's limits are per direction: give {\"rx\": ..., \"tx\": ...}"
                    .into(),
            );
        }
        self.set_rx_tx_rate_limiter(&NetRateLimiterSpec::default())
    }

    /// Replaces both directions' limits (a direction left out is unlimited from now on).
    fn set_rx_tx_rate_limiter(&mut self, limits: &NetRateLimiterSpec) -> Result<(), String> {
        limits.validate().map_err(|e| e.to_string())?;
        self.rx_limiter
            .update(&limits.rx.unwrap_or_default())
            .and_then(|()| self.tx_limiter.update(&limits.tx.unwrap_or_default()))
    }
}

#[cfg(test)]
impl NetDevice {
    /// The device without the worker's seccomp filter, for tests that cannot install one.
    pub fn without_seccomp(mut self) -> Self {
        self.seccomp = false;
        self
    }

    pub fn net_metrics(&self) -> Arc<NetMetrics> {
        self.net_metrics.clone()
    }
}
