//! The virtio-net device driven through queues in guest memory, with a datagram socket pair
//! standing in for the tap (one datagram per frame, as a tap gives them): TX, RX into
//! mergeable buffers, a guest without receive buffers, malformed and oversize chains, rate
//! limits and their replacement, the worker thread, and a real tap where the host allows one.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::device::*;
use super::tap::Backend;
use super::worker::{NetMetrics, NetQueues, MAX_GSO_FRAME, MAX_MTU_FRAME};
use super::{NetDevice, Tap};
use crate::devices::virtio::test_utils::{Buffer, TestDriver};
use crate::devices::virtio::{
    Activation, VirtioDevice, VirtioInterrupt, VirtioMetrics, VIRTIO_F_VERSION_1,
};
use crate::rate_limiter::SharedRateLimiter;
use vm_spec::{MacAddr, NetRateLimiterSpec, RateLimiterSpec, TokenBucketSpec};

const MEM_SIZE: usize = 1 << 20;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x4000;
const BUF: u64 = 0x1_0000;
const QSIZE: u16 = 16;

/// The host side of a socket pair, as a tap: one datagram per frame.
struct PairBackend {
    sock: UnixDatagram,
    offloads: Mutex<Vec<u32>>,
}

impl AsRawFd for PairBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl Backend for PairBackend {
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.recv(buf)
    }

    fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        self.sock.send(frame)
    }

    fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        if let Ok(mut seen) = self.offloads.lock() {
            seen.push(flags);
        }
        Ok(())
    }
}

/// The backend the device holds and the host's end (frames in and out of the "tap").
fn pair() -> (Arc<PairBackend>, UnixDatagram) {
    let (device, host) = UnixDatagram::pair().unwrap();
    device.set_nonblocking(true).unwrap();
    host.set_nonblocking(true).unwrap();
    (
        Arc::new(PairBackend {
            sock: device,
            offloads: Mutex::new(Vec::new()),
        }),
        host,
    )
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

const BASE_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF;

struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    rx: TestDriver<'a>,
    tx: TestDriver<'a>,
    q: NetQueues,
    host: UnixDatagram,
}

fn rig(mem: &GuestMemoryMmap, features: u64, limits: NetRateLimiterSpec) -> Rig<'_> {
    let rx = TestDriver::at(mem, GuestAddress(RX_RING), QSIZE);
    let tx = TestDriver::at(mem, GuestAddress(TX_RING), QSIZE);
    let (backend, host) = pair();
    let q = NetQueues::new(
        "net0".into(),
        mem.clone(),
        rx.queue(),
        tx.queue(),
        backend,
        features,
        (
            SharedRateLimiter::new(limits.rx.as_ref()).unwrap(),
            SharedRateLimiter::new(limits.tx.as_ref()).unwrap(),
        ),
        (
            Arc::new(NetMetrics::default()),
            Arc::new(VirtioMetrics::default()),
        ),
    );
    Rig {
        mem,
        rx,
        tx,
        q,
        host,
    }
}

fn readable(addr: u64, len: u32) -> Buffer {
    Buffer {
        addr,
        len,
        writable: false,
    }
}

fn writable(addr: u64, len: u32) -> Buffer {
    Buffer {
        addr,
        len,
        writable: true,
    }
}

/// A frame of `len` bytes (Ethernet header included) with a recognisable pattern.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn hdr(flags: u8, gso: u8) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = flags;
    h[1] = gso;
    h
}

fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

fn recv_all(host: &UnixDatagram) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 70_000];
    while let Ok(n) = host.recv(&mut buf) {
        out.push(buf[..n].to_vec());
    }
    out
}

impl Rig<'_> {
    /// Puts a TX chain of header + `data` (split at `split`) in guest memory.
    fn push_tx(&mut self, at: u64, header: [u8; VNET_HDR_LEN], data: &[u8]) -> u16 {
        self.mem.write_slice(&header, GuestAddress(at)).unwrap();
        self.mem
            .write_slice(data, GuestAddress(at + 0x100))
            .unwrap();
        self.tx.push_chain(&[
            readable(at, VNET_HDR_LEN as u32),
            readable(at + 0x100, data.len() as u32),
        ])
    }
}

#[test]
fn tx_sends_a_frame_with_its_header() {
    let mem = memory();
    let mut r = rig(&mem, BASE_FEATURES, NetRateLimiterSpec::default());
    let data = frame(60, 1);
    let head = r.push_tx(BUF, hdr(0, 0), &data);
    let pass = r.q.process_tx().unwrap();
    assert!(pass.notify);
    assert_eq!(r.tx.pop_used(), Some((u32::from(head), 0)));
    let sent = recv_all(&r.host);
    assert_eq!(sent.len(), 1);
    assert_eq!(&sent[0][..VNET_HDR_LEN], &hdr(0, 0));
    assert_eq!(&sent[0][VNET_HDR_LEN..], &data[..]);
    assert_eq!(count(&r.q.metrics.tx_frames), 1);
    assert_eq!(count(&r.q.metrics.tx_bytes), 60);
    assert_eq!(count(&r.q.common.bytes_written), 60);
}

#[test]
fn rx_spans_mergeable_buffers_and_counts_them() {
    let mem = memory();
    let mut r = rig(&mem, BASE_FEATURES, NetRateLimiterSpec::default());
    let data = frame(3000, 7);
    let mut sent = hdr(0, 0).to_vec();
    sent.extend_from_slice(&data);
    r.host.send(&sent).unwrap();
    // Three chains: the first of two descriptors.
    let a =
        r.rx.push_chain(&[writable(BUF, 100), writable(BUF + 0x1000, 1400)]);
    let b = r.rx.push_chain(&[writable(BUF + 0x2000, 1500)]);
    let c = r.rx.push_chain(&[writable(BUF + 0x3000, 1500)]);
    let d = r.rx.push_chain(&[writable(BUF + 0x4000, 1500)]);
    let pass = r.q.process_rx().unwrap();
    assert!(pass.notify);
    assert_eq!(r.rx.pop_used(), Some((u32::from(a), 1500)));
    assert_eq!(r.rx.pop_used(), Some((u32::from(b), 1500)));
    assert_eq!(r.rx.pop_used(), Some((u32::from(c), 12)));
    assert_eq!(r.rx.pop_used(), None, "chain {d} stays for the next frame");
    let mut got = vec![0u8; 3012];
    mem.read_slice(&mut got[..100], GuestAddress(BUF)).unwrap();
    mem.read_slice(&mut got[100..1500], GuestAddress(BUF + 0x1000))
        .unwrap();
    mem.read_slice(&mut got[1500..3000], GuestAddress(BUF + 0x2000))
        .unwrap();
    mem.read_slice(&mut got[3000..], GuestAddress(BUF + 0x3000))
        .unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(&got[VNET_HDR_LEN..], &data[..]);
    assert_eq!(count(&r.q.metrics.rx_frames), 1);
    assert_eq!(count(&r.q.metrics.rx_bytes), 3000);
    assert!(!r.q.rx_stalled);
}

#[test]
fn rx_waits_for_enough_buffers_without_spinning() {
    let mem = memory();
    let mut r = rig(&mem, BASE_FEATURES, NetRateLimiterSpec::default());
    virtio_queue::QueueT::set_event_idx(&mut r.q.rx, true);
    let mut f = hdr(0, 0).to_vec();
    f.extend_from_slice(&frame(3000, 1));
    r.host.send(&f).unwrap();
    // One buffer, too small: the frame waits (the pass returns: no spinning on it).
    r.rx.push_chain(&[writable(BUF, 1500)]);
    let pass = r.q.process_rx().unwrap();
    assert!(r.q.rx_stalled);
    assert!(!pass.notify);
    assert_eq!(r.rx.pop_used(), None);
    assert_eq!(count(&r.q.metrics.rx_no_buffers), 1);
    // The device asked to be notified past the buffers it has seen.
    let [_, avail, _] = r.rx.ring_addresses();
    let used_ring = r.rx.ring_addresses()[2];
    let avail_event: u16 = mem
        .read_obj(GuestAddress(used_ring + 4 + 8 * u64::from(QSIZE)))
        .unwrap();
    let avail_idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
    assert_eq!(avail_event, avail_idx);
    // Two more: the frame spans the three.
    r.rx.push_chain(&[writable(BUF + 0x1000, 1500)]);
    r.rx.push_chain(&[writable(BUF + 0x2000, 1500)]);
    r.q.rx_stalled = false;
    r.q.process_rx().unwrap();
    assert_eq!(r.rx.pop_used().map(|(_, len)| len), Some(1500));
    assert_eq!(r.rx.pop_used().map(|(_, len)| len), Some(1500));
    assert_eq!(r.rx.pop_used().map(|(_, len)| len), Some(12));
}

#[test]
fn rx_without_mergeable_buffers_needs_one_chain_per_frame() {
    let mem = memory();
    let mut r = rig(&mem, VIRTIO_F_VERSION_1, NetRateLimiterSpec::default());
    let mut big = hdr(0, 0).to_vec();
    big.extend_from_slice(&frame(1000, 2));
    r.host.send(&big).unwrap();
    let mut small = hdr(0, 0).to_vec();
    small.extend_from_slice(&frame(100, 3));
    r.host.send(&small).unwrap();
    // Too small for the first frame (dropped, the chain kept), right for the second.
    let a = r.rx.push_chain(&[writable(BUF, 500)]);
    r.q.process_rx().unwrap();
    assert_eq!(r.rx.pop_used(), Some((u32::from(a), 112)));
    assert_eq!(count(&r.q.metrics.dropped_oversize), 1);
    let mut num_buffers = [0u8; 2];
    mem.read_slice(&mut num_buffers, GuestAddress(BUF + 10))
        .unwrap();
    assert_eq!(u16::from_le_bytes(num_buffers), 1);
}

#[test]
fn rx_waits_without_buffers_and_resumes_when_they_come() {
    let mem = memory();
    let mut r = rig(&mem, BASE_FEATURES, NetRateLimiterSpec::default());
    // The host sends until the "tap" queue is full: the excess is refused (a real tap's
    // queue drops it), nothing is lost silently inside the device.
    let mut queued = 0;
    for i in 0..10_000u32 {
        let mut f = hdr(0, 0).to_vec();
        f.extend_from_slice(&frame(200, i as u8));
        match r.host.send(&f) {
            Ok(_) => queued += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(queued > 1 && queued < 10_000, "{queued} frames queued");
    let pass = r.q.process_rx().unwrap();
    assert!(!pass.notify);
    assert!(r.q.rx_stalled, "the device stops reading the tap");
    assert_eq!(count(&r.q.metrics.rx_no_buffers), 1);
    // Another pass (a spurious wake-up) reads nothing more and counts nothing new.
    r.q.process_rx().unwrap();
    assert_eq!(count(&r.q.metrics.rx_no_buffers), 1);
    assert_eq!(count(&r.q.metrics.rx_frames), 0);
    // The driver adds buffers: every queued frame goes through, in order.
    let mut delivered = 0;
    while delivered < queued {
        for i in 0..QSIZE {
            r.rx.push_chain(&[writable(BUF + u64::from(i) * 0x1000, 1024)]);
        }
        r.q.rx_stalled = false;
        r.q.process_rx().unwrap();
        while let Some((_, len)) = r.rx.pop_used() {
            assert_eq!(len, 212);
            delivered += 1;
        }
    }
    assert_eq!(count(&r.q.metrics.rx_frames), queued);
    assert_eq!(count(&r.q.metrics.dropped_malformed), 0);
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let mem = memory();
    let mut r = rig(&mem, BASE_FEATURES, NetRateLimiterSpec::default());
    // A device-writable buffer.
    r.tx.push_chain(&[readable(BUF, 12), writable(BUF + 0x100, 60)]);
    // Shorter than a header and an Ethernet header.
    r.tx.push_chain(&[readable(BUF, 20)]);
    // Outside guest memory.
    r.tx.push_chain(&[readable(BUF, 12), readable(MEM_SIZE as u64 - 10, 60)]);
    r.tx.push_chain(&[readable(0xffff_ffff_0000, 100)]);
    // An offload the guest did not negotiate (TSO without HOST_TSO4), a checksum without CSUM.
    let data = frame(100, 1);
    r.push_tx(BUF + 0x1000, hdr(0, 1), &data);
    r.push_tx(BUF + 0x2000, hdr(1, 0), &data);
    r.q.process_tx().unwrap();
    let mut used = 0;
    while let Some((_, len)) = r.tx.pop_used() {
        assert_eq!(len, 0);
        used += 1;
    }
    assert_eq!(used, 6, "every chain is returned");
    assert!(recv_all(&r.host).is_empty(), "nothing reaches the tap");
    assert_eq!(count(&r.q.metrics.dropped_malformed), 6);
    // The queue still works.
    r.push_tx(BUF, hdr(0, 0), &data);
    r.q.process_tx().unwrap();
    assert_eq!(recv_all(&r.host).len(), 1);
}

/// Writes descriptor `index` of the ring at `ring` by hand (for chains the test driver
/// refuses to make).
fn write_desc(
    mem: &GuestMemoryMmap,
    ring: u64,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let at = ring + u64::from(index) * 16;
    mem.write_obj(addr, GuestAddress(at)).unwrap();
    mem.write_obj(len, GuestAddress(at + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
    mem.write_obj(next, GuestAddress(at + 14)).unwrap();
}

#[test]
fn looping_chains_are_malformed() {
    let mem = memory();
    let mut r = rig(&mem, BASE_FEATURES, NetRateLimiterSpec::default());
    // TX: a chain of one descriptor, then made to point at itself.
    let head = r.tx.push_chain(&[readable(BUF, 64)]);
    let [desc_table, ..] = r.tx.ring_addresses();
    write_desc(&mem, desc_table, head, BUF, 64, 1, head);
    // RX: two descriptors pointing at each other; another pointing past the table.
    let a =
        r.rx.push_chain(&[writable(BUF, 64), writable(BUF + 64, 64)]);
    let [rx_table, ..] = r.rx.ring_addresses();
    write_desc(&mem, rx_table, a + 1, BUF + 64, 64, 1 | 2, a);
    let b = r.rx.push_chain(&[writable(BUF + 0x1000, 2048)]);
    write_desc(&mem, rx_table, b, BUF + 0x1000, 2048, 1 | 2, QSIZE + 5);
    r.q.process_tx().unwrap();
    assert_eq!(r.tx.pop_used(), Some((u32::from(head), 0)));
    assert!(recv_all(&r.host).is_empty());
    let mut f = hdr(0, 0).to_vec();
    f.extend_from_slice(&frame(60, 0));
    r.host.send(&f).unwrap();
    r.host.send(&f).unwrap();
    r.q.process_rx().unwrap();
    assert_eq!(r.rx.pop_used(), Some((u32::from(a), 0)));
    assert_eq!(r.rx.pop_used(), Some((u32::from(b), 0)));
    assert_eq!(count(&r.q.metrics.dropped_malformed), 3);
    assert_eq!(
        count(&r.q.metrics.rx_frames),
        0,
        "both frames went with the bad chains"
    );
}

#[test]
fn malformed_rx_chains_are_returned_empty() {
    let mem = memory();
    let mut r = rig(&mem, BASE_FEATURES, NetRateLimiterSpec::default());
    let mut f = hdr(0, 0).to_vec();
    f.extend_from_slice(&frame(100, 0));
    for _ in 0..4 {
        r.host.send(&f).unwrap();
    }
    // Device-readable, shorter than a header, outside memory; then a good one.
    let a = r.rx.push_chain(&[readable(BUF, 2048)]);
    let b = r.rx.push_chain(&[writable(BUF, 8)]);
    let c = r.rx.push_chain(&[writable(MEM_SIZE as u64 - 16, 2048)]);
    let d = r.rx.push_chain(&[writable(BUF, 2048)]);
    r.q.process_rx().unwrap();
    assert_eq!(r.rx.pop_used(), Some((u32::from(a), 0)));
    assert_eq!(r.rx.pop_used(), Some((u32::from(b), 0)));
    assert_eq!(r.rx.pop_used(), Some((u32::from(c), 0)));
    assert_eq!(r.rx.pop_used(), Some((u32::from(d), 112)));
    assert_eq!(count(&r.q.metrics.dropped_malformed), 3);
    assert_eq!(count(&r.q.metrics.rx_frames), 1);
}

#[test]
fn oversize_tx_frames_are_dropped() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let mut r = rig(&mem, BASE_FEATURES, NetRateLimiterSpec::default());
    r.push_tx(BUF, hdr(0, 0), &frame(MAX_MTU_FRAME, 0));
    r.push_tx(BUF, hdr(0, 0), &frame(MAX_MTU_FRAME + 1, 0));
    r.q.process_tx().unwrap();
    assert_eq!(recv_all(&r.host).len(), 1);
    assert_eq!(count(&r.q.metrics.dropped_oversize), 1);

    // With TSO negotiated: up to 64 KiB + the Ethernet header.
    let tso = BASE_FEATURES | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4;
    let mut r = rig(&mem, tso, NetRateLimiterSpec::default());
    // SO_SNDBUF: the pair must carry a 64 KiB datagram.
    r.push_tx(0x10_0000, hdr(1, 1), &frame(MAX_GSO_FRAME, 0));
    r.push_tx(0x10_0000, hdr(1, 1), &frame(MAX_GSO_FRAME + 1, 0));
    r.q.process_tx().unwrap();
    let sent = recv_all(&r.host);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].len(), VNET_HDR_LEN + MAX_GSO_FRAME);
    assert_eq!(count(&r.q.metrics.dropped_oversize), 1);
    assert_eq!(r.q.tap_offloads(), 0, "no GUEST_ offloads acked");
}

fn per_hour(frames: u64) -> RateLimiterSpec {
    RateLimiterSpec {
        bandwidth: None,
        ops: Some(TokenBucketSpec {
            size: frames,
            refill_time_ms: 3_600_000,
            one_time_burst: None,
        }),
    }
}

#[test]
fn rate_limits_hold_each_direction_back_until_replaced() {
    let mem = memory();
    let limits = NetRateLimiterSpec {
        rx: Some(per_hour(1)),
        tx: Some(per_hour(1)),
    };
    let mut r = rig(&mem, BASE_FEATURES, limits);
    let data = frame(60, 0);
    r.push_tx(BUF, hdr(0, 0), &data);
    r.push_tx(BUF, hdr(0, 0), &data);
    let pass = r.q.process_tx().unwrap();
    assert!(pass.throttled_for.unwrap() > Duration::from_secs(3000));
    assert_eq!(recv_all(&r.host).len(), 1);
    assert!(r.tx.pop_used().is_some());
    assert_eq!(r.tx.pop_used(), None, "the second chain waits in the queue");
    assert_eq!(count(&r.q.metrics.tx_rate_limited), 1);

    let mut f = hdr(0, 0).to_vec();
    f.extend_from_slice(&data);
    r.host.send(&f).unwrap();
    r.host.send(&f).unwrap();
    for i in 0..4 {
        r.rx.push_chain(&[writable(BUF + 0x1000 * (i + 1), 2048)]);
    }
    let pass = r.q.process_rx().unwrap();
    assert!(pass.throttled_for.is_some());
    assert!(r.rx.pop_used().is_some());
    assert_eq!(r.rx.pop_used(), None);
    assert_eq!(count(&r.q.metrics.rx_rate_limited), 1);

    // New limits (as PATCH sets them): what waited goes through.
    r.q.tx_limiter.update(&RateLimiterSpec::default()).unwrap();
    r.q.rx_limiter.update(&RateLimiterSpec::default()).unwrap();
    assert_eq!(r.q.process_tx().unwrap().throttled_for, None);
    assert_eq!(r.q.process_rx().unwrap().throttled_for, None);
    assert_eq!(recv_all(&r.host).len(), 1);
    assert!(r.tx.pop_used().is_some());
    assert!(r.rx.pop_used().is_some());
}

#[test]
fn features_config_and_patches() {
    let (backend, _host) = pair();
    let mac = MacAddr([2, 0, 10, 0, 2, 2]);
    let mut device = NetDevice::new("net0", backend.clone(), Some(mac), None)
        .unwrap()
        .without_seccomp();
    let features = device.avail_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert_ne!(features & bit, 0, "{bit:#x}");
    }
    let mut config = [0u8; 6];
    device.read_config(0, &mut config);
    assert_eq!(config, mac.0);
    device.set_acked_features(VIRTIO_NET_F_MAC | (1 << 40));
    assert_eq!(
        device.acked_features(),
        VIRTIO_NET_F_MAC,
        "unknown bits are ignored"
    );
    let none = NetDevice::new("net1", backend, None, None).unwrap();
    assert_eq!(none.avail_features() & VIRTIO_NET_F_MAC, 0);

    // PATCH: per direction; `{}` lifts both; a single bucket set is refused.
    let limits = NetRateLimiterSpec {
        rx: Some(per_hour(5)),
        tx: None,
    };
    device.set_rx_tx_rate_limiter(&limits).unwrap();
    device
        .set_rate_limiter(&RateLimiterSpec::default())
        .unwrap();
    assert!(device.set_rate_limiter(&per_hour(1)).is_err());
    assert!(device
        .set_rx_tx_rate_limiter(&NetRateLimiterSpec {
            rx: Some(per_hour(0)),
            tx: None
        })
        .is_err());
}

fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn the_worker_moves_frames_both_ways_sets_offloads_and_stops_on_reset() {
    let mem = memory();
    let (backend, host) = pair();
    let mut device = NetDevice::new("net0", backend.clone(), None, None)
        .unwrap()
        .without_seccomp();
    device.start_workers().unwrap();
    let features =
        BASE_FEATURES | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6;
    device.set_acked_features(features);
    let mut rx = TestDriver::at(&mem, GuestAddress(RX_RING), QSIZE);
    let mut tx = TestDriver::at(&mem, GuestAddress(TX_RING), QSIZE);
    let rx_notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let tx_notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    device
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![rx.queue(), tx.queue()],
            queue_events: vec![
                rx_notify.try_clone().unwrap(),
                tx_notify.try_clone().unwrap(),
            ],
            interrupt: Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap())),
        })
        .unwrap();
    let expected = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    assert!(eventually(|| backend
        .offloads
        .lock()
        .unwrap()
        .contains(&expected)));

    // Host to guest, before the guest has buffers: it waits, then arrives.
    let mut f = hdr(0, 0).to_vec();
    f.extend_from_slice(&frame(500, 9));
    host.send(&f).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    rx.push_chain(&[writable(BUF, 4096)]);
    rx_notify.write(1).unwrap();
    let mut got = None;
    assert!(eventually(|| {
        got = rx.pop_used();
        got.is_some()
    }));
    assert_eq!(got.map(|(_, len)| len), Some(512));
    assert!(irq.read().is_ok(), "the guest was interrupted");

    // Guest to host.
    let data = frame(80, 4);
    mem.write_slice(&hdr(0, 0), GuestAddress(BUF + 0x8000))
        .unwrap();
    mem.write_slice(&data, GuestAddress(BUF + 0x8100)).unwrap();
    tx.push_chain(&[readable(BUF + 0x8000, 12), readable(BUF + 0x8100, 80)]);
    tx_notify.write(1).unwrap();
    let mut buf = vec![0u8; 4096];
    host.set_nonblocking(false).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let n = host.recv(&mut buf).unwrap();
    assert_eq!(&buf[VNET_HDR_LEN..n], &data[..]);
    let metrics = device.net_metrics();
    assert!(eventually(|| count(&metrics.tx_frames) == 1));
    assert_eq!(count(&metrics.rx_frames), 1);

    assert!(device.reset());
    assert_eq!(
        backend.offloads.lock().unwrap().last(),
        Some(&0),
        "offloads off"
    );
    host.set_nonblocking(true).unwrap();
    host.send(&f).unwrap();
    rx.push_chain(&[writable(BUF, 4096)]);
    rx_notify.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(rx.pop_used(), None, "no worker after the reset");
}

/// A tap of this host, where the test may make one (root with /dev/net/tun).
#[test]
fn a_real_tap_takes_the_modes_and_offloads_the_device_needs() {
    let name = format!("gnt{}", std::process::id() % 100_000);
    let tap = match Tap::open(&name) {
        Ok(tap) => tap,
        Err(e) => {
            eprintln!("skipping: cannot make a tap here: {e}");
            return;
        }
    };
    assert_eq!(tap.name(), name);
    tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
        .unwrap();
    tap.set_offload(0).unwrap();
    // The interface is down: nothing to read, and reading does not block.
    let mut buf = vec![0u8; 2048];
    let err = tap.read_frame(&mut buf).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    // An inherited descriptor of the same tap is taken over and checked.
    // SAFETY: duplicates an open descriptor; the copy is handed to `from_fd`.
    let copy = unsafe { libc::dup(tap.as_raw_fd()) };
    assert!(copy >= 0);
    let inherited = Tap::from_fd(copy).unwrap();
    assert_eq!(inherited.name(), name);
    // Something that is not a tap is refused, naming why.
    let file = std::fs::File::open("/dev/null").unwrap();
    // SAFETY: as above (`from_fd` owns and closes the copy, also when it refuses it).
    let not_tap = unsafe { libc::dup(file.as_raw_fd()) };
    let err = Tap::from_fd(not_tap).unwrap_err().to_string();
    assert!(err.contains("not a tap"), "{err}");
    assert!(Tap::from_fd(100_000).is_err(), "a closed descriptor");
}
