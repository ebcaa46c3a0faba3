//! The vmm binary against the freestanding test guest on this machine's own /dev/kvm: the
//! 64-bit and PVH entries, serial output (stdout, files, capped logs), the guest-report ports,
//! reboot and triple fault, and every kind of bad input. Each boot takes milliseconds.

mod common;
use common::{guest, kvm_available, vmm_bin};
use std::process::{Command, Output};

fn vmm(args: &[&str]) -> Output {
    Command::new(vmm_bin())
        .args(args)
        .output()
        .expect("run vmm")
}

fn boot(variant: &str, extra: &[&str]) -> Output {
    let kernel = guest(variant);
    let mut args = vec!["--kernel", kernel.to_str().unwrap(), "--memory", "32"];
    args.extend_from_slice(extra);
    vmm(&args)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn long_mode_entry_prints_cmdline_and_exits_with_status() {
    if !kvm_available() {
        return;
    }
    let out = boot("exit42", &["--cmdline", "marker=abc123"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(42), "stderr: {}", text(&out.stderr));
    assert!(
        stdout.contains("test-guest: hello from 64-bit entry"),
        "{stdout}"
    );
    assert!(stdout.contains("marker=abc123"), "{stdout}");
    assert!(
        text(&out.stderr).contains("guest booted in"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn clean_exit_is_zero() {
    if !kvm_available() {
        return;
    }
    let out = boot("exit0", &[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

#[test]
fn pvh_entry_is_used_when_the_note_is_present() {
    if !kvm_available() {
        return;
    }
    let out = boot("pvh", &["--cmdline", "via=pvh"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(80), "stderr: {}", text(&out.stderr));
    assert!(stdout.contains("hello from PVH entry"), "{stdout}");
    assert!(stdout.contains("via=pvh"), "{stdout}");
}

#[test]
fn boot_protocol_can_be_forced() {
    if !kvm_available() {
        return;
    }
    // The PVH variant also has a 64-bit Linux entry: forcing it skips the PVH note.
    let out = boot("pvh", &["--boot-protocol", "linux"]);
    assert!(
        text(&out.stdout).contains("hello from 64-bit entry"),
        "{}",
        text(&out.stdout)
    );
    assert_rejected(
        &[
            "--kernel",
            guest("exit0").to_str().unwrap(),
            "--boot-protocol",
            "pvh",
        ],
        "has no PVH entry note",
    );
}

#[test]
fn guest_reset_ends_the_vm_cleanly() {
    if !kvm_available() {
        return;
    }
    let out = boot("reboot", &[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

#[test]
fn triple_fault_is_reported_with_registers() {
    if !kvm_available() {
        return;
    }
    let out = boot("triplefault", &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("triple fault"), "{stderr}");
    assert!(
        stderr.contains("rip=") && stderr.contains("cr3="),
        "{stderr}"
    );
}

#[test]
fn several_vcpus_start() {
    if !kvm_available() {
        return;
    }
    let out = boot("exit42", &["--vcpus", "4"]);
    assert_eq!(out.status.code(), Some(42), "stderr: {}", text(&out.stderr));
}

#[test]
fn serial_to_a_file_and_off() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let arg = format!("file:{}", log.display());
    let out = boot("exit0", &["--serial", &arg]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).is_empty());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("hello from 64-bit entry"), "{logged}");

    let out = boot("exit0", &["--serial", "off"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).is_empty());
}

#[test]
fn serial_log_is_capped_rotated_and_private() {
    use std::os::unix::fs::PermissionsExt;
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let spec = dir.path().join("vm.json");
    let json = serde_json::json!({
        "kernel": guest("exit0"),
        "memory_mib": 32,
        "serial": {"log": log, "max_bytes": 16},
    });
    std::fs::write(&spec, json.to_string()).unwrap();
    let out = vmm(&["--config", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).is_empty());
    let rotated = dir.path().join("console.log.1");
    for path in [&log, &rotated] {
        let meta = std::fs::metadata(path).unwrap();
        assert!(
            meta.len() <= 16,
            "{} has {} bytes",
            path.display(),
            meta.len()
        );
        let mode = meta.permissions().mode() & 0o777;
        assert_eq!(mode & !0o640, 0, "{} has mode {mode:o}", path.display());
    }
    assert_eq!(std::fs::metadata(&rotated).unwrap().len(), 16);
}

#[test]
fn json_spec_boots_and_flags_override_it() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("vm.json");
    let json = serde_json::json!({
        "kernel": guest("exit0"),
        "vcpus": 2,
        "memory_mib": 32,
        "cmdline": "from=json",
    });
    std::fs::write(&spec, json.to_string()).unwrap();
    let out = vmm(&["--config", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("from=json"));
    let k42 = guest("exit42");
    let out = vmm(&[
        "--config",
        spec.to_str().unwrap(),
        "--kernel",
        k42.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(42));
}

/// A 64-bit MSR pattern setting bit `bit`, the others kept.
fn msr_set_bit(bit: u32) -> String {
    (0..64)
        .map(|i| if 63 - i == bit { '1' } else { 'x' })
        .collect()
}

#[test]
fn msr_overrides_are_applied_and_one_kvm_refuses_stops_the_start_naming_it() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("vm.json");
    let run = |addr: &str, bit: u32| {
        let json = serde_json::json!({
            "kernel": guest("exit0"),
            "vcpus": 2,
            "memory_mib": 32,
            "cpu": {"msrs": [{"addr": addr, "bits": msr_set_bit(bit)}]},
        });
        std::fs::write(&spec, json.to_string()).unwrap();
        vmm(&["--config", spec.to_str().unwrap()])
    };
    // IA32_TSC_ADJUST bit 4 on both vCPUs: set, read back and checked by the vmm.
    let out = run("0x3b", 4);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    // IA32_TSC_DEADLINE: KVM takes the write but drops it (the LAPIC timer is not in
    // TSC-deadline mode yet); the read-back sees it.
    let out = run("0x6e0", 4);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "cpu override of MSR 0x6e0: this host's KVM took the value but the MSR reads back 0x0"
        ),
        "{stderr}"
    );
    // IA32_MCG_CTL enabled: KVM refuses it (its machine-check capabilities lack MCG_CTL_P).
    let out = run("0x17b", 0);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("vCPU 0: cpu override of MSR 0x17b: this host's KVM refused the value 0x1"),
        "{stderr}"
    );
    // An index that is no MSR KVM lists for a VMM to set.
    let out = run("0xdead", 0);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "cpu override of MSR 0xdead: this host's KVM does not let a VMM read and set that MSR"
        ),
        "{stderr}"
    );
}

/// Runs the vmm with bad input: it must exit 2 with a one-line error naming the problem.
fn assert_rejected(args: &[&str], expected: &str) {
    let out = vmm(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "args {args:?}: {stderr}");
    assert!(
        stderr.contains(expected),
        "args {args:?}: expected {expected:?} in {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let not_kernel = dir.path().join("not-a-kernel");
    std::fs::write(&not_kernel, "#!/bin/sh\necho hi\n").unwrap();
    let nk = not_kernel.to_str().unwrap();

    assert_rejected(&[], "no kernel given");
    assert_rejected(
        &["--kernel", nk, "--vcpus", "0"],
        "vcpus must be between 1 and 32, got 0",
    );
    assert_rejected(&["--kernel", nk, "--vcpus", "33"], "got 33");
    assert_rejected(&["--kernel", nk, "--memory", "4"], "at least 16 MiB");
    assert_rejected(
        &["--kernel", nk, "--memory", "100000000"],
        "more than this host has",
    );
    assert_rejected(&["--kernel", nk, "--serial", "tty"], "--serial must be");
    assert_rejected(&["--kernel", nk, "--env", "NOEQUALS"], "KEY=VALUE");
    assert_rejected(
        &["--kernel", nk, "--env", "A.B=1"],
        "environment variable name \"A.B\" is invalid",
    );
    assert_rejected(
        &["--kernel", nk, "--cmdline", "a -- b"],
        "give the entrypoint as the spec's entrypoint",
    );
    assert_rejected(
        &["--config", "/nonexistent/vm.json"],
        "cannot read spec /nonexistent/vm.json",
    );
    let bad_json = dir.path().join("bad.json");
    std::fs::write(&bad_json, r#"{"kernel": "/k", "vcpus": "two"}"#).unwrap();
    assert_rejected(&["--config", bad_json.to_str().unwrap()], "invalid spec");
    assert_rejected(
        &["--kernel", nk, "--kvm-device", "/nonexistent/kvm"],
        "/nonexistent/kvm does not exist",
    );
}

#[test]
fn bad_boot_files_get_a_clear_error() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let not_kernel = dir.path().join("not-a-kernel");
    std::fs::write(&not_kernel, "#!/bin/sh\necho hi\n").unwrap();
    assert_rejected(
        &["--kernel", not_kernel.to_str().unwrap()],
        "is neither an ELF vmlinux nor a bzImage",
    );

    let full = std::fs::read(guest("exit0")).unwrap();
    let truncated = dir.path().join("truncated");
    std::fs::write(&truncated, &full[..200]).unwrap();
    assert_rejected(
        &["--kernel", truncated.to_str().unwrap()],
        "cannot load ELF kernel",
    );

    assert_rejected(
        &["--kernel", "/nonexistent/vmlinux"],
        "cannot read kernel /nonexistent/vmlinux",
    );

    let big_initrd = dir.path().join("initrd");
    std::fs::write(&big_initrd, vec![0u8; 40 << 20]).unwrap();
    let k = guest("exit0");
    assert_rejected(
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "32",
            "--initrd",
            big_initrd.to_str().unwrap(),
        ],
        "does not fit in guest memory",
    );
    assert_rejected(
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            "/nonexistent/initrd",
        ],
        "cannot read initrd /nonexistent/initrd",
    );
    assert_rejected(
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--serial",
            &format!("file:{}/no/such/dir/log", dir.path().display()),
        ],
        "cannot open serial output file",
    );
}

#[test]
fn kvm_without_permission_is_named() {
    // Root ignores file modes, so run the vmm as `nobody` against a mode-000 device path.
    let is_root = unsafe { libc::geteuid() } == 0;
    if !is_root || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipping: needs root and setpriv");
        return;
    }
    let dir = tempfile::Builder::new().tempdir_in("/tmp").unwrap();
    let fake = dir.path().join("kvm");
    std::fs::write(&fake, b"").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = vmm_bin();
    let bin = bin.to_str().unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin,
            "--kernel",
            bin,
        ])
        .args(["--kvm-device", fake.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    if stderr.contains("Permission denied") && !stderr.contains("vmm:") {
        eprintln!("skipping: nobody cannot execute {bin}: {stderr}");
        return;
    }
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no permission to open"), "{stderr}");
}
