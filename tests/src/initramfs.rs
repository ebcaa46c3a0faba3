//! The test bed's initramfs: busybox with its applet links, the KVM modules, the job's
//! files (with shared libraries for programs), and an /init script that prepares a KVM
//! host, runs the job and reports its output between markers on the second serial port.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::cpio::{Archive, Contents};
use crate::error::{Error, Result};
use crate::host;
use crate::job::{Job, JobFile};
use crate::modules::{self, Module};

/// Builds the archive for `job`; `token` makes the output markers unambiguous.
pub(crate) fn build(busybox: &Path, modules: &[Module], job: &Job, token: &str) -> Result<Archive> {
    let mut a = Archive::new();
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run",
    ] {
        a.dir(d, 0o755)?;
    }
    a.dir("root", 0o700)?;
    a.dir("job", 0o755)?;
    add_busybox(&mut a, busybox)?;

    let mut insmods = String::new();
    for (i, m) in modules.iter().enumerate() {
        let guest = format!("testbed/modules/{i:02}-{}.ko", m.name);
        let bytes = modules::read_decompressed(&m.path)?;
        a.file(&guest, 0o644, Contents::Bytes(bytes))?;
        insmods.push_str(&format!(
            "insmod /{guest} || echo \"testbed: insmod {} failed\"\n",
            m.name
        ));
    }

    for f in &job.files {
        add_job_file(&mut a, f)?;
    }
    a.file(
        "job/script.sh",
        0o755,
        Contents::Bytes(job.script.clone().into_bytes()),
    )?;
    a.file(
        "init",
        0o755,
        Contents::Bytes(init_script(&insmods, token, watchdog_after(job.timeout)).into_bytes()),
    )?;
    Ok(a)
}

fn add_busybox(a: &mut Archive, busybox: &Path) -> Result<()> {
    a.file("bin/busybox", 0o755, Contents::HostFile(busybox.to_owned()))?;
    let list = host::run(std::process::Command::new(busybox).arg("--list-full"))?;
    for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if applet == "bin/busybox" || a.contains(applet) {
            continue;
        }
        a.symlink(applet, "/bin/busybox")?;
    }
    Ok(())
}

fn add_job_file(a: &mut Archive, f: &JobFile) -> Result<()> {
    match f {
        JobFile::Data { guest, bytes, mode } => {
            a.file(guest, *mode, Contents::Bytes(bytes.clone()))?;
        }
        JobFile::Host { guest, host } => {
            a.file(guest, host_mode(host)?, Contents::HostFile(host.clone()))?;
        }
        JobFile::Binary { guest, host } => {
            a.file(guest, host_mode(host)?, Contents::HostFile(host.clone()))?;
            for lib in host::shared_libraries(host)? {
                let path = lib.to_string_lossy().into_owned();
                if !a.contains(&path) {
                    a.file(&path, 0o755, Contents::HostFile(lib))?;
                }
            }
        }
    }
    Ok(())
}

fn host_mode(path: &Path) -> Result<u32> {
    let meta =
        std::fs::metadata(path).map_err(Error::io(format!("job file {}", path.display())))?;
    if !meta.is_file() {
        return Err(Error::BadFile {
            path: path.to_owned(),
            problem: "job files must be regular files".into(),
        });
    }
    Ok(meta.permissions().mode() & 0o7777)
}

/// Seconds after the job starts at which the bed's watchdog reports what the job is doing: a
/// little before the host side gives up on the job, so a hang leaves its trace on the console.
fn watchdog_after(timeout: std::time::Duration) -> u64 {
    let secs = timeout.as_secs();
    secs.saturating_sub((secs / 6).clamp(10, 30)).max(5)
}

/// The /init of the test bed (busybox sh, PID 1). Console: ttyS0; results: ttyS1 (raw).
///
/// A watchdog prints, `watchdog_secs` after the job starts, every process with the state,
/// wait channel and kernel stack of each of its threads, then the kernel log the console
/// level hides (soft lockups, hung tasks): what a job that never ends was stuck on.
fn init_script(insmods: &str, token: &str, watchdog_secs: u64) -> String {
    format!(
        r#"#!/bin/sh
# Test bed PID 1: prepare a KVM host, run /job/script.sh, report, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo 1 > /proc/sys/kernel/printk
{insmods}[ -c /dev/kvm ] || echo "testbed: /dev/kvm is missing"
stty -F /dev/ttyS1 raw -echo 2>/dev/null
: > /tmp/job.out
echo "{token}-START uptime=$(cut -d' ' -f1 /proc/uptime)"
tail -f /tmp/job.out &
tailpid=$!
( sleep {watchdog_secs}
  echo "{token}-WATCHDOG: the job is still running; its processes:"
  for p in /proc/[0-9]*; do
    [ -r $p/cmdline ] || continue
    args=$(tr '\0' ' ' < $p/cmdline 2>/dev/null)
    [ -n "$args" ] || continue
    echo "pid ${{p#/proc/}}: $args"
    for t in $p/task/*; do
      echo "  tid ${{t##*/}} $(cat $t/comm 2>/dev/null) state=$(cut -d' ' -f3 $t/stat 2>/dev/null) wchan=$(cat $t/wchan 2>/dev/null)"
      sed 's/^/    /' $t/stack 2>/dev/null | head -12
    done
  done
  echo "loadavg $(cat /proc/loadavg)"
  dmesg | tail -40
  echo "{token}-WATCHDOG end" ) &
watchdogpid=$!
cd /job
sh /job/script.sh > /tmp/job.out 2>&1 < /dev/null
status=$?
cd /
kill $tailpid $watchdogpid 2>/dev/null
{{ echo "{token}-BEGIN"; cat /tmp/job.out; printf '\n{token}-END %d\n' "$status"; }} > /dev/ttyS1
echo "{token}-DONE status=$status"
sync
poweroff -f
reboot -f
"#
    )
}
