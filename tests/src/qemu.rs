//! Running QEMU with a deadline: captures the serial console (QEMU's stdout) as it
//! streams, notes when given strings first appear (for boot timings), optionally echoes
//! console lines with a given prefix to stderr as they come (progress of long jobs), and
//! kills QEMU when the deadline passes.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::host;

/// The QEMU binary, or a `Missing` error naming the apt package.
pub fn qemu_binary() -> Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("QEMU_BIN") {
        return Ok(p.into());
    }
    host::which("qemu-system-x86_64").ok_or_else(|| Error::Missing {
        what: "qemu-system-x86_64".into(),
        hint: "apt-get install qemu-system-x86 (or set QEMU_BIN)".into(),
    })
}

/// What a finished QEMU run produced.
#[derive(Debug)]
pub struct QemuRun {
    /// Everything QEMU wrote to stdout (the serial console), lossily decoded.
    pub console: String,
    /// QEMU's stderr.
    pub stderr: String,
    pub status: ExitStatus,
    /// Wall time from spawning QEMU to its exit.
    pub elapsed: Duration,
    /// For each watched string: wall time from spawn to its first appearance, if seen.
    pub seen: Vec<(String, Option<Duration>)>,
}

impl QemuRun {
    /// Wall time until `needle` (one of the watched strings) first appeared.
    pub fn seen_after(&self, needle: &str) -> Option<Duration> {
        self.seen
            .iter()
            .find(|(n, _)| n == needle)
            .and_then(|(_, t)| *t)
    }
}

#[derive(Default)]
struct Capture {
    bytes: Vec<u8>,
    seen: Vec<(String, Option<Duration>)>,
}

/// Longest console line kept for the echo; longer ones are cut.
const ECHO_LINE_LIMIT: usize = 4096;

/// Runs `cmd` (a QEMU command line) until it exits or `timeout` passes.
pub fn run(cmd: Command, timeout: Duration, watch: &[&str]) -> Result<QemuRun> {
    run_echoing(cmd, timeout, watch, None)
}

/// As [`run`], and console lines containing `echo` are written to stderr as they arrive.
pub fn run_echoing(
    cmd: Command,
    timeout: Duration,
    watch: &[&str],
    echo: Option<&str>,
) -> Result<QemuRun> {
    run_watched(cmd, timeout, watch, echo, &|_| false)
}

/// How far back (bytes) each `give_up` check of [`run_watched`] looks before the new output.
const GIVE_UP_OVERLAP: usize = 512;

/// As [`run_echoing`]; QEMU is also stopped as soon as `give_up` holds for the console output
/// that came since its last check (about once a second, with the last 512
/// bytes before it, so a line is seen whole), which then ends like a timeout with
/// [`Error::NoResult`] carrying the console.
pub fn run_watched(
    mut cmd: Command,
    timeout: Duration,
    watch: &[&str],
    echo: Option<&str>,
    give_up: &dyn Fn(&str) -> bool,
) -> Result<QemuRun> {
    let shown = format!("{cmd:?}");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::io(format!("starting {shown}")))?;

    let capture = Arc::new(Mutex::new(Capture {
        bytes: Vec::new(),
        seen: watch.iter().map(|w| (w.to_string(), None)).collect(),
    }));
    let stdout_thread = child.stdout.take().map(|mut out| {
        let capture = Arc::clone(&capture);
        let echo = echo.map(str::to_owned);
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            let mut line = Vec::new();
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Some(prefix) = &echo {
                    echo_lines(&mut line, &buf[..n], prefix);
                }
                let Ok(mut c) = capture.lock() else { break };
                let from = c.bytes.len();
                c.bytes.extend_from_slice(&buf[..n]);
                note_seen(&mut c, from, start.elapsed());
            }
        })
    });
    let stderr_thread = child.stderr.take().map(|mut err| {
        thread::spawn(move || {
            let mut s = Vec::new();
            err.read_to_end(&mut s).ok();
            String::from_utf8_lossy(&s).into_owned()
        })
    });

    let mut gave_up = false;
    let mut last_check = Instant::now();
    // Console bytes already given to `give_up` (it sees what came since, with a margin for a
    // line cut in two).
    let mut checked = 0usize;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() >= timeout => {
                child.kill().ok();
                child.wait().ok();
                break None;
            }
            Ok(None) if last_check.elapsed() >= Duration::from_secs(1) => {
                last_check = Instant::now();
                let recent = capture
                    .lock()
                    .map(|c| {
                        let from = checked.saturating_sub(GIVE_UP_OVERLAP).min(c.bytes.len());
                        checked = c.bytes.len();
                        String::from_utf8_lossy(&c.bytes[from..]).into_owned()
                    })
                    .unwrap_or_default();
                if give_up(&recent) {
                    gave_up = true;
                    child.kill().ok();
                    child.wait().ok();
                    break None;
                }
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(Error::io(format!("waiting for {shown}"))(e)),
        }
    };
    let elapsed = start.elapsed();
    if let Some(t) = stdout_thread {
        t.join().ok();
    }
    let stderr = stderr_thread
        .and_then(|t| t.join().ok())
        .unwrap_or_default();
    let (bytes, seen) = match Arc::try_unwrap(capture).map(Mutex::into_inner) {
        Ok(Ok(c)) => (c.bytes, c.seen),
        _ => (Vec::new(), Vec::new()),
    };
    let console = String::from_utf8_lossy(&bytes).into_owned();
    match status {
        Some(status) => Ok(QemuRun {
            console,
            stderr,
            status,
            elapsed,
            seen,
        }),
        None if gave_up => Err(Error::NoResult {
            console: format!("{console}\n[qemu stderr]\n{stderr}"),
        }),
        None => Err(Error::Timeout {
            timeout,
            console: format!("{console}\n[qemu stderr]\n{stderr}"),
        }),
    }
}

/// Adds `bytes` to the partial `line`; every complete line containing `prefix` goes to stderr.
fn echo_lines(line: &mut Vec<u8>, bytes: &[u8], prefix: &str) {
    for &byte in bytes {
        if byte == b'\n' {
            let text = String::from_utf8_lossy(line);
            if text.contains(prefix) {
                eprintln!("{}", text.trim_end());
            }
            line.clear();
        } else if line.len() < ECHO_LINE_LIMIT {
            line.push(byte);
        }
    }
}

/// Records the first appearance of watched strings in the bytes appended at `from`.
fn note_seen(c: &mut Capture, from: usize, now: Duration) {
    let Capture { bytes, seen } = c;
    for (needle, at) in seen.iter_mut().filter(|(_, at)| at.is_none()) {
        let start = from.saturating_sub(needle.len());
        if bytes[start..]
            .windows(needle.len().max(1))
            .any(|w| w == needle.as_bytes())
        {
            *at = Some(now);
        }
    }
}
