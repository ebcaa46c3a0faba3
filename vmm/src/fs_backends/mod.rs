//! The filesystems the virtio-fs device serves, built from the spec: a host directory
//! (passthrough), optionally read-only.

mod readonly;

use std::sync::Arc;

use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};

pub use readonly::ReadOnly;

use crate::config::FsSpec;
use crate::devices::virtio::fs::FsDevice;
use crate::devices::virtio::VirtioDevice;

#[derive(Debug, thiserror::Error)]
pub enum FsBackendError {
    #[error("cannot share {path} as virtio-fs tag {tag:?}: {source}")]
    Dir {
        tag: String,
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Device(#[from] crate::devices::virtio::fs::FsDeviceError),
}

/// Builds the virtio-fs device for one share.
pub fn device_for(share: &FsSpec) -> Result<Box<dyn VirtioDevice>, FsBackendError> {
    let dir_err = |source| FsBackendError::Dir {
        tag: share.tag.clone(),
        path: share.dir.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(&share.dir).map_err(dir_err)?;
    if !meta.is_dir() {
        return Err(dir_err(std::io::Error::from_raw_os_error(libc::ENOTDIR)));
    }
    let root_dir = share
        .dir
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
    Ok(if share.readonly {
        Box::new(FsDevice::new(&share.tag, Arc::new(ReadOnly::new(fs)))?)
    } else {
        Box::new(FsDevice::new(&share.tag, Arc::new(fs))?)
    })
}
