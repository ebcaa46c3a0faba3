//! Notices a Linux guest's kernel panic on its console: the line the kernel prints before it
//! restarts (`Kernel panic - not syncing: <why>`, with `panic=-1` a restart follows at once).
//! A guest without a pvpanic-like device (ours has no ACPI or PCI) otherwise ends with a
//! reset that looks like a clean exit.
//!
//! The console is the guest's to write, so a guest can fake this line; it only changes how
//! its own end is reported (as the guest-report port's status does), and only when the VM
//! then resets without reporting a status.

use std::sync::{Arc, OnceLock};

/// Longest line kept for matching; the panic reason is cut there.
const MAX_LINE: usize = 256;
const PANIC_PREFIX: &[u8] = b"Kernel panic - not syncing";

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
        let mut line = self.line.as_slice();
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        // A printk timestamp: "[    1.234567] ".
        if line.first() == Some(&b'[') {
            if let Some(end) = line.iter().position(|&b| b == b']') {
                line = line[end + 1..].trim_ascii_start();
            }
        }
        if let Some(rest) = line.strip_prefix(PANIC_PREFIX) {
            let reason = rest.strip_prefix(b":").unwrap_or(rest).trim_ascii();
            let _ = self.seen.set(String::from_utf8_lossy(reason).into_owned());
        }
    }
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
}
