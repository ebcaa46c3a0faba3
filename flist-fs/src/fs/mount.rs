//! Host FUSE mount of a [`FlistFs`] through `/dev/fuse` (fuse-backend-rs `fusedev`): mount
//! read-only, serve requests on a few threads until unmounted (or `Mounted::unmount`).

use super::FlistFs;
use crate::error::{Error, Result};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::FuseSession;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A live mount; dropping it unmounts.
pub struct Mounted {
    session: FuseSession,
    threads: Vec<JoinHandle<()>>,
    mountpoint: PathBuf,
}

/// Mounts `fs` at `mountpoint` for the mounting user only, served by `threads` threads.
pub fn mount(fs: FlistFs, mountpoint: &Path, threads: usize) -> Result<Mounted> {
    mount_with(fs, mountpoint, threads, false)
}

/// Like [`mount`]; `allow_other` lets other users in (the kernel still checks permissions).
pub fn mount_with(
    fs: FlistFs,
    mountpoint: &Path,
    threads: usize,
    allow_other: bool,
) -> Result<Mounted> {
    let fail = |e: fuse_backend_rs::transport::Error| {
        Error::io(mountpoint, std::io::Error::other(e.to_string()))
    };
    let mut session = FuseSession::new(mountpoint, "flist", "flist", true).map_err(fail)?;
    session.set_allow_other(allow_other);
    session.mount().map_err(fail)?;
    let server = Arc::new(Server::new(fs));
    let mut handles = Vec::new();
    for n in 0..threads.max(1) {
        let mut channel = session.new_channel().map_err(fail)?;
        let server = server.clone();
        let h = std::thread::Builder::new()
            .name(format!("flist-fuse-{n}"))
            .spawn(move || loop {
                match channel.get_request() {
                    Ok(Some((reader, writer))) => {
                        if let Err(e) = server.handle_message(reader, writer.into(), None, None) {
                            if let fuse_backend_rs::Error::EncodeMessage(ref io) = e {
                                if io.raw_os_error() == Some(libc::EBADF) {
                                    break;
                                }
                            }
                            tracing::warn!(error = %e, "fuse request failed");
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "fuse channel closed");
                        break;
                    }
                }
            })
            .map_err(|e| Error::io(mountpoint, e))?;
        handles.push(h);
    }
    Ok(Mounted {
        session,
        threads: handles,
        mountpoint: mountpoint.to_path_buf(),
    })
}

impl Mounted {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// True while the worker threads run (false once unmounted from outside).
    pub fn is_alive(&self) -> bool {
        self.threads.iter().any(|h| !h.is_finished())
    }

    /// Blocks until the filesystem is unmounted from outside (e.g. `umount`).
    pub fn wait(mut self) {
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }

    /// Unmounts and stops the worker threads.
    pub fn unmount(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        let r = self
            .session
            .umount()
            .map_err(|e| Error::io(&self.mountpoint, std::io::Error::other(e.to_string())));
        let _ = self.session.wake();
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        r
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            let _ = self.stop();
        }
    }
}
