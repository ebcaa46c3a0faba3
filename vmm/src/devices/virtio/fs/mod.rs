//! virtio-fs: a FUSE server (fuse-backend-rs) inside the VMM serving a filesystem to the guest
//! over virtio queues. The filesystem is any `fuse_backend_rs` `FileSystem`: a host directory,
//! or an flist image (served by flist-fs).

mod device;
mod pool;
#[cfg(test)]
mod tests;
mod thread_context;
mod worker;

pub use device::{FsDevice, FsDeviceError, MAX_TAG_LEN};
pub use thread_context::enter_fs_context;
pub use worker::FsCounters;
/// For the fuzz targets (`crate::fuzzing`).
pub(crate) use worker::QueueWorker;
