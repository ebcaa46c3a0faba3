//! vsock benchmark on the test bed (a KVM host inside QEMU): a host program talks to a guest
//! program and measures host->guest and guest->host throughput (64 KiB writes, no hashing)
//! and the round-trip time of 1-byte messages, three or four ways in one test-bed boot:
//!
//! - the vmm's virtio-vsock device (Firecracker's convention: the host connects to the vmm's
//!   unix socket and writes `CONNECT <port>`);
//! - Firecracker's, the same way, when its binary is given (`--firecracker PATH` or
//!   `FIRECRACKER_BIN`; no API socket, a config file);
//! - QEMU `microvm` with `vhost-vsock-device` (the test bed's `vhost_vsock` module carries
//!   the data in its kernel; the host connects with AF_VSOCK to the guest's cid);
//! - a plain unix socket between two host processes (the baseline).
//!
//! The guest kernel, initramfs and guest program are the same for every VMM (1 vCPU,
//! 256 MiB). With `--repeat N` the peers are run N times, interleaved, and the medians are
//! printed. Only the ratios carry over to real hosts. Both ends are `vsock-probe`
//! (guest-kernels/vsock-probe).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use benches::{median, vmm, with_qemu};
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
    /// A Firecracker binary to measure too; FIRECRACKER_BIN also names it.
    #[arg(long)]
    firecracker: Option<PathBuf>,
}

/// The guest kernel's arguments under QEMU: the vmm's defaults (QEMU's microvm adds the
/// virtio-mmio devices itself).
const QEMU_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodules i8042.noaux i8042.nomux i8042.dumbkbd";
/// Where QEMU's microvm puts its first virtio-mmio device (IRQ 12). With ACPI off (our guest
/// kernel has no ACPI, and microvm's ACPI tables are how it would announce the device) the
/// guest learns of it from the command line, before the guest init's `--`.
const QEMU_VIRTIO_MMIO: &str = "virtio_mmio.device=512@0xfeb00e00:12";
const GUEST_PORT: u32 = 5000;
const VMM_CID: u32 = 3;
const QEMU_CID: u32 = 4;
const FIRECRACKER_CID: u32 = 5;

/// What the job's progress lines on the test bed's console start with (echoed as they come).
const PROGRESS: &str = "vsock-bench-progress:";

/// The peers, in the order they run and are reported (Firecracker only when it is given).
const PEERS: &[(&str, &str)] = &[
    ("vmm", "vmm virtio-vsock"),
    ("firecracker", "Firecracker virtio-vsock"),
    ("qemu", "QEMU vhost-vsock"),
    ("unix", "unix socket (baseline)"),
];

/// How long one peer's measurement may take on the test bed before its VM and probe are
/// killed (a stalled transfer then fails that sample instead of hanging the run).
const PEER_DEADLINE_S: u32 = 240;

/// The test-bed shell commands that measure `peer` once and print `RESULT <peer> <probe line>`.
/// The VM (`server`, started in the background as `$V`; none for the unix baseline) and the
/// host-side probe are both killed past [`PEER_DEADLINE_S`]; a failed sample echoes the
/// probe's output and the VM's logs to the console.
fn measure(peer: &str, mib: u64, rounds: u64) -> String {
    let (server, target, logs) = match peer {
        "unix" => (
            "/probe bench-serve-unix /run/base.sock > /tmp/server.log 2>&1".to_string(),
            "bench /run/base.sock 0".to_string(),
            "/tmp/server.log",
        ),
        "vmm" => (
            format!(
                "/vmm --kernel /guest/vmlinux --initrd /guest/initrd --memory 256 \
                 --serial file:/tmp/vmm-console.log --vsock cid={VMM_CID},uds=/run/v.sock \
                 -- /bin/vsock-probe bench-serve {GUEST_PORT} > /tmp/vmm.log 2>&1"
            ),
            format!("bench /run/v.sock {GUEST_PORT}"),
            "/tmp/vmm.log /tmp/vmm-console.log",
        ),
        "firecracker" => (
            // Firecracker will not bind over the last run's socket.
            "rm -f /run/fc.sock; /firecracker --no-api --config-file /fc-vsock.json > /tmp/fc.log 2>&1"
                .to_string(),
            format!("bench /run/fc.sock {GUEST_PORT}"),
            "/tmp/fc.log",
        ),
        "qemu" => (
            format!(
                "qemu-system-x86_64 -M microvm,acpi=off,auto-kernel-cmdline=off,x-option-roms=off,rtc=off,isa-serial=on,pit=on,pic=on \
                 -accel kvm -cpu host -smp 1 -m 256 -nodefaults -no-user-config -nographic \
                 -no-reboot -serial file:/tmp/qemu-console.log -device i8042 \
                 -device vhost-vsock-device,guest-cid={QEMU_CID} \
                 -kernel /guest/vmlinux -initrd /guest/initrd \
                 -append '{QEMU_CMDLINE} {QEMU_VIRTIO_MMIO} -- /bin/vsock-probe bench-serve {GUEST_PORT}' \
                 > /tmp/qemu.log 2>&1"
            ),
            format!("bench-vsock {QEMU_CID} {GUEST_PORT}"),
            "/tmp/qemu.log /tmp/qemu-console.log",
        ),
        other => unreachable!("unknown peer {other}"),
    };
    format!(
        "echo '{PROGRESS} measuring {peer}' > /dev/console\n\
         {server} & V=$!\n\
         /probe {target} {mib} {rounds} > /tmp/probe.log 2>&1 & P=$!\n\
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

/// One measurement: host->guest and guest->host MiB/s, round trip in µs.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    to_guest: f64,
    from_guest: f64,
    rtt_us: f64,
}

/// Reads `vsock-bench: to-server X MiB/s, from-server Y MiB/s, rtt Z us (...)`.
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

/// Firecracker's configuration: the same kernel, initramfs, command line and memory as the
/// vmm's run, and its vsock device on `/run/fc.sock`.
fn firecracker_config() -> Vec<u8> {
    benches::firecracker_config(
        &format!("{QEMU_CMDLINE} -- /bin/vsock-probe bench-serve {GUEST_PORT}"),
        256,
        serde_json::json!({
            "vsock": { "guest_cid": FIRECRACKER_CID, "uds_path": "/run/fc.sock" },
        }),
    )
}

/// The medians of each of `peers`' samples in `output`; fails naming a peer without any
/// result (its line is in `output`).
fn summarize(
    output: &str,
    peers: &[(&'static str, &'static str)],
) -> Result<Vec<(&'static str, Sample, usize)>> {
    let mut rows = Vec::new();
    for (peer, label) in peers {
        let prefix = format!("RESULT {peer} ");
        let samples: Vec<Sample> = output
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(parse_probe_line)
            .collect();
        if samples.is_empty() {
            bail!("no result for {label}:\n{output}");
        }
        let pick = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        rows.push((
            *label,
            Sample {
                to_guest: pick(|s| s.to_guest),
                from_guest: pick(|s| s.from_guest),
                rtt_us: pick(|s| s.rtt_us),
            },
            samples.len(),
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
    let initrd = artifacts::target_dir().join("vsock-bench-initrd.cpio");
    let mut archive = microvm::guest_initramfs(&init, std::path::Path::new("/bin/busybox"))?;
    archive.file("bin/vsock-probe", 0o755, Contents::HostFile(probe.clone()))?;
    archive.write_file(&initrd)?;

    let firecracker = match args.firecracker.clone() {
        Some(path) => Some(path),
        None => benches::optional_peer("FIRECRACKER_BIN")?,
    };
    let peers: Vec<(&str, &str)> = PEERS
        .iter()
        .copied()
        .filter(|(peer, _)| *peer != "firecracker" || firecracker.is_some())
        .collect();
    let mut script =
        String::from("mkdir -p /run\n[ -c /dev/vhost-vsock ] || echo 'no /dev/vhost-vsock'\n");
    for _ in 0..args.repeat.max(1) {
        for (peer, _) in &peers {
            script.push_str(&measure(peer, args.mib, args.rounds));
        }
    }
    let mut job = Job::new(script)
        .binary("/vmm", &vmm)
        .file("/probe", &probe)
        .file("/guest/vmlinux", &kernel.vmlinux)
        .file("/guest/initrd", &initrd)
        .timeout(Duration::from_secs(900 * u64::from(args.repeat.max(1))));
    if let Some(path) = &firecracker {
        if !path.is_file() {
            bail!("Firecracker {} is not a file", path.display());
        }
        job = job
            .binary("/firecracker", path)
            .data("/fc-vsock.json", firecracker_config(), 0o644);
    }
    let mut bed = Testbed::from_system()?.with_modules(&["vhost_vsock"])?;
    bed.echo_console = Some(PROGRESS.to_string());
    eprintln!("vsock bench: booting the test bed; progress follows");
    let out = bed.run(&with_qemu(job, &qemu))?;
    if out.status != 0 {
        bail!(
            "the benchmark failed on the test bed (status {}):\n{}\n{}",
            out.status,
            out.output,
            out.console
        );
    }
    let rows = summarize(&out.output, &peers)?;
    let vmm_row = rows[0].1;
    println!(
        "vsock, {} MiB each way, {} round trips of 1 byte; medians of {} run(s), one test-bed boot",
        args.mib,
        args.rounds,
        args.repeat.max(1)
    );
    println!(
        "{:<24} {:>16} {:>16} {:>14}",
        "", "host->guest", "guest->host", "round trip"
    );
    for (label, s, n) in &rows {
        let short = if *n < args.repeat.max(1) as usize {
            format!(" (only {n} sample(s))")
        } else {
            String::new()
        };
        println!(
            "{label:<24} {:>10.1} MiB/s {:>10.1} MiB/s {:>11.0} us{short}",
            s.to_guest, s.from_guest, s.rtt_us
        );
    }
    println!("vmm relative to each peer (throughput: >1 is faster; round trip: <1 is faster):");
    for (label, s, _) in &rows[1..] {
        println!(
            "  vs {label:<24} host->guest {:.2}x, guest->host {:.2}x, round trip {:.2}x",
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
    fn reads_the_probe_line_and_takes_medians() {
        let line = "vsock-bench: to-server 21.1 MiB/s, from-server 15.8 MiB/s, rtt 8600 us (64 MiB, 2000 round trips)";
        assert_eq!(
            parse_probe_line(line),
            Some(Sample {
                to_guest: 21.1,
                from_guest: 15.8,
                rtt_us: 8600.0
            })
        );
        assert_eq!(
            parse_probe_line("vsock-probe: error: connect: refused"),
            None
        );
        let output = format!(
            "RESULT vmm {line}\nRESULT vmm {}\nRESULT qemu {line}\nRESULT unix {line}\n",
            line.replace("21.1", "30.1")
        );
        let peers = [PEERS[0], PEERS[2], PEERS[3]];
        let rows = summarize(&output, &peers).unwrap();
        assert_eq!(rows[0].2, 2);
        assert!((rows[0].1.to_guest - 25.6).abs() < 1e-9);
        assert!(summarize("RESULT vmm x\n", &peers).is_err());
        // Firecracker measured but without a result: named.
        let err = summarize(&output, PEERS).unwrap_err().to_string();
        assert!(err.contains("Firecracker virtio-vsock"), "{err}");
    }
}
