//! The vmm's side: a pool of sockets connected at start, each owned by an I/O thread of the
//! client (so the threads that read chunks — a vmm's virtio-fs workers — make no socket
//! calls at all: they hand a request over and wait, then `pread` the descriptor they get),
//! and a bounded LRU of received descriptors (whole chunks, and blocks of blocked chunks).

use super::protocol::{frame_len, BlockRequest, FdKind, Request, Response, MAX_FRAME};
use super::{recv_with_fds, send_with_fd, FetcherError};
use crate::chunk::blocks::block_key;
use crate::chunk::ChunkId;
use crate::meta::ChunkRef;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Sockets (and I/O threads) per client.
pub const DEFAULT_POOL: usize = 4;
/// Received descriptors kept open.
pub const MAX_OPEN_CHUNKS: usize = 256;
/// How long a reader waits for an answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an I/O thread waits for the fetcher's answer on its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(110);

/// A chunk's plaintext as served: `len` bytes at `offset` of `file`.
#[derive(Debug)]
pub struct Served {
    file: File,
    offset: u64,
    len: u32,
}

impl Served {
    /// Reads `buf.len()` plaintext bytes at `from`.
    pub fn read_at(&self, from: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let (file, at) = self.part(from, buf.len() as u64)?;
        file.read_exact_at(buf, at)
    }

    /// Where plaintext bytes `[from, from + len)` are: the descriptor and the offset in it.
    pub fn part(&self, from: u64, len: u64) -> std::io::Result<(&File, u64)> {
        let end = from.checked_add(len);
        if end.is_none_or(|e| e > u64::from(self.len)) {
            return Err(std::io::Error::other("read past the end of the chunk"));
        }
        Ok((&self.file, self.offset + from))
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The descriptor (for checks: its flags, seals).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

type Answer = Result<Arc<Served>, FetcherError>;

/// A request of either operation.
#[derive(Clone, Debug)]
enum Ask {
    Chunk(Request),
    Block(BlockRequest, u32),
}

impl Ask {
    fn encode(&self) -> Vec<u8> {
        match self {
            Ask::Chunk(r) => r.encode(),
            Ask::Block(b, _) => b.encode(),
        }
    }
    fn seq(&self) -> u32 {
        match self {
            Ask::Chunk(r) => r.seq,
            Ask::Block(b, _) => b.seq,
        }
    }
    /// The plaintext length the answer must have.
    fn len(&self) -> u32 {
        match self {
            Ask::Chunk(r) => r.plain_len,
            Ask::Block(_, len) => *len,
        }
    }
}

/// Where an I/O thread puts the answer to a job.
type Slot = Arc<(Mutex<Option<Answer>>, Condvar)>;

struct Job {
    req: Ask,
    slot: Slot,
}

struct Queue {
    jobs: Mutex<(VecDeque<Job>, bool)>,
    cv: Condvar,
}

type Key = (ChunkId, u32, Option<[u8; 32]>);

#[derive(Default)]
struct Open {
    chunks: HashMap<Key, (Arc<Served>, u64)>,
    clock: u64,
}

/// A connection pool to the chunk fetcher, with its descriptor LRU.
/// What an I/O thread runs first.
pub type ThreadStart = crate::ThreadStart;

pub struct FetcherClient {
    path: PathBuf,
    queue: Arc<Queue>,
    open: Mutex<Open>,
    seq: std::sync::atomic::AtomicU32,
}

fn connect(path: &Path) -> Result<UnixStream, FetcherError> {
    let s = UnixStream::connect(path).map_err(|source| FetcherError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(SOCKET_TIMEOUT))?;
    s.set_write_timeout(Some(SOCKET_TIMEOUT))?;
    Ok(s)
}

/// Sends `req` on `s` and reads its answer.
fn exchange(s: &UnixStream, req: &Ask) -> Answer {
    send_with_fd(s.as_raw_fd(), &req.encode(), None)?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = recv_with_fds(s.as_raw_fd(), &mut header[got..], &mut fds)?;
        if n == 0 {
            return Err(FetcherError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        got += n;
    }
    let len = frame_len(header)?;
    let mut body = [0u8; MAX_FRAME];
    let mut got = 0;
    while got < len {
        let n = recv_with_fds(s.as_raw_fd(), &mut body[got..len], &mut fds)?;
        if n == 0 {
            return Err(FetcherError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        got += n;
    }
    match Response::decode(&body[..len])? {
        Response::Err { code, message, .. } => Err(FetcherError::Refused { code, message }),
        Response::Ok {
            seq,
            kind,
            offset,
            len,
        } => {
            if seq != req.seq() || len != req.len() {
                return Err(FetcherError::BadDescriptor(format!(
                    "answer (seq {seq}, {len} bytes) does not match the request (seq {}, {} bytes)",
                    req.seq(),
                    req.len()
                )));
            }
            if fds.len() != 1 {
                return Err(FetcherError::BadDescriptor(format!(
                    "{} descriptors instead of one",
                    fds.len()
                )));
            }
            let file = File::from(fds.remove(0));
            let m = file.metadata()?;
            let need = offset
                .checked_add(u64::from(len))
                .ok_or_else(|| FetcherError::BadDescriptor("offset overflow".into()))?;
            if !m.is_file() || m.len() < need {
                return Err(FetcherError::BadDescriptor(format!(
                    "{kind:?} of {} bytes cannot hold {len} bytes at {offset}",
                    m.len()
                )));
            }
            debug_assert!(matches!(kind, FdKind::CacheFile | FdKind::Memfd));
            Ok(Arc::new(Served { file, offset, len }))
        }
    }
}

/// An I/O thread: takes jobs, exchanges them on its socket (reconnecting once when the
/// connection broke), hands the answers back.
fn io_thread(path: PathBuf, mut sock: Option<UnixStream>, queue: Arc<Queue>) {
    loop {
        let job = {
            let Ok(mut q) = queue.jobs.lock() else { return };
            loop {
                if q.1 {
                    return;
                }
                if let Some(j) = q.0.pop_front() {
                    break j;
                }
                q = match queue.cv.wait(q) {
                    Ok(q) => q,
                    Err(_) => return,
                };
            }
        };
        let mut answer = match &sock {
            Some(s) => exchange(s, &job.req),
            None => Err(FetcherError::Closed),
        };
        if matches!(answer, Err(FetcherError::Io(_) | FetcherError::Closed)) {
            // The fetcher restarted, or the socket broke: one new connection, one retry.
            sock = connect(&path).ok();
            if let Some(s) = &sock {
                answer = exchange(s, &job.req);
            }
        }
        if matches!(
            answer,
            Err(FetcherError::Io(_) | FetcherError::Protocol(_) | FetcherError::BadDescriptor(_))
        ) {
            // The stream may be out of step: start afresh next time.
            sock = None;
        }
        let (m, cv) = &*job.slot;
        if let Ok(mut a) = m.lock() {
            *a = Some(answer);
            cv.notify_all();
        };
    }
}

impl FetcherClient {
    /// Connects `pool` sockets to the fetcher at `path` now (fails when it cannot), each
    /// served by an I/O thread.
    pub fn connect(path: &Path, pool: usize) -> Result<Self, FetcherError> {
        Self::connect_with(path, pool, None)
    }

    /// As [`FetcherClient::connect`]; each I/O thread first runs `on_start` (a vmm installs
    /// the thread's seccomp filter there) and ends if it fails.
    pub fn connect_with(
        path: &Path,
        pool: usize,
        on_start: Option<ThreadStart>,
    ) -> Result<Self, FetcherError> {
        let queue = Arc::new(Queue {
            jobs: Mutex::new((VecDeque::new(), false)),
            cv: Condvar::new(),
        });
        let mut socks = Vec::new();
        for _ in 0..pool.max(1) {
            socks.push(connect(path)?);
        }
        for s in socks {
            let (p, q) = (path.to_path_buf(), queue.clone());
            let on_start = on_start.clone();
            std::thread::Builder::new()
                .name("fetcher-io".into())
                .spawn(move || {
                    if let Some(start) = on_start {
                        if let Err(e) = start() {
                            tracing::error!("fetcher-io: not starting: {e}");
                            return;
                        }
                    }
                    io_thread(p, Some(s), q)
                })?;
        }
        Ok(FetcherClient {
            path: path.to_path_buf(),
            queue,
            open: Mutex::new(Open::default()),
            seq: Default::default(),
        })
    }

    /// The socket this client talks to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lookup(&self, k: &Key) -> Option<Arc<Served>> {
        let mut open = self.open.lock().ok()?;
        open.clock += 1;
        let now = open.clock;
        let (s, used) = open.chunks.get_mut(k)?;
        *used = now;
        Some(s.clone())
    }

    fn keep(&self, k: Key, s: Arc<Served>) {
        let Ok(mut open) = self.open.lock() else {
            return;
        };
        if open.chunks.len() >= MAX_OPEN_CHUNKS && !open.chunks.contains_key(&k) {
            if let Some(old) = open
                .chunks
                .iter()
                .min_by_key(|(_, (_, u))| *u)
                .map(|(k, _)| *k)
            {
                open.chunks.remove(&old);
            }
        }
        open.clock += 1;
        let now = open.clock;
        open.chunks.insert(k, (s, now));
    }

    /// Whether the descriptor of `c` is at hand.
    pub fn has(&self, c: &ChunkRef) -> bool {
        self.lookup(&(c.id, c.size, c.key)).is_some()
    }

    /// The served plaintext of chunk `c` (from the LRU, else asked of the fetcher).
    pub fn chunk(&self, c: &ChunkRef) -> Result<Arc<Served>, FetcherError> {
        let k = (c.id, c.size, c.key);
        if let Some(s) = self.lookup(&k) {
            return Ok(s);
        }
        let req = Request {
            seq: self.next_seq(),
            id: c.id,
            plain_len: c.size,
            key: c.key,
        };
        let served = self.ask(Ask::Chunk(req))?;
        self.keep(k, served.clone());
        Ok(served)
    }

    /// The served plaintext of block `index` of blocked chunk `c` (blocks of `block_size`,
    /// `block_len` plaintext bytes), from the LRU, else asked of the fetcher with the chunk's
    /// block `table` (the image's; empty: the fetcher reads it from its stores).
    pub fn block(
        &self,
        c: &ChunkRef,
        block_size: u32,
        index: u32,
        block_len: u32,
        table: &[u8],
    ) -> Result<Arc<Served>, FetcherError> {
        self.blocks(c, block_size, &[(index, block_len)], table)
            .pop()
            .unwrap_or(Err(FetcherError::Closed))
    }

    /// As [`FetcherClient::block`] for each (index, plaintext length) of `wanted`, asked at
    /// once (answered in parallel by the pool's sockets); the answers in the same order.
    pub fn blocks(
        &self,
        c: &ChunkRef,
        block_size: u32,
        wanted: &[(u32, u32)],
        table: &[u8],
    ) -> Vec<Result<Arc<Served>, FetcherError>> {
        let asked: Vec<_> = wanted
            .iter()
            .map(|&(index, block_len)| {
                let k = (block_key(&c.id, index as usize), block_len, c.key);
                if let Some(s) = self.lookup(&k) {
                    return (k, Ok(Ok(s)));
                }
                let req = BlockRequest {
                    seq: self.next_seq(),
                    id: c.id,
                    plain_len: c.size,
                    block_size,
                    index,
                    key: c.key,
                    table: table.to_vec(),
                };
                (k, self.submit(Ask::Block(req, block_len)).map(Err))
            })
            .collect();
        asked
            .into_iter()
            .map(|(k, a)| {
                let served = match a? {
                    Ok(s) => return Ok(s),
                    Err(slot) => Self::wait(&slot)?,
                };
                self.keep(k, served.clone());
                Ok(served)
            })
            .collect()
    }

    fn next_seq(&self) -> u32 {
        self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Hands `req` to an I/O thread and waits for its answer.
    fn ask(&self, req: Ask) -> Result<Arc<Served>, FetcherError> {
        Self::wait(&self.submit(req)?)
    }

    /// Hands `req` to an I/O thread; its answer comes in the slot returned.
    fn submit(&self, req: Ask) -> Result<Slot, FetcherError> {
        let slot = Arc::new((Mutex::new(None), Condvar::new()));
        let mut q = self.queue.jobs.lock().map_err(|_| FetcherError::Closed)?;
        q.0.push_back(Job {
            req,
            slot: slot.clone(),
        });
        self.queue.cv.notify_one();
        Ok(slot)
    }

    /// Waits for the answer in `slot`.
    fn wait(slot: &Slot) -> Result<Arc<Served>, FetcherError> {
        let (m, cv) = &**slot;
        let guard = m.lock().map_err(|_| FetcherError::Closed)?;
        let (mut guard, _) = cv
            .wait_timeout_while(guard, ANSWER_TIMEOUT, |a| a.is_none())
            .map_err(|_| FetcherError::Closed)?;
        guard.take().ok_or_else(|| {
            FetcherError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer from the chunk fetcher",
            ))
        })?
    }
}

impl Drop for FetcherClient {
    fn drop(&mut self) {
        if let Ok(mut q) = self.queue.jobs.lock() {
            q.1 = true;
            self.queue.cv.notify_all();
        }
    }
}
