//! Running the entrypoint: resolve it in PATH, start it with the kernel-given environment,
//! and, as PID 1, reap every child until the entrypoint itself exits.
//!
//! Environment: HOME=/ and TERM=linux, then the `gridinit.env=` variables of the command line
//! (see `cmdline`), with PATH added when absent.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::InitError;

/// PATH given to the entrypoint when the kernel command line sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Status reported when init itself failed before or around the entrypoint.
pub const STATUS_SETUP_FAILED: u8 = 125;

/// Starts `args[0]` with `args[1..]` and returns its status: the exit code, or
/// 128 + signal number if it was killed.
pub fn run(args: &[OsString], mut env: Vec<(OsString, OsString)>) -> Result<u8, InitError> {
    let Some((program, rest)) = args.split_first() else {
        return Err(InitError::NoEntrypoint);
    };
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    let search_path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or_else(|| OsString::from(DEFAULT_PATH), |(_, v)| v.clone());
    let path = resolve(program, &search_path)?;

    let child = Command::new(&path)
        .arg0(program)
        .args(rest)
        .env_clear()
        .envs(env)
        .spawn()
        .map_err(|source| InitError::Exec {
            path: path.clone(),
            source,
        })?;
    let pid = libc::pid_t::try_from(child.id())
        .map_err(|_| InitError::Setup(format!("child pid {} out of range", child.id())))?;
    crate::shutdown::set_entrypoint(pid);
    reap_until(pid)
}

/// Finds the program: as given if it contains a slash, else in the PATH directories.
fn resolve(program: &OsStr, search_path: &OsStr) -> Result<PathBuf, InitError> {
    if program.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    for dir in search_path.as_bytes().split(|&b| b == b':') {
        let dir = if dir.is_empty() { b"." as &[u8] } else { dir };
        let candidate = Path::new(OsStr::from_bytes(dir)).join(program);
        if is_executable_file(&candidate) {
            return Ok(candidate);
        }
    }
    Err(InitError::NotInPath {
        name: program.to_string_lossy().into_owned(),
        path: search_path.to_string_lossy().into_owned(),
    })
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Waits for any child (orphans are re-parented to PID 1) until `entrypoint` exits.
fn reap_until(entrypoint: libc::pid_t) -> Result<u8, InitError> {
    loop {
        let mut wstatus: libc::c_int = 0;
        // SAFETY: wstatus is a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut wstatus, 0) };
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(InitError::Wait(e));
        }
        if pid == entrypoint {
            return Ok(status_of(wstatus));
        }
    }
}

/// Shell-style status of a waitpid result.
fn status_of(wstatus: libc::c_int) -> u8 {
    let code = if libc::WIFEXITED(wstatus) {
        libc::WEXITSTATUS(wstatus)
    } else if libc::WIFSIGNALED(wstatus) {
        128 + libc::WTERMSIG(wstatus)
    } else {
        i32::from(STATUS_SETUP_FAILED)
    };
    u8::try_from(code & 0xff).unwrap_or(STATUS_SETUP_FAILED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_in_path_and_reports_missing() {
        let found = resolve(OsStr::new("sh"), OsStr::new("/nonexistent:/bin"));
        assert_eq!(found.ok(), Some(PathBuf::from("/bin/sh")));
        let missing = resolve(OsStr::new("no-such-program-x"), OsStr::new("/bin"));
        assert_eq!(missing.err().map(|e| e.status()), Some(127));
    }

    #[test]
    fn slash_paths_are_taken_as_is() {
        let p = resolve(OsStr::new("./x"), OsStr::new("/bin"));
        assert_eq!(p.ok(), Some(PathBuf::from("./x")));
    }

    #[test]
    fn runs_and_reports_exit_code() {
        let args = vec![OsString::from("sh"), "-c".into(), "exit 7".into()];
        assert_eq!(run(&args, vec![]).ok(), Some(7));
    }

    #[test]
    fn exec_failure_is_126() {
        // A directory is found (slash path) but cannot be executed.
        let args = vec![OsString::from("/")];
        assert_eq!(run(&args, vec![]).err().map(|e| e.status()), Some(126));
    }
}
