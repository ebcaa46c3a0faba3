//! The virtio-rng device driven through guest memory: buffers filled, the per-request cap,
//! malformed chains, throttling, and the worker's activation and reset.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::worker::RngQueue;
use super::{RngDevice, MAX_REQUEST_BYTES};
use crate::devices::virtio::queue_worker::QueueServer;
use crate::devices::virtio::test_utils::{Buffer, TestDriver};
use crate::devices::virtio::{Activation, VirtioDevice, VirtioInterrupt, VirtioMetrics};
use crate::rate_limiter::SharedRateLimiter;
use vm_spec::{RateLimiterSpec, TokenBucketSpec};

const BUF: u64 = 0x1_0000;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn rng_queue(
    mem: &GuestMemoryMmap,
    driver: &TestDriver,
    limits: Option<&RateLimiterSpec>,
) -> RngQueue {
    RngQueue {
        mem: mem.clone(),
        queue: driver.queue(),
        limiter: SharedRateLimiter::new(limits).unwrap(),
        metrics: Arc::new(VirtioMetrics::default()),
    }
}

fn writable(addr: u64, len: u32) -> Buffer {
    Buffer {
        addr,
        len,
        writable: true,
    }
}

fn bytes_per_hour(n: u64) -> RateLimiterSpec {
    RateLimiterSpec {
        bandwidth: Some(TokenBucketSpec {
            size: n,
            refill_time_ms: 3_600_000,
            one_time_burst: None,
        }),
        ops: None,
    }
}

#[test]
fn buffers_are_filled_with_random_bytes() {
    let mem = memory();
    let mut driver = TestDriver::new(&mem, 16);
    let mut q = rng_queue(&mem, &driver, None);
    mem.write_slice(&[0u8; 8192], GuestAddress(BUF)).unwrap();
    driver.push_chain(&[writable(BUF, 4096), writable(BUF + 4096, 100)]);
    assert!(q.serve_queue().unwrap().notify);
    assert_eq!(driver.pop_used(), Some((0, 4196)));
    let mut got = vec![0u8; 4196];
    mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    let distinct: std::collections::BTreeSet<u8> = got.iter().copied().collect();
    assert!(distinct.len() > 200, "{} distinct values", distinct.len());
    let mut after = [1u8; 16];
    mem.read_slice(&mut after, GuestAddress(BUF + 4196))
        .unwrap();
    assert_eq!(after, [0u8; 16], "nothing past the buffers");
    assert_eq!(q.metrics.snapshot()[1].2, 4196);
}

#[test]
fn a_huge_request_gets_at_most_the_cap() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let mut driver = TestDriver::new(&mem, 16);
    let mut q = rng_queue(&mem, &driver, None);
    driver.push_chain(&[writable(BUF, 1 << 20), writable(BUF + (1 << 20), 1 << 20)]);
    q.serve_queue().unwrap();
    assert_eq!(driver.pop_used(), Some((0, MAX_REQUEST_BYTES)));
    let mut past = [0u8; 64];
    mem.read_slice(&mut past, GuestAddress(BUF + u64::from(MAX_REQUEST_BYTES)))
        .unwrap();
    assert_eq!(past, [0u8; 64], "not one byte past the cap");
}

#[test]
fn malformed_chains_are_returned_empty() {
    let mem = memory();
    let mut driver = TestDriver::new(&mem, 16);
    let mut q = rng_queue(&mem, &driver, None);
    // A device-readable buffer; a buffer outside guest memory.
    driver.push_chain(&[Buffer {
        addr: BUF,
        len: 64,
        writable: false,
    }]);
    driver.push_chain(&[writable(0xffff_0000, 64)]);
    driver.push_chain(&[writable((1 << 20) - 16, 64)]);
    q.serve_queue().unwrap();
    assert_eq!(driver.pop_used(), Some((0, 0)));
    assert_eq!(driver.pop_used(), Some((1, 0)));
    let (_, len) = driver.pop_used().unwrap();
    assert!(len <= 16, "only what lies in memory: {len}");
    assert_eq!(q.metrics.snapshot()[3].2, 3);
    driver.push_chain(&[writable(BUF, 8)]);
    q.serve_queue().unwrap();
    assert_eq!(driver.pop_used().map(|(_, len)| len), Some(8));
}

#[test]
fn the_limiter_holds_requests_back_until_new_limits() {
    let mem = memory();
    let mut driver = TestDriver::new(&mem, 16);
    let mut q = rng_queue(&mem, &driver, Some(&bytes_per_hour(64)));
    driver.push_chain(&[writable(BUF, 64)]);
    driver.push_chain(&[writable(BUF, 64)]);
    let served = q.serve_queue().unwrap();
    assert!(served.throttled_for.unwrap() > Duration::from_secs(3000));
    assert_eq!(driver.pop_used().map(|(_, len)| len), Some(64));
    assert_eq!(driver.pop_used(), None);
    q.limiter.update(&RateLimiterSpec::default()).unwrap();
    assert_eq!(q.serve_queue().unwrap().throttled_for, None);
    assert_eq!(driver.pop_used().map(|(_, len)| len), Some(64));
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

#[test]
fn the_worker_fills_at_the_limited_rate_and_stops_on_reset() {
    let mem = memory();
    // 1 KiB per 100 ms.
    let limits = RateLimiterSpec {
        bandwidth: Some(TokenBucketSpec {
            size: 1024,
            refill_time_ms: 100,
            one_time_burst: None,
        }),
        ops: None,
    };
    let mut device = RngDevice::new(Some(&limits)).unwrap();
    device.start_workers().unwrap();
    let mut driver = TestDriver::new(&mem, 16);
    let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    device
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![driver.queue()],
            queue_events: vec![notify.try_clone().unwrap()],
            interrupt: Arc::new(VirtioInterrupt::new(
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            )),
        })
        .unwrap();
    let started = Instant::now();
    for i in 0..4 {
        driver.push_chain(&[writable(BUF + i * 1024, 1024)]);
    }
    notify.write(1).unwrap();
    let mut done = 0;
    assert!(eventually(|| {
        while driver.pop_used().is_some() {
            done += 1;
        }
        (done == 4).then_some(())
    })
    .is_some());
    // A full bucket, then three refills of 100 ms each.
    assert!(
        started.elapsed() >= Duration::from_millis(290),
        "{:?}",
        started.elapsed()
    );
    assert!(device.metrics().unwrap().snapshot()[5].2 >= 1);
    assert!(device.reset());
    driver.push_chain(&[writable(BUF, 16)]);
    notify.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(driver.pop_used(), None, "no worker after the reset");
}
