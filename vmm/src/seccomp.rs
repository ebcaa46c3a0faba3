//! Seccomp filters for the vmm's threads, one per kind of thread ([`ThreadKind`]), each an
//! allowlist with argument checks where an argument decides what a call can do:
//! - `clone` only for threads (no new processes, no namespaces), `clone3` answers ENOSYS (its
//!   flags are behind a pointer a filter cannot read) so the C library falls back to `clone`;
//! - `mmap`/`mprotect` never make memory executable;
//! - a vCPU's `ioctl` only runs the vCPU and reads its registers (for a fault report);
//! - a virtio-fs worker's network calls only when its images are fetched over the network by
//!   the vmm itself.
//! - a vsock worker's sockets are non-blocking AF_UNIX streams, and it opens no files.
//!
//! A thread installs its filter before it touches guest data: a vCPU before its first
//! `KVM_RUN`, a virtio-fs worker before it reads its queue. A call outside the list traps:
//! the SIGSYS handler ([`install_violation_handler`]) writes the thread and the call number to
//! stderr and ends the process with the exit record's help ([`crate::exit::fatal`]): the
//! trapping thread never goes on.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a thread does, and so which calls it may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs a vCPU and, on its exits, the devices' register handlers (which may activate a
    /// device: spawn its workers).
    Vcpu,
    /// Serves FUSE requests from a virtio-fs queue. `network`: its images' chunks are fetched
    /// from network stores by this process.
    FsWorker { network: bool },
    /// Talks to the node's chunk fetcher on already connected unix sockets (reconnecting to
    /// the same socket when the fetcher restarts).
    FetcherIo,
    /// Measures and evicts this process's image chunk cache (no chunk fetcher): lists the
    /// cache's directories, reads file sizes and times, removes files.
    CacheEvictor,
    /// Serves a virtio-blk queue: preadv/pwritev, fdatasync and hole punching on the disk
    /// image's descriptor `disk_fd` only, and the rate limiter's timer.
    BlockWorker { disk_fd: i32 },
    /// Serves a virtio-rng queue: getrandom (in every list) and the rate limiter's timer.
    RngWorker,
    /// The vmm's own threads once the VM runs: the main thread (waits for the VM's end,
    /// reports it), the console writer (writes and rotates the console log) and the stdin
    /// forwarder (terminal mode).
    Vmm,
    /// The controller: serves the control API on its already bound unix socket, kicks vCPUs
    /// out of KVM_RUN (pause), reads the vmm's memory use from an open /proc file.
    Controller,
    /// The virtio-vsock worker: its epoll loop over the queues and unix sockets (accepting
    /// host programs, connecting to `<uds_path>_PORT`).
    VsockWorker,
    /// A virtio-net worker: its epoll loop over the queues, its tap and its rate limiters'
    /// timers; frames are read and written with read/write (in every list), and the only
    /// ioctl is TUNSETOFFLOAD on its tap `tap_fd`.
    NetWorker { tap_fd: i32 },
}

/// What a call outside the list gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// SIGSYS: reported and the process ends (production).
    Trap,
    /// EPERM (tests that check the list itself).
    Errno,
}

/// Calls every thread needs: memory, synchronisation, time, signals, ending, logging.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Waiting on and signalling eventfds.
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_fcntl,
    libc::SYS_dup,
];

/// A virtio-fs worker: file I/O and metadata on the served tree (all relative to descriptors
/// the backend holds), the image cache, and the requesting guest user's credentials.
const FS_WORKER: &[i64] = &[
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
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
    // Acting with the requesting guest user's credentials; CAP_FSETID dropped around writes.
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
    // Path-based calls of the standard library (image cache: `<cache>/<id>` files).
    libc::SYS_mkdir,
    libc::SYS_rename,
    libc::SYS_unlink,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_utimes,
];

/// Fetching image chunks from network stores (HTTP, S3, redis/zdb) and resolving their names.
const NETWORK: &[i64] = &[
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
    libc::SYS_uname,
];

/// The vmm's own threads: the console log (open, rotate), terminal mode, signal handlers.
const VMM: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_rt_sigaction,
    // Removing the control API socket and a failed exit record's temporary file at the end.
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// The image cache's evictor: directory listings, file attributes, removals (opening is
/// checked: read-only).
const CACHE_EVICTOR: &[i64] = &[
    libc::SYS_getdents64,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lstat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// The controller thread: accepting and serving API connections on the bound socket.
const CONTROLLER: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_pread64,
];

/// The vsock worker: its epoll set and unix stream sockets (the socket call is checked).
const VSOCK_WORKER: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
];

/// Terminal ioctls of the stdin forwarder (raw mode and back).
const TERMINAL_IOCTLS: [u64; 4] = [libc::TCGETS, libc::TCSETS, libc::TCSETSW, libc::TCSETSF];

// KVM ioctls a vCPU thread makes once running (kvm.h: KVMIO = 0xAE).
const KVM_RUN: u64 = 0xAE80;
/// _IOR(KVMIO, 0x81, struct kvm_regs): 144-byte struct.
const KVM_GET_REGS: u64 = 0x8090_AE81;
/// _IOR(KVMIO, 0x83, struct kvm_sregs): 312-byte struct.
const KVM_GET_SREGS: u64 = 0x8138_AE83;

/// Thread-creating clone flags (what the standard library's `pthread_create` passes).
const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("cannot install the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
}

fn arg(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    Ok(SeccompCondition::new(
        index,
        SeccompCmpArgLen::Qword,
        op,
        value,
    )?)
}

/// The rules every thread kind shares: `COMMON` plus the checked calls.
fn common_rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        COMMON.iter().map(|&nr| (nr, Vec::new())).collect();
    let not_exec = |index| arg(index, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0);
    // mmap(addr, len, prot, ...), mprotect(addr, len, prot): never executable memory.
    rules.insert(libc::SYS_mmap, vec![SeccompRule::new(vec![not_exec(2)?])?]);
    rules.insert(
        libc::SYS_mprotect,
        vec![SeccompRule::new(vec![not_exec(2)?])?],
    );
    // clone(flags, ...): exactly the flags of a new thread.
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![arg(
            0,
            SeccompCmpOp::Eq,
            THREAD_CLONE_FLAGS,
        )?])?],
    );
    Ok(rules)
}

/// tgkill(tgid, tid, signal): kicking a vCPU thread (the kick signal only).
fn kick_rule() -> Result<Vec<SeccompRule>, SeccompError> {
    Ok(vec![SeccompRule::new(vec![arg(
        2,
        SeccompCmpOp::Eq,
        crate::vstate::run_state::kick_signal() as u64,
    )?])?])
}

/// The compiled filter for threads of `kind`.
pub fn filter(kind: ThreadKind, violation: Violation) -> Result<ThreadFilter, SeccompError> {
    let mut rules = common_rules()?;
    let plain = |rules: &mut BTreeMap<i64, Vec<SeccompRule>>, list: &[i64]| {
        for &nr in list {
            rules.insert(nr, Vec::new());
        }
    };
    match kind {
        ThreadKind::Vcpu => {
            // Activating a device makes its stop event (its threads already run).
            rules.insert(libc::SYS_eventfd2, Vec::new());
            let mut ioctls = Vec::new();
            for request in [KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS] {
                ioctls.push(SeccompRule::new(vec![arg(1, SeccompCmpOp::Eq, request)?])?);
            }
            rules.insert(libc::SYS_ioctl, ioctls);
        }
        ThreadKind::FetcherIo => {
            plain(
                &mut rules,
                &[
                    libc::SYS_connect,
                    libc::SYS_sendmsg,
                    libc::SYS_recvmsg,
                    libc::SYS_sendto,
                    libc::SYS_recvfrom,
                    libc::SYS_setsockopt,
                    libc::SYS_getsockopt,
                    libc::SYS_shutdown,
                    // Checking a received descriptor (size, seals).
                    libc::SYS_fstat,
                    libc::SYS_statx,
                    libc::SYS_newfstatat,
                ],
            );
            // Unix sockets only.
            rules.insert(
                libc::SYS_socket,
                vec![SeccompRule::new(vec![arg(
                    0,
                    SeccompCmpOp::Eq,
                    libc::AF_UNIX as u64,
                )?])?],
            );
        }
        ThreadKind::CacheEvictor => {
            plain(&mut rules, CACHE_EVICTOR);
            // openat(dir, path, flags, ...): reading only, never creating or truncating.
            let flags = |mask: i32, value: i32| {
                SeccompCondition::new(
                    2,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(mask as u32 as u64),
                    value as u32 as u64,
                )
            };
            rules.insert(
                libc::SYS_openat,
                vec![SeccompRule::new(vec![
                    flags(libc::O_ACCMODE, libc::O_RDONLY)?,
                    flags(libc::O_CREAT | libc::O_TRUNC, 0)?,
                ])?],
            );
        }
        ThreadKind::Vmm => {
            plain(&mut rules, VMM);
            // The main thread stops the vCPUs when the VM ends.
            rules.insert(libc::SYS_tgkill, kick_rule()?);
            let mut ioctls = Vec::new();
            for request in TERMINAL_IOCTLS {
                ioctls.push(SeccompRule::new(vec![arg(1, SeccompCmpOp::Eq, request)?])?);
            }
            rules.insert(libc::SYS_ioctl, ioctls);
        }
        ThreadKind::BlockWorker { disk_fd } => {
            // Descriptors and modes are C ints: compared as 32-bit values.
            let int_arg = |index, value: i32| {
                SeccompCondition::new(
                    index,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    value as u32 as u64,
                )
            };
            let on_disk = || int_arg(0, disk_fd);
            for nr in [libc::SYS_preadv, libc::SYS_pwritev, libc::SYS_fdatasync] {
                rules.insert(nr, vec![SeccompRule::new(vec![on_disk()?])?]);
            }
            // fallocate(fd, mode, ...): punching holes only.
            rules.insert(
                libc::SYS_fallocate,
                vec![SeccompRule::new(vec![
                    on_disk()?,
                    int_arg(1, crate::devices::virtio::block::PUNCH_HOLE_MODE)?,
                ])?],
            );
            rules.insert(libc::SYS_timerfd_settime, Vec::new());
        }
        ThreadKind::RngWorker => {
            rules.insert(libc::SYS_timerfd_settime, Vec::new());
        }
        ThreadKind::NetWorker { tap_fd } => {
            plain(
                &mut rules,
                &[libc::SYS_epoll_ctl, libc::SYS_timerfd_settime],
            );
            rules.insert(
                libc::SYS_ioctl,
                vec![SeccompRule::new(vec![
                    SeccompCondition::new(
                        0,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        tap_fd as u32 as u64,
                    )?,
                    arg(1, SeccompCmpOp::Eq, libc::TUNSETOFFLOAD)?,
                ])?],
            );
        }
        ThreadKind::Controller => {
            plain(&mut rules, CONTROLLER);
            // Socket mode changes (std's set_nonblocking) and nothing else.
            rules.insert(
                libc::SYS_ioctl,
                vec![SeccompRule::new(vec![arg(
                    1,
                    SeccompCmpOp::Eq,
                    libc::FIONBIO,
                )?])?],
            );
            rules.insert(libc::SYS_tgkill, kick_rule()?);
        }
        ThreadKind::VsockWorker => {
            plain(&mut rules, VSOCK_WORKER);
            // Non-blocking unix stream sockets only, made and accepted.
            let flags = (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64;
            rules.insert(
                libc::SYS_socket,
                vec![SeccompRule::new(vec![
                    arg(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?,
                    arg(1, SeccompCmpOp::Eq, libc::SOCK_STREAM as u64 | flags)?,
                ])?],
            );
            rules.insert(
                libc::SYS_accept4,
                vec![SeccompRule::new(vec![arg(3, SeccompCmpOp::Eq, flags)?])?],
            );
        }
        ThreadKind::FsWorker { network } => {
            plain(&mut rules, FS_WORKER);
            // A passthrough share re-imports its root on a thread of its own filesystem
            // context (`fs_backends::host_dir`): unshare(CLONE_FS) and nothing else.
            rules.insert(
                libc::SYS_unshare,
                vec![SeccompRule::new(vec![arg(
                    0,
                    SeccompCmpOp::Eq,
                    libc::CLONE_FS as u64,
                )?])?],
            );
            if network {
                plain(&mut rules, NETWORK);
            }
        }
    }
    let mismatch = match violation {
        Violation::Trap => SeccompAction::Trap,
        Violation::Errno => SeccompAction::Errno(libc::EPERM as u32),
    };
    // clone3 passes the main list; a second program answers it ENOSYS (of two answers the
    // kernel takes the stronger: ERRNO over ALLOW), so the C library falls back to clone.
    rules.insert(libc::SYS_clone3, Vec::new());
    let mut refused = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    if let std::collections::btree_map::Entry::Vacant(open) = rules.entry(libc::SYS_openat) {
        // A thread that opens no files may still have the C library's allocator read
        // /proc/sys/vm/overcommit_memory once (when it first trims the thread's heap): that
        // open fails (ENOSYS, which the allocator copes with) instead of ending the vmm.
        open.insert(Vec::new());
        refused.insert(libc::SYS_openat, Vec::new());
    }
    let main = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)?;
    let clone3 = SeccompFilter::new(
        refused,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )?;
    Ok(ThreadFilter {
        // The clone3 program first: once the main one is in place, seccomp(2) is refused.
        programs: [clone3.try_into()?, main.try_into()?],
    })
}

/// The compiled programs of one thread kind's filter.
#[derive(Clone, Debug)]
pub struct ThreadFilter {
    programs: [BpfProgram; 2],
}

/// Installs `filter` on the calling thread.
///
/// In a profiling build (`--cfg vmm_profiling` in RUSTFLAGS, made only by
/// `scripts/build-vmm.sh --profiling` for scripts/vmm-symbol-order.py), nothing is installed:
/// valgrind, which runs that build, does not implement seccomp(2). The switch is a compiler
/// flag, not a cargo feature, so that the profiling build's symbol names (their hashes) are
/// the shipped build's; no shipped or tested build has it, and such a build says so at start.
pub fn apply_to_current_thread(filter: &ThreadFilter) -> Result<(), SeccompError> {
    if cfg!(vmm_profiling) {
        return Ok(());
    }
    for program in &filter.programs {
        seccompiler::apply_filter(program)?;
    }
    CONFINED.with(|confined| confined.set(true));
    crate::test_fault::after_confinement();
    Ok(())
}

thread_local! {
    /// Whether this thread installed a filter (see [`current_thread_is_confined`]).
    static CONFINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread runs under one of these filters: it must then keep to its
/// list, e.g. a panic report must not print a backtrace (which calls getcwd and opens files).
pub fn current_thread_is_confined() -> bool {
    CONFINED.with(|confined| confined.get())
}

/// Reports a trapped call (thread name and call number) on stderr and ends the process with
/// status 159 (128 + SIGSYS), writing the exit record ([`crate::exit::fatal`]): the thread
/// never returns to the call. Only async-signal-safe calls, all in every thread's list.
extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; for SYS_SECCOMP the call number
    // is at `si_syscall` (the int after si_call_addr, a pointer, in the union).
    let nr: i32 = unsafe {
        let base = (info as *const u8).add(16);
        std::ptr::read_unaligned(base.add(std::mem::size_of::<usize>()) as *const i32)
    };
    let mut thread = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, thread.as_mut_ptr()) };
    let mut shown = [0u8; 16];
    let shown_len = crate::exit::record::printable_thread_name(&thread, &mut shown);
    let mut buf = [0u8; 128];
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        let n = bytes.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    push(b"vmm: seccomp: thread ");
    push(&shown[..shown_len]);
    push(b" made forbidden system call ");
    let mut digits = [0u8; 12];
    let mut n = nr.unsigned_abs();
    let mut d = digits.len();
    loop {
        d -= 1;
        digits[d] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if nr < 0 {
        push(b"-");
    }
    push(&digits[d..]);
    push(b"\n");
    // SAFETY: write(2) is async-signal-safe; the buffer is valid for `len` bytes.
    unsafe { libc::write(2, buf.as_ptr().cast(), len) };
    crate::exit::fatal::seccomp_violation(&thread, i64::from(nr));
}

/// Installs the SIGSYS handler that reports a trapped call and ends the process.
pub fn install_violation_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler and SA_SIGINFO is well-formed.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The compiled filter for virtio-fs worker threads (network calls allowed), trapping.
pub fn fs_worker_filter() -> Result<ThreadFilter, SeccompError> {
    filter(ThreadKind::FsWorker { network: true }, Violation::Trap)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `probe` on a new thread under the filter of `kind` (EPERM on violation).
    fn under<T: Send + 'static>(kind: ThreadKind, probe: impl FnOnce() -> T + Send + 'static) -> T {
        let filter = filter(kind, Violation::Errno).unwrap();
        std::thread::spawn(move || {
            apply_to_current_thread(&filter).unwrap();
            probe()
        })
        .join()
        .unwrap()
    }

    fn errno_of(rc: i64) -> Option<i32> {
        (rc == -1).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    #[test]
    fn the_cache_evictor_measures_and_evicts_and_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let filler = flist_fs::cache::ChunkCache::open(&dir, 1 << 20).unwrap();
        for i in 0..30u8 {
            let data = vec![i; 1000];
            filler
                .put(&flist_fs::chunk::ChunkId::of(&data), &data)
                .unwrap();
        }
        // The same directory under a smaller bound: the evictor has a segment to remove.
        let cache = flist_fs::cache::ChunkCache::open(&dir, 10_000).unwrap();
        let probe_dir = dir.clone();
        let (used, create, socket) = under(ThreadKind::CacheEvictor, move || {
            let used = cache.evict().map_err(|e| e.to_string());
            let create = std::fs::File::create(probe_dir.join("tmp/evil"))
                .err()
                .and_then(|e| e.raw_os_error());
            // SAFETY: plain arguments; only the filter's answer matters.
            let socket = errno_of(unsafe {
                libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0)
            });
            (used, create, socket)
        });
        assert!(used.unwrap() <= 10_000);
        assert_eq!(create, Some(libc::EPERM));
        assert_eq!(socket, Some(libc::EPERM));
    }

    #[test]
    fn fs_workers_do_file_io_and_nothing_else() {
        let (read_ok, bpf, socket, handle) = under(ThreadKind::FsWorker { network: false }, || {
            let read_ok = std::fs::read_dir(std::env::temp_dir()).is_ok();
            // SAFETY: invalid arguments; only the filter's answer matters.
            let bpf = errno_of(unsafe { libc::syscall(libc::SYS_bpf, -1i64, 0usize, 0usize) });
            let socket = errno_of(unsafe {
                libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0)
            });
            let handle = errno_of(unsafe {
                libc::syscall(libc::SYS_open_by_handle_at, -1i64, 0usize, 0usize)
            });
            (read_ok, bpf, socket, handle)
        });
        assert!(read_ok, "reading a directory must be allowed");
        assert_eq!(bpf, Some(libc::EPERM));
        assert_eq!(
            socket,
            Some(libc::EPERM),
            "no network without network stores"
        );
        assert_eq!(
            handle,
            Some(libc::EPERM),
            "open_by_handle_at escapes the share"
        );
    }

    #[test]
    fn fs_workers_with_network_stores_may_connect() {
        let socket = under(ThreadKind::FsWorker { network: true }, || {
            // SAFETY: a plain socket call; closed at once.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            if fd >= 0 {
                unsafe { libc::close(fd) };
            }
            fd >= 0
        });
        assert!(socket);
    }

    #[test]
    fn threads_may_start_threads_but_not_processes_or_executable_memory() {
        for kind in [ThreadKind::Vcpu, ThreadKind::FsWorker { network: true }] {
            let (thread_ok, fork, clone3, exec_map, exec_protect) = under(kind, || {
                let thread_ok = std::thread::spawn(|| 7).join().ok() == Some(7);
                // SAFETY: a fork-like clone (SIGCHLD only); the filter refuses it before it runs.
                let fork = errno_of(unsafe {
                    libc::syscall(
                        libc::SYS_clone,
                        libc::SIGCHLD as u64,
                        0usize,
                        0usize,
                        0usize,
                        0usize,
                    )
                });
                let clone3 = errno_of(unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) });
                // SAFETY: anonymous mappings, unmapped below when made.
                let map = |prot| unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        prot,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                let exec = map(libc::PROT_READ | libc::PROT_EXEC);
                let exec_map = exec == libc::MAP_FAILED;
                let plain = map(libc::PROT_READ | libc::PROT_WRITE);
                assert_ne!(plain, libc::MAP_FAILED);
                let exec_protect =
                    unsafe { libc::mprotect(plain, 4096, libc::PROT_READ | libc::PROT_EXEC) } == -1;
                unsafe { libc::munmap(plain, 4096) };
                (thread_ok, fork, clone3, exec_map, exec_protect)
            });
            assert!(thread_ok, "{kind:?}: threads must start");
            assert_eq!(fork, Some(libc::EPERM), "{kind:?}: fork");
            assert_eq!(clone3, Some(libc::ENOSYS), "{kind:?}: clone3");
            assert!(exec_map, "{kind:?}: PROT_EXEC mmap");
            assert!(exec_protect, "{kind:?}: PROT_EXEC mprotect");
        }
    }

    #[test]
    fn vmm_threads_write_logs_but_open_no_sockets_and_run_no_guest() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let (write, rename, socket, kvm, bpf) = under(ThreadKind::Vmm, move || {
            let write = std::fs::write(&log, b"x").is_ok();
            let rename = std::fs::rename(&log, log.with_extension("1")).is_ok();
            // SAFETY: invalid or harmless arguments; only the filter's answer matters.
            let socket = errno_of(unsafe {
                libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0)
            });
            let kvm = errno_of(unsafe { libc::ioctl(-1, KVM_RUN as _) } as i64);
            let bpf = errno_of(unsafe { libc::syscall(libc::SYS_bpf, -1i64, 0usize, 0usize) });
            (write, rename, socket, kvm, bpf)
        });
        assert!(write && rename, "the console log is written and rotated");
        assert_eq!(socket, Some(libc::EPERM));
        assert_eq!(kvm, Some(libc::EPERM));
        assert_eq!(bpf, Some(libc::EPERM));
    }

    #[test]
    fn fetcher_io_threads_use_unix_sockets_only() {
        let (unix, inet, open) = under(ThreadKind::FetcherIo, || {
            // SAFETY: plain socket calls; descriptors closed at once.
            let unix = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            if unix >= 0 {
                unsafe { libc::close(unix) };
            }
            let inet = errno_of(unsafe {
                libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0)
            });
            let open = std::fs::File::open("/etc/hostname")
                .err()
                .and_then(|e| e.raw_os_error());
            (unix >= 0, inet, open)
        });
        assert!(unix);
        assert_eq!(inet, Some(libc::EPERM));
        assert_eq!(
            open,
            Some(libc::ENOSYS),
            "opening files is refused, not trapped"
        );
    }

    #[test]
    fn vsock_workers_make_unix_stream_sockets_only() {
        let (unix, blocking, inet, open) = under(ThreadKind::VsockWorker, || {
            let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
            // SAFETY: plain socket calls; descriptors closed at once.
            let unix = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | flags, 0) };
            if unix >= 0 {
                unsafe { libc::close(unix) };
            }
            let blocking = errno_of(unsafe {
                libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0)
            });
            let inet = errno_of(unsafe {
                libc::syscall(
                    libc::SYS_socket,
                    libc::AF_INET,
                    libc::SOCK_STREAM | flags,
                    0,
                )
            });
            let open = std::fs::File::open("/etc/hostname")
                .err()
                .and_then(|e| e.raw_os_error());
            (unix >= 0, blocking, inet, open)
        });
        assert!(unix);
        assert_eq!(blocking, Some(libc::EPERM), "only non-blocking sockets");
        assert_eq!(inet, Some(libc::EPERM), "only AF_UNIX");
        assert_eq!(open, Some(libc::ENOSYS), "the worker opens no files");
    }

    #[test]
    fn vcpus_make_only_their_ioctls() {
        let (run, other, open) = under(ThreadKind::Vcpu, || {
            // SAFETY: ioctls on an invalid descriptor; only the filter's answer matters.
            let run = errno_of(unsafe { libc::ioctl(-1, KVM_RUN as _) } as i64);
            let other = errno_of(unsafe { libc::ioctl(-1, libc::TIOCSTI as _) } as i64);
            let open = std::fs::File::open("/etc/hostname")
                .err()
                .and_then(|e| e.raw_os_error());
            (run, other, open)
        });
        assert_eq!(run, Some(libc::EBADF), "KVM_RUN reaches the kernel");
        assert_eq!(other, Some(libc::EPERM));
        assert_eq!(open, Some(libc::ENOSYS), "a vCPU opens no files");
    }

    #[test]
    fn a_violation_is_reported_and_ends_the_process() {
        // In a child process (fork from this test thread: only async-signal-safe calls after).
        let filter = filter(ThreadKind::Vcpu, Violation::Trap).unwrap();
        let mut pipe = [0i32; 2];
        // SAFETY: plain pipe/fork/dup2/waitpid use; the child ends with _exit.
        unsafe {
            assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::dup2(pipe[1], 2);
                if install_violation_handler().is_err() || apply_to_current_thread(&filter).is_err()
                {
                    libc::_exit(1);
                }
                libc::syscall(libc::SYS_bpf, -1i64, 0usize, 0usize);
                libc::_exit(0);
            }
            libc::close(pipe[1]);
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            let mut out = vec![0u8; 256];
            let n = libc::read(pipe[0], out.as_mut_ptr().cast(), out.len());
            libc::close(pipe[0]);
            out.truncate(n.max(0) as usize);
            let out = String::from_utf8_lossy(&out);
            assert!(libc::WIFEXITED(status), "status {status:#x}");
            assert_eq!(libc::WEXITSTATUS(status), 128 + libc::SIGSYS);
            assert!(
                out.contains(&format!("forbidden system call {}", libc::SYS_bpf)),
                "{out}"
            );
        }
    }

    #[test]
    fn block_workers_do_io_on_their_image_only() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![7u8; 8192]).unwrap();
        let other = dir.path().join("other.img");
        std::fs::write(&other, vec![1u8; 8192]).unwrap();
        let disk = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .unwrap();
        let stranger = std::fs::File::open(&other).unwrap();
        use std::os::fd::AsRawFd;
        let (disk_fd, other_fd) = (disk.as_raw_fd(), stranger.as_raw_fd());
        let kind = ThreadKind::BlockWorker { disk_fd };
        let results = under(kind, move || {
            let mut buf = [0u8; 512];
            let iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: reads and writes into a local buffer on open descriptors.
            let read = unsafe { libc::preadv(disk_fd, &iov, 1, 0) };
            let write = unsafe { libc::pwritev(disk_fd, &iov, 1, 512) };
            // The worker does vectored I/O only.
            let plain =
                errno_of(unsafe { libc::pread64(disk_fd, buf.as_mut_ptr().cast(), 512, 0) } as i64);
            let sync = unsafe { libc::fdatasync(disk_fd) };
            let punch = unsafe {
                libc::fallocate(
                    disk_fd,
                    crate::devices::virtio::block::PUNCH_HOLE_MODE,
                    0,
                    4096,
                )
            };
            let grow = errno_of(unsafe { libc::fallocate(disk_fd, 0, 0, 1 << 20) } as i64);
            let read_other = errno_of(unsafe { libc::preadv(other_fd, &iov, 1, 0) } as i64);
            let open = std::fs::File::open("/etc/hostname")
                .err()
                .and_then(|e| e.raw_os_error());
            (read, write, sync, punch, grow, read_other, open, plain)
        });
        assert_eq!(results.0, 512, "preadv on the image");
        assert_eq!(results.1, 512, "pwritev on the image");
        assert_eq!(results.7, Some(libc::EPERM), "plain pread");
        assert_eq!(
            (results.2, results.3),
            (0, 0),
            "fdatasync and hole punching"
        );
        assert_eq!(results.4, Some(libc::EPERM), "other fallocate modes");
        assert_eq!(results.5, Some(libc::EPERM), "I/O on another descriptor");
        assert_eq!(results.6, Some(libc::ENOSYS), "opening files");
        drop((disk, stranger));
    }

    #[test]
    fn net_workers_set_offloads_on_their_tap_only() {
        use std::os::fd::AsRawFd;
        let (tap, other) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let (tap_fd, other_fd) = (tap.as_raw_fd(), other.as_raw_fd());
        let (offload, other_offload, ifreq, socket, open, io) =
            under(ThreadKind::NetWorker { tap_fd }, move || {
                // Not a tap: the call gets past the filter and fails in the kernel.
                // SAFETY: ioctls with a by-value argument on open descriptors.
                let offload =
                    errno_of(
                        unsafe { libc::ioctl(tap_fd, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) }
                            as i64,
                    );
                let other_offload = errno_of(unsafe {
                    libc::ioctl(other_fd, libc::TUNSETOFFLOAD, 0 as libc::c_ulong)
                } as i64);
                let ifreq =
                    errno_of(
                        unsafe { libc::ioctl(tap_fd, libc::TUNSETIFF, 0 as libc::c_ulong) } as i64,
                    );
                // SAFETY: plain socket call.
                let socket =
                    errno_of(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) } as i64);
                let open = std::fs::File::open("/etc/hostname")
                    .err()
                    .and_then(|e| e.raw_os_error());
                let frame = [0u8; 64];
                // SAFETY: writes a local buffer to an open descriptor.
                let io = unsafe { libc::write(tap_fd, frame.as_ptr().cast(), frame.len()) };
                (offload, other_offload, ifreq, socket, open, io)
            });
        assert_ne!(offload, Some(libc::EPERM), "TUNSETOFFLOAD on the tap");
        assert_eq!(
            other_offload,
            Some(libc::EPERM),
            "ioctls on another descriptor"
        );
        assert_eq!(ifreq, Some(libc::EPERM), "other ioctls");
        assert_eq!(socket, Some(libc::EPERM), "sockets");
        assert_eq!(open, Some(libc::ENOSYS), "opening files");
        assert_eq!(io, 64, "frames are written");
        drop((tap, other));
    }

    #[test]
    fn rng_workers_get_random_bytes_and_open_nothing() {
        let (random, open) = under(ThreadKind::RngWorker, || {
            let mut buf = [0u8; 64];
            // SAFETY: fills a local buffer.
            let random = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), 64, 0) };
            let open = std::fs::File::open("/etc/hostname")
                .err()
                .and_then(|e| e.raw_os_error());
            (random, open)
        });
        assert_eq!(random, 64);
        assert_eq!(open, Some(libc::ENOSYS));
    }
}
