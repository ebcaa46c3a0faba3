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
