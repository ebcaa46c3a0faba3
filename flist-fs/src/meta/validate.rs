//! Structural validation of a decoded image (entries point at real inodes, names are single
//! path components, chunk lists are contiguous, directories form a tree) and derivation of
//! link counts and parents. A malicious or corrupt image is rejected here, before any use.

use super::types::{Image, InodeKind, ROOT_INO};

/// Validates `image` and fills its derived tables; the error says which inode/entry is wrong.
pub(crate) fn validate(image: &mut Image) -> Result<(), String> {
    let n = image.inodes.len();
    match image.inodes.first() {
        None => return Err("no inodes (missing root directory)".into()),
        Some(root) if root.kind != InodeKind::Dir => {
            return Err("inode 1 (root) is not a directory".into())
        }
        _ => {}
    }
    let mut nlink = vec![0u32; n];
    let mut parent = vec![0u64; n];
    nlink[0] = 1;
    parent[0] = ROOT_INO;
    for (idx, inode) in image.inodes.iter().enumerate() {
        let ino = idx as u64 + 1;
        if inode.kind != InodeKind::Dir && !inode.entries.is_empty() {
            return Err(format!(
                "inode {ino}: a {} with directory entries",
                inode.kind.name()
            ));
        }
        if inode.kind != InodeKind::File && !inode.chunks.is_empty() {
            return Err(format!("inode {ino}: a {} with chunks", inode.kind.name()));
        }
        if inode.kind == InodeKind::File {
            let mut off = 0u64;
            for c in &inode.chunks {
                if c.offset != off || c.size == 0 {
                    return Err(format!("inode {ino}: chunk {} at offset {} breaks the chunk list (expected offset {off}, non-empty)", c.id, c.offset));
                }
                if c.key.is_some() != image.encrypted {
                    return Err(format!("inode {ino}: chunk {} key presence disagrees with the image's encryption flag", c.id));
                }
                off += u64::from(c.size);
            }
            if off != inode.size {
                return Err(format!(
                    "inode {ino}: chunks cover {off} bytes, size is {}",
                    inode.size
                ));
            }
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
            if prev.is_some_and(|p| p >= e.name.as_slice()) {
                return Err(format!(
                    "inode {ino}: entries not sorted or duplicated at {shown:?}"
                ));
            }
            prev = Some(&e.name);
            let child = e
                .ino
                .checked_sub(1)
                .map(|c| c as usize)
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
            nlink[child] += 1;
            if parent[child] == 0 {
                parent[child] = ino;
            }
        }
    }
    // Directories: nlink = 2 + number of subdirectories; also reject cycles (a directory that
    // cannot reach the root through its parents).
    for (idx, dir) in image.inodes.iter().enumerate() {
        if dir.kind != InodeKind::Dir {
            continue;
        }
        let mut cur = idx as u64 + 1;
        let mut steps = 0usize;
        while cur != ROOT_INO {
            cur = parent[(cur - 1) as usize];
            steps += 1;
            if cur == 0 || steps > n {
                return Err(format!(
                    "inode {}: directory not reachable from the root",
                    idx + 1
                ));
            }
        }
        let subdirs = dir
            .entries
            .iter()
            .filter(|e| image.inodes[(e.ino - 1) as usize].kind == InodeKind::Dir)
            .count() as u32;
        nlink[idx] = 2 + subdirs;
    }
    image.nlink = nlink;
    image.parent = parent;
    Ok(())
}
