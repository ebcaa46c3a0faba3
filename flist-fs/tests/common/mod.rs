//! Shared test helpers: building sample trees, comparing trees, finding server binaries.
#![allow(dead_code)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A tree with every kind of entry the format supports (devices only when root).
pub fn sample_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::write(root.join("small.txt"), b"hello flist\n").unwrap();
    std::fs::write(
        root.join("sub/big.bin"),
        pseudo_random(3 * 1024 * 1024 + 17, 5),
    )
    .unwrap();
    std::fs::write(root.join("sub/deeper/zeros"), vec![0u8; 700_000]).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../small.txt", root.join("sub/rel-link")).unwrap();
    std::fs::hard_link(root.join("small.txt"), root.join("sub/hard")).unwrap();
    let fifo = std::ffi::CString::new(root.join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    std::fs::set_permissions(
        root.join("small.txt"),
        std::fs::Permissions::from_mode(0o604),
    )
    .unwrap();
    let _ = xattr::set(root.join("small.txt"), "user.flist", b"yes");
    std::fs::create_dir(root.join("ro")).unwrap();
    std::fs::write(root.join("ro/inside"), b"x").unwrap();
    std::fs::set_permissions(root.join("ro"), std::fs::Permissions::from_mode(0o555)).unwrap();
}

/// Asserts two trees are equal in names, types, modes, contents, link targets, mtimes.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let mut names: Vec<_> = std::fs::read_dir(a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut other: Vec<_> = std::fs::read_dir(b)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    other.sort();
    assert_eq!(
        names,
        other,
        "entries of {} vs {}",
        a.display(),
        b.display()
    );
    for n in names {
        let (pa, pb) = (a.join(&n), b.join(&n));
        let (ma, mb) = (
            std::fs::symlink_metadata(&pa).unwrap(),
            std::fs::symlink_metadata(&pb).unwrap(),
        );
        assert_eq!(ma.mode(), mb.mode(), "mode of {}", pb.display());
        if !ma.is_dir() {
            assert_eq!(ma.mtime(), mb.mtime(), "mtime of {}", pb.display());
        }
        if ma.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&pa).unwrap(),
                std::fs::read_link(&pb).unwrap()
            );
        } else if ma.is_file() {
            assert!(
                std::fs::read(&pa).unwrap() == std::fs::read(&pb).unwrap(),
                "content of {}",
                pb.display()
            );
        } else if ma.is_dir() {
            assert_same_tree(&pa, &pb);
        }
    }
}

/// The path of server binary `name` (PATH or FLIST_<NAME>_BIN), or None if tests for it are
/// to be skipped (FLIST_SKIP_<NAME>=1). Panics with install advice otherwise.
pub fn server_binary(name: &str, env_key: &str, advice: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(format!("FLIST_{env_key}_BIN")) {
        return Some(PathBuf::from(p));
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    if std::env::var(format!("FLIST_SKIP_{env_key}")).as_deref() == Ok("1") {
        eprintln!("skipping: {name} not found and FLIST_SKIP_{env_key}=1");
        return None;
    }
    panic!("{name} not found in PATH (or FLIST_{env_key}_BIN): {advice}; set FLIST_SKIP_{env_key}=1 to skip");
}

/// A `redis-server` on a free port of 127.0.0.1 (no persistence), killed on drop; None when
/// redis tests are to be skipped (see [`server_binary`]).
pub fn start_redis() -> Option<(KillOnDrop, u16)> {
    let bin = server_binary("redis-server", "REDIS", "apt-get install redis-server")?;
    let port = free_port();
    let child = std::process::Command::new(bin)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start redis-server");
    let server = KillOnDrop(child);
    wait_for_port(port);
    Some((server, port))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("server on port {port} did not come up");
}

/// Kills a child process on drop.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A minimal static HTTP/1.1 file server (GET and HEAD, one thread per connection) over
/// `root` on 127.0.0.1; returns its port. Runs until the test process exits.
pub fn serve_dir(root: PathBuf) -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let root = root.clone();
            std::thread::spawn(move || loop {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut request = String::new();
                if reader.read_line(&mut request).unwrap_or(0) == 0 {
                    return;
                }
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let mut parts = request.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
                let rel = path.trim_start_matches('/');
                let body = if rel.contains("..") {
                    None
                } else {
                    std::fs::read(root.join(rel)).ok()
                };
                let resp = match &body {
                    Some(b) => format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", b.len()),
                    None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string(),
                };
                if conn.write_all(resp.as_bytes()).is_err() {
                    return;
                }
                if let (Some(b), "GET") = (&body, method) {
                    if conn.write_all(b).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// One field of a redis `INFO section` reply (for commandstats, the call count: values read
/// `calls=N,usec=...`); 0 when absent.
pub fn redis_info(con: &mut redis::Connection, section: &str, field: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg(section).query(con).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| {
            let v = v.trim();
            let v = v.strip_prefix("calls=").unwrap_or(v);
            v.split(',').next().unwrap().parse().unwrap()
        })
        .unwrap_or(0)
}
