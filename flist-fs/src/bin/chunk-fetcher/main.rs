//! `chunk-fetcher`: the node's chunk fetcher (see `flist_fs::fetcher`). One per node: it owns
//! the chunk cache, the store allowlist and its credentials, and serves verified chunk
//! plaintexts to the vmm processes over a unix socket as read-only descriptors.
//!
//! ```text
//! chunk-fetcher --listen /run/gridnode/fetcher.sock --cache /var/cache/gridnode/chunks \
//!     --cache-max-bytes 10737418240 --store zdb://:pw@10.0.0.5:9900/images \
//!     [--socket-mode 0660 --socket-group vmm]
//! chunk-fetcher --config /etc/gridnode/node.json      # the vmm's node configuration
//! ```
//!
//! `FLIST_LOG` (or `RUST_LOG`) sets the log filter (default `info`).

use anyhow::{bail, Context, Result};
use clap::Parser;
use flist_fs::cache::ChunkCache;
use flist_fs::fetcher::server::{run, Fetcher, ServerConfig};
use flist_fs::store::StorePolicy;
use serde::Deserialize;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const DEFAULT_CACHE: &str = "/var/cache/gridnode/chunks";
const DEFAULT_CACHE_BYTES: u64 = 10 << 30;

#[derive(Parser, Debug)]
#[command(
    name = "chunk-fetcher",
    about = "The node's chunk fetcher for vmm processes"
)]
struct Cli {
    /// The unix socket to listen on (replaces a stale socket there).
    #[arg(long)]
    listen: Option<PathBuf>,
    /// The chunk cache directory (owned by this process; key file beside it).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Bound of the chunk cache in bytes.
    #[arg(long)]
    cache_max_bytes: Option<u64>,
    /// An allowed store (repeatable), with its credentials.
    #[arg(long = "store")]
    stores: Vec<String>,
    /// The vmm's node configuration (JSON: image_cache, image_cache_max_bytes, stores,
    /// fetcher); command-line flags take precedence.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Mode of the socket, octal.
    #[arg(long, default_value = "0660")]
    socket_mode: String,
    /// Group of the socket (name or number).
    #[arg(long)]
    socket_group: Option<String>,
    /// Most connections served at once.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
}

/// The node configuration file, as the vmm reads it (`vmm/src/config/node.rs`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    #[serde(default)]
    image_cache: Option<PathBuf>,
    #[serde(default)]
    image_cache_max_bytes: Option<u64>,
    #[serde(default)]
    stores: Vec<String>,
    #[serde(default)]
    fetcher: Option<PathBuf>,
}

fn load_node(path: &Path) -> Result<NodeFile> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot read node configuration {}", path.display()))?;
    let mode = file.metadata()?.mode() & 0o7777;
    if mode & 0o006 != 0 {
        bail!(
            "node configuration {} has mode {mode:04o}: it holds store credentials, so other users must not read or write it (chmod 600)",
            path.display()
        );
    }
    serde_json::from_reader(std::io::BufReader::new(file))
        .with_context(|| format!("invalid node configuration {}", path.display()))
}

fn group_id(g: &str) -> Result<u32> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(n);
    }
    let name = std::ffi::CString::new(g).context("group name")?;
    // SAFETY: a zeroed `group` (null pointers, zero ids) is a valid value to be filled in.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: valid buffers of the given sizes; `out` points into `grp` on success.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        bail!("unknown group {g:?}");
    }
    Ok(grp.gr_gid)
}

fn bind(path: &Path, mode: u32, group: Option<u32>) -> Result<std::os::unix::net::UnixListener> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket: not replaced",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    // Created with no access for others; opened up to `mode` below.
    // SAFETY: umask only changes the process file-creation mask; restored below.
    let old = unsafe { libc::umask(0o177) };
    let l = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = l.with_context(|| format!("cannot listen on {}", path.display()))?;
    if let Some(gid) = group {
        std::os::unix::fs::lchown(path, None, Some(gid))
            .with_context(|| format!("chgrp {gid} {}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
    Ok(l)
}

/// Raises the soft limit of open descriptors to the hard one: the fetcher keeps checked
/// plaintexts open (`MAX_OPEN_PLAIN_INDEXED`) besides a connection per vmm socket.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!("cannot raise the open file limit");
            }
        }
    }
}

fn main() -> Result<()> {
    let filter = std::env::var("FLIST_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let node = match &cli.config {
        Some(p) => load_node(p)?,
        None => NodeFile::default(),
    };
    let listen = cli
        .listen
        .clone()
        .or(node.fetcher.clone())
        .context("no socket to listen on: --listen SOCK (or \"fetcher\" in --config)")?;
    let cache_dir = cli
        .cache
        .clone()
        .or(node.image_cache.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE));
    let max_bytes = cli
        .cache_max_bytes
        .or(node.image_cache_max_bytes)
        .unwrap_or(DEFAULT_CACHE_BYTES);
    let stores: Vec<&String> = node.stores.iter().chain(&cli.stores).collect();
    if stores.is_empty() {
        bail!("no store allowlist: give --store URL (or \"stores\" in --config)");
    }
    let policy = StorePolicy::allowlist(&stores)?;
    let router = policy.open_all()?;
    let mode = u32::from_str_radix(cli.socket_mode.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .with_context(|| format!("--socket-mode {:?}: not an octal mode", cli.socket_mode))?;
    let group = cli.socket_group.as_deref().map(group_id).transpose()?;

    raise_open_file_limit();
    let started = std::time::Instant::now();
    let cache = Arc::new(ChunkCache::open_indexed(&cache_dir, max_bytes, None)?);
    tracing::info!(
        cache = %cache_dir.display(),
        entries = cache.indexed_entries(),
        used = cache.used_bytes(),
        max_bytes,
        took_ms = started.elapsed().as_millis() as u64,
        "cache indexed"
    );
    cache.start_evictor()?;
    let listener = bind(&listen, mode, group)?;
    tracing::info!(
        socket = %listen.display(),
        mode = format!("{mode:04o}"),
        stores = ?policy,
        "chunk fetcher listening"
    );
    let config = ServerConfig {
        max_connections: cli.max_connections.max(1),
        ..ServerConfig::default()
    };
    run(listener, Arc::new(Fetcher::new(router, cache, config)))?;
    Ok(())
}
