//! The guest's CPU and platform as the vmm presents them, read back inside a Linux guest on
//! the test bed: the TSC-deadline timer, a CPU template hiding a feature, a CPUID override
//! clearing another and one setting again a bit the template hid, an override the host cannot
//! honour refused at start (status 2, the bit named), MSR overrides on the bed's real KVM (one
//! applied, one KVM refuses: status 2, the MSR named), vCPUs seen as cores of one package, and
//! the CMOS clock giving a guest without kvmclock the host's date.
//!
//! The test bed's CPU is QEMU's EPYC model under nested SVM: it has `sse4a` (which the `t2`
//! template hides), `aes`, and no AVX-512.

use std::path::PathBuf;

use e2e_tests::{artifacts, microvm, skip_if_missing, Error, Job, JobOutput, Testbed};

struct Bed {
    testbed: Testbed,
    vmm: PathBuf,
    vmlinux: PathBuf,
    initrd: PathBuf,
}

fn bed(test: &str) -> Result<Option<Bed>, Error> {
    let Some(testbed) = skip_if_missing(test, Testbed::from_system())? else {
        return Ok(None);
    };
    let Some(kernel) = skip_if_missing(test, artifacts::guest_kernel())? else {
        return Ok(None);
    };
    let init = artifacts::guest_init()?;
    let scratch = artifacts::scratch_dir(test)?;
    let initrd = scratch.join("initrd.cpio");
    microvm::guest_initramfs(&init, std::path::Path::new("/bin/busybox"))?.write_file(&initrd)?;
    Ok(Some(Bed {
        testbed,
        vmm: artifacts::vmm_binary()?,
        vmlinux: kernel.vmlinux,
        initrd,
    }))
}

impl Bed {
    /// Runs `script` with the vmm at /vmm, the guest at /guest/{vmlinux,initrd} and each
    /// `(path, json)` spec file.
    fn run(&self, script: &str, specs: &[(&str, String)]) -> Result<JobOutput, Error> {
        let mut job = Job::new(script)
            .binary("/vmm", &self.vmm)
            .file("/guest/vmlinux", &self.vmlinux)
            .file("/guest/initrd", &self.initrd);
        for (path, json) in specs {
            job = job.data(path, json.clone(), 0o644);
        }
        let out = self.testbed.run(&job)?;
        eprintln!("--- job output ---\n{}", out.output);
        Ok(out)
    }
}

/// A 32-bit pattern changing one bit (`c` = '0' or '1'), the others kept.
fn one_bit(bit: u32, c: char) -> String {
    (0..32)
        .map(|i| if 31 - i == bit { c } else { 'x' })
        .collect()
}

/// A 64-bit MSR pattern setting bit `bit`, the others kept.
fn msr_set_bit(bit: u32) -> String {
    (0..64)
        .map(|i| if 63 - i == bit { '1' } else { 'x' })
        .collect()
}

/// A spec booting the test guest with `cpu` as its CPU section.
fn spec_with_cpu(cpu: &str) -> String {
    format!(
        r#"{{"kernel": "/guest/vmlinux", "initrd": "/guest/initrd", "memory_mib": 128, "cmdline": "quiet", "cpu": {cpu}}}"#
    )
}

/// The words of the guest's /proc/cpuinfo `flags` line printed after the line `marker`.
fn flags_after<'a>(output: &'a str, marker: &str) -> Option<Vec<&'a str>> {
    let mut lines = output.lines().skip_while(|l| *l != marker).skip(1);
    let line = lines.find(|l| l.starts_with("flags"))?;
    let (_, words) = line.split_once(':')?;
    Some(words.split_whitespace().collect())
}

const READ_FLAGS: &str = "-- /bin/busybox grep -m1 ^flags /proc/cpuinfo";

#[test]
fn guest_cpuid_follows_template_and_overrides() -> Result<(), Error> {
    let Some(bed) = bed("guest_cpuid_follows_template_and_overrides")? else {
        return Ok(());
    };
    let specs = [
        ("/job/none.json", spec_with_cpu(r#"{"template": "none"}"#)),
        ("/job/t2.json", spec_with_cpu(r#"{"template": "t2"}"#)),
        (
            "/job/t2-no-aes.json",
            spec_with_cpu(&format!(
                r#"{{"template": "t2", "cpuid": [{{"leaf": "0x1", "register": "ecx", "bits": "{}"}}]}}"#,
                one_bit(25, '0')
            )),
        ),
        (
            // sse4a is CPUID 0x80000001 ECX bit 6: hidden by t2, set again by the override.
            "/job/t2-sse4a.json",
            spec_with_cpu(&format!(
                r#"{{"template": "t2", "cpuid": [{{"leaf": "0x80000001", "register": "ecx", "bits": "{}"}}]}}"#,
                one_bit(6, '1')
            )),
        ),
        (
            // IA32_TSC_ADJUST = 16: the vmm sets it and reads it back; the guest kernel reads
            // it at boot and logs what it found.
            "/job/msr-tsc-adjust.json",
            spec_with_cpu(&format!(
                r#"{{"msrs": [{{"addr": "0x3b", "bits": "{}"}}]}}"#,
                msr_set_bit(4)
            )),
        ),
        (
            // IA32_MCG_CTL enabled: KVM offers no MCG_CTL_P and refuses it.
            "/job/msr-mcg.json",
            spec_with_cpu(&format!(
                r#"{{"msrs": [{{"addr": "0x17b", "bits": "{}"}}]}}"#,
                msr_set_bit(0)
            )),
        ),
        (
            "/job/avx512.json",
            spec_with_cpu(&format!(
                r#"{{"cpuid": [{{"leaf": "0x7", "subleaf": 0, "register": "ebx", "bits": "{}"}}]}}"#,
                one_bit(16, '1')
            )),
        ),
    ];
    let out = bed.run(
        &format!(
            "echo run=none; /vmm --config /job/none.json {READ_FLAGS}\n\
             echo run=t2; /vmm --config /job/t2.json {READ_FLAGS}\n\
             echo run=t2-no-aes; /vmm --config /job/t2-no-aes.json {READ_FLAGS}\n\
             echo run=t2-sse4a; /vmm --config /job/t2-sse4a.json {READ_FLAGS}\n\
             echo run=msr-tsc-adjust; /vmm --config /job/msr-tsc-adjust.json -- /bin/busybox dmesg\n\
             echo msr-tsc-adjust-status=$?\n\
             echo run=msr-mcg; /vmm --config /job/msr-mcg.json {READ_FLAGS} 2>&1\n\
             echo msr-mcg-status=$?\n\
             echo run=avx512; /vmm --config /job/avx512.json {READ_FLAGS} 2>&1\n\
             echo avx512-status=$?\n"
        ),
        &specs,
    )?;
    let none = flags_after(&out.output, "run=none").expect("flags with template none");
    let t2 = flags_after(&out.output, "run=t2").expect("flags with template t2");
    let no_aes = flags_after(&out.output, "run=t2-no-aes").expect("flags with the override");
    let sse4a = flags_after(&out.output, "run=t2-sse4a").expect("flags with sse4a set again");

    // The host's view: the TSC-deadline timer the vmm adds, and what the next runs hide.
    for flag in ["tsc_deadline_timer", "sse4a", "aes", "sse4_2"] {
        assert!(
            none.contains(&flag),
            "{flag} missing with template none: {none:?}"
        );
    }
    // The template hides sse4a and keeps the baseline.
    assert!(!t2.contains(&"sse4a"), "t2 shows sse4a: {t2:?}");
    for flag in ["tsc_deadline_timer", "aes", "sse4_2"] {
        assert!(t2.contains(&flag), "t2 hides {flag}: {t2:?}");
    }
    // The override clears aes on top of the template.
    assert!(!no_aes.contains(&"aes"), "override left aes: {no_aes:?}");
    assert!(!no_aes.contains(&"sse4a"));
    assert!(no_aes.contains(&"sse4_2"));

    // An override sets again what the template hid; the rest of the template stays.
    assert!(
        sse4a.contains(&"sse4a"),
        "override left sse4a hidden: {sse4a:?}"
    );
    assert_eq!(
        t2.iter().filter(|f| **f != "sse4a").collect::<Vec<_>>(),
        sse4a.iter().filter(|f| **f != "sse4a").collect::<Vec<_>>(),
        "the override changed more than sse4a"
    );

    // MSR overrides on the bed's KVM: one applied (the guest's kernel reads the value at
    // boot: Linux resets a non-zero TSC_ADJUST of the boot CPU and says so), one refused at
    // start.
    assert!(none.contains(&"tsc_adjust"), "{none:?}");
    assert!(
        out.output.contains("TSC ADJUST: CPU0: 16 force to 0"),
        "{}",
        out.output
    );
    assert!(
        out.output.lines().any(|l| l == "msr-tsc-adjust-status=0"),
        "{}",
        out.output
    );

    assert!(
        out.output.lines().any(|l| l == "msr-mcg-status=2"),
        "{}",
        out.output
    );
    assert!(
        out.output
            .contains("cpu override of MSR 0x17b: this host's KVM refused the value 0x1"),
        "{}",
        out.output
    );
    assert!(flags_after(&out.output, "run=msr-mcg").is_none());

    // Setting a bit the host's KVM lacks is refused before the guest runs.
    assert!(
        out.output.lines().any(|l| l == "avx512-status=2"),
        "{}",
        out.output
    );
    assert!(
        out.output.contains(
            "cpu override sets CPUID leaf 0x7 subleaf 0x0 EBX bit 16, which this host's KVM does not support"
        ),
        "{}",
        out.output
    );
    assert!(flags_after(&out.output, "run=avx512").is_none());
    Ok(())
}

#[test]
fn guest_without_kvmclock_reads_the_host_date_from_the_cmos_clock() -> Result<(), Error> {
    let Some(bed) = bed("guest_without_kvmclock_reads_the_host_date_from_the_cmos_clock")? else {
        return Ok(());
    };
    // Without kvmclock the guest takes its wall clock from the CMOS RTC at boot.
    let out = bed.run(
        "echo host-date=$(date -u +%Y-%m-%d)\n\
         /vmm --initrd /guest/initrd --memory 128 --kernel /guest/vmlinux --cmdline 'quiet no-kvmclock' \
         -- /bin/busybox date -u +guest-date=%Y-%m-%d\n\
         echo vmm-status=$?\n",
        &[],
    )?;
    let host = out
        .output
        .lines()
        .find_map(|l| l.strip_prefix("host-date="))
        .expect("host date");
    let guest = out
        .output
        .lines()
        .find_map(|l| l.strip_prefix("guest-date="))
        .expect("guest date");
    assert_eq!(guest, host, "{}", out.output);
    assert!(out.output.lines().any(|l| l == "vmm-status=0"));
    Ok(())
}

#[test]
fn vcpus_are_cores_of_one_package() -> Result<(), Error> {
    let Some(bed) = bed("vcpus_are_cores_of_one_package")? else {
        return Ok(());
    };
    let out = bed.run(
        "/vmm --initrd /guest/initrd --memory 128 --kernel /guest/vmlinux --vcpus 3 --cmdline quiet \
         -- /bin/busybox grep -E '^(physical id|cpu cores)' /proc/cpuinfo\n",
        &[],
    )?;
    let fields: Vec<String> = out
        .output
        .lines()
        .filter(|l| l.starts_with("physical id") || l.starts_with("cpu cores"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let expected: Vec<&str> = ["physical id : 0", "cpu cores : 3"].repeat(3);
    assert_eq!(fields, expected, "{}", out.output);
    Ok(())
}
