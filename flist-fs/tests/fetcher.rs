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

/// Sends `frame` raw and checks it is refused as a bad request and the connection closed.
fn refused_and_closed(sock: &std::path::Path, frame: &[u8]) {
    let (resp, closed) = raw_exchange(sock, frame);
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
    assert!(closed, "the connection stayed open after {resp:?}");
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
    // (A blocked image carries its block tables, so a small read through the fetcher fetches
    // only blocks: poison one in the middle too.)
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
    assert!(e.contains("hash mismatch"), "{e}");
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
    refused_and_closed(&fetcher.sock, &u32::MAX.to_le_bytes());
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
    refused_and_closed(&fetcher.sock, &huge);
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

/// Bytes redis sent and the GET / GETRANGE calls it served while `f` ran.
fn redis_cost(con: &mut redis::Connection, f: &mut dyn FnMut()) -> (u64, u64, u64) {
    let sent = redis_info(con, "stats", "total_net_output_bytes");
    let gets = redis_info(con, "commandstats", "cmdstat_get");
    let ranges = redis_info(con, "commandstats", "cmdstat_getrange");
    f();
    (
        redis_info(con, "stats", "total_net_output_bytes") - sent,
        redis_info(con, "commandstats", "cmdstat_get") - gets,
        redis_info(con, "commandstats", "cmdstat_getrange") - ranges,
    )
}

fn pack_blocks(
    t: &Path,
    name: &str,
    store: &str,
    data: &[u8],
    block_size: u32,
    encrypt: bool,
) -> PathBuf {
    let src = t.join(format!("src-{name}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), data).unwrap();
    let img = t.join(format!("{name}.flist"));
    let opts = PackOptions {
        encrypt,
        block_size,
        ..PackOptions::default()
    };
    pack(
        &src,
        &img,
        &Router::from_specs(&[store.to_string()]).unwrap(),
        &opts,
    )
    .unwrap();
    img
}

fn read_at(
    source: &flist_fs::fetch::ChunkSource,
    inode: &flist_fs::meta::Inode,
    at: u64,
    len: u64,
) -> flist_fs::Result<Vec<u8>> {
    let mut out = Vec::new();
    source.read_range(inode, at, len, &mut |b| {
        out.extend_from_slice(b);
        Ok(())
    })?;
    Ok(out)
}

fn refused(r: Result<Arc<flist_fs::fetcher::client::Served>, FetcherError>) -> (ErrorCode, String) {
    match r {
        Err(FetcherError::Refused { code, message }) => (code, message),
        other => panic!("not refused: {other:?}"),
    }
}

/// Block requests through a real fetcher over a real redis-server: a cold 4 KiB read of a
/// blocked image costs the fetcher one GETRANGE of one block and no GET (a whole-chunk image
/// one GET), a read over three blocks three GETRANGEs, a read of half a chunk one GET (the
/// chunk); a second client gets the block from the fetcher's cache (plain) or its sealed
/// memfds (encrypted) with no store read; forged tables, block indexes past the table and
/// oversize tables are refused naming the chunk and block while the fetcher keeps serving;
/// a corrupted stored block is refused naming the block, and never cached; an image without
/// block tables has the fetcher read the table (verified) once.
#[test]
fn blocks_through_the_fetcher() {
    use flist_fs::chunk::blocks::{block_key, table_len, DEFAULT_BLOCK, MAX_TABLE_LEN};
    use flist_fs::fetcher::protocol::BlockRequest;
    let Some((_server, port)) = start_redis() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    let store = format!("redis://127.0.0.1:{port}/0");
    let data = pseudo_random(3 << 20, 31);
    let secret = pseudo_random(2 << 20, 32);
    let blocked = pack_blocks(t, "blocked", &store, &data, DEFAULT_BLOCK, false);
    let whole = pack_blocks(t, "whole", &store, &data, 0, false);
    let enc = pack_blocks(t, "enc", &store, &secret, DEFAULT_BLOCK, true);
    let mut con = redis::Client::open(store.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let fetcher = start_fetcher(t, std::slice::from_ref(&store));
    let client = Arc::new(FetcherClient::connect(&fetcher.sock, 2).unwrap());
    let bs = u64::from(DEFAULT_BLOCK);
    let at = 2 * 1024 * 1024 + 3 * 4096 + 100;
    let want = &data[at as usize..at as usize + 4096];

    // Whole chunks (format 1): one GET of the chunk, through version 1 whole-chunk requests.
    let (image, source) = open_image_remote(&whole, client.clone(), None).unwrap();
    assert_eq!(image.block_size, 0);
    let inode = image.inode(image.resolve("/f").unwrap()).unwrap();
    let (whole_sent, gets, ranges) = redis_cost(&mut con, &mut || {
        assert_eq!(read_at(&source, inode, at, 4096).unwrap(), want)
    });
    assert_eq!((gets, ranges), (1, 0));

    // Blocked: the fetcher reads one block with one GETRANGE, no GET.
    let (image, source) = open_image_remote(&blocked, client.clone(), None).unwrap();
    assert_eq!(image.block_size, DEFAULT_BLOCK);
    let inode = image.inode(image.resolve("/f").unwrap()).unwrap();
    let c = inode
        .chunks
        .iter()
        .find(|c| c.offset <= at && at + 4096 <= c.offset + u64::from(c.size))
        .unwrap()
        .clone();
    let (sent, gets, ranges) = redis_cost(&mut con, &mut || {
        assert_eq!(read_at(&source, inode, at, 4096).unwrap(), want)
    });
    println!(
        "4 KiB read through the fetcher: whole chunk {whole_sent} bytes from redis, block {sent}"
    );
    assert_eq!((gets, ranges), (0, 1));
    let block_max = flist_fs::chunk::max_stored_size(DEFAULT_BLOCK) as u64;
    assert!(sent <= block_max + 2048, "{sent} bytes for one block");
    assert!(sent * 4 < whole_sent, "{sent} vs {whole_sent}");
    // A read over three blocks of another chunk: three block requests (answered in
    // parallel), three GETRANGEs; a read of half a chunk or more asks for the chunk: one GET.
    let big = inode
        .chunks
        .iter()
        .find(|x| x.id != c.id && x.size >= 10 * DEFAULT_BLOCK)
        .expect("a chunk of 320 KiB or more");
    let (b0, blen) = (big.offset + 5 * bs + 100, 2 * bs);
    let (_, gets, ranges) = redis_cost(&mut con, &mut || {
        let got = read_at(&source, inode, b0, blen).unwrap();
        assert!(got == data[b0 as usize..(b0 + blen) as usize]);
    });
    assert_eq!((gets, ranges), (0, 3));
    let other_chunk = inode
        .chunks
        .iter()
        .find(|x| x.id != c.id && x.id != big.id)
        .unwrap();
    let (h0, hlen) = (other_chunk.offset, u64::from(other_chunk.size).div_ceil(2));
    let (_, gets, ranges) = redis_cost(&mut con, &mut || {
        let got = read_at(&source, inode, h0, hlen).unwrap();
        assert!(got == data[h0 as usize..(h0 + hlen) as usize]);
    });
    assert_eq!((gets, ranges), (1, 0));
    // Another vmm's block of that chunk: part of the fetcher's cached plaintext of the chunk,
    // no store read.
    let third = FetcherClient::connect(&fetcher.sock, 1).unwrap();
    let ot = image.tables.get(&other_chunk.id).unwrap();
    let last_i = (other_chunk.size - 1) / DEFAULT_BLOCK;
    let last_len = other_chunk.size - last_i * DEFAULT_BLOCK;
    let (_, gets, ranges) = redis_cost(&mut con, &mut || {
        let s = third
            .block(other_chunk, DEFAULT_BLOCK, last_i, last_len, ot)
            .unwrap();
        assert_eq!(s.len(), last_len);
        let mut b = vec![0u8; last_len as usize];
        s.read_at(0, &mut b).unwrap();
        let st = (other_chunk.offset + u64::from(last_i * DEFAULT_BLOCK)) as usize;
        assert!(b == data[st..st + last_len as usize]);
    });
    assert_eq!((gets, ranges), (0, 0));
    // The fetcher cached the block's plaintext under the block's name, not the chunk.
    let i = ((at - c.offset) / bs) as usize;
    let (bhex, chex) = (block_key(&c.id, i).to_hex(), c.id.to_hex());
    let cache = t.join("cache");
    assert!(cache
        .join(&bhex[..2])
        .join(format!("{bhex}.plain"))
        .exists());
    assert!(!cache
        .join(&chex[..2])
        .join(format!("{chex}.plain"))
        .exists());

    // A second client (another vmm) reading the same block: served from the fetcher's cache.
    let other = Arc::new(FetcherClient::connect(&fetcher.sock, 1).unwrap());
    let (_, source2) = open_image_remote(&blocked, other.clone(), None).unwrap();
    let (_, gets, ranges) = redis_cost(&mut con, &mut || {
        assert_eq!(read_at(&source2, inode, at, 4096).unwrap(), want);
        let a = at - 50;
        assert_eq!(
            read_at(&source2, inode, a, 10).unwrap(),
            &data[a as usize..a as usize + 10]
        );
    });
    assert_eq!((gets, ranges), (0, 0));
    // What it holds: a read-only descriptor.
    let table = image.tables.get(&c.id).unwrap().clone();
    let len = DEFAULT_BLOCK.min(c.size - i as u32 * DEFAULT_BLOCK);
    let served = other
        .block(&c, DEFAULT_BLOCK, i as u32, len, &table)
        .unwrap();
    // SAFETY: fcntl query on a descriptor we hold.
    let fl = unsafe { libc::fcntl(served.raw_fd(), libc::F_GETFL) };
    assert_eq!(fl & libc::O_ACCMODE, libc::O_RDONLY);

    // Encrypted: one GETRANGE; another client gets the sealed memfd, no store read.
    let (image_e, source_e) = open_image_remote(&enc, client.clone(), None).unwrap();
    let inode_e = image_e.inode(image_e.resolve("/f").unwrap()).unwrap();
    let ea = 1024 * 1024 + 7;
    let ewant = &secret[ea as usize..ea as usize + 4096];
    let (_, gets, ranges) = redis_cost(&mut con, &mut || {
        assert_eq!(read_at(&source_e, inode_e, ea, 4096).unwrap(), ewant)
    });
    assert!(gets == 0 && (1..=2).contains(&ranges), "{gets} {ranges}");
    let (_, source_e2) = open_image_remote(&enc, other.clone(), None).unwrap();
    let (_, gets, ranges) = redis_cost(&mut con, &mut || {
        assert_eq!(read_at(&source_e2, inode_e, ea, 4096).unwrap(), ewant)
    });
    assert_eq!((gets, ranges), (0, 0));
    let ec = inode_e
        .chunks
        .iter()
        .find(|c| c.offset <= ea && ea < c.offset + u64::from(c.size))
        .unwrap();
    let ei = ((ea - ec.offset) / bs) as u32;
    let etable = image_e.tables.get(&ec.id).unwrap();
    let elen = DEFAULT_BLOCK.min(ec.size - ei * DEFAULT_BLOCK);
    let s = other.block(ec, DEFAULT_BLOCK, ei, elen, etable).unwrap();
    // SAFETY: fcntl query on a descriptor we hold.
    let seals = unsafe { libc::fcntl(s.raw_fd(), libc::F_GET_SEALS) };
    let all = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    assert_eq!(seals & all, all);
    // Its id and table without its key get nothing.
    let mut keyless = ec.clone();
    keyless.key = Some([0u8; 32]);
    let (code, msg) = refused(other.block(&keyless, DEFAULT_BLOCK, ei, elen, etable));
    assert_eq!(code, ErrorCode::BadChunk, "{msg}");

    // Hostile block requests: each refused naming the chunk and block, no store read; the
    // fetcher (and the very same connection) keeps serving.
    let hostile = Arc::new(FetcherClient::connect(&fetcher.sock, 1).unwrap());
    let j = (i + 1) as u32;
    let jlen = DEFAULT_BLOCK.min(c.size - j * DEFAULT_BLOCK);
    let mut forged = table.clone();
    // Block j's claimed hash (as if the vmm wanted other bytes served as block j).
    let at_hash = 12 + 36 * j as usize + 4;
    forged[at_hash] ^= 1;
    let (_, gets, ranges) = redis_cost(&mut con, &mut || {
        let (code, msg) = refused(hostile.block(&c, DEFAULT_BLOCK, j, jlen, &forged));
        assert_eq!(code, ErrorCode::BadRequest);
        assert!(
            msg.contains(&chex)
                && msg.contains(&format!("block {j}"))
                && msg.contains("block table hash mismatch"),
            "{msg}"
        );
        // A table of another chunk (genuine, hashing to its own id).
        let (other_id, other_table) = image.tables.iter().find(|(id, _)| **id != c.id).unwrap();
        assert_ne!(other_id, &c.id);
        let (code, msg) = refused(hostile.block(&c, DEFAULT_BLOCK, 0, DEFAULT_BLOCK, other_table));
        assert_eq!(code, ErrorCode::BadRequest, "{msg}");
        assert!(msg.contains(&chex), "{msg}");
        // A block index past the table.
        let n = c.size.div_ceil(DEFAULT_BLOCK);
        let (code, msg) = refused(hostile.block(&c, DEFAULT_BLOCK, n, 1, &table));
        assert_eq!(code, ErrorCode::BadRequest);
        assert!(
            msg.contains(&chex) && msg.contains(&format!("no block {n} (the chunk has {n})")),
            "{msg}"
        );
        let (code, _) = refused(hostile.block(&c, DEFAULT_BLOCK, u32::MAX, 1, &table));
        assert_eq!(code, ErrorCode::BadRequest);
        // Sizes that do not match the table (it commits to them), or no valid block size.
        let mut short = c.clone();
        short.size -= 1;
        let (code, msg) = refused(hostile.block(&short, DEFAULT_BLOCK, 0, DEFAULT_BLOCK, &table));
        assert_eq!(code, ErrorCode::BadRequest, "{msg}");
        let (code, msg) = refused(hostile.block(&c, 3000, 0, 3000, &table));
        assert_eq!(code, ErrorCode::BadRequest, "{msg}");
        assert!(msg.contains("power of two"), "{msg}");
        // The same connection still serves a genuine request.
        let s = hostile
            .block(&c, DEFAULT_BLOCK, i as u32, len, &table)
            .unwrap();
        let mut b = vec![0u8; 16];
        s.read_at(0, &mut b).unwrap();
        let start = c.offset as usize + i * DEFAULT_BLOCK as usize;
        assert_eq!(b, &data[start..start + 16]);
    });
    assert_eq!((gets, ranges), (0, 0));
    // An oversize table is refused before it is read into a request, and that connection is
    // closed; others are served.
    let big = BlockRequest {
        seq: 1,
        id: c.id,
        plain_len: c.size,
        block_size: DEFAULT_BLOCK,
        index: 0,
        key: None,
        table: vec![0u8; MAX_TABLE_LEN + 1],
    };
    let (resp, closed) = raw_exchange(&fetcher.sock, &big.encode());
    match resp {
        Some(Response::Err { code, message, .. }) => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(
                message.contains(&format!("block table of {} bytes", MAX_TABLE_LEN + 1)),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(closed);
    // A frame longer than any block request: refused from its header.
    refused_and_closed(&fetcher.sock, &(200_000u32).to_le_bytes());
    assert_eq!(read_at(&source2, inode, at, 4096).unwrap(), want);

    // A corrupted stored block (one not read yet): refused naming the block, never cached,
    // and the chunk's other blocks still read.
    let k = inode.chunks.iter().position(|x| x.id == c.id).unwrap();
    let victim = if i + 2 < c.size.div_ceil(DEFAULT_BLOCK) as usize {
        i + 2
    } else {
        i - 2
    };
    let tl = table_len(DEFAULT_BLOCK, c.size);
    let mut off = tl;
    for e in 0..victim {
        let w = &table[12 + 36 * e..16 + 36 * e];
        off += u32::from_le_bytes(w.try_into().unwrap()) as usize;
    }
    let byte: Vec<u8> = redis::cmd("GETRANGE")
        .arg(&c.id.0[..])
        .arg(off + 5)
        .arg(off + 5)
        .query(&mut con)
        .unwrap();
    let _: i64 = redis::cmd("SETRANGE")
        .arg(&c.id.0[..])
        .arg(off + 5)
        .arg(&[byte[0] ^ 0x20][..])
        .query(&mut con)
        .unwrap();
    let vat = inode.chunks[k].offset + victim as u64 * bs + 10;
    for _ in 0..2 {
        let (_, gets, ranges) = redis_cost(&mut con, &mut || {
            let e = read_at(&source2, inode, vat, 100).unwrap_err().to_string();
            assert!(
                e.contains(&chex)
                    && e.contains(&format!("block {victim} ("))
                    && e.contains("hash mismatch"),
                "{e}"
            );
        });
        // Each attempt reads the store again: nothing bad was cached.
        assert_eq!((gets, ranges), (0, 1));
    }
    let vhex = block_key(&c.id, victim).to_hex();
    assert!(!cache
        .join(&vhex[..2])
        .join(format!("{vhex}.plain"))
        .exists());
    assert_eq!(read_at(&source2, inode, at, 4096).unwrap(), want);

    // An image without its block tables: the fetcher reads the chunk's table (one GETRANGE,
    // verified against the id), then the block (one more); another block of it is one GETRANGE.
    let mut bare = flist_fs::meta::read_image(&blocked).unwrap();
    bare.tables.clear();
    let bare_path = t.join("bare.flist");
    flist_fs::meta::write_image_atomic(&bare, &bare_path).unwrap();
    let fresh = Arc::new(FetcherClient::connect(&fetcher.sock, 1).unwrap());
    let (_, source3) = open_image_remote(&bare_path, fresh, None).unwrap();
    let last = inode.chunks.len() - 1;
    let lc = &inode.chunks[last];
    let la = lc.offset + 100;
    let (_, gets, ranges) = redis_cost(&mut con, &mut || {
        assert_eq!(
            read_at(&source3, inode, la, 1000).unwrap(),
            &data[la as usize..la as usize + 1000]
        )
    });
    assert_eq!((gets, ranges), (0, 2));
    if lc.size > DEFAULT_BLOCK {
        let lb = la + bs;
        let (_, gets, ranges) = redis_cost(&mut con, &mut || {
            let n = 1000.min(lc.offset + u64::from(lc.size) - lb);
            assert_eq!(
                read_at(&source3, inode, lb, n).unwrap(),
                &data[lb as usize..(lb + n) as usize]
            )
        });
        assert_eq!((gets, ranges), (0, 1));
    }

    let mut fetcher = fetcher;
    assert!(
        fetcher.child.try_wait().unwrap().is_none(),
        "the fetcher is still running"
    );
}
