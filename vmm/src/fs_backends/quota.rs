//! A byte and inode budget for a host directory the guest writes into (a writable layer, a
//! writable directory share). The vmm keeps the count itself, so it works on any host
//! filesystem: measured once when the share is built (apparent sizes of regular files and
//! symlinks, one inode per entry), then moved by every request that grows or shrinks the tree
//! (writes, truncation, fallocate, creation, removal; the overlay's copy-ups are writes into
//! its upper directory, so they count too). A request that would pass a limit fails with
//! EDQUOT and changes nothing.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Limits of one share; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: Option<u64>,
    pub max_inodes: Option<u64>,
}

#[derive(Debug)]
pub struct Quota {
    limits: Limits,
    bytes: AtomicU64,
    inodes: AtomicU64,
}

fn edquot() -> io::Error {
    io::Error::from_raw_os_error(libc::EDQUOT)
}

impl Quota {
    /// The budget of the tree at `root` (walked without following symlinks).
    pub fn measure(root: &Path, limits: Limits) -> io::Result<Self> {
        let (mut bytes, mut inodes) = (0u64, 0u64);
        let mut pending = vec![root.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let meta = entry.metadata()?; // lstat: never follows
                inodes += 1;
                if meta.is_dir() {
                    pending.push(entry.path());
                } else if meta.is_file() || meta.file_type().is_symlink() {
                    bytes += meta.len();
                }
            }
        }
        Ok(Self {
            limits,
            bytes: AtomicU64::new(bytes),
            inodes: AtomicU64::new(inodes),
        })
    }

    /// (bytes, inodes) in use.
    pub fn used(&self) -> (u64, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.inodes.load(Ordering::Relaxed),
        )
    }

    fn reserve(counter: &AtomicU64, limit: Option<u64>, n: u64) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        let Some(limit) = limit else {
            counter.fetch_add(n, Ordering::Relaxed);
            return Ok(());
        };
        counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(n).filter(|&total| total <= limit)
            })
            .map(drop)
            .map_err(|_| edquot())
    }

    fn release(counter: &AtomicU64, n: u64) {
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
            Some(used.saturating_sub(n))
        });
    }

    /// Takes `n` more bytes, or EDQUOT.
    pub fn reserve_bytes(&self, n: u64) -> io::Result<()> {
        Self::reserve(&self.bytes, self.limits.max_bytes, n)
    }

    pub fn release_bytes(&self, n: u64) {
        Self::release(&self.bytes, n)
    }

    /// Takes one more inode, or EDQUOT.
    pub fn reserve_inode(&self) -> io::Result<()> {
        Self::reserve(&self.inodes, self.limits.max_inodes, 1)
    }

    pub fn release_inode(&self) {
        Self::release(&self.inodes, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_the_tree_and_keeps_to_the_limits() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("d")).unwrap();
        std::fs::write(tmp.path().join("d/f"), vec![0u8; 1000]).unwrap();
        std::os::unix::fs::symlink("/nowhere/far", tmp.path().join("l")).unwrap();
        let limits = Limits {
            max_bytes: Some(2000),
            max_inodes: Some(4),
        };
        let q = Quota::measure(tmp.path(), limits).unwrap();
        assert_eq!(q.used(), (1000 + 12, 3));
        q.reserve_bytes(988).unwrap();
        assert_eq!(
            q.reserve_bytes(1).unwrap_err().raw_os_error(),
            Some(libc::EDQUOT)
        );
        q.release_bytes(500);
        q.reserve_bytes(500).unwrap();
        q.reserve_inode().unwrap();
        assert!(q.reserve_inode().is_err());
        q.release_inode();
        q.reserve_inode().unwrap();
        q.release_bytes(u64::MAX);
        assert_eq!(q.used().0, 0);
    }
}
