//! Token-bucket rate limits for a device's I/O, as given in the spec and patched through the
//! control API: a bucket of `size` tokens refilled in full every `refill_time_ms`, with an
//! optional one-time burst on top (the scheme Firecracker's users know).

use serde::{Deserialize, Serialize};

/// Most tokens a bucket may hold or refill (bytes or operations).
pub const MAX_BUCKET_SIZE: u64 = 1 << 50;
/// Longest refill period: one hour.
pub const MAX_REFILL_TIME_MS: u64 = 3_600_000;

/// One token bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketSpec {
    /// Tokens (bytes or operations) the bucket holds when full; refilled in `refill_time_ms`.
    pub size: u64,
    /// Time to refill an empty bucket, in milliseconds.
    pub refill_time_ms: u64,
    /// Extra tokens usable once, at start, before the steady rate applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
}

/// A device's limits: bytes per period and operations per period; either may be absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketSpec>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RateLimiterError {
    #[error("{which} bucket: size must be 1 to {MAX_BUCKET_SIZE}, not {size}")]
    Size { which: &'static str, size: u64 },
    #[error("{which} bucket: refill_time_ms must be 1 to {MAX_REFILL_TIME_MS}, not {ms}")]
    RefillTime { which: &'static str, ms: u64 },
    #[error("{which} bucket: one_time_burst must be at most {MAX_BUCKET_SIZE}, not {burst}")]
    Burst { which: &'static str, burst: u64 },
}

impl TokenBucketSpec {
    fn validate(&self, which: &'static str) -> Result<(), RateLimiterError> {
        if self.size == 0 || self.size > MAX_BUCKET_SIZE {
            return Err(RateLimiterError::Size {
                which,
                size: self.size,
            });
        }
        if self.refill_time_ms == 0 || self.refill_time_ms > MAX_REFILL_TIME_MS {
            return Err(RateLimiterError::RefillTime {
                which,
                ms: self.refill_time_ms,
            });
        }
        if let Some(burst) = self.one_time_burst.filter(|b| *b > MAX_BUCKET_SIZE) {
            return Err(RateLimiterError::Burst { which, burst });
        }
        Ok(())
    }
}

impl RateLimiterSpec {
    pub fn validate(&self) -> Result<(), RateLimiterError> {
        if let Some(b) = &self.bandwidth {
            b.validate("bandwidth")?;
        }
        if let Some(b) = &self.ops {
            b.validate("ops")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_huge_buckets_are_refused() {
        let bucket = |size, refill_time_ms| TokenBucketSpec {
            size,
            refill_time_ms,
            one_time_burst: None,
        };
        let ok = RateLimiterSpec {
            bandwidth: Some(bucket(1 << 20, 100)),
            ops: Some(bucket(100, 1000)),
        };
        assert_eq!(ok.validate(), Ok(()));
        let zero = RateLimiterSpec {
            bandwidth: Some(bucket(0, 100)),
            ops: None,
        };
        assert!(matches!(
            zero.validate(),
            Err(RateLimiterError::Size { .. })
        ));
        let never = RateLimiterSpec {
            bandwidth: None,
            ops: Some(bucket(1, 0)),
        };
        assert!(matches!(
            never.validate(),
            Err(RateLimiterError::RefillTime { .. })
        ));
        assert!(serde_json::from_str::<RateLimiterSpec>(r#"{"bandwith":{}}"#).is_err());
    }
}
