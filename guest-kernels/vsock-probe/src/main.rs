//! Both ends of the vsock end-to-end test, as one static program run inside the guest and on
//! its host. Every connection runs the same exchange: the client sends a 16-byte request
//! (length N, seed S) and N bytes generated from S; the server answers with the SHA-256 of
//! what it received and then N bytes generated from `!S`; the client checks the digest
//! against its own and hashes what comes back against the expected stream. So both
//! directions are checked end to end.
//!
//! - `listen PORT COUNT` (guest): AF_VSOCK server on PORT for COUNT connections.
//! - `connect CID PORT CONNS SMALL LARGE` (guest): CONNS concurrent AF_VSOCK connections of
//!   SMALL bytes each way to CID:PORT, then one of LARGE bytes.
//! - `serve PATH COUNT` (host): unix socket server on PATH (the vmm's `<uds>_PORT`).
//! - `connect-uds UDS PORT CONNS SMALL LARGE` (host): like `connect`, through the vmm's
//!   socket UDS with `CONNECT PORT\n`.
//!
//! - `bench-serve PORT` (guest) / `bench-serve-unix PATH` (host, the baseline): serve the
//!   benchmark's three connections (upload, download, ping-pong), then exit.
//! - `bench UDS PORT MIB ROUNDS` (host): through the vmm's socket (`PORT` > 0) or straight to
//!   the unix socket UDS (`PORT` = 0), measures host->guest and guest->host throughput (no
//!   hashing: the device, not SHA-256) and the round-trip time of 1-byte messages.
//! - `bench-vsock CID PORT MIB ROUNDS` (host): the same measurement over AF_VSOCK to guest
//!   CID (a VMM with the kernel's vhost-vsock, such as QEMU's `vhost-vsock-device`).
//!
//! - `tcp-listen PORT COUNT`, `tcp-connect ADDR PORT CONNS SMALL LARGE`: the same exchanges
//!   over TCP/IPv4 (the virtio-net end-to-end test, both sides).
//! - `bench-serve-tcp PORT` / `bench-tcp ADDR PORT MIB ROUNDS`: the benchmark over TCP
//!   (TCP_NODELAY, so the round trip is the network's).
//! - `http-unix SOCK PATH`: `GET PATH` on an HTTP unix socket (the vmm's control API); the
//!   answer goes to stdout.
//!
//! Connections that are refused while the other side starts are retried for a minute.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const CHUNK: usize = 64 * 1024;
const RETRY_FOR: Duration = Duration::from_secs(60);

type Result<T> = std::result::Result<T, String>;

/// xorshift64* bytes from a seed.
struct Stream(u64);

impl Stream {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn send_stream(out: &mut impl Write, len: u64, seed: u64) -> Result<[u8; 32]> {
    let mut gen = Stream::new(seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        gen.fill(&mut buf[..n]);
        hash.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| format!("send: {e}"))?;
        left -= n as u64;
    }
    Ok(hash.finalize().into())
}

fn recv_hash(input: &mut impl Read, len: u64) -> Result<[u8; 32]> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let want = left.min(CHUNK as u64) as usize;
        let n = input
            .read(&mut buf[..want])
            .map_err(|e| format!("receive: {e}"))?;
        if n == 0 {
            return Err(format!("stream ended with {left} bytes missing"));
        }
        hash.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hash.finalize().into())
}

fn expected_hash(len: u64, seed: u64) -> [u8; 32] {
    send_stream(&mut std::io::sink(), len, seed).unwrap_or_default()
}

/// The server's side of one exchange.
fn serve_one(mut conn: impl Read + Write) -> Result<u64> {
    let mut req = [0u8; 16];
    conn.read_exact(&mut req)
        .map_err(|e| format!("request: {e}"))?;
    let len = u64::from_le_bytes(req[..8].try_into().unwrap_or_default());
    let seed = u64::from_le_bytes(req[8..].try_into().unwrap_or_default());
    let digest = recv_hash(&mut conn, len)?;
    conn.write_all(&digest)
        .map_err(|e| format!("digest: {e}"))?;
    send_stream(&mut conn, len, !seed)?;
    conn.flush().map_err(|e| e.to_string())?;
    Ok(len)
}

/// The client's side of one exchange.
fn exchange(mut conn: impl Read + Write, len: u64, seed: u64) -> Result<()> {
    let mut req = [0u8; 16];
    req[..8].copy_from_slice(&len.to_le_bytes());
    req[8..].copy_from_slice(&seed.to_le_bytes());
    conn.write_all(&req).map_err(|e| format!("request: {e}"))?;
    let sent = send_stream(&mut conn, len, seed)?;
    let mut digest = [0u8; 32];
    conn.read_exact(&mut digest)
        .map_err(|e| format!("digest: {e}"))?;
    if digest != sent {
        return Err("the server's digest of our data differs".into());
    }
    if recv_hash(&mut conn, len)? != expected_hash(len, !seed) {
        return Err("the data received differs from what the server sent".into());
    }
    Ok(())
}

fn vsock_listen(port: u32) -> Result<OwnedFd> {
    // SAFETY: plain socket calls on a descriptor owned below; sockaddr_vm is plain data.
    unsafe {
        let fd = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("vsock socket: {}", std::io::Error::last_os_error()));
        }
        let owned = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_vm = std::mem::zeroed();
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        if libc::bind(fd, (&addr as *const libc::sockaddr_vm).cast(), len) != 0 {
            return Err(format!("vsock bind: {}", std::io::Error::last_os_error()));
        }
        if libc::listen(fd, 64) != 0 {
            return Err(format!("vsock listen: {}", std::io::Error::last_os_error()));
        }
        Ok(owned)
    }
}

fn vsock_accept(listener: &OwnedFd) -> Result<UnixStream> {
    use std::os::fd::AsRawFd;
    // SAFETY: accept on a listening socket; the new descriptor is owned below.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(format!("vsock accept: {}", std::io::Error::last_os_error()));
    }
    // A stream socket's read/write work on any family; UnixStream is only the wrapper.
    // SAFETY: `fd` is new and owned by nothing else.
    Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn vsock_connect(cid: u32, port: u32) -> std::io::Result<UnixStream> {
    // SAFETY: as in `vsock_listen`.
    unsafe {
        let fd = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let owned = OwnedFd::from_raw_fd(fd);
        // SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD: 30 s instead of 2 (a loaded test bed is slow).
        let timeout = libc::timeval {
            tv_sec: 30,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::AF_VSOCK,
            6,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let mut addr: libc::sockaddr_vm = std::mem::zeroed();
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = cid;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        if libc::connect(fd, (&addr as *const libc::sockaddr_vm).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(UnixStream::from(owned))
    }
}

/// Connects through the vmm's socket with Firecracker's `CONNECT` handshake.
fn uds_connect(uds: &str, port: u32) -> std::io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read the answer byte by byte: what follows it is the guest's data.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') && line.len() < 32 {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "closed without OK",
            ));
        }
        line.push(byte[0]);
    }
    if !line.starts_with(b"OK ") {
        return Err(std::io::Error::other(format!(
            "answer {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    Ok(stream)
}

/// A TCP stream in the wrapper the exchanges use (read/write work on any stream socket).
fn tcp_stream(stream: std::net::TcpStream) -> UnixStream {
    let _ = stream.set_nodelay(true);
    UnixStream::from(OwnedFd::from(stream))
}

fn tcp_connect(addr: &str, port: u16) -> std::io::Result<UnixStream> {
    let stream = std::net::TcpStream::connect_timeout(
        &format!("{addr}:{port}")
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
        Duration::from_secs(10),
    )?;
    Ok(tcp_stream(stream))
}

fn tcp_listen(port: u16) -> Result<std::net::TcpListener> {
    std::net::TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("tcp bind {port}: {e}"))
}

fn http_unix(sock: &str, path: &str) -> Result<()> {
    let mut stream = UnixStream::connect(sock).map_err(|e| format!("connect {sock}: {e}"))?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| e.to_string())?;
    print!("{answer}");
    Ok(())
}

fn retry<T>(what: &str, mut f: impl FnMut() -> std::io::Result<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() < RETRY_FOR => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
}

/// CONNS concurrent exchanges of SMALL bytes, then one of LARGE bytes.
fn run_clients(
    connect: impl Fn() -> Result<UnixStream> + Sync,
    conns: u32,
    small: u64,
    large: u64,
) -> Result<()> {
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..conns)
            .map(|i| {
                let connect = &connect;
                s.spawn(move || exchange(connect()?, small, 1000 + u64::from(i)))
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            h.join()
                .map_err(|_| format!("connection {i} panicked"))?
                .map_err(|e| format!("connection {i}: {e}"))?;
        }
        Ok::<(), String>(())
    })?;
    let concurrent = start.elapsed();
    let start = Instant::now();
    exchange(connect()?, large, 77).map_err(|e| format!("large connection: {e}"))?;
    let took = start.elapsed().as_secs_f64();
    println!(
        "vsock-probe: {conns} concurrent connections of {small} bytes ok in {:.2}s; \
         {large} bytes each way ok in {took:.2}s ({:.1} MiB/s per direction)",
        concurrent.as_secs_f64(),
        large as f64 / (1 << 20) as f64 / took
    );
    Ok(())
}

/// Serves until `count` exchanges are done. A connection that ends before its request is not
/// counted: the client gave up on it (a connect that timed out under load) and retries.
fn serve(accept: impl Fn() -> Result<Option<UnixStream>>, count: u32) -> Result<()> {
    let done = AtomicU32::new(0);
    let total = AtomicU64::new(0);
    let failed = std::sync::Mutex::new(None);
    let take_failure = || failed.lock().map(|mut f| f.take()).unwrap_or(None);
    std::thread::scope(|s| {
        while done.load(Ordering::SeqCst) < count {
            if let Some(e) = take_failure() {
                return Err(e);
            }
            let Some(conn) = accept()? else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            let (done, total, failed) = (&done, &total, &failed);
            s.spawn(move || match serve_one(conn) {
                Ok(len) => {
                    total.fetch_add(len, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) if e.starts_with("request:") => {
                    eprintln!("vsock-probe: a connection ended before its request: {e}")
                }
                Err(e) => {
                    if let Ok(mut f) = failed.lock() {
                        *f = Some(e);
                    }
                }
            });
        }
        Ok(())
    })?;
    if let Some(e) = take_failure() {
        return Err(e);
    }
    println!(
        "vsock-probe: served {count} connections, {} bytes each way",
        total.load(Ordering::SeqCst)
    );
    Ok(())
}

/// A non-blocking accept: `None` when no connection waits.
fn accept_ready(fd: i32) -> Result<Option<UnixStream>> {
    // SAFETY: accept on a listening socket; the new descriptor is owned below.
    let conn = unsafe {
        libc::accept4(
            fd,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if conn < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(format!("accept: {e}"));
    }
    // SAFETY: `conn` is new and owned by nothing else.
    Ok(Some(UnixStream::from(unsafe {
        OwnedFd::from_raw_fd(conn)
    })))
}

fn set_nonblocking(fd: i32) -> Result<()> {
    // SAFETY: fcntl on a descriptor this program owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(format!("fcntl: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// One benchmark connection, server side: `U`pload (read N bytes, answer one byte),
/// `D`ownload (send N bytes), `P`ing-pong (echo N one-byte messages).
fn bench_serve_one(mut conn: impl Read + Write) -> Result<()> {
    let mut req = [0u8; 9];
    conn.read_exact(&mut req)
        .map_err(|e| format!("request: {e}"))?;
    let n = u64::from_le_bytes(req[1..].try_into().unwrap_or_default());
    let mut buf = vec![0u8; CHUNK];
    match req[0] {
        b'U' => {
            let mut left = n;
            while left > 0 {
                let want = left.min(CHUNK as u64) as usize;
                let got = conn.read(&mut buf[..want]).map_err(|e| e.to_string())?;
                if got == 0 {
                    return Err("upload ended early".into());
                }
                left -= got as u64;
            }
            conn.write_all(b"k").map_err(|e| e.to_string())
        }
        b'D' => {
            Stream::new(n).fill(&mut buf);
            let mut left = n;
            while left > 0 {
                let len = left.min(CHUNK as u64) as usize;
                conn.write_all(&buf[..len]).map_err(|e| e.to_string())?;
                left -= len as u64;
            }
            Ok(())
        }
        b'P' => {
            let mut byte = [0u8; 1];
            for _ in 0..n {
                conn.read_exact(&mut byte).map_err(|e| e.to_string())?;
                conn.write_all(&byte).map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        op => Err(format!("unknown benchmark operation {op}")),
    }
}

fn bench_request(conn: &mut UnixStream, op: u8, n: u64) -> Result<()> {
    let mut req = [0u8; 9];
    req[0] = op;
    req[1..].copy_from_slice(&n.to_le_bytes());
    conn.write_all(&req).map_err(|e| format!("request: {e}"))
}

fn bench(connect: impl Fn() -> Result<UnixStream>, mib: u64, rounds: u64) -> Result<()> {
    let bytes = mib << 20;
    let mut buf = vec![0u8; CHUNK];
    Stream::new(5).fill(&mut buf);

    let mut up = connect()?;
    bench_request(&mut up, b'U', bytes)?;
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let len = left.min(CHUNK as u64) as usize;
        up.write_all(&buf[..len]).map_err(|e| e.to_string())?;
        left -= len as u64;
    }
    up.read_exact(&mut [0u8; 1])
        .map_err(|e| format!("upload ack: {e}"))?;
    let up_secs = start.elapsed().as_secs_f64();

    let mut down = connect()?;
    let start = Instant::now();
    bench_request(&mut down, b'D', bytes)?;
    let mut left = bytes;
    while left > 0 {
        let got = down.read(&mut buf).map_err(|e| e.to_string())?;
        if got == 0 {
            return Err("download ended early".into());
        }
        left -= got as u64;
    }
    let down_secs = start.elapsed().as_secs_f64();

    let mut ping = connect()?;
    bench_request(&mut ping, b'P', rounds)?;
    let start = Instant::now();
    let mut byte = [7u8; 1];
    for _ in 0..rounds {
        ping.write_all(&byte).map_err(|e| e.to_string())?;
        ping.read_exact(&mut byte).map_err(|e| e.to_string())?;
    }
    let rtt_us = start.elapsed().as_secs_f64() * 1e6 / rounds.max(1) as f64;
    println!(
        "vsock-bench: to-server {:.1} MiB/s, from-server {:.1} MiB/s, rtt {rtt_us:.0} us ({mib} MiB, {rounds} round trips)",
        mib as f64 / up_secs,
        mib as f64 / down_secs
    );
    Ok(())
}

fn bench_serve_all(accept: impl Fn() -> Result<UnixStream>) -> Result<()> {
    for _ in 0..3 {
        bench_serve_one(accept()?)?;
    }
    Ok(())
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> Result<T> {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("argument {i} missing or invalid"))
}

fn run(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("listen") => {
            let listener = vsock_listen(arg(args, 1)?)?;
            set_nonblocking(listener.as_raw_fd())?;
            serve(|| accept_ready(listener.as_raw_fd()), arg(args, 2)?)
        }
        Some("connect") => {
            let (cid, port): (u32, u32) = (arg(args, 1)?, arg(args, 2)?);
            run_clients(
                || retry("vsock connect", || vsock_connect(cid, port)),
                arg(args, 3)?,
                arg(args, 4)?,
                arg(args, 5)?,
            )
        }
        Some("serve") => {
            let path: String = arg(args, 1)?;
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).map_err(|e| format!("bind {path}: {e}"))?;
            set_nonblocking(listener.as_raw_fd())?;
            serve(|| accept_ready(listener.as_raw_fd()), arg(args, 2)?)
        }
        Some("connect-uds") => {
            let (uds, port): (String, u32) = (arg(args, 1)?, arg(args, 2)?);
            run_clients(
                || retry("connect through the vmm", || uds_connect(&uds, port)),
                arg(args, 3)?,
                arg(args, 4)?,
                arg(args, 5)?,
            )
        }
        Some("bench-serve") => {
            let listener = vsock_listen(arg(args, 1)?)?;
            bench_serve_all(|| vsock_accept(&listener))
        }
        Some("bench-serve-unix") => {
            let path: String = arg(args, 1)?;
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).map_err(|e| format!("bind {path}: {e}"))?;
            bench_serve_all(|| {
                listener
                    .accept()
                    .map(|(s, _)| s)
                    .map_err(|e| format!("accept: {e}"))
            })
        }
        Some("bench-vsock") => {
            let (cid, port): (u32, u32) = (arg(args, 1)?, arg(args, 2)?);
            bench(
                || retry("vsock connect", || vsock_connect(cid, port)),
                arg(args, 3)?,
                arg(args, 4)?,
            )
        }
        Some("bench") => {
            let (uds, port): (String, u32) = (arg(args, 1)?, arg(args, 2)?);
            let connect = || {
                if port == 0 {
                    retry("connect", || UnixStream::connect(&uds))
                } else {
                    retry("connect through the vmm", || uds_connect(&uds, port))
                }
            };
            bench(connect, arg(args, 3)?, arg(args, 4)?)
        }
        Some("tcp-listen") => {
            let listener = tcp_listen(arg(args, 1)?)?;
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            serve(|| accept_ready(listener.as_raw_fd()), arg(args, 2)?)
        }
        Some("tcp-connect") => {
            let (addr, port): (String, u16) = (arg(args, 1)?, arg(args, 2)?);
            run_clients(
                || retry("tcp connect", || tcp_connect(&addr, port)),
                arg(args, 3)?,
                arg(args, 4)?,
                arg(args, 5)?,
            )
        }
        Some("bench-serve-tcp") => {
            let listener = tcp_listen(arg(args, 1)?)?;
            bench_serve_all(|| {
                listener
                    .accept()
                    .map(|(s, _)| tcp_stream(s))
                    .map_err(|e| format!("accept: {e}"))
            })
        }
        Some("bench-tcp") => {
            let (addr, port): (String, u16) = (arg(args, 1)?, arg(args, 2)?);
            bench(
                || retry("tcp connect", || tcp_connect(&addr, port)),
                arg(args, 3)?,
                arg(args, 4)?,
            )
        }
        Some("http-unix") => http_unix(&arg::<String>(args, 1)?, &arg::<String>(args, 2)?),
        _ => Err("usage: vsock-probe listen|connect|serve|connect-uds|bench-serve|bench-serve-unix|bench|bench-vsock|tcp-listen|tcp-connect|bench-serve-tcp|bench-tcp|http-unix ...".into()),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("vsock-probe: error: {e}");
        std::process::exit(1);
    }
}
