//! The image metadata format ("flist"): types, the on-disk encoding, validation, path lookup
//! and diff. An image is readable without any chunk (list, stat, diff work offline).
//!
//! # File layout (version 1)
//!
//! | offset | size | field                                                        |
//! |-------:|-----:|--------------------------------------------------------------|
//! | 0      | 8    | magic `b"FLISTFS\n"`                                         |
//! | 8      | 4    | format version, u32 little endian (currently 1)              |
//! | 12     | 4    | flags, u32 LE (0; reserved)                                  |
//! | 16     | 8    | payload length N, u64 LE                                     |
//! | 24     | 32   | blake3 of the payload                                        |
//! | 56     | N    | payload: zstd( postcard( [`Image`] ) )                       |
//!
//! A reader checks magic, version, the exact length (so truncation is reported as such) and the
//! checksum before decoding, then validates the tree (see `validate.rs`).
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
//! A chunk's stored bytes are `zstd(plaintext)` or, encrypted,
//! `AES-256-GCM(key = blake3::derive_key(ctx, plaintext), nonce = 0)(zstd(plaintext))`; the
//! chunk id is blake3 of the stored bytes and is verified on every read. Note that for an
//! encrypted image the per-chunk keys live in the image file, so the image itself is the read
//! capability (as with rfs): share it like a secret; stores only ever see ciphertext.

mod codec;
mod diff;
mod tree;
mod types;
mod validate;

pub use codec::{decode_image, encode_image, read_image, write_image_atomic, MAGIC, VERSION};
pub use diff::{diff, Change, ChangeKind};
pub use types::{ChunkRef, DirEntry, Image, Inode, InodeKind, Route, Timestamp, Xattr, ROOT_INO};
pub(crate) use validate::validate;
