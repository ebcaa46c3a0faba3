//! virtio-blk over a raw image file: read-only or read-write, flush (fdatasync), discard
//! (punched holes), GET_ID (a serial), and a token-bucket rate limiter; one queue served by a
//! worker thread of its own under a seccomp filter that allows I/O on the image only.

mod device;
mod disk;
mod request;
#[cfg(test)]
mod tests;
mod worker;

pub use device::{BlockDevice, BlockError};
pub use disk::{DiskError, DiskImage, PUNCH_HOLE_MODE, SECTOR_SIZE};
