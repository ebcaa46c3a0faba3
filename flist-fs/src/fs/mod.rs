//! The read-only filesystem over (metadata, router, cache): [`FlistFs`] implements
//! `fuse_backend_rs::api::filesystem::FileSystem`, so the same object serves the host FUSE
//! mount ([`mount`]) and a VMM's virtio-fs device. Inode numbers are the image's inode numbers
//! (root = 1), hence stable for the life of a mount. Reads fetch only the chunks covering the
//! requested range; a chunk that fails verification or cannot be fetched yields EIO.
//!
//! Use from a virtio-fs device (the crate knows nothing of the VMM; this is the whole contract):
//!
//! ```no_run
//! use flist_fs::fs::FlistFs;
//! use flist_fs::open::OpenOptions;
//! use std::path::Path;
//!
//! let opts = OpenOptions {
//!     stores: vec![],                      // empty: use the stores recorded in the image
//!     policy: None,                        // a node passes its StorePolicy (allowlist)
//!     cache_dir: Some("/var/cache/flist".into()),
//!     cache_max_bytes: 10 << 30,
//!     cache: None,                         // or a cache opened (and evicted) by the caller
//! };
//! let fs = FlistFs::open(Path::new("/images/ubuntu.flist"), &opts).unwrap();
//! // `fs` implements fuse_backend_rs::api::filesystem::FileSystem (Inode = Handle = u64):
//! // wrap it in fuse_backend_rs::api::server::Server::new(fs) and feed virtio-fs requests
//! // to Server::handle_message, exactly as `mount.rs` does with /dev/fuse.
//! ```

mod attr;
#[cfg(feature = "fusedev")]
mod fuse_channel;
mod guest_sink;
#[cfg(feature = "fusedev")]
pub mod mount;
mod ops;

use crate::error::Result;
use crate::fetch::ChunkSource;
use crate::meta::Image;
use crate::open::{open_image, OpenOptions};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How long the kernel may cache attributes and entries: images never change.
pub const ATTR_TIMEOUT: Duration = Duration::from_secs(3600);

/// A read-only filesystem view of one image.
pub struct FlistFs {
    image: Arc<Image>,
    source: Arc<ChunkSource>,
}

impl FlistFs {
    /// A filesystem over an already loaded image and chunk source.
    pub fn new(image: Arc<Image>, source: Arc<ChunkSource>) -> Self {
        FlistFs { image, source }
    }

    /// Reads the image at `path` and wires its stores (or `opts.stores`) and cache.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Self> {
        let (image, source) = open_image(path, opts)?;
        Ok(FlistFs::new(image, source))
    }

    /// Reads the image at `path`; its chunks are asked of the node's chunk fetcher through
    /// `client` (see [`crate::open::open_image_remote`] for `policy`).
    pub fn open_remote(
        path: &Path,
        client: Arc<crate::fetcher::client::FetcherClient>,
        policy: Option<&crate::store::StorePolicy>,
    ) -> Result<Self> {
        let (image, source) = crate::open::open_image_remote(path, client, policy)?;
        Ok(FlistFs::new(image, source))
    }

    pub fn image(&self) -> &Image {
        &self.image
    }

    pub fn source(&self) -> &ChunkSource {
        &self.source
    }
}

/// An image can be the read-only lower layer of fuse-backend-rs's overlay filesystem (a
/// workload's writable layer on top of its image).
impl fuse_backend_rs::api::filesystem::Layer for FlistFs {
    fn root_inode(&self) -> u64 {
        fuse_backend_rs::api::filesystem::ROOT_ID
    }
}
