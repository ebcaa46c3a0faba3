//! Filesystems shared with the guest over virtio-fs: their spec and validation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Longest virtio-fs tag (the device's config field).
pub const MAX_TAG_LEN: usize = 36;

/// One virtio-fs share: a host directory (a volume), or an flist image, read-only or with a
/// writable layer kept in a host directory (which survives VM restarts).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsSpec {
    /// The tag the guest mounts it by (`mount -t virtiofs TAG /mnt`).
    pub tag: String,
    /// A host directory served as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// An flist image (metadata file); its chunks come from the stores it names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// With an image: a host directory holding the guest's changes on top of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writable_layer: Option<PathBuf>,
    /// Refuse every write from the guest (EROFS). An image without a writable layer always is.
    #[serde(default)]
    pub readonly: bool,
    /// Most bytes of file data the guest may keep in a writable layer or writable directory
    /// (EDQUOT past it); unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Most files, directories and other entries there; unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_inodes: Option<u64>,
}

/// Parses a byte count with an optional binary suffix (`K`, `M`, `G`, `T`; `512M`).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.as_bytes().last()? {
        b'K' | b'k' => (&text[..text.len() - 1], 10),
        b'M' | b'm' => (&text[..text.len() - 1], 20),
        b'G' | b'g' => (&text[..text.len() - 1], 30),
        b'T' | b't' => (&text[..text.len() - 1], 40),
        _ => (text, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
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
    #[error("--fs takes tag=TAG,dir=PATH[,readonly] or tag=TAG,image=PATH[,layer=DIR][,readonly], with max_bytes=SIZE[K|M|G|T],max_inodes=N, not {0:?}")]
    BadFlag(String),
    #[error("virtio-fs share {0:?} needs exactly one of `dir` and `image`")]
    SourceCount(String),
    #[error("virtio-fs share {0:?}: a writable layer goes with an image, and not with readonly")]
    BadLayer(String),
    #[error("virtio-fs share {0:?}: max_bytes/max_inodes limit a writable layer or a writable directory")]
    BadLimit(String),
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
        if share.dir.is_some() == share.image.is_some() {
            return Err(FsSpecError::SourceCount(tag.clone()));
        }
        if share.writable_layer.is_some() && (share.image.is_none() || share.readonly) {
            return Err(FsSpecError::BadLayer(tag.clone()));
        }
        let writable = share.writable_layer.is_some() || (share.dir.is_some() && !share.readonly);
        if (share.max_bytes.is_some() || share.max_inodes.is_some()) && !writable {
            return Err(FsSpecError::BadLimit(tag.clone()));
        }
    }
    match root {
        Some(root) if !seen.contains(root) => Err(FsSpecError::UnknownRoot(root.to_string())),
        _ => Ok(()),
    }
}

impl std::str::FromStr for FsSpec {
    type Err = FsSpecError;

    /// Parses the CLI form `tag=TAG,dir=PATH[,readonly]` or
    /// `tag=TAG,image=PATH[,layer=DIR]`, with `max_bytes=SIZE,max_inodes=N` on writable ones.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || FsSpecError::BadFlag(text.to_string());
        let mut share = FsSpec::default();
        for part in text.split(',') {
            match part.split_once('=') {
                Some(("tag", v)) => share.tag = v.to_string(),
                Some(("dir", v)) => share.dir = Some(PathBuf::from(v)),
                Some(("image", v)) => share.image = Some(PathBuf::from(v)),
                Some(("layer", v)) => share.writable_layer = Some(PathBuf::from(v)),
                Some(("max_bytes", v)) => share.max_bytes = Some(parse_size(v).ok_or_else(bad)?),
                Some(("max_inodes", v)) => share.max_inodes = Some(v.parse().map_err(|_| bad())?),
                None if part == "readonly" || part == "ro" => share.readonly = true,
                _ => return Err(bad()),
            }
        }
        if share.tag.is_empty() || (share.dir.is_none() && share.image.is_none()) {
            return Err(bad());
        }
        Ok(share)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(tag: &str) -> FsSpec {
        FsSpec {
            tag: tag.into(),
            dir: Some("/srv".into()),
            image: None,
            writable_layer: None,
            readonly: false,
            ..Default::default()
        }
    }

    #[test]
    fn cli_form() {
        let s: FsSpec = "tag=data,dir=/srv/data,readonly".parse().unwrap();
        assert_eq!(s.tag, "data");
        assert_eq!(s.dir.as_deref(), Some(std::path::Path::new("/srv/data")));
        assert!(s.readonly);
        let s: FsSpec = "tag=root,image=/i/a.flist,layer=/var/vm1".parse().unwrap();
        assert_eq!(s.image.as_deref(), Some(std::path::Path::new("/i/a.flist")));
        assert_eq!(
            s.writable_layer.as_deref(),
            Some(std::path::Path::new("/var/vm1"))
        );
        assert!("dir=/x".parse::<FsSpec>().is_err());
        assert!("tag=a".parse::<FsSpec>().is_err());
        assert!("tag=a,dir=/x,bogus=1".parse::<FsSpec>().is_err());
        let s: FsSpec = "tag=r,image=/i,layer=/l,max_bytes=2G,max_inodes=1000"
            .parse()
            .unwrap();
        assert_eq!(s.max_bytes, Some(2 << 30));
        assert_eq!(s.max_inodes, Some(1000));
        assert!("tag=r,image=/i,layer=/l,max_bytes=2X"
            .parse::<FsSpec>()
            .is_err());
        assert!("tag=r,dir=/d,max_bytes=99999999999T"
            .parse::<FsSpec>()
            .is_err());
        let mut ro = share("ro");
        ro.readonly = true;
        ro.max_bytes = Some(1);
        assert_eq!(
            validate(&[ro], None),
            Err(FsSpecError::BadLimit("ro".into()))
        );
    }

    #[test]
    fn tags_root_and_sources() {
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
        let mut both = share("x");
        both.image = Some("/i".into());
        assert_eq!(
            validate(&[both], None),
            Err(FsSpecError::SourceCount("x".into()))
        );
        let mut layer_on_dir = share("y");
        layer_on_dir.writable_layer = Some("/l".into());
        assert_eq!(
            validate(&[layer_on_dir], None),
            Err(FsSpecError::BadLayer("y".into()))
        );
    }
}
