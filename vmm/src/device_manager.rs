//! The VM's device manager: gives each virtio-mmio device an MMIO window and an interrupt line
//! (GSI) from fixed ranges, wires its interrupt (irqfd) and queue notifications (ioeventfds)
//! into KVM, puts it on the MMIO bus, and keeps it under its id (a virtio-fs share's tag;
//! later a net or block device's id), so code that acts on a running VM (the control API)
//! finds a device by the id its spec gave. Devices know nothing of it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::MMIO_DEVICES_START;
use crate::control::ControlledDevice;
use crate::devices::bus::{Bus, BusError};
use crate::devices::virtio::mmio::{
    MmioTransport, TransportError, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET,
};
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::vstate::vm::Vm;

/// Interrupt lines for virtio devices: IOAPIC pins after the legacy ones (COM1 uses 4).
pub const FIRST_VIRTIO_GSI: u32 = 5;
pub const LAST_VIRTIO_GSI: u32 = 23;

#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error("device {id:?}: no interrupt line left (at most {max} virtio devices)", max = LAST_VIRTIO_GSI - FIRST_VIRTIO_GSI + 1)]
    OutOfInterrupts { id: String },
    #[error("device id {0:?} is used twice")]
    DuplicateId(String),
    #[error("device {id:?}: cannot {what}: {source}")]
    Kvm {
        id: String,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("device {id:?}: cannot make its interrupt event: {source}")]
    Event { id: String, source: std::io::Error },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Where a device lives: its MMIO window and interrupt line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub base: u64,
    pub gsi: u32,
}

/// Hands out MMIO windows and interrupt lines, in order, never twice.
#[derive(Debug)]
pub struct Allocator {
    next_base: u64,
    next_gsi: u32,
}

impl Default for Allocator {
    fn default() -> Self {
        Self {
            next_base: MMIO_DEVICES_START,
            next_gsi: FIRST_VIRTIO_GSI,
        }
    }
}

impl Allocator {
    /// The next free window and line; `None` when the lines are used up.
    pub fn allocate(&mut self) -> Option<Placement> {
        if self.next_gsi > LAST_VIRTIO_GSI {
            return None;
        }
        let placement = Placement {
            base: self.next_base,
            gsi: self.next_gsi,
        };
        self.next_base += MMIO_WINDOW_SIZE;
        self.next_gsi += 1;
        Some(placement)
    }
}

#[derive(Default)]
pub struct DeviceManager {
    allocator: Allocator,
    bus: Bus,
    devices: BTreeMap<String, (Placement, Arc<Mutex<MmioTransport>>)>,
}

impl DeviceManager {
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches virtio `device` as `id`: window, interrupt, notifications, bus.
    pub fn attach_virtio(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        id: &str,
        device: Box<dyn VirtioDevice>,
    ) -> Result<Placement, DeviceManagerError> {
        if self.devices.contains_key(id) {
            return Err(DeviceManagerError::DuplicateId(id.to_string()));
        }
        let placement = self
            .allocator
            .allocate()
            .ok_or_else(|| DeviceManagerError::OutOfInterrupts { id: id.to_string() })?;
        let kvm = |what| {
            move |source| DeviceManagerError::Kvm {
                id: id.to_string(),
                what,
                source,
            }
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceManagerError::Event {
            id: id.to_string(),
            source,
        })?;
        vm.fd
            .register_irqfd(&irq, placement.gsi)
            .map_err(kvm("register its irqfd"))?;
        let transport =
            MmioTransport::new(device, mem.clone(), Arc::new(VirtioInterrupt::new(irq)))?;
        for (queue, event) in transport.queue_events().iter().enumerate() {
            vm.fd
                .register_ioevent(
                    event,
                    &IoEventAddress::Mmio(placement.base + QUEUE_NOTIFY_OFFSET),
                    queue as u32,
                )
                .map_err(kvm("register a queue ioeventfd"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.bus
            .insert(transport.clone(), placement.base, MMIO_WINDOW_SIZE)?;
        self.devices.insert(id.to_string(), (placement, transport));
        Ok(placement)
    }

    /// The device attached as `id`.
    pub fn device(&self, id: &str) -> Option<&Arc<Mutex<MmioTransport>>> {
        self.devices.get(id).map(|(_, device)| device)
    }

    /// The kernel command-line arguments that announce the devices to the guest.
    pub fn kernel_args(&self) -> Vec<String> {
        let mut placed: Vec<Placement> = self.devices.values().map(|(p, _)| *p).collect();
        placed.sort_by_key(|p| p.base);
        placed
            .iter()
            .map(|p| format!("virtio_mmio.device=4K@{:#x}:{}", p.base, p.gsi))
            .collect()
    }

    /// The MMIO bus the vCPUs dispatch to, and the devices as the control plane sees them
    /// (in the order of their windows).
    pub fn into_parts(self) -> (Bus, Vec<ControlledDevice>) {
        let mut placed: Vec<_> = self.devices.into_iter().collect();
        placed.sort_by_key(|(_, (placement, _))| placement.base);
        let devices = placed
            .into_iter()
            .map(|(id, (_, transport))| {
                let (kind, metrics, extra_metrics) = {
                    let t = crate::devices::bus::lock(&transport);
                    (
                        kind_name(t.device_type()),
                        t.device_metrics(),
                        t.device_extra_metrics(),
                    )
                };
                ControlledDevice {
                    id,
                    kind,
                    transport,
                    metrics,
                    extra_metrics,
                }
            })
            .collect();
        (self.bus, devices)
    }
}

/// The name of a virtio device type, as the control API shows it.
pub fn kind_name(device_type: u32) -> &'static str {
    use crate::devices::virtio::{TYPE_BLOCK, TYPE_FS, TYPE_NET, TYPE_RNG, TYPE_VSOCK};
    match device_type {
        TYPE_FS => "fs",
        TYPE_BLOCK => "block",
        TYPE_NET => "net",
        TYPE_RNG => "rng",
        TYPE_VSOCK => "vsock",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_lines_are_distinct_until_the_lines_run_out() {
        let mut allocator = Allocator::default();
        let placed: Vec<Placement> = std::iter::from_fn(|| allocator.allocate()).collect();
        assert_eq!(
            placed.len(),
            (LAST_VIRTIO_GSI - FIRST_VIRTIO_GSI + 1) as usize
        );
        for (i, p) in placed.iter().enumerate() {
            assert_eq!(p.base, MMIO_DEVICES_START + i as u64 * MMIO_WINDOW_SIZE);
            assert_eq!(p.gsi, FIRST_VIRTIO_GSI + i as u32);
        }
        assert_eq!(allocator.allocate(), None);
        assert_eq!(allocator.allocate(), None, "still none");
    }
}
