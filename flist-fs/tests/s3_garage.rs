//! `s3://` store against a real single-node Garage started by the test on loopback: pack into
//! S3 (credentials in the URL, which must not reach the image), read back with credentials from
//! the environment, verify, and a clear error for wrong credentials.

mod common;

use common::*;
use flist_fs::open::{open_image, OpenOptions};
use flist_fs::pack::{pack, PackOptions};
use flist_fs::store::Router;
use std::path::Path;
use std::process::{Command, Stdio};

fn garage(bin: &Path, conf: &Path, args: &[&str]) -> String {
    for _ in 0..60 {
        let out = Command::new(bin)
            .arg("-c")
            .arg(conf)
            .args(args)
            .output()
            .expect("run garage");
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    panic!("garage {args:?} kept failing");
}

fn field(out: &str, label: &str) -> String {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {label:?} in garage output:\n{out}"))
}

#[test]
fn s3_store_on_garage() {
    let Some(bin) = server_binary(
        "garage",
        "GARAGE",
        "cargo install garage --locked --root /opt/garage (then PATH=/opt/garage/bin:$PATH)",
    ) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let (rpc, s3, admin) = (free_port(), free_port(), free_port());
    let conf = t.path().join("garage.toml");
    std::fs::write(
        &conf,
        format!(
            r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
            d = t.path().display(),
            secret = "4f".repeat(32)
        ),
    )
    .unwrap();
    let child = Command::new(&bin)
        .arg("-c")
        .arg(&conf)
        .arg("server")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start garage server");
    let _server = KillOnDrop(child);
    wait_for_port(rpc);
    let node = garage(&bin, &conf, &["node", "id", "-q"]);
    let node = node.trim().split('@').next().unwrap().to_string();
    garage(
        &bin,
        &conf,
        &["layout", "assign", "-z", "dc1", "-c", "1G", &node],
    );
    garage(&bin, &conf, &["layout", "apply", "--version", "1"]);
    garage(&bin, &conf, &["bucket", "create", "flist"]);
    let key = garage(&bin, &conf, &["key", "create", "flist-key"]);
    let (ak, sk) = (field(&key, "Key ID:"), field(&key, "Secret key:"));
    garage(
        &bin,
        &conf,
        &[
            "bucket",
            "allow",
            "--read",
            "--write",
            "flist",
            "--key",
            "flist-key",
        ],
    );
    wait_for_port(s3);

    let src = t.path().join("src");
    sample_tree(&src);
    let img = t.path().join("img.flist");
    let url = format!("s3://{ak}:{sk}@127.0.0.1:{s3}/flist/chunks?region=garage");
    let router = Router::from_specs(&[url]).unwrap();
    let stats = pack(&src, &img, &router, &PackOptions::default()).unwrap();
    assert!(stats.new_chunks > 5);
    let bytes = std::fs::read(&img).unwrap();
    let image = flist_fs::meta::read_image(&img).unwrap();
    assert_eq!(
        image.routes[0].url,
        format!("s3://127.0.0.1:{s3}/flist/chunks?region=garage")
    );
    let raw = String::from_utf8_lossy(&bytes);
    assert!(!raw.contains(&sk));

    // Without credentials the store cannot even be opened; the error names the store.
    std::env::remove_var("AWS_ACCESS_KEY_ID");
    let e = open_image(&img, &OpenOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("access key") && e.contains(&format!("127.0.0.1:{s3}")),
        "{e}"
    );

    // Credentials from the environment go to an image's store only when
    // FLIST_STORE_CREDENTIALS_FOR names it.
    std::env::set_var("FLIST_S3_ACCESS_KEY", &ak);
    std::env::set_var("FLIST_S3_SECRET_KEY", &sk);
    std::env::set_var(
        "FLIST_STORE_CREDENTIALS_FOR",
        format!("s3://127.0.0.1:{}/flist/other", s3),
    );
    let e = open_image(&img, &OpenOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("access key"), "{e}");
    std::env::set_var(
        "FLIST_STORE_CREDENTIALS_FOR",
        format!("s3://127.0.0.1:{s3}/flist/chunks"),
    );

    // Wrong secret: the read error names the store and the HTTP status.
    std::env::set_var("FLIST_S3_SECRET_KEY", "wrong");
    let (image, source) = open_image(&img, &OpenOptions::default()).unwrap();
    let big = image.inode(image.resolve("/sub/big.bin").unwrap()).unwrap();
    let e = source.stored(&big.chunks[0].id).unwrap_err().to_string();
    assert!(
        e.contains("HTTP 403") && e.contains(&format!("127.0.0.1:{s3}")),
        "{e}"
    );

    std::env::set_var("FLIST_S3_SECRET_KEY", &sk);
    let (image, source) = open_image(&img, &OpenOptions::default()).unwrap();
    let dest = t.path().join("out");
    flist_fs::unpack::unpack(&image, &source, &dest, &Default::default()).unwrap();
    assert_same_tree(&src, &dest);
    let report = flist_fs::verify::verify(&image, source.router(), false);
    assert!(report.is_ok(), "{:?}", report.problems);

    // A small read of a blocked chunk: ranged GETs (its block table, then one block), signed
    // without the Range header, answered by Garage.
    assert_ne!(image.block_size, 0);
    let want = std::fs::read(src.join("sub/big.bin")).unwrap();
    let (image, fresh) = open_image(&img, &OpenOptions::default()).unwrap();
    let big = image.inode(image.resolve("/sub/big.bin").unwrap()).unwrap();
    let mut got = Vec::new();
    let before = flist_fs::store::range_replies();
    fresh
        .read_range(big, 1_000_000, 4096, &mut |b| {
            got.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
    assert!(got == want[1_000_000..1_004_096]);
    // Garage answered each ranged GET with a partial reply (206) whose Content-Range is the
    // range asked for, not with the whole chunk.
    let after = flist_fs::store::range_replies();
    assert!(
        after.answered > before.answered && after.ignored == before.ignored,
        "{before:?} -> {after:?}"
    );
}
