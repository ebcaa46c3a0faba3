//! Notices a guest crashing on its console, by the line its kernel prints before it restarts:
//! - Linux: `Kernel panic - not syncing: <why>` (with `panic=-1` a restart follows at once);
//! - Unikraft (its Firecracker platform): a critical message, `CRIT: <why>` (assertions,
//!   unhandled traps, `UK_CRASH`), or its boot giving up, `ERR: [libukboot] ... Init function
//!   at <addr> returned error <n>`; either way it then resets through the i8042, as it does
//!   after a clean halt.
//!
//! A guest without a pvpanic-like device (ours has no ACPI or PCI) otherwise ends with a
//! reset that looks like a clean exit.
//!
//! The console is the guest's to write, so a guest can fake these lines; it only changes how
//! its own end is reported (as the guest-report port's status does), and only when the VM
//! then resets without reporting a status.

use std::sync::{Arc, OnceLock};

/// Longest line kept for matching; the reason is cut there.
const MAX_LINE: usize = 256;
const LINUX_PANIC: &[u8] = b"Kernel panic - not syncing";
/// Unikraft's prefix of critical messages (lib/ukdebug), printed on the paths that crash.
const UNIKRAFT_CRIT: &[u8] = b"CRIT:";
/// Unikraft's prefix of errors, and the one libukboot prints when an init function fails
/// (the boot then ends as a crash).
const UNIKRAFT_ERR: &[u8] = b"ERR:";
const UNIKRAFT_BOOT_LIB: &[u8] = b"[libukboot]";
const UNIKRAFT_INIT_FAILED: &[u8] = b"Init function at ";
const UNIKRAFT_RETURNED_ERROR: &[u8] = b" returned error ";

#[derive(Debug, Default)]
pub struct PanicWatch {
    line: Vec<u8>,
    seen: Arc<OnceLock<String>>,
}

impl PanicWatch {
    /// The panic reason, once seen (shared with whoever reports the VM's end).
    pub fn seen(&self) -> Arc<OnceLock<String>> {
        self.seen.clone()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if byte == b'\n' {
                self.check_line();
                self.line.clear();
            } else if self.line.len() < MAX_LINE {
                self.line.push(byte);
            }
        }
    }

    fn check_line(&mut self) {
        if self.seen.get().is_some() {
            return;
        }
        let plain = without_escapes(&self.line);
        let mut line = plain.as_slice();
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        // A timestamp, printk's or Unikraft's: "[    1.234567] ".
        if line.first() == Some(&b'[') {
            if let Some(end) = line.iter().position(|&b| b == b']') {
                line = line[end + 1..].trim_ascii_start();
            }
        }
        if let Some(reason) = crash_reason(line) {
            let _ = self.seen.set(reason);
        }
    }
}

/// The crash a console line (timestamp removed) announces, if it is one of the known ones.
fn crash_reason(line: &[u8]) -> Option<String> {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes.trim_ascii()).into_owned();
    if let Some(rest) = line.strip_prefix(LINUX_PANIC) {
        return Some(text(rest.strip_prefix(b":").unwrap_or(rest)));
    }
    if let Some(rest) = line.strip_prefix(UNIKRAFT_CRIT) {
        return Some(format!("Unikraft crashed: {}", text(rest)));
    }
    let rest = line.strip_prefix(UNIKRAFT_ERR)?.trim_ascii_start();
    let contains = |needle: &[u8]| rest.windows(needle.len()).any(|w| w == needle);
    if rest.starts_with(UNIKRAFT_BOOT_LIB)
        && contains(UNIKRAFT_INIT_FAILED)
        && contains(UNIKRAFT_RETURNED_ERROR)
    {
        return Some(format!("Unikraft's boot failed: {}", text(rest)));
    }
    None
}

/// `line` without ANSI escape sequences (Unikraft colours its messages when configured to):
/// ESC, then `[` with parameters up to a final byte in 0x40..=0x7e, or one more byte.
fn without_escapes(line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len());
    let mut bytes = line.iter().copied();
    while let Some(byte) = bytes.next() {
        if byte != 0x1b {
            out.push(byte);
            continue;
        }
        if bytes.next() == Some(b'[') {
            for b in bytes.by_ref() {
                if (0x40..=0x7e).contains(&b) {
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_panic_line_is_kept_wherever_the_bytes_split() {
        let mut watch = PanicWatch::default();
        watch.feed(b"booting\r\nno panic here: Kernel panic - not syncing: fake\n");
        assert!(watch.seen().get().is_none(), "only at the start of a line");
        watch.feed(b"[    0.912345] Kernel panic - not sync");
        watch.feed(b"ing: Attempted to kill init! exitcode=0x00000100\r\n");
        assert_eq!(
            watch.seen().get().map(String::as_str),
            Some("Attempted to kill init! exitcode=0x00000100")
        );
        watch.feed(b"Kernel panic - not syncing: second\n");
        assert_eq!(
            watch.seen().get().map(String::as_str),
            Some("Attempted to kill init! exitcode=0x00000100")
        );
    }

    #[test]
    fn long_lines_are_cut_not_kept() {
        let mut watch = PanicWatch::default();
        watch.feed(&vec![b'x'; 100_000]);
        assert_eq!(watch.line.len(), MAX_LINE);
        watch.feed(b"\nKernel panic - not syncing: VFS: Unable to mount root fs\n");
        assert_eq!(
            watch.seen().get().map(String::as_str),
            Some("VFS: Unable to mount root fs")
        );
    }

    #[test]
    fn unikraft_crashes_are_seen() {
        let mut watch = PanicWatch::default();
        watch.feed(b"Hello world!\n[    0.1] ERR:  [libfoo] <x.c @ 1> an error, not a crash\n");
        assert!(watch.seen().get().is_none());
        watch.feed(b"[    0.167292] CRIT: [libkvmplat] <traps.c @   84> Unhandled Trap 6 (invalid opcode), error code=0x0\n");
        watch.feed(b"[    0.330397] CRIT: [libkvmplat] <traps.c @   90> Crashing\n");
        assert_eq!(
            watch.seen().get().map(String::as_str),
            Some("Unikraft crashed: [libkvmplat] <traps.c @   84> Unhandled Trap 6 (invalid opcode), error code=0x0")
        );

        let mut watch = PanicWatch::default();
        watch.feed(b"[    0.102360] ERR:  [libukrandom] <random.c @   65> Could not initialize the HWRNG (-95)\n");
        assert!(
            watch.seen().get().is_none(),
            "an error is not a crash by itself"
        );
        watch.feed(b"[    0.135252] ERR:  [libukboot] <boot.c @  385> Init function at 0x124710 returned error -95\n");
        assert_eq!(
            watch.seen().get().map(String::as_str),
            Some("Unikraft's boot failed: [libukboot] <boot.c @  385> Init function at 0x124710 returned error -95")
        );
    }

    #[test]
    fn coloured_unikraft_messages_are_seen() {
        let mut watch = PanicWatch::default();
        watch.feed(b"\x1b[0m\x1b[2m[    0.1] \x1b[0m\x1b[1m\x1b[37m\x1b[41mCRIT:\x1b[0m \x1b[0m\x1b[33m[libukboot] \x1b[31massertion failed\r\n");
        assert_eq!(
            watch.seen().get().map(String::as_str),
            Some("Unikraft crashed: [libukboot] assertion failed")
        );
        assert_eq!(without_escapes(b"a\x1b[1;31mb\x1bc\x1b"), b"ab");
    }
}
