//! The virtio-vsock device of a VM: the guest's context id and the host unix socket through
//! which host programs reach the guest (Firecracker's convention: a host program connects to
//! `uds_path` and writes `CONNECT <port>\n`; the guest's connections to the host's port P reach
//! the unix socket `<uds_path>_P`).

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Context ids 0 to 2 are the hypervisor, local and host ones; `u32::MAX` is VMADDR_CID_ANY.
pub const MIN_GUEST_CID: u32 = 3;
/// The longest `uds_path`: a unix socket address holds 107 bytes (plus a NUL), and guest
/// connections use `<uds_path>_<port>`, up to 11 bytes more.
pub const MAX_UDS_PATH_LEN: usize = 107 - 11;

/// The vsock device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockSpec {
    /// The guest's context id (3 or more, not `u32::MAX`).
    pub guest_cid: u32,
    /// The host unix socket the vmm listens on for host-initiated connections.
    pub uds_path: PathBuf,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VsockSpecError {
    #[error("vsock guest_cid {0} is reserved: use {MIN_GUEST_CID} to {max}", max = u32::MAX - 1)]
    ReservedCid(u32),
    #[error("vsock uds_path is empty")]
    EmptyPath,
    #[error("vsock uds_path {0:?} is longer than {MAX_UDS_PATH_LEN} bytes (a unix socket address holds 107, and `_PORT` is appended for guest connections)")]
    PathTooLong(PathBuf),
    #[error("vsock uds_path {0:?} contains a NUL byte")]
    PathHasNul(PathBuf),
    #[error("vsock uds_path {0:?} does not name a file")]
    PathNotAFile(PathBuf),
    #[error("--vsock takes cid=CID,uds=PATH, not {0:?}")]
    BadFlag(String),
}

impl VsockSpec {
    pub fn validate(&self) -> Result<(), VsockSpecError> {
        if self.guest_cid < MIN_GUEST_CID || self.guest_cid == u32::MAX {
            return Err(VsockSpecError::ReservedCid(self.guest_cid));
        }
        let bytes = self.uds_path.as_os_str().as_bytes();
        if bytes.is_empty() {
            return Err(VsockSpecError::EmptyPath);
        }
        if bytes.contains(&0) {
            return Err(VsockSpecError::PathHasNul(self.uds_path.clone()));
        }
        if bytes.len() > MAX_UDS_PATH_LEN {
            return Err(VsockSpecError::PathTooLong(self.uds_path.clone()));
        }
        if bytes.ends_with(b"/") || self.uds_path.file_name().is_none() {
            return Err(VsockSpecError::PathNotAFile(self.uds_path.clone()));
        }
        Ok(())
    }
}

impl std::str::FromStr for VsockSpec {
    type Err = VsockSpecError;

    /// Parses the CLI form `cid=CID,uds=PATH`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || VsockSpecError::BadFlag(text.to_string());
        let (mut cid, mut uds) = (None, None);
        for part in text.split(',') {
            match part.split_once('=') {
                Some(("cid", v)) if cid.is_none() => cid = Some(v.parse().map_err(|_| bad())?),
                Some(("uds", v)) if uds.is_none() => uds = Some(PathBuf::from(v)),
                _ => return Err(bad()),
            }
        }
        match (cid, uds) {
            (Some(guest_cid), Some(uds_path)) => Ok(Self {
                guest_cid,
                uds_path,
            }),
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cid: u32, path: &str) -> VsockSpec {
        VsockSpec {
            guest_cid: cid,
            uds_path: path.into(),
        }
    }

    #[test]
    fn reserved_cids_are_refused() {
        for cid in [0, 1, 2, u32::MAX] {
            assert_eq!(
                spec(cid, "/run/v.sock").validate(),
                Err(VsockSpecError::ReservedCid(cid))
            );
        }
        spec(3, "/run/v.sock").validate().unwrap();
        spec(u32::MAX - 1, "/run/v.sock").validate().unwrap();
    }

    #[test]
    fn empty_path_is_refused() {
        assert_eq!(spec(3, "").validate(), Err(VsockSpecError::EmptyPath));
    }

    #[test]
    fn path_with_nul_is_refused() {
        assert!(matches!(
            spec(3, "/run/a\0b").validate(),
            Err(VsockSpecError::PathHasNul(_))
        ));
    }

    #[test]
    fn path_too_long_for_a_socket_address_with_a_port_is_refused() {
        let longest = format!("/{}", "a".repeat(MAX_UDS_PATH_LEN - 1));
        spec(3, &longest).validate().unwrap();
        assert!(matches!(
            spec(3, &format!("{longest}b")).validate(),
            Err(VsockSpecError::PathTooLong(_))
        ));
    }

    #[test]
    fn directory_paths_are_refused() {
        for path in ["/run/", "/", ".."] {
            assert!(
                matches!(
                    spec(3, path).validate(),
                    Err(VsockSpecError::PathNotAFile(_))
                ),
                "{path}"
            );
        }
    }

    #[test]
    fn json_and_flag_forms() {
        let s: VsockSpec =
            serde_json::from_str(r#"{"guest_cid": 3, "uds_path": "/run/v.sock"}"#).unwrap();
        assert_eq!(s, spec(3, "/run/v.sock"));
        assert!(serde_json::from_str::<VsockSpec>(
            r#"{"guest_cid": 3, "uds_path": "/x", "cid": 4}"#
        )
        .is_err());
        assert!(
            serde_json::from_str::<VsockSpec>(r#"{"guest_cid": -1, "uds_path": "/x"}"#).is_err()
        );
        assert_eq!("cid=7,uds=/tmp/v".parse(), Ok(spec(7, "/tmp/v")));
        for bad in [
            "cid=7",
            "uds=/x",
            "cid=x,uds=/x",
            "cid=3,uds=/x,cid=4",
            "cid=3,uds=/x,ro",
        ] {
            assert_eq!(
                bad.parse::<VsockSpec>(),
                Err(VsockSpecError::BadFlag(bad.into())),
                "{bad}"
            );
        }
    }
}
