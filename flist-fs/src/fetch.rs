//! The read path: stored chunk from the cache or the router (verified, then cached), decoded
//! to plaintext (with a small in-memory LRU of decoded chunks), and range reads of a file that
//! touch only the chunks covering the range.

use crate::cache::ChunkCache;
use crate::chunk::{decode, ChunkId};
use crate::error::{Error, Result};
use crate::meta::{ChunkRef, Inode};
use crate::store::Router;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

const DECODED_LRU: usize = 16;

pub struct ChunkSource {
    router: Router,
    cache: Option<ChunkCache>,
    decoded: Mutex<VecDeque<(ChunkId, Arc<Vec<u8>>)>>,
}

impl ChunkSource {
    pub fn new(router: Router, cache: Option<ChunkCache>) -> Self {
        ChunkSource {
            router,
            cache,
            decoded: Mutex::new(VecDeque::new()),
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

    /// The plaintext of chunk `c`.
    pub fn plain(&self, c: &ChunkRef) -> Result<Arc<Vec<u8>>> {
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
