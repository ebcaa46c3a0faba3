//! Ranged reads from a real web server: an `http://` store served by nginx (its static file
//! module answers `Range` with 206 and `Content-Range`). A small read of a blocked image asks
//! nginx for one block, and nginx's own access log shows it sent that block, not the chunk;
//! the in-process server that ignores ranges still reads right, counted as ignored.

mod common;

use common::*;
use flist_fs::chunk::blocks::DEFAULT_BLOCK;
use flist_fs::open::{open_image, OpenOptions};
use flist_fs::pack::{pack, PackOptions};
use flist_fs::store::{range_replies, Router};
use std::path::Path;

/// nginx serving `root` on a free port of 127.0.0.1 (no daemon, one process), logging
/// `status range bytes-sent uri` per request to `<dir>/access.log`; None when nginx tests are
/// skipped (see [`server_binary`]).
fn start_nginx(dir: &Path, root: &Path) -> Option<(KillOnDrop, u16)> {
    let bin = server_binary("nginx", "NGINX", "apt-get install nginx-light")?;
    let port = free_port();
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log;\nevents {{ worker_connections 64; }}\n\
         http {{\n  log_format ranges '$status \"$http_range\" $body_bytes_sent $uri';\n\
           access_log {d}/access.log ranges;\n\
           client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
           server {{ listen 127.0.0.1:{port}; root {}; }}\n}}\n",
        root.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = std::process::Command::new(bin)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start nginx");
    let server = KillOnDrop(child);
    wait_for_port(port);
    Some((server, port))
}

/// The access log's lines `(status, range header, bytes sent, uri)`.
fn access_log(dir: &Path) -> Vec<(u16, String, u64, String)> {
    let log = std::fs::read_to_string(dir.join("access.log")).unwrap_or_default();
    log.lines()
        .map(|l| {
            let (status, rest) = l.split_once(' ').unwrap();
            let rest = rest.strip_prefix('"').unwrap();
            let (range, rest) = rest.split_once("\" ").unwrap();
            let (sent, uri) = rest.split_once(' ').unwrap();
            (
                status.parse().unwrap(),
                range.to_string(),
                sent.parse().unwrap(),
                uri.to_string(),
            )
        })
        .collect()
}

/// The 4 KiB at `at` of `inode`, read through `source`.
fn read_4k(
    source: &flist_fs::fetch::ChunkSource,
    inode: &flist_fs::meta::Inode,
    at: u64,
) -> Vec<u8> {
    let mut got = Vec::new();
    source
        .read_range(inode, at, 4096, &mut |b| {
            got.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
    got
}

#[test]
fn nginx_answers_a_small_read_with_one_block() {
    let t = tempfile::tempdir().unwrap();
    let store_dir = t.path().join("store");
    let Some((_nginx, port)) = start_nginx(t.path(), &store_dir) else {
        return;
    };
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let data = pseudo_random(3 << 20, 33);
    std::fs::write(src.join("big"), &data).unwrap();
    let img = t.path().join("big.flist");
    let dir_store = format!("dir://{}", store_dir.display());
    let opts = PackOptions {
        block_size: DEFAULT_BLOCK,
        ..PackOptions::default()
    };
    pack(
        &src,
        &img,
        &Router::from_specs(std::slice::from_ref(&dir_store)).unwrap(),
        &opts,
    )
    .unwrap();

    let http = format!("http://127.0.0.1:{port}");
    let (image, source) = open_image(
        &img,
        &OpenOptions {
            stores: vec![http.clone()],
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let inode = image.inode(image.resolve("/big").unwrap()).unwrap();
    let at = 2 * 1024 * 1024 + 5 * 4096 + 100;
    let chunk = inode
        .chunks
        .iter()
        .find(|c| c.offset <= at && at < c.offset + u64::from(c.size))
        .unwrap();
    let before = range_replies();
    assert!(read_4k(&source, inode, at) == data[at as usize..at as usize + 4096]);
    let after = range_replies();

    // One request, answered 206 with one block's bytes: a fraction of the chunk.
    let log = access_log(t.path());
    assert_eq!(log.len(), 1, "{log:?}");
    let (status, range, sent, uri) = &log[0];
    assert_eq!(*status, 206, "{log:?}");
    assert!(range.starts_with("bytes="), "{log:?}");
    assert!(uri.ends_with(&chunk.id.to_hex()), "{log:?}");
    let block = flist_fs::chunk::max_stored_size(DEFAULT_BLOCK) as u64;
    assert!(*sent <= block, "{sent} bytes sent for one block");
    assert!(
        *sent * 4 < u64::from(chunk.size),
        "{sent} of a {}-byte chunk",
        chunk.size
    );
    println!(
        "4 KiB read through nginx: {sent} bytes sent of a {}-byte chunk",
        chunk.size
    );
    assert_eq!(
        after.answered - before.answered,
        1,
        "{before:?} -> {after:?}"
    );
    assert_eq!(after.ignored, before.ignored, "{before:?} -> {after:?}");

    // The same read from a server that ignores ranges (the in-test one): right bytes, counted.
    let plain = serve_dir(store_dir.clone());
    let (_, source) = open_image(
        &img,
        &OpenOptions {
            stores: vec![format!("http://127.0.0.1:{plain}")],
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert!(read_4k(&source, inode, at) == data[at as usize..at as usize + 4096]);
    let last = range_replies();
    assert_eq!(last.ignored - after.ignored, 1, "{after:?} -> {last:?}");
}
