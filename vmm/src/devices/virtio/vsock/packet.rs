//! The virtio-vsock packet header (virtio 1.2 section 5.10.6): its 44 little-endian bytes,
//! the operations and socket types, and the checks every header from the guest passes before
//! the connection logic sees it.

/// Length of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// The largest payload of one packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Event id of `struct virtio_vsock_event` on the event queue.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Why a header from the guest is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("source cid {0} is not the guest's")]
    SrcCid(u64),
    #[error("destination cid {0} is not the host's")]
    DstCid(u64),
    #[error("socket type {0} is not stream")]
    Type(u16),
    #[error("unknown operation {0}")]
    Op(u16),
    #[error("payload length {len} is more than the {available} bytes sent, or the maximum")]
    Len { len: u32, available: usize },
    #[error("flags {flags:#x} are not valid for operation {op}")]
    Flags { op: u16, flags: u32 },
}

impl HeaderError {
    /// Whether the guest gets an RST for the packet (when it was not one itself): not when
    /// its source is not the guest, which leaves no one to answer.
    pub fn answerable(&self) -> bool {
        !matches!(self, HeaderError::SrcCid(_))
    }
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |at: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |at: usize| {
            let mut v = [0u8; 4];
            v.copy_from_slice(&b[at..at + 4]);
            u32::from_le_bytes(v)
        };
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Checks a header the guest sent (`available`: payload bytes its chain holds after the
    /// header): its source must be the guest, its destination the host, a stream packet of a
    /// known operation whose length fits what was sent (and is 0 unless it carries data), with
    /// flags only on SHUTDOWN.
    pub fn check_from_guest(&self, guest_cid: u64, available: usize) -> Result<(), HeaderError> {
        if self.src_cid != guest_cid {
            return Err(HeaderError::SrcCid(self.src_cid));
        }
        if self.dst_cid != HOST_CID {
            return Err(HeaderError::DstCid(self.dst_cid));
        }
        if self.type_ != TYPE_STREAM {
            return Err(HeaderError::Type(self.type_));
        }
        if !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&self.op) {
            return Err(HeaderError::Op(self.op));
        }
        let len_ok = if self.op == OP_RW {
            self.len <= MAX_PAYLOAD && self.len as usize <= available
        } else {
            self.len == 0
        };
        if !len_ok {
            return Err(HeaderError::Len {
                len: self.len,
                available,
            });
        }
        let flags_ok = if self.op == OP_SHUTDOWN {
            self.flags & !SHUTDOWN_BOTH == 0
        } else {
            self.flags == 0
        };
        if !flags_ok {
            return Err(HeaderError::Flags {
                op: self.op,
                flags: self.flags,
            });
        }
        Ok(())
    }

    /// The RST answering this guest packet (ports and cids swapped).
    pub fn rst_reply(&self) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        }
    }
}
