//! Copy-up of image files into a writable layer (issue 8, finding 9), through the production
//! share (`layered_share`), as the virtio-fs server calls it: the host pays a file's size once
//! (written once, into the layer's work/, then renamed), never outside the layer, all-zero
//! blocks stay holes, the quota is taken before anything is written, the layer holds the whole
//! file or none of it (during the copy, after a failure), and the copy keeps the image file's
//! owner, mode, times and extended attributes.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fuse_backend_rs::api::filesystem::{
    Context, FileSystem, FsOptions, GetxattrReply, ZeroCopyWriter, ROOT_ID,
};
use fuse_backend_rs::common::file_buf::FileVolatileSlice;
use fuse_backend_rs::common::file_traits::FileReadWriteVolatile;

use super::tests::{create_args, lookup, name, on_worker_thread, pack_whole, write_at};
use super::{Guard, Limits};

const MIB: usize = 1 << 20;
/// The image file's owner, mode and modification time (seconds).
const OWNER: (u32, u32) = (1234, 5678);
const MODE: u32 = 0o640;
const MTIME: i64 = 1_000_000_000;

/// An image holding `big` (random bytes: distinct chunks), `zeros` (all zero) and a setuid
/// `tool`, packed into a dir:// store, with a layer and a cache next to it.
struct Fixture {
    tmp: tempfile::TempDir,
    big: Vec<u8>,
    /// The image's `big` carries `user.origin` (when the test's filesystem has user xattrs).
    xattr: bool,
    /// The image's `big` is owned by [`OWNER`] (when the test runs as root).
    owned: bool,
}

fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

impl Fixture {
    fn new(big_len: usize) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("dir")).unwrap();
        let big = random_bytes(big_len, 0x0b16_f11e);
        let file = src.join("dir/big");
        std::fs::write(&file, &big).unwrap();
        // As root (the vmm's usual user); an unprivileged vmm keeps files as its own.
        let owned = std::os::unix::fs::chown(&file, Some(OWNER.0), Some(OWNER.1)).is_ok();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(MODE))
            .unwrap();
        let xattr = xattr_set(&file, "user.origin", b"image");
        let mtime = std::time::UNIX_EPOCH + Duration::from_secs(MTIME as u64);
        File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        std::fs::write(src.join("zeros"), vec![0u8; 8 * MIB]).unwrap();
        std::fs::write(src.join("tool"), b"#!/bin/true\n").unwrap();
        std::fs::set_permissions(
            src.join("tool"),
            std::os::unix::fs::PermissionsExt::from_mode(0o4755),
        )
        .unwrap();
        // Whole chunks: a test holds one back behind a FIFO.
        pack_whole(
            &src,
            &tmp.path().join("img.flist"),
            &tmp.path().join("store"),
        );
        Self {
            tmp,
            big,
            xattr,
            owned,
        }
    }

    fn layer(&self) -> PathBuf {
        self.tmp.path().join("layer")
    }

    fn share(&self, limits: Limits) -> Guard<super::layer::Layer> {
        let fs = super::layered_share(
            "t",
            &self.tmp.path().join("img.flist"),
            &self.layer(),
            limits,
            &self.tmp.path().join("cache"),
        )
        .unwrap();
        fs.init(FsOptions::empty()).unwrap();
        fs
    }

    /// The store files of the chunks of `path` in the image, in file order.
    fn chunk_files(&self, path: &str) -> Vec<PathBuf> {
        let image = flist_fs::meta::read_image(&self.tmp.path().join("img.flist")).unwrap();
        let inode = image.inode(image.resolve(path).unwrap()).unwrap();
        inode
            .chunks
            .iter()
            .map(|c| {
                let hex = c.id.to_hex();
                self.tmp.path().join("store").join(&hex[..2]).join(hex)
            })
            .collect()
    }

    /// Names in `<layer>/<sub>`.
    fn names_in(&self, sub: &str) -> Vec<String> {
        std::fs::read_dir(self.layer().join(sub))
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) -> bool {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: NUL-terminated path and name, a buffer of `value.len()` bytes.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    rc == 0
}

fn xattr_get(path: &Path, name: &str) -> Option<Vec<u8>> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: NUL-terminated path and name, a buffer of `buf.len()` bytes.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

/// Bytes this thread has written with write(2)-family calls so far (task I/O accounting).
fn thread_bytes_written() -> u64 {
    let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A ZeroCopyWriter collecting what FileSystem::read writes.
pub(super) struct VecWriter(pub(super) Vec<u8>);

impl io::Write for VecWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(b);
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
        let mut buf = vec![0u8; count];
        // SAFETY: `buf` outlives the slice, and nothing else touches it meanwhile.
        let slice = unsafe { FileVolatileSlice::from_mut_slice(&mut buf) };
        let n = f.read_at_volatile(slice, off)?;
        self.0.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn available_bytes(&self) -> usize {
        usize::MAX
    }
}

/// The whole file `inode` as the guest reads it.
pub(super) fn read_all<F: FileSystem<Inode = u64, Handle = u64>>(
    fs: &F,
    inode: u64,
) -> io::Result<Vec<u8>> {
    let ctx = Context::default();
    let (handle, _, _) = fs.open(&ctx, inode, libc::O_RDONLY as u32, 0)?;
    let handle = handle.unwrap_or(0);
    let mut out = VecWriter(Vec::new());
    loop {
        let at = out.0.len() as u64;
        let n = fs.read(&ctx, inode, handle, &mut out, MIB as u32, at, None, 0)?;
        if n == 0 {
            break;
        }
    }
    fs.release(&ctx, inode, 0, handle, false, false, None)?;
    Ok(out.0)
}

fn big_inode<F: FileSystem<Inode = u64>>(fs: &F) -> u64 {
    let dir = lookup(fs, ROOT_ID, "dir").unwrap();
    lookup(fs, dir, "big").unwrap()
}

#[test]
fn a_copy_up_writes_the_file_once_inside_the_layer() {
    let fx = Fixture::new(8 * MIB);
    let size = fx.big.len() as u64;
    on_worker_thread(|| {
        let fs = fx.share(Limits::default());
        let big = big_inode(&fs);
        // Every chunk fetched and cached first: what the copy-up writes is then the copy only.
        assert_eq!(read_all(&fs, big).unwrap(), fx.big);
        let before = thread_bytes_written();
        assert_eq!(write_at(&fs, big, 0, 10).unwrap(), 10);
        let written = thread_bytes_written() - before;
        assert!(
            written < size + size / 4,
            "copying up a {size}-byte file wrote {written} bytes (the overlay's own copy-up \
             writes it twice: into a temporary file, then into the layer)"
        );
        let mut want = fx.big.clone();
        want[..10].fill(7);
        assert_eq!(read_all(&fs, big).unwrap(), want);
        // An all-zero file is copied as a hole: the host pays (almost) nothing for it.
        let zeros = lookup(&fs, ROOT_ID, "zeros").unwrap();
        assert_eq!(write_at(&fs, zeros, 0, 1).unwrap(), 1);
    });
    let mut want = fx.big.clone();
    want[..10].fill(7);
    assert_eq!(
        std::fs::read(fx.layer().join("upper/dir/big")).unwrap(),
        want
    );
    let zeros = std::fs::metadata(fx.layer().join("upper/zeros")).unwrap();
    assert_eq!(zeros.len(), 8 * MIB as u64);
    assert!(
        zeros.blocks() * 512 <= 64 << 10,
        "an all-zero 8 MiB file takes {} bytes of the host's disk in the layer",
        zeros.blocks() * 512
    );
    assert_eq!(fx.names_in("work"), Vec::<String>::new());
}

#[test]
fn a_copy_up_past_the_quota_fails_before_writing_and_leaves_the_image_file() {
    let fx = Fixture::new(4 * MIB);
    let limits = Limits {
        max_bytes: Some(MIB as u64),
        max_inodes: None,
    };
    on_worker_thread(|| {
        let fs = fx.share(limits);
        let big = big_inode(&fs);
        assert_eq!(read_all(&fs, big).unwrap(), fx.big);
        let before = thread_bytes_written();
        let err = write_at(&fs, big, 0, 10).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EDQUOT), "{err}");
        let written = thread_bytes_written() - before;
        assert!(
            written < 64 << 10,
            "a copy-up refused by the quota wrote {written} bytes first"
        );
        // The guest still sees the image's file, whole.
        assert_eq!(read_all(&fs, big).unwrap(), fx.big);
        // Nothing of the failed copy is counted: the whole budget is there for new files.
        let (f, ..) = fs
            .create(&Context::default(), ROOT_ID, &name("small"), create_args())
            .unwrap();
        assert_eq!(write_at(&fs, f.inode, 0, MIB - 4096).unwrap(), MIB - 4096);
    });
    assert!(
        !fx.layer().join("upper/dir/big").exists(),
        "a failed copy-up left a partial file in the layer, shadowing the image's"
    );
    assert_eq!(fx.names_in("work"), Vec::<String>::new());
    // The next start (the layer opened again) sees the image's file too.
    on_worker_thread(|| {
        let fs = fx.share(limits);
        assert_eq!(read_all(&fs, big_inode(&fs)).unwrap(), fx.big);
    });
}

#[test]
fn a_copy_up_that_cannot_read_the_image_leaves_nothing_and_gives_the_quota_back() {
    let fx = Fixture::new(4 * MIB);
    let chunks = fx.chunk_files("/dir/big");
    assert!(chunks.len() > 4, "{} chunks", chunks.len());
    let missing = &chunks[chunks.len() / 2];
    let stored = std::fs::read(missing).unwrap();
    std::fs::remove_file(missing).unwrap();
    // Room for one copy of the file: a failed copy that kept its reservation would leave
    // no room for the next.
    let limits = Limits {
        max_bytes: Some(fx.big.len() as u64 + 64 * 1024),
        max_inodes: None,
    };
    on_worker_thread(|| {
        let fs = fx.share(limits);
        let big = big_inode(&fs);
        let err = write_at(&fs, big, 0, 10).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        assert!(
            !fx.layer().join("upper/dir/big").exists(),
            "a failed copy-up left a partial file in the layer, shadowing the image's"
        );
        assert_eq!(fx.names_in("work"), Vec::<String>::new());
        // The store is repaired: the copy-up goes through.
        std::fs::write(missing, &stored).unwrap();
        assert_eq!(write_at(&fs, big, 0, 10).unwrap(), 10);
    });
    let mut want = fx.big.clone();
    want[..10].fill(7);
    assert_eq!(
        std::fs::read(fx.layer().join("upper/dir/big")).unwrap(),
        want
    );
}

#[test]
fn while_a_copy_up_runs_the_layer_holds_no_partial_file() {
    let fx = Fixture::new(4 * MIB);
    let chunks = fx.chunk_files("/dir/big");
    assert!(chunks.len() > 6, "{} chunks", chunks.len());
    // A chunk past the first few comes through a FIFO: the copy stops there until the test
    // feeds it, and the test looks at the layer meanwhile.
    let held = &chunks[5];
    let stored = std::fs::read(held).unwrap();
    std::fs::remove_file(held).unwrap();
    let fifo = std::ffi::CString::new(held.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let result = std::thread::scope(|scope| {
        let copy = scope.spawn(|| {
            on_worker_thread(|| {
                let fs = fx.share(Limits::default());
                let big = big_inode(&fs);
                write_at(&fs, big, 0, 10)
            })
        });
        // Wait for the copy to stop at the FIFO with some of the file staged.
        let deadline = Instant::now() + Duration::from_secs(60);
        let staged = loop {
            let staged: Vec<u64> = std::fs::read_dir(fx.layer().join("work"))
                .map(|rd| {
                    rd.filter_map(|e| e.ok()?.metadata().ok())
                        .map(|m| m.len())
                        .collect()
                })
                .unwrap_or_default();
            if staged.iter().any(|&len| len > 0) || Instant::now() > deadline {
                break staged;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let upper_file = fx.layer().join("upper/dir/big");
        let partial_in_layer = upper_file.exists();
        feed_fifo(held, &stored);
        let result = copy.join().unwrap();
        assert!(
            staged
                .iter()
                .any(|&len| len > 0 && len < fx.big.len() as u64),
            "the copy-up staged nothing in the layer's work/ ({staged:?})"
        );
        assert!(
            !partial_in_layer,
            "while the copy ran, the layer held a partial dir/big"
        );
        result
    });
    assert_eq!(result.unwrap(), 10);
    let mut want = fx.big.clone();
    want[..10].fill(7);
    assert_eq!(
        std::fs::read(fx.layer().join("upper/dir/big")).unwrap(),
        want
    );
    assert_eq!(fx.names_in("work"), Vec::<String>::new());
}

/// Writes `bytes` into the FIFO at `path` once a reader has it open, and closes it.
fn feed_fifo(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    assert!(std::fs::metadata(path).unwrap().file_type().is_fifo());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut fifo = loop {
        match File::options()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => break f,
            // No reader yet.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("nobody reads the FIFO: {e}"),
        }
    };
    // SAFETY: F_SETFL with plain flags on an open descriptor (blocking writes from here).
    assert_eq!(
        unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&fifo), libc::F_SETFL, 0) },
        0
    );
    fifo.write_all(bytes).unwrap();
}

#[test]
fn a_copy_up_keeps_the_image_files_owner_mode_times_and_xattrs() {
    let fx = Fixture::new(MIB);
    on_worker_thread(|| {
        let fs = fx.share(Limits::default());
        let ctx = Context::default();
        let big = big_inode(&fs);
        // Opening for writing copies up; nothing is written.
        let (handle, _, _) = fs.open(&ctx, big, libc::O_WRONLY as u32, 0).unwrap();
        fs.release(&ctx, big, 0, handle.unwrap_or(0), false, false, None)
            .unwrap();
        if fx.xattr {
            let got = fs.getxattr(&ctx, big, &name("user.origin"), 64);
            assert!(
                matches!(&got, Ok(GetxattrReply::Value(v)) if v == b"image"),
                "the guest lost the file's xattr in the copy-up: {:?}",
                got.err()
            );
        }
        let tool = lookup(&fs, ROOT_ID, "tool").unwrap();
        let (handle, _, _) = fs.open(&ctx, tool, libc::O_WRONLY as u32, 0).unwrap();
        fs.release(&ctx, tool, 0, handle.unwrap_or(0), false, false, None)
            .unwrap();
    });
    let copied = fx.layer().join("upper/dir/big");
    let meta = std::fs::metadata(&copied).unwrap();
    assert_eq!(std::fs::read(&copied).unwrap(), fx.big);
    if fx.owned {
        assert_eq!((meta.uid(), meta.gid()), OWNER);
    }
    assert_eq!(meta.mode() & 0o7777, MODE);
    assert_eq!(meta.mtime(), MTIME);
    if fx.xattr {
        assert_eq!(
            xattr_get(&copied, "user.gridnode.user.origin").as_deref(),
            Some(&b"image"[..])
        );
    }
    // Setuid never reaches the host.
    let tool = std::fs::metadata(fx.layer().join("upper/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o755);
}
