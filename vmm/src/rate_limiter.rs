//! Token-bucket rate limiting of a device's I/O, built from a [`RateLimiterSpec`]: a bucket of
//! bytes and a bucket of operations, each refilled at `size` tokens per `refill_time_ms`, with
//! an optional one-time burst spent first. A request larger than a whole bucket passes once the
//! bucket is full and leaves it in debt, so the long-run rate still holds.
//!
//! [`SharedRateLimiter`] is what a device and its worker thread hold together: the limits
//! behind a mutex and an eventfd the worker waits on, signalled when the limits are replaced
//! at run time (the worker then re-checks the requests it held back). A throttled worker is
//! told how long to wait and sleeps on a timerfd; it never spins. Time is passed in
//! ([`RateLimiter::consume_at`]) so the arithmetic is tested without a wall clock.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_spec::{RateLimiterSpec, TokenBucketSpec};
use vmm_sys_util::eventfd::EventFd;

/// The shortest wait handed to a throttled worker (a zero timerfd would disarm it).
pub const MIN_WAIT: Duration = Duration::from_millis(1);

/// One bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u128,
    /// Tokens available; negative while a request larger than the bucket is paid off.
    budget: i128,
    /// One-time burst tokens left.
    burst: u64,
    /// The time the budget was last brought up to date (fractions of a token are kept by
    /// advancing it only by the time the added whole tokens took).
    last: Instant,
}

impl TokenBucket {
    /// A full bucket (plus its one-time burst) as of `now`.
    pub fn new(spec: &TokenBucketSpec, now: Instant) -> Self {
        Self {
            size: spec.size.max(1),
            refill_ns: u128::from(spec.refill_time_ms.max(1)) * 1_000_000,
            budget: i128::from(spec.size.max(1)),
            burst: spec.one_time_burst.unwrap_or(0),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let size = i128::from(self.size);
        if self.budget >= size {
            self.last = now;
            return;
        }
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        // At most 2^64 ns times 2^50 tokens: fits in u128.
        let added = elapsed.saturating_mul(u128::from(self.size)) / self.refill_ns;
        if added == 0 {
            return;
        }
        let budget = self
            .budget
            .saturating_add(i128::try_from(added).unwrap_or(i128::MAX));
        if budget >= size {
            self.budget = size;
            self.last = now;
        } else {
            self.budget = budget;
            let took = added * self.refill_ns / u128::from(self.size);
            self.last += Duration::from_nanos(u64::try_from(took).unwrap_or(u64::MAX));
        }
    }

    /// Tokens the budget must hold for `tokens` to pass (after the burst is spent).
    fn needed(&self, tokens: u64) -> i128 {
        i128::from(tokens.saturating_sub(self.burst).min(self.size))
    }

    fn ready(&self, tokens: u64) -> bool {
        tokens == 0 || self.needed(tokens) <= self.budget
    }

    fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(tokens - from_burst);
    }

    /// How long from `now` until `tokens` can pass.
    fn wait(&self, tokens: u64, now: Instant) -> Duration {
        let missing = self.needed(tokens) - self.budget;
        if missing <= 0 {
            return Duration::ZERO;
        }
        let missing = u128::try_from(missing).unwrap_or(u128::MAX);
        let size = u128::from(self.size);
        let ns = missing.saturating_mul(self.refill_ns).div_ceil(size);
        let ready_at = self
            .last
            .checked_add(Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)))
            .unwrap_or(now + Duration::from_secs(3600));
        ready_at.saturating_duration_since(now)
    }

    /// Tokens available now (for tests and metrics).
    pub fn budget(&self) -> i128 {
        self.budget
    }
}

/// The limits of one device: bytes and operations.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    pub fn new(spec: &RateLimiterSpec, now: Instant) -> Self {
        Self {
            bandwidth: spec.bandwidth.as_ref().map(|b| TokenBucket::new(b, now)),
            ops: spec.ops.as_ref().map(|b| TokenBucket::new(b, now)),
        }
    }

    /// No limits at all.
    pub fn unlimited() -> Self {
        Self::default()
    }

    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Takes `bytes` and `ops` tokens as of `now`, from both buckets or from neither; when
    /// either bucket is short, returns how long to wait before trying again (at least
    /// [`MIN_WAIT`]).
    pub fn consume_at(&mut self, bytes: u64, ops: u64, now: Instant) -> Result<(), Duration> {
        let mut wait = Duration::ZERO;
        for (bucket, tokens) in [(&mut self.bandwidth, bytes), (&mut self.ops, ops)] {
            if let Some(bucket) = bucket {
                bucket.refill(now);
                if !bucket.ready(tokens) {
                    wait = wait.max(bucket.wait(tokens, now).max(MIN_WAIT));
                }
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        for (bucket, tokens) in [(&mut self.bandwidth, bytes), (&mut self.ops, ops)] {
            if let Some(bucket) = bucket {
                bucket.take(tokens);
            }
        }
        Ok(())
    }

    /// [`Self::consume_at`] now.
    pub fn consume(&mut self, bytes: u64, ops: u64) -> Result<(), Duration> {
        self.consume_at(bytes, ops, Instant::now())
    }
}

/// A device's limits shared between the device (which replaces them at run time) and its
/// worker (which consumes them), with the event that tells the worker they changed.
#[derive(Clone)]
pub struct SharedRateLimiter {
    limiter: Arc<Mutex<RateLimiter>>,
    changed: Arc<EventFd>,
}

impl SharedRateLimiter {
    /// Limits from `spec` (none when absent); the change event is made now, before any
    /// thread runs under seccomp.
    pub fn new(spec: Option<&RateLimiterSpec>) -> std::io::Result<Self> {
        let limiter = spec
            .map(|s| RateLimiter::new(s, Instant::now()))
            .unwrap_or_default();
        Ok(Self {
            limiter: Arc::new(Mutex::new(limiter)),
            changed: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// Replaces the limits (full buckets from now) and wakes the worker.
    pub fn update(&self, spec: &RateLimiterSpec) -> Result<(), String> {
        spec.validate().map_err(|e| e.to_string())?;
        let mut limiter = self
            .limiter
            .lock()
            .map_err(|_| "the rate limiter's lock is poisoned".to_string())?;
        *limiter = RateLimiter::new(spec, Instant::now());
        drop(limiter);
        self.changed
            .write(1)
            .map_err(|e| format!("cannot wake the device's worker: {e}"))
    }

    /// See [`RateLimiter::consume`]. A poisoned lock lets everything through (the limits are
    /// a quota, not a safety property; a panic already ends the process).
    pub fn consume(&self, bytes: u64, ops: u64) -> Result<(), Duration> {
        match self.limiter.lock() {
            Ok(mut limiter) => limiter.consume(bytes, ops),
            Err(_) => Ok(()),
        }
    }

    /// Signalled when the limits are replaced; the worker reads it to clear it.
    pub fn changed(&self) -> &EventFd {
        &self.changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, refill_time_ms: u64, burst: Option<u64>) -> TokenBucketSpec {
        TokenBucketSpec {
            size,
            refill_time_ms,
            one_time_burst: burst,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_bucket_refills_at_its_rate() {
        let t0 = Instant::now();
        // 1000 bytes per second.
        let spec = RateLimiterSpec {
            bandwidth: Some(bucket(1000, 1000, None)),
            ops: None,
        };
        let mut rl = RateLimiter::new(&spec, t0);
        assert_eq!(rl.consume_at(600, 0, t0), Ok(()));
        assert_eq!(rl.consume_at(400, 0, t0), Ok(()));
        // Empty: 100 bytes take 100 ms.
        assert_eq!(rl.consume_at(100, 0, t0), Err(ms(100)));
        assert_eq!(rl.consume_at(100, 0, t0 + ms(40)), Err(ms(60)));
        assert_eq!(rl.consume_at(100, 0, t0 + ms(100)), Ok(()));
        // Never more than the bucket's size, however long it waited.
        assert_eq!(rl.consume_at(1000, 0, t0 + ms(100_000)), Ok(()));
        assert_eq!(rl.consume_at(1, 0, t0 + ms(100_000)), Err(MIN_WAIT));
    }

    #[test]
    fn fractions_of_a_token_are_not_lost() {
        let t0 = Instant::now();
        // 3 ops per 10 ms: one op every 3.33 ms.
        let spec = RateLimiterSpec {
            bandwidth: None,
            ops: Some(bucket(3, 10, None)),
        };
        let mut rl = RateLimiter::new(&spec, t0);
        for _ in 0..3 {
            assert_eq!(rl.consume_at(0, 1, t0), Ok(()));
        }
        // 300 ops over one second of 1 ms steps: exactly the rate, not fewer.
        let mut passed = 0;
        for step in 1..=1000 {
            if rl.consume_at(0, 1, t0 + ms(step)).is_ok() {
                passed += 1;
            }
        }
        assert_eq!(passed, 300);
    }

    #[test]
    fn the_burst_is_spent_first_and_only_once() {
        let t0 = Instant::now();
        let spec = RateLimiterSpec {
            bandwidth: Some(bucket(100, 1000, Some(500))),
            ops: None,
        };
        let mut rl = RateLimiter::new(&spec, t0);
        assert_eq!(
            rl.consume_at(550, 0, t0),
            Ok(()),
            "burst plus 50 of the bucket"
        );
        assert_eq!(rl.consume_at(50, 0, t0), Ok(()));
        assert!(rl.consume_at(1, 0, t0).is_err());
        assert_eq!(rl.consume_at(100, 0, t0 + ms(1000)), Ok(()));
        assert!(
            rl.consume_at(100, 0, t0 + ms(1000)).is_err(),
            "no second burst"
        );
    }

    #[test]
    fn a_request_larger_than_the_bucket_passes_when_full_and_leaves_debt() {
        let t0 = Instant::now();
        let spec = RateLimiterSpec {
            bandwidth: Some(bucket(1000, 1000, None)),
            ops: None,
        };
        let mut rl = RateLimiter::new(&spec, t0);
        assert_eq!(rl.consume_at(3000, 0, t0), Ok(()));
        // 2000 bytes of debt plus 1 byte: 2.001 s.
        assert_eq!(rl.consume_at(1, 0, t0), Err(ms(2001)));
        // Another oversized request waits for a full bucket: 3 s after the first.
        assert_eq!(rl.consume_at(5000, 0, t0 + ms(1000)), Err(ms(2000)));
        assert_eq!(rl.consume_at(5000, 0, t0 + ms(3000)), Ok(()));
    }

    #[test]
    fn both_buckets_or_neither() {
        let t0 = Instant::now();
        let spec = RateLimiterSpec {
            bandwidth: Some(bucket(1000, 1000, None)),
            ops: Some(bucket(2, 1000, None)),
        };
        let mut rl = RateLimiter::new(&spec, t0);
        assert_eq!(rl.consume_at(10, 1, t0), Ok(()));
        assert_eq!(rl.consume_at(10, 1, t0), Ok(()));
        // Out of ops: the bytes must not be taken either.
        assert_eq!(rl.consume_at(900, 1, t0), Err(ms(500)));
        assert_eq!(rl.consume_at(980, 1, t0 + ms(500)), Ok(()));
        // Bytes short (waits longest of the two).
        assert_eq!(rl.consume_at(500, 1, t0 + ms(600)), Err(ms(400)));
    }

    #[test]
    fn no_limits_let_everything_through() {
        let mut rl = RateLimiter::unlimited();
        assert!(rl.is_unlimited());
        assert_eq!(rl.consume(u64::MAX, u64::MAX), Ok(()));
    }

    #[test]
    fn an_update_replaces_the_limits_and_wakes_the_worker() {
        let spec = RateLimiterSpec {
            bandwidth: Some(bucket(10, 3_600_000, None)),
            ops: None,
        };
        let shared = SharedRateLimiter::new(Some(&spec)).unwrap();
        assert_eq!(shared.consume(10, 1), Ok(()));
        // An hour per 10 bytes: the wait is long (and not a busy loop).
        assert!(shared.consume(10, 1).unwrap_err() > Duration::from_secs(3000));
        let faster = RateLimiterSpec {
            bandwidth: Some(bucket(1 << 20, 100, None)),
            ops: None,
        };
        let worker_side = shared.clone();
        shared.update(&faster).unwrap();
        assert_eq!(worker_side.changed().read().unwrap(), 1);
        assert_eq!(worker_side.consume(10, 1), Ok(()));
        let invalid = RateLimiterSpec {
            bandwidth: Some(bucket(0, 100, None)),
            ops: None,
        };
        assert!(shared.update(&invalid).unwrap_err().contains("size"));
        shared.update(&RateLimiterSpec::default()).unwrap();
        assert_eq!(worker_side.consume(u64::MAX, 1), Ok(()));
    }
}
