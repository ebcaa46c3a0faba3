//! Path handling that never follows a symbolic link the jailer did not expect: directories
//! are walked one component at a time with `openat(O_NOFOLLOW)`, and everything the
//! jailer creates gets an explicit mode and owner (the umask does not apply).

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag, AT_FDCWD};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{fchown, Gid, Uid};

use crate::error::{Context, Error, Result};

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// The normal components of an absolute path.
fn parts(path: &Path) -> Result<Vec<&OsStr>> {
    if !path.is_absolute() {
        return Err(Error::Config(format!("{path:?} is not an absolute path")));
    }
    path.components()
        .filter(|c| *c != Component::RootDir)
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(Error::Config(format!("{path:?} contains '.' or '..'"))),
        })
        .collect()
}

/// Why `openat(parent, name, O_NOFOLLOW|O_DIRECTORY)` failed, as an error naming `shown`.
fn open_error(parent: BorrowedFd, name: &OsStr, errno: Errno, shown: &Path) -> Error {
    let is_link = fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK)
        .unwrap_or(false);
    if errno == Errno::ELOOP || is_link {
        Error::Symlink {
            path: shown.to_owned(),
        }
    } else {
        Error::Sys {
            what: format!("opening directory {}", shown.display()),
            source: errno,
        }
    }
}

/// Opens the directory `name` in `parent` without following a link.
fn open_child_dir(parent: BorrowedFd, name: &OsStr, shown: &Path) -> Result<OwnedFd> {
    openat(parent, name, DIR_FLAGS, Mode::empty()).map_err(|e| open_error(parent, name, e, shown))
}

/// Opens the existing directory `path` (absolute); fails with `Error::Symlink` when any
/// component is a symbolic link.
pub fn open_dir_nofollow(path: &Path) -> Result<OwnedFd> {
    let mut fd = openat(AT_FDCWD, "/", DIR_FLAGS, Mode::empty()).ctx(|| "opening /".into())?;
    let mut shown = PathBuf::from("/");
    for name in parts(path)? {
        shown.push(name);
        fd = open_child_dir(fd.as_fd(), name, &shown)?;
    }
    Ok(fd)
}

/// Creates the directory `name` in `parent` with exactly `mode` and the owner `uid:gid`,
/// and opens it. When it exists: an error if `must_be_new`, else it is opened as is
/// (a link is refused either way).
pub fn mkdir_at(
    parent: BorrowedFd,
    name: &OsStr,
    mode: u32,
    owner: (u32, u32),
    must_be_new: bool,
    shown: &Path,
) -> Result<OwnedFd> {
    let mode_t = Mode::from_bits_truncate(mode);
    match mkdirat(parent, name, mode_t) {
        Ok(()) => {
            let fd = open_child_dir(parent, name, shown)?;
            fchown(
                fd.as_fd(),
                Some(Uid::from_raw(owner.0)),
                Some(Gid::from_raw(owner.1)),
            )
            .ctx(|| format!("setting the owner of {}", shown.display()))?;
            fchmod(fd.as_fd(), mode_t)
                .ctx(|| format!("setting the mode of {}", shown.display()))?;
            Ok(fd)
        }
        Err(Errno::EEXIST) => {
            let fd = open_child_dir(parent, name, shown)?;
            if must_be_new {
                return Err(Error::Exists {
                    path: shown.to_owned(),
                });
            }
            Ok(fd)
        }
        Err(e) => Err(Error::Sys {
            what: format!("creating directory {}", shown.display()),
            source: e,
        }),
    }
}

/// `mkdir -p` of the absolute `path`: missing directories are created with `mode`, owned by
/// root; no component may be a link.
pub fn create_dirs_nofollow(path: &Path, mode: u32) -> Result<OwnedFd> {
    let mut fd = openat(AT_FDCWD, "/", DIR_FLAGS, Mode::empty()).ctx(|| "opening /".into())?;
    let mut shown = PathBuf::from("/");
    for name in parts(path)? {
        shown.push(name);
        fd = mkdir_at(fd.as_fd(), name, mode, (0, 0), false, &shown)?;
    }
    Ok(fd)
}

/// A host file or directory to bind into the jail, held open (`O_PATH`) so that what is
/// mounted is what was checked.
#[derive(Debug)]
pub struct Source {
    pub fd: OwnedFd,
    pub is_dir: bool,
    /// The resolved host path (for messages).
    pub resolved: PathBuf,
}

/// Resolves the operator's `path` once (links in it are the operator's choice, such as
/// `/lib64 -> usr/lib64`), then opens the resolved path one component at a time without
/// following links, so a link swapped in after the check is refused, not followed.
pub fn open_source(path: &Path) -> Result<Source> {
    let resolved = std::fs::canonicalize(path).ctx(|| format!("bind source {}", path.display()))?;
    let names = parts(&resolved)?;
    let Some((last, dirs)) = names.split_last() else {
        return Err(Error::Config(
            "the host's / cannot be bound into a jail".into(),
        ));
    };
    let mut dir = openat(AT_FDCWD, "/", DIR_FLAGS, Mode::empty()).ctx(|| "opening /".into())?;
    let mut shown = PathBuf::from("/");
    for name in dirs {
        shown.push(name);
        dir = open_child_dir(dir.as_fd(), name, &shown)?;
    }
    shown.push(last);
    let fd = openat(
        dir.as_fd(),
        *last,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ctx(|| format!("opening bind source {}", shown.display()))?;
    let st = fstat(fd.as_fd()).ctx(|| format!("stat of {}", shown.display()))?;
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if kind == SFlag::S_IFLNK {
        return Err(Error::Symlink { path: shown });
    }
    if kind != SFlag::S_IFDIR && kind != SFlag::S_IFREG {
        return Err(Error::Config(format!(
            "bind source {} is neither a regular file nor a directory",
            shown.display()
        )));
    }
    Ok(Source {
        fd,
        is_dir: kind == SFlag::S_IFDIR,
        resolved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    #[test]
    fn walks_real_directories_and_refuses_links_in_any_component() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real/inner");
        std::fs::create_dir_all(&real).unwrap();
        symlink(tmp.path().join("real"), tmp.path().join("link")).unwrap();

        open_dir_nofollow(&real).unwrap();
        let err = open_dir_nofollow(&tmp.path().join("link/inner")).unwrap_err();
        assert!(
            matches!(&err, Error::Symlink { path } if path.ends_with("link")),
            "{err}"
        );
        let err = open_dir_nofollow(&tmp.path().join("link")).unwrap_err();
        assert!(matches!(err, Error::Symlink { .. }), "{err}");
        let err = create_dirs_nofollow(&tmp.path().join("link/new"), 0o755).unwrap_err();
        assert!(matches!(err, Error::Symlink { .. }), "{err}");
        assert!(!tmp.path().join("real/new").exists());
        assert!(open_dir_nofollow(Path::new("relative")).is_err());
        assert!(open_dir_nofollow(&tmp.path().join("real/../real")).is_err());
    }

    #[test]
    fn creates_with_explicit_modes_whatever_the_umask() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: making root-owned directories needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a/b/c");
        let fd = create_dirs_nofollow(&p, 0o751).unwrap();
        let made = mkdir_at(
            fd.as_fd(),
            OsStr::new("vm"),
            0o700,
            (0, 0),
            true,
            &p.join("vm"),
        );
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o751);
        made.unwrap();
        let meta = std::fs::metadata(p.join("vm")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
        assert_eq!(meta.uid(), 0);
        let again = mkdir_at(
            fd.as_fd(),
            OsStr::new("vm"),
            0o700,
            (0, 0),
            true,
            &p.join("vm"),
        );
        assert!(matches!(again, Err(Error::Exists { .. })));
        // A link where a new directory should be is refused, even when reuse is allowed.
        symlink("/etc", p.join("evil")).unwrap();
        let err = mkdir_at(
            fd.as_fd(),
            OsStr::new("evil"),
            0o700,
            (0, 0),
            false,
            &p.join("evil"),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Symlink { .. }), "{err}");
    }

    #[test]
    fn sources_resolve_operator_links_once_then_open_without_following() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("dir")).unwrap();
        std::fs::write(tmp.path().join("dir/file"), b"x").unwrap();
        symlink("dir", tmp.path().join("alias")).unwrap();
        let s = open_source(&tmp.path().join("alias/file")).unwrap();
        assert!(!s.is_dir);
        assert!(s.resolved.ends_with("dir/file"));
        assert!(open_source(&tmp.path().join("alias")).unwrap().is_dir);
        assert!(open_source(&tmp.path().join("missing")).is_err());
        assert!(open_source(Path::new("/dev/null")).is_err());
    }
}
