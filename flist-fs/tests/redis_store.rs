//! `redis://` store against a real `redis-server` started by the test: pack into redis (and
//! replicated into a dir store), unpack, verify, and fail-over when redis goes down.

mod common;

use common::*;
use flist_fs::open::{open_image, OpenOptions};
use flist_fs::pack::{pack, PackOptions};
use flist_fs::store::Router;

#[test]
fn redis_store_roundtrip_and_failover() {
    let Some((mut server, port)) = start_redis() else {
        return;
    };

    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    sample_tree(&src);
    let redis = format!("redis://127.0.0.1:{port}/0");
    let dir = format!("dir://{}", t.path().join("store").display());
    let img = t.path().join("img.flist");
    // Replicate: both stores cover every id.
    let router = Router::from_specs(&[redis.clone(), dir.clone()]).unwrap();
    let stats = pack(&src, &img, &router, &PackOptions::default()).unwrap();
    assert!(stats.new_chunks > 0);

    let only_redis = OpenOptions {
        stores: vec![redis.clone()],
        ..OpenOptions::default()
    };
    let (image, source) = open_image(&img, &only_redis).unwrap();
    let dest = t.path().join("out");
    flist_fs::unpack::unpack(&image, &source, &dest, &Default::default()).unwrap();
    assert_same_tree(&src, &dest);
    assert!(
        flist_fs::verify::verify(&image, &Router::from_routes(&image.routes).unwrap(), false)
            .is_ok()
    );

    // Redis down: the image's own routes (redis, dir) fail over to the dir store.
    let _ = server.0.kill();
    let _ = server.0.wait();
    let (image, source) = open_image(&img, &OpenOptions::default()).unwrap();
    let big = image.inode(image.resolve("/sub/big.bin").unwrap()).unwrap();
    let mut n = 0u64;
    source
        .read_range(big, 0, big.size, &mut |b| {
            n += b.len() as u64;
            Ok(())
        })
        .unwrap();
    assert_eq!(n, big.size);
    let (_, source) = open_image(&img, &only_redis).unwrap();
    let e = source.stored(&big.chunks[0].id).unwrap_err().to_string();
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
}
