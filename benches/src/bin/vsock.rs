//! vsock benchmark on the test bed (a KVM host inside QEMU): a host program talks to a guest
//! program through the vmm's virtio-vsock device (Firecracker's `CONNECT <port>` convention)
//! and measures host->guest and guest->host throughput (64 KiB writes, no hashing) and the
//! round-trip time of 1-byte messages. The same client against a plain unix socket on the
//! same test bed is the baseline: the ratio, not the absolute numbers, carries over to real
//! hosts. Both ends are `vsock-probe` (guest-kernels/vsock-probe).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use benches::{run_on_testbed, sibling};
use clap::Parser;
use e2e_tests::cpio::Contents;
use e2e_tests::{artifacts, microvm, Job};

#[derive(Parser)]
struct Args {
    /// MiB moved each way.
    #[arg(long, default_value_t = 64)]
    mib: u64,
    /// 1-byte round trips.
    #[arg(long, default_value_t = 2000)]
    rounds: u64,
    /// The vmm binary (default: the one built beside this program).
    #[arg(long)]
    vmm: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let vmm = match args.vmm {
        Some(path) => path,
        None => sibling("vmm")?,
    };
    let kernel = artifacts::guest_kernel()?;
    let init = artifacts::guest_init()?;
    let probe = artifacts::guest_program("vsock-probe")?;
    let initrd = artifacts::target_dir().join("vsock-bench-initrd.cpio");
    let mut archive = microvm::guest_initramfs(&init, std::path::Path::new("/bin/busybox"))?;
    archive.file("bin/vsock-probe", 0o755, Contents::HostFile(probe.clone()))?;
    archive.write_file(&initrd)?;
    let (mib, rounds) = (args.mib, args.rounds);
    let script = format!(
        "mkdir -p /run\n\
         /probe bench-serve-unix /run/base.sock & sleep 0.5\n\
         echo -n 'unix socket (baseline): '; /probe bench /run/base.sock 0 {mib} {rounds}\n\
         /vmm --kernel /guest/vmlinux --initrd /guest/initrd --memory 256 --serial off \
           --vsock cid=3,uds=/run/v.sock -- /bin/vsock-probe bench-serve 5000 & V=$!\n\
         echo -n 'vmm virtio-vsock:       '; /probe bench /run/v.sock 5000 {mib} {rounds}\n\
         wait $V\n"
    );
    let job = Job::new(script)
        .binary("/vmm", &vmm)
        .file("/probe", &probe)
        .file("/guest/vmlinux", &kernel.vmlinux)
        .file("/guest/initrd", &initrd)
        .timeout(Duration::from_secs(900));
    run_on_testbed(&job)
}
