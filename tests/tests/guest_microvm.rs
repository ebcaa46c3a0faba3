//! The guest kernel and guest-init on their own, under QEMU's microvm machine, and the
//! test guest's PVH entry (QEMU loads PVH ELF kernels too).

use std::time::Duration;

use e2e_tests::{artifacts, microvm, skip_if_missing, Error};

const APPEND: &str = "console=ttyS0 reboot=k panic=-1";
const TIMEOUT: Duration = Duration::from_secs(120);

/// Boots the guest kernel with guest-init as /init and `args` as the entrypoint.
fn boot_with_init(test: &str, args: &str) -> Result<Option<microvm::MicrovmBoot>, Error> {
    if skip_if_missing(test, e2e_tests::qemu::qemu_binary())?.is_none() {
        return Ok(None);
    }
    let Some(kernel) = skip_if_missing(test, artifacts::guest_kernel())? else {
        return Ok(None);
    };
    let init = artifacts::guest_init()?;
    let busybox = std::path::Path::new("/bin/busybox");
    if !busybox.is_file() {
        eprintln!("SKIP {test}: /bin/busybox missing (apt-get install busybox-static)");
        return Ok(None);
    }
    let dir = std::env::temp_dir().join(format!("e2e-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::Invalid(format!("{}: {e}", dir.display())))?;
    let initrd = dir.join("initramfs.cpio");
    microvm::guest_initramfs(&init, busybox)?.write_file(&initrd)?;
    let append = format!("{APPEND} {args}");
    let boot = microvm::boot(&kernel.bz_image, &initrd, &append, TIMEOUT);
    std::fs::remove_dir_all(&dir).ok();
    let boot = boot?;
    eprintln!(
        "{test}: 'init: booted' after {:?}, QEMU exited after {:?}",
        boot.booted_after, boot.elapsed
    );
    Ok(Some(boot))
}

#[test]
fn guest_init_runs_entrypoint_and_reports_status() -> Result<(), Error> {
    let test = "guest_init_runs_entrypoint_and_reports_status";
    let Some(boot) = boot_with_init(test, r#"-- /bin/busybox sh -c "echo hello; exit 3""#)? else {
        return Ok(());
    };
    let console = &boot.console;
    assert!(console.contains("init: booted"), "console:\n{console}");
    assert!(console.contains("hello"), "console:\n{console}");
    assert_eq!(boot.exit_status, Some(3), "console:\n{console}");
    Ok(())
}

#[test]
fn guest_init_reports_missing_entrypoint_as_127() -> Result<(), Error> {
    let test = "guest_init_reports_missing_entrypoint_as_127";
    let Some(boot) = boot_with_init(test, "-- no-such-program")? else {
        return Ok(());
    };
    assert_eq!(boot.exit_status, Some(127), "console:\n{}", boot.console);
    assert!(
        boot.console.contains("not found"),
        "console:\n{}",
        boot.console
    );
    Ok(())
}

#[test]
fn test_guest_pvh_entry_under_qemu() -> Result<(), Error> {
    let test = "test_guest_pvh_entry_under_qemu";
    if skip_if_missing(test, e2e_tests::qemu::qemu_binary())?.is_none() {
        return Ok(());
    }
    let guest = artifacts::test_guest("pvh")?;
    // The guest halts after reporting (QEMU has no status port), so QEMU runs until
    // the deadline: expect the timeout and check the console it carries.
    let mut cmd = std::process::Command::new(e2e_tests::qemu::qemu_binary()?);
    cmd.args([
        "-M",
        "microvm",
        "-accel",
        "tcg",
        "-nographic",
        "-nodefaults",
    ])
    .args(["-serial", "mon:stdio", "-no-reboot", "-kernel"])
    .arg(&guest)
    .args(["-append", "pvh-cmdline-check"]);
    let console = match e2e_tests::qemu::run(cmd, Duration::from_secs(5), &[]) {
        Ok(run) => run.console,
        Err(Error::Timeout { console, .. }) => console,
        Err(e) => return Err(e),
    };
    assert!(
        console.contains("test-guest: hello from PVH entry"),
        "console:\n{console}"
    );
    assert!(
        console.contains("cmdline: pvh-cmdline-check"),
        "console:\n{console}"
    );
    Ok(())
}
