//! Crash consistency of the writable layer: a process serving the layer (this test binary,
//! run again as [`crash_worker`]) copies up, renames and removes image files and directories
//! in a loop and is killed (SIGKILL) at random moments, again and again; after each kill the
//! layer's check finds at most what it is there to remove, the next start mounts it, and every
//! file the guest sees is whole (the image's bytes, or the image's with the worker's write).

use std::path::{Path, PathBuf};
use std::time::Duration;

use fuse_backend_rs::api::filesystem::{Context, FileSystem, FsOptions, ROOT_ID};

use super::super::copy_up_tests::read_all;
use super::super::tests::{lookup, name, on_worker_thread, pack, write_at};
use super::super::{Guard, Limits};
use super::Layer;

const FILES: usize = 120;
const FILE_LEN: usize = 192 << 10;
const DIRS: usize = 12;
const ENV: &str = "GRIDNODE_LAYER_CRASH_FIXTURE";

fn content(i: usize) -> Vec<u8> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
    let mut out = Vec::with_capacity(FILE_LEN + 8);
    while out.len() < FILE_LEN {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(FILE_LEN);
    out
}

fn make_fixture(dir: &Path) {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("c")).unwrap();
    for i in 0..FILES {
        std::fs::write(src.join(format!("c/f{i}")), content(i)).unwrap();
    }
    for k in 0..DIRS {
        std::fs::create_dir_all(src.join(format!("dirs/d{k}/inner"))).unwrap();
        std::fs::write(src.join(format!("dirs/d{k}/inner/x")), content(k)).unwrap();
    }
    pack(&src, &dir.join("img.flist"), &dir.join("store"));
}

fn share(dir: &Path) -> Guard<Layer> {
    let fs = super::super::layered_share(
        "t",
        &dir.join("img.flist"),
        &dir.join("layer"),
        Limits::default(),
        &dir.join("cache"),
    )
    .unwrap();
    fs.init(FsOptions::empty()).unwrap();
    fs
}

/// The loop the killed process runs (only when started by [`a_killed_vmm_leaves_a_consistent_layer`]).
#[test]
#[ignore = "run by a_killed_vmm_leaves_a_consistent_layer"]
fn crash_worker() {
    let Some(dir) = std::env::var_os(ENV).map(PathBuf::from) else {
        return;
    };
    let seed: usize = std::env::var("GRIDNODE_LAYER_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    on_worker_thread(|| {
        let fs = share(&dir);
        let ctx = Context::default();
        let c = lookup(&fs, ROOT_ID, "c").unwrap();
        let dirs = lookup(&fs, ROOT_ID, "dirs").unwrap();
        for n in 0..100_000usize {
            let i = (seed * 37 + n) % FILES;
            if let Ok(f) = lookup(&fs, c, &format!("f{i}")) {
                let _ = write_at(&fs, f, 0, 10);
            }
            let j = (i + 40) % FILES;
            let _ = fs.rename(
                &ctx,
                c,
                &name(&format!("f{j}")),
                c,
                &name(&format!("g{j}")),
                0,
            );
            let k = (i + 80) % FILES;
            let _ = fs.unlink(&ctx, c, &name(&format!("f{k}")));
            let _ = fs.rename(
                &ctx,
                c,
                &name(&format!("g{k}")),
                c,
                &name(&format!("f{k}")),
                0,
            );
            let d = (seed + n) % DIRS;
            let _ = fs.rename(
                &ctx,
                dirs,
                &name(&format!("d{d}")),
                ROOT_ID,
                &name(&format!("m{d}")),
                0,
            );
            let _ = fs.rename(
                &ctx,
                ROOT_ID,
                &name(&format!("m{d}")),
                dirs,
                &name(&format!("d{d}")),
                0,
            );
            let _ = fs.mkdir(&ctx, dirs, &name(&format!("new{d}")), 0o755, 0);
            let _ = fs.rmdir(&ctx, dirs, &name(&format!("new{d}")));
        }
    });
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
    out
}

/// Every file the guest sees is whole.
fn verify(dir: &Path) {
    on_worker_thread(|| {
        let fs = share(dir);
        let c = lookup(&fs, ROOT_ID, "c").unwrap();
        for n in names(&fs, c) {
            let i: usize = n[1..]
                .parse()
                .unwrap_or_else(|_| panic!("stray name c/{n}"));
            let ino = lookup(&fs, c, &n).unwrap();
            let got = read_all(&fs, ino).unwrap();
            let mut written = content(i);
            written[..10].fill(7);
            assert!(
                got == content(i) || got == written,
                "c/{n}: {} bytes, neither the image's nor the written copy",
                got.len()
            );
        }
        // Each image directory is at one of its names, with its entries.
        let dirs = lookup(&fs, ROOT_ID, "dirs").unwrap();
        for k in 0..DIRS {
            let at = lookup(&fs, dirs, &format!("d{k}"))
                .or_else(|_| lookup(&fs, ROOT_ID, &format!("m{k}")))
                .unwrap_or_else(|e| panic!("d{k} is nowhere: {e}"));
            let inner = lookup(&fs, at, "inner").unwrap();
            let x = lookup(&fs, inner, "x").unwrap();
            assert_eq!(read_all(&fs, x).unwrap(), content(k));
        }
    });
}

#[test]
fn a_killed_vmm_leaves_a_consistent_layer() {
    let tmp = tempfile::tempdir().unwrap();
    make_fixture(tmp.path());
    let exe = std::env::current_exe().unwrap();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for round in 0..8u64 {
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "fs_backends::layer::crash_tests::crash_worker",
                "--ignored",
                "--test-threads=1",
                "-q",
            ])
            .env(ENV, tmp.path())
            .env("GRIDNODE_LAYER_CRASH_SEED", round.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(150 + rng % 600));
        child.kill().unwrap();
        child.wait().unwrap();
        let report = super::check::check_layer(&tmp.path().join("layer"), false).unwrap();
        assert_eq!(report.foreign_devices, 0, "round {round}: {report}");
        // The next start fixes what the crash left, and serves whole files.
        verify(tmp.path());
        let after = super::check::check_layer(&tmp.path().join("layer"), false).unwrap();
        assert!(after.consistent(), "round {round}: {after}");
        assert_eq!(
            (after.stale_work, after.dangling_index),
            (0, 0),
            "round {round}: {after}"
        );
    }
    // The worker got somewhere.
    let upper = tmp.path().join("layer/upper/c");
    assert!(upper.exists(), "no copy-up happened in 8 rounds");
}
