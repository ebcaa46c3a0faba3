//! A comparison of the vmm's own layer with fuse-backend-rs's overlay at the FileSystem level
//! (the requests a guest's common work makes, without the transport): run with
//! `cargo test --release -p vmm layer::bench_tests -- --ignored --nocapture`.

use std::time::Instant;

use fuse_backend_rs::api::filesystem::{Context, FileSystem, FsOptions, ROOT_ID};

use super::super::copy_up_tests::read_all;
use super::super::tests::{create_args, lookup, name, on_worker_thread, pack, write_at};
use super::super::Limits;

const FILES: usize = 2000;

fn fixture(dir: &std::path::Path) {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("img")).unwrap();
    for i in 0..FILES {
        std::fs::write(src.join(format!("img/f{i}")), vec![i as u8; 4096]).unwrap();
    }
    pack(&src, &dir.join("img.flist"), &dir.join("store"));
}

/// Milliseconds of each phase on `fs`.
fn run<F: FileSystem<Inode = u64, Handle = u64>>(fs: &F) -> Vec<(&'static str, u128)> {
    let ctx = Context::default();
    let mut out = Vec::new();
    let t = Instant::now();
    let img = lookup(fs, ROOT_ID, "img").unwrap();
    for i in 0..FILES {
        let f = lookup(fs, img, &format!("f{i}")).unwrap();
        assert_eq!(read_all(fs, f).unwrap().len(), 4096);
    }
    out.push(("lookup+read image files", t.elapsed().as_millis()));
    let t = Instant::now();
    let d = fs
        .mkdir(&ctx, ROOT_ID, &name("new"), 0o755, 0)
        .unwrap()
        .inode;
    for i in 0..FILES {
        let (e, h, ..) = fs
            .create(&ctx, d, &name(&format!("n{i}")), create_args())
            .unwrap();
        if let Some(h) = h {
            fs.release(&ctx, e.inode, 0, h, false, false, None).unwrap();
        }
        write_at(fs, e.inode, 0, 4096).unwrap();
        fs.getattr(&ctx, e.inode, None).unwrap();
    }
    out.push(("create+write+stat new files", t.elapsed().as_millis()));
    let t = Instant::now();
    for _ in 0..20 {
        let (h, _) = fs.opendir(&ctx, img, 0).unwrap();
        let h = h.unwrap_or(0);
        let mut n = 0;
        fs.readdir(&ctx, img, h, 1 << 20, 0, &mut |_| {
            n += 1;
            Ok(1)
        })
        .unwrap();
        fs.releasedir(&ctx, img, 0, h).unwrap();
        assert!(n >= FILES);
    }
    out.push(("readdir image dir x20", t.elapsed().as_millis()));
    let t = Instant::now();
    for i in 0..FILES / 4 {
        let f = lookup(fs, img, &format!("f{i}")).unwrap();
        write_at(fs, f, 0, 16).unwrap();
    }
    out.push(("copy-up + write (500)", t.elapsed().as_millis()));
    let t = Instant::now();
    for i in 0..FILES {
        fs.unlink(&ctx, d, &name(&format!("n{i}"))).unwrap();
    }
    for i in FILES / 2..FILES {
        fs.unlink(&ctx, img, &name(&format!("f{i}"))).unwrap();
    }
    out.push(("unlink new + image files", t.elapsed().as_millis()));
    out
}

#[test]
#[ignore = "a benchmark: run with --ignored --nocapture"]
fn layer_against_overlay() {
    let tmp = tempfile::tempdir().unwrap();
    fixture(tmp.path());
    let image = tmp.path().join("img.flist");
    let cache = tmp.path().join("cache");
    on_worker_thread(|| {
        // A first run warms the image's chunk cache for both.
        let warm = super::super::layered_share(
            "t",
            &image,
            &tmp.path().join("l0"),
            Limits::default(),
            &cache,
        )
        .unwrap();
        warm.init(FsOptions::empty()).unwrap();
        run(&warm);
        let layer = super::super::layered_share(
            "t",
            &image,
            &tmp.path().join("l1"),
            Limits::default(),
            &cache,
        )
        .unwrap();
        layer.init(FsOptions::empty()).unwrap();
        let overlay = super::super::overlay_share(
            "t",
            &image,
            &tmp.path().join("l2"),
            Limits::default(),
            &cache,
        )
        .unwrap();
        overlay.init(FsOptions::empty()).unwrap();
        let ours = run(&layer);
        let theirs = run(&overlay);
        println!("{:<32} {:>10} {:>10}", "phase (ms)", "layer", "overlay");
        for ((phase, a), (_, b)) in ours.iter().zip(&theirs) {
            println!("{phase:<32} {a:>10} {b:>10}");
        }
    });
}
