//! Filesystems shared with the guest over virtio-fs: their spec and validation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Longest virtio-fs tag (the device's config field).
pub const MAX_TAG_LEN: usize = 36;

/// One virtio-fs share: a host directory (a volume), or an flist image, read-only or with a
/// writable layer kept in a host directory (which survives VM restarts).
///
/// In JSON the source's key says which it is: `{"tag", "dir", "readonly"}`,
/// `{"tag", "image"}` or `{"tag", "image", "writable_layer"}`; a combination that is none of
/// these does not parse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "FsSpecRepr", into = "FsSpecRepr")]
pub struct FsSpec {
    /// The tag the guest mounts it by (`mount -t virtiofs TAG /mnt`).
    pub tag: String,
    pub source: ShareSource,
    /// Most bytes of file data the guest may keep in a writable layer or writable directory
    /// (EDQUOT past it); unlimited when absent.
    pub max_bytes: Option<u64>,
    /// Most files, directories and other entries there; unlimited when absent.
    pub max_inodes: Option<u64>,
}

/// What a share serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShareSource {
    /// A host directory served as is; `readonly` refuses every write (EROFS).
    Dir { path: PathBuf, readonly: bool },
    /// An flist image (metadata file), read-only; its chunks come from the node's stores.
    Image { image: PathBuf },
    /// An flist image with the guest's changes kept in a host directory.
    LayeredImage { image: PathBuf, layer: PathBuf },
}

impl FsSpec {
    /// A share of host directory `path`.
    pub fn dir(tag: &str, path: impl Into<PathBuf>, readonly: bool) -> Self {
        Self::with_source(
            tag,
            ShareSource::Dir {
                path: path.into(),
                readonly,
            },
        )
    }

    /// A read-only share of an flist image.
    pub fn image(tag: &str, image: impl Into<PathBuf>) -> Self {
        Self::with_source(
            tag,
            ShareSource::Image {
                image: image.into(),
            },
        )
    }

    /// An flist image with a writable layer in host directory `layer`.
    pub fn layered_image(tag: &str, image: impl Into<PathBuf>, layer: impl Into<PathBuf>) -> Self {
        Self::with_source(
            tag,
            ShareSource::LayeredImage {
                image: image.into(),
                layer: layer.into(),
            },
        )
    }

    fn with_source(tag: &str, source: ShareSource) -> Self {
        Self {
            tag: tag.to_string(),
            source,
            max_bytes: None,
            max_inodes: None,
        }
    }

    /// The flist image it serves, if any.
    pub fn image_path(&self) -> Option<&std::path::Path> {
        match &self.source {
            ShareSource::Image { image } | ShareSource::LayeredImage { image, .. } => Some(image),
            ShareSource::Dir { .. } => None,
        }
    }

    /// Its writable layer, if any.
    pub fn writable_layer(&self) -> Option<&std::path::Path> {
        match &self.source {
            ShareSource::LayeredImage { layer, .. } => Some(layer),
            _ => None,
        }
    }

    /// Whether the guest can write through it.
    pub fn is_writable(&self) -> bool {
        match &self.source {
            ShareSource::Dir { readonly, .. } => !readonly,
            ShareSource::Image { .. } => false,
            ShareSource::LayeredImage { .. } => true,
        }
    }
}

/// The JSON (and CLI) form of a share.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FsSpecRepr {
    tag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    writable_layer: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    readonly: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_inodes: Option<u64>,
}

impl TryFrom<FsSpecRepr> for FsSpec {
    type Error = FsSpecError;

    fn try_from(repr: FsSpecRepr) -> Result<Self, FsSpecError> {
        let source = match (repr.dir, repr.image, repr.writable_layer) {
            (Some(path), None, None) => ShareSource::Dir {
                path,
                readonly: repr.readonly,
            },
            (None, Some(image), None) => ShareSource::Image { image },
            (None, Some(image), Some(layer)) if !repr.readonly => {
                ShareSource::LayeredImage { image, layer }
            }
            (Some(_), Some(_), _) | (None, None, _) => {
                return Err(FsSpecError::SourceCount(repr.tag))
            }
            _ => return Err(FsSpecError::BadLayer(repr.tag)),
        };
        Ok(FsSpec {
            tag: repr.tag,
            source,
            max_bytes: repr.max_bytes,
            max_inodes: repr.max_inodes,
        })
    }
}

impl From<FsSpec> for FsSpecRepr {
    fn from(spec: FsSpec) -> Self {
        let mut repr = FsSpecRepr {
            tag: spec.tag,
            max_bytes: spec.max_bytes,
            max_inodes: spec.max_inodes,
            ..Default::default()
        };
        match spec.source {
            ShareSource::Dir { path, readonly } => {
                repr.dir = Some(path);
                repr.readonly = readonly;
            }
            ShareSource::Image { image } => {
                repr.image = Some(image);
                // An image without a layer is always read-only: say so in the JSON.
                repr.readonly = true;
            }
            ShareSource::LayeredImage { image, layer } => {
                repr.image = Some(image);
                repr.writable_layer = Some(layer);
            }
        }
        repr
    }
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
        if (share.max_bytes.is_some() || share.max_inodes.is_some()) && !share.is_writable() {
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
        let mut share = FsSpecRepr::default();
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
        FsSpec::try_from(share)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(tag: &str) -> FsSpec {
        FsSpec::dir(tag, "/srv", false)
    }

    #[test]
    fn cli_form() {
        let s: FsSpec = "tag=data,dir=/srv/data,readonly".parse().unwrap();
        assert_eq!(s, FsSpec::dir("data", "/srv/data", true));
        let s: FsSpec = "tag=root,image=/i/a.flist,layer=/var/vm1".parse().unwrap();
        assert_eq!(s, FsSpec::layered_image("root", "/i/a.flist", "/var/vm1"));
        assert_eq!(
            "tag=root,image=/i/a.flist".parse::<FsSpec>().unwrap(),
            FsSpec::image("root", "/i/a.flist")
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
        let mut ro = FsSpec::dir("ro", "/srv", true);
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
    }

    #[test]
    fn only_the_three_kinds_of_share_parse() {
        let parse = |json: &str| serde_json::from_str::<FsSpec>(json).map_err(|e| e.to_string());
        assert_eq!(
            parse(r#"{"tag": "d", "dir": "/srv", "readonly": true}"#),
            Ok(FsSpec::dir("d", "/srv", true))
        );
        assert_eq!(
            parse(r#"{"tag": "i", "image": "/a.flist"}"#),
            Ok(FsSpec::image("i", "/a.flist"))
        );
        assert_eq!(
            parse(r#"{"tag": "l", "image": "/a.flist", "writable_layer": "/l"}"#),
            Ok(FsSpec::layered_image("l", "/a.flist", "/l"))
        );
        for (json, error) in [
            (
                r#"{"tag": "x", "dir": "/d", "image": "/i"}"#,
                "exactly one of",
            ),
            (r#"{"tag": "x"}"#, "exactly one of"),
            (
                r#"{"tag": "y", "dir": "/d", "writable_layer": "/l"}"#,
                "writable layer",
            ),
            (
                r#"{"tag": "y", "image": "/i", "writable_layer": "/l", "readonly": true}"#,
                "writable layer",
            ),
            (
                r#"{"tag": "z", "dir": "/d", "layer": "/l"}"#,
                "unknown field",
            ),
        ] {
            let err = parse(json).unwrap_err();
            assert!(err.contains(error), "{json}: {err}");
        }
        // Round trips through the JSON form.
        for share in [
            FsSpec::dir("d", "/srv", false),
            FsSpec::image("i", "/a.flist"),
            FsSpec::layered_image("l", "/a.flist", "/l"),
        ] {
            let json = serde_json::to_string(&share).unwrap();
            assert_eq!(parse(&json), Ok(share));
        }
        assert!("tag=y,dir=/d,layer=/l".parse::<FsSpec>().is_err());
    }
}
