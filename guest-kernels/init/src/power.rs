//! Ending the VM after the status has been reported: sync, then reboot (with the
//! kernel's `reboot=k` this resets the CPU through the i8042, which ends the VM under our
//! VMM and under QEMU with -no-reboot). Never returns.

use crate::console;

pub fn end_vm(status: u8) -> ! {
    // SAFETY: sync and reboot take no pointers.
    unsafe { libc::sync() };
    for (cmd, name) in [
        (libc::RB_AUTOBOOT, "reboot"),
        (libc::RB_POWER_OFF, "power off"),
        (libc::RB_HALT_SYSTEM, "halt"),
    ] {
        // SAFETY: see above.
        if unsafe { libc::reboot(cmd) } < 0 {
            console::log(&format!(
                "{name} failed: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    // Last resort: PID 1 exiting panics the kernel, and `panic=-1` reboots at once.
    console::log("could not end the VM; exiting PID 1");
    std::process::exit(i32::from(status))
}
