//! `node-agent init`: PID 1 of the node image, as zinit is for Zero-OS. Mounts the kernel's
//! filesystems and the state disk (formatted ext4 on first boot), then runs the agent daemon
//! and starts it again whenever it dies, reaping every orphan (vmm processes whose agent died
//! are re-parented here) in the meantime.
//!
//! Before that it loads the kernel modules the node image ships (KVM, virtio drivers) and
//! configures the first ethernet interface statically, so the agent's TCP API is reachable.
//!
//! Kernel command line: `gridnode.state=/dev/vda` (the state disk; without it the state lives
//! in RAM, for tests), `gridnode.ip=10.0.2.15/24,gw=10.0.2.2` (static address of the first
//! ethernet interface; the agent then listens on `0.0.0.0:<gridnode.port, default 7070>`),
//! `gridnode.args=...` (extra `run` arguments, comma separated). `/etc/gridnode/agent.json`,
//! when present, is the agent's `--config`.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tracing::{error, info, warn};

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(target)?;
    let c = |s: &str| {
        CString::new(s).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (src, tgt, fst) = (c(source)?, c(target)?, c(fstype)?);
    let data = data.map(c).transpose()?;
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let ret = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fst.as_ptr(),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn mount_early() {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for (src, tgt, fs, flags, data) in [
        ("proc", "/proc", "proc", nosuid, None),
        ("sysfs", "/sys", "sysfs", nosuid, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            libc::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            None,
        ),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, None),
    ] {
        if let Err(e) = mount(src, tgt, fs, flags, data) {
            // EBUSY: already mounted (e.g. the kernel mounted devtmpfs).
            if e.raw_os_error() != Some(libc::EBUSY) {
                warn!("mount {tgt}: {e}");
            }
        }
    }
}

/// Mounts the state disk at `target`, formatting it (ext4) when it has no filesystem yet.
fn mount_state(device: &str, target: &str) -> anyhow::Result<()> {
    let flags = libc::MS_NOSUID | libc::MS_NODEV;
    if mount(device, target, "ext4", flags, None).is_ok() {
        return Ok(());
    }
    let probe = Command::new("blkid").arg(device).output();
    let has_fs = probe
        .map(|o| o.status.success() && !o.stdout.is_empty())
        .unwrap_or(false);
    if has_fs {
        anyhow::bail!(
            "state disk {device} has a filesystem that does not mount as ext4; not formatting it"
        );
    }
    info!("formatting the state disk {device} (first boot)");
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "gridnode-state", device])
        .status()?;
    if !status.success() {
        anyhow::bail!("mkfs.ext4 {device} failed: {status}");
    }
    mount(device, target, "ext4", flags, None)?;
    Ok(())
}

fn cmdline_param(cmdline: &str, name: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        .map(str::to_string)
}

/// Kernel modules shipped in the node image, loaded in file-name order (`NN-name.ko`, the
/// image builder numbers them dependencies first).
pub const MODULE_DIR: &str = "/usr/lib/gridnode/modules";
/// The agent's configuration in the node image.
pub const IMAGE_CONFIG: &str = "/etc/gridnode/agent.json";
/// The agent's TCP port when `gridnode.port` is not given.
pub const DEFAULT_PORT: u16 = 7070;

/// Loads every `*.ko` in `dir` (sorted by name) with `finit_module`. A module the kernel
/// already has is fine; one that does not fit this machine (kvm_intel on AMD) is reported and
/// skipped.
fn load_modules(dir: &Path) {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "ko"))
            .collect(),
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!("modules in {}: {e}", dir.display());
            }
            return;
        }
    };
    files.sort();
    for path in files {
        match finit_module(&path) {
            Ok(()) => info!(module = %path.display(), "loaded"),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            // ENODEV: hardware this module drives is absent (e.g. kvm_intel on an AMD host).
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                info!(module = %path.display(), "not for this machine: {e}")
            }
            Err(e) => warn!(module = %path.display(), "cannot load: {e}"),
        }
    }
}

fn finit_module(path: &Path) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    let params = c"";
    // SAFETY: finit_module reads the open file and a NUL-terminated parameter string; both
    // outlive the call.
    let ret =
        unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `gridnode.ip`: `ADDR/PREFIX[,gw=GATEWAY]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

impl NetConfig {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let mut parts = s.split(',');
        let cidr = parts.next().unwrap_or_default();
        let (addr, prefix) = cidr
            .split_once('/')
            .ok_or_else(|| anyhow::anyhow!("gridnode.ip {s:?}: expected ADDR/PREFIX"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| anyhow::anyhow!("gridnode.ip {s:?}: bad address {addr:?}"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| anyhow::anyhow!("gridnode.ip {s:?}: bad prefix {prefix:?}"))?;
        let mut gateway = None;
        for part in parts {
            match part.split_once('=') {
                Some(("gw", g)) => {
                    gateway = Some(
                        g.parse()
                            .map_err(|_| anyhow::anyhow!("gridnode.ip {s:?}: bad gateway {g:?}"))?,
                    )
                }
                _ => anyhow::bail!("gridnode.ip {s:?}: unknown part {part:?} (expected gw=ADDR)"),
            }
        }
        Ok(Self {
            addr,
            prefix,
            gateway,
        })
    }

    pub fn netmask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }
}

/// The first ethernet interface (by name) in /sys/class/net, waiting up to `wait` for its
/// driver to create it.
fn first_ethernet(wait: Duration) -> Option<String> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| {
                // type 1: ARPHRD_ETHER (lo is 772).
                std::fs::read_to_string(format!("/sys/class/net/{n}/type"))
                    .is_ok_and(|t| t.trim() == "1")
            })
            .collect();
        names.sort();
        if let Some(n) = names.into_iter().next() {
            return Some(n);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> anyhow::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        anyhow::bail!("interface name {name:?} does not fit IFNAMSIZ");
    }
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn ioctl<T>(sock: &OwnedFd, request: libc::c_ulong, arg: &mut T, what: &str) -> anyhow::Result<()> {
    // SAFETY: `arg` is the structure this socket ioctl expects (ifreq or rtentry), valid
    // for the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), request, arg as *mut T) };
    if ret < 0 {
        anyhow::bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_up(sock: &OwnedFd, name: &str) -> anyhow::Result<()> {
    let mut req = ifreq(name)?;
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req, "SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(sock, libc::SIOCSIFFLAGS, &mut req, "SIOCSIFFLAGS")
}

/// Brings `lo` up and gives the first ethernet interface `net`'s address, mask and default
/// route (ioctls on an AF_INET socket, as ifconfig/route do). Returns the interface name.
fn configure_network(net: &NetConfig) -> anyhow::Result<String> {
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        anyhow::bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Err(e) = set_up(&sock, "lo") {
        warn!("lo: {e:#}");
    }
    let name = first_ethernet(Duration::from_secs(5))
        .ok_or_else(|| anyhow::anyhow!("no ethernet interface"))?;
    let mut req = ifreq(&name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(net.addr);
    ioctl(&sock, libc::SIOCSIFADDR, &mut req, "SIOCSIFADDR")?;
    let mut req = ifreq(&name)?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(net.netmask());
    ioctl(&sock, libc::SIOCSIFNETMASK, &mut req, "SIOCSIFNETMASK")?;
    set_up(&sock, &name)?;
    if let Some(gw) = net.gateway {
        // SAFETY: rtentry is plain data; all zeroes is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr_in(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        ioctl(&sock, libc::SIOCADDRT, &mut rt, "SIOCADDRT (default route)")?;
    }
    Ok(name)
}

/// Waits up to `wait` for a device node (a driver just loaded creates it asynchronously).
fn wait_for_path(path: &str, wait: Duration) {
    let deadline = std::time::Instant::now() + wait;
    while !Path::new(path).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs as PID 1; never returns.
pub fn run(state_dir: &Path) -> ! {
    // The kernel starts init with no PATH; mkfs.ext4 and blkid live in /usr/sbin.
    std::env::set_var("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    // Plain log lines on the serial console.
    std::env::set_var("NO_COLOR", "1");
    mount_early();
    load_modules(Path::new(MODULE_DIR));
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut args: Vec<String> = Vec::new();
    if Path::new(IMAGE_CONFIG).is_file() {
        args.extend(["--config".to_string(), IMAGE_CONFIG.to_string()]);
    }
    if let Some(ip) = cmdline_param(&cmdline, "gridnode.ip") {
        let port = match cmdline_param(&cmdline, "gridnode.port").map(|p| p.parse::<u16>()) {
            None => Ok(DEFAULT_PORT),
            Some(Ok(p)) => Ok(p),
            Some(Err(e)) => Err(anyhow::anyhow!("gridnode.port: {e}")),
        };
        match NetConfig::parse(&ip)
            .and_then(|net| configure_network(&net).map(|name| (net, name)))
            .and_then(|up| port.map(|p| (up, p)))
        {
            Ok(((net, name), port)) => {
                info!(interface = %name, addr = %net.addr, prefix = net.prefix, gateway = ?net.gateway, "network configured");
                args.extend(["--listen".to_string(), format!("0.0.0.0:{port}")]);
            }
            Err(e) => error!("network: {e:#}; the API is on the unix socket only"),
        }
    }
    let state = state_dir.to_string_lossy().into_owned();
    if let Some(dev) = cmdline_param(&cmdline, "gridnode.state") {
        wait_for_path(&dev, Duration::from_secs(5));
        if let Err(e) = mount_state(&dev, &state) {
            error!("state disk: {e:#}; keeping state in memory");
        }
    }
    let _ = std::fs::create_dir_all(&state);
    let mut extra: Vec<String> = cmdline_param(&cmdline, "gridnode.args")
        .map(|a| {
            a.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    // `gridnode.args` come last: a flag given there overrides the image's.
    args.append(&mut extra);
    let extra = args;
    let exe = std::env::current_exe().unwrap_or_else(|_| "/sbin/node-agent".into());
    let mut backoff = Duration::from_secs(1);
    loop {
        info!("starting the agent");
        let started = std::time::Instant::now();
        let child = Command::new(&exe)
            .arg("run")
            .arg("--state-dir")
            .arg(&state)
            .args(&extra)
            .spawn();
        let agent_pid = match child {
            Ok(c) => c.id() as i32,
            Err(e) => {
                error!("cannot start the agent: {e}");
                std::thread::sleep(backoff);
                continue;
            }
        };
        // Reap everything; when the agent itself ends, start it again.
        loop {
            let mut status = 0;
            // SAFETY: blocking waitpid into a local.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid == agent_pid {
                warn!("the agent ended (wait status {status}); restarting it");
                break;
            }
            if pid < 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_network_parameter() {
        let n = NetConfig::parse("10.0.2.15/24,gw=10.0.2.2").unwrap();
        assert_eq!(n.addr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(n.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(n.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        let n = NetConfig::parse("192.168.1.7/0").unwrap();
        assert_eq!((n.netmask(), n.gateway), (Ipv4Addr::UNSPECIFIED, None));
        for bad in [
            "10.0.2.15",
            "10.0.2.15/33",
            "x/24",
            "10.0.2.15/24,gw=y",
            "10.0.2.15/24,dns=1.1.1.1",
            "",
        ] {
            assert!(NetConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_kernel_parameters() {
        let c = "console=ttyS0 gridnode.state=/dev/vda gridnode.ip=10.0.2.15/24,gw=10.0.2.2 quiet";
        assert_eq!(
            cmdline_param(c, "gridnode.state").as_deref(),
            Some("/dev/vda")
        );
        assert_eq!(
            cmdline_param(c, "gridnode.ip").as_deref(),
            Some("10.0.2.15/24,gw=10.0.2.2")
        );
        assert_eq!(cmdline_param(c, "gridnode.port"), None);
    }
}
