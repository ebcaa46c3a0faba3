//! The fetcher's side: accept loop, one thread per connection (bounded), request handling
//! (see the module documentation of [`super`] for the protocol and the threat model).

use super::protocol::{
    request_frame_len, AnyRequest, BlockRequest, ErrorCode, FdKind, Request, Response,
};
use super::send_with_fd;
use crate::cache::ChunkCache;
use crate::chunk::blocks::{block_key, check_block_size, table_len, Table};
use crate::chunk::{decode, ChunkId};
use crate::error::Error;
use crate::store::Router;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Once a frame has started, the rest of it must arrive within this.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// A response must be taken by the client within this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits of the server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Connections served at once (a thread each); more are answered `Busy` and closed.
    pub max_connections: usize,
    /// Chunks fetched and decoded at once, node-wide (bounds the memory they take).
    pub max_fetches: usize,
    /// Bytes of sealed memfds (plaintexts of encrypted chunks) kept for reuse.
    pub memfd_cache_bytes: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 256,
            max_fetches: 8,
            memfd_cache_bytes: 256 << 20,
        }
    }
}

/// A counting semaphore.
struct Slots {
    free: Mutex<usize>,
    cv: Condvar,
}

struct SlotGuard<'a>(&'a Slots);

impl Slots {
    fn acquire(&self) -> Option<SlotGuard<'_>> {
        let mut free = self.free.lock().ok()?;
        while *free == 0 {
            free = self.cv.wait(free).ok()?;
        }
        *free -= 1;
        Some(SlotGuard(self))
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut free) = self.0.free.lock() {
            *free += 1;
            self.0.cv.notify_one();
        }
    }
}

type MemfdKey = (ChunkId, [u8; 32], u32);

/// Sealed memfds by (id, key, length), least recently used dropped past the byte bound.
#[derive(Default)]
struct Memfds {
    fds: HashMap<MemfdKey, (Arc<OwnedFd>, u64)>,
    clock: u64,
    bytes: u64,
}

/// Counters, for logs and tests.
#[derive(Default, Debug)]
pub struct Stats {
    pub requests: AtomicU64,
    pub served: AtomicU64,
    pub refused: AtomicU64,
    /// Whole chunks fetched from the stores.
    pub fetched: AtomicU64,
    /// Blocks fetched from the stores (one ranged read each).
    pub blocks_fetched: AtomicU64,
}

/// Most block entries of the verified block tables the fetcher keeps (those it read from its
/// stores, for block requests that came without one): 48 bytes each, 48 MiB in all (a table
/// has at most 4096: a 16 MiB chunk in 4 KiB blocks).
const MAX_TABLE_BLOCKS: usize = 1 << 20;

/// The fetcher: stores, cache, limits.
pub struct Fetcher {
    router: Router,
    cache: Arc<ChunkCache>,
    config: ServerConfig,
    fetches: Slots,
    /// One lock per chunk being fetched: identical concurrent requests fetch once.
    inflight: Mutex<HashMap<ChunkId, Arc<Mutex<()>>>>,
    memfds: Mutex<Memfds>,
    /// Verified block tables read from the stores, by chunk id, and their block count.
    tables: Mutex<(HashMap<ChunkId, Arc<Table>>, usize)>,
    connections: AtomicUsize,
    pub stats: Stats,
}

/// A refusal: code and message.
struct Refusal(ErrorCode, String);

impl From<Error> for Refusal {
    /// Short messages (they are cut at MAX_MESSAGE): the full error is in the fetcher's log.
    fn from(e: Error) -> Self {
        let not_found = |id: &str| {
            Refusal(
                ErrorCode::NotFound,
                format!("chunk {id}: not in any allowed store"),
            )
        };
        match &e {
            Error::AllStoresFailed { id, failures } => {
                if failures.iter().any(|f| f.contains("hash mismatch")) {
                    Refusal(
                        ErrorCode::BadChunk,
                        format!("chunk {id}: hash mismatch: a store's bytes do not match the id"),
                    )
                } else if failures.iter().all(|f| f.contains("not found")) {
                    not_found(id)
                } else {
                    Refusal(ErrorCode::Unavailable, e.to_string())
                }
            }
            Error::ChunkNotFound { id, .. } | Error::NoStoreForId { id } => not_found(id),
            Error::BadChunk { .. } => Refusal(ErrorCode::BadChunk, e.to_string()),
            Error::Store { .. } => Refusal(ErrorCode::Unavailable, e.to_string()),
            _ => Refusal(ErrorCode::Internal, e.to_string()),
        }
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> Refusal {
    Refusal(ErrorCode::Internal, format!("{what}: {e}"))
}

/// A sealed memfd holding `data`.
fn sealed_memfd(data: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: a valid NUL-terminated name; the flags are plain.
    let raw = unsafe {
        libc::memfd_create(
            c"flist-chunk".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut file = File::from(fd);
    file.write_all(data)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(file))
}

/// Whether `file` was opened read-only.
fn is_read_only(file: &File) -> bool {
    // SAFETY: F_GETFL on a descriptor we hold.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_ACCMODE == libc::O_RDONLY
}

impl Fetcher {
    pub fn new(router: Router, cache: Arc<ChunkCache>, config: ServerConfig) -> Self {
        Fetcher {
            router,
            cache,
            fetches: Slots {
                free: Mutex::new(config.max_fetches.max(1)),
                cv: Condvar::new(),
            },
            config,
            inflight: Mutex::new(HashMap::new()),
            memfds: Mutex::new(Memfds::default()),
            tables: Mutex::default(),
            connections: AtomicUsize::new(0),
            stats: Stats::default(),
        }
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    fn chunk_lock(&self, id: &ChunkId) -> Option<Arc<Mutex<()>>> {
        let mut map = self.inflight.lock().ok()?;
        Some(map.entry(*id).or_default().clone())
    }

    fn chunk_unlock(&self, id: &ChunkId, lock: Arc<Mutex<()>>) {
        if let Ok(mut map) = self.inflight.lock() {
            // Ours plus the map's: nobody else waits on it.
            if Arc::strong_count(&lock) <= 2 {
                map.remove(id);
            }
        }
    }

    fn memfd_get(&self, k: &MemfdKey) -> Option<Arc<OwnedFd>> {
        let mut m = self.memfds.lock().ok()?;
        m.clock += 1;
        let now = m.clock;
        let (fd, used) = m.fds.get_mut(k)?;
        *used = now;
        Some(fd.clone())
    }

    fn memfd_put(&self, k: MemfdKey, fd: Arc<OwnedFd>) {
        let Ok(mut m) = self.memfds.lock() else {
            return;
        };
        let len = u64::from(k.2);
        if len > self.config.memfd_cache_bytes || m.fds.contains_key(&k) {
            return;
        }
        while m.bytes + len > self.config.memfd_cache_bytes {
            let Some(oldest) = m.fds.iter().min_by_key(|(_, (_, u))| *u).map(|(k, _)| *k) else {
                break;
            };
            m.fds.remove(&oldest);
            m.bytes -= u64::from(oldest.2);
        }
        m.clock += 1;
        let now = m.clock;
        m.bytes += len;
        m.fds.insert(k, (fd, now));
    }

    /// The stored bytes of `id`: from the cache, else the stores (verified by the router).
    fn stored(&self, id: &ChunkId, cache_it: bool) -> Result<Vec<u8>, Refusal> {
        if let Some(b) = self.cache.get(id) {
            return Ok(b);
        }
        let _slot = self
            .fetches
            .acquire()
            .ok_or_else(|| internal("fetch slots", "poisoned"))?;
        let bytes = self.router.get(id)?;
        self.stats.fetched.fetch_add(1, Ordering::Relaxed);
        if cache_it {
            if let Err(e) = self.cache.put(id, &bytes) {
                tracing::warn!(chunk = %id, error = %e, "could not cache chunk");
            }
        }
        Ok(bytes)
    }

    /// The answer to a valid request.
    fn serve(&self, r: &Request) -> Result<Served, Refusal> {
        if let Some(served) = self.ready(r) {
            return Ok(served);
        }
        let lock = self
            .chunk_lock(&r.id)
            .ok_or_else(|| internal("chunk locks", "poisoned"))?;
        let result = {
            let _held = lock.lock();
            // Someone may have fetched it while we waited.
            match self.ready(r) {
                Some(s) => Ok(s),
                None => self.fetch(r),
            }
        };
        self.chunk_unlock(&r.id, lock);
        result
    }

    /// A descriptor already at hand for `r` (checked cache file or sealed memfd).
    fn ready(&self, r: &Request) -> Option<Served> {
        match &r.key {
            None => {
                let f = self.cache.plain_file(&r.id, r.plain_len)?;
                is_read_only(&f).then_some(Served::File(f))
            }
            Some(k) => self.memfd_get(&(r.id, *k, r.plain_len)).map(Served::Memfd),
        }
    }

    fn fetch(&self, r: &Request) -> Result<Served, Refusal> {
        let encrypted = r.key.is_some();
        let stored = self.stored(&r.id, encrypted)?;
        let plain = {
            let _slot = self
                .fetches
                .acquire()
                .ok_or_else(|| internal("fetch slots", "poisoned"))?;
            decode(&r.id, &stored, r.key.as_ref(), r.plain_len)?
        };
        drop(stored);
        if let Some(k) = r.key {
            let fd = Arc::new(sealed_memfd(&plain).map_err(|e| internal("memfd", e))?);
            self.memfd_put((r.id, k, r.plain_len), fd.clone());
            return Ok(Served::Memfd(fd));
        }
        if let Err(e) = self.cache.put_plain(&r.id, &plain) {
            tracing::warn!(chunk = %r.id, error = %e, "could not cache plaintext");
        }
        match self.cache.plain_file(&r.id, r.plain_len) {
            Some(f) if is_read_only(&f) => Ok(Served::File(f)),
            // No read-only descriptor of the cache file (e.g. no /proc): a sealed copy.
            _ => Ok(Served::Memfd(Arc::new(
                sealed_memfd(&plain).map_err(|e| internal("memfd", e))?,
            ))),
        }
    }

    /// Answers one request: the response and the descriptor to send with it.
    pub fn handle(&self, r: &Request) -> (Response, Option<Served>) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let served = self.serve(r).map(|s| (s, 0, r.plain_len));
        self.answer(r.seq, served, || format!("chunk {}", r.id))
    }

    /// Answers a request of any operation.
    pub fn handle_any(&self, r: &AnyRequest) -> (Response, Option<Served>) {
        match r {
            AnyRequest::Chunk { req, .. } => self.handle(req),
            AnyRequest::Block(b) => {
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                let served = self.serve_block(b);
                self.answer(b.seq, served, || {
                    format!("chunk {} block {}", b.id, b.index)
                })
            }
        }
    }

    fn answer(
        &self,
        seq: u32,
        served: Result<(Served, u64, u32), Refusal>,
        what: impl Fn() -> String,
    ) -> (Response, Option<Served>) {
        match served {
            // `at`: where the answer's plaintext starts in the plaintext the descriptor holds
            // (a block of a whole chunk's plaintext).
            Ok((served, at, len)) => {
                self.stats.served.fetch_add(1, Ordering::Relaxed);
                let (kind, offset) = match &served {
                    Served::File(_) => (FdKind::CacheFile, ChunkCache::PLAIN_OFFSET + at),
                    Served::Memfd(_) => (FdKind::Memfd, at),
                };
                (
                    Response::Ok {
                        seq,
                        kind,
                        offset,
                        len,
                    },
                    Some(served),
                )
            }
            Err(Refusal(code, msg)) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(what = %what(), ?code, error = %msg, "refused");
                (Response::error(seq, code, msg), None)
            }
        }
    }

    /// The verified table of the chunk of block request `r`: the one it carries (which must
    /// hash to the id), else one read from the stores before (kept), else read now with one
    /// ranged read (verified against the id).
    fn block_table(&self, r: &BlockRequest) -> Result<Arc<Table>, Refusal> {
        let (id, bs, len) = (&r.id, r.block_size, r.plain_len);
        check_block_size(bs).map_err(|e| {
            Refusal(
                ErrorCode::BadRequest,
                format!("chunk {id} block {}: {e}", r.index),
            )
        })?;
        if !r.table.is_empty() {
            return Table::parse(id, bs, len, &r.table)
                .map(Arc::new)
                .map_err(|e| Refusal(ErrorCode::BadRequest, format!("block {}: {e}", r.index)));
        }
        let known = self.tables.lock().ok().and_then(|t| t.0.get(id).cloned());
        if let Some(t) = known.filter(|t| t.block_size == bs && t.plain_len == len) {
            return Ok(t);
        }
        let tl = table_len(bs, len) as u32;
        let bytes = {
            let _slot = self
                .fetches
                .acquire()
                .ok_or_else(|| internal("fetch slots", "poisoned"))?;
            self.router
                .get_range(id, 0, tl, &|b| Table::parse(id, bs, len, b).map(drop))
                .map_err(|e| {
                    let Refusal(code, m) = e.into();
                    Refusal(code, format!("block table: {m}"))
                })?
        };
        let table = Arc::new(
            Table::parse(id, bs, len, &bytes)
                .map_err(|e| Refusal(ErrorCode::BadChunk, format!("block {}: {e}", r.index)))?,
        );
        if let Ok(mut tables) = self.tables.lock() {
            let (map, blocks) = &mut *tables;
            if *blocks + table.blocks.len() > MAX_TABLE_BLOCKS {
                map.clear();
                *blocks = 0;
            }
            if let Some(old) = map.insert(*id, table.clone()) {
                *blocks -= old.blocks.len();
            }
            *blocks += table.blocks.len();
        }
        Ok(table)
    }

    /// The answer to a block request: its block's plaintext, from the cache (or the memfd
    /// LRU; or part of the whole chunk's plaintext there), else fetched with one ranged read
    /// of exactly the block's stored bytes as the verified table places them, verified
    /// against the table's hash and decoded.
    fn serve_block(&self, r: &BlockRequest) -> Result<(Served, u64, u32), Refusal> {
        let table = self.block_table(r)?;
        let i = r.index as usize;
        let Some(b) = table.blocks.get(i) else {
            return Err(Refusal(
                ErrorCode::BadRequest,
                format!(
                    "chunk {}: no block {i} (the chunk has {})",
                    r.id,
                    table.blocks.len()
                ),
            ));
        };
        let key = block_key(&r.id, i);
        let len = b.plain_len;
        let ready = |fetcher: &Self| match &r.key {
            None => fetcher
                .cache
                .plain_file(&key, len)
                .filter(|f| is_read_only(f))
                .map(Served::File),
            Some(k) => fetcher.memfd_get(&(key, *k, len)).map(Served::Memfd),
        };
        if let Some(s) = ready(self) {
            return Ok((s, 0, len));
        }
        // The whole chunk's plaintext at hand (another vmm read it whole): the block is part
        // of it. Its length is the one the verified table gives (it commits to the sizes).
        let whole = Request {
            seq: r.seq,
            id: r.id,
            plain_len: r.plain_len,
            key: r.key,
        };
        if let Some(s) = self.ready(&whole) {
            return Ok((s, i as u64 * u64::from(table.block_size), len));
        }
        let lock = self
            .chunk_lock(&key)
            .ok_or_else(|| internal("chunk locks", "poisoned"))?;
        let result = {
            let _held = lock.lock();
            match ready(self) {
                Some(s) => Ok(s),
                None => self.fetch_block(r, &table, i, &key),
            }
        };
        self.chunk_unlock(&key, lock);
        result.map(|s| (s, 0, len))
    }

    fn fetch_block(
        &self,
        r: &BlockRequest,
        table: &Table,
        i: usize,
        key: &ChunkId,
    ) -> Result<Served, Refusal> {
        let b = &table.blocks[i];
        let start = i as u64 * u64::from(table.block_size);
        let name = || {
            format!(
                "block {i} (chunk bytes {start}..{})",
                start + u64::from(b.plain_len)
            )
        };
        // An encrypted block may be in the cache as stored (named by its hash).
        let cached = r.key.and_then(|_| self.cache.get(&ChunkId(b.hash)));
        let from_store = cached.is_none();
        let stored = match cached {
            Some(s) => s,
            None => {
                let check = |bytes: &[u8]| -> crate::error::Result<()> {
                    if bytes.len() != b.len as usize || blake3::hash(bytes).as_bytes() != &b.hash {
                        return Err(Error::BadChunk {
                            id: r.id.to_hex(),
                            reason: format!("{}: hash mismatch", name()),
                        });
                    }
                    Ok(())
                };
                let _slot = self
                    .fetches
                    .acquire()
                    .ok_or_else(|| internal("fetch slots", "poisoned"))?;
                let bytes = self
                    .router
                    .get_range(&r.id, b.offset, b.len, &check)
                    .map_err(|e| {
                        let Refusal(code, m) = e.into();
                        Refusal(code, format!("{}: {m}", name()))
                    })?;
                self.stats.blocks_fetched.fetch_add(1, Ordering::Relaxed);
                bytes
            }
        };
        let plain = {
            let _slot = self
                .fetches
                .acquire()
                .ok_or_else(|| internal("fetch slots", "poisoned"))?;
            table.decode_block(&r.id, i, &stored, r.key.as_ref())?
        };
        if let Some(k) = r.key {
            if from_store {
                // Encrypted blocks stay encrypted at rest, as stored.
                if let Err(e) = self.cache.put(&ChunkId(b.hash), &stored) {
                    tracing::warn!(chunk = %r.id, block = i, error = %e, "could not cache block");
                }
            }
            let fd = Arc::new(sealed_memfd(&plain).map_err(|e| internal("memfd", e))?);
            self.memfd_put((*key, k, b.plain_len), fd.clone());
            return Ok(Served::Memfd(fd));
        }
        if let Err(e) = self.cache.put_plain(key, &plain) {
            tracing::warn!(chunk = %r.id, block = i, error = %e, "could not cache block");
        }
        match self.cache.plain_file(key, b.plain_len) {
            Some(f) if is_read_only(&f) => Ok(Served::File(f)),
            _ => Ok(Served::Memfd(Arc::new(
                sealed_memfd(&plain).map_err(|e| internal("memfd", e))?,
            ))),
        }
    }
}

/// A descriptor to send with a response (kept alive until sent).
pub enum Served {
    File(Arc<File>),
    Memfd(Arc<OwnedFd>),
}

impl Served {
    pub fn raw(&self) -> i32 {
        match self {
            Served::File(f) => f.as_raw_fd(),
            Served::Memfd(fd) => fd.as_raw_fd(),
        }
    }
}

/// The peer's (pid, uid, gid), from SO_PEERCRED.
pub fn peer_credentials(s: &UnixStream) -> Option<(i32, u32, u32)> {
    // SAFETY: a zeroed ucred is valid; getsockopt writes at most `len` bytes into it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some((cred.pid, cred.uid, cred.gid))
}

/// Why a connection ends.
enum FrameError {
    /// The client closed the connection between frames.
    Closed,
    Io(io::Error),
    Bad(Response),
}

/// Reads one request frame: waits as long as needed for its first byte, then at most
/// FRAME_TIMEOUT for the rest.
fn read_request(s: &mut UnixStream) -> Result<AnyRequest, FrameError> {
    let mut header = [0u8; 4];
    s.set_read_timeout(None).map_err(FrameError::Io)?;
    let n = loop {
        match s.read(&mut header[..1]) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FrameError::Io(e)),
        }
    };
    if n == 0 {
        return Err(FrameError::Closed);
    }
    s.set_read_timeout(Some(FRAME_TIMEOUT))
        .map_err(FrameError::Io)?;
    s.read_exact(&mut header[1..]).map_err(FrameError::Io)?;
    let len = request_frame_len(header)
        .map_err(|e| FrameError::Bad(Response::error(0, ErrorCode::BadRequest, e)))?;
    // Bounded above: at most MAX_REQUEST_FRAME bytes.
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(FrameError::Io)?;
    AnyRequest::decode(&body).map_err(|e| {
        let code = match e {
            super::protocol::ProtocolError::Version(_) => ErrorCode::Version,
            _ => ErrorCode::BadRequest,
        };
        FrameError::Bad(Response::error(0, code, e))
    })
}

/// Serves one connection until the client closes it or misbehaves.
fn serve_connection(fetcher: &Fetcher, mut s: UnixStream, peer: &str) {
    if let Err(e) = s.set_write_timeout(Some(WRITE_TIMEOUT)) {
        tracing::warn!(peer, error = %e, "cannot set a write timeout");
        return;
    }
    loop {
        let req = match read_request(&mut s) {
            Ok(r) => r,
            Err(FrameError::Closed) => return,
            Err(FrameError::Io(e)) => {
                tracing::info!(peer, error = %e, "connection dropped");
                return;
            }
            Err(FrameError::Bad(resp)) => {
                tracing::warn!(peer, response = ?resp, "bad request: closing the connection");
                let _ = send_with_fd(s.as_raw_fd(), &resp.encode(), None);
                return;
            }
        };
        let (resp, fd) = fetcher.handle_any(&req);
        let raw = fd.as_ref().map(Served::raw);
        if let Err(e) = send_with_fd(s.as_raw_fd(), &resp.encode_as(req.version()), raw) {
            tracing::info!(peer, error = %e, "client went away before its answer");
            return;
        }
    }
}

/// Accepts connections on `listener` forever, one thread each, at most
/// `config.max_connections` at once (the ones over it are answered `Busy` and closed).
pub fn run(listener: UnixListener, fetcher: Arc<Fetcher>) -> io::Result<()> {
    for conn in listener.incoming() {
        let s = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                // Out of descriptors and the like: do not spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let peer = match peer_credentials(&s) {
            Some((pid, uid, gid)) => format!("pid={pid} uid={uid} gid={gid}"),
            None => "unknown".to_string(),
        };
        let n = fetcher.connections.fetch_add(1, Ordering::SeqCst);
        if n >= fetcher.config.max_connections {
            fetcher.connections.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(peer, "too many connections: refused");
            let busy = Response::error(0, ErrorCode::Busy, "too many connections");
            let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = send_with_fd(s.as_raw_fd(), &busy.encode(), None);
            continue;
        }
        tracing::info!(peer, connections = n + 1, "client connected");
        let f = fetcher.clone();
        let spawned = std::thread::Builder::new()
            .name("fetcher-conn".into())
            .spawn(move || {
                serve_connection(&f, s, &peer);
                f.connections.fetch_sub(1, Ordering::SeqCst);
                tracing::debug!(peer, "client disconnected");
            });
        if let Err(e) = spawned {
            fetcher.connections.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(error = %e, "cannot start a connection thread");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::client::FetcherClient;
    use super::super::protocol::frame_len;
    use super::super::FetcherError;
    use super::*;
    use crate::chunk::encode;
    use crate::meta::ChunkRef;
    use crate::store::{DirStore, Store};

    struct Setup {
        _tmp: tempfile::TempDir,
        sock: std::path::PathBuf,
        plain: ChunkRef,
        secret: ChunkRef,
    }

    /// An in-process server over a dir store holding one plain and one encrypted chunk.
    fn setup(config: ServerConfig) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::open(&format!("dir://{}", tmp.path().join("s").display())).unwrap();
        let mut refs = Vec::new();
        for (data, encrypt) in [(vec![1u8; 70_000], false), (vec![2u8; 50_000], true)] {
            let e = encode(&data, encrypt).unwrap();
            store.put(&e.id, &e.stored).unwrap();
            refs.push(ChunkRef {
                id: e.id,
                offset: 0,
                size: data.len() as u32,
                key: e.key,
            });
        }
        let cache =
            Arc::new(ChunkCache::open_indexed(&tmp.path().join("cache"), 1 << 30, None).unwrap());
        let router = Router::new(vec![(0, 255, Arc::new(store) as Arc<dyn Store>)]);
        let fetcher = Arc::new(Fetcher::new(router, cache, config));
        let sock = tmp.path().join("sock");
        let listener = UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || run(listener, fetcher));
        Setup {
            _tmp: tmp,
            sock,
            secret: refs.pop().unwrap(),
            plain: refs.pop().unwrap(),
        }
    }

    fn read_whole(s: &super::super::client::Served) -> Vec<u8> {
        let mut b = vec![0u8; s.len() as usize];
        s.read_at(0, &mut b).unwrap();
        b
    }

    #[test]
    fn descriptors_are_read_only_or_sealed_and_keys_are_checked() {
        let s = setup(ServerConfig::default());
        let client = FetcherClient::connect(&s.sock, 1).unwrap();
        let plain = client.chunk(&s.plain).unwrap();
        assert_eq!(read_whole(&plain), vec![1u8; 70_000]);
        let secret = client.chunk(&s.secret).unwrap();
        assert_eq!(read_whole(&secret), vec![2u8; 50_000]);
        // What the client holds: a read-only cache file, a fully sealed memfd.
        let fds = plain_and_secret_fds(&client, &s);
        // SAFETY: fcntl queries on descriptors we hold.
        let (fl, seals) = unsafe {
            (
                libc::fcntl(fds.0, libc::F_GETFL),
                libc::fcntl(fds.1, libc::F_GET_SEALS),
            )
        };
        assert_eq!(fl & libc::O_ACCMODE, libc::O_RDONLY);
        let all = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        assert_eq!(seals & all, all);
        // Knowing an encrypted chunk's id is not enough: a wrong key is refused even though
        // the right one's plaintext is at hand in the fetcher.
        let mut wrong = s.secret.clone();
        wrong.key = Some([0u8; 32]);
        match client.chunk(&wrong) {
            Err(FetcherError::Refused { code, .. }) => assert_eq!(code, ErrorCode::BadChunk),
            other => panic!("{other:?}"),
        }
        // Nor is a wrong length, or no key at all.
        let mut short = s.plain.clone();
        short.size -= 1;
        assert!(client.chunk(&short).is_err());
        let mut keyless = s.secret.clone();
        keyless.key = None;
        assert!(client.chunk(&keyless).is_err());
        // The client still works after refusals.
        assert_eq!(
            read_whole(&client.chunk(&s.plain).unwrap()),
            vec![1u8; 70_000]
        );
    }

    /// Raw descriptors of the plain and the secret chunk as a fresh exchange returns them.
    fn plain_and_secret_fds(client: &FetcherClient, s: &Setup) -> (i32, i32) {
        let p = client.chunk(&s.plain).unwrap();
        let q = client.chunk(&s.secret).unwrap();
        (p.raw_fd(), q.raw_fd())
    }

    #[test]
    fn connections_over_the_bound_are_told_busy() {
        let s = setup(ServerConfig {
            max_connections: 1,
            ..ServerConfig::default()
        });
        let first = FetcherClient::connect(&s.sock, 1).unwrap();
        assert!(first.chunk(&s.plain).is_ok());
        let mut second = UnixStream::connect(&s.sock).unwrap();
        second
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut header = [0u8; 4];
        second.read_exact(&mut header).unwrap();
        let mut body = vec![0u8; frame_len(header).unwrap()];
        second.read_exact(&mut body).unwrap();
        assert!(matches!(
            Response::decode(&body).unwrap(),
            Response::Err {
                code: ErrorCode::Busy,
                ..
            }
        ));
        // The first connection is not disturbed.
        assert!(first.chunk(&s.secret).is_ok());
    }

    /// Blocks of a blocked chunk in a dir store, through an in-process fetcher: one block
    /// fetched per cold block request (never the chunk), served again from the cache; a
    /// table of the wrong chunk, an index past it, a wrong key are refused; the table may
    /// also come from the store (read once, kept).
    #[test]
    fn blocks_are_fetched_one_by_one_and_checked() {
        use crate::chunk::blocks::{encode_blocked, table_len};
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::open(&format!("dir://{}", tmp.path().join("s").display())).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (bs, len) = (8192u32, data.len() as u32);
        let mut chunks = Vec::new();
        for encrypt in [false, true] {
            let e = encode_blocked(&data, bs, encrypt).unwrap();
            store.put(&e.id, &e.stored).unwrap();
            let table = e.stored[..table_len(bs, len)].to_vec();
            let c = ChunkRef {
                id: e.id,
                offset: 0,
                size: len,
                key: e.key,
            };
            chunks.push((c, table));
        }
        let cache =
            Arc::new(ChunkCache::open_indexed(&tmp.path().join("cache"), 1 << 30, None).unwrap());
        let router = Router::new(vec![(0, 255, Arc::new(store) as Arc<dyn Store>)]);
        let fetcher = Arc::new(Fetcher::new(router, cache, ServerConfig::default()));
        let sock = tmp.path().join("sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let f = fetcher.clone();
        std::thread::spawn(move || run(listener, f));
        let stat = |s: &AtomicU64| s.load(Ordering::SeqCst);
        let mut fetched_blocks = 0;
        for (c, table) in &chunks {
            let client = FetcherClient::connect(&sock, 2).unwrap();
            // The last block is short.
            let last = len.div_ceil(bs) - 1;
            for (i, blen) in [(3u32, bs), (last, len - last * bs)] {
                let got = client.block(c, bs, i, blen, table).unwrap();
                fetched_blocks += 1;
                assert_eq!(stat(&fetcher.stats.blocks_fetched), fetched_blocks);
                let mut b = vec![0u8; blen as usize];
                got.read_at(0, &mut b).unwrap();
                let at = (i * bs) as usize;
                assert_eq!(b, &data[at..at + blen as usize]);
                // Another client: from the cache (or the memfds), nothing fetched.
                let again = FetcherClient::connect(&sock, 1).unwrap();
                let mut b2 = vec![0u8; blen as usize];
                again
                    .block(c, bs, i, blen, table)
                    .unwrap()
                    .read_at(0, &mut b2)
                    .unwrap();
                assert_eq!(b2, b);
                assert_eq!(stat(&fetcher.stats.blocks_fetched), fetched_blocks);
            }
            // Refused: the other chunk's table, an index past the table.
            let other = &chunks.iter().find(|(o, _)| o.id != c.id).unwrap().1;
            let refused = |r: Result<_, FetcherError>| match r {
                Err(FetcherError::Refused { code, message }) => (code, message),
                other => panic!("{other:?}"),
            };
            let (code, m) = refused(client.block(c, bs, 0, bs, other));
            assert_eq!(code, ErrorCode::BadRequest, "{m}");
            assert!(m.contains("block table hash mismatch"), "{m}");
            let (code, m) = refused(client.block(c, bs, last + 1, 1, table));
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(m.contains(&format!("no block {}", last + 1)), "{m}");
            // (A length the table does not give: the client refuses the answer.)
            assert!(matches!(
                client.block(c, bs, 0, bs - 1, table),
                Err(FetcherError::BadDescriptor(_))
            ));
            fetched_blocks += 1;
            // The table from the store: read once (verified), then kept.
            let fresh = FetcherClient::connect(&sock, 1).unwrap();
            fresh.block(c, bs, 5, bs, &[]).unwrap();
            fresh.block(c, bs, 6, bs, &[]).unwrap();
            fetched_blocks += 2;
            assert_eq!(stat(&fetcher.stats.blocks_fetched), fetched_blocks);
        }
        // An encrypted chunk's block with a wrong key: refused, though it is at hand.
        let (c, table) = &chunks[1];
        let mut wrong = c.clone();
        wrong.key = Some([0u8; 32]);
        let client = FetcherClient::connect(&sock, 1).unwrap();
        match client.block(&wrong, bs, 3, bs, table) {
            Err(FetcherError::Refused { code, .. }) => assert_eq!(code, ErrorCode::BadChunk),
            other => panic!("{other:?}"),
        }
        // No whole chunk was ever fetched.
        assert_eq!(stat(&fetcher.stats.fetched), 0);
    }
}
