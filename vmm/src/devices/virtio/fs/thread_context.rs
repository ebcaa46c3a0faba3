//! The filesystem context (working directory, umask) of a thread that serves FUSE requests.
//! A passthrough backend needs a umask of 0 so the guest's modes apply exactly; the umask is
//! per filesystem context (`CLONE_FS`), so each serving thread gets a context of its own and
//! the rest of the process keeps its umask.

/// Gives the calling thread a filesystem context of its own with umask 0.
pub fn enter_fs_context() -> std::io::Result<()> {
    // SAFETY: unshare(CLONE_FS) affects only the calling thread.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: umask cannot fail and touches only this thread's (now private) context.
    unsafe { libc::umask(0) };
    Ok(())
}
