//! OCI import: an image-layout directory and a `docker save` tarball built by the test, with
//! two layers (gzip and plain) exercising whiteouts, opaque directories, hard links and
//! symlinks; and a hostile layer with `..` in a path.

mod common;

use flist_fs::open::{open_image, OpenOptions};
use flist_fs::pack::PackOptions;
use flist_fs::store::Router;
use sha2::{Digest, Sha256};
use std::path::Path;

fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h
}

fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut h = header(path, tar::EntryType::Regular, data.len() as u64, 0o644);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn special(b: &mut tar::Builder<Vec<u8>>, path: &str, kind: tar::EntryType, link: Option<&str>) {
    let mut h = header(path, kind, 0, 0o755);
    if let Some(l) = link {
        h.set_link_name(l).unwrap();
    }
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
}

fn layers() -> (Vec<u8>, Vec<u8>) {
    let mut l1 = tar::Builder::new(Vec::new());
    special(&mut l1, "etc/", tar::EntryType::Directory, None);
    file(&mut l1, "etc/conf", b"v1");
    file(&mut l1, "bin/tool", &common::pseudo_random(300_000, 9));
    special(&mut l1, "bin/tool2", tar::EntryType::Link, Some("bin/tool"));
    special(
        &mut l1,
        "usr/link",
        tar::EntryType::Symlink,
        Some("../bin/tool"),
    );
    file(&mut l1, "opt/keep/a", b"a");
    file(&mut l1, "opt/keep/b", b"b");
    let l1 = l1.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &l1).unwrap();
    let l1 = gz.finish().unwrap();

    let mut l2 = tar::Builder::new(Vec::new());
    file(&mut l2, "etc/.wh.conf", b"");
    file(&mut l2, "opt/keep/c", b"c");
    file(&mut l2, "opt/keep/.wh..wh..opq", b"");
    file(&mut l2, "new/file", b"fresh");
    (l1, l2.into_inner().unwrap())
}

const CONFIG: &[u8] = br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/bin/tool"],"Cmd":["--serve"],"Env":["PATH=/bin"],"WorkingDir":"/opt"}}"#;

fn sha(d: &[u8]) -> String {
    Sha256::digest(d)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn write_layout(root: &Path, layers: &[&[u8]]) {
    let blobs = root.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |d: &[u8]| {
        let h = sha(d);
        std::fs::write(blobs.join(&h), d).unwrap();
        format!("sha256:{h}")
    };
    let config = put(CONFIG);
    let descs: Vec<String> = layers
        .iter()
        .map(|l| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{}}}"#, put(l), l.len()))
        .collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[{}]}}"#,
        descs.join(",")
    );
    let m = put(manifest.as_bytes());
    std::fs::write(
        root.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{m}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"v1"}}}}]}}"#,
            manifest.len()
        ),
    )
    .unwrap();
    std::fs::write(root.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

fn check(img: &Path, t: &Path) {
    let (image, source) = open_image(img, &OpenOptions::default()).unwrap();
    let paths: Vec<String> = image
        .walk()
        .into_iter()
        .map(|(p, _)| String::from_utf8(p).unwrap())
        .collect();
    assert!(!paths.contains(&"/etc/conf".to_string()), "{paths:?}");
    assert!(paths.contains(&"/etc".to_string()));
    assert!(
        !paths
            .iter()
            .any(|p| p == "/opt/keep/a" || p == "/opt/keep/b"),
        "{paths:?}"
    );
    assert!(paths.contains(&"/opt/keep/c".to_string()) && paths.contains(&"/new/file".to_string()));
    assert_eq!(
        image.resolve("/bin/tool").unwrap(),
        image.resolve("/bin/tool2").unwrap()
    );
    let link = image.inode(image.resolve("/usr/link").unwrap()).unwrap();
    assert_eq!(link.target, b"../bin/tool");
    assert_eq!(
        image.tags.get("oci.entrypoint").map(String::as_str),
        Some(r#"["/bin/tool"]"#)
    );
    assert_eq!(
        image.tags.get("oci.env").map(String::as_str),
        Some(r#"["PATH=/bin"]"#)
    );
    assert_eq!(
        image.tags.get("oci.workdir").map(String::as_str),
        Some("/opt")
    );
    let dest = t.join(format!(
        "out-{}",
        img.file_name().unwrap().to_string_lossy()
    ));
    flist_fs::unpack::unpack(&image, &source, &dest, &Default::default()).unwrap();
    assert_eq!(
        std::fs::read(dest.join("bin/tool")).unwrap(),
        common::pseudo_random(300_000, 9)
    );
    assert_eq!(std::fs::read(dest.join("new/file")).unwrap(), b"fresh");
}

#[test]
fn import_layout_and_docker_archive() {
    let t = tempfile::tempdir().unwrap();
    let (l1, l2) = layers();
    let router =
        Router::from_specs(&[format!("dir://{}", t.path().join("store").display())]).unwrap();
    let opts = PackOptions::default();

    let layout = t.path().join("layout");
    write_layout(&layout, &[&l1, &l2]);
    let img = t.path().join("layout.flist");
    flist_fs::oci::import(&layout, &img, &router, &opts, Some("v1")).unwrap();
    check(&img, t.path());
    let e = flist_fs::oci::import(&layout, &img, &router, &opts, Some("nope"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope") && e.contains("layout"), "{e}");

    // docker save: manifest.json + layer tarballs inside one tar.
    let mut ar = tar::Builder::new(Vec::new());
    let manifest =
        br#"[{"Config":"cfg.json","RepoTags":["app:1"],"Layers":["l1/layer.tar","l2/layer.tar"]}]"#;
    for (name, data) in [
        ("manifest.json", &manifest[..]),
        ("cfg.json", CONFIG),
        ("l1/layer.tar", &l1),
        ("real/layer.tar", &l2),
    ] {
        file(&mut ar, name, data);
    }
    // Older docker save links repeated layers to one copy.
    special(
        &mut ar,
        "l2/layer.tar",
        tar::EntryType::Symlink,
        Some("../real/layer.tar"),
    );
    let tarball = t.path().join("saved.tar");
    std::fs::write(&tarball, ar.into_inner().unwrap()).unwrap();
    let img = t.path().join("docker.flist");
    flist_fs::oci::import(&tarball, &img, &router, &opts, None).unwrap();
    check(&img, t.path());
}

#[test]
fn hostile_layer_is_rejected() {
    let t = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header("x", tar::EntryType::Regular, 1, 0o644);
    h.as_old_mut().name[..9].copy_from_slice(b"../escape");
    h.as_old_mut().name[9] = 0;
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    let layer = b.into_inner().unwrap();
    let layout = t.path().join("layout");
    write_layout(&layout, &[&layer]);
    let router =
        Router::from_specs(&[format!("dir://{}", t.path().join("store").display())]).unwrap();
    let out = t.path().join("x.flist");
    let e = flist_fs::oci::import(&layout, &out, &router, &PackOptions::default(), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("../escape") && e.contains("layer sha256:"),
        "{e}"
    );
    assert!(!out.exists());
}

/// One PAX record: `LEN key=value\n`, LEN counting the whole record, itself included.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}").len() + body.len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

#[test]
fn pax_times_keep_sub_second_parts() {
    let t = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut records = pax_record("mtime", "1700000000.123456789");
    records.extend(pax_record("ctime", "1700000001.5"));
    let mut x = header(
        "PaxHeaders/app",
        tar::EntryType::XHeader,
        records.len() as u64,
        0o644,
    );
    x.set_cksum();
    b.append(&x, &records[..]).unwrap();
    file(&mut b, "app", b"data");
    file(&mut b, "plain", b"data");
    let layer = b.into_inner().unwrap();
    let layout = t.path().join("layout");
    write_layout(&layout, &[&layer]);
    let router =
        Router::from_specs(&[format!("dir://{}", t.path().join("store").display())]).unwrap();
    let img = t.path().join("pax.flist");
    flist_fs::oci::import(&layout, &img, &router, &PackOptions::default(), None).unwrap();
    let (image, _) = open_image(&img, &OpenOptions::default()).unwrap();
    let app = image.inode(image.resolve("/app").unwrap()).unwrap();
    assert_eq!(
        (app.mtime.secs, app.mtime.nsecs),
        (1_700_000_000, 123_456_789)
    );
    assert_eq!(
        (app.ctime.secs, app.ctime.nsecs),
        (1_700_000_001, 500_000_000)
    );
    let plain = image.inode(image.resolve("/plain").unwrap()).unwrap();
    assert_eq!((plain.mtime.secs, plain.mtime.nsecs), (1_700_000_000, 0));
}

#[test]
fn a_file_that_is_not_an_image_is_named_for_what_it_is() {
    let t = tempfile::tempdir().unwrap();
    let router =
        Router::from_specs(&[format!("dir://{}", t.path().join("store").display())]).unwrap();
    let out = t.path().join("x.flist");
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "notes.txt",
            b"hello, this is not a tarball at all\n".repeat(40),
            "not a tar archive",
        ),
        ("short", b"tiny".to_vec(), "shorter than one tar header"),
        (
            "image.tar.gz",
            vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0],
            "gzip-compressed",
        ),
    ];
    for (name, bytes, words) in cases {
        let path = t.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let e = flist_fs::oci::import(&path, &out, &router, &PackOptions::default(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(words) && e.contains(name), "{name}: {e}");
        assert!(!e.contains("failed to read entire block"), "{e}");
    }
}
