//! The jailer: runs one micro-VM monitor (the `vmm`) for one tenant VM in a jail, as
//! Firecracker's jailer does.
//!
//! # Layout
//!
//! On the host:
//! - `<base>` must be owned by root and writable by nobody else.
//! - `<base>/<id>/` (0700, root) and `<base>/<id>/root` (0700, root): the per-VM
//!   directory and the jail root's mount point. Created with `mkdirat` one component at a
//!   time without following links (a link anywhere is refused), `<base>/<id>` must not
//!   exist yet. Both are removed when the program ends. The jail root is mounted through
//!   a descriptor re-opened in the jail's mount namespace and checked to be the same
//!   directory.
//! - `<cgroup-root>/gridnode/<id>`: the cgroup v2 with `memory.max`, `cpu.max`
//!   (`--cgroup-cpus N` = N x 100 ms per 100 ms) and `pids.max`; removed at the end.
//!
//! Inside the jail (its own mount namespace; nothing of it is visible on the host):
//! - `/`: a 1 MiB tmpfs mounted over `<base>/<id>/root`, mode 0750 root:`gid` (the
//!   program must be able to look paths up), remounted read-only, nosuid, nodev after
//!   it is built: the program cannot create anything outside its `--rw` binds.
//! - `/<name of --exec>`: the program, bound read-only, nosuid, nodev.
//! - each `--ro SRC[:DEST]`: bound read-only, nosuid, nodev (kernels, images, the chunk
//!   cache, and for a dynamically linked program its libraries: `--ro /lib/x86_64-linux-gnu
//!   --ro /lib64`, see the crate README).
//! - each `--rw SRC[:DEST]`: bound nosuid, nodev (the VM's writable layer).
//! - `/dev`: a tmpfs, read-only, nosuid, noexec, with only `null` (1:3, 0666), `urandom`
//!   (1:9, 0666) and, with `--dev-kvm`, `kvm` (10:232, 0660 root:`gid`).
//! - `/proc` only with `--proc`: a new procfs of the jail's PID namespace with
//!   `hidepid=2,subset=pid` (the vmm's passthrough file systems, used for directory
//!   shares and writable layers, need `/proc/self/fd`; nothing else of /proc is there).
//!
//! Sources are resolved once (operator links such as `/lib64 -> usr/lib64` are followed),
//! then opened component by component with `O_NOFOLLOW` and bound from the open
//! descriptor, so a link swapped into a source path after the check is refused.
//!
//! # The process
//!
//! The jailer forks into a new PID namespace: the child is its PID 1. The child waits
//! until the parent has put it into the cgroup, then unshares mount, network, IPC and UTS
//! namespaces, makes `/` recursively private, builds the root, `pivot_root`s into it and
//! detaches the old root. It then drops the ambient and bounding capability sets,
//! `setgroups([])`, `setresgid(gid)`, `setresuid(uid)`, clears every capability set, sets
//! `PR_SET_NO_NEW_PRIVS` and the parent-death signal (SIGKILL), resets signal handling,
//! marks every descriptor above 2 close-on-exec and `execve`s the program with an
//! environment of only `VMM_LOG` and `RUST_LOG` (when set). The parent waits, forwards
//! SIGTERM/SIGINT/SIGHUP/SIGQUIT (as PID 1 the program only receives signals it handles:
//! after `--kill-timeout` the jailer sends SIGKILL), removes the cgroup and the per-VM
//! directory, and exits with the program's status (128 + signal if it was killed).
//!
//! # Threat model
//!
//! The guest is hostile and may take over the vmm process (a device-emulation bug). The
//! jail limits what that process can then do on the node, shared by other tenants:
//! - no other tenant's files: it sees only its own binds; no host paths, no /sys, no
//!   /proc of other processes (own PID namespace, `subset=pid,hidepid=2`);
//! - no network: its network namespace holds only a loopback that is down;
//! - no privileges: a non-root uid/gid with no groups, no capabilities in any set, no
//!   setuid or file-capability gain (no_new_privs, nosuid), no device nodes but
//!   null/urandom/kvm (nodev on every bind, /dev read-only);
//! - bounded resources: memory, CPU time and process count by the cgroup;
//! - no IPC with host processes (own IPC namespace), no signals to them (PID namespace);
//! - no controlling terminal (a session of its own): a terminal on stdin cannot be used to
//!   inject input into the host's shell (TIOCSTI).
//!
//! Not covered here: system call filtering (the vmm installs its own seccomp filters),
//! user namespaces (the jailer runs as real root and drops to the given uid), disk
//! quotas on `--rw` binds, and the KVM attack surface itself.

pub mod cgroup;
pub mod cli;
pub mod config;
pub mod error;
pub mod fsutil;
mod jail;
pub mod sys;

pub use config::{validate_id, BindMount, CgroupConfig, JailConfig};
pub use error::{Error, Result};
pub use jail::{Jail, PASSED_ENV};
