//! Chunks: the content-addressed unit of file data. Owns chunk ids, the encode/decode
//! pipeline (zstd, optional convergent encryption, id verification), whole or in blocks that
//! can be fetched and verified one by one ([`blocks`]), and the chunkers.
//!
//! Size limits (an image is written by an untrusted party; every size it claims is bounded):
//! a chunk's plaintext is at most [`MAX_CHUNK_SIZE`] (16 MiB, the largest chunk either chunker
//! can make: FastCDC's maximum `max`, and the largest fixed size `pack --fixed-kib` accepts),
//! and its stored bytes at most [`max_stored_size`] of that (zstd's worst-case expansion plus
//! the AEAD tag).

pub mod blocks;
mod codec;
mod id;
mod splitter;

pub use codec::{decode, encode, max_stored_size, verify_stored, Encoded, MAX_STORED_SIZE};
pub use id::ChunkId;
pub use splitter::{Chunker, ChunkerKind, CDC_AVG, CDC_MAX, CDC_MIN};

/// Largest plaintext a chunk may have (16 MiB): images claiming more are rejected, and
/// decoding never produces (or allocates) more than this.
pub const MAX_CHUNK_SIZE: u32 = fastcdc::v2020::MAXIMUM_MAX;
