//! The guest's root filesystem: the initramfs as is, or (with `gridinit.root=TAG` on the
//! command line) the virtio-fs share TAG, mounted at /newroot and switched to before the
//! entrypoint starts. The early mounts (/dev, /proc, /sys, /run, /tmp) move into the new
//! root where it has a directory for them; a read-only root without one just lacks that
//! mount. Errors become `InitError::Setup` and end the VM with a status.

use std::ffi::CString;

use crate::error::InitError;

const NEW_ROOT: &str = "/newroot";
const MOVED_MOUNTS: &[&str] = &["/dev", "/proc", "/sys", "/run", "/tmp"];

fn cstring(s: &str) -> Result<CString, InitError> {
    CString::new(s).map_err(|_| InitError::Setup(format!("path {s:?} contains a NUL byte")))
}

fn check(ret: libc::c_int, what: impl FnOnce() -> String) -> Result<(), InitError> {
    if ret == 0 {
        Ok(())
    } else {
        Err(InitError::Setup(format!(
            "{}: {}",
            what(),
            std::io::Error::last_os_error()
        )))
    }
}

fn move_mount(from: &str, to: &str) -> Result<(), InitError> {
    let (src, dst) = (cstring(from)?, cstring(to)?);
    // SAFETY: both are valid NUL-terminated paths; MS_MOVE takes no fstype or data.
    let ret = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    };
    check(ret, || format!("cannot move mount {from} to {to}"))
}

/// Prepares the root filesystem the entrypoint runs in.
pub fn prepare(root_tag: Option<&str>) -> Result<(), InitError> {
    let Some(tag) = root_tag else {
        return Ok(());
    };
    std::fs::create_dir_all(NEW_ROOT)
        .map_err(|e| InitError::Setup(format!("cannot create {NEW_ROOT}: {e}")))?;
    let (source, target, fstype) = (cstring(tag)?, cstring(NEW_ROOT)?, cstring("virtiofs")?);
    // SAFETY: valid NUL-terminated strings; no mount data.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    check(ret, || {
        format!("cannot mount virtio-fs tag {tag:?} as the root")
    })?;

    for mount in MOVED_MOUNTS {
        let inside = format!("{NEW_ROOT}{mount}");
        let has_dir = std::fs::metadata(&inside).is_ok_and(|m| m.is_dir())
            || std::fs::create_dir(&inside).is_ok();
        if has_dir {
            if let Err(e) = move_mount(mount, &inside) {
                crate::console::log(&e.to_string());
            }
        } else {
            crate::console::log(&format!(
                "the root has no {mount}; it stays unmounted there"
            ));
        }
    }

    let dot = cstring(".")?;
    std::env::set_current_dir(NEW_ROOT)
        .map_err(|e| InitError::Setup(format!("cannot enter {NEW_ROOT}: {e}")))?;
    move_mount(NEW_ROOT, "/")?;
    // SAFETY: "." is a valid path; chroot into the moved root.
    check(unsafe { libc::chroot(dot.as_ptr()) }, || {
        "cannot chroot into the new root".into()
    })?;
    std::env::set_current_dir("/")
        .map_err(|e| InitError::Setup(format!("cannot enter the new root: {e}")))?;
    Ok(())
}

/// Mounts the extra virtio-fs shares at their paths (in the root the entrypoint sees),
/// creating the directories; run after [`prepare`].
pub fn mount_shares(mounts: &[(String, std::ffi::OsString)]) -> Result<(), InitError> {
    use std::os::unix::ffi::OsStrExt;
    for (tag, path) in mounts {
        let shown = path.to_string_lossy();
        std::fs::create_dir_all(path)
            .map_err(|e| InitError::Setup(format!("cannot create mount point {shown}: {e}")))?;
        let target = CString::new(path.as_bytes())
            .map_err(|_| InitError::Setup(format!("mount point {shown:?} contains a NUL byte")))?;
        let (source, fstype) = (cstring(tag)?, cstring("virtiofs")?);
        // SAFETY: valid NUL-terminated strings; no mount data.
        let ret = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                std::ptr::null(),
            )
        };
        check(ret, || format!("cannot mount share {tag} at {shown}"))?;
    }
    Ok(())
}
