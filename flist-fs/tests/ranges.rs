//! Blocked chunks (`flist_fs::chunk::blocks`): a small read fetches the block it needs (its
//! table is in the image), not the chunk (bytes counted by a real `redis-server`), and the
//! block table too for an image without tables; a corrupted block is refused naming the file
//! and offset while the chunk's other blocks still read; whole-chunk images (format 1) still
//! read; a hostile block table is refused, in the image or in a store.

mod common;

use common::*;
use flist_fs::chunk::blocks::{table_len, Table, DEFAULT_BLOCK};
use flist_fs::chunk::ChunkId;
use flist_fs::open::{open_image, OpenOptions};
use flist_fs::pack::{pack, PackOptions};
use flist_fs::store::Router;
use std::path::Path;

/// A tree with one 3 MiB incompressible file, `/big` (content-defined chunks of 64 KiB-1 MiB).
fn big_tree(root: &Path) -> Vec<u8> {
    std::fs::create_dir_all(root).unwrap();
    let data = pseudo_random(3 << 20, 21);
    std::fs::write(root.join("big"), &data).unwrap();
    data
}

fn pack_with(src: &Path, img: &Path, store: &str, block_size: u32) {
    let opts = PackOptions {
        block_size,
        ..PackOptions::default()
    };
    pack(
        src,
        img,
        &Router::from_specs(&[store.to_string()]).unwrap(),
        &opts,
    )
    .unwrap();
}

fn read(
    source: &flist_fs::fetch::ChunkSource,
    inode: &flist_fs::meta::Inode,
    off: u64,
    len: u64,
) -> Vec<u8> {
    let mut out = Vec::new();
    source
        .read_range(inode, off, len, &mut |b| {
            out.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
    out
}

#[test]
fn a_small_read_fetches_only_its_blocks() {
    let Some((_server, port)) = start_redis() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let data = big_tree(&t.path().join("src"));
    let store = format!("redis://127.0.0.1:{port}/0");
    let (blocked, whole) = (t.path().join("blocked.flist"), t.path().join("whole.flist"));
    pack_with(&t.path().join("src"), &blocked, &store, DEFAULT_BLOCK);
    pack_with(&t.path().join("src"), &whole, &store, 0);
    let mut con = redis::Client::open(store.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut con)
        .unwrap();
    // Bytes redis sent and the GET/GETRANGE calls it served while `f` ran (the INFO replies
    // themselves are a few hundred bytes).
    let mut measure = |f: &mut dyn FnMut()| -> (u64, u64, u64) {
        let sent = redis_info(&mut con, "stats", "total_net_output_bytes");
        let gets = redis_info(&mut con, "commandstats", "cmdstat_get");
        let ranges = redis_info(&mut con, "commandstats", "cmdstat_getrange");
        f();
        (
            redis_info(&mut con, "stats", "total_net_output_bytes") - sent,
            redis_info(&mut con, "commandstats", "cmdstat_get") - gets,
            redis_info(&mut con, "commandstats", "cmdstat_getrange") - ranges,
        )
    };
    let at = 2 * 1024 * 1024 + 3 * 4096;
    let want = &data[at as usize..at as usize + 4096];
    let no_cache = OpenOptions {
        stores: vec![store.clone()],
        ..OpenOptions::default()
    };

    // Whole chunks: the read fetches its whole chunk.
    let (image, source) = open_image(&whole, &no_cache).unwrap();
    let inode = image.inode(image.resolve("/big").unwrap()).unwrap();
    let chunk = inode
        .chunks
        .iter()
        .find(|c| c.offset <= at && at < c.offset + u64::from(c.size))
        .unwrap();
    let (whole_bytes, gets, _) = measure(&mut || assert_eq!(read(&source, inode, at, 4096), want));
    assert_eq!(gets, 1);
    assert!(
        whole_bytes >= u64::from(chunk.size),
        "{whole_bytes} < {}",
        chunk.size
    );

    // Blocked: one block, with one GETRANGE and no GET (the block table is in the image).
    let (image, source) = open_image(&blocked, &no_cache).unwrap();
    assert_eq!(image.block_size, DEFAULT_BLOCK);
    assert!(!image.tables.is_empty());
    let inode = image.inode(image.resolve("/big").unwrap()).unwrap();
    let chunk = inode
        .chunks
        .iter()
        .find(|c| c.offset <= at && at < c.offset + u64::from(c.size))
        .unwrap()
        .clone();
    let (sent, gets, ranges) = measure(&mut || assert_eq!(read(&source, inode, at, 4096), want));
    let table = table_len(DEFAULT_BLOCK, chunk.size) as u64;
    let block = flist_fs::chunk::max_stored_size(DEFAULT_BLOCK) as u64;
    println!("4 KiB read: whole chunks {whole_bytes} bytes sent, blocked {sent}");
    assert_eq!((gets, ranges), (0, 1));
    assert!(sent <= block + 2048, "{sent} bytes for one block");
    assert!(sent * 4 < whole_bytes, "{sent} vs {whole_bytes}");

    // An image without its block tables (the format allows it): the table is fetched first
    // (one more GETRANGE), then kept: another block of the same chunk is one GETRANGE.
    let mut bare = flist_fs::meta::read_image(&blocked).unwrap();
    bare.tables.clear();
    let bare_path = t.path().join("bare.flist");
    flist_fs::meta::write_image_atomic(&bare, &bare_path).unwrap();
    let (_, source) = open_image(&bare_path, &no_cache).unwrap();
    let (sent, gets, ranges) = measure(&mut || assert_eq!(read(&source, inode, at, 4096), want));
    assert_eq!((gets, ranges), (0, 2));
    assert!(
        sent <= table + block + 2048,
        "{sent} bytes for a table and a block"
    );
    let next = at + u64::from(DEFAULT_BLOCK);
    if next + 4096 <= chunk.offset + u64::from(chunk.size) {
        let (_, _, ranges) = measure(&mut || {
            let got = read(&source, inode, next, 4096);
            assert!(got == data[next as usize..next as usize + 4096]);
        });
        assert_eq!(ranges, 1);
    }

    // With a cache: a later reader of the same bytes asks the store nothing.
    let cached = OpenOptions {
        stores: vec![store.clone()],
        cache_dir: Some(t.path().join("cache")),
        ..OpenOptions::default()
    };
    let (_, source) = open_image(&blocked, &cached).unwrap();
    let (_, _, ranges) = measure(&mut || assert_eq!(read(&source, inode, at, 4096), want));
    assert_eq!(ranges, 1);
    // (Dropping a source finishes its cache writes, which run behind its reads.)
    drop(source);
    let (_, later) = open_image(&blocked, &cached).unwrap();
    let (_, gets, ranges) = measure(&mut || {
        let got = read(&later, inode, at + 100, 4096);
        assert!(got == data[at as usize + 100..at as usize + 4196]);
    });
    assert_eq!((gets, ranges), (0, 0));
}

/// The stored bytes of chunk `id` in dir store `store`.
fn stored_path(store: &Path, id: &ChunkId) -> std::path::PathBuf {
    let hex = id.to_hex();
    store.join(&hex[..2]).join(hex)
}

#[test]
fn a_corrupted_block_is_refused_naming_the_file_and_offset() {
    let t = tempfile::tempdir().unwrap();
    let data = big_tree(&t.path().join("src"));
    let store = t.path().join("store");
    let url = format!("dir://{}", store.display());
    let img = t.path().join("img.flist");
    pack_with(&t.path().join("src"), &img, &url, DEFAULT_BLOCK);
    let opts = OpenOptions {
        stores: vec![url.clone()],
        ..OpenOptions::default()
    };
    let (image, _) = open_image(&img, &opts).unwrap();
    let inode = image.inode(image.resolve("/big").unwrap()).unwrap();
    let c = &inode.chunks[1];
    // Flip one byte of block 1 of the file's second chunk.
    let path = stored_path(&store, &c.id);
    let mut bytes = std::fs::read(&path).unwrap();
    let tl = table_len(DEFAULT_BLOCK, c.size);
    let table = Table::parse(&c.id, DEFAULT_BLOCK, c.size, &bytes[..tl]).unwrap();
    bytes[table.blocks[1].offset as usize + 7] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let bad_at = c.offset + u64::from(DEFAULT_BLOCK);

    // `flist cat` fails naming the file, the offset, the chunk and the block.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flist"))
        .args([
            "cat",
            img.to_str().unwrap(),
            "/big",
            "--no-cache",
            "--store",
            &url,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("/big at offset {bad_at}"))
            && err.contains(&c.id.to_hex())
            && err.contains("block 1 (chunk bytes 32768..65536): hash mismatch"),
        "{err}"
    );
    // The chunk's other blocks still read; the bad one never does.
    let (image, source) = open_image(&img, &opts).unwrap();
    let inode = image.inode(image.resolve("/big").unwrap()).unwrap();
    let good = c.offset + 2 * u64::from(DEFAULT_BLOCK);
    assert_eq!(
        read(&source, inode, good, 4096),
        data[good as usize..good as usize + 4096]
    );
    assert_eq!(
        read(&source, inode, c.offset, 4096),
        data[c.offset as usize..c.offset as usize + 4096]
    );
    let e = source
        .read_range(inode, bad_at + 10, 100, &mut |_| Ok(()))
        .unwrap_err()
        .in_file("/big")
        .to_string();
    assert!(
        e.contains(&format!("/big at offset {}", bad_at + 10)) && e.contains("hash mismatch"),
        "{e}"
    );
    // `flist verify` finds it too.
    let report = flist_fs::verify::verify(&image, &Router::from_specs(&[url]).unwrap(), false);
    assert_eq!(report.problems.len(), 1, "{report:?}");
    assert!(report.problems[0].reason.contains("block 1"), "{report:?}");
}

#[test]
fn whole_chunk_images_still_read() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    sample_tree(&src);
    let url = format!("dir://{}", t.path().join("store").display());
    for (name, block_size, version) in [("whole", 0, 1u32), ("blocked", DEFAULT_BLOCK, 2)] {
        let img = t.path().join(format!("{name}.flist"));
        pack_with(&src, &img, &url, block_size);
        assert_eq!(
            std::fs::read(&img).unwrap()[8..12],
            version.to_le_bytes(),
            "{name}"
        );
        let opts = OpenOptions {
            cache_dir: Some(t.path().join(format!("cache-{name}"))),
            ..OpenOptions::default()
        };
        let (image, source) = open_image(&img, &opts).unwrap();
        assert_eq!(image.block_size, block_size);
        let dest = t.path().join(format!("out-{name}"));
        flist_fs::unpack::unpack(&image, &source, &dest, &Default::default()).unwrap();
        assert_same_tree(&src, &dest);
        let big = std::fs::read(src.join("sub/big.bin")).unwrap();
        let inode = image.inode(image.resolve("/sub/big.bin").unwrap()).unwrap();
        for (off, len) in [(0, 10), (100_000, 70_000), (big.len() as u64 - 5, 100)] {
            let end = (off + len).min(big.len() as u64);
            assert_eq!(
                read(&source, inode, off, len),
                big[off as usize..end as usize],
                "{name}"
            );
        }
        let report =
            flist_fs::verify::verify(&image, &Router::from_routes(&image.routes).unwrap(), false);
        assert!(report.is_ok(), "{name}: {report:?}");
    }
}

#[test]
fn a_hostile_block_table_is_refused() {
    let t = tempfile::tempdir().unwrap();
    big_tree(&t.path().join("src"));
    let store = t.path().join("store");
    let url = format!("dir://{}", store.display());
    let img = t.path().join("img.flist");
    pack_with(&t.path().join("src"), &img, &url, DEFAULT_BLOCK);
    let mut image = flist_fs::meta::read_image(&img).unwrap();
    let ino = image.resolve("/big").unwrap();
    let old = image.inode(ino).unwrap().chunks[0].clone();
    // A packer's table, hashed right, whose first block claims 4 GiB of stored bytes.
    let mut table = b"FLB1".to_vec();
    table.extend_from_slice(&DEFAULT_BLOCK.to_le_bytes());
    table.extend_from_slice(&old.size.to_le_bytes());
    for i in 0..old.size.div_ceil(DEFAULT_BLOCK) {
        let len = if i == 0 { u32::MAX } else { 100 };
        table.extend_from_slice(&len.to_le_bytes());
        table.extend_from_slice(&[0u8; 32]);
    }
    let id = ChunkId::of(&table);
    image.inodes[ino as usize - 1].chunks[0].id = id;
    image.tables.remove(&old.id);

    // In the image: refused when written, and when read (a hostile writer skips the check).
    image.tables.insert(id, table.clone());
    let e = flist_fs::meta::write_image_atomic(&image, &img)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("inode") && e.contains("block 0 claims 4294967295 stored bytes"),
        "{e}"
    );
    let bytes = flist_fs::meta::encode_unvalidated(&image, &img).unwrap();
    let e = flist_fs::meta::decode_image(&bytes, &img)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("block 0 claims 4294967295") && e.contains(&id.to_hex()),
        "{e}"
    );
    // A table that does not hash to its chunk id, in the image.
    let mut other = image.clone();
    other
        .tables
        .insert(id, [&table[..12], &[7u8; 36][..]].concat());
    let bytes = flist_fs::meta::encode_unvalidated(&other, &img).unwrap();
    let e = flist_fs::meta::decode_image(&bytes, &img)
        .unwrap_err()
        .to_string();
    assert!(e.contains("block table") && e.contains(&id.to_hex()), "{e}");

    // In a store, for an image without tables: refused when a read fetches it.
    image.tables.remove(&id);
    flist_fs::meta::write_image_atomic(&image, &img).unwrap();
    let path = stored_path(&store, &id);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &table).unwrap();
    let (image, source) = open_image(&img, &OpenOptions::default()).unwrap();
    let inode = image.inode(ino).unwrap();
    let e = source
        .read_range(inode, 0, 4096, &mut |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("block 0 claims 4294967295 stored bytes") && e.contains(&id.to_hex()),
        "{e}"
    );
    // The whole-chunk path (unpack, the chunk fetcher) refuses it too.
    let e = source.plain(&inode.chunks[0]).unwrap_err().to_string();
    assert!(e.contains(&id.to_hex()), "{e}");
}

#[test]
fn encrypted_blocks_are_cached_as_stored() {
    let t = tempfile::tempdir().unwrap();
    let data = big_tree(&t.path().join("src"));
    let store = t.path().join("store");
    let img = t.path().join("img.flist");
    let opts = PackOptions {
        encrypt: true,
        ..PackOptions::default()
    };
    let router = Router::from_specs(&[format!("dir://{}", store.display())]).unwrap();
    pack(&t.path().join("src"), &img, &router, &opts).unwrap();
    let cached = OpenOptions {
        cache_dir: Some(t.path().join("cache")),
        ..OpenOptions::default()
    };
    let at = 1_500_000u64 & !4095;
    let want = &data[at as usize..at as usize + 4096];
    let (image, source) = open_image(&img, &cached).unwrap();
    let inode = image.inode(image.resolve("/big").unwrap()).unwrap();
    assert!(inode.chunks[0].key.is_some());
    assert_eq!(read(&source, inode, at, 4096), want);
    drop(source);
    // The store is gone: a later reader is served by the cache (ciphertext, checked).
    std::fs::remove_dir_all(&store).unwrap();
    let (_, later) = open_image(&img, &cached).unwrap();
    assert!(read(&later, inode, at + 8, 4000) == want[8..4008]);
    assert!(later.read_range(inode, 0, 10, &mut |_| Ok(())).is_err());
}
