//! A job for the test bed (a shell script plus the files and programs it needs) and what
//! comes back from running it.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default deadline for a whole test-bed run (boot, script, power-off).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(180);

/// A file to place in the test bed's initramfs.
#[derive(Debug, Clone)]
pub(crate) enum JobFile {
    /// Copied from the host with its permission bits.
    Host { guest: String, host: PathBuf },
    /// A host program plus the shared libraries `ldd` lists for it.
    Binary { guest: String, host: PathBuf },
    /// Given bytes with a mode.
    Data {
        guest: String,
        bytes: Vec<u8>,
        mode: u32,
    },
}

/// What to run inside the test bed: `script` is run by busybox `sh` in /job, with stdin
/// from /dev/null; its stdout and stderr are captured together.
#[derive(Debug, Clone)]
pub struct Job {
    pub(crate) script: String,
    pub(crate) files: Vec<JobFile>,
    pub(crate) timeout: Duration,
}

impl Job {
    pub fn new(script: impl Into<String>) -> Self {
        Self {
            script: script.into(),
            files: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Copies a host file to `guest_path` (absolute), keeping its permission bits.
    pub fn file(mut self, guest_path: &str, host_path: impl AsRef<Path>) -> Self {
        self.files.push(JobFile::Host {
            guest: guest_path.to_owned(),
            host: host_path.as_ref().to_owned(),
        });
        self
    }

    /// Copies a host program to `guest_path` together with the shared libraries it needs
    /// (placed at their host paths), so dynamically linked programs run.
    pub fn binary(mut self, guest_path: &str, host_path: impl AsRef<Path>) -> Self {
        self.files.push(JobFile::Binary {
            guest: guest_path.to_owned(),
            host: host_path.as_ref().to_owned(),
        });
        self
    }

    /// Places `bytes` at `guest_path` with the permission bits `mode`.
    pub fn data(mut self, guest_path: &str, bytes: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.files.push(JobFile::Data {
            guest: guest_path.to_owned(),
            bytes: bytes.into(),
            mode,
        });
        self
    }

    /// Sets the deadline for the whole run (QEMU is killed when it passes).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// The result of a test-bed run.
#[derive(Debug, Clone)]
pub struct JobOutput {
    /// The script's exit status.
    pub status: i32,
    /// Exactly what the script wrote to stdout and stderr.
    pub output: String,
    /// The whole serial console of the test bed, for debugging.
    pub console: String,
    /// Wall time from starting QEMU to the script starting.
    pub boot_time: Option<Duration>,
    /// The test bed kernel's uptime (seconds) when the script started.
    pub guest_uptime_at_start: Option<f64>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

/// Extracts `(output, status)` from a result block:
/// `<token>-BEGIN\n<output>\n<token>-END <status>\n`.
pub(crate) fn parse_result(text: &str, token: &str) -> Option<(String, i32)> {
    let begin = format!("{token}-BEGIN");
    let end = format!("\n{token}-END ");
    let start = text.find(&begin)? + begin.len();
    let rest = &text[start..];
    let (crlf, rest) = if let Some(r) = rest.strip_prefix("\r\n") {
        (true, r)
    } else {
        (false, rest.strip_prefix('\n')?)
    };
    let stop = rest.rfind(&end)?;
    let status_text = &rest[stop + end.len()..];
    let status = status_text.split_whitespace().next()?.parse::<i32>().ok()?;
    let mut output = &rest[..stop];
    if crlf {
        output = output.strip_suffix('\r').unwrap_or(output);
        return Some((output.replace("\r\n", "\n"), status));
    }
    Some((output.to_owned(), status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_blocks() {
        let t = "noise\nTOK-BEGIN\nhello\nworld\n\nTOK-END 3\n";
        assert_eq!(parse_result(t, "TOK"), Some(("hello\nworld\n".into(), 3)));
        let t = "TOK-BEGIN\r\nno newline\r\nTOK-END 0\r\n";
        assert_eq!(parse_result(t, "TOK"), Some(("no newline".into(), 0)));
        assert_eq!(parse_result("TOK-BEGIN\nx", "TOK"), None);
    }
}
