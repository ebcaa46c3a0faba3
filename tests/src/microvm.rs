//! Booting a guest kernel directly under QEMU's `microvm` machine (no VMM of ours): checks
//! the guest kernel and guest-init on their own, and measures their boot.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::cpio::{Archive, Contents};
use crate::error::Result;
use crate::qemu;

/// What guest-init prints once it is up.
pub const BOOTED_LINE: &str = "init: booted";
/// What guest-init prints when the entrypoint ends, followed by the status.
pub const EXIT_LINE: &str = "init: entrypoint exited with status ";

/// The result of one micro-VM boot.
#[derive(Debug, Clone)]
pub struct MicrovmBoot {
    pub console: String,
    /// Wall time from starting QEMU to `init: booted` on the console.
    pub booted_after: Option<Duration>,
    /// The status guest-init reported for the entrypoint.
    pub exit_status: Option<u8>,
    pub elapsed: Duration,
}

/// An initramfs with `/init` = guest-init and busybox (with `/bin/sh`).
pub fn guest_initramfs(init: &Path, busybox: &Path) -> Result<Archive> {
    let mut a = Archive::new();
    for d in ["dev", "proc", "sys", "tmp", "run", "usr/bin", "sbin"] {
        a.dir(d, 0o755)?;
    }
    a.file("init", 0o755, Contents::HostFile(init.to_owned()))?;
    a.file("bin/busybox", 0o755, Contents::HostFile(busybox.to_owned()))?;
    a.symlink("bin/sh", "busybox")?;
    Ok(a)
}

/// The initramfs of a test whose guest runs guest-kernels/vsock-probe (`/bin/vsock-probe`
/// beside guest-init and busybox), written under the test's scratch directory. Returns the
/// initramfs and the probe (the test runs it on the host side too).
pub fn probe_initramfs(test: &str) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let init = crate::artifacts::guest_init()?;
    let probe = crate::artifacts::guest_program("vsock-probe")?;
    let scratch = crate::artifacts::scratch_dir(test)?;
    let initrd = scratch.join("initrd.cpio");
    let mut archive = guest_initramfs(&init, Path::new("/bin/busybox"))?;
    archive.file("bin/vsock-probe", 0o755, Contents::HostFile(probe.clone()))?;
    archive.write_file(&initrd)?;
    Ok((initrd, probe))
}

/// Boots `kernel` with `initrd` under `qemu-system-x86_64 -M microvm -accel tcg`.
pub fn boot(kernel: &Path, initrd: &Path, append: &str, timeout: Duration) -> Result<MicrovmBoot> {
    let mut cmd = Command::new(qemu::qemu_binary()?);
    cmd.args(["-M", "microvm", "-accel", "tcg", "-m", "256"])
        .args([
            "-no-reboot",
            "-nographic",
            "-nodefaults",
            "-serial",
            "mon:stdio",
        ])
        // microvm has no keyboard controller by default; `reboot=k` needs one to reset.
        .args(["-device", "i8042"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", append]);
    let run = qemu::run(cmd, timeout, &[BOOTED_LINE])?;
    Ok(MicrovmBoot {
        booted_after: run.seen_after(BOOTED_LINE),
        exit_status: exit_status(&run.console),
        console: run.console,
        elapsed: run.elapsed,
    })
}

fn exit_status(console: &str) -> Option<u8> {
    let at = console.find(EXIT_LINE)? + EXIT_LINE.len();
    let digits: String = console[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}
