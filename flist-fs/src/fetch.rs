//! The read path: stored chunk from the cache or the router (verified, then cached), decoded
//! to plaintext (with a small in-memory LRU of decoded chunks), and range reads of a file that
//! touch only the chunks covering the range; sequential readers get the next chunks fetched
//! in the background (read-ahead).

use crate::cache::ChunkCache;
use crate::chunk::{decode, ChunkId};
use crate::error::{Error, Result};
use crate::meta::{ChunkRef, Inode};
use crate::store::Router;
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

const DECODED_LRU: usize = 16;
/// Chunks fetched ahead of a sequential reader.
const READ_AHEAD: usize = 2;
/// At most this many background fetches at once.
const MAX_IN_FLIGHT: usize = 4;

pub struct ChunkSource {
    router: Router,
    cache: Option<ChunkCache>,
    decoded: Mutex<VecDeque<(ChunkId, Arc<Vec<u8>>)>>,
    in_flight: Mutex<HashSet<ChunkId>>,
}

impl ChunkSource {
    pub fn new(router: Router, cache: Option<ChunkCache>) -> Self {
        ChunkSource {
            router,
            cache,
            decoded: Mutex::new(VecDeque::new()),
            in_flight: Mutex::new(HashSet::new()),
        }
    }

    fn is_decoded(&self, id: &ChunkId) -> bool {
        self.decoded
            .lock()
            .map(|l| l.iter().any(|(i, _)| i == id))
            .unwrap_or(false)
    }

    /// After a read of `inode` ending at `end`: when the read reached the second half of its
    /// last chunk, fetch the next `READ_AHEAD` chunks in the background. Errors are ignored
    /// here; a later foreground read reports them.
    pub fn read_ahead(self: &Arc<Self>, inode: &Inode, end: u64) {
        let idx = inode
            .chunks
            .partition_point(|c| c.offset + u64::from(c.size) <= end.saturating_sub(1));
        let Some(cur) = inode.chunks.get(idx) else {
            return;
        };
        if end < cur.offset + u64::from(cur.size) / 2 {
            return;
        }
        for c in inode.chunks.iter().skip(idx + 1).take(READ_AHEAD) {
            if self.is_decoded(&c.id) {
                continue;
            }
            {
                let Ok(mut fl) = self.in_flight.lock() else {
                    return;
                };
                if fl.len() >= MAX_IN_FLIGHT || !fl.insert(c.id) {
                    continue;
                }
            }
            let me = self.clone();
            let id = c.id;
            let c = c.clone();
            let spawned = std::thread::Builder::new()
                .name("flist-readahead".into())
                .spawn(move || {
                    if let Err(e) = me.plain_now(&c) {
                        tracing::debug!(chunk = %c.id, error = %e, "read-ahead failed");
                    }
                    if let Ok(mut fl) = me.in_flight.lock() {
                        fl.remove(&c.id);
                    }
                });
            if spawned.is_err() {
                if let Ok(mut fl) = self.in_flight.lock() {
                    fl.remove(&id);
                }
            }
        }
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The verified stored bytes of `id` (cache first, then stores; fetched chunks are cached).
    pub fn stored(&self, id: &ChunkId) -> Result<Vec<u8>> {
        if let Some(bytes) = self.cache.as_ref().and_then(|c| c.get(id)) {
            return Ok(bytes);
        }
        let bytes = self.router.get(id)?;
        if let Some(c) = &self.cache {
            if let Err(e) = c.put(id, &bytes) {
                tracing::warn!(chunk = %id, error = %e, "could not cache chunk");
            }
        }
        Ok(bytes)
    }

    /// The plaintext of chunk `c` (waiting for a background fetch of it, if one is running).
    pub fn plain(&self, c: &ChunkRef) -> Result<Arc<Vec<u8>>> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while std::time::Instant::now() < deadline
            && !self.is_decoded(&c.id)
            && self
                .in_flight
                .lock()
                .map(|f| f.contains(&c.id))
                .unwrap_or(false)
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.plain_now(c)
    }

    fn plain_now(&self, c: &ChunkRef) -> Result<Arc<Vec<u8>>> {
        if let Ok(lru) = self.decoded.lock() {
            if let Some((_, data)) = lru.iter().find(|(id, _)| *id == c.id) {
                return Ok(data.clone());
            }
        }
        let stored = self.stored(&c.id)?;
        let data = Arc::new(decode(&c.id, &stored, c.key.as_ref(), c.size)?);
        if let Ok(mut lru) = self.decoded.lock() {
            if lru.len() >= DECODED_LRU {
                lru.pop_front();
            }
            lru.push_back((c.id, data.clone()));
        }
        Ok(data)
    }

    /// Calls `sink` with consecutive slices of `inode`'s bytes in `[offset, offset+len)`
    /// (clamped to the file size), fetching only the chunks that cover the range.
    pub fn read_range(
        &self,
        inode: &Inode,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64> {
        let end = offset.saturating_add(len).min(inode.size);
        if offset >= end {
            return Ok(0);
        }
        let first = inode
            .chunks
            .partition_point(|c| c.offset + u64::from(c.size) <= offset);
        let mut done = 0u64;
        for c in inode.chunks[first..].iter().take_while(|c| c.offset < end) {
            let data = self.plain(c)?;
            let from = offset.max(c.offset) - c.offset;
            let to = end.min(c.offset + u64::from(c.size)) - c.offset;
            let slice = data
                .get(from as usize..to as usize)
                .ok_or_else(|| Error::BadChunk {
                    id: c.id.to_hex(),
                    reason: "shorter than its metadata says".into(),
                })?;
            sink(slice).map_err(|e| Error::io("<read destination>", e))?;
            done += slice.len() as u64;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::encode;
    use crate::meta::{Inode, InodeKind};
    use crate::store::Store;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting {
        inner: crate::store::DirStore,
        gets: AtomicUsize,
    }

    impl Store for Counting {
        fn url(&self) -> &str {
            self.inner.url()
        }
        fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            self.inner.get(id)
        }
        fn put(&self, id: &ChunkId, d: &[u8]) -> Result<()> {
            self.inner.put(id, d)
        }
        fn exists(&self, id: &ChunkId) -> Result<bool> {
            self.inner.exists(id)
        }
    }

    #[test]
    fn small_read_of_huge_file_fetches_one_chunk() {
        let d = tempfile::tempdir().unwrap();
        let store = Arc::new(Counting {
            inner: crate::store::DirStore::open(&format!("dir://{}", d.path().display())).unwrap(),
            gets: AtomicUsize::new(0),
        });
        const CH: u32 = 256 * 1024;
        // A 1 GiB file of 4096 chunks whose chunk ids are distinct (per-chunk fill byte).
        let mut inode = Inode::new(InodeKind::File, 0o644);
        for n in 0..4096u64 {
            let plain = vec![(n % 251) as u8; CH as usize];
            let e = encode(&plain, false).unwrap();
            if n == 2048 {
                store.put(&e.id, &e.stored).unwrap();
            }
            inode.chunks.push(ChunkRef {
                id: e.id,
                offset: n * u64::from(CH),
                size: CH,
                key: None,
            });
        }
        inode.size = 4096 * u64::from(CH);
        let src = ChunkSource::new(
            Router::new(vec![(0, 255, store.clone() as Arc<dyn Store>)]),
            None,
        );
        let mut out = Vec::new();
        let n = src
            .read_range(&inode, 2048 * u64::from(CH) + 100, 4096, &mut |b| {
                out.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
        assert_eq!((n, out.len()), (4096, 4096));
        assert!(out.iter().all(|&b| b == (2048 % 251) as u8));
        assert_eq!(store.gets.load(Ordering::SeqCst), 1);
        // Reading past EOF returns nothing; reading a missing chunk is an error naming it.
        assert_eq!(
            src.read_range(&inode, inode.size, 10, &mut |_| Ok(()))
                .unwrap(),
            0
        );
        let e = src
            .read_range(&inode, 0, 1, &mut |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&inode.chunks[0].id.to_hex()), "{e}");
    }
}
