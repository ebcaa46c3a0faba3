//! The disk behind a virtio-blk device: a raw image file, its size in 512-byte sectors, and
//! positional vectored I/O straight between the file and guest memory (no host-side copy, one
//! `preadv`/`pwritev` for all of a request's buffers). The checks
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

    /// Reads the image from `offset` into the guest buffers `bufs` (guest address, length), in
    /// order, with as few system calls as the kernel allows (one `preadv` normally).
    pub fn read_to_guest(
        &self,
        mem: &GuestMemoryMmap,
        bufs: &[(GuestAddress, u32)],
        offset: u64,
    ) -> std::io::Result<()> {
        self.transfer(mem, bufs, offset, Direction::ToGuest)
    }

    /// Writes the guest buffers `bufs`, in order, to the image from `offset` (one `pwritev`
    /// normally).
    pub fn write_from_guest(
        &self,
        mem: &GuestMemoryMmap,
        bufs: &[(GuestAddress, u32)],
        offset: u64,
    ) -> std::io::Result<()> {
        if self.readonly {
            return Err(std::io::Error::from_raw_os_error(libc::EROFS));
        }
        self.transfer(mem, bufs, offset, Direction::FromGuest)
    }

    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        bufs: &[(GuestAddress, u32)],
        offset: u64,
        direction: Direction,
    ) -> std::io::Result<()> {
        if bufs.len() > MAX_SEGMENTS {
            return Err(std::io::Error::other(format!(
                "{} buffers in one transfer (at most {MAX_SEGMENTS})",
                bufs.len()
            )));
        }
        // Each buffer must lie in one guest memory region; the guards keep the pointers
        // alive for the call (they live as long as the regions `mem` holds).
        let mut guards = Vec::with_capacity(bufs.len());
        for &(addr, len) in bufs.iter().filter(|(_, len)| *len > 0) {
            let slice = mem
                .get_slice(addr, len as usize)
                .map_err(|e| std::io::Error::other(format!("guest buffer: {e}")))?;
            guards.push((slice.ptr_guard_mut(), len as usize));
        }
        let mut iovecs: Vec<libc::iovec> = guards
            .iter()
            .map(|(guard, len)| libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: *len,
            })
            .collect();
        let mut left: &mut [libc::iovec] = &mut iovecs;
        let mut at = offset;
        while !left.is_empty() {
            let pos =
                i64::try_from(at).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            // `left` holds at most MAX_SEGMENTS entries, below IOV_MAX.
            let count = left.len() as libc::c_int;
            // SAFETY: every iovec points into guest memory that `get_slice` checked lies in
            // one mapped region, which stays mapped while `mem` lives, for its length; the
            // kernel touches nothing else. The guest may change the bytes meanwhile, which
            // only affects what it reads or writes.
            let n = unsafe {
                match direction {
                    Direction::ToGuest => libc::preadv(self.raw_fd(), left.as_ptr(), count, pos),
                    Direction::FromGuest => libc::pwritev(self.raw_fd(), left.as_ptr(), count, pos),
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
            at += n as u64;
            left = advance(left, n as usize);
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

/// The most buffers one transfer takes (a request's data descriptors are fewer: its chain is
/// at most the queue's size); below the kernel's IOV_MAX (1024).
pub const MAX_SEGMENTS: usize = 1024;

/// Drops the first `done` bytes of `iovecs` (a partial transfer): whole entries are skipped,
/// the first one left is shortened.
fn advance(iovecs: &mut [libc::iovec], mut done: usize) -> &mut [libc::iovec] {
    let mut skip = 0;
    while skip < iovecs.len() && done >= iovecs[skip].iov_len {
        done -= iovecs[skip].iov_len;
        skip += 1;
    }
    let rest = &mut iovecs[skip..];
    if let Some(first) = rest.first_mut() {
        // `done` is less than this entry's length: still inside its buffer.
        first.iov_base = first.iov_base.cast::<u8>().wrapping_add(done).cast();
        first.iov_len -= done;
    }
    rest
}

/// The only fallocate mode the worker uses (and its seccomp filter allows).
pub const PUNCH_HOLE_MODE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

#[derive(Clone, Copy)]
enum Direction {
    ToGuest,
    FromGuest,
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn iovecs(lens: &[usize], base: &mut [u8]) -> Vec<libc::iovec> {
        let mut at = 0;
        lens.iter()
            .map(|&len| {
                let iov = libc::iovec {
                    iov_base: base[at..].as_mut_ptr().cast(),
                    iov_len: len,
                };
                at += len;
                iov
            })
            .collect()
    }

    #[test]
    fn a_partial_transfer_resumes_inside_the_right_buffer() {
        let mut base = [0u8; 64];
        let start = base.as_ptr() as usize;
        let mut v = iovecs(&[8, 16, 4], &mut base);
        let rest = advance(&mut v, 0);
        assert_eq!(rest.len(), 3);
        let rest = advance(rest, 8);
        assert_eq!(rest.len(), 2, "the first buffer is done");
        assert_eq!(rest[0].iov_base as usize, start + 8);
        let rest = advance(rest, 5);
        assert_eq!(
            (rest[0].iov_base as usize, rest[0].iov_len),
            (start + 13, 11)
        );
        let rest = advance(rest, 11 + 4);
        assert!(rest.is_empty());
    }

    #[test]
    fn vectored_io_moves_scattered_buffers_in_order_and_stops_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let disk = DiskImage::open(&path, false).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        // 300 + 0 + 212 + 512 bytes from three places, out of address order.
        mem.write_slice(&[1u8; 300], GuestAddress(0x8000)).unwrap();
        mem.write_slice(&[2u8; 212], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[3u8; 512], GuestAddress(0x4000)).unwrap();
        let bufs = [
            (GuestAddress(0x8000), 300),
            (GuestAddress(0x9000), 0),
            (GuestAddress(0x1000), 212),
            (GuestAddress(0x4000), 512),
        ];
        disk.write_from_guest(&mem, &bufs, 512).unwrap();
        let image = std::fs::read(&path).unwrap();
        assert!(image[..512].iter().all(|b| *b == 0));
        assert!(image[512..812].iter().all(|b| *b == 1));
        assert!(image[812..1024].iter().all(|b| *b == 2));
        assert!(image[1024..1536].iter().all(|b| *b == 3));
        assert!(image[1536..].iter().all(|b| *b == 0));

        // Back into one buffer.
        disk.read_to_guest(&mem, &[(GuestAddress(0x10000), 1024)], 512)
            .unwrap();
        let mut back = [0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(0x10000)).unwrap();
        assert_eq!(&back[..], &image[512..1536]);

        // Past the end: the read stops there and fails.
        let err = disk
            .read_to_guest(&mem, &[(GuestAddress(0x10000), 1024)], 7680)
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        // A buffer outside guest memory: nothing is transferred at all.
        std::fs::write(&path, vec![9u8; 8192]).unwrap();
        let err = disk
            .write_from_guest(
                &mem,
                &[(GuestAddress(0x8000), 512), (GuestAddress(1 << 20), 512)],
                0,
            )
            .unwrap_err();
        assert!(err.to_string().contains("guest buffer"), "{err}");
        assert!(std::fs::read(&path).unwrap().iter().all(|b| *b == 9));
        // Too many buffers for one call.
        let many = vec![(GuestAddress(0x8000), 1); MAX_SEGMENTS + 1];
        assert!(disk.read_to_guest(&mem, &many, 0).is_err());
    }
}
