//! Building the jail and running the program in it: the parent side (per-VM directory,
//! cgroup, fork into a new PID namespace, supervision, cleanup) and the child side
//! (namespaces, mounts, pivot_root, dropping privileges, exec).

use std::convert::Infallible;
use std::ffi::{CString, OsStr};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::stat::{fstat, makedev, mknodat, umask, Mode, SFlag};
use nix::sys::statfs::{fstatfs, TMPFS_MAGIC};
use nix::sys::statvfs::{fstatvfs, FsFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{
    chdir, chroot, execve, fchdir, fchownat, pipe2, pivot_root, setgroups, sethostname, setresgid,
    setresuid, unlinkat, Gid, Pid, Uid, UnlinkatFlags,
};

use crate::cgroup::Cgroup;
use crate::config::JailConfig;
use crate::error::{Context, Error, Result};
use crate::fsutil::{self, Source};
use crate::sys;

/// Environment variables passed through to the program; everything else is dropped.
pub const PASSED_ENV: &[&str] = &["VMM_LOG", "RUST_LOG"];

/// Device nodes in the jail's /dev: (name, major, minor, mode). `kvm` only with
/// `--dev-kvm`, group-owned by the jail's gid. `null` (std and the vmm redirect to it)
/// and `urandom` (std's HashMap seeds and the vmm's random numbers; getrandom(2) is
/// preferred but some code opens the file).
const DEVICES: &[(&str, u64, u64, u32)] = &[("null", 1, 3, 0o666), ("urandom", 1, 9, 0o666)];
const KVM: (&str, u64, u64, u32) = ("kvm", 10, 232, 0o660);

/// Signals the jailer forwards to the program.
const FORWARDED: &[Signal] = &[
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// One jailed run of a program. Build it from a [`JailConfig`], then [`Jail::run`] it.
#[derive(Debug, Clone)]
pub struct Jail {
    config: JailConfig,
}

/// The per-VM directory `<base>/<id>/root`, removed on drop.
struct VmDir {
    base: OwnedFd,
    vm: OwnedFd,
    id: PathBuf,
    root_path: PathBuf,
}

impl Drop for VmDir {
    fn drop(&mut self) {
        let root = unlinkat(self.vm.as_fd(), "root", UnlinkatFlags::RemoveDir);
        let vm = unlinkat(self.base.as_fd(), &self.id, UnlinkatFlags::RemoveDir);
        if let Err(e) = root.and(vm) {
            tracing::warn!(
                "removing the per-VM directory {}: {e}",
                self.root_path.display()
            );
        }
    }
}

/// What the child needs, prepared by the parent before the fork (so that the child
/// allocates little and every host path was checked by the parent).
struct Plan<'a> {
    config: &'a JailConfig,
    root_path: PathBuf,
    root_dir: OwnedFd,
    exec: Source,
    exec_dest: PathBuf,
    binds: Vec<(Source, &'a crate::config::BindMount)>,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

impl Jail {
    /// Validates `config`; nothing is created yet.
    pub fn new(config: JailConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { config })
    }

    pub fn config(&self) -> &JailConfig {
        &self.config
    }

    /// Builds the jail, runs the program in it, waits for it, cleans up (cgroup and
    /// per-VM directory) and returns its exit status (128 + signal when killed).
    ///
    /// Forks: call it from a single-threaded process (the `jailer` binary does). A
    /// multi-threaded caller such as the node agent runs the `jailer` binary instead.
    pub fn run(&self) -> Result<i32> {
        let c = &self.config;
        let exec_dest = c.exec_in_jail()?;
        let exec = fsutil::open_source(&c.exec)?;
        if exec.is_dir {
            return Err(Error::Config(format!(
                "--exec {} is a directory",
                c.exec.display()
            )));
        }
        let mut binds = Vec::new();
        for m in &c.mounts {
            binds.push((fsutil::open_source(&m.src)?, m));
        }
        let argv = std::iter::once(exec_dest.as_os_str())
            .chain(c.args.iter().map(|a| a.as_os_str()))
            .map(cstring)
            .collect::<Result<Vec<_>>>()?;
        let envp = PASSED_ENV
            .iter()
            .filter_map(|k| std::env::var_os(k).map(|v| (k, v)))
            .map(|(k, v)| {
                let mut kv = OsStr::new(k).to_owned();
                kv.push("=");
                kv.push(v);
                cstring(&kv)
            })
            .collect::<Result<Vec<_>>>()?;

        // <base> (created 0755 if missing), <base>/<id> (0700, must be new), and the
        // mount point <base>/<id>/root (0700); no component may be a link.
        let base = fsutil::create_dirs_nofollow(&c.base, 0o755)?;
        let st = fstat(base.as_fd()).ctx(|| format!("stat of {}", c.base.display()))?;
        if st.st_uid != 0 || st.st_mode & 0o022 != 0 {
            return Err(Error::Config(format!(
                "--base {} must be owned by root and writable by nobody else (is uid {}, mode {:o})",
                c.base.display(),
                st.st_uid,
                st.st_mode & 0o7777
            )));
        }
        let vm_path = c.vm_dir();
        let vm = fsutil::mkdir_at(
            base.as_fd(),
            OsStr::new(&c.id),
            0o700,
            (0, 0),
            true,
            &vm_path,
        )?;
        let root_path = vm_path.join("root");
        let root_dir = fsutil::mkdir_at(
            vm.as_fd(),
            OsStr::new("root"),
            0o700,
            (0, 0),
            true,
            &root_path,
        )?;
        let _vm_dir = VmDir {
            base,
            vm,
            id: PathBuf::from(&c.id),
            root_path: root_path.clone(),
        };
        let cgroup = c
            .cgroup
            .as_ref()
            .map(|cg| Cgroup::create(cg, &c.id))
            .transpose()?;

        let plan = Plan {
            config: c,
            root_path,
            root_dir,
            exec,
            exec_dest,
            binds,
            argv,
            envp,
        };
        let status = spawn_and_supervise(&plan, cgroup.as_ref())?;
        if let Some(cg) = cgroup {
            cg.remove()?;
        }
        Ok(status)
    }
}

fn cstring(s: &OsStr) -> Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| Error::Config(format!("{s:?} contains a NUL byte")))
}

fn spawn_and_supervise(plan: &Plan, cgroup: Option<&Cgroup>) -> Result<i32> {
    let mut signals = SigSet::empty();
    for s in FORWARDED {
        signals.add(*s);
    }
    signals.add(Signal::SIGCHLD);
    let mut old_mask = SigSet::empty();
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&signals), Some(&mut old_mask))
        .ctx(|| "blocking signals".into())?;

    // go: parent -> child once the child is in its cgroup. err: child -> parent, the
    // setup error (close-on-exec: EOF without data means the exec happened).
    let (go_read, go_write) = pipe2(OFlag::O_CLOEXEC).ctx(|| "creating a pipe".into())?;
    let (err_read, err_write) = pipe2(OFlag::O_CLOEXEC).ctx(|| "creating a pipe".into())?;

    // SAFETY: the jailer is single-threaded here (see Jail::run).
    let forked = unsafe { sys::fork_new_pid_namespace() }
        .ctx(|| "forking into a new PID namespace".into())?;
    let child = match forked {
        sys::Forked::Child => {
            drop(go_write);
            drop(err_read);
            let Err(err) = child_main(plan, go_read);
            let mut w = std::fs::File::from(err_write);
            let _ = w.write_all(err.to_string().as_bytes());
            sys::exit_immediately(127);
        }
        sys::Forked::Parent(pid) => pid,
    };
    drop(go_read);
    drop(err_write);
    tracing::debug!(pid = child.as_raw(), "jailed child started");

    let started = (|| {
        if let Some(cg) = cgroup {
            cg.add_process(child.as_raw())?;
        }
        std::fs::File::from(go_write)
            .write_all(b"g")
            .ctx(|| "starting the jailed child".into())?;
        let mut msg = String::new();
        std::fs::File::from(err_read)
            .read_to_string(&mut msg)
            .ctx(|| "reading the jailed child's status".into())?;
        if msg.is_empty() {
            Ok(())
        } else {
            Err(Error::Child(msg))
        }
    })();
    if let Err(e) = started {
        let _ = kill(child, Signal::SIGKILL);
        let _ = waitpid(child, None);
        let _ = old_mask.thread_set_mask();
        return Err(e);
    }
    let status = supervise(child, &signals, plan.config.kill_timeout);
    let _ = old_mask.thread_set_mask();
    status
}

/// Waits for the child, forwarding signals; a child that has not ended `kill_timeout`
/// after the first forwarded signal is killed (as PID 1 of its namespace it only
/// receives the signals it has a handler for).
fn supervise(child: Pid, signals: &SigSet, kill_timeout: Duration) -> Result<i32> {
    let mut kill_at: Option<Instant> = None;
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                return Err(Error::Sys {
                    what: "waiting for the jailed program".into(),
                    source: e,
                })
            }
        }
        let now = Instant::now();
        if let Some(at) = kill_at {
            if now >= at {
                tracing::warn!("the jailed program ignored the forwarded signal; killing it");
                let _ = kill(child, Signal::SIGKILL);
                kill_at = None;
            }
        }
        let wait = kill_at
            .map(|at| at.saturating_duration_since(now))
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        match sys::sigtimedwait(signals, wait).ctx(|| "waiting for signals".into())? {
            Some(sig) if FORWARDED.contains(&sig) => {
                tracing::info!("forwarding {sig} to the jailed program");
                let _ = kill(child, sig);
                kill_at.get_or_insert(Instant::now() + kill_timeout);
            }
            _ => {}
        }
    }
}

/// The child: PID 1 of the new PID namespace. Returns only on error.
fn child_main(plan: &Plan, go: OwnedFd) -> Result<Infallible> {
    let c = plan.config;
    // Dies with the jailer (set again after the credentials change, which clears it).
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .ctx(|| "setting the parent-death signal".into())?;
    let mut byte = [0u8; 1];
    let n = std::fs::File::from(go)
        .read(&mut byte)
        .ctx(|| "waiting for the jailer".into())?;
    if n == 0 {
        return Err(Error::Child("the jailer went away before the start".into()));
    }
    let saved_umask = umask(Mode::empty());
    // A session of its own: no controlling terminal, so a terminal on stdin cannot be
    // used to push input into the host's shell (TIOCSTI), and terminal signals reach the
    // jailer, which forwards them.
    nix::unistd::setsid().ctx(|| "starting a new session".into())?;

    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS,
    )
    .ctx(|| "creating mount, network, IPC and UTS namespaces".into())?;
    sethostname(&c.id).ctx(|| "setting the jail's host name".into())?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .ctx(|| "making / a private mount".into())?;

    // The jail's root: a small tmpfs over <base>/<id>/root, private to this mount
    // namespace, so nothing the jail is built from lands on the host's disk and nobody
    // else can see or race its contents.
    // The mount point, opened again in this namespace (the parent's descriptor names a
    // mount of the host's namespace) and checked to be the directory the parent made.
    let before = fstat(plan.root_dir.as_fd()).ctx(|| "stat of the jail root".into())?;
    let point = fsutil::open_dir_nofollow(&plan.root_path)?;
    let here = fstat(point.as_fd()).ctx(|| "stat of the jail root".into())?;
    if (here.st_dev, here.st_ino) != (before.st_dev, before.st_ino) {
        return Err(Error::Child(format!(
            "{} was replaced while the jail was being built",
            plan.root_path.display()
        )));
    }
    mount(
        Some("jailroot"),
        format!("/proc/self/fd/{}", point.as_raw_fd()).as_str(),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(format!("mode=0750,uid=0,gid={},size=1m,nr_inodes=1024", c.gid).as_str()),
    )
    .ctx(|| format!("mounting the jail root on {}", plan.root_path.display()))?;
    let root = fsutil::open_dir_nofollow(&plan.root_path)?;
    let st = fstat(root.as_fd()).ctx(|| "stat of the jail root".into())?;
    let fs = fstatfs(root.as_fd()).ctx(|| "statfs of the jail root".into())?;
    if st.st_dev == before.st_dev || fs.filesystem_type() != TMPFS_MAGIC {
        return Err(Error::Child(format!(
            "{} is not the tmpfs just mounted",
            plan.root_path.display()
        )));
    }
    fchdir(root.as_fd()).ctx(|| "entering the jail root".into())?;

    // Everything below is relative to the jail root (the current directory).
    bind(&plan.exec, &plan.exec_dest, false)?;
    for (src, m) in &plan.binds {
        bind(src, &m.dest, m.writable)?;
    }
    make_dev(c.dev_kvm, c.gid)?;
    if c.proc_fs {
        mkdir_rel(Path::new("proc"), 0o555)?;
        mount(
            Some("proc"),
            "proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("hidepid=2,subset=pid"),
        )
        .ctx(|| "mounting /proc (hidepid=2,subset=pid)".into())?;
    }

    enter_root()?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .ctx(|| "making the jail root read-only".into())?;

    drop_privileges(c.uid, c.gid)?;
    sys::reset_signal_dispositions();
    SigSet::empty()
        .thread_set_mask()
        .ctx(|| "unblocking signals".into())?;
    umask(saved_umask);
    sys::cloexec_from(3).ctx(|| "closing inherited descriptors".into())?;
    for fd in &c.keep_fds {
        sys::keep_open(*fd).ctx(|| format!("keeping inherited descriptor {fd} (--keep-fd)"))?;
    }
    let path = cstring(plan.exec_dest.as_os_str())?;
    execve(&path, &plan.argv, &plan.envp)
        .ctx(|| format!("executing {} in the jail", plan.exec_dest.display()))
}

/// Makes the current directory (the jail root) the root of this mount namespace.
///
/// `pivot_root(".", ".")` puts the old root on top of the new one; it is then detached, so
/// nothing of the host's tree is left in the namespace. A host running from its
/// initramfs (rootfs, as the test bed and a diskless node do) cannot be pivoted away from
/// (EINVAL): there the jail root is moved over `/` and the process chroots into it, as
/// `switch_root` does. The host's tree then stays mounted underneath, covered and out of
/// reach of a process without CAP_SYS_ADMIN and CAP_SYS_CHROOT (both dropped below).
fn enter_root() -> Result<()> {
    match pivot_root(".", ".") {
        Ok(()) => {
            umount2(".", MntFlags::MNT_DETACH).ctx(|| "detaching the old root".into())?;
        }
        Err(Errno::EINVAL) if host_root_is_initramfs() => {
            tracing::debug!("the host runs from its initramfs: moving the jail root over /");
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .ctx(|| "moving the jail root over / (initramfs host)".into())?;
            chroot(".").ctx(|| "chroot into the jail".into())?;
        }
        Err(e) => {
            return Err(Error::Sys {
                what: "pivot_root into the jail".into(),
                source: e,
            })
        }
    }
    chdir("/").ctx(|| "chdir /".into())
}

/// `RAMFS_MAGIC` from linux/magic.h (not in libc or nix).
const RAMFS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0x8584_58f6);

/// Whether `/` is the kernel's rootfs (ramfs or tmpfs, not a mount of anything else).
fn host_root_is_initramfs() -> bool {
    nix::sys::statfs::statfs("/")
        .map(|s| {
            let t = s.filesystem_type();
            t == RAMFS_MAGIC || t == TMPFS_MAGIC
        })
        .unwrap_or(false)
}

/// Bind-mounts `src` (held open) at `dest` in the jail: read-only, nosuid, nodev, or,
/// when `writable`, nosuid, nodev. A source's noexec is kept.
fn bind(src: &Source, dest: &Path, writable: bool) -> Result<()> {
    let rel = dest.strip_prefix("/").unwrap_or(dest);
    if let Some(parent) = rel.parent() {
        mkdir_all_rel(parent)?;
    }
    if src.is_dir {
        mkdir_rel(rel, 0o755)?;
    } else {
        let fd = nix::fcntl::openat(
            nix::fcntl::AT_FDCWD,
            rel,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o444),
        )
        .ctx(|| format!("creating the mount point {}", dest.display()))?;
        drop(fd);
    }
    // The parent's descriptor belongs to the host's mount namespace, and a bind source
    // must be a mount of ours: open the same file again here and check it is the one the
    // parent checked.
    let here = fsutil::open_source(&src.resolved)?;
    let (a, b) = (
        fstat(src.fd.as_fd()).ctx(|| format!("stat of {}", src.resolved.display()))?,
        fstat(here.fd.as_fd()).ctx(|| format!("stat of {}", src.resolved.display()))?,
    );
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
        return Err(Error::Child(format!(
            "bind source {} changed while the jail was being built",
            src.resolved.display()
        )));
    }
    let from = format!("/proc/self/fd/{}", here.fd.as_raw_fd());
    mount(
        Some(from.as_str()),
        rel,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .ctx(|| format!("binding {} at {}", src.resolved.display(), dest.display()))?;
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !writable {
        flags |= MsFlags::MS_RDONLY;
    }
    if fstatvfs(src.fd.as_fd())
        .map(|v| v.flags().contains(FsFlags::ST_NOEXEC))
        .unwrap_or(false)
    {
        flags |= MsFlags::MS_NOEXEC;
    }
    mount(None::<&str>, rel, None::<&str>, flags, None::<&str>).ctx(|| {
        format!(
            "remounting {} {}",
            dest.display(),
            if writable {
                "nosuid,nodev"
            } else {
                "ro,nosuid,nodev"
            }
        )
    })?;
    tracing::debug!(src = %src.resolved.display(), dest = %dest.display(), writable, "bound");
    Ok(())
}

/// Creates a directory (relative to the jail root) with exactly `mode`, owned by root.
fn mkdir_rel(rel: &Path, mode: u32) -> Result<()> {
    nix::sys::stat::mkdirat(nix::fcntl::AT_FDCWD, rel, Mode::from_bits_truncate(mode))
        .ctx(|| format!("creating /{} in the jail", rel.display()))
}

fn mkdir_all_rel(rel: &Path) -> Result<()> {
    let mut at = PathBuf::new();
    for part in rel.components() {
        at.push(part);
        match nix::sys::stat::mkdirat(nix::fcntl::AT_FDCWD, &at, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => {
                return Err(Error::Sys {
                    what: format!("creating /{} in the jail", at.display()),
                    source: e,
                })
            }
        }
    }
    Ok(())
}

/// /dev: a read-only tmpfs (nosuid, noexec) holding only the nodes in `DEVICES` (and
/// `kvm`).
fn make_dev(dev_kvm: bool, gid: u32) -> Result<()> {
    mkdir_rel(Path::new("dev"), 0o755)?;
    mount(
        Some("jaildev"),
        "dev",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,uid=0,gid=0,size=4k,nr_inodes=16"),
    )
    .ctx(|| "mounting the jail's /dev".into())?;
    let kvm = dev_kvm.then_some(KVM);
    for (name, major, minor, mode) in DEVICES.iter().copied().chain(kvm) {
        let path = Path::new("dev").join(name);
        mknodat(
            nix::fcntl::AT_FDCWD,
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(mode),
            makedev(major, minor),
        )
        .ctx(|| format!("creating /dev/{name} in the jail"))?;
        if name == "kvm" {
            fchownat(
                nix::fcntl::AT_FDCWD,
                &path,
                Some(Uid::from_raw(0)),
                Some(Gid::from_raw(gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .ctx(|| "setting the group of /dev/kvm".into())?;
        }
    }
    mount(
        None::<&str>,
        "dev",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .ctx(|| "making the jail's /dev read-only".into())
}

/// Becomes `uid:gid` with no supplementary groups, no capabilities in any set (bounding
/// and ambient included) and no way to gain privileges again.
fn drop_privileges(uid: u32, gid: u32) -> Result<()> {
    sys::clear_ambient_set().ctx(|| "clearing the ambient capabilities".into())?;
    sys::drop_bounding_set().ctx(|| "dropping the capability bounding set".into())?;
    setgroups(&[]).ctx(|| "clearing supplementary groups".into())?;
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    setresgid(g, g, g).ctx(|| format!("setresgid({gid})"))?;
    setresuid(u, u, u).ctx(|| format!("setresuid({uid})"))?;
    sys::clear_capabilities().ctx(|| "clearing the capability sets".into())?;
    nix::sys::prctl::set_no_new_privs().ctx(|| "setting no_new_privs".into())?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .ctx(|| "setting the parent-death signal".into())?;
    let caps = sys::capabilities().ctx(|| "reading capabilities".into())?;
    if caps.effective | caps.permitted | caps.inheritable != 0 || sys::bounding_set() != 0 {
        return Err(Error::Child(format!(
            "capabilities remain after dropping them: {caps:?}"
        )));
    }
    Ok(())
}
