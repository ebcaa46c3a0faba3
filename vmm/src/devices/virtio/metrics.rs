//! Counters every virtio device keeps, read by the control API's `/metrics` (Prometheus text).
//! Devices only add to them; they know nothing of who reads them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Per-device counters; all monotonic.
#[derive(Debug, Default)]
pub struct VirtioMetrics {
    /// Requests (descriptor chains) completed.
    pub requests: AtomicU64,
    /// Bytes the device read from its backend for the guest (guest-bound data).
    pub bytes_read: AtomicU64,
    /// Bytes the device wrote to its backend from the guest.
    pub bytes_written: AtomicU64,
    /// Requests that failed: malformed chains, backend errors.
    pub errors: AtomicU64,
    /// Requests or frames dropped (for instance a queue the guest stopped consuming).
    pub dropped: AtomicU64,
    /// Times a rate limiter held a request back.
    pub throttled: AtomicU64,
}

impl VirtioMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// `(name, help, value)` for every counter, in a fixed order.
    pub fn snapshot(&self) -> [(&'static str, &'static str, u64); 6] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("requests", "requests completed", get(&self.requests)),
            (
                "read_bytes",
                "bytes read for the guest",
                get(&self.bytes_read),
            ),
            (
                "written_bytes",
                "bytes written from the guest",
                get(&self.bytes_written),
            ),
            ("errors", "requests that failed", get(&self.errors)),
            ("dropped", "requests or frames dropped", get(&self.dropped)),
            (
                "throttled",
                "times a rate limiter held a request back",
                get(&self.throttled),
            ),
        ]
    }
}

/// A device's own counters (a network interface's frames and drops), shown by `/metrics`
/// as `vmm_<kind>_<name>_total`.
pub trait ExtraMetrics: Send + Sync {
    /// `(name, help, value)` for every counter, in a fixed order.
    fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)>;
}
