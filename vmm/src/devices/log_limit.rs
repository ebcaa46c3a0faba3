//! Rate limiting of guest-triggered log lines. A hostile guest can cause one log line per
//! request (a bad MMIO access, a malformed descriptor chain, a failed FUSE request); each call
//! site of such a line gets its own [`LogLimiter`] (the [`warn_limited!`], [`error_limited!`]
//! and [`debug_limited!`] macros make one per call site), which lets at most a burst of lines
//! through per interval and then reports how many it suppressed with the next line it lets
//! through. The events themselves are counted by the devices' own counters, not here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a call site may log per interval.
pub const DEFAULT_BURST: u32 = 10;
/// The interval the burst is counted over.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// Allows at most `burst` log lines per `interval`.
pub struct LogLimiter {
    burst: u32,
    interval: Duration,
    window: Mutex<Window>,
    logged: AtomicU64,
    suppressed: AtomicU64,
}

struct Window {
    start: Option<Instant>,
    logged: u32,
    /// Suppressed since the last line let through.
    suppressed: u64,
}

impl LogLimiter {
    pub const fn new(burst: u32, interval: Duration) -> Self {
        Self {
            burst,
            interval,
            window: Mutex::new(Window {
                start: None,
                logged: 0,
                suppressed: 0,
            }),
            logged: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether the caller may log now: `Some(k)` when it may, `k` being how many lines were
    /// suppressed since the last one let through (the caller says so first when `k > 0`).
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    /// [`check`](Self::check) at a given time.
    pub fn check_at(&self, now: Instant) -> Option<u64> {
        let mut w = crate::devices::bus::lock(&self.window);
        let expired = match w.start {
            Some(start) => now.saturating_duration_since(start) >= self.interval,
            None => true,
        };
        if expired {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged >= self.burst {
            w.suppressed = w.suppressed.saturating_add(1);
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        w.logged += 1;
        self.logged.fetch_add(1, Ordering::Relaxed);
        Some(std::mem::take(&mut w.suppressed))
    }

    /// Lines let through so far.
    pub fn logged(&self) -> u64 {
        self.logged.load(Ordering::Relaxed)
    }

    /// Lines suppressed so far.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

/// Logs at `$level` (a `tracing::Level` constant) through a per-call-site [`LogLimiter`] with
/// the default burst and interval; evaluates to whether the line was let through.
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::devices::log_limit::LogLimiter =
            $crate::devices::log_limit::LogLimiter::new(
                $crate::devices::log_limit::DEFAULT_BURST,
                $crate::devices::log_limit::DEFAULT_INTERVAL,
            );
        match LIMITER.check() {
            Some(suppressed) => {
                if suppressed > 0 {
                    tracing::event!($level, "({suppressed} similar messages suppressed)");
                }
                tracing::event!($level, $($arg)+);
                true
            }
            None => false,
        }
    }};
}

/// `tracing::error!` through a per-call-site [`LogLimiter`]; see [`log_limited!`].
macro_rules! error_limited {
    ($($arg:tt)+) => {
        $crate::devices::log_limit::log_limited!(tracing::Level::ERROR, $($arg)+)
    };
}

/// `tracing::warn!` through a per-call-site [`LogLimiter`]; see [`log_limited!`].
macro_rules! warn_limited {
    ($($arg:tt)+) => {
        $crate::devices::log_limit::log_limited!(tracing::Level::WARN, $($arg)+)
    };
}

/// `tracing::debug!` through a per-call-site [`LogLimiter`]; see [`log_limited!`].
macro_rules! debug_limited {
    ($($arg:tt)+) => {
        $crate::devices::log_limit::log_limited!(tracing::Level::DEBUG, $($arg)+)
    };
}

pub(crate) use {debug_limited, error_limited, log_limited, warn_limited};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_logs_a_bounded_number_of_lines() {
        let limiter = LogLimiter::new(5, Duration::from_secs(60));
        let now = Instant::now();
        let allowed = (0..100_000)
            .filter(|_| limiter.check_at(now).is_some())
            .count();
        assert_eq!(allowed, 5);
        assert_eq!(limiter.logged(), 5);
        assert_eq!(limiter.suppressed(), 100_000 - 5);
    }

    #[test]
    fn the_next_interval_reports_what_was_suppressed() {
        let limiter = LogLimiter::new(2, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(limiter.check_at(t0), Some(0));
        assert_eq!(limiter.check_at(t0), Some(0));
        for _ in 0..7 {
            assert_eq!(limiter.check_at(t0), None);
        }
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            limiter.check_at(t1),
            Some(7),
            "one line says how many were dropped"
        );
        assert_eq!(limiter.check_at(t1), Some(0));
        assert_eq!(limiter.check_at(t1), None);
    }

    #[test]
    fn a_flood_through_one_call_site_logs_a_bounded_number_of_lines() {
        let flood = |n: usize| (0..n).filter(|i| warn_limited!("bad request {i}")).count();
        assert_eq!(flood(100_000), DEFAULT_BURST as usize);
        // Each call site has its own budget.
        let other = (0..1000).filter(|_| debug_limited!("other")).count();
        assert_eq!(other, DEFAULT_BURST as usize);
    }
}
