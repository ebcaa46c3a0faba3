//! The wire format between a vmm and the chunk fetcher (see the module documentation of
//! [`super`] for the exchange and the threat model).
//!
//! Every message is a frame: a little-endian `u32` body length, then the body. A body is at
//! most [`MAX_FRAME`] bytes; its layout is fixed by its first byte, the protocol version
//! ([`VERSION`]):
//!
//! ```text
//! request  = version:u8 op:u8(=1 GET_CHUNK) seq:u32 id:[32] plain_len:u32 has_key:u8(0|1) [key:[32]]
//! response = version:u8 seq:u32 status:u8(0 = ok)
//!            ok:    kind:u8(1 = cache file, 2 = sealed memfd) offset:u64 len:u32   + 1 descriptor
//!            error: msg_len:u16 msg:[msg_len] (UTF-8, at most MAX_MESSAGE bytes)
//! ```
//!
//! A request's body length must be exactly what its fields need; `plain_len` must be in
//! `1..=MAX_CHUNK_SIZE`. The plaintext of the chunk is the `len` bytes at `offset` of the
//! descriptor passed with an ok response (`SCM_RIGHTS`, one descriptor, read-only).

use crate::chunk::{ChunkId, MAX_CHUNK_SIZE};

/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Largest frame body either side accepts.
pub const MAX_FRAME: usize = 256;
/// Longest error message (bytes); longer ones are cut at a character boundary.
pub const MAX_MESSAGE: usize = 200;
/// The only operation of version 1.
pub const OP_GET_CHUNK: u8 = 1;

const REQ_BASE: usize = 1 + 1 + 4 + 32 + 4 + 1;
const REQ_KEYED: usize = REQ_BASE + 32;

/// What went wrong with a frame.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {0} bytes, more than the {MAX_FRAME} allowed")]
    FrameTooLarge(usize),
    #[error("truncated frame: {got} of {need} bytes")]
    Truncated { got: usize, need: usize },
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    Version(u8),
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
    /// The request as a frame (header included).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(REQ_KEYED);
        b.push(VERSION);
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

    /// Decodes a request body (after its header), checking every field.
    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        if body.len() > MAX_FRAME {
            return Err(ProtocolError::FrameTooLarge(body.len()));
        }
        let mut r = Reader { b: body, at: 0 };
        let version = r.u8()?;
        if version != VERSION {
            return Err(ProtocolError::Version(version));
        }
        let op = r.u8()?;
        if op != OP_GET_CHUNK {
            return Err(ProtocolError::Op(op));
        }
        let seq = r.u32()?;
        let id = ChunkId(r.array()?);
        let plain_len = r.u32()?;
        if plain_len == 0 || plain_len > MAX_CHUNK_SIZE {
            return Err(ProtocolError::Field {
                field: "plain_len",
                value: plain_len.into(),
            });
        }
        let key = match r.u8()? {
            0 => None,
            1 => Some(r.array()?),
            v => {
                return Err(ProtocolError::Field {
                    field: "has_key",
                    value: v.into(),
                })
            }
        };
        r.end()?;
        Ok(Request {
            seq,
            id,
            plain_len,
            key,
        })
    }
}

impl Response {
    /// The response as a frame (header included).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32);
        b.push(VERSION);
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
        if version != VERSION {
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
        assert_eq!(set(0, &[2]), Err(ProtocolError::Version(2)));
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
            let _ = Response::decode(&g);
            // With a valid version byte, deeper fields get exercised too.
            let mut v = g.clone();
            if let Some(b) = v.first_mut() {
                *b = VERSION;
            }
            let _ = Request::decode(&v);
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
