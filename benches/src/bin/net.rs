//! Network benchmark on the test bed (a KVM host inside QEMU): the host talks to the guest
//! through a tap (host side 10.0.2.1/24, the guest 10.0.2.2/24, configured by the guest init
//! from `gridnode.ip=`) with iperf3 and ping from Debian's packages (the guest runs
//! `iperf3 -s`; the host measures host->guest and, with `-R`, guest->host TCP throughput, and
//! the ping round trip), in one test-bed boot, through:
//!
//! - the vmm's virtio-net device (tap, worker thread in user space);
//! - QEMU `microvm` with `virtio-net-device` on `-netdev tap,vhost=off` (QEMU's user-space
//!   virtio-net);
//! - the same with `vhost=on` (the test bed's `vhost_net` module moves the frames in its
//!   kernel).
//!
//! The tap, guest kernel, initramfs and guest programs are the same for all (1 vCPU,
//! 256 MiB). With `--repeat N` the peers run N times, interleaved, and the medians are
//! printed. Only the ratios carry over to real hosts.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use benches::{iperf3_receiver_rate, median, ping_average_ms, vmm, with_qemu};
use clap::Parser;
use e2e_tests::{artifacts, microvm, Job, Testbed};

#[derive(Parser)]
struct Args {
    /// Seconds of each iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Pings (10 ms apart).
    #[arg(long, default_value_t = 200)]
    pings: u32,
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
const IPERF: &str = "/usr/bin/iperf3";
const PING: &str = "/usr/bin/ping";
const PROGRESS: &str = "net-bench-progress:";

const PEERS: &[(&str, &str)] = &[
    ("vmm", "vmm virtio-net (tap)"),
    ("qemu", "QEMU virtio-net vhost=off"),
    ("vhost", "QEMU virtio-net vhost=on"),
];

const PEER_DEADLINE_S: u32 = 300;

/// The test-bed shell commands that measure `peer` once and print `RESULT <peer> <line>`.
fn measure(peer: &str, seconds: u32, pings: u32) -> String {
    // Every client is bounded: a guest that stops answering ends its run, not the benchmark.
    let limit = seconds * 4 + 30;
    let serve = format!("{IPERF} -s");
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
         ( sleep {PEER_DEADLINE_S}; kill $V 2>/dev/null ) & K=$!\n\
         i=0; until {PING} -c 1 -W 1 10.0.2.2 > /dev/null 2>&1 && timeout 20 {IPERF} -c 10.0.2.2 -t 1 --connect-timeout 5000 > /dev/null 2>&1; do \
           i=$((i+1)); [ $i -gt 120 ] && break; sleep 1; done\n\
         {{ echo '== to'; timeout {limit} {IPERF} -c 10.0.2.2 -t {seconds} -f M --connect-timeout 5000; \
           echo '== from'; timeout {limit} {IPERF} -c 10.0.2.2 -t {seconds} -f M -R --connect-timeout 5000; \
           echo '== ping'; timeout {limit} {PING} -c {pings} -i 0.01 -q 10.0.2.2; }} > /tmp/probe.log 2>&1\n\
         R=\"RESULT {peer} $(grep receiver /tmp/probe.log | tr '\\n' ' ') $(grep rtt /tmp/probe.log)\"\n\
         echo \"$R\"; echo \"{PROGRESS} $R\" > /dev/console\n\
         case \"$R\" in *receiver*receiver*rtt*) ;; *) echo '{PROGRESS} {peer} failed; its logs:' > /dev/console; \
           tail -n 30 /tmp/probe.log {logs} 2>&1 | sed 's/^/{PROGRESS}   /' > /dev/console ;; esac\n\
         kill $V 2>/dev/null; wait $V\n\
         kill $K 2>/dev/null\n"
    )
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    to_guest: f64,
    from_guest: f64,
    rtt_us: f64,
}

/// Reads `RESULT <peer> <iperf3 receiver line (to)> <iperf3 receiver line (from)> <ping rtt>`.
fn parse_result_line(line: &str) -> Option<Sample> {
    let mut receivers = line.split("receiver");
    let to = iperf3_receiver_rate(&format!("{} receiver", receivers.next()?))?;
    let from = iperf3_receiver_rate(&format!("{} receiver", receivers.next()?))?;
    Some(Sample {
        to_guest: to,
        from_guest: from,
        rtt_us: ping_average_ms(line)? * 1000.0,
    })
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
            .filter_map(parse_result_line)
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
    let initrd = artifacts::target_dir().join("net-bench-initrd.cpio");
    let mut archive = microvm::guest_initramfs(&init, std::path::Path::new("/bin/busybox"))?;
    for program in [IPERF, PING] {
        let path = std::path::Path::new(program);
        if !path.is_file() {
            bail!(
                "{program} is missing (Debian packages iperf3 and iputils-ping; scripts/setup.sh)"
            );
        }
        archive.program(program, path)?;
    }
    archive.write_file(&initrd)?;

    let mut script = String::from(
        "mkdir -p /run\n[ -c /dev/vhost-net ] || echo 'no /dev/vhost-net'\n\
         tunctl -t tap0 > /dev/null && ip addr add 10.0.2.1/24 dev tap0 && ip link set tap0 up \
         || echo 'cannot make the tap'\n",
    );
    for _ in 0..args.repeat.max(1) {
        for (peer, _) in PEERS {
            script.push_str(&measure(peer, args.seconds, args.pings));
        }
    }
    let job = Job::new(script)
        .binary("/vmm", &vmm)
        .binary(IPERF, IPERF)
        .binary(PING, PING)
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
        "TCP over virtio-net (iperf3, {} s each way) and ping ({} pings); medians of {} run(s), one test-bed boot",
        args.seconds,
        args.pings,
        args.repeat.max(1)
    );
    println!(
        "{:<28} {:>16} {:>16} {:>14}",
        "", "host->guest", "guest->host", "round trip"
    );
    for (label, s) in &rows {
        println!(
            "{label:<28} {:>10.1} MiB/s {:>10.1} MiB/s {:>11.1} us",
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
    fn reads_result_lines_and_keeps_the_peers_that_answered() {
        let line = "[  5] 0.00-5.04 sec 59.8 MBytes 11.9 MBytes/sec receiver [  5] 0.00-5.00 sec 40 MBytes 8.00 MBytes/sec receiver rtt min/avg/max/mdev = 0.301/0.412/0.803/0.081 ms";
        let output = format!("RESULT vmm {line}\nRESULT qemu {line}\nRESULT vhost x\n");
        let rows = summarize(&output).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].1.to_guest, 11.9);
        assert_eq!(rows[0].1.from_guest, 8.0);
        assert_eq!(rows[0].1.rtt_us, 412.0);
        assert!(summarize("RESULT qemu x\n").is_err());
    }
}
