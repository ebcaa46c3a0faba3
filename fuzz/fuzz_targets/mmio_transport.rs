//! The virtio-mmio transport's register interface driven by a sequence of guest accesses
//! against a probe device: never panics, and after every access the status machine's
//! promises hold (bits in order, DRIVER_OK only with FEATURES_OK, an active device only with
//! both, activation only with valid queues in guest memory and acceptable features).
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm::devices::bus::BusDevice;
use vmm::devices::virtio::mmio::MmioTransport;
use vmm::devices::virtio::{
    read_config_bytes, ActivateError, Activation, VirtioDevice, VirtioInterrupt,
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: u64 = 4 << 20;
const QUEUE_MAX: [u16; 2] = [16, 256];
const CONFIG: &[u8] = b"fuzz-tag\0\0\0\0\x01\0\0\0";
/// Features the probe offers: VERSION_1 and two device bits.
const AVAIL: u64 = VIRTIO_F_VERSION_1 | 1 | (1 << 5);

#[derive(Default)]
struct Probe {
    acked: u64,
    active: bool,
    activations: usize,
}

struct ProbeDevice {
    probe: Arc<Mutex<Probe>>,
    /// Whether reset succeeds (a device whose workers are stuck cannot be reset).
    resettable: bool,
}

impl VirtioDevice for ProbeDevice {
    fn device_type(&self) -> u32 {
        vmm::devices::virtio::TYPE_FS
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX
    }
    fn avail_features(&self) -> u64 {
        AVAIL
    }
    fn set_acked_features(&mut self, features: u64) {
        let mut p = self.probe.lock().unwrap();
        assert!(!p.active, "features set on an active device");
        assert_eq!(
            features & !AVAIL,
            0,
            "features the device does not offer acked"
        );
        assert_ne!(features & VIRTIO_F_VERSION_1, 0, "VERSION_1 not acked");
        p.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(CONFIG, offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let mut p = self.probe.lock().unwrap();
        assert!(!p.active, "activated twice without a reset");
        assert_eq!(a.queues.len(), QUEUE_MAX.len());
        assert_eq!(a.queue_events.len(), QUEUE_MAX.len());
        assert_ne!(
            p.acked & VIRTIO_F_VERSION_1,
            0,
            "activated before FEATURES_OK"
        );
        for (q, max) in a.queues.iter().zip(QUEUE_MAX) {
            let size = q.size();
            assert!(q.ready(), "activated with a queue not ready");
            assert!(size.is_power_of_two() && size <= max, "queue size {size}");
            let size = usize::from(size);
            let fits = |addr: u64, len: usize| a.mem.check_range(GuestAddress(addr), len);
            assert!(
                fits(q.desc_table(), 16 * size),
                "descriptor table outside memory"
            );
            assert!(
                fits(q.avail_ring(), 6 + 2 * size),
                "avail ring outside memory"
            );
            assert!(
                fits(q.used_ring(), 6 + 8 * size),
                "used ring outside memory"
            );
        }
        p.active = true;
        p.activations += 1;
        Ok(())
    }
    fn reset(&mut self) -> bool {
        let mut p = self.probe.lock().unwrap();
        if !self.resettable && p.active {
            return false;
        }
        p.active = false;
        p.acked = 0;
        true
    }
}

/// The registers of the version-2 layout (and a few around them).
const REGISTERS: [u64; 26] = [
    0x00, 0x04, 0x08, 0x0c, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60, 0x64, 0x70,
    0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4, 0xac, 0xb0, 0xfc, 0x100,
];

#[derive(Arbitrary, Debug)]
enum Value {
    /// A status value built from the driver's bits.
    Status(u8),
    Small(u8),
    /// An address inside guest memory (16-byte aligned) or just past its end.
    Addr(u16),
    Raw(u32),
}

impl Value {
    fn get(&self) -> u32 {
        match *self {
            Value::Status(b) => u32::from(b),
            Value::Small(b) => u32::from(b % 8),
            Value::Addr(a) => (u32::from(a) * 64) % (MEM_SIZE as u32 + 0x1000),
            Value::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Access {
    Read {
        reg: u8,
    },
    Write {
        reg: u8,
        value: Value,
    },
    /// Any offset, any width (1..=8 bytes), including the config space.
    RawRead {
        offset: u16,
        len: u8,
    },
    RawWrite {
        offset: u16,
        bytes: Vec<u8>,
    },
    /// The driver's next status step from the current one (to reach the later states often).
    NextStatus,
    Reset,
    /// Driver macros, so that the later states are reached often: ACKNOWLEDGE, DRIVER,
    /// the features (VERSION_1 and `extra` of the device bits), FEATURES_OK.
    Negotiate {
        extra: u8,
    },
    /// Select queue `q`, size 2^`size_log`, rings at the given 16-byte slots, and ready.
    SetupQueue {
        q: u8,
        size_log: u8,
        desc: u16,
        avail: u16,
        used: u16,
        ready: bool,
    },
    /// The whole bring-up: Negotiate, both queues set up (valid sizes), DRIVER_OK.
    BringUp {
        extra: u8,
        size_log: [u8; 2],
        slots: [u16; 6],
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    resettable: bool,
    accesses: Vec<Access>,
}

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

const STEPS: [u32; 4] = [
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_FEATURES_OK,
    STATUS_DRIVER_OK,
];
const KNOWN: u32 = STATUS_ACKNOWLEDGE
    | STATUS_DRIVER
    | STATUS_FEATURES_OK
    | STATUS_DRIVER_OK
    | STATUS_NEEDS_RESET
    | STATUS_FAILED;

fn check(t: &mut MmioTransport, probe: &Mutex<Probe>, last_status: &mut u32, reset: bool) {
    assert_eq!(rd(t, 0x00), 0x7472_6976, "magic");
    assert_eq!(rd(t, 0x04), 2, "version");
    let status = rd(t, 0x70);
    assert_eq!(status & !KNOWN, 0, "unknown status bits {status:#x}");
    for w in STEPS.windows(2) {
        if status & w[1] != 0 {
            assert_ne!(status & w[0], 0, "status {status:#x} out of order");
        }
    }
    if !reset {
        // Bits are only cleared by a reset (and FEATURES_OK/DRIVER_OK by a refusal, which sets
        // DEVICE_NEEDS_RESET instead of DRIVER_OK).
        let lost = *last_status & !status;
        let allowed = if status & STATUS_NEEDS_RESET != 0 {
            STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_ACKNOWLEDGE | STATUS_DRIVER
        } else {
            0
        };
        assert_eq!(
            lost & !allowed,
            0,
            "status {:#x} -> {status:#x}",
            *last_status
        );
    }
    *last_status = status;
    let p = probe.lock().unwrap();
    if p.active {
        // An active device: DRIVER_OK and FEATURES_OK, or a failed reset (NEEDS_RESET).
        let running = STATUS_DRIVER_OK | STATUS_FEATURES_OK;
        assert!(
            status & running == running || status & STATUS_NEEDS_RESET != 0,
            "device active in status {status:#x}"
        );
    }
    if status & STATUS_DRIVER_OK != 0 {
        assert!(p.active, "DRIVER_OK without an active device");
    }
    if status & STATUS_FEATURES_OK != 0 {
        assert_ne!(
            p.acked & VIRTIO_F_VERSION_1,
            0,
            "FEATURES_OK without VERSION_1"
        );
    }
}

fn negotiate(t: &mut MmioTransport, extra: u8) {
    for step in [STATUS_ACKNOWLEDGE, STATUS_ACKNOWLEDGE | STATUS_DRIVER] {
        wr(t, 0x70, step);
    }
    let features = VIRTIO_F_VERSION_1 | u64::from(extra & 0x21);
    wr(t, 0x24, 0);
    wr(t, 0x20, features as u32);
    wr(t, 0x24, 1);
    wr(t, 0x20, (features >> 32) as u32);
    let s = rd(t, 0x70);
    wr(t, 0x70, s | STATUS_FEATURES_OK);
}

fn setup_queue(
    t: &mut MmioTransport,
    q: u8,
    size_log: u8,
    desc: u16,
    avail: u16,
    used: u16,
    ready: bool,
) {
    // 16-byte slots over guest memory and a little past its end.
    let slot = |x: u16| (u32::from(x) * 80) % (MEM_SIZE as u32 + 0x1000);
    wr(t, 0x30, u32::from(q % 3));
    wr(t, 0x38, 1 << (size_log % 10));
    for (reg, v) in [(0x80u64, desc), (0x90, avail), (0xa0, used)] {
        wr(t, reg, slot(v));
        wr(t, reg + 4, 0);
    }
    wr(t, 0x44, u32::from(ready));
}

fuzz_target!(|input: Input| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let probe = Arc::new(Mutex::new(Probe::default()));
    let dev = ProbeDevice {
        probe: probe.clone(),
        resettable: input.resettable,
    };
    let irq = Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    let mut t = MmioTransport::new(Box::new(dev), mem, irq).unwrap();
    let mut last = 0;
    for access in input.accesses.iter().take(512) {
        let mut reset = false;
        match access {
            Access::Read { reg } => {
                let off = REGISTERS[usize::from(*reg) % REGISTERS.len()];
                let v = rd(&mut t, off);
                if off == 0x34 {
                    let sel = rd(&mut t, 0x34); // QueueNumMax is stable
                    assert_eq!(v, sel);
                }
            }
            Access::Write { reg, value } => {
                let off = REGISTERS[usize::from(*reg) % REGISTERS.len()];
                let v = value.get();
                reset = off == 0x70 && v == 0;
                wr(&mut t, off, v);
            }
            Access::RawRead { offset, len } => {
                let mut b = vec![0xaau8; usize::from(*len % 9)];
                t.read(u64::from(*offset), &mut b);
                if u64::from(*offset) >= 0x100 {
                    let mut want = vec![0u8; b.len()];
                    read_config_bytes(CONFIG, u64::from(*offset) - 0x100, &mut want);
                    assert_eq!(b, want, "config space read");
                } else if b.len() != 4 {
                    assert!(b.iter().all(|&x| x == 0), "odd-sized read not zeroed");
                }
            }
            Access::RawWrite { offset, bytes } => {
                let bytes = &bytes[..bytes.len().min(8)];
                reset = *offset == 0x70 && bytes == [0, 0, 0, 0];
                t.write(u64::from(*offset), bytes);
            }
            Access::NextStatus => {
                let s = rd(&mut t, 0x70);
                let next = STEPS.iter().find(|&&b| s & b == 0).copied().unwrap_or(0);
                wr(&mut t, 0x70, s | next);
            }
            Access::Negotiate { extra } => negotiate(&mut t, *extra),
            Access::SetupQueue {
                q,
                size_log,
                desc,
                avail,
                used,
                ready,
            } => setup_queue(&mut t, *q, *size_log, *desc, *avail, *used, *ready),
            Access::BringUp {
                extra,
                size_log,
                slots,
            } => {
                negotiate(&mut t, *extra);
                for q in 0..2 {
                    let max_log = QUEUE_MAX[q].trailing_zeros() as u8 + 1;
                    let s = &slots[q * 3..q * 3 + 3];
                    setup_queue(
                        &mut t,
                        q as u8,
                        size_log[q] % max_log,
                        s[0],
                        s[1],
                        s[2],
                        true,
                    );
                }
                let s = rd(&mut t, 0x70);
                wr(&mut t, 0x70, s | STATUS_DRIVER_OK);
                if std::env::var_os("FUZZ_DEBUG").is_some() {
                    eprintln!(
                        "bring-up: status {:#x} active {}",
                        rd(&mut t, 0x70),
                        probe.lock().unwrap().active
                    );
                }
            }
            Access::Reset => {
                reset = true;
                wr(&mut t, 0x70, 0);
                let s = rd(&mut t, 0x70);
                if input.resettable {
                    assert_eq!(s, 0, "reset of a resettable device");
                    assert!(!probe.lock().unwrap().active, "active after a reset");
                }
            }
        }
        check(&mut t, &probe, &mut last, reset);
    }
});
