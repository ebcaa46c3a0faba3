//! Unpacking an image into a directory. Entry names are single components (validated when the
//! image is read), every entry is created fresh (`O_EXCL`/`O_NOFOLLOW`, `mkdir`), and nothing is
//! ever opened through a symlink, so no write can land outside the destination — symlinks,
//! absolute or not, are recreated verbatim but never followed. Directory modes and times are
//! applied after their contents. Each file's chunks are fetched a parallel batch at a time.
//! Device nodes need root; without it they are skipped with a warning (their other hard
//! links too).
//!
//! The tree is built in a temporary directory beside the destination and renamed into place
//! only once it is complete: a failed unpack leaves the destination as it was (absent or
//! empty) and removes what it wrote, and its error names the file and offset it failed at.

use crate::dirfd;
use crate::error::{Error, Result};
use crate::fetch::ChunkSource;
use crate::meta::{Image, Inode, InodeKind, ROOT_INO};
use crate::par::{parallel_map, parallelism};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

#[derive(Clone, Debug, Default)]
pub struct UnpackOptions {
    /// chown entries to the image's uid/gid (needs root).
    pub preserve_owner: bool,
    pub progress: bool,
}

#[derive(Clone, Debug, Default)]
pub struct UnpackStats {
    pub entries: u64,
    pub bytes: u64,
    pub skipped: Vec<String>,
}

struct Ctx<'a> {
    image: &'a Image,
    source: &'a ChunkSource,
    opts: &'a UnpackOptions,
    /// The first name made of each inode with several: its directory and name.
    first_path: HashMap<u64, (Rc<OwnedFd>, CString)>,
    /// Inodes that could not be created (device nodes without privileges).
    skipped_inos: HashSet<u64>,
    stats: UnpackStats,
    bar: ProgressBar,
}

impl Ctx<'_> {
    /// Creates entry `name` (inode `ino`) in the open directory `dir`; `path` names it in
    /// messages.
    fn entry(&mut self, dir: &Rc<OwnedFd>, name: &[u8], path: &Path, ino: u64) -> Result<()> {
        let inode = self.image.inode(ino).ok_or_else(|| Error::BadPath {
            path: path.display().to_string(),
            reason: format!("refers to missing inode {ino}"),
        })?;
        let cname = dirfd::cname(name).map_err(|e| Error::io(path, e))?;
        if inode.kind != InodeKind::Dir {
            if self.skipped_inos.contains(&ino) {
                self.stats.skipped.push(path.display().to_string());
                return Ok(());
            }
            if let Some((first_dir, first_name)) = self.first_path.get(&ino) {
                dirfd::link_at(first_dir, first_name, dir, &cname)
                    .map_err(|e| Error::io(path, e))?;
                self.stats.entries += 1;
                return Ok(());
            }
        }
        self.stats.entries += 1;
        match inode.kind {
            InodeKind::Dir => {
                dirfd::mkdir_at(dir, &cname, 0o700).map_err(|e| Error::io(path, e))?;
                let sub = Rc::new(dirfd::open_dir_at(dir, &cname).map_err(|e| Error::io(path, e))?);
                self.children(&sub, path, ino)?;
                // The directory's own attributes once its contents are in.
                return self.attrs(&sub, None, path, inode);
            }
            InodeKind::File => self.file(dir, &cname, path, inode)?,
            InodeKind::Symlink => {
                dirfd::symlink_at(&inode.target, dir, &cname).map_err(|e| Error::io(path, e))?;
            }
            _ => {
                let mode = inode.kind.mode_bits() | (inode.mode & 0o7777);
                if let Err(e) = dirfd::mknod_at(dir, &cname, mode, inode.rdev) {
                    if e.raw_os_error() == Some(libc::EPERM) {
                        tracing::warn!(path = %path.display(), "cannot create {} without privileges; skipped", inode.kind.name());
                        self.stats.entries -= 1;
                        self.stats.skipped.push(path.display().to_string());
                        self.skipped_inos.insert(ino);
                        return Ok(());
                    }
                    return Err(Error::io(path, e));
                }
            }
        }
        // Only inodes with other names are remembered (each keeps its directory open).
        if self.image.nlink(ino) > 1 {
            self.first_path.insert(ino, (dir.clone(), cname.clone()));
        }
        self.attrs(dir, Some(&cname), path, inode)
    }

    fn children(&mut self, dir: &Rc<OwnedFd>, path: &Path, ino: u64) -> Result<()> {
        let Some(inode) = self.image.inode(ino) else {
            return Ok(());
        };
        for e in &inode.entries {
            // Names are validated on load; re-check so this function is safe on its own.
            if e.name.is_empty() || e.name.contains(&b'/') || e.name == b".." || e.name == b"." {
                return Err(Error::BadPath {
                    path: format!("{}/{}", path.display(), String::from_utf8_lossy(&e.name)),
                    reason: "entry name is not a single path component".into(),
                });
            }
            self.entry(dir, &e.name, &path.join(OsStr::from_bytes(&e.name)), e.ino)?;
        }
        Ok(())
    }

    fn file(&mut self, dir: &OwnedFd, name: &CStr, path: &Path, inode: &Inode) -> Result<()> {
        let mut f = dirfd::create_file_at(dir, name).map_err(|e| Error::io(path, e))?;
        // Fetch and decode a batch of chunks in parallel, then write them in order; a gap
        // before a chunk is skipped (seek), so holes stay holes.
        use std::io::{Seek, SeekFrom};
        let source = self.source;
        for batch in inode.chunks.chunks(parallelism() * 2) {
            for (c, data) in batch.iter().zip(parallel_map(batch, |c| source.plain(c))) {
                let data = data.map_err(|e| Error::FileChunk {
                    path: path.to_path_buf(),
                    offset: c.offset,
                    error: Box::new(e),
                })?;
                f.seek(SeekFrom::Start(c.offset))
                    .map_err(|e| Error::io(path, e))?;
                f.write_all(&data).map_err(|e| Error::io(path, e))?;
                self.bar.inc(data.len() as u64);
                self.stats.bytes += data.len() as u64;
            }
        }
        // A hole at the end.
        f.set_len(inode.size).map_err(|e| Error::io(path, e))?;
        Ok(())
    }

    /// Applies owner, extended attributes, mode and times to `name` in `dir` (or to `dir`).
    fn attrs(
        &mut self,
        dir: &OwnedFd,
        name: Option<&CStr>,
        path: &Path,
        inode: &Inode,
    ) -> Result<()> {
        let is_link = inode.kind == InodeKind::Symlink;
        if self.opts.preserve_owner {
            dirfd::chown_at(dir, name, inode.uid, inode.gid).map_err(|e| Error::io(path, e))?;
        }
        let xattr_path = dirfd::proc_path(dir, name.map(CStr::to_bytes));
        for x in &inode.xattrs {
            if let Err(e) = xattr::set(&xattr_path, OsStr::from_bytes(&x.name), &x.value) {
                tracing::warn!(path = %path.display(), xattr = %String::from_utf8_lossy(&x.name), error = %e, "xattr not restored");
            }
        }
        if !is_link {
            dirfd::chmod_at(dir, name, inode.mode & 0o7777).map_err(|e| Error::io(path, e))?;
        }
        dirfd::set_times_at(dir, name, inode.mtime.secs, inode.mtime.nsecs)
            .map_err(|e| Error::io(path, e))
    }
}

/// Unpacks `image` into `dest`, which must not exist or be an empty directory. The tree is
/// built beside `dest` and renamed into place when complete; on failure nothing is left.
pub fn unpack(
    image: &Image,
    source: &ChunkSource,
    dest: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats> {
    match std::fs::read_dir(dest) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(Error::io(
                    dest,
                    std::io::Error::other("destination is not empty"),
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(dest, e)),
    }
    let name = dest.file_name().ok_or_else(|| Error::BadPath {
        path: dest.display().to_string(),
        reason: "the destination needs a final component (not `/` or `..`)".into(),
    })?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".unpacking-");
    let staging = tempfile::Builder::new()
        .prefix(&prefix)
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    let stats = unpack_into(image, source, staging.path(), dest, opts)?;
    // rename(2) replaces an empty directory, and fails (the staging directory then removed)
    // if something was put into `dest` meanwhile.
    let staged = staging.keep();
    if let Err(e) = std::fs::rename(&staged, dest) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(Error::io(dest, e));
    }
    Ok(stats)
}

/// Unpacks into the existing empty directory `dir`; messages name paths below `shown` (where
/// the tree will be once renamed).
fn unpack_into(
    image: &Image,
    source: &ChunkSource,
    dir: &Path,
    shown: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats> {
    let bar = if opts.progress {
        ProgressBar::new(image.total_file_bytes())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut ctx = Ctx {
        image,
        source,
        opts,
        first_path: HashMap::new(),
        skipped_inos: HashSet::new(),
        stats: UnpackStats::default(),
        bar,
    };
    dirfd::raise_open_file_limit();
    let root_dir = Rc::new(dirfd::open_dir(dir).map_err(|e| Error::io(dir, e))?);
    let result =
        ctx.children(&root_dir, shown, ROOT_INO)
            .and_then(|()| match image.inode(ROOT_INO) {
                Some(root) => ctx.attrs(&root_dir, None, shown, root),
                None => Ok(()),
            });
    ctx.bar.finish_and_clear();
    result.map(|()| ctx.stats)
}
