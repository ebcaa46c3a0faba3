//! Helpers shared by the vmm's integration tests: the freestanding test guest (built once per
//! test binary) and the /dev/kvm check.

#![allow(dead_code)]

pub mod openapi;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn test_guests() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-guest");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-kernels/test-guest/build.sh");
        let status = Command::new("bash")
            .arg(&script)
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run the test-guest build script");
        assert!(status.success(), "building the test guest failed");
        out
    })
}

pub fn guest(variant: &str) -> PathBuf {
    test_guests().join(format!("test-guest-{variant}"))
}

/// The vmm under test: $VMM_BIN when set (e.g. the shipped static-pie build of
/// scripts/build-vmm.sh), else the one cargo built for these tests.
pub fn vmm_bin() -> PathBuf {
    std::env::var_os("VMM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_vmm")))
}

// Not every test binary checks for KVM in every profile (exit_record.rs's KVM tests are
// debug-only).
#[allow(unused_imports)]
pub use e2e_tests::kvm_available;
