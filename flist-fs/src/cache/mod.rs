//! The local chunk cache shared by all images and processes: a directory of stored chunks
//! named by id (`<dir>/<id[0..2]>/<id>`) and of decoded plaintexts of unencrypted chunks
//! (`<dir>/<id[0..2]>/<id>.plain`: the blake3 hash of the plaintext, then the plaintext), which
//! let small reads be served with one `pread` once the file has been checked (see
//! [`ChunkCache::get_plain`]). Inserts write a temp file and rename it into place,
//! so a half-written chunk is never visible; every hit is re-verified against its id, so a file
//! torn by a crash or power loss (no fsync: the cache is disposable) is deleted and treated as
//! a miss, never served. Size is bounded: when the running estimate passes
//! the bound, the least recently used files (by mtime, refreshed on hits) are deleted down to
//! 90% of it. Deletion by another process at any time is tolerated.

use crate::chunk::{verify_stored, ChunkId};
use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

pub struct ChunkCache {
    dir: PathBuf,
    max_bytes: u64,
    approx_bytes: AtomicU64,
}

/// Stale temp files (from a crashed writer) older than this are removed during eviction.
const STALE_TMP: Duration = Duration::from_secs(3600);
/// A hit refreshes the file's mtime only when it is older than this (fewer syscalls).
const TOUCH_AFTER: Duration = Duration::from_secs(30);
/// A cached plaintext starts with the blake3 hash of the rest.
const PLAIN_HEADER: usize = 32;

impl ChunkCache {
    /// Opens (creating) the cache at `dir` bounded to `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self> {
        std::fs::create_dir_all(dir.join("tmp")).map_err(|e| Error::io(dir, e))?;
        let cache = ChunkCache {
            dir: dir.to_path_buf(),
            max_bytes,
            approx_bytes: AtomicU64::new(0),
        };
        let used: u64 = cache.entries().iter().map(|(_, len, _)| len).sum();
        cache.approx_bytes.store(used, Ordering::Relaxed);
        Ok(cache)
    }

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

    /// The plaintext of chunk `id`, if cached and intact: the whole file is read and its
    /// plaintext checked against the hash it starts with, so a torn or rotten file is deleted
    /// and treated as a miss. Callers that have checked a file this way may then read ranges of
    /// it with [`ChunkCache::read_plain_at`].
    pub fn get_plain(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let p = self.plain_path(id);
        let mut bytes = std::fs::read(&p).ok()?;
        let intact = bytes.len() >= PLAIN_HEADER
            && blake3::hash(&bytes[PLAIN_HEADER..]).as_bytes()[..] == bytes[..PLAIN_HEADER];
        if !intact {
            tracing::warn!(path = %p.display(), "corrupt cached plaintext removed");
            let _ = std::fs::remove_file(&p);
            return None;
        }
        Self::touch(&p);
        bytes.drain(..PLAIN_HEADER);
        Some(bytes)
    }

    /// Reads `buf.len()` plaintext bytes of chunk `id` at `offset` without checking them: only
    /// for a file this process has checked with [`ChunkCache::get_plain`]. Errors when the file
    /// is gone (evicted) or shorter than asked.
    pub fn read_plain_at(&self, id: &ChunkId, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(self.plain_path(id))?;
        file.read_exact_at(buf, offset + PLAIN_HEADER as u64)
    }

    /// Inserts the plaintext of chunk `id` (already verified by decoding), then evicts if over
    /// the bound.
    pub fn put_plain(&self, id: &ChunkId, plain: &[u8]) -> Result<()> {
        let hash = blake3::hash(plain);
        self.insert(id, &self.plain_path(id), &[hash.as_bytes(), plain])
    }

    /// The verified stored bytes of `id`, if cached.
    pub fn get(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let p = self.path(id);
        let bytes = std::fs::read(&p).ok()?;
        if let Err(e) = verify_stored(id, &bytes) {
            tracing::warn!(path = %p.display(), error = %e, "corrupt cache entry removed");
            let _ = std::fs::remove_file(&p);
            return None;
        }
        Self::touch(&p);
        Some(bytes)
    }

    /// Inserts verified stored bytes for `id` (atomically), then evicts if over the bound.
    pub fn put(&self, id: &ChunkId, stored: &[u8]) -> Result<()> {
        self.insert(id, &self.path(id), &[stored])
    }

    /// Writes `parts` to a temp file, renames it to `p`, and evicts if over the bound.
    fn insert(&self, id: &ChunkId, p: &Path, parts: &[&[u8]]) -> Result<()> {
        let parent = p.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let tmpdir = self.dir.join("tmp");
        std::fs::create_dir_all(&tmpdir).map_err(|e| Error::io(&tmpdir, e))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!("{}-", id.to_hex()))
            .tempfile_in(&tmpdir)
            .map_err(|e| Error::io(&tmpdir, e))?;
        let mut len = 0u64;
        for part in parts {
            tmp.write_all(part).map_err(|e| Error::io(tmp.path(), e))?;
            len += part.len() as u64;
        }
        tmp.persist(p).map_err(|e| Error::io(p, e.error))?;
        let now = self.approx_bytes.fetch_add(len, Ordering::Relaxed) + len;
        if now > self.max_bytes {
            self.evict()?;
        }
        Ok(())
    }

    /// (path, size, mtime) of every cached chunk.
    fn entries(&self) -> Vec<(PathBuf, u64, SystemTime)> {
        let mut out = Vec::new();
        let Ok(top) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for sub in top.flatten() {
            let name = sub.file_name();
            if name.len() != 2 {
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
        let d = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(d.path(), 10_000).unwrap();
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
}
