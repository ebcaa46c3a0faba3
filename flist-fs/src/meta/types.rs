//! The serialized types of an image (see the module doc of `meta` for the format). Every list
//! and map is deserialized under the decode memory budget (`budget.rs`).

use crate::chunk::{ChunkId, ChunkerKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Inode number of the root directory.
pub const ROOT_INO: u64 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InodeKind {
    File,
    Dir,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
}

impl InodeKind {
    /// The `S_IFMT` bits for this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            InodeKind::File => libc::S_IFREG,
            InodeKind::Dir => libc::S_IFDIR,
            InodeKind::Symlink => libc::S_IFLNK,
            InodeKind::CharDev => libc::S_IFCHR,
            InodeKind::BlockDev => libc::S_IFBLK,
            InodeKind::Fifo => libc::S_IFIFO,
            InodeKind::Socket => libc::S_IFSOCK,
        }
    }

    /// Short name for listings.
    pub fn name(self) -> &'static str {
        match self {
            InodeKind::File => "file",
            InodeKind::Dir => "dir",
            InodeKind::Symlink => "symlink",
            InodeKind::CharDev => "chardev",
            InodeKind::BlockDev => "blockdev",
            InodeKind::Fifo => "fifo",
            InodeKind::Socket => "socket",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: i64,
    pub nsecs: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// One chunk of a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    /// Offset of the chunk's first byte in the file.
    pub offset: u64,
    /// Plaintext length.
    pub size: u32,
    /// Convergent key when the image is encrypted.
    pub key: Option<[u8; 32]>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub kind: InodeKind,
    /// Permission bits (07777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub rdev: u64,
    #[serde(deserialize_with = "super::budget::vec")]
    pub xattrs: Vec<Xattr>,
    /// Symlink target (empty for other kinds).
    pub target: Vec<u8>,
    /// Files only, ordered by offset.
    #[serde(deserialize_with = "super::budget::vec")]
    pub chunks: Vec<ChunkRef>,
    /// Directories only, sorted by name.
    #[serde(deserialize_with = "super::budget::vec")]
    pub entries: Vec<DirEntry>,
}

impl Inode {
    /// Bytes a file's chunks hold; the rest of its size is holes (read as zeros).
    pub fn data_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.size)).sum()
    }

    /// `lseek(SEEK_DATA)` (`data`) or `lseek(SEEK_HOLE)` from `offset` in a file: the first
    /// offset at or after it that is data, or a hole (the end of the file counts as one).
    /// `None` when there is none (past the end, or no data after `offset`): ENXIO.
    pub fn seek(&self, offset: u64, data: bool) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let first = self
            .chunks
            .partition_point(|c| c.offset + u64::from(c.size) <= offset);
        let Some(chunk) = self.chunks.get(first) else {
            // No chunk ends after `offset`: a hole to the end.
            return if data { None } else { Some(offset) };
        };
        if data {
            return Some(offset.max(chunk.offset));
        }
        if chunk.offset > offset {
            return Some(offset);
        }
        // Inside data: the hole starts where this run of adjacent chunks ends.
        let mut end = chunk.offset + u64::from(chunk.size);
        for next in &self.chunks[first + 1..] {
            if next.offset != end {
                break;
            }
            end += u64::from(next.size);
        }
        Some(end.min(self.size))
    }

    /// A fresh inode of `kind` with everything else zero/empty.
    pub fn new(kind: InodeKind, mode: u32) -> Self {
        Inode {
            kind,
            mode,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            rdev: 0,
            xattrs: Vec::new(),
            target: Vec::new(),
            chunks: Vec::new(),
            entries: Vec::new(),
        }
    }
}

/// A store and the chunk-id range (first byte, inclusive) it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub start: u8,
    pub end: u8,
    pub url: String,
}

/// A whole image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    #[serde(deserialize_with = "super::budget::map")]
    pub tags: BTreeMap<String, String>,
    #[serde(deserialize_with = "super::budget::vec")]
    pub routes: Vec<Route>,
    pub chunker: ChunkerKind,
    pub encrypted: bool,
    #[serde(deserialize_with = "super::budget::vec")]
    pub inodes: Vec<Inode>,
    /// Chunks are blocked chunks of this block size (`crate::chunk::blocks`); 0: whole
    /// chunks. Written after the postcard `Image` in format version 2 (see the `meta` doc).
    #[serde(skip)]
    pub block_size: u32,
    /// The block tables of the image's blocked chunks, by chunk id (each hashes to its id),
    /// so a read fetches just its block. Written after the block size in format version 2.
    #[serde(skip)]
    pub tables: BTreeMap<ChunkId, Vec<u8>>,
    /// Derived on load: link count and parent directory per inode (index = ino - 1).
    #[serde(skip)]
    pub(crate) nlink: Vec<u32>,
    #[serde(skip)]
    pub(crate) parent: Vec<u64>,
}

impl Image {
    /// An image with an empty root directory.
    pub fn new(chunker: ChunkerKind, encrypted: bool) -> Self {
        Image {
            tags: BTreeMap::new(),
            routes: Vec::new(),
            chunker,
            encrypted,
            inodes: vec![Inode::new(InodeKind::Dir, 0o755)],
            block_size: 0,
            tables: BTreeMap::new(),
            nlink: Vec::new(),
            parent: Vec::new(),
        }
    }

    /// The inode numbered `ino`, if any.
    pub fn inode(&self, ino: u64) -> Option<&Inode> {
        let idx = usize::try_from(ino.checked_sub(1)?).ok()?;
        self.inodes.get(idx)
    }

    /// Link count of `ino` (derived at load/validation).
    pub fn nlink(&self, ino: u64) -> u32 {
        let idx = ino.saturating_sub(1) as usize;
        self.nlink.get(idx).copied().unwrap_or(1)
    }

    /// Parent directory of `ino` (root is its own parent).
    pub fn parent(&self, ino: u64) -> u64 {
        let idx = ino.saturating_sub(1) as usize;
        self.parent.get(idx).copied().unwrap_or(ROOT_INO)
    }

    /// Drops the block tables of chunks no file uses (a layer's file another layer replaced).
    pub fn prune_tables(&mut self) {
        if self.tables.is_empty() {
            return;
        }
        let used: std::collections::HashSet<ChunkId> = self
            .inodes
            .iter()
            .flat_map(|i| i.chunks.iter().map(|c| c.id))
            .collect();
        self.tables.retain(|id, _| used.contains(id));
    }

    /// Total plaintext bytes of all distinct files.
    pub fn total_file_bytes(&self) -> u64 {
        self.inodes
            .iter()
            .filter(|i| i.kind == InodeKind::File)
            .map(|i| i.size)
            .sum()
    }
}
