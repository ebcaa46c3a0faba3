//! Cold 4 KiB random reads through the node's chunk fetcher (an in-process server on a unix
//! socket, a fresh cache and a fresh client per variant), three ways:
//! - a whole-chunk image (format 1): whole-chunk requests;
//! - a blocked image, asked for whole chunks (what a remote source did before block
//!   requests): `FetcherClient::chunk` and a `pread` of the descriptor;
//! - a blocked image through the remote chunk source: block requests.
//!
//! Each read is a 4 KiB-aligned 4 KiB read in a 1 MiB region of its file no other read
//! touches (so every read is cold: CDC chunks are at most 1 MiB). Prints reads per second,
//! mean latency, CPU time per read of this process (client and fetcher: steadier than wall
//! time on a busy machine), whole chunks and blocks the fetcher fetched, and (with `--store redis`) the
//! bytes the store sent. With `--seq`, every file is read sequentially instead, in 128 KiB
//! reads followed by the source's read-ahead (as the FUSE layer does).
//!
//! `cargo run --release -p flist-fs --example fetcher_random_reads -- [--mb N] [--reads N]
//! [--store dir|redis] [--seq]`

use flist_fs::chunk::blocks::DEFAULT_BLOCK;
use flist_fs::fetch::ChunkSource;
use flist_fs::fetcher::client::FetcherClient;
use flist_fs::fetcher::server::{run, Fetcher, ServerConfig};
use flist_fs::open::open_image_remote;
use flist_fs::pack::{pack, PackOptions};
use flist_fs::store::Router;
use std::sync::atomic::Ordering;
use std::sync::Arc;
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
        self.next() % n
    }
}

/// Half incompressible, half text-like bytes.
fn content(rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let x = rng.next();
        if (v.len() / 65536) % 2 == 0 {
            v.extend_from_slice(&x.to_le_bytes());
        } else {
            v.extend_from_slice(b"lorem ipsum dolor sit amet ");
        }
    }
    v.truncate(n);
    v
}

fn arg(args: &[String], name: &str) -> Option<String> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

fn redis_sent(url: &str) -> u64 {
    let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
    let info: String = redis::cmd("INFO").arg("stats").query(&mut con).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mb: u64 = arg(&args, "--mb")
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let reads: usize = arg(&args, "--reads")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let redis = arg(&args, "--store").as_deref() == Some("redis");
    let seq = args.iter().any(|a| a == "--seq");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();

    // The tree: 16 files of mb/16 MB each.
    let src = w.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let per = (mb << 20) / 16;
    for f in 0..16 {
        std::fs::write(
            src.join(format!("f{f:02}")),
            content(&mut rng, per as usize),
        )
        .unwrap();
    }
    // The reads: one per 1 MiB region, in random order.
    let mut list: Vec<(usize, u64)> = (0..16)
        .flat_map(|f| (0..per >> 20).map(move |r| (f, r << 20)))
        .collect();
    for i in (1..list.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        list.swap(i, j);
    }
    let list: Vec<(usize, u64)> = list
        .into_iter()
        .take(reads)
        .map(|(f, base)| (f, base + (rng.below((1 << 20) - 4096) & !4095)))
        .collect();

    let _redis_server;
    let store_for = |name: &str, db: u32| -> String {
        if redis {
            format!("redis://127.0.0.1:{}/{db}", redis_port())
        } else {
            format!("dir://{}", w.join(format!("store-{name}")).display())
        }
    };
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    fn redis_port() -> u16 {
        *PORT.get().unwrap()
    }
    if redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server");
        _redis_server = Kill(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        PORT.set(port).unwrap();
    }
    let images: Vec<(String, std::path::PathBuf, u32)> =
        [("whole", 0u32, 0), ("blocked", 1, DEFAULT_BLOCK)]
            .into_iter()
            .map(|(name, db, bs)| {
                let store = store_for(name, db);
                let img = w.join(format!("{name}.flist"));
                let opts = PackOptions {
                    block_size: bs,
                    ..PackOptions::default()
                };
                pack(
                    &src,
                    &img,
                    &Router::from_specs(std::slice::from_ref(&store)).unwrap(),
                    &opts,
                )
                .unwrap();
                (store, img, bs)
            })
            .collect();
    println!(
        "{}, {} MB in 16 files, {} store, chunk fetcher in-process",
        if seq {
            "sequential 128 KiB reads of every file (with read-ahead)".to_string()
        } else {
            format!("{} cold 4 KiB random reads", list.len())
        },
        mb,
        if redis { "redis" } else { "dir" }
    );
    for (label, which, blocks) in [
        ("whole-chunk image, chunk requests", 0usize, false),
        ("blocked image, chunk requests", 1, false),
        ("blocked image, block requests", 1, true),
    ] {
        let (store, img, _) = &images[which];
        let dir = w.join(format!("run-{label}").replace([' ', ','], "-"));
        std::fs::create_dir_all(&dir).unwrap();
        let cache = Arc::new(
            flist_fs::cache::ChunkCache::open_indexed(&dir.join("cache"), 10 << 30, None).unwrap(),
        );
        let fetcher = Arc::new(Fetcher::new(
            Router::from_specs(std::slice::from_ref(store)).unwrap(),
            cache,
            ServerConfig::default(),
        ));
        let sock = dir.join("sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let f = fetcher.clone();
        std::thread::spawn(move || run(listener, f));
        let client = Arc::new(FetcherClient::connect(&sock, 4).unwrap());
        let (image, source) = open_image_remote(img, client.clone(), None).unwrap();
        // Without the image's block size, a remote source asks for whole chunks (as it did
        // before block requests).
        let source = if blocks || which == 0 {
            source
        } else {
            Arc::new(ChunkSource::remote(client.clone()))
        };
        let inodes: Vec<_> = (0..16)
            .map(|f| {
                let ino = image.resolve(&format!("/f{f:02}")).unwrap();
                (ino, image.inode(ino).unwrap().clone())
            })
            .collect();
        let sent0 = if redis { redis_sent(store) } else { 0 };
        let cpu0 = cpu_secs();
        let started = Instant::now();
        let mut count = 0usize;
        let mut read = |ino: u64, inode: &flist_fs::meta::Inode, off: u64, len: u64| {
            let mut n = 0u64;
            source
                .read_range(inode, off, len, &mut |b| {
                    n += b.len() as u64;
                    Ok(())
                })
                .unwrap();
            if seq {
                source.read_ahead(ino, inode, off, off + n);
            }
            count += 1;
            n
        };
        let mut bytes = 0u64;
        if seq {
            for (ino, inode) in &inodes {
                let mut off = 0;
                while off < inode.size {
                    let n = read(*ino, inode, off, 128 << 10);
                    off += n;
                    bytes += n;
                }
            }
        } else {
            for (f, off) in &list {
                let (ino, inode) = &inodes[*f];
                bytes += read(*ino, inode, *off, 4096);
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = cpu_secs() - cpu0;
        let sent = if redis { redis_sent(store) - sent0 } else { 0 };
        println!(
            "{label:34} {:7.0} reads/s {:8.1} us/read {:7.1} us CPU/read {:7.1} MB/s  fetched: {} chunks, {} blocks{}",
            count as f64 / secs,
            secs * 1e6 / count as f64,
            cpu * 1e6 / count as f64,
            bytes as f64 / 1e6 / secs,
            fetcher.stats.fetched.load(Ordering::Relaxed),
            fetcher.stats.blocks_fetched.load(Ordering::Relaxed),
            if redis {
                format!(", store sent {:.1} MB", sent as f64 / 1e6)
            } else {
                String::new()
            }
        );
    }
}

/// User and system CPU time of this process (client and in-process fetcher), in seconds.
fn cpu_secs() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
