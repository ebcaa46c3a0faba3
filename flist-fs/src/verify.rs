//! Verifying an image against its stores: every distinct chunk is fetched from every store
//! that should hold it, its id checked and it is decoded (size and convergent key checked).
//! Chunks are checked in parallel batches. The report lists each missing or corrupt chunk with
//! the store and the files that use it, and what is wrong: the store answered that it does
//! not have the chunk (missing), could not be asked (unreachable), or returned bytes that are
//! not the chunk (corrupt).

use crate::chunk::{decode, ChunkId};
use crate::error::Error;
use crate::meta::{ChunkRef, Image};
use crate::par::{parallel_map, parallelism};
use crate::store::Router;
use indicatif::ProgressBar;
use std::collections::BTreeMap;

/// What is wrong with one copy of a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProblemKind {
    /// The store answered that it has no such chunk (or no store covers the id).
    Missing,
    /// The store could not be asked: down, refusing, timing out, failing.
    Unreachable,
    /// The store returned bytes that are not the chunk (wrong id, undecodable, wrong size).
    Corrupt,
}

impl ProblemKind {
    fn of(e: &Error) -> Self {
        match e {
            Error::ChunkNotFound { .. } | Error::NoStoreForId { .. } => Self::Missing,
            Error::BadChunk { .. } => Self::Corrupt,
            Error::FileChunk { error, .. } => Self::of(error),
            _ => Self::Unreachable,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "MISSING",
            Self::Unreachable => "UNREACHABLE",
            Self::Corrupt => "CORRUPT",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Problem {
    pub id: ChunkId,
    pub store: String,
    pub kind: ProblemKind,
    pub reason: String,
    /// Up to a few paths that use this chunk.
    pub files: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    pub chunks: u64,
    pub copies_ok: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// How many chunk copies have a problem of `kind`.
    pub fn count(&self, kind: ProblemKind) -> usize {
        self.problems.iter().filter(|p| p.kind == kind).count()
    }
}

/// Checks every chunk of `image` in every store `router` maps it to.
pub fn verify(image: &Image, router: &Router, progress: bool) -> VerifyReport {
    let mut chunks: BTreeMap<ChunkId, (ChunkRef, Vec<String>)> = BTreeMap::new();
    for (path, ino) in image.walk() {
        let Some(inode) = image.inode(ino) else {
            continue;
        };
        for c in &inode.chunks {
            let entry = chunks
                .entry(c.id)
                .or_insert_with(|| (c.clone(), Vec::new()));
            if entry.1.len() < 3 {
                let p = String::from_utf8_lossy(&path).into_owned();
                if !entry.1.contains(&p) {
                    entry.1.push(p);
                }
            }
        }
    }
    let bar = if progress {
        ProgressBar::new(chunks.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    let mut report = VerifyReport::default();
    let chunks: Vec<(ChunkId, (ChunkRef, Vec<String>))> = chunks.into_iter().collect();
    for batch in chunks.chunks(parallelism() * 4) {
        // Each chunk is checked in every store that should hold it, a batch at a time.
        let results = parallel_map(batch, |(id, (cref, _))| {
            router
                .stores_for(id)
                .into_iter()
                .map(|store| {
                    let r = store
                        .get(id)
                        .and_then(|b| decode(id, &b, cref.key.as_ref(), cref.size).map(|_| ()));
                    (store.url().to_string(), r)
                })
                .collect::<Vec<_>>()
        });
        for ((id, (_, files)), checks) in batch.iter().zip(results) {
            report.chunks += 1;
            if checks.is_empty() {
                report.problems.push(Problem {
                    id: *id,
                    store: "<none>".into(),
                    kind: ProblemKind::Missing,
                    reason: "no store covers this id".into(),
                    files: files.clone(),
                });
            }
            for (store, r) in checks {
                match r {
                    Ok(()) => report.copies_ok += 1,
                    Err(e) => report.problems.push(Problem {
                        id: *id,
                        store,
                        kind: ProblemKind::of(&e),
                        reason: e.to_string(),
                        files: files.clone(),
                    }),
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    report
}
