//! The layer through the host's FUSE: the same `Layer` the vmm serves a guest over virtio-fs,
//! mounted through `/dev/fuse` (fuse-backend-rs's fusedev session, `flist_fs::fs::mount`),
//! served by threads set up as the vmm's workers, with fsx at 100,000 operations and
//! pjdfstest run against the mount at host speed. (In a guest on the TCG test bed fsx runs
//! 10,000: `tests/tests/vmm_linux.rs`.) The tools come from FSX_BIN and PJDFSTEST_BIN
//! (scripts/setup.sh installs them, scripts/test.sh sets them); without them the test is
//! skipped, except under CI, where it fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e_tests::conformance;
use flist_fs::fs::mount::{mount_fs, MountOptions, Mounted};

use super::super::tests::{on_worker_thread, pack};
use super::super::Limits;
use crate::devices::virtio::fs::enter_fs_context;

/// fsx operations on the host mount (the bar).
const FSX_OPS: u32 = 100_000;
/// Bound of one tool's run, as the in-guest run's: far above what it takes (fsx 2.8 minutes on
/// a 2-core host at a load of 4, 9.3 at a load of 10, most of it fsx's own: its mapped reads
/// are never unmapped, so each truncate walks thousands of mappings; pjdfstest 2 s), and a
/// hang fails the test, not the CI job.
const TOOL_DEADLINE: Duration = Duration::from_secs(1800);

/// An image (with the directories the tools run in, and a file fsx starts from, so its first
/// change is a copy-up) under a fresh layer, mounted at `<tmp>/mnt`. The layer lives on tmpfs
/// (`/dev/shm`) when there is one: fsx syncs after each of its mapped writes, and what is
/// tested is the layer, not how fast the host's disk flushes (on this host's ext4, fsx alone
/// takes 2.7x as long as on tmpfs).
struct Mount {
    tmp: tempfile::TempDir,
    mounted: Option<Mounted>,
    /// FLUSH requests the layer has served.
    flushes: Arc<AtomicU64>,
}

impl Mount {
    fn new() -> Self {
        let shm = Path::new("/dev/shm");
        let tmp = if shm.is_dir() {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("fsx")).unwrap();
        std::fs::create_dir_all(src.join("pjd")).unwrap();
        let image_file: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(src.join("fsx/file"), image_file).unwrap();
        pack(
            &src,
            &tmp.path().join("img.flist"),
            &tmp.path().join("store"),
        );
        let fs = on_worker_thread(|| {
            super::super::layered_share(
                "t",
                &tmp.path().join("img.flist"),
                &tmp.path().join("layer"),
                Limits::default(),
                &tmp.path().join("cache"),
            )
            .unwrap()
        });
        let flushes = fs.inner().flushes.clone();
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let options = MountOptions {
            threads: 2,
            // pjdfstest acts as other users too; the kernel checks their permissions.
            allow_other: true,
            readonly: false,
            thread_start: Some(enter_fs_context),
        };
        let mounted = mount_fs(fs, &mnt, &options).unwrap();
        Self {
            tmp,
            mounted: Some(mounted),
            flushes,
        }
    }

    /// `rel` in the mount.
    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join("mnt").join(rel)
    }

    /// `rel` in the layer's upper directory (on the host, beside the mount).
    fn upper(&self, rel: &str) -> PathBuf {
        self.tmp.path().join("layer/upper").join(rel)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mounted) = self.mounted.take() {
            if let Err(e) = mounted.unmount() {
                eprintln!("unmounting {}: {e}", self.tmp.path().display());
            }
        }
    }
}

/// Runs `cmd` to its end, or kills it at the deadline (and fails).
fn run(mut cmd: Command, deadline: Duration) -> Output {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {:?}: {e}", cmd.get_program()));
    // Drain both pipes meanwhile (pjdfstest writes more than a pipe holds).
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut v);
        v
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{:?} did not finish within {deadline:?}; its output:\n{}",
                cmd.get_program(),
                String::from_utf8_lossy(&out.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// The name of the user `user`'s group, from the host's databases.
fn group_of(user: &str) -> Option<String> {
    let name = std::ffi::CString::new(user).ok()?;
    // SAFETY: NUL-terminated name; the records are read at once, before any other lookup on
    // this thread could overwrite them.
    unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() {
            return None;
        }
        let gr = libc::getgrgid((*pw).pw_gid);
        if gr.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr((*gr).gr_name)
                .to_str()
                .ok()?
                .to_owned(),
        )
    }
}

/// pjdfstest's configuration: the two host users (with their own groups) it acts as instead
/// of its default `nobody` and `tests` (no host has the latter), and a short nap between the
/// changes whose times it compares (the host clock has nanoseconds).
fn pjdfstest_config(dir: &Path) -> PathBuf {
    let users: Vec<(&str, String)> = ["nobody", "daemon"]
        .into_iter()
        .map(|u| {
            (
                u,
                group_of(u).unwrap_or_else(|| panic!("the host has no user {u}")),
            )
        })
        .collect();
    let entries: Vec<String> = users
        .iter()
        .map(|(u, g)| format!("[\"{u}\", \"{g}\"]"))
        .collect();
    let path = dir.join("pjdfstest.toml");
    std::fs::write(
        &path,
        format!(
            "[settings]\nnaptime = 0.01\n\n[dummy_auth]\nentries = [{}]\n",
            entries.join(", ")
        ),
    )
    .unwrap();
    path
}

fn tool(test: &str, var: &str) -> Option<PathBuf> {
    e2e_tests::skip_if_missing(test, conformance::tool(var)).unwrap()
}

#[test]
fn fsx_100k_operations_through_host_fuse() {
    let Some(fsx) = tool("fsx_100k_operations_through_host_fuse", "FSX_BIN") else {
        return;
    };
    let mount = Mount::new();
    let file = mount.path("fsx/file");
    let started = Instant::now();
    let mut cmd = Command::new(&fsx);
    cmd.args(["-N", &FSX_OPS.to_string(), "-S", "7", "-q"])
        .arg(&file)
        .current_dir(mount.path("fsx"));
    let out = run(cmd, TOOL_DEADLINE);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "fsx: {FSX_OPS} operations in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    conformance::check_fsx(out.status.code(), &text).unwrap();
    // The operations went through the layer: the image's file was copied up and changed.
    let upper = std::fs::symlink_metadata(mount.upper("fsx/file"))
        .expect("fsx's file has no copy in the layer: fsx did not run on the mount");
    let mounted = std::fs::symlink_metadata(&file).unwrap();
    assert_eq!(upper.len(), mounted.len());
}

#[test]
fn pjdfstest_through_host_fuse() {
    let Some(pjdfstest) = tool("pjdfstest_through_host_fuse", "PJDFSTEST_BIN") else {
        return;
    };
    let mount = Mount::new();
    let started = Instant::now();
    let config = pjdfstest_config(mount.tmp.path());
    let mut cmd = Command::new(&pjdfstest);
    cmd.arg("-c")
        .arg(&config)
        .arg("-p")
        .arg(mount.path("pjd"))
        .current_dir(mount.path("pjd"));
    let out = run(cmd, TOOL_DEADLINE);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "pjdfstest: {:.1} s\n{}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = conformance::pjdfstest_summary(&text);
    eprintln!(
        "pjdfstest: {} ok, failed: {:?}",
        summary.passed, summary.failed
    );
    summary.check().unwrap();
    for (known, reason) in summary.known_passing() {
        eprintln!("note: known pjdfstest failure {known} ({reason}) passes now");
    }
    assert!(Path::new(&mount.upper("pjd")).is_dir());
}

/// The kernel's closes send the layer no FLUSH (each would be a round trip doing nothing: see
/// `Layer::no_flush`): closes of an image file read, of a file created and read back, of an
/// image file changed (so copied up) and of the copy read back. The counter is the layer's
/// own; the data read back and the copy in the upper directory show the requests were served.
#[test]
fn closes_send_no_flush() {
    let m = Mount::new();
    let image = m.path("fsx/file");
    assert_eq!(std::fs::read(&image).unwrap().len(), 256 * 1024);
    std::fs::write(m.path("pjd/new"), b"new file").unwrap();
    assert_eq!(std::fs::read(m.path("pjd/new")).unwrap(), b"new file");
    std::fs::File::options()
        .append(true)
        .open(&image)
        .unwrap()
        .write_all(b"x")
        .unwrap();
    assert_eq!(std::fs::read(&image).unwrap().len(), 256 * 1024 + 1);
    assert_eq!(
        std::fs::metadata(m.upper("fsx/file")).unwrap().len(),
        256 * 1024 + 1
    );
    assert_eq!(
        m.flushes.load(Ordering::Relaxed),
        0,
        "FLUSH requests for 6 closes"
    );
}
