//! Host FUSE mount (root + /dev/fuse): mount an image, compare the tree and contents with the
//! source, read xattrs, check EIO on a corrupt chunk, unmount.

mod common;

use common::*;
use flist_fs::fs::FlistFs;
use flist_fs::open::OpenOptions;
use flist_fs::pack::{pack, PackOptions};
use flist_fs::store::Router;
use std::io::Read;

fn fuse_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root && std::path::Path::new("/dev/fuse").exists() {
        return true;
    }
    if std::env::var("FLIST_SKIP_FUSE").as_deref() == Ok("1") {
        eprintln!("skipping FUSE test: needs root and /dev/fuse");
        return false;
    }
    panic!("the FUSE mount test needs root and /dev/fuse (apt-get install fuse3); set FLIST_SKIP_FUSE=1 to skip");
}

#[test]
fn mount_read_compare_unmount() {
    if !fuse_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    sample_tree(&src);
    std::fs::write(src.join("victim"), pseudo_random(300_000, 77)).unwrap();
    let store_dir = t.path().join("store");
    let store = format!("dir://{}", store_dir.display());
    let img = t.path().join("img.flist");
    pack(
        &src,
        &img,
        &Router::from_specs(&[store]).unwrap(),
        &PackOptions::default(),
    )
    .unwrap();

    let opts = OpenOptions {
        cache_dir: Some(t.path().join("cache")),
        ..OpenOptions::default()
    };
    let fs = FlistFs::open(&img, &opts).unwrap();
    let victim_id = {
        let im = fs.image();
        im.inode(im.resolve("/victim").unwrap()).unwrap().chunks[0]
            .id
            .to_hex()
    };
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = flist_fs::fs::mount::mount(fs, &mnt, 2).unwrap();

    // Corrupt the victim's only chunk before anything reads it: reads must fail with EIO.
    let p = store_dir.join(&victim_id[..2]).join(&victim_id);
    std::fs::write(&p, b"corrupt").unwrap();
    let mut f = std::fs::File::open(mnt.join("victim")).unwrap();
    let mut buf = Vec::new();
    let err = f.read_to_end(&mut buf).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    std::fs::remove_file(src.join("victim")).unwrap();
    std::fs::remove_file(&p).unwrap();

    let result = std::panic::catch_unwind(|| {
        // Compare everything except the victim.
        let listing: Vec<_> = std::fs::read_dir(&mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(listing.iter().any(|n| n == "victim"));
        for name in ["small.txt", "empty", "abs-link", "fifo", "ro"] {
            assert!(
                listing.iter().any(|n| n == name),
                "{name} missing from mount"
            );
        }
        let sub = std::fs::read(mnt.join("sub/big.bin")).unwrap();
        assert!(sub == std::fs::read(src.join("sub/big.bin")).unwrap());
        assert_same_tree(&src.join("sub"), &mnt.join("sub"));
        assert_eq!(
            std::fs::read_link(mnt.join("abs-link")).unwrap(),
            std::path::Path::new("/etc/passwd")
        );
        if let Ok(Some(v)) = xattr::get(src.join("small.txt"), "user.flist") {
            assert_eq!(
                xattr::get(mnt.join("small.txt"), "user.flist").unwrap(),
                Some(v)
            );
        }
        // Random-offset read.
        let mut f = std::fs::File::open(mnt.join("sub/big.bin")).unwrap();
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(2_000_000)).unwrap();
        let mut b = [0u8; 4096];
        f.read_exact(&mut b).unwrap();
        assert!(b[..] == sub[2_000_000..2_004_096]);
        assert!(std::fs::write(mnt.join("new"), b"x").is_err());
        let st = nix_statvfs(&mnt);
        assert!(st > 0);
    });
    mounted.unmount().unwrap();
    assert!(
        std::fs::read_dir(&mnt).unwrap().next().is_none(),
        "still mounted"
    );
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn nix_statvfs(p: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: zeroed statvfs is valid; c is a valid path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_blocks
}

fn is_mounted(p: &std::path::Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let p = p.to_str().unwrap();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(p))
}

#[test]
fn cli_mount_serves_until_interrupted() {
    if !fuse_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("hello"), b"from the cli mount").unwrap();
    let img = t.path().join("img.flist");
    let store = format!("dir://{}", t.path().join("store").display());
    pack(
        &src,
        &img,
        &Router::from_specs(&[store]).unwrap(),
        &PackOptions::default(),
    )
    .unwrap();
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mnt = mnt.canonicalize().unwrap();
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_flist"))
            .arg("mount")
            .arg(&img)
            .arg(&mnt)
            .arg("--no-cache")
            .spawn()
            .unwrap(),
    );
    for _ in 0..100 {
        if is_mounted(&mnt) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        is_mounted(&mnt),
        "flist mount did not mount {}",
        mnt.display()
    );
    assert_eq!(
        std::fs::read(mnt.join("hello")).unwrap(),
        b"from the cli mount"
    );
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGINT) };
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!is_mounted(&mnt));
}

/// `lseek(fd, offset, whence)`, or the errno.
fn seek(f: &std::fs::File, offset: u64, whence: i32) -> Result<u64, i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor.
    let at = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, whence) };
    if at < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(at as u64)
    }
}

/// A 4 GiB file with 1 MiB of data at 1 MiB and 64 KiB at 3 GiB: holes before, between and
/// after. It packs to its data only, unpacks sparse, and the mount reports its blocks and
/// answers SEEK_DATA/SEEK_HOLE.
#[test]
fn sparse_files_keep_their_holes() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    const GIB: u64 = 1 << 30;
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let sparse = std::fs::File::create(src.join("sparse")).unwrap();
    sparse.set_len(4 * GIB).unwrap();
    sparse
        .write_all_at(&pseudo_random(1 << 20, 3), 1 << 20)
        .unwrap();
    sparse
        .write_all_at(&pseudo_random(64 << 10, 5), 3 * GIB)
        .unwrap();
    sparse.sync_all().unwrap();
    drop(sparse);
    let data_at = |f: &std::fs::File| seek(f, 0, libc::SEEK_DATA);
    let probe = std::fs::File::open(src.join("sparse")).unwrap();
    if data_at(&probe) != Ok(1 << 20) {
        eprintln!("skipping: the temporary directory's filesystem does not report holes");
        return;
    }
    let store_dir = t.path().join("store");
    let img = t.path().join("img.flist");
    let stats = pack(
        &src,
        &img,
        &Router::from_specs(&[format!("dir://{}", store_dir.display())]).unwrap(),
        &PackOptions::default(),
    )
    .unwrap();
    assert_eq!(
        stats.bytes,
        (1 << 20) + (64 << 10),
        "only the data is packed"
    );

    // Unpacked: same bytes where there is data, holes elsewhere.
    let opts = OpenOptions {
        cache_dir: Some(t.path().join("cache")),
        ..OpenOptions::default()
    };
    let (image, source) = flist_fs::open::open_image(&img, &opts).unwrap();
    let out = t.path().join("out");
    flist_fs::unpack::unpack(&image, &source, &out, &Default::default()).unwrap();
    let check = |f: &std::fs::File, what: &str| {
        let md = f.metadata().unwrap();
        assert_eq!(md.len(), 4 * GIB, "{what}");
        assert!(
            md.blocks() * 512 < 4 << 20,
            "{what}: {} blocks",
            md.blocks()
        );
        let mut buf = vec![0u8; 1 << 20];
        f.read_exact_at(&mut buf, 1 << 20).unwrap();
        assert!(buf == pseudo_random(1 << 20, 3), "{what}: first data");
        let mut buf = vec![0u8; 64 << 10];
        f.read_exact_at(&mut buf, 3 * GIB).unwrap();
        assert!(buf == pseudo_random(64 << 10, 5), "{what}: second data");
        let mut buf = vec![1u8; 4096];
        f.read_exact_at(&mut buf, 2 * GIB).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "{what}: a hole reads as zeros");
        f.read_exact_at(&mut buf, 4 * GIB - 4096).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "{what}: the tail hole reads as zeros"
        );
        assert_eq!(seek(f, 0, libc::SEEK_DATA), Ok(1 << 20), "{what}");
        assert_eq!(seek(f, 1 << 20, libc::SEEK_HOLE), Ok(2 << 20), "{what}");
        assert_eq!(seek(f, 2 << 20, libc::SEEK_DATA), Ok(3 * GIB), "{what}");
        assert_eq!(
            seek(f, 3 * GIB, libc::SEEK_HOLE),
            Ok(3 * GIB + (64 << 10)),
            "{what}"
        );
        assert_eq!(
            seek(f, 3 * GIB + (64 << 10), libc::SEEK_DATA),
            Err(libc::ENXIO),
            "{what}"
        );
    };
    check(
        &std::fs::File::open(out.join("sparse")).unwrap(),
        "unpacked",
    );

    if !fuse_available() {
        return;
    }
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = flist_fs::fs::mount::mount(FlistFs::open(&img, &opts).unwrap(), &mnt, 2).unwrap();
    let result = std::panic::catch_unwind(|| {
        check(&std::fs::File::open(mnt.join("sparse")).unwrap(), "mounted");
    });
    mounted.unmount().unwrap();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// Voluntary context switches of this process's threads named `flist-fuse-*` (the mount's
/// serving threads): each is one sleep, so one wakeup.
fn serving_thread_wakeups() -> (usize, u64) {
    let mut threads = 0;
    let mut switches = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with("flist-fuse-") {
            continue;
        }
        threads += 1;
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        switches += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    (threads, switches)
}

#[test]
fn a_request_wakes_one_serving_thread() {
    if !fuse_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    sample_tree(&src);
    let store_dir = t.path().join("store");
    let img = t.path().join("img.flist");
    pack(
        &src,
        &img,
        &Router::from_specs(&[format!("dir://{}", store_dir.display())]).unwrap(),
        &PackOptions::default(),
    )
    .unwrap();
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let fs = FlistFs::open(&img, &OpenOptions::default()).unwrap();
    let mounted = flist_fs::fs::mount::mount(fs, &mnt, 4).unwrap();
    let file = mnt.join("small.txt");
    drop(std::fs::File::open(&file).unwrap());

    // One request at a time: each open and close is a few requests (OPEN, FLUSH, RELEASE,
    // and any lookups), each of which should wake one idle thread. Threads that all wake for
    // every request (the herd) would switch about 4 times per request.
    let iterations = 300u64;
    let (threads, before) = serving_thread_wakeups();
    assert_eq!(threads, 4);
    for _ in 0..iterations {
        drop(std::fs::File::open(&file).unwrap());
    }
    let (_, after) = serving_thread_wakeups();
    mounted.unmount().unwrap();
    let per_open = (after - before) as f64 / iterations as f64;
    println!("serving-thread wakeups per open and close: {per_open:.2}");
    assert!(
        per_open < 4.0,
        "{per_open:.2} wakeups of the 4 serving threads per open and close"
    );
}
