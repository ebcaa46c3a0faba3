//! The guest's root filesystem.
//!
//! Today the entrypoint runs in the initramfs. This is where a later change mounts a
//! virtio-fs tag (named on the kernel command line) as the new root and switches to it
//! (move the early mounts, chroot/switch_root, free the initramfs) before the entrypoint
//! starts; errors then become `InitError::Setup` and end the VM with a status.

use crate::error::InitError;

/// Prepares the root filesystem the entrypoint runs in. Currently: the initramfs as is.
pub fn prepare() -> Result<(), InitError> {
    Ok(())
}
