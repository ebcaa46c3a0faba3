//! The virtio-net worker: one thread per interface, one epoll loop over the two queues'
//! notifications, the tap, the stop event, and each direction's rate-limiter timer and
//! change event.
//!
//! - TX (guest to host): every available chain is gathered (device-readable buffers only,
//!   at most the header plus the negotiated largest frame), checked (header length, offload
//!   bits the guest may use) and written to the tap as one frame. Malformed and oversize
//!   chains are returned unsent and counted.
//! - RX (host to guest): frames are read from the tap one at a time and placed in the
//!   guest's receive chains, across several chains with mergeable buffers (`num_buffers` in
//!   the header). When the guest has no buffers, the frame read waits in the device and the
//!   tap is no longer polled until the guest adds buffers (the tap's own queue holds, then
//!   drops, what comes meanwhile): the worker never spins.
//! - A throttled direction keeps its frame (RX) or chain (TX) and sleeps on its timer.
//!
//! Guest memory is only touched through `GuestMemory`; a chain pointing outside it is
//! malformed. Nothing here panics on guest data.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::device::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MRG_RXBUF, VNET_HDR_LEN,
};
use super::tap::Backend;
use crate::devices::log_limit::{error_limited, warn_limited};
use crate::devices::virtio::metrics::ExtraMetrics;
use crate::devices::virtio::{VirtioInterrupt, VirtioMetrics};
use crate::rate_limiter::SharedRateLimiter;

/// Largest frame (Ethernet header included, header excluded) with segmentation offloads:
/// a 64 KiB IP packet plus the Ethernet header (and a VLAN tag).
pub const MAX_GSO_FRAME: usize = 65550;
/// Largest frame without them: a 1500-byte MTU plus the Ethernet header.
pub const MAX_MTU_FRAME: usize = 1514;
/// Shortest frame the device sends: an Ethernet header.
const MIN_FRAME: usize = 14;
/// The receive buffer: the largest frame the tap can hand over, with its header.
pub const RX_BUF_LEN: usize = VNET_HDR_LEN + MAX_GSO_FRAME;

// virtio_net_hdr (virtio 1.2 section 5.1.6): flags, gso_type.
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;

/// A network interface's counters, shown as `vmm_net_<name>_total`.
#[derive(Debug, Default)]
pub struct NetMetrics {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Chains (TX or RX) the guest made wrong: device-writable where readable was needed or
    /// the other way round, shorter than the header, outside guest memory, offloads it did
    /// not negotiate. Their frames are dropped.
    pub dropped_malformed: AtomicU64,
    /// Frames larger than negotiated (TX), or than every receive buffer the guest offers (RX).
    pub dropped_oversize: AtomicU64,
    /// Times the guest had no receive buffer for a frame: the device stopped reading the tap
    /// until it added some (the frames the tap's queue cannot hold meanwhile are dropped by
    /// the host kernel, in the tap's `tx_dropped`).
    pub rx_no_buffers: AtomicU64,
    /// Frames the tap refused (a write error).
    pub tx_errors: AtomicU64,
    /// Times a rate limiter held a direction back.
    pub rx_rate_limited: AtomicU64,
    pub tx_rate_limited: AtomicU64,
}

impl NetMetrics {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl ExtraMetrics for NetMetrics {
    fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "rx_frames",
                "frames passed to the guest",
                get(&self.rx_frames),
            ),
            ("rx_bytes", "bytes passed to the guest", get(&self.rx_bytes)),
            (
                "tx_frames",
                "frames sent by the guest",
                get(&self.tx_frames),
            ),
            ("tx_bytes", "bytes sent by the guest", get(&self.tx_bytes)),
            (
                "dropped_malformed",
                "frames dropped for malformed chains",
                get(&self.dropped_malformed),
            ),
            (
                "dropped_oversize",
                "frames dropped as too large",
                get(&self.dropped_oversize),
            ),
            (
                "rx_no_buffers",
                "times the guest had no receive buffers",
                get(&self.rx_no_buffers),
            ),
            ("tx_errors", "frames the tap refused", get(&self.tx_errors)),
            (
                "rx_rate_limited",
                "times the rx rate limiter held frames back",
                get(&self.rx_rate_limited),
            ),
            (
                "tx_rate_limited",
                "times the tx rate limiter held frames back",
                get(&self.tx_rate_limited),
            ),
        ]
    }
}

/// What one pass over a queue did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// The driver must be interrupted.
    pub notify: bool,
    /// The rate limiter held the direction back for this long.
    pub throttled_for: Option<Duration>,
}

/// A frame read from the tap and not yet in the guest.
#[derive(Clone, Copy, Debug)]
struct Pending {
    len: usize,
    /// The rate limiter already let it through.
    paid: bool,
}

/// What became of a frame offered to the receive queue.
enum Delivery {
    Delivered,
    NoBuffers,
    Dropped,
}

/// Why a TX chain is not sent.
enum TxReject {
    Malformed(&'static str),
    Oversize,
}

/// The queues of one activation and what serving them needs.
pub(crate) struct NetQueues {
    pub id: String,
    pub mem: GuestMemoryMmap,
    pub rx: Queue,
    pub tx: Queue,
    pub backend: Arc<dyn Backend>,
    /// The features the driver acknowledged.
    pub features: u64,
    pub rx_limiter: SharedRateLimiter,
    pub tx_limiter: SharedRateLimiter,
    pub metrics: Arc<NetMetrics>,
    pub common: Arc<VirtioMetrics>,
    frame: Vec<u8>,
    pending: Option<Pending>,
    tx_buf: Vec<u8>,
    /// The guest had no receive buffer for the pending frame.
    pub rx_stalled: bool,
}

impl NetQueues {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
        backend: Arc<dyn Backend>,
        features: u64,
        limiters: (SharedRateLimiter, SharedRateLimiter),
        metrics: (Arc<NetMetrics>, Arc<VirtioMetrics>),
    ) -> Self {
        Self {
            id,
            mem,
            rx,
            tx,
            backend,
            features,
            rx_limiter: limiters.0,
            tx_limiter: limiters.1,
            metrics: metrics.0,
            common: metrics.1,
            frame: vec![0u8; RX_BUF_LEN],
            pending: None,
            tx_buf: Vec::with_capacity(RX_BUF_LEN),
            rx_stalled: false,
        }
    }

    fn acked(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    /// The tap offloads (TUN_F_*) matching what the guest accepts on receive.
    pub fn tap_offloads(&self) -> u32 {
        let mut flags = 0;
        if self.acked(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= libc::TUN_F_CSUM;
            // Segmentation offloads need checksum offload (the tap refuses them alone).
            if self.acked(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= libc::TUN_F_TSO4;
            }
            if self.acked(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= libc::TUN_F_TSO6;
            }
            if self.acked(VIRTIO_NET_F_GUEST_UFO) {
                flags |= libc::TUN_F_UFO;
            }
        }
        flags
    }

    /// The largest frame the guest may send.
    fn max_tx_frame(&self) -> usize {
        if self.acked(VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_HOST_UFO) {
            MAX_GSO_FRAME
        } else {
            MAX_MTU_FRAME
        }
    }

    fn drop_malformed(&self, queue: &str, why: &str) {
        NetMetrics::add(&self.metrics.dropped_malformed, 1);
        VirtioMetrics::add(&self.common.errors, 1);
        VirtioMetrics::add(&self.common.dropped, 1);
        warn_limited!("virtio-net {}: malformed {queue} chain: {why}", self.id);
    }

    fn drop_oversize(&self, queue: &str, len: usize) {
        NetMetrics::add(&self.metrics.dropped_oversize, 1);
        VirtioMetrics::add(&self.common.dropped, 1);
        warn_limited!(
            "virtio-net {}: {queue} frame of {len} bytes is too large, dropped",
            self.id
        );
    }

    /// Sends every available TX chain, until the queue is empty or the limiter says wait.
    pub fn process_tx(&mut self) -> Result<Pass, virtio_queue::Error> {
        let mut pass = Pass::default();
        let mut used_any = false;
        let max_len = VNET_HDR_LEN + self.max_tx_frame();
        'queue: loop {
            self.tx.disable_notification(&self.mem)?;
            while let Some(chain) = self.tx.iter(&self.mem)?.next() {
                let head = chain.head_index();
                match gather(chain, &self.mem, &mut self.tx_buf, max_len) {
                    Err(TxReject::Malformed(why)) => self.drop_malformed("tx", why),
                    Err(TxReject::Oversize) => self.drop_oversize("tx", self.tx_buf.len()),
                    Ok(()) => {
                        let data = self.tx_buf.len() - VNET_HDR_LEN;
                        if let Err(wait) = self.tx_limiter.consume(data as u64, 1) {
                            self.tx.go_to_previous_position();
                            NetMetrics::add(&self.metrics.tx_rate_limited, 1);
                            VirtioMetrics::add(&self.common.throttled, 1);
                            pass.throttled_for = Some(wait);
                            break 'queue;
                        }
                        if let Err(why) = self.check_tx_header() {
                            self.drop_malformed("tx", why);
                        } else {
                            self.send(data);
                        }
                    }
                }
                self.tx.add_used(&self.mem, head, 0)?;
                used_any = true;
            }
            if !self.tx.enable_notification(&self.mem)? {
                break;
            }
        }
        pass.notify = used_any && self.tx.needs_notification(&self.mem)?;
        Ok(pass)
    }

    /// The offloads a TX header asks for must be ones the guest negotiated.
    fn check_tx_header(&self) -> Result<(), &'static str> {
        let (flags, gso) = (self.tx_buf[0], self.tx_buf[1]);
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !self.acked(VIRTIO_NET_F_CSUM) {
            return Err("checksum offload without VIRTIO_NET_F_CSUM");
        }
        let needed = match gso {
            VIRTIO_NET_HDR_GSO_NONE => return Ok(()),
            VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_HDR_GSO_UDP => VIRTIO_NET_F_HOST_UFO,
            _ => return Err("unknown segmentation offload type"),
        };
        if !self.acked(needed) {
            return Err("a segmentation offload the guest did not negotiate");
        }
        Ok(())
    }

    fn send(&self, data: usize) {
        match self.backend.write_frame(&self.tx_buf) {
            Ok(_) => {
                NetMetrics::add(&self.metrics.tx_frames, 1);
                NetMetrics::add(&self.metrics.tx_bytes, data as u64);
                VirtioMetrics::add(&self.common.requests, 1);
                VirtioMetrics::add(&self.common.bytes_written, data as u64);
            }
            Err(e) => {
                NetMetrics::add(&self.metrics.tx_errors, 1);
                VirtioMetrics::add(&self.common.errors, 1);
                VirtioMetrics::add(&self.common.dropped, 1);
                warn_limited!("virtio-net {}: the tap refused a frame: {e}", self.id);
            }
        }
    }

    /// Moves frames from the tap into the guest until the tap is empty, the guest has no
    /// buffer (`rx_stalled`) or the limiter says wait.
    pub fn process_rx(&mut self) -> Result<Pass, virtio_queue::Error> {
        let mut pass = Pass::default();
        let mut used_any = false;
        loop {
            let pending = match self.pending {
                Some(p) => p,
                None => match self.backend.read_frame(&mut self.frame) {
                    Ok(0) => break,
                    Ok(len) if len < VNET_HDR_LEN + MIN_FRAME => {
                        warn_limited!("virtio-net {}: a {len}-byte frame from the tap", self.id);
                        continue;
                    }
                    Ok(len) => Pending { len, paid: false },
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        warn_limited!("virtio-net {}: cannot read the tap: {e}", self.id);
                        break;
                    }
                },
            };
            self.pending = Some(pending);
            if !pending.paid {
                let data = (pending.len - VNET_HDR_LEN) as u64;
                if let Err(wait) = self.rx_limiter.consume(data, 1) {
                    NetMetrics::add(&self.metrics.rx_rate_limited, 1);
                    VirtioMetrics::add(&self.common.throttled, 1);
                    pass.throttled_for = Some(wait);
                    break;
                }
                self.pending = Some(Pending {
                    paid: true,
                    ..pending
                });
            }
            match self.deliver(pending.len)? {
                Delivery::Delivered => {
                    self.pending = None;
                    self.rx_stalled = false;
                    used_any = true;
                }
                Delivery::Dropped => {
                    self.pending = None;
                    used_any = true;
                }
                Delivery::NoBuffers => {
                    // Ask for a notification when buffers come; some may have come already.
                    if self.ask_for_more_buffers()? {
                        continue;
                    }
                    if !self.rx_stalled {
                        NetMetrics::add(&self.metrics.rx_no_buffers, 1);
                    }
                    self.rx_stalled = true;
                    break;
                }
            }
        }
        pass.notify = used_any && self.rx.needs_notification(&self.mem)?;
        Ok(pass)
    }

    /// Asks the driver to notify the queue when it adds receive buffers beyond those
    /// available now (which are too few for the pending frame: waiting on them would spin);
    /// true when some were added meanwhile.
    fn ask_for_more_buffers(&mut self) -> Result<bool, virtio_queue::Error> {
        let next = self.rx.next_avail();
        let available = self
            .rx
            .avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)?;
        // Notifications (and with event indices, the index they come at) are relative to the
        // device's position: move it past what is there for the call, then back.
        self.rx.set_next_avail(available.0);
        let more = self.rx.enable_notification(&self.mem);
        self.rx.set_next_avail(next);
        more
    }

    /// Places the pending frame (`len` bytes, header first) in the guest's receive chains.
    fn deliver(&mut self, len: usize) -> Result<Delivery, virtio_queue::Error> {
        let mergeable = self.acked(VIRTIO_NET_F_MRG_RXBUF);
        let start = self.rx.next_avail();
        let most_chains = usize::from(self.rx.size());
        let mut chains: Vec<(u16, Buffers)> = Vec::new();
        let mut room = 0usize;
        let mut malformed = None;
        {
            let mut available = self.rx.iter(&self.mem)?;
            while room < len && chains.len() < most_chains && (mergeable || chains.is_empty()) {
                let Some(chain) = available.next() else {
                    break;
                };
                let head = chain.head_index();
                match writable_buffers(chain) {
                    Ok((buffers, size)) => {
                        chains.push((head, buffers));
                        room = room.saturating_add(size);
                    }
                    Err(why) => {
                        chains.push((head, Vec::new()));
                        malformed = Some(why);
                        break;
                    }
                }
            }
        }
        if let Some(why) = malformed {
            // The chains taken go back empty; the frame is lost with them.
            for (head, _) in &chains {
                self.rx.add_used(&self.mem, *head, 0)?;
            }
            self.drop_malformed("rx", why);
            return Ok(Delivery::Dropped);
        }
        if room < len {
            self.rx.set_next_avail(start);
            if chains.is_empty() {
                return Ok(Delivery::NoBuffers);
            }
            if mergeable && chains.len() < most_chains {
                // More buffers are to come.
                return Ok(Delivery::NoBuffers);
            }
            // Even all the buffers the guest can offer would not hold it.
            self.drop_oversize("rx", len);
            return Ok(Delivery::Dropped);
        }
        // num_buffers (the header's last field): how many chains the frame spans.
        let count = u16::try_from(chains.len()).unwrap_or(u16::MAX);
        self.frame[VNET_HDR_LEN - 2..VNET_HDR_LEN].copy_from_slice(&count.to_le_bytes());
        let mut at = 0usize;
        let mut used = Vec::with_capacity(chains.len());
        let mut failed = false;
        for (head, buffers) in &chains {
            let mut written = 0u32;
            for (addr, size) in buffers {
                if at >= len {
                    break;
                }
                let take = (*size as usize).min(len - at);
                if self
                    .mem
                    .write_slice(&self.frame[at..at + take], *addr)
                    .is_err()
                {
                    failed = true;
                    break;
                }
                at += take;
                written += take as u32;
            }
            if failed {
                break;
            }
            used.push((*head, written));
        }
        if failed {
            for (head, _) in &chains {
                self.rx.add_used(&self.mem, *head, 0)?;
            }
            self.drop_malformed("rx", "a buffer outside guest memory");
            return Ok(Delivery::Dropped);
        }
        for (head, written) in used {
            self.rx.add_used(&self.mem, head, written)?;
        }
        let data = (len - VNET_HDR_LEN) as u64;
        NetMetrics::add(&self.metrics.rx_frames, 1);
        NetMetrics::add(&self.metrics.rx_bytes, data);
        VirtioMetrics::add(&self.common.requests, 1);
        VirtioMetrics::add(&self.common.bytes_read, data);
        Ok(Delivery::Delivered)
    }
}

/// The chain iterator stops after as many descriptors as the queue holds, or at a next index
/// outside the table, with the last descriptor still saying "next": the chain loops, is
/// longer than the queue, or points nowhere.
const CUT_CHAIN: &str = "a chain that loops, is longer than the queue or points past its table";

/// A chain's buffers: guest address and length.
type Buffers = Vec<(GuestAddress, u32)>;

/// A receive chain's buffers and their total size: device-writable only, at least a header.
fn writable_buffers(
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<(Buffers, usize), &'static str> {
    let mut buffers = Vec::new();
    let mut size = 0usize;
    let mut cut = false;
    for desc in chain {
        if !desc.is_write_only() {
            return Err("a device-readable buffer in a receive chain");
        }
        cut = desc.has_next();
        buffers.push((desc.addr(), desc.len()));
        size = size.saturating_add(desc.len() as usize);
    }
    if cut {
        return Err(CUT_CHAIN);
    }
    if size < VNET_HDR_LEN {
        return Err("a receive chain shorter than the header");
    }
    Ok((buffers, size))
}

/// Copies a TX chain into `buf`: device-readable buffers only, at most `max_len` bytes, at
/// least a header and an Ethernet header.
fn gather(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    buf: &mut Vec<u8>,
    max_len: usize,
) -> Result<(), TxReject> {
    buf.clear();
    let mut cut = false;
    for desc in chain {
        cut = desc.has_next();
        if desc.is_write_only() {
            return Err(TxReject::Malformed(
                "a device-writable buffer in a TX chain",
            ));
        }
        let at = buf.len();
        let len = desc.len() as usize;
        if at.saturating_add(len) > max_len {
            buf.resize(at.saturating_add(len).min(max_len + 1), 0);
            return Err(TxReject::Oversize);
        }
        buf.resize(at + len, 0);
        if mem.read_slice(&mut buf[at..], desc.addr()).is_err() {
            return Err(TxReject::Malformed("a buffer outside guest memory"));
        }
    }
    if cut {
        return Err(TxReject::Malformed(CUT_CHAIN));
    }
    if buf.len() < VNET_HDR_LEN + MIN_FRAME {
        return Err(TxReject::Malformed(
            "shorter than a header and an Ethernet header",
        ));
    }
    Ok(())
}

/// What the worker waits on during one activation (all made before the worker was
/// confined; the epoll set is filled here and emptied at the end).
pub(crate) struct Session {
    pub epoll: Arc<Epoll>,
    pub rx_queue: EventFd,
    pub tx_queue: EventFd,
    pub stop: EventFd,
    pub rx_timer: Arc<Mutex<TimerFd>>,
    pub tx_timer: Arc<Mutex<TimerFd>>,
    pub interrupt: Arc<VirtioInterrupt>,
}

const TOKEN_RX_QUEUE: u64 = 0;
const TOKEN_TX_QUEUE: u64 = 1;
const TOKEN_TAP: u64 = 2;
const TOKEN_STOP: u64 = 3;
const TOKEN_RX_TIMER: u64 = 4;
const TOKEN_TX_TIMER: u64 = 5;
const TOKEN_RX_LIMITS: u64 = 6;
const TOKEN_TX_LIMITS: u64 = 7;

fn arm(timer: &Mutex<TimerFd>, wait: Duration) -> Result<(), String> {
    timer
        .lock()
        .map_err(|_| "the timer's lock is poisoned".to_string())
        .and_then(|mut t| t.reset(wait, None).map_err(|e| e.to_string()))
}

fn clear_timer(timer: &Mutex<TimerFd>) {
    if let Ok(mut t) = timer.lock() {
        // Non-blocking in effect: only read after epoll reported it readable.
        let _ = t.wait();
    }
}

/// Serves the queues until the stop event, or an error that breaks the device.
pub(crate) fn run(mut queues: NetQueues, session: Session) {
    let name = format!("virtio-net {}", queues.id);
    let fds = {
        let timer_fd = |t: &Arc<Mutex<TimerFd>>| t.lock().map(|t| t.as_raw_fd()).unwrap_or(-1);
        [
            (TOKEN_RX_QUEUE, session.rx_queue.as_raw_fd()),
            (TOKEN_TX_QUEUE, session.tx_queue.as_raw_fd()),
            (TOKEN_TAP, queues.backend.as_raw_fd()),
            (TOKEN_STOP, session.stop.as_raw_fd()),
            (TOKEN_RX_TIMER, timer_fd(&session.rx_timer)),
            (TOKEN_TX_TIMER, timer_fd(&session.tx_timer)),
            (TOKEN_RX_LIMITS, queues.rx_limiter.changed().as_raw_fd()),
            (TOKEN_TX_LIMITS, queues.tx_limiter.changed().as_raw_fd()),
        ]
    };
    let epoll = &session.epoll;
    for (token, fd) in fds {
        if let Err(e) = epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        ) {
            error_limited!("{name}: cannot wait on its events, the device stops: {e}");
            remove_all(epoll, &fds);
            return;
        }
    }
    let offloads = queues.tap_offloads();
    if let Err(e) = queues.backend.set_offload(offloads) {
        warn_limited!("{name}: cannot set the tap's offloads {offloads:#x}: {e}");
    }
    serve(&name, &mut queues, &session);
    remove_all(epoll, &fds);
    // What the next driver did not negotiate must not reach it.
    let _ = queues.backend.set_offload(0);
}

fn remove_all(epoll: &Epoll, fds: &[(u64, i32)]) {
    for (_, fd) in fds {
        let _ = epoll.ctl(ControlOperation::Delete, *fd, EpollEvent::default());
    }
}

fn serve(name: &str, queues: &mut NetQueues, session: &Session) {
    let mut rx_throttled = false;
    let mut tx_throttled = false;
    let mut tap_polled = true;
    // Chains and frames may be waiting since before the activation.
    let (mut run_rx, mut run_tx) = (true, true);
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        if run_tx && !tx_throttled {
            match queues.process_tx() {
                Ok(pass) => {
                    if pass.notify {
                        session.interrupt.signal_used_queue();
                    }
                    if let Some(wait) = pass.throttled_for {
                        if let Err(e) = arm(&session.tx_timer, wait) {
                            error_limited!("{name}: cannot arm the tx timer, stopping: {e}");
                            return;
                        }
                        tx_throttled = true;
                    }
                }
                Err(e) => {
                    error_limited!("{name}: tx queue error, the device stops: {e:?}");
                    return;
                }
            }
        }
        if run_rx && !rx_throttled {
            match queues.process_rx() {
                Ok(pass) => {
                    if pass.notify {
                        session.interrupt.signal_used_queue();
                    }
                    if let Some(wait) = pass.throttled_for {
                        if let Err(e) = arm(&session.rx_timer, wait) {
                            error_limited!("{name}: cannot arm the rx timer, stopping: {e}");
                            return;
                        }
                        rx_throttled = true;
                    }
                }
                Err(e) => {
                    error_limited!("{name}: rx queue error, the device stops: {e:?}");
                    return;
                }
            }
        }
        // The tap is read only when its frames have somewhere to go.
        let poll_tap = !rx_throttled && !queues.rx_stalled;
        if poll_tap != tap_polled {
            let set = if poll_tap {
                EventSet::IN
            } else {
                EventSet::empty()
            };
            if let Err(e) = session.epoll.ctl(
                ControlOperation::Modify,
                queues.backend.as_raw_fd(),
                EpollEvent::new(set, TOKEN_TAP),
            ) {
                error_limited!("{name}: cannot change the tap's polling, stopping: {e}");
                return;
            }
            tap_polled = poll_tap;
        }
        let n = match session.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error_limited!("{name}: epoll failed, the device stops: {e}");
                return;
            }
        };
        run_rx = false;
        run_tx = false;
        for event in &events[..n] {
            match event.data() {
                TOKEN_STOP => return,
                TOKEN_RX_QUEUE => {
                    let _ = session.rx_queue.read();
                    queues.rx_stalled = false;
                    run_rx = true;
                }
                TOKEN_TX_QUEUE => {
                    let _ = session.tx_queue.read();
                    run_tx = true;
                }
                TOKEN_TAP => run_rx = true,
                TOKEN_RX_TIMER => {
                    clear_timer(&session.rx_timer);
                    rx_throttled = false;
                    run_rx = true;
                }
                TOKEN_TX_TIMER => {
                    clear_timer(&session.tx_timer);
                    tx_throttled = false;
                    run_tx = true;
                }
                TOKEN_RX_LIMITS => {
                    let _ = queues.rx_limiter.changed().read();
                    rx_throttled = false;
                    run_rx = true;
                }
                TOKEN_TX_LIMITS => {
                    let _ = queues.tx_limiter.changed().read();
                    tx_throttled = false;
                    run_tx = true;
                }
                _ => {}
            }
        }
    }
}
