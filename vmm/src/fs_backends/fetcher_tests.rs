//! An image share served through the node's chunk fetcher, read by a thread under the
//! virtio-fs worker's seccomp filter WITHOUT network calls: the fetcher's sockets are
//! connected when the share is built (vmm start), the worker only hands requests to the
//! client's I/O threads and `pread`s the descriptors it gets (of whole chunks, or of single
//! blocks: the image is blocked).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_backend_rs::api::filesystem::{Context, FileSystem, FsOptions, ZeroCopyWriter, ROOT_ID};
use fuse_backend_rs::common::file_buf::FileVolatileSlice;
use fuse_backend_rs::common::file_traits::FileReadWriteVolatile;

use crate::config::NodeConfig;

fn pack(dir: &Path, image: &Path, store: &Path) {
    let router =
        flist_fs::store::Router::from_specs(&[format!("dir://{}", store.display())]).unwrap();
    flist_fs::pack::pack(dir, image, &router, &Default::default()).unwrap();
}

/// A ZeroCopyWriter collecting what FileSystem::read writes: with `zero_copy`, it reads the
/// parts of files it is given itself (as the virtio-fs writer does into guest memory) and
/// counts their bytes in `from_files`; without, it takes bytes only (as a copy-up's staging
/// file does).
struct VecWriter {
    data: Vec<u8>,
    zero_copy: bool,
    from_files: usize,
}

impl VecWriter {
    fn new(zero_copy: bool) -> Self {
        VecWriter {
            data: Vec::new(),
            zero_copy,
            from_files: 0,
        }
    }
}

impl io::Write for VecWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.data.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ZeroCopyWriter for VecWriter {
    fn write_from(
        &mut self,
        f: &mut dyn FileReadWriteVolatile,
        count: usize,
        off: u64,
    ) -> io::Result<usize> {
        if !self.zero_copy {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        let mut buf = vec![0u8; count];
        // SAFETY: `buf` outlives the slice, and nothing else touches it meanwhile.
        let slice = unsafe { FileVolatileSlice::from_mut_slice(&mut buf) };
        let n = f.read_at_volatile(slice, off)?;
        self.data.extend_from_slice(&buf[..n]);
        self.from_files += n;
        Ok(n)
    }
    fn available_bytes(&self) -> usize {
        usize::MAX
    }
}

/// The chunk fetcher serving `store` on `sock`: the `chunk-fetcher` binary when it was built
/// next to this test (`cargo test -p flist-fs` builds it), else the same server in-process.
enum Running {
    Process(std::process::Child),
    InProcess,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Running::Process(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start_fetcher(tmp: &Path, sock: &Path, store: &str) -> Running {
    let bin: Option<PathBuf> = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("chunk-fetcher")))
        .filter(|p| p.is_file());
    let cache = tmp.join("fetcher-cache");
    let running = match bin {
        Some(bin) => Running::Process(
            std::process::Command::new(bin)
                .arg("--listen")
                .arg(sock)
                .arg("--cache")
                .arg(&cache)
                .args(["--cache-max-bytes", "100000000", "--store", store])
                .spawn()
                .unwrap(),
        ),
        None => {
            let listener = std::os::unix::net::UnixListener::bind(sock).unwrap();
            let policy = flist_fs::store::StorePolicy::allowlist(&[store]).unwrap();
            let cache = Arc::new(
                flist_fs::cache::ChunkCache::open_indexed(&cache, 100_000_000, None).unwrap(),
            );
            cache.start_evictor().unwrap();
            let fetcher = Arc::new(flist_fs::fetcher::server::Fetcher::new(
                policy.open_all().unwrap(),
                cache,
                Default::default(),
            ));
            std::thread::spawn(move || flist_fs::fetcher::server::run(listener, fetcher));
            Running::InProcess
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "the chunk fetcher did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    running
}

#[test]
fn an_image_share_through_the_fetcher_under_the_no_network_worker_filter() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(src.join("etc/version"), b"image-v1\n").unwrap();
    std::fs::write(src.join("big"), &big).unwrap();
    let store_dir = tmp.path().join("store");
    let img = tmp.path().join("img.flist");
    pack(&src, &img, &store_dir);
    let store = format!("dir://{}", store_dir.display());
    let sock = tmp.path().join("fetcher.sock");
    let _fetcher = start_fetcher(tmp.path(), &sock, &store);

    // The node configuration names the fetcher (and the allowlist, which the vmm still
    // checks the image against); no cache directory is made or written by the vmm.
    let node = NodeConfig {
        fetcher: Some(sock.clone()),
        image_cache: Some(tmp.path().join("vmm-cache")),
        stores: vec![store.clone()],
        ..NodeConfig::default()
    };
    let settings = node.image_settings(&[], None).unwrap();
    let fs = super::image_share("t", &img, &settings).unwrap();
    // An image outside the vmm's allowlist is still refused.
    let other = NodeConfig {
        fetcher: Some(sock.clone()),
        stores: vec!["dir:///srv/elsewhere".into()],
        ..NodeConfig::default()
    };
    let e = super::image_share("t", &img, other.image_settings(&[], None).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("may be used"), "{e}");

    let worker = std::thread::spawn(move || {
        let filter = crate::seccomp::filter(
            crate::seccomp::ThreadKind::FsWorker { network: false },
            crate::seccomp::Violation::Errno,
        )
        .unwrap();
        crate::seccomp::apply_to_current_thread(&filter).unwrap();
        // No network for this thread.
        // SAFETY: a plain socket call; only the filter's answer matters.
        let sock = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        assert_eq!(sock, -1);
        assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));

        fs.init(FsOptions::empty()).unwrap();
        let ctx = Context::default();
        let read = |parent: u64, path: &[&str], zero_copy: bool| -> VecWriter {
            let mut ino = parent;
            for n in path {
                let c = std::ffi::CString::new(*n).unwrap();
                ino = fs.lookup(&ctx, ino, &c).unwrap().inode;
            }
            let (handle, _, _) = fs.open(&ctx, ino, libc::O_RDONLY as u32, 0).unwrap();
            let handle = handle.unwrap_or(0);
            let mut out = VecWriter::new(zero_copy);
            loop {
                let off = out.data.len() as u64;
                let n = fs
                    .read(&ctx, ino, handle, &mut out, 128 * 1024, off, None, 0)
                    .unwrap();
                if n == 0 {
                    break;
                }
            }
            out
        };
        // A small read first: one block request (the image is blocked), under this filter.
        let c = std::ffi::CString::new("big").unwrap();
        let ino = fs.lookup(&ctx, ROOT_ID, &c).unwrap().inode;
        let (handle, _, _) = fs.open(&ctx, ino, libc::O_RDONLY as u32, 0).unwrap();
        let mut small = VecWriter::new(true);
        let n = fs
            .read(
                &ctx,
                ino,
                handle.unwrap_or(0),
                &mut small,
                4096,
                1 << 20,
                None,
                0,
            )
            .unwrap();
        assert_eq!(n, 4096);
        (
            read(ROOT_ID, &["etc", "version"], false),
            read(ROOT_ID, &["big"], true),
            read(ROOT_ID, &["big"], false),
            small,
        )
    });
    let (version, got, copied, small) = worker.join().unwrap();
    assert!(small.data == big[1 << 20..(1 << 20) + 4096]);
    // The fetcher's descriptors are read straight into the destination, no copy between.
    assert_eq!(small.from_files, 4096);
    assert_eq!(got.from_files, big.len());
    assert_eq!(version.data, b"image-v1\n");
    assert_eq!(got.data.len(), big.len());
    assert!(got.data == big, "the big file reads back as packed");
    // A writer that takes bytes only gets them the same.
    assert_eq!(copied.from_files, 0);
    assert!(
        copied.data == big,
        "the big file reads back as packed, copied"
    );
    assert!(
        !tmp.path().join("vmm-cache").exists(),
        "the vmm does not touch the cache"
    );
}
