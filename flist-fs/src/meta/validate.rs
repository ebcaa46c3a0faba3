//! Structural validation of a decoded image (entries point at real inodes, names are single
//! path components, chunk lists are contiguous, directories form a tree) and derivation of
//! link counts and parents. A malicious or corrupt image is rejected here, before any use:
//! besides structure, every size the image claims is checked against the limits documented in
//! the `meta` module (inode and entry counts, name, path, symlink target and xattr sizes, chunk
//! plaintext size). The checks are linear in the size of the image (path lengths are computed
//! once per directory, not by walking up from every inode).

use super::types::{Image, InodeKind, ROOT_INO};
use crate::chunk::MAX_CHUNK_SIZE;

/// The bounds `validate` enforces (tests use smaller ones for the count limits).
pub(crate) struct Limits {
    pub inodes: usize,
    pub dir_entries: usize,
    pub total_entries: usize,
}

const LIMITS: Limits = Limits {
    inodes: super::MAX_INODES,
    dir_entries: super::MAX_DIR_ENTRIES,
    total_entries: super::MAX_TOTAL_ENTRIES,
};

/// Validates `image` and fills its derived tables; the error says which inode/entry is wrong.
pub(crate) fn validate(image: &mut Image) -> Result<(), String> {
    validate_with(image, &LIMITS)
}

/// Checks an inode's own fields (symlink target, xattrs, chunk list) against the limits.
fn check_inode(image: &Image, ino: u64, inode: &super::Inode) -> Result<(), String> {
    let kind = inode.kind.name();
    if inode.kind != InodeKind::Dir && !inode.entries.is_empty() {
        return Err(format!("inode {ino}: a {kind} with directory entries"));
    }
    if inode.kind != InodeKind::File && !inode.chunks.is_empty() {
        return Err(format!("inode {ino}: a {kind} with chunks"));
    }
    if inode.target.len() > super::MAX_TARGET_LEN {
        return Err(format!(
            "inode {ino}: symlink target of {} bytes exceeds the limit of {}",
            inode.target.len(),
            super::MAX_TARGET_LEN
        ));
    }
    if inode.xattrs.len() > super::MAX_XATTRS {
        return Err(format!(
            "inode {ino}: {} xattrs exceed the limit of {}",
            inode.xattrs.len(),
            super::MAX_XATTRS
        ));
    }
    let mut list = 0usize;
    for x in &inode.xattrs {
        let shown = String::from_utf8_lossy(&x.name);
        if x.name.is_empty() || x.name.contains(&0) {
            return Err(format!("inode {ino}: invalid xattr name {shown:?}"));
        }
        if x.name.len() > super::MAX_XATTR_NAME {
            return Err(format!(
                "inode {ino}: xattr name of {} bytes exceeds the limit of {}",
                x.name.len(),
                super::MAX_XATTR_NAME
            ));
        }
        if x.value.len() > super::MAX_XATTR_VALUE {
            return Err(format!(
                "inode {ino}: xattr {shown:?} value of {} bytes exceeds the limit of {}",
                x.value.len(),
                super::MAX_XATTR_VALUE
            ));
        }
        list += x.name.len() + 1;
    }
    if list > super::MAX_XATTR_LIST {
        return Err(format!(
            "inode {ino}: xattr name list of {list} bytes exceeds the limit of {}",
            super::MAX_XATTR_LIST
        ));
    }
    if inode.kind == InodeKind::File {
        let mut off = 0u64;
        for c in &inode.chunks {
            if c.size > MAX_CHUNK_SIZE {
                return Err(format!(
                    "inode {ino}: chunk {} claims {} bytes, more than the chunk size limit of {MAX_CHUNK_SIZE}",
                    c.id, c.size
                ));
            }
            // Chunks are ordered and never overlap; a gap between them is a hole.
            if c.offset < off || c.size == 0 {
                return Err(format!("inode {ino}: chunk {} at offset {} breaks the chunk list (it must start at or after offset {off}, the end of the previous one, and not be empty)", c.id, c.offset));
            }
            if c.key.is_some() != image.encrypted {
                return Err(format!(
                    "inode {ino}: chunk {} key presence disagrees with the image's encryption flag",
                    c.id
                ));
            }
            off = c
                .offset
                .checked_add(u64::from(c.size))
                .ok_or_else(|| format!("inode {ino}: chunk {} overflows the file size", c.id))?;
        }
        // After the last chunk, a hole may run to the end of the file.
        if off > inode.size {
            return Err(format!(
                "inode {ino}: chunks end at byte {off}, past the file's size of {}",
                inode.size
            ));
        }
    }
    Ok(())
}

/// Checks the block size and the block tables: each table belongs to a chunk of the image,
/// hashes to its id and describes that chunk's size in the image's blocks (see
/// [`crate::chunk::blocks::Table::parse`], which bounds every claim).
fn check_tables(image: &Image) -> Result<(), String> {
    if image.block_size == 0 {
        if !image.tables.is_empty() {
            return Err("block tables in an image of whole chunks".into());
        }
        return Ok(());
    }
    crate::chunk::blocks::check_block_size(image.block_size)?;
    let mut used = std::collections::HashMap::new();
    for (idx, inode) in image.inodes.iter().enumerate() {
        for c in &inode.chunks {
            let Some(table) = image.tables.get(&c.id) else {
                continue;
            };
            match used.insert(c.id, c.size) {
                None => {
                    crate::chunk::blocks::Table::parse(&c.id, image.block_size, c.size, table)
                        .map_err(|e| format!("inode {}: {e}", idx + 1))?;
                }
                Some(size) if size != c.size => {
                    return Err(format!(
                        "inode {}: chunk {} of {} bytes, {size} bytes elsewhere",
                        idx + 1,
                        c.id,
                        c.size
                    ))
                }
                Some(_) => {}
            }
        }
    }
    if let Some(id) = image.tables.keys().find(|id| !used.contains_key(*id)) {
        return Err(format!("a block table of chunk {id}, which no file uses"));
    }
    Ok(())
}

pub(crate) fn validate_with(image: &mut Image, limits: &Limits) -> Result<(), String> {
    check_tables(image)?;
    let n = image.inodes.len();
    if n > limits.inodes {
        return Err(format!("{n} inodes exceed the limit of {}", limits.inodes));
    }
    match image.inodes.first() {
        None => return Err("no inodes (missing root directory)".into()),
        Some(root) if root.kind != InodeKind::Dir => {
            return Err("inode 1 (root) is not a directory".into())
        }
        _ => {}
    }
    let mut nlink = vec![0u32; n];
    let mut parent = vec![0u64; n];
    // Length of the name a directory has in its parent (its path = parent's path + 1 + this).
    let mut dir_name_len = vec![0usize; n];
    nlink[0] = 1;
    parent[0] = ROOT_INO;
    let mut total_entries = 0usize;
    for (idx, inode) in image.inodes.iter().enumerate() {
        let ino = idx as u64 + 1;
        check_inode(image, ino, inode)?;
        if inode.entries.len() > limits.dir_entries {
            return Err(format!(
                "inode {ino}: {} directory entries exceed the limit of {}",
                inode.entries.len(),
                limits.dir_entries
            ));
        }
        total_entries += inode.entries.len();
        if total_entries > limits.total_entries {
            return Err(format!(
                "inode {ino}: the image has more than the limit of {} directory entries",
                limits.total_entries
            ));
        }
        let mut prev: Option<&[u8]> = None;
        for e in &inode.entries {
            let shown = String::from_utf8_lossy(&e.name);
            if e.name.is_empty()
                || e.name == b"."
                || e.name == b".."
                || e.name.contains(&b'/')
                || e.name.contains(&0)
            {
                return Err(format!("inode {ino}: invalid entry name {shown:?}"));
            }
            if e.name.len() > super::MAX_NAME_LEN {
                return Err(format!(
                    "inode {ino}: entry name of {} bytes exceeds the limit of {}",
                    e.name.len(),
                    super::MAX_NAME_LEN
                ));
            }
            if prev.is_some_and(|p| p >= e.name.as_slice()) {
                return Err(format!(
                    "inode {ino}: entries not sorted or duplicated at {shown:?}"
                ));
            }
            prev = Some(&e.name);
            let child = e
                .ino
                .checked_sub(1)
                .and_then(|c| usize::try_from(c).ok())
                .filter(|&c| c < n && c != 0)
                .ok_or_else(|| {
                    format!(
                        "inode {ino}: entry {shown:?} points at missing inode {}",
                        e.ino
                    )
                })?;
            if image.inodes[child].kind == InodeKind::Dir && nlink[child] > 0 {
                return Err(format!(
                    "inode {ino}: entry {shown:?} links a directory a second time"
                ));
            }
            nlink[child] = nlink[child].saturating_add(1);
            if parent[child] == 0 {
                parent[child] = ino;
                dir_name_len[child] = e.name.len();
            }
        }
    }
    // Directories: every one must reach the root through its parents (no cycle, no orphan),
    // and its path must fit MAX_PATH_LEN. Path lengths are memoized (`UNKNOWN` = not yet known),
    // so each directory is visited once.
    const UNKNOWN: usize = usize::MAX;
    let mut path_len = vec![UNKNOWN; n];
    path_len[0] = 0;
    let mut on_chain = vec![false; n];
    let mut chain = Vec::new();
    for (idx, dir) in image.inodes.iter().enumerate() {
        if dir.kind != InodeKind::Dir || path_len[idx] != UNKNOWN {
            continue;
        }
        let mut cur = idx;
        while path_len[cur] == UNKNOWN {
            let p = parent[cur];
            if p == 0 || on_chain[cur] {
                for &c in &chain {
                    on_chain[c] = false;
                }
                return Err(format!(
                    "inode {}: directory not reachable from the root",
                    idx + 1
                ));
            }
            on_chain[cur] = true;
            chain.push(cur);
            cur = (p - 1) as usize;
        }
        while let Some(c) = chain.pop() {
            on_chain[c] = false;
            let len = path_len[(parent[c] - 1) as usize] + 1 + dir_name_len[c];
            if len > super::MAX_PATH_LEN {
                return Err(format!(
                    "inode {}: path of {len} bytes exceeds the limit of {}",
                    c + 1,
                    super::MAX_PATH_LEN
                ));
            }
            path_len[c] = len;
        }
    }
    for (idx, dir) in image.inodes.iter().enumerate() {
        if dir.kind != InodeKind::Dir {
            continue;
        }
        let mut subdirs = 0u32;
        for e in &dir.entries {
            let len = path_len[idx] + 1 + e.name.len();
            if len > super::MAX_PATH_LEN {
                return Err(format!(
                    "inode {}: path of {len} bytes to entry {:?} exceeds the limit of {}",
                    idx + 1,
                    String::from_utf8_lossy(&e.name),
                    super::MAX_PATH_LEN
                ));
            }
            if image.inodes[(e.ino - 1) as usize].kind == InodeKind::Dir {
                subdirs += 1;
            }
        }
        // Directories: nlink = 2 + number of subdirectories.
        nlink[idx] = 2 + subdirs;
    }
    image.nlink = nlink;
    image.parent = parent;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{ChunkId, ChunkerKind};
    use crate::meta::{ChunkRef, DirEntry, Inode, Xattr};

    /// Root (1) with "d" (2, dir) holding "f" (3, file of one 10-byte chunk) and "l" (4,
    /// symlink); every rejection test breaks this image in one way.
    fn good() -> Image {
        let mut img = Image::new(ChunkerKind::default(), false);
        img.inodes.push(Inode::new(InodeKind::Dir, 0o755));
        let mut f = Inode::new(InodeKind::File, 0o644);
        f.chunks.push(chunk(0, 10));
        f.size = 10;
        img.inodes.push(f);
        let mut l = Inode::new(InodeKind::Symlink, 0o777);
        l.target = b"f".to_vec();
        img.inodes.push(l);
        img.inodes[0].entries = vec![entry("d", 2)];
        img.inodes[1].entries = vec![entry("f", 3), entry("l", 4)];
        img
    }

    fn chunk(offset: u64, size: u32) -> ChunkRef {
        ChunkRef {
            id: ChunkId::of(&offset.to_le_bytes()),
            offset,
            size,
            key: None,
        }
    }

    fn entry(name: &str, ino: u64) -> DirEntry {
        DirEntry {
            name: name.as_bytes().to_vec(),
            ino,
        }
    }

    /// The error for `img` (which must be refused), checked to contain every `words`.
    fn refused_with(mut img: Image, limits: &Limits, words: &[&str]) {
        match validate_with(&mut img, limits) {
            Ok(()) => panic!("accepted; expected an error with {words:?}"),
            Err(e) => {
                for w in words {
                    assert!(e.contains(w), "{e:?} lacks {w:?}");
                }
            }
        }
    }

    fn refused(img: Image, words: &[&str]) {
        refused_with(img, &LIMITS, words)
    }

    #[test]
    fn a_good_image_passes_with_derived_tables() {
        let mut img = good();
        validate(&mut img).unwrap();
        assert_eq!(img.nlink, vec![3, 2, 1, 1]);
        assert_eq!(img.parent, vec![1, 1, 2, 2]);
    }

    #[test]
    fn root_must_exist_and_be_a_directory() {
        let mut img = good();
        img.inodes.clear();
        refused(img, &["no inodes"]);
        let mut img = good();
        img.inodes[0] = Inode::new(InodeKind::File, 0o644);
        refused(img, &["inode 1 (root) is not a directory"]);
    }

    #[test]
    fn kinds_hold_only_their_own_data() {
        let mut img = good();
        img.inodes[2].entries.push(entry("x", 4));
        refused(img, &["inode 3", "a file with directory entries"]);
        let mut img = good();
        img.inodes[3].chunks.push(chunk(0, 1));
        refused(img, &["inode 4", "a symlink with chunks"]);
    }

    #[test]
    fn chunk_lists_are_ordered_sized_and_keyed_consistently() {
        // A chunk past the file's end.
        let mut img = good();
        img.inodes[2].chunks[0].offset = 1;
        refused(img, &["inode 3", "end at byte 11", "size of 10"]);
        // Overlapping chunks.
        let mut img = good();
        img.inodes[2].chunks.push(chunk(5, 5));
        refused(
            img,
            &["inode 3", "breaks the chunk list", "at or after offset 10"],
        );
        let mut img = good();
        img.inodes[2].chunks.push(chunk(10, 0));
        img.inodes[2].size = 10;
        refused(img, &["inode 3", "breaks the chunk list"]);
        let mut img = good();
        img.inodes[2].chunks[0].key = Some([0; 32]);
        refused(img, &["inode 3", "key presence"]);
        let mut img = good();
        img.encrypted = true;
        refused(img, &["inode 3", "key presence"]);
        // Holes: before, between and after chunks.
        let mut img = good();
        img.inodes[2].chunks[0].offset = 4096;
        img.inodes[2].chunks.push(chunk(8192, 10));
        img.inodes[2].size = 1 << 20;
        validate(&mut img).unwrap();
    }

    #[test]
    fn seek_finds_data_and_holes() {
        let mut f = Inode::new(InodeKind::File, 0o644);
        // Hole [0,100), data [100,300) in two chunks, hole [300,400), data [400,450), hole to 1000.
        f.chunks = vec![chunk(100, 100), chunk(200, 100), chunk(400, 50)];
        f.size = 1000;
        let data = |o| f.seek(o, true);
        let hole = |o| f.seek(o, false);
        assert_eq!(data(0), Some(100));
        assert_eq!(data(150), Some(150));
        assert_eq!(data(300), Some(400));
        assert_eq!(data(450), None);
        assert_eq!(data(1000), None);
        assert_eq!(hole(0), Some(0));
        assert_eq!(hole(100), Some(300));
        assert_eq!(hole(250), Some(300));
        assert_eq!(hole(420), Some(450));
        assert_eq!(hole(999), Some(999));
        assert_eq!(hole(1000), None);
        assert_eq!(f.data_bytes(), 250);
        // A file without holes: its only hole is its end.
        f.chunks = vec![chunk(0, 10)];
        f.size = 10;
        assert_eq!(f.seek(3, false), Some(10));
        assert_eq!(f.seek(3, true), Some(3));
    }

    #[test]
    fn chunk_size_is_bounded() {
        let mut img = good();
        img.inodes[2].chunks[0].size = MAX_CHUNK_SIZE + 1;
        img.inodes[2].size = u64::from(MAX_CHUNK_SIZE) + 1;
        let id = img.inodes[2].chunks[0].id.to_hex();
        refused(img, &["inode 3", &id, "chunk size limit"]);
        let mut img = good();
        img.inodes[2].chunks[0].size = u32::MAX;
        img.inodes[2].size = u64::from(u32::MAX);
        refused(img, &["inode 3", "chunk size limit"]);
        // The limit itself is fine.
        let mut img = good();
        img.inodes[2].chunks[0].size = MAX_CHUNK_SIZE;
        img.inodes[2].size = u64::from(MAX_CHUNK_SIZE);
        validate(&mut img).unwrap();
    }

    #[test]
    fn entry_names_are_single_bounded_components() {
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            let mut img = good();
            img.inodes[1].entries[0].name = bad.as_bytes().to_vec();
            refused(img, &["inode 2", "invalid entry name"]);
        }
        let mut img = good();
        img.inodes[1].entries[0].name = vec![b'a'; 256];
        refused(img, &["inode 2", "entry name of 256 bytes", "limit of 255"]);
        let mut img = good();
        img.inodes[1].entries[0].name = vec![b'a'; 255];
        validate(&mut img).unwrap();
    }

    #[test]
    fn entries_are_sorted_unique_and_point_at_real_inodes() {
        let mut img = good();
        img.inodes[1].entries.swap(0, 1);
        refused(img, &["inode 2", "not sorted or duplicated"]);
        let mut img = good();
        img.inodes[1].entries[1].name = b"f".to_vec();
        refused(img, &["inode 2", "not sorted or duplicated"]);
        for missing in [0, 1, 5, u64::MAX] {
            let mut img = good();
            img.inodes[1].entries[0].ino = missing;
            refused(img, &["inode 2", "points at missing inode"]);
        }
    }

    #[test]
    fn directories_form_a_tree() {
        // A directory linked twice.
        let mut img = good();
        img.inodes[0].entries.push(entry("e", 2));
        refused(img, &["inode 1", "links a directory a second time"]);
        // An orphan directory.
        let mut img = good();
        img.inodes.push(Inode::new(InodeKind::Dir, 0o755));
        refused(img, &["inode 5", "not reachable from the root"]);
        // A cycle away from the root: 5 holds 6, 6 holds 5.
        let mut img = good();
        img.inodes.push(Inode::new(InodeKind::Dir, 0o755));
        img.inodes.push(Inode::new(InodeKind::Dir, 0o755));
        img.inodes[4].entries.push(entry("b", 6));
        img.inodes[5].entries.push(entry("a", 5));
        refused(img, &["not reachable from the root"]);
        // A directory holding itself.
        let mut img = good();
        img.inodes.push(Inode::new(InodeKind::Dir, 0o755));
        img.inodes[4].entries.push(entry("me", 5));
        refused(img, &["inode 5", "not reachable from the root"]);
    }

    #[test]
    fn paths_are_bounded_and_a_deep_chain_is_linear() {
        // A chain of directories whose names add up past PATH_MAX: refused, naming the first
        // directory whose path is too long (each level adds 1 + 100 bytes).
        let depth = 60usize;
        let mut img = Image::new(ChunkerKind::default(), false);
        for i in 0..depth {
            img.inodes.push(Inode::new(InodeKind::Dir, 0o755));
            img.inodes[i].entries.push(DirEntry {
                name: vec![b'x'; 100],
                ino: i as u64 + 2,
            });
        }
        refused(img, &["inode 42", "path of 4141 bytes", "limit of 4095"]);
        // A non-directory whose own name pushes the path over the limit.
        let mut img = good();
        img.inodes[0].entries[0].name = vec![b'd'; 255];
        let mut dirs = Vec::new();
        for _ in 0..15 {
            img.inodes.push(Inode::new(InodeKind::Dir, 0o755));
            dirs.push(img.inodes.len() as u64);
        }
        // /d{255}/ then 15 levels of 255-byte names: 16 * 256 = 4096 > 4095 at the last dir.
        let mut at = 2usize;
        for &d in &dirs {
            img.inodes[at - 1].entries.insert(
                0,
                DirEntry {
                    name: vec![b'a'; 255],
                    ino: d,
                },
            );
            at = d as usize;
        }
        refused(img, &["path of 4096 bytes"]);
        // A valid 2000-deep chain (one-byte names) is accepted quickly (no quadratic walk).
        let mut img = Image::new(ChunkerKind::default(), false);
        for i in 0..2000usize {
            img.inodes.push(Inode::new(InodeKind::Dir, 0o755));
            img.inodes[i].entries.push(entry("x", i as u64 + 2));
        }
        validate(&mut img).unwrap();
        assert_eq!(img.parent[2000], 2000);
    }

    #[test]
    fn symlink_target_is_bounded() {
        let mut img = good();
        img.inodes[3].target = vec![b'a'; 4096];
        refused(
            img,
            &["inode 4", "symlink target of 4096 bytes", "limit of 4095"],
        );
        let mut img = good();
        img.inodes[3].target = vec![b'a'; 4095];
        validate(&mut img).unwrap();
    }

    #[test]
    fn xattrs_are_bounded() {
        let x = |name: &[u8], value: usize| Xattr {
            name: name.to_vec(),
            value: vec![0; value],
        };
        let mut img = good();
        img.inodes[2].xattrs = (0..1025)
            .map(|i| x(format!("user.{i}").as_bytes(), 0))
            .collect();
        refused(img, &["inode 3", "1025 xattrs", "limit of 1024"]);
        for bad in [&b""[..], b"user.a\0b"] {
            let mut img = good();
            img.inodes[2].xattrs = vec![x(bad, 1)];
            refused(img, &["inode 3", "invalid xattr name"]);
        }
        let mut img = good();
        img.inodes[2].xattrs = vec![x(&[b'u'; 256], 1)];
        refused(img, &["inode 3", "xattr name of 256 bytes", "limit of 255"]);
        let mut img = good();
        img.inodes[2].xattrs = vec![x(b"user.big", 65537)];
        refused(
            img,
            &[
                "inode 3",
                "\"user.big\" value of 65537 bytes",
                "limit of 65536",
            ],
        );
        // 300 names of 255 bytes: each fine, the list (300 * 256 bytes) too long.
        let mut img = good();
        img.inodes[2].xattrs = (0..300)
            .map(|i| {
                let mut n = format!("user.{i:03}").into_bytes();
                n.resize(255, b'n');
                x(&n, 0)
            })
            .collect();
        refused(
            img,
            &[
                "inode 3",
                "xattr name list of 76800 bytes",
                "limit of 65536",
            ],
        );
        let mut img = good();
        img.inodes[2].xattrs = vec![x(&[b'u'; 255], 65536), x(b"user.b", 0)];
        validate(&mut img).unwrap();
    }

    #[test]
    fn counts_are_bounded() {
        let small = |inodes, dir_entries, total_entries| Limits {
            inodes,
            dir_entries,
            total_entries,
        };
        refused_with(
            good(),
            &small(3, 10, 10),
            &["4 inodes exceed the limit of 3"],
        );
        refused_with(
            good(),
            &small(10, 1, 10),
            &["inode 2", "2 directory entries exceed the limit of 1"],
        );
        refused_with(
            good(),
            &small(10, 10, 2),
            &["inode 2", "more than the limit of 2 directory entries"],
        );
        let mut img = good();
        validate_with(&mut img, &small(4, 2, 3)).unwrap();
        // The real limits are the documented ones.
        assert_eq!(LIMITS.inodes, 4 << 20);
        assert_eq!(LIMITS.dir_entries, 1 << 20);
        assert_eq!(LIMITS.total_entries, 8 << 20);
    }
}
