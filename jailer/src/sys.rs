//! The thin `unsafe` layer: libc calls the `nix` crate does not wrap (capabilities, the
//! bounding and ambient sets, close_range, sigtimedwait, clone into a new PID namespace,
//! interface names). Every function here is a direct system call with checked arguments.

use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Pid;

const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's capability sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

/// `capget(2)` for the calling thread.
pub fn capabilities() -> nix::Result<Capabilities> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and two v3 data structs are valid for the kernel to read/write.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    Errno::result(r)?;
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok(Capabilities {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

/// Empties the effective, permitted and inheritable sets (`capset(2)`).
pub fn clear_capabilities() -> nix::Result<()> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: header and two v3 data structs are valid for the kernel to read.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    Errno::result(r).map(drop)
}

/// Drops every capability from the bounding set (needs CAP_SETPCAP: call before setuid).
/// Stops at the first number the kernel does not know (EINVAL).
pub fn drop_bounding_set() -> nix::Result<()> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        match Errno::result(r) {
            Ok(_) => {}
            Err(Errno::EINVAL) if cap > 0 => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Capabilities still in the bounding set (bit n = capability n).
pub fn bounding_set() -> u64 {
    let mut set = 0;
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) };
        if r == 1 {
            set |= 1 << cap;
        } else if r < 0 {
            break;
        }
    }
    set
}

/// Capabilities in the ambient set.
pub fn ambient_set() -> u64 {
    let mut set = 0;
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let r =
            unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_IS_SET, cap, 0, 0) };
        if r == 1 {
            set |= 1 << cap;
        } else if r < 0 {
            break;
        }
    }
    set
}

/// Empties the ambient set.
pub fn clear_ambient_set() -> nix::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    Errno::result(r).map(drop)
}

/// Marks every descriptor from `first` up close-on-exec, so that exactly 0, 1 and 2 reach
/// the program (the jailer's own pipes stay usable until the exec).
/// Clears close-on-exec on inherited descriptor `fd`, which must be open.
pub fn keep_open(fd: i32) -> nix::Result<()> {
    // SAFETY: fcntl on an integer descriptor; F_GETFD fails (EBADF) on a closed one.
    Errno::result(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    // SAFETY: as above; clears FD_CLOEXEC and nothing else.
    Errno::result(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }).map(drop)
}

pub fn cloexec_from(first: u32) -> nix::Result<()> {
    // SAFETY: close_range with integer arguments only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if Errno::result(r).is_ok() {
        return Ok(());
    }
    // Kernels before 5.11: set the flag one descriptor at a time.
    let max = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
        .min(1 << 20);
    for fd in first as u64..max {
        // SAFETY: fcntl on an integer descriptor; EBADF for closed ones is ignored.
        unsafe { libc::fcntl(fd as i32, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

/// Waits up to `timeout` for one of the blocked signals in `set`.
pub fn sigtimedwait(set: &SigSet, timeout: Duration) -> nix::Result<Option<Signal>> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    let raw: &libc::sigset_t = set.as_ref();
    // SAFETY: valid sigset and timespec; no siginfo requested.
    let r = unsafe { libc::sigtimedwait(raw, std::ptr::null_mut(), &ts) };
    match Errno::result(r) {
        Ok(n) => Signal::try_from(n).map(Some),
        Err(Errno::EAGAIN) | Err(Errno::EINTR) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Where a fork-like clone returned.
pub enum Forked {
    Parent(Pid),
    Child,
}

/// Forks into a new PID namespace (the child is its PID 1) without changing the caller's
/// own namespace for later children, as `unshare(CLONE_NEWPID)` would.
///
/// # Safety
/// As `fork(2)`: the caller must be single-threaded, or the child may only call
/// async-signal-safe functions.
pub unsafe fn fork_new_pid_namespace() -> nix::Result<Forked> {
    // SAFETY: clone with a null stack behaves as fork; the caller upholds fork's rules.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::CLONE_NEWPID | libc::SIGCHLD,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0usize,
        )
    };
    let pid = Errno::result(r)?;
    Ok(if pid == 0 {
        Forked::Child
    } else {
        Forked::Parent(Pid::from_raw(pid as i32))
    })
}

/// Names of the network interfaces this process can see (`if_nameindex(3)`).
pub fn interface_names() -> nix::Result<Vec<String>> {
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(Errno::last());
    }
    let mut names = Vec::new();
    let mut p = list;
    // SAFETY: walks the array up to its terminating entry, then frees it once.
    unsafe {
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            names.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    Ok(names)
}

/// Resets every catchable signal to its default action (the jailer's own dispositions,
/// and Rust's ignored SIGPIPE, would otherwise survive the exec).
pub fn reset_signal_dispositions() {
    for sig in Signal::iterator() {
        if sig == Signal::SIGKILL || sig == Signal::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL is always sound.
        unsafe {
            libc::signal(sig as libc::c_int, libc::SIG_DFL);
        }
    }
}

/// The descriptors in `range` that are open in this process.
pub fn open_descriptors(range: std::ops::Range<i32>) -> Vec<i32> {
    range
        // SAFETY: fcntl(F_GETFD) on a plain number only asks whether it is open.
        .filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } >= 0)
        .collect()
}

static EXIT_CODE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn exit_now(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe; the atomic load is lock-free.
    unsafe { libc::_exit(EXIT_CODE.load(std::sync::atomic::Ordering::Relaxed)) };
}

/// Makes `signal` end the process with status `code` (for `jail-probe`: a program that
/// handles SIGTERM, as PID 1 of its namespace must to receive it).
pub fn exit_on_signal(signal: Signal, code: i32) -> nix::Result<()> {
    EXIT_CODE.store(code, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: the handler only calls async-signal-safe functions.
    let previous = unsafe {
        libc::signal(
            signal as libc::c_int,
            exit_now as *const () as libc::sighandler_t,
        )
    };
    if previous == libc::SIG_ERR {
        return Err(Errno::last());
    }
    Ok(())
}

/// Ends the process at once (`_exit(2)`): for a forked child, which must not run the
/// parent's atexit handlers or flush its buffers.
pub fn exit_immediately(code: i32) -> ! {
    // SAFETY: _exit has no preconditions and does not return.
    unsafe { libc::_exit(code) }
}
