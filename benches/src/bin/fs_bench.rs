//! virtio-fs benchmark, run on a KVM host (a real one, or the test bed): the same tree is
//! served to a guest by
//!
//! - `vmm flist`: the vmm from an flist image (chunks in a dir:// store, lazy fetch into the
//!   chunk cache),
//! - `vmm fetcher` (with `--chunk-fetcher`): the vmm from the flist image through the node's
//!   chunk fetcher (which owns the cache),
//! - `vmm dir`: the vmm from the unpacked tree (passthrough),
//! - `baseline flist`, `baseline dir` (with `--baseline-vmm`): another vmm build the same two
//!   ways (e.g. the commit before a change: a before/after ratio from one run),
//! - `virtiofsd`: QEMU's `microvm` machine with vhost-user-fs and virtiofsd from the unpacked
//!   tree,
//!
//! and inside the guest `guest-fsbench` measures sequential reads, 4 KiB random reads, readdir
//! and lstat of a large tree (the `read` workload). The `layer` workload measures a writable
//! share: reads of the image's files, creates, first changes of image files (copy-ups),
//! listings and removals (`guest-fsbench layer`), served by
//!
//! - `vmm layer`: the vmm's own writable layer over the flist image,
//! - `vmm overlay`: fuse-backend-rs's overlay over the same image (`GRIDNODE_LAYER=overlay`),
//! - `virtiofsd copy`: QEMU + virtiofsd from a writable copy of the tree (no layer: what a
//!   plain directory costs; the copy is fresh in the host page cache, cold runs too),
//!
//! each run on a fresh layer (or copy). Every measurement is a fresh VM boot, so the guest
//! page cache starts empty. Cold: the host-side caches are emptied first (the flist chunk cache removed,
//! the host page cache dropped, the chunk fetcher restarted on an empty cache); warm: the run
//! right after a cold one, host caches kept. Each flist server has a chunk cache of its own.
//! Checksums of the bytes read are checked against the tree, so every server is also checked
//! for serving the right data.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use guest_fsbench::{fold, rand_sum, Rng, FOLD_SEED};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    vmm: PathBuf,
    /// Another vmm build measured beside `--vmm` (baseline-flist, baseline-dir).
    #[arg(long)]
    baseline_vmm: Option<PathBuf>,
    /// The `chunk-fetcher` program: the vmm-fetcher column is measured.
    #[arg(long)]
    chunk_fetcher: Option<PathBuf>,
    /// The `flist` CLI (packs the tree).
    #[arg(long)]
    flist: PathBuf,
    /// The image's block size (`flist pack --block-kib`): 0 packs whole chunks (format 1, which
    /// builds from before blocked chunks read too: a baseline that old needs it).
    #[arg(long)]
    block_kib: Option<u32>,
    /// qemu-system-x86_64 and virtiofsd: both given, the virtiofsd column is measured.
    #[arg(long, requires = "virtiofsd")]
    qemu: Option<PathBuf>,
    #[arg(long, requires = "qemu")]
    virtiofsd: Option<PathBuf>,
    #[arg(long)]
    kernel: PathBuf,
    /// A guest initramfs with guest-init as /init and guest-fsbench as /bin/guest-fsbench.
    #[arg(long)]
    initrd: PathBuf,
    /// Where the tree, the image, its store and the chunk cache go (replaced).
    #[arg(long, default_value = "/tmp/gridnode-fs-bench")]
    work: PathBuf,
    /// Cold + warm measurements per server; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Size of each of the two data files (sequential, random).
    #[arg(long, default_value_t = 64)]
    file_mib: usize,
    /// 4 KiB random reads per run.
    #[arg(long, default_value_t = 2000)]
    rand_ops: u64,
    /// The metadata tree: directories x files per directory.
    #[arg(long, default_value_t = 40)]
    dirs: usize,
    #[arg(long, default_value_t = 50)]
    files_per_dir: usize,
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// Measure only these servers (vmm-flist, vmm-fetcher, vmm-dir, baseline-flist,
    /// baseline-dir, virtiofsd+qemu; vmm-layer, vmm-overlay, virtiofsd-copy), comma-separated.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// The workloads measured, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "read,layer")]
    workload: Vec<Workload>,
    /// Deadline for one VM run.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

const RAND_SEED: u64 = 7;
const TAG: &str = "tree";
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet i8042.noaux i8042.nomux i8042.dumbkbd";
/// Where QEMU's microvm puts its first used virtio-mmio transport (512 bytes, IRQ 12) with
/// ACPI off; passed by hand because QEMU would append it after the guest-init `--`.
const QEMU_VIRTIO_MMIO: &str = "virtio_mmio.device=512@0xfeb00e00:12";

/// What `guest-fsbench all` and `guest-fsbench layer` must report for the generated tree.
struct Expected {
    seq_sum: u64,
    rand_sum: u64,
    entries: usize,
    /// The small files read whole, in name order (`lread`).
    files_sum: u64,
    /// Entries of the tree's directories once a new file is made beside every other one.
    layer_entries: usize,
}

/// xorshift bytes: incompressible, like most file data after compression.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

fn write_tree(args: &Args, tree: &Path) -> Result<Expected> {
    let write = |path: PathBuf, bytes: &[u8]| {
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    std::fs::create_dir_all(tree).with_context(|| format!("creating {}", tree.display()))?;
    let seq = random_bytes(args.file_mib << 20, 0x5eed_0001);
    write(tree.join("seq.bin"), &seq)?;
    let rand = random_bytes(args.file_mib << 20, 0x5eed_0002);
    write(tree.join("rand.bin"), &rand)?;
    let mut sizes = Rng(0x5eed_0003);
    let mut files_sum = FOLD_SEED;
    for d in 0..args.dirs {
        let dir = tree.join("tree").join(format!("d{d:03}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for f in 0..args.files_per_dir {
            let len = (sizes.next_u64() % 4096) as usize;
            let bytes = random_bytes(len, (d * 10_000 + f + 1) as u64);
            files_sum = fold(files_sum, &bytes);
            write(dir.join(format!("f{f:04}")), &bytes)?;
        }
    }
    Ok(Expected {
        seq_sum: fold(FOLD_SEED, &seq),
        rand_sum: rand_sum(&rand, args.rand_ops, RAND_SEED).context("--file-mib must be > 0")?,
        entries: args.dirs * (args.files_per_dir + 1),
        files_sum,
        layer_entries: args.dirs * (args.files_per_dir + args.files_per_dir.div_ceil(2)),
    })
}

/// What the guest measures.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Workload {
    /// Sequential and random reads, readdir and lstat of the image (`guest-fsbench all`).
    Read,
    /// A writable share (`guest-fsbench layer`).
    Layer,
}

impl Workload {
    /// Its numbers: the name in the guest's `FSBENCH` lines, and the column's title.
    fn metrics(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Workload::Read => &[
                ("seq", "seq MB/s"),
                ("rand", "rand ops/s"),
                ("readdir", "readdir ent/s"),
                ("stat", "stat ops/s"),
            ],
            Workload::Layer => &[
                ("lread", "read files/s"),
                ("create", "create files/s"),
                ("copyup", "copy-up files/s"),
                ("lreaddir", "readdir ent/s"),
                ("unlink", "unlink files/s"),
            ],
        }
    }
}

/// One guest run's numbers, in the order of its workload's [`Workload::metrics`].
#[derive(Default, Clone)]
struct Sample(Vec<f64>);

impl Sample {
    /// One line: `seq X, rand Y, ...`.
    fn brief(&self, workload: Workload) -> String {
        workload
            .metrics()
            .iter()
            .zip(&self.0)
            .map(|((name, _), v)| format!("{name} {v:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Parses the `FSBENCH` lines of `workload` and checks them against the tree.
fn parse(output: &str, expected: &Expected, workload: Workload) -> Result<Sample> {
    let mut found: BTreeMap<&str, (f64, BTreeMap<&str, &str>)> = BTreeMap::new();
    for line in output.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("FSBENCH") {
            continue;
        }
        let (Some(name), Some(value)) = (words.next(), words.next()) else {
            continue;
        };
        let value: f64 = value
            .parse()
            .with_context(|| format!("bad value in {line:?}"))?;
        let fields = words.filter_map(|w| w.split_once('=')).collect();
        found.insert(name, (value, fields));
    }
    let get = |name: &str| {
        found
            .get(name)
            .with_context(|| format!("the guest printed no {name} result:\n{output}"))
    };
    let values = workload
        .metrics()
        .iter()
        .map(|(name, _)| get(name).map(|(v, _)| *v))
        .collect::<Result<Vec<f64>>>()?;
    let check = |what: &str, name: &str, field: &str, want: String| {
        let got = get(name)?.1.get(field).copied();
        if got != Some(want.as_str()) {
            bail!("{what}: the guest read {got:?}, the tree has {want}");
        }
        Ok(())
    };
    match workload {
        Workload::Read => {
            check(
                "seq.bin checksum",
                "seq",
                "sum",
                format!("{:016x}", expected.seq_sum),
            )?;
            check(
                "rand.bin checksum",
                "rand",
                "sum",
                format!("{:016x}", expected.rand_sum),
            )?;
            check(
                "tree entries",
                "readdir",
                "entries",
                expected.entries.to_string(),
            )?;
        }
        Workload::Layer => {
            check(
                "image files checksum",
                "lread",
                "sum",
                format!("{:016x}", expected.files_sum),
            )?;
            check(
                "tree entries",
                "lreaddir",
                "entries",
                expected.layer_entries.to_string(),
            )?;
            check("files left after unlink", "unlink", "left", "0".into())?;
        }
    }
    Ok(Sample(values))
}

/// Runs a VM to its end (or the deadline) and returns its console output.
fn run_vm(mut cmd: Command, log: &Path, timeout: Duration) -> Result<String> {
    let stderr = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let mut stdout = child.stdout.take().context("no stdout pipe")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let output = reader.join().unwrap_or_default();
            let log_text = std::fs::read_to_string(log).unwrap_or_default();
            bail!("the VM did not finish within {timeout:?}; its console:\n{output}\n{log_text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = reader.join().unwrap_or_default();
    if !status.success() {
        let log_text = std::fs::read_to_string(log).unwrap_or_default();
        bail!("the VM ended with {status}:\n{output}\n{log_text}");
    }
    Ok(output)
}

#[derive(Clone, Copy, PartialEq)]
enum Server {
    VmmFlist,
    VmmFetcher,
    VmmDir,
    BaselineFlist,
    BaselineDir,
    Virtiofsd,
    VmmLayer,
    VmmOverlay,
    VirtiofsdCopy,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::VmmFlist => "vmm-flist",
            Server::VmmFetcher => "vmm-fetcher",
            Server::VmmDir => "vmm-dir",
            Server::BaselineFlist => "baseline-flist",
            Server::BaselineDir => "baseline-dir",
            Server::Virtiofsd => "virtiofsd+qemu",
            Server::VmmLayer => "vmm-layer",
            Server::VmmOverlay => "vmm-overlay",
            Server::VirtiofsdCopy => "virtiofsd-copy",
        }
    }

    /// Serves the flist image with a chunk cache of its own.
    fn has_cache(self) -> bool {
        matches!(
            self,
            Server::VmmFlist | Server::BaselineFlist | Server::VmmLayer | Server::VmmOverlay
        )
    }

    fn workload(self) -> Workload {
        match self {
            Server::VmmLayer | Server::VmmOverlay | Server::VirtiofsdCopy => Workload::Layer,
            _ => Workload::Read,
        }
    }
}

/// The pairs compared when both were measured: (this one, the one it is measured against).
const PAIRS: &[(Server, Server)] = &[
    (Server::VmmFlist, Server::BaselineFlist),
    (Server::VmmFetcher, Server::BaselineFlist),
    (Server::VmmDir, Server::BaselineDir),
    (Server::VmmLayer, Server::VmmOverlay),
];

struct Bench {
    args: Args,
    tree: PathBuf,
    image: PathBuf,
    /// The dir:// store the image's chunks are in (the vmm's store allowlist).
    store: String,
    /// The baseline vmm takes `--store` (builds before the store allowlist do not).
    baseline_takes_store: bool,
    /// The running chunk fetcher (vmm-fetcher runs).
    fetcher: Option<Child>,
    expected: Expected,
    page_cache_dropped: bool,
    /// Runs whose guest died before reporting (see `run`), per server name.
    lost_runs: BTreeMap<&'static str, usize>,
}

impl Bench {
    fn guest_script(&self, workload: Workload) -> String {
        let run = match workload {
            Workload::Read => format!("all /mnt {} {RAND_SEED}", self.args.rand_ops),
            Workload::Layer => "layer /mnt".to_owned(),
        };
        format!("mkdir -p /mnt && mount -t virtiofs {TAG} /mnt && /bin/guest-fsbench {run}")
    }

    /// The writable layer of `server` (a fresh one each run).
    fn layer(&self, server: Server) -> PathBuf {
        self.args.work.join(format!("layer-{}", server.name()))
    }

    /// The writable copy of the tree virtiofsd-copy serves (a fresh one each run).
    fn copy(&self) -> PathBuf {
        self.args.work.join("copy")
    }

    /// The chunk cache of `server` (flist servers, the fetcher).
    fn cache(&self, server: Server) -> PathBuf {
        self.args.work.join(format!("cache-{}", server.name()))
    }

    fn fetcher_socket(&self) -> PathBuf {
        self.args.work.join("fetcher.sock")
    }

    /// Starts the chunk fetcher on the cache of vmm-fetcher (unless it runs).
    fn start_fetcher(&mut self) -> Result<()> {
        if self.fetcher.is_some() {
            return Ok(());
        }
        let program = self
            .args
            .chunk_fetcher
            .clone()
            .context("vmm-fetcher runs need --chunk-fetcher")?;
        let socket = self.fetcher_socket();
        let _ = std::fs::remove_file(&socket);
        let log = File::create(self.args.work.join("fetcher.log"))?;
        let child = Command::new(&program)
            .arg("--listen")
            .arg(&socket)
            .arg("--cache")
            .arg(self.cache(Server::VmmFetcher))
            .args(["--cache-max-bytes", "10737418240", "--store", &self.store])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        self.fetcher = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if Instant::now() > deadline {
                self.stop_fetcher();
                bail!("the chunk fetcher did not create {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn stop_fetcher(&mut self) {
        if let Some(mut child) = self.fetcher.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Empties the host-side caches of `server`.
    fn make_cold(&mut self, server: Server) -> Result<()> {
        if server == Server::VmmFetcher {
            self.stop_fetcher();
        }
        let cache = self.cache(server);
        if (server.has_cache() || server == Server::VmmFetcher) && cache.exists() {
            std::fs::remove_dir_all(&cache)
                .with_context(|| format!("emptying {}", cache.display()))?;
        }
        // Without this the dir servers' cold runs would be warm runs.
        if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
            if self.page_cache_dropped {
                eprintln!(
                    "fs_bench: cannot drop the host page cache ({e}); cold dir runs are warm"
                );
                self.page_cache_dropped = false;
            }
        }
        Ok(())
    }

    fn vmm(&self, server: Server) -> Command {
        let a = &self.args;
        let baseline = matches!(server, Server::BaselineFlist | Server::BaselineDir);
        let program = match (&a.baseline_vmm, baseline) {
            (Some(path), true) => path,
            _ => &a.vmm,
        };
        let mut cmd = Command::new(program);
        cmd.args(["--kernel".as_ref(), a.kernel.as_os_str()])
            .args(["--initrd".as_ref(), a.initrd.as_os_str()])
            .args(["--memory", &a.memory_mib.to_string(), "--cmdline", "quiet"]);
        let image = format!("tag={TAG},image={}", self.image.display());
        cmd.env_remove("GRIDNODE_LAYER");
        match server {
            Server::VmmLayer | Server::VmmOverlay => {
                cmd.arg("--fs")
                    .arg(format!("{image},layer={}", self.layer(server).display()))
                    .arg("--image-cache")
                    .arg(self.cache(server))
                    .args(["--store", &self.store]);
                if server == Server::VmmOverlay {
                    cmd.env("GRIDNODE_LAYER", "overlay");
                }
            }
            Server::VmmFlist | Server::BaselineFlist => {
                cmd.arg("--fs")
                    .arg(image)
                    .arg("--image-cache")
                    .arg(self.cache(server));
                if !baseline || self.baseline_takes_store {
                    cmd.args(["--store", &self.store]);
                }
            }
            Server::VmmFetcher => {
                cmd.arg("--fs")
                    .arg(image)
                    .arg("--fetcher")
                    .arg(self.fetcher_socket())
                    .args(["--store", &self.store]);
            }
            Server::VmmDir | Server::BaselineDir | Server::Virtiofsd | Server::VirtiofsdCopy => {
                cmd.arg("--fs")
                    .arg(format!("tag={TAG},dir={},readonly", self.tree.display()));
            }
        }
        cmd.args(["--", "/bin/sh", "-c", &self.guest_script(server.workload())]);
        cmd
    }

    fn start_virtiofsd(&self, virtiofsd: &Path, shared: &Path, socket: &Path) -> Result<Child> {
        let _ = std::fs::remove_file(socket);
        let log = File::create(self.args.work.join("virtiofsd.log"))?;
        let child = Command::new(virtiofsd)
            .arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(shared)
            .args(["--cache=auto", "--sandbox=none", "--seccomp=none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", virtiofsd.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!("virtiofsd did not create {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    }

    fn qemu(&self, qemu: &Path, socket: &Path, workload: Workload) -> Command {
        let a = &self.args;
        let words: Vec<String> = ["/bin/sh", "-c", &self.guest_script(workload)]
            .iter()
            .map(|w| vmm::config::spec::encode_word(w))
            .collect();
        let append = format!("{CMDLINE} {QEMU_VIRTIO_MMIO} -- {}", words.join(" "));
        let mut cmd = Command::new(qemu);
        cmd.args([
            "-M",
            "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off,auto-kernel-cmdline=off,memory-backend=mem",
        ])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={}M,share=on", a.memory_mib),
        ])
        .args(["-m", &format!("{}M", a.memory_mib)])
        .args(["-accel", "kvm", "-cpu", "host", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio", "-device", "i8042"])
        .arg("-chardev")
        .arg(format!("socket,id=vfs,path={}", socket.display()))
        .args(["-device", &format!("vhost-user-fs-device,chardev=vfs,tag={TAG}")])
        .args(["-kernel".as_ref(), a.kernel.as_os_str()])
        .args(["-initrd".as_ref(), a.initrd.as_os_str()])
        .args(["-append", &append]);
        cmd
    }

    /// One measurement. A run whose guest dies before it reports (a triple fault, a reset
    /// without the guest init's exit line) is run again, up to `MAX_LOST_RUNS` times per
    /// measurement, and counted in the report: on the nested test bed both VMMs' guests
    /// occasionally die this way. A wrong checksum is never retried.
    fn run(&mut self, server: Server) -> Result<Sample> {
        let mut lost = 0;
        loop {
            match self.run_once(server) {
                Ok(sample) => return Ok(sample),
                Err(e) if lost < MAX_LOST_RUNS && is_lost_run(&e) => {
                    lost += 1;
                    *self.lost_runs.entry(server.name()).or_default() += 1;
                    eprintln!(
                        "fs_bench: {} guest died before reporting; again: {e:#}",
                        server.name()
                    );
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn run_once(&mut self, server: Server) -> Result<Sample> {
        let timeout = Duration::from_secs(self.args.timeout_secs);
        let log = self.args.work.join("vm.log");
        if server == Server::VmmFetcher {
            self.start_fetcher()?;
        }
        let fresh = |path: &Path| -> Result<()> {
            if path.exists() {
                std::fs::remove_dir_all(path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
            Ok(())
        };
        let output = match server {
            Server::VmmFlist
            | Server::VmmFetcher
            | Server::VmmDir
            | Server::BaselineFlist
            | Server::BaselineDir
            | Server::VmmLayer
            | Server::VmmOverlay => {
                if server.workload() == Workload::Layer {
                    fresh(&self.layer(server))?;
                }
                run_vm(self.vmm(server), &log, timeout)?
            }
            Server::Virtiofsd | Server::VirtiofsdCopy => {
                let (Some(qemu), Some(virtiofsd)) = (&self.args.qemu, &self.args.virtiofsd) else {
                    bail!("virtiofsd runs need --qemu and --virtiofsd");
                };
                let shared = if server == Server::VirtiofsdCopy {
                    // The layer workload touches only tree/.
                    let copy = self.copy();
                    fresh(&copy)?;
                    std::fs::create_dir_all(&copy)
                        .with_context(|| format!("creating {}", copy.display()))?;
                    let status = Command::new("cp")
                        .arg("-a")
                        .arg(self.tree.join("tree"))
                        .arg(&copy)
                        .status()
                        .context("running cp")?;
                    if !status.success() {
                        bail!("copying the tree to {} failed: {status}", copy.display());
                    }
                    copy
                } else {
                    self.tree.clone()
                };
                let socket = self.args.work.join("virtiofsd.sock");
                let mut daemon = self.start_virtiofsd(virtiofsd, &shared, &socket)?;
                let result = run_vm(self.qemu(qemu, &socket, server.workload()), &log, timeout);
                // virtiofsd ends when its front end disconnects; make sure of it.
                let _ = daemon.kill();
                let _ = daemon.wait();
                result?
            }
        };
        parse(&output, &self.expected, server.workload())
            .with_context(|| format!("{} run", server.name()))
    }
}

const MAX_LOST_RUNS: usize = 2;

/// Whether a failed run is a guest that died before reporting (not a wrong answer).
fn is_lost_run(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    let died = text.contains("triple fault") || text.contains("printed no");
    died && !text.contains("checksum") && !text.contains("tree entries")
}

/// A server's cold and warm samples, in the order they were taken.
type ServerSamples = (Server, Vec<Sample>, Vec<Sample>);

/// Cold and warm samples of each server (all of one workload), `runs` of each. The runs interleave the servers, so
/// that load changes on the host hit them alike, and every other run takes them in reverse
/// order, so that none always follows the same one (whose leftovers in the host's caches and
/// allocator would favour or cost it every time).
fn measure_all(bench: &mut Bench, servers: &[Server], runs: usize) -> Result<Vec<ServerSamples>> {
    let mut samples: Vec<(Vec<Sample>, Vec<Sample>)> =
        vec![(Vec::new(), Vec::new()); servers.len()];
    for run in 0..runs {
        let mut order: Vec<_> = servers.iter().zip(samples.iter_mut()).collect();
        if run % 2 == 1 {
            order.reverse();
        }
        for (&server, (cold, warm)) in order {
            eprintln!("fs-bench: {} run {}/{runs}", server.name(), run + 1);
            bench.make_cold(server)?;
            let c = bench.run(server)?;
            let w = bench.run(server)?;
            // Each sample as it comes (a run cut short still leaves its numbers).
            eprintln!(
                "fs-bench: {} run {}/{runs}: cold {}; warm {}",
                server.name(),
                run + 1,
                c.brief(server.workload()),
                w.brief(server.workload())
            );
            cold.push(c);
            warm.push(w);
        }
    }
    Ok(servers
        .iter()
        .zip(samples)
        .map(|(&server, (cold, warm))| (server, cold, warm))
        .collect())
}

/// Whether `program --help` lists `flag`.
fn takes_flag(program: &Path, flag: &str) -> Result<bool> {
    let out = Command::new(program)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} --help", program.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).contains(flag))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn median_sample(samples: &[Sample]) -> Sample {
    let metrics = samples.first().map_or(0, |s| s.0.len());
    Sample(
        (0..metrics)
            .map(|i| median(samples.iter().map(|s| s.0[i]).collect()))
            .collect(),
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.runs == 0 || args.file_mib == 0 || args.rand_ops == 0 {
        bail!("--runs, --file-mib and --rand-ops must be at least 1");
    }
    let work = args.work.clone();
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("emptying {}", work.display()))?;
    }
    let tree = work.join("tree");
    eprintln!(
        "fs_bench: writing the tree ({} MiB x 2 + {} small files)",
        args.file_mib,
        args.dirs * args.files_per_dir
    );
    let expected = write_tree(&args, &tree)?;
    let image = work.join("tree.flist");
    let store = format!("dir://{}", work.join("store").display());
    let status = Command::new(&args.flist)
        .arg("pack")
        .arg(&tree)
        .arg("-o")
        .arg(&image)
        .args(["--store", &store])
        .args(args.block_kib.map(|k| format!("--block-kib={k}")))
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {}", args.flist.display()))?;
    if !status.success() {
        bail!("flist pack failed: {status}");
    }

    let mut servers = Vec::new();
    if args.workload.contains(&Workload::Read) {
        servers.push(Server::VmmFlist);
        if args.chunk_fetcher.is_some() {
            servers.push(Server::VmmFetcher);
        }
        servers.push(Server::VmmDir);
    }
    let baseline_takes_store = match &args.baseline_vmm {
        Some(baseline) if args.workload.contains(&Workload::Read) => {
            servers.extend([Server::BaselineFlist, Server::BaselineDir]);
            takes_flag(baseline, "--store")?
        }
        _ => false,
    };
    if args.qemu.is_some() && args.workload.contains(&Workload::Read) {
        servers.push(Server::Virtiofsd);
    }
    if args.workload.contains(&Workload::Layer) {
        servers.extend([Server::VmmLayer, Server::VmmOverlay]);
        if args.qemu.is_some() {
            servers.push(Server::VirtiofsdCopy);
        }
    }
    if let Some(only) = &args.only {
        servers.retain(|s| only.iter().any(|o| o == s.name()));
    }
    let runs = args.runs;
    let workloads = args.workload.clone();
    let mut bench = Bench {
        store,
        baseline_takes_store,
        fetcher: None,
        args,
        tree,
        image,
        expected,
        page_cache_dropped: true,
        lost_runs: BTreeMap::new(),
    };
    let mut out = std::io::stdout().lock();
    for workload in workloads {
        let of_workload: Vec<Server> = servers
            .iter()
            .copied()
            .filter(|s| s.workload() == workload)
            .collect();
        if of_workload.is_empty() {
            continue;
        }
        let measured = measure_all(&mut bench, &of_workload, runs);
        bench.stop_fetcher();
        report(&mut out, &bench, workload, runs, &measured?)?;
    }
    for (server, lost) in &bench.lost_runs {
        writeln!(
            out,
            "{server}: {lost} run(s) lost to a guest that died before reporting, run again"
        )?;
    }
    if !bench.page_cache_dropped {
        writeln!(
            out,
            "(the host page cache could not be dropped: cold dir runs are warm)"
        )?;
    }
    Ok(())
}

/// The table of one workload's medians, and for each pair measured the ratios of its medians
/// and how often a sample of the one beat a sample of the other (a ratio of medians moves with
/// the spread of single boots; the share of pairs tells a shift from chance).
fn report(
    out: &mut impl Write,
    bench: &Bench,
    workload: Workload,
    runs: usize,
    samples: &[ServerSamples],
) -> Result<()> {
    let results: Vec<(Server, Sample, Sample)> = samples
        .iter()
        .map(|(server, cold, warm)| (*server, median_sample(cold), median_sample(warm)))
        .collect();
    let results = &results;
    let a = &bench.args;
    match workload {
        Workload::Read => writeln!(
            out,
            "in-guest virtio-fs, median of {runs} fresh boots each ({} MiB files, {} random 4 KiB reads, {} entries)",
            a.file_mib, a.rand_ops, bench.expected.entries
        )?,
        Workload::Layer => writeln!(
            out,
            "in-guest writable share, median of {runs} fresh boots each, a fresh layer (or copy) each ({} image files, {} created)",
            a.dirs * a.files_per_dir,
            bench.expected.layer_entries - a.dirs * a.files_per_dir
        )?,
    }
    let metrics = workload.metrics();
    write!(out, "{:<16} {:<5}", "server", "cache")?;
    for (_, title) in metrics {
        write!(out, " {title:>15}")?;
    }
    writeln!(out)?;
    for (server, cold, warm) in results {
        for (phase, s) in [("cold", cold), ("warm", warm)] {
            write!(out, "{:<16} {phase:<5}", server.name())?;
            for v in &s.0 {
                write!(out, " {v:>15.1}")?;
            }
            writeln!(out)?;
        }
    }
    let ratios = |s: &Sample, b: &Sample| {
        metrics
            .iter()
            .zip(s.0.iter().zip(&b.0))
            .map(|((name, _), (x, y))| format!("{name} {:.2}x", x / y))
            .collect::<Vec<_>>()
            .join("  ")
    };
    // The share of (server sample, base sample) pairs in which the server's is the better.
    let shares = |s: &[Sample], b: &[Sample]| {
        metrics
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                let of = |all: &[Sample]| -> Vec<f64> {
                    all.iter().filter_map(|x| x.0.get(i).copied()).collect()
                };
                let share = benches::share_greater(&of(s), &of(b));
                format!("{name} {:.0}%", share * 100.0)
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let all_of = |s: Server| samples.iter().find(|r| r.0 == s);
    let find = |s: Server| results.iter().find(|r| r.0 == s);
    let reference = match workload {
        Workload::Read => Server::Virtiofsd,
        Workload::Layer => Server::VirtiofsdCopy,
    };
    let mut pairs: Vec<(Server, Server)> = results
        .iter()
        .filter(|r| r.0 != reference)
        .map(|r| (r.0, reference))
        .collect();
    pairs.extend(PAIRS.iter().copied());
    for (server, base) in pairs {
        let (Some((_, cold, warm)), Some((_, base_cold, base_warm))) = (find(server), find(base))
        else {
            continue;
        };
        for (phase, s, b) in [("cold", cold, base_cold), ("warm", warm, base_warm)] {
            writeln!(
                out,
                "ratio {} / {} ({phase}): {}",
                server.name(),
                base.name(),
                ratios(s, b)
            )?;
        }
        if let (Some((_, cold, warm)), Some((_, base_cold, base_warm))) =
            (all_of(server), all_of(base))
        {
            for (phase, s, b) in [("cold", cold, base_cold), ("warm", warm, base_warm)] {
                writeln!(
                    out,
                    "  {} sample better than {}'s ({phase}), share of pairs: {}",
                    server.name(),
                    base.name(),
                    shares(s, b)
                )?;
            }
        }
    }
    Ok(())
}
