//! `node-agent init`: PID 1 of the node image, as zinit is for Zero-OS. Mounts the kernel's
//! filesystems and the state disk (formatted ext4 on first boot), then runs the agent daemon
//! and starts it again whenever it dies, reaping every orphan (vmm processes whose agent died
//! are re-parented here) in the meantime.
//!
//! Kernel command line: `gridnode.state=/dev/vda` (the state disk; without it the state lives
//! in RAM, for tests), `gridnode.args=...` (extra `run` arguments, comma separated).

use std::ffi::CString;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tracing::{error, info, warn};

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(target)?;
    let c = |s: &str| {
        CString::new(s).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (src, tgt, fst) = (c(source)?, c(target)?, c(fstype)?);
    let data = data.map(c).transpose()?;
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let ret = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fst.as_ptr(),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn mount_early() {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for (src, tgt, fs, flags, data) in [
        ("proc", "/proc", "proc", nosuid, None),
        ("sysfs", "/sys", "sysfs", nosuid, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            libc::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            None,
        ),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, None),
    ] {
        if let Err(e) = mount(src, tgt, fs, flags, data) {
            // EBUSY: already mounted (e.g. the kernel mounted devtmpfs).
            if e.raw_os_error() != Some(libc::EBUSY) {
                warn!("mount {tgt}: {e}");
            }
        }
    }
}

/// Mounts the state disk at `target`, formatting it (ext4) when it has no filesystem yet.
fn mount_state(device: &str, target: &str) -> anyhow::Result<()> {
    let flags = libc::MS_NOSUID | libc::MS_NODEV;
    if mount(device, target, "ext4", flags, None).is_ok() {
        return Ok(());
    }
    let probe = Command::new("blkid").arg(device).output();
    let has_fs = probe
        .map(|o| o.status.success() && !o.stdout.is_empty())
        .unwrap_or(false);
    if has_fs {
        anyhow::bail!(
            "state disk {device} has a filesystem that does not mount as ext4; not formatting it"
        );
    }
    info!("formatting the state disk {device} (first boot)");
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "gridnode-state", device])
        .status()?;
    if !status.success() {
        anyhow::bail!("mkfs.ext4 {device} failed: {status}");
    }
    mount(device, target, "ext4", flags, None)?;
    Ok(())
}

fn cmdline_param(cmdline: &str, name: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        .map(str::to_string)
}

/// Runs as PID 1; never returns.
pub fn run(state_dir: &Path) -> ! {
    mount_early();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let state = state_dir.to_string_lossy().into_owned();
    if let Some(dev) = cmdline_param(&cmdline, "gridnode.state") {
        if let Err(e) = mount_state(&dev, &state) {
            error!("state disk: {e:#}; keeping state in memory");
        }
    }
    let _ = std::fs::create_dir_all(&state);
    let extra: Vec<String> = cmdline_param(&cmdline, "gridnode.args")
        .map(|a| {
            a.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let exe = std::env::current_exe().unwrap_or_else(|_| "/sbin/node-agent".into());
    let mut backoff = Duration::from_secs(1);
    loop {
        info!("starting the agent");
        let started = std::time::Instant::now();
        let child = Command::new(&exe)
            .arg("run")
            .arg("--state-dir")
            .arg(&state)
            .args(&extra)
            .spawn();
        let agent_pid = match child {
            Ok(c) => c.id() as i32,
            Err(e) => {
                error!("cannot start the agent: {e}");
                std::thread::sleep(backoff);
                continue;
            }
        };
        // Reap everything; when the agent itself ends, start it again.
        loop {
            let mut status = 0;
            // SAFETY: blocking waitpid into a local.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid == agent_pid {
                warn!("the agent ended (wait status {status}); restarting it");
                break;
            }
            if pid < 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}
