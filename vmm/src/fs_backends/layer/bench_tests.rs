//! A comparison of the vmm's own layer with fuse-backend-rs's overlay at the FileSystem level
//! (the requests a guest's common work makes, without the transport): run with
//! `cargo test --release -p vmm layer::bench_tests -- --ignored --nocapture`.
//!
//! Each round builds a fresh layer of each kind on the same image and runs every phase on
//! both, the order of the two alternating from round to round; the table shows each phase's
//! median over the rounds (`GRIDNODE_BENCH_ROUNDS`, 5 by default) and each round's pair, so a
//! busy host moves both columns alike and shows where it did. `TMPDIR` picks the filesystem
//! the layers live on (on a disk shared with other work, single rounds stall for a second now
//! and then, in either column: compare on tmpfs, or many rounds).

use std::time::Instant;

use fuse_backend_rs::api::filesystem::{Context, FileSystem, FsOptions, ROOT_ID};

use super::super::copy_up_tests::read_all;
use super::super::tests::{create_args, lookup, name, on_worker_thread, pack, write_at};
use super::super::Limits;

const FILES: usize = 2000;
/// Request queues served at once in the parallel phase (a 4-vCPU guest's).
const THREADS: usize = 4;
/// Large image files (`big<k>`, 8 MiB each) copied up while files are created elsewhere.
const BIG_FILES: usize = 6;
const BIG_LEN: usize = 8 << 20;

fn fixture(dir: &std::path::Path) {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("img")).unwrap();
    for i in 0..FILES {
        std::fs::write(src.join(format!("img/f{i}")), vec![i as u8; 4096]).unwrap();
    }
    std::fs::create_dir_all(src.join("big")).unwrap();
    for k in 0..BIG_FILES {
        // Not zeros (a copy-up leaves those as holes), not one repeated block.
        let mut seed = 0x2545_f491_4f6c_dd1du64 ^ k as u64;
        let data: Vec<u8> = (0..BIG_LEN / 8)
            .flat_map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed.to_le_bytes()
            })
            .collect();
        std::fs::write(src.join(format!("big/big{k}")), data).unwrap();
    }
    pack(&src, &dir.join("img.flist"), &dir.join("store"));
}

/// Creates, writes 4 KiB to and stats `count` new files `<prefix><i>` in directory `dir`.
fn create_files<F: FileSystem<Inode = u64, Handle = u64>>(
    fs: &F,
    dir: u64,
    prefix: &str,
    count: usize,
) {
    let ctx = Context::default();
    for i in 0..count {
        let (e, h, ..) = fs
            .create(&ctx, dir, &name(&format!("{prefix}{i}")), create_args())
            .unwrap();
        if let Some(h) = h {
            fs.release(&ctx, e.inode, 0, h, false, false, None).unwrap();
        }
        write_at(fs, e.inode, 0, 4096).unwrap();
        fs.getattr(&ctx, e.inode, None).unwrap();
    }
}

/// Milliseconds of each phase on `fs`.
fn run<F: FileSystem<Inode = u64, Handle = u64> + Sync>(fs: &F) -> Vec<(&'static str, u128)> {
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
    create_files(fs, d, "n", FILES);
    out.push(("create+write+stat new files", t.elapsed().as_millis()));
    let t = Instant::now();
    std::thread::scope(|scope| {
        for k in 0..THREADS {
            scope.spawn(move || {
                crate::devices::virtio::fs::enter_fs_context().unwrap();
                let ctx = Context::default();
                let dir = fs
                    .mkdir(&ctx, ROOT_ID, &name(&format!("par{k}")), 0o755, 0)
                    .unwrap()
                    .inode;
                create_files(fs, dir, "p", FILES / THREADS);
            });
        }
    });
    out.push(("the same, 4 threads, 4 dirs", t.elapsed().as_millis()));
    // Files made in one directory while another request copies large image files up in
    // another (a guest writing into a big image file): the time the creates take.
    let big = lookup(fs, ROOT_ID, "big").unwrap();
    let beside = fs
        .mkdir(&ctx, ROOT_ID, &name("beside"), 0o755, 0)
        .unwrap()
        .inode;
    let created = std::thread::scope(|scope| {
        let copier = scope.spawn(move || {
            crate::devices::virtio::fs::enter_fs_context().unwrap();
            for k in 0..BIG_FILES {
                let f = lookup(fs, big, &format!("big{k}")).unwrap();
                write_at(fs, f, 0, 16).unwrap();
            }
        });
        let t = Instant::now();
        create_files(fs, beside, "b", FILES / 2);
        let created = t.elapsed().as_millis();
        copier.join().unwrap();
        created
    });
    out.push(("create 1000 during big copy-ups", created));
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
    // A guest's listing of a directory whose names it knows (READDIRPLUS: each entry looked
    // up again), a quarter of them copied up.
    let t = Instant::now();
    for _ in 0..5 {
        let (h, _) = fs.opendir(&ctx, img, 0).unwrap();
        let h = h.unwrap_or(0);
        let mut given = Vec::new();
        fs.readdirplus(&ctx, img, h, 1 << 20, 0, &mut |d, e| {
            if e.inode != 0 && d.name != b"." && d.name != b".." {
                given.push(e.inode);
            }
            Ok(1)
        })
        .unwrap();
        fs.releasedir(&ctx, img, 0, h).unwrap();
        assert!(given.len() >= FILES);
        for inode in given {
            fs.forget(&ctx, inode, 1);
        }
    }
    out.push(("readdirplus image dir x5", t.elapsed().as_millis()));
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

fn median(mut v: Vec<u128>) -> u128 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
#[ignore = "a benchmark: run with --ignored --nocapture"]
fn layer_against_overlay() {
    let rounds: usize = std::env::var("GRIDNODE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let tmp = tempfile::tempdir().unwrap();
    fixture(tmp.path());
    let image = tmp.path().join("img.flist");
    let cache = tmp.path().join("cache");
    on_worker_thread(|| {
        // A first run warms the image's chunk cache for both.
        let warm = super::super::layered_share(
            "t",
            &image,
            &tmp.path().join("warm"),
            Limits::default(),
            &cache,
        )
        .unwrap();
        warm.init(FsOptions::empty()).unwrap();
        run(&warm);
        drop(warm);
        let mut ours: Vec<Vec<(&str, u128)>> = Vec::new();
        let mut theirs: Vec<Vec<(&str, u128)>> = Vec::new();
        for round in 0..rounds {
            let layer = super::super::layered_share(
                "t",
                &image,
                &tmp.path().join(format!("layer{round}")),
                Limits::default(),
                &cache,
            )
            .unwrap();
            layer.init(FsOptions::empty()).unwrap();
            let overlay = super::super::overlay_share(
                "t",
                &image,
                &tmp.path().join(format!("overlay{round}")),
                Limits::default(),
                &cache,
            )
            .unwrap();
            overlay.init(FsOptions::empty()).unwrap();
            if round % 2 == 0 {
                ours.push(run(&layer));
                theirs.push(run(&overlay));
            } else {
                theirs.push(run(&overlay));
                ours.push(run(&layer));
            }
        }
        println!(
            "{:<32} {:>10} {:>10}   (median of {rounds} rounds)",
            "phase (ms)", "layer", "overlay"
        );
        for (i, (phase, _)) in ours[0].iter().enumerate() {
            let a = median(ours.iter().map(|r| r[i].1).collect());
            let b = median(theirs.iter().map(|r| r[i].1).collect());
            let rounds: Vec<String> = ours
                .iter()
                .zip(&theirs)
                .map(|(x, y)| format!("{}/{}", x[i].1, y[i].1))
                .collect();
            println!("{phase:<32} {a:>10} {b:>10}   rounds: {}", rounds.join(" "));
        }
    });
}
