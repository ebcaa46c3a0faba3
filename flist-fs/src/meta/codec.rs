//! Reading and writing the image file: header (magic, version, length, checksum) around a
//! zstd-compressed postcard payload. Writes go to a temp file that is renamed into place, so a
//! failed or interrupted write never leaves a half image.
//!
//! Reading is bounded (see "Limits" in the `meta` module doc): the file and its payload length
//! are checked against [`MAX_PAYLOAD`] before anything is read or allocated, decompression
//! streams into a buffer that stops past [`MAX_RAW_PAYLOAD`], and the tables are decoded under
//! the [`MAX_DECODED_MEMORY`] budget before `validate` checks the rest.

use super::types::Image;
use super::validate::validate;
use super::{MAX_DECODED_MEMORY, MAX_PAYLOAD, MAX_RAW_PAYLOAD};
use crate::chunk::blocks::MAX_TABLE_LEN;
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::store::redact_url;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

pub const MAGIC: [u8; 8] = *b"FLISTFS\n";
/// The newest format version: 2 when chunks are blocked, else 1 (what older readers read).
pub const VERSION: u32 = 2;
const HEADER_LEN: usize = 56;
/// log2 of the largest zstd window the payload may ask for (zstd's own default cap).
const WINDOW_LOG_MAX: u32 = 27;

/// Decompresses `payload`; `Ok(None)` when it decodes to more than `limit` bytes. The buffer
/// grows (by doubling from 1 MiB) only as data arrives and never past `limit + 1` bytes.
fn decompress_capped(payload: &[u8], limit: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut dec = zstd::stream::read::Decoder::with_buffer(payload)?;
    dec.window_log_max(WINDOW_LOG_MAX)?;
    let mut out: Vec<u8> = Vec::new();
    let mut len = 0usize;
    loop {
        if len == out.len() {
            let grow = out.len().max(1 << 20).min(limit + 1 - len);
            out.reserve_exact(grow);
            out.resize(len + grow, 0);
        }
        match dec.read(&mut out[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if len > limit {
            return Ok(None);
        }
    }
    out.truncate(len);
    Ok(Some(out))
}

/// Serializes `image` to bytes (credentials are stripped from store URLs); refuses an image a
/// reader would refuse (validation, payload limits).
pub fn encode_image(image: &Image, path: &Path) -> Result<Vec<u8>> {
    let mut clean = image.clone();
    for r in &mut clean.routes {
        r.url = redact_url(&r.url);
    }
    let bad = |reason: String| Error::BadImage {
        path: path.to_path_buf(),
        reason,
    };
    // Never write what no reader would accept.
    validate(&mut clean).map_err(bad)?;
    encode_unvalidated(&clean, path)
}

/// Serializes `image` as it is, without validating it: what a hostile packer could write.
/// Only for tests and fuzzing seeds of the decoder; use [`encode_image`].
#[doc(hidden)]
pub fn encode_unvalidated(image: &Image, path: &Path) -> Result<Vec<u8>> {
    let bad = |reason: String| Error::BadImage {
        path: path.to_path_buf(),
        reason,
    };
    let mut raw = postcard::to_stdvec(image).map_err(|e| bad(format!("serialize: {e}")))?;
    let version: u32 = if image.block_size == 0 {
        1
    } else {
        raw.extend_from_slice(&image.block_size.to_le_bytes());
        raw.extend_from_slice(&(image.tables.len() as u32).to_le_bytes());
        for (id, table) in &image.tables {
            raw.extend_from_slice(&id.0);
            raw.extend_from_slice(&(table.len() as u32).to_le_bytes());
            raw.extend_from_slice(table);
        }
        2
    };
    if raw.len() as u64 > MAX_RAW_PAYLOAD {
        return Err(bad(format!(
            "metadata of {} bytes exceeds the limit of {MAX_RAW_PAYLOAD} bytes",
            raw.len()
        )));
    }
    let payload = zstd::bulk::compress(&raw, 9).map_err(|e| bad(format!("compress: {e}")))?;
    if payload.len() as u64 > MAX_PAYLOAD {
        return Err(bad(format!(
            "payload length {} exceeds the limit of {MAX_PAYLOAD} bytes",
            payload.len()
        )));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
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
    if version != 1 && version != VERSION {
        return Err(bad(format!(
            "unsupported format version {version} (this build reads 1 and {VERSION})"
        )));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[16..24]);
    let payload_len = u64::from_le_bytes(len8);
    if payload_len > MAX_PAYLOAD {
        return Err(bad(format!(
            "payload length {payload_len} exceeds the limit of {MAX_PAYLOAD} bytes"
        )));
    }
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
    let raw = decompress_capped(payload, MAX_RAW_PAYLOAD as usize)
        .map_err(|e| bad(format!("decompress: {e}")))?
        .ok_or_else(|| {
            bad(format!(
                "payload decompresses to more than the limit of {MAX_RAW_PAYLOAD} bytes"
            ))
        })?;
    let decoded = super::budget::with_budget(MAX_DECODED_MEMORY, || {
        postcard::take_from_bytes::<Image>(&raw)
    });
    let (mut image, rest) = decoded
        .map_err(bad)?
        .map_err(|e| bad(format!("decode: {e}")))?;
    // Version 2 adds the block size and the block tables after the postcard tables; version 1
    // has nothing there.
    match version {
        1 if rest.is_empty() => {}
        1 => {
            return Err(bad(format!(
                "{} bytes after the tables where format version 1 has none",
                rest.len()
            )))
        }
        _ => (image.block_size, image.tables) = block_tables(rest).map_err(bad)?,
    }
    drop(raw);
    validate(&mut image).map_err(bad)?;
    Ok(image)
}

/// The block size and block tables after the postcard tables of a version 2 payload: block
/// size (u32 LE, not 0), count (u32 LE), then per table its chunk id (32 bytes), length (u32
/// LE, at most `MAX_TABLE_LEN`) and bytes. Every claim is checked against what is there;
/// `validate` checks the tables against the chunks.
fn block_tables(mut rest: &[u8]) -> std::result::Result<(u32, BTreeMap<ChunkId, Vec<u8>>), String> {
    let mut take = |n: usize, what: &str| -> std::result::Result<&[u8], String> {
        if rest.len() < n {
            return Err(format!("truncated block tables: {what} missing"));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let block_size = word(take(4, "the block size")?);
    if block_size == 0 {
        return Err("format version 2 with block size 0".into());
    }
    let count = word(take(4, "the table count")?);
    let mut tables = BTreeMap::new();
    for i in 0..count {
        let mut id = [0u8; 32];
        id.copy_from_slice(take(32, "a chunk id")?);
        let len = word(take(4, "a table length")?) as usize;
        if len > MAX_TABLE_LEN {
            return Err(format!(
                "block table {i} claims {len} bytes, more than the largest ({MAX_TABLE_LEN})"
            ));
        }
        let table = take(len, "a table")?.to_vec();
        if tables.insert(ChunkId(id), table).is_some() {
            return Err(format!("two block tables for chunk {}", ChunkId(id)));
        }
    }
    let left = take(0, "")?.len();
    if left != 0 {
        return Err(format!("{left} bytes after the block tables"));
    }
    Ok((block_size, tables))
}

/// Reads and validates the image at `path`.
/// A file larger than a header plus [`MAX_PAYLOAD`] is refused without being read.
pub fn read_image(path: &Path) -> Result<Image> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let max = HEADER_LEN as u64 + MAX_PAYLOAD;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max {
        return Err(Error::BadImage {
            path: path.to_path_buf(),
            reason: format!("file is larger than the limit of {max} bytes"),
        });
    }
    decode_image(&bytes, path)
}

/// Writes `image` to `path` atomically (temp file in the same directory, fsync, rename).
/// The process's umask, from /proc (setting and restoring it would race with other threads
/// creating files); 022 where /proc does not say.
fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

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
    // A temporary file is created 0600; an image is an ordinary file (0666 less the umask).
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o666 & !current_umask()),
    )
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
    fn whole_chunk_images_stay_version_1_and_blocked_ones_are_version_2() {
        let p = Path::new("v.fl");
        let v1 = encode_image(&sample(), p).unwrap();
        assert_eq!(v1[8..12], 1u32.to_le_bytes());
        assert_eq!(decode_image(&v1, p).unwrap().block_size, 0);
        let mut img = sample();
        img.block_size = 32 << 10;
        let v2 = encode_image(&img, p).unwrap();
        assert_eq!(v2[8..12], 2u32.to_le_bytes());
        let back = decode_image(&v2, p).unwrap();
        assert_eq!(
            (back.block_size, back.inodes),
            (32 << 10, img.inodes.clone())
        );
        // A hostile block size is refused, read or written.
        img.block_size = 3000;
        let e = encode_image(&img, p).unwrap_err().to_string();
        assert!(e.contains("block size 3000"), "{e}");
        let mut raw = postcard::to_stdvec(&img).unwrap();
        raw.extend_from_slice(&3000u32.to_le_bytes());
        raw.extend_from_slice(&0u32.to_le_bytes());
        let mut forged = wrap(&zstd::bulk::compress(&raw, 3).unwrap(), 0);
        forged[8..12].copy_from_slice(&2u32.to_le_bytes());
        let len = (forged.len() - HEADER_LEN) as u64;
        forged[16..24].copy_from_slice(&len.to_le_bytes());
        let e = decode_image(&forged, p).unwrap_err().to_string();
        assert!(e.contains("block size 3000 is not a power of two"), "{e}");
        // Version 1 with trailing bytes.
        forged[8..12].copy_from_slice(&1u32.to_le_bytes());
        let e = decode_image(&forged, p).unwrap_err().to_string();
        assert!(e.contains("8 bytes after the tables"), "{e}");
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

    /// A header with a valid checksum around `payload`.
    fn wrap(payload: &[u8], claimed_len: u64) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&claimed_len.to_le_bytes());
        out.extend_from_slice(blake3::hash(payload).as_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn an_invalid_image_is_not_written() {
        let mut img = sample();
        // A chunk that ends past the file's size.
        img.inodes[1].chunks.push(crate::meta::ChunkRef {
            id: crate::chunk::ChunkId::of(b"x"),
            offset: 0,
            size: 10,
            key: None,
        });
        img.inodes[1].size = 5;
        let e = encode_image(&img, Path::new("w.fl"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("w.fl") && e.contains("inode 2"), "{e}");
    }

    #[test]
    fn payload_length_is_bounded() {
        let p = Path::new("big.fl");
        let e = decode_image(&wrap(b"x", MAX_PAYLOAD + 1), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("big.fl") && e.contains("payload length"), "{e}");
        // A file past the bound is refused by read_image without reading it whole.
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("huge.fl");
        let file = std::fs::File::create(&f).unwrap();
        file.set_len(HEADER_LEN as u64 + MAX_PAYLOAD + 1).unwrap();
        let e = read_image(&f).unwrap_err().to_string();
        assert!(e.contains("larger than the limit"), "{e}");
    }

    #[test]
    fn decompression_is_capped() {
        // The cap used by decode_image (MAX_RAW_PAYLOAD), tried at a small scale: 4 MiB of
        // zeros (a few hundred compressed bytes) against a 1 MiB limit stops at the limit.
        let payload = zstd::bulk::compress(&vec![0u8; 4 << 20], 1).unwrap();
        assert!(decompress_capped(&payload, 1 << 20).unwrap().is_none());
        assert_eq!(
            decompress_capped(&payload, 4 << 20)
                .unwrap()
                .map(|v| v.len()),
            Some(4 << 20)
        );
    }

    #[test]
    fn every_table_of_an_image_is_budgeted() {
        // Empty inodes are a dozen postcard bytes but ~200 bytes in memory; the decode budget
        // (MAX_DECODED_MEMORY in decode_image) counts them at their in-memory size.
        let mut img = sample();
        img.inodes = vec![Inode::new(InodeKind::File, 0); 1000];
        let raw = postcard::to_stdvec(&img).unwrap();
        assert!(raw.len() < 20_000);
        let budget = 100 * std::mem::size_of::<Inode>() as u64;
        let e = crate::meta::budget::with_budget(budget, || postcard::from_bytes::<Image>(&raw))
            .err()
            .unwrap_or_default();
        assert!(e.contains("memory limit"), "{e}");
        // Nested lists too: one inode with many entries.
        let mut img = sample();
        img.inodes[0].entries = (0..1000u32)
            .map(|i| DirEntry {
                name: Vec::new(),
                ino: u64::from(i),
            })
            .collect();
        let raw = postcard::to_stdvec(&img).unwrap();
        let budget = 100 * std::mem::size_of::<DirEntry>() as u64;
        assert!(
            crate::meta::budget::with_budget(budget, || postcard::from_bytes::<Image>(&raw))
                .is_err()
        );
        assert!(matches!(
            crate::meta::budget::with_budget(1 << 20, || postcard::from_bytes::<Image>(&raw)),
            Ok(Ok(_))
        ));
    }
}
