//! A small writer of "newc" cpio archives (the initramfs format): directories, regular
//! files with a mode, and symlinks. Entries are collected first (parents are added
//! automatically, later entries replace earlier ones at the same path), then written in
//! path order with fixed owners and timestamps, so archives are reproducible.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const TRAILER: &str = "TRAILER!!!";

/// Where a regular file's bytes come from.
#[derive(Debug, Clone)]
pub enum Contents {
    Bytes(Vec<u8>),
    /// Read from this host path (symlinks followed) when the archive is written.
    HostFile(PathBuf),
}

#[derive(Debug, Clone)]
enum Entry {
    Dir { mode: u32 },
    File { mode: u32, contents: Contents },
    Symlink { target: String },
}

/// An archive being assembled.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (and its parents) with the given permission bits.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self> {
        let path = normalize(path)?;
        self.parents(&path);
        self.entries.insert(
            path,
            Entry::Dir {
                mode: mode & 0o7777,
            },
        );
        Ok(self)
    }

    /// Adds a regular file with the given permission bits.
    pub fn file(&mut self, path: &str, mode: u32, contents: Contents) -> Result<&mut Self> {
        let path = normalize(path)?;
        self.parents(&path);
        let mode = mode & 0o7777;
        self.entries.insert(path, Entry::File { mode, contents });
        Ok(self)
    }

    /// Adds a symlink at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self> {
        let path = normalize(path)?;
        self.parents(&path);
        let target = target.to_owned();
        self.entries.insert(path, Entry::Symlink { target });
        Ok(self)
    }

    /// Adds a dynamically linked host program at `path` and the shared libraries `ldd` lists
    /// for it at their host paths (the dynamic loader included), so it runs in a guest or
    /// test bed built from this archive as it does on the host.
    pub fn program(&mut self, path: &str, host: &std::path::Path) -> Result<&mut Self> {
        self.file(path, 0o755, Contents::HostFile(host.to_owned()))?;
        for lib in crate::host::shared_libraries(host)? {
            let guest = lib.to_string_lossy().into_owned();
            if !self.contains(&guest) {
                self.file(&guest, 0o755, Contents::HostFile(lib))?;
            }
        }
        Ok(self)
    }

    /// True if something is already stored at `path`.
    pub fn contains(&self, path: &str) -> bool {
        normalize(path).is_ok_and(|p| self.entries.contains_key(&p))
    }

    fn parents(&mut self, path: &str) {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            end += i;
            self.entries
                .entry(path[..end].to_owned())
                .or_insert(Entry::Dir { mode: 0o755 });
            end += 1;
        }
    }

    /// Writes the archive (with its trailer) to `out`.
    pub fn write_to<W: Write>(&self, out: W) -> Result<()> {
        let mut w = CountingWriter {
            inner: out,
            written: 0,
        };
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            match entry {
                Entry::Dir { mode } => w.entry(ino, path, S_IFDIR | mode, 2, &[])?,
                Entry::Symlink { target } => {
                    w.entry(ino, path, S_IFLNK | 0o777, 1, target.as_bytes())?
                }
                Entry::File { mode, contents } => {
                    let data = match contents {
                        Contents::Bytes(b) => std::borrow::Cow::Borrowed(b.as_slice()),
                        Contents::HostFile(p) => {
                            std::borrow::Cow::Owned(std::fs::read(p).map_err(Error::io(
                                format!("reading {} for the cpio", p.display()),
                            ))?)
                        }
                    };
                    w.entry(ino, path, S_IFREG | mode, 1, &data)?
                }
            }
        }
        w.entry(0, TRAILER, 0, 1, &[])?;
        w.inner.flush().map_err(Error::io("writing the cpio"))
    }

    /// Writes the archive to a new file at `path`.
    pub fn write_file(&self, path: &Path) -> Result<()> {
        let f = std::fs::File::create(path)
            .map_err(Error::io(format!("creating {}", path.display())))?;
        self.write_to(std::io::BufWriter::new(f))
    }
}

/// Strips leading slashes and rejects empty, `.` and `..` components.
fn normalize(path: &str) -> Result<String> {
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    let bad = trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == ".." || c.contains('\0'));
    if bad {
        return Err(Error::Invalid(format!(
            "bad path in cpio archive: {path:?}"
        )));
    }
    Ok(trimmed.to_owned())
}

struct CountingWriter<W> {
    inner: W,
    written: u64,
}

impl<W: Write> CountingWriter<W> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.inner
            .write_all(bytes)
            .map_err(Error::io("writing the cpio"))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..pad])
    }

    fn entry(&mut self, ino: u32, name: &str, mode: u32, nlink: u32, data: &[u8]) -> Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| Error::Invalid(format!("{name}: file too large for cpio (>4 GiB)")))?;
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| Error::Invalid(format!("{name}: name too long")))?;
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize, check
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 0, 0, 0, 0, 0, 0
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad4()?;
        self.put(data)?;
        self.pad4()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_aligned_entries_with_parents_and_trailer() {
        let mut a = Archive::new();
        a.file("/a/b/c.txt", 0o644, Contents::Bytes(b"hello".to_vec()))
            .and_then(|a| a.symlink("/bin/sh", "busybox"))
            .ok();
        let mut out = Vec::new();
        assert!(a.write_to(&mut out).is_ok());
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        for name in [
            "a\0",
            "a/b\0",
            "a/b/c.txt\0",
            "bin\0",
            "bin/sh\0",
            "TRAILER!!!\0",
        ] {
            assert!(text.contains(name), "missing {name:?}");
        }
        assert!(text.contains("hello"));
        assert!(text.starts_with("070701"));
    }

    #[test]
    fn rejects_bad_paths() {
        let mut a = Archive::new();
        assert!(a.dir("/", 0o755).is_err());
        assert!(a.dir("a/../b", 0o755).is_err());
    }
}
