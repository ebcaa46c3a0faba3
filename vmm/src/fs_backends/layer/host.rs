//! The few host calls the layer makes itself on its own directories, past the passthrough
//! (whiteouts, opaque and redirect marks, atomic renames, copy-up staging): thin wrappers of
//! the `*at` system calls on directory descriptors, never following a symlink. Each `unsafe`
//! block passes a valid descriptor, NUL-terminated names and buffers of the stated length.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `lstat` of `name` in `dir`; `None` when it is not there.
pub fn stat_at(dir: &OwnedFd, name: &CStr) -> io::Result<Option<libc::stat64>> {
    // SAFETY: an all-zero stat is a valid out-buffer.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: see the module comment.
    let rc = unsafe {
        libc::fstatat64(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    match check(rc) {
        Ok(()) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `fstat` of a descriptor (an `O_PATH` one too).
pub fn stat_fd(fd: &OwnedFd) -> io::Result<libc::stat64> {
    // SAFETY: an all-zero stat is a valid out-buffer.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: see the module comment.
    check(unsafe {
        libc::fstatat64(
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

/// Opens (`O_PATH`) the directory `name` in `dir`, following no symlink.
pub fn open_dir(dir: &OwnedFd, name: &CStr) -> io::Result<OwnedFd> {
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: see the module comment; the descriptor is owned below.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
    check(fd)?;
    // SAFETY: just opened, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens (`O_PATH`) `name` in `dir`, whatever it is, following no symlink.
pub fn open_path(dir: &OwnedFd, name: &CStr) -> io::Result<OwnedFd> {
    let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: see the module comment; the descriptor is owned below.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
    check(fd)?;
    // SAFETY: just opened, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A readable descriptor of the directory `dir` refers to (for listing, syncing).
pub fn reopen_dir(dir: &OwnedFd) -> io::Result<std::fs::File> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // SAFETY: see the module comment; the descriptor is owned below.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c".".as_ptr(), flags) };
    check(fd)?;
    // SAFETY: just opened, owned by nobody else.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// The names in directory `dir` (without `.` and `..`) with their `d_type` and inode number.
pub fn list_dir(dir: &OwnedFd) -> io::Result<Vec<(CString, u8, u64)>> {
    let file = reopen_dir(dir)?;
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::{DirEntryExt, FileTypeExt};
        let ft = entry.file_type()?;
        let dt = if ft.is_dir() {
            libc::DT_DIR
        } else if ft.is_file() {
            libc::DT_REG
        } else if ft.is_symlink() {
            libc::DT_LNK
        } else if ft.is_char_device() {
            libc::DT_CHR
        } else if ft.is_block_device() {
            libc::DT_BLK
        } else if ft.is_fifo() {
            libc::DT_FIFO
        } else if ft.is_socket() {
            libc::DT_SOCK
        } else {
            libc::DT_UNKNOWN
        };
        let name = CString::new(entry.file_name().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EIO))?;
        out.push((name, dt, entry.ino()));
    }
    Ok(out)
}

/// Makes the overlay whiteout (a 0:0 character device) `name` in `dir`.
pub fn mknod_whiteout(dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    // SAFETY: see the module comment.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), libc::S_IFCHR, 0) })
}

pub fn mkdir_at(dir: &OwnedFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: see the module comment.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) })
}

pub fn mknod_at(dir: &OwnedFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: see the module comment.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, 0) })
}

pub fn symlink_at(target: &[u8], dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    let target = CString::new(target).map_err(|_| io::Error::from_raw_os_error(libc::EIO))?;
    // SAFETY: see the module comment.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
}

/// Removes `name` from `dir` (a directory with `dir_entry`).
pub fn unlink_at(dir: &OwnedFd, name: &CStr, dir_entry: bool) -> io::Result<()> {
    let flags = if dir_entry { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: see the module comment.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })
}

pub fn link_at(from_dir: &OwnedFd, from: &CStr, to_dir: &OwnedFd, to: &CStr) -> io::Result<()> {
    // SAFETY: see the module comment.
    check(unsafe {
        libc::linkat(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            0,
        )
    })
}

/// `renameat2(2)` with `flags` (RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT).
pub fn rename_at(
    from_dir: &OwnedFd,
    from: &CStr,
    to_dir: &OwnedFd,
    to: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: see the module comment.
    check(unsafe {
        libc::renameat2(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            flags,
        )
    })
}

/// Gives `name` in `dir` (not followed) owner `uid`:`gid`; an unprivileged vmm keeps its own.
pub fn chown_at(dir: &OwnedFd, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: see the module comment.
    let rc = unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    match check(rc) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EINVAL)) => {
            tracing::debug!("layer: keeps the vmm's owner: {e}");
            Ok(())
        }
        other => other,
    }
}

pub fn chmod_at(dir: &OwnedFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: see the module comment.
    check(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode, 0) })
}

/// Sets the access and modification times of `name` in `dir` (not followed).
pub fn times_at(dir: &OwnedFd, name: &CStr, st: &libc::stat64) -> io::Result<()> {
    let times = [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ];
    // SAFETY: see the module comment; `times` holds two timespecs.
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// The path through which the object `fd` refers to is reached by path-based calls.
fn proc_path(fd: &OwnedFd) -> CString {
    // A decimal number: never holds a NUL.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// Extended attribute `name` of the directory (or file) `fd` refers to; `None` when absent
/// or when the filesystem keeps none.
pub fn get_xattr(fd: &OwnedFd, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    let path = proc_path(fd);
    let mut buf = vec![0u8; 4096];
    // SAFETY: see the module comment; `buf` has `buf.len()` bytes.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

pub fn set_xattr(fd: &OwnedFd, name: &CStr, value: &[u8]) -> io::Result<()> {
    let path = proc_path(fd);
    // SAFETY: see the module comment; `value` has `value.len()` bytes.
    check(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}
