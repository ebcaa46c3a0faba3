//! The virtio-blk queue's worker: takes each available chain, parses it, asks the rate limiter
//! (a request it holds back stays in the queue until the limiter's timer fires), runs it
//! against the disk, writes the status byte last and returns the chain. Malformed chains get
//! IOERR when they have a status byte, are counted and logged at a limited rate.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::disk::DiskImage;
use super::request::{
    Completion, DiscardLimits, Request, RequestType, Target, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
};
use crate::devices::log_limit::{debug_limited, warn_limited};
use crate::devices::virtio::queue_worker::{serve_chains, Outcome, QueueServer, Served};
use crate::devices::virtio::VirtioMetrics;
use crate::rate_limiter::SharedRateLimiter;

/// The most descriptors a request may have, through an indirect table too: the queue's size
/// (virtio 1.2 section 2.7.5.3.1: a chain is never longer than the queue).
const MAX_DESCRIPTORS: usize = super::device::QUEUE_SIZE as usize;

/// Requests slower than this on the host are logged (debug level, rate-limited).
const SLOW_REQUEST: std::time::Duration = std::time::Duration::from_millis(1);

pub(crate) struct BlockQueue {
    pub id: String,
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub disk: Arc<DiskImage>,
    pub serial: [u8; VIRTIO_BLK_ID_BYTES],
    pub discard: DiscardLimits,
    pub limiter: SharedRateLimiter,
    pub metrics: Arc<VirtioMetrics>,
}

impl BlockQueue {
    fn handle(&self, chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> Outcome {
        let request = match Request::parse(chain, &self.mem, MAX_DESCRIPTORS) {
            Ok(request) => request,
            Err((why, status)) => {
                VirtioMetrics::add(&self.metrics.errors, 1);
                warn_limited!("virtio-blk {}: malformed request: {why}", self.id);
                let Some(status) = status else {
                    return Outcome::Used(0);
                };
                let written = self.mem.write_obj(VIRTIO_BLK_S_IOERR, status).is_ok();
                return Outcome::Used(u32::from(written));
            }
        };
        let (bytes, ops) = request.cost();
        if let Err(wait) = self.limiter.consume(bytes, ops) {
            VirtioMetrics::add(&self.metrics.throttled, 1);
            return Outcome::Throttled(wait);
        }
        let target = Target {
            disk: &self.disk,
            serial: &self.serial,
            discard: self.discard,
            mem: &self.mem,
        };
        let started = std::time::Instant::now();
        let Completion {
            status,
            used_len,
            error,
        } = request.execute(&target);
        let took = started.elapsed();
        if took > SLOW_REQUEST {
            debug_limited!(
                "virtio-blk {}: {:?} of {} bytes took {took:?}",
                self.id,
                request.kind,
                request.data_len
            );
        }
        if let Some(why) = error {
            VirtioMetrics::add(&self.metrics.errors, 1);
            warn_limited!(
                "virtio-blk {}: {:?} request failed: {why}",
                self.id,
                request.kind
            );
        } else if request.kind == RequestType::In {
            VirtioMetrics::add(&self.metrics.bytes_read, request.data_len);
        } else if request.kind == RequestType::Out {
            VirtioMetrics::add(&self.metrics.bytes_written, request.data_len);
        }
        VirtioMetrics::add(&self.metrics.requests, 1);
        // The status byte last: the driver may look at the data as soon as it sees it.
        if self.mem.write_obj(status, request.status).is_err() {
            VirtioMetrics::add(&self.metrics.errors, 1);
            return Outcome::Used(0);
        }
        Outcome::Used(used_len)
    }
}

impl QueueServer for BlockQueue {
    fn serve_queue(&mut self) -> Result<Served, virtio_queue::Error> {
        // The queue is taken out for the pass so that `handle` can borrow the rest of self.
        let mut queue = std::mem::take(&mut self.queue);
        let mem = self.mem.clone();
        let served = serve_chains(&mut queue, &mem, |chain| self.handle(chain));
        self.queue = queue;
        served
    }
}
