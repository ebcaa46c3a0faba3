//! One vsock stream between a guest port and a host unix socket: its state (connecting or
//! established), the credit both sides grant (virtio 1.2 section 5.10.6.3: `buf_alloc` and
//! `fwd_cnt` in every header), the guest's data waiting for the host peer (at most the
//! `buf_alloc` the device advertises: a guest that sends beyond its credit is reset), the
//! shutdown flags of both sides, and the control packets owed to the guest. Host data is read
//! only when the guest has credit for it and a receive buffer to take it, straight into that
//! buffer, so nothing from the host is ever held here.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::packet::{
    Header, HOST_CID, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH,
    SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Bytes of guest data the device buffers per connection: the `buf_alloc` it advertises.
pub const TX_BUF_SIZE: u32 = 256 * 1024;
/// The device tells the guest of freed buffer space once this much has been written out.
const CREDIT_UPDATE_THRESHOLD: u32 = TX_BUF_SIZE / 4;
/// How long a host-initiated connection waits for the guest's answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection both sides have shut down waits for the guest's RST.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

// Control packets owed to the guest.
const PENDING_REQUEST: u8 = 1;
const PENDING_RESPONSE: u8 = 2;
const PENDING_CREDIT_UPDATE: u8 = 4;
const PENDING_SHUTDOWN: u8 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: a REQUEST is (to be) sent to the guest, no RESPONSE yet.
    Connecting,
    Established,
}

/// What the connection has for the guest's next receive buffer.
pub enum Next {
    /// A packet: its header, and its payload in the first `len` bytes of the scratch buffer.
    Packet(Header),
    Nothing,
    /// The host stream failed: the connection must be reset.
    Reset,
}

/// What the connection's owner must do with it.
#[derive(Debug, PartialEq, Eq)]
pub enum Fate {
    Keep,
    /// Send the guest an RST and forget the connection.
    Reset,
}

pub struct Connection {
    pub stream: UnixStream,
    pub guest_cid: u64,
    pub host_port: u32,
    pub guest_port: u32,
    pub state: State,
    pending: u8,
    /// SHUTDOWN flags to tell the guest (cumulative) and those told already.
    shutdown_to_send: u32,
    shutdown_sent: u32,
    /// Guest to host: bytes waiting for the host peer; the first `prefix` of them are the
    /// device's own (the `OK <port>` answer), not the guest's.
    tx_buf: VecDeque<u8>,
    prefix: usize,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    guest_shut: u32,
    host_write_shut: bool,
    /// Host to guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The host stream may have data (or its end) to read.
    pub readable: bool,
    host_eof: bool,
    /// The host peer is gone (both directions closed).
    pub hup: bool,
    /// The epoll interest set now, and whether the stream is in the epoll set at all.
    pub interest: u32,
    pub registered: bool,
    /// Whether the connection is in the device's queue of connections with packets for the
    /// guest.
    pub queued: bool,
    /// When the connection is given up: a connect without answer, a shutdown without RST.
    pub deadline: Option<Instant>,
}

impl Connection {
    fn new(stream: UnixStream, guest_cid: u64, host_port: u32, guest_port: u32) -> Self {
        Self {
            stream,
            guest_cid,
            host_port,
            guest_port,
            state: State::Established,
            pending: 0,
            shutdown_to_send: 0,
            shutdown_sent: 0,
            tx_buf: VecDeque::new(),
            prefix: 0,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            guest_shut: 0,
            host_write_shut: false,
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            readable: false,
            host_eof: false,
            hup: false,
            interest: 0,
            registered: false,
            queued: false,
            deadline: None,
        }
    }

    /// The guest asked for `host_port`, and its unix socket answered: a RESPONSE is owed.
    pub fn from_guest(stream: UnixStream, guest_cid: u64, request: &Header) -> Self {
        let mut conn = Self::new(stream, guest_cid, request.dst_port, request.src_port);
        conn.update_peer_credit(request);
        conn.pending = PENDING_RESPONSE;
        conn
    }

    /// A host program asked for `guest_port`: a REQUEST is owed, the answer awaited.
    pub fn from_host(stream: UnixStream, guest_cid: u64, host_port: u32, guest_port: u32) -> Self {
        let mut conn = Self::new(stream, guest_cid, host_port, guest_port);
        conn.state = State::Connecting;
        conn.pending = PENDING_REQUEST;
        conn.deadline = Some(Instant::now() + CONNECT_TIMEOUT);
        conn
    }

    /// Every guest header carries its receive buffer size and how much it has consumed.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes the guest can take now. A guest claiming to have consumed more than it was sent
    /// gets no credit (the difference wraps past its buffer size).
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The guest's RESPONSE to a host-initiated connection: the host program gets `OK <port>`.
    pub fn established(&mut self) {
        self.state = State::Established;
        self.deadline = None;
        let line = format!("OK {}\n", self.host_port);
        self.prefix = line.len();
        self.tx_buf.extend(line.as_bytes());
    }

    /// Whether host data should be read for the guest.
    fn wants_host_data(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.guest_shut & SHUTDOWN_RCV == 0
    }

    /// Whether the connection has a packet for the guest now.
    pub fn has_rx_work(&self) -> bool {
        self.pending != 0 || (self.readable && self.wants_host_data() && self.peer_credit() > 0)
    }

    /// Whether a REQUEST or RESPONSE is owed: it goes out before other connections' data, so
    /// a busy device does not make the guest's connects time out.
    pub fn owes_handshake(&self) -> bool {
        self.pending & (PENDING_REQUEST | PENDING_RESPONSE) != 0
    }

    /// The epoll events the connection waits for.
    pub fn desired_interest(&self) -> u32 {
        let mut events = 0;
        if self.wants_host_data() && !self.readable {
            events |= libc::EPOLLIN as u32;
        }
        if !self.tx_buf.is_empty() && !self.host_write_shut {
            events |= libc::EPOLLOUT as u32;
        }
        events
    }

    /// Guest data of an RW packet; false when it exceeds the credit the device granted.
    pub fn push_guest_data(&mut self, data: &[u8]) -> bool {
        let buffered = self.tx_buf.len() - self.prefix;
        if self.guest_shut & SHUTDOWN_SEND != 0 || buffered + data.len() > TX_BUF_SIZE as usize {
            return false;
        }
        self.tx_buf.extend(data);
        true
    }

    /// The guest will send (`SHUTDOWN_SEND`) or receive (`SHUTDOWN_RCV`) no more.
    pub fn guest_shutdown(&mut self, flags: u32) {
        self.guest_shut |= flags & SHUTDOWN_BOTH;
    }

    /// Asks for a credit update (the guest's CREDIT_REQUEST).
    pub fn owe_credit_update(&mut self) {
        self.pending |= PENDING_CREDIT_UPDATE;
    }

    /// Writes buffered guest data to the host peer until it would block; returns the guest's
    /// bytes written. Shuts the host stream's writing side once the guest has shut its sending
    /// side and everything is out.
    pub fn flush_to_host(&mut self) -> std::io::Result<usize> {
        let mut guest_bytes = 0;
        while !self.tx_buf.is_empty() && !self.host_write_shut {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let own = n.min(self.prefix);
                    self.prefix -= own;
                    guest_bytes += n - own;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // At most TX_BUF_SIZE per call: fits a u32.
        self.fwd_cnt += Wrapping(guest_bytes as u32);
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending |= PENDING_CREDIT_UPDATE;
        }
        if self.tx_buf.is_empty() && self.guest_shut & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            // The peer may be gone already; its end is seen on the reading side.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(guest_bytes)
    }

    /// The host peer hung up (or the stream failed): nothing more can be written to it, and
    /// what it sent is read until its end.
    pub fn host_hung_up(&mut self) {
        self.hup = true;
        self.readable = true;
        if self.host_eof || self.guest_shut & SHUTDOWN_RCV != 0 {
            self.host_eof = true;
            self.owe_shutdown(SHUTDOWN_BOTH);
        }
    }

    fn owe_shutdown(&mut self, flags: u32) {
        if self.shutdown_to_send | flags != self.shutdown_to_send {
            self.shutdown_to_send |= flags;
            self.pending |= PENDING_SHUTDOWN;
        }
    }

    /// What must happen to the connection after a change.
    pub fn fate(&self, now: Instant) -> Fate {
        if self.deadline.is_some_and(|d| now >= d) {
            return Fate::Reset;
        }
        if self.guest_shut == SHUTDOWN_BOTH && (self.tx_buf.is_empty() || self.hup) {
            return Fate::Reset;
        }
        Fate::Keep
    }

    fn header(&mut self, op: u16, len: u32, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.host_port,
            dst_port: self.guest_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, its payload (at most `scratch.len()` bytes) read from
    /// the host stream into `scratch`: control packets first, then data, then a credit update
    /// (data carries the credit too), then the shutdown (after the last data).
    pub fn next_packet(&mut self, scratch: &mut [u8]) -> Next {
        if self.pending & PENDING_REQUEST != 0 {
            self.pending &= !PENDING_REQUEST;
            return Next::Packet(self.header(OP_REQUEST, 0, 0));
        }
        if self.pending & PENDING_RESPONSE != 0 {
            self.pending &= !PENDING_RESPONSE;
            return Next::Packet(self.header(OP_RESPONSE, 0, 0));
        }
        if self.readable && self.wants_host_data() {
            let room = scratch.len().min(self.peer_credit() as usize);
            if room > 0 {
                match self.stream.read(&mut scratch[..room]) {
                    Ok(0) => {
                        self.host_eof = true;
                        let flags = if self.hup {
                            SHUTDOWN_BOTH
                        } else {
                            SHUTDOWN_SEND
                        };
                        self.owe_shutdown(flags);
                    }
                    Ok(n) => {
                        // n <= MAX_PAYLOAD.
                        self.rx_cnt += Wrapping(n as u32);
                        self.pending &= !PENDING_CREDIT_UPDATE;
                        return Next::Packet(self.header(OP_RW, n as u32, 0));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.readable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return Next::Reset,
                }
            }
        }
        if self.pending & PENDING_CREDIT_UPDATE != 0 {
            self.pending &= !PENDING_CREDIT_UPDATE;
            return Next::Packet(self.header(OP_CREDIT_UPDATE, 0, 0));
        }
        if self.pending & PENDING_SHUTDOWN != 0 {
            self.pending &= !PENDING_SHUTDOWN;
            self.shutdown_sent = self.shutdown_to_send;
            if self.shutdown_sent == SHUTDOWN_BOTH && self.deadline.is_none() {
                self.deadline = Some(Instant::now() + SHUTDOWN_TIMEOUT);
            }
            return Next::Packet(self.header(OP_SHUTDOWN, 0, self.shutdown_sent));
        }
        Next::Nothing
    }

    /// Guest bytes waiting for the host peer (tests).
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.tx_buf.len() - self.prefix
    }
}
