//! Packing a directory tree into an image: scan the tree into inodes (all file types, xattrs,
//! hard links), chunk and store file contents through the router, then write the metadata
//! atomically. Any error names the offending path and leaves no image file behind.

use crate::chunk::blocks::{encode_blocked, table_len, DEFAULT_BLOCK};
use crate::chunk::{encode, ChunkId, Chunker, ChunkerKind};
use crate::dirfd;
use crate::error::{Error, Result};
use crate::meta::{
    write_image_atomic, ChunkRef, DirEntry, Image, Inode, InodeKind, Timestamp, Xattr,
};
use crate::par::{parallel_map, parallelism};
use crate::store::Router;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct PackOptions {
    pub chunker: ChunkerKind,
    pub encrypt: bool,
    pub tags: BTreeMap<String, String>,
    pub progress: bool,
    /// Chunks are stored in blocks of this size that small reads fetch alone
    /// ([`crate::chunk::blocks`], default [`DEFAULT_BLOCK`]); 0 stores whole chunks (format 1).
    pub block_size: u32,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            chunker: ChunkerKind::default(),
            encrypt: false,
            tags: BTreeMap::new(),
            progress: false,
            block_size: DEFAULT_BLOCK,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct PackStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub specials: u64,
    pub hardlinks: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    pub dedup_chunks: u64,
    pub stored_bytes: u64,
    /// Plaintext bytes of the chunks that were new to the stores.
    pub new_plain_bytes: u64,
    pub elapsed: Duration,
}

impl PackStats {
    /// Plaintext MB/s over the whole pack.
    pub fn throughput_mb_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A byte progress bar (hidden unless `show`); a spinner-style bar when `total` is unknown.
pub(crate) fn progress_bar(total: Option<u64>, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    match total {
        Some(t) => {
            let bar = ProgressBar::new(t);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        }
        None => {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {bytes} {bytes_per_sec} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar
        }
    }
}

/// Chunks, encodes and stores file contents, deduplicating within one run and counting stats.
pub(crate) struct ChunkWriter<'a> {
    router: &'a Router,
    opts: &'a PackOptions,
    stats: &'a mut PackStats,
    bar: &'a ProgressBar,
    seen: HashSet<ChunkId>,
    /// Block tables of the blocked chunks written (they go into the image).
    tables: BTreeMap<ChunkId, Vec<u8>>,
}

impl<'a> ChunkWriter<'a> {
    pub(crate) fn new(
        router: &'a Router,
        opts: &'a PackOptions,
        stats: &'a mut PackStats,
        bar: &'a ProgressBar,
    ) -> Self {
        ChunkWriter {
            router,
            opts,
            stats,
            bar,
            seen: HashSet::new(),
            tables: BTreeMap::new(),
        }
    }

    /// The block tables of the blocked chunks written so far, for the image.
    pub(crate) fn take_tables(&mut self) -> BTreeMap<ChunkId, Vec<u8>> {
        std::mem::take(&mut self.tables)
    }

    /// Stores the content read from `reader` (named `path` in errors); returns its chunk list
    /// and length.
    pub(crate) fn write(
        &mut self,
        reader: impl std::io::Read,
        path: &Path,
    ) -> Result<(Vec<ChunkRef>, u64)> {
        let chunker = Chunker::new(
            self.opts.chunker,
            std::io::BufReader::with_capacity(1 << 20, reader),
        )
        .map_err(|reason| Error::Unsupported {
            path: path.to_path_buf(),
            reason,
        })?;
        let mut chunks = Vec::new();
        let mut offset = 0u64;
        let batch_len = parallelism() * 2;
        let mut batch: Vec<Vec<u8>> = Vec::with_capacity(batch_len);
        let mut pieces = chunker.peekable();
        while let Some(piece) = pieces.next() {
            batch.push(piece.map_err(|e| Error::io(path, e))?);
            if batch.len() < batch_len && pieces.peek().is_some() {
                continue;
            }
            // Encode the batch in parallel, dedup in order, then store the new ones in parallel.
            let (encrypt, block_size) = (self.opts.encrypt, self.opts.block_size);
            let encoded = parallel_map(&batch, |plain| match block_size {
                0 => encode(plain, encrypt),
                bs => encode_blocked(plain, bs, encrypt),
            });
            let mut to_put = Vec::new();
            for (plain, enc) in batch.iter().zip(encoded) {
                let enc = enc?;
                self.stats.chunks += 1;
                let fresh = self.seen.insert(enc.id);
                chunks.push(ChunkRef {
                    id: enc.id,
                    offset,
                    size: plain.len() as u32,
                    key: enc.key,
                });
                offset += plain.len() as u64;
                self.bar.inc(plain.len() as u64);
                if fresh {
                    if block_size != 0 {
                        let n = table_len(block_size, plain.len() as u32);
                        self.tables.insert(enc.id, enc.stored[..n].to_vec());
                    }
                    to_put.push((enc, plain.len() as u64));
                } else {
                    self.stats.dedup_chunks += 1;
                }
            }
            let router = self.router;
            let results = parallel_map(&to_put, |(enc, _)| router.put(&enc.id, &enc.stored));
            for ((enc, plain_len), r) in to_put.iter().zip(results) {
                if r? {
                    self.stats.new_chunks += 1;
                    self.stats.stored_bytes += enc.stored.len() as u64;
                    self.stats.new_plain_bytes += plain_len;
                } else {
                    self.stats.dedup_chunks += 1;
                }
            }
            batch.clear();
        }
        self.stats.bytes += offset;
        Ok((chunks, offset))
    }
}

/// The data segments `[start, end)` of an open file, from SEEK_DATA/SEEK_HOLE; the whole
/// file as one segment where the filesystem cannot tell (EINVAL, ENOTSUP, ENXIO at 0 for a
/// hole-only file handled as no segment).
fn data_segments(file: &std::fs::File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence: i32| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor this function borrows; no memory is involved.
        let at = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
        if at >= 0 {
            return Ok(Some(at as u64));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    };
    let mut segments = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match seek(pos, libc::SEEK_DATA) {
            Ok(Some(start)) if start < size => start,
            Ok(_) => break,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                return Ok(vec![(0, size)]);
            }
            Err(e) => return Err(e),
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        if end <= start {
            break;
        }
        segments.push((start, end));
        pos = end;
    }
    Ok(segments)
}

/// Stores a file's data segments (its holes stay holes: gaps in the chunk list); returns its
/// chunk list and size.
fn write_sparse(
    writer: &mut ChunkWriter<'_>,
    mut file: std::fs::File,
    path: &Path,
) -> Result<(Vec<ChunkRef>, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let segments = data_segments(&file, size).map_err(|e| Error::io(path, e))?;
    if segments.as_slice() == [(0, size)] {
        // No holes: one pass, read to its end (a file that grows while packed is taken whole).
        // Seeking for holes moved the file's position.
        file.rewind().map_err(|e| Error::io(path, e))?;
        return writer.write(file, path);
    }
    let mut chunks = Vec::new();
    for (start, end) in segments {
        file.seek(SeekFrom::Start(start))
            .map_err(|e| Error::io(path, e))?;
        let (mut part, len) = writer.write((&mut file).take(end - start), path)?;
        if len != end - start {
            return Err(Error::io(
                path,
                std::io::Error::other("the file changed while it was packed"),
            ));
        }
        for c in &mut part {
            c.offset += start;
        }
        chunks.append(&mut part);
    }
    Ok((chunks, size))
}

/// Where a file found by the scan lives: its directory (an index into `Scan::dirs`) and name.
struct FileAt {
    idx: usize,
    dir: usize,
    name: Vec<u8>,
}

struct Scan {
    image: Image,
    /// Every directory walked: its parent's index (none for the root) and its name.
    dirs: Vec<(Option<usize>, Vec<u8>)>,
    files: Vec<FileAt>,
    links: HashMap<(u64, u64), u64>,
    stats: PackStats,
}

fn ts(secs: i64, nsecs: i64) -> Timestamp {
    Timestamp {
        secs,
        nsecs: nsecs.clamp(0, 999_999_999) as u32,
    }
}

/// The extended attributes of the entry at `path` (a `/proc/self/fd/N/NAME` path: the
/// `l*xattr` calls do not follow a final symlink); `shown` names it in errors.
fn read_xattrs(path: &Path, shown: &Path) -> Result<Vec<Xattr>> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(shown, e)),
    };
    let mut out = Vec::new();
    for name in names {
        if let Some(value) = xattr::get(path, &name).map_err(|e| Error::io(shown, e))? {
            out.push(Xattr {
                name: name.as_bytes().to_vec(),
                value,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The inode of the entry `name` in `dir` (or of `dir` itself), from its `stat`.
fn inode_from(dir: &OwnedFd, name: Option<&[u8]>, st: &libc::stat, shown: &Path) -> Result<Inode> {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => InodeKind::Dir,
        libc::S_IFREG => InodeKind::File,
        libc::S_IFLNK => InodeKind::Symlink,
        libc::S_IFCHR => InodeKind::CharDev,
        libc::S_IFBLK => InodeKind::BlockDev,
        libc::S_IFIFO => InodeKind::Fifo,
        libc::S_IFSOCK => InodeKind::Socket,
        _ => {
            return Err(Error::Unsupported {
                path: shown.to_path_buf(),
                reason: "unknown file type".into(),
            })
        }
    };
    let mut inode = Inode::new(kind, st.st_mode & 0o7777);
    inode.uid = st.st_uid;
    inode.gid = st.st_gid;
    inode.mtime = ts(st.st_mtime, st.st_mtime_nsec);
    inode.ctime = ts(st.st_ctime, st.st_ctime_nsec);
    if matches!(kind, InodeKind::CharDev | InodeKind::BlockDev) {
        inode.rdev = st.st_rdev;
    }
    if kind == InodeKind::Symlink {
        let cname = name
            .map(dirfd::cname)
            .transpose()
            .map_err(|e| Error::io(shown, e))?;
        let Some(cname) = cname else {
            return Err(Error::io(
                shown,
                std::io::Error::other("the root is a symlink"),
            ));
        };
        inode.target = dirfd::readlink_at(dir, &cname).map_err(|e| Error::io(shown, e))?;
        inode.size = inode.target.len() as u64;
    }
    // Symlinks too: SELinux labels (`security.selinux`) live on links as on files.
    inode.xattrs = read_xattrs(&dirfd::proc_path(dir, name), shown)?;
    if kind == InodeKind::File {
        inode.size = st.st_size as u64;
    }
    Ok(inode)
}

impl Scan {
    /// Walks directory `dir` (open; its inode is `idx`, its index in `dirs` is `at`).
    fn dir(&mut self, dir: &OwnedFd, path: &Path, idx: usize, at: usize) -> Result<()> {
        let mut names = dirfd::read_names(dir).map_err(|e| Error::io(path, e))?;
        names.sort();
        for name in names {
            let child = path.join(OsStr::from_bytes(&name));
            let cname = dirfd::cname(&name).map_err(|e| Error::io(&child, e))?;
            let st = dirfd::stat_at(dir, Some(&cname)).map_err(|e| Error::io(&child, e))?;
            let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            let key = (st.st_dev, st.st_ino);
            if !is_dir && st.st_nlink > 1 {
                if let Some(&ino) = self.links.get(&key) {
                    self.stats.hardlinks += 1;
                    self.image.inodes[idx].entries.push(DirEntry { name, ino });
                    continue;
                }
            }
            let inode = inode_from(dir, Some(&name), &st, &child)?;
            let kind = inode.kind;
            self.image.inodes.push(inode);
            let cidx = self.image.inodes.len() - 1;
            let ino = cidx as u64 + 1;
            if !is_dir && st.st_nlink > 1 {
                self.links.insert(key, ino);
            }
            self.image.inodes[idx].entries.push(DirEntry {
                name: name.clone(),
                ino,
            });
            match kind {
                InodeKind::Dir => {
                    self.stats.dirs += 1;
                    let sub = dirfd::open_dir_at(dir, &cname).map_err(|e| Error::io(&child, e))?;
                    self.dirs.push((Some(at), name));
                    let sub_at = self.dirs.len() - 1;
                    self.dir(&sub, &child, cidx, sub_at)?;
                }
                InodeKind::File => {
                    self.stats.files += 1;
                    self.files.push(FileAt {
                        idx: cidx,
                        dir: at,
                        name,
                    });
                }
                InodeKind::Symlink => self.stats.symlinks += 1,
                _ => self.stats.specials += 1,
            }
        }
        Ok(())
    }
}

/// Opens the directories of a scan again, one level at a time from the root, keeping the
/// last one open (files come grouped by directory).
struct DirOpener<'a> {
    root: &'a OwnedFd,
    dirs: &'a [(Option<usize>, Vec<u8>)],
    src: &'a Path,
    current: Option<(usize, OwnedFd)>,
}

impl DirOpener<'_> {
    /// The path of directory `at` below the source, for messages.
    fn shown(&self, mut at: usize) -> PathBuf {
        let mut names = Vec::new();
        while let Some((Some(parent), name)) = self.dirs.get(at) {
            names.push(name.as_slice());
            at = *parent;
        }
        let mut path = self.src.to_path_buf();
        for name in names.iter().rev() {
            path.push(OsStr::from_bytes(name));
        }
        path
    }

    fn open(&mut self, at: usize) -> Result<&OwnedFd> {
        if self.current.as_ref().is_none_or(|(i, _)| *i != at) {
            let mut chain = Vec::new();
            let mut i = at;
            while let Some((Some(parent), name)) = self.dirs.get(i) {
                chain.push(name.as_slice());
                i = *parent;
            }
            let mut fd: Option<OwnedFd> = None;
            for name in chain.iter().rev() {
                let c = dirfd::cname(name).map_err(|e| Error::io(self.shown(at), e))?;
                let base = fd.as_ref().unwrap_or(self.root);
                fd = Some(dirfd::open_dir_at(base, &c).map_err(|e| Error::io(self.shown(at), e))?);
            }
            let fd = match fd {
                Some(fd) => fd,
                None => self.root.try_clone().map_err(|e| Error::io(self.src, e))?,
            };
            self.current = Some((at, fd));
        }
        match &self.current {
            Some((_, fd)) => Ok(fd),
            None => Err(Error::io(
                self.src,
                std::io::Error::other("directory not open"),
            )),
        }
    }
}

/// Builds the image of `src` (storing chunks through `router`) without writing it. The tree
/// is walked relative to directory descriptors ([`dirfd`]): its paths may be longer than
/// `PATH_MAX` with `src` in front.
pub fn pack_image(src: &Path, router: &Router, opts: &PackOptions) -> Result<(Image, PackStats)> {
    let started = Instant::now();
    opts.chunker
        .validate()
        .map_err(|reason| Error::Unsupported {
            path: src.to_path_buf(),
            reason,
        })?;
    dirfd::raise_open_file_limit();
    let root = dirfd::open_dir(src).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTDIR) || e.raw_os_error() == Some(libc::ELOOP) {
            Error::io(src, std::io::Error::other("not a directory"))
        } else {
            Error::io(src, e)
        }
    })?;
    let st = dirfd::stat_at(&root, None).map_err(|e| Error::io(src, e))?;
    let mut image = Image::new(opts.chunker, opts.encrypt);
    image.block_size = opts.block_size;
    image.inodes[0] = inode_from(&root, None, &st, src)?;
    image.tags = opts.tags.clone();
    image.routes = router.routes();
    let mut scan = Scan {
        image,
        dirs: vec![(None, Vec::new())],
        files: Vec::new(),
        links: HashMap::new(),
        stats: PackStats::default(),
    };
    scan.dir(&root, src, 0, 0)?;
    let Scan {
        mut image,
        dirs,
        files,
        mut stats,
        ..
    } = scan;

    let total: u64 = files.iter().map(|f| image.inodes[f.idx].size).sum();
    let bar = progress_bar(Some(total), opts.progress);
    let mut writer = ChunkWriter::new(router, opts, &mut stats, &bar);
    let mut opener = DirOpener {
        root: &root,
        dirs: &dirs,
        src,
        current: None,
    };
    for f in files {
        let path = opener.shown(f.dir).join(OsStr::from_bytes(&f.name));
        let dir = opener.open(f.dir)?;
        let cname = dirfd::cname(&f.name).map_err(|e| Error::io(&path, e))?;
        let file = dirfd::open_file_at(dir, &cname).map_err(|e| Error::io(&path, e))?;
        let (chunks, size) = write_sparse(&mut writer, file, &path)?;
        tracing::debug!(path = %path.display(), chunks = chunks.len(), "packed file");
        image.inodes[f.idx].size = size;
        image.inodes[f.idx].chunks = chunks;
    }
    image.tables = writer.take_tables();
    bar.finish_and_clear();
    crate::meta::validate(&mut image).map_err(|reason| Error::BadImage {
        path: src.to_path_buf(),
        reason,
    })?;
    stats.elapsed = started.elapsed();
    Ok((image, stats))
}

/// Packs `src` into the image file `out` (written atomically at the end).
pub fn pack(src: &Path, out: &Path, router: &Router, opts: &PackOptions) -> Result<PackStats> {
    if router.is_empty() {
        return Err(Error::BadStoreUrl {
            url: String::new(),
            reason: "no store given".into(),
        });
    }
    let (image, stats) = pack_image(src, router, opts)?;
    write_image_atomic(&image, out)?;
    Ok(stats)
}
