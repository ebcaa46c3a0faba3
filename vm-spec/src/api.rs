//! The control API's messages (HTTP/1.1 + JSON on the vmm's unix socket, documented in
//! vmm/api/openapi.yaml) and the exit record a vmm leaves behind. Shared by the vmm, which
//! serves them, and the programs that drive it.

use serde::{Deserialize, Serialize};

use crate::net::NetRateLimiterSpec;
use crate::rate_limiter::RateLimiterSpec;

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// vCPUs run; the guest has not yet reported "booted".
    Booting,
    /// The guest reported "booted" (or runs a guest that never reports).
    Running,
    /// Every vCPU is parked by a `pause` action.
    Paused,
    /// The VM is ending (a shutdown was asked for, or its end is being reported).
    Exiting,
}

/// `GET /vm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmInfo {
    pub state: VmState,
    /// Milliseconds since the vmm started.
    pub uptime_ms: u64,
    /// Milliseconds from the vmm's start to the guest's "booted" report, once it came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted_after_ms: Option<u64>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub devices: Vec<DeviceInfo>,
}

/// One virtio device of a running VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceInfo {
    /// The id the spec gave it (a share's tag, a drive's id, "vsock", "rng").
    pub id: String,
    /// "fs", "block", "vsock", "rng", "net".
    pub kind: String,
}

/// `PUT /vm/actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmActionRequest {
    pub action: VmAction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmAction {
    /// Ask the guest to power off (Ctrl-Alt-Del); end the VM if it has not within the
    /// spec's shutdown grace period.
    Shutdown,
    /// End the VM now.
    Kill,
    /// Park every vCPU.
    Pause,
    /// Let parked vCPUs run again.
    Resume,
}

/// `PATCH /devices/{id}`: what may change on a running device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicePatch {
    pub rate_limiter: RateLimiterPatch,
}

/// A device's new limits: `{bandwidth, ops}` for a drive or the rng, `{rx, tx}` (each
/// `{bandwidth, ops}`) for a network interface. `{}` lifts every limit of any device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RateLimiterPatch {
    Single(RateLimiterSpec),
    RxTx(NetRateLimiterSpec),
}

impl RateLimiterPatch {
    pub fn validate(&self) -> Result<(), crate::RateLimiterError> {
        match self {
            Self::Single(limits) => limits.validate(),
            Self::RxTx(limits) => limits.validate(),
        }
    }
}

/// The body of every 4xx/5xx answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiError {
    pub error: String,
}

/// What a vmm leaves at the spec's `exit_record` path when it ends, for any reason, so that
/// a process that is not its parent learns how and when the VM ended. Written atomically.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitRecord {
    /// The vmm's exit status.
    pub status: i32,
    /// Why, in words: "guest exited with status 3", "guest fault: ...", "killed through the
    /// control API", "the VM could not be started: ...".
    pub reason: String,
    /// Kind of end, for programs: see [`ExitKind`].
    pub kind: ExitKind,
    /// When, RFC 3339 in UTC.
    pub at: String,
    /// When, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// The kinds of VM end a supervisor tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitKind {
    /// The guest reported its entrypoint's status.
    GuestStatus,
    /// The guest reset or powered off without a status.
    GuestReset,
    /// The guest faulted (triple fault, KVM error).
    GuestFault,
    /// The guest's kernel panicked or a unikernel crashed (seen on its console before it reset).
    GuestPanic,
    /// Ended by its operator: a `kill` action, or a shutdown the guest did not finish in time.
    Killed,
    /// The VM never started.
    StartFailed,
    /// The vmm itself failed (internal error).
    VmmError,
}

/// Formats `unix_ms` as RFC 3339 UTC with milliseconds (`2026-12-02T15:29:06.123Z`).
pub fn rfc3339_utc(unix_ms: u64) -> String {
    String::from_utf8_lossy(&rfc3339_utc_bytes(unix_ms)).into_owned()
}

/// [`rfc3339_utc`] without allocating (for a signal handler): 24 ASCII bytes. Years past
/// 9999 are shown as 9999.
pub fn rfc3339_utc_bytes(unix_ms: u64) -> [u8; 24] {
    let secs = unix_ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut value: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year.clamp(0, 9999) as u64);
    put(5, 2, u64::from(month));
    put(8, 2, u64::from(day));
    put(11, 2, rem / 3600);
    put(14, 2, (rem % 3600) / 60);
    put(17, 2, rem % 60);
    put(20, 3, unix_ms % 1000);
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_utc(1_796_225_346_123), "2026-12-02T15:29:06.123Z");
        assert_eq!(rfc3339_utc(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        assert_eq!(&rfc3339_utc_bytes(86_399_001), b"1970-01-01T23:59:59.001Z");
    }

    #[test]
    fn device_patches_take_either_form() {
        let p: DevicePatch =
            serde_json::from_str(r#"{"rate_limiter":{"ops":{"size":1,"refill_time_ms":1}}}"#)
                .unwrap();
        assert!(matches!(p.rate_limiter, RateLimiterPatch::Single(l) if l.ops.is_some()));
        let p: DevicePatch = serde_json::from_str(
            r#"{"rate_limiter":{"rx":{"bandwidth":{"size":1,"refill_time_ms":1}}}}"#,
        )
        .unwrap();
        assert!(matches!(p.rate_limiter, RateLimiterPatch::RxTx(l) if l.rx.is_some()));
        let p: DevicePatch = serde_json::from_str(r#"{"rate_limiter":{}}"#).unwrap();
        assert_eq!(
            p.rate_limiter,
            RateLimiterPatch::Single(RateLimiterSpec::default())
        );
        for bad in [
            r#"{"rate_limiter":{"rx":{}, "ops":{"size":1,"refill_time_ms":1}}}"#,
            r#"{"rate_limiter":{"up":{}}}"#,
            r#"{"rate_limiter":{"rx":{"bandwith":{}}}}"#,
        ] {
            assert!(serde_json::from_str::<DevicePatch>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn actions_parse_strictly() {
        let ok: VmActionRequest = serde_json::from_str(r#"{"action":"pause"}"#).unwrap();
        assert_eq!(ok.action, VmAction::Pause);
        assert!(serde_json::from_str::<VmActionRequest>(r#"{"action":"reboot"}"#).is_err());
        assert!(
            serde_json::from_str::<VmActionRequest>(r#"{"action":"kill","force":true}"#).is_err()
        );
    }
}
