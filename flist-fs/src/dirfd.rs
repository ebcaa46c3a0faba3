//! Walking and building trees relative to directory descriptors (the `*at` calls), so that
//! no path handed to the kernel is longer than one entry name: a tree whose paths, with the
//! prefix of where it lives, exceed `PATH_MAX` (4096 bytes) packs and unpacks like any other.
//! Nothing here follows a symlink in the last component (`O_NOFOLLOW`/`AT_SYMLINK_NOFOLLOW`),
//! and every descriptor is close-on-exec.
//!
//! Extended attributes have no `*at` calls; they go through `/proc/self/fd/N/NAME`, a short
//! path the kernel resolves through the directory descriptor (the `l*xattr` calls do not
//! follow the final symlink).
//!
//! This is the crate's thin unsafe layer for these calls: each function checks its result and
//! returns an `io::Error` for the caller to name the path with.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// An entry name as a C string; a name with a NUL or a `/` is refused.
pub fn cname(name: &[u8]) -> io::Result<CString> {
    if name.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an entry name may not contain '/'",
        ));
    }
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn fd_result(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens directory `path` (the root of a walk); a symlink as its last component is refused.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
    // SAFETY: a valid NUL-terminated path.
    fd_result(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })
}

/// Opens the directory `name` inside `dir`.
pub fn open_dir_at(dir: &OwnedFd, name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: a valid directory descriptor and a NUL-terminated name.
    fd_result(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })
}

/// Opens the file `name` inside `dir` for reading.
pub fn open_file_at(dir: &OwnedFd, name: &CStr) -> io::Result<File> {
    // SAFETY: a valid directory descriptor and a NUL-terminated name.
    let fd = fd_result(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    Ok(File::from(fd))
}

/// Creates the file `name` inside `dir` (it must not exist), write-only, mode 0600.
pub fn create_file_at(dir: &OwnedFd, name: &CStr) -> io::Result<File> {
    // SAFETY: a valid directory descriptor and a NUL-terminated name.
    let fd = fd_result(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    })?;
    Ok(File::from(fd))
}

/// The names in directory `dir`, `.` and `..` left out, in the order the kernel gives them.
pub fn read_names(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    // fdopendir takes the descriptor it is given: give it a duplicate.
    // SAFETY: dup of a valid descriptor.
    let dup = fd_result(unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    // The duplicate shares the file position: start from the beginning.
    // SAFETY: lseek on a descriptor this function owns.
    check(unsafe { libc::lseek(dup.as_raw_fd(), 0, libc::SEEK_SET) } as libc::c_int)?;
    // SAFETY: `dup` is a valid directory descriptor; on success the stream owns it.
    let stream = unsafe { libc::fdopendir(dup.as_raw_fd()) };
    if stream.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(dup);
    let mut names = Vec::new();
    let result = loop {
        // errno distinguishes the end (unchanged) from an error.
        // SAFETY: errno is thread-local.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is a valid open directory stream.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            let errno = io::Error::last_os_error();
            break match errno.raw_os_error() {
                Some(0) | None => Ok(()),
                Some(_) => Err(errno),
            };
        }
        // SAFETY: a non-null entry's name is NUL-terminated and valid until the next call.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    };
    // SAFETY: `stream` is valid and closed once (this also closes the duplicate).
    unsafe { libc::closedir(stream) };
    result.map(|()| names)
}

/// `fstatat` of `name` in `dir` (the directory itself with `name` = `None`), never following
/// a symlink.
pub fn stat_at(dir: &OwnedFd, name: Option<&CStr>) -> io::Result<libc::stat> {
    // SAFETY: stat64 is plain data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // fstatat with an empty path and AT_EMPTY_PATH is the directory itself (Linux 2.6.39).
    let (path, flags) = match name {
        Some(n) => (n, libc::AT_SYMLINK_NOFOLLOW),
        None => (c"", libc::AT_EMPTY_PATH),
    };
    // SAFETY: a valid descriptor, a NUL-terminated name and a stat buffer of the right type.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), path.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

/// The target of symlink `name` in `dir`.
pub fn readlink_at(dir: &OwnedFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is valid for `buf.len()` bytes.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// A short path to `name` in `dir` (or to `dir` itself, as `/proc/self/fd/N/.`: the magic
/// link alone would be the link's own) for calls without an `*at` form.
pub fn proc_path(dir: &OwnedFd, name: Option<&[u8]>) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    p.push(OsStr::from_bytes(name.unwrap_or(b".")));
    p
}

pub fn mkdir_at(dir: &OwnedFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: a valid directory descriptor and a NUL-terminated name.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) })
}

pub fn symlink_at(target: &[u8], dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    let t = CString::new(target)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a symlink target"))?;
    // SAFETY: NUL-terminated strings and a valid directory descriptor.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
}

pub fn mknod_at(dir: &OwnedFd, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    // SAFETY: a valid directory descriptor and a NUL-terminated name.
    check(unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            name.as_ptr(),
            mode as libc::mode_t,
            rdev as libc::dev_t,
        )
    })
}

/// A hard link `new_dir/new_name` to `old_dir/old_name`.
pub fn link_at(
    old_dir: &OwnedFd,
    old_name: &CStr,
    new_dir: &OwnedFd,
    new_name: &CStr,
) -> io::Result<()> {
    // SAFETY: valid descriptors and NUL-terminated names; flags 0 does not follow symlinks.
    check(unsafe {
        libc::linkat(
            old_dir.as_raw_fd(),
            old_name.as_ptr(),
            new_dir.as_raw_fd(),
            new_name.as_ptr(),
            0,
        )
    })
}

pub fn chown_at(dir: &OwnedFd, name: Option<&CStr>, uid: u32, gid: u32) -> io::Result<()> {
    match name {
        // SAFETY: a valid descriptor and a NUL-terminated name.
        Some(n) => check(unsafe {
            libc::fchownat(
                dir.as_raw_fd(),
                n.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        }),
        // SAFETY: a valid descriptor.
        None => check(unsafe { libc::fchown(dir.as_raw_fd(), uid, gid) }),
    }
}

/// Sets the permission bits of `name` in `dir` (or of `dir`); not for symlinks.
pub fn chmod_at(dir: &OwnedFd, name: Option<&CStr>, mode: u32) -> io::Result<()> {
    match name {
        // SAFETY: a valid directory descriptor and a NUL-terminated name.
        Some(n) => {
            check(unsafe { libc::fchmodat(dir.as_raw_fd(), n.as_ptr(), mode as libc::mode_t, 0) })
        }
        // SAFETY: a valid descriptor.
        None => check(unsafe { libc::fchmod(dir.as_raw_fd(), mode as libc::mode_t) }),
    }
}

/// Sets access and modification times of `name` in `dir` (or of `dir`), never following a
/// symlink.
pub fn set_times_at(dir: &OwnedFd, name: Option<&CStr>, secs: i64, nsecs: u32) -> io::Result<()> {
    let t = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: nsecs as libc::c_long,
    };
    let times = [t, t];
    match name {
        // SAFETY: a valid descriptor, a NUL-terminated name and two timespecs.
        Some(n) => check(unsafe {
            libc::utimensat(
                dir.as_raw_fd(),
                n.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        }),
        // SAFETY: a valid descriptor and two timespecs.
        None => check(unsafe { libc::futimens(dir.as_raw_fd(), times.as_ptr()) }),
    }
}

/// Raises this process's soft limit of open descriptors to its hard limit: a walk holds one
/// descriptor per directory level of the tree.
pub fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_stats_relative_to_a_directory() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("a"), b"x").unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        std::os::unix::fs::symlink("a", t.path().join("l")).unwrap();
        let dir = open_dir(t.path()).unwrap();
        let mut names = read_names(&dir).unwrap();
        names.sort();
        assert_eq!(names, vec![b"a".to_vec(), b"d".to_vec(), b"l".to_vec()]);
        // Twice: the listing starts from the beginning each time.
        assert_eq!(read_names(&dir).unwrap().len(), 3);
        let l = cname(b"l").unwrap();
        assert_eq!(
            stat_at(&dir, Some(&l)).unwrap().st_mode & libc::S_IFMT,
            libc::S_IFLNK
        );
        assert_eq!(readlink_at(&dir, &l).unwrap(), b"a");
        assert!(
            open_file_at(&dir, &l).is_err(),
            "a symlink is never followed"
        );
        assert!(open_dir_at(&dir, &cname(b"d").unwrap()).is_ok());
        assert!(cname(b"a/b").is_err() && cname(b"a\0").is_err());
        assert!(proc_path(&dir, Some(b"a")).exists());
    }
}
