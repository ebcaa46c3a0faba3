//! The node's chunk fetcher: ONE process per node owns the chunk cache, the store allowlist
//! and its credentials; it fetches, verifies and decodes chunks, evicts the cache in the
//! background, and hands verified plaintexts to the vmm processes over a unix socket as
//! read-only file descriptors (of whole chunks, or of single blocks of blocked chunks). A vmm
//! using it ([`client::FetcherClient`], behind [`crate::fetch::ChunkSource::remote`]) needs
//! no network, no store credentials and no write access to the cache: its virtio-fs workers
//! only `pread` descriptors they were given.
//!
//! # Exchange
//!
//! A vmm connects a few sockets at start (a pool, each served by a thread of the vmm's own
//! that is not a virtio-fs worker), then on each socket sends one request at a time and waits
//! for its response ([`protocol`]: versioned, length-prefixed frames, every size bounded).
//! A request is one of:
//! - a whole chunk (version 1, still answered; images of whole chunks): its id, the
//!   plaintext length the image claims (at most [`crate::chunk::MAX_CHUNK_SIZE`]) and, for
//!   an encrypted chunk, its convergent key;
//! - one block of a blocked chunk (version 2; images with a block size, see
//!   [`crate::chunk::blocks`]): the chunk's id, plaintext length, the image's block size, the
//!   block's index, the key of an encrypted chunk, and the chunk's block table as the image
//!   carries it (at most [`crate::chunk::blocks::MAX_TABLE_LEN`] bytes; none when the image
//!   has no table for it). The fetcher checks that the table hashes to the id and agrees with
//!   the sizes ([`crate::chunk::blocks::Table::parse`]: the same check as a local read),
//!   or, given no table, reads it from its stores with one ranged read, verifies it the same
//!   way and keeps it (bounded). Only then does it take the block's offset, stored length
//!   and hash from the verified table, read exactly that range from its stores (one ranged
//!   read: a dir offset read, an HTTP/S3 `Range`, a redis `GETRANGE`), check the bytes
//!   against the block's hash before it decrypts or decompresses them, and decode the block.
//!   A cold 4 KiB read from a blocked image thus costs one block, not the chunk.
//!
//! The answer is an error code with a short message (naming the chunk, and the block), or a
//! descriptor passed with `SCM_RIGHTS` and where the plaintext (of the chunk, or of the
//! block) is in it:
//! - unencrypted: the cache's plaintext file, checked against the node's MAC key by the
//!   fetcher, opened `O_RDONLY` (the plaintext follows the 32-byte MAC); a block's file is
//!   named by [`crate::chunk::blocks::block_key`] (id and index), as a local reader names it
//!   (when the fetcher has the whole chunk's plaintext, it passes that instead, with the
//!   block's offset in it);
//! - encrypted: a memfd holding its plaintext, sealed (no write, grow, shrink or new seal) —
//!   encrypted chunks and blocks stay encrypted at rest in the cache (a block as stored,
//!   named by its hash). Sealed memfds are kept in a bounded LRU keyed by (chunk id or block
//!   name, key, length) and shared between vmms asking the same.
//!
//! The fetcher reads chunks only from the stores it was given (its allowlist, with their
//! credentials), trying them in order with fail-over; every chunk is verified against its id
//! (every block against its verified table) before it is decoded, and decoded to exactly the
//! claimed length (or refused).
//!
//! # Threat model
//!
//! Every vmm is hostile: it runs a tenant's guest and parses its requests. What a vmm can
//! send is a chunk id, a length and a key, and for a block request a block size, an index and
//! a block table, nothing else: there are no paths in the protocol, so the fetcher never
//! opens a file a client names (cache files are named by the hex of the id, or of a block's
//! name derived from the id and index). A block table a vmm sends is trusted only once it
//! hashes to the chunk id (which commits to every block's length and hash): a forged table,
//! one of another chunk, sizes the table does not repeat, a block size that is not a power
//! of two in range or an index past the table is refused (`BadRequest`) before any block is
//! read, so no vmm can make the fetcher read, decode or cache other bytes under a chunk's or a
//! block's name. Stored bytes that do not match the table are refused (`BadChunk`, naming
//! the block) and never cached. Frame sizes are checked before anything is read into
//! memory ([`protocol::MAX_FRAME`] for responses and whole-chunk requests,
//! [`protocol::MAX_REQUEST_FRAME`] for a block request with the largest table; a table
//! longer than any chunk's is refused); a malformed request gets an error code and the
//! connection is closed (a refused well-formed request leaves it open); a frame must arrive
//! within [`server::FRAME_TIMEOUT`] once started. Each connection has at most one request in
//! flight, connections are bounded ([`server::ServerConfig::max_connections`], one thread
//! each), concurrent fetches node-wide are bounded, and identical concurrent requests (of a
//! chunk, or of a block) are fetched once. A client that disconnects mid-request costs the
//! fetch (which then serves the next asker from the cache) and nothing else; sends never
//! raise `SIGPIPE`. Descriptors a client tries to pass to the fetcher are discarded by the
//! kernel (the fetcher reads with plain `read`). A vmm gets plaintexts only for chunks (and
//! blocks) whose id (and key, for encrypted ones) it names: knowing an encrypted chunk's id
//! and table without its key gets nothing, since the memfd LRU is keyed by the key too and a
//! block is decrypted with the key given. Descriptors are read-only (cache files are 0600
//! and owned by the fetcher's user, which a vmm must not be; memfds are sealed), so a vmm
//! cannot change what another vmm reads. Peer credentials (`SO_PEERCRED`) are logged per
//! connection; access to the socket itself is by its mode and group
//! (`--socket-mode`, `--socket-group`).

pub mod client;
pub mod protocol;
pub mod server;

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// What can go wrong between a vmm and the fetcher.
#[derive(Debug, thiserror::Error)]
pub enum FetcherError {
    #[error("cannot connect to the chunk fetcher at {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("chunk fetcher connection: {0}")]
    Io(#[from] io::Error),
    #[error("chunk fetcher protocol: {0}")]
    Protocol(#[from] protocol::ProtocolError),
    #[error("chunk fetcher refused the chunk ({code:?}): {message}")]
    Refused {
        code: protocol::ErrorCode,
        message: String,
    },
    #[error("chunk fetcher sent an unusable descriptor: {0}")]
    BadDescriptor(String),
    #[error("chunk fetcher client is shut down")]
    Closed,
}

/// Room for the control message of up to 4 descriptors (aligned for `cmsghdr`).
const CMSG_WORDS: usize = 16;

/// Sends all of `data` on socket `sock`, with `fd` attached to the first byte (SCM_RIGHTS),
/// never raising SIGPIPE.
pub(crate) fn send_with_fd(sock: RawFd, data: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let mut sent = 0usize;
    let mut first = true;
    while sent < data.len() {
        let rest = &data[sent..];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        let mut cbuf = [0u64; CMSG_WORDS];
        // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let (Some(fd), true) = (fd, first) {
            // SAFETY: the buffer holds CMSG_SPACE(4) bytes, aligned; CMSG_FIRSTHDR of a
            // msghdr with that control buffer is non-null and inside it.
            unsafe {
                msg.msg_control = cbuf.as_mut_ptr().cast();
                msg.msg_controllen = libc::CMSG_SPACE(4) as _;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(4) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut RawFd, fd);
            }
        }
        // SAFETY: msg describes valid buffers.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        first = false;
        sent += n as usize;
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes from `sock` into `buf`, appending any descriptors that
/// come with them to `fds` (close-on-exec). Returns the byte count (0: end of stream).
pub(crate) fn recv_with_fds(
    sock: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut cbuf = [0u64; CMSG_WORDS];
        // SAFETY: as in send_with_fd.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        // SAFETY: msg describes valid buffers.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: the kernel filled msg_control with well-formed headers within
        // msg_controllen; CMSG_NXTHDR stays inside it.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c);
                    let bytes = (*c).cmsg_len as usize - (data as usize - c as usize);
                    for i in 0..bytes / 4 {
                        let fd = std::ptr::read_unaligned((data as *const RawFd).add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other(
                "descriptors were lost (control data truncated)",
            ));
        }
        return Ok(n as usize);
    }
}
