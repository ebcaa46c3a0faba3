//! The check of a writable layer's directory, run by the vmm before it serves the layer (and
//! by `vmm check-layer DIR`): what a crash can leave behind is found, and with `fix` removed.
//! Every change of the layer is one host rename from `work/` into `upper/` (or back, for a
//! removal), so a crash leaves at most:
//! - staged objects in `work/` (a copy-up not yet renamed in, a whiteout not yet swapped in, a
//!   removed directory not yet emptied): stale, removed;
//! - index entries (`work/index/<image inode>`) whose copy has no name in `upper/` any more
//!   (link count 1): dangling, removed (the next copy-up of that image file copies it again).
//!
//! It also counts, without changing them, the marks in `upper/` (whiteouts, opaque and
//! redirected directories) and reports host devices that are not whiteouts (never made by the
//! vmm: the layer was changed on the host).

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use super::{host, whiteout};
use crate::fs_backends::host_dir;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Staged objects found in `work/`.
    pub stale_work: usize,
    /// Index entries without a name in `upper/`.
    pub dangling_index: usize,
    /// Index entries in use.
    pub index: usize,
    pub whiteouts: usize,
    pub opaque_dirs: usize,
    pub redirects: usize,
    /// Block or character devices in `upper/` that are not whiteouts.
    pub foreign_devices: usize,
    /// Whether what was found stale was removed.
    pub fixed: bool,
}

impl Report {
    /// Whether the layer needs nothing removed (or had it removed).
    pub fn consistent(&self) -> bool {
        self.fixed || (self.stale_work == 0 && self.dangling_index == 0)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} stale work entr{} {}, {} dangling index entr{} {}, {} index entries in use, \
             {} whiteouts, {} opaque directories, {} redirected directories, {} foreign devices",
            self.stale_work,
            if self.stale_work == 1 { "y" } else { "ies" },
            if self.fixed { "removed" } else { "found" },
            self.dangling_index,
            if self.dangling_index == 1 { "y" } else { "ies" },
            if self.fixed { "removed" } else { "found" },
            self.index,
            self.whiteouts,
            self.opaque_dirs,
            self.redirects,
            self.foreign_devices,
        )
    }
}

/// Checks the layer directory `layer` (holding `upper/` and `work/`); with `fix`, removes what
/// a crash left stale.
pub fn check_layer(layer: &Path, fix: bool) -> io::Result<Report> {
    let work = host_dir::open_dir_nofollow(&layer.join("work"), None)?;
    let mut report = check_work(&work, fix)?;
    if let Ok(upper) = host_dir::open_dir_nofollow(&layer.join("upper"), None) {
        count_marks(&upper, &mut report, 0)?;
    }
    Ok(report)
}

/// Checks the open `work/` directory of a layer.
pub fn check_work(work: &OwnedFd, fix: bool) -> io::Result<Report> {
    let mut report = Report {
        fixed: fix,
        ..Default::default()
    };
    for (name, _, _) in host::list_dir(work)? {
        if name.as_c_str() == whiteout::INDEX_DIR {
            continue;
        }
        report.stale_work += 1;
        if fix {
            whiteout::remove_all(work, &name)?;
        }
    }
    if let Ok(index) = host::open_dir(work, whiteout::INDEX_DIR) {
        for (name, _, _) in host::list_dir(&index)? {
            let st = host::stat_at(&index, &name)?;
            let dangling = match &st {
                Some(st) => st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_nlink <= 1,
                None => false,
            };
            if dangling {
                report.dangling_index += 1;
                if fix {
                    whiteout::remove_all(&index, &name)?;
                }
            } else if st.is_some() {
                report.index += 1;
            }
        }
    }
    Ok(report)
}

fn count_marks(dir: &OwnedFd, report: &mut Report, depth: usize) -> io::Result<()> {
    if depth > 4096 {
        return Ok(());
    }
    for (name, dt, _) in host::list_dir(dir)? {
        match dt {
            libc::DT_CHR | libc::DT_BLK => match host::stat_at(dir, &name)? {
                Some(st) if whiteout::is_whiteout(&st) => report.whiteouts += 1,
                Some(_) => report.foreign_devices += 1,
                None => {}
            },
            libc::DT_DIR => {
                let sub = host::open_dir(dir, &name)?;
                if whiteout::is_opaque(&sub)? {
                    report.opaque_dirs += 1;
                }
                if whiteout::redirect(&sub)?.is_some() {
                    report.redirects += 1;
                }
                count_marks(&sub, report, depth + 1)?;
            }
            _ => {}
        }
    }
    Ok(())
}
