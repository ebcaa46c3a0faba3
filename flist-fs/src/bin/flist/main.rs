//! The `flist` command line: argument parsing and dispatch to the subcommand modules.

mod inspect;
mod ops;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "flist",
    version,
    about = "Content-addressed images: pack, store, verify, mount"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where chunks are read from and cached.
#[derive(clap::Args, Clone)]
pub struct ReadArgs {
    /// Store spec `[SS-EE=]URL` overriding the image's stores (repeatable).
    #[arg(long = "store")]
    stores: Vec<String>,
    /// Chunk cache directory (default: $FLIST_CACHE, else /var/cache/flist as root or
    /// ~/.cache/flist).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Cache size bound in MiB.
    #[arg(long, default_value_t = 10240)]
    cache_mib: u64,
    /// Do not use the disk cache.
    #[arg(long)]
    no_cache: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pack a directory into an image, storing its chunks.
    Pack(ops::PackArgs),
    /// Unpack an image into a directory.
    Unpack {
        image: PathBuf,
        dir: PathBuf,
        /// Restore uid/gid (default when running as root).
        #[arg(long)]
        owner: bool,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// List a directory of an image.
    Ls {
        image: PathBuf,
        #[arg(default_value = "/")]
        path: String,
        /// Long format.
        #[arg(short, long)]
        long: bool,
        /// Recurse.
        #[arg(short = 'R', long)]
        recursive: bool,
    },
    /// Show one entry's metadata.
    Stat { image: PathBuf, path: String },
    /// Write a file's content to stdout.
    Cat {
        image: PathBuf,
        path: String,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Show differences between two images.
    Diff { a: PathBuf, b: PathBuf },
    /// Check every chunk is present and correct in every store.
    Verify {
        image: PathBuf,
        /// Store spec overriding the image's stores (repeatable).
        #[arg(long = "store")]
        stores: Vec<String>,
    },
    /// Show the image's tags, stores and totals.
    Info { image: PathBuf },
    /// Replace the stores recorded in an image (e.g. with a read-only HTTP mirror).
    SetStores {
        image: PathBuf,
        /// Store spec `[SS-EE=]URL` (repeatable); credentials are never recorded.
        #[arg(long = "store", required = true)]
        stores: Vec<String>,
    },
    /// Import an OCI image (layout directory or `docker save` tarball).
    Import(ops::ImportArgs),
    /// Mount an image read-only through FUSE (runs until unmounted).
    Mount {
        image: PathBuf,
        mountpoint: PathBuf,
        /// Let other users access the mount.
        #[arg(long)]
        allow_other: bool,
        /// Request-serving threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        #[command(flatten)]
        read: ReadArgs,
    },
}

fn main() {
    // Die quietly on a closed pipe (`flist ls IMAGE | head`), like other Unix tools.
    // SAFETY: restoring the default disposition of SIGPIPE has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLIST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a terminal: a log file or pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("flist: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Pack(a) => ops::pack(a),
        Cmd::Unpack {
            image,
            dir,
            owner,
            read,
        } => ops::unpack(&image, &dir, owner, &read),
        Cmd::Ls {
            image,
            path,
            long,
            recursive,
        } => inspect::ls(&image, &path, long, recursive),
        Cmd::Stat { image, path } => inspect::stat(&image, &path),
        Cmd::Cat { image, path, read } => inspect::cat(&image, &path, &read),
        Cmd::Diff { a, b } => inspect::diff(&a, &b),
        Cmd::Verify { image, stores } => ops::verify(&image, stores),
        Cmd::Info { image } => inspect::info(&image),
        Cmd::SetStores { image, stores } => ops::set_stores(&image, &stores),
        Cmd::Import(a) => ops::import(a),
        Cmd::Mount {
            image,
            mountpoint,
            allow_other,
            threads,
            read,
        } => ops::mount(&image, &mountpoint, allow_other, threads, &read),
    }
}

impl ReadArgs {
    /// Library open options from the flags.
    pub fn open_options(&self) -> flist_fs::open::OpenOptions {
        let cache_dir = if self.no_cache {
            None
        } else {
            self.cache.clone().or_else(default_cache_dir)
        };
        flist_fs::open::OpenOptions {
            stores: self.stores.clone(),
            policy: None,
            cache_dir,
            cache_max_bytes: self.cache_mib << 20,
            cache: None,
        }
    }
}

fn default_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FLIST_CACHE") {
        return Some(PathBuf::from(d));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Some(PathBuf::from("/var/cache/flist"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/flist"))
}
