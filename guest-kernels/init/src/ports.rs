//! The guest side of the VMM's status ports: 0x600 "booted" and 0x601 "exit status".
//!
//! Port access needs ioperm(2); when it fails (not running under our VMM, or no I/O port
//! permission) the writes are skipped, so init works under any hypervisor.

use std::sync::atomic::{AtomicBool, Ordering};

/// Any byte written here makes the VMM record "guest booted".
const PORT_BOOTED: u16 = 0x600;
/// A byte written here makes the VMM end the VM and exit with that status.
const PORT_EXIT_STATUS: u16 = 0x601;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Asks the kernel for access to both status ports.
pub fn enable() -> std::io::Result<()> {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(PORT_BOOTED.into(), 2, 1) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    ENABLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Tells the VMM the guest has booted (no-op without port access).
pub fn report_booted() {
    outb(PORT_BOOTED, 1);
}

/// Tells the VMM the exit status; under our VMM the VM ends during this write.
pub fn report_exit_status(status: u8) {
    outb(PORT_EXIT_STATUS, status);
}

fn outb(port: u16, value: u8) {
    if !ENABLED.load(Ordering::SeqCst) {
        return;
    }
    // SAFETY: ioperm granted access to this port, so the instruction cannot fault; it has
    // no memory effects.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") port, in("al") value,
            options(nomem, nostack, preserves_flags));
    }
}
