//! FUSE requests in descriptor chains on a split virtqueue in guest memory, served by the
//! production virtio-fs queue worker (`process_queue`, fuse-backend-rs's server) over a host
//! directory share behind its guard (the vmm's `dir_share`, writable within a quota, or
//! read-only). Each input gets a fresh server (and, after an input that could have changed
//! it, a fresh copy of the directory tree), at most 8 chains of at most 16 descriptors and
//! 64 KiB of reply buffers each. Checked: the worker never panics nor fails on a valid ring,
//! completes every chain in order, never claims more bytes than the chain's writable buffers
//! hold, never writes into the driver's readable buffers, and every reply header is exact
//! (length = bytes used, the request's `unique`, a 0 or negative errno).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::fs_backends::Limits;
use vmm::fuzzing::FsServer;

const MEM_SIZE: usize = 4 << 20;
const QSIZE: u16 = 64;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const DATA: u64 = 0x1_0000;
const MAX_REQS: usize = 8;
const MAX_DESCS: usize = 16;
const MAX_WRITABLE: usize = 64 << 10;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// FUSE opcodes fuse-backend-rs knows (1..=52 minus 7 and 19, which do not exist).
const READ_ONLY_OPS: [u32; 21] = [
    1, 2, 3, 5, 15, 17, 18, 22, 23, 25, 26, 27, 28, 29, 34, 36, 38, 42, 44, 46, 52,
];

const NAMES: [&[u8]; 16] = [
    b"hello.txt\0",
    b"dir\0",
    b"new\0",
    b"link\0",
    b"..\0",
    b".\0",
    b"hello.txt\0new\0",
    b"new\0hello.txt\0",
    b"user.x\0",
    b"security.capability\0",
    b"trusted.overlay.opaque\0",
    b"system.posix_acl_access\0",
    b"dir/sub.txt\0",
    b"hello.txt",
    b"big\0",
    b"user.gridnode.x\0",
];

#[derive(Arbitrary, Debug)]
enum Part {
    Bytes(Vec<u8>),
    U32(u32),
    U64(u64),
    /// A small number as a u64 (node ids, handles).
    Small64(u8),
    Name(u8),
}

#[derive(Arbitrary, Debug)]
enum Len {
    Exact,
    Delta(i8),
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
enum Tweak {
    Addr(u64),
    Len(u32),
    Flags(u16),
    Next(u16),
}

#[derive(Arbitrary, Debug)]
struct Req {
    /// Index into 1..=52, or any opcode.
    opcode: Result<u8, u32>,
    nodeid: u8,
    uid_gid: Option<(u32, u32)>,
    body: Vec<Part>,
    len: Len,
    /// Where the request bytes are split into readable descriptors.
    splits: Vec<u16>,
    /// Sizes of the writable descriptors.
    replies: Vec<u16>,
    /// Changes to this chain's descriptors (index in the chain, change).
    tweaks: Vec<(u8, Tweak)>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    readonly: bool,
    reqs: Vec<Req>,
}

struct Env {
    base: tempfile::TempDir,
    generation: u64,
    share: PathBuf,
    dirty: bool,
    mem: GuestMemoryMmap,
}

fn populate(dir: &Path) {
    std::fs::create_dir(dir).unwrap();
    std::fs::write(dir.join("hello.txt"), b"hello world\n").unwrap();
    std::fs::write(dir.join("big"), vec![0x5a; 64 << 10]).unwrap();
    std::fs::write(dir.join("empty"), b"").unwrap();
    std::fs::create_dir(dir.join("dir")).unwrap();
    std::fs::write(dir.join("dir/sub.txt"), b"sub\n").unwrap();
    std::os::unix::fs::symlink("hello.txt", dir.join("link")).unwrap();
}

fn env() -> &'static std::sync::Mutex<Env> {
    static ENV: OnceLock<std::sync::Mutex<Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        // This thread serves the requests, as a worker does: a filesystem context of its own.
        vmm::devices::virtio::fs::enter_fs_context().unwrap();
        let base = tempfile::Builder::new()
            .prefix("gridnode-fuzz-fs")
            .tempdir()
            .unwrap();
        let share = base.path().join("share-0");
        populate(&share);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        std::sync::Mutex::new(Env {
            base,
            generation: 0,
            share,
            dirty: false,
            mem,
        })
    })
}

struct Chain {
    head: u16,
    unique: u64,
    /// (addr, bytes) of each readable buffer, as written.
    readable: Vec<(u64, Vec<u8>)>,
    writable: Vec<(u64, u32)>,
    tweaked: bool,
}

fn body(req: &Req) -> Vec<u8> {
    let mut b = Vec::new();
    for p in req.body.iter().take(16) {
        match p {
            Part::Bytes(x) => b.extend_from_slice(&x[..x.len().min(4096)]),
            Part::U32(v) => b.extend_from_slice(&v.to_le_bytes()),
            Part::U64(v) => b.extend_from_slice(&v.to_le_bytes()),
            Part::Small64(v) => b.extend_from_slice(&u64::from(*v).to_le_bytes()),
            Part::Name(i) => b.extend_from_slice(NAMES[usize::from(*i) % NAMES.len()]),
        }
    }
    b
}

fuzz_target!(|input: Input| {
    let mut guard = env().lock().unwrap();
    let env = &mut *guard;
    if env.dirty {
        // A fresh copy of the tree (a new name, should the old one resist removal).
        let _ = std::fs::remove_dir_all(&env.share);
        env.generation += 1;
        env.share = env.base.path().join(format!("share-{}", env.generation));
        populate(&env.share);
        env.dirty = false;
    }
    let limits = Limits {
        max_bytes: Some(1 << 20),
        max_inodes: Some(64),
    };
    let server = FsServer::dir_share(&env.share, input.readonly, limits).expect("share");
    let mem = &env.mem;
    mem.write_slice(&[0u8; 0x3000], GuestAddress(0)).unwrap();

    let mut chains = Vec::new();
    let mut next_desc: u16 = 0;
    let mut cursor = DATA;
    let mut alloc = |len: usize| {
        let at = cursor;
        cursor += (len as u64 + 15) & !15;
        at
    };
    for (i, req) in input.reqs.iter().take(MAX_REQS).enumerate() {
        let opcode = match req.opcode {
            Ok(k) => u32::from(k % 52) + 1,
            Err(raw) => raw,
        };
        if !input.readonly && !READ_ONLY_OPS.contains(&opcode) {
            env.dirty = true;
        }
        let unique = i as u64 + 1;
        let body = body(req);
        let exact = 40 + body.len() as u32;
        let len = match req.len {
            Len::Exact => exact,
            Len::Delta(d) => exact.wrapping_add_signed(i32::from(d)),
            Len::Raw(v) => v,
        };
        let (uid, gid) = req.uid_gid.unwrap_or((0, 0));
        let mut msg = Vec::with_capacity(exact as usize);
        msg.extend_from_slice(&len.to_le_bytes());
        msg.extend_from_slice(&opcode.to_le_bytes());
        msg.extend_from_slice(&unique.to_le_bytes());
        msg.extend_from_slice(&u64::from(req.nodeid).to_le_bytes());
        msg.extend_from_slice(&uid.to_le_bytes());
        msg.extend_from_slice(&gid.to_le_bytes());
        msg.extend_from_slice(&[0u8; 8]); // pid, total_extlen, padding
        msg.extend_from_slice(&body);

        // Readable descriptors: the message split at the given points.
        let mut cuts: Vec<usize> = req
            .splits
            .iter()
            .take(MAX_DESCS / 2)
            .map(|&s| usize::from(s) % (msg.len() + 1))
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut pieces = Vec::new();
        let mut start = 0;
        for c in cuts.into_iter().chain([msg.len()]) {
            if c > start {
                pieces.push(msg[start..c].to_vec());
                start = c;
            }
        }
        let mut descs: Vec<(u64, u32, u16)> = Vec::new();
        let mut readable = Vec::new();
        for p in pieces {
            let at = alloc(p.len());
            mem.write_slice(&p, GuestAddress(at)).unwrap();
            descs.push((at, p.len() as u32, 0));
            readable.push((at, p));
        }
        let mut writable = Vec::new();
        let mut total = 0;
        for &r in req.replies.iter().take(MAX_DESCS / 2) {
            let r = usize::from(r).min(MAX_WRITABLE - total);
            total += r;
            let at = alloc(r);
            mem.write_slice(&vec![0u8; r], GuestAddress(at)).unwrap();
            descs.push((at, r as u32, F_WRITE));
            writable.push((at, r as u32));
        }
        if descs.is_empty() {
            continue;
        }
        let head = next_desc;
        let n = descs.len();
        let mut table = Vec::new();
        for (k, (addr, len, flags)) in descs.into_iter().enumerate() {
            let index = next_desc;
            next_desc = (next_desc + 1) % QSIZE;
            let flags = if k + 1 < n { flags | F_NEXT } else { flags };
            table.push((index, addr, len, flags, next_desc));
        }
        let tweaked = !req.tweaks.is_empty();
        if tweaked {
            env.dirty = env.dirty || !input.readonly;
        }
        for (k, t) in req.tweaks.iter().take(4) {
            let d = &mut table[usize::from(*k) % n];
            match *t {
                Tweak::Addr(a) => d.1 = a,
                Tweak::Len(l) => d.2 = l,
                Tweak::Flags(f) => d.3 = f,
                Tweak::Next(x) => d.4 = x,
            }
        }
        for (index, addr, len, flags, next) in table {
            let at = DESC + u64::from(index) * 16;
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        let slot = chains.len() as u64;
        mem.write_obj(head, GuestAddress(AVAIL + 4 + slot * 2))
            .unwrap();
        chains.push(Chain {
            head,
            unique,
            readable,
            writable,
            tweaked,
        });
        if usize::from(next_desc) + MAX_DESCS > usize::from(QSIZE) && chains.len() < MAX_REQS {
            // Out of room in the descriptor table for another chain.
            break;
        }
    }
    if chains.is_empty() {
        return;
    }
    mem.write_obj(chains.len() as u16, GuestAddress(AVAIL + 2))
        .unwrap();

    let mut queue = Queue::new(QSIZE).unwrap();
    queue
        .try_set_desc_table_address(GuestAddress(DESC))
        .unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL))
        .unwrap();
    queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    queue.set_ready(true);
    server
        .process_queue(mem, queue)
        .expect("process_queue on a valid ring");

    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(usize::from(used_idx), chains.len(), "every chain completed");
    let any_tweak = chains.iter().any(|c| c.tweaked);
    for (i, c) in chains.iter().enumerate() {
        let at = USED + 4 + i as u64 * 8;
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        assert_eq!(id, u32::from(c.head), "chains completed in order");
        if any_tweak {
            // Tweaked descriptors may alias other chains' buffers: only no-panic is checked.
            continue;
        }
        let room: u32 = c.writable.iter().map(|w| w.1).sum();
        assert!(len <= room, "used length {len} > writable bytes {room}");
        for (addr, bytes) in &c.readable {
            let mut now = vec![0u8; bytes.len()];
            mem.read_slice(&mut now, GuestAddress(*addr)).unwrap();
            assert_eq!(&now, bytes, "the device wrote into a readable buffer");
        }
        if len == 0 {
            continue;
        }
        // The reply, gathered from the writable buffers.
        let mut reply = Vec::new();
        for &(addr, wlen) in &c.writable {
            let mut b = vec![0u8; wlen as usize];
            mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            reply.extend_from_slice(&b);
        }
        reply.truncate(len as usize);
        assert!(
            reply.len() >= 16,
            "reply of {len} bytes, shorter than its header"
        );
        let hlen = u32::from_le_bytes(reply[0..4].try_into().unwrap());
        let error = i32::from_le_bytes(reply[4..8].try_into().unwrap());
        let unique = u64::from_le_bytes(reply[8..16].try_into().unwrap());
        assert_eq!(hlen, len, "reply header length != bytes used");
        assert_eq!(unique, c.unique, "reply to another request");
        assert!(error <= 0 && error > -4096, "reply error {error}");
        if error != 0 {
            assert_eq!(len, 16, "an error reply with a body");
        }
    }
});
