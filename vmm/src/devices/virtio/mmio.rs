//! The virtio-mmio transport (virtio 1.2 section 4.2, version 2 "modern" register layout): the
//! driver negotiates features, sets up queues and drives the device status through these
//! registers; on DRIVER_OK the device is activated with its queues.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, VirtioDevice, VirtioInterrupt};
use crate::devices::bus::BusDevice;

/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register (where the ioeventfds are registered).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;
const CONFIG_SPACE_OFFSET: u64 = 0x100;

#[cfg(test)]
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 0x80;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
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
            queues,
            queue_events,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The per-queue notification eventfds, to register as ioeventfds at QueueNotify.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        // Queue layout may change only before the driver is done.
        if self.status & STATUS_DRIVER_OK != 0 {
            return;
        }
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn reset(&mut self) {
        self.status = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.acknowledge(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            if self.activated {
                // Re-activating a running device is not supported: keep the device running
                // and tell the driver it failed rather than serve stale queues.
                tracing::warn!("virtio device reset after activation is not supported");
                self.status = STATUS_FAILED;
                return;
            }
            self.reset();
            return;
        }
        let new_bits = value & !self.status;
        if new_bits & STATUS_FEATURES_OK != 0 {
            let unsupported = self.acked_features & !self.device.avail_features();
            if unsupported != 0 || self.acked_features & super::VIRTIO_F_VERSION_1 == 0 {
                self.status = value & !STATUS_FEATURES_OK;
                return;
            }
            self.device.set_acked_features(self.acked_features);
        }
        self.status = value;
        if new_bits & STATUS_DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let ready: Vec<bool> = self.queues.iter().map(|q| q.is_valid(&self.mem)).collect();
        if ready.iter().any(|r| !r) {
            tracing::warn!(
                "virtio device type {}: driver set up invalid queues",
                self.device_type()
            );
            self.status |= STATUS_FAILED;
            return;
        }
        let queue_events = match self
            .queue_events
            .iter()
            .map(|e| e.try_clone())
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(events) => events,
            Err(e) => {
                tracing::error!("cannot clone queue eventfds: {e}");
                self.status |= STATUS_FAILED;
                return;
            }
        };
        let queues = match self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(queues) => queues,
            Err(e) => {
                tracing::warn!(
                    "virtio device type {}: bad queue state: {e:?}",
                    self.device_type()
                );
                self.status |= STATUS_FAILED;
                return;
            }
        };
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
        };
        match self.device.activate(activation) {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::error!(
                    "virtio device type {} failed to activate: {e}",
                    self.device_type()
                );
                self.status |= STATUS_FAILED;
            }
        }
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
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let driver_busy = self.status & STATUS_DRIVER != 0 && self.status & STATUS_FEATURES_OK == 0;
        match offset {
            0x14 => self.device_features_select = value,
            0x20 if driver_busy => match self.driver_features_select {
                0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
                1 => {
                    self.acked_features =
                        (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            0x24 => self.driver_features_select = value,
            0x30 => self.queue_select = value,
            0x38 => self.with_queue(|q| q.set_size(value as u16)),
            0x44 => self.with_queue(|q| q.set_ready(value == 1)),
            0x50 => {
                // Normally caught by the ioeventfd; forward stray notifications.
                if let Some(evt) = self.queue_events.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            0x64 => self.interrupt.acknowledge(value),
            0x70 => self.set_status(value),
            0x80 => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            0x84 => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            0x90 => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            0x94 => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            0xa0 => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            0xa4 => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            _ => tracing::debug!("virtio-mmio: write to unknown register {offset:#x}"),
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
            tracing::debug!("virtio-mmio: {}-byte register write ignored", data.len());
            return;
        };
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    struct Dummy {
        acked: Arc<Mutex<u64>>,
        activated: Arc<Mutex<Option<usize>>>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            super::super::TYPE_FS
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn avail_features(&self) -> u64 {
            super::super::VIRTIO_F_VERSION_1
        }
        fn set_acked_features(&mut self, features: u64) {
            *self.acked.lock().unwrap() = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(b"tag", offset, data);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, a: Activation) -> Result<(), super::super::ActivateError> {
            *self.activated.lock().unwrap() = Some(a.queues.len());
            Ok(())
        }
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    type Probe<T> = Arc<Mutex<T>>;

    fn transport() -> (MmioTransport, Probe<u64>, Probe<Option<usize>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let acked = Arc::new(Mutex::new(0));
        let activated = Arc::new(Mutex::new(None));
        let dev = Dummy {
            acked: acked.clone(),
            activated: activated.clone(),
        };
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(0).unwrap()));
        (
            MmioTransport::new(Box::new(dev), mem, irq).unwrap(),
            acked,
            activated,
        )
    }

    #[test]
    fn identity_registers_and_config() {
        let (mut t, _, _) = transport();
        assert_eq!(rd(&mut t, 0), MAGIC_VALUE);
        assert_eq!(rd(&mut t, 4), 2);
        assert_eq!(rd(&mut t, 8), 26);
        let mut b = [0u8; 4];
        t.read(0x100, &mut b);
        assert_eq!(&b, b"tag\0");
    }

    #[test]
    fn full_driver_handshake_activates_the_device() {
        let (mut t, acked, activated) = transport();
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE);
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        wr(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(rd(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        assert_eq!(*acked.lock().unwrap(), super::super::VIRTIO_F_VERSION_1);
        for (q, base) in [(0u32, 0x1000u32), (1, 0x4000)] {
            wr(&mut t, 0x30, q);
            assert_eq!(rd(&mut t, 0x34), 16);
            wr(&mut t, 0x38, 16);
            wr(&mut t, 0x80, base);
            wr(&mut t, 0x90, base + 0x100);
            wr(&mut t, 0xa0, base + 0x200);
            wr(&mut t, 0x44, 1);
        }
        wr(&mut t, 0x70, 0xf);
        assert_eq!(*activated.lock().unwrap(), Some(2));
        assert_eq!(rd(&mut t, 0x70) & STATUS_FAILED, 0);
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let (mut t, _, activated) = transport();
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(rd(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        // Queues never set up: DRIVER_OK must not activate on invalid queues.
        wr(&mut t, 0x70, 0xf);
        assert!(activated.lock().unwrap().is_none());
    }

    #[test]
    fn odd_sized_accesses_do_not_panic() {
        let (mut t, _, _) = transport();
        let mut b = [0u8; 2];
        t.read(0x70, &mut b);
        t.write(0x70, &[1, 2]);
        t.write(0x30, &[]);
        let mut big = [0u8; 64];
        t.read(0x100 + 0xffff_ffff, &mut big);
        assert!(big.iter().all(|b| *b == 0));
    }
}
