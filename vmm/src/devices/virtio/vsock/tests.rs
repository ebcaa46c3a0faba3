//! The vsock device driven through its queues in guest memory, as the guest's driver would:
//! packets placed in descriptor chains on split queues, the device's packets read back from
//! the rx queue; host programs are real unix sockets.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::connection::TX_BUF_SIZE;
use super::packet::*;
use super::worker::{Muxer, Session, WorkerConfig};
use super::{VsockDevice, VsockError};
use crate::devices::virtio::test_utils::{Buffer, TestDriver};
use crate::devices::virtio::{Activation, VirtioDevice, VirtioInterrupt, VirtioMetrics};

const CID: u64 = 3;
const QUEUE_SIZE: u16 = 256;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x58_0000;
const SLOT: u64 = 0x1_1000;
const TX_SLOTS: u64 = 16;
const EV_BUF: u64 = 0x70_0000;
const RX_LEN: u32 = HDR_LEN as u32 + 4096;

fn hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 1 << 20,
        ..Header::default()
    }
}

struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    rx: TestDriver<'a>,
    tx: TestDriver<'a>,
    ev: TestDriver<'a>,
    rx_addr: HashMap<u16, u64>,
    next_rx: u64,
    next_tx: u64,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self {
            mem,
            rx: TestDriver::at(mem, GuestAddress(0), QUEUE_SIZE),
            tx: TestDriver::at(mem, GuestAddress(0x1_0000), QUEUE_SIZE),
            ev: TestDriver::at(mem, GuestAddress(0x2_0000), 16),
            rx_addr: HashMap::new(),
            next_rx: 0,
            next_tx: 0,
        }
    }

    fn session(&self, interrupt: Arc<VirtioInterrupt>) -> Session {
        Session {
            mem: self.mem.clone(),
            queues: vec![self.rx.queue(), self.tx.queue(), self.ev.queue()],
            events: (0..3)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                .collect(),
            interrupt,
        }
    }

    /// Offers `n` receive buffers of `len` bytes.
    fn give_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let addr = RX_BUFS + (self.next_rx % 64) * SLOT;
            self.next_rx += 1;
            let head = self.rx.push_chain(&[Buffer {
                addr,
                len,
                writable: true,
            }]);
            self.rx_addr.insert(head, addr);
        }
    }

    /// Places one packet (header and payload in separate buffers, as Linux does) on the tx
    /// queue.
    fn send(&mut self, h: Header, payload: &[u8]) {
        let mut h = h;
        if h.op == OP_RW && h.len == 0 {
            h.len = payload.len() as u32;
        }
        self.send_raw(&h.to_bytes(), payload);
    }

    fn send_raw(&mut self, header: &[u8], payload: &[u8]) {
        let addr = TX_BUFS + (self.next_tx % TX_SLOTS) * SLOT;
        self.next_tx += 1;
        self.mem.write_slice(header, GuestAddress(addr)).unwrap();
        let mut bufs = vec![Buffer {
            addr,
            len: header.len() as u32,
            writable: false,
        }];
        if !payload.is_empty() {
            self.mem
                .write_slice(payload, GuestAddress(addr + 0x100))
                .unwrap();
            bufs.push(Buffer {
                addr: addr + 0x100,
                len: payload.len() as u32,
                writable: false,
            });
        }
        self.tx.push_chain(&bufs);
    }

    /// Every packet the device returned on the rx queue.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((head, len)) = self.rx.pop_used() {
            let addr = self.rx_addr[&(head as u16)];
            let mut raw = [0u8; HDR_LEN];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let h = Header::from_bytes(&raw);
            assert_eq!(len as usize, HDR_LEN + h.len as usize, "used length");
            let mut data = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + HDR_LEN as u64))
                .unwrap();
            out.push((h, data));
        }
        out
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    mem: GuestMemoryMmap,
    metrics: Arc<VirtioMetrics>,
}

impl Fixture {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap(),
            metrics: Arc::new(VirtioMetrics::default()),
        }
    }

    fn uds(&self) -> PathBuf {
        self.dir.path().join("v.sock")
    }

    /// A host program's listener for the guest's connections to `port`.
    fn host_listener(&self, port: u32) -> UnixListener {
        UnixListener::bind(format!("{}_{port}", self.uds().display())).unwrap()
    }

    fn muxer(&self, guest: &Guest) -> Muxer {
        let listener = UnixListener::bind(self.uds()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let cfg = WorkerConfig {
            guest_cid: CID,
            uds_path: self.uds(),
            listener: Arc::new(listener),
            metrics: self.metrics.clone(),
        };
        let interrupt = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        Muxer::new(cfg, guest.session(interrupt)).unwrap()
    }

    fn errors(&self) -> u64 {
        self.metrics.errors.load(Ordering::Relaxed)
    }
}

/// Polls the muxer until the guest has `n` packets (or a second passes).
fn poll_for(muxer: &mut Muxer, guest: &mut Guest, n: usize) -> Vec<(Header, Vec<u8>)> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        muxer.poll_once();
        got.extend(guest.recv());
        if got.len() < n {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    got
}

fn read_some(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}

/// A guest connection to host port 1234 from guest port 5000, accepted by a host program.
fn guest_connection(
    fx: &Fixture,
    muxer: &mut Muxer,
    guest: &mut Guest,
) -> (UnixListener, UnixStream) {
    let listener = fx.host_listener(1234);
    guest.give_rx(8, RX_LEN);
    guest.send(hdr(OP_REQUEST, 5000, 1234), &[]);
    let got = poll_for(muxer, guest, 1);
    assert_eq!(got.len(), 1);
    let (h, _) = &got[0];
    assert_eq!(h.op, OP_RESPONSE);
    assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, CID));
    assert_eq!((h.src_port, h.dst_port), (1234, 5000));
    assert_eq!(h.buf_alloc, TX_BUF_SIZE);
    let (stream, _) = listener.accept().unwrap();
    (listener, stream)
}

#[test]
fn guest_connects_to_the_host_and_data_flows_both_ways() {
    let fx = Fixture::new();
    let mut guest = Guest::new(&fx.mem);
    let mut muxer = fx.muxer(&guest);
    let (_l, mut host) = guest_connection(&fx, &mut muxer, &mut guest);

    guest.send(hdr(OP_RW, 5000, 1234), b"hello host");
    muxer.poll_once();
    assert_eq!(read_some(&mut host, 10), b"hello host");

    host.write_all(b"hello guest").unwrap();
    let got = poll_for(&mut muxer, &mut guest, 1);
    assert_eq!(got[0].0.op, OP_RW);
    assert_eq!(got[0].1, b"hello guest");
    assert_eq!(
        got[0].0.fwd_cnt, 10,
        "the host peer took the guest's 10 bytes"
    );
    assert_eq!(fx.metrics.bytes_written.load(Ordering::Relaxed), 10);
    assert_eq!(fx.metrics.bytes_read.load(Ordering::Relaxed), 11);
    assert_eq!(fx.errors(), 0);
}

#[test]
fn host_connects_with_connect_and_gets_ok_with_its_port() {
    let fx = Fixture::new();
    let mut guest = Guest::new(&fx.mem);
    let mut muxer = fx.muxer(&guest);
    guest.give_rx(8, RX_LEN);
    let mut host = UnixStream::connect(fx.uds()).unwrap();
    // Data right after the line is the guest's, not part of the handshake.
    host.write_all(b"CONNECT 52\nearly").unwrap();
    let got = poll_for(&mut muxer, &mut guest, 1);
    assert_eq!(got.len(), 1);
    let req = got[0].0;
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!((req.dst_cid, req.dst_port), (CID, 52));
    let host_port = req.src_port;

    guest.send(hdr(OP_RESPONSE, 52, host_port), &[]);
    muxer.poll_once();
    let answer = format!("OK {host_port}\n");
    assert_eq!(read_some(&mut host, answer.len()), answer.as_bytes());
    let got = poll_for(&mut muxer, &mut guest, 1);
    assert_eq!(got[0].0.op, OP_RW);
    assert_eq!(got[0].1, b"early");

    guest.send(hdr(OP_RW, 52, host_port), b"from guest");
    muxer.poll_once();
    assert_eq!(read_some(&mut host, 10), b"from guest");
}

#[test]
fn a_refused_host_connection_is_closed() {
    let fx = Fixture::new();
    let mut guest = Guest::new(&fx.mem);
    let mut muxer = fx.muxer(&guest);
    guest.give_rx(8, RX_LEN);
    let mut host = UnixStream::connect(fx.uds()).unwrap();
    host.write_all(b"CONNECT 9\n").unwrap();
    let got = poll_for(&mut muxer, &mut guest, 1);
    let req = got[0].0;
    // Nothing listens on the guest's port 9: the guest answers RST.
    guest.send(hdr(OP_RST, 9, req.src_port), &[]);
    muxer.poll_once();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(host.read(&mut buf).unwrap(), 0, "closed without OK");
    assert_eq!(muxer.connection_count(), 0);

    // A line that is not CONNECT closes the stream too, and is counted.
    let mut bad = UnixStream::connect(fx.uds()).unwrap();
    bad.write_all(b"HELLO 9\n").unwrap();
    poll_for(&mut muxer, &mut guest, 1);
    bad.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(bad.read(&mut buf).unwrap(), 0);
    assert_eq!(fx.errors(), 1);
}

#[test]
fn unknown_ports_and_connections_get_rst() {
    let fx = Fixture::new();
    let mut guest = Guest::new(&fx.mem);
    let mut muxer = fx.muxer(&guest);
    guest.give_rx(8, RX_LEN);
    // Nothing listens on <uds>_77.
    guest.send(hdr(OP_REQUEST, 4000, 77), &[]);
    // Data for a connection that does not exist.
    guest.send(hdr(OP_RW, 4001, 78), b"lost");
    // An RST for an unknown connection is not answered.
    guest.send(hdr(OP_RST, 4002, 79), &[]);
    let got = poll_for(&mut muxer, &mut guest, 3);
    let ops: Vec<(u16, u32, u32)> = got
        .iter()
        .map(|(h, _)| (h.op, h.src_port, h.dst_port))
        .collect();
    assert_eq!(ops, [(OP_RST, 77, 4000), (OP_RST, 78, 4001)]);
    assert_eq!(muxer.connection_count(), 0);
}

#[test]
fn malformed_headers_are_dropped_or_reset_and_counted() {
    let fx = Fixture::new();
    let mut guest = Guest::new(&fx.mem);
    let mut muxer = fx.muxer(&guest);
    let (_l, mut host) = guest_connection(&fx, &mut muxer, &mut guest);
    guest.give_rx(16, RX_LEN);

    // Not from the guest's cid: dropped silently (no one to answer).
    let mut spoofed = hdr(OP_RW, 5000, 1234);
    spoofed.src_cid = 99;
    guest.send(spoofed, b"spoof");
    // Shorter than a header: dropped.
    guest.send_raw(&[1, 2, 3], &[]);
    // A buffer outside guest memory: dropped.
    guest.tx.push_chain(&[Buffer {
        addr: 0xffff_0000,
        len: 64,
        writable: false,
    }]);
    muxer.poll_once();
    assert!(guest.recv().is_empty(), "nothing answers dropped packets");
    assert_eq!(fx.errors(), 3);
    assert_eq!(muxer.connection_count(), 1, "the connection survives");

    // Unknown operation, socket type, or flags; a length beyond what was sent; a length on
    // a packet without data: each answered with an RST.
    let mut cases = Vec::new();
    let mut unknown_op = hdr(OP_RW, 6000, 1);
    unknown_op.op = 42;
    cases.push((unknown_op, Vec::new()));
    let mut seqpacket = hdr(OP_REQUEST, 6001, 2);
    seqpacket.type_ = 2;
    cases.push((seqpacket, Vec::new()));
    let mut flags = hdr(OP_SHUTDOWN, 6002, 3);
    flags.flags = 4;
    cases.push((flags, Vec::new()));
    let mut long = hdr(OP_RW, 6003, 4);
    long.len = 100;
    cases.push((long, b"short".to_vec()));
    let mut huge = hdr(OP_RW, 6004, 5);
    huge.len = MAX_PAYLOAD + 1;
    cases.push((huge, Vec::new()));
    let mut len_on_control = hdr(OP_CREDIT_REQUEST, 6005, 6);
    len_on_control.len = 4;
    cases.push((len_on_control, b"abcd".to_vec()));
    let mut to_other_cid = hdr(OP_REQUEST, 6006, 7);
    to_other_cid.dst_cid = 5;
    cases.push((to_other_cid, Vec::new()));
    for (h, payload) in &cases {
        guest.send_raw(&h.to_bytes(), payload);
    }
    let got = poll_for(&mut muxer, &mut guest, cases.len());
    assert_eq!(got.len(), cases.len());
    for ((h, _), (sent, _)) in got.iter().zip(&cases) {
        assert_eq!(h.op, OP_RST, "answer to {sent:?}");
        assert_eq!((h.src_port, h.dst_port), (sent.dst_port, sent.src_port));
    }
    assert_eq!(fx.errors(), 3 + cases.len() as u64);

    // A bad length on the live connection resets it.
    let mut bad = hdr(OP_RW, 5000, 1234);
    bad.len = 10;
    guest.send_raw(&bad.to_bytes(), b"abc");
    let got = poll_for(&mut muxer, &mut guest, 1);
    assert_eq!(got[0].0.op, OP_RST);
    assert_eq!(muxer.connection_count(), 0);
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(host.read(&mut [0u8; 4]).unwrap(), 0, "host stream closed");

    // Short rx buffers are returned unused; the queue keeps working.
    guest.give_rx(1, 8);
    guest.send(hdr(OP_REQUEST, 7000, 1234), &[]);
    muxer.poll_once();
    assert!(fx.errors() > 3 + cases.len() as u64);
}

#[test]
fn host_data_follows_the_guests_credit() {
    let fx = Fixture::new();
    let mut guest = Guest::new(&fx.mem);
    let mut muxer = fx.muxer(&guest);
    let listener = fx.host_listener(1234);
    guest.give_rx(8, RX_LEN);
    let mut request = hdr(OP_REQUEST, 5000, 1234);
    request.buf_alloc = 8;
    guest.send(request, &[]);
    assert_eq!(poll_for(&mut muxer, &mut guest, 1)[0].0.op, OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&[7u8; 100]).unwrap();
    let got = poll_for(&mut muxer, &mut guest, 2);
    assert_eq!(got.len(), 1, "only the guest's 8 bytes of credit are sent");
    assert_eq!(got[0].1.len(), 8);

    // The guest consumed them: 8 more.
    let mut update = hdr(OP_CREDIT_UPDATE, 5000, 1234);
    update.buf_alloc = 8;
    update.fwd_cnt = 8;
    guest.send(update, &[]);
    let got = poll_for(&mut muxer, &mut guest, 2);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.len(), 8);

    // A credit request is answered with the device's credit.
    let mut request = hdr(OP_CREDIT_REQUEST, 5000, 1234);
    request.buf_alloc = 8;
    request.fwd_cnt = 8;
    guest.send(request, &[]);
    let got = poll_for(&mut muxer, &mut guest, 1);
    assert_eq!(got[0].0.op, OP_CREDIT_UPDATE);
    assert_eq!(got[0].0.buf_alloc, TX_BUF_SIZE);
}

#[test]
fn a_guest_sending_beyond_its_credit_is_reset() {
    let fx = Fixture::new();
    let mut guest = Guest::new(&fx.mem);
    let mut muxer = fx.muxer(&guest);
    // The host peer never reads.
    let (_l, _host) = guest_connection(&fx, &mut muxer, &mut guest);
    let chunk = vec![1u8; MAX_PAYLOAD as usize];
    let mut sent = 0usize;
    let mut reset = false;
    for _ in 0..64 {
        guest.send(hdr(OP_RW, 5000, 1234), &chunk);
        sent += chunk.len();
        muxer.poll_once();
        assert!(muxer.buffered() <= TX_BUF_SIZE as usize, "bounded");
        if guest.recv().iter().any(|(h, _)| h.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "still connected after {sent} bytes");
    assert_eq!(muxer.connection_count(), 0);
    assert!(fx.errors() >= 1);
}

#[test]
fn a_host_peer_that_stops_reading_stalls_only_its_connection() {
    let fx = Fixture::new();
    let mut guest = Guest::new(&fx.mem);
    let mut muxer = fx.muxer(&guest);
    let (_l, _stuck) = guest_connection(&fx, &mut muxer, &mut guest);
    // Within its credit, the guest fills the host socket's buffer, then the device's.
    let chunk = vec![2u8; MAX_PAYLOAD as usize];
    let (mut sent, mut fwd_cnt) = (0u32, 0u32);
    for _ in 0..512 {
        if TX_BUF_SIZE - (sent - fwd_cnt) < MAX_PAYLOAD {
            break;
        }
        guest.send(hdr(OP_RW, 5000, 1234), &chunk);
        sent += MAX_PAYLOAD;
        muxer.poll_once();
        for (h, _) in guest.recv() {
            fwd_cnt = fwd_cnt.max(h.fwd_cnt);
        }
        guest.give_rx(1, RX_LEN);
    }
    assert!(muxer.buffered() > 0, "the stuck peer holds data back");
    assert!(muxer.buffered() <= TX_BUF_SIZE as usize);

    // Another connection still carries data.
    let other = fx.host_listener(2000);
    guest.send(hdr(OP_REQUEST, 5001, 2000), &[]);
    muxer.poll_once();
    let (mut peer, _) = other.accept().unwrap();
    guest.send(hdr(OP_RW, 5001, 2000), b"still flowing");
    muxer.poll_once();
    assert_eq!(read_some(&mut peer, 13), b"still flowing");
}

#[test]
fn a_guest_that_stops_reading_makes_the_host_wait_not_the_vmm_buffer() {
    let fx = Fixture::new();
    let mut guest = Guest::new(&fx.mem);
    let mut muxer = fx.muxer(&guest);
    let (_l, mut host) = guest_connection(&fx, &mut muxer, &mut guest);
    // The guest gives no more receive buffers (8 were given, one took the RESPONSE).
    host.set_nonblocking(true).unwrap();
    let block = vec![3u8; 64 * 1024];
    let mut written = 0usize;
    let mut would_block = false;
    for _ in 0..4096 {
        match host.write(&block) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // Let the device take what it can, then try again once.
                muxer.poll_once();
                if host.write(&block).is_err() {
                    would_block = true;
                    break;
                }
            }
            Err(e) => panic!("{e}"),
        }
        muxer.poll_once();
    }
    assert!(
        would_block,
        "the host wrote {written} bytes without waiting"
    );
    let delivered: usize = guest.recv().iter().map(|(_, d)| d.len()).sum();
    assert!(
        delivered <= 7 * 4096,
        "only into the buffers given: {delivered}"
    );
    assert!(written < 64 << 20, "{written}");
}

#[test]
fn shutdown_flags_close_each_side() {
    let fx = Fixture::new();
    let mut guest = Guest::new(&fx.mem);
    let mut muxer = fx.muxer(&guest);
    let (_l, mut host) = guest_connection(&fx, &mut muxer, &mut guest);
    guest.send(hdr(OP_RW, 5000, 1234), b"last words");
    let mut shut = hdr(OP_SHUTDOWN, 5000, 1234);
    shut.flags = SHUTDOWN_SEND;
    guest.send(shut, &[]);
    muxer.poll_once();
    let mut all = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"last words", "data, then the end of the stream");

    // The host answers and closes: the guest gets the data, then SHUTDOWN.
    host.write_all(b"bye").unwrap();
    drop(host);
    let got = poll_for(&mut muxer, &mut guest, 2);
    assert_eq!(got[0].1, b"bye");
    assert_eq!(got[1].0.op, OP_SHUTDOWN);
    assert_eq!(got[1].0.flags, SHUTDOWN_BOTH);
    // The guest finishes with an RST; the connection is gone.
    guest.send(hdr(OP_RST, 5000, 1234), &[]);
    muxer.poll_once();
    assert_eq!(muxer.connection_count(), 0);

    // A guest's full shutdown is answered with an RST once its data is out.
    let (_l2, mut host) = {
        let listener = fx.host_listener(1235);
        guest.send(hdr(OP_REQUEST, 5002, 1235), &[]);
        assert_eq!(poll_for(&mut muxer, &mut guest, 1)[0].0.op, OP_RESPONSE);
        let (s, _) = listener.accept().unwrap();
        (listener, s)
    };
    guest.send(hdr(OP_RW, 5002, 1235), b"end");
    let mut shut = hdr(OP_SHUTDOWN, 5002, 1235);
    shut.flags = SHUTDOWN_BOTH;
    guest.send(shut, &[]);
    let got = poll_for(&mut muxer, &mut guest, 1);
    assert_eq!(got[0].0.op, OP_RST);
    assert_eq!(read_some(&mut host, 3), b"end");
    assert_eq!(muxer.connection_count(), 0);
}

#[test]
fn transport_reset_drops_connections_and_posts_the_event() {
    let fx = Fixture::new();
    let mut guest = Guest::new(&fx.mem);
    let mut muxer = fx.muxer(&guest);
    let (_l, mut host) = guest_connection(&fx, &mut muxer, &mut guest);
    fx.mem
        .write_obj(0xffff_ffffu32, GuestAddress(EV_BUF))
        .unwrap();
    guest.ev.push_chain(&[Buffer {
        addr: EV_BUF,
        len: 8,
        writable: true,
    }]);
    muxer.poll_once();
    assert_eq!(
        guest.ev.pop_used(),
        None,
        "event buffers are kept until an event"
    );
    muxer.transport_reset();
    muxer.poll_once();
    assert_eq!(guest.ev.pop_used(), Some((0, 4)));
    let id: u32 = fx.mem.read_obj(GuestAddress(EV_BUF)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    assert_eq!(muxer.connection_count(), 0);
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(host.read(&mut [0u8; 4]).unwrap(), 0);
}

#[test]
fn the_number_of_connections_is_bounded() {
    let fx = Fixture::new();
    let mut guest = Guest::new(&fx.mem);
    let mut muxer = fx.muxer(&guest);
    let listener = fx.host_listener(1234);
    let max = super::MAX_CONNECTIONS as u32;
    let mut accepted = Vec::new();
    for port in 0..=max {
        guest.send(hdr(OP_REQUEST, 10_000 + port, 1234), &[]);
        if port % 8 == 7 {
            guest.give_rx(8, 64);
            muxer.poll_once();
            for (h, _) in guest.recv() {
                assert_eq!(h.op, OP_RESPONSE, "guest port {}", h.dst_port);
            }
            while let Ok((s, _)) = {
                listener.set_nonblocking(true).unwrap();
                listener.accept()
            } {
                accepted.push(s);
            }
        }
    }
    muxer.poll_once();
    assert_eq!(muxer.connection_count(), max as usize);
    assert_eq!(fx.metrics.dropped.load(Ordering::Relaxed), 1);
    assert_eq!(fx.errors(), 0);
    guest.give_rx(8, 64);
    muxer.poll_once();
    let refused = guest.recv();
    assert_eq!(refused.len(), 1);
    assert_eq!(
        (refused[0].0.op, refused[0].0.dst_port),
        (OP_RST, 10_000 + max)
    );
}

#[test]
fn reset_stops_the_worker_and_the_device_activates_again() {
    let fx = Fixture::new();
    // The worker runs under its seccomp filter: a forbidden call ends the test process.
    crate::seccomp::install_violation_handler().unwrap();
    let mut device = VsockDevice::new(CID as u32, &fx.uds()).unwrap();
    device.start_workers().unwrap();
    let mut config = [0u8; 8];
    device.read_config(0, &mut config);
    assert_eq!(u64::from_le_bytes(config), CID);
    let listener = fx.host_listener(1234);

    for round in 0..2 {
        let mut guest = Guest::new(&fx.mem);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
        let session = guest.session(interrupt.clone());
        let tx_event = session.events[1].try_clone().unwrap();
        device
            .activate(Activation {
                mem: session.mem,
                queues: session.queues,
                queue_events: session.events,
                interrupt,
            })
            .unwrap();
        guest.give_rx(4, RX_LEN);
        guest.send(hdr(OP_REQUEST, 5000, 1234), &[]);
        tx_event.write(1).unwrap();
        let (mut host, _) = listener.accept().unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut got = Vec::new();
        while got.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            got = guest.recv();
        }
        assert_eq!(got.len(), 1, "round {round}");
        assert_eq!(got[0].0.op, OP_RESPONSE);
        assert!(irq.read().is_ok(), "the guest was interrupted");

        // A transport reset drops the connection and posts the event.
        guest.ev.push_chain(&[Buffer {
            addr: EV_BUF,
            len: 4,
            writable: true,
        }]);
        assert!(device.transport_reset());
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert_eq!(
            host.read(&mut [0u8; 4]).unwrap(),
            0,
            "dropped by the transport reset"
        );
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut event = None;
        while event.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            event = guest.ev.pop_used();
        }
        assert_eq!(event.map(|(_, len)| len), Some(4), "round {round}");

        // A new connection, which the device reset ends.
        guest.send(hdr(OP_REQUEST, 5001, 1234), &[]);
        tx_event.write(1).unwrap();
        let (mut host, _) = listener.accept().unwrap();

        assert!(device.reset());
        assert!(!device.is_active());
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert_eq!(
            host.read(&mut [0u8; 4]).unwrap(),
            0,
            "connections end with a reset"
        );
    }
    assert!(!device.transport_reset(), "not while inactive");
    let metrics = device.metrics().unwrap();
    assert_eq!(metrics.requests.load(Ordering::Relaxed), 4);
    drop(device);
    assert!(
        !fx.uds().exists(),
        "the socket file is removed with the device"
    );
}

#[test]
fn a_stale_socket_is_replaced_but_nothing_else() {
    let fx = Fixture::new();
    // A socket file nobody listens on, as a killed vmm leaves it.
    drop(UnixListener::bind(fx.uds()).unwrap());
    assert!(fx.uds().exists());
    let device = VsockDevice::new(3, &fx.uds()).unwrap();
    // A live one is not taken over.
    assert!(matches!(
        VsockDevice::new(3, &fx.uds()),
        Err(VsockError::InUse(_))
    ));
    let file = device.socket_file();
    drop(device);
    assert!(!fx.uds().exists());
    assert!(!file.remove(), "already gone");

    std::fs::write(fx.uds(), b"precious").unwrap();
    assert!(matches!(
        VsockDevice::new(3, &fx.uds()),
        Err(VsockError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(fx.uds()).unwrap(), b"precious");
    assert!(matches!(
        VsockDevice::new(2, &fx.dir.path().join("other")),
        Err(VsockError::Cid(2))
    ));
}

#[test]
fn connect_lines_are_parsed_strictly() {
    use super::worker::parse_connect_line;
    assert_eq!(parse_connect_line(b"CONNECT 52\n"), Some(52));
    assert_eq!(parse_connect_line(b"CONNECT 52\r\n"), Some(52));
    for bad in [
        &b"CONNECT 52"[..],
        b"CONNECT\n",
        b"CONNECT -1\n",
        b"CONNECT 4294967296\n",
        b"connect 1\n",
        b"CONNECT  1\n",
    ] {
        assert_eq!(
            parse_connect_line(bad),
            None,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}
