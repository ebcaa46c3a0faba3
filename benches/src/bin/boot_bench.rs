//! Boot-time and memory-overhead benchmark, run on a KVM host (a real one, or the test bed):
//! boots the same kernel + initrd with the project's `vmm`, QEMU's `microvm` machine, and
//! optionally Firecracker and a second (baseline) vmm build, several times each, interleaved,
//! in two cases: `quiet` (the headline, time to init) and verbose (the kernel log on the serial
//! console, which mostly measures serial speed). Prints medians and ratios vmm/peer.
//!
//! Boot time: wall time from spawning the VMM to the guest init's `init: booted` line on the
//! serial console (the same marker for both VMMs). Memory overhead: the VMM process's RSS minus
//! the RSS of its guest-RAM mapping, read from /proc/PID/smaps while the guest idles.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    vmm: PathBuf,
    /// Another vmm build measured beside `--vmm` (e.g. main's, to report a change as a ratio).
    #[arg(long)]
    baseline_vmm: Option<PathBuf>,
    /// qemu-system-x86_64; omitted: QEMU is not measured.
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// A Firecracker binary; omitted: Firecracker is not measured.
    #[arg(long)]
    firecracker: Option<PathBuf>,
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initrd: PathBuf,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
}

/// A program that boots the guest.
enum Peer {
    Vmm(PathBuf),
    Qemu(PathBuf),
    Firecracker(PathBuf),
}

/// The kernel arguments a case adds to [`CMDLINE`]: `quiet` is the headline (time to init);
/// the verbose boot prints the kernel log over the emulated serial port, so it mostly
/// measures how fast each VMM's serial port is.
const CASES: &[(&str, &str)] = &[("quiet", "quiet"), ("verbose", "")];

const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodules i8042.noaux i8042.nomux i8042.dumbkbd";
const MARKER: &str = "init: booted";

struct Sample {
    boot: Duration,
    overhead_kib: u64,
    total_kib: u64,
}

/// Total RSS and the RSS of the largest mapping (guest RAM) of a process, in KiB.
fn rss_split(pid: u32) -> Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    let (mut total, mut largest_size, mut largest_rss, mut size) = (0, 0, 0, 0);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let (Some(key), Some(value)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(kib) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "Size:" => size = kib,
            "Rss:" => {
                total += kib;
                if size > largest_size {
                    largest_size = size;
                    largest_rss = kib;
                }
            }
            _ => {}
        }
    }
    Ok((total, largest_rss))
}

fn measure(mut child: Child, started: Instant) -> Result<Sample> {
    let stdout = child.stdout.take().context("no stdout")?;
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    let boot = loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            let _ = child.kill();
            bail!("the VMM exited before the guest printed {MARKER:?}");
        }
        if line.contains(MARKER) {
            break started.elapsed();
        }
    };
    // Let the guest settle into its idle entrypoint before reading memory.
    std::thread::sleep(Duration::from_millis(300));
    let (total_kib, guest_kib) = rss_split(child.id())?;
    let _ = child.kill();
    let _ = child.wait();
    Ok(Sample {
        boot,
        overhead_kib: total_kib.saturating_sub(guest_kib),
        total_kib,
    })
}

fn run_vmm(vmm: &PathBuf, args: &Args, extra: &str) -> Result<Sample> {
    let started = Instant::now();
    let mut cmd = Command::new(vmm);
    cmd.args(["--kernel".as_ref(), args.kernel.as_os_str()])
        .args(["--initrd".as_ref(), args.initrd.as_os_str()])
        .args(["--memory", &args.memory_mib.to_string()]);
    if !extra.is_empty() {
        cmd.args(["--cmdline", extra]);
    }
    let child = cmd
        .args(["--", "/bin/busybox", "sleep", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning vmm")?;
    measure(child, started)
}

fn kernel_args(extra: &str) -> String {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(" {extra}")
    };
    format!("{CMDLINE}{extra} -- /bin/busybox sleep 30")
}

fn run_qemu(qemu: &PathBuf, args: &Args, extra: &str) -> Result<Sample> {
    let started = Instant::now();
    let child = Command::new(qemu)
        .args([
            "-M",
            "microvm,x-option-roms=off,rtc=off,isa-serial=on,pit=on,pic=on",
        ])
        .args(["-accel", "kvm", "-cpu", "host", "-smp", "1"])
        .args(["-m", &format!("{}M", args.memory_mib)])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio"])
        .args(["-kernel".as_ref(), args.kernel.as_os_str()])
        .args(["-initrd".as_ref(), args.initrd.as_os_str()])
        .args(["-append", &kernel_args(extra)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning qemu")?;
    measure(child, started)
}

/// Firecracker without its API socket, from a config file written next to the initrd.
fn run_firecracker(firecracker: &PathBuf, args: &Args, extra: &str) -> Result<Sample> {
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": args.kernel,
            "initrd_path": args.initrd,
            "boot_args": kernel_args(extra),
        },
        "drives": [],
        "machine-config": { "vcpu_count": 1, "mem_size_mib": args.memory_mib },
    });
    let path = std::env::temp_dir().join(format!(
        "boot-bench-firecracker-{}.json",
        std::process::id()
    ));
    std::fs::write(&path, config.to_string())
        .with_context(|| format!("writing {}", path.display()))?;
    let started = Instant::now();
    let child = Command::new(firecracker)
        .args([
            "--no-api".as_ref(),
            "--config-file".as_ref(),
            path.as_os_str(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning firecracker")?;
    let sample = measure(child, started);
    let _ = std::fs::remove_file(&path);
    sample
}

fn run(peer: &Peer, args: &Args, extra: &str) -> Result<Sample> {
    match peer {
        Peer::Vmm(path) => run_vmm(path, args, extra),
        Peer::Qemu(path) => run_qemu(path, args, extra),
        Peer::Firecracker(path) => run_firecracker(path, args, extra),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn report(name: &str, samples: &[Sample]) -> (f64, f64) {
    let boot = median(
        samples
            .iter()
            .map(|s| s.boot.as_secs_f64() * 1000.0)
            .collect(),
    );
    let overhead = median(
        samples
            .iter()
            .map(|s| s.overhead_kib as f64 / 1024.0)
            .collect(),
    );
    let total = median(
        samples
            .iter()
            .map(|s| s.total_kib as f64 / 1024.0)
            .collect(),
    );
    println!(
        "{name:<14} boot {boot:>9.1} ms (median of {}; min {:.1}, max {:.1})   overhead {overhead:>6.1} MiB   total RSS {total:>6.1} MiB",
        samples.len(),
        samples.iter().map(|s| s.boot.as_secs_f64() * 1000.0).fold(f64::MAX, f64::min),
        samples.iter().map(|s| s.boot.as_secs_f64() * 1000.0).fold(0.0, f64::max),
    );
    (boot, overhead)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut peers = vec![("vmm", Peer::Vmm(args.vmm.clone()))];
    if let Some(path) = &args.baseline_vmm {
        peers.push(("baseline vmm", Peer::Vmm(path.clone())));
    }
    if let Some(path) = &args.qemu {
        peers.push(("qemu microvm", Peer::Qemu(path.clone())));
    }
    if let Some(path) = &args.firecracker {
        peers.push(("firecracker", Peer::Firecracker(path.clone())));
    }
    for (case, extra) in CASES {
        println!(
            "== {case} boot{}",
            if *case == "quiet" {
                " (headline: time to init)"
            } else {
                " (kernel log on the serial console: mostly serial speed)"
            }
        );
        // Runs interleave the peers, so that load changes on the host hit them alike.
        let mut samples: Vec<Vec<Sample>> = peers.iter().map(|_| Vec::new()).collect();
        for _ in 0..args.runs {
            for ((_, peer), out) in peers.iter().zip(samples.iter_mut()) {
                out.push(run(peer, &args, extra)?);
            }
        }
        let results: Vec<(f64, f64)> = peers
            .iter()
            .zip(&samples)
            .map(|((name, _), s)| report(name, s))
            .collect();
        let (vmm_boot, vmm_overhead) = results[0];
        for ((name, _), (boot, overhead)) in peers.iter().zip(&results).skip(1) {
            println!(
                "ratio vmm/{name} ({case}): boot {:.2}x, memory overhead {:.2}x",
                vmm_boot / boot,
                vmm_overhead / overhead
            );
        }
    }
    Ok(())
}
