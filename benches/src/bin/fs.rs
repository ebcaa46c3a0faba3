//! Runs the virtio-fs benchmark (`fs_bench`) where a Linux guest can run: on the test bed (a
//! KVM host inside QEMU, the default, which works on any machine) or on this host (`--direct`,
//! for real KVM hosts). The vmm (flist image, flist image through the node's chunk fetcher,
//! plain directory) and QEMU + virtiofsd serve the same tree to the same guest kernel and
//! initramfs in the same host; with `VMM_BASELINE_BIN=PATH`, another vmm build too (flist
//! image and plain directory), for a before/after ratio. The `layer` workload compares
//! writable shares: the vmm's own layer, fuse-backend-rs's overlay in the same vmm, and
//! virtiofsd from a writable copy of the tree.
//!
//! virtiofsd comes from `$VIRTIOFSD_BIN` or the cargo install that `scripts/bench.sh` makes.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use benches::{run_on_testbed_echoing, sibling, vmm, with_qemu, PAUSE_KHUGEPAGED};
use clap::Parser;
use e2e_tests::cpio::Contents;
use e2e_tests::{artifacts, microvm, Job};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value_t = 64)]
    file_mib: usize,
    #[arg(long, default_value_t = 2000)]
    rand_ops: u64,
    /// The metadata tree: directories x files per directory.
    #[arg(long, default_value_t = 40)]
    dirs: usize,
    #[arg(long, default_value_t = 50)]
    files_per_dir: usize,
    /// Deadline for one VM run, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// The image's block size in KiB (0: whole chunks, format 1, for a baseline older than
    /// blocked chunks); default: `flist pack`'s.
    #[arg(long)]
    block_kib: Option<u32>,
    /// Measure only these servers (vmm-flist, vmm-fetcher, vmm-dir, baseline-flist,
    /// baseline-dir, virtiofsd+qemu; vmm-layer, vmm-overlay, virtiofsd-copy), comma-separated.
    #[arg(long)]
    only: Option<String>,
    /// The workloads (read, layer), comma-separated; both by default.
    #[arg(long)]
    workload: Option<String>,
    /// Run on this host's /dev/kvm instead of the test bed.
    #[arg(long)]
    direct: bool,
}

fn virtiofsd() -> Result<PathBuf> {
    let path = match std::env::var_os("VIRTIOFSD_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let home = std::env::var_os("HOME").context("HOME is not set")?;
            let cache = std::env::var_os("GRIDNODE_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(home).join(".cache/gridnode"));
            cache.join("tools/virtiofsd-1.14.0/bin/virtiofsd")
        }
    };
    if !path.exists() {
        bail!(
            "virtiofsd not found at {} (scripts/bench.sh installs it with cargo; or set VIRTIOFSD_BIN)",
            path.display()
        );
    }
    Ok(path)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let vmm = vmm()?;
    let flist = sibling("flist")?;
    let bench = sibling("fs_bench")?;
    let fetcher = sibling("chunk-fetcher")?;
    let baseline = benches::optional_peer("VMM_BASELINE_BIN")?;
    let qemu = e2e_tests::qemu::qemu_binary()?;
    let virtiofsd = virtiofsd()?;
    let kernel = artifacts::guest_kernel()?;
    let init = artifacts::guest_init()?;
    let guest_bench = artifacts::guest_program("guest-fsbench")?;
    let initrd = artifacts::target_dir().join("fs-bench-initrd.cpio");
    let mut archive = microvm::guest_initramfs(&init, std::path::Path::new("/bin/busybox"))?;
    archive.file("bin/guest-fsbench", 0o755, Contents::HostFile(guest_bench))?;
    archive.write_file(&initrd)?;

    let mut common = vec![
        "--runs".to_owned(),
        args.runs.to_string(),
        "--file-mib".to_owned(),
        args.file_mib.to_string(),
        "--rand-ops".to_owned(),
        args.rand_ops.to_string(),
        "--dirs".to_owned(),
        args.dirs.to_string(),
        "--files-per-dir".to_owned(),
        args.files_per_dir.to_string(),
        "--timeout-secs".to_owned(),
        args.timeout_secs.to_string(),
    ];
    if let Some(only) = &args.only {
        common.push(format!("--only={only}"));
    }
    if let Some(k) = args.block_kib {
        common.push(format!("--block-kib={k}"));
    }
    if let Some(workload) = &args.workload {
        common.push(format!("--workload={workload}"));
    }
    if args.direct {
        let mut cmd = Command::new(&bench);
        if let Some(path) = &baseline {
            cmd.arg("--baseline-vmm").arg(path);
        }
        let status = cmd
            .arg("--vmm")
            .arg(&vmm)
            .arg("--chunk-fetcher")
            .arg(&fetcher)
            .arg("--flist")
            .arg(&flist)
            .arg("--qemu")
            .arg(&qemu)
            .arg("--virtiofsd")
            .arg(&virtiofsd)
            .arg("--kernel")
            .arg(&kernel.vmlinux)
            .arg("--initrd")
            .arg(&initrd)
            .args(&common)
            .status()?;
        if !status.success() {
            bail!("fs_bench failed: {status}");
        }
        return Ok(());
    }

    if baseline.is_some() {
        common.push("--baseline-vmm /vmm-baseline".to_owned());
    }
    let mut job = Job::new(format!(
        "{PAUSE_KHUGEPAGED}/fs_bench --vmm /vmm --chunk-fetcher /chunk-fetcher --flist /flist \
         --qemu /usr/bin/qemu-system-x86_64 --virtiofsd /virtiofsd \
         --kernel /guest/vmlinux --initrd /guest/initrd --work /srv/fs-bench {} \
         2>/dev/console\n",
        common.join(" ")
    ))
    .binary("/vmm", &vmm)
    .binary("/chunk-fetcher", &fetcher)
    .binary("/flist", &flist)
    .binary("/fs_bench", &bench)
    .binary("/virtiofsd", &virtiofsd)
    .file("/guest/vmlinux", &kernel.vmlinux)
    .file("/guest/initrd", &initrd)
    .timeout(Duration::from_secs(3600));
    if let Some(path) = &baseline {
        job = job.binary("/vmm-baseline", path);
    }
    // fs_bench's progress (and any error) goes to the console, echoed as it comes.
    run_on_testbed_echoing(&with_qemu(job, &qemu), Some("fs-bench:"))
}
