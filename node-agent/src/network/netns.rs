//! Network namespaces: named ones under a directory (`/run/netns` by default, as `ip netns`
//! keeps them: a file bind-mounted on the namespace), and running netlink work inside one.
//!
//! A thread can be in a network namespace of its own (`setns` and `unshare` of
//! `CLONE_NEWNET` act on the calling thread only), and a netlink socket stays in the
//! namespace it was made in. So work in a namespace runs on a fresh thread that enters it
//! first, with a small runtime of its own: every socket that work opens is in that namespace,
//! and no thread of the agent's runtime ever changes namespace.

use std::ffi::CString;
use std::fs::File;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::naming::PREFIX;
use super::NetError;

/// Where named namespaces live by default (shared with `ip netns`).
pub const DEFAULT_DIR: &str = "/run/netns";

/// Which namespace work runs in: the calling thread's own, or one at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ns {
    Current,
    Path(PathBuf),
}

/// Enters the network namespace at `path` (this thread only).
pub fn enter(path: &Path) -> Result<(), NetError> {
    let f = File::open(path).map_err(|e| NetError::io(format!("opening {}", path.display()), e))?;
    // SAFETY: setns with a valid fd and a namespace type; it changes only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetError::io(
            format!("entering network namespace {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Runs `work` to its end on a fresh thread that is in `ns`, with a runtime of its own.
pub async fn run_in<F, Fut, T>(ns: Ns, work: F) -> Result<T, NetError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetError>>,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("gn-netns".into())
        .spawn(move || {
            let out = run_here(ns, work);
            let _ = tx.send(out);
        })
        .map_err(|e| NetError::io("starting a namespace thread", e))?;
    rx.await
        .map_err(|_| NetError::Netlink("a namespace thread ended without an answer".into()))?
}

/// Like [`run_in`], blocking the calling thread (which must not be a runtime's).
pub fn block_in<F, Fut, T>(ns: Ns, work: F) -> Result<T, NetError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetError>>,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .name("gn-netns".into())
        .spawn(move || run_here(ns, work))
        .map_err(|e| NetError::io("starting a namespace thread", e))?
        .join()
        .map_err(|_| NetError::Netlink("a namespace thread panicked".into()))?
}

fn run_here<F, Fut, T>(ns: Ns, work: F) -> Result<T, NetError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, NetError>>,
{
    if let Ns::Path(p) = &ns {
        enter(p)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| NetError::io("building a namespace runtime", e))?;
    rt.block_on(work())
}

/// The named namespaces of one directory.
#[derive(Debug, Clone)]
pub struct NsDir {
    pub dir: PathBuf,
}

impl NsDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn exists(&self, name: &str) -> bool {
        is_mounted_ns(&self.path(name))
    }

    /// The agent's namespaces there (names starting with `gn-`).
    pub fn list(&self) -> Result<Vec<String>, NetError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(NetError::io(format!("reading {}", self.dir.display()), e)),
        };
        let mut out: Vec<String> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| n.starts_with(PREFIX))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Makes namespace `name` (with its loopback up) unless it exists.
    pub fn create(&self, name: &str) -> Result<(), NetError> {
        let path = self.path(name);
        if is_mounted_ns(&path) {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| NetError::io(format!("creating {}", self.dir.display()), e))?;
        // A file left by a crash between its creation and the mount is reused.
        File::create(&path).map_err(|e| NetError::io(format!("creating {}", path.display()), e))?;
        let target = path.clone();
        let made = std::thread::spawn(move || -> Result<(), NetError> {
            // SAFETY: unshare of the network namespace acts on this thread only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(NetError::io(
                    "unshare(CLONE_NEWNET)",
                    std::io::Error::last_os_error(),
                ));
            }
            bind_mount(Path::new("/proc/thread-self/ns/net"), &target)?;
            set_loopback_up()
        })
        .join()
        .map_err(|_| NetError::Netlink("the namespace thread panicked".into()))?;
        if let Err(e) = made {
            let _ = self.delete(name);
            return Err(e);
        }
        Ok(())
    }

    /// Removes namespace `name`: its links go with it once nothing holds it (a process in
    /// it, or a socket made in it, keeps it alive).
    pub fn delete(&self, name: &str) -> Result<(), NetError> {
        let path = self.path(name);
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| NetError::Invalid(format!("namespace path {}", path.display())))?;
        // SAFETY: a valid NUL-terminated path.
        let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT) {
                return Err(NetError::io(format!("unmounting {}", path.display()), e));
            }
        }
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(NetError::io(format!("removing {}", path.display()), e)),
        }
    }
}

/// Whether `path` is a network namespace (a bind mount of one), not a leftover plain file.
fn is_mounted_ns(path: &Path) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    // NS_GET_NSTYPE = _IO(0xb7, 0x3): answers only on a namespace file.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl without arguments on an open fd.
    let t = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE as _) };
    t == libc::CLONE_NEWNET
}

fn bind_mount(src: &Path, dst: &Path) -> Result<(), NetError> {
    let s = CString::new(src.as_os_str().as_bytes())
        .map_err(|_| NetError::Invalid(format!("path {}", src.display())))?;
    let d = CString::new(dst.as_os_str().as_bytes())
        .map_err(|_| NetError::Invalid(format!("path {}", dst.display())))?;
    // SAFETY: valid NUL-terminated paths; a bind mount with no data.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(NetError::io(
            format!("bind-mounting {} on {}", src.display(), dst.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Sets `lo` up in the calling thread's namespace (an ioctl: no runtime needed).
pub fn set_loopback_up() -> Result<(), NetError> {
    set_flags_up("lo")
}

fn set_flags_up(ifname: &str) -> Result<(), NetError> {
    // SAFETY: a plain datagram socket used only for interface ioctls.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetError::io("socket", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just opened and is owned here.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(ifname.bytes().take(15)) {
        *d = s as libc::c_char;
    }
    // SAFETY: valid fd and ifreq for SIOCGIFFLAGS/SIOCSIFFLAGS.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            return Err(NetError::io(
                format!("reading flags of {ifname}"),
                std::io::Error::last_os_error(),
            ));
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) != 0 {
            return Err(NetError::io(
                format!("setting {ifname} up"),
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// Writes a sysctl of the calling thread's network namespace (`net/ipv4/ip_forward`).
pub fn set_sysctl(key: &str, value: &str) -> Result<(), NetError> {
    // /proc/sys/net shows the network namespace of the thread that opens the file.
    let path = Path::new("/proc/sys").join(key);
    std::fs::write(&path, value)
        .map_err(|e| NetError::io(format!("writing {} = {value}", path.display()), e))
}
