//! The exit record of every way the vmm binary ends that no guest or operator causes: a
//! command line or spec that fails its checks (an earlier run's record must not stay), a
//! panic on any thread (most are confined by seccomp and cannot open files), and a system
//! call a thread's seccomp filter forbids. Panics and traps are forced with the debug build's
//! `VMM_TEST_FAULT` (vmm/src/test_fault.rs) on the freestanding test guest.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::vmm_bin;
use vm_spec::api::{ExitKind, ExitRecord};

fn read_record(path: &Path) -> ExitRecord {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("no record at {path:?}: {e}"));
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not a record ({e}): {}", String::from_utf8_lossy(&bytes)))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_command_line_or_spec_that_fails_its_checks_replaces_the_earlier_record() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("exit.json");
    let record_arg = record.to_str().unwrap();
    let spec = dir.path().join("spec.json");
    let spec_arg = spec.to_str().unwrap();
    let flag = format!("--exit-record={record_arg}");
    let spec_with =
        |extra: &str| format!(r#"{{"kernel": "/k", "exit_record": {record_arg:?}{extra}}}"#);
    // (spec file, arguments, what the record's reason must name)
    let cases: &[(Option<String>, Vec<&str>, &str)] = &[
        (
            None,
            vec![
                "--kernel",
                "/k",
                "--exit-record",
                record_arg,
                "--vcpus",
                "abc",
            ],
            "invalid value 'abc' for '--vcpus <VCPUS>'",
        ),
        (
            None,
            vec![&flag, "--kernel", "/k", "--bogus"],
            "unexpected argument '--bogus'",
        ),
        (
            None,
            vec![
                "--kernel",
                "/k",
                "--exit-record",
                record_arg,
                "--vcpus",
                "0",
            ],
            "vcpus",
        ),
        (
            None,
            vec![
                "--kernel",
                "/k",
                "--exit-record",
                record_arg,
                "--serial",
                "tty",
            ],
            "--serial must be stdout, off or file:PATH",
        ),
        (
            Some(spec_with(r#", "vcpu": 2"#)),
            vec!["--config", spec_arg],
            "unknown field `vcpu`",
        ),
        (
            Some(spec_with(r#", "memory_mib": 0"#)),
            vec!["-c", spec_arg],
            "memory",
        ),
        (
            // The command line fails, the path comes from the spec.
            Some(spec_with("")),
            vec!["-c", spec_arg, "--frobnicate"],
            "unexpected argument '--frobnicate'",
        ),
    ];
    for (spec_text, args, named) in cases {
        if let Some(text) = spec_text {
            std::fs::write(&spec, text).unwrap();
        }
        std::fs::write(&record, b"{\"stale\": true}").unwrap();
        let out = Command::new(vmm_bin()).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let got = read_record(&record);
        assert_eq!(
            (got.status, got.kind),
            (2, ExitKind::StartFailed),
            "{args:?}: {got:?}"
        );
        assert!(
            got.reason.starts_with("the VM could not be started: ") && got.reason.contains(named),
            "{args:?}: {}",
            got.reason
        );
        assert!(stderr(&out).contains(named), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        2,
        "only the spec and the record"
    );

    // A record whose directory does not exist: said at once, nothing else tried.
    let out = Command::new(vmm_bin())
        .args([
            "--kernel",
            "/k",
            "--exit-record",
            "/nonexistent/dir/exit.json",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no exit record can be written at /nonexistent/dir/exit.json"),
        "{}",
        stderr(&out)
    );
    // --help and --print-spec are no runs: an earlier record stays.
    std::fs::write(&record, b"kept").unwrap();
    for args in [
        vec!["--help", "--exit-record", record_arg],
        vec![
            "--kernel",
            "/k",
            "--exit-record",
            record_arg,
            "--print-spec",
        ],
    ] {
        let out = Command::new(vmm_bin()).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert_eq!(std::fs::read(&record).unwrap(), b"kept", "{args:?}");
    }
}

/// Test faults exist in debug builds only (the vmm and its tests share a profile).
#[cfg(debug_assertions)]
mod faults {
    use super::*;
    use common::guest;
    use std::os::unix::process::ExitStatusExt;

    /// Runs the chatter guest (it runs until stopped) with its control API, a console log
    /// and `VMM_TEST_FAULT=fault`; returns how the vmm ended and its record.
    fn run_with_fault(fault: &str) -> (Output, Option<ExitRecord>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("exit.json");
        std::fs::write(&record, b"stale").unwrap();
        // Always the vmm cargo built with these tests: a shipped build has no test faults.
        let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["--kernel", guest("chatter").to_str().unwrap()])
            .args(["--memory", "32", "--vcpus", "2"])
            .arg("--serial")
            .arg(format!("file:{}", dir.path().join("console.log").display()))
            .arg("--api-sock")
            .arg(dir.path().join("api.sock"))
            .arg("--exit-record")
            .arg(&record)
            .env("VMM_TEST_FAULT", fault)
            .output()
            .unwrap();
        let record = std::fs::read(&record)
            .ok()
            .map(|bytes| serde_json::from_slice(&bytes).unwrap());
        (out, record, dir)
    }

    #[test]
    fn a_panic_on_any_thread_ends_the_vmm_with_its_record() {
        if !common::kvm_available() {
            return;
        }
        // vcpu0 panics before the main thread waits for the VM's end, the others while it
        // waits; vcpu1, vmm-ctl (the controller) and serial-out cannot open files or send
        // signals; main writes its own record.
        for fault in [
            "panic@vcpu0",
            "panic@vcpu1+300",
            "panic@vmm-ctl+300",
            "panic@serial-out+300",
            "panic@main",
        ] {
            let thread = fault[6..].split('+').next().unwrap();
            let (out, record, dir) = run_with_fault(fault);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(134), "{fault}: {err}");
            let record = record.unwrap_or_else(|| panic!("{fault}: no record; {err}"));
            assert_eq!(
                (record.status, record.kind),
                (134, ExitKind::VmmError),
                "{fault}"
            );
            assert!(
                record.reason.starts_with(&format!(
                    "internal error (panic) on thread \"{thread}\": test fault on thread {thread} at "
                )),
                "{fault}: {}",
                record.reason
            );
            assert!(
                err.contains(&format!("internal error (panic) on thread \"{thread}\"")),
                "{fault}: {err}"
            );
            assert!(
                !dir.path().join("api.sock").exists(),
                "{fault}: socket left"
            );
            assert_eq!(
                std::fs::read_dir(dir.path()).unwrap().count(),
                2,
                "{fault}: only the console log and the record"
            );
        }
    }

    #[test]
    fn a_forbidden_system_call_ends_the_vmm_at_once_with_its_record() {
        if !common::kvm_available() {
            return;
        }
        for fault in [
            "sigsys@vcpu0",
            "sigsys@vcpu1+300",
            "sigsys@vmm-ctl+300",
            "sigsys@main",
        ] {
            let thread = fault[7..].split('+').next().unwrap();
            // The main thread's name, as the kernel knows it, is the program's.
            let shown = if thread == "main" { "vmm" } else { thread };
            let (out, record, dir) = run_with_fault(fault);
            let err = stderr(&out);
            assert_eq!(
                (out.status.code(), out.status.signal()),
                (Some(159), None),
                "{fault}: {err}"
            );
            let why = format!(
                "seccomp: thread {shown} made forbidden system call {}",
                libc::SYS_bpf
            );
            assert!(err.contains(&why), "{fault}: {err}");
            let record = record.unwrap_or_else(|| panic!("{fault}: no record; {err}"));
            assert_eq!(
                (record.status, record.kind),
                (159, ExitKind::VmmError),
                "{fault}"
            );
            assert_eq!(
                record.reason,
                format!("{why}; the vmm ended at once"),
                "{fault}"
            );
            assert!(record.at.ends_with('Z') && record.at_unix_ms > 0);
            assert!(
                !dir.path().join("api.sock").exists(),
                "{fault}: socket left"
            );
        }
    }
}
