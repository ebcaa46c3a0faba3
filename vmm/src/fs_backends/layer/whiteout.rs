//! The layer's on-disk marks, as overlayfs defines them and as the earlier layers (made with
//! fuse-backend-rs's overlay) already hold them:
//! - a whiteout: a 0:0 character device where a name of the image is removed;
//! - an opaque directory: `trusted.overlay.opaque=y` (the `user.` spellings are read too),
//!   the image's directory of that name does not show through;
//! - a redirect: `trusted.gridnode.redirect=/image/path` on a directory moved away from its
//!   image path, which still shows that image directory's entries (overlayfs's
//!   `trusted.overlay.redirect`, under our own name since our value is always absolute);
//! - an origin: `trusted.gridnode.origin=<image inode>` on a copied-up file that has other
//!   names in the image, whose copy is also linked as `work/index/<image inode>` so its other
//!   names link to the same copy.
//!
//! - a guest's device node: a plain empty file (never a host device) with
//!   `trusted.gridnode.device=c <rdev>` (or `b`): the guest sees the device node, its own
//!   kernel serves it (a FUSE server never sees a device node opened);
//!
//! Every mark is written by the vmm on the host, past the guard's guest-attribute mapping, so
//! a guest can neither forge nor read one (its own attributes live under `user.gridnode.`).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::OwnedFd;

use super::host;

pub const OPAQUE_XATTRS: [&CStr; 3] = [
    c"trusted.overlay.opaque",
    c"user.overlay.opaque",
    c"user.fuseoverlayfs.opaque",
];
pub const REDIRECT_XATTR: &CStr = c"trusted.gridnode.redirect";
pub const ORIGIN_XATTR: &CStr = c"trusted.gridnode.origin";
pub const DEVICE_XATTR: &CStr = c"trusted.gridnode.device";
/// The directory in `work/` holding one link per copied-up file with several image names.
pub const INDEX_DIR: &CStr = c"index";

/// Whether host attributes `st` are a whiteout's.
pub fn is_whiteout(st: &libc::stat64) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0
}

/// Whether the directory `dir` is opaque.
pub fn is_opaque(dir: &OwnedFd) -> io::Result<bool> {
    for name in OPAQUE_XATTRS {
        if let Some(v) = host::get_xattr(dir, name)? {
            if v.eq_ignore_ascii_case(b"y") {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

pub fn set_opaque(dir: &OwnedFd) -> io::Result<()> {
    host::set_xattr(dir, OPAQUE_XATTRS[0], b"y")
}

/// The image path a moved directory `dir` shows (absolute, as stored), if any.
pub fn redirect(dir: &OwnedFd) -> io::Result<Option<Vec<u8>>> {
    host::get_xattr(dir, REDIRECT_XATTR)
}

pub fn set_redirect(dir: &OwnedFd, image_path: &[u8]) -> io::Result<()> {
    let mut value = b"/".to_vec();
    value.extend_from_slice(image_path);
    host::set_xattr(dir, REDIRECT_XATTR, &value)
}

/// The value of [`DEVICE_XATTR`] for a device node of type `kind` and number `rdev`.
pub fn device_value(kind: u32, rdev: u32) -> Vec<u8> {
    let letter = if kind == libc::S_IFBLK { 'b' } else { 'c' };
    format!("{letter} {rdev}").into_bytes()
}

/// The device node (type, number) a host file of the layer stands for, if any: read only for
/// empty regular files.
pub fn device_of(dir: &OwnedFd, name: &CStr, st: &libc::stat64) -> io::Result<Option<(u32, u32)>> {
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_size != 0 {
        return Ok(None);
    }
    let fd = host::open_path(dir, name)?;
    let Some(value) = host::get_xattr(&fd, DEVICE_XATTR)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&value);
    let mut parts = text.split(' ');
    let kind = match parts.next() {
        Some("b") => libc::S_IFBLK,
        Some("c") => libc::S_IFCHR,
        _ => return Ok(None),
    };
    Ok(parts
        .next()
        .and_then(|n| n.parse().ok())
        .map(|rdev| (kind, rdev)))
}

/// The name of image inode `ino` in the index.
pub fn index_name(ino: u64) -> CString {
    // Decimal digits: never a NUL.
    CString::new(ino.to_string()).unwrap_or_default()
}

/// Removes `name` in `dir` and, for a directory, everything below it (no symlink followed).
pub fn remove_all(dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    let Some(st) = host::stat_at(dir, name)? else {
        return Ok(());
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return host::unlink_at(dir, name, false);
    }
    let sub = host::open_dir(dir, name)?;
    for (child, _, _) in host::list_dir(&sub)? {
        remove_all(&sub, &child)?;
    }
    host::unlink_at(dir, name, true)
}
