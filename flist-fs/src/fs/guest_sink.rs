//! Reads of a file's bytes into a FUSE reply: bytes in memory are written into it, a part of
//! a chunk's descriptor (from the node's chunk fetcher) is read by the kernel straight into the
//! reply's buffers (for virtio-fs, the guest's memory), with no copy in this process.
//!
//! [`SharedFile`] is this module's thin unsafe layer: `preadv`/`pread` into the slices
//! fuse-backend-rs hands over, which point at memory it keeps valid for the call.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use fuse_backend_rs::api::filesystem::ZeroCopyWriter;
use fuse_backend_rs::common::file_buf::FileVolatileSlice;
use fuse_backend_rs::common::file_traits::FileReadWriteVolatile;

use crate::fetch::Sink;

/// A FUSE reply being written, as a [`Sink`].
pub struct GuestSink<'a>(pub &'a mut dyn ZeroCopyWriter);

impl Sink for GuestSink<'_> {
    fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.0.write_all(b)
    }

    fn file_part(
        &mut self,
        file: &File,
        offset: u64,
        len: usize,
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        let n = match self.0.write_from(&mut SharedFile(file), len, offset) {
            // A writer that takes bytes only (a copy-up's staging file): read here first.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                buf.resize(len, 0);
                std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)?;
                return self.0.write_all(buf);
            }
            n => n?,
        };
        if n < len {
            self.0
                .write_all_from(&mut SharedFile(file), len - n, offset + n as u64)?;
        }
        Ok(())
    }
}

/// A shared descriptor read at explicit offsets only (no file position is used or changed,
/// so other threads may read it at once); never written.
struct SharedFile<'a>(&'a File);

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EBADF)
}

fn no_position() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "reads of a chunk give an offset",
    )
}

impl FileReadWriteVolatile for SharedFile<'_> {
    fn read_volatile(&mut self, _slice: FileVolatileSlice) -> io::Result<usize> {
        Err(no_position())
    }

    fn write_volatile(&mut self, _slice: FileVolatileSlice) -> io::Result<usize> {
        Err(read_only())
    }

    fn read_at_volatile(&mut self, slice: FileVolatileSlice, offset: u64) -> io::Result<usize> {
        let offset = libc::off64_t::try_from(offset).map_err(|_| no_position())?;
        // SAFETY: the kernel writes at most `slice.len()` bytes at `slice.as_ptr()`, memory
        // the slice's owner keeps valid and writable for this call; the result is checked.
        let n = unsafe {
            libc::pread64(
                self.0.as_raw_fd(),
                slice.as_ptr().cast(),
                slice.len(),
                offset,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    fn read_vectored_at_volatile(
        &mut self,
        bufs: &[FileVolatileSlice],
        offset: u64,
    ) -> io::Result<usize> {
        let offset = libc::off64_t::try_from(offset).map_err(|_| no_position())?;
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.as_ptr().cast(),
                iov_len: s.len(),
            })
            .collect();
        if iov.is_empty() {
            return Ok(0);
        }
        let count = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: as in `read_at_volatile`, for each of the `count` buffers described by
        // `iov` (built just above from the slices, alive for the call).
        let n = unsafe { libc::preadv64(self.0.as_raw_fd(), iov.as_ptr(), count, offset) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    fn write_at_volatile(&mut self, _slice: FileVolatileSlice, _offset: u64) -> io::Result<usize> {
        Err(read_only())
    }
}
