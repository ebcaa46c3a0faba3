//! The virtio-mmio transport (virtio 1.2 section 4.2, version 2 "modern" register layout): the
//! driver negotiates features, sets up queues and drives the device status through these
//! registers; on DRIVER_OK the device is activated with its queues (using event indices when
//! VIRTIO_RING_F_EVENT_IDX was negotiated), and writing 0 to the status resets it (its workers
//! stopped) so that it can be set up and activated again.
//!
//! The guest drives every register, so the transport enforces the status machine: bits are
//! gained one step at a time in the order ACKNOWLEDGE, DRIVER, FEATURES_OK (only for an
//! acceptable feature set), DRIVER_OK, and never cleared except by a reset; FAILED and
//! DEVICE_NEEDS_RESET freeze the device until a reset. Features may be written only between
//! DRIVER and FEATURES_OK, queues only between FEATURES_OK and DRIVER_OK; a queue size must be
//! a power of two no larger than the queue's maximum and the rings must lie in guest memory,
//! or activation is refused. Refused accesses are counted ([`MmioCounters`]) and logged at a
//! limited rate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{
    Activation, VirtioDevice, VirtioInterrupt, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::bus::BusDevice;
use crate::devices::log_limit::{debug_limited, warn_limited};

/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register (where the ioeventfds are registered).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;
const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// The status bits the driver sets, in the order it must set them.
const STATUS_STEPS: [u32; 4] = [
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_FEATURES_OK,
    STATUS_DRIVER_OK,
];

/// Guest-triggered events of one transport (the control API's metrics).
#[derive(Debug, Default)]
pub struct MmioCounters {
    /// Accesses of the wrong size, to registers that do not exist, or notifications of queues
    /// that do not exist.
    pub bad_accesses: AtomicU64,
    /// Status writes refused (bits cleared or out of order, writes while FAILED or
    /// DEVICE_NEEDS_RESET) and FEATURES_OK refused for unacceptable features.
    pub refused_status: AtomicU64,
    /// Feature or queue writes refused in the current state, or with invalid values.
    pub refused_writes: AtomicU64,
    /// DRIVER_OK that did not activate the device (invalid queues, device error).
    pub failed_activations: AtomicU64,
    /// Device resets (status 0).
    pub resets: AtomicU64,
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    /// Queues the driver configured with an invalid value (size, ring alignment): they
    /// cannot be activated until a reset.
    queue_invalid: Vec<bool>,
    queue_events: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
    counters: Arc<MmioCounters>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("device queue of size {0} is invalid: {1:?}")]
    Queue(u16, virtio_queue::Error),
    #[error("cannot create a queue eventfd: {0}")]
    Event(std::io::Error),
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<Self, TransportError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&size| Queue::new(size).map_err(|e| TransportError::Queue(size, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_events = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::Event))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queue_invalid: vec![false; queues.len()],
            queues,
            queue_events,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            counters: Arc::new(MmioCounters::default()),
        })
    }

    /// The per-queue notification eventfds, to register as ioeventfds at QueueNotify.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Guest-triggered events seen by this transport.
    pub fn counters(&self) -> Arc<MmioCounters> {
        self.counters.clone()
    }

    /// The device's own counters, if it keeps them.
    pub fn device_metrics(&self) -> Option<Arc<crate::devices::virtio::VirtioMetrics>> {
        self.device.metrics()
    }

    /// Replaces the device's rate limits (control API).
    pub fn set_rate_limiter(&mut self, limits: &vm_spec::RateLimiterSpec) -> Result<(), String> {
        self.device.set_rate_limiter(limits)
    }

    /// Replaces a network device's per-direction rate limits (control API).
    pub fn set_rx_tx_rate_limiter(
        &mut self,
        limits: &vm_spec::NetRateLimiterSpec,
    ) -> Result<(), String> {
        self.device.set_rx_tx_rate_limiter(limits)
    }

    /// The device's own counters beyond the common ones (control API metrics).
    pub fn device_extra_metrics(
        &self,
    ) -> Option<Arc<dyn crate::devices::virtio::metrics::ExtraMetrics>> {
        self.device.extra_metrics()
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    /// Applies a queue configuration write, allowed only between FEATURES_OK and DRIVER_OK;
    /// `f` says whether the value was valid (an invalid one marks the queue unusable).
    fn with_queue(&mut self, register: &str, f: impl FnOnce(&mut Queue) -> bool) {
        let settable = self.status & STATUS_FEATURES_OK != 0
            && self.status & (STATUS_DRIVER_OK | STATUS_FAILED | STATUS_NEEDS_RESET) == 0;
        let index = self.queue_select as usize;
        let (Some(queue), true) = (self.queues.get_mut(index), settable) else {
            count(&self.counters.refused_writes);
            debug_limited!(
                "virtio-mmio: {register} write for queue {index} refused in status {:#x}",
                self.status
            );
            return;
        };
        if !f(queue) {
            if let Some(invalid) = self.queue_invalid.get_mut(index) {
                *invalid = true;
            }
            count(&self.counters.refused_writes);
            debug_limited!("virtio-mmio: invalid {register} for queue {index}");
        }
    }

    fn write_queue_size(&mut self, value: u32) {
        self.with_queue("QueueNum", |q| {
            u16::try_from(value).is_ok_and(|size| q.try_set_size(size).is_ok())
        });
    }

    fn write_queue_address(&mut self, offset: u64, value: u32) {
        let high = offset & 4 != 0;
        let merge = |old: u64| {
            if high {
                (old & 0xffff_ffff) | (u64::from(value) << 32)
            } else {
                (old & !0xffff_ffff) | u64::from(value)
            }
        };
        match offset & !4 {
            0x80 => self.with_queue("QueueDesc", |q| {
                q.try_set_desc_table_address(GuestAddress(merge(q.desc_table())))
                    .is_ok()
            }),
            0x90 => self.with_queue("QueueDriver", |q| {
                q.try_set_avail_ring_address(GuestAddress(merge(q.avail_ring())))
                    .is_ok()
            }),
            _ => self.with_queue("QueueDevice", |q| {
                q.try_set_used_ring_address(GuestAddress(merge(q.used_ring())))
                    .is_ok()
            }),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let settable = self.status & STATUS_DRIVER != 0
            && self.status & (STATUS_FEATURES_OK | STATUS_FAILED | STATUS_NEEDS_RESET) == 0;
        if !settable {
            count(&self.counters.refused_writes);
            debug_limited!(
                "virtio-mmio: driver features write refused in status {:#x}",
                self.status
            );
            return;
        }
        match self.driver_features_select {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => {}
        }
    }

    /// Resets the transport and the device (status 0). A device that cannot be reset keeps
    /// running: the transport then reports DEVICE_NEEDS_RESET and will not activate it again.
    fn reset(&mut self) {
        count(&self.counters.resets);
        if !self.device.reset() {
            warn_limited!(
                "virtio device type {} could not be reset",
                self.device_type()
            );
            self.status = STATUS_NEEDS_RESET;
            return;
        }
        self.activated = false;
        self.status = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_invalid.fill(false);
        // Notifications left over from before the reset must not reach the next workers.
        for event in &self.queue_events {
            let _ = event.read();
        }
        self.interrupt.acknowledge(u32::MAX);
    }

    fn refuse_status(&self, value: u32, why: &str) {
        count(&self.counters.refused_status);
        debug_limited!(
            "virtio-mmio: status {value:#x} refused in status {:#x}: {why}",
            self.status
        );
    }

    fn features_acceptable(&self) -> bool {
        self.acked_features & !self.device.avail_features() == 0
            && self.acked_features & VIRTIO_F_VERSION_1 != 0
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value == old {
            return;
        }
        let gained = value & !old;
        if gained & STATUS_FAILED != 0 {
            // The driver gave up on the device; it stays so until a reset.
            self.status = old | STATUS_FAILED;
            return;
        }
        if old & (STATUS_FAILED | STATUS_NEEDS_RESET) != 0 {
            return self.refuse_status(value, "the device must be reset first");
        }
        if old & !value != 0 {
            return self.refuse_status(value, "status bits are only cleared by a reset");
        }
        if gained & !STATUS_STEPS.iter().fold(0, |all, bit| all | bit) != 0 {
            return self.refuse_status(value, "bits the driver does not set");
        }
        if STATUS_STEPS
            .windows(2)
            .any(|w| value & w[1] != 0 && value & w[0] == 0)
        {
            return self.refuse_status(value, "out of order");
        }
        if gained & STATUS_DRIVER_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            return self.refuse_status(value, "DRIVER_OK before FEATURES_OK was accepted");
        }
        if gained & STATUS_FEATURES_OK != 0 {
            if !self.features_acceptable() {
                // FEATURES_OK stays clear: the driver reads it back and gives up.
                self.status = value & !STATUS_FEATURES_OK;
                return self.refuse_status(value, "features not acceptable");
            }
            self.device.set_acked_features(self.acked_features);
        }
        self.status = value;
        if gained & STATUS_DRIVER_OK != 0 {
            if let Err(why) = self.activate() {
                count(&self.counters.failed_activations);
                warn_limited!(
                    "virtio device type {} not activated: {why}",
                    self.device_type()
                );
                self.status = (value & !STATUS_DRIVER_OK) | STATUS_NEEDS_RESET;
            }
        }
    }

    /// Whether queue `q`'s rings lie in guest memory.
    fn queue_fits(&self, q: &Queue) -> bool {
        let size = usize::from(q.size());
        let fits = |addr: u64, len: usize| self.mem.check_range(GuestAddress(addr), len);
        fits(q.desc_table(), 16 * size)
            && fits(q.avail_ring(), 6 + 2 * size)
            && fits(q.used_ring(), 6 + 8 * size)
    }

    fn activate(&mut self) -> Result<(), String> {
        if self.activated {
            return Err("the device is already active".into());
        }
        for (index, q) in self.queues.iter().enumerate() {
            if self.queue_invalid.get(index) != Some(&false) {
                return Err(format!("queue {index} was given an invalid configuration"));
            }
            if !q.ready() {
                return Err(format!("queue {index} is not ready"));
            }
            if !self.queue_fits(q) {
                return Err(format!("queue {index} lies outside guest memory"));
            }
        }
        let queue_events = self
            .queue_events
            .iter()
            .map(|e| e.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot clone queue eventfds: {e}"))?;
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queues = self
            .queues
            .iter()
            .map(|q| {
                let mut queue = Queue::try_from(q.state())?;
                queue.set_event_idx(event_idx);
                Ok(queue)
            })
            .collect::<Result<Vec<_>, virtio_queue::Error>>()
            .map_err(|e| format!("bad queue state: {e:?}"))?;
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
        };
        self.device
            .activate(activation)
            .map_err(|e| format!("device error: {e}"))?;
        self.activated = true;
        Ok(())
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC_VALUE,
            0x04 => MMIO_VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let features = self.device.avail_features();
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            // Shared memory regions (SHMLenLow/High, SHMBaseLow/High): none, which reads as a
            // length of -1.
            0xb0 | 0xb4 | 0xb8 | 0xbc => u32::MAX,
            0xfc => self.config_generation,
            _ => {
                count(&self.counters.bad_accesses);
                debug_limited!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            0x14 => self.device_features_select = value,
            0x20 => self.write_driver_features(value),
            0x24 => self.driver_features_select = value,
            0x30 => self.queue_select = value,
            0x38 => self.write_queue_size(value),
            0x44 => self.with_queue("QueueReady", |q| {
                q.set_ready(value == 1);
                value <= 1
            }),
            0x50 => {
                // Normally caught by the ioeventfd; forward stray notifications.
                match self.queue_events.get(value as usize) {
                    Some(evt) => {
                        let _ = evt.write(1);
                    }
                    None => {
                        count(&self.counters.bad_accesses);
                        debug_limited!("virtio-mmio: notification of unknown queue {value}");
                    }
                }
            }
            0x64 => self.interrupt.acknowledge(value),
            0x70 => self.set_status(value),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => self.write_queue_address(offset, value),
            0xac => {} // SHMSel: there are no shared memory regions.
            _ => {
                count(&self.counters.bad_accesses);
                debug_limited!("virtio-mmio: write to unknown register {offset:#x}");
            }
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            count(&self.counters.bad_accesses);
            debug_limited!("virtio-mmio: {}-byte register read", data.len());
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            count(&self.counters.bad_accesses);
            debug_limited!("virtio-mmio: {}-byte register write ignored", data.len());
            return;
        };
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::{ActivateError, TYPE_FS};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Probe {
        acked: u64,
        activations: usize,
        active: bool,
        resets: usize,
        /// Whether each queue of the last activation uses event indices.
        event_idx: Vec<bool>,
    }

    struct Dummy {
        probe: Arc<Mutex<Probe>>,
        resettable: bool,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            TYPE_FS
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
        }
        fn set_acked_features(&mut self, features: u64) {
            self.probe.lock().unwrap().acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(b"tag", offset, data);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            let mut p = self.probe.lock().unwrap();
            assert!(!p.active, "activated twice without a reset");
            assert_eq!(a.queues.len(), 2);
            p.event_idx = a.queues.iter().map(|q| q.event_idx_enabled()).collect();
            p.activations += 1;
            p.active = true;
            Ok(())
        }
        fn reset(&mut self) -> bool {
            let mut p = self.probe.lock().unwrap();
            if !self.resettable && p.active {
                return false;
            }
            p.resets += 1;
            p.active = false;
            p.acked = 0;
            true
        }
    }

    pub(crate) fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub(crate) fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    const ACK_DRIVER: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
    const FEATURES: u32 = ACK_DRIVER | STATUS_FEATURES_OK;
    const RUNNING: u32 = FEATURES | STATUS_DRIVER_OK;

    /// ACKNOWLEDGE, DRIVER, VERSION_1 acked, FEATURES_OK.
    pub(crate) fn negotiate(t: &mut MmioTransport) {
        wr(t, 0x70, STATUS_ACKNOWLEDGE);
        wr(t, 0x70, ACK_DRIVER);
        wr(t, 0x24, 1);
        wr(t, 0x20, 1);
        wr(t, 0x70, FEATURES);
    }

    /// Sets up queue `q` of `size` entries with its rings at `base` and marks it ready.
    pub(crate) fn setup_queue(t: &mut MmioTransport, q: u32, size: u32, base: u32) {
        wr(t, 0x30, q);
        wr(t, 0x38, size);
        wr(t, 0x80, base);
        wr(t, 0x84, 0);
        wr(t, 0x90, base + 0x4000);
        wr(t, 0x94, 0);
        wr(t, 0xa0, base + 0x8000);
        wr(t, 0xa4, 0);
        wr(t, 0x44, 1);
    }

    /// The whole driver sequence up to DRIVER_OK.
    pub(crate) fn bring_up(t: &mut MmioTransport, queues: u32, size: u32) {
        negotiate(t);
        for q in 0..queues {
            setup_queue(t, q, size, 0x1_0000 + q * 0x1_0000);
        }
        wr(t, 0x70, RUNNING);
    }

    fn transport_with(resettable: bool) -> (MmioTransport, Arc<Mutex<Probe>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let probe = Arc::new(Mutex::new(Probe::default()));
        let dev = Dummy {
            probe: probe.clone(),
            resettable,
        };
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(0).unwrap()));
        (MmioTransport::new(Box::new(dev), mem, irq).unwrap(), probe)
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Probe>>) {
        transport_with(true)
    }

    #[test]
    fn identity_registers_and_config() {
        let (mut t, _) = transport();
        assert_eq!(rd(&mut t, 0), MAGIC_VALUE);
        assert_eq!(rd(&mut t, 4), 2);
        assert_eq!(rd(&mut t, 8), 26);
        let mut b = [0u8; 4];
        t.read(0x100, &mut b);
        assert_eq!(&b, b"tag\0");
        assert_eq!(rd(&mut t, 0xb0), u32::MAX, "no shared memory region");
    }

    #[test]
    fn full_driver_handshake_activates_the_device() {
        let (mut t, probe) = transport();
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1);
        negotiate(&mut t);
        assert_eq!(rd(&mut t, 0x70), FEATURES);
        assert_eq!(probe.lock().unwrap().acked, VIRTIO_F_VERSION_1);
        for q in 0..2 {
            wr(&mut t, 0x30, q);
            assert_eq!(rd(&mut t, 0x34), 16, "QueueNumMax");
            setup_queue(&mut t, q, 16, 0x1_0000 + q * 0x1_0000);
            assert_eq!(rd(&mut t, 0x44), 1);
        }
        wr(&mut t, 0x70, RUNNING);
        assert_eq!(probe.lock().unwrap().activations, 1);
        assert_eq!(rd(&mut t, 0x70), RUNNING);
        assert_eq!(t.counters().refused_status.load(Ordering::Relaxed), 0);
        assert_eq!(t.counters().refused_writes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn event_idx_is_on_in_the_activated_queues_only_when_negotiated() {
        for (acked_low, expected) in [(0, false), ((VIRTIO_RING_F_EVENT_IDX as u32), true)] {
            let (mut t, probe) = transport();
            wr(&mut t, 0x70, STATUS_ACKNOWLEDGE);
            wr(&mut t, 0x70, ACK_DRIVER);
            wr(&mut t, 0x24, 0);
            wr(&mut t, 0x20, acked_low);
            wr(&mut t, 0x24, 1);
            wr(&mut t, 0x20, 1);
            wr(&mut t, 0x70, FEATURES);
            for q in 0..2 {
                setup_queue(&mut t, q, 16, 0x1_0000 + q * 0x1_0000);
            }
            wr(&mut t, 0x70, RUNNING);
            let p = probe.lock().unwrap();
            assert_eq!(p.activations, 1);
            assert_eq!(p.event_idx, vec![expected; 2], "acked {acked_low:#x}");
        }
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let (mut t, probe) = transport();
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE);
        wr(&mut t, 0x70, ACK_DRIVER);
        wr(&mut t, 0x70, FEATURES);
        assert_eq!(rd(&mut t, 0x70), ACK_DRIVER, "FEATURES_OK not accepted");
        wr(&mut t, 0x70, RUNNING);
        assert_eq!(probe.lock().unwrap().activations, 0);
    }

    #[test]
    fn driver_ok_without_features_ok_is_refused() {
        let (mut t, probe) = transport();
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE);
        wr(&mut t, 0x70, ACK_DRIVER);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        for q in 0..2 {
            setup_queue(&mut t, q, 16, 0x1_0000 + q * 0x1_0000);
        }
        wr(&mut t, 0x70, ACK_DRIVER | STATUS_DRIVER_OK);
        assert_eq!(probe.lock().unwrap().activations, 0, "device activated");
        assert_eq!(rd(&mut t, 0x70) & STATUS_DRIVER_OK, 0);
        // Nor both at once.
        wr(&mut t, 0x70, RUNNING);
        assert_eq!(probe.lock().unwrap().activations, 0, "device activated");
        assert_eq!(rd(&mut t, 0x70), ACK_DRIVER);
        // Nor skipping steps from scratch.
        let (mut t, probe) = transport();
        wr(&mut t, 0x70, STATUS_DRIVER);
        assert_eq!(rd(&mut t, 0x70), 0);
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_FEATURES_OK);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert_eq!(probe.lock().unwrap().activations, 0);
        assert!(t.counters().refused_status.load(Ordering::Relaxed) >= 2);
    }

    #[test]
    fn status_bits_cannot_be_cleared_and_failed_sticks_until_reset() {
        let (mut t, probe) = transport();
        negotiate(&mut t);
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE);
        assert_eq!(rd(&mut t, 0x70), FEATURES, "clearing bits is refused");
        wr(&mut t, 0x70, FEATURES | STATUS_FAILED);
        assert_eq!(rd(&mut t, 0x70), FEATURES | STATUS_FAILED);
        wr(&mut t, 0x70, FEATURES);
        assert_ne!(
            rd(&mut t, 0x70) & STATUS_FAILED,
            0,
            "FAILED cannot be cleared"
        );
        for q in 0..2 {
            setup_queue(&mut t, q, 16, 0x1_0000 + q * 0x1_0000);
        }
        wr(&mut t, 0x70, RUNNING | STATUS_FAILED);
        assert_eq!(probe.lock().unwrap().activations, 0);
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0, "a reset clears FAILED");
        bring_up(&mut t, 2, 16);
        assert_eq!(probe.lock().unwrap().activations, 1);
    }

    #[test]
    fn reset_after_activation_allows_activating_again() {
        let (mut t, probe) = transport();
        bring_up(&mut t, 2, 16);
        assert_eq!(rd(&mut t, 0x70), RUNNING);
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0);
        {
            let p = probe.lock().unwrap();
            assert!(!p.active, "the device was reset");
            assert_eq!(p.acked, 0);
        }
        for q in 0..2 {
            wr(&mut t, 0x30, q);
            assert_eq!(rd(&mut t, 0x44), 0, "queues are reset");
        }
        bring_up(&mut t, 2, 16);
        assert_eq!(rd(&mut t, 0x70), RUNNING);
        assert_eq!(probe.lock().unwrap().activations, 2);
    }

    #[test]
    fn a_device_that_cannot_reset_is_never_activated_again() {
        let (mut t, probe) = transport_with(false);
        bring_up(&mut t, 2, 16);
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), STATUS_NEEDS_RESET);
        bring_up(&mut t, 2, 16);
        assert_eq!(probe.lock().unwrap().activations, 1);
        assert_ne!(rd(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn invalid_queue_sizes_refuse_activation() {
        // Not a power of two, above the maximum, and a value that truncates to a valid one.
        for bad in [12u32, 32, 0x1_0010, 0] {
            let (mut t, probe) = transport();
            bring_up(&mut t, 2, bad);
            assert_eq!(probe.lock().unwrap().activations, 0, "size {bad:#x}");
            assert_eq!(rd(&mut t, 0x70) & STATUS_DRIVER_OK, 0);
            assert_ne!(rd(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
            assert!(t.counters().refused_writes.load(Ordering::Relaxed) >= 1);
            // A reset and a valid setup work.
            wr(&mut t, 0x70, 0);
            bring_up(&mut t, 2, 8);
            assert_eq!(probe.lock().unwrap().activations, 1, "size {bad:#x}");
        }
    }

    #[test]
    fn rings_outside_guest_memory_refuse_activation() {
        let (mut t, probe) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 16, 0xf_8000); // used ring at 0x10_0000: past the end
        wr(&mut t, 0x70, RUNNING);
        assert_eq!(probe.lock().unwrap().activations, 0);
    }

    #[test]
    fn queue_and_feature_writes_after_their_step_are_ignored() {
        let (mut t, probe) = transport();
        bring_up(&mut t, 2, 16);
        let before = t.counters().refused_writes.load(Ordering::Relaxed);
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x38, 4);
        wr(&mut t, 0x44, 0);
        wr(&mut t, 0x80, 0x8_0000);
        wr(&mut t, 0x20, 0xffff_ffff);
        assert_eq!(rd(&mut t, 0x44), 1, "queue stays ready");
        assert_eq!(t.queues[0].size(), 16);
        assert_eq!(t.queues[0].desc_table(), 0x1_0000);
        assert_eq!(t.acked_features, VIRTIO_F_VERSION_1);
        assert_eq!(
            t.counters().refused_writes.load(Ordering::Relaxed),
            before + 4
        );
        assert_eq!(probe.lock().unwrap().activations, 1);
    }

    #[test]
    fn odd_sized_and_unknown_accesses_do_not_panic_and_are_counted() {
        let (mut t, _) = transport();
        let mut b = [0u8; 2];
        t.read(0x70, &mut b);
        t.write(0x70, &[1, 2]);
        t.write(0x30, &[]);
        let mut big = [0u8; 64];
        t.read(0x100 + 0xffff_ffff, &mut big);
        assert!(big.iter().all(|b| *b == 0));
        for _ in 0..10_000 {
            wr(&mut t, 0xf0, 1);
            wr(&mut t, 0x50, 99);
        }
        assert_eq!(
            t.counters().bad_accesses.load(Ordering::Relaxed),
            3 + 20_000
        );
    }
}
