//! Encode/decode of one whole chunk: plaintext -> zstd -> (optional) AES-256-GCM with a convergent
//! key -> stored bytes whose blake3 is the chunk id. Decoding verifies the id first, then the
//! AEAD tag, the decompressed length and (when encrypted) that the key matches the plaintext.
//!
//! Decoding is bounded whatever the chunk claims: the claimed plaintext length must be at most
//! [`MAX_CHUNK_SIZE`] and the stored bytes at most [`max_stored_size`] of it; decompression
//! writes into a buffer of the claimed length plus one byte (to detect a chunk that decodes
//! to more), which it never writes past, and refuses zstd windows larger than a chunk.
//!
//! [`verify_stored`] and [`decode`] also take the stored bytes of a blocked chunk (see
//! [`super::blocks`]): one whose bytes do not hash to its id but whose block table does.

use super::{ChunkId, MAX_CHUNK_SIZE};
use crate::error::{Error, Result};
use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce};

pub(super) const ZSTD_LEVEL: i32 = 3;
pub(super) const KEY_CONTEXT: &str = "flist-fs 2025 convergent chunk key v1";
/// AES-GCM tag appended to encrypted chunks.
const TAG_LEN: usize = 16;
/// log2 of the largest zstd window a chunk may ask the decoder for (2^24 = 16 MiB = the
/// largest chunk; the encoder's level-3 window is 2 MiB).
const WINDOW_LOG_MAX: u32 = 24;

/// The most stored bytes a chunk of `plain_len` plaintext bytes can have: zstd's worst-case
/// compressed size (`ZSTD_compressBound`) plus the AEAD tag.
pub const fn max_stored_size(plain_len: u32) -> usize {
    let n = plain_len as usize;
    let small = if n < 128 * 1024 {
        (128 * 1024 - n) >> 11
    } else {
        0
    };
    n + (n >> 8) + small + TAG_LEN
}

/// The most stored bytes any chunk can have: that of a [`MAX_CHUNK_SIZE`] chunk, whole or in
/// the smallest blocks.
pub const MAX_STORED_SIZE: usize = {
    let whole = max_stored_size(MAX_CHUNK_SIZE);
    let blocked = super::blocks::max_blocked_size(super::blocks::MIN_BLOCK, MAX_CHUNK_SIZE);
    if whole > blocked {
        whole
    } else {
        blocked
    }
};

/// A chunk ready to be put in a store.
pub struct Encoded {
    pub id: ChunkId,
    pub stored: Vec<u8>,
    /// Convergent key (derived from the plaintext) when encryption is on.
    pub key: Option<[u8; 32]>,
}

/// Compresses (and when `encrypt`, convergently encrypts) `plain`.
pub fn encode(plain: &[u8], encrypt: bool) -> Result<Encoded> {
    let compressed = zstd::bulk::compress(plain, ZSTD_LEVEL).map_err(|e| Error::BadChunk {
        id: "<new>".into(),
        reason: format!("zstd compression failed: {e}"),
    })?;
    if !encrypt {
        return Ok(Encoded {
            id: ChunkId::of(&compressed),
            stored: compressed,
            key: None,
        });
    }
    // The key depends only on the plaintext, so equal content encrypts to equal bytes (dedup);
    // the key is unique per content, so a fixed nonce never repeats under one key.
    let key = blake3::derive_key(KEY_CONTEXT, plain);
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key));
    let stored = cipher
        .encrypt(Nonce::from_slice(&[0u8; 12]), compressed.as_slice())
        .map_err(|_| Error::BadChunk {
            id: "<new>".into(),
            reason: "encryption failed".into(),
        })?;
    Ok(Encoded {
        id: ChunkId::of(&stored),
        stored,
        key: Some(key),
    })
}

/// Checks that `stored` are the bytes of chunk `id`: a whole chunk hashes to `id`; a blocked
/// chunk's table hashes to `id` and each block to its table entry (see [`super::blocks`]).
pub fn verify_stored(id: &ChunkId, stored: &[u8]) -> Result<()> {
    let actual = ChunkId::of(stored);
    if &actual != id && stored.starts_with(&super::blocks::BLOCK_MAGIC) {
        return super::blocks::verify_blocked(id, stored);
    }
    if &actual != id {
        return Err(Error::BadChunk {
            id: id.to_hex(),
            reason: format!("hash mismatch: content hashes to {actual}"),
        });
    }
    Ok(())
}

/// Verifies and decodes stored bytes back to the plaintext of length `plain_len`. Fails,
/// naming the chunk, when `plain_len` is 0 or above [`MAX_CHUNK_SIZE`], when `stored` is larger
/// than any encoding of `plain_len` bytes can be, or when it decodes to any other length; never
/// allocates more than `plain_len` (plus the stored size) whatever the data says.
pub fn decode(
    id: &ChunkId,
    stored: &[u8],
    key: Option<&[u8; 32]>,
    plain_len: u32,
) -> Result<Vec<u8>> {
    let bad = |reason: String| Error::BadChunk {
        id: id.to_hex(),
        reason,
    };
    if plain_len == 0 || plain_len > MAX_CHUNK_SIZE {
        return Err(bad(format!(
            "claimed plaintext size {plain_len} is outside 1..={MAX_CHUNK_SIZE} bytes"
        )));
    }
    if super::blocks::is_blocked(id, stored) {
        return super::blocks::decode_blocked(id, stored, key, plain_len);
    }
    let stored_max = max_stored_size(plain_len);
    if stored.len() > stored_max {
        return Err(bad(format!(
            "{} stored bytes, more than the {stored_max} any {plain_len}-byte chunk encodes to",
            stored.len()
        )));
    }
    verify_stored(id, stored)?;
    let decrypted;
    let compressed: &[u8] = match key {
        None => stored,
        Some(k) => {
            let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(k));
            decrypted = cipher
                .decrypt(Nonce::from_slice(&[0u8; 12]), stored)
                .map_err(|_| bad("decryption failed (wrong key or tampered data)".into()))?;
            &decrypted
        }
    };
    let plain = decompress_capped(compressed, plain_len as usize).map_err(bad)?;
    if let Some(k) = key {
        if &blake3::derive_key(KEY_CONTEXT, &plain) != k {
            return Err(bad("plaintext does not match its convergent key".into()));
        }
    }
    Ok(plain)
}

thread_local! {
    /// This thread's zstd decoding context, made once: a context costs more to make than a
    /// 32 KiB block costs to decode (its tables and buffers), and every cold read decodes one.
    static DECODER: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses `compressed`, which must decode to exactly `len` bytes: it is decoded in one
/// step into a buffer of `len` bytes plus one, which zstd never writes past, so a bomb stops
/// at `len + 1` bytes.
pub(super) fn decompress_capped(
    compressed: &[u8],
    len: usize,
) -> std::result::Result<Vec<u8>, String> {
    let mut plain = Vec::with_capacity(len + 1);
    let decoded = DECODER.with(|cell| {
        let mut cell = cell.borrow_mut();
        let decoder = match cell.as_mut() {
            Some(decoder) => decoder,
            None => {
                let mut decoder = zstd::bulk::Decompressor::new()?;
                decoder.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(WINDOW_LOG_MAX))?;
                cell.insert(decoder)
            }
        };
        decoder.decompress_to_buffer(compressed, &mut plain)
    });
    match decoded {
        Ok(got) if got == len => Ok(plain),
        Ok(got) if got > len => Err(format!(
            "decodes to more than the {len} bytes its metadata says"
        )),
        Ok(got) => Err(format!("decoded to {got} bytes, metadata says {len}")),
        // zstd's dstSize_tooSmall: the output would not fit in `len + 1` bytes.
        Err(e) if e.to_string().contains("too small") => Err(format!(
            "decodes to more than the {len} bytes its metadata says"
        )),
        Err(e) => Err(format!("zstd decompression failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_plain_and_encrypted() {
        let data = b"some data some data some data".repeat(100);
        for enc in [false, true] {
            let e = encode(&data, enc).unwrap();
            assert_eq!(e.key.is_some(), enc);
            let back = decode(&e.id, &e.stored, e.key.as_ref(), data.len() as u32).unwrap();
            assert_eq!(back, data);
        }
    }

    #[test]
    fn convergent_encryption_dedups() {
        let a = encode(b"same content", true).unwrap();
        let b = encode(b"same content", true).unwrap();
        assert_eq!(a.id, b.id);
        assert_ne!(
            a.stored,
            zstd::bulk::compress(b"same content", ZSTD_LEVEL).unwrap()
        );
    }

    #[test]
    fn tampered_chunk_is_rejected() {
        let e = encode(b"hello world", false).unwrap();
        let mut bad = e.stored.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let err = decode(&e.id, &bad, None, 11).unwrap_err().to_string();
        assert!(
            err.contains(&e.id.to_hex()) && err.contains("hash mismatch"),
            "{err}"
        );
        assert!(decode(&e.id, &e.stored, None, 12).is_err());
    }

    fn err(r: Result<Vec<u8>>) -> String {
        match r {
            Ok(v) => panic!("decoded {} bytes, expected an error", v.len()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn claimed_size_is_bounded() {
        let e = encode(b"hello world", false).unwrap();
        for claim in [0, MAX_CHUNK_SIZE + 1, u32::MAX] {
            let msg = err(decode(&e.id, &e.stored, None, claim));
            assert!(
                msg.contains(&e.id.to_hex()) && msg.contains("claimed plaintext size"),
                "{msg}"
            );
        }
        // The largest allowed chunk decodes.
        let big = vec![7u8; MAX_CHUNK_SIZE as usize];
        let e = encode(&big, false).unwrap();
        assert_eq!(decode(&e.id, &e.stored, None, MAX_CHUNK_SIZE).unwrap(), big);
    }

    #[test]
    fn decompression_bomb_stops_at_the_claimed_size() {
        // 64 MiB of zeros compress to a few KiB; the chunk claims 4 KiB. The old decoder
        // preallocated whatever was claimed (up to 4 GiB); now the claim is capped and the
        // output never passes it (+1 probe byte).
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
        let id = ChunkId::of(&bomb);
        let msg = err(decode(&id, &bomb, None, 4096));
        assert!(
            msg.contains(&id.to_hex()) && msg.contains("more than the 4096 bytes"),
            "{msg}"
        );
        // A chunk that decodes to less than it claims is named too.
        let short = encode(&[1u8; 100], false).unwrap();
        let msg = err(decode(&short.id, &short.stored, None, 101));
        assert!(msg.contains("decoded to 100 bytes"), "{msg}");
    }

    #[test]
    fn oversized_stored_bytes_are_refused_before_anything_else() {
        let stored = vec![0u8; max_stored_size(1000) + 1];
        let id = ChunkId::of(&stored);
        let msg = err(decode(&id, &stored, None, 1000));
        assert!(msg.contains("stored bytes, more than"), "{msg}");
        let huge = vec![0u8; MAX_STORED_SIZE + 1];
        let msg = err(decode(&ChunkId::of(&huge), &huge, None, MAX_CHUNK_SIZE));
        assert!(msg.contains("stored bytes, more than"), "{msg}");
        // Incompressible data at the bound still fits (the bound is zstd's worst case).
        let mut x = 1u64;
        let noise: Vec<u8> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for enc in [false, true] {
            let e = encode(&noise, enc).unwrap();
            assert!(e.stored.len() <= max_stored_size(100_000));
            assert_eq!(
                decode(&e.id, &e.stored, e.key.as_ref(), 100_000).unwrap(),
                noise
            );
        }
    }
}
