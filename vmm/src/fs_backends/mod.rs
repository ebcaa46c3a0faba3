//! The filesystems the virtio-fs device serves, built from the spec: a host directory
//! (passthrough, optionally read-only), an flist image (read-only, chunks fetched lazily
//! through the shared cache, or asked of the node's chunk fetcher), or an flist image under a
//! writable layer kept in a host directory (the vmm's own merged view, `layer`: copy-up on
//! write, whiteouts, opaque and redirected directories, hard links; the copy-up of a file is
//! `copy_up`). fuse-backend-rs's overlay (`upper_layer`, `image_layer`) is still selectable
//! with `GRIDNODE_LAYER=overlay`.
//! Every share is served through one `Guard` whose `Policy` says what the guest may do (name
//! length, read-only, no privileged host objects in host directories); host directories are
//! opened without following symlinks (`host_dir`).

#[macro_use]
mod forward;
mod copy_up;
#[cfg(test)]
mod copy_up_tests;
#[cfg(test)]
mod fetcher_tests;
mod guard;
mod host_dir;
mod image_layer;
pub mod layer;
mod quota;
#[cfg(test)]
mod tests;
mod upper_layer;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flist_fs::fetcher::client::FetcherClient;
use flist_fs::fs::FlistFs;
use fuse_backend_rs::abi::fuse_abi::stat64;
use fuse_backend_rs::api::filesystem::{Context, FileSystem, ROOT_ID};
use fuse_backend_rs::overlayfs::config::Config as OverlayConfig;
use fuse_backend_rs::overlayfs::{BoxedLayer, OverlayFs};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};

pub use guard::{Guard, Policy};
pub use quota::{Limits, Quota};

use crate::config::{FsSpec, ImageSettings};
use crate::devices::virtio::fs::FsDevice;
use crate::devices::virtio::VirtioDevice;
use vm_spec::ShareSource;

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
    #[error("cannot reach the chunk fetcher for virtio-fs tag {tag:?}: {source}")]
    Fetcher {
        tag: String,
        source: flist_fs::fetcher::FetcherError,
    },
    #[error("cannot set up the writable layer of virtio-fs tag {tag:?}: {source}")]
    Overlay { tag: String, source: std::io::Error },
    #[error(transparent)]
    Device(#[from] crate::devices::virtio::fs::FsDeviceError),
}

/// The passthrough backend of host directory `dir` (made 0700 if missing and `create`), and the
/// directory it was opened from: the backend resolves its root relative to it (see `host_dir`).
fn passthrough(
    tag: &str,
    dir: &Path,
    create: bool,
) -> Result<(PassthroughFs, Arc<OwnedFd>), FsBackendError> {
    let dir_err = |source| FsBackendError::Dir {
        tag: tag.to_string(),
        path: dir.display().to_string(),
        source,
    };
    let root = host_dir::open_dir_nofollow(dir, create.then_some(0o700)).map_err(dir_err)?;
    let cfg = Config {
        root_dir: ".".to_string(),
        do_import: true,
        xattr: true,
        cache_policy: CachePolicy::Auto,
        ..Default::default()
    };
    let fs = PassthroughFs::<()>::new(cfg).map_err(dir_err)?;
    host_dir::import_from(&fs, &root).map_err(dir_err)?;
    Ok((fs, Arc::new(root)))
}

/// Clients of the node's chunk fetcher by socket, shared by this process's images.
static FETCHERS: std::sync::Mutex<Vec<(PathBuf, std::sync::Weak<FetcherClient>)>> =
    std::sync::Mutex::new(Vec::new());

/// This process's client of the chunk fetcher at `socket`, connected now if it is not yet:
/// its sockets are connected here, at vmm start, so the virtio-fs workers never connect.
fn fetcher_client(socket: &Path) -> Result<Arc<FetcherClient>, flist_fs::fetcher::FetcherError> {
    let mut clients = FETCHERS
        .lock()
        .map_err(|_| flist_fs::fetcher::FetcherError::Closed)?;
    clients.retain(|(_, c)| c.strong_count() > 0);
    if let Some(c) = clients
        .iter()
        .find(|(p, _)| p == socket)
        .and_then(|(_, c)| c.upgrade())
    {
        return Ok(c);
    }
    let filter = crate::seccomp::filter(
        crate::seccomp::ThreadKind::FetcherIo,
        crate::seccomp::Violation::Trap,
    )
    .map_err(|e| flist_fs::fetcher::FetcherError::Io(std::io::Error::other(e.to_string())))?;
    let confine: flist_fs::ThreadStart = Arc::new(move || {
        crate::seccomp::apply_to_current_thread(&filter).map_err(std::io::Error::other)
    });
    let client = Arc::new(FetcherClient::connect_with(
        socket,
        flist_fs::fetcher::client::DEFAULT_POOL,
        Some(confine),
    )?);
    clients.push((socket.to_path_buf(), Arc::downgrade(&client)));
    Ok(client)
}

/// This process's chunk cache at `dir` (without a chunk fetcher): opened without reading the
/// directory, measured and evicted by a background thread under its own seccomp filter.
fn image_cache(
    dir: &Path,
    max_bytes: u64,
) -> Result<Arc<flist_fs::cache::ChunkCache>, flist_fs::Error> {
    let filter = crate::seccomp::filter(
        crate::seccomp::ThreadKind::CacheEvictor,
        crate::seccomp::Violation::Trap,
    )
    .map_err(|e| flist_fs::Error::io(dir, std::io::Error::other(e.to_string())))?;
    let confine: flist_fs::ThreadStart = Arc::new(move || {
        crate::seccomp::apply_to_current_thread(&filter).map_err(std::io::Error::other)
    });
    flist_fs::cache::ChunkCache::shared(dir, max_bytes, Some(confine))
}

/// Opens the image at `path` under the node's store policy, with the node's chunk cache, or
/// through the node's chunk fetcher when there is one.
fn image(
    tag: &str,
    path: &Path,
    images: impl Into<ImageSettings>,
) -> Result<FlistFs, FsBackendError> {
    let images: ImageSettings = images.into();
    let image_err = |source| FsBackendError::Image {
        tag: tag.to_string(),
        path: path.display().to_string(),
        source,
    };
    if let Some(socket) = images.fetcher() {
        let client = fetcher_client(socket).map_err(|source| FsBackendError::Fetcher {
            tag: tag.to_string(),
            source,
        })?;
        // The vmm's own allowlist (when it has one) still decides which images it serves.
        let policy = images.policy().filter(|p| !p.is_anonymous());
        return FlistFs::open_remote(path, client, policy).map_err(image_err);
    }
    let cache_dir = images
        .cache()
        .map_or_else(|| PathBuf::from(DEFAULT_IMAGE_CACHE), Path::to_path_buf);
    let cache_max_bytes = images.cache_max_bytes().unwrap_or(IMAGE_CACHE_MAX_BYTES);
    let opts = flist_fs::open::OpenOptions {
        stores: Vec::new(),
        policy: images.policy().cloned(),
        cache_dir: None,
        cache_max_bytes,
        cache: Some(image_cache(&cache_dir, cache_max_bytes).map_err(image_err)?),
    };
    FlistFs::open(path, &opts).map_err(|source| FsBackendError::Image {
        tag: tag.to_string(),
        path: path.display().to_string(),
        source,
    })
}

/// The quota of the host directory `dir`, when `limits` set one.
fn quota(tag: &str, dir: &Path, limits: Limits) -> Result<Option<Arc<Quota>>, FsBackendError> {
    if limits == Limits::default() {
        return Ok(None);
    }
    Quota::measure(dir, limits)
        .map(|q| Some(Arc::new(q)))
        .map_err(|source| FsBackendError::Dir {
            tag: tag.to_string(),
            path: dir.display().to_string(),
            source,
        })
}

/// Where a writable layer keeps the guest's changes: `<layer>/upper`.
pub fn layer_upper_dir(layer: &Path) -> PathBuf {
    layer.join("upper")
}

/// Where a copy-up is staged before it is renamed into `upper` (see `copy_up`): `<layer>/work`,
/// on the layer's own filesystem. Also the process's TMPDIR (set by the vmm at start to the
/// first layer's), where fuse-backend-rs's overlay still makes, and at once removes, an empty
/// temporary file per copy-up; never the host's /tmp (which a jailed vmm does not even have).
pub fn layer_work_dir(layer: &Path) -> PathBuf {
    layer.join("work")
}

/// Makes (no symlinks followed) the layer directory and its `work` directory 0700, and its
/// `upper` directory, the guest's root in the layer, with the image root's mode and owner
/// (the guest checks its own permissions against them; the 0700 layer directory keeps other
/// host users out); empties `work` of what a crashed run staged; returns `upper` and the open
/// `work`, which must be on the same filesystem (copy-ups are renamed from one to the other).
/// A layer of the earlier flat layout (changes directly in the layer directory) is refused,
/// not hidden.
fn prepare_layer(
    tag: &str,
    layer: &Path,
    image_root: &stat64,
) -> Result<(PathBuf, OwnedFd), FsBackendError> {
    let err = |path: &Path, source| FsBackendError::Dir {
        tag: tag.to_string(),
        path: path.display().to_string(),
        source,
    };
    host_dir::open_dir_nofollow(layer, Some(0o700)).map_err(|e| err(layer, e))?;
    let upper = layer_upper_dir(layer);
    let work = layer_work_dir(layer);
    let stray = std::fs::read_dir(layer)
        .map_err(|e| err(layer, e))?
        .filter_map(Result::ok)
        .any(|e| e.file_name() != "upper" && e.file_name() != "work");
    if stray {
        return Err(err(
            layer,
            std::io::Error::other(format!(
                "the layer directory holds more than upper/ and work/ (a layer of the earlier flat layout: move its contents into {})",
                upper.display()
            )),
        ));
    }
    let work_dir = host_dir::open_dir_nofollow(&work, Some(0o700)).map_err(|e| err(&work, e))?;
    if std::fs::symlink_metadata(&upper).is_err() {
        let made = host_dir::open_dir_nofollow(&upper, Some(0o700)).map_err(|e| err(&upper, e))?;
        let path = format!("/proc/self/fd/{}", made.as_raw_fd());
        // An unprivileged (jailed) vmm cannot give the directory away; it keeps it as its
        // own, with the image root's mode.
        match std::os::unix::fs::chown(&path, Some(image_root.st_uid), Some(image_root.st_gid)) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                tracing::debug!("layer root keeps the vmm's owner: {e}")
            }
            other => other.map_err(|e| err(&upper, e))?,
        }
        std::fs::set_permissions(
            &path,
            std::os::unix::fs::PermissionsExt::from_mode(image_root.st_mode & 0o7777),
        )
        .map_err(|e| err(&upper, e))?;
    }
    let upper_dir = host_dir::open_dir_nofollow(&upper, None).map_err(|e| err(&upper, e))?;
    let device = |fd: &OwnedFd| {
        fd.try_clone()
            .map(std::fs::File::from)
            .and_then(|f| f.metadata())
            .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
    };
    if device(&work_dir).map_err(|e| err(&work, e))?
        != device(&upper_dir).map_err(|e| err(&upper, e))?
    {
        return Err(err(
            layer,
            std::io::Error::other(
                "upper/ and work/ are on different filesystems (copy-ups are renamed from work/ into upper/)",
            ),
        ));
    }
    // What a crashed run left staged goes; dangling index entries too (`layer::check`).
    let report = layer::check::check_work(&work_dir, true).map_err(|e| err(&work, e))?;
    if report.stale_work + report.dangling_index > 0 {
        tracing::info!(tag, "writable layer {}: {report}", layer.display());
    }
    Ok((upper, work_dir))
}

fn overlay(
    tag: &str,
    lower: FlistFs,
    layer_dir: &Path,
    limits: Limits,
) -> Result<(OverlayFs, Arc<OwnedFd>), FsBackendError> {
    let (image_root, _) = lower
        .getattr(&Context::default(), ROOT_ID, None)
        .map_err(|source| FsBackendError::Overlay {
            tag: tag.to_string(),
            source,
        })?;
    let (upper_dir, work) = prepare_layer(tag, layer_dir, &image_root)?;
    let (upper, root) = passthrough(tag, &upper_dir, true)?;
    let mut upper = Guard::new(upper, Policy::layer_upper()).at_root(root.clone());
    let quota = quota(tag, &upper_dir, limits)?;
    if let Some(quota) = &quota {
        upper = upper.with_quota(quota.clone());
    }
    let lower = Arc::new(lower);
    let upper_root = root.clone();
    let copy_up = copy_up::CopyUp::new(lower.clone(), root, work, quota);
    let upper: Arc<BoxedLayer> = Arc::new(Box::new(upper_layer::UpperLayer::new(upper, copy_up)));
    let lower: Arc<BoxedLayer> = Arc::new(Box::new(image_layer::ImageLayer::new(lower)));
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
    let fs = OverlayFs::new(Some(upper), vec![lower], config).map_err(|source| {
        FsBackendError::Overlay {
            tag: tag.to_string(),
            source,
        }
    })?;
    Ok((fs, upper_root))
}

/// The vmm's own writable layer (`layer`) over `lower`, kept in `layer_dir`; and the layer's
/// upper directory (O_PATH).
fn writable_layer(
    tag: &str,
    lower: FlistFs,
    layer_dir: &Path,
    limits: Limits,
) -> Result<(layer::Layer, Arc<OwnedFd>), FsBackendError> {
    let (image_root, _) = lower
        .getattr(&Context::default(), ROOT_ID, None)
        .map_err(|source| FsBackendError::Overlay {
            tag: tag.to_string(),
            source,
        })?;
    let (upper_dir, work) = prepare_layer(tag, layer_dir, &image_root)?;
    let (upper, root) = passthrough(tag, &upper_dir, true)?;
    let mut upper = Guard::new(upper, Policy::layer_upper()).at_root(root.clone());
    let quota = quota(tag, &upper_dir, limits)?;
    if let Some(quota) = &quota {
        upper = upper.with_quota(quota.clone());
    }
    let lower = Arc::new(lower);
    let copier_work = work.try_clone().map_err(|source| FsBackendError::Overlay {
        tag: tag.to_string(),
        source,
    })?;
    let copy_up = copy_up::CopyUp::new(lower.clone(), root.clone(), copier_work, quota.clone());
    let fs = layer::Layer::new(lower, upper, root.clone(), work, copy_up, quota);
    Ok((fs, root))
}

/// Whether writable layers are served by fuse-backend-rs's overlay instead of the vmm's own
/// layer: `GRIDNODE_LAYER=overlay` in the vmm's environment (for comparisons; the vmm's own
/// is the default).
fn overlay_selected() -> bool {
    std::env::var_os("GRIDNODE_LAYER").is_some_and(|v| v == "overlay")
}

/// A readable descriptor of the directory `root` (an `O_PATH` one) refers to: `syncfs(2)`
/// needs one.
fn sync_root(tag: &str, path: &Path, root: &OwnedFd) -> Result<Arc<OwnedFd>, FsBackendError> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // SAFETY: `root` is a valid descriptor and the name is NUL-terminated; the result is
    // owned below.
    let fd = unsafe { libc::openat(root.as_raw_fd(), c".".as_ptr(), flags) };
    if fd < 0 {
        return Err(FsBackendError::Dir {
            tag: tag.to_string(),
            path: path.display().to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: just opened, owned by nobody else.
    Ok(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// A host directory served as is, behind its guard.
pub(crate) fn dir_share(
    tag: &str,
    dir: &Path,
    readonly: bool,
    limits: Limits,
) -> Result<Guard<PassthroughFs>, FsBackendError> {
    let (fs, root) = passthrough(tag, dir, false)?;
    let guard = Guard::new(fs, Policy::dir_share(readonly)).at_root(root);
    Ok(match quota(tag, dir, limits)? {
        Some(quota) => guard.with_quota(quota),
        None => guard,
    })
}

/// An image served read-only, behind its guard; opened with `images` (the node's cache and
/// store policy).
pub(crate) fn image_share(
    tag: &str,
    image_path: &Path,
    images: impl Into<ImageSettings>,
) -> Result<Guard<FlistFs>, FsBackendError> {
    Ok(Guard::new(
        image(tag, image_path, images)?,
        Policy::image_share(),
    ))
}

/// An image under a writable layer kept in `layer`, behind its guard.
/// An image under fuse-backend-rs's overlay with the layer kept in `layer` (for comparisons).
#[cfg(test)]
pub(crate) fn overlay_share(
    tag: &str,
    image_path: &Path,
    layer: &Path,
    limits: Limits,
    images: impl Into<ImageSettings>,
) -> Result<Guard<OverlayFs>, FsBackendError> {
    Ok(overlay_share_with_root(tag, image_path, layer, limits, images)?.0)
}

/// An image under the vmm's own writable layer kept in `layer`, behind its guard.
#[cfg(test)]
pub(crate) fn layered_share(
    tag: &str,
    image_path: &Path,
    layer: &Path,
    limits: Limits,
    images: impl Into<ImageSettings>,
) -> Result<Guard<layer::Layer>, FsBackendError> {
    Ok(layered_share_with_root(tag, image_path, layer, limits, images)?.0)
}

/// [`layered_share`] and the layer's upper directory (O_PATH).
fn layered_share_with_root(
    tag: &str,
    image_path: &Path,
    layer: &Path,
    limits: Limits,
    images: impl Into<ImageSettings>,
) -> Result<(Guard<layer::Layer>, Arc<OwnedFd>), FsBackendError> {
    let lower = image(tag, image_path, images)?;
    let (fs, upper_root) = writable_layer(tag, lower, layer, limits)?;
    Ok((Guard::new(fs, Policy::layer_share()), upper_root))
}

/// [`overlay_share`] and the layer's upper directory (O_PATH).
fn overlay_share_with_root(
    tag: &str,
    image_path: &Path,
    layer: &Path,
    limits: Limits,
    images: impl Into<ImageSettings>,
) -> Result<(Guard<OverlayFs>, Arc<OwnedFd>), FsBackendError> {
    let lower = image(tag, image_path, images)?;
    let (fs, upper_root) = overlay(tag, lower, layer, limits)?;
    Ok((Guard::new(fs, Policy::layered_share()), upper_root))
}

/// Builds the virtio-fs device for one (validated) share, with one request queue; images are
/// opened with `images` (the node's cache and store policy).
pub fn device_for(
    share: &FsSpec,
    images: impl Into<ImageSettings>,
) -> Result<Box<dyn VirtioDevice>, FsBackendError> {
    device_with_queues(share, images, 1)
}

/// [`device_for`] with `request_queues` request queues (a VM's vCPU count, typically).
pub fn device_with_queues(
    share: &FsSpec,
    images: impl Into<ImageSettings>,
    request_queues: usize,
) -> Result<Box<dyn VirtioDevice>, FsBackendError> {
    let tag = share.tag.as_str();
    let images: ImageSettings = images.into();
    let limits = Limits {
        max_bytes: share.max_bytes,
        max_inodes: share.max_inodes,
    };
    let network = images.fetches_over_network();
    match &share.source {
        ShareSource::Dir { path, readonly } => {
            let fs = dir_share(tag, path, *readonly, limits)?;
            let sync = match (readonly, fs.root()) {
                (false, Some(root)) => Some(sync_root(tag, path, root)?),
                _ => None,
            };
            device(tag, fs, false, request_queues, sync)
        }
        ShareSource::LayeredImage { image, layer } if overlay_selected() => {
            let (fs, upper) = overlay_share_with_root(tag, image, layer, limits, &images)?;
            let sync = Some(sync_root(tag, layer, &upper)?);
            device(tag, fs, network, request_queues, sync)
        }
        ShareSource::LayeredImage { image, layer } => {
            let (fs, upper) = layered_share_with_root(tag, image, layer, limits, &images)?;
            let sync = Some(sync_root(tag, layer, &upper)?);
            device(tag, fs, network, request_queues, sync)
        }
        ShareSource::Image { image } => device(
            tag,
            image_share(tag, image, &images)?,
            network,
            request_queues,
            None,
        ),
    }
}

/// The device serving `fs`; `network`: its workers fetch image chunks over the network.
fn device<F: FileSystem + Send + Sync + 'static>(
    tag: &str,
    fs: Guard<F>,
    network: bool,
    request_queues: usize,
    sync_root: Option<Arc<OwnedFd>>,
) -> Result<Box<dyn VirtioDevice>, FsBackendError> {
    Ok(Box::new(
        FsDevice::new(tag, Arc::new(fs))?
            .with_network_fetch(network)
            .with_request_queues(request_queues)
            .with_sync_root(sync_root),
    ))
}
