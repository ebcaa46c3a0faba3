//! The library's error type: every variant names the item it is about (path, chunk id, store URL).
//! A variant's message carries the underlying error's message itself, so none is marked as a
//! `source`: a caller printing the chain (`{:#}`) would show every OS message twice.

use std::path::PathBuf;

/// Result alias for the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in flist-fs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("image {path}: {reason}")]
    BadImage { path: PathBuf, reason: String },
    #[error("chunk {id}: {reason}")]
    BadChunk { id: String, reason: String },
    #[error("chunk {id} not found in store {store}")]
    ChunkNotFound { id: String, store: String },
    #[error("store {store}: {reason}")]
    Store { store: String, reason: String },
    #[error("store URL {url:?}: {reason}")]
    BadStoreUrl { url: String, reason: String },
    #[error("none of the image's stores ({}) may be used on this node: {allowed}", .stores.join(", "))]
    StoresNotAllowed {
        stores: Vec<String>,
        allowed: String,
    },
    #[error("chunk {id}: no store could serve it: {}", .failures.join("; "))]
    AllStoresFailed { id: String, failures: Vec<String> },
    #[error("chunk {id}: no store is configured for its id range")]
    NoStoreForId { id: String },
    #[error("{path}: {reason}")]
    BadPath { path: String, reason: String },
    #[error("{path}: not found in image")]
    NotInImage { path: String },
    #[error("{path}: unsupported: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("chunk {id}: {error}")]
    Fetcher {
        id: String,
        error: crate::fetcher::FetcherError,
    },
    /// A chunk of a file could not be read: which file, where in it, and why.
    #[error("{}at offset {offset}: {error}", file_prefix(path))]
    FileChunk {
        path: PathBuf,
        offset: u64,
        error: Box<Error>,
    },
    #[error("OCI image {path}: {reason}")]
    Oci { path: PathBuf, reason: String },
}

/// `PATH ` for a [`Error::FileChunk`] that names its file (the reader fills it in).
fn file_prefix(path: &std::path::Path) -> String {
    if path.as_os_str().is_empty() {
        String::new()
    } else {
        format!("{} ", path.display())
    }
}

impl Error {
    /// Names `path` in a [`Error::FileChunk`] that names no file yet (a chunk source reports
    /// the offset; its caller knows the file).
    pub fn in_file(self, path: impl Into<PathBuf>) -> Self {
        match self {
            Error::FileChunk {
                path: p,
                offset,
                error,
            } if p.as_os_str().is_empty() => Error::FileChunk {
                path: path.into(),
                offset,
                error,
            },
            other => other,
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }

    /// A store-level failure for `store` (its redacted URL).
    pub fn store(store: &str, reason: impl std::fmt::Display) -> Self {
        Error::Store {
            store: store.to_string(),
            reason: reason.to_string(),
        }
    }

    /// True when the error means "this chunk is absent" (as opposed to a failure).
    pub fn is_not_found(&self) -> bool {
        match self {
            Error::ChunkNotFound { .. } => true,
            Error::FileChunk { error, .. } => error.is_not_found(),
            _ => false,
        }
    }
}
