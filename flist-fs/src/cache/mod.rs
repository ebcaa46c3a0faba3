//! The local chunk cache shared by all images and processes: stored chunks (verified against
//! their id) and decoded plaintexts of unencrypted chunks and blocks (checked against a MAC
//! under the node key), which let small reads be served with one `pread` once checked (see
//! [`ChunkCache::get_plain`]). It has two layouts, one per mode:
//!
//! - **standalone** (processes that read images themselves; several share the directory):
//!   entries are appended to segment files in `<dir>/seg/`, each process to files of its own,
//!   so that caching a 32 KiB block on a cold read is an append, not a new inode (file
//!   creation and rename cost more than the read on a small machine); see `segments.rs` for
//!   the format, the scan that finds other processes' entries, and its bounds;
//! - **indexed** (the node's chunk fetcher, the directory's only writer): one file per entry,
//!   `<dir>/<id[0..2]>/<id>` (stored) and `<dir>/<id[0..2]>/<id>.plain` (the MAC, then the
//!   plaintext), written to a temp file and renamed into place, because the fetcher hands a
//!   vmm a read-only descriptor that must hold only the plaintext it asked for.
//!
//! A half-written entry is never served: every hit is re-verified, so an entry torn by a
//! crash or power loss (no fsync: the cache is disposable) is a miss (a bad file is deleted,
//! a bad segment entry dropped from the process's index). Size is bounded: when the running
//! estimate passes the bound, the least recently used files (by mtime, refreshed on hits;
//! whole segments in standalone mode) are deleted down to 90% of it. Deletion by another
//! process at any time is tolerated. Directories are created 0700 and files 0600 whatever
//! the process umask.
//!
//! # Standalone mode (no chunk fetcher: several processes share the directory)
//!
//! [`ChunkCache::open`] reads nothing of the directory: a cache of any size opens at once
//! (the first miss scans the segments' headers, not their bytes).
//! [`ChunkCache::start_evictor`] (or [`ChunkCache::shared`], one cache object per directory
//! and process, its evictor started) runs a background thread that measures the directory
//! once, then, whenever this process's running estimate passes the bound, deletes the least
//! recently used files down to 90% of it. Inserts only add to the estimate and wake it: no
//! request waits for a scan or an eviction. A cache without an evictor evicts in the insert
//! that passes the bound, as a last resort. Files of the indexed layout found in a standalone
//! cache's directory (an older version's) are not read, only evicted.
//!
//! # Threat model of the plaintext cache
//!
//! The cache directory is shared by every VM on the node, so whoever can write it could try to
//! poison them all. Stored chunks are safe by construction (named by the blake3 of their
//! bytes, checked on every hit). A plaintext's hash is not in the image (the chunk id hashes
//! the *stored* bytes), so a `.plain` file starts with a keyed blake3 MAC over (chunk id,
//! plaintext), and a segment entry's header carries one over (kind, length, id, bytes), under
//! a per-node secret: a 32-byte key file, mode 0600, owned by this user,
//! kept next to the cache directory (`<dir>.key`, outside it) or named by the caller
//! ([`ChunkCache::open_with_key`]). An attacker who can create, replace or delete files in the
//! cache directory but cannot read the key (nor write this user's 0600 files) cannot make a
//! plaintext that verifies. When no usable key file exists or can be made (wrong owner or mode,
//! read-only parent), a random per-process key is used, with a warning: plaintexts then only
//! serve the process that wrote them.
//!
//! A checked plaintext is read through the descriptor it was checked on, kept open (at most
//! [`MAX_OPEN_PLAIN`], least recently used closed first); [`ChunkCache::read_plain_at`] never
//! re-opens by path, so a file renamed over the checked one later is not served, and a
//! segment entry, never changed once written, is read at the offset it was checked at. (An
//! evicted file stays readable, and its disk space held, until its descriptor is closed.)
//!
//! # Indexed mode (the node's chunk fetcher)
//!
//! [`ChunkCache::open_indexed`] makes a cache for a process that owns the directory (the
//! chunk fetcher, see [`crate::fetcher`]): the directory is scanned once, into an in-memory
//! index of its entries (size, last use); hits and inserts update the index instead of file
//! mtimes, and an insert never evicts: [`ChunkCache::start_evictor`] runs a background thread
//! that deletes the least recently used entries down to 90% of the bound whenever the index
//! says the bound is passed (and cleans stale temp files now and then).

mod segments;

use crate::chunk::{verify_stored, ChunkId, MAX_CHUNK_SIZE, MAX_STORED_SIZE};
use crate::error::{Error, Result};
use segments::{Kind, Segments};
use std::collections::HashMap;
use std::fs::{File, Permissions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, SystemTime};

pub struct ChunkCache {
    dir: PathBuf,
    max_bytes: u64,
    approx_bytes: AtomicU64,
    /// The node's MAC key for cached plaintexts.
    key: [u8; 32],
    /// Checked plaintexts, open: chunk id -> (descriptor, last use).
    open_plain: Mutex<OpenPlain>,
    /// The in-memory index of entries (indexed mode only).
    index: Option<Index>,
    /// The segment files entries are appended to (standalone mode only).
    segments: Option<Segments>,
    /// Most checked plaintexts kept open.
    max_open: usize,
    /// The background evictor of a standalone cache (shared with its thread, which holds no
    /// reference to the cache while it waits).
    background: Arc<Background>,
}

impl Drop for ChunkCache {
    fn drop(&mut self) {
        self.background.close();
    }
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("dir", &self.dir)
            .field("max_bytes", &self.max_bytes)
            .field("indexed", &self.index.is_some())
            .finish_non_exhaustive()
    }
}

/// A standalone cache's background evictor: whether one runs, whether it has measured the
/// directory yet, and its wake-up (an insert passed the bound, or the cache is gone).
#[derive(Default)]
struct Background {
    running: std::sync::atomic::AtomicBool,
    measured: std::sync::atomic::AtomicBool,
    state: Mutex<Wake>,
    wake: Condvar,
}

#[derive(Default)]
struct Wake {
    over: bool,
    closed: bool,
}

impl Background {
    fn signal(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.over = true;
            self.wake.notify_all();
        }
    }

    fn close(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.closed = true;
            self.wake.notify_all();
        }
    }

    /// Waits until an insert passes the bound (true), the cache is gone or the wait fails
    /// (None), or `EVICTOR_PERIOD` passes (false).
    fn wait(&self) -> Option<bool> {
        let state = self.state.lock().ok()?;
        let (mut state, _) = self
            .wake
            .wait_timeout_while(state, EVICTOR_PERIOD, |s| !s.over && !s.closed)
            .ok()?;
        if state.closed {
            return None;
        }
        Some(std::mem::take(&mut state.over))
    }
}

/// Caches opened by [`ChunkCache::shared`] in this process, by directory.
static SHARED: Mutex<Vec<(PathBuf, Weak<ChunkCache>)>> = Mutex::new(Vec::new());

/// Entries of an indexed cache: file path -> (size, last use), their total, and the
/// evictor's wake-up.
struct Index {
    state: Mutex<IndexState>,
    wake: Condvar,
}

#[derive(Default)]
struct IndexState {
    files: HashMap<PathBuf, (u64, u64)>,
    clock: u64,
    bytes: u64,
    /// Set when an insert passes the bound (the evictor clears it).
    over: bool,
}

impl Index {
    fn record(&self, p: &Path, len: Option<u64>, max: u64) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        st.clock += 1;
        let now = st.clock;
        match (st.files.get_mut(p), len) {
            (Some(e), None) => e.1 = now,
            (Some(e), Some(len)) => {
                let old = e.0;
                *e = (len, now);
                st.bytes = st.bytes - old + len;
            }
            (None, Some(len)) => {
                st.files.insert(p.to_path_buf(), (len, now));
                st.bytes += len;
            }
            (None, None) => {}
        }
        if st.bytes > max && !st.over {
            st.over = true;
            self.wake.notify_all();
        }
    }

    fn forget(&self, p: &Path) {
        if let Ok(mut st) = self.state.lock() {
            if let Some((len, _)) = st.files.remove(p) {
                st.bytes -= len;
            }
        }
    }
}

#[derive(Default)]
struct OpenPlain {
    files: HashMap<ChunkId, OpenEntry>,
    clock: u64,
}

/// A checked plaintext: the descriptor it was checked on, where it starts in it, its length
/// and its last use.
struct OpenEntry {
    file: Arc<File>,
    at: u64,
    len: u32,
    used: u64,
}

/// Stale temp files (from a crashed writer) older than this are removed during eviction.
const STALE_TMP: Duration = Duration::from_secs(3600);
/// A hit refreshes the file's mtime only when it is older than this (fewer syscalls).
const TOUCH_AFTER: Duration = Duration::from_secs(30);
/// A cached plaintext starts with the MAC of (chunk id, plaintext).
const PLAIN_HEADER: usize = 32;
/// Domain separation for the plaintext MAC.
const PLAIN_MAC_CONTEXT: &[u8] = b"flist-fs cached plaintext v1\0";
/// Most checked plaintexts kept open per cache instance (file descriptors).
pub const MAX_OPEN_PLAIN: usize = 512;
/// Most checked plaintexts kept open by an indexed cache (the node's fetcher serves every
/// VM's working set from them; a plaintext not open is read whole and checked again).
pub const MAX_OPEN_PLAIN_INDEXED: usize = 8192;
const DIR_MODE: u32 = 0o700;
/// How often the evictor of an indexed cache looks, even when not woken.
const EVICTOR_PERIOD: Duration = Duration::from_secs(10);
const FILE_MODE: u32 = 0o600;

/// Creates `p` and its missing parents with mode 0700.
fn mkdir_p(p: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(p)
        .map_err(|e| Error::io(p, e))
}

/// Opens `p` for reading, refusing a symlink and never blocking (a FIFO planted in the cache
/// would otherwise hang the reader; callers then check it is a regular file).
fn open_nofollow(p: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(p)
}

/// `file` opened again, read-only, through `/proc/self/fd` (the same inode).
fn reopen_readonly(file: &File) -> std::io::Result<File> {
    use std::os::fd::AsRawFd;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// The default key file of the cache at `dir`: `<dir>.key`, beside it.
fn default_key_path(dir: &Path) -> Option<PathBuf> {
    let name = dir.file_name()?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut key_name = name.to_os_string();
    key_name.push(".key");
    Some(parent.join(key_name))
}

fn random_key() -> std::io::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    File::open("/dev/urandom")?.read_exact(&mut key)?;
    Ok(key)
}

/// Reads the key file at `path`, creating it (0600, random) when absent. Refuses a key file
/// that is not a regular 32-byte file owned by this user with no group/other permissions.
pub fn load_or_create_key(path: &Path) -> Result<[u8; 32]> {
    let bad = |reason: String| Error::BadPath {
        path: path.display().to_string(),
        reason,
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    for _ in 0..3 {
        match open_nofollow(path) {
            Ok(mut f) => {
                let m = f.metadata().map_err(|e| Error::io(path, e))?;
                if !m.is_file() || m.uid() != euid || m.mode() & 0o077 != 0 || m.len() != 32 {
                    return Err(bad(format!(
                        "unusable cache key file: must be a regular 32-byte file owned by uid {euid} with mode 0600 (is uid {}, mode {:o}, {} bytes)",
                        m.uid(),
                        m.mode() & 0o7777,
                        m.len()
                    )));
                }
                let mut key = [0u8; 32];
                f.read_exact(&mut key).map_err(|e| Error::io(path, e))?;
                return Ok(key);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let parent = match path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                let key = random_key().map_err(|e| Error::io("/dev/urandom", e))?;
                let mut tmp = tempfile::Builder::new()
                    .prefix(".flist-key-")
                    .permissions(Permissions::from_mode(FILE_MODE))
                    .tempfile_in(parent)
                    .map_err(|e| Error::io(parent, e))?;
                tmp.write_all(&key).map_err(|e| Error::io(tmp.path(), e))?;
                tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
                match tmp.persist_noclobber(path) {
                    Ok(_) => return Ok(key),
                    // Another process made it first: read theirs.
                    Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(Error::io(path, e.error)),
                }
            }
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Err(bad("cache key file keeps changing".into()))
}

impl ChunkCache {
    /// Opens (creating, mode 0700) the cache at `dir` bounded to `max_bytes`, with the node key
    /// `<dir>.key` (created when absent; see the module doc for what happens when unusable).
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self> {
        mkdir_p(&dir.join("tmp"))?;
        let loaded = match default_key_path(dir) {
            Some(p) => load_or_create_key(&p),
            None => Err(Error::BadPath {
                path: dir.display().to_string(),
                reason: "no place for a cache key file beside it".into(),
            }),
        };
        let key = match loaded {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "no node cache key: cached plaintexts serve this process only");
                random_key().map_err(|e| Error::io("/dev/urandom", e))?
            }
        };
        Ok(Self::with_key(dir, max_bytes, key))
    }

    /// Opens (creating, mode 0700) the cache at `dir` with the MAC key in `key_file` (created
    /// when absent); fails when the key file is unusable.
    pub fn open_with_key(dir: &Path, max_bytes: u64, key_file: &Path) -> Result<Self> {
        mkdir_p(&dir.join("tmp"))?;
        let key = load_or_create_key(key_file)?;
        Ok(Self::with_key(dir, max_bytes, key))
    }

    /// A standalone cache; nothing of the directory is read here (see "Standalone mode").
    fn with_key(dir: &Path, max_bytes: u64, key: [u8; 32]) -> Self {
        ChunkCache {
            dir: dir.to_path_buf(),
            max_bytes,
            approx_bytes: AtomicU64::new(0),
            key,
            open_plain: Mutex::new(OpenPlain::default()),
            index: None,
            segments: Some(Segments::new(dir, max_bytes, key)),
            max_open: MAX_OPEN_PLAIN,
            background: Arc::default(),
        }
    }

    /// This process's standalone cache at `dir`: the one already open here (whatever bound it
    /// was opened with), else opened now with `max_bytes` and its background evictor started,
    /// the thread running `on_start` first. Every image of a process then shares one cache
    /// object per directory, and one evictor.
    pub fn shared(
        dir: &Path,
        max_bytes: u64,
        on_start: Option<crate::ThreadStart>,
    ) -> Result<Arc<Self>> {
        let mut shared = SHARED.lock().map_err(|_| Error::BadPath {
            path: dir.display().to_string(),
            reason: "the table of open caches is poisoned".into(),
        })?;
        shared.retain(|(_, c)| c.strong_count() > 0);
        if let Some(cache) = shared
            .iter()
            .find(|(d, _)| d == dir)
            .and_then(|(_, c)| c.upgrade())
        {
            return Ok(cache);
        }
        let cache = Arc::new(Self::open(dir, max_bytes)?);
        cache
            .start_evictor_with(on_start)
            .map_err(|e| Error::io(dir, e))?;
        shared.push((dir.to_path_buf(), Arc::downgrade(&cache)));
        Ok(cache)
    }

    /// Whether the cache's size is known: always for an indexed cache; for a standalone one,
    /// once its evictor has measured the directory.
    pub fn measured(&self) -> bool {
        self.index.is_some() || self.background.measured.load(Ordering::Acquire)
    }

    /// Opens the cache at `dir` for its only writer (see "Indexed mode" in the module doc):
    /// scans it once into an in-memory index (oldest mtime = least recently used); inserts
    /// never evict, [`ChunkCache::start_evictor`] does. The MAC key is `key_file`, else
    /// `<dir>.key` (created when absent); an unusable key file is an error.
    pub fn open_indexed(dir: &Path, max_bytes: u64, key_file: Option<&Path>) -> Result<Self> {
        mkdir_p(&dir.join("tmp"))?;
        let key_path = match key_file {
            Some(k) => k.to_path_buf(),
            None => default_key_path(dir).ok_or_else(|| Error::BadPath {
                path: dir.display().to_string(),
                reason: "no place for a cache key file beside it".into(),
            })?,
        };
        let key = load_or_create_key(&key_path)?;
        let mut cache = ChunkCache {
            dir: dir.to_path_buf(),
            max_bytes,
            approx_bytes: AtomicU64::new(0),
            key,
            open_plain: Mutex::new(OpenPlain::default()),
            index: None,
            segments: None,
            max_open: MAX_OPEN_PLAIN,
            background: Arc::default(),
        };
        let mut entries = cache.entries();
        entries.sort_by_key(|(_, _, t)| *t);
        let mut st = IndexState::default();
        for (p, len, _) in entries {
            st.clock += 1;
            st.bytes += len;
            st.files.insert(p, (len, st.clock));
        }
        st.over = st.bytes > max_bytes;
        cache.max_open = MAX_OPEN_PLAIN_INDEXED;
        cache.index = Some(Index {
            state: Mutex::new(st),
            wake: Condvar::new(),
        });
        Ok(cache)
    }

    /// Bytes the index counts (indexed mode), else the running estimate (this process's
    /// inserts only, until the evictor has measured the directory).
    pub fn used_bytes(&self) -> u64 {
        match &self.index {
            Some(ix) => ix.state.lock().map(|s| s.bytes).unwrap_or(0),
            None => self.approx_bytes.load(Ordering::Relaxed),
        }
    }

    /// Entries the index counts (indexed mode; 0 otherwise).
    pub fn indexed_entries(&self) -> usize {
        self.index
            .as_ref()
            .and_then(|ix| ix.state.lock().ok().map(|s| s.files.len()))
            .unwrap_or(0)
    }

    /// Starts the background evictor (see "Indexed mode" and "Standalone mode" in the module
    /// doc). It ends when the cache is dropped. A second call does nothing.
    pub fn start_evictor(self: &Arc<Self>) -> std::io::Result<()> {
        self.start_evictor_with(None)
    }

    /// As [`ChunkCache::start_evictor`]; the thread runs `on_start` first, and ends if it
    /// fails (inserts then evict themselves, as without an evictor).
    pub fn start_evictor_with(
        self: &Arc<Self>,
        on_start: Option<crate::ThreadStart>,
    ) -> std::io::Result<()> {
        if self.background.running.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        let background = self.background.clone();
        let spawned = std::thread::Builder::new()
            .name("cache-evictor".into())
            .spawn(move || {
                if let Some(start) = on_start {
                    if let Err(e) = start() {
                        tracing::error!("cache-evictor: not starting: {e}");
                        background.running.store(false, Ordering::Release);
                        return;
                    }
                }
                let indexed = weak.upgrade().is_some_and(|c| c.index.is_some());
                if indexed {
                    Self::run_indexed_evictor(weak)
                } else {
                    Self::run_standalone_evictor(weak, &background)
                }
            });
        if let Err(e) = spawned {
            self.background.running.store(false, Ordering::Release);
            return Err(e);
        }
        Ok(())
    }

    /// The evictor of an indexed cache: deletes least recently used entries down to 90% of
    /// the bound whenever an insert passes it (and looks every `EVICTOR_PERIOD` anyway).
    fn run_indexed_evictor(weak: Weak<Self>) {
        let mut rounds = 0u64;
        loop {
            let Some(cache) = weak.upgrade() else { return };
            let Some(ix) = cache.index.as_ref() else {
                return;
            };
            {
                let Ok(st) = ix.state.lock() else { return };
                let waited = ix.wake.wait_timeout_while(st, EVICTOR_PERIOD, |s| !s.over);
                if waited.is_err() {
                    return;
                }
            }
            rounds += 1;
            if rounds % 30 == 1 {
                cache.clean_stale_tmp();
            }
            let (freed, used) = cache.evict_indexed();
            if freed > 0 {
                tracing::info!(freed, used, "cache evicted");
            }
        }
    }

    /// The evictor of a standalone cache: measures the directory once (evicting if it is
    /// over the bound), then evicts whenever an insert passes the bound. It holds the cache
    /// only while it works.
    fn run_standalone_evictor(weak: Weak<Self>, background: &Background) {
        {
            let Some(cache) = weak.upgrade() else { return };
            let used: u64 = cache.entries().iter().map(|(_, len, _)| len).sum();
            cache.approx_bytes.store(used, Ordering::Relaxed);
            background.measured.store(true, Ordering::Release);
            tracing::debug!(used, dir = %cache.dir.display(), "cache measured");
            if used > cache.max_bytes {
                background.signal();
            }
        }
        while let Some(over) = background.wait() {
            if !over {
                continue;
            }
            let Some(cache) = weak.upgrade() else { return };
            match cache.evict() {
                Ok(used) => tracing::debug!(used, "cache evicted"),
                Err(e) => tracing::warn!(error = %e, "cache eviction failed"),
            }
        }
    }

    /// Deletes the least recently used indexed entries until the index counts at most 90%
    /// of the bound, when it counts more than the bound. Returns (bytes freed, bytes used).
    fn evict_indexed(&self) -> (u64, u64) {
        let Some(ix) = &self.index else {
            return (0, 0);
        };
        let victims = {
            let Ok(mut st) = ix.state.lock() else {
                return (0, 0);
            };
            st.over = false;
            if st.bytes <= self.max_bytes {
                return (0, st.bytes);
            }
            let target = self.max_bytes / 10 * 9;
            let mut by_age: Vec<(u64, u64, PathBuf)> = st
                .files
                .iter()
                .map(|(p, (len, used))| (*used, *len, p.clone()))
                .collect();
            by_age.sort_unstable_by_key(|(used, _, _)| *used);
            let mut victims = Vec::new();
            for (_, len, p) in by_age {
                if st.bytes <= target {
                    break;
                }
                st.files.remove(&p);
                st.bytes -= len;
                victims.push((p, len));
            }
            victims
        };
        // Evicted plaintexts are closed here too (an open descriptor holds the disk space;
        // vmms holding one keep it until they close it, at most their descriptor LRU's worth).
        if let Ok(mut open) = self.open_plain.lock() {
            for (p, _) in &victims {
                let id = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".plain"))
                    .and_then(ChunkId::from_hex);
                if let Some(id) = id {
                    open.files.remove(&id);
                }
            }
        }
        let mut freed = 0;
        for (p, len) in victims {
            match std::fs::remove_file(&p) {
                Ok(()) => freed += len,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %p.display(), error = %e, "cannot evict"),
            }
        }
        (freed, self.used_bytes())
    }

    /// Records a hit on `p`: in the index (indexed mode), else by refreshing its mtime.
    fn hit(&self, p: &Path) {
        match &self.index {
            Some(ix) => ix.record(p, None, self.max_bytes),
            None => Self::touch(p),
        }
    }

    /// Removes a bad entry (and its index record).
    fn discard(&self, p: &Path) {
        let _ = std::fs::remove_file(p);
        if let Some(ix) = &self.index {
            ix.forget(p);
        }
    }

    /// The checked descriptor of the cached plaintext of `id`, `len` bytes (checked now if it
    /// is not open yet): its plaintext is at offset [`ChunkCache::PLAIN_OFFSET`].
    pub fn plain_file(&self, id: &ChunkId, len: u32) -> Option<Arc<File>> {
        // Segment files hold other entries: never passed on.
        if self.segments.is_some() {
            return None;
        }
        let open = |c: &Self| -> Option<Arc<File>> {
            let mut open = c.open_plain.lock().ok()?;
            open.clock += 1;
            let now = open.clock;
            let e = open.files.get_mut(id)?;
            e.used = now;
            Some(e.file.clone())
        };
        let want = PLAIN_HEADER as u64 + u64::from(len);
        let fits = |f: &File| f.metadata().is_ok_and(|m| m.len() == want);
        if let Some(f) = open(self).filter(|f| fits(f)) {
            self.hit(&self.plain_path(id));
            return Some(f);
        }
        self.get_plain(id, len)?;
        open(self).filter(|f| fits(f))
    }

    /// This cache with segments of at most `n` bytes (tests: a segment per entry).
    #[cfg(test)]
    fn with_segment_bytes(mut self, n: u64) -> Self {
        if let Some(segs) = &mut self.segments {
            segs.seg_max = n;
        }
        self
    }

    /// The file holding entry `id` (a plaintext, or stored bytes).
    #[cfg(test)]
    fn file_of(&self, id: &ChunkId, plain: bool) -> PathBuf {
        let kind = if plain { Kind::Plain } else { Kind::Stored };
        match &self.segments {
            Some(segs) => segs.get(kind, id, None).map(|h| h.path).unwrap(),
            None if plain => self.plain_path(id),
            None => self.path(id),
        }
    }

    /// Where a plaintext starts in the file of [`ChunkCache::plain_file`].
    pub const PLAIN_OFFSET: u64 = PLAIN_HEADER as u64;

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    fn plain_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(format!("{hex}.plain"))
    }

    /// Refreshes the mtime (the LRU clock) of a hit when it is older than `TOUCH_AFTER`.
    fn touch(p: &Path) {
        let stale = std::fs::metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_some_and(|age| age > TOUCH_AFTER);
        if stale {
            let _ = filetime::set_file_mtime(p, filetime::FileTime::now());
        }
    }

    /// The MAC a cached plaintext of chunk `id` must start with.
    fn plain_mac(&self, id: &ChunkId, plain: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(PLAIN_MAC_CONTEXT);
        h.update(&id.0);
        h.update(plain);
        h.finalize()
    }

    /// Keeps `file` (holding the checked plaintext of `id`, `len` bytes at `at`) open for
    /// [`ChunkCache::read_plain_at`], closing the least recently used one past
    /// [`MAX_OPEN_PLAIN`].
    fn remember(&self, id: &ChunkId, file: Arc<File>, at: u64, len: u32) {
        let Ok(mut open) = self.open_plain.lock() else {
            return;
        };
        open.clock += 1;
        let now = open.clock;
        if open.files.len() >= self.max_open && !open.files.contains_key(id) {
            if let Some(oldest) = open
                .files
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| *k)
            {
                open.files.remove(&oldest);
            }
        }
        let entry = OpenEntry {
            file,
            at,
            len,
            used: now,
        };
        open.files.insert(*id, entry);
    }

    /// The plaintext of chunk `id`, `len` bytes, if cached and authentic: the file is opened
    /// (never through a symlink), must be exactly header + `len` bytes, is read whole through
    /// that descriptor and checked against its MAC; a forged, torn or rotten file is deleted
    /// and treated as a miss. The checked descriptor is kept open, and later reads of parts of
    /// the plaintext go through it ([`ChunkCache::read_plain_at`]).
    pub fn get_plain(&self, id: &ChunkId, len: u32) -> Option<Vec<u8>> {
        if len == 0 || len > MAX_CHUNK_SIZE {
            return None;
        }
        if let Some(segs) = &self.segments {
            let hit = segs.get(Kind::Plain, id, Some(len))?;
            if hit.touch_due {
                Self::touch(&hit.path);
            }
            self.remember(id, hit.file, hit.at, len);
            return Some(hit.bytes);
        }
        let p = self.plain_path(id);
        let file = open_nofollow(&p).ok()?;
        let m = file.metadata().ok()?;
        // A length mismatch is not proof of a bad file (an image may lie about the size).
        if !m.is_file() || m.len() != PLAIN_HEADER as u64 + u64::from(len) {
            return None;
        }
        let mut bytes = vec![0u8; PLAIN_HEADER + len as usize];
        file.read_exact_at(&mut bytes, 0).ok()?;
        let mac = self.plain_mac(id, &bytes[PLAIN_HEADER..]);
        // blake3::Hash comparison is constant-time.
        if blake3::Hash::from_slice(&bytes[..PLAIN_HEADER]).ok()? != mac {
            tracing::warn!(path = %p.display(), "cached plaintext failed its MAC: removed");
            self.discard(&p);
            return None;
        }
        self.hit(&p);
        self.remember(id, Arc::new(file), PLAIN_HEADER as u64, len);
        bytes.drain(..PLAIN_HEADER);
        Some(bytes)
    }

    /// Reads `buf.len()` plaintext bytes of chunk `id` at `offset` from the descriptor checked
    /// by [`ChunkCache::get_plain`] or written by [`ChunkCache::put_plain`] in this process;
    /// `NotFound` when there is none (never checked, or closed since), an error when the
    /// plaintext is shorter than asked.
    pub fn read_plain_at(&self, id: &ChunkId, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let (file, base, len) = {
            let mut open = self
                .open_plain
                .lock()
                .map_err(|_| std::io::Error::other("open plaintext table poisoned"))?;
            open.clock += 1;
            let now = open.clock;
            match open.files.get_mut(id) {
                Some(e) => {
                    e.used = now;
                    (e.file.clone(), e.at, e.len)
                }
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "plaintext not checked by this process",
                    ))
                }
            }
        };
        if offset.saturating_add(buf.len() as u64) > u64::from(len) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "{} bytes at {offset} are past the plaintext's {len}",
                    buf.len()
                ),
            ));
        }
        file.read_exact_at(buf, base + offset)
    }

    /// Inserts the plaintext of chunk `id` (already verified by decoding) with its MAC, keeps
    /// the written file open for [`ChunkCache::read_plain_at`], then evicts if over the bound.
    pub fn put_plain(&self, id: &ChunkId, plain: &[u8]) -> Result<()> {
        let len = u32::try_from(plain.len()).map_err(|_| Error::BadChunk {
            id: id.to_hex(),
            reason: format!("a {}-byte plaintext is too large to cache", plain.len()),
        })?;
        if let Some(segs) = &self.segments {
            let (added, file, at) = segs.put(Kind::Plain, id, plain)?;
            self.remember(id, file, at, len);
            return self.added(added);
        }
        let mac = self.plain_mac(id, plain);
        let file = self.insert(id, &self.plain_path(id), &[mac.as_bytes(), plain])?;
        // The fetcher passes these descriptors on: kept read-only when possible (the same
        // inode, re-opened through this process's descriptor table).
        let file = match &self.index {
            Some(_) => reopen_readonly(&file).unwrap_or(file),
            None => file,
        };
        self.remember(id, Arc::new(file), PLAIN_HEADER as u64, len);
        Ok(())
    }

    /// The verified stored bytes of `id`, if cached.
    pub fn get(&self, id: &ChunkId) -> Option<Vec<u8>> {
        if let Some(segs) = &self.segments {
            // Checked against its MAC: written by a holder of the node key, which verified it.
            let hit = segs.get(Kind::Stored, id, None)?;
            if hit.touch_due {
                Self::touch(&hit.path);
            }
            return Some(hit.bytes);
        }
        let p = self.path(id);
        let file = open_nofollow(&p).ok()?;
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        let mut bytes = Vec::new();
        file.take(MAX_STORED_SIZE as u64 + 1)
            .read_to_end(&mut bytes)
            .ok()?;
        if bytes.len() > MAX_STORED_SIZE {
            tracing::warn!(path = %p.display(), "oversized cache entry removed");
            self.discard(&p);
            return None;
        }
        if let Err(e) = verify_stored(id, &bytes) {
            tracing::warn!(path = %p.display(), error = %e, "corrupt cache entry removed");
            self.discard(&p);
            return None;
        }
        self.hit(&p);
        Some(bytes)
    }

    /// Inserts verified stored bytes for `id` (atomically), then evicts if over the bound.
    pub fn put(&self, id: &ChunkId, stored: &[u8]) -> Result<()> {
        if let Some(segs) = &self.segments {
            let (added, _, _) = segs.put(Kind::Stored, id, stored)?;
            return self.added(added);
        }
        self.insert(id, &self.path(id), &[stored]).map(drop)
    }

    /// Writes `parts` to a temp file (0600), renames it to `p`, evicts if over the bound, and
    /// returns the written file (still open).
    fn insert(&self, id: &ChunkId, p: &Path, parts: &[&[u8]]) -> Result<File> {
        // Directories are made only when missing: a mkdir of an existing one locks its
        // parent, which every insert would then wait for.
        let parent = p.parent().unwrap_or(&self.dir);
        let tmpdir = self.dir.join("tmp");
        let prefix = format!("{}-", id.to_hex());
        let builder = || {
            let mut b = tempfile::Builder::new();
            b.prefix(&prefix)
                .permissions(Permissions::from_mode(FILE_MODE));
            b
        };
        let mut tmp = match builder().tempfile_in(&tmpdir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                mkdir_p(&tmpdir)?;
                builder().tempfile_in(&tmpdir)
            }
            other => other,
        }
        .map_err(|e| Error::io(&tmpdir, e))?;
        let mut len = 0u64;
        for part in parts {
            tmp.write_all(part).map_err(|e| Error::io(tmp.path(), e))?;
            len += part.len() as u64;
        }
        let file = match tmp.persist(p) {
            Err(e) if e.error.kind() == std::io::ErrorKind::NotFound => {
                mkdir_p(parent)?;
                e.file.persist(p)
            }
            other => other,
        }
        .map_err(|e| Error::io(p, e.error))?;
        if let Some(ix) = &self.index {
            // The evictor runs in the background; inserts never wait for it.
            ix.record(p, Some(len), self.max_bytes);
            return Ok(file);
        }
        self.added(len)?;
        Ok(file)
    }

    /// Counts `len` bytes a standalone cache added; past the bound, wakes the evictor (or
    /// evicts here when there is none).
    fn added(&self, len: u64) -> Result<()> {
        let now = self.approx_bytes.fetch_add(len, Ordering::Relaxed) + len;
        if now > self.max_bytes {
            if self.background.running.load(Ordering::Acquire) {
                // The evictor runs in the background; inserts never wait for it.
                self.background.signal();
            } else {
                self.evict()?;
            }
        }
        Ok(())
    }

    /// (path, size, mtime) of every cache file: entries (two-character subdirectories) and
    /// segments.
    fn entries(&self) -> Vec<(PathBuf, u64, SystemTime)> {
        let mut out = Vec::new();
        let Ok(top) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for sub in top.flatten() {
            let name = sub.file_name();
            if name.len() != 2 && name != "seg" {
                continue;
            }
            let Ok(files) = std::fs::read_dir(sub.path()) else {
                continue;
            };
            for f in files.flatten() {
                if let Ok(m) = f.metadata() {
                    if m.is_file() {
                        out.push((
                            f.path(),
                            m.len(),
                            m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        ));
                    }
                }
            }
        }
        out
    }

    /// Deletes least recently used chunks until the cache is at most 90% of its bound.
    /// Returns the bytes now in use.
    pub fn evict(&self) -> Result<u64> {
        if self.index.is_some() {
            self.clean_stale_tmp();
            return Ok(self.evict_indexed().1);
        }
        self.clean_stale_tmp();
        let mut entries = self.entries();
        let mut used: u64 = entries.iter().map(|(_, l, _)| l).sum();
        let target = self.max_bytes / 10 * 9;
        if used > self.max_bytes {
            entries.sort_by_key(|(_, _, t)| *t);
            for (p, len, _) in entries {
                if used <= target {
                    break;
                }
                match std::fs::remove_file(&p) {
                    Ok(()) => used -= len,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => used -= len,
                    Err(e) => return Err(Error::io(&p, e)),
                }
            }
            tracing::debug!(used, "cache evicted");
        }
        self.approx_bytes.store(used, Ordering::Relaxed);
        Ok(used)
    }

    fn clean_stale_tmp(&self) {
        let Ok(rd) = std::fs::read_dir(self.dir.join("tmp")) else {
            return;
        };
        for f in rd.flatten() {
            let old = f
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > STALE_TMP);
            if old {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_verify_and_evict() {
        // One file per entry: the layout of an indexed cache.
        let d = tempfile::tempdir().unwrap();
        let c = ChunkCache::open_indexed(d.path(), 10_000, None).unwrap();
        let mut ids = Vec::new();
        for i in 0..30u8 {
            let data = vec![i; 1000];
            let id = ChunkId::of(&data);
            c.put(&id, &data).unwrap();
            let p = c.path(&id);
            // Make older inserts look older so eviction order is deterministic.
            filetime::set_file_mtime(
                &p,
                filetime::FileTime::from_unix_time(1_000_000 + i as i64, 0),
            )
            .unwrap();
            ids.push(id);
        }
        let used = c.evict().unwrap();
        assert!(used <= 10_000, "{used}");
        assert!(c.get(&ids[29]).is_some());
        assert!(c.get(&ids[0]).is_none());
        // A corrupt entry is never served and is removed.
        let p = c.path(&ids[29]);
        std::fs::write(&p, b"bad").unwrap();
        assert!(c.get(&ids[29]).is_none());
        assert!(!p.exists());
    }

    #[test]
    fn indexed_cache_evicts_in_the_background_only() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cache");
        let c = Arc::new(ChunkCache::open_indexed(&dir, 10_000, None).unwrap());
        let ids: Vec<ChunkId> = (0..30u8)
            .map(|i| {
                let data = vec![i; 1000];
                let id = ChunkId::of(&data);
                c.put(&id, &data).unwrap();
                id
            })
            .collect();
        // Inserts never evict: everything is there, counted by the index.
        assert_eq!(c.used_bytes(), 30_000);
        assert_eq!(c.indexed_entries(), 30);
        assert!(ids.iter().all(|id| c.path(id).exists()));
        // A hit makes the oldest entry the most recently used.
        assert!(c.get(&ids[0]).is_some());
        c.start_evictor().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while c.used_bytes() > 10_000 {
            assert!(std::time::Instant::now() < deadline, "not evicted");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(c.used_bytes() <= 9_000);
        // The index drops the victims before their files are deleted.
        let on_disk = || ids.iter().filter(|id| c.path(id).exists()).count();
        eventually("the evicted files deleted", || {
            on_disk() == c.indexed_entries()
        });
        let on_disk = on_disk();
        assert!(c.path(&ids[0]).exists(), "the recently used entry stays");
        assert!(!c.path(&ids[1]).exists(), "the least recently used goes");
        // A new instance indexes what is there, once.
        let again = ChunkCache::open_indexed(&dir, 10_000, None).unwrap();
        assert_eq!(again.indexed_entries(), on_disk);
        assert_eq!(again.used_bytes(), on_disk as u64 * 1000);
    }

    /// Files in the cache directory (in the two-character subdirectories and `seg`).
    fn on_disk(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().len() == 2 || e.file_name() == "seg")
            .map(|e| std::fs::read_dir(e.path()).unwrap().count())
            .sum()
    }

    /// Waits (at most 30 s) for `done`.
    fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `n` chunks of 1000 bytes put into the cache at `dir`, a segment each, the first the
    /// least recently used: their segments' paths.
    fn fill(dir: &Path, n: u16) -> Vec<PathBuf> {
        let filler = ChunkCache::open(dir, 1 << 30)
            .unwrap()
            .with_segment_bytes(1);
        (0..n)
            .map(|i| {
                let data: Vec<u8> = i.to_le_bytes().iter().copied().cycle().take(1000).collect();
                let id = ChunkId::of(&data);
                filler.put(&id, &data).unwrap();
                let p = filler.file_of(&id, false);
                filetime::set_file_mtime(
                    &p,
                    filetime::FileTime::from_unix_time(1_000_000 + i64::from(i), 0),
                )
                .unwrap();
                p
            })
            .collect()
    }

    #[test]
    fn a_standalone_cache_opens_without_reading_its_directory() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cache");
        let files = fill(&dir, 500);
        let c = Arc::new(ChunkCache::open(&dir, 100_000).unwrap());
        // A VM start opens the cache: nothing of it is read (the size is not known yet), and
        // nothing is evicted.
        assert_eq!(c.used_bytes(), 0, "opening the cache scanned it");
        assert_eq!(on_disk(&dir), 500);
        // Its evictor measures it in the background and evicts the least recently used.
        c.start_evictor().unwrap();
        eventually("evicted down to 90% of the bound", || on_disk(&dir) <= 90);
        assert!(c.used_bytes() <= 90_000, "{}", c.used_bytes());
        assert!(files[499].exists(), "the most recently used stays");
        assert!(!files[0].exists(), "the least recently used goes");
    }

    #[test]
    fn inserts_past_the_bound_leave_eviction_to_the_background() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cache");
        let c = Arc::new(ChunkCache::open(&dir, 10_000).unwrap());
        // The evictor is held at its start until the inserts are done.
        let (go, held) = std::sync::mpsc::channel::<()>();
        let held = Mutex::new(held);
        let start: crate::ThreadStart = Arc::new(move || {
            let _ = held.lock().map(|h| h.recv());
            Ok(())
        });
        c.start_evictor_with(Some(start)).unwrap();
        // A segment each (a segment is at most a 32nd of the bound).
        let files: Vec<PathBuf> = (0..30u8)
            .map(|i| {
                let data = vec![i; 1000];
                let id = ChunkId::of(&data);
                c.put(&id, &data).unwrap();
                let p = c.file_of(&id, false);
                filetime::set_file_mtime(
                    &p,
                    filetime::FileTime::from_unix_time(1_000_000 + i64::from(i), 0),
                )
                .unwrap();
                p
            })
            .collect();
        // Three times the bound inserted, nothing evicted by the inserts themselves.
        assert_eq!(on_disk(&dir), 30);
        assert!(!c.measured());
        go.send(()).unwrap();
        eventually("evicted in the background", || on_disk(&dir) <= 9);
        assert!(c.used_bytes() <= 9_000, "{}", c.used_bytes());
        assert!(files[29].exists() && !files[0].exists());
        // One cache object per directory in a process: a second open shares the first.
        let shared = ChunkCache::shared(&dir, 1, None).unwrap();
        assert!(Arc::ptr_eq(
            &shared,
            &ChunkCache::shared(&dir, 2, None).unwrap()
        ));
    }

    #[test]
    fn half_written_temp_is_invisible() {
        let d = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(d.path(), 1 << 20).unwrap();
        let id = ChunkId::of(b"abc");
        std::fs::write(
            d.path().join("tmp").join(format!("{}-x", id.to_hex())),
            b"ab",
        )
        .unwrap();
        assert!(c.get(&id).is_none());
    }

    #[test]
    fn concurrent_instances_share_and_evict_safely() {
        let d = tempfile::tempdir().unwrap();
        let chunks: Vec<(ChunkId, Vec<u8>)> = (0..64u8)
            .map(|i| {
                let data = vec![i; 4000 + i as usize];
                (ChunkId::of(&data), data)
            })
            .collect();
        let chunks = std::sync::Arc::new(chunks);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let dir = d.path().to_path_buf();
                let chunks = chunks.clone();
                std::thread::spawn(move || {
                    // Each thread has its own instance, like separate processes would.
                    let c = ChunkCache::open(&dir, 60_000).unwrap();
                    for round in 0..200usize {
                        let (id, data) = &chunks[(round * 7 + t * 13) % chunks.len()];
                        match c.get(id) {
                            Some(b) => assert_eq!(&b, data),
                            None => c.put(id, data).unwrap(),
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let c = ChunkCache::open(d.path(), 60_000).unwrap();
        assert!(c.evict().unwrap() <= 60_000);
    }

    /// A `.plain` file as the old format wrote it: blake3(plaintext), then the plaintext,
    /// internally consistent.
    fn forged_plain(plain: &[u8]) -> Vec<u8> {
        let mut f = blake3::hash(plain).as_bytes().to_vec();
        f.extend_from_slice(plain);
        f
    }

    #[test]
    fn poisoned_plaintext_is_not_served() {
        // The file layout of an indexed cache (segments: `segment_*` tests).
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cache");
        let good = vec![1u8; 5000];
        let id = ChunkId::of(b"stored bytes of the good chunk");
        ChunkCache::open_indexed(&dir, 1 << 20, None)
            .unwrap()
            .put_plain(&id, &good)
            .unwrap();
        // Someone who can write the cache (not read the key) replaces the plaintext with other
        // content of the same length and a consistent hash.
        let evil = vec![2u8; 5000];
        let c = ChunkCache::open_indexed(&dir, 1 << 20, None).unwrap();
        let p = c.plain_path(&id);
        std::fs::write(&p, forged_plain(&evil)).unwrap();
        assert_eq!(c.get_plain(&id, 5000), None);
        assert!(!p.exists(), "a forged plaintext is removed");
        let mut buf = [0u8; 10];
        let e = c.read_plain_at(&id, 0, &mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        // A plaintext MACed under another node's key is refused as well.
        let other = tempfile::tempdir().unwrap();
        let o = ChunkCache::open_indexed(&other.path().join("cache"), 1 << 20, None).unwrap();
        std::fs::write(&p, [o.plain_mac(&id, &evil).as_bytes(), &evil[..]].concat()).unwrap();
        assert_eq!(c.get_plain(&id, 5000), None);
        // The genuine one (same key file, another instance) is served.
        ChunkCache::open_indexed(&dir, 1 << 20, None)
            .unwrap()
            .put_plain(&id, &good)
            .unwrap();
        assert_eq!(c.get_plain(&id, 5000), Some(good));
        // A size the caller does not expect is a miss (the file is kept).
        assert_eq!(c.get_plain(&id, 4999), None);
        assert!(p.exists());
    }

    #[test]
    fn a_file_replaced_after_its_check_is_not_served() {
        // The file layout of an indexed cache (segments: `segment_*` tests).
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cache");
        let good: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
        let id = ChunkId::of(b"stored");
        ChunkCache::open_indexed(&dir, 1 << 30, None)
            .unwrap()
            .put_plain(&id, &good)
            .unwrap();
        let c = ChunkCache::open_indexed(&dir, 1 << 30, None).unwrap();
        assert_eq!(c.get_plain(&id, 70_000).as_deref(), Some(&good[..]));
        // Replaced by rename (what a cache writer can do) after the check.
        let evil = vec![0xeeu8; 70_000];
        let p = c.plain_path(&id);
        let staged = dir.join("tmp").join("evil");
        std::fs::write(&staged, forged_plain(&evil)).unwrap();
        std::fs::rename(&staged, &p).unwrap();
        let mut buf = vec![0u8; 4096];
        c.read_plain_at(&id, 60_000, &mut buf).unwrap();
        assert_eq!(buf, good[60_000..64_096]);
        // Even once the file is gone, the checked descriptor serves.
        std::fs::remove_file(&p).unwrap();
        c.read_plain_at(&id, 0, &mut buf).unwrap();
        assert_eq!(buf, good[..4096]);
        // Past the end is an error, not short data.
        assert!(c.read_plain_at(&id, 69_000, &mut buf).is_err());
        // A writer's own fresh plaintext is served from the descriptor it wrote.
        let w = ChunkCache::open_indexed(&dir, 1 << 30, None).unwrap();
        let id2 = ChunkId::of(b"other");
        w.put_plain(&id2, &good).unwrap();
        std::fs::write(&staged, forged_plain(&evil)).unwrap();
        std::fs::rename(&staged, w.plain_path(&id2)).unwrap();
        w.read_plain_at(&id2, 100, &mut buf).unwrap();
        assert_eq!(buf, good[100..4196]);
    }

    #[test]
    fn open_descriptors_are_bounded() {
        let d = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(&d.path().join("cache"), 1 << 30).unwrap();
        let ids: Vec<ChunkId> = (0..MAX_OPEN_PLAIN as u32 + 20)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect();
        for id in &ids {
            c.put_plain(id, b"x").unwrap();
        }
        assert_eq!(c.open_plain.lock().unwrap().files.len(), MAX_OPEN_PLAIN);
        // The oldest were closed; the newest are open.
        let mut b = [0u8; 1];
        assert!(c.read_plain_at(&ids[0], 0, &mut b).is_err());
        assert!(c.read_plain_at(&ids[ids.len() - 1], 0, &mut b).is_ok());
        // A closed one is checked again on its next use.
        assert_eq!(c.get_plain(&ids[0], 1), Some(b"x".to_vec()));
        assert!(c.read_plain_at(&ids[0], 0, &mut b).is_ok());
    }

    #[test]
    fn modes_do_not_depend_on_the_umask_and_bad_keys_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("a").join("cache");
        // SAFETY: umask only changes the process file-creation mask; restored below.
        let old = unsafe { libc::umask(0) };
        let c = ChunkCache::open(&dir, 1 << 20);
        let put = c.as_ref().map(|c| {
            c.put(&ChunkId::of(b"s"), b"s").unwrap();
            c.put_plain(&ChunkId::of(b"p"), b"p").unwrap();
        });
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        put.unwrap();
        let c = c.unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for p in [d.path().join("a"), dir.clone(), dir.join("tmp")] {
            assert_eq!(mode(&p), 0o700, "{}", p.display());
        }
        let s = c.file_of(&ChunkId::of(b"s"), false);
        assert_eq!(mode(s.parent().unwrap()), 0o700);
        for p in [
            s,
            c.file_of(&ChunkId::of(b"p"), true),
            d.path().join("a/cache.key"),
        ] {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
        // A key file others can read is refused by name...
        let key = d.path().join("a/cache.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ChunkCache::open_with_key(&dir, 1 << 20, &key)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("cache.key") && e.contains("unusable cache key"),
            "{e}"
        );
        // ...and `open` falls back to a process key: its own plaintexts still serve it, the
        // ones made under the node key do not.
        let c2 = ChunkCache::open(&dir, 1 << 20).unwrap();
        assert_eq!(c2.get_plain(&ChunkId::of(b"p"), 1), None);
        c2.put_plain(&ChunkId::of(b"q"), b"q").unwrap();
        assert_eq!(c2.get_plain(&ChunkId::of(b"q"), 1), Some(b"q".to_vec()));
    }

    #[test]
    fn planted_fifos_and_symlinks_are_misses_not_hangs() {
        // The file layout of an indexed cache (segments: `segment_*` tests).
        let d = tempfile::tempdir().unwrap();
        let c = ChunkCache::open_indexed(&d.path().join("cache"), 1 << 20, None).unwrap();
        let (a, b) = (ChunkId::of(b"a"), ChunkId::of(b"b"));
        for p in [c.plain_path(&a), c.path(&a)] {
            mkdir_p(p.parent().unwrap()).unwrap();
            let fifo = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        }
        assert_eq!(c.get_plain(&a, 1), None);
        assert_eq!(c.get(&a), None);
        // A symlink, even to a genuine plaintext moved elsewhere, is not followed.
        let fresh = ChunkCache::open_indexed(&d.path().join("cache"), 1 << 20, None).unwrap();
        fresh.put_plain(&b, b"b").unwrap();
        let moved = d.path().join("cache/tmp/moved");
        std::fs::rename(fresh.plain_path(&b), &moved).unwrap();
        std::os::unix::fs::symlink(&moved, c.plain_path(&b)).unwrap();
        assert_eq!(c.get_plain(&b, 1), None);
        std::fs::remove_file(c.plain_path(&b)).unwrap();
        std::fs::rename(&moved, c.plain_path(&b)).unwrap();
        assert_eq!(c.get_plain(&b, 1), Some(b"b".to_vec()));
    }

    /// The segment files of the cache at `dir`, oldest first.
    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("seg"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// A standalone cache at `dir` with two 5000-byte plaintexts, `a` (all 1s) then `b` (all 2s).
    fn two_plains(dir: &Path) -> (ChunkCache, ChunkId, ChunkId) {
        let (a, b) = (ChunkId::of(b"a"), ChunkId::of(b"b"));
        let w = ChunkCache::open(dir, 1 << 30).unwrap();
        w.put_plain(&a, &[1u8; 5000]).unwrap();
        w.put_plain(&b, &[2u8; 5000]).unwrap();
        (w, a, b)
    }

    /// Where the bytes of entry `id` start in segment file `seg`.
    fn entry_at(seg: &Path, id: &ChunkId) -> usize {
        let bytes = std::fs::read(seg).unwrap();
        let at = bytes.windows(32).position(|w| w == id.0).unwrap();
        at + 32 + 32
    }

    #[test]
    fn segment_entries_are_appended_and_served_to_other_instances() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cache");
        let c = ChunkCache::open(&dir, 1 << 30).unwrap();
        let plains: Vec<(ChunkId, Vec<u8>)> = (0..50u32)
            .map(|i| {
                let data: Vec<u8> = (0..32_768u32).map(|j| (i * 7 + j) as u8).collect();
                (ChunkId::of(&i.to_le_bytes()), data)
            })
            .collect();
        for (id, data) in &plains {
            c.put_plain(id, data).unwrap();
        }
        let stored = b"stored bytes".to_vec();
        let sid = ChunkId::of(&stored);
        c.put(&sid, &stored).unwrap();
        // One file for all of them: appends, not new inodes.
        let segs = segment_files(&dir);
        assert_eq!(segs.len(), 1, "{segs:?}");
        assert_eq!(on_disk(&dir), 1);
        let len = std::fs::metadata(&segs[0]).unwrap().len();
        assert_eq!(len, 51 * segments::HEADER as u64 + 50 * 32_768 + 12);
        // The writer reads its own through the descriptor it wrote.
        let mut buf = [0u8; 100];
        c.read_plain_at(&plains[3].0, 1000, &mut buf).unwrap();
        assert_eq!(buf[..], plains[3].1[1000..1100]);
        assert!(c.read_plain_at(&plains[3].0, 32_700, &mut buf).is_err());
        // Another instance (another process) finds them by scanning the headers.
        let other = ChunkCache::open(&dir, 1 << 30).unwrap();
        for (id, data) in plains.iter().rev() {
            assert_eq!(other.get_plain(id, 32_768).as_ref(), Some(data));
        }
        assert_eq!(other.get(&sid), Some(stored.clone()));
        other.read_plain_at(&plains[7].0, 5, &mut buf).unwrap();
        assert_eq!(buf[..], plains[7].1[5..105]);
        // A plaintext is not served as stored bytes, nor at another length.
        assert_eq!(other.get(&plains[0].0), None);
        assert_eq!(other.get_plain(&plains[0].0, 32_767), None);
        assert_eq!(other.get_plain(&sid, 12), None);
    }

    #[test]
    fn segment_torn_tail_is_a_miss_and_the_next_writer_starts_a_new_file() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cache");
        let (w, a, b) = two_plains(&dir);
        drop(w);
        // A crash mid-append: the second entry is cut short, then cut inside its header.
        let seg = &segment_files(&dir)[0];
        let full = std::fs::metadata(seg).unwrap().len();
        for cut in [full - 1, full - 4000, full - 5000 - 40] {
            let f = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
            f.set_len(cut).unwrap();
            let c = ChunkCache::open(&dir, 1 << 30).unwrap();
            assert_eq!(c.get_plain(&a, 5000), Some(vec![1u8; 5000]), "cut at {cut}");
            assert_eq!(c.get_plain(&b, 5000), None, "cut at {cut}");
        }
        // A torn tail full of zeros (a power cut: size kept, data lost) fails its check.
        let f = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
        f.set_len(full).unwrap();
        let c = ChunkCache::open(&dir, 1 << 30).unwrap();
        assert_eq!(c.get_plain(&b, 5000), None);
        // The next writer appends to a file of its own; both are served afterwards.
        c.put_plain(&b, &[2u8; 5000]).unwrap();
        assert_eq!(segment_files(&dir).len(), 2);
        let fresh = ChunkCache::open(&dir, 1 << 30).unwrap();
        assert_eq!(fresh.get_plain(&a, 5000), Some(vec![1u8; 5000]));
        assert_eq!(fresh.get_plain(&b, 5000), Some(vec![2u8; 5000]));
    }

    #[test]
    fn segment_poisoned_entries_are_not_served() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cache");
        let (_w, a, b) = two_plains(&dir);
        let seg = segment_files(&dir)[0].clone();
        // One byte of a's plaintext changed in place (rot, or a writer of the file).
        let mut bytes = std::fs::read(&seg).unwrap();
        let at = entry_at(&seg, &a);
        bytes[at + 10] ^= 1;
        std::fs::write(&seg, &bytes).unwrap();
        let c = ChunkCache::open(&dir, 1 << 30).unwrap();
        assert_eq!(c.get_plain(&a, 5000), None);
        assert_eq!(c.get_plain(&b, 5000), Some(vec![2u8; 5000]));
        // A planted segment of consistent entries MACed under another key (or a plain hash,
        // as the old format trusted) is not served either.
        let other = tempfile::tempdir().unwrap();
        let o = ChunkCache::open(&other.path().join("cache"), 1 << 30).unwrap();
        let evil = ChunkId::of(b"evil");
        o.put_plain(&evil, &[6u8; 100]).unwrap();
        let mut forged = std::fs::read(&segment_files(&other.path().join("cache"))[0]).unwrap();
        std::fs::write(dir.join("seg/0-planted.seg"), &forged).unwrap();
        let hash = blake3::hash(&[6u8; 100]);
        forged[48..80].copy_from_slice(hash.as_bytes());
        std::fs::write(dir.join("seg/1-planted.seg"), &forged).unwrap();
        let c = ChunkCache::open(&dir, 1 << 30).unwrap();
        assert_eq!(c.get_plain(&evil, 100), None);
        assert_eq!(c.get_plain(&b, 5000), Some(vec![2u8; 5000]));
        // The genuine one, fetched and put again after the miss, is served (its new entry
        // replaces the bad one in the index; another process may meet the bad one first: a
        // miss again, never the bad bytes).
        c.put_plain(&a, &[1u8; 5000]).unwrap();
        assert_eq!(c.get_plain(&a, 5000), Some(vec![1u8; 5000]));
        let fresh = ChunkCache::open(&dir, 1 << 30).unwrap();
        let got = fresh.get_plain(&a, 5000);
        assert!(got.is_none() || got == Some(vec![1u8; 5000]));
    }

    #[test]
    fn segment_hostile_files_are_bounded_misses() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cache");
        let good = ChunkId::of(b"good");
        let w = ChunkCache::open(&dir, 1 << 30).unwrap();
        w.put_plain(&good, &[3u8; 1000]).unwrap();
        let seg = dir.join("seg");
        let header = |len: u32, id: &ChunkId| {
            let mut h = b"FCS1\x01\0\0\0".to_vec();
            h.extend_from_slice(&len.to_le_bytes());
            h.extend_from_slice(&[0; 4]);
            h.extend_from_slice(&id.0);
            h.extend_from_slice(&[0; 32]);
            h
        };
        let (huge, big, junk) = (ChunkId::of(b"huge"), ChunkId::of(b"big"), ChunkId::of(b"j"));
        // A length past any entry's, one that runs past the file, garbage, an empty file.
        std::fs::write(seg.join("a.seg"), header(u32::MAX, &huge)).unwrap();
        let mut f = header(segments::MAX_ENTRY as u32, &big);
        f.extend_from_slice(&[0; 100]);
        std::fs::write(seg.join("b.seg"), f).unwrap();
        let mut f = header(10, &junk);
        f[4] = 9;
        f.extend_from_slice(&[0; 10]);
        std::fs::write(seg.join("c.seg"), f).unwrap();
        std::fs::write(seg.join("d.seg"), b"").unwrap();
        std::fs::write(seg.join("e.seg"), vec![0xffu8; 70_000]).unwrap();
        // A FIFO, a directory and a symlink to a genuine segment moved away.
        let fifo = std::ffi::CString::new(seg.join("f.seg").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::fs::create_dir(seg.join("g.seg")).unwrap();
        let genuine = segment_files(&dir)
            .into_iter()
            .find(|p| p.to_string_lossy().ends_with("-0.seg"))
            .unwrap();
        let moved = dir.join("tmp/moved");
        std::fs::rename(&genuine, &moved).unwrap();
        std::os::unix::fs::symlink(&moved, seg.join("h.seg")).unwrap();
        let c = ChunkCache::open(&dir, 1 << 30).unwrap();
        assert_eq!(c.get_plain(&huge, 1000), None);
        assert_eq!(c.get_plain(&big, 1000), None);
        assert_eq!(c.get_plain(&junk, 10), None);
        assert_eq!(c.get_plain(&good, 1000), None, "a symlink is not followed");
        assert_eq!(c.segments.as_ref().unwrap().entries(), 0);
        // Moved back, the genuine segment serves (the rest stays ignored).
        std::fs::rename(&moved, &genuine).unwrap();
        let c = ChunkCache::open(&dir, 1 << 30).unwrap();
        assert_eq!(c.get_plain(&good, 1000), Some(vec![3u8; 1000]));
        assert_eq!(c.segments.as_ref().unwrap().entries(), 1);
    }

    #[test]
    fn segment_eviction_is_by_whole_oldest_segments() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cache");
        // 32 KiB segments: 3 entries of 10,000 bytes each (the writer's bound is larger: its
        // inserts do not evict).
        let c = ChunkCache::open(&dir, 1 << 30)
            .unwrap()
            .with_segment_bytes(32 << 10);
        let ids: Vec<ChunkId> = (0..120u32).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
        for (i, id) in ids.iter().enumerate() {
            c.put_plain(id, &vec![i as u8; 10_000]).unwrap();
        }
        let segs = segment_files(&dir);
        assert_eq!(segs.len(), 40);
        for (i, s) in segs.iter().enumerate() {
            let t = filetime::FileTime::from_unix_time(1_000_000 + i as i64, 0);
            filetime::set_file_mtime(s, t).unwrap();
        }
        // 1.2 MB in a 1 MiB cache: whole oldest segments go, down to 90% of the bound.
        let used = ChunkCache::open(&dir, 1 << 20).unwrap().evict().unwrap();
        assert!(used <= (1 << 20) / 10 * 9, "{used}");
        let left = segment_files(&dir);
        assert!(left.len() < 40 && left.len() >= 30, "{}", left.len());
        assert_eq!(left[..], segs[40 - left.len()..], "the oldest went");
        let fresh = ChunkCache::open(&dir, 1 << 20).unwrap();
        let gone = 3 * (40 - left.len());
        assert_eq!(fresh.get_plain(&ids[gone - 1], 10_000), None);
        assert_eq!(
            fresh.get_plain(&ids[gone], 10_000),
            Some(vec![gone as u8; 10_000])
        );
        // The writer's own segment went too (evicted by another process): its next entry
        // goes to a new file, which others find.
        for s in &left {
            std::fs::remove_file(s).unwrap();
        }
        let late = ChunkId::of(b"late");
        c.put_plain(&late, &[9u8; 100]).unwrap();
        assert_eq!(segment_files(&dir).len(), 1);
        std::thread::sleep(segments::REFRESH_EVERY);
        assert_eq!(fresh.get_plain(&late, 100), Some(vec![9u8; 100]));
        // ...and the gone segments left its index.
        assert_eq!(fresh.get_plain(&ids[119], 10_000), None);
        assert_eq!(fresh.segments.as_ref().unwrap().entries(), 1);
    }

    #[test]
    fn segment_two_instances_share_a_directory() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cache");
        let a = ChunkCache::open(&dir, 1 << 30).unwrap();
        let b = ChunkCache::open(&dir, 1 << 30).unwrap();
        let (x, y) = (ChunkId::of(b"x"), ChunkId::of(b"y"));
        assert_eq!(b.get_plain(&x, 10), None);
        a.put_plain(&x, &[1u8; 10]).unwrap();
        b.put_plain(&y, &[2u8; 10]).unwrap();
        // Each appends to a file of its own; each finds the other's entries (a miss scans
        // again at most every REFRESH_EVERY).
        assert_eq!(segment_files(&dir).len(), 2);
        std::thread::sleep(segments::REFRESH_EVERY);
        assert_eq!(b.get_plain(&x, 10), Some(vec![1u8; 10]));
        assert_eq!(a.get_plain(&y, 10), Some(vec![2u8; 10]));
        // Many threads, an instance each, writing and reading the same entries at once.
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let c = ChunkCache::open(&dir, 1 << 30).unwrap();
                    for round in 0..300u32 {
                        let n = (round * 7 + t * 13) % 50;
                        let id = ChunkId::of(&n.to_le_bytes());
                        let data = vec![n as u8; 3000 + n as usize];
                        match c.get_plain(&id, data.len() as u32) {
                            Some(got) => assert_eq!(got, data),
                            None => c.put_plain(&id, &data).unwrap(),
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let c = ChunkCache::open(&dir, 1 << 30).unwrap();
        for n in 0..50u32 {
            let id = ChunkId::of(&n.to_le_bytes());
            let data = vec![n as u8; 3000 + n as usize];
            assert_eq!(c.get_plain(&id, data.len() as u32), Some(data));
        }
    }
}
