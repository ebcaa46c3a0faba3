//! The in-guest half of the virtio-fs benchmark (`benches/src/bin/fs_bench.rs` drives it).
//! Runs inside a micro-VM on a mounted share and prints one `FSBENCH` line per workload:
//!
//! - `seq`: reads `<root>/seq.bin` start to end in 1 MiB reads (MB/s);
//! - `rand`: 4 KiB reads at pseudo-random 4 KiB-aligned offsets of `<root>/rand.bin` (ops/s),
//!   a different file from `seq` so the guest page cache holds none of it;
//! - `readdir`: lists every directory under `<root>/tree` (entries/s);
//! - `stat`: `lstat` of every entry listed (ops/s);
//!
//! and for a writable share (`layer`: an image under a writable layer, or a writable copy of
//! the tree), on the files of `<root>/tree`, in this order:
//!
//! - `lread`: reads each file whole (files/s), none changed yet;
//! - `create`: makes a new file beside every other one, writes 4 KiB to it and `lstat`s it
//!   (files/s);
//! - `copyup`: appends 16 bytes to every other original file, the first change of each (in a
//!   layer, its copy-up) (files/s);
//! - `lreaddir`: lists every directory, now both the image's names and new ones (entries/s);
//! - `unlink`: removes every file (files/s), then counts what is left (`left=`, 0).
//!
//! Each data workload also prints a checksum of what it read (`sum=`, see [`fold`]) so the
//! driver can check that every VMM served the right bytes. Std only, built static.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use guest_fsbench::{fold, Rng, FOLD_SEED, RAND_BLOCK};

const SEQ_BLOCK: usize = 1 << 20;

fn seq(path: &Path) -> Result<(), String> {
    let mut file = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut buf = vec![0u8; SEQ_BLOCK];
    let (mut total, mut sum) = (0u64, FOLD_SEED);
    let start = Instant::now();
    loop {
        // Fill the whole block (a read may return less) so the checksum sees the same words
        // whatever sizes the reads come back in.
        let mut filled = 0;
        while filled < buf.len() {
            let n = file
                .read(&mut buf[filled..])
                .map_err(|e| format!("read {}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        sum = fold(sum, &buf[..filled]);
        total += filled as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "FSBENCH seq {:.2} MB/s bytes={total} secs={secs:.3} sum={sum:016x}",
        total as f64 / 1e6 / secs
    );
    Ok(())
}

fn rand(path: &Path, count: u64, seed: u64) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("stat {}: {e}", path.display()))?
        .len();
    let blocks = len / RAND_BLOCK;
    if blocks == 0 {
        return Err(format!("{} is smaller than 4 KiB", path.display()));
    }
    let mut rng = Rng(seed.max(1));
    let mut buf = [0u8; RAND_BLOCK as usize];
    let mut sum = FOLD_SEED;
    let start = Instant::now();
    for _ in 0..count {
        let offset = (rng.next_u64() % blocks) * RAND_BLOCK;
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| format!("read {} at {offset}: {e}", path.display()))?;
        sum = fold(sum, &buf);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "FSBENCH rand {:.1} ops/s ops={count} secs={secs:.3} sum={sum:016x}",
        count as f64 / secs
    );
    Ok(())
}

/// Lists every directory under `root` (breadth first), then `lstat`s every entry found.
fn meta(root: &Path) -> Result<(), String> {
    let mut dirs = vec![root.to_owned()];
    let mut entries: Vec<PathBuf> = Vec::new();
    let start = Instant::now();
    let mut next = 0;
    while next < dirs.len() {
        let dir = dirs[next].clone();
        next += 1;
        let list =
            std::fs::read_dir(&dir).map_err(|e| format!("readdir {}: {e}", dir.display()))?;
        for entry in list {
            let entry = entry.map_err(|e| format!("readdir {}: {e}", dir.display()))?;
            let kind = entry
                .file_type()
                .map_err(|e| format!("file type in {}: {e}", dir.display()))?;
            if kind.is_dir() {
                dirs.push(entry.path());
            }
            entries.push(entry.path());
        }
    }
    let listed = start.elapsed().as_secs_f64();
    println!(
        "FSBENCH readdir {:.1} entries/s entries={} dirs={} secs={listed:.3}",
        entries.len() as f64 / listed,
        entries.len(),
        dirs.len()
    );
    let start = Instant::now();
    let mut bytes = 0u64;
    for path in &entries {
        let m = std::fs::symlink_metadata(path)
            .map_err(|e| format!("lstat {}: {e}", path.display()))?;
        bytes += m.len();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "FSBENCH stat {:.1} ops/s ops={} secs={secs:.3} bytes={bytes}",
        entries.len() as f64 / secs,
        entries.len()
    );
    Ok(())
}

/// The directories of `root` and each one's files, sorted by name.
fn listing(root: &Path) -> Result<Vec<(PathBuf, Vec<PathBuf>)>, String> {
    let names = |dir: &Path| -> Result<Vec<PathBuf>, String> {
        let mut v = std::fs::read_dir(dir)
            .map_err(|e| format!("readdir {}: {e}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("readdir {}: {e}", dir.display()))?;
        v.sort();
        Ok(v)
    };
    names(root)?
        .into_iter()
        .map(|dir| Ok((dir.clone(), names(&dir)?)))
        .collect()
}

/// Prints one `FSBENCH` line of a phase that did `count` things since `start`.
fn report(name: &str, unit: &str, count: usize, start: Instant, extra: &str) {
    let secs = start.elapsed().as_secs_f64();
    println!(
        "FSBENCH {name} {:.1} {unit} count={count} secs={secs:.3}{extra}",
        count as f64 / secs
    );
}

/// The writable-share workload (see the top of this file) on the tree under `root`.
fn layer(root: &Path) -> Result<(), String> {
    let tree = listing(root)?;
    let files: Vec<&PathBuf> = tree.iter().flat_map(|(_, f)| f).collect();

    let start = Instant::now();
    let mut sum = FOLD_SEED;
    let mut buf = Vec::new();
    for path in &files {
        buf.clear();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut buf))
            .map_err(|e| format!("read {}: {e}", path.display()))?;
        sum = fold(sum, &buf);
    }
    report(
        "lread",
        "files/s",
        files.len(),
        start,
        &format!(" sum={sum:016x}"),
    );

    let block = [0x5au8; 4096];
    let start = Instant::now();
    let mut created = 0;
    for (dir, names) in &tree {
        for i in (0..names.len()).step_by(2) {
            let path = dir.join(format!("new{i:05}"));
            std::fs::write(&path, block).map_err(|e| format!("create {}: {e}", path.display()))?;
            let m = std::fs::symlink_metadata(&path)
                .map_err(|e| format!("lstat {}: {e}", path.display()))?;
            if m.len() != block.len() as u64 {
                return Err(format!(
                    "{} has {} bytes after writing 4096",
                    path.display(),
                    m.len()
                ));
            }
            created += 1;
        }
    }
    report("create", "files/s", created, start, "");

    let start = Instant::now();
    let mut changed = 0;
    for path in files.iter().step_by(2) {
        File::options()
            .append(true)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &[0xa5; 16]))
            .map_err(|e| format!("append to {}: {e}", path.display()))?;
        changed += 1;
    }
    report("copyup", "files/s", changed, start, "");

    let start = Instant::now();
    let mut listed = Vec::new();
    for (dir, _) in &tree {
        for entry in
            std::fs::read_dir(dir).map_err(|e| format!("readdir {}: {e}", dir.display()))?
        {
            listed.push(
                entry
                    .map_err(|e| format!("readdir {}: {e}", dir.display()))?
                    .path(),
            );
        }
    }
    let entries = listed.len();
    report(
        "lreaddir",
        "entries/s",
        entries,
        start,
        &format!(" entries={entries}"),
    );

    let start = Instant::now();
    for path in &listed {
        std::fs::remove_file(path).map_err(|e| format!("unlink {}: {e}", path.display()))?;
    }
    let secs = start.elapsed().as_secs_f64();
    let mut left = 0;
    for (dir, _) in &tree {
        left += std::fs::read_dir(dir)
            .map_err(|e| format!("readdir {}: {e}", dir.display()))?
            .count();
    }
    println!(
        "FSBENCH unlink {:.1} files/s count={entries} secs={secs:.3} left={left}",
        entries as f64 / secs
    );
    Ok(())
}

fn run(args: &[String]) -> Result<(), String> {
    let number = |i: usize, default: u64| -> Result<u64, String> {
        match args.get(i) {
            None => Ok(default),
            Some(s) => s.parse().map_err(|_| format!("not a number: {s:?}")),
        }
    };
    match args.first().map(String::as_str) {
        Some("all") => {
            let root = Path::new(args.get(1).ok_or("all needs the mount point")?);
            seq(&root.join("seq.bin"))?;
            rand(&root.join("rand.bin"), number(2, 2000)?, number(3, 7)?)?;
            meta(&root.join("tree"))
        }
        Some("seq") => seq(Path::new(args.get(1).ok_or("seq needs a file")?)),
        Some("rand") => rand(
            Path::new(args.get(1).ok_or("rand needs a file")?),
            number(2, 2000)?,
            number(3, 7)?,
        ),
        Some("meta") => meta(Path::new(args.get(1).ok_or("meta needs a directory")?)),
        Some("layer") => layer(&Path::new(args.get(1).ok_or("layer needs the mount point")?).join("tree")),
        _ => Err("usage: guest-fsbench all MOUNT [COUNT SEED] | seq FILE | rand FILE [COUNT SEED] | meta DIR | layer MOUNT".into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest-fsbench: error: {e}");
            ExitCode::FAILURE
        }
    }
}
