//! The image metadata format ("flist"): types, the on-disk encoding, validation, path lookup
//! and diff. An image is readable without any chunk (list, stat, diff work offline).
//!
//! # File layout (versions 1 and 2)
//!
//! | offset | size | field                                                        |
//! |-------:|-----:|--------------------------------------------------------------|
//! | 0      | 8    | magic `b"FLISTFS\n"`                                         |
//! | 8      | 4    | format version, u32 little endian: 1 or 2                    |
//! | 12     | 4    | flags, u32 LE (0; reserved)                                  |
//! | 16     | 8    | payload length N, u64 LE                                     |
//! | 24     | 32   | blake3 of the payload                                        |
//! | 56     | N    | payload: zstd( postcard( [`Image`] ) ++ in version 2 only, the block tables below ) |
//!
//! Version 1 images have whole chunks; version 2 images have blocked chunks (see
//! [`crate::chunk::blocks`]), and after the postcard tables: the block size (u32 LE, a power
//! of two, 4 KiB to 1 MiB), the number of block tables (u32 LE), then per table the chunk id
//! (32 bytes), its length (u32 LE, at most [`crate::chunk::blocks::MAX_TABLE_LEN`]) and the
//! table (the first bytes of the stored chunk). A table must hash to its chunk id, describe
//! that chunk's size in the image's blocks and belong to a chunk some file uses; a chunk
//! without one has its table fetched from the stores. With the table at hand, a small read is
//! one ranged read of its block (36 bytes of metadata per block: about 0.1% of the data with
//! 32 KiB blocks). An image of whole chunks is written as version 1, so older readers still
//! read it.
//!
//! A reader checks magic, version, the exact length (so truncation is reported as such) and the
//! checksum before decoding, then validates the tree (see `validate.rs`).
//!
//! # Limits
//!
//! An image is written by an untrusted tenant, so every size it claims is bounded before
//! anything of that size is allocated; an image past any limit is refused, naming the limit
//! (and the inode):
//!
//! | what                                   | limit                                  |
//! |----------------------------------------|----------------------------------------|
//! | payload N (compressed)                 | [`MAX_PAYLOAD`] = 64 MiB               |
//! | decompressed payload                   | [`MAX_RAW_PAYLOAD`] = 256 MiB (streamed, never allocated past) |
//! | in-memory tables while decoding        | [`MAX_DECODED_MEMORY`] = 1 GiB (each list element counted at its in-memory size) |
//! | inodes                                 | [`MAX_INODES`] = 4 Mi                   |
//! | entries of one directory               | [`MAX_DIR_ENTRIES`] = 1 Mi              |
//! | entries of all directories             | [`MAX_TOTAL_ENTRIES`] = 8 Mi            |
//! | entry name                             | [`MAX_NAME_LEN`] = 255 bytes (`NAME_MAX`) |
//! | path of any entry (`/a/b/...`)         | [`MAX_PATH_LEN`] = 4095 bytes (`PATH_MAX` - 1), hence depth <= 2047 |
//! | symlink target                         | [`MAX_TARGET_LEN`] = 4095 bytes         |
//! | xattrs of one inode                    | [`MAX_XATTRS`] = 1024, names list <= [`MAX_XATTR_LIST`] = 64 KiB (`XATTR_LIST_MAX`) |
//! | xattr name / value                     | 1..=[`MAX_XATTR_NAME`] = 255 / [`MAX_XATTR_VALUE`] = 64 KiB (`XATTR_SIZE_MAX`) |
//! | chunk plaintext                        | [`crate::chunk::MAX_CHUNK_SIZE`] = 16 MiB |
//! | file size                              | the sum of its chunks, no overflow      |
//!
//! # The `Image` payload
//!
//! * `tags`: free-form `name`, `version`, `author`, ... (string map).
//! * `routes`: store URLs with the id range (first byte of the chunk id, inclusive) each one
//!   serves. URLs never carry credentials: userinfo and secret query parameters are stripped
//!   when an image is written; credentials come from the environment at read time.
//! * `chunker`: how files were split (FastCDC min/avg/max or fixed size), informational.
//! * `encrypted`: whether chunks use convergent encryption.
//! * `inodes`: inode number `n` is `inodes[n - 1]`; inode 1 is the root directory. Each inode
//!   has kind (file, dir, symlink, char/block device, fifo, socket), permission bits, uid, gid,
//!   size, mtime, ctime, rdev, xattrs, the symlink target, for files the ordered chunk list
//!   (id, offset in the file, plaintext size, convergent key if encrypted), and for
//!   directories the entries sorted by name. Hard links are several entries naming the same
//!   inode (the link count is derived).
//!
//! # Chunks
//!
//! A whole chunk's stored bytes (version 1) are `zstd(plaintext)` or, encrypted,
//! `AES-256-GCM(key = blake3::derive_key(ctx, plaintext), nonce = 0)(zstd(plaintext))`; the
//! chunk id is blake3 of the stored bytes and is verified on every read. A blocked chunk
//! (version 2) is a block table and the blocks, each compressed (and sealed with the same key,
//! nonce = block index) on its own; its id is blake3 of the table, which holds each block's
//! stored length and blake3, so a reader verifies a block without the rest of the chunk. Note that for an
//! encrypted image the per-chunk keys live in the image file, so the image itself is the read
//! capability (as with rfs): share it like a secret; stores only ever see ciphertext.

mod budget;
mod codec;
mod diff;
mod tree;
mod types;
mod validate;

pub use codec::{
    decode_image, encode_image, encode_unvalidated, read_image, write_image_atomic, MAGIC, VERSION,
};
pub use diff::{diff, Change, ChangeKind};
pub use types::{ChunkRef, DirEntry, Image, Inode, InodeKind, Route, Timestamp, Xattr, ROOT_INO};
pub(crate) use validate::validate;

/// Largest compressed payload (header field N) a reader accepts.
pub const MAX_PAYLOAD: u64 = 64 << 20;
/// Largest decompressed payload (the postcard bytes) a reader produces.
pub const MAX_RAW_PAYLOAD: u64 = 256 << 20;
/// Budget for the decoded tables (inodes, chunk lists, entries, xattrs, routes, tags), each
/// element counted at its in-memory size; bounds the expansion from compact postcard.
pub const MAX_DECODED_MEMORY: u64 = 1 << 30;
/// Most inodes in an image.
pub const MAX_INODES: usize = 4 << 20;
/// Most entries in one directory.
pub const MAX_DIR_ENTRIES: usize = 1 << 20;
/// Most directory entries in the whole image.
pub const MAX_TOTAL_ENTRIES: usize = 8 << 20;
/// Longest entry name (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;
/// Longest path of an entry from the root, `/` separators included (Linux `PATH_MAX` - 1).
pub const MAX_PATH_LEN: usize = 4095;
/// Longest symlink target (Linux `PATH_MAX` - 1).
pub const MAX_TARGET_LEN: usize = 4095;
/// Most xattrs on one inode.
pub const MAX_XATTRS: usize = 1024;
/// Longest xattr name (Linux `XATTR_NAME_MAX`).
pub const MAX_XATTR_NAME: usize = 255;
/// Largest xattr value (Linux `XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE: usize = 64 << 10;
/// Largest NUL-separated xattr name list of one inode (Linux `XATTR_LIST_MAX`).
pub const MAX_XATTR_LIST: usize = 64 << 10;
