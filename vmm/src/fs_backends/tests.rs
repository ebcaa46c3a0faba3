//! The share backends at the FileSystem level, as the virtio-fs server calls them: an image
//! under a writable layer (copy-up, whiteouts, rename, persistence) and a read-only image.

use std::ffi::CString;
use std::path::Path;

use fuse_backend_rs::abi::fuse_abi::CreateIn;
use fuse_backend_rs::api::filesystem::{Context, FileSystem, FsOptions, ROOT_ID};

use crate::config::FsSpec;

fn pack(dir: &Path, image: &Path, store: &Path) {
    let router =
        flist_fs::store::Router::from_specs(&[format!("dir://{}", store.display())]).unwrap();
    let opts = flist_fs::pack::PackOptions {
        chunker: Default::default(),
        encrypt: false,
        tags: Default::default(),
        progress: false,
    };
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
        FsSpec {
            tag: "t".into(),
            dir: None,
            image: Some(self.tmp.path().join("img.flist")),
            writable_layer: layer.then(|| self.tmp.path().join("layer")),
            readonly: false,
        }
    }
}

fn name(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn lookup<F: FileSystem<Inode = u64>>(fs: &F, parent: u64, n: &str) -> std::io::Result<u64> {
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
    let fs = super::overlay(
        "t",
        super::image("t", &fx.tmp.path().join("img.flist"), &cache).unwrap(),
        &fx.tmp.path().join("layer"),
    )
    .unwrap();
    if seccomp {
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
    assert!(fx.tmp.path().join("layer/etc/written").exists());
    assert!(lookup(&fs, etc, "written").is_ok());
}

#[test]
fn image_without_a_layer_is_read_only() {
    let fx = Fixture::new();
    let dev = super::device_for(&fx.share(false), Some(&fx.tmp.path().join("cache")));
    assert!(dev.is_ok());
    let fs = super::ReadOnly::new(
        super::image(
            "t",
            &fx.tmp.path().join("img.flist"),
            &fx.tmp.path().join("cache"),
        )
        .unwrap(),
    );
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
