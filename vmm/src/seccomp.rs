//! Seccomp filters for the VMM's threads. The virtio-fs workers parse guest-controlled FUSE
//! requests, so each runs under an allowlist of the system calls serving a filesystem needs;
//! anything else fails with EPERM (and is logged by the worker's caller as an I/O error)
//! instead of reaching the kernel.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// System calls a virtio-fs worker may make: file I/O and metadata on the served tree,
/// memory management, waiting on its eventfd, and credential switching per request.
const FS_WORKER_SYSCALLS: &[i64] = &[
    // Waiting for and acknowledging queue notifications, signalling interrupts.
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    // Opening, closing and describing files of the tree.
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    // Changing the tree.
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_utimensat,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_syncfs,
    libc::SYS_flock,
    libc::SYS_copy_file_range,
    libc::SYS_fchdir,
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    // Acting with the requesting guest user's credentials.
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_umask,
    // Path-based calls of the standard library and the image cache.
    libc::SYS_mkdir,
    libc::SYS_rmdir,
    libc::SYS_rename,
    libc::SYS_unlink,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_utimes,
    // Fetching image chunks from network stores (HTTP, S3, redis/zdb), name resolution.
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_shutdown,
    libc::SYS_bind,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_uname,
    // Read-ahead threads of the image layer.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_mprotect,
    libc::SYS_sched_getaffinity,
    libc::SYS_prctl,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    // Memory, time, threads and ending.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_sched_yield,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("cannot install the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// The compiled filter for virtio-fs worker threads.
pub fn fs_worker_filter() -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = FS_WORKER_SYSCALLS
        .iter()
        .map(|&nr| (nr, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// Installs `filter` on the calling thread.
pub fn apply_to_current_thread(filter: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(filter)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_allows_file_io_and_refuses_the_rest() {
        let filter = fs_worker_filter().unwrap();
        let outcome = std::thread::spawn(move || {
            apply_to_current_thread(&filter).unwrap();
            let dir = std::env::temp_dir();
            let read_ok = std::fs::read_dir(&dir).is_ok();
            // bpf(2) is not something a filesystem worker does.
            // SAFETY: an invalid bpf command; without the filter it fails with EINVAL.
            let sock = unsafe { libc::syscall(libc::SYS_bpf, -1i64, 0usize, 0usize) as i32 };
            let errno = std::io::Error::last_os_error().raw_os_error();
            (read_ok, sock, errno)
        })
        .join()
        .unwrap();
        assert!(outcome.0, "reading a directory must be allowed");
        assert_eq!((outcome.1, outcome.2), (-1, Some(libc::EPERM)));
    }
}
