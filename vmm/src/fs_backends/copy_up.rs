//! The vmm's own copy-up of an image file into its writable layer, made in place of the one
//! of fuse-backend-rs's overlay. The overlay's copies the whole file into a temporary file in
//! TMPDIR, then writes it all again into the layer: the host paid the file's size twice (once
//! outside the layer's quota), for a file an image stores cheaply (deduplicated), and the
//! layer's file was created first and filled after, so a failure (EDQUOT half-way, a chunk
//! that cannot be read) or a crash left a truncated file that shadowed the image's for good.
//!
//! Here a copy-up:
//! - is reserved against the layer's quota up front (inode and the file's size): past it, the
//!   guest gets EDQUOT before anything is written;
//! - streams the image file, [`PIECE`] bytes at a time (all-zero blocks left as holes), into a
//!   staging file in `<layer>/work`, on the layer's own filesystem;
//! - gives it the image file's owner (when the vmm may), mode (setuid/setgid cleared),
//!   extended attributes (under the guest prefix, as the layer's guard stores them) and times,
//!   syncs it, and renames it into its directory in `upper/`, never replacing anything;
//! - on failure removes the staging file and gives the reservation back; after a crash the
//!   staging file is left in `work/`, which the next start empties (`prepare_layer`).
//!
//! The host pays the file's size once, and the layer never holds a partial copy.
//!
//! The vmm's own layer (`layer`) calls [`CopyUp::place`] directly, for every kind of image
//! object (a directory alone, a symlink, a FIFO or socket, a device node as a marked plain
//! file), the same way: made whole in `work/`, renamed in. The sequence below is only
//! fuse-backend-rs's overlay's (`GRIDNODE_LAYER=overlay`).
//!
//! How it fits in the overlay, which offers no hook for it: the overlay's copy-up of a regular
//! file is a fixed sequence of calls on its two layers, on one thread:
//! 1. `create(dir, name, {flags: O_WRONLY, umask: 0, mode: the image file's mode})` on the
//!    upper layer. [`UpperLayer`](super::upper_layer::UpperLayer) recognises it (the kernel's
//!    CREATE always carries O_CREAT; and the image must hold a regular file of exactly that
//!    mode at the same path), makes the whole copy here ([`CopyUp::create`]) and answers with
//!    the placed file and the handle [`COPIED`];
//! 2. `open(file, O_RDONLY)` on the image layer: [`ImageLayer`](super::image_layer::ImageLayer)
//!    answers [`COPIED`] for the file this thread just copied ([`arm`], [`take_armed`]);
//! 3. reads of the image file into a temporary file (still made, in TMPDIR, the first layer's
//!    `work/`): `read(COPIED)` is the end of the file, so it stays empty;
//! 4. writes of the temporary file into the layer's file: `write(COPIED)` takes 0 bytes, and
//!    `release(COPIED)` does nothing.
//!
//! The overlay then serves the placed file as the node's upper file. The tests of the
//! writable layer pin this sequence: a fuse-backend-rs that changes it fails them.

use std::cell::Cell;
use std::ffi::{CStr, CString};
use std::fs::{File, FileTimes, Permissions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flist_fs::fs::FlistFs;
use fuse_backend_rs::abi::fuse_abi::{stat64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyWriter, ROOT_ID,
};
use fuse_backend_rs::common::file_traits::FileReadWriteVolatile;
use fuse_backend_rs::passthrough::PassthroughFs;

use super::guard::{self, Guard};
use super::host_dir;
use super::layer;
use super::quota::Quota;

/// The handle both layers answer for a copy made here (never a passthrough handle, which
/// counts up from 1, nor an image handle, which is an inode number).
pub const COPIED: u64 = u64::MAX;
/// Bytes of the image file read (and written) per step.
pub const PIECE: u32 = 1 << 20;
/// All-zero blocks of this size (aligned in the file) are left as holes.
const HOLE_BLOCK: u64 = 64 << 10;

thread_local! {
    /// The image file this thread has just copied up, as (image key, inode): the overlay's next
    /// call on the image layer opens it to copy it again.
    static ARMED: Cell<Option<(usize, u64)>> = const { Cell::new(None) };
}

/// The key of `image` in [`arm`]/[`take_armed`].
pub fn image_key(image: &Arc<FlistFs>) -> usize {
    Arc::as_ptr(image) as usize
}

/// Marks `inode` of the image `key` as copied up by this thread.
fn arm(key: usize, inode: u64) {
    ARMED.with(|armed| armed.set(Some((key, inode))));
}

/// Whether `inode` of image `key` is the one this thread just copied up; any mark is cleared
/// (the overlay opens the file right after the create, or not at all).
pub fn take_armed(key: usize, inode: u64) -> bool {
    ARMED.with(|armed| armed.take()) == Some((key, inode))
}

/// What the vmm needs to copy image files into one writable layer.
pub struct CopyUp {
    image: Arc<FlistFs>,
    /// `<layer>/upper`, the upper layer's root (`O_PATH`).
    upper: Arc<OwnedFd>,
    /// `<layer>/work`, where copies are staged (`O_PATH`), on the same filesystem.
    work: OwnedFd,
    quota: Option<Arc<Quota>>,
    staged: AtomicU64,
}

impl CopyUp {
    pub fn new(
        image: Arc<FlistFs>,
        upper: Arc<OwnedFd>,
        work: OwnedFd,
        quota: Option<Arc<Quota>>,
    ) -> Self {
        Self {
            image,
            upper,
            work,
            quota,
            staged: AtomicU64::new(0),
        }
    }

    /// When this CREATE on the upper layer is the overlay's copy-up of an image file: the
    /// copy, made and placed (the entry of the placed file). `None` for any other create.
    pub fn create(
        &self,
        upper: &Guard<PassthroughFs>,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: &CreateIn,
    ) -> Option<io::Result<Entry>> {
        let (source, st, dirs) = match self.source(upper, ctx, parent, name, args) {
            Ok(Some(found)) => found,
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        };
        Some(self.copy(upper, ctx, parent, name, source, &st, &dirs))
    }

    /// The image file (inode, attributes) that a CREATE of `name` in the upper directory
    /// `parent` copies up, and the path of `parent` below the layer's root; `None` when the
    /// create is not a copy-up: not the overlay's flags, or no regular file of that mode at
    /// the same path in the image.
    #[allow(clippy::type_complexity)]
    fn source(
        &self,
        upper: &Guard<PassthroughFs>,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: &CreateIn,
    ) -> io::Result<Option<(u64, stat64, Vec<CString>)>> {
        let copy_up_flags = args.flags == libc::O_WRONLY as u32
            && args.umask == 0
            && args.fuse_flags == 0
            && args.mode & libc::S_IFMT == libc::S_IFREG;
        if !copy_up_flags {
            return Ok(None);
        }
        // Where `parent` is below the layer's root, as the kernel names both now.
        let dir = upper.inner().readlinkat_proc_file(parent)?;
        let root = std::fs::read_link(format!("/proc/self/fd/{}", self.upper.as_raw_fd()))?;
        let Ok(below) = dir.strip_prefix(&root).map(PathBuf::from) else {
            // Not below the root any more (removed, or moved away on the host).
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        };
        let dirs = below
            .iter()
            .map(|c| {
                CString::new(c.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
            })
            .collect::<io::Result<Vec<_>>>()?;
        let mut inode = ROOT_ID;
        for n in dirs.iter().map(CString::as_c_str).chain([name]) {
            match self.image.lookup(ctx, inode, n) {
                Ok(entry) if entry.inode != 0 => inode = entry.inode,
                Ok(_) => return Ok(None),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        let (st, _) = self.image.getattr(ctx, inode, None)?;
        if st.st_mode != args.mode {
            return Ok(None);
        }
        Ok(Some((inode, st, dirs)))
    }

    #[allow(clippy::too_many_arguments)]
    fn copy(
        &self,
        upper: &Guard<PassthroughFs>,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        source: u64,
        st: &stat64,
        dirs: &[CString],
    ) -> io::Result<Entry> {
        let size =
            u64::try_from(st.st_size).map_err(|_| io::Error::from_raw_os_error(libc::EIO))?;
        let reservation = Reservation::take(self.quota.as_deref(), size)?;
        let staged_name = CString::new(format!(
            "copy-up-{}-{}",
            std::process::id(),
            self.staged.fetch_add(1, Ordering::Relaxed)
        ))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        let file = host_dir::create_new_file(&self.work, &staged_name, 0o600)?;
        let staged = Staged {
            dir: &self.work,
            name: staged_name,
            placed: false,
            is_dir: false,
        };
        self.fill(ctx, source, size, &file)?;
        self.set_attributes(ctx, source, st, &file)?;
        file.sync_data()?;
        drop(file);
        let dir = host_dir::open_dir_beneath(&self.upper, dirs)?;
        // The directory the path leads to now must be the overlay's `parent`.
        let (want, _) = upper.getattr(ctx, parent, None)?;
        let found = File::from(dir.try_clone()?).metadata()?;
        if std::os::unix::fs::MetadataExt::ino(&found) != want.st_ino
            || std::os::unix::fs::MetadataExt::dev(&found) != want.st_dev
        {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        match host_dir::rename_noreplace(&self.work, &staged.name, &dir, name) {
            Ok(()) => {
                staged.placed();
                reservation.keep();
            }
            // Another thread placed its copy of the same file first: that one stands (it is
            // whole too), and is counted already.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => drop((staged, reservation)),
            Err(e) => return Err(e),
        }
        let entry = upper.lookup(ctx, parent, name)?;
        arm(image_key(&self.image), source);
        Ok(entry)
    }

    /// The name of the next staging object in `work/`.
    fn staging_name(&self) -> io::Result<CString> {
        CString::new(format!(
            "copy-up-{}-{}",
            std::process::id(),
            self.staged.fetch_add(1, Ordering::Relaxed)
        ))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
    }

    /// The layer's copy-up (see `layer`): the image's `source` (attributes `st`: a regular
    /// file, directory, symlink, FIFO or socket, never a device) copied into the layer's
    /// directory `dir` as `name`, with its owner (when the vmm may), mode (setuid/setgid
    /// cleared), times and extended attributes, within the quota; made whole in `work/`, then
    /// renamed in without replacing anything (EEXIST when `name` is there). A directory is
    /// copied alone, without its entries. A regular file with other names in the image gets
    /// `origin` (its image inode) as [`layer::ORIGIN_XATTR`] when the host allows it.
    pub fn place(
        &self,
        ctx: &Context,
        source: u64,
        st: &stat64,
        dir: &OwnedFd,
        name: &CStr,
    ) -> io::Result<()> {
        let kind = st.st_mode & libc::S_IFMT;
        let size = if kind == libc::S_IFREG || kind == libc::S_IFLNK {
            u64::try_from(st.st_size).map_err(|_| io::Error::from_raw_os_error(libc::EIO))?
        } else {
            0
        };
        let reservation = Reservation::take(self.quota.as_deref(), size)?;
        let staged_name = self.staging_name()?;
        let mode = st.st_mode & 0o7777;
        let mut staged = Staged {
            dir: &self.work,
            name: staged_name.clone(),
            placed: false,
            is_dir: false,
        };
        match kind {
            libc::S_IFREG => {
                let file = host_dir::create_new_file(&self.work, &staged_name, 0o600)?;
                self.fill(ctx, source, size, &file)?;
                self.set_attributes(ctx, source, st, &file)?;
                if st.st_nlink > 1 {
                    let origin = source.to_string();
                    if let Err(e) =
                        host_dir::set_xattr(&file, layer::ORIGIN_XATTR, origin.as_bytes())
                    {
                        tracing::debug!("copy-up: no origin mark for a hard-linked file: {e}");
                    }
                }
                file.sync_data()?;
            }
            libc::S_IFDIR => {
                layer::host::mkdir_at(&self.work, &staged_name, 0o700)?;
                staged.is_dir = true;
                let made = layer::host::open_dir(&self.work, &staged_name)?;
                layer::host::chown_at(&self.work, &staged_name, st.st_uid, st.st_gid)?;
                self.copy_xattrs_with(ctx, source, |n, v| layer::host::set_xattr(&made, n, v))?;
                layer::host::chmod_at(&self.work, &staged_name, mode & !libc::S_ISUID)?;
                layer::host::times_at(&self.work, &staged_name, st)?;
            }
            libc::S_IFLNK => {
                let target = self.image.readlink(ctx, source)?;
                layer::host::symlink_at(&target, &self.work, &staged_name)?;
                layer::host::chown_at(&self.work, &staged_name, st.st_uid, st.st_gid)?;
                layer::host::times_at(&self.work, &staged_name, st)?;
            }
            libc::S_IFIFO | libc::S_IFSOCK => {
                layer::host::mknod_at(&self.work, &staged_name, kind | 0o600)?;
                layer::host::chown_at(&self.work, &staged_name, st.st_uid, st.st_gid)?;
                layer::host::chmod_at(&self.work, &staged_name, guard::host_file_mode(mode))?;
                layer::host::times_at(&self.work, &staged_name, st)?;
            }
            // A device node of the image never becomes a host device: a plain empty file
            // marked with the device (see `layer::whiteout`).
            libc::S_IFCHR | libc::S_IFBLK => {
                let file = host_dir::create_new_file(&self.work, &staged_name, 0o600)?;
                layer::host::chown_at(&self.work, &staged_name, st.st_uid, st.st_gid)?;
                host_dir::set_xattr(
                    &file,
                    layer::whiteout::DEVICE_XATTR,
                    &layer::whiteout::device_value(kind, st.st_rdev as u32),
                )?;
                layer::host::chmod_at(&self.work, &staged_name, guard::host_file_mode(mode))?;
                layer::host::times_at(&self.work, &staged_name, st)?;
            }
            _ => return Err(io::Error::from_raw_os_error(libc::EPERM)),
        }
        host_dir::rename_noreplace(&self.work, &staged.name, dir, name)?;
        staged.placed();
        reservation.keep();
        Ok(())
    }

    /// Streams image file `source`, `size` bytes, into `file`.
    fn fill(&self, ctx: &Context, source: u64, size: u64, file: &File) -> io::Result<()> {
        let mut out = Staging { file, at: 0 };
        while out.at < size {
            let at = out.at;
            let n = self
                .image
                .read(ctx, source, source, &mut out, PIECE, at, None, 0)?;
            if n == 0 {
                // The image's chunks end before its size (never, for a validated image).
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        // The trailing hole, if any, and the exact size.
        file.set_len(size)
    }

    /// The owner, mode, extended attributes and times of image file `source` on `file`.
    fn set_attributes(
        &self,
        ctx: &Context,
        source: u64,
        st: &stat64,
        file: &File,
    ) -> io::Result<()> {
        match std::os::unix::fs::fchown(file, Some(st.st_uid), Some(st.st_gid)) {
            // An unprivileged (jailed) vmm keeps the file as its own.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EINVAL)) => {
                tracing::debug!("copy-up keeps the vmm's owner: {e}")
            }
            other => other?,
        }
        file.set_permissions(Permissions::from_mode(guard::host_file_mode(
            st.st_mode & 0o7777,
        )))?;
        self.copy_xattrs(ctx, source, file)?;
        let at = |secs: i64, nanos: i64| {
            let nanos = Duration::from_nanos(nanos.clamp(0, 999_999_999) as u64);
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
            } else {
                SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
            }
        };
        file.set_times(
            FileTimes::new()
                .set_accessed(at(st.st_atime, st.st_atime_nsec))
                .set_modified(at(st.st_mtime, st.st_mtime_nsec)),
        )
    }

    /// The image file's extended attributes, stored as the layer's guard stores the guest's
    /// (under `user.gridnode.`), so the guest sees the same ones after the copy-up. A host
    /// filesystem without user attributes gets none.
    fn copy_xattrs(&self, ctx: &Context, source: u64, file: &File) -> io::Result<()> {
        self.copy_xattrs_with(ctx, source, |name, value| {
            host_dir::set_xattr(file, name, value)
        })
    }

    /// [`Self::copy_xattrs`], each attribute set by `set` (host name, value).
    fn copy_xattrs_with(
        &self,
        ctx: &Context,
        source: u64,
        set: impl Fn(&CStr, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let names = match self.image.listxattr(ctx, source, guard::XATTR_LIST_MAX) {
            Ok(ListxattrReply::Names(names)) => names,
            Ok(ListxattrReply::Count(_)) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => return Ok(()),
            Err(e) => return Err(e),
        };
        for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let guest = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EIO))?;
            let value = match self
                .image
                .getxattr(ctx, source, &guest, guard::XATTR_SIZE_MAX)?
            {
                GetxattrReply::Value(v) => v,
                GetxattrReply::Count(_) => continue,
            };
            let Some(host) = guard::host_xattr_name(name) else {
                tracing::debug!("copy-up: xattr name too long for the layer, not copied");
                continue;
            };
            match set(&host, &value) {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    tracing::debug!("copy-up: the layer's filesystem has no user xattrs");
                    return Ok(());
                }
                other => other?,
            }
        }
        Ok(())
    }
}

/// The layer's quota taken for one copy: given back when dropped, unless kept.
struct Reservation<'a> {
    quota: Option<&'a Quota>,
    bytes: u64,
    kept: bool,
}

impl<'a> Reservation<'a> {
    fn take(quota: Option<&'a Quota>, bytes: u64) -> io::Result<Self> {
        if let Some(quota) = quota {
            quota.reserve_inode()?;
            if let Err(e) = quota.reserve_bytes(bytes) {
                quota.release_inode();
                return Err(e);
            }
        }
        Ok(Self {
            quota,
            bytes,
            kept: false,
        })
    }

    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let (Some(quota), false) = (self.quota, self.kept) {
            quota.release_inode();
            quota.release_bytes(self.bytes);
        }
    }
}

/// A staging file in `work/`: removed when dropped, unless placed.
struct Staged<'a> {
    dir: &'a OwnedFd,
    name: CString,
    placed: bool,
    /// The staged object is a directory (removed with `AT_REMOVEDIR`).
    is_dir: bool,
}

impl Staged<'_> {
    fn placed(mut self) {
        self.placed = true;
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if !self.placed {
            let removed = if self.is_dir {
                layer::host::unlink_at(self.dir, &self.name, true)
            } else {
                host_dir::unlink_at(self.dir, &self.name)
            };
            if let Err(e) = removed {
                tracing::warn!(
                    "copy-up: cannot remove the staging file {:?}: {e}",
                    self.name
                );
            }
        }
    }
}

/// Where the image layer writes the file's bytes: at the next offset of the staging file,
/// leaving all-zero blocks unwritten (holes).
struct Staging<'a> {
    file: &'a File,
    at: u64,
}

impl io::Write for Staging<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = self.at + done as u64;
            let in_block = (HOLE_BLOCK - at % HOLE_BLOCK) as usize;
            let piece = &buf[done..buf.len().min(done + in_block)];
            if piece.iter().any(|&b| b != 0) {
                self.file.write_all_at(piece, at)?;
            }
            done += piece.len();
        }
        self.at += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ZeroCopyWriter for Staging<'_> {
    /// The image layer hands its bytes over with `io::Write`; nothing copies from a file here.
    fn write_from(
        &mut self,
        _f: &mut dyn FileReadWriteVolatile,
        _count: usize,
        _off: u64,
    ) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    fn available_bytes(&self) -> usize {
        usize::MAX
    }
}
