//! Opening an image for reading: read and validate the metadata, build the router (from the
//! image's recorded stores, as the node's store policy allows, or caller-supplied ones) and
//! attach the shared chunk cache.

use crate::cache::ChunkCache;
use crate::error::Result;
use crate::fetch::ChunkSource;
use crate::meta::{read_image, Image};
use crate::store::{Router, StorePolicy};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Default cache bound: 10 GiB.
pub const DEFAULT_CACHE_BYTES: u64 = 10 << 30;

#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Store specs (`[SS-EE=]URL`) replacing the image's recorded stores; empty = use those.
    pub stores: Vec<String>,
    /// The node's store allowlist: with one, the image's routes are opened only as it allows
    /// (and with its credentials); `None` opens them as recorded (for one's own images).
    /// Not consulted when `stores` is given.
    pub policy: Option<StorePolicy>,
    /// Chunk cache directory; `None` disables the disk cache. Opened once per process (see
    /// [`ChunkCache::shared`]), its evictor in the background.
    pub cache_dir: Option<PathBuf>,
    pub cache_max_bytes: u64,
    /// A cache the caller opened (and started the evictor of), used instead of `cache_dir`.
    pub cache: Option<Arc<ChunkCache>>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            stores: Vec::new(),
            policy: None,
            cache_dir: None,
            cache_max_bytes: DEFAULT_CACHE_BYTES,
            cache: None,
        }
    }
}

/// Reads the image at `path` and prepares a chunk source for it.
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<(Arc<Image>, Arc<ChunkSource>)> {
    let image = read_image(path)?;
    let source = source_for(&image, opts)?;
    Ok((Arc::new(image), Arc::new(source)))
}

/// A chunk source for `image` according to `opts`.
pub fn source_for(image: &Image, opts: &OpenOptions) -> Result<ChunkSource> {
    let router = match (&opts.policy, opts.stores.is_empty()) {
        (_, false) => Router::from_specs(&opts.stores)?,
        (Some(policy), true) => policy.open_routes(&image.routes)?,
        (None, true) => Router::from_routes(&image.routes)?,
    };
    let cache = match (&opts.cache, &opts.cache_dir) {
        (Some(cache), _) => Some(cache.clone()),
        (None, Some(d)) => Some(ChunkCache::shared(d, opts.cache_max_bytes, None)?),
        (None, None) => None,
    };
    Ok(ChunkSource::new(router, cache).with_blocks(image.block_size, image.tables.clone()))
}

/// Reads the image at `path` and prepares a chunk source that asks the node's chunk fetcher
/// through `client` (see [`crate::fetcher`]). With `policy`, the image must name at least
/// one store it allows, as for a local source (the fetcher itself only reads from its own
/// allowlist).
pub fn open_image_remote(
    path: &Path,
    client: Arc<crate::fetcher::client::FetcherClient>,
    policy: Option<&StorePolicy>,
) -> Result<(Arc<Image>, Arc<ChunkSource>)> {
    let image = read_image(path)?;
    if let Some(policy) = policy {
        policy.check_routes(&image.routes)?;
    }
    let source = ChunkSource::remote(client).with_blocks(image.block_size, image.tables.clone());
    Ok((Arc::new(image), Arc::new(source)))
}
