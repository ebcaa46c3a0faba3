//! The `jailer` command line, and its inverse for callers that run the binary (the node
//! agent): [`JailConfig::to_args`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::{BindMount, CgroupConfig, JailConfig};

/// Default `--cgroup-root`.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, Parser)]
#[command(
    name = "jailer",
    about = "Runs a micro-VM monitor in a jail: own namespaces, a minimal pivot_root'ed \
             root, cgroup v2 limits, no privileges",
    after_help = "Everything after -- is passed to the program."
)]
pub struct Cli {
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
    #[arg(long, default_value = DEFAULT_CGROUP_ROOT)]
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
    /// Keep inherited descriptor N open in the program (repeatable; every other one above 2
    /// is closed): a tap queue the caller opened for the vmm's `--net id=ID,fd=N` (the
    /// jail's network namespace has no taps of its own).
    #[arg(long = "keep-fd", value_name = "N")]
    keep_fd: Vec<i32>,
    /// Arguments for the program.
    #[arg(last = true)]
    args: Vec<OsString>,
}

impl Cli {
    /// The jail this command line describes.
    pub fn into_config(self) -> anyhow::Result<JailConfig> {
        let mut mounts = Vec::new();
        for spec in &self.ro {
            mounts.push(BindMount::parse(spec, false).with_context(|| format!("--ro {spec}"))?);
        }
        for spec in &self.rw {
            mounts.push(BindMount::parse(spec, true).with_context(|| format!("--rw {spec}"))?);
        }
        let kill_timeout = Duration::try_from_secs_f64(self.kill_timeout).map_err(|_| {
            anyhow::anyhow!(
                "--kill-timeout {} must be a number of seconds",
                self.kill_timeout
            )
        })?;
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
            kill_timeout,
            keep_fds: self.keep_fd,
        })
    }
}

impl JailConfig {
    /// The `jailer` arguments (after the program name) that describe this jail.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |k: &str, v: OsString| {
            a.push(k.into());
            a.push(v);
        };
        push("--id", self.id.clone().into());
        push("--exec", self.exec.clone().into());
        push("--uid", self.uid.to_string().into());
        push("--gid", self.gid.to_string().into());
        push("--base", self.base.clone().into());
        match &self.cgroup {
            None => a.push("--no-cgroup".into()),
            Some(cg) => {
                a.push("--cgroup-root".into());
                a.push(cg.root.clone().into());
                if let Some(m) = cg.memory_max {
                    a.push("--cgroup-memory".into());
                    a.push(m.to_string().into());
                }
                if let Some(c) = cg.cpus {
                    a.push("--cgroup-cpus".into());
                    a.push(c.to_string().into());
                }
                if let Some(p) = cg.pids_max {
                    a.push("--cgroup-pids".into());
                    a.push(p.to_string().into());
                }
            }
        }
        for m in &self.mounts {
            let mut spec = m.src.clone().into_os_string();
            spec.push(":");
            spec.push(&m.dest);
            a.push(if m.writable { "--rw" } else { "--ro" }.into());
            a.push(spec);
        }
        if self.dev_kvm {
            a.push("--dev-kvm".into());
        }
        if self.proc_fs {
            a.push("--proc".into());
        }
        a.push("--kill-timeout".into());
        a.push(self.kill_timeout.as_secs_f64().to_string().into());
        for fd in &self.keep_fds {
            a.push("--keep-fd".into());
            a.push(fd.to_string().into());
        }
        a.push("--".into());
        a.extend(self.args.iter().cloned());
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<JailConfig> {
        Cli::try_parse_from(std::iter::once("jailer").chain(args.iter().copied()))?.into_config()
    }

    #[test]
    fn parses_a_full_command_line_and_round_trips() {
        let c = parse(&[
            "--id",
            "vm-7",
            "--exec",
            "/usr/bin/vmm",
            "--uid",
            "1000",
            "--gid",
            "1001",
            "--base",
            "/srv/jailer",
            "--cgroup-memory",
            "536870912",
            "--cgroup-cpus",
            "1.5",
            "--cgroup-pids",
            "64",
            "--ro",
            "/srv/img/k:/guest/k",
            "--rw",
            "/srv/layers/vm-7",
            "--dev-kvm",
            "--proc",
            "--keep-fd",
            "5",
            "--",
            "--kernel",
            "/guest/k",
            "--",
            "/bin/sh",
        ])
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.mounts.len(), 2);
        assert!(c.mounts[1].writable);
        assert_eq!(c.args, ["--kernel", "/guest/k", "--", "/bin/sh"]);
        assert_eq!(c.keep_fds, [5]);
        let cg = c.cgroup.clone().unwrap();
        assert_eq!(cg.root, PathBuf::from(DEFAULT_CGROUP_ROOT));
        assert_eq!(
            (cg.memory_max, cg.cpus, cg.pids_max),
            (Some(536870912), Some(1.5), Some(64))
        );

        let args = c.to_args();
        let again = Cli::try_parse_from(std::iter::once(OsString::from("jailer")).chain(args))
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(format!("{again:?}"), format!("{c:?}"));
    }

    #[test]
    fn refuses_bad_command_lines() {
        let base = ["--id", "vm", "--exec", "/vmm", "--uid", "1", "--gid", "1"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            parse(&v)
        };
        assert!(with(&["--no-cgroup", "--cgroup-memory", "1"]).is_err());
        assert!(with(&["--ro", "relative"]).is_err());
        assert!(with(&["--kill-timeout", "-1"]).is_err());
        assert!(with(&["--kill-timeout", "1e300"]).is_err());
        assert!(with(&["--kill-timeout", "NaN"]).is_err());
        assert!(with(&["--uid", "x"]).is_err());
        assert!(with(&["--keep-fd", "x"]).is_err());
        assert!(with(&["--keep-fd", "2"]).unwrap().validate().is_err());
        assert!(parse(&["--exec", "/vmm", "--uid", "1", "--gid", "1"]).is_err());
        assert!(with(&[]).unwrap().validate().is_ok());
    }
}
