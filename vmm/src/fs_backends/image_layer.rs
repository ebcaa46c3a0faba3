//! The image as the overlay's read-only lower layer: the image filesystem as is, except that
//! the overlay's second copy of a file the vmm has just copied up (see `copy_up`) reads as
//! empty, through the [`COPIED`] handle.

use std::ffi::CStr;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use flist_fs::fs::FlistFs;
use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, Layer, ListxattrReply,
    OpenOptions, ZeroCopyWriter,
};

use super::copy_up::{image_key, take_armed, COPIED};

pub struct ImageLayer {
    image: Arc<FlistFs>,
}

impl ImageLayer {
    pub fn new(image: Arc<FlistFs>) -> Self {
        Self { image }
    }
}

/// The image filesystem's operations (the others answer ENOSYS, as the image's own do).
impl FileSystem for ImageLayer {
    type Inode = u64;
    type Handle = u64;

    forward_fs! { image;
        fn init(&self, capable: FsOptions) -> io::Result<FsOptions>;
        fn destroy(&self);
        fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry>;
        fn forget(&self, ctx: &Context, inode: u64, count: u64);
        fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>);
        fn getattr(&self, ctx: &Context, inode: u64, handle: Option<u64>) -> io::Result<(stat64, Duration)>;
        fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>>;
        fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64>;
        fn getxattr(&self, ctx: &Context, inode: u64, name: &CStr, size: u32) -> io::Result<GetxattrReply>;
        fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply>;
        fn opendir(&self, ctx: &Context, inode: u64, flags: u32) -> io::Result<(Option<u64>, OpenOptions)>;
        fn readdir(&self, ctx: &Context, inode: u64, handle: u64, size: u32, offset: u64, add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>) -> io::Result<()>;
        fn readdirplus(&self, ctx: &Context, inode: u64, handle: u64, size: u32, offset: u64, add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>) -> io::Result<()>;
        fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()>;
        fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()>;
    }

    /// The overlay opens a file it is copying up right after the upper layer's create: a file
    /// the vmm has just copied on this thread gets the [`COPIED`] handle.
    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        if take_armed(image_key(&self.image), inode) && flags == libc::O_RDONLY as u32 {
            return Ok((Some(COPIED), OpenOptions::empty(), None));
        }
        self.image.open(ctx, inode, flags, fuse_flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        if handle == COPIED {
            return Ok(0);
        }
        self.image
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
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
        self.image
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }
}

impl Layer for ImageLayer {
    fn root_inode(&self) -> u64 {
        fuse_backend_rs::api::filesystem::ROOT_ID
    }
}
