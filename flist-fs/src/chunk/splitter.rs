//! Chunkers: content-defined (FastCDC 2020) and fixed-size. Both stream a reader so a large
//! file is never held in memory whole.
//!
//! CDC bounds: min 64 KiB, average 256 KiB, max 1 MiB. Fixed-size default: 512 KiB (as rfs).
//! No chunker accepts sizes making chunks larger than [`super::MAX_CHUNK_SIZE`] (16 MiB).

use fastcdc::v2020::StreamCDC;
use serde::{Deserialize, Serialize};
use std::io::{self, Read};

pub const CDC_MIN: u32 = 64 * 1024;
pub const CDC_AVG: u32 = 256 * 1024;
pub const CDC_MAX: u32 = 1024 * 1024;

/// How files are split; recorded in the image for information.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkerKind {
    /// FastCDC with (min, avg, max) sizes in bytes.
    Cdc { min: u32, avg: u32, max: u32 },
    /// Fixed-size blocks.
    Fixed { size: u32 },
}

impl Default for ChunkerKind {
    fn default() -> Self {
        ChunkerKind::Cdc {
            min: CDC_MIN,
            avg: CDC_AVG,
            max: CDC_MAX,
        }
    }
}

impl ChunkerKind {
    /// Fixed-size chunking with rfs's 512 KiB blocks.
    pub fn fixed_default() -> Self {
        ChunkerKind::Fixed { size: 512 * 1024 }
    }

    /// Checks sizes are within what the algorithms accept.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            ChunkerKind::Cdc { min, avg, max } => {
                use fastcdc::v2020::*;
                let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&min)
                    && (AVERAGE_MIN..=AVERAGE_MAX).contains(&avg)
                    && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max)
                    && min <= avg
                    && avg <= max;
                if ok {
                    Ok(())
                } else {
                    Err(format!("invalid CDC sizes min={min} avg={avg} max={max}"))
                }
            }
            ChunkerKind::Fixed { size } if size == 0 || size > super::MAX_CHUNK_SIZE => {
                Err(format!("invalid fixed chunk size {size}"))
            }
            ChunkerKind::Fixed { .. } => Ok(()),
        }
    }
}

/// An iterator of chunks (plaintext) read from `R`.
pub enum Chunker<R: Read> {
    Cdc(StreamCDC<R>),
    Fixed { reader: R, size: usize, done: bool },
}

impl<R: Read> Chunker<R> {
    /// Starts chunking `reader`; `kind` must have passed `validate`.
    pub fn new(kind: ChunkerKind, reader: R) -> Result<Self, String> {
        kind.validate()?;
        Ok(match kind {
            ChunkerKind::Cdc { min, avg, max } => {
                Chunker::Cdc(StreamCDC::new(reader, min, avg, max))
            }
            ChunkerKind::Fixed { size } => Chunker::Fixed {
                reader,
                size: size as usize,
                done: false,
            },
        })
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Chunker::Cdc(s) => s.next().map(|r| {
                r.map(|c| c.data).map_err(|e| match e {
                    fastcdc::v2020::Error::IoError(e) => e,
                    other => io::Error::other(format!("chunking failed: {other:?}")),
                })
            }),
            Chunker::Fixed { reader, size, done } => {
                if *done {
                    return None;
                }
                let mut buf = Vec::with_capacity(*size);
                match reader.by_ref().take(*size as u64).read_to_end(&mut buf) {
                    Err(e) => Some(Err(e)),
                    Ok(_) if buf.is_empty() => None,
                    Ok(n) => {
                        if n < *size {
                            *done = true;
                        }
                        Some(Ok(buf))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn cdc_respects_bounds_and_reassembles() {
        let data = pseudo_random(5 * 1024 * 1024, 7);
        let chunks: Vec<Vec<u8>> = Chunker::new(ChunkerKind::default(), &data[..])
            .unwrap()
            .collect::<io::Result<_>>()
            .unwrap();
        assert!(chunks.len() > 5);
        for c in &chunks[..chunks.len() - 1] {
            assert!(c.len() >= CDC_MIN as usize && c.len() <= CDC_MAX as usize);
        }
        assert_eq!(chunks.concat(), data);
    }

    #[test]
    fn cdc_shares_chunks_after_insert() {
        let a = pseudo_random(4 * 1024 * 1024, 9);
        let mut b = a.clone();
        b.splice(1000..1000, pseudo_random(100, 1));
        let ids = |d: &[u8]| -> std::collections::HashSet<Vec<u8>> {
            Chunker::new(ChunkerKind::default(), d)
                .unwrap()
                .map(|c| c.unwrap())
                .collect()
        };
        let (ia, ib) = (ids(&a), ids(&b));
        assert!(ia.intersection(&ib).count() + 2 >= ia.len());
    }

    #[test]
    fn fixed_sizes() {
        let data = pseudo_random(10_000, 3);
        let chunks: Vec<Vec<u8>> = Chunker::new(ChunkerKind::Fixed { size: 4096 }, &data[..])
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        assert_eq!(
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
            vec![4096, 4096, 1808]
        );
        assert!(Chunker::new(ChunkerKind::Fixed { size: 4096 }, &[][..])
            .unwrap()
            .next()
            .is_none());
        assert!(ChunkerKind::Cdc {
            min: 1,
            avg: 2,
            max: 3
        }
        .validate()
        .is_err());
        // No chunker can make a chunk larger than MAX_CHUNK_SIZE (what readers accept).
        let max = super::super::MAX_CHUNK_SIZE;
        assert!(ChunkerKind::Fixed { size: max }.validate().is_ok());
        assert!(ChunkerKind::Fixed { size: max + 1 }.validate().is_err());
        assert!(ChunkerKind::Cdc {
            min: CDC_MIN,
            avg: CDC_AVG,
            max: max + 1
        }
        .validate()
        .is_err());
    }
}
