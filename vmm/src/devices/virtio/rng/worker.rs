//! The virtio-rng queue's worker: fills each chain's device-writable buffers with bytes from
//! getrandom(2), at most [`MAX_REQUEST_BYTES`] per chain, after the rate limiter allowed them
//! (a chain it holds back stays in the queue until the limiter's timer fires).

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::log_limit::warn_limited;
use crate::devices::virtio::queue_worker::{serve_chains, Outcome, QueueServer, Served};
use crate::devices::virtio::VirtioMetrics;
use crate::rate_limiter::SharedRateLimiter;

/// The most bytes one request gets, however large its buffers.
pub const MAX_REQUEST_BYTES: u32 = 64 << 10;
const CHUNK: usize = 4096;

pub(crate) struct RngQueue {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub limiter: SharedRateLimiter,
    pub metrics: Arc<VirtioMetrics>,
}

/// Fills `buf` from the host's entropy pool.
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the kernel writes at most `buf.len() - done` bytes from `buf[done..]`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        done += n as usize;
    }
    Ok(())
}

impl RngQueue {
    fn handle(&self, chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> Outcome {
        // The chain iterator stops at the queue size and at 4 GiB in all.
        let mut buffers: Vec<(GuestAddress, u32)> = Vec::new();
        let mut total = 0u32;
        for desc in chain {
            if !desc.is_write_only() {
                VirtioMetrics::add(&self.metrics.errors, 1);
                warn_limited!("virtio-rng: a request has a device-readable buffer");
                return Outcome::Used(0);
            }
            let take = desc.len().min(MAX_REQUEST_BYTES - total);
            if take > 0 {
                buffers.push((desc.addr(), take));
                total += take;
            }
        }
        if let Err(wait) = self.limiter.consume(u64::from(total), 1) {
            VirtioMetrics::add(&self.metrics.throttled, 1);
            return Outcome::Throttled(wait);
        }
        let mut chunk = [0u8; CHUNK];
        let mut written = 0u32;
        for (addr, len) in buffers {
            let mut at = 0u32;
            while at < len {
                let n = (len - at).min(CHUNK as u32) as usize;
                let dest = addr.0.checked_add(u64::from(at)).map(GuestAddress);
                let filled = getrandom(&mut chunk[..n]).map_err(|e| e.to_string());
                let stored = filled.and_then(|()| {
                    dest.ok_or_else(|| "address overflow".to_string())
                        .and_then(|d| {
                            self.mem
                                .write_slice(&chunk[..n], d)
                                .map_err(|e| e.to_string())
                        })
                });
                if let Err(e) = stored {
                    VirtioMetrics::add(&self.metrics.errors, 1);
                    warn_limited!("virtio-rng: cannot fill a buffer: {e}");
                    return Outcome::Used(written);
                }
                at += n as u32;
                written += n as u32;
            }
        }
        VirtioMetrics::add(&self.metrics.requests, 1);
        VirtioMetrics::add(&self.metrics.bytes_read, u64::from(written));
        Outcome::Used(written)
    }
}

impl QueueServer for RngQueue {
    fn serve_queue(&mut self) -> Result<Served, virtio_queue::Error> {
        // The queue is taken out for the pass so that `handle` can borrow the rest of self.
        let mut queue = std::mem::take(&mut self.queue);
        let mem = self.mem.clone();
        let served = serve_chains(&mut queue, &mem, |chain| self.handle(chain));
        self.queue = queue;
        served
    }
}
