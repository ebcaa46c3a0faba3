//! Runs the boot benchmark (`boot_bench`) where a Linux guest can run: on the test bed (a KVM
//! host inside QEMU, the default, which works on any machine) or on this host (`--direct`, for
//! real KVM hosts). Both VMMs boot the same guest kernel and initramfs in the same host.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};
use benches::{run_on_testbed, sibling, with_qemu};
use clap::Parser;
use e2e_tests::{artifacts, microvm, Job};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// Run on this host's /dev/kvm instead of the test bed.
    #[arg(long)]
    direct: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let vmm = sibling("vmm")?;
    let bench = sibling("boot_bench")?;
    let qemu = e2e_tests::qemu::qemu_binary()?;
    let kernel = artifacts::guest_kernel()?;
    let init = artifacts::guest_init()?;
    let initrd = artifacts::target_dir().join("bench-initrd.cpio");
    microvm::guest_initramfs(&init, Path::new("/bin/busybox"))?.write_file(&initrd)?;

    let bench_args = format!(
        "--runs {} --memory-mib {} --kernel /guest/vmlinux --initrd /guest/initrd",
        args.runs, args.memory_mib
    );
    if args.direct {
        let status = Command::new(&bench)
            .args([
                "--vmm".as_ref(),
                vmm.as_os_str(),
                "--qemu".as_ref(),
                qemu.as_os_str(),
            ])
            .args(["--kernel".as_ref(), kernel.vmlinux.as_os_str()])
            .args(["--initrd".as_ref(), initrd.as_os_str()])
            .args([
                "--runs",
                &args.runs.to_string(),
                "--memory-mib",
                &args.memory_mib.to_string(),
            ])
            .status()?;
        if !status.success() {
            bail!("boot_bench failed: {status}");
        }
        return Ok(());
    }

    let job = Job::new(format!(
        "/boot_bench --vmm /vmm --qemu /usr/bin/qemu-system-x86_64 {bench_args}\n"
    ))
    .binary("/vmm", &vmm)
    .binary("/boot_bench", &bench)
    .file("/guest/vmlinux", &kernel.vmlinux)
    .file("/guest/initrd", &initrd)
    .timeout(std::time::Duration::from_secs(900));
    run_on_testbed(&with_qemu(job, &qemu))
}
