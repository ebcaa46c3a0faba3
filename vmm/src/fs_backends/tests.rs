//! The share backends at the FileSystem level, as the virtio-fs server calls them: an image
//! under a writable layer (copy-up, whiteouts, rename, persistence), a read-only image, and
//! the guard in front of every share (names longer than NAME_MAX).

use std::ffi::CString;
use std::path::Path;

use fuse_backend_rs::abi::fuse_abi::{stat64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, FileSystem, FsOptions, GetxattrReply, ListxattrReply, SetattrValid, ROOT_ID,
};

use crate::config::FsSpec;

pub(super) fn pack(dir: &Path, image: &Path, store: &Path) {
    pack_with(dir, image, store, flist_fs::pack::PackOptions::default());
}

/// [`pack`] with whole chunks (format 1): for a test that holds a chunk back behind a FIFO,
/// which the ranged reads of blocked chunks cannot seek in.
pub(super) fn pack_whole(dir: &Path, image: &Path, store: &Path) {
    let opts = flist_fs::pack::PackOptions {
        block_size: 0,
        ..Default::default()
    };
    pack_with(dir, image, store, opts);
}

fn pack_with(dir: &Path, image: &Path, store: &Path, opts: flist_fs::pack::PackOptions) {
    let router =
        flist_fs::store::Router::from_specs(&[format!("dir://{}", store.display())]).unwrap();
    flist_fs::pack::pack(dir, image, &router, &opts).unwrap();
}

struct Fixture {
    tmp: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::write(src.join("bin/busybox"), b"#!fake busybox\n").unwrap();
        std::os::unix::fs::symlink("busybox", src.join("bin/sh")).unwrap();
        std::fs::write(src.join("etc/version"), b"image-v1\n").unwrap();
        std::fs::write(src.join("etc/doomed"), b"doomed\n").unwrap();
        pack(
            &src,
            &tmp.path().join("img.flist"),
            &tmp.path().join("store"),
        );
        Self { tmp }
    }

    fn share(&self, layer: bool) -> FsSpec {
        let image = self.tmp.path().join("img.flist");
        if layer {
            FsSpec::layered_image("t", image, self.tmp.path().join("layer"))
        } else {
            FsSpec::image("t", image)
        }
    }
}

pub(super) fn name(s: &str) -> CString {
    CString::new(s).unwrap()
}

pub(super) fn lookup<F: FileSystem<Inode = u64>>(
    fs: &F,
    parent: u64,
    n: &str,
) -> std::io::Result<u64> {
    fs.lookup(&Context::default(), parent, &name(n))
        .map(|e| e.inode)
}

#[test]
fn image_under_a_writable_layer() {
    image_under_a_writable_layer_with(false);
}

#[test]
fn image_under_a_writable_layer_under_seccomp() {
    std::thread::spawn(|| image_under_a_writable_layer_with(true))
        .join()
        .unwrap();
}

fn image_under_a_writable_layer_with(seccomp: bool) {
    let fx = Fixture::new();
    let cache = fx.tmp.path().join("cache");
    let fs = super::layered_share(
        "t",
        &fx.tmp.path().join("img.flist"),
        &fx.tmp.path().join("layer"),
        Default::default(),
        &cache,
    )
    .unwrap();
    if seccomp {
        crate::seccomp::install_violation_handler().unwrap();
        crate::seccomp::apply_to_current_thread(&crate::seccomp::fs_worker_filter().unwrap())
            .unwrap();
    }
    fs.init(FsOptions::empty()).unwrap();
    let ctx = Context::default();
    // What guest-init does first: create the mount points the image lacks.
    fs.mkdir(&ctx, ROOT_ID, &name("sys"), 0o755, 0).unwrap();
    let bin = lookup(&fs, ROOT_ID, "bin").unwrap();
    let sh = lookup(&fs, bin, "sh").unwrap();
    assert_eq!(fs.readlink(&ctx, sh).unwrap(), b"busybox");
    let busybox = lookup(&fs, bin, "busybox").unwrap();
    let (handle, _, _) = fs.open(&ctx, busybox, libc::O_RDONLY as u32, 0).unwrap();
    let (attr, _) = fs.getattr(&ctx, busybox, handle).unwrap();
    assert_eq!(attr.st_size, 15);

    let etc = lookup(&fs, ROOT_ID, "etc").unwrap();
    fs.unlink(&ctx, etc, &name("doomed")).unwrap();
    assert!(lookup(&fs, etc, "doomed").is_err());
    let args = CreateIn {
        flags: libc::O_WRONLY as u32,
        mode: 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    fs.create(&ctx, etc, &name("written"), args).unwrap();
    assert!(fx.tmp.path().join("layer/upper/etc/written").exists());
    assert!(lookup(&fs, etc, "written").is_ok());
    // A copy-up (the vmm's own: staged in work/, attributes set, renamed into upper/).
    let version = lookup(&fs, etc, "version").unwrap();
    assert_eq!(write_at(&fs, version, 6, 2).unwrap(), 2);
    assert_eq!(
        std::fs::read(fx.tmp.path().join("layer/upper/etc/version")).unwrap(),
        b"image-\x07\x07\n"
    );
}

#[test]
fn image_without_a_layer_is_read_only() {
    let fx = Fixture::new();
    let dev = super::device_for(&fx.share(false), Some(&fx.tmp.path().join("cache")));
    assert!(dev.is_ok());
    let fs = super::image_share(
        "t",
        &fx.tmp.path().join("img.flist"),
        &fx.tmp.path().join("cache"),
    )
    .unwrap();
    fs.init(FsOptions::empty()).unwrap();
    let etc = lookup(&fs, ROOT_ID, "etc").unwrap();
    let args = CreateIn {
        flags: libc::O_WRONLY as u32,
        mode: 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let err = fs
        .create(&Context::default(), etc, &name("x"), args)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
}

fn guarded_dir(
    dir: &Path,
    readonly: bool,
) -> super::Guard<fuse_backend_rs::passthrough::PassthroughFs> {
    let fs = super::dir_share("t", dir, readonly, Default::default()).unwrap();
    fs.init(FsOptions::empty()).unwrap();
    fs
}

pub(super) fn create_args() -> CreateIn {
    CreateIn {
        flags: libc::O_WRONLY as u32,
        mode: 0o644,
        umask: 0,
        fuse_flags: 0,
    }
}

/// Every request that carries a directory-entry name answers `errno` for `long`.
fn assert_every_name_request_fails<F: FileSystem<Inode = u64>>(
    fs: &F,
    file: u64,
    long: &str,
    errno: i32,
) {
    let ctx = Context::default();
    let long = name(long);
    let short = name("f");
    let errno_of = |r: std::io::Result<()>| r.unwrap_err().raw_os_error();
    assert_eq!(
        errno_of(fs.lookup(&ctx, ROOT_ID, &long).map(drop)),
        Some(errno),
        "lookup"
    );
    assert_eq!(
        errno_of(fs.create(&ctx, ROOT_ID, &long, create_args()).map(drop)),
        Some(errno),
        "create"
    );
    assert_eq!(
        errno_of(fs.mkdir(&ctx, ROOT_ID, &long, 0o755, 0).map(drop)),
        Some(errno),
        "mkdir"
    );
    assert_eq!(
        errno_of(
            fs.mknod(&ctx, ROOT_ID, &long, libc::S_IFREG | 0o644, 0, 0)
                .map(drop)
        ),
        Some(errno),
        "mknod"
    );
    assert_eq!(
        errno_of(fs.symlink(&ctx, &name("f"), ROOT_ID, &long).map(drop)),
        Some(errno),
        "symlink"
    );
    assert_eq!(
        errno_of(fs.link(&ctx, file, ROOT_ID, &long).map(drop)),
        Some(errno),
        "link"
    );
    assert_eq!(
        errno_of(fs.rename(&ctx, ROOT_ID, &long, ROOT_ID, &name("g"), 0)),
        Some(errno),
        "rename source"
    );
    assert_eq!(
        errno_of(fs.rename(&ctx, ROOT_ID, &short, ROOT_ID, &long, 0)),
        Some(errno),
        "rename target"
    );
    assert_eq!(
        errno_of(fs.unlink(&ctx, ROOT_ID, &long)),
        Some(errno),
        "unlink"
    );
    assert_eq!(
        errno_of(fs.rmdir(&ctx, ROOT_ID, &long)),
        Some(errno),
        "rmdir"
    );
}

#[test]
fn a_name_longer_than_name_max_is_too_long() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("f"), b"f\n").unwrap();
    let fs = guarded_dir(tmp.path(), false);
    let file = lookup(&fs, ROOT_ID, "f").unwrap();
    assert_every_name_request_fails(&fs, file, &"n".repeat(256), libc::ENAMETOOLONG);
    // Nothing was made, and the file is still there under its name.
    let mut left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(left, ["f"]);

    // NAME_MAX itself is a name.
    let longest = "n".repeat(255);
    fs.create(&Context::default(), ROOT_ID, &name(&longest), create_args())
        .unwrap();
    assert!(lookup(&fs, ROOT_ID, &longest).is_ok());
    assert!(tmp.path().join(&longest).exists());
}

#[test]
fn a_read_only_share_says_too_long_before_read_only() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("f"), b"f\n").unwrap();
    let fs = guarded_dir(tmp.path(), true);
    let file = lookup(&fs, ROOT_ID, "f").unwrap();
    assert_every_name_request_fails(&fs, file, &"n".repeat(256), libc::ENAMETOOLONG);
    // A name that fits meets the read-only policy, as before.
    let err = fs
        .create(
            &Context::default(),
            ROOT_ID,
            &name(&"n".repeat(255)),
            create_args(),
        )
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let statfs = fs.statfs(&Context::default(), ROOT_ID).unwrap();
    assert_ne!(statfs.f_flag & libc::ST_RDONLY, 0);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn a_writable_share_is_not_reported_read_only() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = guarded_dir(tmp.path(), false);
    let statfs = fs.statfs(&Context::default(), ROOT_ID).unwrap();
    assert_eq!(statfs.f_flag & libc::ST_RDONLY, 0);
    fs.mkdir(&Context::default(), ROOT_ID, &name("d"), 0o755, 0)
        .unwrap();
    assert!(tmp.path().join("d").is_dir());
}

fn guarded_overlay(fx: &Fixture) -> super::Guard<super::layer::Layer> {
    let cache = fx.tmp.path().join("cache");
    let fs = super::layered_share(
        "t",
        &fx.tmp.path().join("img.flist"),
        &fx.tmp.path().join("layer"),
        Default::default(),
        &cache,
    )
    .unwrap();
    fs.init(FsOptions::empty()).unwrap();
    fs
}

#[test]
fn a_directory_does_not_replace_one_with_entries_in_the_image() {
    let fx = Fixture::new();
    let fs = guarded_overlay(&fx);
    let ctx = Context::default();
    fs.mkdir(&ctx, ROOT_ID, &name("new"), 0o755, 0).unwrap();
    // `etc` has entries only in the image (none in the layer).
    let err = fs
        .rename(&ctx, ROOT_ID, &name("new"), ROOT_ID, &name("etc"), 0)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY));
    assert!(lookup(&fs, lookup(&fs, ROOT_ID, "etc").unwrap(), "version").is_ok());
    // Onto an empty directory it moves; a file onto a directory is the backend's answer.
    fs.mkdir(&ctx, ROOT_ID, &name("empty"), 0o755, 0).unwrap();
    fs.rename(&ctx, ROOT_ID, &name("new"), ROOT_ID, &name("empty"), 0)
        .unwrap();
    assert!(lookup(&fs, ROOT_ID, "new").is_err());
    let etc = lookup(&fs, ROOT_ID, "etc").unwrap();
    let err = fs
        .rename(&ctx, etc, &name("version"), ROOT_ID, &name("bin"), 0)
        .unwrap_err();
    assert_ne!(err.raw_os_error(), Some(libc::ENOTEMPTY));
}

#[test]
fn the_overlay_behind_the_guard_says_too_long() {
    let fx = Fixture::new();
    let fs = guarded_overlay(&fx);
    let etc = lookup(&fs, ROOT_ID, "etc").unwrap();
    let version = lookup(&fs, etc, "version").unwrap();
    assert_every_name_request_fails(&fs, version, &"n".repeat(256), libc::ENAMETOOLONG);
}

#[test]
fn every_share_offers_large_and_overlapping_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let transport = FsOptions::MAX_PAGES
        | FsOptions::BIG_WRITES
        | FsOptions::ASYNC_READ
        | FsOptions::PARALLEL_DIROPS;
    for readonly in [false, true] {
        let fs = super::dir_share("t", tmp.path(), readonly, Default::default()).unwrap();
        let offered = fs.init(FsOptions::all()).unwrap();
        assert!(offered.contains(transport), "{offered:?}");
        assert!(!offered.contains(FsOptions::WRITEBACK_CACHE));
        // Nothing is offered that the guest did not say it can do.
        let offered = fs.init(FsOptions::ASYNC_READ).unwrap();
        assert!(!offered.contains(FsOptions::MAX_PAGES), "{offered:?}");
    }
}

/// Runs `f` on a thread set up as a virtio-fs worker's (its own umask 0), as requests are.
pub(super) fn on_worker_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                crate::devices::virtio::fs::enter_fs_context().unwrap();
                f()
            })
            .join()
            .unwrap()
    })
}

fn host_mode(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).unwrap().mode()
}

/// The guest cannot make device nodes on the host; FIFOs and the overlay's 0:0 whiteout are fine.
/// A guest's device node is refused (a directory share), or `emulated`: made as a plain file
/// on the host that the guest sees as the device (a writable layer).
fn assert_no_device_nodes<F: FileSystem<Inode = u64>>(
    fs: &F,
    parent: u64,
    host_dir: &Path,
    emulated: bool,
) {
    let ctx = Context::default();
    let sda = libc::makedev(8, 0) as u32;
    let mem = libc::makedev(1, 1) as u32;
    for (n, mode, rdev) in [
        ("blk", libc::S_IFBLK | 0o660, sda),
        ("chr", libc::S_IFCHR | 0o666, mem),
    ] {
        let made = fs.mknod(&ctx, parent, &name(n), mode, rdev, 0);
        if emulated {
            let e = made.unwrap();
            assert_eq!(
                (e.attr.st_mode, e.attr.st_rdev),
                (mode, u64::from(rdev)),
                "{n}"
            );
            let host = std::fs::symlink_metadata(host_dir.join(n)).unwrap();
            assert!(host.file_type().is_file(), "{n}");
        } else {
            assert_eq!(made.unwrap_err().raw_os_error(), Some(libc::EPERM), "{n}");
            assert!(std::fs::symlink_metadata(host_dir.join(n)).is_err(), "{n}");
        }
    }
    fs.mknod(&ctx, parent, &name("fifo"), libc::S_IFIFO | 0o644, 0, 0)
        .unwrap();
    assert_eq!(
        host_mode(&host_dir.join("fifo")) & libc::S_IFMT,
        libc::S_IFIFO
    );
}

/// setuid and setgid never reach the host (a directory keeps setgid: group inheritance).
fn assert_no_setuid_files<F: FileSystem<Inode = u64>>(fs: &F, parent: u64, host_dir: &Path) {
    let ctx = Context::default();
    let args = CreateIn {
        flags: libc::O_WRONLY as u32,
        mode: libc::S_IFREG | 0o6755,
        umask: 0,
        fuse_flags: 0,
    };
    let (entry, ..) = fs.create(&ctx, parent, &name("suid"), args).unwrap();
    assert_eq!(host_mode(&host_dir.join("suid")) & 0o7777, 0o755);
    // chmod u+s,g+s
    let mut attr: stat64 = unsafe { std::mem::zeroed() };
    attr.st_mode = libc::S_IFREG | 0o6711;
    fs.setattr(&ctx, entry.inode, attr, None, SetattrValid::MODE)
        .unwrap();
    assert_eq!(host_mode(&host_dir.join("suid")) & 0o7777, 0o711);
    // chmod with only permission bits given (no file type), as some kernels send it.
    attr.st_mode = 0o6700;
    fs.setattr(&ctx, entry.inode, attr, None, SetattrValid::MODE)
        .unwrap();
    assert_eq!(host_mode(&host_dir.join("suid")) & 0o7777, 0o700);
    fs.mknod(&ctx, parent, &name("suid2"), libc::S_IFREG | 0o4755, 0, 0)
        .unwrap();
    assert_eq!(host_mode(&host_dir.join("suid2")) & 0o7777, 0o755);
    let dir = fs
        .mkdir(&ctx, parent, &name("sgid-dir"), 0o6775, 0)
        .unwrap();
    // (Linux's mkdir takes setgid from the parent directory, not from the mode.)
    assert_eq!(host_mode(&host_dir.join("sgid-dir")) & 0o7777, 0o775);
    attr.st_mode = 0o6777;
    fs.setattr(&ctx, dir.inode, attr, None, SetattrValid::MODE)
        .unwrap();
    assert_eq!(host_mode(&host_dir.join("sgid-dir")) & 0o7777, 0o2777);
}

/// Guest attributes live under `user.gridnode.` on the host; the guest sees only those.
fn assert_xattrs_are_mapped<F: FileSystem<Inode = u64>>(fs: &F, parent: u64, host_dir: &Path) {
    let ctx = Context::default();
    let args = CreateIn {
        flags: libc::O_WRONLY as u32,
        mode: 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let (entry, ..) = fs.create(&ctx, parent, &name("capped"), args).unwrap();
    let ino = entry.inode;
    // A file capability a guest binary would carry (VFS_CAP_REVISION_2, cap_sys_admin).
    let cap = [
        0u8, 0, 0, 2, 0, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    fs.setxattr(&ctx, ino, &name("security.capability"), &cap, 0)
        .unwrap();
    fs.setxattr(&ctx, ino, &name("trusted.overlay.opaque"), b"y", 0)
        .unwrap();
    fs.setxattr(&ctx, ino, &name("user.note"), b"hi", 0)
        .unwrap();
    let host = host_dir.join("capped");
    assert!(xattr::get(&host, "security.capability").unwrap().is_none());
    assert!(xattr::get(&host, "trusted.overlay.opaque")
        .unwrap()
        .is_none());
    assert_eq!(
        xattr::get(&host, "user.gridnode.security.capability")
            .unwrap()
            .as_deref(),
        Some(&cap[..])
    );
    // The guest reads back its own names...
    match fs
        .getxattr(&ctx, ino, &name("security.capability"), 64)
        .unwrap()
    {
        GetxattrReply::Value(v) => assert_eq!(v, cap),
        GetxattrReply::Count(_) => panic!("asked for the value"),
    }
    // ...and lists only those, even when the host file has others.
    xattr::set(&host, "user.host-only", b"x").unwrap();
    let err = fs
        .getxattr(&ctx, ino, &name("host-only"), 64)
        .err()
        .unwrap();
    assert_eq!(err.raw_os_error(), Some(libc::ENODATA));
    let mut listed = match fs.listxattr(&ctx, ino, 4096).unwrap() {
        ListxattrReply::Names(names) => names
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect::<Vec<_>>(),
        ListxattrReply::Count(_) => panic!("asked for the names"),
    };
    listed.sort();
    assert_eq!(
        listed,
        ["security.capability", "trusted.overlay.opaque", "user.note"]
    );
    match fs.listxattr(&ctx, ino, 0).unwrap() {
        ListxattrReply::Count(n) => assert_eq!(
            n as usize,
            "security.capability\0trusted.overlay.opaque\0user.note\0".len()
        ),
        ListxattrReply::Names(_) => panic!("asked for the size"),
    }
    let err = fs.listxattr(&ctx, ino, 8).err().unwrap();
    assert_eq!(err.raw_os_error(), Some(libc::ERANGE));
    fs.removexattr(&ctx, ino, &name("security.capability"))
        .unwrap();
    assert!(xattr::get(&host, "user.gridnode.security.capability")
        .unwrap()
        .is_none());
}

#[test]
fn a_dir_share_makes_no_privileged_host_objects() {
    let tmp = tempfile::tempdir().unwrap();
    on_worker_thread(|| {
        let fs = guarded_dir(tmp.path(), false);
        assert_no_device_nodes(&fs, ROOT_ID, tmp.path(), false);
        assert_no_setuid_files(&fs, ROOT_ID, tmp.path());
        assert_xattrs_are_mapped(&fs, ROOT_ID, tmp.path());
    });
}

#[test]
fn a_writable_layer_makes_no_privileged_host_objects() {
    let fx = Fixture::new();
    let layer = fx.tmp.path().join("layer");
    on_worker_thread(|| {
        let fs = guarded_overlay(&fx);
        let etc = lookup(&fs, ROOT_ID, "etc").unwrap();
        let upper = layer.join("upper");
        assert_no_device_nodes(&fs, etc, &upper.join("etc"), true);
        assert_no_setuid_files(&fs, etc, &upper.join("etc"));
        assert_xattrs_are_mapped(&fs, etc, &upper.join("etc"));
        // A file of the image, copied up by a change of its attributes, is mapped the same way.
        let ctx = Context::default();
        let version = lookup(&fs, etc, "version").unwrap();
        fs.setxattr(&ctx, version, &name("security.capability"), b"c", 0)
            .unwrap();
        let host = layer.join("upper/etc/version");
        assert!(xattr::get(&host, "security.capability").unwrap().is_none());
        assert_eq!(
            xattr::get(&host, "user.gridnode.security.capability")
                .unwrap()
                .as_deref(),
            Some(&b"c"[..])
        );
        // Deleting a file of the image still leaves the overlay's whiteout.
        fs.unlink(&ctx, etc, &name("doomed")).unwrap();
        assert!(lookup(&fs, etc, "doomed").is_err());
    });
    // The layer directory the vmm made is private to its owner.
    for dir in [layer.clone(), layer.join("work")] {
        assert_eq!(host_mode(&dir) & 0o7777, 0o700, "{}", dir.display());
    }
    // The guest's root in the layer keeps the image root's mode: other guest users may still
    // enter it (the 0700 layer directory above keeps host users out).
    let image_root = host_mode(&fx.tmp.path().join("src")) & 0o7777;
    assert_ne!(image_root, 0o700);
    assert_eq!(host_mode(&layer.join("upper")) & 0o7777, image_root);
}

#[test]
fn guest_modes_apply_exactly_on_a_worker_thread() {
    let tmp = tempfile::tempdir().unwrap();
    on_worker_thread(|| {
        let fs = guarded_dir(tmp.path(), false);
        let args = CreateIn {
            flags: libc::O_WRONLY as u32,
            mode: 0o777,
            umask: 0,
            fuse_flags: 0,
        };
        fs.create(&Context::default(), ROOT_ID, &name("x"), args)
            .unwrap();
    });
    assert_eq!(host_mode(&tmp.path().join("x")) & 0o7777, 0o777);
}

/// The umask of the process (its main thread's filesystem context), read without changing it.
fn process_umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .unwrap();
    u32::from_str_radix(line.trim(), 8).unwrap()
}

#[test]
fn building_shares_leaves_the_process_umask_alone() {
    let before = process_umask();
    assert_ne!(before, 0, "run the tests with a umask (e.g. 022)");
    let fx = Fixture::new();
    let share = guarded_overlay(&fx);
    let dir = guarded_dir(fx.tmp.path(), true);
    assert_eq!(process_umask(), before);
    drop((share, dir));
}

#[test]
fn a_share_path_through_a_symlink_is_refused() {
    let fx = Fixture::new();
    let real = fx.tmp.path().join("real");
    std::fs::create_dir_all(&real).unwrap();
    std::os::unix::fs::symlink(&real, fx.tmp.path().join("link")).unwrap();
    let err = super::dir_share("t", &fx.tmp.path().join("link"), false, Default::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("symlink"), "{err}");
    // A layer reached through a symlink is refused too, and nothing is made behind it.
    let err = super::layered_share(
        "t",
        &fx.tmp.path().join("img.flist"),
        &fx.tmp.path().join("link/layer"),
        Default::default(),
        &fx.tmp.path().join("cache"),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("symlink"), "{err}");
    assert!(!real.join("layer").exists());
}

/// Writes `len` bytes at `offset` through the filesystem, as a FUSE WRITE does.
pub(super) fn write_at<F: FileSystem<Inode = u64, Handle = u64>>(
    fs: &F,
    inode: u64,
    offset: u64,
    len: usize,
) -> std::io::Result<usize> {
    let ctx = Context::default();
    let (handle, _, _) = fs.open(&ctx, inode, libc::O_RDWR as u32, 0)?;
    let handle = handle.unwrap_or(0);
    let data = vec![7u8; len];
    let mut reader = SliceReader(&data);
    let out = fs.write(
        &ctx,
        inode,
        handle,
        &mut reader,
        len as u32,
        offset,
        None,
        false,
        0,
        0,
    );
    let _ = fs.release(&ctx, inode, 0, handle, false, false, None);
    out
}

/// A ZeroCopyReader over a byte slice.
struct SliceReader<'a>(&'a [u8]);

impl std::io::Read for SliceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl fuse_backend_rs::api::filesystem::ZeroCopyReader for SliceReader<'_> {
    fn read_to(
        &mut self,
        f: &mut dyn fuse_backend_rs::common::file_traits::FileReadWriteVolatile,
        count: usize,
        off: u64,
    ) -> std::io::Result<usize> {
        let n = count.min(self.0.len());
        let mut slice = self.0[..n].to_vec();
        // SAFETY: `slice` lives for the call.
        let volatile = unsafe {
            fuse_backend_rs::common::file_buf::FileVolatileSlice::from_raw_ptr(
                slice.as_mut_ptr(),
                n,
            )
        };
        let written = f.write_at_volatile(volatile, off)?;
        self.0 = &self.0[written..];
        Ok(written)
    }
}

#[test]
fn a_dir_share_keeps_to_its_quota() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("old"), vec![1u8; 1000]).unwrap();
    let limits = super::Limits {
        max_bytes: Some(10_000),
        max_inodes: Some(3),
    };
    on_worker_thread(|| {
        let fs = super::dir_share("t", tmp.path(), false, limits).unwrap();
        fs.init(FsOptions::empty()).unwrap();
        let ctx = Context::default();
        let (f, ..) = fs.create(&ctx, ROOT_ID, &name("f"), create_args()).unwrap();
        assert_eq!(write_at(&fs, f.inode, 0, 8000).unwrap(), 8000);
        // 1000 + 8000 used: 1001 more bytes pass the limit, rewriting in place does not.
        let err = write_at(&fs, f.inode, 8000, 1001).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EDQUOT));
        assert_eq!(write_at(&fs, f.inode, 0, 8000).unwrap(), 8000);
        assert_eq!(write_at(&fs, f.inode, 8000, 1000).unwrap(), 1000);
        // Truncating up is growth too; removing a file gives its bytes back.
        let mut attr: stat64 = unsafe { std::mem::zeroed() };
        attr.st_size = 1 << 30;
        let err = fs
            .setattr(&ctx, f.inode, attr, None, SetattrValid::SIZE)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EDQUOT));
        fs.unlink(&ctx, ROOT_ID, &name("old")).unwrap();
        assert_eq!(write_at(&fs, f.inode, 9000, 999).unwrap(), 999);
        // Inodes: "f" and a directory fit under 3, a third new one does not.
        fs.mkdir(&ctx, ROOT_ID, &name("d"), 0o755, 0).unwrap();
        fs.mknod(&ctx, ROOT_ID, &name("p"), libc::S_IFIFO | 0o644, 0, 0)
            .unwrap();
        let err = fs
            .symlink(&ctx, &name("x"), ROOT_ID, &name("s"))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EDQUOT));
        fs.rmdir(&ctx, ROOT_ID, &name("d")).unwrap();
        // The last byte of the budget: the symlink's target.
        fs.symlink(&ctx, &name("x"), ROOT_ID, &name("s")).unwrap();
    });
    assert_eq!(
        std::fs::metadata(tmp.path().join("f")).unwrap().len(),
        9_999
    );
}

#[test]
fn a_writable_layer_keeps_to_its_quota_copy_ups_included() {
    let fx = Fixture::new();
    // A big file in the image, cheap to store (one repeated chunk): copying it up would cost
    // the host its full size.
    let src = fx.tmp.path().join("src2");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("big"), vec![0u8; 4 << 20]).unwrap();
    let image = fx.tmp.path().join("big.flist");
    pack(&src, &image, &fx.tmp.path().join("store"));
    let layer = fx.tmp.path().join("layer2");
    let limits = super::Limits {
        max_bytes: Some(1 << 20),
        max_inodes: None,
    };
    on_worker_thread(|| {
        let fs = super::layered_share("t", &image, &layer, limits, &fx.tmp.path().join("cache"))
            .unwrap();
        fs.init(FsOptions::empty()).unwrap();
        let big = lookup(&fs, ROOT_ID, "big").unwrap();
        // Opening it for writing copies it up: over the quota.
        let err = write_at(&fs, big, 0, 10).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EDQUOT), "{err}");
        // Small new files still fit.
        let (f, ..) = fs
            .create(&Context::default(), ROOT_ID, &name("small"), create_args())
            .unwrap();
        assert_eq!(write_at(&fs, f.inode, 0, 4096).unwrap(), 4096);
    });
    let kept: u64 = std::fs::read_dir(layer.join("upper"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(kept <= 1 << 20, "{kept} bytes in the layer");
}

#[test]
fn a_layer_of_the_flat_layout_is_refused_and_stale_staging_is_cleared() {
    let fx = Fixture::new();
    let layer = fx.tmp.path().join("flat");
    std::fs::create_dir_all(layer.join("etc")).unwrap();
    std::fs::write(layer.join("etc/kept"), b"guest data").unwrap();
    let open = |layer: &Path| {
        super::layered_share(
            "t",
            &fx.tmp.path().join("img.flist"),
            layer,
            Default::default(),
            &fx.tmp.path().join("cache"),
        )
    };
    let err = open(&layer).err().unwrap().to_string();
    assert!(err.contains("earlier flat layout"), "{err}");
    assert!(layer.join("etc/kept").exists(), "nothing is lost");

    let layer = fx.tmp.path().join("new");
    drop(open(&layer).unwrap());
    std::fs::write(layer.join("work/staged-by-a-crashed-run"), b"x").unwrap();
    drop(open(&layer).unwrap());
    let left: Vec<_> = std::fs::read_dir(layer.join("work"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "index")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn the_guest_sees_the_image_roots_mode_through_a_fresh_layer() {
    let fx = Fixture::new();
    let fs = guarded_overlay(&fx);
    let (root, _) = fs.getattr(&Context::default(), ROOT_ID, None).unwrap();
    let image_root = host_mode(&fx.tmp.path().join("src"));
    // Guest users other than root must be able to enter "/" (a 0700 root locks them out).
    assert_eq!(root.st_mode & 0o7777, image_root & 0o7777);
    assert_ne!(root.st_mode & 0o005, 0);
}
