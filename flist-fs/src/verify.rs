//! Verifying an image against its stores: every distinct chunk is fetched from every store
//! that should hold it, its id checked and it is decoded (size and convergent key checked).
//! Chunks are checked in parallel batches. The report lists each missing or corrupt chunk with
//! the store and the files that use it.

use crate::chunk::{decode, ChunkId};
use crate::error::Error;
use crate::meta::{ChunkRef, Image};
use crate::par::{parallel_map, parallelism};
use crate::store::Router;
use indicatif::ProgressBar;
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
pub struct Problem {
    pub id: ChunkId,
    pub store: String,
    pub missing: bool,
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
                    missing: true,
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
                        missing: matches!(e, Error::ChunkNotFound { .. }),
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
