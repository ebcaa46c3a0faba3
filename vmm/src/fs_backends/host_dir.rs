//! Host directories a share writes into, opened safely: every component of the configured path
//! is walked from `/` with `O_NOFOLLOW`, so a symlink planted anywhere along it (for instance
//! by a guest that can write a parent directory through another share) is refused instead of
//! followed; missing components of a layer directory are created 0700. The passthrough
//! backend is then imported from the opened descriptor, never from the path again.
//!
//! Also the `*at` calls the vmm's own copy-up makes inside a layer (see `copy_up`): walking
//! below a directory without following symlinks, creating, renaming without replacing,
//! unlinking, setting an extended attribute.
//!
//! fuse-backend-rs's passthrough needs a umask of 0 so the guest's modes apply exactly, and
//! sets it process-wide in `import()`. The umask is part of a thread's filesystem context
//! (`CLONE_FS`), so the import runs on a thread of its own context, as every thread serving
//! FUSE requests does ([`enter_fs_context`]); the rest of the process keeps its umask.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use fuse_backend_rs::passthrough::PassthroughFs;

use crate::devices::virtio::fs::enter_fs_context;

/// Opens directory `path` without following a symlink in any component (a relative path is
/// walked from the working directory). With `create`, missing components are made with that
/// mode.
pub fn open_dir_nofollow(path: &Path, create: Option<u32>) -> io::Result<OwnedFd> {
    let (start, mut walked) = if path.is_absolute() {
        (c"/", std::path::PathBuf::from("/"))
    } else {
        (c".", std::path::PathBuf::new())
    };
    let mut dir = open_at(libc::AT_FDCWD, start)?;
    for component in path.components() {
        let name = match component {
            Component::RootDir | Component::CurDir => continue,
            Component::Normal(name) => name,
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} has a `..` component", path.display()),
                ))
            }
        };
        walked.push(name);
        let cname = CString::new(name.as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        let next = match open_at(dir.as_raw_fd(), &cname) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create.is_some() => {
                let mode = create.unwrap_or(0o700);
                // SAFETY: a valid directory descriptor and a NUL-terminated name.
                let made = unsafe { libc::mkdirat(dir.as_raw_fd(), cname.as_ptr(), mode) };
                if made != 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(named(&walked, e));
                    }
                }
                open_at(dir.as_raw_fd(), &cname)
            }
            other => other,
        };
        dir = next.map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOTDIR) && is_symlink(dir.as_raw_fd(), &cname) {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} is a symlink, which a share path may not contain",
                        walked.display()
                    ),
                )
            } else {
                named(&walked, e)
            }
        })?;
    }
    Ok(dir)
}

fn named(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn open_at(dir: i32, name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `name` is NUL-terminated; the returned descriptor is owned below.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens (`O_PATH`) the directory `names` leads to below the directory `root`, one component
/// at a time, following no symlink: a path a guest may be changing as it is walked never
/// leads out of `root`.
pub fn open_dir_beneath(root: &OwnedFd, names: &[CString]) -> io::Result<OwnedFd> {
    let mut dir = open_at(root.as_raw_fd(), c".")?;
    for name in names {
        if name.as_bytes() == b".." || name.as_bytes() == b"." || name.as_bytes().contains(&b'/') {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        dir = open_at(dir.as_raw_fd(), name)?;
    }
    Ok(dir)
}

/// Creates the regular file `name` in `dir` (it must not exist), read-write, with `mode`
/// (the calling thread's umask applies).
pub fn create_new_file(dir: &OwnedFd, name: &std::ffi::CStr, mode: u32) -> io::Result<File> {
    let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: a valid directory descriptor and a NUL-terminated name; the returned descriptor
    // is owned below.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Removes the file `name` from `dir`.
pub fn unlink_at(dir: &OwnedFd, name: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: a valid directory descriptor and a NUL-terminated name.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves `from` in `from_dir` to `to` in `to_dir` (one filesystem), failing with EEXIST when
/// `to` exists: never replaces anything. Filesystems without `RENAME_NOREPLACE` get a hard
/// link and an unlink, which give the same guarantee.
pub fn rename_noreplace(
    from_dir: &OwnedFd,
    from: &std::ffi::CStr,
    to_dir: &OwnedFd,
    to: &std::ffi::CStr,
) -> io::Result<()> {
    // SAFETY: valid directory descriptors and NUL-terminated names.
    let rc = unsafe {
        libc::renameat2(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    // SAFETY: as above.
    let linked = unsafe {
        libc::linkat(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            0,
        )
    };
    if linked != 0 {
        return Err(io::Error::last_os_error());
    }
    unlink_at(from_dir, from)
}

/// Sets extended attribute `name` of `file` to `value`.
pub fn set_xattr(file: &File, name: &std::ffi::CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: a valid descriptor, a NUL-terminated name and a buffer of `value.len()` bytes.
    let rc = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn is_symlink(dir: i32, name: &std::ffi::CStr) -> bool {
    // SAFETY: an all-zero stat is a valid out-buffer; `name` is NUL-terminated.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    rc == 0 && st.st_mode & libc::S_IFMT == libc::S_IFLNK
}

/// Runs `f` on a thread whose working directory is `root` and whose umask is 0, in a
/// filesystem context of its own, so neither the process's working directory nor its umask
/// changes. The passthrough backend, configured with root `.`, resolves its root there: at
/// import, and again whenever the guest's INIT or DESTROY makes it re-import.
pub fn run_at_root<T: Send>(
    root: &OwnedFd,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_fs_context()?;
                // SAFETY: `root` is an open directory descriptor.
                if unsafe { libc::fchdir(root.as_raw_fd()) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("a thread at the share root panicked")))
    })
}

/// Imports `fs` (configured with root `.`) from the directory `root`.
pub fn import_from(fs: &PassthroughFs, root: &OwnedFd) -> io::Result<()> {
    run_at_root(root, || fs.import())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_anywhere_in_the_path_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir_all(real.join("inner")).unwrap();
        std::os::unix::fs::symlink(&real, tmp.path().join("link")).unwrap();
        assert!(open_dir_nofollow(&real.join("inner"), None).is_ok());
        let err = open_dir_nofollow(&tmp.path().join("link/inner"), None).unwrap_err();
        assert!(err.to_string().contains("is a symlink"), "{err}");
        let err = open_dir_nofollow(&tmp.path().join("link"), Some(0o700)).unwrap_err();
        assert!(err.to_string().contains("is a symlink"), "{err}");
        assert!(open_dir_nofollow(Path::new("no-such-relative-dir"), None).is_err());
        assert!(open_dir_nofollow(&tmp.path().join("real/../real"), None).is_err());
    }

    #[test]
    fn missing_layer_directories_are_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let layer = tmp.path().join("vm1/rootfs");
        open_dir_nofollow(&layer, Some(0o700)).unwrap();
        for dir in [tmp.path().join("vm1"), layer] {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o700, "{}", dir.display());
        }
    }
}
