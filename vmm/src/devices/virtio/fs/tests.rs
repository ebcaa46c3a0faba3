//! The virtio-fs device driven through guest memory as the guest's FUSE driver would: FUSE
//! requests in descriptor chains on a split queue, replies read back from guest memory.

use std::sync::Arc;

use fuse_backend_rs::passthrough::{Config, PassthroughFs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::device::{MAX_REQUEST_QUEUES, MAX_TAG_LEN};
use super::worker::{FsCounters, QueueWorker};
use super::FsDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::test_utils::{Buffer, TestDriver};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::VirtioInterrupt;
use fuse_backend_rs::api::server::Server;

const FUSE_LOOKUP: u32 = 1;
const FUSE_GETATTR: u32 = 3;
const FUSE_SETATTR: u32 = 4;
const FUSE_READLINK: u32 = 5;
const FUSE_SYMLINK: u32 = 6;
const FUSE_MKDIR: u32 = 9;
const FUSE_UNLINK: u32 = 10;
const FUSE_RENAME: u32 = 12;
const FUSE_LINK: u32 = 13;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_STATFS: u32 = 17;
const FUSE_SETXATTR: u32 = 21;
const FUSE_GETXATTR: u32 = 22;
const FUSE_LISTXATTR: u32 = 23;
const FUSE_INIT: u32 = 26;
const FUSE_OPENDIR: u32 = 27;
const FUSE_READDIR: u32 = 28;
const FUSE_CREATE: u32 = 35;
const REQ: u64 = 0x1_0000;
const REPLY: u64 = 0x2_0000;

fn request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let len = 40 + body.len() as u32;
    let mut out = Vec::new();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&opcode.to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
    out.extend_from_slice(&nodeid.to_le_bytes());
    out.extend_from_slice(&[0u8; 16]); // uid, gid, pid, extlen, padding
    out.extend_from_slice(body);
    out
}

fn init_body() -> Vec<u8> {
    [7u32, 31, 0x2_0000, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    mem: GuestMemoryMmap,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.txt"), b"hello world\n").unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        Self { _dir: dir, mem }
    }

    fn fs(&self) -> PassthroughFs {
        let cfg = Config {
            root_dir: self._dir.path().to_str().unwrap().to_string(),
            do_import: true,
            xattr: true,
            ..Default::default()
        };
        // The passthrough sets the umask of its thread's filesystem context to 0 (at import and
        // INIT): this test thread serves requests, so it gets a context of its own, as the
        // vmm's workers do.
        super::enter_fs_context().unwrap();
        let fs = PassthroughFs::<()>::new(cfg).unwrap();
        fs.import().unwrap();
        fs
    }

    fn worker(&self, driver: &TestDriver) -> QueueWorker<PassthroughFs> {
        let fs = self.fs();
        QueueWorker {
            tag: "test".into(),
            index: 1,
            mem: self.mem.clone(),
            queue: driver.queue(),
            event: EventFd::new(0).unwrap(),
            stop: EventFd::new(0).unwrap(),
            interrupt: Arc::new(VirtioInterrupt::new(
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            )),
            server: Arc::new(Server::new(Arc::new(fs))),
            counters: Arc::new(FsCounters::default()),
            sync_root: None,
        }
    }

    /// Sends one request and returns (used length, reply header error, reply bytes).
    fn call(
        &self,
        driver: &mut TestDriver,
        worker: &mut QueueWorker<PassthroughFs>,
        req: &[u8],
    ) -> (u32, i32, Vec<u8>) {
        self.mem.write_slice(req, GuestAddress(REQ)).unwrap();
        self.mem
            .write_slice(&[0u8; 4096], GuestAddress(REPLY))
            .unwrap();
        driver.push_chain(&[
            Buffer {
                addr: REQ,
                len: req.len() as u32,
                writable: false,
            },
            Buffer {
                addr: REPLY,
                len: 4096,
                writable: true,
            },
        ]);
        worker.process_queue().unwrap();
        let (_, len) = driver.pop_used().expect("a used buffer");
        let mut reply = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut reply, GuestAddress(REPLY))
            .unwrap();
        let error = if len >= 8 {
            i32::from_le_bytes(reply[4..8].try_into().unwrap())
        } else {
            0
        };
        (len, error, reply)
    }
}

#[test]
fn init_then_lookup_through_the_queue() {
    let fx = Fixture::new();
    let mut driver = TestDriver::new(&fx.mem, 16);
    let mut worker = fx.worker(&driver);

    let (len, error, reply) = fx.call(
        &mut driver,
        &mut worker,
        &request(FUSE_INIT, 1, 0, &init_body()),
    );
    assert_eq!(error, 0);
    assert!(len >= 16 + 8, "init reply too short: {len}");
    assert_eq!(
        u32::from_le_bytes(reply[16..20].try_into().unwrap()),
        7,
        "FUSE major"
    );

    let (_, error, reply) = fx.call(
        &mut driver,
        &mut worker,
        &request(FUSE_LOOKUP, 2, 1, b"hello.txt\0"),
    );
    assert_eq!(error, 0);
    let size = u64::from_le_bytes(reply[64..72].try_into().unwrap());
    assert_eq!(size, 12);

    let (_, error, _) = fx.call(
        &mut driver,
        &mut worker,
        &request(FUSE_LOOKUP, 3, 1, b"missing\0"),
    );
    assert_eq!(error, -libc::ENOENT);
}

#[test]
fn malformed_chains_get_no_reply_and_no_panic() {
    let fx = Fixture::new();
    let mut driver = TestDriver::new(&fx.mem, 16);
    let mut worker = fx.worker(&driver);

    // A readable buffer outside guest memory.
    driver.push_chain(&[
        Buffer {
            addr: 0xffff_0000,
            len: 64,
            writable: false,
        },
        Buffer {
            addr: REPLY,
            len: 4096,
            writable: true,
        },
    ]);
    worker.process_queue().unwrap();
    assert_eq!(driver.pop_used(), Some((0, 0)));

    // A request shorter than the FUSE header.
    let (len, _, _) = fx.call(&mut driver, &mut worker, &[1, 2, 3]);
    assert_eq!(len, 0);

    // A header claiming more bytes than were sent.
    let mut lying = request(FUSE_LOOKUP, 9, 1, b"hello.txt\0");
    lying[..4].copy_from_slice(&4000u32.to_le_bytes());
    let (len, error, _) = fx.call(&mut driver, &mut worker, &lying);
    // Dropped like a short request: the chain comes back used, with no reply written.
    assert_eq!((len, error), (0, 0));

    // The queue still works afterwards.
    let (_, error, _) = fx.call(
        &mut driver,
        &mut worker,
        &request(FUSE_INIT, 10, 0, &init_body()),
    );
    assert_eq!(error, 0);
}

/// Little-endian encoding of request bodies.
fn le(fields: &[u64], widths: &[usize]) -> Vec<u8> {
    fields
        .iter()
        .zip(widths)
        .flat_map(|(v, w)| v.to_le_bytes()[..*w].to_vec())
        .collect()
}

fn with_names(mut body: Vec<u8>, names: &[&str]) -> Vec<u8> {
    for n in names {
        body.extend_from_slice(n.as_bytes());
        body.push(0);
    }
    body
}

fn u64_at(reply: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(reply[at..at + 8].try_into().unwrap())
}

/// Offsets in replies: entry_out.nodeid follows the 16-byte header; its attr starts 40 bytes
/// later with ino, then size.
const ENTRY_NODEID: usize = 16;
const ATTR_OUT_SIZE: usize = 16 + 16 + 8;

struct Session<'a> {
    fx: &'a Fixture,
    driver: TestDriver<'a>,
    worker: QueueWorker<PassthroughFs>,
    unique: u64,
}

impl<'a> Session<'a> {
    fn new(fx: &'a Fixture) -> Self {
        let driver = TestDriver::new(&fx.mem, 64);
        let worker = fx.worker(&driver);
        let mut s = Self {
            fx,
            driver,
            worker,
            unique: 0,
        };
        assert_eq!(s.call(FUSE_INIT, 0, init_body()).0, 0);
        s
    }

    /// Sends a request; returns (error, reply bytes).
    fn call(&mut self, opcode: u32, nodeid: u64, body: Vec<u8>) -> (i32, Vec<u8>) {
        self.unique += 1;
        let req = request(opcode, self.unique, nodeid, &body);
        let (_, error, reply) = self.fx.call(&mut self.driver, &mut self.worker, &req);
        (error, reply)
    }

    fn ok(&mut self, opcode: u32, nodeid: u64, body: Vec<u8>) -> Vec<u8> {
        let (error, reply) = self.call(opcode, nodeid, body);
        assert_eq!(error, 0, "opcode {opcode} failed");
        reply
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Result<Vec<u8>, i32> {
        match self.call(FUSE_LOOKUP, parent, with_names(vec![], &[name])) {
            (0, reply) => Ok(reply),
            (e, _) => Err(e),
        }
    }
}

#[test]
fn file_and_directory_operations_through_the_queue() {
    let fx = Fixture::new();
    let root_dir = fx._dir.path().to_path_buf();
    let mut s = Session::new(&fx);

    // create + write + read back.
    let reply = s.ok(
        FUSE_CREATE,
        1,
        with_names(
            le(&[libc::O_RDWR as u64, 0o644, 0, 0], &[4, 4, 4, 4]),
            &["new.txt"],
        ),
    );
    let file = u64_at(&reply, ENTRY_NODEID);
    let fh = u64_at(&reply, 16 + 128);
    let mut write = le(&[fh, 0, 5, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]);
    write.extend_from_slice(b"hello");
    let reply = s.ok(FUSE_WRITE, file, write);
    assert_eq!(u32::from_le_bytes(reply[16..20].try_into().unwrap()), 5);
    let reply = s.ok(
        FUSE_READ,
        file,
        le(&[fh, 1, 100, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]),
    );
    assert_eq!(&reply[16..], b"ello");
    assert_eq!(std::fs::read(root_dir.join("new.txt")).unwrap(), b"hello");

    // getattr, setattr (truncate to 2 bytes, mode 0600).
    let reply = s.ok(FUSE_GETATTR, file, le(&[0, 0, 0], &[4, 4, 8]));
    assert_eq!(u64_at(&reply, ATTR_OUT_SIZE), 5);
    const FATTR_MODE: u64 = 1;
    const FATTR_SIZE: u64 = 8;
    let setattr = le(
        &[
            FATTR_MODE | FATTR_SIZE,
            0,
            0,
            2,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0o100600,
            0,
            0,
            0,
            0,
        ],
        &[4, 4, 8, 8, 8, 8, 8, 8, 4, 4, 4, 4, 4, 4, 4, 4],
    );
    let reply = s.ok(FUSE_SETATTR, file, setattr);
    assert_eq!(u64_at(&reply, ATTR_OUT_SIZE), 2);
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(root_dir.join("new.txt")).unwrap();
    assert_eq!((meta.len(), meta.permissions().mode() & 0o777), (2, 0o600));

    // mkdir, symlink + readlink, link, rename, unlink.
    let dir = u64_at(
        &s.ok(
            FUSE_MKDIR,
            1,
            with_names(le(&[0o755, 0], &[4, 4]), &["sub"]),
        ),
        ENTRY_NODEID,
    );
    let link = u64_at(
        &s.ok(FUSE_SYMLINK, dir, with_names(vec![], &["ln", "../new.txt"])),
        ENTRY_NODEID,
    );
    let reply = s.ok(FUSE_READLINK, link, vec![]);
    assert_eq!(&reply[16..], b"../new.txt");
    s.ok(FUSE_LINK, dir, with_names(le(&[file], &[8]), &["hard"]));
    assert_eq!(
        std::fs::metadata(root_dir.join("sub/hard")).unwrap().len(),
        2
    );
    s.ok(
        FUSE_RENAME,
        1,
        with_names(le(&[dir], &[8]), &["new.txt", "moved.txt"]),
    );
    assert!(root_dir.join("sub/moved.txt").exists() && !root_dir.join("new.txt").exists());
    s.ok(FUSE_UNLINK, dir, with_names(vec![], &["hard"]));
    assert!(!root_dir.join("sub/hard").exists());

    // readdir lists what is there.
    let reply = s.ok(FUSE_OPENDIR, dir, le(&[0, 0], &[4, 4]));
    let dh = u64_at(&reply, 16);
    let reply = s.ok(
        FUSE_READDIR,
        dir,
        le(&[dh, 0, 4096, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]),
    );
    let listing = String::from_utf8_lossy(&reply[16..]).to_string();
    assert!(
        listing.contains("ln") && listing.contains("moved.txt"),
        "{listing:?}"
    );

    // xattrs: set, get, list.
    let mut setx = with_names(le(&[3, 0], &[4, 4]), &["user.color"]);
    setx.extend_from_slice(b"red");
    let (error, _) = s.call(FUSE_SETXATTR, dir, setx);
    if error == -libc::EOPNOTSUPP {
        eprintln!("the test directory's filesystem has no user xattrs; skipping that part");
    } else {
        assert_eq!(error, 0);
        let reply = s.ok(
            FUSE_GETXATTR,
            dir,
            with_names(le(&[64, 0], &[4, 4]), &["user.color"]),
        );
        assert_eq!(&reply[16..], b"red");
        let reply = s.ok(FUSE_LISTXATTR, dir, le(&[256, 0], &[4, 4]));
        assert!(String::from_utf8_lossy(&reply[16..]).contains("user.color"));
    }

    // statfs.
    let reply = s.ok(FUSE_STATFS, 1, vec![]);
    assert!(reply.len() >= 16 + 80);
}

#[test]
fn hostile_names_never_leave_the_shared_tree() {
    let fx = Fixture::new();
    let mut s = Session::new(&fx);
    let outside = fx._dir.path().parent().unwrap().join("escaped-by-guest");
    // ".." of the root is the root itself, never the host directory above it.
    if let Ok(reply) = s.lookup(1, "..") {
        let parent = u64_at(&reply, ENTRY_NODEID);
        let (error, _) = s.call(
            FUSE_MKDIR,
            parent,
            with_names(le(&[0o755, 0], &[4, 4]), &["escaped-by-guest"]),
        );
        assert!(error < 0 || fx._dir.path().join("escaped-by-guest").exists());
        assert!(
            !outside.exists(),
            "a directory was created outside the shared tree"
        );
    }
    for name in ["a/b", "../escaped-by-guest", "..", "."] {
        let (error, _) = s.call(FUSE_MKDIR, 1, with_names(le(&[0o755, 0], &[4, 4]), &[name]));
        assert!(error < 0, "mkdir {name:?} must fail");
    }
    assert!(s.lookup(1, "a/b").is_err());
    let long = "x".repeat(300);
    assert!(s.lookup(1, &long).is_err());
    let (error, _) = s.call(
        FUSE_CREATE,
        1,
        with_names(
            le(&[libc::O_RDWR as u64, 0o644, 0, 0], &[4, 4, 4, 4]),
            &[&long],
        ),
    );
    assert!(error < 0);
    // A symlink pointing outside is stored as is, but opening through it from the host side
    // is refused (no follow out of the tree).
    let link = u64_at(
        &s.ok(FUSE_SYMLINK, 1, with_names(vec![], &["out", "/etc/passwd"])),
        ENTRY_NODEID,
    );
    let (error, _) = s.call(FUSE_OPEN, link, le(&[libc::O_RDONLY as u64, 0], &[4, 4]));
    assert!(
        error < 0,
        "opening a symlink must not follow it on the host"
    );
    assert!(!outside.exists());
}

/// Threads of this process whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

/// Polls `f` for up to 5 s.
fn eventually<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Through the MMIO registers, as the guest's driver: bring the device up with the request
/// queue at `driver`'s rings, send FUSE_INIT and a lookup, and check the replies.
fn bring_up_and_serve(fx: &Fixture, t: &mut MmioTransport, driver: &mut TestDriver, unique: u64) {
    bring_up_and_serve_on(fx, t, driver, unique, 2, 1);
}

/// [`bring_up_and_serve`] for a device with `queues` queues (hiprio included), serving on
/// queue `serve_on`; the other queues get rings of their own that nothing uses.
fn bring_up_and_serve_on(
    fx: &Fixture,
    t: &mut MmioTransport,
    driver: &mut TestDriver,
    unique: u64,
    queues: u32,
    serve_on: u32,
) {
    use crate::devices::virtio::mmio::tests::{negotiate, rd, setup_queue, wr};
    negotiate(t);
    for q in (0..queues).filter(|q| *q != serve_on) {
        setup_queue(t, q, 16, 0x8_0000 + q * 0x1_0000);
    }
    wr(t, 0x30, serve_on);
    wr(t, 0x38, 16);
    let [desc, avail, used] = driver.ring_addresses();
    for (reg, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
        wr(t, reg, addr as u32);
        wr(t, reg + 4, (addr >> 32) as u32);
    }
    wr(t, 0x44, 1);
    wr(t, 0x70, 0xf);
    assert_eq!(rd(t, 0x70), 0xf, "device running");
    for (i, req) in [
        request(FUSE_INIT, unique, 0, &init_body()),
        request(FUSE_LOOKUP, unique + 1, 1, b"hello.txt\0"),
    ]
    .iter()
    .enumerate()
    {
        fx.mem.write_slice(req, GuestAddress(REQ)).unwrap();
        driver.push_chain(&[
            Buffer {
                addr: REQ,
                len: req.len() as u32,
                writable: false,
            },
            Buffer {
                addr: REPLY,
                len: 4096,
                writable: true,
            },
        ]);
        wr(t, 0x50, serve_on);
        let (_, len) = eventually(|| driver.pop_used()).expect("the worker answers");
        let mut reply = vec![0u8; len as usize];
        fx.mem.read_slice(&mut reply, GuestAddress(REPLY)).unwrap();
        assert_eq!(
            i32::from_le_bytes(reply[4..8].try_into().unwrap()),
            0,
            "request {i}"
        );
    }
}

#[test]
fn reset_joins_the_workers_and_the_device_serves_again() {
    use crate::devices::virtio::mmio::tests::{rd, wr};
    let fx = Fixture::new();
    let device = FsDevice::new("rst", Arc::new(fx.fs())).unwrap();
    let counters = device.counters();
    let serving = || {
        counters
            .workers_serving
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let irq = Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    let mut t = MmioTransport::new(Box::new(device), fx.mem.clone(), irq).unwrap();
    for q in 0..2 {
        wr(&mut t, 0x30, q);
        assert_eq!(rd(&mut t, 0x34), 1024, "QueueNumMax");
    }
    wr(&mut t, 0x30, 2);
    assert_eq!(rd(&mut t, 0x34), 0, "no third queue");

    let mut first = TestDriver::at(&fx.mem, GuestAddress(0x4_0000), 16);
    bring_up_and_serve(&fx, &mut t, &mut first, 1);
    assert_eq!(eventually(|| Some(serving()).filter(|n| *n == 2)), Some(2));
    assert_eq!(threads_named("fs-rst-q"), 2);

    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
    // reset() waited for the workers: none serves any more (their pool threads wait for the
    // next activation).
    assert_eq!(serving(), 0, "old workers still serving");
    assert_eq!(threads_named("fs-rst-q"), 2);
    // Nothing serves the old rings any more.
    first.push_chain(&[Buffer {
        addr: REQ,
        len: 40,
        writable: false,
    }]);
    wr(&mut t, 0x50, 1);
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(first.pop_used(), None);

    // The driver sets the device up again on new rings: a fresh FUSE session.
    let mut second = TestDriver::at(&fx.mem, GuestAddress(0x6_0000), 16);
    bring_up_and_serve(&fx, &mut t, &mut second, 10);
    assert_eq!(eventually(|| Some(serving()).filter(|n| *n == 2)), Some(2));
    assert_eq!(threads_named("fs-rst-q"), 2, "the same threads serve again");
    drop(t);
    assert_eq!(
        eventually(|| Some(threads_named("fs-rst-q")).filter(|n| *n == 0)),
        Some(0),
        "dropping the device ends its worker threads"
    );
}

#[test]
fn several_request_queues_each_get_a_worker() {
    use crate::devices::virtio::mmio::tests::{rd, wr};
    let fx = Fixture::new();
    let device = FsDevice::new("mq", Arc::new(fx.fs()))
        .unwrap()
        .with_request_queues(3);
    let mut config = [0u8; 4];
    device.read_config(MAX_TAG_LEN as u64, &mut config);
    assert_eq!(u32::from_le_bytes(config), 3, "num_request_queues");
    assert_eq!(device.queue_max_sizes().len(), 4, "hiprio + 3");
    let irq = Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    let mut t = MmioTransport::new(Box::new(device), fx.mem.clone(), irq).unwrap();
    wr(&mut t, 0x30, 4);
    assert_eq!(rd(&mut t, 0x34), 0, "no fifth queue");
    let mut driver = TestDriver::at(&fx.mem, GuestAddress(0x4_0000), 16);
    // Requests on the last request queue are served.
    bring_up_and_serve_on(&fx, &mut t, &mut driver, 1, 4, 3);
    // (A new thread sets its own name once it runs.)
    assert_eq!(
        eventually(|| Some(threads_named("fs-mq-q")).filter(|n| *n == 4)),
        Some(4)
    );
    // The count is clamped.
    let many = FsDevice::new("many", Arc::new(fx.fs()))
        .unwrap()
        .with_request_queues(1000);
    assert_eq!(many.queue_max_sizes().len(), MAX_REQUEST_QUEUES + 1);
}

/// A filesystem whose FUSE_INIT blocks until the test opens the gate.
struct StuckFs {
    entered: std::sync::atomic::AtomicBool,
    gate: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl fuse_backend_rs::api::filesystem::FileSystem for StuckFs {
    type Inode = u64;
    type Handle = u64;

    fn init(
        &self,
        _capable: fuse_backend_rs::abi::fuse_abi::FsOptions,
    ) -> std::io::Result<fuse_backend_rs::abi::fuse_abi::FsOptions> {
        self.entered
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.gate.lock().unwrap().recv();
        Ok(fuse_backend_rs::abi::fuse_abi::FsOptions::empty())
    }
}

#[test]
fn a_worker_stuck_in_a_request_makes_reset_fail_until_it_returns() {
    use crate::devices::virtio::mmio::tests::{negotiate, rd, setup_queue, wr};
    use crate::devices::virtio::STATUS_NEEDS_RESET;
    let fx = Fixture::new();
    let (open, gate) = std::sync::mpsc::channel();
    let fs = Arc::new(StuckFs {
        entered: false.into(),
        gate: gate.into(),
    });
    let device = FsDevice::new("stk", fs.clone())
        .unwrap()
        .with_stop_timeout(std::time::Duration::from_millis(100));
    let counters = device.counters();
    let serving = || {
        counters
            .workers_serving
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let irq = Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    let mut t = MmioTransport::new(Box::new(device), fx.mem.clone(), irq).unwrap();
    let mut driver = TestDriver::at(&fx.mem, GuestAddress(0x4_0000), 16);
    negotiate(&mut t);
    setup_queue(&mut t, 0, 16, 0x8_0000);
    wr(&mut t, 0x30, 1);
    wr(&mut t, 0x38, 16);
    let [desc, avail, used] = driver.ring_addresses();
    for (reg, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
        wr(&mut t, reg, addr as u32);
        wr(&mut t, reg + 4, 0);
    }
    wr(&mut t, 0x44, 1);
    wr(&mut t, 0x70, 0xf);
    assert_eq!(rd(&mut t, 0x70), 0xf);
    let req = request(FUSE_INIT, 1, 0, &init_body());
    fx.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    driver.push_chain(&[
        Buffer {
            addr: REQ,
            len: req.len() as u32,
            writable: false,
        },
        Buffer {
            addr: REPLY,
            len: 4096,
            writable: true,
        },
    ]);
    wr(&mut t, 0x50, 1);
    let entered = || Some(()).filter(|_| fs.entered.load(std::sync::atomic::Ordering::SeqCst));
    assert!(eventually(entered).is_some());

    // The request never ends: the reset gives up and the device needs a reset.
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), STATUS_NEEDS_RESET);
    assert_eq!(serving(), 1, "the stuck worker is still serving");
    wr(&mut t, 0x70, 1);
    assert_eq!(
        rd(&mut t, 0x70),
        STATUS_NEEDS_RESET,
        "nothing until a reset"
    );

    // Once the request returns, a reset succeeds.
    open.send(()).unwrap();
    assert!(eventually(|| driver.pop_used()).is_some());
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
    assert_eq!(serving(), 0);
}

#[test]
fn a_vcpu_thread_activates_and_resets_the_device_within_its_seccomp_filter() {
    use crate::devices::virtio::mmio::tests::{rd, wr};
    use crate::devices::virtio::VirtioDevice;
    use crate::seccomp::{apply_to_current_thread, filter, ThreadKind, Violation};
    let fx = Fixture::new();
    let mut device = FsDevice::new("vcf", Arc::new(fx.fs())).unwrap();
    // The builder starts the workers before any vCPU runs.
    device.start_workers().unwrap();
    let irq = Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    let mut t = MmioTransport::new(Box::new(device), fx.mem.clone(), irq).unwrap();
    // The device's register handlers run on a vCPU thread, under the vCPU's filter (EPERM
    // here instead of the trap, so a forbidden call fails the test instead of the process).
    let vcpu = filter(ThreadKind::Vcpu, Violation::Errno).unwrap();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                apply_to_current_thread(&vcpu).unwrap();
                let mut first = TestDriver::at(&fx.mem, GuestAddress(0x4_0000), 16);
                bring_up_and_serve(&fx, &mut t, &mut first, 1);
                wr(&mut t, 0x70, 0);
                assert_eq!(rd(&mut t, 0x70), 0, "reset");
                let mut second = TestDriver::at(&fx.mem, GuestAddress(0x6_0000), 16);
                bring_up_and_serve(&fx, &mut t, &mut second, 10);
            })
            .join()
            .unwrap()
    });
}

#[test]
fn syncfs_flushes_the_share_filesystem_and_reports_its_result() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let fx = Fixture::new();
    let mut driver = TestDriver::new(&fx.mem, 16);
    let mut worker = fx.worker(&driver);
    let open = |flags: i32| {
        let path = std::ffi::CString::new(fx._dir.path().to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path; the descriptor is owned below.
        let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just opened.
        Arc::new(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let syncfs = super::worker::FUSE_SYNCFS;

    // A writable share: the host filesystem is synced and the guest hears 0 (the FUSE server
    // alone answers ENOSYS, and the guest kernel then never asks again).
    worker.sync_root = Some(open(libc::O_RDONLY));
    let (len, error, reply) = fx.call(&mut driver, &mut worker, &request(syncfs, 77, 1, &[0; 8]));
    assert_eq!((len, error), (16, 0));
    assert_eq!(u64::from_le_bytes(reply[8..16].try_into().unwrap()), 77);

    // The host's error reaches the guest (an O_PATH descriptor cannot be synced: EBADF).
    worker.sync_root = Some(open(libc::O_PATH));
    let (_, error, _) = fx.call(&mut driver, &mut worker, &request(syncfs, 78, 1, &[0; 8]));
    assert_eq!(error, -libc::EBADF);

    // A read-only share has nothing to flush.
    worker.sync_root = None;
    let (len, error, _) = fx.call(&mut driver, &mut worker, &request(syncfs, 79, 1, &[0; 8]));
    assert_eq!((len, error), (16, 0));
    assert_eq!(
        worker
            .counters
            .virtio
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
}
