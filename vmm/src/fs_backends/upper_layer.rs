//! The writable layer's upper filesystem as the overlay sees it: the layer's host directory
//! behind a [`Guard`] with the host-directory policy (no devices, no setuid, guest attributes
//! under `user.gridnode.`), with two additions:
//! - the overlay's copy-up of an image file is made by the vmm ([`CopyUp`]: streamed into
//!   the layer's `work/`, within the quota, renamed into place), and the overlay's own copy
//!   of the data is answered with nothing to do (the [`COPIED`] handle);
//! - opaque directories are marked with `trusted.overlay.opaque` (root may set it on every
//!   Linux filesystem with xattrs, tmpfs included), and a directory reads as not opaque when
//!   the filesystem has no such attribute, instead of failing as fuse-backend-rs's default
//!   does where `user.*` attributes are missing. The overlay's own markers are read and written
//!   on the host directly, past the guest-attribute mapping, so a guest cannot forge them.

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, IoctlData, Layer,
    ListxattrReply, OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;
use fuse_backend_rs::transport::FsCacheReqHandler;

use super::copy_up::{CopyUp, COPIED};
use super::guard::Guard;

const OPAQUE_XATTRS: [&CStr; 3] = [
    c"trusted.overlay.opaque",
    c"user.overlay.opaque",
    c"user.fuseoverlayfs.opaque",
];

pub struct UpperLayer {
    guard: Guard<PassthroughFs>,
    copy_up: CopyUp,
}

impl UpperLayer {
    pub fn new(guard: Guard<PassthroughFs>, copy_up: CopyUp) -> Self {
        Self { guard, copy_up }
    }
}

impl FileSystem for UpperLayer {
    type Inode = u64;
    type Handle = u64;

    forward_fs! { guard;
        fn init(&self, capable: FsOptions) -> io::Result<FsOptions>;
        fn destroy(&self);
        fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry>;
        fn forget(&self, ctx: &Context, inode: u64, count: u64);
        fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>);
        fn getattr(&self, ctx: &Context, inode: u64, handle: Option<u64>) -> io::Result<(stat64, Duration)>;
        fn setattr(&self, ctx: &Context, inode: u64, attr: stat64, handle: Option<u64>, valid: SetattrValid) -> io::Result<(stat64, Duration)>;
        fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>>;
        fn symlink(&self, ctx: &Context, linkname: &CStr, parent: u64, name: &CStr) -> io::Result<Entry>;
        fn mknod(&self, ctx: &Context, parent: u64, name: &CStr, mode: u32, rdev: u32, umask: u32) -> io::Result<Entry>;
        fn mkdir(&self, ctx: &Context, parent: u64, name: &CStr, mode: u32, umask: u32) -> io::Result<Entry>;
        fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()>;
        fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()>;
        fn rename(&self, ctx: &Context, olddir: u64, oldname: &CStr, newdir: u64, newname: &CStr, flags: u32) -> io::Result<()>;
        fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry>;
        fn open(&self, ctx: &Context, inode: u64, flags: u32, fuse_flags: u32) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)>;
        fn read(&self, ctx: &Context, inode: u64, handle: u64, w: &mut dyn ZeroCopyWriter, size: u32, offset: u64, lock_owner: Option<u64>, flags: u32) -> io::Result<usize>;
        fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()>;
        fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()>;
        fn fallocate(&self, ctx: &Context, inode: u64, handle: u64, mode: u32, offset: u64, length: u64) -> io::Result<()>;
        fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64>;
        fn setxattr(&self, ctx: &Context, inode: u64, name: &CStr, value: &[u8], flags: u32) -> io::Result<()>;
        fn getxattr(&self, ctx: &Context, inode: u64, name: &CStr, size: u32) -> io::Result<GetxattrReply>;
        fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply>;
        fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()>;
        fn opendir(&self, ctx: &Context, inode: u64, flags: u32) -> io::Result<(Option<u64>, OpenOptions)>;
        fn readdir(&self, ctx: &Context, inode: u64, handle: u64, size: u32, offset: u64, add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>) -> io::Result<()>;
        fn readdirplus(&self, ctx: &Context, inode: u64, handle: u64, size: u32, offset: u64, add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>) -> io::Result<()>;
        fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()>;
        fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()>;
        fn setupmapping(&self, ctx: &Context, inode: u64, handle: u64, foffset: u64, len: u64, flags: u64, moffset: u64, vu_req: &mut dyn FsCacheReqHandler) -> io::Result<()>;
        fn removemapping(&self, ctx: &Context, inode: u64, requests: Vec<RemovemappingOne>, vu_req: &mut dyn FsCacheReqHandler) -> io::Result<()>;
        fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()>;
        fn lseek(&self, ctx: &Context, inode: u64, handle: u64, offset: u64, whence: u32) -> io::Result<u64>;
        fn getlk(&self, ctx: &Context, inode: u64, handle: u64, owner: u64, lock: FileLock, flags: u32) -> io::Result<FileLock>;
        fn setlk(&self, ctx: &Context, inode: u64, handle: u64, owner: u64, lock: FileLock, flags: u32) -> io::Result<()>;
        fn setlkw(&self, ctx: &Context, inode: u64, handle: u64, owner: u64, lock: FileLock, flags: u32) -> io::Result<()>;
        fn bmap(&self, ctx: &Context, inode: u64, block: u64, blocksize: u32) -> io::Result<u64>;
        fn poll(&self, ctx: &Context, inode: u64, handle: u64, khandle: u64, flags: u32, events: u32) -> io::Result<u32>;
        fn notify_reply(&self) -> io::Result<()>;
        fn id_remap(&self, ctx: &mut Context) -> io::Result<()>;
    }

    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        self.guard
            .ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }

    /// The overlay's copy-up of an image file is made here, whole (see `copy_up`); every other
    /// create goes to the guard.
    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        match self.copy_up.create(&self.guard, ctx, parent, name, &args) {
            Some(placed) => Ok((placed?, Some(COPIED), OpenOptions::empty(), None)),
            None => self.guard.create(ctx, parent, name, args),
        }
    }

    /// The overlay's write of its own copy into a file copied up here: nothing to write.
    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        if handle == COPIED {
            return Ok(0);
        }
        self.guard.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        if handle == COPIED {
            return Ok(());
        }
        self.guard
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }
}

impl Layer for UpperLayer {
    fn root_inode(&self) -> u64 {
        fuse_backend_rs::api::filesystem::ROOT_ID
    }

    fn is_opaque(&self, ctx: &Context, inode: u64) -> io::Result<bool> {
        for name in OPAQUE_XATTRS {
            match self.guard.inner().getxattr(ctx, inode, name, 16) {
                Ok(GetxattrReply::Value(v)) if v.eq_ignore_ascii_case(b"y") => return Ok(true),
                Ok(_) => {}
                Err(e) => match e.raw_os_error() {
                    Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {}
                    _ => return Err(e),
                },
            }
        }
        Ok(false)
    }

    fn set_opaque(&self, ctx: &Context, inode: u64) -> io::Result<()> {
        self.guard
            .inner()
            .setxattr(ctx, inode, OPAQUE_XATTRS[0], b"y", 0)
    }
}
