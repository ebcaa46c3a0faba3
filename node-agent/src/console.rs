//! A VM's console log read as one stream across its rotations and restarts.
//!
//! The vmm writes the console to `console.log`; when that file is full it renames it to
//! `console.log.1` (replacing the previous one) and starts a new `console.log`. Before the
//! agent starts a vmm it moves the last run's `console.log` to `console.log.1` itself
//! ([`keep_previous_run`]), because the vmm truncates the file it opens. So every file of
//! the stream is written once, from its start, and only ever moves from `console.log` to
//! `console.log.1`.
//!
//! A reader continues where it stopped with a [`Cursor`]: the identity of the file it was
//! reading (device, inode and, where the filesystem keeps it, birth time: inode numbers are
//! reused as soon as a rotation frees one) and its position there. A byte offset into "the kept files" would not
//! do: after a rotation the same offset names other bytes, and `logs -f` would skip or repeat
//! output. With a cursor a reader that was in `console.log` goes on in `console.log.1` after
//! a rotation and then reads the new `console.log` from its start. A cursor whose file is gone
//! (rotated out twice before it was read again, or deleted) is answered from the oldest kept
//! byte, flagged as a gap.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Where a reader stopped: a file (device, inode, birth time in nanoseconds or 0 where the
/// filesystem keeps none) and a position in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub dev: u64,
    pub ino: u64,
    pub born: u64,
    pub pos: u64,
}

/// Longest cursor text accepted (four u64 and three separators).
const MAX_CURSOR_LEN: usize = 4 * 20 + 3;

impl Cursor {
    /// Parses `DEV-INO-BORN-POS` as [`Cursor`]'s `Display` writes it; the error names the
    /// problem.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.len() > MAX_CURSOR_LEN {
            return Err(format!(
                "cursor is {} bytes long; a cursor is at most {MAX_CURSOR_LEN}",
                s.len()
            ));
        }
        let mut parts = s.split('-');
        let mut next = |what: &str| -> Result<u64, String> {
            parts
                .next()
                .ok_or_else(|| format!("cursor {s:?} has no {what} (expected DEV-INO-BORN-POS)"))?
                .parse()
                .map_err(|_| {
                    format!("cursor {s:?}: {what} is not a number (expected DEV-INO-BORN-POS)")
                })
        };
        let c = Cursor {
            dev: next("device")?,
            ino: next("inode")?,
            born: next("birth time")?,
            pos: next("position")?,
        };
        if parts.next().is_some() {
            return Err(format!(
                "cursor {s:?} has more than four parts (expected DEV-INO-BORN-POS)"
            ));
        }
        Ok(c)
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}-{}-{}", self.dev, self.ino, self.born, self.pos)
    }
}

/// What one read gives.
#[derive(Debug)]
pub struct Chunk {
    pub bytes: Vec<u8>,
    /// Where to continue (None: there is no console output yet).
    pub next: Option<Cursor>,
    /// Output between the given cursor and these bytes is no longer kept.
    pub gap: bool,
}

/// One file of the stream, opened (so a rotation while reading cannot swap it).
struct Part {
    file: File,
    dev: u64,
    ino: u64,
    born: u64,
    len: u64,
}

impl Part {
    fn open(path: &Path) -> Result<Option<Self>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let meta = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?;
        let born = meta
            .created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Ok(Some(Self {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
            born,
            len: meta.len(),
        }))
    }

    fn is(&self, c: &Cursor) -> bool {
        (self.dev, self.ino, self.born) == (c.dev, c.ino, c.born)
    }

    fn cursor(&self, pos: u64) -> Cursor {
        Cursor {
            dev: self.dev,
            ino: self.ino,
            born: self.born,
            pos,
        }
    }
}

/// The rotated file beside `console`.
pub fn rotated(console: &Path) -> PathBuf {
    let mut s = console.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// Before a vmm starts on `console`: the previous run's output becomes `console.log.1`, so it
/// stays readable (how the last run ended) and a reader in it goes on into the new run.
pub fn keep_previous_run(console: &Path) -> Result<()> {
    match std::fs::metadata(console) {
        Ok(m) if m.len() > 0 => std::fs::rename(console, rotated(console))
            .with_context(|| format!("moving {} aside", console.display())),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {}", console.display())),
    }
}

/// After a power cut: drops the zero bytes that end `console` and its rotated file. The vmm
/// does not sync the console log, and a filesystem may keep a file's new size without the
/// bytes written last (ext4 commits the size of an append into an allocated block before the
/// data is written back): they would read as zeros. They are lost output; a cursor past the
/// new end is answered as a gap. Returns how many bytes were dropped.
pub fn drop_lost_tail(console: &Path) -> Result<u64> {
    let mut dropped = 0;
    for path in [console.to_path_buf(), rotated(console)] {
        let mut file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let len = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        // The end of the last non-zero byte, read backwards a block at a time.
        let mut end = len;
        let mut block = vec![0u8; 64 * 1024];
        while end > 0 {
            let start = end.saturating_sub(block.len() as u64);
            let n = (end - start) as usize;
            file.seek(SeekFrom::Start(start))
                .and_then(|_| file.read_exact(&mut block[..n]))
                .with_context(|| format!("reading {}", path.display()))?;
            match block[..n].iter().rposition(|&b| b != 0) {
                Some(i) => {
                    end = start + i as u64 + 1;
                    break;
                }
                None => end = start,
            }
        }
        if end < len {
            file.set_len(end)
                .with_context(|| format!("truncating {}", path.display()))?;
            dropped += len - end;
        }
    }
    Ok(dropped)
}

/// Reads at most `max` bytes of the console stream at `console` from `from` (None: from the
/// oldest kept byte).
pub fn read(console: &Path, from: Option<Cursor>, max: usize) -> Result<Chunk> {
    // The current file first: a rotation between the two opens then shows the same file
    // twice (dropped below) rather than a file never seen.
    let current = Part::open(console)?;
    let old = Part::open(&rotated(console))?.filter(|o| {
        current
            .as_ref()
            .is_none_or(|c| (c.dev, c.ino, c.born) != (o.dev, o.ino, o.born))
    });
    let mut parts: Vec<Part> = old.into_iter().chain(current).collect();
    let Some(last) = parts.last() else {
        return Ok(Chunk {
            bytes: Vec::new(),
            next: from,
            gap: false,
        });
    };
    let end_of_stream = last.cursor(last.len);
    // Which part to start in, and where.
    let (mut index, mut pos, gap) = match from {
        None => (0, 0, false),
        Some(c) => match parts.iter().position(|p| p.is(&c)) {
            // The vmm never shortens a file it writes; a position past the end is a file
            // that is not the one the cursor was made in (its inode number reused on a
            // filesystem that keeps no birth time), or output a power cut lost
            // ([`drop_lost_tail`]): a gap either way.
            Some(i) if c.pos <= parts[i].len => (i, c.pos, false),
            _ => (0, 0, true),
        },
    };
    let mut bytes = Vec::new();
    while index < parts.len() && bytes.len() < max {
        let part = &mut parts[index];
        let want = (part.len - pos).min((max - bytes.len()) as u64);
        part.file
            .seek(SeekFrom::Start(pos))
            .context("seeking in the console log")?;
        let got = (&mut part.file)
            .take(want)
            .read_to_end(&mut bytes)
            .context("reading the console log")?;
        pos += got as u64;
        if pos < part.len || index + 1 == parts.len() {
            break;
        }
        index += 1;
        pos = 0;
    }
    let next = match parts.get(index) {
        // Ended exactly at the end of the rotated file: continue at the current one's start,
        // which outlives the rotated one.
        Some(p) if pos == p.len && index + 1 < parts.len() => parts[index + 1].cursor(0),
        Some(p) => p.cursor(pos),
        None => end_of_stream,
    };
    Ok(Chunk {
        bytes,
        next: Some(next),
        gap,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_power_cut_s_zero_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        // Nothing there: nothing to do.
        assert_eq!(drop_lost_tail(&log).unwrap(), 0);
        let mut lost = b"init: booted\r\n".to_vec();
        lost.extend_from_slice(&[0; 19]);
        std::fs::write(&log, &lost).unwrap();
        // The rotated file: zeros across more than one read block, a zero inside kept.
        let mut old = b"a\0b".to_vec();
        old.extend_from_slice(&vec![0; 200_000]);
        std::fs::write(rotated(&log), &old).unwrap();
        assert_eq!(drop_lost_tail(&log).unwrap(), 19 + 200_000);
        assert_eq!(std::fs::read(&log).unwrap(), b"init: booted\r\n");
        assert_eq!(std::fs::read(rotated(&log)).unwrap(), b"a\0b");
        // Intact logs are left alone; a log of zeros only becomes empty.
        assert_eq!(drop_lost_tail(&log).unwrap(), 0);
        std::fs::write(&log, [0u8; 10]).unwrap();
        assert_eq!(drop_lost_tail(&log).unwrap(), 10);
        assert_eq!(std::fs::read(&log).unwrap(), b"");
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_named() {
        let c = Cursor {
            dev: 2049,
            ino: u64::MAX,
            born: 1_764_000_000_123_456_789,
            pos: 17,
        };
        assert_eq!(Cursor::parse(&c.to_string()), Ok(c));
        for (bad, says) in [
            ("", "device is not a number"),
            ("1-2", "no birth time"),
            ("1-2-3", "no position"),
            ("1-2-3-x", "position is not a number"),
            ("1-2-3-4-5", "more than four parts"),
            ("-1-2", "device is not a number"),
            (&"9".repeat(100), "at most"),
        ] {
            let e = Cursor::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    /// Appends to the current file, as the vmm's writer does.
    fn append(console: &Path, bytes: &[u8]) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(console)
            .unwrap();
        f.write_all(bytes).unwrap();
    }

    /// The vmm's rotation: the full file becomes `.1`, a new file starts.
    fn rotate(console: &Path) {
        std::fs::rename(console, rotated(console)).unwrap();
        append(console, b"");
    }

    /// Reads everything from `from` in steps of at most `max` bytes.
    fn drain(console: &Path, mut from: Option<Cursor>, max: usize) -> (Vec<u8>, Cursor, bool) {
        let mut out = Vec::new();
        let mut gap = false;
        loop {
            let c = read(console, from, max).unwrap();
            assert!(c.bytes.len() <= max);
            gap |= c.gap;
            from = c.next;
            if c.bytes.is_empty() {
                return (out, from.unwrap(), gap);
            }
            out.extend(c.bytes);
        }
    }

    #[test]
    fn a_reader_goes_on_across_rotations_and_restarts_without_skipping_or_repeating() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        append(&log, b"abc");
        let (got, at, gap) = drain(&log, None, 2);
        assert_eq!((got.as_slice(), gap), (&b"abc"[..], false));
        // The file fills and rotates; the new one gets more.
        append(&log, b"de");
        rotate(&log);
        append(&log, b"fg");
        let (got, at, gap) = drain(&log, Some(at), 3);
        assert_eq!((got.as_slice(), gap), (&b"defg"[..], false));
        // The VM restarts: the agent keeps the last run aside, the vmm starts a new file.
        append(&log, b"h");
        keep_previous_run(&log).unwrap();
        append(&log, b"ij");
        let (got, at, gap) = drain(&log, Some(at), 1);
        assert_eq!((got.as_slice(), gap), (&b"hij"[..], false));
        // A reader from the start sees what is kept, once.
        let (got, _, _) = drain(&log, None, 1);
        assert_eq!(got, b"fghij");
        // Two rotations before the next read: the cursor's file is gone; the answer starts at
        // the oldest kept byte and says output was lost.
        append(&log, b"k");
        rotate(&log);
        append(&log, b"l");
        rotate(&log);
        append(&log, b"m");
        let (got, at, gap) = drain(&log, Some(at), 4);
        assert_eq!((got.as_slice(), gap), (&b"lm"[..], true));
        // A file with the cursor's device and inode but born at another time is another
        // file (an inode number reused): a gap, not a position in it.
        if at.born != 0 {
            let other = Cursor {
                born: at.born - 1,
                pos: 0,
                ..at
            };
            let c = read(&log, Some(other), 100).unwrap();
            assert!(
                c.gap,
                "a reused inode number was taken for the cursor's file"
            );
            assert_eq!(c.bytes, b"lm");
        }
        // An empty new run does not replace the last one's output.
        let before = std::fs::read(rotated(&log)).unwrap();
        std::fs::write(&log, b"").unwrap();
        keep_previous_run(&log).unwrap();
        assert_eq!(std::fs::read(rotated(&log)).unwrap(), before);
    }

    #[test]
    fn no_log_yet_is_empty_and_keeps_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = read(&dir.path().join("console.log"), None, 10).unwrap();
        assert!(chunk.bytes.is_empty() && chunk.next.is_none() && !chunk.gap);
    }
}
