//! Conversion of image inodes to the kernel's `stat64` / `statvfs64` and FUSE entries.

use super::{FlistFs, ATTR_TIMEOUT};
use crate::meta::InodeKind;
use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64};
use fuse_backend_rs::api::filesystem::Entry;
use std::io;

pub(super) const BLOCK: u64 = 4096;

pub(super) fn enoent() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

impl FlistFs {
    pub(super) fn stat(&self, ino: u64) -> io::Result<stat64> {
        let i = self.image.inode(ino).ok_or_else(enoent)?;
        // SAFETY: stat64 is plain old data; all-zero is a valid value.
        let mut st: stat64 = unsafe { std::mem::zeroed() };
        st.st_ino = ino;
        st.st_mode = i.kind.mode_bits() | (i.mode & 0o7777);
        st.st_nlink = self.image.nlink(ino) as _;
        st.st_uid = i.uid;
        st.st_gid = i.gid;
        st.st_rdev = i.rdev as _;
        st.st_size = match i.kind {
            InodeKind::Dir => BLOCK as i64,
            _ => i.size as i64,
        };
        st.st_blksize = BLOCK as _;
        // What the file occupies: its data, not its holes.
        st.st_blocks = match i.kind {
            InodeKind::File => i.data_bytes().div_ceil(512) as _,
            _ => (st.st_size as u64).div_ceil(512) as _,
        };
        st.st_mtime = i.mtime.secs;
        st.st_mtime_nsec = i64::from(i.mtime.nsecs);
        st.st_atime = i.mtime.secs;
        st.st_atime_nsec = i64::from(i.mtime.nsecs);
        st.st_ctime = i.ctime.secs;
        st.st_ctime_nsec = i64::from(i.ctime.nsecs);
        Ok(st)
    }

    pub(super) fn entry(&self, ino: u64) -> io::Result<Entry> {
        Ok(Entry {
            inode: ino,
            generation: 0,
            attr: self.stat(ino)?,
            attr_flags: 0,
            attr_timeout: ATTR_TIMEOUT,
            entry_timeout: ATTR_TIMEOUT,
        })
    }

    pub(super) fn statvfs(&self) -> statvfs64 {
        // SAFETY: statvfs64 is plain old data; all-zero is a valid value.
        let mut st: statvfs64 = unsafe { std::mem::zeroed() };
        st.f_bsize = BLOCK as _;
        st.f_frsize = BLOCK as _;
        st.f_blocks = self.image.total_file_bytes().div_ceil(BLOCK) as _;
        st.f_files = self.image.inodes.len() as _;
        st.f_namemax = 255;
        st.f_flag = libc::ST_RDONLY as _;
        st
    }
}
