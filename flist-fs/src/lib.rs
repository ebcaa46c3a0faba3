//! Content-addressed images (flists): pack a directory tree into a small metadata file plus
//! content-defined, compressed, optionally convergently encrypted chunks kept in stores; fetch
//! chunks lazily through a shared verified cache; expose the tree read-only through
//! [`fs::FlistFs`], a `fuse_backend_rs` `FileSystem` usable by a host FUSE mount and by a
//! virtio-fs device alike.
//!
//! The image format is documented in [`meta`]. Store URLs are documented in [`store`].

pub mod cache;
pub mod chunk;
pub mod error;
pub mod fetch;
pub mod fs;
pub mod meta;
pub mod oci;
pub mod open;
pub mod pack;
pub mod store;
pub mod unpack;
pub mod verify;

pub use error::{Error, Result};
