//! Boot-time and memory-overhead benchmark, run on a KVM host (a real one, or the test bed):
//! boots the same kernel + initrd with the project's `vmm`, QEMU's `microvm` machine, and
//! optionally Firecracker and a second (baseline) vmm build, several times each, interleaved,
//! in three cases: `quiet` (the headline, time to init), verbose (the kernel log on the serial
//! console, which mostly measures serial speed) and `devices` (quiet, with every device the
//! VMM has: a block drive, an entropy device, a vsock device (QEMU's is vhost-vsock: the host
//! needs the `vhost_vsock` module), and for the vmm a virtio-fs share). Prints medians and
//! ratios vmm/peer. In the devices case the guest runs `/devices.sh` (in the initramfs), which
//! prints the virtio device types it found; a boot that does not show every device its VMM was
//! given fails, so no VMM is timed without its devices.
//!
//! Boot time: wall time from spawning the VMM to the guest init's `init: booted` line on the
//! serial console (the same marker for every VMM). Memory overhead: the VMM process's RSS minus
//! the RSS of its guest-RAM mapping, read from /proc/PID/smaps while the guest idles.
//! Each boot's progress line also says where that overhead lives (file mappings, and how much of
//! them is dirty; heap; other anonymous memory: thread stacks, malloc arenas, buffers).
//!
//! Every boot has a deadline (`--boot-timeout-secs`): a VMM that does not show the marker by
//! then is killed, and the peer, case and the last lines it printed are reported; that peer is
//! left out of the rest of the run, the others go on, and the run fails at the end.
//!
//! Firecracker runs without its API socket (`--no-api --config-file`); it has no status ports,
//! so it is ended by a kill after the measurement, like every peer.
//!
//! The verbose case also compares the guest's kernel log under the vmm with each peer's, line
//! by line (the last boot of each): the gaps between lines both print that differ, so a wait
//! that is the vmm's shows as the line it delays.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
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
    /// Deadline of one boot (VMM start to the marker).
    #[arg(long, default_value_t = 60)]
    boot_timeout_secs: u64,
    /// Only these cases (repeatable): quiet, verbose, devices. Default: all.
    #[arg(long = "case")]
    cases: Vec<String>,
    /// Where to write a `boot-bench: ...` line after every boot (e.g. /dev/console on the
    /// test bed, whose console is shown while the run goes on).
    #[arg(long)]
    progress: Option<PathBuf>,
    /// Sets the kernel's fault-around to one page (debugfs: the test bed, as root) and prints,
    /// after each boot of `--vmm`, the pages of its binary that are resident, i.e. exactly the
    /// pages it touched (`text-pages` progress lines, file page numbers): the input of
    /// `scripts/vmm-symbol-order.py --testbed`. Changes every peer's memory numbers (no
    /// neighbours faulted in): for the symbol order, not for results.
    #[arg(long)]
    text_pages: bool,
}

/// Writes one progress line to `--progress` (best effort: progress is not a result).
fn progress(args: &Args, line: &str) {
    use std::io::Write;
    if let Some(path) = &args.progress {
        if let Ok(mut out) = std::fs::OpenOptions::new().append(true).open(path) {
            let _ = writeln!(out, "boot-bench: {line}");
        }
    }
}

/// A program that boots the guest.
enum Peer {
    Vmm(PathBuf),
    Qemu(PathBuf),
    Firecracker(PathBuf),
}

/// What a case adds to a boot.
struct Case {
    name: &'static str,
    /// Kernel arguments added to [`CMDLINE`].
    extra: &'static str,
    /// Every device the VMM has (block, entropy, vsock; virtio-fs for the vmm).
    devices: bool,
    /// The guest init's command (after `--`).
    command: &'static [&'static str],
    about: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "quiet",
        extra: "quiet",
        devices: false,
        command: IDLE,
        about: "headline: time to init",
    },
    Case {
        name: "verbose",
        // Timestamps on every line (the guest kernel is built without them by default), for
        // the line-by-line comparison of the logs.
        extra: "printk.time=1",
        devices: false,
        command: IDLE,
        about: "kernel log on the serial console: mostly serial speed",
    },
    Case {
        name: "devices",
        extra: "quiet",
        devices: true,
        command: &["/bin/busybox", "sh", "/devices.sh"],
        about: "quiet, every device: block, entropy, vsock (+ virtio-fs for the vmm)",
    },
];

/// The guest's command when it only idles.
const IDLE: &[&str] = &["/bin/busybox", "sleep", "30"];

/// What `/devices.sh` prints before the virtio device types it found (`0x0002` ...), then it
/// idles (the initramfs's script: boot.rs writes it).
const DEVICES_LINE: &str = "boot-bench-devices:";
/// virtio device types: block, entropy, vsock (every peer in the devices case), fs (the vmm).
const BLOCK_RNG_VSOCK: &[&str] = &["0x0002", "0x0004", "0x0013"];
const VIRTIO_FS: &str = "0x001a";

/// Where QEMU's `microvm` (ACPI and its own command line off: the guest kernel has no ACPI,
/// and QEMU would add these after the guest init's `--`) puts its virtio-mmio transports, in
/// the order of the `-device` arguments: the last transport first, one IRQ lower each.
const QEMU_DEVICES_MMIO: &str = "virtio_mmio.device=512@0xfeb00e00:12 \
     virtio_mmio.device=512@0xfeb00c00:11 virtio_mmio.device=512@0xfeb00a00:10";

const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodules i8042.noaux i8042.nomux i8042.dumbkbd";
const MARKER: &str = "init: booted";
/// Console lines kept to show what a VMM that failed printed last.
const TAIL_LINES: usize = 15;
/// Console lines kept per boot for the boot-log comparison.
const MAX_CONSOLE_LINES: usize = 5000;
/// A gap between two kernel log lines that differs by at least this much between two VMMs is
/// listed by the boot-log comparison.
const GAP_LISTED_MS: f64 = 2.0;

struct Sample {
    boot: Duration,
    overhead_kib: u64,
    total_kib: u64,
    /// Where the overhead lives (Resident::breakdown), shown per boot.
    breakdown: String,
    /// The console lines before the marker (the kernel's log in the verbose case).
    console: Vec<String>,
    /// With `--text-pages`, for `--vmm`: its binary's resident pages (file page numbers).
    binary_pages: Vec<u64>,
}

/// Files the boots share: the block device's image, the virtio-fs share, sockets, configs.
struct Scratch {
    dir: PathBuf,
    disk: PathBuf,
    share: PathBuf,
}

impl Scratch {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("boot-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let disk = dir.join("disk.img");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(64 << 20))
            .with_context(|| format!("creating {}", disk.display()))?;
        let share = dir.join("share");
        std::fs::create_dir_all(&share)?;
        std::fs::write(share.join("hello"), b"hello\n")?;
        Ok(Self { dir, disk, share })
    }

    /// A vsock socket path, removed first (a VMM refuses to bind over an old one).
    fn vsock(&self) -> PathBuf {
        let path = self.dir.join("vsock.sock");
        let _ = std::fs::remove_file(&path);
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A process's resident memory from /proc/PID/smaps, in KiB: the total, the largest mapping
/// (guest RAM), and where the rest lives (the overhead's breakdown).
#[derive(Default)]
struct Resident {
    total: u64,
    guest: u64,
    /// Mappings of files: the VMM's code, read-only data and data, shared libraries.
    files: u64,
    /// Private dirty KiB of those file mappings (relocated or written data).
    files_dirty: u64,
    heap: u64,
    /// Anonymous mappings other than guest RAM: thread stacks, malloc arenas, buffers.
    anon: u64,
    /// Everything else: [stack], [vdso], KVM's vCPU run areas.
    other: u64,
}

impl Resident {
    fn read(pid: u32) -> Result<Self> {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
            .with_context(|| format!("reading /proc/{pid}/smaps"))?;
        let mut resident = Self::default();
        // (name, size, rss, private dirty) of each mapping.
        let mut maps: Vec<(String, u64, u64, u64)> = Vec::new();
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let Some(first) = words.next() else { continue };
            if first.contains('-') && !first.ends_with(':') {
                // A mapping's header: range perms offset dev inode [name].
                let name = line.split_whitespace().nth(5).unwrap_or("").to_owned();
                maps.push((name, 0, 0, 0));
                continue;
            }
            let (Some(map), Some(Ok(kib))) = (maps.last_mut(), words.next().map(str::parse::<u64>))
            else {
                continue;
            };
            match first {
                "Size:" => map.1 = kib,
                "Rss:" => map.2 = kib,
                "Private_Dirty:" => map.3 = kib,
                _ => {}
            }
        }
        let guest = maps
            .iter()
            .enumerate()
            .max_by_key(|(_, m)| m.1)
            .map(|(i, _)| i);
        for (i, (name, _, rss, dirty)) in maps.iter().enumerate() {
            resident.total += rss;
            if Some(i) == guest {
                resident.guest = *rss;
            } else if name.starts_with('/') {
                resident.files += rss;
                resident.files_dirty += dirty;
            } else if name == "[heap]" {
                resident.heap += rss;
            } else if name.is_empty() {
                resident.anon += rss;
            } else {
                resident.other += rss;
            }
        }
        Ok(resident)
    }

    fn overhead(&self) -> u64 {
        self.total.saturating_sub(self.guest)
    }

    fn breakdown(&self) -> String {
        format!(
            "files {} KiB ({} dirty), heap {} KiB, anon {} KiB, other {} KiB",
            self.files, self.files_dirty, self.heap, self.anon, self.other
        )
    }
}

/// The last `TAIL_LINES` lines of a file (the VMM's stderr), for error reports.
fn file_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// Waits (until `timeout`) for the marker on the child's stdout, then reads its memory (the
/// caller kills the child on every path).
fn wait_and_read(
    child: &mut Child,
    started: Instant,
    timeout: Duration,
    stderr: &Path,
    devices: &[&str],
    pages_of: Option<&Path>,
) -> Result<Sample> {
    let stdout = child.stdout.take().context("no stdout")?;
    let (lines_tx, lines) = mpsc::channel::<String>();
    // Ends when the child's stdout closes (the child exited or was killed).
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if lines_tx
                        .send(String::from_utf8_lossy(&line).into_owned())
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    let deadline = started + timeout;
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    let mut console = Vec::new();
    let boot = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(MARKER) => break started.elapsed(),
            Ok(line) => {
                if console.len() < MAX_CONSOLE_LINES {
                    console.push(line.trim_end().to_owned());
                }
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.trim_end().to_owned());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                bail!(
                    "no {MARKER:?} within {timeout:?}: killed; its last console lines:\n{}\n\
                     its stderr:\n{}",
                    Vec::from(tail).join("\n"),
                    file_tail(stderr)
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                bail!(
                    "exited ({status}) before the guest printed {MARKER:?}; its last console \
                     lines:\n{}\nits stderr:\n{}",
                    Vec::from(tail).join("\n"),
                    file_tail(stderr)
                );
            }
        }
    };
    if !devices.is_empty() {
        // Printed right after the marker; bounded by the boot's deadline.
        let seen = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.trim_end().split(DEVICES_LINE).nth(1) {
                        break rest
                            .split_whitespace()
                            .map(str::to_owned)
                            .collect::<Vec<_>>();
                    }
                }
                Err(_) => bail!(
                    "the guest booted but did not list its devices ({DEVICES_LINE:?}) in time; \
                     its stderr:\n{}",
                    file_tail(stderr)
                ),
            }
        };
        let missing: Vec<&&str> = devices
            .iter()
            .filter(|d| !seen.iter().any(|s| s == *d))
            .collect();
        if !missing.is_empty() {
            bail!(
                "the guest lacks virtio device type(s) {missing:?} its VMM was given \
                 (it found {seen:?})"
            );
        }
    }
    // Let the guest settle into its idle entrypoint before reading memory.
    std::thread::sleep(Duration::from_millis(300));
    let resident = Resident::read(child.id())?;
    let binary_pages = match pages_of {
        Some(binary) => resident_file_pages(child.id(), binary)?,
        None => Vec::new(),
    };
    Ok(Sample {
        boot,
        overhead_kib: resident.overhead(),
        total_kib: resident.total,
        breakdown: resident.breakdown(),
        console,
        binary_pages,
    })
}

/// x86_64's page size.
const PAGE: u64 = 4096;
/// The longest mapping of a binary read from /proc/PID/pagemap (1 GiB).
const MAX_BINARY_MAPPING: u64 = 1 << 30;
/// `text-pages` page ranges per progress line.
const RANGES_PER_LINE: usize = 32;

/// The pages of `binary` that process `pid` has resident through its file mappings
/// (/proc/PID/maps, and the present bit of /proc/PID/pagemap), as sorted file page numbers.
fn resident_file_pages(pid: u32, binary: &Path) -> Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let binary =
        std::fs::canonicalize(binary).with_context(|| format!("resolving {}", binary.display()))?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("reading /proc/{pid}/maps"))?;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .with_context(|| format!("opening /proc/{pid}/pagemap"))?;
    let mut pages = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let fields: Vec<&str> = line.splitn(6, ' ').collect();
        let [range, _, offset, _, _, path] = fields[..] else {
            continue;
        };
        if Path::new(path.trim_start()) != binary {
            continue;
        }
        let parse = |hex: &str| {
            u64::from_str_radix(hex, 16).with_context(|| format!("bad maps line {line:?}"))
        };
        let (lo, hi) = range
            .split_once('-')
            .with_context(|| format!("bad maps line {line:?}"))?;
        let (lo, hi, offset) = (parse(lo)?, parse(hi)?, parse(offset)?);
        let len = hi.checked_sub(lo).unwrap_or(u64::MAX);
        if len > MAX_BINARY_MAPPING || lo % PAGE != 0 || len % PAGE != 0 || offset % PAGE != 0 {
            bail!("unexpected mapping of {}: {line:?}", binary.display());
        }
        let mut entries = vec![0u8; (len / PAGE * 8) as usize];
        pagemap
            .read_exact_at(&mut entries, lo / PAGE * 8)
            .with_context(|| format!("reading /proc/{pid}/pagemap for {line:?}"))?;
        for (i, entry) in entries.chunks_exact(8).enumerate() {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(entry);
            // Bit 63: present in RAM and mapped by this process.
            if u64::from_le_bytes(bytes) >> 63 == 1 {
                pages.push(offset / PAGE + i as u64);
            }
        }
    }
    if pages.is_empty() {
        bail!("no resident page of {} in process {pid}", binary.display());
    }
    pages.sort_unstable();
    pages.dedup();
    Ok(pages)
}

/// Sorted page numbers as hex ranges (`first-last`, or one page alone).
fn page_ranges(pages: &[u64]) -> Vec<String> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &page in pages {
        match ranges.last_mut() {
            Some((_, last)) if *last + 1 == page => *last = page,
            _ => ranges.push((page, page)),
        }
    }
    ranges
        .into_iter()
        .map(|(first, last)| {
            if first == last {
                format!("{first:x}")
            } else {
                format!("{first:x}-{last:x}")
            }
        })
        .collect()
}

/// Sets the kernel's fault-around (debugfs, mounted here if it is not) to one page, so that a
/// process's resident file pages are the ones it touched. Returns the value it replaced.
fn one_page_fault_around() -> Result<String> {
    let knob = Path::new("/sys/kernel/debug/fault_around_bytes");
    if !knob.exists() {
        // SAFETY: constant NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                c"debugfs".as_ptr(),
                c"/sys/kernel/debug".as_ptr(),
                c"debugfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!(
                "mounting debugfs on /sys/kernel/debug: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let read = || {
        std::fs::read_to_string(knob)
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("reading {}", knob.display()))
    };
    let old = read()?;
    std::fs::write(knob, PAGE.to_string())
        .with_context(|| format!("writing {}", knob.display()))?;
    let now = read()?;
    if now != PAGE.to_string() {
        bail!("{} is {now} after writing {PAGE}", knob.display());
    }
    Ok(old)
}

/// Spawns `cmd` with stdout piped, stderr to `stderr`, measures it and kills it.
fn spawn_and_measure(
    mut cmd: Command,
    args: &Args,
    stderr: &Path,
    devices: &[&str],
    pages_of: Option<&Path>,
) -> Result<Sample> {
    let err_file =
        std::fs::File::create(stderr).with_context(|| format!("creating {}", stderr.display()))?;
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err_file)
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    let timeout = Duration::from_secs(args.boot_timeout_secs);
    let result = wait_and_read(&mut child, started, timeout, stderr, devices, pages_of);
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn run_vmm(vmm: &Path, args: &Args, case: &Case, scratch: &Scratch) -> Result<Sample> {
    let mut cmd = Command::new(vmm);
    cmd.args(["--kernel".as_ref(), args.kernel.as_os_str()])
        .args(["--initrd".as_ref(), args.initrd.as_os_str()])
        .args(["--memory", &args.memory_mib.to_string()]);
    if !case.extra.is_empty() {
        cmd.args(["--cmdline", case.extra]);
    }
    if case.devices {
        cmd.arg("--drive")
            .arg(format!("id=disk,path={}", scratch.disk.display()))
            .arg("--rng")
            .arg("--vsock")
            .arg(format!("cid=3,uds={}", scratch.vsock().display()))
            .arg("--fs")
            .arg(format!("tag=share,dir={}", scratch.share.display()));
    }
    cmd.arg("--").args(case.command);
    let devices: Vec<&str> = if case.devices {
        BLOCK_RNG_VSOCK.iter().copied().chain([VIRTIO_FS]).collect()
    } else {
        Vec::new()
    };
    let pages_of = (args.text_pages && vmm == args.vmm).then_some(vmm);
    spawn_and_measure(cmd, args, &scratch.dir.join("stderr"), &devices, pages_of)
}

/// The kernel command line of a peer (QEMU, Firecracker) in `case`, with `more` arguments.
fn kernel_args(case: &Case, more: &str) -> String {
    let mut line = CMDLINE.to_string();
    for extra in [case.extra, more] {
        if !extra.is_empty() {
            line.push(' ');
            line.push_str(extra);
        }
    }
    format!("{line} -- {}", case.command.join(" "))
}

/// Measures a peer (QEMU, Firecracker) started by `cmd` in `case`, with the devices it is given
/// there.
fn measure_peer(cmd: Command, args: &Args, case: &Case, scratch: &Scratch) -> Result<Sample> {
    let devices = if case.devices { BLOCK_RNG_VSOCK } else { &[] };
    spawn_and_measure(cmd, args, &scratch.dir.join("stderr"), devices, None)
}

fn run_qemu(qemu: &Path, args: &Args, case: &Case, scratch: &Scratch) -> Result<Sample> {
    // With devices, ACPI and QEMU's own command line off (see QEMU_DEVICES_MMIO).
    let machine = if case.devices {
        "microvm,x-option-roms=off,rtc=off,isa-serial=on,pit=on,pic=on,acpi=off,auto-kernel-cmdline=off"
    } else {
        "microvm,x-option-roms=off,rtc=off,isa-serial=on,pit=on,pic=on"
    };
    let mut cmd = Command::new(qemu);
    cmd.args(["-M", machine])
        .args(["-accel", "kvm", "-cpu", "host", "-smp", "1"])
        .args(["-m", &format!("{}M", args.memory_mib)])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio"])
        .args(["-kernel".as_ref(), args.kernel.as_os_str()])
        .args(["-initrd".as_ref(), args.initrd.as_os_str()]);
    if case.devices {
        // In the order QEMU_DEVICES_MMIO lists their transports.
        cmd.arg("-drive")
            .arg(format!(
                "id=disk,file={},format=raw,if=none",
                scratch.disk.display()
            ))
            .args(["-device", "virtio-blk-device,drive=disk"])
            .args(["-device", "virtio-rng-device"])
            .args(["-device", "vhost-vsock-device,guest-cid=3"])
            .args(["-append", &kernel_args(case, QEMU_DEVICES_MMIO)]);
    } else {
        cmd.args(["-append", &kernel_args(case, "")]);
    }
    measure_peer(cmd, args, case, scratch)
}

/// Firecracker without its API socket, from a config file in the scratch dir.
fn run_firecracker(fc: &Path, args: &Args, case: &Case, scratch: &Scratch) -> Result<Sample> {
    let mut config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": args.kernel,
            "initrd_path": args.initrd,
            "boot_args": kernel_args(case, ""),
        },
        "drives": [],
        "machine-config": { "vcpu_count": 1, "mem_size_mib": args.memory_mib },
    });
    if case.devices {
        config["drives"] = serde_json::json!([{
            "drive_id": "disk",
            "path_on_host": scratch.disk,
            "is_root_device": false,
            "is_read_only": false,
        }]);
        config["entropy"] = serde_json::json!({});
        config["vsock"] = serde_json::json!({ "guest_cid": 3, "uds_path": scratch.vsock() });
    }
    let path = scratch.dir.join("firecracker.json");
    std::fs::write(&path, config.to_string())
        .with_context(|| format!("writing {}", path.display()))?;
    let mut cmd = Command::new(fc);
    cmd.args([
        "--no-api".as_ref(),
        "--config-file".as_ref(),
        path.as_os_str(),
    ]);
    measure_peer(cmd, args, case, scratch)
}

fn run(peer: &Peer, args: &Args, case: &Case, scratch: &Scratch) -> Result<Sample> {
    match peer {
        Peer::Vmm(path) => run_vmm(path, args, case, scratch),
        Peer::Qemu(path) => run_qemu(path, args, case, scratch),
        Peer::Firecracker(path) => run_firecracker(path, args, case, scratch),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn report(name: &str, samples: &[Sample]) -> (f64, f64) {
    let ms: Vec<f64> = samples
        .iter()
        .map(|s| s.boot.as_secs_f64() * 1000.0)
        .collect();
    let boot = median(ms.clone());
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
        ms.iter().copied().fold(f64::MAX, f64::min),
        ms.iter().copied().fold(0.0, f64::max),
    );
    (boot, overhead)
}

/// A kernel log line's timestamp in ms and its text (`[    1.234567] text`).
fn kernel_line(line: &str) -> Option<(f64, &str)> {
    let rest = line
        .trim_start_matches(|c: char| c != '[')
        .strip_prefix('[')?;
    let (stamp, text) = rest.split_once(']')?;
    let secs: f64 = stamp.trim().parse().ok()?;
    Some((secs * 1000.0, text.trim()))
}

/// The lines of two kernel logs that both print exactly once, in the order of both: each as
/// (text, time in `a`, time in `b`).
fn common_lines<'a>(a: &'a [String], b: &'a [String]) -> Vec<(&'a str, f64, f64)> {
    use std::collections::HashMap;
    let index = |log: &'a [String]| {
        let mut seen: HashMap<&'a str, Option<f64>> = HashMap::new();
        for (t, text) in log.iter().filter_map(|l| kernel_line(l)) {
            seen.entry(text)
                .and_modify(|v| *v = None)
                .or_insert(Some(t));
        }
        seen
    };
    let (in_a, in_b) = (index(a), index(b));
    let mut out: Vec<(&str, f64, f64)> = Vec::new();
    for (_, text) in a.iter().filter_map(|l| kernel_line(l)) {
        if let (Some(Some(ta)), Some(Some(tb))) = (in_a.get(text), in_b.get(text)) {
            if out.last().is_none_or(|&(_, _, last_b)| *tb >= last_b) {
                out.push((text, *ta, *tb));
            }
        }
    }
    out
}

/// Compares the vmm's kernel log with a peer's, line by line: between each two lines both
/// print, how much longer the guest took under one VMM than under the other; lists the gaps
/// that differ by [`GAP_LISTED_MS`] or more, and the time outside the kernel's log (from the
/// VMM's start to the first line, and after the last).
fn compare_boot_logs(peer: &str, vmm: &Sample, other: &Sample) {
    let common = common_lines(&vmm.console, &other.console);
    if common.len() < 2 {
        println!(
            "boot log vmm vs {peer}: fewer than 2 common kernel log lines; nothing to compare"
        );
        return;
    }
    println!(
        "boot log vmm vs {peer}: {} lines both print once; gaps that differ by {GAP_LISTED_MS} ms or more (+: the vmm's guest took longer):",
        common.len()
    );
    let mut listed = 0.0;
    for pair in common.windows(2) {
        let (_, va, pa) = pair[0];
        let (text, vb, pb) = pair[1];
        let (ours, theirs) = (vb - va, pb - pa);
        if (ours - theirs).abs() >= GAP_LISTED_MS {
            listed += ours - theirs;
            println!(
                "  {:+8.1} ms  (vmm {ours:7.1}, {peer} {theirs:7.1})  before: {}",
                ours - theirs,
                text.chars().take(90).collect::<String>()
            );
        }
    }
    let (_, v_last, p_last) = common[common.len() - 1];
    let (_, v_first, p_first) = common[0];
    let wall = |s: &Sample| s.boot.as_secs_f64() * 1000.0;
    println!(
        "  listed gaps sum to {listed:+.1} ms; kernel time first..last common line: vmm {:.1} ms, {peer} {:.1} ms; \
         wall time to init outside it: vmm {:.1} ms, {peer} {:.1} ms",
        v_last - v_first,
        p_last - p_first,
        wall(vmm) - (v_last - v_first),
        wall(other) - (p_last - p_first),
    );
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    for name in &args.cases {
        if !CASES.iter().any(|c| c.name == name) {
            bail!("unknown case {name:?} (quiet, verbose or devices)");
        }
    }
    let scratch = Scratch::new()?;
    let fault_around = if args.text_pages {
        Some(one_page_fault_around()?)
    } else {
        None
    };
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
    let mut failures = Vec::new();
    for case in CASES {
        if !args.cases.is_empty() && !args.cases.iter().any(|c| c == case.name) {
            continue;
        }
        println!("== {} boot ({})", case.name, case.about);
        let in_case: Vec<&(&str, Peer)> = peers.iter().collect();
        // Runs interleave the peers, so that load changes on the host hit them alike.
        let mut samples: Vec<Vec<Sample>> = in_case.iter().map(|_| Vec::new()).collect();
        let mut failed = vec![false; in_case.len()];
        for run_index in 0..args.runs {
            for (i, (name, peer)) in in_case.iter().enumerate() {
                if failed[i] {
                    continue;
                }
                let what = format!(
                    "{name} ({} boot, run {}/{})",
                    case.name,
                    run_index + 1,
                    args.runs
                );
                match run(peer, &args, case, &scratch) {
                    Ok(sample) => {
                        progress(
                            &args,
                            &format!(
                                "{what}: {:.1} ms, overhead {:.1} MiB ({})",
                                sample.boot.as_secs_f64() * 1000.0,
                                sample.overhead_kib as f64 / 1024.0,
                                sample.breakdown
                            ),
                        );
                        for chunk in page_ranges(&sample.binary_pages).chunks(RANGES_PER_LINE) {
                            progress(
                                &args,
                                &format!("text-pages {}: {}", case.name, chunk.join(" ")),
                            );
                        }
                        samples[i].push(sample);
                    }
                    Err(e) => {
                        progress(&args, &format!("{what} FAILED"));
                        println!("FAILED {what}: {e:#}");
                        failures.push(what);
                        failed[i] = true;
                    }
                }
            }
        }
        let results: Vec<Option<(f64, f64)>> = in_case
            .iter()
            .zip(&samples)
            .zip(&failed)
            .map(|(((name, _), s), &failed)| (!failed).then(|| report(name, s)))
            .collect();
        let Some((vmm_boot, vmm_overhead)) = results[0] else {
            continue;
        };
        // The kernel's log (the verbose case): the vmm's last boot against each peer's.
        if case.name == "verbose" {
            for (((name, _), s), result) in in_case.iter().zip(&samples).zip(&results).skip(1) {
                if let (Some(ours), Some(theirs), Some(_)) = (samples[0].last(), s.last(), result) {
                    compare_boot_logs(name, ours, theirs);
                }
            }
        }
        for ((name, _), result) in in_case.iter().zip(&results).skip(1) {
            if let Some((boot, overhead)) = result {
                println!(
                    "ratio vmm/{name} ({}): boot {:.2}x, memory overhead {:.2}x",
                    case.name,
                    vmm_boot / boot,
                    vmm_overhead / overhead
                );
            }
        }
    }
    if let Some(old) = fault_around {
        // Best effort: on the test bed the setting ends with the bed.
        let _ = std::fs::write("/sys/kernel/debug/fault_around_bytes", old);
    }
    if !failures.is_empty() {
        bail!("boots failed: {}", failures.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_ranges_join_neighbours() {
        assert_eq!(page_ranges(&[]), Vec::<String>::new());
        assert_eq!(
            page_ranges(&[0, 1, 2, 9, 0x10, 0x11, 0x20]),
            ["0-2", "9", "10-11", "20"]
        );
    }

    #[test]
    fn resident_pages_of_this_test_binary() {
        // Runs the function whose page is looked for below.
        page_ranges_join_neighbours();
        let exe = std::env::current_exe().unwrap();
        let pages = resident_file_pages(std::process::id(), &exe).unwrap();
        let file_pages = std::fs::metadata(&exe).unwrap().len().div_ceil(PAGE);
        // This test's own code is running, so some page of the binary is resident; not all
        // of a test binary's pages are.
        assert!(!pages.is_empty() && (pages.len() as u64) < file_pages);
        assert!(pages.windows(2).all(|w| w[0] < w[1]));
        assert!(*pages.last().unwrap() < file_pages);
        // The page of a function that ran is among them.
        let here = page_ranges_join_neighbours as fn() as usize as u64;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let page = maps
            .lines()
            .find_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let (lo, hi) = f[0].split_once('-')?;
                let lo = u64::from_str_radix(lo, 16).ok()?;
                let hi = u64::from_str_radix(hi, 16).ok()?;
                let offset = u64::from_str_radix(f[2], 16).ok()?;
                (lo <= here && here < hi).then_some((here - lo + offset) / PAGE)
            })
            .unwrap();
        assert!(pages.contains(&page), "page {page:#x} not in {pages:x?}");
        // A binary this process does not map has no resident pages here: an error naming it.
        let err = resident_file_pages(std::process::id(), Path::new("/bin/sh")).unwrap_err();
        assert!(
            format!("{err:#}").contains("no resident page of"),
            "{err:#}"
        );
    }

    fn log(lines: &[&str]) -> Vec<String> {
        lines.iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn common_lines_are_unique_and_in_order() {
        let a = log(&[
            "SeaBIOS noise",
            "[    0.000000] Linux version 6.12",
            "[    0.010000] twice",
            "[    0.020000] twice",
            "[    0.100000] tsc: Refined TSC",
            "[    0.200000] only in a",
            "[    0.300000] Run /init",
        ]);
        let b = log(&[
            "[    0.000000] Linux version 6.12",
            "[    0.015000] twice",
            "[    0.050000] Run /init",
            "[    0.060000] tsc: Refined TSC",
        ]);
        let common = common_lines(&a, &b);
        let texts: Vec<&str> = common.iter().map(|c| c.0).collect();
        // "twice" is not unique; "Run /init" comes after "tsc" in a but before it in b.
        assert_eq!(texts, ["Linux version 6.12", "tsc: Refined TSC"]);
        assert_eq!(common[1].1, 100.0);
        assert_eq!(common[1].2, 60.0);
        assert_eq!(kernel_line("x[ 1.5] y"), Some((1500.0, "y")));
        assert_eq!(kernel_line("no stamp"), None);
    }
}
