//! Runs the boot benchmark (`boot_bench`) where a Linux guest can run: on the test bed (a KVM
//! host inside QEMU, the default, which works on any machine) or on this host (`--direct`, for
//! real KVM hosts). All VMMs boot the same guest kernel and initramfs in the same host.
//!
//! Optional peers, from the environment: `FIRECRACKER_BIN` (a Firecracker binary) and
//! `VMM_BASELINE_BIN` (another vmm build, e.g. main's, to report a change as a ratio).

use std::process::Command;

use anyhow::{bail, Result};
use benches::{optional_peer, run_on_bed_echoing, sibling, vmm, with_qemu};
use clap::Parser;
use e2e_tests::{artifacts, Job, Testbed};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// Deadline of one boot; a VMM that misses it is killed and reported.
    #[arg(long, default_value_t = 60)]
    boot_timeout_secs: u64,
    /// Only these cases (repeatable): quiet, verbose, devices. Default: all.
    #[arg(long = "case")]
    cases: Vec<String>,
    /// Run on this host's /dev/kvm instead of the test bed.
    #[arg(long)]
    direct: bool,
    /// Prints the pages of the vmm's binary each boot touched (boot_bench --text-pages: the
    /// bed's fault-around set to one page; its memory numbers are then not results).
    #[arg(long)]
    text_pages: bool,
}

/// What boot_bench's progress lines start with.
const PROGRESS: &str = "boot-bench:";

/// The test bed's deadline: every boot at its own deadline, plus the bed's boot and slack.
fn job_timeout(args: &Args, firecracker: bool, baseline: bool) -> std::time::Duration {
    let peers = 2 + u64::from(firecracker) + u64::from(baseline);
    let cases = if args.cases.is_empty() {
        3
    } else {
        args.cases.len() as u64
    };
    let boots = (args.runs as u64)
        .saturating_mul(peers)
        .saturating_mul(cases);
    std::time::Duration::from_secs(
        boots
            .saturating_mul(args.boot_timeout_secs.saturating_add(2))
            .saturating_add(300),
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    let vmm = vmm()?;
    let bench = sibling("boot_bench")?;
    let qemu = e2e_tests::qemu::qemu_binary()?;
    let kernel = artifacts::guest_kernel()?;
    let initrd = benches::boot_bench_initramfs()?;

    let firecracker = optional_peer("FIRECRACKER_BIN")?;
    let baseline = optional_peer("VMM_BASELINE_BIN")?;
    let mut common = vec![
        "--runs".to_string(),
        args.runs.to_string(),
        "--memory-mib".into(),
        args.memory_mib.to_string(),
        "--boot-timeout-secs".into(),
        args.boot_timeout_secs.to_string(),
    ];
    for case in &args.cases {
        common.extend(["--case".to_string(), case.clone()]);
    }
    if args.text_pages {
        common.push("--text-pages".into());
    }
    let mut bench_args = format!(
        "{} --kernel /guest/vmlinux --initrd /guest/initrd",
        common.join(" ")
    );
    if firecracker.is_some() {
        bench_args.push_str(" --firecracker /firecracker");
    }
    if baseline.is_some() {
        bench_args.push_str(" --baseline-vmm /vmm-baseline");
    }
    if args.direct {
        let mut bench_cmd = Command::new(&bench);
        if let Some(path) = &firecracker {
            bench_cmd.args(["--firecracker".as_ref(), path.as_os_str()]);
        }
        if let Some(path) = &baseline {
            bench_cmd.args(["--baseline-vmm".as_ref(), path.as_os_str()]);
        }
        let status = bench_cmd
            .args([
                "--vmm".as_ref(),
                vmm.as_os_str(),
                "--qemu".as_ref(),
                qemu.as_os_str(),
            ])
            .args(["--kernel".as_ref(), kernel.vmlinux.as_os_str()])
            .args(["--initrd".as_ref(), initrd.as_os_str()])
            .args(&common)
            .status()?;
        if !status.success() {
            bail!("boot_bench failed: {status}");
        }
        return Ok(());
    }

    let mut job = Job::new(format!(
        "/boot_bench --vmm /vmm --qemu /usr/bin/qemu-system-x86_64 --progress /dev/console {bench_args}\n"
    ))
    .binary("/vmm", &vmm)
    .binary("/boot_bench", &bench)
    .file("/guest/vmlinux", &kernel.vmlinux)
    .file("/guest/initrd", &initrd)
    .timeout(job_timeout(
        &args,
        firecracker.is_some(),
        baseline.is_some(),
    ));
    if let Some(path) = &firecracker {
        job = job.binary("/firecracker", path);
    }
    if let Some(path) = &baseline {
        job = job.binary("/vmm-baseline", path);
    }
    // vhost_vsock: QEMU's vsock device in the devices case.
    let bed = Testbed::from_system()?.with_modules(&["vhost_vsock"])?;
    run_on_bed_echoing(bed, &with_qemu(job, &qemu), Some(PROGRESS))
}
