//! A change's before/after benchmark in one test-bed run (issue 8's closing measurement): the
//! boot benchmark (`boot_bench`: time to init, vmm memory overhead) and the virtio-fs
//! benchmark (`fs_bench`: the flist image standalone and through the node's chunk fetcher,
//! the plain directory) with this vmm and a baseline build (`VMM_BASELINE_BIN`, e.g. the
//! commit before the change, built in release in its own worktree), in the same boot of the
//! test bed, so that the ratios compare like with like. QEMU and virtiofsd are left out (the
//! `boot` and `fs` benchmarks measure them).
//!
//!     VMM_BASELINE_BIN=/path/to/old/vmm bash scripts/bench.sh before-after

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use benches::{optional_peer, run_on_testbed_echoing, sibling, vmm, PAUSE_KHUGEPAGED};
use clap::Parser;
use e2e_tests::cpio::Contents;
use e2e_tests::{artifacts, microvm, Job};

#[derive(Parser)]
struct Args {
    /// Boots per case and vmm.
    #[arg(long, default_value_t = 5)]
    boot_runs: usize,
    /// Only these boot cases (repeatable: quiet, verbose, devices); default all. A baseline
    /// without block, rng and vsock devices cannot boot the devices case.
    #[arg(long = "boot-case")]
    boot_cases: Vec<String>,
    /// Cold + warm virtio-fs measurements per server.
    #[arg(long, default_value_t = 3)]
    fs_runs: usize,
    #[arg(long, default_value_t = 64)]
    file_mib: usize,
    #[arg(long, default_value_t = 2000)]
    rand_ops: u64,
    /// The image's block size, passed to `fs_bench --block-kib`: 0 packs whole chunks
    /// (format 1), which a baseline older than blocked chunks needs.
    #[arg(long)]
    block_kib: Option<u32>,
    /// Run on this host's /dev/kvm instead of the test bed.
    #[arg(long)]
    direct: bool,
}

/// The servers of the virtio-fs benchmark measured here.
const FS_SERVERS: &str = "vmm-flist,vmm-fetcher,vmm-dir,baseline-flist,baseline-dir";

fn main() -> Result<()> {
    let args = Args::parse();
    let Some(baseline) = optional_peer("VMM_BASELINE_BIN")? else {
        bail!("set VMM_BASELINE_BIN to the vmm build to compare with");
    };
    let vmm = vmm()?;
    let flist = sibling("flist")?;
    let fetcher = sibling("chunk-fetcher")?;
    let boot_bench = sibling("boot_bench")?;
    let fs_bench = sibling("fs_bench")?;
    let kernel = artifacts::guest_kernel()?;
    let init = artifacts::guest_init()?;
    let boot_initrd = benches::boot_bench_initramfs()?;
    let fs_initrd = artifacts::target_dir().join("fs-bench-initrd.cpio");
    let mut archive = microvm::guest_initramfs(&init, Path::new("/bin/busybox"))?;
    archive.file(
        "bin/guest-fsbench",
        0o755,
        Contents::HostFile(artifacts::guest_program("guest-fsbench")?),
    )?;
    archive.write_file(&fs_initrd)?;

    let mut boot_args = format!("--runs {} --memory-mib 256", args.boot_runs);
    for case in &args.boot_cases {
        boot_args.push_str(&format!(" --case {case}"));
    }
    let mut fs_args = format!(
        "--runs {} --file-mib {} --rand-ops {} --workload read --only {FS_SERVERS}",
        args.fs_runs, args.file_mib, args.rand_ops
    );
    if let Some(kib) = args.block_kib {
        fs_args.push_str(&format!(" --block-kib {kib}"));
    }
    if args.direct {
        let run = |cmd: &mut Command, what: &str| -> Result<()> {
            let status = cmd.status().with_context(|| format!("running {what}"))?;
            if !status.success() {
                bail!("{what} failed: {status}");
            }
            Ok(())
        };
        println!("== boot");
        run(
            Command::new(&boot_bench)
                .arg("--vmm")
                .arg(&vmm)
                .arg("--baseline-vmm")
                .arg(&baseline)
                .arg("--kernel")
                .arg(&kernel.vmlinux)
                .arg("--initrd")
                .arg(&boot_initrd)
                .args(boot_args.split(' ')),
            "boot_bench",
        )?;
        println!("== virtio-fs");
        return run(
            Command::new(&fs_bench)
                .arg("--vmm")
                .arg(&vmm)
                .arg("--baseline-vmm")
                .arg(&baseline)
                .arg("--chunk-fetcher")
                .arg(&fetcher)
                .arg("--flist")
                .arg(&flist)
                .arg("--kernel")
                .arg(&kernel.vmlinux)
                .arg("--initrd")
                .arg(&fs_initrd)
                .args(fs_args.split(' ')),
            "fs_bench",
        );
    }

    let job = Job::new(format!(
        "{PAUSE_KHUGEPAGED}\
         echo '== boot'; /boot_bench --vmm /vmm --baseline-vmm /vmm-baseline \
         --kernel /guest/vmlinux --initrd /guest/boot-initrd --progress /dev/console {boot_args}; boot=$?\n\
         echo '== virtio-fs'; /fs_bench --vmm /vmm --baseline-vmm /vmm-baseline \
         --chunk-fetcher /chunk-fetcher --flist /flist --kernel /guest/vmlinux \
         --initrd /guest/fs-initrd --work /srv/fs-bench {fs_args} 2>/dev/console; fs=$?\n\
         [ $boot = 0 ] && [ $fs = 0 ]\n"
    ))
    .binary("/vmm", &vmm)
    .binary("/vmm-baseline", &baseline)
    .binary("/boot_bench", &boot_bench)
    .binary("/fs_bench", &fs_bench)
    .binary("/flist", &flist)
    .binary("/chunk-fetcher", &fetcher)
    .file("/guest/vmlinux", &kernel.vmlinux)
    .file("/guest/boot-initrd", &boot_initrd)
    .file("/guest/fs-initrd", &fs_initrd)
    .timeout(Duration::from_secs(3 * 3600));
    // Progress lines of both (`boot-bench:`, `fs-bench:`) are echoed as they come.
    run_on_testbed_echoing(&job, Some("-bench:"))
}
