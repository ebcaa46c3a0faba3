//! Navigating an image's tree: entry lookup, path resolution and a depth-first walk.

use super::types::{Image, InodeKind, ROOT_INO};
use crate::error::{Error, Result};

impl Image {
    /// Looks `name` up in directory `dir`.
    pub fn lookup(&self, dir: u64, name: &[u8]) -> Option<u64> {
        let d = self.inode(dir)?;
        d.entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()
            .map(|i| d.entries[i].ino)
    }

    /// Resolves an in-image path ("/a/b", "a/b", "/" all accepted; symlinks are not followed).
    pub fn resolve(&self, path: &str) -> Result<u64> {
        let mut cur = ROOT_INO;
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if comp == ".." {
                cur = self.parent(cur);
                continue;
            }
            let dir = self.inode(cur).filter(|i| i.kind == InodeKind::Dir);
            if dir.is_none() {
                return Err(Error::NotInImage {
                    path: path.to_string(),
                });
            }
            cur = self
                .lookup(cur, comp.as_bytes())
                .ok_or_else(|| Error::NotInImage {
                    path: path.to_string(),
                })?;
        }
        Ok(cur)
    }

    /// Every (path, inode) below `start` in depth-first, name order; `start` itself first
    /// with path `prefix`. Paths are bytes joined with '/', starting with '/'.
    pub fn walk_from(&self, start: u64, prefix: &[u8]) -> Vec<(Vec<u8>, u64)> {
        let mut out = Vec::new();
        let mut stack = vec![(prefix.to_vec(), start)];
        while let Some((path, ino)) = stack.pop() {
            if let Some(inode) = self.inode(ino) {
                for e in inode.entries.iter().rev() {
                    let mut p = path.clone();
                    if !p.ends_with(b"/") {
                        p.push(b'/');
                    }
                    p.extend_from_slice(&e.name);
                    stack.push((p, e.ino));
                }
            }
            out.push((path, ino));
        }
        out
    }

    /// A path of `ino` from the root (one of them, for a hard link), for messages: climbs
    /// the parent links (at most [`super::MAX_PATH_LEN`] levels); `inode N` when it cannot.
    pub fn path_of(&self, ino: u64) -> Vec<u8> {
        let mut names: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        while cur != ROOT_INO {
            let parent = self.parent(cur);
            let name = self
                .inode(parent)
                .and_then(|d| d.entries.iter().find(|e| e.ino == cur));
            match name {
                Some(e) if names.len() < super::MAX_PATH_LEN => names.push(&e.name),
                _ => return format!("inode {ino}").into_bytes(),
            }
            cur = parent;
        }
        if names.is_empty() {
            return b"/".to_vec();
        }
        let mut out = Vec::new();
        for n in names.iter().rev() {
            out.push(b'/');
            out.extend_from_slice(n);
        }
        out
    }

    /// Every (path, inode) in the image, root ("/") first.
    pub fn walk(&self) -> Vec<(Vec<u8>, u64)> {
        self.walk_from(ROOT_INO, b"/")
    }
}

#[cfg(test)]
mod tests {
    use crate::chunk::ChunkerKind;
    use crate::meta::{DirEntry, Image, Inode, InodeKind};

    #[test]
    fn resolve_and_walk() {
        let mut img = Image::new(ChunkerKind::default(), false);
        img.inodes.push(Inode::new(InodeKind::Dir, 0o755));
        img.inodes.push(Inode::new(InodeKind::File, 0o644));
        img.inodes[0].entries.push(DirEntry {
            name: b"d".to_vec(),
            ino: 2,
        });
        img.inodes[1].entries.push(DirEntry {
            name: b"f".to_vec(),
            ino: 3,
        });
        img.inodes[1].entries.push(DirEntry {
            name: b"g".to_vec(),
            ino: 3,
        });
        let bytes = crate::meta::encode_image(&img, "t".as_ref()).unwrap();
        let img = crate::meta::decode_image(&bytes, "t".as_ref()).unwrap();
        assert_eq!(img.resolve("/d/f").unwrap(), 3);
        assert_eq!(img.resolve("d/../d/./g").unwrap(), 3);
        assert!(img.resolve("/d/f/x").is_err());
        assert!(img
            .resolve("/nope")
            .unwrap_err()
            .to_string()
            .contains("/nope"));
        assert_eq!(img.nlink(3), 2);
        assert_eq!(img.nlink(1), 3);
        assert_eq!(img.path_of(2), b"/d");
        assert!(img.path_of(3) == b"/d/f" || img.path_of(3) == b"/d/g");
        assert_eq!(img.path_of(1), b"/");
        assert_eq!(img.path_of(99), b"inode 99");
        let paths: Vec<_> = img.walk().into_iter().map(|(p, _)| p).collect();
        assert_eq!(
            paths,
            vec![
                b"/".to_vec(),
                b"/d".to_vec(),
                b"/d/f".to_vec(),
                b"/d/g".to_vec()
            ]
        );
    }
}
