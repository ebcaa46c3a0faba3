//! Ends no device or vCPU reports: a panic, or a system call a thread's seccomp filter
//! forbids, on any of the vmm's threads. Either ends the whole process (a vmm must not run on
//! with half its threads), and the exit record says so.
//!
//! Most threads are confined (`crate::seccomp`): they cannot open files, so they cannot write
//! the record themselves. Such a thread hands its end to the main thread: it leaves what
//! happened in the slots below, wakes the main thread (an eventfd that
//! [`ExitSignal::wait`](super::ExitSignal::wait) watches beside the VM's own), and waits, at
//! most [`HAND_OFF_WAIT`], for the main thread to write the record and end the process. Its
//! own work stops there: it never returns to what it was doing. An end on the main thread is
//! written on the spot. A seccomp trap is handled inside its SIGSYS handler, so that path
//! makes async-signal-safe calls only, takes no lock and allocates nothing.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use vm_spec::api::ExitKind;
use vmm_sys_util::eventfd::EventFd;

use super::record::{self, SECCOMP_STATUS};

/// The vmm's status when one of its threads panicked (128 + SIGABRT, what a process aborted
/// by a panic reports).
pub const PANIC_STATUS: i32 = 128 + libc::SIGABRT;

/// How long a thread waits for the main thread to take its end before it ends the process
/// itself (without a record), unless the main thread is already ending the process for
/// another reason (then it waits for that).
pub const HAND_OFF_WAIT: Duration = Duration::from_secs(5);

const NONE: u8 = 0;
const PANIC: u8 = 1;
const SECCOMP: u8 = 2;

/// Which end was handed off (the first one wins).
static POSTED: AtomicU8 = AtomicU8::new(NONE);
/// Set once the slots of the posted end are filled.
static READY: AtomicBool = AtomicBool::new(false);
static PANIC_REASON: OnceLock<String> = OnceLock::new();
static SECCOMP_CALL: AtomicI64 = AtomicI64::new(0);
static SECCOMP_THREAD: [AtomicU8; 16] = [const { AtomicU8::new(0) }; 16];
/// The main thread's wake-up (an eventfd), once [`init`] ran.
static WAKE: OnceLock<EventFd> = OnceLock::new();
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// Set by the thread that ends the process.
static ENDING: AtomicBool = AtomicBool::new(false);
/// Set when the main thread took the VM's end (it ends the process soon, with that end's
/// record).
static MAIN_TOOK_END: AtomicBool = AtomicBool::new(false);
/// A socket file removed when the process ends this way (the control API's).
static SOCKET: OnceLock<CString> = OnceLock::new();

/// An end handed to the main thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fatal {
    /// A thread panicked; why, in words.
    Panic(String),
    /// A thread (its raw name) made a forbidden system call.
    Seccomp { thread: [u8; 16], syscall: i64 },
}

/// Makes the main thread reachable by other threads' ends. Call once from the main thread,
/// before other threads start. Without it, a thread ends the process itself.
pub fn init() -> std::io::Result<()> {
    let event = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
    WAKE_FD.store(event.as_raw_fd(), Ordering::SeqCst);
    let _ = WAKE.set(event);
    Ok(())
}

/// The descriptor that becomes readable when an end is handed off, once [`init`] ran.
pub fn wake_fd() -> Option<i32> {
    let fd = WAKE_FD.load(Ordering::SeqCst);
    (fd >= 0).then_some(fd)
}

/// Removes the socket at `path` when the process ends through this module.
pub fn remove_on_end(path: &Path) {
    if let Ok(path) = CString::new(path.as_os_str().as_bytes()) {
        let _ = SOCKET.set(path);
    }
}

/// Says that the main thread took the VM's end and is ending the process with its record: a
/// thread failing from now on waits for that instead of ending the process without one.
pub fn main_took_end() {
    MAIN_TOOK_END.store(true, Ordering::SeqCst);
}

/// The end handed to the main thread, if one was.
pub fn pending() -> Option<Fatal> {
    if !READY.load(Ordering::Acquire) {
        return None;
    }
    match POSTED.load(Ordering::Acquire) {
        PANIC => Some(Fatal::Panic(
            PANIC_REASON.get().cloned().unwrap_or_default(),
        )),
        SECCOMP => {
            let mut thread = [0u8; 16];
            for (byte, slot) in thread.iter_mut().zip(&SECCOMP_THREAD) {
                *byte = slot.load(Ordering::Relaxed);
            }
            Some(Fatal::Seccomp {
                thread,
                syscall: SECCOMP_CALL.load(Ordering::Relaxed),
            })
        }
        _ => None,
    }
}

/// Whether the calling thread is the process's main thread.
fn on_main_thread() -> bool {
    // SAFETY: plain system calls without arguments.
    unsafe { libc::syscall(libc::SYS_gettid) == libc::c_long::from(libc::getpid()) }
}

/// Whether an end must be handed to the main thread (rather than written here).
fn hand_off() -> bool {
    record::installed().is_some() && wake_fd().is_some() && !on_main_thread()
}

/// Wakes the main thread and waits for it to end the process; ends it with `status` if it
/// does not within [`HAND_OFF_WAIT`]. Async-signal-safe.
fn wake_and_wait(status: i32) -> ! {
    READY.store(true, Ordering::Release);
    let one: u64 = 1;
    // SAFETY: write(2) of a valid u64 to the eventfd.
    unsafe {
        libc::write(
            WAKE_FD.load(Ordering::SeqCst),
            (&one as *const u64).cast(),
            8,
        )
    };
    wait_then_exit(status)
}

fn wait_then_exit(status: i32) -> ! {
    let now = || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime fills the struct.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Duration::new(
            ts.tv_sec.max(0) as u64,
            ts.tv_nsec.clamp(0, 999_999_999) as u32,
        )
    };
    let deadline = now() + HAND_OFF_WAIT;
    while now() < deadline || MAIN_TOOK_END.load(Ordering::SeqCst) {
        let nap = libc::timespec {
            tv_sec: 0,
            tv_nsec: 10_000_000,
        };
        // SAFETY: nanosleep reads the struct; an interruption only shortens the nap.
        unsafe { libc::nanosleep(&nap, std::ptr::null_mut()) };
    }
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(status) }
}

/// Ends the process for a panic on the calling thread (`reason`: which thread, what and
/// where). Called by the panic hook, after the panic was reported on stderr.
pub fn panicked(reason: String) -> ! {
    if ENDING.load(Ordering::SeqCst) {
        wait_then_exit(PANIC_STATUS);
    }
    if !hand_off() {
        finish(Fatal::Panic(reason));
    }
    if POSTED
        .compare_exchange(NONE, PANIC, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        let _ = PANIC_REASON.set(reason);
        wake_and_wait(PANIC_STATUS);
    }
    // Another end was handed off first: the main thread is ending the process.
    wait_then_exit(PANIC_STATUS)
}

/// Ends the process for a forbidden system call `syscall` made by the calling thread, whose
/// raw name is `thread`. Called by the SIGSYS handler: async-signal-safe.
pub fn seccomp_violation(thread: &[u8; 16], syscall: i64) -> ! {
    if ENDING.load(Ordering::SeqCst) {
        wait_then_exit(SECCOMP_STATUS);
    }
    if !hand_off() {
        finish_seccomp(thread, syscall);
    }
    if POSTED
        .compare_exchange(NONE, SECCOMP, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        for (slot, &byte) in SECCOMP_THREAD.iter().zip(thread) {
            slot.store(byte, Ordering::Relaxed);
        }
        SECCOMP_CALL.store(syscall, Ordering::Relaxed);
        wake_and_wait(SECCOMP_STATUS);
    }
    wait_then_exit(SECCOMP_STATUS)
}

/// Writes the record of `fatal` and ends the process (on the main thread, or on a thread
/// that has nobody to hand off to).
pub fn finish(fatal: Fatal) -> ! {
    match fatal {
        Fatal::Panic(reason) => {
            if ENDING.swap(true, Ordering::SeqCst) {
                wait_then_exit(PANIC_STATUS);
            }
            if let Some(file) = record::installed() {
                let record = super::new_record(PANIC_STATUS, ExitKind::VmmError, reason);
                if let Err(e) = file.write(&record) {
                    eprintln!(
                        "vmm: error: cannot write the exit record {}: {e}",
                        file.path().display()
                    );
                }
            }
            end(PANIC_STATUS)
        }
        Fatal::Seccomp { thread, syscall } => finish_seccomp(&thread, syscall),
    }
}

/// [`finish`] for a seccomp trap, async-signal-safe.
fn finish_seccomp(thread: &[u8; 16], syscall: i64) -> ! {
    if ENDING.swap(true, Ordering::SeqCst) {
        wait_then_exit(SECCOMP_STATUS);
    }
    if let Some(file) = record::installed() {
        let rendered = record::render_seccomp_record(thread, syscall, record::now_unix_ms());
        if file.write_bytes(rendered.as_bytes()).is_err() {
            const MESSAGE: &[u8] = b"vmm: error: cannot write the exit record\n";
            // SAFETY: write(2) of a static buffer.
            unsafe { libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len()) };
        }
    }
    end(SECCOMP_STATUS)
}

/// Removes the control API's socket, gives the terminal back, ends the process.
/// Async-signal-safe.
fn end(status: i32) -> ! {
    if let Some(socket) = SOCKET.get() {
        // SAFETY: a NUL-terminated path.
        unsafe { libc::unlink(socket.as_ptr()) };
    }
    crate::stdin::restore_terminal();
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(status) }
}
