//! Errors of the end-to-end support library.

use std::path::PathBuf;
use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host prerequisite is absent; tests may skip on this (and only this) error.
    #[error("{what} not found: {hint}")]
    Missing { what: String, hint: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("QEMU did not finish within {timeout:?} and was killed; console so far:\n{console}")]
    Timeout { timeout: Duration, console: String },
    #[error(
        "the test bed's output has no result block (did the job's VM crash?); console:\n{console}"
    )]
    NoResult { console: String },
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("unknown test guest variant {0:?}; known: exit0 exit42 reboot triplefault pvh")]
    UnknownVariant(String),
    #[error("{path}: {problem}")]
    BadFile { path: PathBuf, problem: String },
}

impl Error {
    /// True when a host prerequisite (QEMU, a kernel, kernel sources) is missing.
    pub fn is_missing(&self) -> bool {
        matches!(self, Error::Missing { .. })
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
