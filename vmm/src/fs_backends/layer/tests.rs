//! Unit tests of the writable layer, driving its FileSystem methods directly (as the virtio-fs
//! server calls them) on a small packed image and a layer in a temporary directory.

use std::path::{Path, PathBuf};

use fuse_backend_rs::api::filesystem::{Context, FileSystem, FsOptions, SetattrValid, ROOT_ID};

use super::super::copy_up_tests::{read_all, VecWriter};
use super::super::tests::{create_args, lookup, name, on_worker_thread, pack, write_at};
use super::super::{Guard, Limits};
use super::Layer;

struct Fixture {
    tmp: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("a/sub")).unwrap();
        std::fs::write(src.join("a/f"), b"image f\n").unwrap();
        std::fs::write(src.join("a/sub/deep"), b"deep\n").unwrap();
        std::fs::write(src.join("a/h1"), b"linked\n").unwrap();
        std::fs::hard_link(src.join("a/h1"), src.join("a/h2")).unwrap();
        std::fs::create_dir_all(src.join("b")).unwrap();
        std::fs::write(src.join("b/g"), b"image g\n").unwrap();
        std::fs::set_permissions(
            src.join("b/g"),
            std::os::unix::fs::PermissionsExt::from_mode(0o640),
        )
        .unwrap();
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
        std::fs::File::options()
            .write(true)
            .open(src.join("b/g"))
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        pack(
            &src,
            &tmp.path().join("img.flist"),
            &tmp.path().join("store"),
        );
        Self { tmp }
    }

    fn layer(&self) -> PathBuf {
        self.tmp.path().join("layer")
    }

    fn share(&self) -> Guard<Layer> {
        let fs = super::super::layered_share(
            "t",
            &self.tmp.path().join("img.flist"),
            &self.layer(),
            Limits::default(),
            &self.tmp.path().join("cache"),
        )
        .unwrap();
        fs.init(FsOptions::empty()).unwrap();
        fs
    }
}

fn walk<F: FileSystem<Inode = u64>>(fs: &F, path: &str) -> std::io::Result<u64> {
    let mut ino = ROOT_ID;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        ino = lookup(fs, ino, part)?;
    }
    Ok(ino)
}

fn names<F: FileSystem<Inode = u64, Handle = u64>>(fs: &F, dir: u64) -> Vec<String> {
    let ctx = Context::default();
    let (h, _) = fs.opendir(&ctx, dir, 0).unwrap();
    let h = h.unwrap_or(0);
    let mut out = Vec::new();
    fs.readdir(&ctx, dir, h, 1 << 16, 0, &mut |e| {
        let n = String::from_utf8_lossy(e.name).into_owned();
        if n != "." && n != ".." {
            out.push(n);
        }
        Ok(1)
    })
    .unwrap();
    fs.releasedir(&ctx, dir, 0, h).unwrap();
    out.sort();
    out
}

fn nlink<F: FileSystem<Inode = u64, Handle = u64>>(fs: &F, ino: u64) -> u64 {
    fs.getattr(&Context::default(), ino, None)
        .unwrap()
        .0
        .st_nlink
}

fn is_whiteout(path: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_char_device() && m.rdev() == 0)
        .unwrap_or(false)
}

#[test]
fn hard_links_in_the_layer_are_one_inode() {
    let fx = Fixture::new();
    on_worker_thread(|| {
        let fs = fx.share();
        let ctx = Context::default();
        let (f, ..) = fs.create(&ctx, ROOT_ID, &name("f"), create_args()).unwrap();
        let g = fs.link(&ctx, f.inode, ROOT_ID, &name("g")).unwrap();
        assert_eq!(g.inode, f.inode);
        assert_eq!(lookup(&fs, ROOT_ID, "g").unwrap(), f.inode);
        assert_eq!(nlink(&fs, f.inode), 2);
        fs.unlink(&ctx, ROOT_ID, &name("f")).unwrap();
        assert_eq!(nlink(&fs, g.inode), 1);
        // A link to an image file copies it up once; both names are the copy.
        let a = walk(&fs, "a").unwrap();
        let img = lookup(&fs, a, "f").unwrap();
        let l = fs.link(&ctx, img, ROOT_ID, &name("lf")).unwrap();
        assert_eq!(l.inode, img);
        assert_eq!(nlink(&fs, img), 2);
        assert_eq!(read_all(&fs, l.inode).unwrap(), b"image f\n");
    });
}

#[test]
fn an_image_files_hard_links_copy_up_once() {
    let fx = Fixture::new();
    on_worker_thread(|| {
        let fs = fx.share();
        let a = walk(&fs, "a").unwrap();
        let h1 = lookup(&fs, a, "h1").unwrap();
        assert_eq!(
            lookup(&fs, a, "h2").unwrap(),
            h1,
            "one image inode, one node"
        );
        assert_eq!(write_at(&fs, h1, 0, 3).unwrap(), 3);
        assert_eq!(read_all(&fs, h1).unwrap(), b"\x07\x07\x07ked\n");
    });
    // The next start: the other name links to the copy.
    on_worker_thread(|| {
        let fs = fx.share();
        let a = walk(&fs, "a").unwrap();
        let h1 = lookup(&fs, a, "h1").unwrap();
        let h2 = lookup(&fs, a, "h2").unwrap();
        assert_eq!(h1, h2);
        assert_eq!(read_all(&fs, h2).unwrap(), b"\x07\x07\x07ked\n");
        // Two names, as in the image (the index's link is not the guest's).
        let (st, _) = fs.getattr(&Context::default(), h1, None).unwrap();
        assert_eq!(st.st_nlink, 2);
    });
    let report = super::check::check_layer(&fx.layer(), false).unwrap();
    assert!(report.consistent(), "{report}");
    assert_eq!(report.index, 1, "{report}");
}

#[test]
fn an_image_directory_moves_with_its_entries_and_stays_moved() {
    let fx = Fixture::new();
    on_worker_thread(|| {
        let fs = fx.share();
        let ctx = Context::default();
        let b = walk(&fs, "b").unwrap();
        let root_links = nlink(&fs, ROOT_ID);
        fs.rename(&ctx, ROOT_ID, &name("a"), b, &name("moved"), 0)
            .unwrap();
        assert!(lookup(&fs, ROOT_ID, "a").is_err());
        assert_eq!(
            names(&fs, walk(&fs, "b/moved").unwrap()),
            ["f", "h1", "h2", "sub"]
        );
        assert_eq!(
            read_all(&fs, walk(&fs, "b/moved/sub/deep").unwrap()).unwrap(),
            b"deep\n"
        );
        // `..` moved from the root to b.
        assert_eq!(nlink(&fs, ROOT_ID), root_links - 1);
        assert_eq!(nlink(&fs, b), 3);
        assert!(!names(&fs, ROOT_ID).contains(&"a".to_string()));
    });
    assert!(is_whiteout(&fx.layer().join("upper/a")));
    on_worker_thread(|| {
        let fs = fx.share();
        assert_eq!(
            names(&fs, walk(&fs, "b/moved").unwrap()),
            ["f", "h1", "h2", "sub"]
        );
        assert!(walk(&fs, "a").is_err());
        // Moved back, and again away: still the image's entries.
        let ctx = Context::default();
        let b = walk(&fs, "b").unwrap();
        fs.rename(&ctx, b, &name("moved"), ROOT_ID, &name("a"), 0)
            .unwrap();
        assert_eq!(
            names(&fs, walk(&fs, "a").unwrap()),
            ["f", "h1", "h2", "sub"]
        );
        assert!(walk(&fs, "b/moved").is_err());
    });
}

#[test]
fn a_renamed_image_file_keeps_its_metadata() {
    let fx = Fixture::new();
    on_worker_thread(|| {
        let fs = fx.share();
        let ctx = Context::default();
        let b = walk(&fs, "b").unwrap();
        let g = lookup(&fs, b, "g").unwrap();
        let (before, _) = fs.getattr(&ctx, g, None).unwrap();
        fs.rename(&ctx, b, &name("g"), ROOT_ID, &name("g2"), 0)
            .unwrap();
        assert_eq!(lookup(&fs, ROOT_ID, "g2").unwrap(), g, "the same inode");
        let (after, _) = fs.getattr(&ctx, g, None).unwrap();
        assert_eq!(after.st_mode, before.st_mode);
        assert_eq!(after.st_mtime, before.st_mtime);
        assert_eq!(after.st_size, before.st_size);
        assert!(lookup(&fs, b, "g").is_err());
        assert_eq!(read_all(&fs, g).unwrap(), b"image g\n");
    });
}

#[test]
fn an_unlinked_open_file_stays_readable() {
    let fx = Fixture::new();
    on_worker_thread(|| {
        let fs = fx.share();
        let ctx = Context::default();
        let (f, ..) = fs.create(&ctx, ROOT_ID, &name("f"), create_args()).unwrap();
        assert_eq!(write_at(&fs, f.inode, 0, 100).unwrap(), 100);
        let (h, ..) = fs.open(&ctx, f.inode, libc::O_RDONLY as u32, 0).unwrap();
        let h = h.unwrap();
        fs.unlink(&ctx, ROOT_ID, &name("f")).unwrap();
        let mut out = VecWriter(Vec::new());
        let n = fs
            .read(&ctx, f.inode, h, &mut out, 4096, 0, None, 0)
            .unwrap();
        assert_eq!(n, 100);
        let (st, _) = fs.getattr(&ctx, f.inode, Some(h)).unwrap();
        assert_eq!(st.st_size, 100);
        assert_eq!(st.st_nlink, 0);
        fs.release(&ctx, f.inode, 0, h, false, false, None).unwrap();
        // And an image file removed under a whiteout.
        let a = walk(&fs, "a").unwrap();
        let img = lookup(&fs, a, "f").unwrap();
        let (h, ..) = fs.open(&ctx, img, libc::O_RDONLY as u32, 0).unwrap();
        fs.unlink(&ctx, a, &name("f")).unwrap();
        let mut out = VecWriter(Vec::new());
        fs.read(&ctx, img, h.unwrap(), &mut out, 4096, 0, None, 0)
            .unwrap();
        assert_eq!(out.0, b"image f\n");
    });
}

#[test]
fn removed_image_names_stay_removed_and_come_back_new() {
    let fx = Fixture::new();
    on_worker_thread(|| {
        let fs = fx.share();
        let ctx = Context::default();
        let a = walk(&fs, "a").unwrap();
        let sub = lookup(&fs, a, "sub").unwrap();
        assert_eq!(
            fs.rmdir(&ctx, a, &name("sub")).unwrap_err().raw_os_error(),
            Some(libc::ENOTEMPTY)
        );
        fs.unlink(&ctx, sub, &name("deep")).unwrap();
        assert_eq!(names(&fs, sub), Vec::<String>::new());
        fs.rmdir(&ctx, a, &name("sub")).unwrap();
        assert!(lookup(&fs, a, "sub").is_err());
        assert_eq!(names(&fs, a), ["f", "h1", "h2"]);
        // A new directory of that name shows nothing of the image's.
        let d = fs.mkdir(&ctx, a, &name("sub"), 0o755, 0).unwrap();
        assert_eq!(names(&fs, d.inode), Vec::<String>::new());
        // A new file over a removed image file.
        fs.unlink(&ctx, a, &name("f")).unwrap();
        let (f, ..) = fs.create(&ctx, a, &name("f"), create_args()).unwrap();
        assert_eq!(read_all(&fs, f.inode).unwrap(), b"");
        // The guest's device nodes (a 0:0 one too) are plain files on the host, never a
        // device nor a whiteout; the guest sees them as it made them.
        for (n, kind, rdev) in [
            ("null", libc::S_IFCHR, 0),
            ("mem", libc::S_IFCHR, libc::makedev(1, 1) as u32),
            ("sda", libc::S_IFBLK, libc::makedev(8, 0) as u32),
        ] {
            let e = fs
                .mknod(&ctx, ROOT_ID, &name(n), kind | 0o640, rdev, 0)
                .unwrap();
            assert_eq!(e.attr.st_mode, kind | 0o640, "{n}");
            assert_eq!(e.attr.st_rdev, u64::from(rdev), "{n}");
            let host = std::fs::symlink_metadata(fx.layer().join("upper").join(n)).unwrap();
            assert!(host.file_type().is_file(), "{n}");
            let linked = fs.link(&ctx, e.inode, a, &name(n)).unwrap();
            assert_eq!(linked.attr.st_mode, kind | 0o640, "{n}");
        }
        assert!(names(&fs, ROOT_ID).contains(&"null".to_string()));
    });
    on_worker_thread(|| {
        let fs = fx.share();
        let a = walk(&fs, "a").unwrap();
        assert_eq!(
            names(&fs, lookup(&fs, a, "sub").unwrap()),
            Vec::<String>::new()
        );
        assert_eq!(read_all(&fs, lookup(&fs, a, "f").unwrap()).unwrap(), b"");
        let ctx = Context::default();
        let (st, _) = fs
            .getattr(&ctx, lookup(&fs, a, "sda").unwrap(), None)
            .unwrap();
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFBLK);
        assert_eq!(st.st_rdev, libc::makedev(8, 0));
    });
    let report = super::check::check_layer(&fx.layer(), false).unwrap();
    assert!(report.consistent(), "{report}");
    assert_eq!(report.opaque_dirs, 1, "{report}");
}

#[test]
fn setattr_copies_up_with_the_images_attributes() {
    let fx = Fixture::new();
    on_worker_thread(|| {
        let fs = fx.share();
        let ctx = Context::default();
        let g = walk(&fs, "b/g").unwrap();
        let (mut attr, _) = fs.getattr(&ctx, g, None).unwrap();
        attr.st_mode = 0o600;
        let (after, _) = fs.setattr(&ctx, g, attr, None, SetattrValid::MODE).unwrap();
        assert_eq!(after.st_mode & 0o7777, 0o600);
        assert_eq!(after.st_mtime, 1_000_000_000);
        assert_eq!(read_all(&fs, g).unwrap(), b"image g\n");
    });
}

#[test]
fn the_check_removes_what_a_crash_left() {
    let fx = Fixture::new();
    drop(on_worker_thread(|| fx.share()));
    let work = fx.layer().join("work");
    std::fs::write(work.join("copy-up-1-0"), b"partial").unwrap();
    std::fs::create_dir_all(work.join("layer-1-1")).unwrap();
    std::fs::create_dir_all(work.join("index")).unwrap();
    std::fs::write(work.join("index/42"), b"dangling").unwrap();
    let report = super::check::check_layer(&fx.layer(), false).unwrap();
    assert_eq!(
        (report.stale_work, report.dangling_index),
        (2, 1),
        "{report}"
    );
    assert!(!report.consistent());
    let fixed = super::check::check_layer(&fx.layer(), true).unwrap();
    assert!(fixed.consistent());
    let again = super::check::check_layer(&fx.layer(), false).unwrap();
    assert_eq!((again.stale_work, again.dangling_index), (0, 0), "{again}");
    // The vmm checks (and fixes) at start too.
    std::fs::write(work.join("copy-up-1-2"), b"partial").unwrap();
    drop(on_worker_thread(|| fx.share()));
    assert!(!work.join("copy-up-1-2").exists());
}

/// The guest may forget a node (FORGET, on the high-priority queue, served by another thread)
/// while a lookup on the request queue finds that same node again: Linux does so right after a
/// MKDIR (it drops the new inode and looks the directory up again), as pjdfstest's temporary
/// directories showed. The lookup's reference must count, else the node is gone while the
/// guest holds it (ESTALE on the next request: pjdfstest's `enotdir_component` cases failed
/// now and then creating their file in such a directory).
#[test]
fn a_forget_while_a_lookup_finds_the_node_leaves_it_to_the_lookup() {
    let fx = Fixture::new();
    on_worker_thread(|| {
        let fs = fx.share();
        let ctx = Context::default();
        let d = fs.mkdir(&ctx, ROOT_ID, &name("d"), 0o755, 0).unwrap();
        // The guest's inode of the MKDIR goes (one lookup): its FORGET is served just as the
        // lookup below has found the node.
        let made = d.inode;
        fs.inner().when(super::Point::FoundUpper, move |layer, id| {
            assert_eq!(id, made);
            FileSystem::forget(layer, &Context::default(), id, 1);
        });
        let again = lookup(&fs, ROOT_ID, "d").unwrap();
        fs.getattr(&ctx, again, None).unwrap();
        fs.mknod(&ctx, again, &name("blk"), libc::S_IFBLK | 0o644, 0, 0)
            .unwrap();
        assert_eq!(names(&fs, again), ["blk"]);
        // The lookup's reference is the guest's last one.
        FileSystem::forget(&fs, &ctx, again, 1);
        assert_eq!(
            fs.getattr(&ctx, again, None).unwrap_err().raw_os_error(),
            Some(libc::ESTALE)
        );
    });
}

/// A lookup that saw only the image's file at a name while another request copied that file
/// up (under the node the guest had) makes a node of its own for it: writing through that
/// node finds the copy in place and uses it (it was ESTALE), both nodes show one file.
#[test]
fn a_node_made_while_its_image_file_was_copied_up_uses_the_copy() {
    let fx = Fixture::new();
    on_worker_thread(|| {
        let fs = fx.share();
        let ctx = Context::default();
        let a = walk(&fs, "a").unwrap();
        let first = lookup(&fs, a, "f").unwrap();
        fs.inner().when(super::Point::LowerOnly, move |layer, _| {
            write_at(layer, first, 0, 1).unwrap();
        });
        let second = lookup(&fs, a, "f").unwrap();
        assert_ne!(second, first, "the lookup made a node of its own");
        write_at(&fs, second, 1, 1).unwrap();
        assert_eq!(read_all(&fs, first).unwrap(), b"\x07\x07age f\n");
        assert_eq!(read_all(&fs, second).unwrap(), b"\x07\x07age f\n");
        let ino = |n| fs.getattr(&ctx, n, None).unwrap().0.st_ino;
        assert_eq!(ino(first), ino(second));
    });
}

/// Requests served on several queues at once (a guest with several vCPUs): files made,
/// written, renamed and removed in directories of their own, the same image files (two names
/// of one among them) copied up by two requests at a time, directories made, renamed and
/// removed beside them. Afterwards every directory holds what its requests left, each image
/// file was copied once with the write, and the layer checks consistent.
#[test]
fn requests_on_several_queues_at_once_keep_the_layer_whole() {
    const WORKERS: usize = 4;
    const FILES: usize = 120;
    let fx = Fixture::new();
    let fs = on_worker_thread(|| fx.share());
    let image_files = ["a/f", "b/g", "a/h1", "a/h2", "a/sub/deep"];
    std::thread::scope(|scope| {
        let fs = &fs;
        for k in 0..WORKERS {
            scope.spawn(move || {
                crate::devices::virtio::fs::enter_fs_context().unwrap();
                let ctx = Context::default();
                let d = fs
                    .mkdir(&ctx, ROOT_ID, &name(&format!("t{k}")), 0o755, 0)
                    .unwrap()
                    .inode;
                for i in 0..FILES {
                    let (e, h, ..) = fs
                        .create(&ctx, d, &name(&format!("n{i}")), create_args())
                        .unwrap();
                    if let Some(h) = h {
                        fs.release(&ctx, e.inode, 0, h, false, false, None).unwrap();
                    }
                    write_at(fs, e.inode, 0, 8).unwrap();
                    match i % 3 {
                        0 => fs.unlink(&ctx, d, &name(&format!("n{i}"))).unwrap(),
                        1 => fs
                            .rename(
                                &ctx,
                                d,
                                &name(&format!("n{i}")),
                                d,
                                &name(&format!("m{i}")),
                                0,
                            )
                            .unwrap(),
                        _ => {}
                    }
                }
            });
        }
        for _ in 0..2 {
            scope.spawn(move || {
                crate::devices::virtio::fs::enter_fs_context().unwrap();
                for path in image_files {
                    let f = walk(fs, path).unwrap();
                    write_at(fs, f, 0, 4).unwrap();
                }
            });
        }
        scope.spawn(move || {
            crate::devices::virtio::fs::enter_fs_context().unwrap();
            let ctx = Context::default();
            for j in 0..40 {
                let (from, to) = (format!("r{j}"), format!("r{}", j + 1));
                fs.mkdir(&ctx, ROOT_ID, &name(&from), 0o755, 0).unwrap();
                fs.rename(&ctx, ROOT_ID, &name(&from), ROOT_ID, &name(&to), 0)
                    .unwrap();
                fs.rmdir(&ctx, ROOT_ID, &name(&to)).unwrap();
            }
        });
    });
    on_worker_thread(|| {
        let ctx = Context::default();
        for k in 0..WORKERS {
            let d = walk(&fs, &format!("t{k}")).unwrap();
            let mut want: Vec<String> = (0..FILES)
                .filter_map(|i| match i % 3 {
                    1 => Some(format!("m{i}")),
                    2 => Some(format!("n{i}")),
                    _ => None,
                })
                .collect();
            want.sort();
            assert_eq!(names(&fs, d), want, "t{k}");
        }
        for (path, image) in [("a/f", &b"image f\n"[..]), ("b/g", b"image g\n")] {
            let got = read_all(&fs, walk(&fs, path).unwrap()).unwrap();
            assert_eq!(&got[..4], &[7u8; 4], "{path}");
            assert_eq!(&got[4..], &image[4..], "{path}");
        }
        let (h1, h2) = (walk(&fs, "a/h1").unwrap(), walk(&fs, "a/h2").unwrap());
        assert_eq!(h1, h2);
        assert_eq!(nlink(&fs, h1), 2);
        let (st, _) = fs.getattr(&ctx, h1, None).unwrap();
        assert_eq!(st.st_size, 7);
        assert!(!names(&fs, ROOT_ID).iter().any(|n| n.starts_with('r')));
    });
    drop(fs);
    let report = super::check::check_layer(&fx.layer(), false).unwrap();
    assert!(report.consistent(), "{report}");
}

/// A new object made where the guest removed an image entry takes the whiteout's place in one
/// step: when it is whole in `work/` (a directory already opaque), the whiteout still hides
/// the image's entry, so a crash there cannot bring it back; then the two swap. Every kind of
/// new object, a file made with a mode its owner cannot write to included.
#[test]
fn new_objects_replace_a_whiteout_in_one_step() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let fx = Fixture::new();
    let upper = fx.layer().join("upper");
    let staged = Arc::new(AtomicUsize::new(0));
    on_worker_thread(|| {
        let fs = fx.share();
        let ctx = Context::default();
        let (a, b) = (walk(&fs, "a").unwrap(), walk(&fs, "b").unwrap());
        // Asserts, when the new object is staged, that the whiteout of `path` is still there.
        let expect_whiteout = |path: &str| {
            let host = upper.join(path);
            let staged = staged.clone();
            fs.inner().when(super::Point::Staged, move |_, _| {
                assert!(is_whiteout(&host), "{} is no whiteout", host.display());
                staged.fetch_add(1, Ordering::SeqCst);
            });
        };
        let sub = lookup(&fs, a, "sub").unwrap();
        fs.unlink(&ctx, sub, &name("deep")).unwrap();
        fs.rmdir(&ctx, a, &name("sub")).unwrap();
        expect_whiteout("a/sub");
        let d = fs.mkdir(&ctx, a, &name("sub"), 0o755, 0).unwrap();
        assert_eq!(names(&fs, d.inode), Vec::<String>::new());
        assert_eq!(d.attr.st_mode, libc::S_IFDIR | 0o755);

        fs.unlink(&ctx, a, &name("f")).unwrap();
        expect_whiteout("a/f");
        let args = fuse_backend_rs::abi::fuse_abi::CreateIn {
            flags: (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL) as u32,
            mode: libc::S_IFREG | 0o444,
            umask: 0o022,
            fuse_flags: 0,
        };
        // Made by a user, who opens it for writing as it is made (then it is read-only).
        let user = Context {
            uid: 1000,
            gid: 1000,
            ..Context::default()
        };
        let (f, h, ..) = fs.create(&user, a, &name("f"), args).unwrap();
        assert_eq!(f.attr.st_mode, libc::S_IFREG | 0o444);
        assert_eq!((f.attr.st_uid, f.attr.st_gid), (1000, 1000));
        let h = h.unwrap();
        fs.release(&user, f.inode, 0, h, false, false, None)
            .unwrap();

        fs.unlink(&ctx, b, &name("g")).unwrap();
        expect_whiteout("b/g");
        let l = fs.symlink(&ctx, &name("target"), b, &name("g")).unwrap();
        assert_eq!(fs.readlink(&ctx, l.inode).unwrap(), b"target");

        fs.unlink(&ctx, a, &name("h1")).unwrap();
        expect_whiteout("a/h1");
        let p = fs
            .mknod(&ctx, a, &name("h1"), libc::S_IFIFO | 0o600, 0, 0)
            .unwrap();
        assert_eq!(p.attr.st_mode, libc::S_IFIFO | 0o600);

        fs.unlink(&ctx, a, &name("h2")).unwrap();
        expect_whiteout("a/h2");
        let rdev = libc::makedev(1, 3) as u32;
        let c = fs
            .mknod(&ctx, a, &name("h2"), libc::S_IFCHR | 0o644, rdev, 0)
            .unwrap();
        assert_eq!(c.attr.st_mode, libc::S_IFCHR | 0o644);

        // That name goes again (a whiteout again: the image has a file of that name), then
        // another file's new name takes it.
        let other = fs.create(&ctx, b, &name("x"), create_args()).unwrap().0;
        fs.unlink(&ctx, a, &name("f")).unwrap();
        expect_whiteout("a/f");
        let linked = fs.link(&ctx, other.inode, a, &name("f")).unwrap();
        assert_eq!(linked.inode, other.inode);
        assert_eq!(nlink(&fs, other.inode), 2);
    });
    assert_eq!(staged.load(Ordering::SeqCst), 6, "an object was not staged");
    on_worker_thread(|| {
        let fs = fx.share();
        let a = walk(&fs, "a").unwrap();
        assert_eq!(
            names(&fs, lookup(&fs, a, "sub").unwrap()),
            Vec::<String>::new()
        );
        let ctx = Context::default();
        let kind = |n: &str| {
            let (st, _) = fs.getattr(&ctx, lookup(&fs, a, n).unwrap(), None).unwrap();
            st.st_mode & libc::S_IFMT
        };
        assert_eq!(kind("h1"), libc::S_IFIFO);
        assert_eq!(kind("h2"), libc::S_IFCHR);
        assert_eq!(kind("f"), libc::S_IFREG);
        assert_eq!(walk(&fs, "a/f").unwrap(), walk(&fs, "b/x").unwrap());
    });
    let report = super::check::check_layer(&fx.layer(), false).unwrap();
    assert!(report.consistent(), "{report}");
    assert_eq!((report.stale_work, report.opaque_dirs), (0, 1), "{report}");
}

/// One entry of a READDIRPLUS reply: name, node id (0: none), attributes, offset, `d_ino`.
struct Plus {
    name: String,
    node: u64,
    attr: fuse_backend_rs::abi::fuse_abi::stat64,
    offset: u64,
    ino: u64,
}

/// READDIRPLUS of `dir` from `offset` through a fresh OPENDIR, `reply` answering as the
/// server's reply buffer (given how many entries it took: the bytes taken, 0 when full):
/// the request's result, the entries taken, and the one offered last if not taken.
fn plus<F: FileSystem<Inode = u64, Handle = u64>>(
    fs: &F,
    dir: u64,
    offset: u64,
    mut reply: impl FnMut(usize) -> std::io::Result<usize>,
) -> (std::io::Result<()>, Vec<Plus>, Option<Plus>) {
    let ctx = Context::default();
    let (h, _) = fs.opendir(&ctx, dir, 0).unwrap();
    let h = h.unwrap_or(0);
    let mut taken = Vec::new();
    let mut last = None;
    let r = fs.readdirplus(&ctx, dir, h, 1 << 16, offset, &mut |d, e| {
        let p = Plus {
            name: String::from_utf8_lossy(d.name).into_owned(),
            node: e.inode,
            attr: e.attr,
            offset: d.offset,
            ino: d.ino,
        };
        let n = reply(taken.len());
        match n {
            Ok(n) if n > 0 => taken.push(p),
            _ => last = Some(p),
        }
        n
    });
    fs.releasedir(&ctx, dir, 0, h).unwrap();
    (r, taken, last)
}

/// READDIRPLUS of all of `dir` in one reply.
fn plus_all<F: FileSystem<Inode = u64, Handle = u64>>(fs: &F, dir: u64) -> Vec<Plus> {
    let (r, taken, last) = plus(fs, dir, 0, |_| Ok(1));
    r.unwrap();
    assert!(last.is_none());
    taken
}

fn forget_all<F: FileSystem<Inode = u64, Handle = u64>>(fs: &F, entries: &[Plus]) {
    for e in entries.iter().filter(|e| e.node != 0) {
        fs.forget(&Context::default(), e.node, 1);
    }
}

fn is_stale<F: FileSystem<Inode = u64, Handle = u64>>(fs: &F, node: u64) -> bool {
    fs.getattr(&Context::default(), node, None)
        .err()
        .and_then(|e| e.raw_os_error())
        == Some(libc::ESTALE)
}

/// Image entries, copied-up, new, removed (whiteout) and replaced (opaque directory) ones:
/// READDIRPLUS gives what LOOKUP of each name gives (node, attributes), hides what LOOKUP
/// does not find, gives `.` and `..` without a node.
#[test]
fn readdirplus_gives_what_lookup_gives() {
    let fx = Fixture::new();
    on_worker_thread(|| {
        let fs = fx.share();
        let ctx = Context::default();
        let a = walk(&fs, "a").unwrap();
        // A removed image file, a removed image directory made again (opaque), a copy-up
        // (one of two image names of a file), a new file, a device node.
        fs.unlink(&ctx, a, &name("f")).unwrap();
        let sub = lookup(&fs, a, "sub").unwrap();
        fs.unlink(&ctx, sub, &name("deep")).unwrap();
        fs.rmdir(&ctx, a, &name("sub")).unwrap();
        fs.mkdir(&ctx, a, &name("sub"), 0o700, 0).unwrap();
        let h1 = lookup(&fs, a, "h1").unwrap();
        let mut valid = SetattrValid::empty();
        valid.insert(SetattrValid::MODE);
        // SAFETY: a plain C struct of integers, for which all zeroes is valid.
        let mut attr: fuse_backend_rs::abi::fuse_abi::stat64 = unsafe { std::mem::zeroed() };
        attr.st_mode = 0o600;
        fs.setattr(&ctx, h1, attr, None, valid).unwrap();
        fs.create(&ctx, a, &name("new"), create_args()).unwrap();
        let dev = libc::makedev(8, 0) as u32;
        fs.mknod(&ctx, a, &name("sda"), libc::S_IFBLK | 0o640, dev, 0)
            .unwrap();

        // The image file's other name is linked to the copy as it is looked up (which
        // changes the copy's link count): in the listing too.
        let first = plus_all(&fs, a);
        let h2 = first.iter().find(|p| p.name == "h2").unwrap();
        assert_eq!(h2.node, h1, "the image file's other name is the copy");
        forget_all(&fs, &first);

        let got = plus_all(&fs, a);
        let listed: Vec<&str> = got.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(&listed[..2], [".", ".."]);
        assert!(got[..2].iter().all(|p| p.node == 0), "no node for . and ..");
        let mut shown: Vec<String> = got[2..].iter().map(|p| p.name.clone()).collect();
        shown.sort();
        assert_eq!(shown, names(&fs, a));
        assert_eq!(shown, ["h1", "h2", "new", "sda", "sub"], "f is whited out");
        for (i, p) in got.iter().enumerate() {
            assert_eq!(p.offset, i as u64 + 1);
        }
        for p in &got[2..] {
            let e = fs.lookup(&ctx, a, &name(&p.name)).unwrap();
            assert_ne!(p.node, 0, "{}", p.name);
            assert_eq!(e.inode, p.node, "{}: one node", p.name);
            let (st, _) = fs.getattr(&ctx, p.node, None).unwrap();
            for (what, x) in [("lookup", e.attr), ("getattr", st)] {
                assert_eq!(p.attr.st_ino, x.st_ino, "{} {what}", p.name);
                assert_eq!(p.attr.st_mode, x.st_mode, "{} {what}", p.name);
                assert_eq!(p.attr.st_nlink, x.st_nlink, "{} {what}", p.name);
                assert_eq!(p.attr.st_size, x.st_size, "{} {what}", p.name);
                assert_eq!(p.attr.st_rdev, x.st_rdev, "{} {what}", p.name);
                assert_eq!(p.attr.st_uid, x.st_uid, "{} {what}", p.name);
            }
            assert_eq!(p.ino, p.attr.st_ino, "{}", p.name);
            fs.forget(&ctx, e.inode, 1);
        }
        let by = |n: &str| got.iter().find(|p| p.name == n).unwrap();
        assert_eq!(by("h1").node, h1, "the copied-up file keeps its node");
        assert_eq!(by("h2").node, h1, "the image file's other name is the copy");
        assert_eq!(by("h1").attr.st_mode, libc::S_IFREG | 0o600);
        assert_eq!(by("h2").attr.st_mode, libc::S_IFREG | 0o600);
        assert_eq!(by("h1").attr.st_nlink, 2);
        assert_eq!(by("sda").attr.st_mode, libc::S_IFBLK | 0o640);
        assert_eq!(by("sda").attr.st_rdev, u64::from(dev));
        assert_eq!(by("sub").attr.st_mode, libc::S_IFDIR | 0o700);
        // The opaque directory shows nothing of the image's.
        let inner = plus_all(&fs, by("sub").node);
        assert_eq!(inner.len(), 2, "only . and ..");
        forget_all(&fs, &got);
        // A handle of another directory is refused.
        let (h, _) = fs.opendir(&ctx, ROOT_ID, 0).unwrap();
        let err = fs
            .readdirplus(&ctx, a, h.unwrap_or(0), 1 << 16, 0, &mut |_, _| Ok(1))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        fs.releasedir(&ctx, ROOT_ID, 0, h.unwrap_or(0)).unwrap();
    });
}

/// Each entry READDIRPLUS gives with a node is one lookup of it: as many FORGETs give the
/// node back (nodes the guest did not otherwise look up: dropped then, not before).
#[test]
fn readdirplus_entries_are_one_lookup_each() {
    let fx = Fixture::new();
    on_worker_thread(|| {
        let fs = fx.share();
        let ctx = Context::default();
        let b = walk(&fs, "b").unwrap();
        let (up, ..) = fs.create(&ctx, b, &name("up"), create_args()).unwrap();
        let a = walk(&fs, "a").unwrap();
        for dir in [a, b] {
            let got = plus_all(&fs, dir);
            let nodes: Vec<&Plus> = got.iter().filter(|p| p.node != 0).collect();
            assert_eq!(nodes.len(), got.len() - 2);
            // Twice: the second listing adds one lookup more to each node, given back.
            forget_all(&fs, &plus_all(&fs, dir));
            // The file made by CREATE: the guest holds that lookup too.
            if dir == b {
                assert!(nodes.iter().any(|p| p.node == up.inode));
                fs.forget(&ctx, up.inode, 1);
            }
            // h1 and h2 are one node: two lookups of it.
            let mut seen = std::collections::HashSet::new();
            for p in &nodes {
                if seen.insert(p.node) {
                    assert!(!is_stale(&fs, p.node), "{} still held", p.name);
                    let refs = nodes.iter().filter(|q| q.node == p.node).count();
                    fs.forget(&ctx, p.node, refs as u64);
                }
                assert!(is_stale(&fs, p.node), "{}: one lookup per entry", p.name);
            }
        }
    });
}

/// A reply buffer that fills stops the listing there: the entry it had no room for keeps no
/// lookup; nor does one the reply failed to take; the listing goes on from the last offset.
#[test]
fn readdirplus_stops_at_a_full_reply_without_a_leak() {
    let fx = Fixture::new();
    on_worker_thread(|| {
        let fs = fx.share();
        let ctx = Context::default();
        let a = walk(&fs, "a").unwrap();
        // Four entries of distinct nodes: f, sub, h1 and new.
        fs.unlink(&ctx, a, &name("h2")).unwrap();
        let (new, ..) = fs.create(&ctx, a, &name("new"), create_args()).unwrap();
        fs.forget(&ctx, new.inode, 1);
        let all = plus_all(&fs, a);
        assert_eq!(all.len(), 6);
        forget_all(&fs, &all);
        for p in all.iter().filter(|p| p.node != 0) {
            assert!(is_stale(&fs, p.node), "{}", p.name);
        }
        let mut offered = Vec::new();
        // Room for `.`, `..` and one entry: the next is refused.
        let (r, first, refused) = plus(&fs, a, 0, |n| Ok(usize::from(n < 3)));
        r.unwrap();
        assert_eq!(first.len(), 3);
        let refused = refused.unwrap();
        assert_ne!(refused.node, 0);
        assert!(
            is_stale(&fs, refused.node),
            "{}: no lookup kept",
            refused.name
        );
        assert!(!is_stale(&fs, first[2].node));
        offered.push(refused);
        // A reply that fails after some entries: those stand, the failed one keeps nothing.
        let eoverflow = || std::io::Error::from_raw_os_error(libc::EOVERFLOW);
        let (r, more, failed) = plus(&fs, a, first[2].offset, |n| {
            if n < 1 {
                Ok(1)
            } else {
                Err(eoverflow())
            }
        });
        r.unwrap();
        assert_eq!(more.len(), 1);
        let failed = failed.unwrap();
        assert!(
            is_stale(&fs, failed.node),
            "{}: no lookup kept",
            failed.name
        );
        offered.push(failed);
        // A reply that fails at once is the request's error, and keeps nothing.
        let (r, none, failed) = plus(&fs, a, more[0].offset, |_| Err(eoverflow()));
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EOVERFLOW));
        assert!(none.is_empty());
        let failed = failed.unwrap();
        assert!(
            is_stale(&fs, failed.node),
            "{}: no lookup kept",
            failed.name
        );
        offered.push(failed);
        // The rest, from where the last reply ended.
        let (r, rest, _) = plus(&fs, a, more[0].offset, |_| Ok(1));
        r.unwrap();
        let mut listed: Vec<&str> = first
            .iter()
            .chain(&more)
            .chain(&rest)
            .map(|p| p.name.as_str())
            .collect();
        listed.sort();
        let mut want: Vec<&str> = all.iter().map(|p| p.name.as_str()).collect();
        want.sort();
        assert_eq!(listed, want);
        for part in [&first, &more, &rest] {
            forget_all(&fs, part);
        }
        for p in first.iter().chain(&more).chain(&rest).chain(&offered) {
            if p.node != 0 {
                assert!(is_stale(&fs, p.node), "{}: balanced", p.name);
            }
        }
    });
}

/// READDIRPLUS takes an entry the listing had from the image only as still only there while
/// no name of the directory changed since OPENDIR; after a removal or a rename in between it
/// looks again: the name gone meanwhile is given without a node (the guest's LOOKUP of it
/// then finds nothing), not as the image's object.
#[test]
fn readdirplus_after_a_change_of_names_since_opendir_looks_again() {
    let fx = Fixture::new();
    on_worker_thread(|| {
        let fs = fx.share();
        let ctx = Context::default();
        let a = walk(&fs, "a").unwrap();
        // The directory has its upper directory (and so a stamp) from here on.
        let (e, h, ..) = fs.create(&ctx, a, &name("new"), create_args()).unwrap();
        fs.release(&ctx, e.inode, 0, h.unwrap_or(0), false, false, None)
            .unwrap();
        type Change<'a> = Box<dyn Fn() + 'a>;
        let changes: [(&str, Change); 3] = [
            ("none", Box::new(|| {})),
            ("f", Box::new(|| fs.unlink(&ctx, a, &name("f")).unwrap())),
            (
                "sub",
                Box::new(|| {
                    fs.rename(&ctx, a, &name("sub"), a, &name("moved"), 0)
                        .unwrap()
                }),
            ),
        ];
        for (gone, change) in &changes {
            let (h, _) = fs.opendir(&ctx, a, 0).unwrap();
            let h = h.unwrap_or(0);
            change();
            let mut got = Vec::new();
            fs.readdirplus(&ctx, a, h, 1 << 16, 0, &mut |d, e| {
                got.push((String::from_utf8_lossy(d.name).into_owned(), e.inode));
                Ok(1)
            })
            .unwrap();
            fs.releasedir(&ctx, a, 0, h).unwrap();
            for (n, node) in &got {
                if n == "." || n == ".." {
                    continue;
                }
                let now = fs.lookup(&ctx, a, &name(n));
                if n == gone {
                    assert_eq!(*node, 0, "{n} is gone since the listing: no node");
                    assert!(now.is_err(), "{n} is gone");
                } else {
                    let now = now.unwrap();
                    assert_eq!(*node, now.inode, "{n}: the node LOOKUP gives");
                    fs.forget(&ctx, now.inode, 2);
                }
            }
        }
    });
}
