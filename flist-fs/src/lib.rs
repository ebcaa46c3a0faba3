//! Content-addressed images (flists): pack a directory tree into a small metadata file plus
//! content-defined, compressed, optionally convergently encrypted chunks kept in stores, each
//! stored as verifiable blocks so a small read fetches a block, not the chunk; fetch lazily
//! through a shared verified cache; expose the tree read-only through
//! [`fs::FlistFs`], a `fuse_backend_rs` `FileSystem` usable by a host FUSE mount and by a
//! virtio-fs device alike.
//!
//! The image format is documented in [`meta`]. Store URLs are documented in [`store`].
//!
//! An image is untrusted input (a tenant writes it): every size it claims is bounded before
//! anything of that size is allocated (see "Limits" in [`meta`] and [`chunk::MAX_CHUNK_SIZE`]).
//! The local cache is shared by every VM on a node; cached plaintexts are authenticated with a
//! per-node key kept beside the cache directory (`DIR.key`, see [`cache`]).
//!
//! The `flist` command line:
//!
//! ```text
//! flist pack DIR -o IMAGE --store URL... [--encrypt] [--fixed-kib N] [--block-kib N] [--tag k=v]
//! flist import OCI_DIR_OR_TAR -o IMAGE --store URL... [--reference REF]
//! flist unpack IMAGE DIR            flist mount IMAGE MOUNTPOINT
//! flist ls IMAGE [PATH] [-l] [-R]   flist stat IMAGE PATH    flist cat IMAGE PATH
//! flist diff A B                    flist verify IMAGE       flist info IMAGE
//! flist set-stores IMAGE --store URL...
//! ```
//!
//! On a node, `chunk-fetcher --listen SOCK --cache DIR --cache-max-bytes N --store URL...`
//! (or `--config node.json`) is the one process that fetches chunks and owns the cache; the
//! vmm processes read through it ([`fetcher`]).
//!
//! Reading commands take `--store` (override the image's stores), `--cache DIR`,
//! `--cache-mib N` and `--no-cache`; `FLIST_LOG=debug` turns on logging. A store spec may be
//! prefixed with an id range, `00-7f=URL`: overlapping ranges replicate on write and fail over
//! on read.

pub mod cache;
pub mod chunk;
pub mod dirfd;
pub mod error;
pub mod fetch;
pub mod fetcher;
pub mod fs;
pub mod meta;
pub mod oci;
pub mod open;
pub mod pack;
mod par;
pub mod store;
pub mod unpack;
pub mod verify;

pub use error::{Error, Result};

/// What a background thread of this crate (a chunk fetcher client's I/O thread, a cache's
/// evictor) runs first; it ends at once if this fails. A vmm installs the thread's seccomp
/// filter there.
pub type ThreadStart = std::sync::Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;
