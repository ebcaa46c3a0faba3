//! guest-init: PID 1 of Linux micro-VM guests.
//!
//! Owns the top-level flow only: set up the early environment, tell the VMM the guest has
//! booted, run the entrypoint given on the kernel command line (the words after ` -- `),
//! report its exit status to the VMM and end the VM. A graceful shutdown (Ctrl-Alt-Del from
//! the VMM) stops the entrypoint with SIGTERM, then SIGKILL after a grace period. Every path ends the VM: errors are
//! reported as statuses, never as panics (a dying PID 1 panics the kernel).

mod cmdline;
mod console;
mod entrypoint;
mod error;
mod mounts;
mod net;
mod netlink;
mod ports;
mod power;
mod rootfs;
mod shutdown;

use std::ffi::OsString;

/// Runs everything up to and including the entrypoint; returns the status to report.
fn run() -> u8 {
    mounts::mount_early_filesystems();
    console::attach_stdio();

    if let Err(e) = ports::enable() {
        console::log(&format!(
            "VMM status ports unavailable, going on without them: {e}"
        ));
    }
    ports::report_booted();
    console::log("booted");

    let boot = match cmdline::read() {
        Ok(boot) => boot,
        Err(e) => {
            console::log(&format!("cannot read /proc/cmdline: {e}"));
            return entrypoint::STATUS_SETUP_FAILED;
        }
    };
    let grace = boot.grace_secs.unwrap_or(shutdown::DEFAULT_GRACE_SECS);
    if let Err(e) = shutdown::arm(grace) {
        console::log(&format!(
            "graceful shutdown unavailable (Ctrl-Alt-Del will reset the VM): {e}"
        ));
    }
    if let Err(e) = rootfs::prepare(boot.root.as_deref()) {
        console::log(&format!("root filesystem setup failed: {e}"));
        return entrypoint::STATUS_SETUP_FAILED;
    }
    if let Err(e) = rootfs::mount_shares(&boot.mounts) {
        console::log(&format!("share mount failed: {e}"));
        return entrypoint::STATUS_SETUP_FAILED;
    }
    // The network, after the root is in place (resolv.conf goes there).
    let cmdline_text = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    match net::configure(&cmdline_text) {
        Ok(config) => {
            if !config.is_empty() {
                console::log(&format!(
                    "network: {} addresses, {} routes, {} resolvers on {}",
                    config.addresses.len(),
                    config.routes.len(),
                    config.dns.len(),
                    config.interfaces().join(", ")
                ));
            }
            net::write_resolv_conf(&config);
        }
        Err(e @ net::NetError::Socket(_)) if !cmdline_text.contains("gridnode.") => {
            console::log(&format!("lo not brought up: {e}"));
        }
        Err(e) => {
            console::log(&format!("network setup failed: {e}"));
            return entrypoint::STATUS_SETUP_FAILED;
        }
    }
    let mut env: Vec<(OsString, OsString)> =
        vec![("HOME".into(), "/".into()), ("TERM".into(), "linux".into())];
    for (key, value) in boot.env {
        env.retain(|(k, _)| *k != key);
        env.push((key, value));
    }
    match entrypoint::run(&boot.entrypoint, env) {
        Ok(status) => status,
        Err(e) => {
            console::log(&e.to_string());
            e.status()
        }
    }
}

fn main() {
    // A panic must not kill PID 1: catch it and still report a status and end the VM.
    let status = std::panic::catch_unwind(run).unwrap_or_else(|_| {
        console::log("internal error (panic); ending the VM");
        entrypoint::STATUS_SETUP_FAILED
    });
    console::log(&format!("entrypoint exited with status {status}"));
    ports::report_exit_status(status);
    power::end_vm(status);
}
