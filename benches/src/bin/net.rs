//! Network benchmark on the test bed (a KVM host inside QEMU): a host program talks TCP to a
//! guest program through a tap (host side 10.0.2.1/24, the guest 10.0.2.2/24, configured by
//! the guest init from `gridnode.ip=`) and measures host->guest and guest->host throughput
//! (64 KiB writes, no hashing) and the round-trip time of 1-byte messages (TCP_NODELAY), in
//! one test-bed boot, through:
//!
//! - the vmm's virtio-net device (tap, worker thread in user space);
//! - QEMU `microvm` with `virtio-net-device` on `-netdev tap,vhost=off` (QEMU's user-space
//!   virtio-net);
//! - the same with `vhost=on` (the test bed's `vhost_net` module moves the frames in its
//!   kernel).
//!
//! The tap, guest kernel, initramfs and guest program are the same for all (1 vCPU,
//! 256 MiB). With `--repeat N` the peers run N times, interleaved, and the medians are
//! printed. Only the ratios carry over to real hosts. Both ends are `vsock-probe`
//! (guest-kernels/vsock-probe, its TCP modes).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use benches::{vmm, with_qemu};
use clap::Parser;
use e2e_tests::cpio::Contents;
use e2e_tests::{artifacts, microvm, Job, Testbed};

#[derive(Parser)]
struct Args {
    /// MiB moved each way.
    #[arg(long, default_value_t = 64)]
    mib: u64,
    /// 1-byte round trips.
    #[arg(long, default_value_t = 2000)]
    rounds: u64,
    /// How many times each peer is measured (interleaved); medians are reported.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// The vmm binary (default: the one built beside this program).
    #[arg(long)]
    vmm: Option<PathBuf>,
}

/// The guest kernel's arguments under QEMU (as the vsock benchmark's), and the place of
/// microvm's first virtio-mmio device, announced on the command line (no ACPI).
const QEMU_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodules i8042.noaux i8042.nomux i8042.dumbkbd";
const QEMU_VIRTIO_MMIO: &str = "virtio_mmio.device=512@0xfeb00e00:12";
/// The guest's network, the same for every VMM.
const GUEST_NET: &str = "gridnode.ip=eth0,10.0.2.2/24";
const MAC: &str = "02:00:0a:00:02:02";
const GUEST_PORT: u32 = 5000;
const PROGRESS: &str = "net-bench-progress:";

const PEERS: &[(&str, &str)] = &[
    ("vmm", "vmm virtio-net (tap)"),
    ("qemu", "QEMU virtio-net vhost=off"),
    ("vhost", "QEMU virtio-net vhost=on"),
];

const PEER_DEADLINE_S: u32 = 300;

/// The test-bed shell commands that measure `peer` once and print `RESULT <peer> <line>`.
fn measure(peer: &str, mib: u64, rounds: u64) -> String {
    let serve = format!("/bin/vsock-probe bench-serve-tcp {GUEST_PORT}");
    let (server, logs) = match peer {
        "vmm" => (
            format!(
                "/vmm --kernel /guest/vmlinux --initrd /guest/initrd --memory 256 \
                 --serial file:/tmp/vmm-console.log --net id=net0,tap=tap0,mac={MAC} \
                 --cmdline '{GUEST_NET}' -- {serve} > /tmp/vmm.log 2>&1"
            ),
            "/tmp/vmm.log /tmp/vmm-console.log",
        ),
        "qemu" | "vhost" => {
            let vhost = if peer == "vhost" { "on" } else { "off" };
            (
                format!(
                    "qemu-system-x86_64 -M microvm,acpi=off,auto-kernel-cmdline=off,x-option-roms=off,rtc=off,isa-serial=on,pit=on,pic=on \
                     -accel kvm -cpu host -smp 1 -m 256 -nodefaults -no-user-config -nographic \
                     -no-reboot -serial file:/tmp/qemu-console.log -device i8042 \
                     -netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost={vhost} \
                     -device virtio-net-device,netdev=n0,mac={MAC} \
                     -kernel /guest/vmlinux -initrd /guest/initrd \
                     -append '{QEMU_CMDLINE} {QEMU_VIRTIO_MMIO} {GUEST_NET} -- {serve}' \
                     > /tmp/qemu.log 2>&1"
                ),
                "/tmp/qemu.log /tmp/qemu-console.log",
            )
        }
        other => unreachable!("unknown peer {other}"),
    };
    format!(
        "echo '{PROGRESS} measuring {peer}' > /dev/console\n\
         ip neigh flush dev tap0 2>/dev/null\n\
         {server} & V=$!\n\
         /probe bench-tcp 10.0.2.2 {GUEST_PORT} {mib} {rounds} > /tmp/probe.log 2>&1 & P=$!\n\
         ( sleep {PEER_DEADLINE_S}; kill $P $V 2>/dev/null ) & K=$!\n\
         wait $P\n\
         R=\"RESULT {peer} $(tail -n 1 /tmp/probe.log)\"\n\
         echo \"$R\"; echo \"{PROGRESS} $R\" > /dev/console\n\
         case \"$R\" in *vsock-bench:*) ;; *) echo '{PROGRESS} {peer} failed; its logs:' > /dev/console; \
           tail -n 30 /tmp/probe.log {logs} 2>&1 | sed 's/^/{PROGRESS}   /' > /dev/console ;; esac\n\
         ( sleep 30; kill $V 2>/dev/null ) & K2=$!\n\
         wait $V\n\
         kill $K $K2 2>/dev/null\n"
    )
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    to_guest: f64,
    from_guest: f64,
    rtt_us: f64,
}

/// Reads the probe's `vsock-bench: to-server X MiB/s, from-server Y MiB/s, rtt Z us (...)`.
fn parse_probe_line(line: &str) -> Option<Sample> {
    let rest = line.split("vsock-bench:").nth(1)?;
    let number_after = |key: &str| -> Option<f64> {
        let at = rest.find(key)? + key.len();
        rest[at..].split_whitespace().next()?.parse().ok()
    };
    Some(Sample {
        to_guest: number_after("to-server ")?,
        from_guest: number_after("from-server ")?,
        rtt_us: number_after("rtt ")?,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Each peer's medians, in [`PEERS`] order; a peer without a result is left out (QEMU
/// with vhost may be missing) unless it is the vmm.
fn summarize(output: &str) -> Result<Vec<(&'static str, Sample)>> {
    let mut rows = Vec::new();
    for (peer, label) in PEERS {
        let prefix = format!("RESULT {peer} ");
        let samples: Vec<Sample> = output
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(parse_probe_line)
            .collect();
        if samples.is_empty() {
            if *peer == "vmm" {
                bail!("no result for {label}:\n{output}");
            }
            eprintln!("net bench: no result for {label}");
            continue;
        }
        let pick = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        rows.push((
            *label,
            Sample {
                to_guest: pick(|s| s.to_guest),
                from_guest: pick(|s| s.from_guest),
                rtt_us: pick(|s| s.rtt_us),
            },
        ));
    }
    Ok(rows)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let vmm = match args.vmm {
        Some(path) => path,
        None => vmm()?,
    };
    let qemu = e2e_tests::qemu::qemu_binary()?;
    let kernel = artifacts::guest_kernel()?;
    let init = artifacts::guest_init()?;
    let probe = artifacts::guest_program("vsock-probe")?;
    let initrd = artifacts::target_dir().join("net-bench-initrd.cpio");
    let mut archive = microvm::guest_initramfs(&init, std::path::Path::new("/bin/busybox"))?;
    archive.file("bin/vsock-probe", 0o755, Contents::HostFile(probe.clone()))?;
    archive.write_file(&initrd)?;

    let mut script = String::from(
        "mkdir -p /run\n[ -c /dev/vhost-net ] || echo 'no /dev/vhost-net'\n\
         tunctl -t tap0 > /dev/null && ip addr add 10.0.2.1/24 dev tap0 && ip link set tap0 up \
         || echo 'cannot make the tap'\n",
    );
    for _ in 0..args.repeat.max(1) {
        for (peer, _) in PEERS {
            script.push_str(&measure(peer, args.mib, args.rounds));
        }
    }
    let job = Job::new(script)
        .binary("/vmm", &vmm)
        .file("/probe", &probe)
        .file("/guest/vmlinux", &kernel.vmlinux)
        .file("/guest/initrd", &initrd)
        .timeout(Duration::from_secs(1200 * u64::from(args.repeat.max(1))));
    let mut bed = Testbed::from_system()?.with_modules(&["tun", "vhost_net"])?;
    bed.echo_console = Some(PROGRESS.to_string());
    eprintln!("net bench: booting the test bed; progress follows");
    let out = bed.run(&with_qemu(job, &qemu))?;
    if out.status != 0 {
        bail!(
            "the benchmark failed on the test bed (status {}):\n{}\n{}",
            out.status,
            out.output,
            out.console
        );
    }
    let rows = summarize(&out.output)?;
    let vmm_row = rows[0].1;
    println!(
        "TCP over virtio-net, {} MiB each way, {} round trips of 1 byte; medians of {} run(s), one test-bed boot",
        args.mib,
        args.rounds,
        args.repeat.max(1)
    );
    println!(
        "{:<28} {:>16} {:>16} {:>14}",
        "", "host->guest", "guest->host", "round trip"
    );
    for (label, s) in &rows {
        println!(
            "{label:<28} {:>10.1} MiB/s {:>10.1} MiB/s {:>11.0} us",
            s.to_guest, s.from_guest, s.rtt_us
        );
    }
    println!("vmm relative to each peer (throughput: >1 is faster; round trip: <1 is faster):");
    for (label, s) in &rows[1..] {
        println!(
            "  vs {label:<28} host->guest {:.2}x, guest->host {:.2}x, round trip {:.2}x",
            vmm_row.to_guest / s.to_guest,
            vmm_row.from_guest / s.from_guest,
            vmm_row.rtt_us / s.rtt_us
        );
    }
    println!("(measured on the test bed: a KVM host inside QEMU TCG; compare the ratios)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_probe_lines_and_keeps_the_peers_that_answered() {
        let line = "vsock-bench: to-server 21.1 MiB/s, from-server 15.8 MiB/s, rtt 860 us (64 MiB, 2000 round trips)";
        let output = format!("RESULT vmm {line}\nRESULT qemu {line}\nRESULT vhost x\n");
        let rows = summarize(&output).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].1.rtt_us, 860.0);
        assert!(summarize("RESULT qemu x\n").is_err());
    }
}
