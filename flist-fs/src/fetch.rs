//! The read path: stored chunk from the cache or the router (verified), decoded to plaintext
//! (with an in-memory cache of recently decoded chunks bounded to [`DECODED_LRU_BYTES`]), and
//! range reads of a file that touch only the chunks covering the range; sequential readers get
//! the next chunks fetched in the background (read-ahead).
//!
//! With a local cache, unencrypted chunks are kept there as plaintext (encrypted ones stay
//! encrypted at rest, as stored). The first use of a cached plaintext in this process reads it
//! whole and checks its MAC (see the `cache` module for the threat model); after that, a read
//! of part of it is one `pread` on the descriptor it was checked on, kept open by the cache
//! (the host page cache, shared by every VM on the node, does the rest).
//!
//! Blocked chunks (an image with a block size, see [`crate::chunk::blocks`]): a read that
//! misses fetches only the blocks it covers (one ranged read), each verified against the
//! chunk's block table before it is decoded. The table comes from the image (which carries
//! them; checked against the chunk ids when it was read), else from the stores (one more
//! ranged read, verified against the chunk id); parsed tables are kept in memory; decoded blocks go to the in-memory LRU and, when
//! unencrypted, to the plaintext cache under their own name ([`block_key`]), so later reads of
//! them are one `pread` (encrypted blocks are cached as stored, named by their hash). Whole chunks fetched by read-ahead or `plain` serve reads too.
//! Blocks are written to the cache behind the read, by one writer thread per source (at most
//! [`WRITE_BEHIND`] waiting; past that the reader writes them itself); dropping the source
//! finishes its writes.
//!
//! Read-ahead follows sequential readers only: a read that starts where the previous read of
//! the same file ended. Through the fetcher, such a read (of a block or more) also has the
//! rest of its (blocked) chunk fetched whole in the background, so a sequential reader makes
//! about one request per chunk, not one per block.
//!
//! A remote source ([`ChunkSource::remote`]) asks the node's chunk fetcher instead (see
//! [`crate::fetcher`]): no stores, no cache of its own; each chunk is a read-only descriptor
//! the fetcher passed (kept in a bounded LRU), and reads are `pread`s on it. For a blocked
//! chunk (an image with a block size), a read asks the fetcher for the blocks it covers, one
//! block request each (with the image's block table, which the fetcher checks against the
//! chunk id): a cold 4 KiB read costs the fetcher one ranged store read of one block. A whole
//! chunk's descriptor already at hand (read-ahead, `plain`, or a read that covers half the
//! chunk or more, which asks for the whole chunk: one request instead of many) serves reads
//! too, as does read-ahead already fetching the chunk. A fetcher that answers block
//! requests with a version error is asked for whole chunks.

use crate::cache::ChunkCache;
use crate::chunk::blocks::{block_key, table_len, Table};
use crate::chunk::{decode, ChunkId};
use crate::error::{Error, Result};
use crate::fetcher::client::FetcherClient;
use crate::meta::{ChunkRef, Inode};
use crate::store::Router;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Bytes of decoded chunks kept in memory (at least four of the largest chunks).
pub const DECODED_LRU_BYTES: usize = 64 << 20;
/// Most decoded chunks kept in memory (tiny chunks: bounds the table, not the bytes).
const DECODED_LRU_CHUNKS: usize = 4096;
/// Chunks fetched ahead of a sequential reader.
const READ_AHEAD: usize = 2;
/// At most this many background fetches at once.
const MAX_IN_FLIGHT: usize = 4;
/// Most block tables kept in memory (each at most `blocks::MAX_TABLE_LEN` bytes decoded into
/// 48-byte entries; a 256 KiB chunk in 32 KiB blocks has 8).
const MAX_TABLES: usize = 8192;
/// Most files whose last read end is remembered for read-ahead.
const MAX_READERS: usize = 1024;
/// Most decoded blocks waiting for the cache writer.
pub const WRITE_BEHIND: usize = 64;

/// The cache writer of a source: decoded blocks it puts in the plaintext cache.
struct Writer {
    queue: std::sync::mpsc::SyncSender<(ChunkId, Arc<Vec<u8>>)>,
    thread: std::thread::JoinHandle<()>,
}

/// Where a range read ([`ChunkSource::read_into`]) puts what it reads: bytes in memory, or a
/// part of a file (a descriptor the node's chunk fetcher passed) that the sink may read
/// straight into its destination, as the virtio-fs device does into the guest's buffers.
pub trait Sink {
    fn bytes(&mut self, b: &[u8]) -> std::io::Result<()>;

    /// `len` bytes of `file` at `offset`. By default read into `buf` (reused between calls)
    /// and given to [`Sink::bytes`].
    fn file_part(
        &mut self,
        file: &std::fs::File,
        offset: u64,
        len: usize,
        buf: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        buf.resize(len, 0);
        file.read_exact_at(buf, offset)?;
        self.bytes(buf)
    }
}

impl<F: FnMut(&[u8]) -> std::io::Result<()>> Sink for F {
    fn bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self(b)
    }
}

pub struct ChunkSource {
    router: Router,
    cache: Option<Arc<ChunkCache>>,
    decoded: Mutex<Decoded>,
    in_flight: Mutex<HashSet<ChunkId>>,
    /// The node's chunk fetcher, for a remote source.
    remote: Option<Arc<FetcherClient>>,
    /// The image's block size (0: whole chunks).
    block_size: u32,
    /// Verified block tables by chunk id.
    tables: Mutex<HashMap<ChunkId, Arc<Table>>>,
    /// The image's block tables (checked when the image was read), by chunk id.
    image_tables: std::collections::BTreeMap<ChunkId, Vec<u8>>,
    /// Where the last read of each file (by inode number) ended, for read-ahead.
    last_end: Mutex<HashMap<u64, u64>>,
    /// The cache writer, started by the first block to cache.
    writer: Mutex<Option<Writer>>,
}

impl Drop for ChunkSource {
    fn drop(&mut self) {
        let writer = self.writer.get_mut().ok().and_then(Option::take);
        if let Some(w) = writer {
            drop(w.queue);
            let _ = w.thread.join();
        }
    }
}

/// Decoded chunks by id, their insertion order (oldest first) and total size.
#[derive(Default)]
struct Decoded {
    chunks: HashMap<ChunkId, Arc<Vec<u8>>>,
    order: VecDeque<ChunkId>,
    bytes: usize,
}

impl Decoded {
    fn get(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.chunks.get(id).cloned()
    }

    /// Adds `data`, dropping the oldest chunks to stay within `DECODED_LRU_BYTES` and
    /// `DECODED_LRU_CHUNKS`.
    fn insert(&mut self, id: ChunkId, data: Arc<Vec<u8>>) {
        if data.len() > DECODED_LRU_BYTES || self.chunks.contains_key(&id) {
            return;
        }
        while self.bytes + data.len() > DECODED_LRU_BYTES || self.chunks.len() >= DECODED_LRU_CHUNKS
        {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(d) = self.chunks.remove(&old) {
                self.bytes -= d.len();
            }
        }
        self.bytes += data.len();
        self.order.push_back(id);
        self.chunks.insert(id, data);
    }
}

impl ChunkSource {
    pub fn new(router: Router, cache: Option<Arc<ChunkCache>>) -> Self {
        ChunkSource {
            router,
            cache,
            decoded: Mutex::new(Decoded::default()),
            in_flight: Mutex::new(HashSet::new()),
            remote: None,
            block_size: 0,
            tables: Mutex::default(),
            image_tables: Default::default(),
            last_end: Mutex::default(),
            writer: Mutex::default(),
        }
    }

    /// Reads chunks as blocked chunks of `block_size` (the image's; 0: whole chunks) whose
    /// block tables are `tables` (the image's) or else fetched from the stores.
    pub fn with_blocks(
        mut self,
        block_size: u32,
        tables: std::collections::BTreeMap<ChunkId, Vec<u8>>,
    ) -> Self {
        self.block_size = block_size;
        self.image_tables = tables;
        self
    }

    /// A source that asks the node's chunk fetcher through `client` (no stores, no cache).
    pub fn remote(client: Arc<FetcherClient>) -> Self {
        ChunkSource {
            router: Router::new(Vec::new()),
            cache: None,
            decoded: Mutex::new(Decoded::default()),
            in_flight: Mutex::new(HashSet::new()),
            remote: Some(client),
            block_size: 0,
            tables: Mutex::default(),
            image_tables: Default::default(),
            last_end: Mutex::default(),
            writer: Mutex::default(),
        }
    }

    /// Whether chunks come from the node's chunk fetcher.
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// Whether read-ahead is fetching `id` in the background.
    fn is_in_flight(&self, id: &ChunkId) -> bool {
        self.in_flight
            .lock()
            .map(|f| f.contains(id))
            .unwrap_or(false)
    }

    /// The fetcher's descriptor of `c`, as a crate error naming the chunk.
    fn remote_chunk(
        client: &FetcherClient,
        c: &ChunkRef,
    ) -> Result<Arc<crate::fetcher::client::Served>> {
        client.chunk(c).map_err(|e| Error::Fetcher {
            id: c.id.to_hex(),
            error: e,
        })
    }

    /// Whether `c` can be read without waiting (decoded, or its descriptor at hand).
    fn is_ready(&self, c: &ChunkRef) -> bool {
        match &self.remote {
            Some(r) => r.has(c),
            None => self.is_decoded(&c.id),
        }
    }

    fn lru_get(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.decoded.lock().ok()?.get(id)
    }

    fn is_decoded(&self, id: &ChunkId) -> bool {
        self.lru_get(id).is_some()
    }

    /// After a read of `[start, end)` of file `ino` (`inode`): when it continued the previous
    /// read of the file and reached the second half of its last chunk, fetch the next
    /// `READ_AHEAD` chunks in the background. Errors are ignored here; a later foreground read
    /// reports them.
    pub fn read_ahead(self: &Arc<Self>, ino: u64, inode: &Inode, start: u64, end: u64) {
        let continued = match self.last_end.lock() {
            Ok(mut last) => {
                if last.len() >= MAX_READERS && !last.contains_key(&ino) {
                    last.clear();
                }
                last.insert(ino, end) == Some(start)
            }
            Err(_) => false,
        };
        if !continued && start != 0 {
            return;
        }
        let idx = inode
            .chunks
            .partition_point(|c| c.offset + u64::from(c.size) <= end.saturating_sub(1));
        let Some(cur) = inode.chunks.get(idx) else {
            return;
        };
        let cur_end = cur.offset + u64::from(cur.size);
        // Through the fetcher, a blocked chunk's reads ask for blocks, one request each: a
        // reader that continues its previous read with a read of a block or more (not a
        // few small reads that happen to be adjacent) gets the rest of the chunk fetched whole.
        let rest = (self.remote.is_some()
            && self.block_size != 0
            && continued
            && end - start >= u64::from(self.block_size)
            && end < cur_end)
            .then_some(cur);
        let next: &[ChunkRef] = if end < cur.offset + u64::from(cur.size) / 2 {
            &[]
        } else {
            &inode.chunks[idx + 1..]
        };
        for c in rest.into_iter().chain(next.iter().take(READ_AHEAD)) {
            if self.is_ready(c) {
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
                    let done = match &me.remote {
                        Some(r) => Self::remote_chunk(r, &c).map(drop),
                        None => me.plain_now(&c).map(drop),
                    };
                    if let Err(e) = done {
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
        self.fetch_stored(id, true)
    }

    fn fetch_stored(&self, id: &ChunkId, cache_it: bool) -> Result<Vec<u8>> {
        if self.remote.is_some() {
            return Err(Error::Unsupported {
                path: id.to_hex().into(),
                reason: "stored chunks are not available through the chunk fetcher".into(),
            });
        }
        if let Some(bytes) = self.cache.as_ref().and_then(|c| c.get(id)) {
            return Ok(bytes);
        }
        let bytes = self.router.get(id)?;
        if let (Some(c), true) = (&self.cache, cache_it) {
            if let Err(e) = c.put(id, &bytes) {
                tracing::warn!(chunk = %id, error = %e, "could not cache chunk");
            }
        }
        Ok(bytes)
    }

    /// Whether chunk `c` is kept in the cache as plaintext (unencrypted, with a cache).
    fn plain_cached(&self, c: &ChunkRef) -> bool {
        c.key.is_none() && self.cache.is_some()
    }

    /// The plaintext of `c` from the cache, checked (the cache then keeps it open), if there.
    fn cached_plain(&self, c: &ChunkRef) -> Option<Vec<u8>> {
        if !self.plain_cached(c) {
            return None;
        }
        self.cache.as_ref()?.get_plain(&c.id, c.size)
    }

    /// Fetches, verifies and decodes `c`; caches the plaintext when it is kept that way.
    fn decode_fetched(&self, c: &ChunkRef) -> Result<Vec<u8>> {
        let keep_plain = self.plain_cached(c);
        let stored = self.fetch_stored(&c.id, !keep_plain)?;
        let plain = decode(&c.id, &stored, c.key.as_ref(), c.size)?;
        if let (Some(cache), true) = (&self.cache, keep_plain) {
            if let Err(e) = cache.put_plain(&c.id, &plain) {
                tracing::warn!(chunk = %c.id, error = %e, "could not cache chunk");
            }
        }
        Ok(plain)
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
        if let Some(data) = self.lru_get(&c.id) {
            return Ok(data);
        }
        let data = if let Some(r) = &self.remote {
            let served = Self::remote_chunk(r, c)?;
            let mut buf = vec![0u8; served.len() as usize];
            served
                .read_at(0, &mut buf)
                .map_err(|e| Error::io("<chunk fetcher descriptor>", e))?;
            Arc::new(buf)
        } else {
            match self.cached_plain(c) {
                Some(plain) => Arc::new(plain),
                None => Arc::new(self.decode_fetched(c)?),
            }
        };
        if let Ok(mut lru) = self.decoded.lock() {
            lru.insert(c.id, data.clone());
        }
        Ok(data)
    }

    /// Part `[from, to)` of the cached plaintext named `key` (chunk `c`'s, or one of its
    /// blocks') this process has checked, read through the descriptor it was checked on
    /// (`None` when there is none; the caller then fetches). Callers look in the in-memory LRU
    /// first.
    fn checked_part(&self, key: &ChunkId, c: &ChunkRef, from: u64, to: u64) -> Option<Vec<u8>> {
        if !self.plain_cached(c) {
            return None;
        }
        let mut buf = vec![0u8; usize::try_from(to - from).ok()?];
        match self.cache.as_ref()?.read_plain_at(key, from, &mut buf) {
            Ok(()) => Some(buf),
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::debug!(chunk = %c.id, error = %e, "cached plaintext unreadable");
                }
                None
            }
        }
    }

    /// Calls `sink` with consecutive slices of `inode`'s bytes in `[offset, offset+len)`
    /// (clamped to the file size), fetching only the chunks (or blocks) that cover the range;
    /// holes (the gaps between chunks, and after the last) read as zeros. A failure is an
    /// [`Error::FileChunk`] naming the file offset it happened at; the caller names the file
    /// ([`Error::in_file`]).
    pub fn read_range(
        &self,
        inode: &Inode,
        offset: u64,
        len: u64,
        mut sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64> {
        self.read_into(inode, offset, len, &mut sink)
    }

    /// [`Self::read_range`] into a [`Sink`], which is given parts of the fetcher's descriptors
    /// as such (no copy here when it reads them into their destination itself).
    pub fn read_into(
        &self,
        inode: &Inode,
        offset: u64,
        len: u64,
        sink: &mut dyn Sink,
    ) -> Result<u64> {
        let end = offset.saturating_add(len).min(inode.size);
        if offset >= end {
            return Ok(0);
        }
        let first = inode
            .chunks
            .partition_point(|c| c.offset + u64::from(c.size) <= offset);
        let mut pos = offset;
        let mut buf = Vec::new();
        for c in inode.chunks[first..].iter().take_while(|c| c.offset < end) {
            if pos < c.offset {
                zeros(c.offset - pos, sink)?;
                pos = c.offset;
            }
            let from = pos - c.offset;
            let to = end.min(c.offset + u64::from(c.size)) - c.offset;
            let at = pos;
            pos += self
                .chunk_part(c, from, to, &mut buf, sink)
                .map_err(|e| match e {
                    Error::FileChunk { .. } => e,
                    e => Error::FileChunk {
                        path: PathBuf::new(),
                        offset: at,
                        error: Box::new(e),
                    },
                })?;
        }
        if pos < end {
            zeros(end - pos, sink)?;
            pos = end;
        }
        Ok(pos - offset)
    }

    /// Sends bytes `[from, to)` of chunk `c` to `sink`; returns how many.
    fn chunk_part(
        &self,
        c: &ChunkRef,
        from: u64,
        to: u64,
        buf: &mut Vec<u8>,
        sink: &mut dyn Sink,
    ) -> Result<u64> {
        if let Some(r) = &self.remote {
            // Blocks, unless the chunk's descriptor is at hand or read-ahead is fetching it
            // (asked for again, the fetcher answers both at once), or the read covers half the
            // chunk or more (one request instead of many).
            if self.block_size != 0
                && (to - from) * 2 < u64::from(c.size)
                && !r.has(c)
                && !self.is_in_flight(&c.id)
            {
                match self.remote_blocks_part(r, c, from, to, buf, sink) {
                    // A fetcher of protocol version 1: whole chunks.
                    Err(Error::Fetcher {
                        error:
                            crate::fetcher::FetcherError::Refused {
                                code: crate::fetcher::protocol::ErrorCode::Version,
                                ..
                            },
                        ..
                    }) => {}
                    done => return done,
                }
            }
            // A pread on the fetcher's descriptor (the page cache does the rest).
            let served = Self::remote_chunk(r, c)?;
            let (file, at) = served.part(from, to - from).map_err(|e| Error::BadChunk {
                id: c.id.to_hex(),
                reason: format!("reading the fetcher's descriptor: {e}"),
            })?;
            sink.file_part(file, at, (to - from) as usize, buf)
                .map_err(|e| Error::BadChunk {
                    id: c.id.to_hex(),
                    reason: format!("reading the fetcher's descriptor: {e}"),
                })?;
            return Ok(to - from);
        }
        // Decoded in memory, else part of a checked cached plaintext, else the blocks the
        // read covers (blocked chunks) or the whole chunk.
        let data = match self.lru_get(&c.id) {
            Some(data) => data,
            None => {
                if let Some(part) = self.checked_part(&c.id, c, from, to) {
                    sink.bytes(&part)
                        .map_err(|e| Error::io("<read destination>", e))?;
                    return Ok(part.len() as u64);
                }
                if self.block_size != 0 {
                    return self.blocks_part(c, from, to, sink);
                }
                self.plain(c)?
            }
        };
        let slice = data
            .get(from as usize..to as usize)
            .ok_or_else(|| Error::BadChunk {
                id: c.id.to_hex(),
                reason: "shorter than its metadata says".into(),
            })?;
        sink.bytes(slice)
            .map_err(|e| Error::io("<read destination>", e))?;
        Ok(slice.len() as u64)
    }
}

impl ChunkSource {
    /// Sends bytes `[from, to)` of blocked chunk `c` to `sink`, block by block, each a
    /// `pread` on the descriptor the fetcher passed for that block (asked for with the
    /// image's block table of `c`, if it has one). Returns how many bytes were sent.
    fn remote_blocks_part(
        &self,
        r: &FetcherClient,
        c: &ChunkRef,
        from: u64,
        to: u64,
        buf: &mut Vec<u8>,
        sink: &mut dyn Sink,
    ) -> Result<u64> {
        let bs = u64::from(self.block_size);
        let table = self.image_tables.get(&c.id).map_or(&[][..], Vec::as_slice);
        let (first, last) = (from / bs, (to - 1) / bs);
        let mut wanted = Vec::new();
        for i in first..=last {
            let index = u32::try_from(i).map_err(|_| Error::BadChunk {
                id: c.id.to_hex(),
                reason: format!("block {i} is past any chunk's blocks"),
            })?;
            let block_len = (u64::from(c.size) - i * bs).min(bs) as u32;
            wanted.push((index, block_len));
        }
        // Asked at once: the client's sockets fetch them in parallel.
        let served = r.blocks(c, self.block_size, &wanted, table);
        let mut pos = from;
        for (i, served) in (first..).zip(served) {
            let served = served.map_err(|e| Error::Fetcher {
                id: c.id.to_hex(),
                error: e,
            })?;
            let start = i * bs;
            let (a, b) = (pos - start, to.min(start + bs) - start);
            let unreadable = |e: std::io::Error| Error::BadChunk {
                id: c.id.to_hex(),
                reason: format!("block {i}: reading the fetcher's descriptor: {e}"),
            };
            let (file, at) = served.part(a, b - a).map_err(unreadable)?;
            sink.file_part(file, at, (b - a) as usize, buf)
                .map_err(unreadable)?;
            pos += b - a;
        }
        Ok(to - from)
    }

    /// Sends bytes `[from, to)` of blocked chunk `c` to `sink`, block by block: a decoded block
    /// in memory, else part of its checked cached plaintext, else the blocks from there to the
    /// end of the range, fetched together. Returns how many bytes were sent.
    fn blocks_part(&self, c: &ChunkRef, from: u64, to: u64, sink: &mut dyn Sink) -> Result<u64> {
        let bs = u64::from(self.block_size);
        let last = ((to - 1) / bs) as usize;
        let mut pos = from;
        while pos < to {
            let i = (pos / bs) as usize;
            let start = i as u64 * bs;
            let (a, b) = (pos - start, to.min(start + bs) - start);
            let key = block_key(&c.id, i);
            let block = match self.lru_get(&key) {
                Some(block) => block,
                None => {
                    if let Some(part) = self.checked_part(&key, c, a, b) {
                        sink.bytes(&part)
                            .map_err(|e| Error::io("<read destination>", e))?;
                        pos += part.len() as u64;
                        continue;
                    }
                    let block_len = (u64::from(c.size) - start).min(bs) as u32;
                    match self.cached_block(&key, c, i, block_len) {
                        Some(block) => block,
                        // The blocks to the end of the read in one ranged read; when that
                        // fails, this block alone, so an error names the block it is about.
                        None => self
                            .fetch_blocks(c, i, last)
                            .or_else(|e| {
                                if last > i {
                                    self.fetch_blocks(c, i, i)
                                } else {
                                    Err(e)
                                }
                            })
                            .map_err(|e| Error::FileChunk {
                                path: PathBuf::new(),
                                offset: c.offset + pos,
                                error: Box::new(e),
                            })?,
                    }
                }
            };
            let slice = block
                .get(a as usize..b as usize)
                .ok_or_else(|| Error::BadChunk {
                    id: c.id.to_hex(),
                    reason: format!("block {i} is shorter than its table says"),
                })?;
            sink.bytes(slice)
                .map_err(|e| Error::io("<read destination>", e))?;
            pos += slice.len() as u64;
        }
        Ok(to - from)
    }

    /// Block `i` (named `key`, `len` bytes) of chunk `c` from the cache, checked, if there:
    /// its plaintext, or for an encrypted chunk its stored bytes (named by their hash).
    fn cached_block(
        &self,
        key: &ChunkId,
        c: &ChunkRef,
        i: usize,
        len: u32,
    ) -> Option<Arc<Vec<u8>>> {
        let cache = self.cache.as_ref()?;
        let plain = if self.plain_cached(c) {
            cache.get_plain(key, len)?
        } else {
            let table = self.table(c).ok()?;
            let stored = cache.get(&ChunkId(table.blocks.get(i)?.hash))?;
            table.decode_block(&c.id, i, &stored, c.key.as_ref()).ok()?
        };
        let plain = Arc::new(plain);
        if let Ok(mut lru) = self.decoded.lock() {
            lru.insert(*key, plain.clone());
        }
        Some(plain)
    }

    /// Puts decoded block `key` in the plaintext cache: through the writer thread (started
    /// now if there is none), or here when its queue is full or it cannot run.
    fn cache_behind(&self, key: ChunkId, plain: Arc<Vec<u8>>) {
        let Some(cache) = &self.cache else {
            return;
        };
        let item = (key, plain);
        let (key, plain) = match self.writer.lock() {
            Ok(mut writer) => {
                if writer.is_none() {
                    *writer = Self::start_writer(cache.clone());
                }
                match writer.as_ref() {
                    Some(w) => match w.queue.try_send(item) {
                        Ok(()) => return,
                        Err(std::sync::mpsc::TrySendError::Full(back))
                        | Err(std::sync::mpsc::TrySendError::Disconnected(back)) => back,
                    },
                    None => item,
                }
            }
            Err(_) => item,
        };
        if let Err(e) = cache.put_plain(&key, &plain) {
            tracing::warn!(block = %key, error = %e, "could not cache block");
        }
    }

    /// Starts a cache writer thread; `None` when it cannot. The thread inherits the caller's
    /// seccomp filter (a vmm's virtio-fs worker, which caches blocks itself otherwise).
    fn start_writer(cache: Arc<ChunkCache>) -> Option<Writer> {
        let (queue, rx) = std::sync::mpsc::sync_channel::<(ChunkId, Arc<Vec<u8>>)>(WRITE_BEHIND);
        let thread = std::thread::Builder::new()
            .name("flist-cachewrite".into())
            .spawn(move || {
                for (key, plain) in rx {
                    if let Err(e) = cache.put_plain(&key, &plain) {
                        tracing::warn!(block = %key, error = %e, "could not cache block");
                    }
                }
            })
            .ok()?;
        Some(Writer { queue, thread })
    }

    /// The verified block table of blocked chunk `c`: the image's, else fetched with one
    /// ranged read.
    fn table(&self, c: &ChunkRef) -> Result<Arc<Table>> {
        if let Some(t) = self.tables.lock().ok().and_then(|t| t.get(&c.id).cloned()) {
            return Ok(t);
        }
        let (bs, size) = (self.block_size, c.size);
        let table = match self.image_tables.get(&c.id) {
            Some(bytes) => Arc::new(Table::parse(&c.id, bs, size, bytes)?),
            None => {
                // Bounded: the image's sizes passed validation (block size, chunk size).
                let len = table_len(bs, size) as u32;
                let bytes = self.router.get_range(&c.id, 0, len, &|b| {
                    Table::parse(&c.id, bs, size, b).map(drop)
                })?;
                Arc::new(Table::parse(&c.id, bs, size, &bytes)?)
            }
        };
        if let Ok(mut tables) = self.tables.lock() {
            if tables.len() >= MAX_TABLES {
                tables.clear();
            }
            tables.insert(c.id, table.clone());
        }
        Ok(table)
    }

    /// Fetches blocks `first..=last` of blocked chunk `c` with one ranged read, verifies and
    /// decodes each, keeps them (memory; the plaintext cache when unencrypted) and returns
    /// block `first`.
    fn fetch_blocks(&self, c: &ChunkRef, first: usize, last: usize) -> Result<Arc<Vec<u8>>> {
        let table = self.table(c)?;
        let (Some(lo), Some(hi)) = (table.blocks.get(first), table.blocks.get(last)) else {
            return Err(Error::BadChunk {
                id: c.id.to_hex(),
                reason: format!(
                    "blocks {first}..={last} are past its {} blocks",
                    table.blocks.len()
                ),
            });
        };
        let span = (hi.offset + u64::from(hi.len) - lo.offset) as u32;
        let base = lo.offset;
        let piece = |i: usize| -> Option<std::ops::Range<usize>> {
            let b = table.blocks.get(i)?;
            let at = (b.offset - base) as usize;
            Some(at..at + b.len as usize)
        };
        let check = |bytes: &[u8]| -> Result<()> {
            if bytes.len() != span as usize {
                return Err(Error::BadChunk {
                    id: c.id.to_hex(),
                    reason: format!(
                        "ranged read returned {} bytes, {span} asked for",
                        bytes.len()
                    ),
                });
            }
            for i in first..=last {
                let (Some(b), Some(r)) = (table.blocks.get(i), piece(i)) else {
                    continue;
                };
                if blake3::hash(&bytes[r]).as_bytes() != &b.hash {
                    let start = i as u64 * u64::from(table.block_size);
                    return Err(Error::BadChunk {
                        id: c.id.to_hex(),
                        reason: format!(
                            "block {i} (chunk bytes {start}..{}): hash mismatch",
                            start + u64::from(b.plain_len)
                        ),
                    });
                }
            }
            Ok(())
        };
        let bytes = self.router.get_range(&c.id, base, span, &check)?;
        let mut first_plain = None;
        for i in first..=last {
            let r = piece(i).unwrap_or(0..0);
            let plain =
                Arc::new(table.decode_block(&c.id, i, &bytes[r.clone()], c.key.as_ref())?);
            let key = block_key(&c.id, i);
            if self.plain_cached(c) {
                self.cache_behind(key, plain.clone());
            } else if let (Some(cache), Some(b)) = (&self.cache, table.blocks.get(i)) {
                // Encrypted blocks stay encrypted at rest, named by their hash.
                if let Err(e) = cache.put(&ChunkId(b.hash), &bytes[r.clone()]) {
                    tracing::warn!(chunk = %c.id, block = i, error = %e, "could not cache block");
                }
            }
            if let Ok(mut lru) = self.decoded.lock() {
                lru.insert(key, plain.clone());
            }
            first_plain.get_or_insert(plain);
        }
        first_plain.ok_or_else(|| Error::BadChunk {
            id: c.id.to_hex(),
            reason: "no block fetched".into(),
        })
    }
}

/// Sends `len` zero bytes (a hole) to `sink`.
fn zeros(mut len: u64, sink: &mut dyn Sink) -> Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        sink.bytes(&ZEROS[..n])
            .map_err(|e| Error::io("<read destination>", e))?;
        len -= n as u64;
    }
    Ok(())
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
        let store = counting_dir_store(d.path());
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

    /// A file of `n` distinct 64 KiB chunks, all put in `store`.
    fn file_in(store: &Counting, n: u64) -> Inode {
        const CH: u32 = 64 * 1024;
        let mut inode = Inode::new(InodeKind::File, 0o644);
        for k in 0..n {
            let plain: Vec<u8> = (0..CH).map(|i| (i as u64 * 31 + k * 7) as u8).collect();
            let e = encode(&plain, false).unwrap();
            store.put(&e.id, &e.stored).unwrap();
            inode.chunks.push(ChunkRef {
                id: e.id,
                offset: k * u64::from(CH),
                size: CH,
                key: None,
            });
        }
        inode.size = n * u64::from(CH);
        inode
    }

    fn read_all(src: &ChunkSource, inode: &Inode, offset: u64, len: u64) -> Vec<u8> {
        let mut out = Vec::new();
        src.read_range(inode, offset, len, &mut |b| {
            out.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        out
    }

    /// The segment files of the cache at `dir`.
    fn segment_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir.join("seg"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// A dir:// store in `dir` that counts its reads.
    fn counting_dir_store(dir: &std::path::Path) -> Arc<Counting> {
        Arc::new(Counting {
            inner: crate::store::DirStore::open(&format!("dir://{}", dir.display())).unwrap(),
            gets: AtomicUsize::new(0),
        })
    }

    #[test]
    fn cached_plaintext_serves_later_processes_and_rot_is_caught() {
        let d = tempfile::tempdir().unwrap();
        let cache_root = tempfile::tempdir().unwrap();
        let cache_dir = cache_root.path().join("cache");
        let store = counting_dir_store(d.path());
        let inode = file_in(&store, 40);
        let expected = |offset: u64, len: u64| -> Vec<u8> {
            (offset..offset + len)
                .map(|p| {
                    let (k, i) = (p / 65536, p % 65536);
                    (i * 31 + k * 7) as u8
                })
                .collect()
        };
        let source = || {
            ChunkSource::new(
                Router::new(vec![(0, 255, store.clone() as Arc<dyn Store>)]),
                Some(Arc::new(ChunkCache::open(&cache_dir, 1 << 30).unwrap())),
            )
        };
        // First process: every chunk fetched once; plaintexts (not stored bytes) are cached.
        let first = source();
        assert_eq!(
            read_all(&first, &inode, 0, inode.size),
            expected(0, inode.size)
        );
        assert_eq!(store.gets.load(Ordering::SeqCst), 40);
        // Appended to one segment file of this process, nothing else.
        let segs = segment_files(&cache_dir);
        assert_eq!(segs.len(), 1);
        let seg = std::fs::read(&segs[0]).unwrap();
        assert_eq!(seg.len(), 40 * (80 + 65536));
        // Small reads spanning chunk edges, from the LRU and from checked files.
        for (offset, len) in [
            (65536 - 100, 200),
            (3 * 65536 + 5, 4096),
            (39 * 65536, 65536),
        ] {
            assert_eq!(read_all(&first, &inode, offset, len), expected(offset, len));
        }
        // A second process reads from the cache only.
        let second = source();
        for k in (0..40u64).rev() {
            let off = k * 65536 + 1000;
            assert_eq!(read_all(&second, &inode, off, 4096), expected(off, 4096));
        }
        assert_eq!(store.gets.load(Ordering::SeqCst), 40);
        // A rotten cached plaintext is caught on first use by a new process and refetched.
        let mut bytes = seg;
        let at = bytes
            .windows(32)
            .position(|w| w == inode.chunks[0].id.0)
            .unwrap();
        bytes[at + 64 + 65535] ^= 0xff;
        std::fs::write(&segs[0], &bytes).unwrap();
        let third = source();
        assert_eq!(read_all(&third, &inode, 0, 65536), expected(0, 65536));
        assert_eq!(store.gets.load(Ordering::SeqCst), 41);
        // Files evicted under a process that had checked them: still served (from memory or
        // the descriptor it checked), never re-opened by path.
        for seg in segment_files(&cache_dir) {
            std::fs::remove_file(seg).unwrap();
        }
        let off = 20 * 65536 + 7;
        assert_eq!(read_all(&second, &inode, off, 100), expected(off, 100));
        assert_eq!(store.gets.load(Ordering::SeqCst), 41);
        // A fresh process finds nothing cached and fetches again.
        let fourth = source();
        assert_eq!(read_all(&fourth, &inode, off, 100), expected(off, 100));
        assert_eq!(store.gets.load(Ordering::SeqCst), 42);
    }

    #[test]
    fn a_forged_cached_plaintext_is_never_served() {
        let d = tempfile::tempdir().unwrap();
        let cache_root = tempfile::tempdir().unwrap();
        let cache_dir = cache_root.path().join("cache");
        let store = counting_dir_store(d.path());
        let inode = file_in(&store, 2);
        let source = || {
            ChunkSource::new(
                Router::new(vec![(0, 255, store.clone() as Arc<dyn Store>)]),
                Some(Arc::new(ChunkCache::open(&cache_dir, 1 << 30).unwrap())),
            )
        };
        let genuine = read_all(&source(), &inode, 0, inode.size);
        assert_eq!(store.gets.load(Ordering::SeqCst), 2);
        // A cache writer replaces chunk 0's plaintext with other bytes and their hash (what
        // an old format trusted).
        let seg = &segment_files(&cache_dir)[0];
        let mut bytes = std::fs::read(seg).unwrap();
        let at = bytes
            .windows(32)
            .position(|w| w == inode.chunks[0].id.0)
            .unwrap();
        let evil = vec![0x41u8; 65536];
        bytes[at + 32..at + 64].copy_from_slice(blake3::hash(&evil).as_bytes());
        bytes[at + 64..at + 64 + 65536].copy_from_slice(&evil);
        std::fs::write(seg, &bytes).unwrap();
        let fresh = source();
        assert_eq!(read_all(&fresh, &inode, 0, 4096), genuine[..4096]);
        assert_eq!(read_all(&fresh, &inode, 100, 1000), genuine[100..1100]);
        assert_eq!(store.gets.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn decoded_chunks_are_bounded_in_bytes() {
        let mut lru = Decoded::default();
        let big = crate::chunk::MAX_CHUNK_SIZE as usize;
        for i in 0..6u8 {
            lru.insert(ChunkId::of(&[i]), Arc::new(vec![0u8; big]));
            assert!(lru.bytes <= DECODED_LRU_BYTES);
            assert_eq!(
                lru.bytes,
                lru.chunks.values().map(|d| d.len()).sum::<usize>()
            );
            assert_eq!(lru.order.len(), lru.chunks.len());
        }
        assert_eq!(lru.chunks.len(), DECODED_LRU_BYTES / big);
        // Small chunks: many more fit than the old 16-entry limit, still within the bound.
        let mut lru = Decoded::default();
        for i in 0..2000u32 {
            lru.insert(ChunkId::of(&i.to_le_bytes()), Arc::new(vec![0u8; 64 << 10]));
        }
        assert_eq!(lru.bytes, DECODED_LRU_BYTES);
        assert_eq!(lru.chunks.len(), 1024);
        assert!(lru.get(&ChunkId::of(&1999u32.to_le_bytes())).is_some());
        assert!(lru.get(&ChunkId::of(&0u32.to_le_bytes())).is_none());
        // Tiny chunks: the number of entries is bounded too.
        let mut lru = Decoded::default();
        for i in 0..10_000u32 {
            lru.insert(ChunkId::of(&i.to_le_bytes()), Arc::new(vec![1]));
        }
        assert_eq!(lru.chunks.len(), DECODED_LRU_CHUNKS);
        assert_eq!(lru.bytes, DECODED_LRU_CHUNKS);
    }
}
