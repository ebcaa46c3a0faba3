//! Reading and writing the image file: header (magic, version, length, checksum) around a
//! zstd-compressed postcard payload. Writes go to a temp file that is renamed into place, so a
//! failed or interrupted write never leaves a half image.

use super::types::Image;
use super::validate::validate;
use crate::error::{Error, Result};
use crate::store::redact_url;
use std::io::Write;
use std::path::Path;

pub const MAGIC: [u8; 8] = *b"FLISTFS\n";
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 56;

/// Serializes `image` to bytes (credentials are stripped from store URLs).
pub fn encode_image(image: &Image, path: &Path) -> Result<Vec<u8>> {
    let mut clean = image.clone();
    for r in &mut clean.routes {
        r.url = redact_url(&r.url);
    }
    let bad = |reason: String| Error::BadImage {
        path: path.to_path_buf(),
        reason,
    };
    let raw = postcard::to_stdvec(&clean).map_err(|e| bad(format!("serialize: {e}")))?;
    let payload = zstd::bulk::compress(&raw, 9).map_err(|e| bad(format!("compress: {e}")))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(&payload).as_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Parses and validates image bytes; `path` is only used to name the image in errors.
pub fn decode_image(bytes: &[u8], path: &Path) -> Result<Image> {
    let bad = |reason: String| Error::BadImage {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < HEADER_LEN {
        if bytes.len() >= 8 && bytes[..8] != MAGIC {
            return Err(bad("not an flist image (bad magic)".into()));
        }
        return Err(bad(format!(
            "truncated: {} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if bytes[..8] != MAGIC {
        return Err(bad("not an flist image (bad magic)".into()));
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = word(8);
    if version != VERSION {
        return Err(bad(format!(
            "unsupported format version {version} (this build reads {VERSION})"
        )));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[16..24]);
    let payload_len = u64::from_le_bytes(len8);
    let have = (bytes.len() - HEADER_LEN) as u64;
    if have < payload_len {
        return Err(bad(format!(
            "truncated: payload is {have} bytes, header says {payload_len}"
        )));
    }
    if have > payload_len {
        return Err(bad(format!(
            "{} trailing bytes after the payload",
            have - payload_len
        )));
    }
    let payload = &bytes[HEADER_LEN..];
    if blake3::hash(payload).as_bytes() != &bytes[24..56] {
        return Err(bad("corrupt: checksum mismatch".into()));
    }
    let raw = zstd::stream::decode_all(payload).map_err(|e| bad(format!("decompress: {e}")))?;
    let mut image: Image = postcard::from_bytes(&raw).map_err(|e| bad(format!("decode: {e}")))?;
    validate(&mut image).map_err(bad)?;
    Ok(image)
}

/// Reads and validates the image at `path`.
pub fn read_image(path: &Path) -> Result<Image> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, path)
}

/// Writes `image` to `path` atomically (temp file in the same directory, fsync, rename).
pub fn write_image_atomic(image: &Image, path: &Path) -> Result<()> {
    let bytes = encode_image(image, path)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".flist-tmp-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    tmp.write_all(&bytes)
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkerKind;
    use crate::meta::{DirEntry, Inode, InodeKind};

    fn sample() -> Image {
        let mut img = Image::new(ChunkerKind::default(), false);
        img.tags.insert("name".into(), "t".into());
        img.inodes.push(Inode::new(InodeKind::File, 0o644));
        img.inodes[0].entries.push(DirEntry {
            name: b"f".to_vec(),
            ino: 2,
        });
        img.routes.push(crate::meta::Route {
            start: 0,
            end: 255,
            url: "s3://AK:SECRET@127.0.0.1:3900/bucket".into(),
        });
        img
    }

    #[test]
    fn roundtrip_and_no_secret() {
        let p = Path::new("x.fl");
        let bytes = encode_image(&sample(), p).unwrap();
        let back = decode_image(&bytes, p).unwrap();
        assert_eq!(back.inodes, sample().inodes);
        assert_eq!(back.routes[0].url, "s3://127.0.0.1:3900/bucket");
        assert_eq!(back.nlink(2), 1);
        let raw = zstd::stream::decode_all(&bytes[HEADER_LEN..]).unwrap();
        assert!(!raw.windows(6).any(|w| w == b"SECRET"));
    }

    #[test]
    fn truncation_and_corruption_are_named() {
        let p = Path::new("img.fl");
        let bytes = encode_image(&sample(), p).unwrap();
        let e = decode_image(&bytes[..bytes.len() - 3], p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("img.fl") && e.contains("truncated"), "{e}");
        let e = decode_image(&bytes[..10], p).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let mut c = bytes.clone();
        let n = c.len() - 1;
        c[n] ^= 0xff;
        let e = decode_image(&c, p).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        let e = decode_image(
            b"hello world, not an image at all, long enough to pass the header",
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("magic"), "{e}");
    }
}
