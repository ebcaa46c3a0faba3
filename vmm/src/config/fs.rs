//! Filesystems shared with the guest over virtio-fs: their spec and validation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Longest virtio-fs tag (the device's config field).
pub const MAX_TAG_LEN: usize = 36;

/// One virtio-fs share: a host directory (a volume).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsSpec {
    /// The tag the guest mounts it by (`mount -t virtiofs TAG /mnt`).
    pub tag: String,
    /// A host directory served as is.
    pub dir: PathBuf,
    /// Refuse every write from the guest (EROFS).
    #[serde(default)]
    pub readonly: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FsSpecError {
    #[error(
        "virtio-fs tag {0:?} must be 1 to {MAX_TAG_LEN} printable ASCII characters without spaces"
    )]
    BadTag(String),
    #[error("virtio-fs tag {0:?} is used twice")]
    DuplicateTag(String),
    #[error("the root is tag {0:?}, but no filesystem has that tag")]
    UnknownRoot(String),
    #[error("--fs takes tag=TAG,dir=PATH[,readonly], not {0:?}")]
    BadFlag(String),
}

/// Checks tags (valid, unique) and that the root tag names a share.
pub fn validate(shares: &[FsSpec], root: Option<&str>) -> Result<(), FsSpecError> {
    let mut seen = std::collections::BTreeSet::new();
    for share in shares {
        let tag = &share.tag;
        let valid = !tag.is_empty()
            && tag.len() <= MAX_TAG_LEN
            && tag.bytes().all(|b| b.is_ascii_graphic() && b != b'"');
        if !valid {
            return Err(FsSpecError::BadTag(tag.clone()));
        }
        if !seen.insert(tag.as_str()) {
            return Err(FsSpecError::DuplicateTag(tag.clone()));
        }
    }
    match root {
        Some(root) if !seen.contains(root) => Err(FsSpecError::UnknownRoot(root.to_string())),
        _ => Ok(()),
    }
}

impl std::str::FromStr for FsSpec {
    type Err = FsSpecError;

    /// Parses the CLI form `tag=TAG,dir=PATH[,readonly]`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || FsSpecError::BadFlag(text.to_string());
        let (mut tag, mut dir, mut readonly) = (None, None, false);
        for part in text.split(',') {
            match part.split_once('=') {
                Some(("tag", v)) => tag = Some(v.to_string()),
                Some(("dir", v)) => dir = Some(PathBuf::from(v)),
                None if part == "readonly" || part == "ro" => readonly = true,
                _ => return Err(bad()),
            }
        }
        Ok(FsSpec {
            tag: tag.ok_or_else(bad)?,
            dir: dir.ok_or_else(bad)?,
            readonly,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(tag: &str) -> FsSpec {
        FsSpec {
            tag: tag.into(),
            dir: "/srv".into(),
            readonly: false,
        }
    }

    #[test]
    fn cli_form() {
        let s: FsSpec = "tag=data,dir=/srv/data,readonly".parse().unwrap();
        assert_eq!(
            (s.tag.as_str(), s.dir.to_str().unwrap(), s.readonly),
            ("data", "/srv/data", true)
        );
        assert!("dir=/x".parse::<FsSpec>().is_err());
        assert!("tag=a,dir=/x,bogus=1".parse::<FsSpec>().is_err());
    }

    #[test]
    fn tags_and_root() {
        assert!(validate(&[share("a"), share("b")], Some("a")).is_ok());
        assert_eq!(
            validate(&[share("a"), share("a")], None),
            Err(FsSpecError::DuplicateTag("a".into()))
        );
        assert_eq!(
            validate(&[share("has space")], None),
            Err(FsSpecError::BadTag("has space".into()))
        );
        assert_eq!(
            validate(&[share(&"x".repeat(37))], None),
            Err(FsSpecError::BadTag("x".repeat(37)))
        );
        assert_eq!(
            validate(&[share("a")], Some("b")),
            Err(FsSpecError::UnknownRoot("b".into()))
        );
    }
}
