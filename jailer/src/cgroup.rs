//! The jail's cgroup v2: `<root>/gridnode/<id>` with `memory.max`, `cpu.max` and `pids.max`,
//! removed when the jail ends.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};

use crate::config::{cpu_max, CgroupConfig};
use crate::error::{Context, Error, Result};

/// The parent of every jail's cgroup, under the cgroup2 root.
pub const PARENT: &str = "gridnode";

/// A created cgroup; [`Cgroup::remove`] (or drop) deletes it.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    removed: bool,
}

impl Cgroup {
    /// Creates `<root>/gridnode/<id>`, enabling the controllers the limits need in
    /// `<root>` and `<root>/gridnode`, and writes the limits.
    pub fn create(cfg: &CgroupConfig, id: &str) -> Result<Self> {
        let root = &cfg.root;
        let fs = statfs(root).map_err(|_| Error::NoCgroup2(root.clone()))?;
        if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
            return Err(Error::NoCgroup2(root.clone()));
        }
        let mut controllers = Vec::new();
        if cfg.memory_max.is_some() {
            controllers.push("memory");
        }
        if cfg.cpus.is_some() {
            controllers.push("cpu");
        }
        if cfg.pids_max.is_some() {
            controllers.push("pids");
        }
        let available = read(&root.join("cgroup.controllers"))?;
        for c in &controllers {
            if !available.split_whitespace().any(|a| a == *c) {
                return Err(Error::NoController {
                    controller: (*c).to_owned(),
                    root: root.clone(),
                });
            }
        }
        let parent = root.join(PARENT);
        match std::fs::create_dir(&parent) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(Error::Io {
                    what: format!("creating cgroup {}", parent.display()),
                    source: e,
                })
            }
            _ => {}
        }
        enable(root, &controllers)?;
        enable(&parent, &controllers)?;

        let path = parent.join(id);
        std::fs::create_dir(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Exists { path: path.clone() }
            } else {
                Error::Io {
                    what: format!("creating cgroup {}", path.display()),
                    source: e,
                }
            }
        })?;
        let cgroup = Self {
            path,
            removed: false,
        };
        if let Some(m) = cfg.memory_max {
            cgroup.write("memory.max", &m.to_string())?;
        }
        if let Some(c) = cfg.cpus {
            cgroup.write("cpu.max", &cpu_max(c))?;
        }
        if let Some(p) = cfg.pids_max {
            cgroup.write("pids.max", &p.to_string())?;
        }
        tracing::debug!(cgroup = %cgroup.path.display(), "cgroup created");
        Ok(cgroup)
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves process `pid` (as seen from the jailer) into the cgroup.
    pub fn add_process(&self, pid: i32) -> Result<()> {
        self.write("cgroup.procs", &pid.to_string())
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        let p = self.path.join(file);
        std::fs::write(&p, value).ctx(|| format!("writing {value:?} to {}", p.display()))
    }

    /// Removes the cgroup, waiting up to 2 s for its last processes to be gone.
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        remove_dir_retrying(&self.path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(e) = remove_dir_retrying(&self.path) {
                tracing::warn!("{e}");
            }
        }
    }
}

fn remove_dir_retrying(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(Error::Io {
                    what: format!("removing cgroup {}", path.display()),
                    source: e,
                })
            }
        }
    }
}

fn read(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).ctx(|| format!("reading {}", p.display()))
}

/// Enables `controllers` for the children of `dir` (those already enabled are skipped).
fn enable(dir: &Path, controllers: &[&str]) -> Result<()> {
    let file = dir.join("cgroup.subtree_control");
    let enabled = read(&file)?;
    let missing: Vec<String> = controllers
        .iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let value = missing.join(" ");
    std::fs::write(&file, &value).ctx(|| format!("writing {value:?} to {}", file.display()))
}
