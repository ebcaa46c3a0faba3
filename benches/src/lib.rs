//! What the benchmark drivers share: finding the programs built beside them, QEMU's firmware
//! files, running a benchmark job on the test bed, medians, and reading iperf3's and ping's
//! summaries.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use e2e_tests::{Job, Testbed};

/// QEMU's firmware for the microvm machine and the option ROMs it may load.
pub const QEMU_FIRMWARE: &[&str] = &[
    "/usr/share/qemu/bios-microvm.bin",
    "/usr/share/qemu/qboot.rom",
    "/usr/share/qemu/linuxboot_dma.bin",
    "/usr/share/qemu/pvh.bin",
];

/// A program built into the same directory as this one (`cargo build --release -p vmm -p
/// benches --bins` puts them all in `target/release`).
pub fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this program")?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p vmm -p flist-fs -p benches --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// The vmm under test: $VMM_BIN (what scripts/bench.sh sets: the shipped static-pie build of
/// scripts/build-vmm.sh), else the one built beside this program.
pub fn vmm() -> Result<PathBuf> {
    if std::env::var_os("VMM_BIN").is_some() {
        return Ok(e2e_tests::artifacts::vmm_binary()?);
    }
    sibling("vmm")
}

/// A peer program named by environment variable `var`, which must exist when set.
pub fn optional_peer(var: &str) -> Result<Option<PathBuf>> {
    let Some(path) = std::env::var_os(var).map(PathBuf::from) else {
        return Ok(None);
    };
    if !path.is_file() {
        bail!("{var}={} is not a file", path.display());
    }
    Ok(Some(path))
}

/// Adds QEMU and the firmware files this host has to a test-bed job.
pub fn with_qemu(mut job: Job, qemu: &Path) -> Job {
    job = job.binary("/usr/bin/qemu-system-x86_64", qemu);
    for firmware in QEMU_FIRMWARE {
        if Path::new(firmware).exists() {
            job = job.file(firmware, firmware);
        }
    }
    job
}

/// The first line of a long benchmark job's script: pauses the test bed's khugepaged. Its
/// collapses of guest memory wedged the bed's kernel under nested SVM on QEMU's software CPU
/// ("soft lockup ... [khugepaged]", and runs that stopped with both of the bed's CPUs busy and
/// no report). Huge pages at fault time stay, for every VMM alike. This is the bed's nested
/// virtualisation, not a VMM's doing; a real KVM host keeps its khugepaged.
pub const PAUSE_KHUGEPAGED: &str =
    "echo 3600000 > /sys/kernel/mm/transparent_hugepage/khugepaged/scan_sleep_millisecs \
     2>/dev/null || echo 'bench: khugepaged not paused'\n";

/// Runs a benchmark job on the test bed and prints what it printed.
pub fn run_on_testbed(job: &Job) -> Result<()> {
    run_on_testbed_echoing(job, None)
}

/// As [`run_on_testbed`], echoing the test bed's console lines that contain `progress` to
/// stderr while the job runs (the job writes them to /dev/console).
pub fn run_on_testbed_echoing(job: &Job, progress: Option<&str>) -> Result<()> {
    run_on_bed_echoing(Testbed::from_system()?, job, progress)
}

/// As [`run_on_testbed_echoing`], on `bed` (e.g. one with more kernel modules).
pub fn run_on_bed_echoing(mut bed: Testbed, job: &Job, progress: Option<&str>) -> Result<()> {
    bed.echo_console = progress.map(str::to_owned);
    let out = bed.run(job)?;
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

/// The share of pairs `(x, y)`, `x` from `a` and `y` from `b`, in which `x > y` (a tie counts
/// half): 0.5 when the two come from one distribution, near 1 when `a` is reliably larger (the
/// Mann-Whitney U statistic over the number of pairs). NaN when either is empty.
pub fn share_greater(a: &[f64], b: &[f64]) -> f64 {
    if a.is_empty() || b.is_empty() {
        return f64::NAN;
    }
    let wins: f64 = a
        .iter()
        .flat_map(|x| b.iter().map(move |y| (x, y)))
        .map(|(x, y)| match x.total_cmp(y) {
            std::cmp::Ordering::Greater => 1.0,
            std::cmp::Ordering::Equal => 0.5,
            std::cmp::Ordering::Less => 0.0,
        })
        .sum();
    wins / (a.len() * b.len()) as f64
}

/// The median (the mean of the middle two for an even count); NaN for none.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The receiver's rate in MiB/s from an iperf3 summary line printed with `-f M`
/// (`[  5]   0.00-5.04   sec  59.8 MBytes  11.9 MBytes/sec   receiver`).
pub fn iperf3_receiver_rate(line: &str) -> Option<f64> {
    if !line.contains("receiver") {
        return None;
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "MBytes/sec")?;
    words.get(at.checked_sub(1)?)?.parse().ok()
}

/// The average of ping's (iputils) `rtt min/avg/max/mdev = a/b/c/d ms`, in ms.
pub fn ping_average_ms(line: &str) -> Option<f64> {
    let values = line.split("rtt min/avg/max/mdev = ").nth(1)?;
    values.split('/').nth(1)?.parse().ok()
}

/// A Firecracker configuration file (`--no-api --config-file`) that boots the test bed's guest
/// (`/guest/vmlinux`, `/guest/initrd`) with `boot_args` (Firecracker puts its own
/// `virtio_mmio.device=` arguments before the guest init's `--`), one vCPU and `memory_mib`,
/// and the devices in `devices` (Firecracker's own sections: `drives`, `vsock`, ...).
pub fn firecracker_config(boot_args: &str, memory_mib: u32, devices: serde_json::Value) -> Vec<u8> {
    let mut config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": "/guest/vmlinux",
            "initrd_path": "/guest/initrd",
            "boot_args": boot_args,
        },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": memory_mib },
        // Required by Firecracker's config file, even empty.
        "drives": [],
    });
    if let (Some(config), serde_json::Value::Object(devices)) = (config.as_object_mut(), devices) {
        config.extend(devices);
    }
    config.to_string().into_bytes()
}

/// The devices case's guest command: the types of the virtio devices the guest's drivers
/// bound (sysfs), on one line boot_bench looks for, then idle.
const DEVICES_SCRIPT: &str = "d=''\nfor f in /sys/bus/virtio/devices/*/device; do [ -e \"$f\" ] && d=\"$d $(/bin/busybox cat \"$f\")\"; done\necho \"boot-bench-devices:$d\"\nexec /bin/busybox sleep 30\n";

/// The initramfs of boot_bench's guest (guest init and busybox), with `/devices.sh`, the
/// devices case's command (see boot_bench), written under the target directory.
pub fn boot_bench_initramfs() -> Result<PathBuf> {
    let init = e2e_tests::artifacts::guest_init()?;
    let initrd = e2e_tests::artifacts::target_dir().join("bench-initrd.cpio");
    e2e_tests::microvm::guest_initramfs(&init, Path::new("/bin/busybox"))?
        .file(
            "devices.sh",
            0o755,
            e2e_tests::cpio::Contents::Bytes(DEVICES_SCRIPT.as_bytes().to_vec()),
        )?
        .write_file(&initrd)?;
    Ok(initrd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_of_pairs_tells_a_shift_from_chance() {
        assert_eq!(share_greater(&[3.0, 4.0], &[1.0, 2.0]), 1.0);
        assert_eq!(share_greater(&[1.0, 2.0], &[3.0, 4.0]), 0.0);
        // Interleaved: [1, 3] is above [2, 4] in one pair of four, [1, 4] above [2, 3] in two
        // (chance); a tie counts half.
        assert_eq!(share_greater(&[1.0, 3.0], &[2.0, 4.0]), 0.25);
        assert_eq!(share_greater(&[1.0, 4.0], &[2.0, 3.0]), 0.5);
        assert_eq!(share_greater(&[2.0], &[2.0]), 0.5);
        assert!(share_greater(&[], &[1.0]).is_nan());
    }

    #[test]
    fn medians_and_summaries() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
        let line =
            "[  5]   0.00-5.04   sec  59.8 MBytes  11.9 MBytes/sec                  receiver";
        assert_eq!(iperf3_receiver_rate(line), Some(11.9));
        assert_eq!(
            iperf3_receiver_rate(&line.replace("receiver", "sender")),
            None
        );
        assert_eq!(
            ping_average_ms("rtt min/avg/max/mdev = 0.301/0.412/0.803/0.081 ms"),
            Some(0.412)
        );
    }
}
