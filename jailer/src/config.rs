//! What a jail is made of, and validation of every part of it before anything is created.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// Longest VM id.
pub const MAX_ID_LEN: usize = 64;

/// Paths inside the jail the jailer owns: binds may not land on or under them.
const RESERVED: &[&str] = &["/dev", "/proc"];

/// One bind mount from the host into the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Host path (absolute; symbolic links in it are resolved once, then the resolved
    /// path is opened without following any link).
    pub src: PathBuf,
    /// Path inside the jail (absolute, normalised).
    pub dest: PathBuf,
    /// `false`: read-only, nosuid, nodev. `true`: read-write, nosuid, nodev.
    pub writable: bool,
}

impl BindMount {
    /// Parses `SRC[:DEST]` (DEST defaults to SRC).
    pub fn parse(spec: &str, writable: bool) -> Result<Self> {
        let (src, dest) = match spec.split_once(':') {
            Some((s, d)) => (s, d),
            None => (spec, spec),
        };
        let src = PathBuf::from(src);
        if !src.is_absolute() {
            return Err(Error::Config(format!(
                "bind source {src:?} must be an absolute path"
            )));
        }
        Ok(Self {
            src,
            dest: jail_path(dest)?,
            writable,
        })
    }
}

/// cgroup v2 placement and limits.
#[derive(Debug, Clone, PartialEq)]
pub struct CgroupConfig {
    /// The cgroup2 mount (normally /sys/fs/cgroup); the jail's cgroup is
    /// `<root>/gridnode/<id>`.
    pub root: PathBuf,
    /// `memory.max` in bytes.
    pub memory_max: Option<u64>,
    /// CPUs worth of time per period (`cpu.max` quota = cpus x 100 ms per 100 ms).
    pub cpus: Option<f64>,
    /// `pids.max`.
    pub pids_max: Option<u64>,
}

/// Everything needed to jail one vmm.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// VM id: `[A-Za-z0-9-]{1,64}`.
    pub id: String,
    /// The program to run in the jail (bound read-only at `/<file name>`).
    pub exec: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// The per-VM directory is `<base>/<id>`, the jail's root `<base>/<id>/root`.
    pub base: PathBuf,
    /// `None`: no cgroup (`--no-cgroup`).
    pub cgroup: Option<CgroupConfig>,
    pub mounts: Vec<BindMount>,
    /// Create `/dev/kvm` (char 10:232, 0660, group `gid`).
    pub dev_kvm: bool,
    /// Mount a procfs with `hidepid=2,subset=pid` at `/proc`.
    pub proc_fs: bool,
    /// Arguments for the program (after argv[0]).
    pub args: Vec<OsString>,
    /// After forwarding SIGTERM/SIGINT, how long to wait before SIGKILL.
    pub kill_timeout: Duration,
    /// Inherited descriptors (3 or more) the program keeps; all others above 2 are closed.
    pub keep_fds: Vec<i32>,
}

impl JailConfig {
    /// Where the program appears inside the jail.
    pub fn exec_in_jail(&self) -> Result<PathBuf> {
        let name = self
            .exec
            .file_name()
            .ok_or_else(|| Error::Config(format!("--exec {:?} has no file name", self.exec)))?;
        Ok(Path::new("/").join(name))
    }

    /// The per-VM directory `<base>/<id>`.
    pub fn vm_dir(&self) -> PathBuf {
        self.base.join(&self.id)
    }

    /// Checks every field; nothing is created before this passes.
    pub fn validate(&self) -> Result<()> {
        validate_id(&self.id)?;
        if self.uid == 0 || self.gid == 0 {
            return Err(Error::Config(
                "--uid and --gid must not be 0: a jail running as root is no jail".into(),
            ));
        }
        normalised_absolute(&self.base, "--base")?;
        if !self.exec.is_absolute() {
            return Err(Error::Config(format!(
                "--exec {:?} must be an absolute path",
                self.exec
            )));
        }
        let exec_dest = self.exec_in_jail()?;
        let mut dests: Vec<&Path> = vec![&exec_dest];
        for m in &self.mounts {
            if m.dest == Path::new("/") {
                return Err(Error::Config(format!(
                    "{:?} cannot be bound over the jail's root",
                    m.src
                )));
            }
            if let Some(r) = RESERVED.iter().find(|r| m.dest.starts_with(r)) {
                return Err(Error::Config(format!(
                    "{:?}: {r} in the jail is made by the jailer; bind elsewhere",
                    m.dest
                )));
            }
            if dests.contains(&m.dest.as_path()) {
                return Err(Error::Config(format!(
                    "two binds (or a bind and the program) land on {:?}",
                    m.dest
                )));
            }
            dests.push(&m.dest);
        }
        if let Some(fd) = self.keep_fds.iter().find(|fd| **fd < 3) {
            return Err(Error::Config(format!(
                "--keep-fd {fd}: descriptors 0 to 2 are always kept; give 3 or more"
            )));
        }
        if let Some(cg) = &self.cgroup {
            normalised_absolute(&cg.root, "--cgroup-root")?;
            if let Some(c) = cg.cpus {
                if !(c.is_finite() && c > 0.0 && c <= 4096.0) {
                    return Err(Error::Config(format!(
                        "--cgroup-cpus {c} must be a number of CPUs above 0"
                    )));
                }
            }
            if cg.memory_max == Some(0) || cg.pids_max == Some(0) {
                return Err(Error::Config(
                    "--cgroup-memory and --cgroup-pids must be above 0".into(),
                ));
            }
        }
        Ok(())
    }
}

/// A VM id is `[A-Za-z0-9-]{1,64}`: safe as a path component and a cgroup name.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::BadId(id.to_owned()))
    }
}

/// `cpu.max` contents for `cpus` CPUs over a 100 ms period.
pub fn cpu_max(cpus: f64) -> String {
    let period = 100_000u64;
    let quota = ((cpus * period as f64).round() as u64).max(1000);
    format!("{quota} {period}")
}

/// A path inside the jail: absolute, no `.`/`..`, no empty or trailing parts.
pub fn jail_path(p: &str) -> Result<PathBuf> {
    let path = PathBuf::from(p);
    normalised_absolute(&path, "a path in the jail")?;
    Ok(path)
}

/// Refuses relative paths and `.`/`..` components (they would make "where" depend on
/// what is on disk).
fn normalised_absolute(path: &Path, what: &str) -> Result<()> {
    if !path.is_absolute() {
        return Err(Error::Config(format!(
            "{what} {path:?} must be an absolute path"
        )));
    }
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(Error::Config(format!(
            "{what} {path:?} contains a NUL byte"
        )));
    }
    for c in path.components() {
        match c {
            Component::RootDir | Component::Normal(_) => {}
            _ => {
                return Err(Error::Config(format!(
                    "{what} {path:?} must not contain '.' or '..'"
                )))
            }
        }
    }
    // `Path::components` silently drops "/./" and doubled slashes: look at the raw bytes.
    let raw = path.as_os_str().as_encoded_bytes();
    if raw.windows(2).any(|w| w == b"//")
        || raw.windows(3).any(|w| w == b"/./")
        || raw.ends_with(b"/.")
    {
        return Err(Error::Config(format!(
            "{what} {path:?} is not in normal form"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> JailConfig {
        JailConfig {
            id: "vm-1".into(),
            exec: "/usr/bin/vmm".into(),
            uid: 1000,
            gid: 1000,
            base: "/srv/jailer".into(),
            cgroup: None,
            mounts: vec![],
            dev_kvm: true,
            proc_fs: false,
            args: vec![],
            kill_timeout: Duration::from_secs(5),
            keep_fds: vec![],
        }
    }

    #[test]
    fn ids() {
        for good in ["a", "vm-1", "ABC-def-0123", &"x".repeat(64)] {
            validate_id(good).unwrap();
        }
        for bad in [
            "",
            "a/b",
            "..",
            ".",
            "a b",
            "a_b",
            "é",
            "a\0",
            &"x".repeat(65),
            "vm.1",
        ] {
            assert!(matches!(validate_id(bad), Err(Error::BadId(_))), "{bad:?}");
        }
        let mut c = config();
        c.id = "../etc".into();
        assert!(matches!(c.validate(), Err(Error::BadId(_))));
    }

    #[test]
    fn bind_specs() {
        let m = BindMount::parse("/srv/images/k:/guest/vmlinux", false).unwrap();
        assert_eq!(m.src, Path::new("/srv/images/k"));
        assert_eq!(m.dest, Path::new("/guest/vmlinux"));
        let m = BindMount::parse("/lib64", false).unwrap();
        assert_eq!(m.dest, Path::new("/lib64"));
        for bad in [
            "relative",
            "/a:relative",
            "/a:/b/../etc",
            "/a:/b/./c",
            "/a://b",
            "/a:",
        ] {
            assert!(BindMount::parse(bad, true).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_validation() {
        config().validate().unwrap();
        let bad = |f: &dyn Fn(&mut JailConfig)| {
            let mut c = config();
            f(&mut c);
            assert!(c.validate().is_err(), "{c:?}");
        };
        bad(&|c| c.uid = 0);
        bad(&|c| c.gid = 0);
        bad(&|c| c.base = "srv".into());
        bad(&|c| c.base = "/srv/../etc".into());
        bad(&|c| c.exec = "vmm".into());
        bad(&|c| c.mounts = vec![BindMount::parse("/x:/dev/kvm", true).unwrap()]);
        bad(&|c| c.mounts = vec![BindMount::parse("/x:/proc", true).unwrap()]);
        bad(&|c| c.mounts = vec![BindMount::parse("/x:/", true).unwrap()]);
        bad(&|c| c.mounts = vec![BindMount::parse("/x:/vmm", false).unwrap()]);
        bad(&|c| {
            c.mounts = vec![
                BindMount::parse("/x:/a", false).unwrap(),
                BindMount::parse("/y:/a", true).unwrap(),
            ]
        });
        for cpus in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            bad(&|c| {
                c.cgroup = Some(CgroupConfig {
                    root: "/sys/fs/cgroup".into(),
                    memory_max: None,
                    cpus: Some(cpus),
                    pids_max: None,
                })
            });
        }
    }

    #[test]
    fn cpu_max_quota() {
        assert_eq!(cpu_max(1.0), "100000 100000");
        assert_eq!(cpu_max(1.5), "150000 100000");
        assert_eq!(cpu_max(0.001), "1000 100000");
    }
}
