//! Blocked chunks: a chunk stored as a hashed block table followed by independently compressed
//! (and, in an encrypted image, independently sealed) blocks, so that a small read fetches and
//! verifies the table and the few blocks it needs (two ranged reads) instead of the whole
//! chunk. Content-defined chunking is unchanged: equal chunk plaintexts still encode to equal
//! bytes and the same id, so versions of a tree still share chunks.
//!
//! # Stored layout
//!
//! | offset   | size   | field                                                          |
//! |---------:|-------:|----------------------------------------------------------------|
//! | 0        | 4      | magic `b"FLB1"`                                                |
//! | 4        | 4      | block size B, u32 LE: a power of two in [`MIN_BLOCK`]..=[`MAX_BLOCK`] |
//! | 8        | 4      | plaintext length L, u32 LE, 1..=[`MAX_CHUNK_SIZE`]             |
//! | 12       | 36 n   | per block: its stored length (u32 LE) and blake3 of its stored bytes |
//! | 12 + 36n | ...    | the n = ceil(L / B) blocks' stored bytes, in order             |
//!
//! The chunk id is blake3 of the table (bytes `0 .. 12 + 36n`), which commits to every block.
//! Block i holds plaintext bytes `[i B, min((i+1) B, L))`, stored as `zstd(plain)` or, with a
//! convergent key K (derived from the whole chunk's plaintext, as for whole chunks),
//! `AES-256-GCM(K, nonce = i as 12 LE bytes)(zstd(plain))`.
//!
//! A reader that knows B (from the image) and L (from the chunk reference) knows the table's
//! length before fetching it. Every claim is bounded before use: B and L as above (so
//! n <= 4096 and the table is at most [`MAX_TABLE_LEN`] bytes), each stored length at most
//! zstd's worst case for its block plus the AEAD tag, and a block is verified against its
//! hash before it is decrypted or decompressed.

use super::codec::{decompress_capped, max_stored_size, KEY_CONTEXT, ZSTD_LEVEL};
use super::{ChunkId, Encoded, MAX_CHUNK_SIZE};
use crate::error::{Error, Result};
use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce};

/// First bytes of a blocked chunk.
pub const BLOCK_MAGIC: [u8; 4] = *b"FLB1";
/// Smallest block size.
pub const MIN_BLOCK: u32 = 4 << 10;
/// Largest block size.
pub const MAX_BLOCK: u32 = 1 << 20;
/// Block size `pack` uses unless told otherwise.
pub const DEFAULT_BLOCK: u32 = 32 << 10;
const HEADER: usize = 12;
const ENTRY: usize = 36;
/// Largest table (the smallest blocks in the largest chunk).
pub const MAX_TABLE_LEN: usize = HEADER + ENTRY * (MAX_CHUNK_SIZE / MIN_BLOCK) as usize;

/// Checks a block size claimed by an image or a chunk.
pub fn check_block_size(block_size: u32) -> std::result::Result<(), String> {
    if block_size.is_power_of_two() && (MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        Ok(())
    } else {
        Err(format!(
            "block size {block_size} is not a power of two in {MIN_BLOCK}..={MAX_BLOCK}"
        ))
    }
}

/// Number of blocks of a chunk of `plain_len` bytes.
const fn block_count(block_size: u32, plain_len: u32) -> usize {
    plain_len.div_ceil(block_size) as usize
}

/// Length of the table of a chunk of `plain_len` bytes in blocks of `block_size`.
pub const fn table_len(block_size: u32, plain_len: u32) -> usize {
    HEADER + ENTRY * block_count(block_size, plain_len)
}

/// The most stored bytes a blocked chunk can have: its table plus each block's worst case.
pub const fn max_blocked_size(block_size: u32, plain_len: u32) -> usize {
    let full = (plain_len / block_size) as usize;
    let rest = plain_len % block_size;
    let mut n = table_len(block_size, plain_len) + full * max_stored_size(block_size);
    if rest > 0 {
        n += max_stored_size(rest);
    }
    n
}

fn bad(id: &ChunkId, reason: String) -> Error {
    Error::BadChunk {
        id: id.to_hex(),
        reason,
    }
}

/// Where one block lies in a blocked chunk and what it must hash to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockLoc {
    /// Offset of its stored bytes in the chunk.
    pub offset: u64,
    /// Length of its stored bytes.
    pub len: u32,
    /// Its plaintext length.
    pub plain_len: u32,
    pub hash: [u8; 32],
}

/// A verified block table.
#[derive(Clone, Debug)]
pub struct Table {
    pub block_size: u32,
    pub plain_len: u32,
    pub blocks: Vec<BlockLoc>,
}

impl Table {
    /// Parses and verifies `bytes`, the table of chunk `id`, which the image says holds
    /// `plain_len` bytes in blocks of `block_size`: it must hash to `id`, repeat those sizes,
    /// and each block's stored length must be within what its plaintext can encode to.
    pub fn parse(id: &ChunkId, block_size: u32, plain_len: u32, bytes: &[u8]) -> Result<Table> {
        check_block_size(block_size).map_err(|r| bad(id, r))?;
        if plain_len == 0 || plain_len > MAX_CHUNK_SIZE {
            return Err(bad(
                id,
                format!("claimed plaintext size {plain_len} is outside 1..={MAX_CHUNK_SIZE} bytes"),
            ));
        }
        let want = table_len(block_size, plain_len);
        if bytes.len() != want {
            return Err(bad(
                id,
                format!(
                    "block table is {} bytes, expected {want} for {plain_len} bytes in blocks of {block_size}",
                    bytes.len()
                ),
            ));
        }
        let actual = ChunkId::of(bytes);
        if &actual != id {
            return Err(bad(
                id,
                format!("block table hash mismatch: it hashes to {actual}"),
            ));
        }
        let word = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        if bytes[..4] != BLOCK_MAGIC || word(4) != block_size || word(8) != plain_len {
            return Err(bad(
                id,
                format!(
                    "block table header (block size {}, length {}) does not match the image (block size {block_size}, length {plain_len})",
                    word(4),
                    word(8)
                ),
            ));
        }
        let mut offset = want as u64;
        let mut blocks = Vec::with_capacity(block_count(block_size, plain_len));
        for (i, e) in bytes[HEADER..].chunks_exact(ENTRY).enumerate() {
            let len = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let start = i as u64 * u64::from(block_size);
            let block_plain = (u64::from(plain_len) - start).min(u64::from(block_size)) as u32;
            let max = max_stored_size(block_plain);
            if len == 0 || len as usize > max {
                return Err(bad(
                    id,
                    format!("block {i} claims {len} stored bytes, outside 1..={max} for {block_plain} plaintext bytes"),
                ));
            }
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&e[4..]);
            blocks.push(BlockLoc {
                offset,
                len,
                plain_len: block_plain,
                hash,
            });
            offset += u64::from(len);
        }
        Ok(Table {
            block_size,
            plain_len,
            blocks,
        })
    }

    /// Total stored length of the chunk.
    pub fn stored_len(&self) -> u64 {
        self.blocks
            .last()
            .map_or(0, |b| b.offset + u64::from(b.len))
    }

    /// Verifies `stored` (block `i`'s stored bytes) and decodes it to its plaintext.
    pub fn decode_block(
        &self,
        id: &ChunkId,
        i: usize,
        stored: &[u8],
        key: Option<&[u8; 32]>,
    ) -> Result<Vec<u8>> {
        let b = self.blocks.get(i).ok_or_else(|| {
            bad(
                id,
                format!("no block {i} (the chunk has {})", self.blocks.len()),
            )
        })?;
        let start = i as u64 * u64::from(self.block_size);
        let at = || {
            format!(
                "block {i} (chunk bytes {start}..{})",
                start + u64::from(b.plain_len)
            )
        };
        if stored.len() != b.len as usize || blake3::hash(stored).as_bytes() != &b.hash {
            return Err(bad(id, format!("{}: hash mismatch", at())));
        }
        let decrypted;
        let compressed: &[u8] = match key {
            None => stored,
            Some(k) => {
                decrypted = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(k))
                    .decrypt(Nonce::from_slice(&nonce(i)), stored)
                    .map_err(|_| bad(id, format!("{}: decryption failed", at())))?;
                &decrypted
            }
        };
        decompress_capped(compressed, b.plain_len as usize)
            .map_err(|e| bad(id, format!("{}: {e}", at())))
    }
}

/// The name block `i` of chunk `id` is cached under (its decoded plaintext, in memory and in
/// the plaintext cache): distinct from every chunk id and from every other block.
pub fn block_key(id: &ChunkId, i: usize) -> ChunkId {
    let mut h = blake3::Hasher::new_derive_key("flist-fs 2026 block of a chunk v1");
    h.update(&id.0);
    h.update(&(i as u64).to_le_bytes());
    ChunkId(*h.finalize().as_bytes())
}

fn nonce(i: usize) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&(i as u64).to_le_bytes());
    n
}

/// Encodes `plain` as a blocked chunk of `block_size` blocks (convergently encrypted when
/// `encrypt`).
pub fn encode_blocked(plain: &[u8], block_size: u32, encrypt: bool) -> Result<Encoded> {
    let fail = |reason: String| Error::BadChunk {
        id: "<new>".into(),
        reason,
    };
    check_block_size(block_size).map_err(fail)?;
    let plain_len = u32::try_from(plain.len())
        .ok()
        .filter(|n| (1..=MAX_CHUNK_SIZE).contains(n))
        .ok_or_else(|| fail(format!("chunk of {} bytes", plain.len())))?;
    let key = encrypt.then(|| blake3::derive_key(KEY_CONTEXT, plain));
    let cipher = key.map(|k| Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&k)));
    let mut table = Vec::with_capacity(table_len(block_size, plain_len));
    table.extend_from_slice(&BLOCK_MAGIC);
    table.extend_from_slice(&block_size.to_le_bytes());
    table.extend_from_slice(&plain_len.to_le_bytes());
    let mut body = Vec::new();
    for (i, block) in plain.chunks(block_size as usize).enumerate() {
        let mut stored = zstd::bulk::compress(block, ZSTD_LEVEL)
            .map_err(|e| fail(format!("zstd compression failed: {e}")))?;
        if let Some(c) = &cipher {
            stored = c
                .encrypt(Nonce::from_slice(&nonce(i)), stored.as_slice())
                .map_err(|_| fail("encryption failed".into()))?;
        }
        table.extend_from_slice(&(stored.len() as u32).to_le_bytes());
        table.extend_from_slice(blake3::hash(&stored).as_bytes());
        body.extend_from_slice(&stored);
    }
    let id = ChunkId::of(&table);
    table.extend_from_slice(&body);
    Ok(Encoded {
        id,
        stored: table,
        key,
    })
}

/// Whether `stored` is the blocked form of chunk `id`'s bytes (not a whole chunk that happens
/// to start with the magic).
pub(super) fn is_blocked(id: &ChunkId, stored: &[u8]) -> bool {
    stored.starts_with(&BLOCK_MAGIC) && &ChunkId::of(stored) != id
}

/// Parses the table at the start of the whole stored bytes of blocked chunk `id`, taking its
/// sizes from its header (bounded like any claim), and checks the stored length.
fn table_of(id: &ChunkId, stored: &[u8], plain_len: Option<u32>) -> Result<Table> {
    if stored.len() < HEADER {
        return Err(bad(id, "shorter than a block table header".into()));
    }
    let word = |at: usize| {
        u32::from_le_bytes([stored[at], stored[at + 1], stored[at + 2], stored[at + 3]])
    };
    let (block_size, len) = (word(4), word(8));
    if let Some(expected) = plain_len {
        if expected != len {
            return Err(bad(
                id,
                format!("holds {len} plaintext bytes, the image says {expected}"),
            ));
        }
    }
    check_block_size(block_size).map_err(|r| bad(id, r))?;
    if len == 0 || len > MAX_CHUNK_SIZE {
        return Err(bad(
            id,
            format!("claimed plaintext size {len} is outside 1..={MAX_CHUNK_SIZE} bytes"),
        ));
    }
    let tl = table_len(block_size, len);
    let table = Table::parse(id, block_size, len, stored.get(..tl).unwrap_or(stored))?;
    if table.stored_len() != stored.len() as u64 {
        return Err(bad(
            id,
            format!(
                "{} stored bytes, its block table says {}",
                stored.len(),
                table.stored_len()
            ),
        ));
    }
    Ok(table)
}

/// Verifies every block of the whole stored bytes of blocked chunk `id`.
pub(super) fn verify_blocked(id: &ChunkId, stored: &[u8]) -> Result<()> {
    let table = table_of(id, stored, None)?;
    for (i, b) in table.blocks.iter().enumerate() {
        let bytes = &stored[b.offset as usize..b.offset as usize + b.len as usize];
        if blake3::hash(bytes).as_bytes() != &b.hash {
            return Err(bad(id, format!("block {i}: hash mismatch")));
        }
    }
    Ok(())
}

/// Verifies and decodes the whole stored bytes of blocked chunk `id` (`plain_len` bytes).
pub(super) fn decode_blocked(
    id: &ChunkId,
    stored: &[u8],
    key: Option<&[u8; 32]>,
    plain_len: u32,
) -> Result<Vec<u8>> {
    let table = table_of(id, stored, Some(plain_len))?;
    let mut plain = Vec::with_capacity(plain_len as usize);
    for (i, b) in table.blocks.iter().enumerate() {
        let bytes = &stored[b.offset as usize..b.offset as usize + b.len as usize];
        plain.extend_from_slice(&table.decode_block(id, i, bytes, key)?);
    }
    if let Some(k) = key {
        if &blake3::derive_key(KEY_CONTEXT, &plain) != k {
            return Err(bad(
                id,
                "plaintext does not match its convergent key".into(),
            ));
        }
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{decode, verify_stored};

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 3 == 0 {
                    b'a'
                } else {
                    x as u8
                }
            })
            .collect()
    }

    #[test]
    fn roundtrip_whole_and_by_block() {
        let data = noise(100_000, 5);
        for enc in [false, true] {
            let e = encode_blocked(&data, 4096, enc).unwrap();
            assert_eq!(e.key.is_some(), enc);
            // The same plaintext always encodes to the same id (dedup).
            assert_eq!(encode_blocked(&data, 4096, enc).unwrap().id, e.id);
            verify_stored(&e.id, &e.stored).unwrap();
            let key = e.key.as_ref();
            assert_eq!(decode(&e.id, &e.stored, key, 100_000).unwrap(), data);
            let tl = table_len(4096, 100_000);
            let t = Table::parse(&e.id, 4096, 100_000, &e.stored[..tl]).unwrap();
            assert_eq!(t.blocks.len(), 25);
            assert_eq!(t.stored_len(), e.stored.len() as u64);
            for i in [0, 7, 24] {
                let b = &t.blocks[i];
                let bytes = &e.stored[b.offset as usize..(b.offset + u64::from(b.len)) as usize];
                let start = i * 4096;
                let end = (start + 4096).min(data.len());
                assert_eq!(
                    t.decode_block(&e.id, i, bytes, key).unwrap(),
                    &data[start..end]
                );
            }
        }
    }

    #[test]
    fn a_bad_block_or_table_is_refused_naming_it() {
        let data = noise(50_000, 9);
        let e = encode_blocked(&data, 8192, false).unwrap();
        let tl = table_len(8192, 50_000);
        let t = Table::parse(&e.id, 8192, 50_000, &e.stored[..tl]).unwrap();
        // One flipped bit in block 3.
        let b = t.blocks[3].clone();
        let mut stored = e.stored.clone();
        stored[b.offset as usize + 1] ^= 1;
        let bytes = &stored[b.offset as usize..(b.offset + u64::from(b.len)) as usize];
        let msg = t
            .decode_block(&e.id, 3, bytes, None)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(&e.id.to_hex())
                && msg.contains("block 3 (chunk bytes 24576..32768): hash mismatch"),
            "{msg}"
        );
        assert!(verify_stored(&e.id, &stored).is_err());
        assert!(decode(&e.id, &stored, None, 50_000).is_err());
        // A table that does not hash to the id, or claims other sizes than the image.
        let mut table = e.stored[..tl].to_vec();
        table[20] ^= 1;
        let msg = Table::parse(&e.id, 8192, 50_000, &table)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("block table hash mismatch"), "{msg}");
        for (bs, len, words) in [
            (4096, 50_000, "expected"),
            (8192, 50_001, "does not match the image"),
            (8192, 60_000, "expected"),
            (3000, 50_000, "power of two"),
            (8192, 0, "outside"),
            (8192, MAX_CHUNK_SIZE + 1, "outside"),
        ] {
            let msg = Table::parse(&e.id, bs, len, &e.stored[..tl])
                .unwrap_err()
                .to_string();
            assert!(msg.contains(words), "{bs} {len}: {msg}");
        }
    }

    /// A table a hostile packer wrote: hashes to its id, but lies.
    fn forged(block_size: u32, plain_len: u32, lens: &[u32]) -> (ChunkId, Vec<u8>) {
        let mut t = BLOCK_MAGIC.to_vec();
        t.extend_from_slice(&block_size.to_le_bytes());
        t.extend_from_slice(&plain_len.to_le_bytes());
        for l in lens {
            t.extend_from_slice(&l.to_le_bytes());
            t.extend_from_slice(&[0u8; 32]);
        }
        (ChunkId::of(&t), t)
    }

    #[test]
    fn hostile_tables_are_refused() {
        // A block claiming more stored bytes than any 4 KiB block encodes to.
        let (id, t) = forged(4096, 8192, &[100, u32::MAX]);
        let msg = Table::parse(&id, 4096, 8192, &t).unwrap_err().to_string();
        assert!(
            msg.contains("block 1 claims 4294967295 stored bytes"),
            "{msg}"
        );
        let (id, t) = forged(4096, 8192, &[0, 10]);
        assert!(Table::parse(&id, 4096, 8192, &t)
            .unwrap_err()
            .to_string()
            .contains("block 0 claims 0"));
        // Header fields that disagree with the image.
        let (id, t) = forged(8192, 8192, &[10]);
        let msg = Table::parse(&id, 4096, 8192, &t).unwrap_err().to_string();
        assert!(msg.contains("expected"), "{msg}");
        let (id, t) = forged(4096, 4096, &[10]);
        let msg = Table::parse(&id, 4096, 4000, &t).unwrap_err().to_string();
        assert!(msg.contains("does not match the image"), "{msg}");
        // Whole stored bytes with a header claiming huge sizes: refused before any allocation.
        let mut whole = BLOCK_MAGIC.to_vec();
        whole.extend_from_slice(&4096u32.to_le_bytes());
        whole.extend_from_slice(&u32::MAX.to_le_bytes());
        let id = ChunkId::of(b"something else");
        assert!(verify_stored(&id, &whole)
            .unwrap_err()
            .to_string()
            .contains("outside"));
        whole.truncate(6);
        assert!(verify_stored(&id, &whole).is_err());
        // The largest table is bounded.
        assert_eq!(table_len(MIN_BLOCK, MAX_CHUNK_SIZE), MAX_TABLE_LEN);
        assert!(max_blocked_size(MIN_BLOCK, MAX_CHUNK_SIZE) <= crate::chunk::MAX_STORED_SIZE);
    }
}
