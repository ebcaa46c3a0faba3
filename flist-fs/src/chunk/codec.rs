//! Encode/decode of one chunk: plaintext -> zstd -> (optional) AES-256-GCM with a convergent
//! key -> stored bytes whose blake3 is the chunk id. Decoding verifies the id first, then the
//! AEAD tag, the decompressed length and (when encrypted) that the key matches the plaintext.

use super::ChunkId;
use crate::error::{Error, Result};
use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce};

const ZSTD_LEVEL: i32 = 3;
const KEY_CONTEXT: &str = "flist-fs 2025 convergent chunk key v1";

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

/// Checks that `stored` hashes to `id`.
pub fn verify_stored(id: &ChunkId, stored: &[u8]) -> Result<()> {
    let actual = ChunkId::of(stored);
    if &actual != id {
        return Err(Error::BadChunk {
            id: id.to_hex(),
            reason: format!("hash mismatch: content hashes to {actual}"),
        });
    }
    Ok(())
}

/// Verifies and decodes stored bytes back to the plaintext of length `plain_len`.
pub fn decode(
    id: &ChunkId,
    stored: &[u8],
    key: Option<&[u8; 32]>,
    plain_len: u32,
) -> Result<Vec<u8>> {
    verify_stored(id, stored)?;
    let bad = |reason: String| Error::BadChunk {
        id: id.to_hex(),
        reason,
    };
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
    let plain = zstd::bulk::decompress(compressed, plain_len as usize)
        .map_err(|e| bad(format!("zstd decompression failed: {e}")))?;
    if plain.len() != plain_len as usize {
        return Err(bad(format!(
            "decoded to {} bytes, metadata says {plain_len}",
            plain.len()
        )));
    }
    if let Some(k) = key {
        if &blake3::derive_key(KEY_CONTEXT, &plain) != k {
            return Err(bad("plaintext does not match its convergent key".into()));
        }
    }
    Ok(plain)
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
}
