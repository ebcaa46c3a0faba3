//! `jail-probe`: run inside a jail by the jailer's tests, it reports what the jailed
//! process is and can do, one `key=value` line per check. Every check reports what it
//! saw, so the tests decide (a check can fail).
//!
//! `jail-probe report [--ro DIR]... [--rw DIR]... [--exec FILE]... [--exit-on-term CODE]
//! [--sleep SECONDS]`
//! `jail-probe whoami` (prints `euid=N`, for the setuid check).

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::sys::statvfs::{statvfs, FsFlags};
use nix::unistd::{getgroups, getpid, getresgid, getresuid};

fn err_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("{}", nix::errno::Errno::from_raw(n)),
        None => e.to_string(),
    }
}

fn result<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => err_name(&e),
    }
}

fn flags(path: &str) -> String {
    match statvfs(path) {
        Ok(v) => {
            let f = v.flags();
            let mut names = Vec::new();
            for (flag, name) in [
                (FsFlags::ST_RDONLY, "ro"),
                (FsFlags::ST_NOSUID, "nosuid"),
                (FsFlags::ST_NODEV, "nodev"),
                (FsFlags::ST_NOEXEC, "noexec"),
            ] {
                if f.contains(flag) {
                    names.push(name);
                }
            }
            names.join(",")
        }
        Err(e) => format!("{e}"),
    }
}

fn list(dir: &str) -> String {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names.join(",")
        }
        Err(e) => err_name(&e),
    }
}

fn report(args: &[String]) {
    // Descriptors first, before this program opens any of its own.
    let open_fds: Vec<String> = jailer::sys::open_descriptors(3..1024)
        .iter()
        .map(|fd| fd.to_string())
        .collect();
    let mut out = vec![format!("fds={}", open_fds.join(","))];
    let uid = getresuid().map(|r| format!("{},{},{}", r.real, r.effective, r.saved));
    let gid = getresgid().map(|r| format!("{},{},{}", r.real, r.effective, r.saved));
    out.push(format!("uid={}", uid.unwrap_or_default()));
    out.push(format!("gid={}", gid.unwrap_or_default()));
    let groups = getgroups()
        .map(|g| {
            g.iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_else(|e| e.to_string());
    out.push(format!("groups={groups}"));
    out.push(format!("pid={}", getpid()));
    match jailer::sys::capabilities() {
        Ok(c) => out.push(format!(
            "caps=eff:{:x},prm:{:x},inh:{:x},bnd:{:x},amb:{:x}",
            c.effective,
            c.permitted,
            c.inheritable,
            jailer::sys::bounding_set(),
            jailer::sys::ambient_set()
        )),
        Err(e) => out.push(format!("caps={e}")),
    }
    out.push(format!(
        "no_new_privs={}",
        nix::sys::prctl::get_no_new_privs()
            .map(|b| b.to_string())
            .unwrap_or_default()
    ));
    out.push(format!(
        "hostname={}",
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let mut env: Vec<String> = std::env::vars_os()
        .map(|(k, _)| k.to_string_lossy().into_owned())
        .collect();
    env.sort();
    out.push(format!("env={}", env.join(",")));
    out.push(format!(
        "ifaces={}",
        jailer::sys::interface_names()
            .map(|n| n.join(","))
            .unwrap_or_else(|e| e.to_string())
    ));
    for addr in ["127.0.0.1:22", "10.0.2.2:80"] {
        let Ok(a) = addr.parse::<SocketAddr>() else {
            continue;
        };
        out.push(format!(
            "tcp {addr}={}",
            result(TcpStream::connect_timeout(&a, Duration::from_secs(2)))
        ));
    }
    out.push(format!("root={}", list("/")));
    out.push(format!("root_flags={}", flags("/")));
    out.push(format!(
        "root_write={}",
        result(std::fs::write("/probe-file", b"x"))
    ));
    out.push(format!("dev={}", list("/dev")));
    out.push(format!("dev_flags={}", flags("/dev")));
    out.push(format!(
        "dev_null_write={}",
        result(std::fs::OpenOptions::new().write(true).open("/dev/null"))
    ));
    out.push(format!(
        "dev_write={}",
        result(std::fs::write("/dev/new", b"x"))
    ));
    if let Ok(m) = std::fs::metadata("/dev/kvm") {
        out.push(format!(
            "dev_kvm=mode:{:o},uid:{},gid:{},rdev:{}:{}",
            m.mode() & 0o7777,
            m.uid(),
            m.gid(),
            nix::sys::stat::major(m.rdev()),
            nix::sys::stat::minor(m.rdev())
        ));
    }
    out.push(format!("proc={}", list("/proc")));
    if std::path::Path::new("/proc").exists() {
        out.push(format!(
            "proc_self_fd={}",
            result(std::fs::read_dir("/proc/self/fd"))
        ));
        out.push(format!(
            "proc_meminfo={}",
            result(std::fs::read("/proc/meminfo"))
        ));
    }

    let mut sleep = 0u64;
    for pair in args.chunks(2) {
        let (flag, value) = (pair[0].as_str(), pair.get(1).cloned().unwrap_or_default());
        match flag {
            "--ro" => {
                out.push(format!("ro_flags {value}={}", flags(&value)));
                out.push(format!(
                    "ro_write {value}={}",
                    result(std::fs::write(format!("{value}/probe-file"), b"x"))
                ));
            }
            "--rw" => {
                out.push(format!("rw_flags {value}={}", flags(&value)));
                out.push(format!(
                    "rw_write {value}={}",
                    result(std::fs::write(format!("{value}/probe-file"), b"x"))
                ));
                let node = format!("{value}/probe-node");
                let made = mknod(
                    node.as_str(),
                    SFlag::S_IFCHR,
                    Mode::from_bits_truncate(0o666),
                    makedev(1, 3),
                );
                out.push(format!(
                    "rw_mknod {value}={}",
                    made.map(|_| "ok".to_owned())
                        .unwrap_or_else(|e| e.to_string())
                ));
            }
            "--exec" => {
                let shown = match std::process::Command::new(&value).arg("whoami").output() {
                    Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
                    Err(e) => err_name(&e),
                };
                out.push(format!("exec {value}={shown}"));
            }
            "--sleep" => sleep = value.parse().unwrap_or(0),
            "--exit-on-term" => {
                let code = value.parse().unwrap_or(1);
                let r = jailer::sys::exit_on_signal(nix::sys::signal::Signal::SIGTERM, code);
                out.push(format!(
                    "exit_on_term={}",
                    r.map(|_| "ok".to_owned()).unwrap_or_else(|e| e.to_string())
                ));
            }
            other => out.push(format!("unknown-argument={other}")),
        }
    }
    let mut stdout = std::io::stdout().lock();
    for line in out {
        let _ = writeln!(stdout, "{line}");
    }
    if sleep > 0 {
        let _ = writeln!(stdout, "ready");
        let _ = stdout.flush();
        drop(stdout);
        std::thread::sleep(Duration::from_secs(sleep));
        println!("slept");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("whoami") => println!("euid={}", nix::unistd::geteuid()),
        Some("report") => report(&args[1..]),
        _ => {
            eprintln!(
                "usage: jail-probe report [--ro DIR] [--rw DIR] [--exec FILE] [--sleep S] | whoami"
            );
            std::process::exit(2);
        }
    }
}
