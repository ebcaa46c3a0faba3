//! The jailer's errors: each names what was being done and to which path.

use std::path::PathBuf;

/// Everything that can stop a jail from being set up or cleaned up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid VM id {0:?}: it must be 1 to 64 characters of A-Z, a-z, 0-9 and '-'")]
    BadId(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{path}: a path component is a symbolic link; the jailer never follows links there")]
    Symlink { path: PathBuf },
    #[error("{path} already exists (is another jail with this id running? remove it if stale)")]
    Exists { path: PathBuf },
    #[error(
        "cgroup v2 is not mounted at {0} (mount it, point --cgroup-root at a cgroup2 mount, \
         or pass --no-cgroup to run without resource limits)"
    )]
    NoCgroup2(PathBuf),
    #[error(
        "the {controller} controller is not available in {root} (it is missing from \
         cgroup.controllers: bound to a cgroup v1 hierarchy?)"
    )]
    NoController { controller: String, root: PathBuf },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the jail failed in the jailed child: {0}")]
    Child(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a description of the failed step to a system call's error.
pub(crate) trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for nix::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Sys {
            what: what(),
            source,
        })
    }
}

impl<T> Context<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            what: what(),
            source,
        })
    }
}
