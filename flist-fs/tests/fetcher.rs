//! The node's chunk fetcher as a real process on a real socket: images read through the
//! remote chunk source (a `dir://` store and an `http://` store, plain and encrypted
//! chunks), a poisoned store chunk refused, hostile clients refused without disturbing
//! others, and the cache evicted down to its bound in the background.

mod common;

use common::*;
use flist_fs::fetcher::client::FetcherClient;
use flist_fs::fetcher::protocol::{ErrorCode, Request, Response};
use flist_fs::fetcher::FetcherError;
use flist_fs::meta::Image;
use flist_fs::open::open_image_remote;
use flist_fs::pack::{pack, PackOptions};
use flist_fs::store::{DirStore, Router};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CACHE_MAX: u64 = 4_000_000;

struct Fetcher {
    child: Child,
    sock: PathBuf,
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_fetcher(t: &Path, stores: &[String]) -> Fetcher {
    let sock = t.join("fetcher.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chunk-fetcher"));
    cmd.arg("--listen")
        .arg(&sock)
        .arg("--cache")
        .arg(t.join("cache"))
        .arg("--cache-max-bytes")
        .arg(CACHE_MAX.to_string())
        .arg("--socket-mode")
        .arg("0600");
    for s in stores {
        cmd.arg("--store").arg(s);
    }
    let child = cmd.env("FLIST_LOG", "info").spawn().unwrap();
    let f = Fetcher { child, sock };
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&f.sock).is_err() {
        assert!(Instant::now() < deadline, "fetcher did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    f
}

/// Packs `files` (name, content) into an image in the dir store `store`.
fn image_of(
    t: &Path,
    name: &str,
    store: &Path,
    files: &[(&str, Vec<u8>)],
    encrypt: bool,
) -> PathBuf {
    let src = t.join(format!("src-{name}"));
    std::fs::create_dir_all(&src).unwrap();
    for (n, content) in files {
        std::fs::write(src.join(n), content).unwrap();
    }
    let img = t.join(format!("{name}.flist"));
    let opts = PackOptions {
        encrypt,
        ..PackOptions::default()
    };
    let router = Router::from_specs(&[format!("dir://{}", store.display())]).unwrap();
    pack(&src, &img, &router, &opts).unwrap();
    img
}

fn read_file(
    image: &Image,
    source: &flist_fs::fetch::ChunkSource,
    path: &str,
) -> flist_fs::Result<Vec<u8>> {
    let inode = image.inode(image.resolve(path)?).unwrap();
    let mut out = Vec::new();
    source.read_range(inode, 0, inode.size, &mut |b| {
        out.extend_from_slice(b);
        Ok(())
    })?;
    Ok(out)
}

fn cache_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for sub in std::fs::read_dir(dir).unwrap().flatten() {
        if sub.file_name().len() != 2 {
            continue;
        }
        for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
            total += f.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    total
}

/// Sends `bytes` on a fresh connection; returns the fetcher's answer and whether it then
/// closed the connection.
fn raw_exchange(sock: &Path, bytes: &[u8]) -> (Option<Response>, bool) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(bytes).unwrap();
    let mut header = [0u8; 4];
    if s.read_exact(&mut header).is_err() {
        return (None, true);
    }
    let len = u32::from_le_bytes(header) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    let resp = Response::decode(&body).ok();
    let mut rest = [0u8; 1];
    // Closed with our bytes unread, the socket reports a reset rather than an end.
    let closed = match s.read(&mut rest) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    (resp, closed)
}

#[test]
fn images_through_the_fetcher() {
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    let (dir_store, http_store) = (t.join("dir-store"), t.join("http-store"));
    std::fs::create_dir_all(&http_store).unwrap();
    let port = serve_dir(http_store.clone());
    let plain_files = vec![
        ("big", pseudo_random(5 * 1024 * 1024 + 123, 1)),
        ("small", b"hello fetcher\n".to_vec()),
    ];
    let img_dir = image_of(t, "dir", &dir_store, &plain_files, false);
    let enc_files = vec![("secret", pseudo_random(2 * 1024 * 1024 + 5, 2))];
    let img_enc = image_of(t, "enc", &dir_store, &enc_files, true);
    let http_files = vec![("h", pseudo_random(3 * 1024 * 1024, 3))];
    let img_http = image_of(t, "http", &http_store, &http_files, false);
    let poison_files = vec![("p", pseudo_random(300_000, 4))];
    let img_poison = image_of(t, "poison", &dir_store, &poison_files, false);

    let stores = vec![
        format!("dir://{}", dir_store.display()),
        format!("http://127.0.0.1:{port}/"),
    ];
    let fetcher = start_fetcher(t, &stores);
    let client = Arc::new(FetcherClient::connect(&fetcher.sock, 2).unwrap());

    // Plain and encrypted chunks from the dir store, plain chunks from the http store: same
    // bytes as packed (cold, then warm from the fetcher's cache with a fresh client).
    let check = |client: &Arc<FetcherClient>| {
        for (img, files) in [
            (&img_dir, &plain_files),
            (&img_enc, &enc_files),
            (&img_http, &http_files),
        ] {
            let (image, source) = open_image_remote(img, client.clone(), None).unwrap();
            assert!(source.is_remote());
            for (name, content) in files.iter() {
                let got = read_file(&image, &source, &format!("/{name}")).unwrap();
                assert_eq!(blake3::hash(&got), blake3::hash(content), "{name}");
            }
        }
    };
    check(&client);
    let warm = Arc::new(FetcherClient::connect(&fetcher.sock, 1).unwrap());
    check(&warm);

    // A poisoned store chunk is refused (by code), never served, never cached.
    let (image, _) = open_image_remote(&img_poison, client.clone(), None).unwrap();
    let c = image.inode(image.resolve("/p").unwrap()).unwrap().chunks[0].clone();
    let chunk_path = DirStore::open(&format!("dir://{}", dir_store.display()))
        .unwrap()
        .chunk_path(&c.id);
    let mut poisoned = std::fs::read(&chunk_path).unwrap();
    poisoned[10] ^= 0x55;
    // (A blocked image carries its block tables, so a read through the fetcher fetches only
    // blocks: poison one in the middle too.)
    let mid = poisoned.len() / 2;
    poisoned[mid] ^= 0x55;
    std::fs::write(&chunk_path, &poisoned).unwrap();
    match client.chunk(&c) {
        Err(FetcherError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::BadChunk, "{message}");
            assert!(message.contains(&c.id.to_hex()), "{message}");
        }
        other => panic!("poisoned chunk answered {other:?}"),
    }
    let (image, source) = open_image_remote(&img_poison, client.clone(), None).unwrap();
    let e = read_file(&image, &source, "/p").unwrap_err().to_string();
    assert!(e.contains("hash mismatch") && e.contains("block "), "{e}");
    let hex = c.id.to_hex();
    assert!(!t
        .join("cache")
        .join(&hex[..2])
        .join(format!("{hex}.plain"))
        .exists());

    // Hostile clients: each gets an error code and is disconnected; a client that stalls
    // mid-frame or leaves mid-request costs nothing; the good client is served throughout.
    let stalled = {
        let mut s = UnixStream::connect(&fetcher.sock).unwrap();
        s.write_all(&[40, 0]).unwrap();
        s
    };
    let (resp, closed) = raw_exchange(&fetcher.sock, &u32::MAX.to_le_bytes());
    assert!(
        matches!(
            resp,
            Some(Response::Err {
                code: ErrorCode::BadRequest,
                ..
            })
        ),
        "{resp:?}"
    );
    assert!(closed);
    let mut bad_version = Request {
        seq: 1,
        id: c.id,
        plain_len: 10,
        key: None,
    }
    .encode();
    bad_version[4] = 99;
    let (resp, closed) = raw_exchange(&fetcher.sock, &bad_version);
    assert!(
        matches!(
            resp,
            Some(Response::Err {
                code: ErrorCode::Version,
                ..
            })
        ),
        "{resp:?}"
    );
    assert!(closed);
    let mut huge = Request {
        seq: 1,
        id: c.id,
        plain_len: 10,
        key: None,
    }
    .encode();
    huge[42..46].copy_from_slice(&u32::MAX.to_le_bytes());
    let (resp, closed) = raw_exchange(&fetcher.sock, &huge);
    assert!(
        matches!(
            resp,
            Some(Response::Err {
                code: ErrorCode::BadRequest,
                ..
            })
        ),
        "{resp:?}"
    );
    assert!(closed);
    let mut x = 7u64;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            (x >> 33) as u8
        })
        .collect();
    let (resp, closed) = raw_exchange(&fetcher.sock, &[&[200, 0, 0, 0][..], &garbage].concat());
    assert!(matches!(resp, Some(Response::Err { .. })), "{resp:?}");
    assert!(closed);
    // Asks for a chunk and leaves at once.
    {
        let big = image_of(
            t,
            "leaver",
            &dir_store,
            &[("l", pseudo_random(1 << 20, 9))],
            false,
        );
        let (image, _) = open_image_remote(&big, client.clone(), None).unwrap();
        let c = &image.inode(image.resolve("/l").unwrap()).unwrap().chunks[0];
        let mut s = UnixStream::connect(&fetcher.sock).unwrap();
        s.write_all(
            &Request {
                seq: 5,
                id: c.id,
                plain_len: c.size,
                key: None,
            }
            .encode(),
        )
        .unwrap();
    }
    let fresh = Arc::new(FetcherClient::connect(&fetcher.sock, 1).unwrap());
    check(&fresh);
    drop(stalled);

    // The cache was filled past its bound (plaintexts of 10 MB of files) and is brought
    // back under it in the background.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let used = cache_bytes(&t.join("cache"));
        if used <= CACHE_MAX {
            break;
        }
        assert!(Instant::now() < deadline, "cache still at {used} bytes");
        std::thread::sleep(Duration::from_millis(100));
    }
    check(&client);
    assert!(
        cache_bytes(&t.join("cache")) > 0,
        "the cache is used, not just emptied"
    );
    let mut fetcher = fetcher;
    assert!(
        fetcher.child.try_wait().unwrap().is_none(),
        "the fetcher is still running"
    );
}

#[test]
fn the_fetcher_reads_the_vmm_node_configuration() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    let store = t.join("store");
    let img = image_of(t, "cfg", &store, &[("f", pseudo_random(100_000, 8))], false);
    let sock = t.join("node.sock");
    let config = t.join("node.json");
    let json = format!(
        r#"{{"fetcher": "{}", "image_cache": "{}", "image_cache_max_bytes": 1000000000, "stores": ["dir://{}"]}}"#,
        sock.display(),
        t.join("cache").display(),
        store.display()
    );
    std::fs::write(&config, json).unwrap();
    // Readable by others: refused (it holds store credentials).
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chunk-fetcher"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("0644") && err.contains("node.json"), "{err}");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_chunk-fetcher"))
        .arg("--config")
        .arg(&config)
        .spawn()
        .unwrap();
    let fetcher = Fetcher {
        child,
        sock: sock.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "fetcher did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let client = Arc::new(FetcherClient::connect(&fetcher.sock, 1).unwrap());
    let (image, source) = open_image_remote(&img, client, None).unwrap();
    assert_eq!(
        read_file(&image, &source, "/f").unwrap(),
        pseudo_random(100_000, 8)
    );
}
