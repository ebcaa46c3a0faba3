//! Host FUSE mount of a filesystem through `/dev/fuse` (fuse-backend-rs `fusedev`): mount,
//! serve requests on a few threads (each waking alone for a request, [`super::fuse_channel`])
//! until unmounted (or `Mounted::unmount`). Images mount
//! read-only ([`mount`], [`mount_with`]); [`mount_fs`] mounts any `FileSystem` (the vmm's
//! tests mount its writable layer this way).

use super::fuse_channel::{Channel, StopSignal};
use super::FlistFs;
use crate::error::{Error, Result};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, FuseSession, FuseSessionExt, Reader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A live mount; dropping it unmounts.
pub struct Mounted {
    session: FuseSession,
    stop: StopSignal,
    threads: Vec<JoinHandle<()>>,
    mountpoint: PathBuf,
}

/// How [`mount_fs`] mounts and serves.
pub struct MountOptions {
    /// Threads serving requests (at least one).
    pub threads: usize,
    /// Lets other users in (the kernel still checks permissions).
    pub allow_other: bool,
    pub readonly: bool,
    /// Runs first on each serving thread, before its first request (a thread that fails it
    /// serves nothing).
    pub thread_start: Option<fn() -> std::io::Result<()>>,
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
    let options = MountOptions {
        threads,
        allow_other,
        readonly: true,
        thread_start: None,
    };
    mount_fs(fs, mountpoint, &options)
}

/// Mounts any filesystem at `mountpoint` as `options` say.
pub fn mount_fs<F: FileSystem + Send + Sync + 'static>(
    fs: F,
    mountpoint: &Path,
    options: &MountOptions,
) -> Result<Mounted> {
    let fail = |e: fuse_backend_rs::transport::Error| {
        Error::io(mountpoint, std::io::Error::other(e.to_string()))
    };
    let mut session =
        FuseSession::new(mountpoint, "flist", "flist", options.readonly).map_err(fail)?;
    session.set_allow_other(options.allow_other);
    session.mount().map_err(fail)?;
    let server = Arc::new(Server::new(fs));
    let stop = StopSignal::new().map_err(|e| Error::io(mountpoint, e))?;
    let device = session
        .file()
        .ok_or_else(|| Error::io(mountpoint, std::io::Error::other("no FUSE device")))?;
    let bufsize = session.bufsize();
    let mut handles = Vec::new();
    let (started, start_results) = std::sync::mpsc::channel();
    for n in 0..options.threads.max(1) {
        let mut channel = Channel::new(device, &stop).map_err(|e| Error::io(mountpoint, e))?;
        let server = server.clone();
        let thread_start = options.thread_start;
        let started = started.clone();
        let h = std::thread::Builder::new()
            .name(format!("flist-fuse-{n}"))
            .spawn(move || {
                let start = thread_start.map_or(Ok(()), |start| start());
                let ok = start.is_ok();
                let _ = started.send(start);
                if ok {
                    serve(&mut channel, &server, bufsize);
                }
            })
            .map_err(|e| Error::io(mountpoint, e))?;
        handles.push(h);
    }
    drop(started);
    let mut mounted = Mounted {
        session,
        stop,
        threads: handles,
        mountpoint: mountpoint.to_path_buf(),
    };
    // Every thread reports its start (a thread that panicked drops its sender unsent).
    let failed = (0..mounted.threads.len())
        .map(|_| start_results.recv())
        .find_map(|r| match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(std::io::Error::other("a FUSE thread ended before serving")),
        });
    if let Some(e) = failed {
        let _ = mounted.stop();
        return Err(Error::io(mountpoint, e));
    }
    Ok(mounted)
}

/// Serves requests from `channel` until the filesystem is unmounted or the mount is stopped.
fn serve<F: FileSystem + Sync>(channel: &mut Channel, server: &Server<F>, bufsize: usize) {
    let mut request = vec![0u8; bufsize];
    let mut reply = vec![0u8; bufsize];
    loop {
        let len = match channel.next_request(&mut request) {
            Ok(Some(len)) => len,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "fuse channel closed");
                break;
            }
        };
        let reader = match Reader::<()>::from_fuse_buffer(FuseBuf::new(&mut request[..len])) {
            Ok(reader) => reader,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable fuse request");
                continue;
            }
        };
        let writer = match FuseDevWriter::<()>::new(channel.device_fd(), &mut reply) {
            Ok(writer) => writer,
            Err(e) => {
                tracing::warn!(error = %e, "no fuse reply buffer");
                continue;
            }
        };
        if let Err(e) = server.handle_message(reader, writer.into(), None, None) {
            if let fuse_backend_rs::Error::EncodeMessage(ref io) = e {
                if io.raw_os_error() == Some(libc::EBADF) {
                    break;
                }
            }
            tracing::warn!(error = %e, "fuse request failed");
        }
    }
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
        if let Err(e) = self.stop.raise() {
            tracing::warn!(error = %e, "cannot stop the FUSE threads");
        }
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
