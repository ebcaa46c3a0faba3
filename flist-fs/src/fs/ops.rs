//! The `FileSystem` trait implementation: lookup, getattr, readlink, open/read (chunk-range
//! reads, EIO on any chunk failure), opendir/readdir/readdirplus, xattrs, statfs. Every
//! mutating operation is left to the trait's defaults (ENOSYS) or refused with EROFS.

use super::attr::enoent;
use super::guest_sink::GuestSink;
use super::FlistFs;
use crate::meta::InodeKind;
use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, FsOptions, OpenOptions};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyWriter,
};
use std::ffi::CStr;
use std::io;
use std::time::Duration;

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl FlistFs {
    fn dir_entries(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let dir = self.image.inode(ino).ok_or_else(enoent)?;
        if dir.kind != InodeKind::Dir {
            return Err(errno(libc::ENOTDIR));
        }
        let dots: [(&[u8], u64); 2] = [(b".", ino), (b"..", self.image.parent(ino))];
        let all = dots
            .into_iter()
            .chain(dir.entries.iter().map(|e| (e.name.as_slice(), e.ino)));
        for (idx, (name, child)) in all.enumerate().skip(offset as usize) {
            let kind = self
                .image
                .inode(child)
                .map(|i| i.kind.mode_bits())
                .unwrap_or(0);
            let entry = DirEntry {
                ino: child,
                offset: idx as u64 + 1,
                type_: kind >> 12,
                name,
            };
            if add(entry)? == 0 {
                break;
            }
        }
        Ok(())
    }
}

impl FileSystem for FlistFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        Ok(capable
            & (FsOptions::ASYNC_READ
                | FsOptions::PARALLEL_DIROPS
                | FsOptions::DO_READDIRPLUS
                | FsOptions::READDIRPLUS_AUTO))
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let dir = self.image.inode(parent).ok_or_else(enoent)?;
        if dir.kind != InodeKind::Dir {
            return Err(errno(libc::ENOTDIR));
        }
        let ino = match name.to_bytes() {
            b"." => parent,
            b".." => self.image.parent(parent),
            n => self.image.lookup(parent, n).ok_or_else(enoent)?,
        };
        self.entry(ino)
    }

    fn getattr(
        &self,
        _ctx: &Context,
        inode: u64,
        _h: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        Ok((self.stat(inode)?, super::ATTR_TIMEOUT))
    }

    fn readlink(&self, _ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        let i = self.image.inode(inode).ok_or_else(enoent)?;
        if i.kind != InodeKind::Symlink {
            return Err(errno(libc::EINVAL));
        }
        Ok(i.target.clone())
    }

    fn open(
        &self,
        _ctx: &Context,
        inode: u64,
        flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let i = self.image.inode(inode).ok_or_else(enoent)?;
        if (flags as i32 & libc::O_ACCMODE) != libc::O_RDONLY || flags as i32 & libc::O_TRUNC != 0 {
            return Err(errno(libc::EROFS));
        }
        if i.kind == InodeKind::Dir {
            return Err(errno(libc::EISDIR));
        }
        // Reads need no per-open state; the inode number serves as the handle, which layered
        // filesystems (an overlay with a writable layer on top) require to be present.
        Ok((Some(inode), OpenOptions::KEEP_CACHE, None))
    }

    fn read(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let i = self.image.inode(inode).ok_or_else(enoent)?;
        if i.kind != InodeKind::File {
            return Err(errno(libc::EINVAL));
        }
        match self
            .source
            .read_into(i, offset, u64::from(size), &mut GuestSink(w))
        {
            Ok(n) => {
                self.source
                    .read_ahead(inode, i, offset, offset.saturating_add(n));
                Ok(n as usize)
            }
            Err(e) => {
                let e = e.in_file(String::from_utf8_lossy(&self.image.path_of(inode)).into_owned());
                tracing::error!(inode, size, error = %e, "read failed");
                Err(errno(libc::EIO))
            }
        }
    }

    /// SEEK_DATA and SEEK_HOLE (the kernel answers SEEK_SET/CUR/END itself).
    fn lseek(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        let i = self.image.inode(inode).ok_or_else(enoent)?;
        if i.kind != InodeKind::File {
            return Err(errno(libc::EINVAL));
        }
        let data = match whence as i32 {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return Err(errno(libc::EINVAL)),
        };
        i.seek(offset, data).ok_or_else(|| errno(libc::ENXIO))
    }

    fn release(
        &self,
        _ctx: &Context,
        _inode: u64,
        _flags: u32,
        _handle: u64,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        Ok(())
    }

    fn statfs(&self, _ctx: &Context, _inode: u64) -> io::Result<statvfs64> {
        Ok(self.statvfs())
    }

    fn getxattr(
        &self,
        _ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let i = self.image.inode(inode).ok_or_else(enoent)?;
        let x = i
            .xattrs
            .iter()
            .find(|x| x.name == name.to_bytes())
            .ok_or_else(|| errno(libc::ENODATA))?;
        if size == 0 {
            return Ok(GetxattrReply::Count(x.value.len() as u32));
        }
        if (size as usize) < x.value.len() {
            return Err(errno(libc::ERANGE));
        }
        Ok(GetxattrReply::Value(x.value.clone()))
    }

    fn listxattr(&self, _ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        let i = self.image.inode(inode).ok_or_else(enoent)?;
        let mut names = Vec::new();
        for x in &i.xattrs {
            names.extend_from_slice(&x.name);
            names.push(0);
        }
        if size == 0 {
            return Ok(ListxattrReply::Count(names.len() as u32));
        }
        if (size as usize) < names.len() {
            return Err(errno(libc::ERANGE));
        }
        Ok(ListxattrReply::Names(names))
    }

    fn opendir(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let i = self.image.inode(inode).ok_or_else(enoent)?;
        if i.kind != InodeKind::Dir {
            return Err(errno(libc::ENOTDIR));
        }
        Ok((None, OpenOptions::CACHE_DIR | OpenOptions::KEEP_CACHE))
    }

    fn readdir(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.dir_entries(inode, offset, add_entry)
    }

    fn readdirplus(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.dir_entries(inode, offset, |d| {
            let e = self.entry(d.ino)?;
            add_entry(d, e)
        })
    }

    fn releasedir(&self, _ctx: &Context, _inode: u64, _flags: u32, _handle: u64) -> io::Result<()> {
        Ok(())
    }

    fn access(&self, _ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        self.image.inode(inode).ok_or_else(enoent)?;
        if mask as i32 & libc::W_OK != 0 {
            return Err(errno(libc::EROFS));
        }
        Ok(())
    }
}
