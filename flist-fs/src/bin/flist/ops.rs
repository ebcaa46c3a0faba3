//! Commands that move data: pack, unpack, verify, import, mount.

use crate::ReadArgs;
use anyhow::{bail, Context, Result};
use flist_fs::chunk::ChunkerKind;
use flist_fs::pack::PackOptions;
use flist_fs::store::Router;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(clap::Args)]
pub struct PackArgs {
    /// Directory to pack.
    dir: PathBuf,
    /// Output image file.
    #[arg(short, long)]
    output: PathBuf,
    /// Store spec `[SS-EE=]URL` (repeatable; overlapping ranges replicate).
    #[arg(long = "store", required = true)]
    stores: Vec<String>,
    /// Convergent encryption of chunks.
    #[arg(long)]
    encrypt: bool,
    /// Fixed-size chunks of this many KiB instead of content-defined chunking.
    #[arg(long)]
    fixed_kib: Option<u32>,
    /// Store each chunk in independently fetched blocks of this many KiB (a power of two, 4 to
    /// 1024), so small reads fetch a block, not the chunk; 0 stores whole chunks (format 1).
    #[arg(long, default_value_t = flist_fs::chunk::blocks::DEFAULT_BLOCK / 1024)]
    block_kib: u32,
    /// Tag `key=value` (repeatable), e.g. name=, version=, author=.
    #[arg(long = "tag")]
    tags: Vec<String>,
}

#[derive(clap::Args)]
pub struct ImportArgs {
    /// OCI image layout directory or `docker save` tarball.
    source: PathBuf,
    /// Output image file.
    #[arg(short, long)]
    output: PathBuf,
    /// Store spec `[SS-EE=]URL` (repeatable).
    #[arg(long = "store", required = true)]
    stores: Vec<String>,
    /// Which image of a multi-image archive (a ref name or repo tag); default: the first.
    #[arg(long)]
    reference: Option<String>,
    /// Convergent encryption of chunks.
    #[arg(long)]
    encrypt: bool,
    /// Tag `key=value` (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
}

fn parse_tags(tags: &[String]) -> Result<BTreeMap<String, String>> {
    tags.iter()
        .map(|t| {
            t.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("tag {t:?}: expected key=value"))
        })
        .collect()
}

fn summary(stats: &flist_fs::pack::PackStats, out: &Path) {
    println!(
        "packed {}: {} files, {} dirs, {} symlinks, {} special, {} hard links",
        out.display(),
        stats.files,
        stats.dirs,
        stats.symlinks,
        stats.specials,
        stats.hardlinks
    );
    println!(
        "{} bytes in {} chunks: {} new ({} bytes stored), {} deduplicated; {:.1} MB/s over {:.2}s",
        stats.bytes,
        stats.chunks,
        stats.new_chunks,
        stats.stored_bytes,
        stats.dedup_chunks,
        stats.throughput_mb_s(),
        stats.elapsed.as_secs_f64()
    );
}

pub fn pack(a: PackArgs) -> Result<()> {
    let router = Router::from_specs(&a.stores)?;
    let opts = PackOptions {
        chunker: match a.fixed_kib {
            Some(k) => {
                let max_kib = flist_fs::chunk::MAX_CHUNK_SIZE / 1024;
                if k == 0 || k > max_kib {
                    bail!("--fixed-kib {k}: a fixed chunk is 1 to {max_kib} KiB");
                }
                ChunkerKind::Fixed { size: k * 1024 }
            }
            None => ChunkerKind::default(),
        },
        encrypt: a.encrypt,
        tags: parse_tags(&a.tags)?,
        progress: true,
        block_size: match a.block_kib {
            0 => 0,
            k => {
                let size = k.saturating_mul(1024);
                flist_fs::chunk::blocks::check_block_size(size)
                    .map_err(|e| anyhow::anyhow!("--block-kib {k}: {e}"))?;
                size
            }
        },
    };
    let stats = flist_fs::pack::pack(&a.dir, &a.output, &router, &opts)?;
    summary(&stats, &a.output);
    Ok(())
}

pub fn unpack(image: &Path, dir: &Path, owner: bool, read: &ReadArgs) -> Result<()> {
    let (img, source) = flist_fs::open::open_image(image, &read.open_options())?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let opts = flist_fs::unpack::UnpackOptions {
        preserve_owner: owner || root,
        progress: true,
    };
    let stats = flist_fs::unpack::unpack(&img, &source, dir, &opts).with_context(|| {
        format!(
            "unpacking {} failed; nothing was written to {}",
            image.display(),
            dir.display()
        )
    })?;
    println!(
        "unpacked {} entries, {} bytes into {}",
        stats.entries,
        stats.bytes,
        dir.display()
    );
    for s in &stats.skipped {
        println!("skipped (needs privileges): {s}");
    }
    Ok(())
}

pub fn verify(image: &Path, stores: Vec<String>) -> Result<()> {
    let img = flist_fs::meta::read_image(image)?;
    let router = if stores.is_empty() {
        Router::from_routes(&img.routes)?
    } else {
        Router::from_specs(&stores)?
    };
    let report = flist_fs::verify::verify(&img, &router, true);
    for p in &report.problems {
        println!(
            "{} {} in {}: {} (used by {})",
            p.kind.label(),
            p.id,
            p.store,
            p.reason,
            p.files.join(", ")
        );
    }
    if !report.is_ok() {
        use flist_fs::verify::ProblemKind;
        let chunks = report
            .problems
            .iter()
            .map(|p| p.id)
            .collect::<std::collections::HashSet<_>>()
            .len();
        bail!(
            "{}: {chunks} of {} chunks have problems: {} copies missing, {} unreachable, {} corrupt",
            image.display(),
            report.chunks,
            report.count(ProblemKind::Missing),
            report.count(ProblemKind::Unreachable),
            report.count(ProblemKind::Corrupt),
        );
    }
    println!(
        "{}: all {} chunks present and correct ({} copies)",
        image.display(),
        report.chunks,
        report.copies_ok
    );
    Ok(())
}

pub fn set_stores(image: &Path, stores: &[String]) -> Result<()> {
    let mut img = flist_fs::meta::read_image(image)?;
    img.routes = stores
        .iter()
        .map(|s| {
            let (start, end, url) = flist_fs::store::parse_route_spec(s)?;
            Ok(flist_fs::meta::Route { start, end, url })
        })
        .collect::<Result<_>>()?;
    flist_fs::meta::write_image_atomic(&img, image)?;
    for r in &img.routes {
        println!(
            "store {:02x}-{:02x} {}",
            r.start,
            r.end,
            flist_fs::store::redact_url(&r.url)
        );
    }
    Ok(())
}

pub fn import(a: ImportArgs) -> Result<()> {
    let router = Router::from_specs(&a.stores)?;
    let opts = PackOptions {
        encrypt: a.encrypt,
        tags: parse_tags(&a.tags)?,
        progress: true,
        ..PackOptions::default()
    };
    let stats =
        flist_fs::oci::import(&a.source, &a.output, &router, &opts, a.reference.as_deref())?;
    summary(&stats, &a.output);
    Ok(())
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn mount(
    image: &Path,
    mountpoint: &Path,
    allow_other: bool,
    threads: usize,
    read: &ReadArgs,
) -> Result<()> {
    let fs = flist_fs::fs::FlistFs::open(image, &read.open_options())?;
    // Before the mount exists: a signal that came in between would end the process and leave
    // a mount without its server. One that comes before the mount is done ends it at once.
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mounted = flist_fs::fs::mount::mount_with(fs, mountpoint, threads, allow_other)?;
    eprintln!(
        "mounted {} on {} (read-only); Ctrl-C or umount to stop",
        image.display(),
        mountpoint.display()
    );
    while mounted.is_alive() && !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    if mounted.is_alive() {
        mounted.unmount()?;
    }
    Ok(())
}
