//! Block devices (virtio-blk over raw image files) and the entropy device (virtio-rng): their
//! spec, the CLI forms, and validation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::rate_limiter::{RateLimiterError, RateLimiterSpec};

/// Longest drive id (it names the device in the control API and the worker thread).
pub const MAX_DRIVE_ID_LEN: usize = 32;
/// Longest serial: the virtio-blk GET_ID answer is 20 bytes.
pub const MAX_SERIAL_LEN: usize = 20;

/// The id the entropy device is attached under (no drive may use it).
pub const RNG_DEVICE_ID: &str = "rng";
/// Ids of devices other than drives and shares (no drive may use them).
pub const RESERVED_IDS: &[&str] = &[RNG_DEVICE_ID, "vsock"];

/// One virtio-blk drive over a raw image file on the host (its size a multiple of 512 bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveSpec {
    /// The drive's name: letters, digits, `-` and `_`.
    pub id: String,
    /// The raw image file.
    pub path: PathBuf,
    /// The guest may only read (the device offers VIRTIO_BLK_F_RO and refuses writes).
    #[serde(default)]
    pub readonly: bool,
    /// What the guest reads as the disk's serial (/sys/block/vdX/serial); the id when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterSpec>,
}

/// The entropy device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterSpec>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DriveSpecError {
    #[error("drive id {0:?} must be 1 to {MAX_DRIVE_ID_LEN} letters, digits, '-' or '_'")]
    BadId(String),
    #[error("drive id {0:?} is used twice (by a drive, a virtio-fs tag, or the rng device)")]
    DuplicateId(String),
    #[error("drive {0:?}: the image path is empty or not absolute")]
    BadPath(String),
    #[error("drive {id:?}: serial {serial:?} must be at most {MAX_SERIAL_LEN} printable ASCII characters")]
    BadSerial { id: String, serial: String },
    #[error("drive {id:?}: {source}")]
    RateLimiter {
        id: String,
        source: RateLimiterError,
    },
    #[error("rng: {0}")]
    RngRateLimiter(RateLimiterError),
    #[error("--drive takes id=ID,path=PATH[,readonly][,serial=S], not {0:?}")]
    BadFlag(String),
}

/// Checks ids (valid, unique), paths, serials and rate limits.
pub fn validate(drives: &[DriveSpec], rng: Option<&RngSpec>) -> Result<(), DriveSpecError> {
    let mut seen = std::collections::BTreeSet::new();
    for drive in drives {
        let id = &drive.id;
        let valid = !id.is_empty()
            && id.len() <= MAX_DRIVE_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(DriveSpecError::BadId(id.clone()));
        }
        if !seen.insert(id.as_str()) {
            return Err(DriveSpecError::DuplicateId(id.clone()));
        }
        if !drive.path.is_absolute() {
            return Err(DriveSpecError::BadPath(id.clone()));
        }
        if let Some(serial) = &drive.serial {
            if serial.len() > MAX_SERIAL_LEN || !serial.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(DriveSpecError::BadSerial {
                    id: id.clone(),
                    serial: serial.clone(),
                });
            }
        }
        if let Some(limits) = &drive.rate_limiter {
            limits
                .validate()
                .map_err(|source| DriveSpecError::RateLimiter {
                    id: id.clone(),
                    source,
                })?;
        }
    }
    if let Some(limits) = rng.and_then(|r| r.rate_limiter.as_ref()) {
        limits.validate().map_err(DriveSpecError::RngRateLimiter)?;
    }
    Ok(())
}

impl std::str::FromStr for DriveSpec {
    type Err = DriveSpecError;

    /// Parses the CLI form `id=ID,path=PATH[,readonly][,serial=S]`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || DriveSpecError::BadFlag(text.to_string());
        let mut drive = DriveSpec::default();
        for part in text.split(',') {
            match part.split_once('=') {
                Some(("id", v)) => drive.id = v.to_string(),
                Some(("path", v)) => drive.path = PathBuf::from(v),
                Some(("serial", v)) => drive.serial = Some(v.to_string()),
                None if part == "readonly" || part == "ro" => drive.readonly = true,
                _ => return Err(bad()),
            }
        }
        if drive.id.is_empty() || drive.path.as_os_str().is_empty() {
            return Err(bad());
        }
        Ok(drive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limiter::TokenBucketSpec;

    fn drive(id: &str) -> DriveSpec {
        DriveSpec {
            id: id.into(),
            path: format!("/srv/{id}.img").into(),
            ..Default::default()
        }
    }

    #[test]
    fn cli_form() {
        let d: DriveSpec = "id=data,path=/x.img,readonly,serial=SN1".parse().unwrap();
        assert_eq!(d.id, "data");
        assert_eq!(d.path, PathBuf::from("/x.img"));
        assert!(d.readonly);
        assert_eq!(d.serial.as_deref(), Some("SN1"));
        let d: DriveSpec = "id=a,path=/y".parse().unwrap();
        assert!(!d.readonly && d.serial.is_none());
        for bad in [
            "path=/x",
            "id=a",
            "id=a,path=/x,bogus",
            "id=a,path=/x,size=3",
        ] {
            assert!(bad.parse::<DriveSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn json_form_and_unknown_fields() {
        let d: DriveSpec = serde_json::from_str(
            r#"{"id": "d", "path": "/d.img", "rate_limiter": {"ops": {"size": 100, "refill_time_ms": 1000}}}"#,
        )
        .unwrap();
        assert!(!d.readonly);
        assert_eq!(d.rate_limiter.unwrap().ops.unwrap().size, 100);
        assert!(
            serde_json::from_str::<DriveSpec>(r#"{"id": "d", "path": "/d", "ro": true}"#).is_err()
        );
        assert!(serde_json::from_str::<RngSpec>(r#"{"rate": 1}"#).is_err());
    }

    #[test]
    fn ids_must_be_safe() {
        assert_eq!(validate(&[drive("data-1_x")], None), Ok(()));
        for id in ["", "has space", "../up", "a/b", "a,b", &"x".repeat(33)] {
            let mut d = drive("ok");
            d.id = id.to_string();
            assert_eq!(validate(&[d], None), Err(DriveSpecError::BadId(id.into())));
        }
    }

    #[test]
    fn ids_must_be_unique() {
        assert_eq!(
            validate(&[drive("a"), drive("b"), drive("a")], None),
            Err(DriveSpecError::DuplicateId("a".into()))
        );
    }

    #[test]
    fn paths_must_be_absolute() {
        let mut d = drive("a");
        d.path = "rel/disk.img".into();
        assert_eq!(
            validate(&[d], None),
            Err(DriveSpecError::BadPath("a".into()))
        );
        let mut d = drive("b");
        d.path = PathBuf::new();
        assert_eq!(
            validate(&[d], None),
            Err(DriveSpecError::BadPath("b".into()))
        );
    }

    #[test]
    fn serials_fit_get_id() {
        let mut d = drive("a");
        d.serial = Some("x".repeat(20));
        assert_eq!(validate(&[d.clone()], None), Ok(()));
        d.serial = Some("x".repeat(21));
        assert!(matches!(
            validate(&[d.clone()], None),
            Err(DriveSpecError::BadSerial { .. })
        ));
        d.serial = Some("with space".into());
        assert!(matches!(
            validate(&[d], None),
            Err(DriveSpecError::BadSerial { .. })
        ));
    }

    #[test]
    fn rate_limits_are_validated() {
        let zero = RateLimiterSpec {
            bandwidth: Some(TokenBucketSpec {
                size: 0,
                refill_time_ms: 100,
                one_time_burst: None,
            }),
            ops: None,
        };
        let mut d = drive("a");
        d.rate_limiter = Some(zero);
        assert!(matches!(
            validate(&[d], None),
            Err(DriveSpecError::RateLimiter { .. })
        ));
        let rng = RngSpec {
            rate_limiter: Some(zero),
        };
        assert!(matches!(
            validate(&[], Some(&rng)),
            Err(DriveSpecError::RngRateLimiter(_))
        ));
        assert_eq!(validate(&[], Some(&RngSpec::default())), Ok(()));
    }
}
