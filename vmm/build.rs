//! Link settings of the `vmm` binary that keep its resident memory small (issue 9: memory
//! overhead, RSS minus guest memory). Most of a vmm's RSS is its own code: the kernel maps
//! each touched page of the executable together with its 64 KiB neighbourhood (fault-around),
//! so code run once at start-up (argument parsing, spec checks, device setup) scattered over
//! a 5 MiB text segment makes most of it resident.
//!
//! - The binary stays position-independent (ASLR for the process a guest attacks). The
//!   shipped vmm is a static-pie build (scripts/build-vmm.sh: glibc linked in, no dynamic
//!   loader or shared libraries mapped); plain `cargo build` makes a dynamic PIE.
//! - `link/symbol-order.txt`: the functions a vmm runs (start-up, a vCPU, the serial console,
//!   every device's setup), laid out first and together (lld's `--symbol-ordering-file`).
//!   Names carry the toolchain's and crates' hashes, which differ between the static-pie build
//!   the list is made for (scripts/build-vmm.sh) and a plain `cargo build` (another target
//!   spelling: most of its names are not found there). Regenerate it with
//!   scripts/vmm-symbol-order.py after a toolchain or dependency update; a stale list only
//!   costs memory (names not found are skipped), never correctness.
//!   Only passed when the linker is the toolchain's lld (the default on x86_64 Linux since
//!   Rust 1.90); `VMM_NO_SYMBOL_ORDER=1` leaves it out.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link/symbol-order.txt");
    println!("cargo:rerun-if-env-changed=VMM_NO_SYMBOL_ORDER");
    // scripts/build-vmm.sh --profiling: seccomp filters left out (vmm::seccomp).
    println!("cargo::rustc-check-cfg=cfg(vmm_profiling)");
    if std::env::var_os("CARGO_CFG_VMM_PROFILING").is_some() {
        println!("cargo::warning=profiling build (--cfg vmm_profiling): no seccomp filters, never ship it");
    }
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") != "linux" {
        return;
    }
    if var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && default_lld()
        && std::env::var_os("VMM_NO_SYMBOL_ORDER").is_none()
    {
        let order = PathBuf::from(var("CARGO_MANIFEST_DIR")).join("link/symbol-order.txt");
        println!(
            "cargo:rustc-link-arg-bin=vmm=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bin=vmm=-Wl,--no-warn-symbol-ordering");
        // The shipped static-pie build relocates itself at start: its relative relocations
        // packed as RELR (glibc 2.36+, linked in) take a few KiB instead of ~280 KiB of
        // `.rela.dyn` that every vmm maps and reads once.
        if var("CARGO_CFG_TARGET_FEATURE")
            .split(',')
            .any(|feature| feature == "crt-static")
        {
            println!("cargo:rustc-link-arg-bin=vmm=-Wl,-z,pack-relative-relocs");
        }
    }
}

/// Whether the binary is linked with the toolchain's own lld: rustc 1.90 or later, and no
/// linker chosen in the configuration or the flags.
fn default_lld() -> bool {
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("linker") || flags.contains("fuse-ld") {
        return false;
    }
    if std::env::vars()
        .any(|(name, _)| name.starts_with("CARGO_TARGET_") && name.ends_with("_LINKER"))
        || std::env::var_os("RUSTC_LINKER").is_some()
    {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("--version").output() else {
        return false;
    };
    let version = String::from_utf8_lossy(&out.stdout);
    let minor = version
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse::<u32>().ok());
    minor.is_some_and(|m| m >= 90)
}
