//! The read-only `http://` store against a real HTTP server started by the test, serving a
//! dir store: lazy reads, unpack, verify, fail-over from a down store, and a clear error
//! naming every store when none can serve a chunk.

mod common;

use common::*;
use flist_fs::open::{open_image, OpenOptions};
use flist_fs::pack::{pack, PackOptions};
use flist_fs::store::Router;

#[test]
fn http_store_serves_an_image() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    sample_tree(&src);
    let store_dir = t.path().join("store");
    let img = t.path().join("img.flist");
    let dir_url = format!("dir://{}", store_dir.display());
    pack(
        &src,
        &img,
        &Router::from_specs(std::slice::from_ref(&dir_url)).unwrap(),
        &PackOptions::default(),
    )
    .unwrap();
    let port = serve_dir(store_dir.clone());
    let http = format!("http://127.0.0.1:{port}/");

    // Writing a new chunk to an http store is refused with its URL; no image is left.
    let src2 = t.path().join("src2");
    std::fs::create_dir(&src2).unwrap();
    std::fs::write(src2.join("fresh"), b"not stored anywhere yet").unwrap();
    let r = Router::from_specs(std::slice::from_ref(&http)).unwrap();
    let no = t.path().join("no.flist");
    let e = pack(&src2, &no, &r, &PackOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("read-only") && e.contains(&format!("127.0.0.1:{port}")),
        "{e}"
    );
    assert!(!no.exists());

    let opts = OpenOptions {
        stores: vec![http.clone()],
        cache_dir: Some(t.path().join("cache")),
        ..OpenOptions::default()
    };
    let (image, source) = open_image(&img, &opts).unwrap();
    let dest = t.path().join("out");
    flist_fs::unpack::unpack(&image, &source, &dest, &Default::default()).unwrap();
    assert_same_tree(&src, &dest);
    let report = flist_fs::verify::verify(
        &image,
        &Router::from_specs(std::slice::from_ref(&http)).unwrap(),
        false,
    );
    assert!(report.is_ok() && report.chunks > 10, "{report:?}");

    // A down store first, the http store second: reads fail over.
    let dead = format!("http://127.0.0.1:{}/", free_port());
    let opts = OpenOptions {
        stores: vec![dead.clone(), http.clone()],
        ..OpenOptions::default()
    };
    let (image, source) = open_image(&img, &opts).unwrap();
    let big = image.inode(image.resolve("/sub/big.bin").unwrap()).unwrap();
    let mut n = 0;
    source
        .read_range(big, 0, big.size, &mut |b| {
            n += b.len();
            Ok(())
        })
        .unwrap();
    assert_eq!(n as u64, big.size);

    // Only down stores: the error names the chunk and every store.
    let opts = OpenOptions {
        stores: vec![dead.clone(), format!("http://127.0.0.1:{port}/missing/")],
        ..OpenOptions::default()
    };
    let (image, source) = open_image(&img, &opts).unwrap();
    let e = source.stored(&big.chunks[0].id).unwrap_err().to_string();
    assert!(
        e.contains(&big.chunks[0].id.to_hex()) && e.contains(&dead) && e.contains("/missing/"),
        "{e}"
    );
    drop(image);
}

#[test]
fn set_stores_points_an_image_at_a_mirror() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"mirrored").unwrap();
    let store_dir = t.path().join("store");
    let img = t.path().join("img.flist");
    let flist = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_flist"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let dir_url = format!("dir://{}", store_dir.display());
    flist(&[
        "pack",
        src.to_str().unwrap(),
        "-o",
        img.to_str().unwrap(),
        "--store",
        &dir_url,
    ]);
    let port = serve_dir(store_dir.clone());
    let http = format!("http://user:pw@127.0.0.1:{port}/");
    flist(&["set-stores", img.to_str().unwrap(), "--store", &http]);
    let info = flist(&["info", img.to_str().unwrap()]);
    assert!(
        info.contains(&format!("store 00-ff http://127.0.0.1:{port}/")) && !info.contains("pw"),
        "{info}"
    );
    // The image now records only the mirror, so this read goes over HTTP.
    assert_eq!(
        flist(&["cat", img.to_str().unwrap(), "/f", "--no-cache"]),
        "mirrored"
    );
}
