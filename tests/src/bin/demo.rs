//! The main job for now: boot a micro-VM that runs a command and prints its output. On a
//! real KVM host (`--direct`) the vmm runs here; otherwise (the default, works on any machine)
//! it runs on the test bed, a KVM host inside QEMU.

use std::path::Path;
use std::process::Command;

use e2e_tests::{artifacts, microvm, Job, Testbed};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let direct = args.first().is_some_and(|a| a == "--direct");
    if direct {
        args.remove(0);
    }
    if args.is_empty() {
        args = vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo \"hello from a micro-VM: $(uname -sr), $(nproc) vCPUs\"".into(),
        ];
    }
    let kernel = artifacts::guest_kernel()?;
    let init = artifacts::guest_init()?;
    let vmm = artifacts::vmm_binary()?;
    let initrd = artifacts::target_dir().join("demo-initrd.cpio");
    microvm::guest_initramfs(&init, Path::new("/bin/busybox"))?.write_file(&initrd)?;

    if direct {
        let status = Command::new(&vmm)
            .arg("--kernel")
            .arg(&kernel.vmlinux)
            .arg("--initrd")
            .arg(&initrd)
            .args(["--vcpus", "2", "--cmdline", "quiet", "--"])
            .args(&args)
            .status()?;
        std::process::exit(status.code().unwrap_or(1));
    }

    let quoted: Vec<String> = args
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect();
    let script = format!(
        "/vmm --kernel /guest/vmlinux --initrd /guest/initrd --vcpus 2 --cmdline quiet -- {}\n",
        quoted.join(" ")
    );
    let job = Job::new(script)
        .binary("/vmm", &vmm)
        .file("/guest/vmlinux", &kernel.vmlinux)
        .file("/guest/initrd", &initrd);
    eprintln!("demo: running the vmm on the test bed (a KVM host inside QEMU)...");
    let out = Testbed::from_system()?.run(&job)?;
    print!("{}", out.output);
    std::process::exit(out.status);
}
