//! The `vmm` command: builds a micro-VM spec from a JSON file and/or flags, boots it, and exits
//! with the guest's status.
//!
//! Exit status: the status the guest reported through the guest-report port; 0 when the guest
//! reset or shut down without reporting one; 1 when the guest faulted (triple fault, KVM
//! error: a register dump is printed); 2 when the VM could not be started (bad input, no KVM);
//! 3 when the guest's kernel panicked or a unikernel crashed (seen on its console before its
//! reset: devices/legacy/panic_watch.rs);
//! 137 when it was killed (the control API's `kill`, or a graceful shutdown, SIGTERM, that the
//! guest did not finish in time); 134 when the vmm itself failed (a panic on one of its
//! threads); 159 when one of its threads made a system call its seccomp filter forbids.
//! With `--exit-record` (or the spec's `exit_record`), the same is written there as JSON, for
//! every end: that path is found first, before anything else is checked, and an earlier run's
//! record removed, so even a command line or spec that fails its checks leaves its own record.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use vm_spec::api::{ExitKind, ExitRecord};
use vmm::config::{BootProtocol, ImageSettings, NodeConfig, SerialOutput, VmSpec};

#[derive(Parser, Debug)]
#[command(name = "vmm", version, about = "Boot a micro-VM from a spec")]
struct Cli {
    /// A JSON micro-VM spec; flags given as well override its fields.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Guest kernel: ELF vmlinux (PVH entry used when present) or bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel command-line arguments.
    #[arg(long)]
    cmdline: Option<String>,
    /// Number of vCPUs (1 to 32).
    #[arg(long)]
    vcpus: Option<u32>,
    /// Guest memory in MiB.
    #[arg(long = "memory", alias = "mem")]
    memory_mib: Option<u64>,
    /// Serial console: `stdout`, `off` or `file:PATH`.
    #[arg(long)]
    serial: Option<String>,
    /// Entry protocol for ELF kernels: auto (PVH when the note is present), linux or pvh.
    #[arg(long, value_enum)]
    boot_protocol: Option<BootProtocolArg>,
    /// Share over virtio-fs (repeatable): a host directory, tag=TAG,dir=PATH[,readonly], or an
    /// flist image, tag=TAG,image=PATH[,layer=DIR] (DIR keeps the guest's writes).
    #[arg(long = "fs")]
    fs: Vec<String>,
    /// A virtio-blk drive over a raw image file (repeatable):
    /// id=ID,path=PATH[,readonly][,serial=S]. Rate limits: in the JSON spec.
    #[arg(long = "drive")]
    drives: Vec<String>,
    /// An entropy device (virtio-rng; the guest's /dev/hwrng). Rate limits: in the JSON spec.
    #[arg(long)]
    rng: bool,
    /// A network interface (virtio-net) over a host tap made by the caller (repeatable; the
    /// guest names them eth0, eth1, ... in order): id=ID,tap=NAME|fd=N[,mac=MAC]. Rate
    /// limits: in the JSON spec.
    #[arg(long = "net")]
    nets: Vec<String>,
    /// Local chunk cache shared by all images (the node configuration's takes precedence).
    #[arg(long)]
    image_cache: Option<PathBuf>,
    /// The node's configuration (JSON, not readable by other users): the image cache and the
    /// store allowlist with its credentials. Images are only read from allowlisted stores.
    #[arg(long)]
    node_config: Option<PathBuf>,
    /// A store images may be read from (repeatable), added to the node configuration's
    /// allowlist, e.g. dir:///srv/store. Credentials belong in --node-config, not here.
    /// Without any allowlist, only images' http(s) stores are used, without credentials.
    #[arg(long = "store")]
    stores: Vec<String>,
    /// The node's chunk fetcher socket (overrides the node configuration's "fetcher"):
    /// images' chunks are asked of it, and this process needs no network, no store
    /// credentials and no write access to the chunk cache.
    #[arg(long)]
    fetcher: Option<PathBuf>,
    /// Tag of the virtio-fs share the guest init mounts as its root.
    #[arg(long)]
    root: Option<String>,
    /// Environment of the entrypoint, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// The control API's unix socket (HTTP/1.1 + JSON; vmm/api/openapi.yaml).
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Where to write how and when the VM ended (JSON, atomically), whatever the reason.
    #[arg(long)]
    exit_record: Option<PathBuf>,
    /// Seconds the entrypoint gets between SIGTERM and SIGKILL on a graceful shutdown.
    #[arg(long)]
    shutdown_grace: Option<u32>,
    /// Print the resulting spec as JSON and exit.
    #[arg(long)]
    print_spec: bool,
    /// A virtio-vsock device, cid=CID,uds=PATH: host programs connect to PATH and write
    /// `CONNECT <port>`; the guest's connections to host port P reach PATH_P.
    #[arg(long)]
    vsock: Option<String>,
    /// The entrypoint the guest init runs, and its arguments.
    #[arg(last = true)]
    entrypoint: Vec<String>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum BootProtocolArg {
    Auto,
    Linux,
    Pvh,
}

impl From<BootProtocolArg> for BootProtocol {
    fn from(arg: BootProtocolArg) -> Self {
        match arg {
            BootProtocolArg::Auto => BootProtocol::Auto,
            BootProtocolArg::Linux => BootProtocol::Linux,
            BootProtocolArg::Pvh => BootProtocol::Pvh,
        }
    }
}

fn parse_serial(value: &str) -> anyhow::Result<SerialOutput> {
    match value {
        "stdout" => Ok(SerialOutput::Stdout),
        "off" => Ok(SerialOutput::Off),
        other => match other.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(SerialOutput::File(path.into())),
            _ => anyhow::bail!("--serial must be stdout, off or file:PATH, not {other:?}"),
        },
    }
}

/// The node's image settings: `--node-config` (if given) and `--store` flags.
fn image_settings(cli: &Cli, spec: &VmSpec) -> anyhow::Result<ImageSettings> {
    let node = match &cli.node_config {
        Some(path) => NodeConfig::load(path)?,
        None => NodeConfig::default(),
    };
    if let (Some(node_cache), Some(spec_cache)) = (&node.image_cache, &spec.image_cache) {
        if node_cache != spec_cache {
            tracing::warn!(
                "the spec's image cache {} is ignored: the node configuration's {} is used",
                spec_cache.display(),
                node_cache.display()
            );
        }
    }
    for store in &cli.stores {
        let shown = flist_fs::store::redact_url(store);
        if &shown != store {
            tracing::warn!(
                "--store {shown}: credentials on the command line are visible to other users; \
                 put them in the node configuration (--node-config)"
            );
        }
    }
    let mut settings = node.image_settings(&cli.stores, spec.image_cache.as_deref())?;
    if let Some(socket) = &cli.fetcher {
        settings = settings.with_fetcher(socket.clone());
    }
    let serves_images = spec.fs.iter().any(|share| share.image_path().is_some());
    if serves_images
        && settings.fetcher().is_none()
        && settings.policy().is_some_and(|p| p.is_anonymous())
    {
        tracing::warn!(
            "no store allowlist (--node-config or --store): images are read only from their \
             http(s) stores, without credentials"
        );
    }
    Ok(settings)
}

fn spec_from_cli(cli: &Cli) -> anyhow::Result<VmSpec> {
    let mut spec = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read spec {}", path.display()))?;
            serde_json::from_str::<VmSpec>(&text)
                .with_context(|| format!("invalid spec {}", path.display()))?
        }
        None => {
            let kernel = cli
                .kernel
                .clone()
                .context("no kernel given: use --kernel PATH or --config SPEC.json")?;
            VmSpec::new(kernel)
        }
    };
    if let Some(kernel) = &cli.kernel {
        spec.kernel = kernel.clone();
    }
    if let Some(initrd) = &cli.initrd {
        spec.initrd = Some(initrd.clone());
    }
    if let Some(cmdline) = &cli.cmdline {
        spec.cmdline = cmdline.clone();
    }
    if let Some(vcpus) = cli.vcpus {
        spec.vcpus = vcpus;
    }
    if let Some(mib) = cli.memory_mib {
        spec.memory_mib = mib;
    }
    if let Some(serial) = &cli.serial {
        spec.serial = parse_serial(serial)?;
    }
    if let Some(protocol) = cli.boot_protocol {
        spec.boot_protocol = protocol.into();
    }
    for share in &cli.fs {
        spec.fs.push(share.parse()?);
    }
    for drive in &cli.drives {
        spec.drives.push(drive.parse()?);
    }
    for net in &cli.nets {
        spec.net.push(net.parse()?);
    }
    if cli.rng && spec.rng.is_none() {
        spec.rng = Some(Default::default());
    }
    if let Some(cache) = &cli.image_cache {
        spec.image_cache = Some(cache.clone());
    }
    if let Some(root) = &cli.root {
        spec.root = Some(root.clone());
    }
    for pair in &cli.env {
        let (name, value) = pair
            .split_once('=')
            .with_context(|| format!("--env takes KEY=VALUE, not {pair:?}"))?;
        spec.env.insert(name.to_string(), value.to_string());
    }
    if let Some(vsock) = &cli.vsock {
        spec.vsock = Some(vsock.parse()?);
    }
    if !cli.entrypoint.is_empty() {
        spec.entrypoint = cli.entrypoint.clone();
    }
    if let Some(path) = &cli.api_sock {
        spec.api_sock = Some(path.clone());
    }
    if let Some(path) = &cli.exit_record {
        spec.exit_record = Some(path.clone());
    }
    if let Some(secs) = cli.shutdown_grace {
        spec.shutdown_grace_secs = secs;
    }
    spec.validate()?;
    Ok(spec)
}

/// virtio-fs shares keep a host descriptor per guest-visible inode, so a workload touching
/// many files needs more than the default soft limit of 1024: raise it to the hard limit.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the plain struct above.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!(
                    "cannot raise the open-file limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// The exit record's path, found before anything else is checked: `--exit-record`, else the
/// spec file's `exit_record` (read as plain JSON, so that a spec failing its checks still
/// names it). `cli` when the command line parsed; else the raw arguments are searched.
fn record_path(args: &[OsString], cli: Option<&Cli>) -> Option<PathBuf> {
    let (flag, config) = match cli {
        Some(cli) => (cli.exit_record.clone(), cli.config.clone()),
        None => {
            let (mut flag, mut config) = (None, None);
            let mut words = args.iter().skip(1);
            while let Some(word) = words.next() {
                let word = word.to_string_lossy();
                if word == "--" {
                    break;
                }
                let mut take = |long: &str, short: Option<&str>| -> Option<Option<PathBuf>> {
                    if word == long || short.is_some_and(|s| word == s) {
                        return Some(words.next().map(PathBuf::from));
                    }
                    let inline = word
                        .strip_prefix(long)
                        .and_then(|rest| rest.strip_prefix('='))
                        .or_else(|| {
                            short
                                .and_then(|s| word.strip_prefix(s))
                                .map(|rest| rest.strip_prefix('=').unwrap_or(rest))
                        });
                    inline.map(|value| Some(PathBuf::from(value)))
                };
                if let Some(value) = take("--exit-record", None) {
                    flag = value;
                } else if let Some(value) = take("--config", Some("-c")) {
                    config = value;
                }
            }
            (flag, config)
        }
    };
    let path = flag.or_else(|| {
        let text = std::fs::read_to_string(config?).ok()?;
        let spec: serde_json::Value = serde_json::from_str(&text).ok()?;
        spec.get("exit_record")?.as_str().map(PathBuf::from)
    })?;
    (!path.as_os_str().is_empty()).then_some(path)
}

/// A panic on any thread ends the whole process (as `panic = "abort"` does in release builds):
/// a vmm with a dead device worker or vCPU must not keep running half a VM. The message and
/// the thread are reported first; the exit record is written by the main thread
/// (`vmm::exit::fatal`: a confined thread cannot open files).
fn end_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        let payload = info.payload();
        let what = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let what: String = what.chars().take(300).collect();
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if vmm::seccomp::current_thread_is_confined() {
            // The standard report's backtrace (RUST_BACKTRACE) makes calls the thread's
            // filter forbids: a plain report instead.
            eprintln!("thread '{thread}' panicked{place}:\n{what}");
        } else {
            report(info);
        }
        eprintln!("vmm: error: internal error (panic) on thread {thread:?}; ending the VM");
        vmm::exit::fatal::panicked(format!(
            "internal error (panic) on thread {thread:?}: {what}{place}"
        ));
    }));
}

/// Writes the exit record, if there is one; a failure is reported, not fatal.
fn record_exit(record: &ExitRecord) {
    if let Some(file) = vmm::exit::record::installed() {
        if let Err(e) = file.write(record) {
            eprintln!(
                "vmm: error: cannot write the exit record {}: {e}",
                file.path().display()
            );
        }
    }
}

/// Records that the VM could not be started because of `message`.
fn record_start_failed(message: &str) -> ExitCode {
    record_exit(&vmm::exit::new_record(
        vmm::exit::START_FAILED_STATUS,
        ExitKind::StartFailed,
        format!("the VM could not be started: {message}"),
    ));
    ExitCode::from(2)
}

/// Ends a vmm whose VM could not be started: message, exit record, status 2.
fn start_failed(message: String) -> ExitCode {
    eprintln!("vmm: error: {message}");
    record_start_failed(&message)
}

/// `vmm check-layer [--fix] DIR`: checks the writable layer kept in DIR (a vmm not running
/// on it) for what a crash left (staged objects in work/, dangling index entries), and with
/// `--fix` removes it, as every vmm start does. Status 0: consistent (or fixed), 1: not, 2:
/// the check failed.
fn check_layer(args: &[std::ffi::OsString]) -> ExitCode {
    let fix = args.iter().any(|a| a == "--fix");
    let dirs: Vec<_> = args.iter().filter(|a| *a != "--fix").collect();
    let [dir] = dirs.as_slice() else {
        eprintln!("usage: vmm check-layer [--fix] DIR");
        return ExitCode::from(2);
    };
    let dir = std::path::Path::new(dir);
    match vmm::fs_backends::layer::check::check_layer(dir, fix) {
        Ok(report) => {
            println!("{}: {report}", dir.display());
            if report.consistent() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("vmm: error: cannot check the layer {}: {e}", dir.display());
            ExitCode::from(2)
        }
    }
}

/// Keeps every thread's allocations in the main heap. Each extra glibc arena is a 64 MiB
/// mapping aligned to 64 MiB, and on a host whose transparent huge pages are `always`, the
/// first allocation a thread makes there can fault in a whole 2 MiB page: seen in the boot
/// benchmark as 2 MiB more overhead in some boots. The vmm's threads allocate little.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: called first in main, before any other thread exists; mallopt only sets a
    // malloc tunable.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    one_malloc_arena();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    vmm::test_fault::init();
    if cfg!(vmm_profiling) {
        eprintln!("vmm: warning: profiling build: no seccomp filters (never ship this build)");
    }

    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "check-layer") {
        end_on_panic();
        return check_layer(&args[2..]);
    }
    let cli = Cli::try_parse_from(&args);
    match &cli {
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Ok(cli) if cli.print_spec => {
            end_on_panic();
            return match spec_from_cli(cli)
                .and_then(|spec| Ok(serde_json::to_string_pretty(&spec)?))
            {
                Ok(json) => {
                    println!("{json}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vmm: error: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        _ => {}
    }

    // The exit record before anything else: an earlier run's record must never be taken for
    // this run's end, however early this run ends.
    let mut record_problem = None;
    if let Some(path) = record_path(&args, cli.as_ref().ok()) {
        match vmm::exit::record::RecordFile::open(&path) {
            Ok(file) => {
                if let Err(e) = file.clear() {
                    record_problem = Some(format!(
                        "cannot remove the earlier exit record {}: {e}",
                        path.display()
                    ));
                }
                vmm::exit::record::install(file);
            }
            Err(e) => {
                eprintln!(
                    "vmm: error: no exit record can be written at {}: {e}",
                    path.display()
                );
                return ExitCode::from(2);
            }
        }
    }
    end_on_panic();
    if let Some(problem) = record_problem {
        return start_failed(problem);
    }
    if let Err(e) = vmm::exit::fatal::init() {
        return start_failed(format!("cannot make the vmm's end event: {e}"));
    }
    if let Err(e) = vmm::seccomp::install_violation_handler() {
        return start_failed(format!("cannot install the seccomp violation handler: {e}"));
    }
    let cli = match cli {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or("invalid command line");
            return record_start_failed(first.strip_prefix("error: ").unwrap_or(first));
        }
    };
    let spec = match spec_from_cli(&cli) {
        Ok(spec) => spec,
        Err(e) => return start_failed(format!("{e:#}")),
    };
    let images = match image_settings(&cli, &spec) {
        Ok(images) => images,
        Err(e) => return start_failed(format!("{e:#}")),
    };
    if let Err(e) = vmm::vstate::run_state::install_kick_handler() {
        return start_failed(format!("cannot install the vCPU kick handler: {e}"));
    }
    if let Err(e) = vmm::api::signals::install() {
        return start_failed(format!("cannot handle SIGTERM: {e}"));
    }
    let listener = match spec.api_sock.as_deref().map(vmm::api::bind).transpose() {
        Ok(listener) => listener,
        Err(e) => return start_failed(e.to_string()),
    };
    // From here on, the socket is removed however the vmm ends.
    let _socket = SocketFile(spec.api_sock.clone());
    if let Some(path) = &spec.api_sock {
        vmm::exit::fatal::remove_on_end(path);
    }

    raise_open_file_limit();
    // The vmm makes copy-ups itself, in each layer's work/ (fs_backends::copy_up), but
    // fuse-backend-rs's overlay (GRIDNODE_LAYER=overlay) still makes (and at once removes) an
    // empty temporary file in TMPDIR for each: keep it on the first layer's filesystem. Set
    // while the process has one thread.
    if let Some(layer) = spec.fs.iter().find_map(|share| share.writable_layer()) {
        std::env::set_var("TMPDIR", vmm::fs_backends::layer_work_dir(layer));
    }
    let layers = spec.fs.iter().any(|share| share.writable_layer().is_some());
    if let Err(e) = vmm::caps::drop_all_but(&vmm::caps::kept(layers)) {
        return start_failed(e.to_string());
    }
    vmm::api::metrics::prepare();
    let vm = match vmm::builder::build(&spec, &images, &cli.kvm_device, started) {
        Ok(vm) => vm,
        Err(e) => return start_failed(e.to_string()),
    };
    let controller = vmm::seccomp::filter(
        vmm::seccomp::ThreadKind::Controller,
        vmm::seccomp::Violation::Trap,
    )
    .map_err(|e| e.to_string())
    .and_then(|filter| {
        vmm::api::spawn_controller(vm.control.clone(), listener, std::sync::Arc::new(filter))
            .map_err(|e| e.to_string())
    });
    if let Err(e) = controller {
        vm.control.end(vmm::exit::VmExit::Killed(e.clone()));
        return start_failed(e);
    }
    // From here the main thread (and the stdin forwarder it starts) only waits for the VM's
    // end and reports it.
    let confined = vmm::builder::vmm_thread_filter()
        .map_err(|e| e.to_string())
        .and_then(|filter| {
            vmm::seccomp::apply_to_current_thread(&filter).map_err(|e| e.to_string())
        });
    if let Err(e) = confined {
        vm.control.end(vmm::exit::VmExit::Killed(e.clone()));
        return start_failed(e);
    }
    if spec.serial == SerialOutput::Stdout {
        vmm::stdin::forward_stdin(vm.serial.clone());
    }
    let reason = vm.wait();
    vmm::stdin::restore_terminal();
    if let Some(booted) = vm.exit.booted_after() {
        eprintln!(
            "vmm: guest booted in {:.3} ms",
            booted.as_secs_f64() * 1000.0
        );
    }
    match &reason {
        vmm::exit::VmExit::Fault(details) => eprintln!("vmm: guest fault: {details}"),
        vmm::exit::VmExit::Killed(why) => eprintln!("vmm: VM killed: {why}"),
        vmm::exit::VmExit::GuestPanic(why) => eprintln!("vmm: guest kernel panic: {why}"),
        other => tracing::info!("VM ended: {other:?}"),
    }
    record_exit(&reason.record());
    drop(_socket);
    // The vCPU threads may still be inside KVM_RUN; exiting the process ends them.
    std::process::exit(reason.exit_code())
}

/// The control API's socket file, removed when dropped.
struct SocketFile(Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}
