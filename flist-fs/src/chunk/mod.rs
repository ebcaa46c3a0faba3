//! Chunks: the content-addressed unit of file data. Owns chunk ids, the encode/decode
//! pipeline (zstd, optional convergent encryption, id verification) and the chunkers.

mod codec;
mod id;
mod splitter;

pub use codec::{decode, encode, verify_stored, Encoded};
pub use id::ChunkId;
pub use splitter::{Chunker, ChunkerKind, CDC_AVG, CDC_MAX, CDC_MIN};
