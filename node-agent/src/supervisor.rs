//! vmm processes: starting one per VM in its own session (so the agent can die without taking
//! VMs with it), telling whether a recorded process is still that VM (pid + start time, so a
//! reused pid is not mistaken for it), finding a vmm whose start was not recorded, stopping one
//! gracefully, reading how it ended, and the restart policy with exponential backoff.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use vm_spec::api::{ExitKind, ExitRecord, VmInfo};

use crate::client::{Client, Endpoint};
use crate::deployment::RestartPolicy;
use crate::vmspec::VmPaths;

/// A process as the kernel knows it: pid and start time (clock ticks after boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proc {
    pub pid: i32,
    pub start: u64,
}

/// `/proc/PID/stat`'s state and start time.
fn stat(pid: i32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything: parse after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

impl Proc {
    pub fn of(pid: i32) -> Option<Self> {
        stat(pid).map(|(_, start)| Proc { pid, start })
    }

    /// Still the same process, and not a zombie.
    pub fn alive(&self) -> bool {
        matches!(stat(self.pid), Some((state, start)) if start == self.start && state != 'Z' && state != 'X')
    }
}

/// Reaps every exited child (the agent's vmm processes), so they do not linger as zombies.
pub fn reap_children() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG only reads the status into a local.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
    }
}

/// Starts the vmm for a VM whose spec is written at `paths.spec`.
pub fn spawn(vmm_bin: &Path, node_config: Option<&Path>, paths: &VmPaths) -> Result<Proc> {
    spawn_with_fds(vmm_bin, node_config, paths, Vec::new())
}

/// First fd number given to descriptors a vmm inherits (clear of stdio and of what the
/// standard library's spawn uses in the child).
pub const FIRST_INHERITED_FD: i32 = 100;

/// Like [`spawn`], the vmm inheriting `fds[i]` as fd `FIRST_INHERITED_FD + i` (the taps of
/// private networks, which live in namespaces the vmm is not in: its spec names them by fd).
pub fn spawn_with_fds(
    vmm_bin: &Path,
    node_config: Option<&Path>,
    paths: &VmPaths,
    fds: Vec<std::os::fd::OwnedFd>,
) -> Result<Proc> {
    crate::console::keep_previous_run(&paths.console)?;
    let log = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&paths.vmm_log)
        .with_context(|| format!("opening {}", paths.vmm_log.display()))?;
    let mut cmd = Command::new(vmm_bin);
    cmd.arg("--config").arg(&paths.spec);
    if let Some(nc) = node_config {
        cmd.arg("--node-config").arg(nc);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env(
            "VMM_LOG",
            std::env::var("VMM_LOG").unwrap_or_else(|_| "info".into()),
        );
    let raw: Vec<i32> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
    // SAFETY: setsid and dup2 are async-signal-safe; the child only calls them before exec.
    // dup2 leaves the new descriptor without close-on-exec, so the vmm inherits it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for (i, fd) in raw.iter().enumerate() {
                if libc::dup2(*fd, FIRST_INHERITED_FD + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", vmm_bin.display()))?;
    let pid = child.id() as i32;
    // The child is reaped by `reap_children`; dropping the handle neither waits nor kills.
    drop(child);
    // The vmm has its copies.
    drop(fds);
    Proc::of(pid)
        .with_context(|| format!("vmm {pid} ended at once; see {}", paths.vmm_log.display()))
}

/// A vmm running the spec at `spec`, found by its command line (for a start whose pid was not
/// recorded before the agent died).
pub fn find_by_spec(spec: &Path) -> Option<Proc> {
    let want = spec.as_os_str().as_encoded_bytes();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|&b| b == 0);
        let found = args.any(|a| a == b"--config") && args.next() == Some(want);
        if found {
            if let Some(p) = Proc::of(pid).filter(|p| p.alive()) {
                return Some(p);
            }
        }
    }
    None
}

pub fn read_exit(paths: &VmPaths) -> Option<ExitRecord> {
    let text = fs::read(&paths.exit_record).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Last lines of the vmm's own log, for errors.
pub fn vmm_log_tail(paths: &VmPaths) -> String {
    let text = fs::read(&paths.vmm_log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[text.len().saturating_sub(2048)..]).into_owned();
    text.lines()
        .rev()
        .take(5)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Why a VM ended, in words.
pub fn end_reason(paths: &VmPaths) -> String {
    match read_exit(paths) {
        Some(r) => format!("{} (status {})", r.reason, r.status),
        None => {
            let tail = vmm_log_tail(paths);
            if tail.is_empty() {
                "the vmm ended without an exit record".into()
            } else {
                format!("the vmm ended without an exit record: {tail}")
            }
        }
    }
}

/// The VM ended cleanly: its entrypoint exited with status 0.
pub fn clean_exit(exit: Option<&ExitRecord>) -> bool {
    matches!(exit, Some(r) if r.kind == ExitKind::GuestStatus && r.status == 0)
}

/// Whether a VM that ended is started again.
pub fn should_restart(policy: RestartPolicy, exit: Option<&ExitRecord>) -> bool {
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => !clean_exit(exit),
        RestartPolicy::Never => false,
    }
}

/// Seconds before restart number `restarts` (1, 2, 4, ... 300).
pub fn backoff_secs(restarts: u32) -> i64 {
    1i64 << restarts.min(8).min(62) as i64
}

pub const MAX_BACKOFF_SECS: i64 = 300;

/// Waits until the vmm answers on its API socket (it has built the VM), or ends.
pub async fn wait_started(paths: &VmPaths, proc_: Proc, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let client = Client::new(Endpoint::Unix(paths.api_sock.clone()));
    loop {
        if !proc_.alive() {
            return Err(end_reason(paths));
        }
        if paths.api_sock.exists() {
            if let Ok(resp) = client.request("GET", "/vm", None).await {
                if resp.ok() && resp.json::<VmInfo>().is_ok() {
                    return Ok(());
                }
            }
        }
        if Instant::now() >= deadline {
            // Alive but silent: treat as started; the supervisor watches it from here.
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops a VM: a graceful shutdown through its API, then SIGKILL after `grace`; returns
/// whether it had to be killed.
pub async fn stop(paths: &VmPaths, proc_: Proc, grace: Duration) -> bool {
    if !proc_.alive() {
        return false;
    }
    let client = Client::new(Endpoint::Unix(paths.api_sock.clone()));
    let body = br#"{"action":"shutdown"}"#.to_vec();
    let asked = client
        .request("PUT", "/vm/actions", Some(body))
        .await
        .map(|r| r.ok())
        .unwrap_or(false);
    if !asked {
        // SAFETY: plain signal to a process we checked is still the VM's vmm.
        unsafe { libc::kill(proc_.pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    while proc_.alive() && Instant::now() < deadline {
        reap_children();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let killed = proc_.alive();
    if killed {
        // SAFETY: as above.
        unsafe { libc::kill(proc_.pid, libc::SIGKILL) };
        for _ in 0..100 {
            reap_children();
            if !proc_.alive() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    reap_children();
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_known_by_pid_and_start_time() {
        let me = Proc::of(std::process::id() as i32).unwrap();
        assert!(me.alive());
        let wrong = Proc {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(!wrong.alive());
        let mut child = Command::new("true").spawn().unwrap();
        let p = Proc::of(child.id() as i32).unwrap();
        child.wait().unwrap();
        assert!(!p.alive());
    }

    #[test]
    fn a_zombie_is_not_alive() {
        let child = Command::new("true").spawn().unwrap();
        let p = Proc::of(child.id() as i32).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(!p.alive(), "exited, not reaped");
        drop(child);
        reap_children();
    }

    #[test]
    fn restart_policy() {
        let rec = |kind, status| ExitRecord {
            status,
            reason: String::new(),
            kind,
            at: String::new(),
            at_unix_ms: 0,
        };
        let clean = rec(ExitKind::GuestStatus, 0);
        let failed = rec(ExitKind::GuestStatus, 3);
        let panic = rec(ExitKind::GuestPanic, 3);
        assert!(!should_restart(RestartPolicy::OnFailure, Some(&clean)));
        assert!(should_restart(RestartPolicy::OnFailure, Some(&failed)));
        assert!(should_restart(RestartPolicy::OnFailure, Some(&panic)));
        assert!(should_restart(RestartPolicy::OnFailure, None));
        assert!(should_restart(RestartPolicy::Always, Some(&clean)));
        assert!(!should_restart(RestartPolicy::Never, Some(&failed)));
        assert_eq!(backoff_secs(0), 1);
        assert_eq!(backoff_secs(3), 8);
        assert!(backoff_secs(100) <= MAX_BACKOFF_SECS);
    }
}
