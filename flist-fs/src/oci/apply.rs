//! Applying OCI layers in order into one in-memory tree: regular files are chunked into the
//! stores as they stream out of the (gzip/zstd/plain) layer tar; `.wh.NAME` removes NAME from
//! lower layers, `.wh..wh..opq` empties a directory of lower-layer entries; hard links, device
//! nodes, fifos, symlinks and PAX xattrs are kept. `..` in a layer path is rejected.

use super::Layer;
use crate::error::{Error, Result};
use crate::meta::{DirEntry, Image, Inode, InodeKind, Timestamp, Xattr};
use crate::pack::{progress_bar, ChunkWriter, PackOptions, PackStats};
use crate::store::Router;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

struct Tree {
    nodes: Vec<Inode>,
    children: HashMap<usize, BTreeMap<Vec<u8>, usize>>,
}

impl Tree {
    fn new() -> Self {
        Tree {
            nodes: vec![Inode::new(InodeKind::Dir, 0o755)],
            children: HashMap::from([(0, BTreeMap::new())]),
        }
    }

    fn child(&self, dir: usize, name: &[u8]) -> Option<usize> {
        self.children.get(&dir)?.get(name).copied()
    }

    fn lookup(&self, comps: &[Vec<u8>]) -> Option<usize> {
        comps.iter().try_fold(0, |d, c| self.child(d, c))
    }

    fn add(&mut self, inode: Inode) -> usize {
        let is_dir = inode.kind == InodeKind::Dir;
        self.nodes.push(inode);
        let idx = self.nodes.len() - 1;
        if is_dir {
            self.children.insert(idx, BTreeMap::new());
        }
        idx
    }

    fn link(&mut self, dir: usize, name: &[u8], idx: usize) {
        self.children
            .entry(dir)
            .or_default()
            .insert(name.to_vec(), idx);
    }

    /// The directory at `comps`, creating missing ones (0755) and replacing non-directories.
    fn ensure_dir(&mut self, comps: &[Vec<u8>]) -> usize {
        let mut cur = 0;
        for c in comps {
            cur = match self.child(cur, c) {
                Some(i) if self.nodes[i].kind == InodeKind::Dir => i,
                _ => {
                    let i = self.add(Inode::new(InodeKind::Dir, 0o755));
                    self.link(cur, c, i);
                    i
                }
            };
        }
        cur
    }

    /// Renumbers reachable nodes breadth-first (root = inode 1) into image inodes.
    fn into_inodes(self) -> Vec<Inode> {
        let mut map: HashMap<usize, u64> = HashMap::from([(0, 1)]);
        let mut order = vec![0usize];
        let mut i = 0;
        while i < order.len() {
            let cur = order[i];
            i += 1;
            if let Some(kids) = self.children.get(&cur) {
                for &k in kids.values() {
                    if let std::collections::hash_map::Entry::Vacant(v) = map.entry(k) {
                        v.insert(order.len() as u64 + 1);
                        order.push(k);
                    }
                }
            }
        }
        order
            .iter()
            .map(|&old| {
                let mut inode = self.nodes[old].clone();
                inode.entries = self
                    .children
                    .get(&old)
                    .map(|kids| {
                        kids.iter()
                            .map(|(name, k)| DirEntry {
                                name: name.clone(),
                                ino: map.get(k).copied().unwrap_or(1),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                inode
            })
            .collect()
    }
}

fn open_layer(layer: &Layer) -> Result<Box<dyn Read>> {
    let mut f = std::fs::File::open(&layer.path).map_err(|e| Error::io(&layer.path, e))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(|e| Error::io(&layer.path, e))?;
    let f = std::fs::File::open(&layer.path).map_err(|e| Error::io(&layer.path, e))?;
    let buffered = std::io::BufReader::new(f);
    Ok(if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(buffered))
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(zstd::stream::read::Decoder::new(buffered).map_err(|e| Error::io(&layer.path, e))?)
    } else {
        Box::new(buffered)
    })
}

fn components(raw: &[u8]) -> std::result::Result<Vec<Vec<u8>>, ()> {
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(()),
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

/// A PAX time: decimal seconds, optionally negative, with an optional fraction
/// (`1700000000.123456789`); digits past nanoseconds are dropped. `None` if malformed.
fn pax_time(value: &[u8]) -> Option<Timestamp> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = whole.parse().ok()?;
    let mut nsecs = 0u32;
    for (i, digit) in fraction.bytes().take(9).enumerate() {
        nsecs += u32::from(digit - b'0') * 10u32.pow(8 - i as u32);
    }
    Some(if !negative {
        Timestamp { secs, nsecs }
    } else if nsecs == 0 {
        Timestamp { secs: -secs, nsecs }
    } else {
        // -1.25 s is -2 s plus 0.75 s: the fraction is always counted forward.
        Timestamp {
            secs: -secs - 1,
            nsecs: 1_000_000_000 - nsecs,
        }
    })
}

fn attrs<R: Read>(entry: &mut tar::Entry<R>, kind: InodeKind) -> Result<Inode> {
    let h = entry.header();
    let mut inode = Inode::new(kind, h.mode().unwrap_or(0o644) & 0o7777);
    inode.uid = h.uid().unwrap_or(0) as u32;
    inode.gid = h.gid().unwrap_or(0) as u32;
    let mtime = Timestamp {
        secs: h.mtime().unwrap_or(0) as i64,
        nsecs: 0,
    };
    inode.mtime = mtime;
    inode.ctime = mtime;
    if matches!(kind, InodeKind::CharDev | InodeKind::BlockDev) {
        let (maj, min) = (
            h.device_major().ok().flatten().unwrap_or(0),
            h.device_minor().ok().flatten().unwrap_or(0),
        );
        inode.rdev = libc::makedev(maj, min);
    }
    if let Ok(Some(pax)) = entry.pax_extensions() {
        for ext in pax.flatten() {
            // PAX times keep what the ustar header cannot: sub-second parts (and times
            // outside its range).
            match ext.key_bytes() {
                b"mtime" => {
                    if let Some(t) = pax_time(ext.value_bytes()) {
                        inode.mtime = t;
                    }
                }
                b"ctime" => {
                    if let Some(t) = pax_time(ext.value_bytes()) {
                        inode.ctime = t;
                    }
                }
                _ => {}
            }
            if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                inode.xattrs.push(Xattr {
                    name: name.to_vec(),
                    value: ext.value_bytes().to_vec(),
                });
            }
        }
        inode.xattrs.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Ok(inode)
}

/// Applies `layers` in order; returns the image (routes/tags unset) and the chunk stats.
pub(super) fn apply_layers(
    src: &Path,
    layers: &[Layer],
    router: &Router,
    opts: &PackOptions,
) -> Result<(Image, PackStats)> {
    let mut stats = PackStats::default();
    let bar = progress_bar(None, opts.progress);
    let mut writer = ChunkWriter::new(router, opts, &mut stats, &bar);
    let mut tree = Tree::new();
    let mut hardlinks = 0u64;
    for layer in layers {
        let bad = |reason: String| Error::Oci {
            path: src.to_path_buf(),
            reason: format!("layer {}: {reason}", layer.name),
        };
        let mut ar = tar::Archive::new(open_layer(layer)?);
        let mut added: HashMap<usize, HashSet<Vec<u8>>> = HashMap::new();
        for entry in ar.entries().map_err(|e| bad(e.to_string()))? {
            let mut entry = entry.map_err(|e| bad(e.to_string()))?;
            let raw = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw).into_owned();
            let comps =
                components(&raw).map_err(|_| bad(format!("{shown}: path contains '..'")))?;
            let kind = match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => InodeKind::File,
                tar::EntryType::Directory => InodeKind::Dir,
                tar::EntryType::Symlink => InodeKind::Symlink,
                tar::EntryType::Char => InodeKind::CharDev,
                tar::EntryType::Block => InodeKind::BlockDev,
                tar::EntryType::Fifo => InodeKind::Fifo,
                tar::EntryType::Link => InodeKind::File,
                other => {
                    tracing::warn!(layer = %layer.name, path = %shown, "skipping tar entry of type {other:?}");
                    continue;
                }
            };
            let Some((name, parents)) = comps.split_last() else {
                if kind == InodeKind::Dir {
                    let kept = std::mem::take(&mut tree.nodes[0].entries);
                    tree.nodes[0] = attrs(&mut entry, InodeKind::Dir)?;
                    tree.nodes[0].entries = kept;
                }
                continue;
            };
            let parent = tree.ensure_dir(parents);
            if name.as_slice() == OPAQUE {
                let keep = added.get(&parent).cloned().unwrap_or_default();
                if let Some(kids) = tree.children.get_mut(&parent) {
                    kids.retain(|n, _| keep.contains(n));
                }
                continue;
            }
            if let Some(hidden) = name.strip_prefix(WHITEOUT) {
                if let Some(kids) = tree.children.get_mut(&parent) {
                    kids.remove(hidden);
                }
                continue;
            }
            added.entry(parent).or_default().insert(name.clone());
            if entry.header().entry_type() == tar::EntryType::Link {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad(format!("{shown}: hard link without target")))?
                    .into_owned();
                let tcomps = components(&target)
                    .map_err(|_| bad(format!("{shown}: link target contains '..'")))?;
                let idx = tree
                    .lookup(&tcomps)
                    .filter(|&i| tree.nodes[i].kind != InodeKind::Dir)
                    .ok_or_else(|| {
                        bad(format!(
                            "{shown}: hard link target {} not found",
                            String::from_utf8_lossy(&target)
                        ))
                    })?;
                tree.link(parent, name, idx);
                hardlinks += 1;
                continue;
            }
            let mut inode = attrs(&mut entry, kind)?;
            match kind {
                InodeKind::Dir => {
                    if let Some(existing) = tree
                        .child(parent, name)
                        .filter(|&i| tree.nodes[i].kind == InodeKind::Dir)
                    {
                        tree.nodes[existing] = inode;
                        continue;
                    }
                }
                InodeKind::File => {
                    let (chunks, size) = writer.write(&mut entry, Path::new(&shown))?;
                    inode.chunks = chunks;
                    inode.size = size;
                }
                InodeKind::Symlink => {
                    inode.target = entry
                        .link_name_bytes()
                        .ok_or_else(|| bad(format!("{shown}: symlink without target")))?
                        .into_owned();
                    inode.size = inode.target.len() as u64;
                }
                _ => {}
            }
            let idx = tree.add(inode);
            tree.link(parent, name, idx);
        }
    }
    bar.finish_and_clear();
    let tables = writer.take_tables();
    drop(writer);
    stats.hardlinks = hardlinks;
    let mut image = Image::new(opts.chunker, opts.encrypt);
    image.block_size = opts.block_size;
    image.tables = tables;
    image.inodes = tree.into_inodes();
    image.prune_tables();
    for i in &image.inodes {
        match i.kind {
            InodeKind::File => stats.files += 1,
            InodeKind::Dir => stats.dirs += 1,
            InodeKind::Symlink => stats.symlinks += 1,
            _ => stats.specials += 1,
        }
    }
    Ok((image, stats))
}

#[cfg(test)]
mod pax_tests {
    use super::*;

    #[test]
    fn pax_times_keep_their_fraction() {
        let t = |s: &str| pax_time(s.as_bytes()).map(|t| (t.secs, t.nsecs));
        assert_eq!(
            t("1700000000.123456789"),
            Some((1_700_000_000, 123_456_789))
        );
        assert_eq!(t("1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(
            t("1700000000.1234567891234"),
            Some((1_700_000_000, 123_456_789))
        );
        assert_eq!(t("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(t("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(t("-5"), Some((-5, 0)));
        for bad in ["", ".5", "1e9", "12a", "1.2.3", "99999999999999999999"] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }
}
