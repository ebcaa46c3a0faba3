//! One virtio-blk request (virtio 1.2 section 5.2.6): parsed from a descriptor chain the guest
//! controls (header, data buffers, status byte; every length and direction checked), its
//! cost for the rate limiter, and its execution against the disk, with the range checked
//! against the disk's capacity before any host I/O. The status byte is written last.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::disk::{DiskImage, SECTOR_SHIFT, SECTOR_SIZE};

// Request types and status values (virtio 1.2 section 5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// The GET_ID answer: at most 20 bytes, NUL-padded.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// The only discard flag (unmap); the others are reserved.
const DISCARD_FLAG_UNMAP: u32 = 1;
const HEADER_LEN: u32 = 16;
const DISCARD_SEGMENT_LEN: usize = 16;

/// Discard limits the device announces in its config space.
#[derive(Clone, Copy, Debug)]
pub struct DiscardLimits {
    pub max_sectors: u32,
    pub max_segments: u32,
}

/// What the guest asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            other => Self::Unsupported(other),
        }
    }
}

/// A chain that is not a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MalformedRequest {
    #[error("the chain has more than {0} descriptors")]
    TooLong(usize),
    #[error("the chain has {0} descriptors; a request needs a header and a status")]
    TooShort(usize),
    #[error("the last descriptor is not a device-writable status byte")]
    NoStatus,
    #[error("the header descriptor is device-writable or shorter than 16 bytes")]
    BadHeader,
    #[error("the header lies outside guest memory")]
    HeaderUnreadable,
    #[error("a data buffer has the wrong direction for a {0:?} request")]
    WrongDirection(RequestType),
    #[error("the data of a {0:?} request is {1} bytes")]
    BadDataLength(RequestType, u64),
}

/// A parsed request.
#[derive(Debug)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    /// The data buffers, in order: (guest address, length).
    pub data: Vec<(GuestAddress, u32)>,
    pub data_len: u64,
    pub status: GuestAddress,
}

/// Where a malformed chain's status byte goes, when it has one.
pub type ParseError = (MalformedRequest, Option<GuestAddress>);

impl Request {
    /// Parses a chain of at most `max_descriptors` descriptors (a longer one is refused
    /// without its status byte: where it ends is not known).
    pub fn parse(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        max_descriptors: usize,
    ) -> Result<Self, ParseError> {
        // The chain iterator stops at the queue size (or an indirect table's), at 4 GiB in all
        // and at the first descriptor outside guest memory; an indirect table may hold up to
        // 65535 entries, so the chain is cut here too.
        let descs: Vec<Descriptor> = chain.take(max_descriptors.saturating_add(1)).collect();
        if descs.len() > max_descriptors {
            return Err((MalformedRequest::TooLong(max_descriptors), None));
        }
        let (Some(first), Some(last)) = (descs.first(), descs.last()) else {
            return Err((MalformedRequest::TooShort(0), None));
        };
        let status = (last.is_write_only() && last.len() >= 1)
            .then(|| last.addr().0.checked_add(u64::from(last.len()) - 1))
            .flatten()
            .map(GuestAddress);
        let Some(status) = status else {
            return Err((MalformedRequest::NoStatus, None));
        };
        if descs.len() < 2 {
            return Err((MalformedRequest::TooShort(descs.len()), Some(status)));
        }
        if first.is_write_only() || first.len() < HEADER_LEN {
            return Err((MalformedRequest::BadHeader, Some(status)));
        }
        let (kind, sector) = mem
            .read_obj::<u32>(first.addr())
            .and_then(|kind| {
                let at = first.addr().checked_add(8).ok_or(
                    vm_memory::GuestMemoryError::InvalidGuestAddress(first.addr()),
                )?;
                let sector = mem.read_obj::<u64>(at)?;
                Ok((u32::from_le(kind), u64::from_le(sector)))
            })
            .map_err(|_| (MalformedRequest::HeaderUnreadable, Some(status)))?;
        let kind = RequestType::from(kind);
        let middle = &descs[1..descs.len() - 1];
        let device_writes = matches!(kind, RequestType::In | RequestType::GetId);
        let device_reads = matches!(kind, RequestType::Out | RequestType::Discard);
        let mut data = Vec::with_capacity(middle.len());
        let mut data_len = 0u64;
        for d in middle {
            if (device_writes && !d.is_write_only()) || (device_reads && d.is_write_only()) {
                return Err((MalformedRequest::WrongDirection(kind), Some(status)));
            }
            data.push((d.addr(), d.len()));
            data_len += u64::from(d.len());
        }
        let bad_len = match kind {
            RequestType::In | RequestType::Out => !data_len.is_multiple_of(SECTOR_SIZE),
            RequestType::GetId => data_len == 0,
            RequestType::Discard => {
                data_len == 0 || !data_len.is_multiple_of(DISCARD_SEGMENT_LEN as u64)
            }
            RequestType::Flush | RequestType::Unsupported(_) => false,
        };
        if bad_len {
            return Err((
                MalformedRequest::BadDataLength(kind, data_len),
                Some(status),
            ));
        }
        Ok(Self {
            kind,
            sector,
            data,
            data_len,
            status,
        })
    }

    /// What the request costs the rate limiter: (bytes, operations).
    pub fn cost(&self) -> (u64, u64) {
        match self.kind {
            RequestType::In | RequestType::Out => (self.data_len, 1),
            _ => (0, 1),
        }
    }
}

/// How a request ended: its status and the bytes written into guest buffers (data and the
/// status byte).
#[derive(Debug, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    pub used_len: u32,
    /// Why it failed, for the (rate-limited) log.
    pub error: Option<String>,
}

impl Completion {
    fn ok(data_written: u64) -> Self {
        Self {
            status: VIRTIO_BLK_S_OK,
            used_len: u32::try_from(data_written + 1).unwrap_or(u32::MAX),
            error: None,
        }
    }

    fn failed(status: u8, why: impl Into<String>) -> Self {
        Self {
            status,
            used_len: 1,
            error: Some(why.into()),
        }
    }
}

/// What a request runs against.
pub struct Target<'a> {
    pub disk: &'a DiskImage,
    pub serial: &'a [u8; VIRTIO_BLK_ID_BYTES],
    pub discard: DiscardLimits,
    pub mem: &'a GuestMemoryMmap,
}

/// `(offset, len)` in bytes of `sectors` sectors from `sector`, when it lies on the disk.
fn disk_range(disk: &DiskImage, sector: u64, bytes: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(bytes)?;
    (end <= disk.sectors() << SECTOR_SHIFT).then_some(offset)
}

impl Request {
    /// Runs the request; the caller writes the status byte.
    pub fn execute(&self, t: &Target) -> Completion {
        match self.kind {
            RequestType::In | RequestType::Out => self.transfer(t),
            RequestType::Flush => match t.disk.flush() {
                Ok(()) => Completion::ok(0),
                Err(e) => Completion::failed(VIRTIO_BLK_S_IOERR, format!("flush: {e}")),
            },
            RequestType::GetId => self.get_id(t),
            RequestType::Discard => self.discard(t),
            RequestType::Unsupported(kind) => {
                Completion::failed(VIRTIO_BLK_S_UNSUPP, format!("request type {kind}"))
            }
        }
    }

    fn transfer(&self, t: &Target) -> Completion {
        let write = self.kind == RequestType::Out;
        if write && t.disk.readonly() {
            return Completion::failed(VIRTIO_BLK_S_IOERR, "write to a read-only disk");
        }
        let Some(offset) = disk_range(t.disk, self.sector, self.data_len) else {
            return Completion::failed(
                VIRTIO_BLK_S_IOERR,
                format!(
                    "{} bytes at sector {} go past the disk's end ({} sectors)",
                    self.data_len,
                    self.sector,
                    t.disk.sectors()
                ),
            );
        };
        let done = if write {
            t.disk.write_from_guest(t.mem, &self.data, offset)
        } else {
            t.disk.read_to_guest(t.mem, &self.data, offset)
        };
        if let Err(e) = done {
            let what = if write { "write" } else { "read" };
            return Completion::failed(
                VIRTIO_BLK_S_IOERR,
                format!("{what} of {} bytes at {offset:#x}: {e}", self.data_len),
            );
        }
        Completion::ok(if write { 0 } else { self.data_len })
    }

    fn get_id(&self, t: &Target) -> Completion {
        let mut left: &[u8] = t.serial;
        let mut written = 0u64;
        for &(addr, len) in &self.data {
            if left.is_empty() {
                break;
            }
            let n = left.len().min(len as usize);
            if t.mem.write_slice(&left[..n], addr).is_err() {
                return Completion::failed(VIRTIO_BLK_S_IOERR, "GET_ID buffer outside memory");
            }
            left = &left[n..];
            written += n as u64;
        }
        Completion::ok(written)
    }

    fn discard(&self, t: &Target) -> Completion {
        if t.disk.readonly() {
            return Completion::failed(VIRTIO_BLK_S_IOERR, "discard on a read-only disk");
        }
        let max = u64::from(t.discard.max_segments) * DISCARD_SEGMENT_LEN as u64;
        if self.data_len > max {
            return Completion::failed(
                VIRTIO_BLK_S_UNSUPP,
                format!("{} discard segments", self.data_len / 16),
            );
        }
        // At most max_segments * 16 bytes: gathered from the buffers.
        let mut segments = vec![0u8; self.data_len as usize];
        let mut at = 0usize;
        for &(addr, len) in &self.data {
            let end = at + len as usize;
            if t.mem.read_slice(&mut segments[at..end], addr).is_err() {
                return Completion::failed(VIRTIO_BLK_S_IOERR, "discard buffer outside memory");
            }
            at = end;
        }
        for segment in segments.chunks_exact(DISCARD_SEGMENT_LEN) {
            let field = |range: std::ops::Range<usize>| {
                segment[range]
                    .iter()
                    .rev()
                    .fold(0u64, |v, b| (v << 8) | u64::from(*b))
            };
            let sector = field(0..8);
            let sectors = field(8..12);
            let flags = field(12..16) as u32;
            if flags & !DISCARD_FLAG_UNMAP != 0 {
                return Completion::failed(
                    VIRTIO_BLK_S_UNSUPP,
                    format!("discard flags {flags:#x}"),
                );
            }
            if sectors > u64::from(t.discard.max_sectors) {
                return Completion::failed(
                    VIRTIO_BLK_S_IOERR,
                    format!("discard of {sectors} sectors"),
                );
            }
            if sectors == 0 {
                continue;
            }
            let bytes = sectors << SECTOR_SHIFT;
            let Some(offset) = disk_range(t.disk, sector, bytes) else {
                return Completion::failed(
                    VIRTIO_BLK_S_IOERR,
                    format!("discard of {sectors} sectors at {sector} goes past the disk's end"),
                );
            };
            if let Err(e) = t.disk.punch_hole(offset, bytes) {
                return Completion::failed(VIRTIO_BLK_S_IOERR, format!("discard: {e}"));
            }
        }
        Completion::ok(0)
    }
}
