//! The virtio-blk device driven through guest memory as the guest's driver would: requests in
//! descriptor chains on a split queue, data and status bytes read back from guest memory, the
//! image file checked on the host.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::device::{
    BlockDevice, DISCARD_LIMITS, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
};
use super::disk::{DiskError, DiskImage};
use super::request::*;
use super::worker::BlockQueue;
use crate::devices::virtio::queue_worker::{QueueServer, Served};
use crate::devices::virtio::test_utils::{Buffer, TestDriver};
use crate::devices::virtio::{Activation, VirtioDevice, VirtioInterrupt, VirtioMetrics};
use crate::rate_limiter::SharedRateLimiter;
use vm_spec::{RateLimiterSpec, TokenBucketSpec};

const HEADER: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const SECTORS: u64 = 64;

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    mem: GuestMemoryMmap,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let image: Vec<u8> = (0..SECTORS * 512).map(|i| (i / 512) as u8).collect();
        std::fs::write(&path, image).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        Self {
            _dir: dir,
            path,
            mem,
        }
    }

    fn disk(&self, readonly: bool) -> DiskImage {
        DiskImage::open(&self.path, readonly).unwrap()
    }

    fn queue(
        &self,
        driver: &TestDriver,
        readonly: bool,
        limits: Option<&RateLimiterSpec>,
    ) -> BlockQueue {
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        serial[..6].copy_from_slice(b"SN-123");
        BlockQueue {
            id: "test".into(),
            mem: self.mem.clone(),
            queue: driver.queue(),
            disk: Arc::new(self.disk(readonly)),
            serial,
            discard: DISCARD_LIMITS,
            limiter: SharedRateLimiter::new(limits).unwrap(),
            metrics: Arc::new(VirtioMetrics::default()),
        }
    }

    fn header(&self, kind: u32, sector: u64) {
        self.mem
            .write_obj(kind.to_le(), GuestAddress(HEADER))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(HEADER + 8))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn host_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        std::fs::File::open(&self.path)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }
}

fn buf(addr: u64, len: u32, writable: bool) -> Buffer {
    Buffer {
        addr,
        len,
        writable,
    }
}

/// A request with `data` buffers between the header and the status byte.
fn chain(data: &[Buffer]) -> Vec<Buffer> {
    let mut all = vec![buf(HEADER, 16, false)];
    all.extend(data.iter().map(|b| buf(b.addr, b.len, b.writable)));
    all.push(buf(STATUS, 1, true));
    all
}

/// Sends one request; returns (status, used length).
fn call(
    fx: &Fixture,
    driver: &mut TestDriver,
    q: &mut BlockQueue,
    kind: u32,
    sector: u64,
    data: &[Buffer],
) -> (u8, u32) {
    fx.header(kind, sector);
    driver.push_chain(&chain(data));
    let served = q.serve_queue().unwrap();
    assert_eq!(served.throttled_for, None);
    let (_, len) = driver.pop_used().expect("a used buffer");
    (fx.status(), len)
}

#[test]
fn writes_and_reads_reach_the_image_through_split_buffers() {
    let fx = Fixture::new();
    let mut driver = TestDriver::new(&fx.mem, 16);
    let mut q = fx.queue(&driver, false, None);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
    fx.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    // Two 512-byte buffers, not adjacent in guest memory.
    fx.mem
        .write_slice(&pattern[512..], GuestAddress(DATA + 0x4000))
        .unwrap();
    let (status, len) = call(
        &fx,
        &mut driver,
        &mut q,
        VIRTIO_BLK_T_OUT,
        2,
        &[buf(DATA, 512, false), buf(DATA + 0x4000, 512, false)],
    );
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(fx.host_bytes(1024, 1024), pattern);
    assert_eq!(fx.host_bytes(2048, 1), [4], "the next sector is untouched");

    let (status, len) = call(
        &fx,
        &mut driver,
        &mut q,
        VIRTIO_BLK_T_IN,
        2,
        &[buf(DATA + 0x8000, 1024, true)],
    );
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1025));
    let mut back = vec![0u8; 1024];
    fx.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x8000))
        .unwrap();
    assert_eq!(back, pattern);
    let m = q.metrics.snapshot();
    assert_eq!(m[0].2, 2, "requests");
    assert_eq!((m[1].2, m[2].2), (1024, 1024), "bytes read and written");
}

#[test]
fn flush_get_id_and_unknown_types() {
    let fx = Fixture::new();
    let mut driver = TestDriver::new(&fx.mem, 16);
    let mut q = fx.queue(&driver, false, None);
    assert_eq!(
        call(&fx, &mut driver, &mut q, VIRTIO_BLK_T_FLUSH, 0, &[]),
        (VIRTIO_BLK_S_OK, 1)
    );
    fx.mem.write_slice(&[0xaa; 32], GuestAddress(DATA)).unwrap();
    assert_eq!(
        call(
            &fx,
            &mut driver,
            &mut q,
            VIRTIO_BLK_T_GET_ID,
            0,
            &[buf(DATA, 20, true)]
        ),
        (VIRTIO_BLK_S_OK, 21)
    );
    let mut id = [0u8; 21];
    fx.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..6], b"SN-123");
    assert_eq!(&id[6..20], &[0u8; 14], "NUL-padded");
    assert_eq!(id[20], 0xaa, "nothing past 20 bytes");
    // A short GET_ID buffer gets what fits.
    assert_eq!(
        call(
            &fx,
            &mut driver,
            &mut q,
            VIRTIO_BLK_T_GET_ID,
            0,
            &[buf(DATA, 4, true)]
        ),
        (VIRTIO_BLK_S_OK, 5)
    );
    assert_eq!(
        call(&fx, &mut driver, &mut q, 99, 0, &[]),
        (VIRTIO_BLK_S_UNSUPP, 1)
    );
}

fn discard_segment(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = sector.to_le_bytes().to_vec();
    s.extend_from_slice(&sectors.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

#[test]
fn discard_punches_holes_within_the_disk_and_its_limits() {
    let fx = Fixture::new();
    let mut driver = TestDriver::new(&fx.mem, 16);
    let mut q = fx.queue(&driver, false, None);
    let mut segments = discard_segment(8, 8, 0);
    segments.extend(discard_segment(24, 8, 1));
    fx.mem.write_slice(&segments, GuestAddress(DATA)).unwrap();
    assert_eq!(
        call(
            &fx,
            &mut driver,
            &mut q,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[buf(DATA, 32, false)]
        ),
        (VIRTIO_BLK_S_OK, 1)
    );
    assert_eq!(fx.host_bytes(8 * 512, 4096), vec![0u8; 4096]);
    assert_eq!(fx.host_bytes(24 * 512, 4096), vec![0u8; 4096]);
    assert_eq!(fx.host_bytes(16 * 512, 1), [16], "between the holes");
    assert_eq!(
        std::fs::metadata(&fx.path).unwrap().len(),
        SECTORS * 512,
        "the size is kept"
    );

    for (segment, status) in [
        (discard_segment(SECTORS - 4, 8, 0), VIRTIO_BLK_S_IOERR),
        (discard_segment(u64::MAX / 256, 8, 0), VIRTIO_BLK_S_IOERR),
        (discard_segment(0, 8, 2), VIRTIO_BLK_S_UNSUPP),
        (
            discard_segment(0, DISCARD_LIMITS.max_sectors + 1, 0),
            VIRTIO_BLK_S_IOERR,
        ),
    ] {
        fx.mem.write_slice(&segment, GuestAddress(DATA)).unwrap();
        let got = call(
            &fx,
            &mut driver,
            &mut q,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[buf(DATA, 16, false)],
        );
        assert_eq!(got, (status, 1), "{segment:?}");
    }
    // More segments than announced; a length that is not whole segments.
    let many = DISCARD_LIMITS.max_segments * 16 + 16;
    assert_eq!(
        call(
            &fx,
            &mut driver,
            &mut q,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[buf(DATA, many, false)]
        )
        .0,
        VIRTIO_BLK_S_UNSUPP
    );
    assert_eq!(
        call(
            &fx,
            &mut driver,
            &mut q,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[buf(DATA, 20, false)]
        )
        .0,
        VIRTIO_BLK_S_IOERR
    );
}

#[test]
fn requests_past_the_end_fail_without_touching_memory() {
    let fx = Fixture::new();
    let mut driver = TestDriver::new(&fx.mem, 16);
    let mut q = fx.queue(&driver, false, None);
    fx.mem
        .write_slice(&[0x5a; 1024], GuestAddress(DATA))
        .unwrap();
    // The last sector reads fine; one more does not.
    assert_eq!(
        call(
            &fx,
            &mut driver,
            &mut q,
            VIRTIO_BLK_T_IN,
            SECTORS - 1,
            &[buf(DATA, 512, true)]
        )
        .0,
        VIRTIO_BLK_S_OK
    );
    fx.mem
        .write_slice(&[0x5a; 1024], GuestAddress(DATA))
        .unwrap();
    for sector in [SECTORS - 1, SECTORS, u64::MAX, u64::MAX / 512] {
        let got = call(
            &fx,
            &mut driver,
            &mut q,
            VIRTIO_BLK_T_IN,
            sector,
            &[buf(DATA, 1024, true)],
        );
        assert_eq!(got, (VIRTIO_BLK_S_IOERR, 1), "sector {sector}");
        let got = call(
            &fx,
            &mut driver,
            &mut q,
            VIRTIO_BLK_T_OUT,
            sector,
            &[buf(DATA, 1024, false)],
        );
        assert_eq!(got, (VIRTIO_BLK_S_IOERR, 1), "sector {sector}");
    }
    let mut after = vec![0u8; 1024];
    fx.mem.read_slice(&mut after, GuestAddress(DATA)).unwrap();
    assert_eq!(after, vec![0x5a; 1024], "no partial read");
    assert_eq!(std::fs::metadata(&fx.path).unwrap().len(), SECTORS * 512);
    assert_eq!(q.metrics.snapshot()[3].2, 8, "errors counted");
}

#[test]
fn malformed_chains_get_ioerr_or_nothing_and_never_a_panic() {
    let fx = Fixture::new();
    let mut driver = TestDriver::new(&fx.mem, 16);
    let mut q = fx.queue(&driver, false, None);
    let mut send = |fx: &Fixture, buffers: &[Buffer]| {
        fx.header(VIRTIO_BLK_T_IN, 0);
        driver.push_chain(buffers);
        q.serve_queue().unwrap();
        let (_, len) = driver.pop_used().expect("every chain is returned");
        (fx.status(), len)
    };
    let ioerr = (VIRTIO_BLK_S_IOERR, 1);
    // Only a status byte; a header too short; a device-writable header.
    assert_eq!(send(&fx, &[buf(STATUS, 1, true)]), ioerr);
    assert_eq!(
        send(&fx, &[buf(HEADER, 8, false), buf(STATUS, 1, true)]),
        ioerr
    );
    assert_eq!(
        send(&fx, &[buf(HEADER, 16, true), buf(STATUS, 1, true)]),
        ioerr
    );
    // No writable status byte: nothing can be reported.
    assert_eq!(
        send(&fx, &[buf(HEADER, 16, false), buf(STATUS, 1, false)]).1,
        0
    );
    assert_eq!(
        send(&fx, &[buf(HEADER, 16, false), buf(STATUS, 0, true)]).1,
        0
    );
    // A read into a device-readable buffer; a length that is not whole sectors.
    assert_eq!(
        send(&fx, &chain(&[buf(DATA, 512, false)])),
        ioerr,
        "wrong direction"
    );
    assert_eq!(send(&fx, &chain(&[buf(DATA, 100, true)])), ioerr);
    // Buffers outside guest memory, or across its end.
    assert_eq!(send(&fx, &chain(&[buf(0xffff_0000, 512, true)])), ioerr);
    assert_eq!(send(&fx, &chain(&[buf((1 << 20) - 256, 512, true)])), ioerr);
    // A header outside guest memory.
    assert_eq!(
        send(&fx, &[buf(0xffff_0000, 16, false), buf(STATUS, 1, true)]),
        ioerr
    );
    // A status byte outside guest memory: returned with nothing written.
    assert_eq!(
        send(&fx, &[buf(HEADER, 16, false), buf(0xffff_0000, 1, true)]).1,
        0
    );
    assert!(q.metrics.snapshot()[3].2 >= 10, "errors counted");
    // The queue still works.
    assert_eq!(
        call(
            &fx,
            &mut driver,
            &mut q,
            VIRTIO_BLK_T_IN,
            1,
            &[buf(DATA, 512, true)]
        ),
        (VIRTIO_BLK_S_OK, 513)
    );
}

#[test]
fn a_read_only_drive_offers_ro_and_refuses_writes_and_discards() {
    let fx = Fixture::new();
    let device = BlockDevice::new("ro", fx.disk(true), None, None).unwrap();
    let features = device.avail_features();
    assert_ne!(features & VIRTIO_BLK_F_RO, 0);
    assert_eq!(features & VIRTIO_BLK_F_DISCARD, 0);
    assert_ne!(features & VIRTIO_BLK_F_FLUSH, 0);
    let rw = BlockDevice::new("rw", fx.disk(false), None, None).unwrap();
    assert_eq!(rw.avail_features() & VIRTIO_BLK_F_RO, 0);
    let mut capacity = [0u8; 8];
    rw.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), SECTORS);

    let mut driver = TestDriver::new(&fx.mem, 16);
    let mut q = fx.queue(&driver, true, None);
    fx.mem.write_slice(&[9; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        call(
            &fx,
            &mut driver,
            &mut q,
            VIRTIO_BLK_T_OUT,
            0,
            &[buf(DATA, 512, false)]
        )
        .0,
        VIRTIO_BLK_S_IOERR
    );
    fx.mem
        .write_slice(&discard_segment(0, 8, 0), GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        call(
            &fx,
            &mut driver,
            &mut q,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[buf(DATA, 16, false)]
        )
        .0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(fx.host_bytes(0, 512), vec![0u8; 512], "sector 0 unchanged");
    assert_eq!(
        call(
            &fx,
            &mut driver,
            &mut q,
            VIRTIO_BLK_T_IN,
            3,
            &[buf(DATA, 512, true)]
        )
        .0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        call(&fx, &mut driver, &mut q, VIRTIO_BLK_T_FLUSH, 0, &[]).0,
        VIRTIO_BLK_S_OK
    );
}

#[test]
fn bad_images_are_refused_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let err = DiskImage::open(&missing, false).unwrap_err();
    assert!(matches!(err, DiskError::Open { .. }));
    assert!(err.to_string().contains("missing.img"), "{err}");
    for size in [0usize, 100, 513] {
        let path = dir.path().join(format!("{size}.img"));
        std::fs::write(&path, vec![0u8; size]).unwrap();
        let err = DiskImage::open(&path, false).unwrap_err();
        assert!(matches!(err, DiskError::BadSize { .. }), "{err}");
        assert!(err.to_string().contains(&format!("{size}.img")), "{err}");
    }
    let err = DiskImage::open(dir.path(), true).unwrap_err();
    assert!(err.to_string().contains(&dir.path().display().to_string()));
    let too_long = "x".repeat(21);
    let path = dir.path().join("ok.img");
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let disk = DiskImage::open(&path, false).unwrap();
    assert!(BlockDevice::new("d", disk, Some(&too_long), None).is_err());
}

fn ops_per_hour(n: u64) -> RateLimiterSpec {
    RateLimiterSpec {
        bandwidth: None,
        ops: Some(TokenBucketSpec {
            size: n,
            refill_time_ms: 3_600_000,
            one_time_burst: None,
        }),
    }
}

#[test]
fn a_throttled_request_stays_queued_until_the_limits_allow_it() {
    let fx = Fixture::new();
    let mut driver = TestDriver::new(&fx.mem, 16);
    let mut q = fx.queue(&driver, false, Some(&ops_per_hour(1)));
    fx.header(VIRTIO_BLK_T_IN, 0);
    driver.push_chain(&chain(&[buf(DATA, 512, true)]));
    driver.push_chain(&chain(&[buf(DATA, 512, true)]));
    let served = q.serve_queue().unwrap();
    assert!(served.notify);
    let wait = served
        .throttled_for
        .expect("the second request is held back");
    assert!(wait > Duration::from_secs(3000), "{wait:?}");
    assert!(driver.pop_used().is_some());
    assert_eq!(driver.pop_used(), None, "the second request waits");
    assert_eq!(q.metrics.snapshot()[5].2, 1, "throttled once");
    // Asking again does not serve it either (the worker would wait on its timer).
    assert!(q.serve_queue().unwrap().throttled_for.is_some());
    assert_eq!(driver.pop_used(), None);
    // New limits let it through.
    q.limiter.update(&RateLimiterSpec::default()).unwrap();
    assert_eq!(
        q.serve_queue().unwrap(),
        Served {
            notify: true,
            throttled_for: None
        }
    );
    assert!(driver.pop_used().is_some());
}

fn eventually<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Running {
    notify: EventFd,
    irq: EventFd,
}

/// Activates `device` with `driver`'s queue; its worker runs under the real seccomp filter.
fn activate(device: &mut BlockDevice, fx: &Fixture, driver: &TestDriver) -> Running {
    let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    device
        .activate(Activation {
            mem: fx.mem.clone(),
            queues: vec![driver.queue()],
            queue_events: vec![notify.try_clone().unwrap()],
            interrupt: Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap())),
        })
        .unwrap();
    Running { notify, irq }
}

#[test]
fn the_worker_serves_resets_and_serves_again_under_its_seccomp_filter() {
    let fx = Fixture::new();
    let mut device = BlockDevice::new("w", fx.disk(false), None, None).unwrap();
    device.start_workers().unwrap();
    let mut driver = TestDriver::new(&fx.mem, 16);
    let run = activate(&mut device, &fx, &driver);
    fx.mem
        .write_slice(&discard_segment(0, 8, 0), GuestAddress(DATA))
        .unwrap();
    for (kind, data) in [
        (VIRTIO_BLK_T_OUT, buf(DATA + 0x1000, 4096, false)),
        (VIRTIO_BLK_T_IN, buf(DATA + 0x1000, 4096, true)),
        (VIRTIO_BLK_T_FLUSH, buf(DATA, 0, true)),
        (VIRTIO_BLK_T_DISCARD, buf(DATA, 16, false)),
    ] {
        fx.header(kind, 0);
        let mut buffers = chain(&[data]);
        if kind == VIRTIO_BLK_T_FLUSH {
            buffers.remove(1);
        }
        driver.push_chain(&buffers);
        run.notify.write(1).unwrap();
        assert!(eventually(|| driver.pop_used()).is_some(), "type {kind}");
        assert_eq!(fx.status(), VIRTIO_BLK_S_OK, "type {kind}");
    }
    assert!(run.irq.read().unwrap() >= 1, "the driver was interrupted");
    assert_eq!(device.metrics().unwrap().snapshot()[0].2, 4);

    assert!(device.reset());
    // After the reset nothing serves the old queue.
    fx.header(VIRTIO_BLK_T_IN, 0);
    driver.push_chain(&chain(&[buf(DATA, 512, true)]));
    run.notify.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(driver.pop_used(), None);

    // Activated again on a fresh queue, the same thread serves.
    let mut second = TestDriver::at(&fx.mem, GuestAddress(0x8_0000), 16);
    let run = activate(&mut device, &fx, &second);
    fx.header(VIRTIO_BLK_T_GET_ID, 0);
    second.push_chain(&chain(&[buf(DATA, 20, true)]));
    run.notify.write(1).unwrap();
    assert!(eventually(|| second.pop_used()).is_some());
    let mut id = [0u8; 1];
    fx.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"w", "the id is the default serial");
    assert!(device.reset());
}

#[test]
fn the_worker_waits_out_the_limit_and_takes_new_limits_at_run_time() {
    let fx = Fixture::new();
    // 1 request per 200 ms.
    let limits = RateLimiterSpec {
        bandwidth: None,
        ops: Some(TokenBucketSpec {
            size: 1,
            refill_time_ms: 200,
            one_time_burst: None,
        }),
    };
    let mut device = BlockDevice::new("t", fx.disk(false), None, Some(&limits)).unwrap();
    device.start_workers().unwrap();
    let mut driver = TestDriver::new(&fx.mem, 16);
    let run = activate(&mut device, &fx, &driver);
    fx.header(VIRTIO_BLK_T_FLUSH, 0);
    let started = Instant::now();
    for _ in 0..3 {
        driver.push_chain(&[buf(HEADER, 16, false), buf(STATUS, 1, true)]);
    }
    run.notify.write(1).unwrap();
    let mut done = 0;
    assert!(eventually(|| {
        while driver.pop_used().is_some() {
            done += 1;
        }
        (done == 3).then_some(())
    })
    .is_some());
    // Two requests had to wait for a token each: no faster than the rate.
    assert!(
        started.elapsed() >= Duration::from_millis(390),
        "{:?}",
        started.elapsed()
    );
    let throttled = device.metrics().unwrap().snapshot()[5].2;
    assert!(
        (1..=2).contains(&throttled),
        "held back {throttled} times, no spinning"
    );

    // One per hour: the next request waits...
    device.set_rate_limiter(&ops_per_hour(1)).unwrap();
    for _ in 0..2 {
        driver.push_chain(&[buf(HEADER, 16, false), buf(STATUS, 1, true)]);
    }
    run.notify.write(1).unwrap();
    assert!(eventually(|| driver.pop_used()).is_some());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(driver.pop_used(), None, "held back for an hour");
    // ...until the limits are lifted while the worker sleeps on its timer.
    device
        .set_rate_limiter(&RateLimiterSpec::default())
        .unwrap();
    assert!(eventually(|| driver.pop_used()).is_some());
    assert!(
        device.set_rate_limiter(&ops_per_hour(0)).is_err(),
        "invalid limits refused"
    );
    assert!(device.reset());
}

#[test]
fn a_vcpu_thread_activates_the_device_within_its_seccomp_filter() {
    use crate::devices::virtio::mmio::tests::{negotiate, rd, wr};
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::seccomp::{apply_to_current_thread, filter, ThreadKind, Violation};
    let fx = Fixture::new();
    let mut device = BlockDevice::new("v", fx.disk(false), None, None).unwrap();
    device.start_workers().unwrap();
    let irq = Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    let mut t = MmioTransport::new(Box::new(device), fx.mem.clone(), irq).unwrap();
    let vcpu = filter(ThreadKind::Vcpu, Violation::Errno).unwrap();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                apply_to_current_thread(&vcpu).unwrap();
                for round in 0..2u64 {
                    let mut driver =
                        TestDriver::at(&fx.mem, GuestAddress(0x4_0000 + round * 0x2_0000), 16);
                    negotiate(&mut t);
                    wr(&mut t, 0x30, 0);
                    wr(&mut t, 0x38, 16);
                    let [desc, avail, used] = driver.ring_addresses();
                    for (reg, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
                        wr(&mut t, reg, addr as u32);
                        wr(&mut t, reg + 4, 0);
                    }
                    wr(&mut t, 0x44, 1);
                    wr(&mut t, 0x70, 0xf);
                    assert_eq!(rd(&mut t, 0x70), 0xf, "device running");
                    fx.header(VIRTIO_BLK_T_IN, round);
                    driver.push_chain(&chain(&[buf(DATA, 512, true)]));
                    wr(&mut t, 0x50, 0);
                    // No ioeventfd here: the transport's queue event is what KVM would signal.
                    t.queue_events()[0].write(1).unwrap();
                    assert!(eventually(|| driver.pop_used()).is_some());
                    assert_eq!(fx.status(), VIRTIO_BLK_S_OK);
                    wr(&mut t, 0x70, 0);
                    assert_eq!(rd(&mut t, 0x70), 0, "reset");
                }
            })
            .join()
            .unwrap()
    });
}

/// A queue of `fx` whose driver and device use event indices (VIRTIO_RING_F_EVENT_IDX).
fn event_idx_queue(fx: &Fixture, driver: &TestDriver) -> BlockQueue {
    let mut q = fx.queue(driver, false, None);
    virtio_queue::QueueT::set_event_idx(&mut q.queue, true);
    q
}

fn read_request(fx: &Fixture, driver: &mut TestDriver) {
    fx.header(VIRTIO_BLK_T_IN, 0);
    driver.push_chain(&chain(&[buf(DATA, 512, true)]));
}

#[test]
fn the_device_offers_indirect_descriptors_and_event_indices() {
    use crate::devices::virtio::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
    let fx = Fixture::new();
    for readonly in [false, true] {
        let device = BlockDevice::new("f", fx.disk(readonly), None, None).unwrap();
        let features = device.avail_features();
        assert_ne!(features & VIRTIO_RING_F_EVENT_IDX, 0);
        assert_ne!(features & VIRTIO_RING_F_INDIRECT_DESC, 0);
    }
}

#[test]
fn with_event_indices_the_driver_is_interrupted_only_where_it_asked() {
    let fx = Fixture::new();
    let mut driver = TestDriver::new(&fx.mem, 16);
    let mut q = event_idx_queue(&fx, &driver);
    // used_event 0: an interrupt once the first used entry is written.
    driver.set_used_event(0);
    read_request(&fx, &mut driver);
    let served = q.serve_queue().unwrap();
    assert!(served.notify, "the first completion is wanted");
    assert_eq!(
        driver.avail_event(),
        1,
        "a notification wanted for the next request"
    );
    assert_eq!(driver.used_flags(), 0, "event indices, not the flag");
    assert!(driver.pop_used().is_some());

    // The driver wants to hear only once the used entry 2 (the third request) is there.
    driver.set_used_event(2);
    read_request(&fx, &mut driver);
    assert!(!q.serve_queue().unwrap().notify, "used entry 1: not yet");
    assert!(driver.pop_used().is_some(), "returned all the same");
    read_request(&fx, &mut driver);
    assert!(q.serve_queue().unwrap().notify, "used entry 2: interrupt");
    assert!(driver.pop_used().is_some());
    assert_eq!(driver.avail_event(), 3);

    // Several requests in one pass: one interrupt when used_event lies among them, none when
    // it lies behind them (the driver was told already) or ahead.
    driver.set_used_event(4);
    for _ in 0..3 {
        read_request(&fx, &mut driver);
    }
    assert!(q.serve_queue().unwrap().notify, "entries 3..=5 cover 4");
    assert_eq!(driver.avail_event(), 6);
    for _ in 0..2 {
        read_request(&fx, &mut driver);
    }
    assert!(
        !q.serve_queue().unwrap().notify,
        "entries 6..=7, used_event 4"
    );
    driver.set_used_event(20);
    for _ in 0..3 {
        read_request(&fx, &mut driver);
    }
    assert!(
        !q.serve_queue().unwrap().notify,
        "entries 8..=10, used_event 20"
    );
    // Nothing used: no interrupt even where the driver asked.
    driver.set_used_event(10);
    assert!(!q.serve_queue().unwrap().notify);
    while driver.pop_used().is_some() {}
    assert_eq!(q.metrics.snapshot()[0].2, 11, "every request served");
    assert_eq!(fx.status(), VIRTIO_BLK_S_OK);
}

#[test]
fn with_event_indices_the_ring_index_wraps() {
    let fx = Fixture::new();
    let mut driver = TestDriver::new(&fx.mem, 16);
    let mut q = event_idx_queue(&fx, &driver);
    // 65536 + 10 requests one at a time, the driver always asking for the next completion:
    // every one is interrupted, across the 16-bit wrap of both indices.
    for i in 0..(1u32 << 16) + 10 {
        driver.set_used_event(i as u16);
        read_request(&fx, &mut driver);
        assert!(q.serve_queue().unwrap().notify, "request {i}");
        assert_eq!(driver.avail_event(), (i + 1) as u16);
        assert!(driver.pop_used().is_some());
    }
}

#[test]
fn without_event_indices_every_completion_interrupts_and_the_flag_is_cleared() {
    let fx = Fixture::new();
    let mut driver = TestDriver::new(&fx.mem, 16);
    let mut q = fx.queue(&driver, false, None);
    // used_event is ignored when the feature is not negotiated.
    driver.set_used_event(100);
    for _ in 0..3 {
        read_request(&fx, &mut driver);
        assert!(q.serve_queue().unwrap().notify);
        assert_eq!(
            driver.used_flags(),
            0,
            "notifications back on after the pass"
        );
        assert_eq!(driver.avail_event(), 0, "avail_event untouched");
    }
}

#[test]
fn requests_through_indirect_tables_are_served_and_bounded() {
    let fx = Fixture::new();
    let mut driver = TestDriver::new(&fx.mem, 16);
    let mut q = fx.queue(&driver, false, None);
    const TABLE: u64 = 0x5_0000;
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 13 % 251) as u8).collect();
    fx.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    // A 4 KiB write in eight 512-byte buffers: ten descriptors in one ring entry.
    fx.header(VIRTIO_BLK_T_OUT, 4);
    let pieces: Vec<Buffer> = (0..8).map(|i| buf(DATA + 512 * i, 512, false)).collect();
    driver.push_indirect_chain(TABLE, &chain(&pieces));
    assert!(q.serve_queue().unwrap().notify);
    assert_eq!(driver.pop_used(), Some((0, 1)));
    assert_eq!(fx.status(), VIRTIO_BLK_S_OK);
    assert_eq!(fx.host_bytes(4 * 512, 4096), pattern);
    // Read back through another table.
    fx.header(VIRTIO_BLK_T_IN, 4);
    driver.push_indirect_chain(TABLE, &chain(&[buf(DATA + 0x8000, 4096, true)]));
    q.serve_queue().unwrap();
    assert_eq!(driver.pop_used().map(|u| u.1), Some(4097));
    let mut back = vec![0u8; 4096];
    fx.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x8000))
        .unwrap();
    assert_eq!(back, pattern);

    // A table longer than the queue (the device's limit, whatever the table says) is
    // returned unread, with no status: where the chain ends is not known.
    let reads = q.metrics.snapshot()[1].2;
    fx.header(VIRTIO_BLK_T_IN, 0);
    let mut long: Vec<Buffer> = (0..300).map(|_| buf(DATA, 512, true)).collect();
    long.insert(0, buf(HEADER, 16, false));
    long.push(buf(STATUS, 1, true));
    driver.push_indirect_chain(TABLE, &long);
    q.serve_queue().unwrap();
    assert_eq!(driver.pop_used().map(|u| u.1), Some(0));
    assert_eq!(fx.status(), 0xff, "no status written");
    assert_eq!(q.metrics.snapshot()[1].2, reads, "nothing read");
    // A table of exactly the queue's size is a request (254 data buffers, as SEG_MAX says):
    // the whole 32 KiB disk in two 256-byte and 252 128-byte pieces.
    let mut longest: Vec<Buffer> = (0..254u64)
        .map(|i| {
            let len = if i < 2 { 256 } else { 128 };
            buf(DATA + 256 * i, len, true)
        })
        .collect();
    longest.insert(0, buf(HEADER, 16, false));
    longest.push(buf(STATUS, 1, true));
    driver.push_indirect_chain(TABLE, &longest);
    q.serve_queue().unwrap();
    assert_eq!(driver.pop_used().map(|u| u.1), Some(32768 + 1));
    assert_eq!(fx.status(), VIRTIO_BLK_S_OK);

    // An indirect descriptor inside an indirect table, and a table whose length is not whole
    // descriptors: the chain ends there, no panic, the queue goes on.
    for nested in [true, false] {
        fx.header(VIRTIO_BLK_T_IN, 0);
        let head = driver.push_indirect_chain(TABLE, &chain(&[buf(DATA, 512, true)]));
        if nested {
            // The table's data descriptor becomes an indirect one.
            fx.mem
                .write_obj(4u16 | 1, GuestAddress(TABLE + 16 + 12))
                .unwrap();
        } else {
            let head_at = driver.ring_addresses()[0] + 16 * u64::from(head);
            fx.mem.write_obj(40u32, GuestAddress(head_at + 8)).unwrap();
        }
        q.serve_queue().unwrap();
        assert!(driver.pop_used().is_some(), "nested {nested}");
    }
    assert_eq!(
        call(
            &fx,
            &mut driver,
            &mut q,
            VIRTIO_BLK_T_IN,
            1,
            &[buf(DATA, 512, true)]
        ),
        (VIRTIO_BLK_S_OK, 513)
    );
}
