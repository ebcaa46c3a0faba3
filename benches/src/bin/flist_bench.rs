//! flist-fs benchmarks: pack throughput of a generated mixed tree, dedup between two tree
//! versions with 5% of bytes changed (fixed-size vs content-defined chunking), and read
//! throughput through the `FileSystem` layer cold (dir store, HTTP store) and warm (cache).
//!
//! Usage: `flist_bench [pack|dedup|read|fetcher|all] [--mb N]` (default all, ~200 MB tree),
//! `flist_bench mount [--mb N] [--reads N] [--runs N] [--store dir|redis]` (not in `all`: it
//! needs rfs and FUSE).
//! The HTTP store is `python3 -m http.server` over the dir store.
//!
//! `mount`: 4 KiB random reads through FUSE mounts of the same generated tree, cold (a fresh
//! mount over an empty cache) and warm (a fresh mount over the cache the cold pass filled;
//! the kernel's page cache is new with each mount), each read an `open`, `posix_fadvise
//! (RANDOM)`, one 4 KiB `pread` at a 4 KiB-aligned offset and `close`, the same (file,
//! offset) list for every mount, each read in a 512 KiB region of its file no other read
//! touches (so every cold read is the first of its data). Mounted: `flist mount` of this build (the `flist` binary
//! beside this one) with blocked chunks (the default), `flist mount` of a whole-chunk image
//! (format 1: what flist read before blocks), and the peer, `rfs mount` (RFS_BIN; build it
//! with `RFS_BIN=$(bash benches/peers/build-rfs.sh)`), all three over the same store kind:
//! `dir://` stores on the same disk (default), or one `redis-server` started by the bench
//! (`--store redis`: flist reads it as `redis://`, ranged with GETRANGE; rfs as `zdb://`, its
//! client for the same protocol, GET). Each run mounts them in turn, in reverse order every
//! other run.
//!
//! `fetcher`: read throughput of an image (dir store) through the node's chunk fetcher (the
//! remote chunk source: descriptors passed over a unix socket, `pread`) against the local
//! source (router + cache in the reading process), cold (empty cache) and warm (cache
//! filled, a new reader). The fetcher is the `chunk-fetcher` binary beside this one when
//! built (`cargo build --release -p flist-fs --bin chunk-fetcher`), else the same server on
//! a thread of this process.

use flist_fs::chunk::ChunkerKind;
use flist_fs::fs::FlistFs;
use flist_fs::open::OpenOptions;
use flist_fs::pack::{pack, PackOptions, PackStats};
use flist_fs::store::Router;
use fuse_backend_rs::api::filesystem::{Context, FileSystem, ZeroCopyWriter};
use fuse_backend_rs::common::file_traits::FileReadWriteVolatile;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Half-compressible content: random words from a small vocabulary mixed with random bytes.
fn content(rng: &mut Rng, len: usize) -> Vec<u8> {
    const WORDS: [&[u8]; 8] = [
        b"kernel ", b"grid ", b"node ", b"chunk ", b"flist ", b"virtio ", b"0x7f3a ", b"\n",
    ];
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        if rng.below(3) == 0 {
            for _ in 0..16 {
                out.push(rng.next() as u8);
            }
        } else {
            out.extend_from_slice(WORDS[rng.below(8) as usize]);
        }
    }
    out.truncate(len);
    out
}

/// Writes a tree of mixed sizes totalling about `mb` MB; returns (files, bytes).
fn gen_tree(root: &Path, mb: u64, seed: u64) -> (u64, u64) {
    let mut rng = Rng(seed);
    let target = mb * 1_000_000;
    let (mut files, mut bytes) = (0u64, 0u64);
    while bytes < target {
        let dir = root.join(format!("d{:02}", files % 37));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let size = match rng.below(100) {
            0..=69 => 512 + rng.below(16 * 1024),
            70..=96 => 64 * 1024 + rng.below(1024 * 1024),
            _ => 4 * 1024 * 1024 + rng.below(12 * 1024 * 1024),
        } as usize;
        std::fs::write(dir.join(format!("f{files:05}")), content(&mut rng, size)).expect("write");
        files += 1;
        bytes += size as u64;
    }
    (files, bytes)
}

/// Copies `a` to `b` changing about `pct`% of the bytes with edits of `edit` bytes (min, max)
/// at random places in random files: half in-place overwrites, half insertions (which shift the
/// rest of the file).
fn mutate_tree(a: &Path, b: &Path, pct: f64, edit: (u64, u64), seed: u64) -> u64 {
    let mut rng = Rng(seed);
    let mut files = Vec::new();
    for d in std::fs::read_dir(a).expect("read tree") {
        let d = d.expect("entry");
        for f in std::fs::read_dir(d.path()).expect("read dir") {
            let f = f.expect("entry");
            let rel = PathBuf::from(d.file_name()).join(f.file_name());
            files.push((rel, std::fs::read(f.path()).expect("read")));
        }
    }
    files.sort_by(|x, y| x.0.cmp(&y.0));
    let total: u64 = files.iter().map(|f| f.1.len() as u64).sum();
    let budget = (total as f64 * pct / 100.0) as u64;
    let mut changed = 0u64;
    while changed < budget {
        // Pick a file weighted by size (a random byte of the tree).
        let mut at = rng.below(total);
        let idx = files
            .iter()
            .position(|f| {
                let l = f.1.len() as u64;
                if at < l {
                    true
                } else {
                    at -= l;
                    false
                }
            })
            .unwrap_or(0);
        let data = &mut files[idx].1;
        let n = (edit.0 + rng.below(edit.1 - edit.0 + 1))
            .min(budget - changed)
            .max(1) as usize;
        let at = (at as usize).min(data.len());
        let piece = content(&mut rng, n);
        if rng.below(2) == 0 {
            data.splice(at..at, piece);
        } else {
            let end = (at + n).min(data.len());
            data.splice(at..end, piece);
        }
        changed += n as u64;
    }
    for (rel, data) in files {
        let p = b.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(p, data).expect("write");
    }
    changed
}

fn pack_into(src: &Path, img: &Path, store: &Path, chunker: ChunkerKind) -> PackStats {
    let router = Router::from_specs(&[format!("dir://{}", store.display())]).expect("router");
    let opts = PackOptions {
        chunker,
        ..Default::default()
    };
    pack(src, img, &router, &opts).expect("pack")
}

fn bench_pack(work: &Path, mb: u64) {
    let src = work.join("pack-src");
    let (files, bytes) = gen_tree(&src, mb, 1);
    for (name, chunker) in [
        ("cdc-256k", ChunkerKind::default()),
        ("fixed-512k", ChunkerKind::fixed_default()),
    ] {
        let store = work.join(format!("pack-store-{name}"));
        let s = pack_into(
            &src,
            &work.join(format!("pack-{name}.flist")),
            &store,
            chunker,
        );
        println!(
            "pack[{name}]: {files} files, {:.1} MB, {} chunks, stored {:.1} MB, {:.2}s, {:.1} MB/s",
            bytes as f64 / 1e6,
            s.chunks,
            s.stored_bytes as f64 / 1e6,
            s.elapsed.as_secs_f64(),
            s.throughput_mb_s()
        );
        let _ = std::fs::remove_dir_all(store);
    }
}

fn bench_dedup(work: &Path, mb: u64) {
    let v1 = work.join("dedup-v1");
    let (_, bytes) = gen_tree(&v1, mb, 2);
    let scenarios = [
        ("clustered edits 64 KiB-1 MiB", (64 * 1024, 1024 * 1024)),
        ("scattered edits 64 B-4 KiB", (64, 4096)),
    ];
    for (si, (what, edit)) in scenarios.into_iter().enumerate() {
        let v2 = work.join(format!("dedup-v2-{si}"));
        let changed = mutate_tree(&v1, &v2, 5.0, edit, 3 + si as u64);
        println!(
            "dedup ({what}): v1 {:.1} MB, v2 changes {:.1} MB ({:.1}% of bytes; half overwrites, half insertions)",
            bytes as f64 / 1e6,
            changed as f64 / 1e6,
            changed as f64 * 100.0 / bytes as f64
        );
        for (name, chunker) in [
            ("cdc-256k", ChunkerKind::default()),
            ("fixed-512k", ChunkerKind::fixed_default()),
        ] {
            let store = work.join(format!("dedup-store-{name}"));
            pack_into(&v1, &work.join("v1.flist"), &store, chunker);
            let s = pack_into(&v2, &work.join("v2.flist"), &store, chunker);
            let reused = 1.0 - s.new_plain_bytes as f64 / s.bytes as f64;
            println!(
                "  [{name}]: v2 {} chunks, {} new / {} shared; new data {:.1} MB of {:.1} MB -> {:.1}% of v2 reused from v1",
                s.chunks,
                s.new_chunks,
                s.dedup_chunks,
                s.new_plain_bytes as f64 / 1e6,
                s.bytes as f64 / 1e6,
                reused * 100.0
            );
            let _ = std::fs::remove_dir_all(store);
        }
        let _ = std::fs::remove_dir_all(v2);
    }
}

struct Sink(usize);

impl io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0 += b.len();
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ZeroCopyWriter for Sink {
    fn write_from(
        &mut self,
        _f: &mut dyn FileReadWriteVolatile,
        _c: usize,
        _o: u64,
    ) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn available_bytes(&self) -> usize {
        usize::MAX
    }
}

/// Reads every regular file through `FileSystem::read` in 128 KiB requests; returns MB/s.
fn read_all(fs: &FlistFs) -> (u64, f64) {
    let ctx = Context::new();
    let started = Instant::now();
    let mut total = 0u64;
    let files: Vec<(u64, u64)> = fs
        .image()
        .walk()
        .into_iter()
        .filter_map(|(_, ino)| {
            let i = fs.image().inode(ino)?;
            (i.kind == flist_fs::meta::InodeKind::File).then_some((ino, i.size))
        })
        .collect();
    for (ino, size) in files {
        let mut off = 0;
        while off < size {
            let mut sink = Sink(0);
            let n = fs
                .read(&ctx, ino, 0, &mut sink, 128 * 1024, off, None, 0)
                .expect("read");
            off += n as u64;
            total += n as u64;
        }
    }
    (total, total as f64 / 1e6 / started.elapsed().as_secs_f64())
}

fn bench_read(work: &Path, mb: u64) {
    let src = work.join("read-src");
    gen_tree(&src, mb, 4);
    let store = work.join("read-store");
    let img = work.join("read.flist");
    pack_into(&src, &img, &store, ChunkerKind::default());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let mut http = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(&store)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 -m http.server");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let open = |stores: Vec<String>, cache: &PathBuf| {
        let opts = OpenOptions {
            stores,
            cache_dir: Some(cache.clone()),
            ..OpenOptions::default()
        };
        FlistFs::open(&img, &opts).expect("open image")
    };
    let cache_dir = work.join("read-cache-dir");
    let (n, cold_dir) = read_all(&open(
        vec![format!("dir://{}", store.display())],
        &cache_dir,
    ));
    let cache_http = work.join("read-cache-http");
    let (_, cold_http) = read_all(&open(
        vec![format!("http://127.0.0.1:{port}/")],
        &cache_http,
    ));
    let (_, warm) = read_all(&open(
        vec![format!("http://127.0.0.1:{port}/")],
        &cache_http,
    ));
    let _ = http.kill();
    let _ = http.wait();
    println!(
        "read: {:.1} MB through FileSystem::read, 128 KiB requests",
        n as f64 / 1e6
    );
    println!("read[cold, dir store]:  {cold_dir:.1} MB/s");
    println!("read[cold, http store]: {cold_http:.1} MB/s");
    println!("read[warm, cache]:      {warm:.1} MB/s");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map(String::as_str).unwrap_or("all");
    let mb = args
        .iter()
        .position(|a| a == "--mb")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(200u64);
    let work = tempfile::tempdir().expect("tempdir");
    if matches!(which, "pack" | "all") {
        bench_pack(work.path(), mb);
    }
    if matches!(which, "dedup" | "all") {
        bench_dedup(work.path(), mb / 2);
    }
    if matches!(which, "read" | "all") {
        bench_read(work.path(), mb / 2);
    }
    if matches!(which, "fetcher" | "all") {
        bench_fetcher(work.path(), mb);
    }
    if which == "mount" {
        let arg = |name: &str, default: usize| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let redis = args.iter().any(|a| a == "redis");
        bench_mount(
            work.path(),
            mb,
            arg("--reads", 2000),
            arg("--runs", 3),
            redis,
        );
    }
}

/// A mounted filesystem served by a child process; unmounted (and the child ended) on drop.
struct Mounted {
    child: std::process::Child,
    mnt: PathBuf,
}

impl Mounted {
    /// Runs `cmd` (which serves a FUSE mount at `mnt` in the foreground) and waits for the
    /// mount to appear.
    fn start(mut cmd: std::process::Command, mnt: &Path) -> Mounted {
        std::fs::create_dir_all(mnt).expect("mountpoint");
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start a mount");
        let m = Mounted {
            child,
            mnt: mnt.to_path_buf(),
        };
        for _ in 0..400 {
            if is_mounted(mnt) {
                return m;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        panic!("{} did not get mounted", mnt.display());
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("fusermount")
            .arg("-u")
            .arg(&self.mnt)
            .status();
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_mounted(p: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let p = p.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(p.as_ref()))
}

/// `reads` (relative path, 4 KiB-aligned offset) pairs, files picked by size (a random byte
/// of the tree), from the files of `root` of at least 4 KiB, each in a 512 KiB region of its
/// file no other read touches: a read is the first of its data (cold) for every reader (rfs
/// fetches 512 KiB blocks, flist chunks of 64 KiB to 1 MiB). Fewer when the tree has fewer
/// regions.
fn random_reads(root: &Path, reads: usize, seed: u64) -> Vec<(PathBuf, u64)> {
    let mut files = Vec::new();
    for d in std::fs::read_dir(root).expect("read tree") {
        let d = d.expect("entry");
        for f in std::fs::read_dir(d.path()).expect("read dir") {
            let f = f.expect("entry");
            let len = f.metadata().expect("stat").len();
            if len >= 4096 {
                files.push((PathBuf::from(d.file_name()).join(f.file_name()), len));
            }
        }
    }
    files.sort();
    let total: u64 = files.iter().map(|f| f.1).sum();
    let mut rng = Rng(seed);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for _ in 0..reads * 20 {
        if out.len() == reads {
            break;
        }
        let mut at = rng.below(total);
        let Some(k) = files.iter().position(|f| {
            if at < f.1 {
                true
            } else {
                at -= f.1;
                false
            }
        }) else {
            continue;
        };
        let (path, len) = &files[k];
        let off = rng.below(*len - 4096 + 1) & !4095;
        if seen.insert((k, off >> 19)) {
            out.push((path.clone(), off));
        }
    }
    out
}

/// Does the reads under `mnt`; returns reads per second.
fn read_through(mnt: &Path, reads: &[(PathBuf, u64)]) -> f64 {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let mut buf = vec![0u8; 4096];
    let started = Instant::now();
    for (path, off) in reads {
        let f = std::fs::File::open(mnt.join(path)).expect("open through the mount");
        // SAFETY: posix_fadvise on a descriptor we own; only advice.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        let n = f.read_at(&mut buf, *off).expect("read through the mount");
        assert_eq!(n, 4096, "{} at {off}", path.display());
    }
    reads.len() as f64 / started.elapsed().as_secs_f64()
}

/// A child process killed on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `redis-server` on a free port with no persistence (killed on drop) and its port.
fn start_redis() -> (KillOnDrop, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--maxmemory", "0"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server (apt-get install redis-server)");
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    (KillOnDrop(child), port)
}

fn bench_mount(work: &Path, mb: u64, reads: usize, runs: usize, redis: bool) {
    let Ok(rfs) = std::env::var("RFS_BIN") else {
        eprintln!(
            "mount: set RFS_BIN to an rfs binary (RFS_BIN=$(bash benches/peers/build-rfs.sh))"
        );
        std::process::exit(2);
    };
    let flist = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("flist")))
        .filter(|p| p.is_file())
        .expect("the flist binary beside this one (cargo build --release -p flist-fs)");
    let src = work.join("mount-src");
    let (files, bytes) = gen_tree(&src, mb, 8);
    let list = random_reads(&src, reads, 11);
    let reads = list.len();
    let server = redis.then(start_redis);
    // The store URL of `name`'s chunks: flist's and rfs's own spelling.
    let store_url = |name: &str| match &server {
        Some((_, port)) if name == "rfs" => format!("zdb://127.0.0.1:{port}"),
        Some((_, port)) => format!("redis://127.0.0.1:{port}/0"),
        None => format!(
            "dir://{}",
            work.join(format!("mount-store-{name}")).display()
        ),
    };
    // The two flist images: blocked chunks (default) and whole chunks (format 1).
    let mut images = Vec::new();
    for (name, block_size) in [
        ("flist", flist_fs::chunk::blocks::DEFAULT_BLOCK),
        ("flist-whole", 0),
    ] {
        let store = store_url(name);
        let img = work.join(format!("mount-{name}.flist"));
        let router = Router::from_specs(std::slice::from_ref(&store)).expect("router");
        let opts = PackOptions {
            block_size,
            ..Default::default()
        };
        let s = pack(&src, &img, &router, &opts).expect("pack");
        println!(
            "mount[{name}]: packed {} chunks, stored {:.1} MB, image {:.0} KB",
            s.chunks,
            s.stored_bytes as f64 / 1e6,
            std::fs::metadata(&img).map(|m| m.len()).unwrap_or(0) as f64 / 1e3
        );
        images.push((name, img, store));
    }
    let rfs_meta = work.join("mount-rfs.fl");
    let started = Instant::now();
    let status = std::process::Command::new(&rfs)
        .arg("pack")
        .arg("-m")
        .arg(&rfs_meta)
        .arg("-s")
        .arg(store_url("rfs"))
        .arg(&src)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("rfs pack");
    assert!(status.success(), "rfs pack: {status}");
    println!(
        "mount[rfs]: packed in {:.1}s, metadata {:.0} KB",
        started.elapsed().as_secs_f64(),
        std::fs::metadata(&rfs_meta).map(|m| m.len()).unwrap_or(0) as f64 / 1e3
    );
    println!(
        "mount: {files} files, {:.1} MB; {reads} random 4 KiB reads per pass, {runs} runs, {} stores",
        bytes as f64 / 1e6,
        if redis { "redis" } else { "dir" }
    );
    let names = ["flist", "flist-whole", "rfs"];
    let mut cold: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut warm: Vec<Vec<f64>> = vec![Vec::new(); 3];
    for run in 0..runs {
        // FLIST_BENCH_MOUNTS=flist,rfs (say) mounts only those (for profiling one of them).
        let only = std::env::var("FLIST_BENCH_MOUNTS").ok();
        let mut order: Vec<usize> = (0..3)
            .filter(|k| {
                only.as_deref()
                    .is_none_or(|o| o.split(',').any(|n| n == names[*k]))
            })
            .collect();
        if run % 2 == 1 {
            order.reverse();
        }
        for k in order {
            let cache = work.join(format!("mount-cache-{}-{run}", names[k]));
            let mnt = work.join(format!("mnt-{}", names[k]));
            let cmd = || {
                let mut cmd;
                if k < 2 {
                    let (_, img, store) = &images[k];
                    cmd = std::process::Command::new(&flist);
                    cmd.arg("mount")
                        .arg(img)
                        .arg(&mnt)
                        .arg("--store")
                        .arg(store)
                        .arg("--cache")
                        .arg(&cache)
                        .env("FLIST_LOG", "error");
                    if let Ok(threads) = std::env::var("FLIST_BENCH_THREADS") {
                        cmd.arg("--threads").arg(threads);
                    }
                } else {
                    cmd = std::process::Command::new(&rfs);
                    cmd.arg("mount")
                        .arg("-m")
                        .arg(&rfs_meta)
                        .arg("-c")
                        .arg(&cache)
                        .arg(&mnt);
                }
                cmd
            };
            {
                let m = Mounted::start(cmd(), &mnt);
                cold[k].push(read_through(&m.mnt, &list));
            }
            {
                let m = Mounted::start(cmd(), &mnt);
                warm[k].push(read_through(&m.mnt, &list));
            }
            let _ = std::fs::remove_dir_all(&cache);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!("mount: 4 KiB random reads/s, median of {runs} runs (each run's values in brackets)");
    for (pass, table) in [("cold", &cold), ("warm", &warm)] {
        let peer = if table[2].is_empty() {
            f64::NAN
        } else {
            median(&table[2])
        };
        for k in (0..3).filter(|k| !table[*k].is_empty()) {
            let m = median(&table[k]);
            let each: Vec<String> = table[k].iter().map(|v| format!("{v:.0}")).collect();
            println!(
                "mount[{pass}, {:<11}]: {m:>8.0}/s  {:>5.1}x rfs  [{}]",
                names[k],
                m / peer,
                each.join(", ")
            );
        }
    }
}

/// Starts the chunk fetcher on `sock` over `store` with its cache in `cache`; returns the
/// child process when it is one.
fn start_fetcher(sock: &Path, cache: &Path, store: &str) -> Option<std::process::Child> {
    let bin = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("chunk-fetcher")))
        .filter(|p| p.is_file());
    let child = match bin {
        Some(bin) => {
            println!("fetcher: {}", bin.display());
            Some(
                std::process::Command::new(bin)
                    .arg("--listen")
                    .arg(sock)
                    .arg("--cache")
                    .arg(cache)
                    .args(["--cache-max-bytes", "10000000000", "--store", store])
                    .env("FLIST_LOG", "warn")
                    .spawn()
                    .expect("chunk-fetcher"),
            )
        }
        None => {
            println!("fetcher: in-process (no chunk-fetcher binary beside this one)");
            let listener = std::os::unix::net::UnixListener::bind(sock).expect("bind");
            let policy = flist_fs::store::StorePolicy::allowlist(&[store]).expect("policy");
            let cache = std::sync::Arc::new(
                flist_fs::cache::ChunkCache::open_indexed(cache, 10_000_000_000, None)
                    .expect("cache"),
            );
            cache.start_evictor().expect("evictor");
            let fetcher = std::sync::Arc::new(flist_fs::fetcher::server::Fetcher::new(
                policy.open_all().expect("stores"),
                cache,
                Default::default(),
            ));
            std::thread::spawn(move || flist_fs::fetcher::server::run(listener, fetcher));
            None
        }
    };
    for _ in 0..400 {
        if std::os::unix::net::UnixStream::connect(sock).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    child
}

fn bench_fetcher(work: &Path, mb: u64) {
    let src = work.join("fetcher-src");
    gen_tree(&src, mb, 6);
    let store = work.join("fetcher-store");
    let img = work.join("fetcher.flist");
    pack_into(&src, &img, &store, ChunkerKind::default());
    let _ = std::fs::remove_dir_all(&src);
    let store_url = format!("dir://{}", store.display());
    let local = |cache: &PathBuf| {
        let opts = OpenOptions {
            stores: vec![store_url.clone()],
            cache_dir: Some(cache.clone()),
            ..OpenOptions::default()
        };
        FlistFs::open(&img, &opts).expect("open image")
    };
    let local_cache = work.join("fetcher-local-cache");
    let (n, local_cold) = read_all(&local(&local_cache));
    let (_, local_warm) = read_all(&local(&local_cache));

    let sock = work.join("fetcher.sock");
    let mut child = start_fetcher(&sock, &work.join("fetcher-cache"), &store_url);
    let remote = || {
        let client = std::sync::Arc::new(
            flist_fs::fetcher::client::FetcherClient::connect(
                &sock,
                flist_fs::fetcher::client::DEFAULT_POOL,
            )
            .expect("connect to the fetcher"),
        );
        FlistFs::open_remote(&img, client, None).expect("open image remotely")
    };
    let (n2, remote_cold) = read_all(&remote());
    let (_, remote_warm) = read_all(&remote());
    let hot_fs = remote();
    let _ = read_all(&hot_fs);
    let (_, remote_hot) = read_all(&hot_fs);
    if let Some(c) = child.as_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert_eq!(n, n2, "both sources read the same bytes");
    println!(
        "fetcher: {:.1} MB image through FileSystem::read, 128 KiB requests",
        n as f64 / 1e6
    );
    println!("read[cold, local source]:    {local_cold:.1} MB/s");
    println!("read[cold, remote/fetcher]:  {remote_cold:.1} MB/s");
    println!("read[warm, local source]:    {local_warm:.1} MB/s  (new reader, cache filled)");
    println!("read[warm, remote/fetcher]:  {remote_warm:.1} MB/s  (new client, cache filled)");
    println!("read[hot, remote/fetcher]:   {remote_hot:.1} MB/s  (same client, 2nd pass)");
}
