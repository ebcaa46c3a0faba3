//! SIGTERM as a graceful shutdown: the handler only counts the signal on an eventfd (an
//! async-signal-safe write); the controller thread reads it and acts.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use vmm_sys_util::eventfd::EventFd;

static TERM_EVENTS: OnceLock<EventFd> = OnceLock::new();
static TERM_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_term(_signal: libc::c_int) {
    let fd = TERM_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a valid u64.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// Makes SIGTERM a request the controller thread handles. Call once, before other threads.
pub fn install() -> std::io::Result<()> {
    let events = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
    use std::os::fd::AsRawFd;
    TERM_FD.store(events.as_raw_fd(), Ordering::Relaxed);
    let _ = TERM_EVENTS.set(events);
    // SAFETY: a zeroed sigaction with a valid handler is well-formed.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_term as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The SIGTERM counter, once [`install`]ed.
pub fn term_events() -> Option<&'static EventFd> {
    TERM_EVENTS.get()
}
