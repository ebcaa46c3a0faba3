//! What a new user trips over, through the `flist` CLI: extended attributes of symlinks,
//! device nodes with several hard links unpacked without privileges, a failed unpack (nothing
//! left behind, the file and offset named), store URLs checked where they are typed, `verify`
//! telling missing, unreachable and corrupt chunks apart, `ls -l` of special modes and devices,
//! and the small things: one OS message per error, image files that follow the umask, a
//! bounded `--fixed-kib`, no colour codes in a pipe.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn flist(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flist"));
    cmd.args(args).env("FLIST_CACHE", "/nonexistent-unused");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("running flist")
}

fn ok(args: &[&str]) -> String {
    let o = run(&mut flist(args));
    assert!(
        o.status.success(),
        "flist {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(args: &[&str]) -> String {
    let o = run(&mut flist(args));
    assert!(!o.status.success(), "flist {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

struct Packed {
    _dir: tempfile::TempDir,
    root: PathBuf,
    image: String,
    store: String,
}

/// Packs the tree `make` builds into an image with a dir store.
fn packed(make: impl FnOnce(&Path)) -> Packed {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let src = root.join("src");
    std::fs::create_dir(&src).unwrap();
    make(&src);
    let store = format!("dir://{}", root.join("store").display());
    let image = root.join("a.flist").display().to_string();
    ok(&[
        "pack",
        src.to_str().unwrap(),
        "-o",
        &image,
        "--store",
        &store,
    ]);
    Packed {
        _dir: dir,
        root,
        image,
        store,
    }
}

fn mknod(path: &Path, kind: libc::mode_t, major: u32, minor: u32) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::mknod(c.as_ptr(), kind | 0o644, libc::makedev(major, minor)) };
    assert_eq!(rc, 0, "mknod {}", std::io::Error::last_os_error());
}

#[test]
fn symlink_xattrs_are_packed_and_restored() {
    if !is_root() {
        eprintln!("skipped: only root may set a trusted.* attribute on a symlink");
        return;
    }
    let p = packed(|src| {
        std::os::unix::fs::symlink("target", src.join("link")).unwrap();
        // Linux refuses user.* attributes on symlinks; trusted.* and security.* are allowed.
        xattr::set(
            src.join("link"),
            "trusted.label",
            b"system_u:object_r:bin_t",
        )
        .unwrap();
    });
    let stat = ok(&["stat", &p.image, "/link"]);
    assert!(stat.contains("trusted.label"), "{stat}");
    let out = p.root.join("out");
    ok(&["unpack", &p.image, out.to_str().unwrap()]);
    assert_eq!(
        xattr::get(out.join("link"), "trusted.label").unwrap(),
        Some(b"system_u:object_r:bin_t".to_vec())
    );
    assert!(std::fs::symlink_metadata(out.join("link"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn a_device_with_two_links_is_skipped_whole_without_privileges() {
    if !is_root() {
        eprintln!("skipped: making the device node to pack needs root");
        return;
    }
    let p = packed(|src| {
        mknod(&src.join("null"), libc::S_IFCHR, 1, 3);
        std::fs::hard_link(src.join("null"), src.join("null2")).unwrap();
        std::fs::write(src.join("file"), b"kept").unwrap();
    });
    // Everything the unprivileged user needs is readable and the destination writable.
    for entry in walk(&p.root) {
        let mode = if entry.is_dir() { 0o777 } else { 0o644 };
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let out = p.root.join("out");
    let cache = p.root.join("cache");
    let o = run(flist(&["unpack", &p.image, out.to_str().unwrap()])
        .args(["--cache", cache.to_str().unwrap()])
        .uid(65534)
        .gid(65534));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert_eq!(std::fs::read(out.join("file")).unwrap(), b"kept");
    assert!(!out.join("null").exists() && !out.join("null2").exists());
    for name in ["null", "null2"] {
        assert!(
            stdout.contains(&format!(
                "skipped (needs privileges): {}",
                out.join(name).display()
            )),
            "{stdout}"
        );
    }
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    if root.is_dir() {
        for e in std::fs::read_dir(root).unwrap() {
            out.extend(walk(&e.unwrap().path()));
        }
    }
    out
}

/// The chunk files of a dir store.
fn chunk_files(store: &Path) -> Vec<PathBuf> {
    walk(store).into_iter().filter(|p| p.is_file()).collect()
}

#[test]
fn a_failed_unpack_leaves_nothing_and_names_the_file_and_offset() {
    let p = packed(|src| {
        std::fs::write(src.join("a-small"), b"first").unwrap();
        std::fs::write(src.join("big"), common::pseudo_random(3 << 20, 5)).unwrap();
    });
    let stat = ok(&["stat", &p.image, "/big"]);
    // The second chunk of /big: its id and offset from `stat`.
    let second = stat
        .lines()
        .filter_map(|l| l.trim().strip_prefix(""))
        .filter(|l| l.contains(" @"))
        .nth(1)
        .expect("big has several chunks")
        .to_string();
    let (id, rest) = second.split_once(" @").unwrap();
    let offset = rest.split_once(' ').unwrap().0;
    let victim = chunk_files(&p.root.join("store"))
        .into_iter()
        .find(|f| f.to_string_lossy().contains(id))
        .expect("the chunk's file");
    std::fs::write(&victim, b"garbage").unwrap();

    let out = p.root.join("out");
    let e = fails(&["unpack", &p.image, out.to_str().unwrap()]);
    assert!(e.contains("nothing was written"), "{e}");
    assert!(
        e.contains("big") && e.contains(&format!("at offset {offset}")),
        "{e}"
    );
    assert!(
        !out.exists(),
        "a partial tree was left at {}",
        out.display()
    );
    let leftovers: Vec<_> = std::fs::read_dir(&p.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("unpacking"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // An existing empty destination stays, empty.
    std::fs::create_dir(&out).unwrap();
    fails(&["unpack", &p.image, out.to_str().unwrap()]);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
}

#[test]
fn store_urls_are_checked_where_they_are_typed() {
    let p = packed(|src| std::fs::write(src.join("f"), b"x").unwrap());
    let before = std::fs::read(&p.image).unwrap();
    let e = fails(&["set-stores", &p.image, "--store", "dri://x"]);
    assert!(e.contains("dri://x") && e.contains("unknown scheme"), "{e}");
    let e = fails(&["set-stores", &p.image, "--store", "/srv/store"]);
    assert!(e.contains("dir:///srv/store"), "{e}");
    assert!(!e.contains("<unparseable"), "{e}");
    assert_eq!(
        std::fs::read(&p.image).unwrap(),
        before,
        "the image changed"
    );
    let src = p.root.join("src");
    let e = fails(&[
        "pack",
        src.to_str().unwrap(),
        "-o",
        p.root.join("b.flist").to_str().unwrap(),
        "--store",
        "htp://h/",
    ]);
    assert!(e.contains("unknown scheme"), "{e}");
    ok(&["set-stores", &p.image, "--store", &p.store]);
}

#[test]
fn verify_tells_missing_unreachable_and_corrupt_apart() {
    let p = packed(|src| {
        for i in 0..3u64 {
            std::fs::write(
                src.join(format!("f{i}")),
                common::pseudo_random(1000, 2 * i + 1),
            )
            .unwrap();
        }
    });
    assert!(ok(&["verify", &p.image]).contains("present and correct"));
    let chunks = chunk_files(&p.root.join("store"));
    assert_eq!(chunks.len(), 3);
    std::fs::remove_file(&chunks[0]).unwrap();
    std::fs::write(&chunks[1], b"not the chunk").unwrap();
    let o = run(&mut flist(&["verify", &p.image]));
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert_eq!(out.matches("MISSING").count(), 1, "{out}");
    assert_eq!(out.matches("CORRUPT").count(), 1, "{out}");
    assert!(
        err.contains("1 copies missing, 0 unreachable, 1 corrupt"),
        "{err}"
    );

    // A store nobody answers on: every chunk unreachable, none called corrupt or missing.
    let port = common::free_port();
    let o = run(&mut flist(&[
        "verify",
        &p.image,
        "--store",
        &format!("http://127.0.0.1:{port}/"),
    ]));
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(out.matches("UNREACHABLE").count(), 3, "{out}");
    assert!(
        !out.contains("CORRUPT") && !out.contains("MISSING"),
        "{out}"
    );
    assert!(
        err.contains("0 copies missing, 3 unreachable, 0 corrupt"),
        "{err}"
    );
}

#[test]
fn ls_shows_special_modes_and_device_numbers() {
    let root = is_root();
    let p = packed(|src| {
        std::fs::write(src.join("suid"), b"x").unwrap();
        std::fs::set_permissions(src.join("suid"), std::fs::Permissions::from_mode(0o4755))
            .unwrap();
        std::fs::create_dir(src.join("tmp")).unwrap();
        std::fs::set_permissions(src.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        if root {
            mknod(&src.join("sda1"), libc::S_IFBLK, 8, 1);
        }
    });
    let ls = ok(&["ls", &p.image, "-l"]);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("-rwsr-xr-x") && l.ends_with("suid")),
        "{ls}"
    );
    assert!(
        ls.lines()
            .any(|l| l.starts_with("drwxrwxrwt") && l.ends_with("tmp")),
        "{ls}"
    );
    if root {
        let dev = ls.lines().find(|l| l.ends_with("sda1")).unwrap_or_default();
        assert!(
            dev.starts_with("brw-r--r--") && dev.contains("8, 1"),
            "{ls}"
        );
        assert!(ok(&["stat", &p.image, "/sda1"]).contains("device: 8, 1"));
    }
}

#[test]
fn small_things_a_new_user_notices() {
    // One OS message per error.
    let e = fails(&["ls", "/nonexistent/x.flist"]);
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");

    // An image file follows the umask, as any file a tool writes does.
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"x").unwrap();
    let image = t.path().join("a.flist");
    let store = format!("dir://{}", t.path().join("store").display());
    let mut cmd = flist(&["pack", src.to_str().unwrap(), "-o", image.to_str().unwrap()]);
    cmd.args(["--store", &store]);
    // SAFETY: umask in the child before exec has no preconditions.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    assert!(run(&mut cmd).status.success());
    assert_eq!(std::fs::metadata(&image).unwrap().mode() & 0o777, 0o644);

    // A chunk size that does not fit is refused, not wrapped.
    let e = fails(&[
        "pack",
        src.to_str().unwrap(),
        "-o",
        t.path().join("b.flist").to_str().unwrap(),
        "--store",
        &store,
        "--fixed-kib",
        "99999999",
    ]);
    assert!(
        e.contains("--fixed-kib 99999999") && e.contains("KiB"),
        "{e}"
    );
    assert!(!e.contains("4294967295"), "{e}");

    // Log lines written to a pipe carry no colour codes.
    let c = t.path().join("c.flist");
    let o = run(
        flist(&["pack", src.to_str().unwrap(), "-o", c.to_str().unwrap()])
            .args(["--store", &store])
            .env("FLIST_LOG", "debug"),
    );
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("packed file"), "no log line to check: {log}");
    assert!(!o.stderr.contains(&0x1b), "{log}");
}

/// Builds `levels` directories of 200-byte names below `root` (with *at calls: the path is
/// too long for the others) and a file `deep` at the bottom; returns the names.
fn deep_tree(root: &Path, levels: usize) -> Vec<Vec<u8>> {
    use flist_fs::dirfd;
    let names: Vec<Vec<u8>> = (0..levels)
        .map(|i| format!("{i:03}{}", "d".repeat(197)).into_bytes())
        .collect();
    let mut dir = dirfd::open_dir(root).unwrap();
    for name in &names {
        let c = dirfd::cname(name).unwrap();
        dirfd::mkdir_at(&dir, &c, 0o755).unwrap();
        dir = dirfd::open_dir_at(&dir, &c).unwrap();
    }
    let mut f = dirfd::create_file_at(&dir, c"deep").unwrap();
    std::io::Write::write_all(&mut f, b"at the bottom").unwrap();
    names
}

/// Reads `deep` at the bottom of `names` below `root`.
fn read_deep(root: &Path, names: &[Vec<u8>]) -> Vec<u8> {
    use flist_fs::dirfd;
    let mut dir = dirfd::open_dir(root).unwrap();
    for name in names {
        dir = dirfd::open_dir_at(&dir, &dirfd::cname(name).unwrap()).unwrap();
    }
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut dirfd::open_file_at(&dir, c"deep").unwrap(), &mut out).unwrap();
    out
}

#[test]
fn trees_deeper_than_path_max_with_their_prefix_round_trip() {
    let t = tempfile::tempdir().unwrap();
    // A long prefix: with it, the deepest path is over 4096 bytes (PATH_MAX), while the
    // image's own paths stay within the format's 4095.
    let base = t.path().join("p".repeat(200)).join("q".repeat(200));
    let src = base.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let names = deep_tree(&src, 19);
    let deepest = src.as_os_str().len() + names.iter().map(|n| n.len() + 1).sum::<usize>() + 5;
    assert!(deepest > 4096, "{deepest}");
    let image = t.path().join("deep.flist");
    let store = format!("dir://{}", t.path().join("store").display());
    ok(&[
        "pack",
        src.to_str().unwrap(),
        "-o",
        image.to_str().unwrap(),
        "--store",
        &store,
    ]);
    let out = base.join("out");
    ok(&["unpack", image.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(read_deep(&out, &names), b"at the bottom");

    // Deeper than the format allows: refused with the limit named, not ENAMETOOLONG.
    let src2 = base.join("src2");
    std::fs::create_dir(&src2).unwrap();
    deep_tree(&src2, 21);
    let e = fails(&[
        "pack",
        src2.to_str().unwrap(),
        "-o",
        t.path().join("deeper.flist").to_str().unwrap(),
        "--store",
        &store,
    ]);
    assert!(e.contains("exceeds the limit of 4095"), "{e}");
    assert!(!e.contains("File name too long"), "{e}");
}
