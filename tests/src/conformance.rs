//! pjdfstest and fsx, the conformance tools the writable layer is tested with (in a guest on
//! the test bed, `tests/tests/vmm_linux.rs`, and through the host's FUSE, the vmm's
//! `layer::fuse_tests`): where they are, the pjdfstest failures a layer is known to have and
//! why, and the checks of what the tools print.

use std::path::PathBuf;

use crate::{Error, Result};

/// The cargo-installed tool the environment variable `var` names (PJDFSTEST_BIN, FSX_BIN).
pub fn tool(var: &str) -> Result<PathBuf> {
    std::env::var_os(var)
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .ok_or_else(|| Error::Missing {
            what: var.to_owned(),
            hint:
                "the cargo-installed binary; scripts/setup.sh installs it, scripts/test.sh sets it"
                    .into(),
        })
}

/// pjdfstest failures on a writable layer over an flist image, each with its reason. Every
/// other pjdfstest case must pass (or be skipped by pjdfstest itself).
pub const PJDFSTEST_KNOWN_FAILURES: &[(&str, &str)] = &[(
    "chmod::clear_isgid_bit",
    "setgid never reaches a host file (stripped on chmod), so there is no bit to clear",
)];

/// pjdfstest 0.2.2 runs 350 cases on a layer and all but the known failure pass (the guest's
/// device nodes are plain files on the host that the guest sees as devices; the kernel
/// answers ETXTBSY and EBUSY itself, given the `which`, `sleep` and `mount` those cases run);
/// fewer passing than this means it did not run, or the layer regressed.
pub const PJDFSTEST_MIN_PASSED: usize = 345;

/// What one pjdfstest run printed: the cases that passed, and each failed case with the line
/// pjdfstest printed after it (its message).
#[derive(Debug, Default)]
pub struct PjdfstestSummary {
    pub passed: usize,
    pub failed: Vec<(String, String)>,
}

/// Reads pjdfstest's output (`<case> ... ok` / `<case> ... FAILED`, the failure's message on
/// the next line).
pub fn pjdfstest_summary(output: &str) -> PjdfstestSummary {
    let mut summary = PjdfstestSummary::default();
    let mut lines = output.lines().peekable();
    while let Some(line) = lines.next() {
        let line = line.trim_end();
        let case = || {
            line.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        if line.ends_with(" ok") {
            summary.passed += 1;
        } else if line.ends_with(" FAILED") {
            let message = lines
                .peek()
                .map(|m| m.trim().to_owned())
                .unwrap_or_default();
            summary.failed.push((case(), message));
        }
    }
    summary
}

impl PjdfstestSummary {
    /// Fails on a failure without a known reason, or fewer cases passed than
    /// [`PJDFSTEST_MIN_PASSED`] (pjdfstest did not run, or stopped early).
    pub fn check(&self) -> std::result::Result<(), String> {
        let unexplained: Vec<&(String, String)> = self
            .failed
            .iter()
            .filter(|(case, _)| {
                !PJDFSTEST_KNOWN_FAILURES
                    .iter()
                    .any(|(k, _)| case.contains(k))
            })
            .collect();
        if !unexplained.is_empty() {
            return Err(format!(
                "pjdfstest failures without a known reason: {unexplained:?}"
            ));
        }
        if self.passed < PJDFSTEST_MIN_PASSED {
            return Err(format!(
                "pjdfstest passed {} cases, fewer than {PJDFSTEST_MIN_PASSED}: it did not run \
                 them all (failed: {:?})",
                self.passed, self.failed
            ));
        }
        Ok(())
    }

    /// The known failures that did not fail this time (to drop from the list).
    pub fn known_passing(&self) -> Vec<(&'static str, &'static str)> {
        PJDFSTEST_KNOWN_FAILURES
            .iter()
            .filter(|(k, _)| !self.failed.iter().any(|(case, _)| case.contains(k)))
            .copied()
            .collect()
    }
}

/// Whether an fsx run (its exit code, none if it did not run or was killed, and what it
/// printed) went clean to its end.
pub fn check_fsx(code: Option<i32>, output: &str) -> std::result::Result<(), String> {
    if code == Some(0) && output.contains("All operations completed A-OK!") {
        Ok(())
    } else {
        Err(format!("fsx failed (exit code {code:?}):\n{output}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pjdfstest_output_is_counted_and_failures_named() {
        let out = "chmod::a::b    ok\nchmod::clear_isgid_bit::x  FAILED\n  bit still set\n\
                   open::c   ok\nrename::d  FAILED\n";
        let s = pjdfstest_summary(out);
        assert_eq!(s.passed, 2);
        assert_eq!(
            s.failed,
            vec![
                (
                    "chmod::clear_isgid_bit::x".to_owned(),
                    "bit still set".to_owned()
                ),
                ("rename::d".to_owned(), String::new())
            ]
        );
        let err = s.check().unwrap_err();
        assert!(err.contains("rename::d"), "{err}");
        let known_only = PjdfstestSummary {
            passed: 1,
            failed: vec![("chmod::clear_isgid_bit".into(), String::new())],
        };
        assert!(known_only.check().unwrap_err().contains("fewer than"));
        assert!(known_only.known_passing().is_empty());
        assert_eq!(s.known_passing(), vec![]);
        let enough = PjdfstestSummary {
            passed: PJDFSTEST_MIN_PASSED,
            ..known_only
        };
        enough.check().unwrap();
    }

    #[test]
    fn fsx_is_clean_only_with_status_zero_and_its_last_line() {
        check_fsx(Some(0), "...\nAll operations completed A-OK!\n").unwrap();
        assert!(check_fsx(Some(1), "All operations completed A-OK!").is_err());
        assert!(check_fsx(None, "All operations completed A-OK!").is_err());
        assert!(check_fsx(Some(0), "").is_err());
    }
}
