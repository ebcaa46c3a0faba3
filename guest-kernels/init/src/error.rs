//! Errors of init, each mapping to the exit status reported to the VMM.

use std::path::PathBuf;

/// Everything that can go wrong before or while starting the entrypoint.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("no entrypoint given: put the program and its arguments after ' -- ' on the kernel command line")]
    NoEntrypoint,
    #[error("entrypoint {name:?} not found in PATH {path:?}")]
    NotInPath { name: String, path: String },
    #[error("cannot execute entrypoint {path}: {source}")]
    Exec {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("waiting for the entrypoint failed: {0}")]
    Wait(std::io::Error),
    #[error("{0}")]
    Setup(String),
}

impl InitError {
    /// The status to report for this error, following shell conventions: 127 for "not
    /// found", 126 for "found but not executable".
    pub fn status(&self) -> u8 {
        match self {
            InitError::NoEntrypoint | InitError::NotInPath { .. } => 127,
            InitError::Exec { source, .. } => match source.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENOTDIR) => 127,
                _ => 126,
            },
            InitError::Wait(_) | InitError::Setup(_) => crate::entrypoint::STATUS_SETUP_FAILED,
        }
    }
}
