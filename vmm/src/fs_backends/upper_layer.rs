//! The writable layer's upper filesystem as the overlay sees it: the layer's host directory
//! behind a [`Guard`] with the host-directory policy (no devices, no setuid, guest attributes
//! under `user.gridnode.`), marking opaque directories with `trusted.overlay.opaque` (root may
//! set it on every Linux filesystem with xattrs, tmpfs included) and reading a directory as not
//! opaque when the filesystem has no such attribute, instead of failing as fuse-backend-rs's
//! default does where `user.*` attributes are missing. The overlay's own markers are read and
//! written on the host directly, past the guest-attribute mapping, so a guest cannot forge them.

use std::ffi::CStr;
use std::io;

use fuse_backend_rs::api::filesystem::{Context, FileSystem, GetxattrReply, Layer};
use fuse_backend_rs::passthrough::PassthroughFs;

use super::guard::Guard;

const OPAQUE_XATTRS: [&CStr; 3] = [
    c"trusted.overlay.opaque",
    c"user.overlay.opaque",
    c"user.fuseoverlayfs.opaque",
];

impl Layer for Guard<PassthroughFs> {
    fn root_inode(&self) -> u64 {
        fuse_backend_rs::api::filesystem::ROOT_ID
    }

    fn is_opaque(&self, ctx: &Context, inode: u64) -> io::Result<bool> {
        for name in OPAQUE_XATTRS {
            match self.inner().getxattr(ctx, inode, name, 16) {
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
        self.inner().setxattr(ctx, inode, OPAQUE_XATTRS[0], b"y", 0)
    }
}
