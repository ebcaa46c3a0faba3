//! Runs the boot benchmark (`boot_bench`) where a Linux guest can run: on the test bed (a KVM
//! host inside QEMU, the default, which works on any machine) or on this host (`--direct`, for
//! real KVM hosts). Both VMMs boot the same guest kernel and initramfs in the same host.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Parser;
use e2e_tests::{artifacts, microvm, Job, Testbed};

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

/// QEMU's firmware for the microvm machine and the option ROMs it may load.
const QEMU_FIRMWARE: &[&str] = &[
    "/usr/share/qemu/bios-microvm.bin",
    "/usr/share/qemu/linuxboot_dma.bin",
    "/usr/share/qemu/pvh.bin",
];

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this program")?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p vmm -p benches --bins)",
            path.display()
        );
    }
    Ok(path)
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

    let mut job = Job::new(format!(
        "/boot_bench --vmm /vmm --qemu /usr/bin/qemu-system-x86_64 {bench_args}\n"
    ))
    .binary("/vmm", &vmm)
    .binary("/boot_bench", &bench)
    .binary("/usr/bin/qemu-system-x86_64", &qemu)
    .file("/guest/vmlinux", &kernel.vmlinux)
    .file("/guest/initrd", &initrd)
    .timeout(std::time::Duration::from_secs(900));
    for firmware in QEMU_FIRMWARE {
        if Path::new(firmware).exists() {
            job = job.file(firmware, firmware);
        }
    }
    let bed = Testbed::from_system()?;
    let out = bed.run(&job)?;
    print!("{}", out.output);
    if out.status != 0 {
        bail!(
            "the benchmark failed on the test bed (status {}):\n{}",
            out.status,
            out.console
        );
    }
    println!("(measured on the test bed: a KVM host inside QEMU TCG; compare the ratios)");
    Ok(())
}
