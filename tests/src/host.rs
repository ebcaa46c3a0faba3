//! Host helpers: finding programs in PATH, running commands, and listing the shared
//! libraries a dynamically linked program needs (via `ldd`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// Whether this machine's /dev/kvm can be opened (tests that run a vmm locally need it). In
/// CI (`CI` set) a missing /dev/kvm is a failure, elsewhere the caller skips its test.
pub fn kvm_available() -> bool {
    if std::fs::File::open("/dev/kvm").is_ok() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "/dev/kvm is required for these tests in CI"
    );
    eprintln!("skipping: /dev/kvm is not available");
    false
}

/// Finds `name` in the host's PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Runs a command, returning its stdout; fails with its stderr on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(Error::io(format!("starting {shown}")))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The shared libraries (absolute paths, including the dynamic loader) that `binary`
/// needs; empty for static binaries.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(Error::io("running ldd (apt package libc-bin)"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // ldd exits non-zero for static binaries ("not a dynamic executable").
        let all = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        if all.contains("not a dynamic executable") || all.contains("statically linked") {
            return Ok(Vec::new());
        }
        return Err(Error::Command {
            command: format!("ldd {}", binary.display()),
            status: out.status.to_string(),
            stderr: all.trim().to_owned(),
        });
    }
    Ok(parse_ldd(&stdout))
}

/// Parses ldd lines such as `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; lines without a path (vdso) are skipped.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let after = line.split_once("=>").map_or(line, |(_, r)| r.trim());
            let path = after.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }
}
