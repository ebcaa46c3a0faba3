//! `flist_fs::meta::decode_image` (header, checksum, bounded zstd, budgeted postcard,
//! validation) on hostile bytes, raw or wrapped in a valid header around a fuzzed payload, and
//! on images built field by field (`arbitrary`) and written with `encode_unvalidated`, as a
//! hostile packer would. Every accepted image must satisfy what validation promises, checked
//! here independently; for built images the reverse holds too (an image meeting every rule is
//! accepted), and an accepted image re-encodes (`encode_image`) and decodes to itself.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use arbitrary::Arbitrary;
use flist_fs::chunk::{ChunkId, ChunkerKind, MAX_CHUNK_SIZE};
use flist_fs::meta::{
    decode_image, encode_image, encode_unvalidated, ChunkRef, DirEntry, Image, Inode, InodeKind,
    Route, Timestamp, Xattr, MAX_NAME_LEN, MAX_PATH_LEN, MAX_TARGET_LEN, MAX_XATTRS,
    MAX_XATTR_LIST, MAX_XATTR_NAME, MAX_XATTR_VALUE,
};
use libfuzzer_sys::fuzz_target;

const NAMES: [&[u8]; 10] = [
    b"a", b"b", b"c", b"..", b".", b"", b"x/y", b"a\0b", b"dir", b"\xff",
];

#[derive(Arbitrary, Debug)]
enum Name {
    Pick(u8),
    Raw(Vec<u8>),
    /// `len` bytes of `c`: names and paths at and around the limits.
    Long(u16, u8),
}

impl Name {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Name::Pick(i) => NAMES[usize::from(*i) % NAMES.len()].to_vec(),
            Name::Raw(b) => b.clone(),
            Name::Long(len, c) => vec![b'a' + c % 26; usize::from(*len % 300)],
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Size {
    /// The sum of the chunks (what validation wants).
    Sum,
    Off(i8),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
struct FChunk {
    size: u32,
    huge: bool,
    /// Offset: contiguous unless given.
    offset: Option<u64>,
    key: Option<bool>,
    id: u8,
}

#[derive(Arbitrary, Debug)]
struct FInode {
    kind: u8,
    mode: u16,
    uid: u8,
    gid: u8,
    size: Size,
    mtime: (i64, u32),
    rdev: u64,
    xattrs: Vec<(Name, u16, bool)>,
    target: Name,
    chunks: Vec<FChunk>,
    entries: Vec<(Name, u8)>,
    sort: bool,
}

#[derive(Arbitrary, Debug)]
struct FImage {
    tags: Vec<(String, String)>,
    routes: Vec<(u8, u8, String)>,
    fixed: Option<u32>,
    encrypted: bool,
    inodes: Vec<FInode>,
    /// Applied to the encoded bytes: (position, xor).
    corrupt: Option<(u16, u8)>,
}

const KINDS: [InodeKind; 7] = [
    InodeKind::Dir,
    InodeKind::File,
    InodeKind::Symlink,
    InodeKind::CharDev,
    InodeKind::BlockDev,
    InodeKind::Fifo,
    InodeKind::Socket,
];

fn build(f: &FImage) -> Image {
    let mut img = Image::new(
        f.fixed
            .map_or(ChunkerKind::default(), |size| ChunkerKind::Fixed { size }),
        f.encrypted,
    );
    img.tags = f.tags.iter().take(8).cloned().collect::<BTreeMap<_, _>>();
    img.routes = f
        .routes
        .iter()
        .take(4)
        .map(|(start, end, url)| Route {
            start: *start,
            end: *end,
            url: url.clone(),
        })
        .collect();
    img.inodes.clear();
    for fi in f.inodes.iter().take(64) {
        let kind = KINDS[usize::from(fi.kind) % KINDS.len()];
        let mut inode = Inode::new(kind, u32::from(fi.mode));
        inode.uid = u32::from(fi.uid);
        inode.gid = u32::from(fi.gid);
        inode.mtime = Timestamp {
            secs: fi.mtime.0,
            nsecs: fi.mtime.1,
        };
        inode.ctime = inode.mtime;
        inode.rdev = fi.rdev;
        inode.xattrs = fi
            .xattrs
            .iter()
            .take(8)
            .map(|(name, len, big)| Xattr {
                name: name.bytes(),
                value: vec![
                    7;
                    if *big {
                        usize::from(*len) + 1
                    } else {
                        usize::from(*len % 64)
                    }
                ],
            })
            .collect();
        inode.target = fi.target.bytes();
        if let Name::Long(len, _) = fi.target {
            // Targets at the 4095 limit.
            inode.target = vec![b't'; MAX_TARGET_LEN - 2 + usize::from(len % 4)];
        }
        let mut off = 0u64;
        for c in fi.chunks.iter().take(16) {
            let size = if c.huge {
                MAX_CHUNK_SIZE - 1 + c.size % 3
            } else {
                c.size % 100_000
            };
            let key = match c.key {
                None => f.encrypted.then_some([c.id; 32]),
                Some(true) => Some([c.id; 32]),
                Some(false) => None,
            };
            let offset = c.offset.unwrap_or(off);
            inode.chunks.push(ChunkRef {
                id: ChunkId([c.id; 32]),
                offset,
                size,
                key,
            });
            off = offset.wrapping_add(u64::from(size));
        }
        inode.size = match fi.size {
            Size::Sum => inode.chunks.iter().map(|c| u64::from(c.size)).sum(),
            Size::Off(d) => off.wrapping_add_signed(i64::from(d)),
            Size::Raw(s) => s,
        };
        inode.entries = fi
            .entries
            .iter()
            .take(16)
            .map(|(name, ino)| DirEntry {
                name: name.bytes(),
                ino: u64::from(*ino),
            })
            .collect();
        if fi.sort {
            inode.entries.sort_by(|a, b| a.name.cmp(&b.name));
        }
        img.inodes.push(inode);
    }
    img
}

/// Everything validation promises about an accepted image, checked from scratch; `Err` names
/// the first broken rule.
fn check(img: &Image) -> Result<(), String> {
    let n = img.inodes.len();
    if n == 0 || img.inodes[0].kind != InodeKind::Dir {
        return Err("root".into());
    }
    let mut dir_links = vec![0u32; n];
    let mut links = vec![0u32; n];
    let mut parent = vec![0u64; n];
    for (idx, inode) in img.inodes.iter().enumerate() {
        let ino = idx as u64 + 1;
        if inode.kind != InodeKind::Dir && !inode.entries.is_empty() {
            return Err(format!("{ino}: entries in a non-directory"));
        }
        if inode.kind != InodeKind::File && !inode.chunks.is_empty() {
            return Err(format!("{ino}: chunks in a non-file"));
        }
        if inode.target.len() > MAX_TARGET_LEN || inode.xattrs.len() > MAX_XATTRS {
            return Err(format!("{ino}: target or xattr count"));
        }
        let mut list = 0;
        for x in &inode.xattrs {
            if x.name.is_empty()
                || x.name.contains(&0)
                || x.name.len() > MAX_XATTR_NAME
                || x.value.len() > MAX_XATTR_VALUE
            {
                return Err(format!("{ino}: xattr"));
            }
            list += x.name.len() + 1;
        }
        if list > MAX_XATTR_LIST {
            return Err(format!("{ino}: xattr list"));
        }
        // Chunks are ordered and never overlap; gaps (and a tail past the last) are holes.
        let mut off = 0u64;
        for c in &inode.chunks {
            if c.offset < off || c.size == 0 || c.size > MAX_CHUNK_SIZE {
                return Err(format!("{ino}: chunk list out of order or chunk size"));
            }
            if c.key.is_some() != img.encrypted {
                return Err(format!("{ino}: chunk key"));
            }
            off = c
                .offset
                .checked_add(u64::from(c.size))
                .ok_or(format!("{ino}: overflow"))?;
        }
        if inode.kind == InodeKind::File && off > inode.size {
            return Err(format!("{ino}: chunks end at {off}, size {}", inode.size));
        }
        for (i, e) in inode.entries.iter().enumerate() {
            if e.name.is_empty()
                || e.name == b"."
                || e.name == b".."
                || e.name.contains(&b'/')
                || e.name.contains(&0)
                || e.name.len() > MAX_NAME_LEN
            {
                return Err(format!("{ino}: entry name"));
            }
            if i > 0 && inode.entries[i - 1].name >= e.name {
                return Err(format!("{ino}: entries unsorted"));
            }
            if e.ino < 2 || e.ino > n as u64 {
                return Err(format!("{ino}: entry points at missing inode {}", e.ino));
            }
            let c = (e.ino - 1) as usize;
            links[c] += 1;
            if img.inodes[c].kind == InodeKind::Dir {
                dir_links[c] += 1;
                if dir_links[c] > 1 {
                    return Err(format!("{ino}: directory {} linked twice", e.ino));
                }
                parent[c] = ino;
            }
        }
    }
    // Every directory reachable from the root, with a bounded path.
    let mut path_len = vec![usize::MAX; n];
    path_len[0] = 0;
    let mut queue = vec![0usize];
    while let Some(d) = queue.pop() {
        for e in &img.inodes[d].entries {
            let c = (e.ino - 1) as usize;
            let len = path_len[d] + 1 + e.name.len();
            if len > MAX_PATH_LEN {
                return Err(format!("{}: path too long", e.ino));
            }
            if img.inodes[c].kind == InodeKind::Dir {
                path_len[c] = len;
                queue.push(c);
            }
        }
    }
    for (idx, inode) in img.inodes.iter().enumerate() {
        if inode.kind == InodeKind::Dir && path_len[idx] == usize::MAX {
            return Err(format!("{}: directory not reachable", idx + 1));
        }
    }
    Ok(())
}

/// The derived tables of an accepted image agree with its entries.
fn check_derived(img: &Image) {
    assert_eq!(img.parent(1), 1, "root's parent");
    for (idx, inode) in img.inodes.iter().enumerate() {
        let ino = idx as u64 + 1;
        if inode.kind == InodeKind::Dir {
            let subdirs = inode
                .entries
                .iter()
                .filter(|e| img.inode(e.ino).unwrap().kind == InodeKind::Dir)
                .count() as u32;
            assert_eq!(img.nlink(ino), 2 + subdirs, "nlink of directory {ino}");
            for e in &inode.entries {
                let child = img.inode(e.ino).unwrap();
                if child.kind == InodeKind::Dir {
                    assert_eq!(img.parent(e.ino), ino, "parent of directory {}", e.ino);
                }
                assert_eq!(img.lookup(ino, &e.name), Some(e.ino), "lookup of an entry");
            }
        }
    }
}

fn same_image(a: &Image, b: &Image) -> bool {
    a.tags == b.tags && a.chunker == b.chunker && a.encrypted == b.encrypted && a.inodes == b.inodes
}

fn accepted(img: &Image) {
    if let Err(rule) = check(img) {
        panic!("decode_image accepted an image that breaks a rule: {rule}");
    }
    check_derived(img);
    // What was accepted is written again, and reads back the same.
    let bytes = encode_image(img, Path::new("fuzz")).expect("re-encode an accepted image");
    let again = decode_image(&bytes, Path::new("fuzz")).expect("decode a re-encoded image");
    assert!(same_image(img, &again), "re-encoded image differs");
}

fn wrap(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(56 + payload.len());
    out.extend_from_slice(&flist_fs::meta::MAGIC);
    // Format version 1: the tables alone (version 2 appends the block size and block tables).
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(payload).as_bytes());
    out.extend_from_slice(payload);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let path = Path::new("fuzz");
    match mode % 4 {
        // The bytes as a file.
        0 => {
            if let Ok(img) = decode_image(rest, path) {
                accepted(&img);
            }
        }
        // The bytes as the compressed payload behind a valid header.
        1 => {
            if let Ok(img) = decode_image(&wrap(rest), path) {
                accepted(&img);
            }
        }
        // The bytes as the postcard payload, compressed behind a valid header.
        2 => {
            let payload = zstd::bulk::compress(rest, 1).unwrap();
            if let Ok(img) = decode_image(&wrap(&payload), path) {
                accepted(&img);
            }
        }
        // An image built field by field.
        _ => {
            let Ok(f) = FImage::arbitrary_take_rest(arbitrary::Unstructured::new(rest)) else {
                return;
            };
            let img = build(&f);
            let mut bytes = encode_unvalidated(&img, path).expect("encode_unvalidated");
            let rule = check(&img);
            if let Some((at, x)) = f.corrupt {
                let i = usize::from(at) % bytes.len();
                bytes[i] ^= x;
            }
            match decode_image(&bytes, path) {
                Ok(decoded) => {
                    accepted(&decoded);
                    if f.corrupt.is_none() {
                        assert!(
                            same_image(&img, &decoded),
                            "decoded image differs from the encoded one"
                        );
                    }
                }
                Err(e) => {
                    if f.corrupt.is_none() || f.corrupt.is_some_and(|(_, x)| x == 0) {
                        assert!(rule.is_err(), "a valid image was refused: {e}");
                    }
                }
            }
        }
    }
});
