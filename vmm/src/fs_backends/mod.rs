//! The filesystems the virtio-fs device serves, built from the spec: a host directory
//! (passthrough, optionally read-only), an flist image (read-only, chunks fetched lazily
//! through the shared cache), or an flist image under a writable layer kept in a host
//! directory (fuse-backend-rs's overlay: copy-up on write, whiteouts, opaque directories).
//! Every share is served through one `Guard` (name-length check, read-only policy).

mod guard;
#[cfg(test)]
mod tests;
mod upper_layer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flist_fs::fs::FlistFs;
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::overlayfs::config::Config as OverlayConfig;
use fuse_backend_rs::overlayfs::{BoxedLayer, OverlayFs};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};

pub use guard::Guard;

use crate::config::{FsSpec, ImageSettings};
use crate::devices::virtio::fs::FsDevice;
use crate::devices::virtio::VirtioDevice;

/// Where image chunks are cached when the spec does not say.
pub const DEFAULT_IMAGE_CACHE: &str = "/var/cache/gridnode/chunks";
/// Bound of the chunk cache.
const IMAGE_CACHE_MAX_BYTES: u64 = 10 << 30;

#[derive(Debug, thiserror::Error)]
pub enum FsBackendError {
    #[error("cannot share {path} as virtio-fs tag {tag:?}: {source}")]
    Dir {
        tag: String,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open image {path} for virtio-fs tag {tag:?}: {source}")]
    Image {
        tag: String,
        path: String,
        source: flist_fs::Error,
    },
    #[error("cannot set up the writable layer of virtio-fs tag {tag:?}: {source}")]
    Overlay { tag: String, source: std::io::Error },
    #[error(transparent)]
    Device(#[from] crate::devices::virtio::fs::FsDeviceError),
}

fn passthrough(tag: &str, dir: &Path) -> Result<PassthroughFs, FsBackendError> {
    let dir_err = |source| FsBackendError::Dir {
        tag: tag.to_string(),
        path: dir.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(dir).map_err(dir_err)?;
    if !meta.is_dir() {
        return Err(dir_err(std::io::Error::from_raw_os_error(libc::ENOTDIR)));
    }
    let root_dir = dir
        .to_str()
        .ok_or_else(|| dir_err(std::io::Error::other("path is not UTF-8")))?
        .to_string();
    let cfg = Config {
        root_dir,
        do_import: true,
        xattr: true,
        cache_policy: CachePolicy::Auto,
        ..Default::default()
    };
    let fs = PassthroughFs::<()>::new(cfg).map_err(dir_err)?;
    fs.import().map_err(dir_err)?;
    Ok(fs)
}

/// Opens the image at `path` under the node's store policy, with the node's chunk cache.
fn image(
    tag: &str,
    path: &Path,
    images: impl Into<ImageSettings>,
) -> Result<FlistFs, FsBackendError> {
    let images: ImageSettings = images.into();
    let opts = flist_fs::open::OpenOptions {
        stores: Vec::new(),
        policy: images.policy().cloned(),
        cache_dir: Some(
            images
                .cache()
                .map_or_else(|| PathBuf::from(DEFAULT_IMAGE_CACHE), Path::to_path_buf),
        ),
        cache_max_bytes: images.cache_max_bytes().unwrap_or(IMAGE_CACHE_MAX_BYTES),
    };
    FlistFs::open(path, &opts).map_err(|source| FsBackendError::Image {
        tag: tag.to_string(),
        path: path.display().to_string(),
        source,
    })
}

fn overlay(tag: &str, lower: FlistFs, layer_dir: &Path) -> Result<OverlayFs, FsBackendError> {
    std::fs::create_dir_all(layer_dir).map_err(|source| FsBackendError::Dir {
        tag: tag.to_string(),
        path: layer_dir.display().to_string(),
        source,
    })?;
    let upper = upper_layer::UpperLayer(passthrough(tag, layer_dir)?);
    let upper: Arc<BoxedLayer> = Arc::new(Box::new(upper));
    let lower: Arc<BoxedLayer> = Arc::new(Box::new(lower));
    debug_assert_eq!(
        lower.root_inode(),
        fuse_backend_rs::api::filesystem::ROOT_ID
    );
    let config = OverlayConfig {
        mountpoint: String::new(),
        work: String::new(),
        do_import: true,
        writeback: false,
        no_open: false,
        no_opendir: false,
        killpriv_v2: false,
        no_readdir: false,
        perfile_dax: false,
        cache_policy: fuse_backend_rs::overlayfs::CachePolicy::Auto,
        attr_timeout: Duration::from_secs(1),
        entry_timeout: Duration::from_secs(1),
    };
    OverlayFs::new(Some(upper), vec![lower], config).map_err(|source| FsBackendError::Overlay {
        tag: tag.to_string(),
        source,
    })
}

/// Builds the virtio-fs device for one (validated) share; images are opened with `images`
/// (the node's cache and store policy).
pub fn device_for(
    share: &FsSpec,
    images: impl Into<ImageSettings>,
) -> Result<Box<dyn VirtioDevice>, FsBackendError> {
    let tag = share.tag.as_str();
    // The node's image settings (chunk cache and store policy).
    let cache: ImageSettings = images.into();
    match (&share.dir, &share.image, &share.writable_layer) {
        (Some(dir), _, _) => guarded(tag, passthrough(tag, dir)?, share.readonly),
        (None, Some(path), Some(layer)) => {
            let lower = image(tag, path, &cache)?;
            guarded(tag, overlay(tag, lower, layer)?, false)
        }
        (None, Some(path), None) => guarded(tag, image(tag, path, &cache)?, true),
        (None, None, _) => Err(FsBackendError::Dir {
            tag: tag.to_string(),
            path: String::new(),
            source: std::io::Error::other("the share names neither a directory nor an image"),
        }),
    }
}

/// The device serving `fs` behind the guard every share goes through.
fn guarded<F: FileSystem + Send + Sync + 'static>(
    tag: &str,
    fs: F,
    readonly: bool,
) -> Result<Box<dyn VirtioDevice>, FsBackendError> {
    Ok(Box::new(FsDevice::new(
        tag,
        Arc::new(Guard::new(fs, readonly)),
    )?))
}
