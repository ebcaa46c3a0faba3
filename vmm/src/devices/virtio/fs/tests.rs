//! The virtio-fs device driven through guest memory as the guest's FUSE driver would: FUSE
//! requests in descriptor chains on a split queue, replies read back from guest memory.

use std::sync::Arc;

use fuse_backend_rs::passthrough::{Config, PassthroughFs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::worker::QueueWorker;
use crate::devices::virtio::test_utils::{Buffer, TestDriver};
use crate::devices::virtio::VirtioInterrupt;
use fuse_backend_rs::api::server::Server;

const FUSE_LOOKUP: u32 = 1;
const FUSE_INIT: u32 = 26;
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

    fn worker(&self, driver: &TestDriver) -> QueueWorker<PassthroughFs> {
        let cfg = Config {
            root_dir: self._dir.path().to_str().unwrap().to_string(),
            do_import: true,
            ..Default::default()
        };
        let fs = PassthroughFs::<()>::new(cfg).unwrap();
        fs.import().unwrap();
        QueueWorker {
            tag: "test".into(),
            index: 1,
            mem: self.mem.clone(),
            queue: driver.queue(),
            event: EventFd::new(0).unwrap(),
            interrupt: Arc::new(VirtioInterrupt::new(
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            )),
            server: Arc::new(Server::new(Arc::new(fs))),
            seccomp: None,
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
    let (_, error, _) = fx.call(&mut driver, &mut worker, &lying);
    assert!(error <= 0);

    // The queue still works afterwards.
    let (_, error, _) = fx.call(
        &mut driver,
        &mut worker,
        &request(FUSE_INIT, 10, 0, &init_body()),
    );
    assert_eq!(error, 0);
}
