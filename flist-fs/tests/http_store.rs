//! The read-only `http://` store against a real HTTP server started by the test, serving a
//! dir store: lazy reads, unpack, verify, fail-over from a down store, and a clear error
//! naming every store when none can serve a chunk. Also what a hostile image or store must
//! not achieve: redirects are not followed, oversize replies are refused, and under a node's
//! store policy only allowlisted stores are used.

mod common;

use common::*;
use flist_fs::open::{open_image, OpenOptions};
use flist_fs::pack::{pack, PackOptions};
use flist_fs::store::{Router, StorePolicy, MAX_STORED_CHUNK};
use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// An HTTP server answering every request with `answer(path)` (head, body); returns its port
/// and the number of requests it received.
fn serve_with(
    answer: impl Fn(&str) -> (String, Vec<u8>) + Send + Sync + 'static,
) -> (u16, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let (h, answer) = (hits.clone(), Arc::new(answer));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            h.fetch_add(1, Ordering::SeqCst);
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut request = String::new();
                if reader.read_line(&mut request).unwrap_or(0) == 0 {
                    return;
                }
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
                let (head, body) = answer(&path);
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(&body);
            });
        }
    });
    (port, hits)
}

/// A one-file image whose chunks are in a dir store; returns (image, dir store).
fn small_image(t: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = t.join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"some file content").unwrap();
    let store = t.join("store");
    let img = t.join("img.flist");
    pack(
        &src,
        &img,
        &Router::from_specs(&[format!("dir://{}", store.display())]).unwrap(),
        &PackOptions::default(),
    )
    .unwrap();
    (img, store)
}

fn first_chunk_error(img: &std::path::Path, opts: &OpenOptions) -> String {
    let (image, source) = open_image(img, opts).unwrap();
    let f = image.inode(image.resolve("/f").unwrap()).unwrap();
    source.stored(&f.chunks[0].id).unwrap_err().to_string()
}

#[test]
fn redirects_are_not_followed() {
    let t = tempfile::tempdir().unwrap();
    let (img, store) = small_image(t.path());
    // The target: the node's own service, which must never see a request.
    let (target, target_hits) = serve_with(|_| {
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n".into(),
            b"hi".to_vec(),
        )
    });
    let (redirector, _) = serve_with(move |path| {
        (
            format!(
                "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{target}{path}\r\nContent-Length: 0\r\n\r\n"
            ),
            Vec::new(),
        )
    });
    let opts = OpenOptions {
        stores: vec![format!("http://127.0.0.1:{redirector}/")],
        ..OpenOptions::default()
    };
    let e = first_chunk_error(&img, &opts);
    assert!(
        e.contains("redirect") && e.contains(&format!("127.0.0.1:{redirector}")),
        "{e}"
    );
    assert_eq!(target_hits.load(Ordering::SeqCst), 0);
    drop(store);
}

#[test]
fn oversize_http_reply_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (img, _store) = small_image(t.path());
    let (port, _) = serve_with(|_| {
        let body = vec![0u8; MAX_STORED_CHUNK + 10];
        (
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()),
            body,
        )
    });
    let opts = OpenOptions {
        stores: vec![format!("http://127.0.0.1:{port}/")],
        ..OpenOptions::default()
    };
    let e = first_chunk_error(&img, &opts);
    assert!(
        e.contains("larger than the largest stored chunk")
            && e.contains(&format!("127.0.0.1:{port}")),
        "{e}"
    );
}

#[test]
fn node_policy_decides_which_image_stores_are_used() {
    let t = tempfile::tempdir().unwrap();
    let (img, store) = small_image(t.path());
    let dir_url = format!("dir://{}", store.display());
    let with = |policy: StorePolicy| OpenOptions {
        policy: Some(policy),
        ..OpenOptions::default()
    };
    // A dir:// route from an image: refused unless the node lists exactly that directory.
    let e = open_image(
        &img,
        &with(StorePolicy::allowlist(&["dir:///somewhere/else"]).unwrap()),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains(&dir_url) && e.contains("allowlist"), "{e}");
    let e = open_image(&img, &with(StorePolicy::anonymous()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(&dir_url), "{e}");
    let (image, source) = open_image(
        &img,
        &with(StorePolicy::allowlist(&[dir_url.as_str()]).unwrap()),
    )
    .unwrap();
    let f = image.inode(image.resolve("/f").unwrap()).unwrap();
    assert!(source.stored(&f.chunks[0].id).is_ok());

    // The image now names an http store (with a password of its own) and an unknown host;
    // the node allowlists the http store with its own credentials.
    let port = serve_dir(store.clone());
    let mut image = flist_fs::meta::read_image(&img).unwrap();
    image.routes = vec![
        flist_fs::meta::Route {
            start: 0,
            end: 255,
            url: format!("http://127.0.0.1:{}/", free_port()),
        },
        flist_fs::meta::Route {
            start: 0,
            end: 255,
            url: format!("http://image:pw@127.0.0.1:{port}"),
        },
    ];
    let img2 = t.path().join("img2.flist");
    flist_fs::meta::write_image_atomic(&image, &img2).unwrap();
    let policy =
        StorePolicy::allowlist(&[format!("http://node:secret@127.0.0.1:{port}/")]).unwrap();
    let (image, source) = open_image(&img2, &with(policy)).unwrap();
    let routes = source.router().routes();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0].url, format!("http://127.0.0.1:{port}/"));
    let f = image.inode(image.resolve("/f").unwrap()).unwrap();
    assert!(source.stored(&f.chunks[0].id).is_ok());
    // Without an allowlist, http routes are used (without credentials).
    let (_, source) = open_image(&img2, &with(StorePolicy::anonymous())).unwrap();
    assert_eq!(source.router().routes().len(), 2);
}

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
