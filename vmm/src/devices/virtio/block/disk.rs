//! The disk behind a virtio-blk device: a raw image file, its size in 512-byte sectors, and
//! positional I/O straight between the file and guest memory (no host-side copy). The checks
//! of a request's range against the disk's end are the caller's; this file refuses a range
//! that does not lie in one guest memory region.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};

pub const SECTOR_SIZE: u64 = 512;
pub const SECTOR_SHIFT: u32 = 9;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {path} is not a regular file ({kind})")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "disk image {path} is {size} bytes: a disk image must be a non-empty multiple of 512 bytes"
    )]
    BadSize { path: PathBuf, size: u64 },
}

/// An open raw disk image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    sectors: u64,
    readonly: bool,
}

impl DiskImage {
    /// Opens `path` (read-only or read-write), checking it is a regular file whose size is a
    /// non-zero multiple of [`SECTOR_SIZE`].
    pub fn open(path: &Path, readonly: bool) -> Result<Self, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_owned(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| DiskError::Open {
            path: path.to_owned(),
            source,
        })?;
        let kind = meta.file_type();
        if !kind.is_file() {
            let kind = if kind.is_dir() {
                "a directory"
            } else if kind.is_block_device() {
                "a block device"
            } else if kind.is_char_device() {
                "a character device"
            } else if kind.is_fifo() {
                "a FIFO"
            } else {
                "a special file"
            };
            return Err(DiskError::NotRegular {
                path: path.to_owned(),
                kind,
            });
        }
        let size = meta.len();
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::BadSize {
                path: path.to_owned(),
                size,
            });
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            sectors: size >> SECTOR_SHIFT,
            readonly,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// The image's descriptor (for the worker's seccomp filter, which allows I/O on it only).
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Reads `len` bytes at `offset` of the image into guest memory at `addr`.
    pub fn read_to_guest(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: u32,
        offset: u64,
    ) -> std::io::Result<()> {
        self.transfer(mem, addr, len, offset, Direction::ToGuest)
    }

    /// Writes `len` bytes of guest memory at `addr` to the image at `offset`.
    pub fn write_from_guest(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: u32,
        offset: u64,
    ) -> std::io::Result<()> {
        if self.readonly {
            return Err(std::io::Error::from_raw_os_error(libc::EROFS));
        }
        self.transfer(mem, addr, len, offset, Direction::FromGuest)
    }

    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: u32,
        offset: u64,
        direction: Direction,
    ) -> std::io::Result<()> {
        let len = len as usize;
        let slice = mem
            .get_slice(addr, len)
            .map_err(|e| std::io::Error::other(format!("guest buffer: {e}")))?;
        let guard = slice.ptr_guard_mut();
        let base = guard.as_ptr();
        let mut done = 0usize;
        while done < len {
            let at = i64::try_from(offset + done as u64)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: `base..base + len` is guest memory that `get_slice` checked lies in one
            // mapped region, which stays mapped while `mem` lives; the kernel touches at most
            // `len - done` bytes from `base + done`. The guest may change the bytes meanwhile,
            // which only affects what it reads or writes.
            let n = unsafe {
                let ptr = base.add(done).cast::<libc::c_void>();
                match direction {
                    Direction::ToGuest => libc::pread64(self.raw_fd(), ptr, len - done, at),
                    Direction::FromGuest => libc::pwrite64(self.raw_fd(), ptr, len - done, at),
                }
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                // The image shrank under us.
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Makes written data durable (fdatasync); nothing to do on a read-only image.
    pub fn flush(&self) -> std::io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Frees `len` bytes at `offset` (the range reads as zeroes afterwards). A filesystem that
    /// cannot punch holes makes this a no-op: a discard is a hint.
    pub fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if self.readonly {
            return Err(std::io::Error::from_raw_os_error(libc::EROFS));
        }
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on our own descriptor with plain integer arguments.
        let ret = unsafe { libc::fallocate(self.raw_fd(), PUNCH_HOLE_MODE, offset, len) };
        if ret == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) => Ok(()),
            _ => Err(err),
        }
    }
}

/// The only fallocate mode the worker uses (and its seccomp filter allows).
pub const PUNCH_HOLE_MODE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

#[derive(Clone, Copy)]
enum Direction {
    ToGuest,
    FromGuest,
}
