//! Differences between two images by path: added, removed, and modified entries with the list
//! of what changed (kind, content, mode, owner, size, target, xattrs, mtime).

use super::types::{Image, Inode};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Removed,
    Modified(Vec<&'static str>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub path: String,
    pub kind: ChangeKind,
}

fn what_changed(a: &Inode, b: &Inode) -> Vec<&'static str> {
    let mut out = Vec::new();
    if a.kind != b.kind {
        out.push("type");
    }
    let ids = |i: &Inode| i.chunks.iter().map(|c| c.id).collect::<Vec<_>>();
    if a.size != b.size || ids(a) != ids(b) {
        out.push("content");
    }
    if a.mode != b.mode {
        out.push("mode");
    }
    if a.uid != b.uid || a.gid != b.gid {
        out.push("owner");
    }
    if a.target != b.target {
        out.push("target");
    }
    if a.rdev != b.rdev {
        out.push("rdev");
    }
    if a.xattrs != b.xattrs {
        out.push("xattrs");
    }
    if a.mtime != b.mtime {
        out.push("mtime");
    }
    out
}

/// Changes that turn `a` into `b`, sorted by path.
pub fn diff(a: &Image, b: &Image) -> Vec<Change> {
    let index = |img: &Image| -> BTreeMap<Vec<u8>, u64> { img.walk().into_iter().collect() };
    let (ia, ib) = (index(a), index(b));
    let mut out = Vec::new();
    let show = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    for (path, &ino_a) in &ia {
        match ib.get(path) {
            None => out.push(Change {
                path: show(path),
                kind: ChangeKind::Removed,
            }),
            Some(&ino_b) => {
                if let (Some(x), Some(y)) = (a.inode(ino_a), b.inode(ino_b)) {
                    let what = what_changed(x, y);
                    if !what.is_empty() {
                        out.push(Change {
                            path: show(path),
                            kind: ChangeKind::Modified(what),
                        });
                    }
                }
            }
        }
    }
    for path in ib.keys().filter(|p| !ia.contains_key(*p)) {
        out.push(Change {
            path: show(path),
            kind: ChangeKind::Added,
        });
    }
    out.sort_by(|x, y| x.path.cmp(&y.path));
    out
}
