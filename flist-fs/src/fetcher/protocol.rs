//! The wire format between a vmm and the chunk fetcher (see the module documentation of
//! [`super`] for the exchange and the threat model).
//!
//! Every message is a frame: a little-endian `u32` body length, then the body. A response
//! body is at most [`MAX_FRAME`] bytes, a request body at most [`MAX_REQUEST_FRAME`] (a block
//! request carries a block table); the length is checked before the body is read. A body's
//! layout is fixed by its first byte, the protocol version, and its operation:
//!
//! ```text
//! version 1 (whole chunks; also accepted as version 2):
//! request  = version:u8 op:u8(=1 GET_CHUNK) seq:u32 id:[32] plain_len:u32 has_key:u8(0|1) [key:[32]]
//! version 2 adds one operation (blocks of a blocked chunk, see crate::chunk::blocks):
//! request  = version:u8(=2) op:u8(=2 GET_BLOCK) seq:u32 id:[32] plain_len:u32 block_size:u32
//!            index:u32 has_key:u8(0|1) [key:[32]] table_len:u32 table:[table_len]
//! response = version:u8 seq:u32 status:u8(0 = ok)      (version: the request's)
//!            ok:    kind:u8(1 = cache file, 2 = sealed memfd) offset:u64 len:u32   + 1 descriptor
//!            error: msg_len:u16 msg:[msg_len] (UTF-8, at most MAX_MESSAGE bytes)
//! ```
//!
//! A request's body length must be exactly what its fields need; `plain_len` must be in
//! `1..=MAX_CHUNK_SIZE`; a block request's `table_len` at most [`MAX_TABLE_LEN`] (0: the
//! fetcher reads the table from its stores). Whether the table hashes to the id, agrees with
//! `block_size` and `plain_len`, and has a block `index` is the fetcher's to check
//! ([`crate::chunk::blocks::Table::parse`]). The plaintext (of the chunk, or of the block:
//! `len` is then the block's plaintext length) is the `len` bytes at `offset` of the
//! descriptor passed with an ok response (`SCM_RIGHTS`, one descriptor, read-only).

use crate::chunk::blocks::MAX_TABLE_LEN;
use crate::chunk::{ChunkId, MAX_CHUNK_SIZE};

/// The newest protocol version this build speaks (it answers version 1 whole-chunk requests
/// too, in version 1).
pub const VERSION: u8 = 2;
/// The oldest version still answered (whole-chunk requests only).
pub const MIN_VERSION: u8 = 1;
/// Largest response body, and largest request body of a whole-chunk request.
pub const MAX_FRAME: usize = 256;
/// Longest error message (bytes); longer ones are cut at a character boundary.
pub const MAX_MESSAGE: usize = 200;
/// A whole chunk (versions 1 and 2).
pub const OP_GET_CHUNK: u8 = 1;
/// One block of a blocked chunk (version 2).
pub const OP_GET_BLOCK: u8 = 2;

const REQ_BASE: usize = 1 + 1 + 4 + 32 + 4 + 1;
const REQ_KEYED: usize = REQ_BASE + 32;
/// A block request without its table, keyed.
const BLOCK_REQ_FIXED: usize = REQ_KEYED + 4 + 4 + 4;
/// Largest request body: a keyed block request with the largest table.
pub const MAX_REQUEST_FRAME: usize = BLOCK_REQ_FIXED + MAX_TABLE_LEN;

/// What went wrong with a frame.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {0} bytes, more than the {MAX_FRAME} allowed")]
    FrameTooLarge(usize),
    #[error("truncated frame: {got} of {need} bytes")]
    Truncated { got: usize, need: usize },
    #[error("unsupported protocol version {0} (this side speaks {MIN_VERSION}..={VERSION})")]
    Version(u8),
    #[error("block table of {0} bytes, more than the {MAX_TABLE_LEN} allowed")]
    TableTooLarge(usize),
    #[error("unknown operation {0}")]
    Op(u8),
    #[error("{field}: invalid value {value}")]
    Field { field: &'static str, value: u64 },
    #[error("frame body of {got} bytes where {want} were expected")]
    Length { got: usize, want: usize },
    #[error("error message is not UTF-8")]
    Message,
}

/// One chunk asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Echoed in the response.
    pub seq: u32,
    pub id: ChunkId,
    /// The plaintext length the image claims (1..=`MAX_CHUNK_SIZE`).
    pub plain_len: u32,
    /// The convergent key, for an encrypted chunk.
    pub key: Option<[u8; 32]>,
}

/// One block of a blocked chunk asked for (version 2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRequest {
    /// Echoed in the response.
    pub seq: u32,
    /// The chunk's id: the hash of its block table.
    pub id: ChunkId,
    /// The chunk's plaintext length the image claims (1..=`MAX_CHUNK_SIZE`).
    pub plain_len: u32,
    /// The image's block size.
    pub block_size: u32,
    /// Which block.
    pub index: u32,
    /// The chunk's convergent key, for an encrypted chunk.
    pub key: Option<[u8; 32]>,
    /// The chunk's block table as the image carries it (at most `MAX_TABLE_LEN` bytes;
    /// empty: the fetcher reads it from its stores). Checked against `id` by the fetcher.
    pub table: Vec<u8>,
}

/// A decoded request, with the version it came in (the response goes back in it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnyRequest {
    Chunk { version: u8, req: Request },
    Block(BlockRequest),
}

impl AnyRequest {
    pub fn seq(&self) -> u32 {
        match self {
            AnyRequest::Chunk { req, .. } => req.seq,
            AnyRequest::Block(b) => b.seq,
        }
    }

    pub fn version(&self) -> u8 {
        match self {
            AnyRequest::Chunk { version, .. } => *version,
            AnyRequest::Block(_) => 2,
        }
    }

    /// Decodes a request body (after its header) of any operation, checking every field.
    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        if body.len() > MAX_REQUEST_FRAME {
            return Err(ProtocolError::FrameTooLarge(body.len()));
        }
        let mut r = Reader { b: body, at: 0 };
        let version = r.u8()?;
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(ProtocolError::Version(version));
        }
        match r.u8()? {
            OP_GET_CHUNK => Ok(AnyRequest::Chunk {
                version,
                req: Request::decode(body)?,
            }),
            OP_GET_BLOCK if version >= 2 => BlockRequest::decode(body).map(AnyRequest::Block),
            op => Err(ProtocolError::Op(op)),
        }
    }
}

/// How the plaintext is held by the descriptor that comes with an ok response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdKind {
    /// A checked plaintext file of the cache, opened read-only (plaintext after the MAC).
    CacheFile = 1,
    /// A sealed memfd holding the plaintext alone (encrypted chunks).
    Memfd = 2,
}

/// Error codes of a refused request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request is malformed or out of bounds (the connection is then closed).
    BadRequest = 1,
    /// The request's version is not spoken here (the connection is then closed).
    Version = 2,
    /// No allowed store has the chunk.
    NotFound = 3,
    /// The stored bytes do not verify or do not decode to the claimed plaintext.
    BadChunk = 4,
    /// The stores could not be reached or failed.
    Unavailable = 5,
    /// The fetcher is at its connection or work limit; try again later.
    Busy = 6,
    /// The fetcher failed on its side (cache, memory, descriptors).
    Internal = 7,
}

impl ErrorCode {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => ErrorCode::BadRequest,
            2 => ErrorCode::Version,
            3 => ErrorCode::NotFound,
            4 => ErrorCode::BadChunk,
            5 => ErrorCode::Unavailable,
            6 => ErrorCode::Busy,
            7 => ErrorCode::Internal,
            _ => return None,
        })
    }
}

/// The answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// The plaintext is `len` bytes at `offset` of the descriptor sent with the frame.
    Ok {
        seq: u32,
        kind: FdKind,
        offset: u64,
        len: u32,
    },
    Err {
        seq: u32,
        code: ErrorCode,
        message: String,
    },
}

impl Response {
    pub fn error(seq: u32, code: ErrorCode, message: impl std::fmt::Display) -> Self {
        let mut message = message.to_string();
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Response::Err { seq, code, message }
    }
}

/// Reads fields off a body, failing on truncation.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or(ProtocolError::Truncated {
            got: self.b.len(),
            need: self.at.saturating_add(n),
        })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn end(&self) -> Result<(), ProtocolError> {
        if self.at != self.b.len() {
            return Err(ProtocolError::Length {
                got: self.b.len(),
                want: self.at,
            });
        }
        Ok(())
    }
}

/// The body length announced by a frame header, checked against [`MAX_FRAME`].
pub fn frame_len(header: [u8; 4]) -> Result<usize, ProtocolError> {
    let n = u32::from_le_bytes(header) as usize;
    if n > MAX_FRAME {
        return Err(ProtocolError::FrameTooLarge(n));
    }
    Ok(n)
}

fn framed(body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

impl Request {
    /// The request as a frame (header included), in version 1 (which every fetcher speaks).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(REQ_KEYED);
        b.push(MIN_VERSION);
        b.push(OP_GET_CHUNK);
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.id.0);
        b.extend_from_slice(&self.plain_len.to_le_bytes());
        match &self.key {
            Some(k) => {
                b.push(1);
                b.extend_from_slice(k);
            }
            None => b.push(0),
        }
        framed(b)
    }

    /// Decodes a whole-chunk request body (after its header), checking every field.
    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        if body.len() > MAX_FRAME {
            return Err(ProtocolError::FrameTooLarge(body.len()));
        }
        let mut r = Reader { b: body, at: 0 };
        let version = r.u8()?;
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(ProtocolError::Version(version));
        }
        let op = r.u8()?;
        if op != OP_GET_CHUNK {
            return Err(ProtocolError::Op(op));
        }
        let seq = r.u32()?;
        let id = ChunkId(r.array()?);
        let plain_len = plain_len(&mut r)?;
        let key = key(&mut r)?;
        r.end()?;
        Ok(Request {
            seq,
            id,
            plain_len,
            key,
        })
    }
}

fn plain_len(r: &mut Reader) -> Result<u32, ProtocolError> {
    let plain_len = r.u32()?;
    if plain_len == 0 || plain_len > MAX_CHUNK_SIZE {
        return Err(ProtocolError::Field {
            field: "plain_len",
            value: plain_len.into(),
        });
    }
    Ok(plain_len)
}

fn key(r: &mut Reader) -> Result<Option<[u8; 32]>, ProtocolError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(r.array()?)),
        v => Err(ProtocolError::Field {
            field: "has_key",
            value: v.into(),
        }),
    }
}

impl BlockRequest {
    /// The request as a frame (header included), in version 2.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(BLOCK_REQ_FIXED + self.table.len());
        b.push(2);
        b.push(OP_GET_BLOCK);
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.id.0);
        b.extend_from_slice(&self.plain_len.to_le_bytes());
        b.extend_from_slice(&self.block_size.to_le_bytes());
        b.extend_from_slice(&self.index.to_le_bytes());
        match &self.key {
            Some(k) => {
                b.push(1);
                b.extend_from_slice(k);
            }
            None => b.push(0),
        }
        b.extend_from_slice(&(self.table.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.table);
        framed(b)
    }

    /// Decodes a block request body (after its header), checking every field's bounds (the
    /// table itself is checked against the id by the fetcher).
    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        if body.len() > MAX_REQUEST_FRAME {
            return Err(ProtocolError::FrameTooLarge(body.len()));
        }
        let mut r = Reader { b: body, at: 0 };
        let version = r.u8()?;
        if version != 2 {
            return Err(ProtocolError::Version(version));
        }
        let op = r.u8()?;
        if op != OP_GET_BLOCK {
            return Err(ProtocolError::Op(op));
        }
        let seq = r.u32()?;
        let id = ChunkId(r.array()?);
        let plain_len = plain_len(&mut r)?;
        let block_size = r.u32()?;
        let index = r.u32()?;
        let key = key(&mut r)?;
        let n = r.u32()? as usize;
        if n > MAX_TABLE_LEN {
            return Err(ProtocolError::TableTooLarge(n));
        }
        let table = r.take(n)?.to_vec();
        r.end()?;
        Ok(BlockRequest {
            seq,
            id,
            plain_len,
            block_size,
            index,
            key,
            table,
        })
    }
}

/// The body length announced by a request frame header, checked against
/// [`MAX_REQUEST_FRAME`].
pub fn request_frame_len(header: [u8; 4]) -> Result<usize, ProtocolError> {
    let n = u32::from_le_bytes(header) as usize;
    if n > MAX_REQUEST_FRAME {
        return Err(ProtocolError::FrameTooLarge(n));
    }
    Ok(n)
}

impl Response {
    /// The response as a frame (header included), in version 1.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(MIN_VERSION)
    }

    /// The response as a frame (header included), in `version` (the request's).
    pub fn encode_as(&self, version: u8) -> Vec<u8> {
        let mut b = Vec::with_capacity(32);
        b.push(version);
        match self {
            Response::Ok {
                seq,
                kind,
                offset,
                len,
            } => {
                b.extend_from_slice(&seq.to_le_bytes());
                b.push(0);
                b.push(*kind as u8);
                b.extend_from_slice(&offset.to_le_bytes());
                b.extend_from_slice(&len.to_le_bytes());
            }
            Response::Err { seq, code, message } => {
                b.extend_from_slice(&seq.to_le_bytes());
                b.push(*code as u8);
                let mut m = message.as_bytes();
                if m.len() > MAX_MESSAGE {
                    m = &m[..MAX_MESSAGE];
                }
                b.extend_from_slice(&(m.len() as u16).to_le_bytes());
                b.extend_from_slice(m);
            }
        }
        framed(b)
    }

    /// Decodes a response body (after its header), checking every field.
    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        if body.len() > MAX_FRAME {
            return Err(ProtocolError::FrameTooLarge(body.len()));
        }
        let mut r = Reader { b: body, at: 0 };
        let version = r.u8()?;
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(ProtocolError::Version(version));
        }
        let seq = r.u32()?;
        let status = r.u8()?;
        let resp = if status == 0 {
            let kind = match r.u8()? {
                1 => FdKind::CacheFile,
                2 => FdKind::Memfd,
                v => {
                    return Err(ProtocolError::Field {
                        field: "kind",
                        value: v.into(),
                    })
                }
            };
            let offset = r.u64()?;
            let len = r.u32()?;
            if len == 0 || len > MAX_CHUNK_SIZE {
                return Err(ProtocolError::Field {
                    field: "len",
                    value: len.into(),
                });
            }
            Response::Ok {
                seq,
                kind,
                offset,
                len,
            }
        } else {
            let code = ErrorCode::from_u8(status).ok_or(ProtocolError::Field {
                field: "status",
                value: status.into(),
            })?;
            let n = usize::from(r.u16()?);
            if n > MAX_MESSAGE {
                return Err(ProtocolError::Field {
                    field: "msg_len",
                    value: n as u64,
                });
            }
            let message = std::str::from_utf8(r.take(n)?)
                .map_err(|_| ProtocolError::Message)?
                .to_string();
            Response::Err { seq, code, message }
        };
        r.end()?;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(frame: &[u8]) -> &[u8] {
        let n = frame_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(n, frame.len() - 4);
        &frame[4..]
    }

    fn set_raw(b: &[u8], at: usize, v: &[u8]) -> Vec<u8> {
        let mut c = b.to_vec();
        c[at..at + v.len()].copy_from_slice(v);
        c
    }

    fn block_req(key: bool, table: usize) -> BlockRequest {
        BlockRequest {
            seq: 11,
            id: ChunkId::of(b"t"),
            plain_len: 100_000,
            block_size: 32 << 10,
            index: 3,
            key: key.then_some([5u8; 32]),
            table: vec![7u8; table],
        }
    }

    #[test]
    fn block_requests_round_trip_and_are_bounded() {
        for (keyed, table) in [(false, 0), (false, 156), (true, 156), (true, MAX_TABLE_LEN)] {
            let r = block_req(keyed, table);
            let f = r.encode();
            let n = request_frame_len(f[..4].try_into().unwrap()).unwrap();
            assert_eq!(n, f.len() - 4);
            let b = &f[4..];
            assert_eq!(BlockRequest::decode(b).unwrap(), r);
            assert_eq!(AnyRequest::decode(b).unwrap(), AnyRequest::Block(r.clone()));
            for cut in (0..b.len()).step_by(1 + b.len() / 300) {
                assert!(
                    matches!(
                        AnyRequest::decode(&b[..cut]),
                        Err(ProtocolError::Truncated { .. })
                    ),
                    "cut at {cut}"
                );
            }
            let mut long = b.to_vec();
            long.push(0);
            assert!(AnyRequest::decode(&long).is_err());
        }
        // A table longer than any chunk's is refused before it is read.
        let b = &block_req(false, 10).encode()[4..];
        let at = b.len() - 10 - 4;
        let big = set_raw(b, at, &((MAX_TABLE_LEN + 1) as u32).to_le_bytes());
        assert_eq!(
            AnyRequest::decode(&big),
            Err(ProtocolError::TableTooLarge(MAX_TABLE_LEN + 1))
        );
        assert!(BlockRequest::decode(&[0u8; MAX_REQUEST_FRAME + 1]).is_err());
        assert!(request_frame_len(((MAX_REQUEST_FRAME + 1) as u32).to_le_bytes()).is_err());
        assert_eq!(
            request_frame_len((MAX_REQUEST_FRAME as u32).to_le_bytes()),
            Ok(MAX_REQUEST_FRAME)
        );
        // A whole-chunk request keeps its version; responses go back in it.
        let f = req(true).encode();
        assert_eq!(
            AnyRequest::decode(body(&f)).unwrap(),
            AnyRequest::Chunk {
                version: 1,
                req: req(true)
            }
        );
        let ok = Response::Ok {
            seq: 1,
            kind: FdKind::CacheFile,
            offset: 32,
            len: 10,
        };
        for v in [1, 2] {
            let f = ok.encode_as(v);
            assert_eq!(f[4], v);
            assert_eq!(Response::decode(&f[4..]).unwrap(), ok);
        }
    }

    fn req(key: bool) -> Request {
        Request {
            seq: 7,
            id: ChunkId::of(b"x"),
            plain_len: 4096,
            key: key.then_some([9u8; 32]),
        }
    }

    #[test]
    fn requests_round_trip_and_every_truncation_is_refused() {
        for keyed in [false, true] {
            let r = req(keyed);
            let f = r.encode();
            assert_eq!(Request::decode(body(&f)).unwrap(), r);
            let b = body(&f);
            for cut in 0..b.len() {
                assert!(
                    matches!(
                        Request::decode(&b[..cut]),
                        Err(ProtocolError::Truncated { .. })
                    ),
                    "cut at {cut}"
                );
            }
            let mut long = b.to_vec();
            long.push(0);
            assert!(matches!(
                Request::decode(&long),
                Err(ProtocolError::Length { .. })
            ));
        }
    }

    #[test]
    fn out_of_bounds_fields_are_refused() {
        let f = req(false).encode();
        let b = body(&f).to_vec();
        let set = |at: usize, v: &[u8]| {
            let mut c = b.clone();
            c[at..at + v.len()].copy_from_slice(v);
            Request::decode(&c)
        };
        assert_eq!(set(0, &[3]), Err(ProtocolError::Version(3)));
        assert_eq!(set(0, &[0]), Err(ProtocolError::Version(0)));
        // Version 2 whole-chunk requests are the same; version 1 has no block requests.
        assert!(set(0, &[2]).is_ok());
        assert!(matches!(
            AnyRequest::decode(&set_raw(&b, 1, &[OP_GET_BLOCK])),
            Err(ProtocolError::Op(OP_GET_BLOCK))
        ));
        assert_eq!(set(1, &[9]), Err(ProtocolError::Op(9)));
        assert!(matches!(
            set(38, &0u32.to_le_bytes()),
            Err(ProtocolError::Field {
                field: "plain_len",
                ..
            })
        ));
        assert!(matches!(
            set(38, &(MAX_CHUNK_SIZE + 1).to_le_bytes()),
            Err(ProtocolError::Field { .. })
        ));
        assert!(set(38, &MAX_CHUNK_SIZE.to_le_bytes()).is_ok());
        assert!(matches!(
            set(42, &[2]),
            Err(ProtocolError::Field {
                field: "has_key",
                ..
            })
        ));
        // Announced frame sizes are bounded before anything is read.
        assert_eq!(
            frame_len(u32::MAX.to_le_bytes()),
            Err(ProtocolError::FrameTooLarge(u32::MAX as usize))
        );
        assert_eq!(frame_len((MAX_FRAME as u32).to_le_bytes()), Ok(MAX_FRAME));
        assert!(Request::decode(&[0u8; MAX_FRAME + 1]).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x1234_5678_9abc_def0u64;
        for n in 0..5000usize {
            let len = n % 100;
            let g: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = Request::decode(&g);
            let _ = AnyRequest::decode(&g);
            let _ = Response::decode(&g);
            // With a valid version byte (and operation), deeper fields get exercised too.
            let mut v = g.clone();
            if let Some(b) = v.first_mut() {
                *b = VERSION;
            }
            if let Some(b) = v.get_mut(1) {
                *b = 1 + (n % 2) as u8;
            }
            let _ = Request::decode(&v);
            let _ = AnyRequest::decode(&v);
            let _ = Response::decode(&v);
        }
    }

    #[test]
    fn responses_round_trip_and_are_checked() {
        let ok = Response::Ok {
            seq: 3,
            kind: FdKind::Memfd,
            offset: 32,
            len: 100,
        };
        let f = ok.encode();
        assert_eq!(Response::decode(body(&f)).unwrap(), ok);
        for cut in 0..body(&f).len() {
            assert!(Response::decode(&body(&f)[..cut]).is_err());
        }
        let long = "é".repeat(MAX_MESSAGE);
        let err = Response::error(4, ErrorCode::NotFound, &long);
        let Response::Err { message, .. } = &err else {
            panic!()
        };
        assert!(message.len() <= MAX_MESSAGE);
        let f = err.encode();
        assert!(f.len() - 4 <= MAX_FRAME);
        assert_eq!(Response::decode(body(&f)).unwrap(), err);
        // Unknown status, kind, or a zero length are refused.
        let mut b = body(&ok.encode()).to_vec();
        b[5] = 99;
        assert!(Response::decode(&b).is_err());
        let mut b = body(&ok.encode()).to_vec();
        b[6] = 0;
        assert!(Response::decode(&b).is_err());
        let mut b = body(&ok.encode()).to_vec();
        let n = b.len();
        b[n - 4..].copy_from_slice(&0u32.to_le_bytes());
        assert!(Response::decode(&b).is_err());
    }
}
