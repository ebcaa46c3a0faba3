//! End-to-end through the `flist` CLI with a dir store: pack, unpack, ls, stat, cat, diff,
//! verify, and the bad-input cases (corrupt chunk, truncated image, failed pack).

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn flist(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flist"))
        .args(args)
        .env("FLIST_CACHE", "/nonexistent-unused")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = flist(args);
    assert!(
        o.status.success(),
        "flist {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let o = flist(args);
    assert!(!o.status.success(), "flist {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn pack_unpack_inspect_verify() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    sample_tree(&src);
    let store = format!("dir://{}", t.path().join("store").display());
    let img = t.path().join("a.flist");
    let cache = t.path().join("cache");
    let (imgs, cachs) = (img.to_str().unwrap(), cache.to_str().unwrap());
    let out = ok(&[
        "pack",
        src.to_str().unwrap(),
        "-o",
        imgs,
        "--store",
        &store,
        "--tag",
        "name=test",
    ]);
    assert!(
        out.contains("files") && out.contains("deduplicated") && out.contains("MB/s"),
        "{out}"
    );

    let dest = t.path().join("out");
    ok(&["unpack", imgs, dest.to_str().unwrap(), "--cache", cachs]);
    assert_same_tree(&src, &dest);
    assert_eq!(
        std::fs::read_link(dest.join("abs-link")).unwrap(),
        Path::new("/etc/passwd")
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(dest.join("sub/hard")).unwrap().ino(),
        std::fs::metadata(dest.join("small.txt")).unwrap().ino()
    );
    // Unpacking into a non-empty directory is refused.
    assert!(fails(&["unpack", imgs, dest.to_str().unwrap()]).contains("not empty"));

    let ls = ok(&["ls", imgs, "/sub", "-l"]);
    assert!(
        ls.contains("big.bin") && ls.contains("rel-link -> ../small.txt"),
        "{ls}"
    );
    assert!(ok(&["ls", imgs, "-R"]).contains("/sub/deeper/zeros"));
    let st = ok(&["stat", imgs, "/small.txt"]);
    assert!(
        st.contains("mode:   0604") && st.contains("links:  2"),
        "{st}"
    );
    assert_eq!(
        ok(&["cat", imgs, "/small.txt", "--no-cache"]),
        "hello flist\n"
    );
    assert!(fails(&["cat", imgs, "/nope"]).contains("/nope"));
    assert!(ok(&["info", imgs]).contains("tag name = test"));
    assert!(ok(&["verify", imgs]).contains("present and correct"));

    // A second version: one file changed, one added, one removed.
    std::fs::write(src.join("small.txt"), b"changed\n").unwrap();
    std::fs::write(src.join("new"), b"new").unwrap();
    std::fs::remove_file(src.join("empty")).unwrap();
    let img2 = t.path().join("b.flist");
    let out = ok(&[
        "pack",
        src.to_str().unwrap(),
        "-o",
        img2.to_str().unwrap(),
        "--store",
        &store,
    ]);
    assert!(out.contains("deduplicated"), "{out}");
    let d = ok(&["diff", imgs, img2.to_str().unwrap()]);
    assert!(
        d.contains("+ /new") && d.contains("- /empty") && d.contains("M /small.txt (content"),
        "{d}"
    );

    // Corrupt one chunk of big.bin in the store: verify names it, cat fails naming it.
    let image = flist_fs::meta::read_image(&img).unwrap();
    let big = image.inode(image.resolve("/sub/big.bin").unwrap()).unwrap();
    let id = big.chunks[1].id.to_hex();
    let chunk_path = t.path().join("store").join(&id[..2]).join(&id);
    std::fs::write(&chunk_path, b"rotten").unwrap();
    let v = flist(&["verify", imgs]);
    let vout = String::from_utf8_lossy(&v.stdout);
    assert!(
        !v.status.success()
            && vout.contains(&format!("CORRUPT {id}"))
            && vout.contains("/sub/big.bin"),
        "{vout}"
    );
    // (The image has blocked chunks: a read fetches its block by its place in the table.)
    let e = fails(&["cat", imgs, "/sub/big.bin", "--no-cache"]);
    assert!(
        e.contains(&id)
            && e.contains("ranged read returned")
            && e.contains("/sub/big.bin at offset"),
        "{e}"
    );
    std::fs::remove_file(&chunk_path).unwrap();
    let v = flist(&["verify", imgs]);
    assert!(String::from_utf8_lossy(&v.stdout).contains(&format!("MISSING {id}")));
}

#[test]
fn bad_images_and_failed_pack() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"data").unwrap();
    let store = format!("dir://{}", t.path().join("store").display());
    let img = t.path().join("x.flist");
    ok(&[
        "pack",
        src.to_str().unwrap(),
        "-o",
        img.to_str().unwrap(),
        "--store",
        &store,
    ]);
    let bytes = std::fs::read(&img).unwrap();
    let trunc = t.path().join("trunc.flist");
    std::fs::write(&trunc, &bytes[..bytes.len() - 5]).unwrap();
    let e = fails(&["ls", trunc.to_str().unwrap()]);
    assert!(e.contains("trunc.flist") && e.contains("truncated"), "{e}");
    let mut bad = bytes.clone();
    bad[60] ^= 0x55;
    std::fs::write(&trunc, &bad).unwrap();
    assert!(fails(&["ls", trunc.to_str().unwrap()]).contains("checksum"));

    // Store that cannot be written (its path is a file): pack fails, no image left.
    let blocker = t.path().join("blocker");
    std::fs::write(&blocker, b"").unwrap();
    let out = t.path().join("never.flist");
    let e = fails(&[
        "pack",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--store",
        &format!("dir://{}", blocker.display()),
    ]);
    assert!(e.contains("blocker"), "{e}");
    assert!(!out.exists());
    assert!(std::fs::read_dir(t.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".flist-tmp")));
    // Source that does not exist is named.
    assert!(fails(&[
        "pack",
        "/does/not/exist",
        "-o",
        out.to_str().unwrap(),
        "--store",
        &store
    ])
    .contains("/does/not/exist"));
}

#[test]
fn hostile_image_names_rejected_and_unpack_stays_inside() {
    use flist_fs::chunk::ChunkerKind;
    use flist_fs::meta::{encode_unvalidated, DirEntry, Image, Inode, InodeKind};
    let t = tempfile::tempdir().unwrap();
    let mut img = Image::new(ChunkerKind::default(), false);
    img.inodes.push(Inode::new(InodeKind::File, 0o644));
    img.inodes[0].entries.push(DirEntry {
        name: b"..".to_vec(),
        ino: 2,
    });
    let p = t.path().join("evil.flist");
    std::fs::write(&p, encode_unvalidated(&img, &p).unwrap()).unwrap();
    let e = fails(&[
        "unpack",
        p.to_str().unwrap(),
        t.path().join("o").to_str().unwrap(),
    ]);
    assert!(
        e.contains("evil.flist") && e.contains("invalid entry name \"..\""),
        "{e}"
    );
    img.inodes[0].entries[0].name = b"a/../../x".to_vec();
    std::fs::write(&p, encode_unvalidated(&img, &p).unwrap()).unwrap();
    assert!(fails(&["ls", p.to_str().unwrap()]).contains("invalid entry name"));

    // An absolute symlink is recreated as a link, never followed.
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, src.join("escape")).unwrap();
    let store = format!("dir://{}", t.path().join("store").display());
    let good = t.path().join("good.flist");
    ok(&[
        "pack",
        src.to_str().unwrap(),
        "-o",
        good.to_str().unwrap(),
        "--store",
        &store,
    ]);
    let dest = t.path().join("dest");
    ok(&["unpack", good.to_str().unwrap(), dest.to_str().unwrap()]);
    assert!(std::fs::symlink_metadata(dest.join("escape"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn encrypted_images_roundtrip_and_dedup() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let data = pseudo_random(200_000, 11);
    std::fs::write(src.join("a"), &data).unwrap();
    std::fs::write(src.join("b"), &data).unwrap();
    let store = format!("dir://{}", t.path().join("store").display());
    let img = t.path().join("enc.flist");
    let out = ok(&[
        "pack",
        src.to_str().unwrap(),
        "-o",
        img.to_str().unwrap(),
        "--store",
        &store,
        "--encrypt",
    ]);
    // Equal content under convergent encryption is stored once.
    assert!(
        out.contains("1 new") && out.contains("1 deduplicated"),
        "{out}"
    );
    assert!(ok(&["info", img.to_str().unwrap()]).contains("encrypted true"));
    let dest = t.path().join("out");
    ok(&[
        "unpack",
        img.to_str().unwrap(),
        dest.to_str().unwrap(),
        "--no-cache",
    ]);
    assert_eq!(std::fs::read(dest.join("b")).unwrap(), data);
    // Stored bytes are not the plaintext's zstd frame.
    let image = flist_fs::meta::read_image(&img).unwrap();
    let c = &image.inode(image.resolve("/a").unwrap()).unwrap().chunks[0];
    let hex = c.id.to_hex();
    let stored = std::fs::read(t.path().join("store").join(&hex[..2]).join(&hex)).unwrap();
    assert_ne!(&stored[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    assert!(ok(&["verify", img.to_str().unwrap()]).contains("present and correct"));
}

#[test]
fn unreadable_file_fails_pack_naming_it() {
    use std::os::unix::fs::PermissionsExt;
    // As root every file is readable, so run the pack as `nobody` through setpriv.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/setpriv").exists() {
        eprintln!("skipping: needs root and setpriv to drop privileges");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("ok"), b"fine").unwrap();
    std::fs::write(src.join("secret"), b"no").unwrap();
    std::fs::set_permissions(src.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = t.path().join("img.flist");
    let o = Command::new("/usr/bin/setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_flist"),
            "pack",
        ])
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .arg("--store")
        .arg(format!("dir://{}", t.path().join("store").display()))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("src/secret") && e.contains("Permission denied"),
        "{e}"
    );
    assert!(!out.exists());
}
