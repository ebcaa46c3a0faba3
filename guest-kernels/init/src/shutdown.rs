//! Graceful shutdown. The VMM presses Ctrl-Alt-Del on the guest's keyboard; with the kernel's
//! own Ctrl-Alt-Del reboot turned off (`reboot(RB_DISABLE_CAD)`), the kernel sends SIGINT to
//! init instead. A thread of init waits for it (SIGINT is blocked in every thread of init and
//! taken with `sigwait`; the entrypoint starts with an empty signal mask), then sends SIGTERM
//! to the entrypoint, waits the grace period, and sends SIGKILL to every process left. The
//! entrypoint's status (143 for a default SIGTERM, 137 for SIGKILL) is reported as usual.

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use crate::console;

/// Grace period when the command line gives none.
pub const DEFAULT_GRACE_SECS: u32 = 10;

/// The entrypoint's pid once started (0 before).
static ENTRYPOINT: AtomicI32 = AtomicI32::new(0);

pub fn set_entrypoint(pid: libc::pid_t) {
    ENTRYPOINT.store(pid, Ordering::SeqCst);
}

/// Turns Ctrl-Alt-Del into SIGINT for init and starts the thread that acts on it. Must run
/// before any other thread exists (the signal mask is inherited by threads).
pub fn arm(grace_secs: u32) -> std::io::Result<()> {
    // SAFETY: sigset operations on a local set; pthread_sigmask on the calling thread;
    // reboot with the CAD_OFF command only changes the kernel's Ctrl-Alt-Del behaviour.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        if libc::reboot(libc::RB_DISABLE_CAD) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        set
    };
    std::thread::Builder::new()
        .name("shutdown".into())
        .spawn(move || wait_and_stop(set, grace_secs))?;
    Ok(())
}

fn wait_and_stop(set: libc::sigset_t, grace_secs: u32) {
    loop {
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` is a valid, initialised signal set; `signal` a valid out-pointer.
        if unsafe { libc::sigwait(&set, &mut signal) } == 0 && signal == libc::SIGINT {
            break;
        }
    }
    let grace = Duration::from_secs(u64::from(grace_secs));
    let asked = Instant::now();
    console::log(&format!(
        "shutdown requested: SIGTERM to the entrypoint, SIGKILL to every process after {grace_secs} s"
    ));
    // The entrypoint may not have started yet: wait for it within the grace period.
    let mut pid = ENTRYPOINT.load(Ordering::SeqCst);
    while pid == 0 && asked.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(10));
        pid = ENTRYPOINT.load(Ordering::SeqCst);
    }
    if pid > 0 {
        // SAFETY: kill(2) with a pid of our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    std::thread::sleep(grace.saturating_sub(asked.elapsed()));
    console::log("grace period over: SIGKILL to every process");
    // Again every second, in case the entrypoint was only starting: init ends the VM as soon
    // as the entrypoint is gone.
    loop {
        // SAFETY: kill(-1) signals every process but init itself.
        unsafe { libc::kill(-1, libc::SIGKILL) };
        std::thread::sleep(Duration::from_secs(1));
    }
}
