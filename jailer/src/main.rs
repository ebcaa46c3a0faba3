//! `jailer`: runs a micro-VM monitor in a jail. See the library documentation for the
//! layout and the threat model.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use jailer::{BindMount, CgroupConfig, Jail, JailConfig};

#[derive(Debug, Parser)]
#[command(
    name = "jailer",
    about = "Runs a micro-VM monitor in a jail: own namespaces, a minimal pivot_root'ed \
             root, cgroup v2 limits, no privileges",
    after_help = "Everything after -- is passed to the program."
)]
struct Cli {
    /// VM id ([A-Za-z0-9-]{1,64}): names <base>/<id> and the cgroup gridnode/<id>.
    #[arg(long)]
    id: String,
    /// The program to jail (bound read-only at /<file name> in the jail).
    #[arg(long)]
    exec: PathBuf,
    /// User id the program runs as (not 0).
    #[arg(long)]
    uid: u32,
    /// Group id the program runs as (not 0); /dev/kvm belongs to it.
    #[arg(long)]
    gid: u32,
    /// Directory holding the per-VM directories.
    #[arg(long, default_value = "/srv/jailer")]
    base: PathBuf,
    /// memory.max in bytes.
    #[arg(long, value_name = "BYTES")]
    cgroup_memory: Option<u64>,
    /// CPUs of time per period (cpu.max quota = N x 100 ms per 100 ms; may be fractional).
    #[arg(long, value_name = "N")]
    cgroup_cpus: Option<f64>,
    /// pids.max.
    #[arg(long, value_name = "N")]
    cgroup_pids: Option<u64>,
    /// Where cgroup v2 is mounted.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// Run without a cgroup (no resource limits).
    #[arg(long, conflicts_with_all = ["cgroup_memory", "cgroup_cpus", "cgroup_pids"])]
    no_cgroup: bool,
    /// Bind SRC read-only (nosuid, nodev) at DEST (default: SRC) in the jail.
    #[arg(long = "ro", value_name = "SRC[:DEST]")]
    ro: Vec<String>,
    /// Bind SRC read-write (nosuid, nodev) at DEST (default: SRC) in the jail.
    #[arg(long = "rw", value_name = "SRC[:DEST]")]
    rw: Vec<String>,
    /// Create /dev/kvm (10:232, 0660, group = --gid) in the jail.
    #[arg(long)]
    dev_kvm: bool,
    /// Mount a procfs (hidepid=2, subset=pid) at /proc: needed by the vmm's directory
    /// shares and writable layers (/proc/self/fd).
    #[arg(long)]
    proc: bool,
    /// Seconds between forwarding SIGTERM/SIGINT and killing a program that ignores it.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    kill_timeout: f64,
    /// Arguments for the program.
    #[arg(last = true)]
    args: Vec<OsString>,
}

impl Cli {
    fn into_config(self) -> anyhow::Result<JailConfig> {
        let mut mounts = Vec::new();
        for spec in &self.ro {
            mounts.push(BindMount::parse(spec, false).with_context(|| format!("--ro {spec}"))?);
        }
        for spec in &self.rw {
            mounts.push(BindMount::parse(spec, true).with_context(|| format!("--rw {spec}"))?);
        }
        if !(self.kill_timeout.is_finite() && self.kill_timeout >= 0.0) {
            anyhow::bail!(
                "--kill-timeout {} must be a number of seconds",
                self.kill_timeout
            );
        }
        let cgroup = (!self.no_cgroup).then(|| CgroupConfig {
            root: self.cgroup_root.clone(),
            memory_max: self.cgroup_memory,
            cpus: self.cgroup_cpus,
            pids_max: self.cgroup_pids,
        });
        Ok(JailConfig {
            id: self.id,
            exec: self.exec,
            uid: self.uid,
            gid: self.gid,
            base: self.base,
            cgroup,
            mounts,
            dev_kvm: self.dev_kvm,
            proc_fs: self.proc,
            args: self.args,
            kill_timeout: Duration::from_secs_f64(self.kill_timeout),
        })
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("JAILER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = cli
        .into_config()
        .and_then(|c| Ok(Jail::new(c)?))
        .and_then(|jail| Ok(jail.run()?));
    match result {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(255)),
        Err(e) => {
            eprintln!("jailer: error: {e:#}");
            ExitCode::from(125)
        }
    }
}
