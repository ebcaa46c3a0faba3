//! The early filesystems every guest gets: /proc, /sys, /dev (devtmpfs), /dev/pts,
//! /dev/shm, /tmp and /run. Failures are logged and skipped; an already mounted target
//! (EBUSY) is fine.

use std::ffi::CStr;

use crate::console;

struct Mount {
    source: &'static CStr,
    target: &'static CStr,
    fstype: &'static CStr,
    flags: libc::c_ulong,
    data: Option<&'static CStr>,
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

const MOUNTS: &[Mount] = &[
    Mount {
        source: c"proc",
        target: c"/proc",
        fstype: c"proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: c"sysfs",
        target: c"/sys",
        fstype: c"sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: c"devtmpfs",
        target: c"/dev",
        fstype: c"devtmpfs",
        flags: libc::MS_NOSUID,
        data: Some(c"mode=0755"),
    },
    Mount {
        source: c"devpts",
        target: c"/dev/pts",
        fstype: c"devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: Some(c"mode=0620,ptmxmode=0666"),
    },
    Mount {
        source: c"tmpfs",
        target: c"/dev/shm",
        fstype: c"tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: Some(c"mode=1777"),
    },
    Mount {
        source: c"tmpfs",
        target: c"/tmp",
        fstype: c"tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: Some(c"mode=1777"),
    },
    Mount {
        source: c"tmpfs",
        target: c"/run",
        fstype: c"tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: Some(c"mode=0755"),
    },
];

/// Mounts every early filesystem, logging (and skipping) the ones that fail.
pub fn mount_early_filesystems() {
    for m in MOUNTS {
        if let Err(e) = mount_one(m) {
            console::log(&format!(
                "mounting {} on {} failed, going on: {e}",
                m.fstype.to_string_lossy(),
                m.target.to_string_lossy()
            ));
        }
    }
}

fn mount_one(m: &Mount) -> std::io::Result<()> {
    // SAFETY: target is a valid NUL-terminated path.
    if unsafe { libc::mkdir(m.target.as_ptr(), 0o755) } < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    let data = m.data.map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: all pointers are valid NUL-terminated strings or null for data.
    let rc = unsafe {
        libc::mount(
            m.source.as_ptr(),
            m.target.as_ptr(),
            m.fstype.as_ptr(),
            m.flags,
            data,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
    }
    Ok(())
}
