//! End-to-end test support: the QEMU-based test bed (a real KVM host inside QEMU TCG with
//! nested SVM), a QEMU micro-VM runner for guest kernels, a newc cpio writer for
//! initramfs images, and locating or building the guest artifacts (kernel, init, test
//! guests, the vmm binary).

pub mod agent_bed;
pub mod artifacts;
pub mod conformance;
pub mod cpio;
pub mod error;
pub mod microvm;
pub mod node;
pub mod qemu;
pub mod testbed;

mod host;
mod initramfs;
mod job;
mod modules;

pub use error::{Error, Result};
/// The shared libraries `ldd` lists for a program (to bind them into a jail).
pub use host::{kvm_available, shared_libraries};
pub use testbed::{Job, JobOutput, Testbed};

/// Turns a missing host prerequisite into a skip: prints the reason and gives `None`.
/// Every other error is passed on (and fails the test). When the `CI` environment
/// variable is set (CI installs everything), a missing prerequisite is an error too, so
/// CI can never pass by skipping.
pub fn skip_if_missing<T>(test: &str, result: Result<T>) -> Result<Option<T>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_missing() && std::env::var_os("CI").is_none() => {
            eprintln!("SKIP {test}: {e}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The last `n` lines of `text` (all of them when it has fewer): what a failure message shows
/// of a long output, so that a log cut in its middle still holds the end.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
