//! The jailer binary run as root on this machine, jailing `jail-probe` (a dynamically
//! linked Rust program: its libraries are bound read-only with `--ro`). Skipped with a
//! message when not run as root.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const JAILER: &str = env!("CARGO_BIN_EXE_jailer");
const PROBE: &str = env!("CARGO_BIN_EXE_jail-probe");
const UID: u32 = 4321;
const GID: u32 = 4322;
/// The probe's libraries (Debian, merged /usr).
const LIBS: &[&str] = &["--ro", "/lib/x86_64-linux-gnu", "--ro", "/lib64"];

fn is_root(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("SKIP {test}: the jailer needs root");
    }
    root
}

struct Dirs {
    tmp: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        for d in ["ro", "rw"] {
            std::fs::create_dir(tmp.path().join(d)).expect("mkdir");
        }
        std::fs::write(tmp.path().join("ro/file"), b"image").expect("write");
        nix::unistd::chown(
            &tmp.path().join("rw"),
            Some(nix::unistd::Uid::from_raw(UID)),
            Some(nix::unistd::Gid::from_raw(GID)),
        )
        .expect("chown");
        Self { tmp }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }
    fn base(&self) -> PathBuf {
        self.path("base")
    }
    /// A jailer command for VM `id` running the probe (`args` go before `--`; --exec,
    /// --uid, --gid and --base have defaults unless `args` gives them).
    fn jailer(&self, id: &str, args: &[&str], probe_args: &[&str]) -> Command {
        let mut c = Command::new(JAILER);
        c.args(["--id", id]);
        let (uid, gid, base) = (UID.to_string(), GID.to_string(), self.base());
        let base = base.display().to_string();
        for (flag, value) in [
            ("--exec", PROBE),
            ("--uid", uid.as_str()),
            ("--gid", gid.as_str()),
            ("--base", base.as_str()),
        ] {
            if !args.contains(&flag) {
                c.args([flag, value]);
            }
        }
        c.args(LIBS)
            .args(args)
            .arg("--")
            .arg("report")
            .args(probe_args);
        c
    }
}

fn report(out: &Output) -> HashMap<String, String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn run(mut c: Command) -> (Output, HashMap<String, String>) {
    let out = c.output().expect("running the jailer");
    let r = report(&out);
    (out, r)
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A cgroup2 mount on this machine: /sys/fs/cgroup, or the hybrid /sys/fs/cgroup/unified.
fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .find(|p| {
            nix::sys::statfs::statfs(p.as_path())
                .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
                .unwrap_or(false)
        })
}

#[test]
fn a_jailed_program_has_no_privileges_no_network_and_only_its_binds() {
    if !is_root("a_jailed_program_has_no_privileges_no_network_and_only_its_binds") {
        return;
    }
    let d = Dirs::new();
    // A setuid-root copy of the probe on the writable bind: nosuid must make it inert.
    let suid = d.path("rw/suid");
    std::fs::copy(PROBE, &suid).expect("copy");
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).expect("chmod");

    // An inherited descriptor (9) and environment the jail must not pass on.
    let mut c = Command::new("sh");
    let jailer = d.jailer(
        "probe-1",
        &[
            "--no-cgroup",
            "--dev-kvm",
            "--ro",
            &format!("{}:/data/ro", d.path("ro").display()),
            "--rw",
            &format!("{}:/data/rw", d.path("rw").display()),
        ],
        &[
            "--ro",
            "/data/ro",
            "--rw",
            "/data/rw",
            "--exec",
            "/data/rw/suid",
        ],
    );
    let mut line = String::from("exec 9</etc/hostname; exec");
    line.push_str(&format!(" {:?}", jailer.get_program()));
    for a in jailer.get_args() {
        line.push_str(&format!(" '{}'", a.to_string_lossy()));
    }
    c.args(["-c", &line])
        .env("SECRET_TOKEN", "x")
        .env("RUST_LOG", "debug")
        .env_remove("VMM_LOG");
    let (out, r) = run(c);
    let s = show(&out);
    assert!(out.status.success(), "{s}");
    let expect = |key: &str, value: &str| {
        assert_eq!(r.get(key).map(String::as_str), Some(value), "{key}: {s}");
    };
    expect("fds", "");
    expect("uid", "4321,4321,4321");
    expect("gid", "4322,4322,4322");
    expect("groups", "");
    expect("pid", "1");
    expect("caps", "eff:0,prm:0,inh:0,bnd:0,amb:0");
    expect("no_new_privs", "true");
    expect("hostname", "probe-1");
    expect("env", "RUST_LOG");
    expect("ifaces", "lo");
    expect("tcp 127.0.0.1:22", "ENETUNREACH: Network is unreachable");
    expect("tcp 10.0.2.2:80", "ENETUNREACH: Network is unreachable");
    expect("root", "data,dev,jail-probe,lib,lib64");
    expect("root_flags", "ro,nosuid,nodev");
    expect("root_write", "EROFS: Read-only file system");
    expect("dev", "kvm,null,urandom");
    expect("dev_flags", "ro,nosuid,noexec");
    expect("dev_null_write", "ok");
    expect("dev_write", "EROFS: Read-only file system");
    expect("dev_kvm", &format!("mode:660,uid:0,gid:{GID},rdev:10:232"));
    expect("proc", "ENOENT: No such file or directory");
    expect("ro_flags /data/ro", "ro,nosuid,nodev");
    expect("ro_write /data/ro", "EROFS: Read-only file system");
    expect("rw_flags /data/rw", "nosuid,nodev");
    expect("rw_write /data/rw", "ok");
    expect("rw_mknod /data/rw", "EPERM: Operation not permitted");
    expect("exec /data/rw/suid", &format!("euid={UID}"));
    // The write went to the host's directory; the jail's root is gone.
    assert!(d.path("rw/probe-file").exists());
    assert!(!d.path("ro/probe-file").exists());
    assert!(!d.base().join("probe-1").exists(), "per-VM dir left behind");
}

#[test]
fn proc_holds_only_the_jails_own_processes() {
    if !is_root("proc_holds_only_the_jails_own_processes") {
        return;
    }
    let d = Dirs::new();
    let (out, r) = run(d.jailer("probe-proc", &["--no-cgroup", "--proc"], &[]));
    let s = show(&out);
    assert!(out.status.success(), "{s}");
    assert_eq!(r["proc"], "1,self,thread-self", "{s}");
    assert_eq!(r["proc_self_fd"], "ok", "{s}");
    assert_eq!(
        r["proc_meminfo"], "ENOENT: No such file or directory",
        "{s}"
    );
    assert_eq!(r["dev"], "null,urandom", "{s}");
}

#[test]
fn the_program_runs_in_its_cgroup_which_is_removed_afterwards() {
    let test = "the_program_runs_in_its_cgroup_which_is_removed_afterwards";
    if !is_root(test) {
        return;
    }
    let Some(root) = cgroup2_root() else {
        eprintln!("SKIP {test}: no cgroup2 mount on this machine");
        return;
    };
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
    let mut limits: Vec<String> = vec!["--cgroup-root".into(), root.display().to_string()];
    if has("memory") {
        limits.extend(["--cgroup-memory".into(), "268435456".into()]);
    }
    if has("pids") {
        limits.extend(["--cgroup-pids".into(), "32".into()]);
    }
    if has("cpu") {
        limits.extend(["--cgroup-cpus".into(), "1.5".into()]);
    }
    let d = Dirs::new();
    let id = format!("cg-{}", std::process::id());
    let args: Vec<&str> = limits.iter().map(String::as_str).collect();
    let mut child = d
        .jailer(&id, &args, &["--sleep", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ready = lines.by_ref().map_while(Result::ok).any(|l| l == "ready");
    assert!(ready, "the probe never got ready");

    let cg = root.join("gridnode").join(&id);
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).expect("cgroup.procs");
    let pid: i32 = procs.trim().parse().expect("one process in the cgroup");
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("/proc/pid/cgroup");
    assert!(
        own.lines().any(|l| l == format!("0::/gridnode/{id}")),
        "{own}"
    );
    let read = |f: &str| std::fs::read_to_string(cg.join(f)).map(|s| s.trim().to_owned());
    if has("memory") {
        assert_eq!(read("memory.max").expect("memory.max"), "268435456");
    }
    if has("pids") {
        assert_eq!(read("pids.max").expect("pids.max"), "32");
    }
    if has("cpu") {
        assert_eq!(read("cpu.max").expect("cpu.max"), "150000 100000");
    }
    // SIGTERM goes to the probe, which (PID 1, no handler) ignores it: the jailer kills it
    // after --kill-timeout (default 5 s) and cleans up.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let started = Instant::now();
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(128 + 9), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(!cg.exists(), "cgroup {} left behind", cg.display());
    assert!(!d.base().join(&id).exists(), "per-VM dir left behind");
}

#[test]
fn a_missing_cgroup_is_an_error_unless_no_cgroup() {
    if !is_root("a_missing_cgroup_is_an_error_unless_no_cgroup") {
        return;
    }
    let d = Dirs::new();
    let not_cgroup = d.path("ro");
    let (out, _) = run(d.jailer(
        "cg-missing",
        &["--cgroup-root", &not_cgroup.display().to_string()],
        &[],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        err.contains("cgroup v2 is not mounted at") && err.contains("--no-cgroup"),
        "{err}"
    );
    assert!(!d.base().join("cg-missing").exists());
}

#[test]
fn bad_input_is_refused_before_anything_runs() {
    if !is_root("bad_input_is_refused_before_anything_runs") {
        return;
    }
    let d = Dirs::new();
    let refused = |mut c: Command, needle: &str| {
        let out = c.output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(125), "{needle}: {}", show(&out));
        assert!(err.contains(needle), "expected {needle:?} in {err}");
        assert!(out.stdout.is_empty(), "the probe ran: {}", show(&out));
    };
    refused(d.jailer("bad/id", &["--no-cgroup"], &[]), "invalid VM id");
    refused(d.jailer("bad_id", &["--no-cgroup"], &[]), "invalid VM id");
    refused(
        d.jailer(&"x".repeat(65), &["--no-cgroup"], &[]),
        "invalid VM id",
    );

    // A link in a component of the base.
    std::fs::create_dir(d.path("real")).expect("mkdir");
    symlink(d.path("real"), d.path("link")).expect("symlink");
    let link_base = d.path("link/base").display().to_string();
    refused(
        d.jailer("vm", &["--no-cgroup", "--base", &link_base], &[]),
        "symbolic link",
    );
    assert!(!d.path("real/base").exists(), "created through the link");

    // The per-VM directory as a link, and as a directory already there.
    std::fs::create_dir_all(d.base()).expect("mkdir");
    symlink("/etc", d.base().join("vm-link")).expect("symlink");
    refused(d.jailer("vm-link", &["--no-cgroup"], &[]), "symbolic link");
    std::fs::create_dir(d.base().join("vm-there")).expect("mkdir");
    refused(
        d.jailer("vm-there", &["--no-cgroup"], &[]),
        "already exists",
    );
    assert!(
        d.base().join("vm-there").is_dir(),
        "an existing dir was removed"
    );

    refused(
        d.jailer("vm", &["--no-cgroup", "--uid", "0"], &[]),
        "must not be 0",
    );
    refused(
        d.jailer("vm", &["--no-cgroup", "--ro", "/etc:/dev/x"], &[]),
        "made by the jailer",
    );
    refused(
        d.jailer("vm", &["--no-cgroup", "--ro", "/nonexistent"], &[]),
        "/nonexistent",
    );
    refused(
        d.jailer("vm", &["--no-cgroup", "--exec", "/etc"], &[]),
        "is a directory",
    );
    assert!(!d.base().join("vm").exists());

    // A failure inside the jailed child (a bind under the program's file) is reported by
    // the jailer, and the cgroup-less per-VM directory is still removed.
    refused(
        d.jailer(
            "vm-child",
            &["--no-cgroup", "--ro", "/etc:/jail-probe/etc"],
            &[],
        ),
        "setting up the jail failed in the jailed child",
    );
    assert!(
        !d.base().join("vm-child").exists(),
        "per-VM dir left behind"
    );
}

#[test]
fn the_programs_exit_status_is_the_jailers() {
    if !is_root("the_programs_exit_status_is_the_jailers") {
        return;
    }
    let d = Dirs::new();
    let mut c = Command::new(JAILER);
    c.args([
        "--id", "status", "--exec", PROBE, "--uid", "4321", "--gid", "4321",
    ])
    .arg("--base")
    .arg(d.base())
    .args(LIBS)
    .args(["--no-cgroup", "--", "no-such-mode"]);
    let out = c.output().expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    // Without its libraries the probe cannot start: the loader's error, status 127.
    let out = Command::new(JAILER)
        .args([
            "--id", "nolibs", "--exec", PROBE, "--uid", "4321", "--gid", "4321",
        ])
        .arg("--base")
        .arg(d.base())
        .args(["--no-cgroup", "--", "report"])
        .output()
        .expect("run");
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    assert!(out.stdout.is_empty());
}

#[test]
fn sigterm_is_forwarded_to_a_program_that_handles_it() {
    if !is_root("sigterm_is_forwarded_to_a_program_that_handles_it") {
        return;
    }
    let d = Dirs::new();
    let mut child = d
        .jailer(
            "term",
            &["--no-cgroup", "--kill-timeout", "30"],
            &["--exit-on-term", "42", "--sleep", "60"],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let lines: Vec<String> = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .take_while(|l| l != "ready")
        .collect();
    assert!(lines.iter().any(|l| l == "exit_on_term=ok"), "{lines:?}");
    let started = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let status = child.wait().expect("wait");
    // The program's own status, well before the 30 s kill timeout.
    assert_eq!(status.code(), Some(42), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!d.base().join("term").exists(), "per-VM dir left behind");
}
