//! The vsock device's worker: one thread, started before the vCPUs run, that installs the
//! vsock seccomp filter and then serves each activation of the device (a [`Session`]) until
//! the device is reset. A session is one epoll loop over the three queues' notifications, the
//! host listening socket and every connection's unix stream (all non-blocking):
//! - tx queue: each packet's header is checked (bad ones are dropped or answered with an RST,
//!   and counted) and acted on: connect to `<uds_path>_<port>`, data for the host peer,
//!   shutdown, credit;
//! - rx queue: RSTs, control packets and host data (read only as far as the guest's credit and
//!   receive buffer allow) go to the guest, taking connections in turn;
//! - event queue: its buffers are kept for a transport reset event;
//! - listener: a host program's `CONNECT <port>\n` opens a connection to the guest, answered
//!   with `OK <host port>\n` once the guest accepts (the stream is closed when it refuses).
//!
//! Every buffer is bounded: connections ([`MAX_CONNECTIONS`]), pending handshakes, RSTs owed,
//! guest data per connection (the credit the device grants). Nothing blocks the loop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::connection::{Connection, Fate, Next, State};
use super::packet::{
    Header, EVENT_TRANSPORT_RESET, HDR_LEN, HOST_CID, MAX_PAYLOAD, OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
};
use crate::devices::log_limit::{debug_limited, error_limited, warn_limited};
use crate::devices::virtio::{VirtioInterrupt, VirtioMetrics};

/// Most connections at once (each buffers at most `TX_BUF_SIZE` of guest data).
pub const MAX_CONNECTIONS: usize = 256;
/// Most host programs that have connected but not yet sent their `CONNECT` line.
pub const MAX_HANDSHAKES: usize = 32;
/// How long a host program has to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most RSTs owed to the guest (further ones are dropped, and counted).
pub const MAX_PENDING_RSTS: usize = 1024;
/// The longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Host ports given to host-initiated connections start here.
const FIRST_HOST_PORT: u32 = 1 << 30;

const RX: usize = 0;
const TX: usize = 1;
const EVENTS: usize = 2;
const TOKEN_WAKE: u64 = 3;
const TOKEN_LISTENER: u64 = 4;
const FIRST_CONN_TOKEN: u64 = 16;

/// What the device asks of its worker.
pub enum Command {
    /// Serve the queues of an activation.
    Activate(Session),
    /// Stop serving: drop the queues and every connection.
    Stop,
    /// Drop every connection and tell the guest so (the event queue's transport reset).
    TransportReset,
    /// End the thread.
    Exit,
}

/// The queues of one activation.
pub struct Session {
    pub mem: GuestMemoryMmap,
    /// rx, tx, event.
    pub queues: Vec<Queue>,
    pub events: Vec<EventFd>,
    pub interrupt: Arc<VirtioInterrupt>,
}

/// What the worker knows of its device.
#[derive(Clone)]
pub struct WorkerConfig {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
    pub listener: Arc<UnixListener>,
    pub metrics: Arc<VirtioMetrics>,
}

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    Stopped,
    Exit,
}

/// A host program connected to the listener, its `CONNECT` line not read yet.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

pub struct Muxer {
    cfg: WorkerConfig,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    events: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
    epoll: Epoll,
    conns: HashMap<u64, Connection>,
    by_key: HashMap<(u32, u32), u64>,
    host_ports: HashSet<u32>,
    handshakes: HashMap<u64, Handshake>,
    rsts: VecDeque<Header>,
    rx_pending: VecDeque<u64>,
    next_token: u64,
    next_host_port: u32,
    transport_reset_pending: bool,
    used: [bool; 3],
    /// A queue the guest broke (bad indices): the session serves nothing more until reset.
    broken: bool,
    /// While accepting fails (out of descriptors), the listener is out of the epoll set
    /// until then, so a level-triggered listener does not spin the loop.
    listener_paused: Option<Instant>,
    scratch: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("epoll: {0}")]
    Epoll(std::io::Error),
    #[error("the session needs 3 queues and their events, got {0}")]
    Queues(usize),
}

impl Muxer {
    pub fn new(cfg: WorkerConfig, session: Session) -> Result<Self, MuxerError> {
        let Session {
            mem,
            queues,
            events,
            interrupt,
        } = session;
        if queues.len() != 3 || events.len() != 3 {
            return Err(MuxerError::Queues(queues.len()));
        }
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        for (index, event) in events.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    event.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, index as u64),
                )
                .map_err(MuxerError::Epoll)?;
        }
        epoll
            .ctl(
                ControlOperation::Add,
                cfg.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )
            .map_err(MuxerError::Epoll)?;
        Ok(Self {
            cfg,
            mem,
            queues,
            events,
            interrupt,
            epoll,
            conns: HashMap::new(),
            by_key: HashMap::new(),
            host_ports: HashSet::new(),
            handshakes: HashMap::new(),
            rsts: VecDeque::new(),
            rx_pending: VecDeque::new(),
            next_token: FIRST_CONN_TOKEN,
            next_host_port: FIRST_HOST_PORT,
            transport_reset_pending: false,
            used: [false; 3],
            broken: false,
            listener_paused: None,
            scratch: vec![0u8; MAX_PAYLOAD as usize],
        })
    }

    /// Serves the session until a command ends it; `wake` is signalled with every command.
    pub fn run(mut self, commands: &Receiver<Command>, wake: &EventFd) -> SessionEnd {
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        ) {
            error_limited!("vsock: cannot wait for the device's commands: {e}");
            return SessionEnd::Exit;
        }
        // Notifications sent before the session started.
        self.process_all();
        let mut ready = vec![EpollEvent::default(); 64];
        loop {
            let timeout = if self.conns.values().any(|c| c.deadline.is_some())
                || !self.handshakes.is_empty()
                || self.listener_paused.is_some()
            {
                500
            } else {
                -1
            };
            let n = match self.epoll.wait(timeout, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => 0,
                Err(e) => {
                    error_limited!("vsock: epoll failed, the device stops: {e}");
                    return wait_for_stop(commands);
                }
            };
            for event in &ready[..n] {
                let token = event.data();
                let set = event.event_set();
                match token {
                    TOKEN_WAKE => {
                        let _ = wake.read();
                        loop {
                            match commands.try_recv() {
                                Ok(Command::Stop) => return SessionEnd::Stopped,
                                Ok(Command::Exit) | Err(TryRecvError::Disconnected) => {
                                    return SessionEnd::Exit
                                }
                                Ok(Command::TransportReset) => self.transport_reset(),
                                Ok(Command::Activate(_)) => {
                                    error_limited!("vsock: activated while active; ignored");
                                }
                                Err(TryRecvError::Empty) => break,
                            }
                        }
                    }
                    t if t < 3 => {
                        let _ = self.events[t as usize].read();
                    }
                    TOKEN_LISTENER => self.accept_host_connections(),
                    t => self.stream_event(t, set),
                }
            }
            self.expire(Instant::now());
            self.process_all();
        }
    }

    /// Serves every queue, then raises the interrupt if the guest needs it.
    pub fn process_all(&mut self) {
        if self.broken {
            return;
        }
        let result = self
            .process_tx()
            .and_then(|()| self.process_rx())
            .and_then(|()| self.process_events());
        if let Err(e) = result {
            VirtioMetrics::add(&self.cfg.metrics.errors, 1);
            error_limited!("vsock: queue error, the device stops until reset: {e:?}");
            self.broken = true;
        }
        let mut signal = false;
        for (index, used) in self.used.iter_mut().enumerate() {
            if std::mem::take(used) {
                signal |= self.queues[index]
                    .needs_notification(&self.mem)
                    .unwrap_or(true);
            }
        }
        if signal {
            self.interrupt.signal_used_queue();
        }
    }

    fn process_tx(&mut self) -> Result<(), virtio_queue::Error> {
        let mem = self.mem.clone();
        loop {
            self.queues[TX].disable_notification(&mem)?;
            while let Some(chain) = self.queues[TX].iter(&mem)?.next() {
                let head = chain.head_index();
                match Reader::new(&mem, chain) {
                    Ok(reader) => self.handle_tx_packet(reader),
                    Err(e) => self.bad_chain("tx", &e),
                }
                self.queues[TX].add_used(&mem, head, 0)?;
                self.used[TX] = true;
            }
            if !self.queues[TX].enable_notification(&mem)? {
                return Ok(());
            }
        }
    }

    fn bad_chain(&self, queue: &str, e: &dyn std::fmt::Debug) {
        VirtioMetrics::add(&self.cfg.metrics.errors, 1);
        warn_limited!("vsock: malformed {queue} descriptor chain: {e:?}");
    }

    fn handle_tx_packet(&mut self, mut reader: Reader<'_>) {
        let mut raw = [0u8; HDR_LEN];
        if reader.read_exact(&mut raw).is_err() {
            VirtioMetrics::add(&self.cfg.metrics.errors, 1);
            warn_limited!("vsock: tx packet shorter than its header");
            return;
        }
        let hdr = Header::from_bytes(&raw);
        if let Err(e) = hdr.check_from_guest(self.cfg.guest_cid, reader.available_bytes()) {
            VirtioMetrics::add(&self.cfg.metrics.errors, 1);
            warn_limited!("vsock: bad packet from the guest: {e}");
            if e.answerable() && hdr.op != OP_RST {
                if hdr.dst_cid == HOST_CID {
                    if let Some(&token) = self.by_key.get(&(hdr.dst_port, hdr.src_port)) {
                        self.remove(token, false);
                    }
                }
                self.owe_rst(hdr.rst_reply());
            }
            return;
        }
        VirtioMetrics::add(&self.cfg.metrics.requests, 1);
        let key = (hdr.dst_port, hdr.src_port);
        let Some(&token) = self.by_key.get(&key) else {
            match hdr.op {
                OP_REQUEST => self.connect_to_host(&hdr),
                OP_RST => {}
                _ => self.owe_rst(hdr.rst_reply()),
            }
            return;
        };
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        conn.update_peer_credit(&hdr);
        match (hdr.op, conn.state) {
            (OP_RST, _) => {
                self.remove(token, false);
                return;
            }
            (OP_RESPONSE, State::Connecting) => conn.established(),
            (OP_RW, State::Established) => {
                let len = hdr.len as usize;
                let data = &mut self.scratch[..len];
                if reader.read_exact(data).is_err() || !conn.push_guest_data(data) {
                    VirtioMetrics::add(&self.cfg.metrics.errors, 1);
                    warn_limited!(
                        "vsock: guest port {} sent {len} bytes beyond its credit; connection reset",
                        hdr.src_port
                    );
                    self.remove(token, true);
                    return;
                }
            }
            (OP_SHUTDOWN, State::Established) => conn.guest_shutdown(hdr.flags),
            (OP_CREDIT_UPDATE, State::Established) => {}
            (OP_CREDIT_REQUEST, State::Established) => conn.owe_credit_update(),
            // A second REQUEST for a live connection, or a packet out of its state.
            _ => {
                VirtioMetrics::add(&self.cfg.metrics.errors, 1);
                debug_limited!(
                    "vsock: operation {} out of state {:?}; connection reset",
                    hdr.op,
                    conn.state
                );
                self.remove(token, true);
                return;
            }
        }
        self.flush(token);
        self.after_change(token);
    }

    /// The guest's REQUEST to host port P: connect to `<uds_path>_P`.
    fn connect_to_host(&mut self, hdr: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            VirtioMetrics::add(&self.cfg.metrics.dropped, 1);
            warn_limited!(
                "vsock: guest connection to port {} refused: {MAX_CONNECTIONS} connections open",
                hdr.dst_port
            );
            self.owe_rst(hdr.rst_reply());
            return;
        }
        let mut path = self.cfg.uds_path.as_os_str().to_owned();
        path.push(format!("_{}", hdr.dst_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let conn = Connection::from_guest(stream, self.cfg.guest_cid, hdr);
                self.insert(conn);
            }
            Err(e) => {
                debug_limited!(
                    "vsock: guest connection to {} refused: {e}",
                    Path::new(&path).display()
                );
                self.owe_rst(hdr.rst_reply());
            }
        }
    }

    fn insert(&mut self, mut conn: Connection) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        conn.interest = conn.desired_interest();
        match self.epoll.ctl(
            ControlOperation::Add,
            conn.stream.as_raw_fd(),
            EpollEvent::new(EventSet::from_bits_truncate(conn.interest), token),
        ) {
            Ok(()) => conn.registered = true,
            Err(e) => {
                error_limited!("vsock: cannot watch a connection: {e}");
                self.owe_rst(rst_for(&conn));
                return token;
            }
        }
        self.by_key.insert((conn.host_port, conn.guest_port), token);
        if conn.state == State::Connecting {
            self.host_ports.insert(conn.host_port);
        }
        self.conns.insert(token, conn);
        self.after_change(token);
        token
    }

    /// Forgets a connection (its host stream closes), owing the guest an RST if `rst`.
    fn remove(&mut self, token: u64, rst: bool) {
        if let Some(conn) = self.conns.remove(&token) {
            self.by_key.remove(&(conn.host_port, conn.guest_port));
            self.host_ports.remove(&conn.host_port);
            if rst {
                self.owe_rst(rst_for(&conn));
            }
        }
    }

    fn owe_rst(&mut self, hdr: Header) {
        if self.rsts.len() >= MAX_PENDING_RSTS {
            VirtioMetrics::add(&self.cfg.metrics.dropped, 1);
            return;
        }
        self.rsts.push_back(hdr);
    }

    /// Writes what the guest sent to the host peer; a failed peer resets the connection.
    fn flush(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        match conn.flush_to_host() {
            Ok(n) => VirtioMetrics::add(&self.cfg.metrics.bytes_written, n as u64),
            Err(e) => {
                debug_limited!(
                    "vsock: host peer of guest port {} failed: {e}",
                    conn.guest_port
                );
                self.remove(token, true);
            }
        }
    }

    /// Applies a connection's fate, its epoll interest and its place in the rx queue.
    fn after_change(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.fate(Instant::now()) == Fate::Reset {
            self.remove(token, true);
            return;
        }
        let desired = conn.desired_interest();
        if conn.registered && desired != conn.interest {
            let event = EpollEvent::new(EventSet::from_bits_truncate(desired), token);
            match self
                .epoll
                .ctl(ControlOperation::Modify, conn.stream.as_raw_fd(), event)
            {
                Ok(()) => conn.interest = desired,
                Err(e) => {
                    error_limited!("vsock: cannot watch a connection: {e}");
                    self.remove(token, true);
                    return;
                }
            }
        }
        if !conn.queued && conn.has_rx_work() {
            conn.queued = true;
            if conn.owes_handshake() {
                self.rx_pending.push_front(token);
            } else {
                self.rx_pending.push_back(token);
            }
        }
    }

    fn stream_event(&mut self, token: u64, set: EventSet) {
        if self.handshakes.contains_key(&token) {
            self.read_connect_line(token);
            return;
        }
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            if conn.state == State::Connecting {
                self.remove(token, true);
                return;
            }
            // Always reported: out of the epoll set, or it would be reported forever.
            if conn.registered {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    conn.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
                conn.registered = false;
            }
            conn.host_hung_up();
        }
        if set.contains(EventSet::IN) {
            conn.readable = true;
        }
        if set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            self.flush(token);
        }
        self.after_change(token);
    }

    /// Accepts host programs' connections; beyond the limits they are closed at once.
    fn accept_host_connections(&mut self) {
        for _ in 0..MAX_HANDSHAKES {
            let stream = match accept_nonblocking(self.cfg.listener.as_raw_fd()) {
                Ok(stream) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn_limited!("vsock: accept failed, retried in a second: {e}");
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        self.cfg.listener.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    self.listener_paused = Some(Instant::now() + Duration::from_secs(1));
                    return;
                }
            };
            if self.handshakes.len() >= MAX_HANDSHAKES
                || self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS
            {
                VirtioMetrics::add(&self.cfg.metrics.dropped, 1);
                warn_limited!("vsock: host connection refused: too many connections");
                continue;
            }
            let token = self.next_token;
            self.next_token += 1;
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            ) {
                error_limited!("vsock: cannot watch a host connection: {e}");
                continue;
            }
            self.handshakes.insert(
                token,
                Handshake {
                    stream,
                    line: Vec::new(),
                    deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                },
            );
        }
    }

    /// Reads a host program's `CONNECT <port>\n` (never past its end: what follows is data
    /// for the guest) and starts the connection to the guest.
    fn read_connect_line(&mut self, token: u64) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let mut peek = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE - hs.line.len();
        let seen = match peek_nonblocking(&hs.stream, &mut peek[..room]) {
            Ok(0) => {
                self.handshakes.remove(&token);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => {
                self.handshakes.remove(&token);
                return;
            }
        };
        let end = peek[..seen].iter().position(|&b| b == b'\n');
        let take = end.map_or(seen, |at| at + 1);
        let mut chunk = vec![0u8; take];
        if hs.stream.read_exact(&mut chunk).is_err() {
            self.handshakes.remove(&token);
            return;
        }
        hs.line.extend_from_slice(&chunk);
        if end.is_none() {
            if hs.line.len() >= MAX_CONNECT_LINE {
                VirtioMetrics::add(&self.cfg.metrics.errors, 1);
                warn_limited!("vsock: host connection sent no CONNECT line; closed");
                self.handshakes.remove(&token);
            }
            return;
        }
        let Some(hs) = self.handshakes.remove(&token) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            hs.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let Some(port) = parse_connect_line(&hs.line) else {
            VirtioMetrics::add(&self.cfg.metrics.errors, 1);
            warn_limited!(
                "vsock: host connection sent {:?}, not CONNECT <port>; closed",
                String::from_utf8_lossy(&hs.line)
            );
            return;
        };
        let Some(host_port) = self.free_host_port() else {
            return;
        };
        let conn = Connection::from_host(hs.stream, self.cfg.guest_cid, host_port, port);
        self.insert(conn);
    }

    fn free_host_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_host_port;
            self.next_host_port = self
                .next_host_port
                .checked_add(1)
                .unwrap_or(FIRST_HOST_PORT);
            if !self.host_ports.contains(&port) {
                return Some(port);
            }
        }
        None
    }

    /// Ends handshakes and connections whose time is up.
    fn expire(&mut self, now: Instant) {
        if self.listener_paused.is_some_and(|until| now >= until) {
            self.listener_paused = None;
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                self.cfg.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            ) {
                error_limited!("vsock: cannot watch the listening socket again: {e}");
            }
        }
        self.handshakes.retain(|_, hs| hs.deadline > now);
        let expired: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| now >= d))
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            debug_limited!("vsock: connection timed out; reset");
            self.remove(token, true);
        }
    }

    /// Fills the guest's receive buffers: RSTs first, then connections in turn.
    fn process_rx(&mut self) -> Result<(), virtio_queue::Error> {
        let mem = self.mem.clone();
        while !self.rsts.is_empty() || !self.rx_pending.is_empty() {
            let Some(chain) = self.queues[RX].iter(&mem)?.next() else {
                return Ok(());
            };
            let head = chain.head_index();
            let mut writer = match Writer::new(&mem, chain) {
                Ok(w) if w.available_bytes() >= HDR_LEN => w,
                Ok(_) => {
                    self.bad_chain("rx", &"shorter than a header");
                    self.queues[RX].add_used(&mem, head, 0)?;
                    self.used[RX] = true;
                    continue;
                }
                Err(e) => {
                    self.bad_chain("rx", &e);
                    self.queues[RX].add_used(&mem, head, 0)?;
                    self.used[RX] = true;
                    continue;
                }
            };
            let room = (writer.available_bytes() - HDR_LEN).min(MAX_PAYLOAD as usize);
            let Some(hdr) = self.next_rx_packet(room) else {
                self.queues[RX].go_to_previous_position();
                return Ok(());
            };
            let len = hdr.len as usize;
            let written = writer
                .write_all(&hdr.to_bytes())
                .and_then(|()| writer.write_all(&self.scratch[..len]));
            if let Err(e) = written {
                self.bad_chain("rx", &e);
            }
            if hdr.op == OP_RW {
                VirtioMetrics::add(&self.cfg.metrics.bytes_read, len as u64);
            }
            self.queues[RX].add_used(&mem, head, (HDR_LEN + len) as u32)?;
            self.used[RX] = true;
        }
        Ok(())
    }

    /// The next packet for the guest (payload of at most `room` bytes in the scratch buffer).
    fn next_rx_packet(&mut self, room: usize) -> Option<Header> {
        loop {
            if let Some(rst) = self.rsts.pop_front() {
                return Some(rst);
            }
            let token = self.rx_pending.pop_front()?;
            let Some(conn) = self.conns.get_mut(&token) else {
                continue;
            };
            conn.queued = false;
            match conn.next_packet(&mut self.scratch[..room]) {
                Next::Packet(hdr) => {
                    self.after_change(token);
                    return Some(hdr);
                }
                Next::Nothing => self.after_change(token),
                Next::Reset => self.remove(token, true),
            }
        }
    }

    /// Posts a pending transport reset event in the guest's next event buffer.
    fn process_events(&mut self) -> Result<(), virtio_queue::Error> {
        let mem = self.mem.clone();
        while self.transport_reset_pending {
            let Some(chain) = self.queues[EVENTS].iter(&mem)?.next() else {
                return Ok(());
            };
            let head = chain.head_index();
            let written = match Writer::new(&mem, chain) {
                Ok(mut w) if w.available_bytes() >= 4 => w
                    .write_all(&EVENT_TRANSPORT_RESET.to_le_bytes())
                    .map(|()| 4)
                    .unwrap_or(0),
                _ => 0,
            };
            if written == 0 {
                self.bad_chain("event", &"no room for an event");
            } else {
                self.transport_reset_pending = false;
            }
            self.queues[EVENTS].add_used(&mem, head, written)?;
            self.used[EVENTS] = true;
        }
        Ok(())
    }

    /// Drops every connection and handshake (their host streams close) and tells the guest
    /// through the event queue, after which it drops its connections and reads its cid again.
    pub fn transport_reset(&mut self) {
        self.conns.clear();
        self.by_key.clear();
        self.host_ports.clear();
        self.handshakes.clear();
        self.rsts.clear();
        self.rx_pending.clear();
        self.transport_reset_pending = true;
    }
}

fn rst_for(conn: &Connection) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: conn.guest_cid,
        src_port: conn.host_port,
        dst_port: conn.guest_port,
        type_: super::packet::TYPE_STREAM,
        op: OP_RST,
        ..Header::default()
    }
}

/// After a fatal error: waits for the device to stop or end the session.
fn wait_for_stop(commands: &Receiver<Command>) -> SessionEnd {
    loop {
        match commands.recv() {
            Ok(Command::Stop) => return SessionEnd::Stopped,
            Ok(Command::Exit) | Err(_) => return SessionEnd::Exit,
            Ok(_) => {}
        }
    }
}

/// `CONNECT <port>\n` (a trailing `\r` accepted).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let text = text.strip_suffix('\n')?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let port = text.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Connects a non-blocking unix stream socket to `path`; a listener whose backlog is full
/// refuses (EAGAIN) instead of making the worker wait.
pub fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: a plain socket call; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes.
    let rc = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// Accepts a connection as a non-blocking stream.
fn accept_nonblocking(listener: RawFd) -> std::io::Result<UnixStream> {
    // SAFETY: accept4 with no address buffer; the descriptor is owned below.
    let fd = unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Reads without consuming.
fn peek_nonblocking(stream: &UnixStream, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
impl Muxer {
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn buffered(&self) -> usize {
        self.conns.values().map(|c| c.buffered()).sum()
    }

    /// One round of the loop without blocking: pending stream and listener events, deadlines,
    /// then the queues.
    pub fn poll_once(&mut self) {
        let mut ready = vec![EpollEvent::default(); 64];
        let n = self.epoll.wait(0, &mut ready).unwrap_or(0);
        for event in &ready[..n] {
            match event.data() {
                t if t < 3 => {
                    let _ = self.events[t as usize].read();
                }
                TOKEN_LISTENER => self.accept_host_connections(),
                TOKEN_WAKE => {}
                t => self.stream_event(t, event.event_set()),
            }
        }
        self.expire(Instant::now());
        self.process_all();
    }
}
