//! virtio-blk benchmark on the test bed (a KVM host inside QEMU): the same raw image served to
//! the same guest kernel by the project's vmm, by QEMU's `microvm` machine
//! (`virtio-blk-device`, default cache) and, when its binary is given (`--firecracker PATH` or
//! `FIRECRACKER_BIN`), by Firecracker (its defaults: no API socket, a config file, the
//! synchronous engine, `Unsafe` cache), in turn; inside the guest fio (the host's, copied in
//! with its libraries) runs sequential 1 MiB and random 4 KiB reads and writes with O_DIRECT on
//! /dev/vda (one request at a time, and random 4 KiB with 16 in flight), one job at a time, and
//! the medians of `--runs` rounds are printed side by side.
//! With `--vmm-baseline PATH` (or `VMM_BASELINE_BIN=PATH`) another vmm build (e.g. main's) runs
//! in the same rounds, so a change is measured against it and QEMU in one test-bed boot.
//! Absolute numbers are those of nested TCG: compare the ratios.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use benches::{vmm, with_qemu};
use clap::Parser;
use e2e_tests::cpio::Contents;
use e2e_tests::{artifacts, microvm, shared_libraries, Job, Testbed};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Seconds per fio job.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// vCPUs of the test bed (with 1, the VMM's threads and the guest share one CPU: no
    /// cross-CPU wake-ups, which nested TCG makes slow).
    #[arg(long, default_value_t = 2)]
    bed_cpus: u32,
    /// The vmm's log filter (VMM_LOG), e.g. `debug` to see slow requests.
    #[arg(long, default_value = "warn")]
    vmm_log: String,
    /// Another vmm build (e.g. main's) to run in the same rounds; VMM_BASELINE_BIN also names
    /// it.
    #[arg(long)]
    vmm_baseline: Option<PathBuf>,
    /// A Firecracker binary to run in the same rounds; FIRECRACKER_BIN also names it.
    #[arg(long)]
    firecracker: Option<PathBuf>,
}

const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodules i8042.noaux i8042.nomux i8042.dumbkbd";

/// Where QEMU's microvm puts its first used virtio-mmio transport with ACPI off. The guest
/// kernel has no ACPI, so it learns of the device only from this argument; QEMU's own
/// (auto-kernel-cmdline) would land after the guest-init `--`, where the kernel does not look.
/// Without it the guest has no /dev/vda and fio would measure a file in its RAM (the script
/// refuses to run then).
const QEMU_VIRTIO_MMIO: &str = "virtio_mmio.device=512@0xfeb00e00:12";

/// The fio jobs: name and the arguments that make it. One request at a time (psync) measures
/// the round trip; 16 in flight (libaio) also what the device does with a busy queue.
const JOBS: &[(&str, &str)] = &[
    ("seq-read-1M", "--ioengine=psync --rw=read --bs=1M"),
    ("seq-write-1M", "--ioengine=psync --rw=write --bs=1M"),
    ("rand-read-4k", "--ioengine=psync --rw=randread --bs=4k"),
    ("rand-write-4k", "--ioengine=psync --rw=randwrite --bs=4k"),
    (
        "rand-read-4k-qd16",
        "--ioengine=libaio --iodepth=16 --rw=randread --bs=4k",
    ),
    (
        "rand-write-4k-qd16",
        "--ioengine=libaio --iodepth=16 --rw=randwrite --bs=4k",
    ),
];

fn guest_script(seconds: u32) -> String {
    let mut s = String::from(
        "vmm=$1\n[ -b /dev/vda ] || { echo \"NODISK;$vmm: /dev/vda is not a block device\"; exit 1; }\n",
    );
    for (name, args) in JOBS {
        s.push_str(&format!(
            "/usr/bin/fio --name={name} --filename=/dev/vda --direct=1 --thread \
             --time_based --runtime={seconds} --size=192M {args} --minimal | sed \"s/^/FIO;$vmm;{name};/\"\n"
        ));
    }
    s
}

/// Firecracker's configuration: the same kernel, initramfs, command line, memory and raw file
/// as the vmm's run.
fn firecracker_config() -> Vec<u8> {
    benches::firecracker_config(
        &format!("{CMDLINE} -- /bin/sh /bench.sh firecracker"),
        768,
        serde_json::json!({
            "drives": [{
                "drive_id": "d0",
                "path_on_host": "/srv/disk.img",
                "is_root_device": false,
                "is_read_only": false,
            }],
        }),
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let vmm = vmm()?;
    let baseline = args
        .vmm_baseline
        .clone()
        .or_else(|| std::env::var_os("VMM_BASELINE_BIN").map(PathBuf::from));
    let firecracker = match args.firecracker.clone() {
        Some(path) => Some(path),
        None => benches::optional_peer("FIRECRACKER_BIN")?,
    };
    for (what, path) in [
        ("the baseline vmm", &baseline),
        ("Firecracker", &firecracker),
    ] {
        if let Some(path) = path {
            if !path.is_file() {
                bail!("{what} {} is not a file", path.display());
            }
        }
    }
    let qemu = e2e_tests::qemu::qemu_binary()?;
    let kernel = artifacts::guest_kernel()?;
    let init = artifacts::guest_init()?;
    let fio = Path::new("/usr/bin/fio");
    if !fio.is_file() {
        bail!("fio not found: apt-get install fio");
    }
    let mut archive = microvm::guest_initramfs(&init, Path::new("/bin/busybox"))?;
    archive.file("usr/bin/fio", 0o755, Contents::HostFile(fio.to_owned()))?;
    for lib in shared_libraries(fio)? {
        archive.file(
            &lib.to_string_lossy(),
            0o755,
            Contents::HostFile(lib.clone()),
        )?;
    }
    archive.file(
        "bench.sh",
        0o755,
        Contents::Bytes(guest_script(args.seconds).into_bytes()),
    )?;
    let initrd = artifacts::target_dir().join("blk-bench-initrd.cpio");
    archive.write_file(&initrd)?;

    let qemu_cmd = format!(
        "qemu-system-x86_64 -M microvm,acpi=off,auto-kernel-cmdline=off,x-option-roms=off,rtc=off,isa-serial=on,pit=on,pic=on \
         -accel kvm -cpu host -smp 1 -m 768M -nodefaults -no-user-config -nographic -no-reboot \
         -serial stdio -kernel /guest/vmlinux -initrd /guest/initrd \
         -drive id=d0,file=/srv/disk.img,format=raw,if=none -device virtio-blk-device,drive=d0 \
         -append '{CMDLINE} {QEMU_VIRTIO_MMIO} -- /bin/sh /bench.sh qemu' </dev/null"
    );
    let mut script = format!("export VMM_LOG={}\n", args.vmm_log);
    script.push_str(
        "mkdir -p /srv && dd if=/dev/urandom of=/srv/disk.img bs=1M count=256 2>/dev/null\n",
    );
    let mut vmms = vec![("vmm", "/vmm")];
    if baseline.is_some() {
        vmms.push(("baseline", "/vmm-baseline"));
    }
    for _ in 0..args.runs {
        for (label, binary) in &vmms {
            script.push_str(&format!(
                "{binary} --kernel /guest/vmlinux --initrd /guest/initrd --memory 768 \
                 --drive id=d,path=/srv/disk.img -- /bin/sh /bench.sh {label} </dev/null\n"
            ));
        }
        if firecracker.is_some() {
            script.push_str("/firecracker --no-api --config-file /fc-blk.json </dev/null\n");
        }
        script.push_str(&qemu_cmd);
        script.push('\n');
    }
    let peers = vmms.len() + 1 + usize::from(firecracker.is_some());
    let per_round = args.seconds as u64 * JOBS.len() as u64 * peers as u64;
    let mut job = Job::new(script)
        .binary("/vmm", &vmm)
        .file("/guest/vmlinux", &kernel.vmlinux)
        .file("/guest/initrd", &initrd)
        .timeout(std::time::Duration::from_secs(
            1800 + 3 * per_round * args.runs as u64,
        ));
    if let Some(path) = &baseline {
        job = job.binary("/vmm-baseline", path);
    }
    if let Some(path) = &firecracker {
        job = job
            .binary("/firecracker", path)
            .data("/fc-blk.json", firecracker_config(), 0o644);
    }
    let mut bed = Testbed::from_system()?;
    bed.cpus = args.bed_cpus;
    let out = bed.run(&with_qemu(job, &qemu))?;
    let saved = artifacts::target_dir().join("blk-bench-output.txt");
    std::fs::write(&saved, &out.output)?;
    println!("(the job's whole output: {})", saved.display());

    // job -> program -> samples of (MiB/s, IOPS, mean latency in microseconds).
    let mut results: BTreeMap<String, BTreeMap<String, Vec<[f64; 3]>>> = BTreeMap::new();
    for line in out.output.lines() {
        let Some(rest) = line.trim_start().strip_prefix("FIO;") else {
            continue;
        };
        let fields: Vec<&str> = rest.split(';').collect();
        // program; job; then fio's terse v3 line (1-based fields): read bandwidth, IOPS and
        // mean total latency are fields 7, 8 and 40; the write ones 48, 49 and 81.
        let (Some(program), Some(job)) = (fields.first(), fields.get(1)) else {
            continue;
        };
        let terse = &fields[2..];
        let write = job.contains("write");
        let (bw_at, iops_at, lat_at) = if write { (47, 48, 80) } else { (6, 7, 39) };
        let number = |i: usize| terse.get(i).and_then(|v| v.parse::<f64>().ok());
        let (Some(bw), Some(iops), Some(lat)) = (number(bw_at), number(iops_at), number(lat_at))
        else {
            continue;
        };
        results
            .entry(job.to_string())
            .or_default()
            .entry(program.to_string())
            .or_default()
            .push([bw / 1024.0, iops, lat]);
    }
    if let Some(line) = out.output.lines().find(|l| l.contains("NODISK;")) {
        bail!("a guest had no disk: {line}");
    }
    let mut programs: Vec<&str> = vmms.iter().map(|(label, _)| *label).collect();
    if firecracker.is_some() {
        programs.push("firecracker");
    }
    programs.push("qemu");
    for (job, _) in JOBS {
        for p in &programs {
            let got = results
                .get(*job)
                .and_then(|r| r.get(*p))
                .map_or(0, Vec::len);
            if got != args.runs {
                bail!(
                    "{p} has {got} of {} results for {job}; the test bed's console:\n{}",
                    args.runs,
                    out.console
                );
            }
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut header = format!("{:<14}", "job");
    for p in &programs {
        header.push_str(&format!(
            " {:>10} {:>8} {:>8}",
            format!("{p} MiB/s"),
            "IOPS",
            "lat us"
        ));
    }
    header.push_str(&format!(" {:>10}", "vmm/qemu"));
    if firecracker.is_some() {
        header.push_str(&format!(" {:>8}", "vmm/fc"));
    }
    if baseline.is_some() {
        header.push_str(&format!(" {:>13}", "vmm/baseline"));
    }
    println!("{header}");
    for (job, by_program) in &results {
        let get = |name: &str| {
            by_program
                .get(name)
                .map(|s| [0, 1, 2].map(|i| median(s.iter().map(|x| x[i]).collect())))
                .unwrap_or_default()
        };
        let mut row = format!("{job:<14}");
        for p in &programs {
            let [bw, iops, lat] = get(p);
            row.push_str(&format!(" {bw:>10.1} {iops:>8.0} {lat:>8.0}"));
        }
        let ratio = |a: &str, b: &str| {
            let (a, b) = (get(a)[1], get(b)[1]);
            if b > 0.0 {
                a / b
            } else {
                f64::NAN
            }
        };
        row.push_str(&format!(" {:>9.2}x", ratio("vmm", "qemu")));
        if firecracker.is_some() {
            row.push_str(&format!(" {:>7.2}x", ratio("vmm", "firecracker")));
        }
        if baseline.is_some() {
            row.push_str(&format!(" {:>12.2}x", ratio("vmm", "baseline")));
        }
        println!("{row}");
    }
    println!(
        "(medians of {} rounds of {} s per job, on the test bed: compare the ratios)",
        args.runs, args.seconds
    );
    Ok(())
}
