//! Every tree round-trips exactly: a generated tree with every file type, every metadata field
//! the format keeps (mode with setuid/setgid/sticky, owner, nanosecond mtimes of every entry,
//! device numbers, symlink targets), sparse files, hard links of every type, extended
//! attributes on every type, deep paths and non-UTF-8 names is packed, then unpacked as root
//! and as an unprivileged user and mounted through FUSE; each result is compared entry by
//! entry with the source (what an unprivileged user cannot make is listed, not ignored).

mod common;

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn c(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn set_time(path: &Path, secs: i64, nsecs: i64) {
    let t = libc::timespec {
        tv_sec: secs,
        tv_nsec: nsecs,
    };
    // SAFETY: a valid path and two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c(path).as_ptr(),
            [t, t].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}", path.display());
}

fn lchown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

fn mknod(path: &Path, mode: u32, dev: u64) {
    // SAFETY: a valid path.
    let rc = unsafe { libc::mknod(c(path).as_ptr(), mode, dev) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn name(bytes: &[u8]) -> OsString {
    OsString::from_vec(bytes.to_vec())
}

/// Builds the tree (root only: owners, devices and trusted.* attributes need it).
fn build(root: &Path) {
    let deep = (0..12).fold(root.join("deep"), |p, i| p.join(format!("level-{i:02}")));
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("bottom"), b"deep").unwrap();
    let weird = root.join(name(b"caf\xe9-\xff\xfe"));
    std::fs::create_dir(&weird).unwrap();
    std::fs::write(weird.join(name(b"\x01\x7f\xc3\x28")), b"non-utf8").unwrap();

    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::write(root.join("big"), common::pseudo_random(5 << 20, 11)).unwrap();
    let sparse = std::fs::File::create(root.join("sparse")).unwrap();
    sparse.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"middle", 20 << 20).unwrap();
    drop(sparse);
    std::fs::write(root.join("suid"), b"#!/bin/sh\n").unwrap();
    lchown(&root.join("suid"), 1234, 5678);
    std::fs::set_permissions(root.join("suid"), PermissionsExt::from_mode(0o4755)).unwrap();
    std::fs::write(root.join("nothing"), b"no permissions").unwrap();
    std::fs::set_permissions(root.join("nothing"), PermissionsExt::from_mode(0o000)).unwrap();
    std::fs::create_dir(root.join("shared")).unwrap();
    std::fs::set_permissions(root.join("shared"), PermissionsExt::from_mode(0o2775)).unwrap();
    std::fs::create_dir(root.join("tmp")).unwrap();
    std::fs::set_permissions(root.join("tmp"), PermissionsExt::from_mode(0o1777)).unwrap();

    std::os::unix::fs::symlink("big", root.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("no/such/target", root.join("dangling")).unwrap();
    std::os::unix::fs::symlink("x".repeat(4000), root.join("long-target")).unwrap();
    mknod(&root.join("fifo"), libc::S_IFIFO | 0o640, 0);
    mknod(&root.join("socket"), libc::S_IFSOCK | 0o600, 0);
    mknod(
        &root.join("null"),
        libc::S_IFCHR | 0o666,
        libc::makedev(1, 3),
    );
    mknod(
        &root.join("disk"),
        libc::S_IFBLK | 0o660,
        libc::makedev(259, 70000),
    );
    lchown(&root.join("disk"), 0, 6);

    // Hard links of every type that has them (directories have none).
    let links = root.join("links");
    std::fs::create_dir(&links).unwrap();
    for (src, dst) in [
        ("big", "big-2"),
        ("big", "big-3"),
        ("rel-link", "symlink-2"),
        ("fifo", "fifo-2"),
        ("socket", "socket-2"),
        ("null", "null-2"),
        ("disk", "disk-2"),
    ] {
        std::fs::hard_link(root.join(src), links.join(dst)).unwrap();
    }
    std::fs::hard_link(root.join("empty"), deep.join("empty-2")).unwrap();

    // Extended attributes on every type: user.* where Linux allows it (files, directories),
    // trusted.* everywhere.
    for (entry, user) in [
        ("big", true),
        ("shared", true),
        ("rel-link", false),
        ("fifo", false),
        ("socket", false),
        ("null", false),
        ("disk", false),
        ("sparse", true),
    ] {
        let p = root.join(entry);
        if user {
            xattr::set(&p, "user.note", format!("note of {entry}").as_bytes()).unwrap();
        }
        xattr::set(&p, "trusted.label", b"\x00binary\xff").unwrap();
    }
    xattr::set(root.join("big"), "user.empty", b"").unwrap();

    // Owners and nanosecond times on everything, bottom-up so directories keep theirs.
    let mut all = walk(root);
    all.reverse();
    for (i, p) in all.iter().enumerate() {
        let md = std::fs::symlink_metadata(p).unwrap();
        if !md.file_type().is_symlink() && p.file_name() != Some(OsStr::new("suid")) {
            lchown(p, 1000 + i as u32 % 3, 2000 + i as u32 % 5);
        }
        set_time(
            p,
            1_600_000_000 + i as i64 * 7,
            (i as i64 * 123_456_789) % 1_000_000_000,
        );
    }
}

/// Every path below `root` (not `root`), parents before children.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for p in names {
        out.push(p.clone());
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walk(&p));
        }
    }
    out
}

/// What a tree holds at one path, as compared.
#[derive(Debug, PartialEq)]
struct Entry {
    mode: u32,
    owner: Option<(u32, u32)>,
    mtime: (i64, i64),
    rdev: u64,
    size: u64,
    content: Option<Vec<u8>>,
    target: Option<PathBuf>,
    xattrs: BTreeMap<OsString, Vec<u8>>,
    /// The first path (relative) of the entry's inode: hard links share it.
    link_group: PathBuf,
    nlink: u64,
    /// Bytes allocated, in 1 MiB units (a sparse file's are far below its size).
    allocated_mib: u64,
}

/// The entries of a tree by relative path; `owners` and `trusted` say what to compare.
fn snapshot(root: &Path, owners: bool, trusted: bool) -> BTreeMap<PathBuf, Entry> {
    let mut groups: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for p in walk(root) {
        let rel = p.strip_prefix(root).unwrap().to_path_buf();
        let md = std::fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let xattrs = xattr::list(&p)
            .map(|names| {
                names
                    .filter(|n| trusted || !n.as_bytes().starts_with(b"trusted."))
                    .filter(|n| !n.as_bytes().starts_with(b"security."))
                    .map(|n| {
                        let v = xattr::get(&p, &n).unwrap().unwrap_or_default();
                        (n, v)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let link_group = groups
            .entry((md.dev(), md.ino()))
            .or_insert_with(|| rel.clone())
            .clone();
        out.insert(
            rel,
            Entry {
                mode: md.mode(),
                owner: owners.then(|| (md.uid(), md.gid())),
                mtime: (md.mtime(), md.mtime_nsec()),
                rdev: md.rdev(),
                size: if ft.is_dir() { 0 } else { md.size() },
                content: ft.is_file().then(|| std::fs::read(&p).unwrap()),
                target: ft.is_symlink().then(|| std::fs::read_link(&p).unwrap()),
                xattrs,
                link_group,
                nlink: if ft.is_dir() { 0 } else { md.nlink() },
                allocated_mib: if ft.is_file() {
                    (md.blocks() * 512) >> 20
                } else {
                    0
                },
            },
        );
    }
    out
}

fn assert_same(what: &str, want: &BTreeMap<PathBuf, Entry>, got: &BTreeMap<PathBuf, Entry>) {
    let names = |m: &BTreeMap<PathBuf, Entry>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(want), names(got), "{what}: entries");
    for (path, w) in want {
        assert_eq!(Some(w), got.get(path), "{what}: {}", path.display());
    }
}

fn flist(args: &[&OsStr]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flist"));
    cmd.args(args);
    cmd
}

fn run_ok(cmd: &mut Command) {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn every_tree_round_trips_exactly() {
    if !is_root() {
        eprintln!("skipped: building the tree (owners, devices, trusted.* attributes) needs root");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    build(&src);
    let source = snapshot(&src, true, true);
    assert!(
        source.len() >= 40,
        "the tree was not built: {}",
        source.len()
    );
    assert!(
        source[Path::new("sparse")].allocated_mib < 4,
        "the source is not sparse"
    );

    let image = t.path().join("all.flist");
    let store = format!("dir://{}", t.path().join("store").display());
    let cache = t.path().join("cache");
    run_ok(&mut flist(&[
        OsStr::new("pack"),
        src.as_os_str(),
        OsStr::new("-o"),
        image.as_os_str(),
        OsStr::new("--store"),
        OsStr::new(&store),
    ]));

    // As root: everything, owners included.
    let out = t.path().join("out-root");
    run_ok(&mut flist(&[
        OsStr::new("unpack"),
        image.as_os_str(),
        out.as_os_str(),
        OsStr::new("--cache"),
        cache.as_os_str(),
    ]));
    assert_same("unpacked as root", &source, &snapshot(&out, true, true));

    // As an unprivileged user: everything but owners, device nodes and trusted.* attributes,
    // which it cannot make (and which unpack lists as skipped).
    let user = t.path().join("user");
    std::fs::create_dir(&user).unwrap();
    std::fs::set_permissions(&user, PermissionsExt::from_mode(0o777)).unwrap();
    for p in [
        t.path().to_path_buf(),
        t.path().join("store"),
        cache.clone(),
    ] {
        std::fs::set_permissions(&p, PermissionsExt::from_mode(0o777)).unwrap();
    }
    for p in walk(&t.path().join("store"))
        .into_iter()
        .chain(walk(&cache))
    {
        let mode = if p.is_dir() { 0o777 } else { 0o666 };
        std::fs::set_permissions(&p, PermissionsExt::from_mode(mode)).unwrap();
    }
    std::fs::set_permissions(&image, PermissionsExt::from_mode(0o644)).unwrap();
    let out_user = user.join("out");
    let o = flist(&[
        OsStr::new("unpack"),
        image.as_os_str(),
        out_user.as_os_str(),
        OsStr::new("--cache"),
        user.join("cache").as_os_str(),
    ])
    .uid(65534)
    .gid(65534)
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut want = snapshot(&src, false, false);
    let devices = ["null", "disk", "links/null-2", "links/disk-2"];
    for d in devices {
        assert!(want.remove(Path::new(d)).is_some(), "{d}");
        assert!(
            stdout.contains(&format!(
                "skipped (needs privileges): {}",
                out_user.join(d).display()
            )),
            "{d} not listed as skipped: {stdout}"
        );
    }
    // Unpacked without privileges, a directory may not be made setgid for a group the user is
    // not in: the kernel clears it. Everything else must match.
    if let Some(shared) = want.get_mut(Path::new("shared")) {
        shared.mode &= !0o2000;
    }
    let mut got = snapshot(&out_user, false, false);
    if let Some(shared) = got.get_mut(Path::new("shared")) {
        shared.mode &= !0o2000;
    }
    assert_same("unpacked as nobody", &want, &got);

    // Mounted: what the kernel sees through FUSE.
    let opts = flist_fs::open::OpenOptions {
        cache_dir: Some(t.path().join("mount-cache")),
        ..Default::default()
    };
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    if !Path::new("/dev/fuse").exists() {
        eprintln!("no /dev/fuse: the mount is not compared");
        return;
    }
    let fs = flist_fs::fs::FlistFs::open(&image, &opts).unwrap();
    let mounted = flist_fs::fs::mount::mount(fs, &mnt, 2).unwrap();
    let result = std::panic::catch_unwind(|| snapshot(&mnt, true, true));
    mounted.unmount().unwrap();
    match result {
        Ok(seen) => assert_same("mounted", &source, &seen),
        Err(e) => std::panic::resume_unwind(e),
    }
}
