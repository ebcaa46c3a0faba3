//! The entries of a standalone cache (see the parent module): append-only segment files in
//! `<dir>/seg/`, so that caching a block is an append to an open file, not a new inode.
//!
//! Each process appends only to segment files it created itself (`O_EXCL`, mode 0600, named
//! `<creation time in ns, hex>-<pid>-<n>.seg`), one at a time, and starts a new one when the
//! current one would pass `seg_max` bytes (an entry larger than that fills a
//! segment of its own) or was deleted under it (eviction by another process). An entry is a
//! fixed header ([`HEADER`] bytes: magic, kind, length, chunk id, then a keyed blake3 MAC
//! under the node key over kind, length, id and bytes) followed by its bytes. Entries are
//! never changed once written.
//!
//! A process knows the entries it wrote; others' are found by a scan of the segments'
//! headers ([`Segments::refresh`]: on a miss, at most every [`REFRESH_EVERY`], only the bytes
//! appended since the last scan of each file). The scan trusts nothing: a header with a bad
//! magic, kind or a length past [`MAX_ENTRY`] ends the scan of that file for good; an entry
//! that runs past the end of its file (a torn tail after a crash, or an append in progress)
//! ends it for now. What is indexed is bounded ([`MAX_SEGMENTS`] files open,
//! [`MAX_ENTRIES`] entries). Every hit reads the header and bytes through the descriptor the
//! segment was scanned on and checks them against the MAC, so a torn, rotten or forged entry
//! is a miss (dropped from this process's index), never served. Segments not owned by this
//! user are not read (a planted file).
//!
//! Eviction is by whole segments (the parent's evictor deletes the least recently used
//! files; a hit refreshes its segment's mtime); a segment deleted by anyone is dropped from
//! the index at the next scan (its descriptor keeps serving checked reads until then).

use crate::chunk::{ChunkId, MAX_CHUNK_SIZE, MAX_STORED_SIZE};
use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Entry header: magic (4), kind (1), zero (3), length (4, LE), zero (4), id (32), MAC (32).
pub const HEADER: usize = 80;
const MAGIC: &[u8; 4] = b"FCS1";
/// Largest entry bytes a header may announce.
pub const MAX_ENTRY: usize = if MAX_STORED_SIZE > MAX_CHUNK_SIZE as usize {
    MAX_STORED_SIZE
} else {
    MAX_CHUNK_SIZE as usize
};
/// Most segment files a process keeps open (others are not indexed).
pub const MAX_SEGMENTS: usize = 512;
/// Most entries a process indexes (about 100 bytes of memory each).
pub const MAX_ENTRIES: usize = 1 << 18;
/// A hit refreshes its segment's mtime at most this often (eviction needs the order of
/// segments, not of single hits).
pub const TOUCH_EVERY: Duration = Duration::from_secs(1);
/// A miss scans for other processes' new entries at most this often.
pub const REFRESH_EVERY: Duration = Duration::from_millis(100);
/// Largest segment file (before the next is started).
const MAX_SEGMENT_BYTES: u64 = 1 << 30;
/// Domain separation for the entry MAC.
const MAC_CONTEXT: &[u8] = b"flist-fs cache segment entry v1\0";

/// What an entry holds.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Kind {
    /// The plaintext of an unencrypted chunk or block.
    Plain = 1,
    /// The stored bytes of a chunk (or of an encrypted block, named by its hash).
    Stored = 2,
}

/// A checked entry: its bytes and where they are (the descriptor they were checked on, the
/// offset of the bytes in it, the segment's path).
pub struct Hit {
    pub bytes: Vec<u8>,
    pub file: Arc<File>,
    pub at: u64,
    pub path: PathBuf,
    /// The segment's last use should be refreshed (its mtime, which eviction reads): at most
    /// once per [`TOUCH_EVERY`] per segment, not on every hit.
    pub touch_due: bool,
}

/// Where an indexed entry's header is.
#[derive(Clone, Copy)]
struct Loc {
    seg: u32,
    at: u64,
    len: u32,
}

struct Seg {
    name: OsString,
    file: Arc<File>,
    /// Scanned up to here (`u64::MAX`: ended by a bad header).
    scanned: u64,
    /// When this process last refreshed the segment's mtime.
    touched: Option<Instant>,
}

#[derive(Default)]
struct State {
    segs: HashMap<u32, Seg>,
    by_name: HashMap<OsString, u32>,
    next: u32,
    index: HashMap<(Kind, ChunkId), Loc>,
    last_refresh: Option<Instant>,
}

/// This process's segment being appended to.
struct Own {
    seg: u32,
    file: Arc<File>,
    path: PathBuf,
    len: u64,
}

pub struct Segments {
    dir: PathBuf,
    /// Largest segment (but an entry larger than this fills one of its own).
    pub(super) seg_max: u64,
    key: [u8; 32],
    state: Mutex<State>,
    own: Mutex<Option<Own>>,
}

/// The MAC of an entry.
fn mac(key: &[u8; 32], kind: Kind, id: &ChunkId, bytes: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(MAC_CONTEXT);
    h.update(&[kind as u8]);
    h.update(&(bytes.len() as u32).to_le_bytes());
    h.update(&id.0);
    h.update(bytes);
    h.finalize()
}

/// A parsed header: kind, length, id (the MAC is checked on a hit).
fn parse(h: &[u8; HEADER]) -> Option<(Kind, u32, ChunkId)> {
    if &h[..4] != MAGIC || h[5..8] != [0; 3] || h[12..16] != [0; 4] {
        return None;
    }
    let kind = match h[4] {
        1 => Kind::Plain,
        2 => Kind::Stored,
        _ => return None,
    };
    let len = u32::from_le_bytes(h[8..12].try_into().ok()?);
    if len as usize > MAX_ENTRY {
        return None;
    }
    Some((kind, len, ChunkId(h[16..48].try_into().ok()?)))
}

impl Segments {
    /// The segments of the cache at `cache_dir` (nothing is read or made here), bounded to
    /// `max_bytes` in all: a segment is at most a 32nd of that.
    pub fn new(cache_dir: &Path, max_bytes: u64, key: [u8; 32]) -> Self {
        Segments {
            dir: cache_dir.join("seg"),
            seg_max: (max_bytes / 32).clamp(1, MAX_SEGMENT_BYTES),
            key,
            state: Mutex::default(),
            own: Mutex::default(),
        }
    }

    /// Appends an entry; returns the bytes appended and where the entry's bytes are (the
    /// written segment's descriptor, their offset in it).
    pub fn put(&self, kind: Kind, id: &ChunkId, bytes: &[u8]) -> Result<(u64, Arc<File>, u64)> {
        if bytes.len() > MAX_ENTRY {
            return Err(Error::BadChunk {
                id: id.to_hex(),
                reason: format!("{} bytes: too large to cache", bytes.len()),
            });
        }
        let mut entry = Vec::with_capacity(HEADER + bytes.len());
        entry.extend_from_slice(MAGIC);
        entry.extend_from_slice(&[kind as u8, 0, 0, 0]);
        entry.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        entry.extend_from_slice(&[0; 4]);
        entry.extend_from_slice(&id.0);
        entry.extend_from_slice(mac(&self.key, kind, id, bytes).as_bytes());
        entry.extend_from_slice(bytes);
        let total = entry.len() as u64;
        let mut own = self.own.lock().map_err(|_| self.poisoned())?;
        // A new segment when there is none, this one is full, or it was deleted (evicted).
        let roll = own.as_ref().is_none_or(|o| {
            (o.len > 0 && o.len + total > self.seg_max)
                || o.file.metadata().map_or(true, |m| m.nlink() == 0)
        });
        if roll {
            *own = Some(self.create()?);
        }
        let Some(o) = own.as_mut() else {
            return Err(self.poisoned());
        };
        let at = o.len;
        if let Err(e) = o.file.write_all_at(&entry, at) {
            // A partial entry is a torn tail: never indexed; the next put starts a new file.
            let path = o.path.clone();
            *own = None;
            return Err(Error::io(path, e));
        }
        o.len += total;
        let (seg, file) = (o.seg, o.file.clone());
        drop(own);
        if let Ok(mut st) = self.state.lock() {
            if let Some(s) = st.segs.get_mut(&seg) {
                s.scanned = s.scanned.max(at + total);
            }
            if st.index.len() < MAX_ENTRIES {
                let len = bytes.len() as u32;
                st.index.insert((kind, *id), Loc { seg, at, len });
            }
        }
        Ok((total, file, at + HEADER as u64))
    }

    fn poisoned(&self) -> Error {
        Error::BadPath {
            path: self.dir.display().to_string(),
            reason: "the cache's segment table is poisoned".into(),
        }
    }

    /// Creates a new segment of this process (`O_EXCL`, 0600) and registers it.
    fn create(&self) -> Result<Own> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mut made = None;
        for n in 0..16u32 {
            let name = format!("{nanos:024x}-{}-{n}.seg", std::process::id());
            let path = self.dir.join(&name);
            let open = || {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&path)
            };
            let opened = match open() {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    super::mkdir_p(&self.dir)?;
                    open()
                }
                other => other,
            };
            match opened {
                Ok(f) => {
                    made = Some((name, path, f));
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        let Some((name, path, file)) = made else {
            return Err(Error::BadPath {
                path: self.dir.display().to_string(),
                reason: "no free segment name".into(),
            });
        };
        // The mode whatever the umask.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(&path, e))?;
        let file = Arc::new(file);
        let mut st = self.state.lock().map_err(|_| self.poisoned())?;
        let seg = st.next;
        st.next = st.next.wrapping_add(1);
        let name = OsString::from(name);
        st.by_name.insert(name.clone(), seg);
        st.segs.insert(
            seg,
            Seg {
                name,
                file: file.clone(),
                scanned: 0,
                touched: None,
            },
        );
        Ok(Own {
            seg,
            file,
            path,
            len: 0,
        })
    }

    /// The entry `(kind, id)`, checked, if there and `len` bytes long (when given): looked up
    /// in the index, which a miss refreshes first (at most every [`REFRESH_EVERY`]). A bad
    /// entry is dropped from the index and is a miss.
    pub fn get(&self, kind: Kind, id: &ChunkId, len: Option<u32>) -> Option<Hit> {
        let (loc, file, name, touch_due) = match self.lookup(kind, id) {
            Some(found) => found,
            None => {
                self.refresh(false);
                self.lookup(kind, id)?
            }
        };
        if len.is_some_and(|l| l != loc.len) {
            // Not proof of a bad entry (an image may lie about a size).
            return None;
        }
        let mut buf = vec![0u8; HEADER + loc.len as usize];
        let checked = file.read_exact_at(&mut buf, loc.at).is_ok() && {
            let mut h = [0u8; HEADER];
            h.copy_from_slice(&buf[..HEADER]);
            parse(&h) == Some((kind, loc.len, *id))
                // blake3::Hash comparison is constant-time.
                && blake3::Hash::from_slice(&h[48..80]).ok()
                    == Some(mac(&self.key, kind, id, &buf[HEADER..]))
        };
        if !checked {
            tracing::warn!(segment = ?name, chunk = %id, "cached entry failed its check: not served");
            self.forget(kind, id);
            return None;
        }
        buf.drain(..HEADER);
        Some(Hit {
            bytes: buf,
            file,
            at: loc.at + HEADER as u64,
            path: self.dir.join(name),
            touch_due,
        })
    }

    fn lookup(&self, kind: Kind, id: &ChunkId) -> Option<(Loc, Arc<File>, OsString, bool)> {
        let mut st = self.state.lock().ok()?;
        let loc = *st.index.get(&(kind, *id))?;
        let seg = st.segs.get_mut(&loc.seg)?;
        let due = seg.touched.is_none_or(|t| t.elapsed() >= TOUCH_EVERY);
        if due {
            seg.touched = Some(Instant::now());
        }
        Some((loc, seg.file.clone(), seg.name.clone(), due))
    }

    /// Drops `(kind, id)` from the index (its bytes stay until the segment goes).
    pub fn forget(&self, kind: Kind, id: &ChunkId) {
        if let Ok(mut st) = self.state.lock() {
            st.index.remove(&(kind, *id));
        }
    }

    /// Indexed entries.
    #[cfg(test)]
    pub fn entries(&self) -> usize {
        self.state.lock().map(|s| s.index.len()).unwrap_or(0)
    }

    /// Scans the segment directory (unless `force` is false and the last scan was less than
    /// [`REFRESH_EVERY`] ago): drops segments that are gone, opens new ones, and indexes the
    /// entries appended to each since its last scan (see the module doc for the bounds).
    pub fn refresh(&self, force: bool) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        if !force && st.last_refresh.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
            return;
        }
        st.last_refresh = Some(Instant::now());
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let listed: HashSet<OsString> = rd
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().ends_with(".seg"))
            .collect();
        // Segments gone (evicted): dropped with their entries (this process's own one too: a
        // put that finds it deleted starts another).
        let gone: Vec<u32> = st
            .by_name
            .iter()
            .filter(|(n, _)| !listed.contains(*n))
            .map(|(_, s)| *s)
            .collect();
        if !gone.is_empty() {
            for s in &gone {
                if let Some(seg) = st.segs.remove(s) {
                    st.by_name.remove(&seg.name);
                }
            }
            st.index.retain(|_, l| !gone.contains(&l.seg));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        for name in listed {
            if st.by_name.contains_key(&name) || st.segs.len() >= MAX_SEGMENTS {
                continue;
            }
            let Ok(file) = super::open_nofollow(&self.dir.join(&name)) else {
                continue;
            };
            if !file
                .metadata()
                .is_ok_and(|m| m.is_file() && m.uid() == euid)
            {
                continue;
            }
            let seg = st.next;
            st.next = st.next.wrapping_add(1);
            st.by_name.insert(name.clone(), seg);
            st.segs.insert(
                seg,
                Seg {
                    name,
                    file: Arc::new(file),
                    scanned: 0,
                    touched: None,
                },
            );
        }
        let State { segs, index, .. } = &mut *st;
        for (n, seg) in segs.iter_mut() {
            if seg.scanned == u64::MAX {
                continue;
            }
            let Ok(size) = seg.file.metadata().map(|m| m.len()) else {
                continue;
            };
            let mut at = seg.scanned;
            let mut h = [0u8; HEADER];
            while at + HEADER as u64 <= size && index.len() < MAX_ENTRIES {
                if seg.file.read_exact_at(&mut h, at).is_err() {
                    break;
                }
                let Some((kind, len, id)) = parse(&h) else {
                    tracing::debug!(segment = ?seg.name, at, "bad entry header: rest of segment ignored");
                    at = u64::MAX;
                    break;
                };
                let end = at + HEADER as u64 + u64::from(len);
                if end > size {
                    // A torn tail, or an append in progress: looked at again next time.
                    break;
                }
                index.entry((kind, id)).or_insert(Loc { seg: *n, at, len });
                at = end;
            }
            seg.scanned = at;
        }
    }
}
