//! The host tap device: the thin layer of `unsafe` calls the network device needs, each
//! commented. A tap is opened by name (`/dev/net/tun` and TUNSETIFF) or taken over from an
//! inherited descriptor (checked with TUNGETIFF), always in IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR mode with a 12-byte virtio-net header (TUNSETVNETHDRSZ) and non-blocking.
//! Both happen when the device is made, before the vmm confines itself; the worker only
//! reads, writes and sets offloads (TUNSETOFFLOAD) on it.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::device::VNET_HDR_LEN;

/// `struct ifreq` as TUNSETIFF/TUNGETIFF use it: the name and the flags (a short), padded to
/// the kernel's 40 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} does not fit an interface name")]
    Name(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    #[error("cannot attach to tap {name:?} (TUNSETIFF): {source}")]
    Attach {
        name: String,
        source: std::io::Error,
    },
    #[error("fd {fd} is not an open descriptor: {source}")]
    BadFd { fd: RawFd, source: std::io::Error },
    #[error("fd {fd} is not a tap queue (TUNGETIFF): {source}")]
    NotTap { fd: RawFd, source: std::io::Error },
    #[error("fd {fd} (tap {name:?}) was not opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (flags {flags:#x})")]
    WrongMode {
        fd: RawFd,
        name: String,
        flags: libc::c_int,
    },
    #[error("tap {name:?}: cannot {what}: {source}")]
    Setup {
        name: String,
        what: &'static str,
        source: std::io::Error,
    },
}

/// What the network device's worker needs of its host side: frames in and out (each
/// starting with the 12-byte virtio-net header), and the offloads the guest accepts. The
/// tap implements it; unit tests use a datagram socket pair.
pub trait Backend: Send + Sync + AsRawFd {
    /// Reads one frame into `buf`; `WouldBlock` when none waits.
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize>;
    /// Sets the offloads (TUN_F_*) of frames the host may hand the guest.
    fn set_offload(&self, flags: u32) -> std::io::Result<()>;
}

/// An open tap queue.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

fn cvt(ret: libc::c_int) -> std::io::Result<libc::c_int> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Tap {
    /// Opens tap `name` (made by the caller, e.g. `ip tuntap add NAME mode tap`).
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.as_bytes().contains(&0) {
            return Err(TapError::Name(name.to_string()));
        }
        let path = c"/dev/net/tun";
        // SAFETY: a NUL-terminated path; the descriptor returned is owned right below.
        let fd = cvt(unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        })
        .map_err(TapError::OpenTun)?;
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: TAP_FLAGS as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is (40 bytes,
        // the name NUL-terminated), valid for the duration of the call.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) }).map_err(
            |source| TapError::Attach {
                name: name.to_string(),
                source,
            },
        )?;
        let tap = Self {
            fd,
            name: name.to_string(),
        };
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    /// Takes over inherited descriptor `fd`, which must be a tap queue opened with
    /// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR; it is made non-blocking and close-on-exec.
    pub fn from_fd(fd: RawFd) -> Result<Self, TapError> {
        // SAFETY: F_GETFD only reads the descriptor's flags; it fails on a closed one.
        cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })
            .map_err(|source| TapError::BadFd { fd, source })?;
        // SAFETY: `fd` is open (checked above) and the spec hands it to this device alone;
        // from here it is owned (and closed) by the tap.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes a `struct ifreq` into `req`, valid for the call.
        cvt(unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) })
            .map_err(|source| TapError::NotTap { fd, source })?;
        let name = CStr::from_bytes_until_nul(&req.name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let flags = libc::c_int::from(req.flags) & 0xffff;
        if flags & TAP_FLAGS != TAP_FLAGS {
            return Err(TapError::WrongMode { fd, name, flags });
        }
        let setup = |what| {
            let name = name.clone();
            move |source| TapError::Setup { name, what, source }
        };
        // SAFETY: reads the descriptor's status flags.
        let status = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })
            .map_err(setup("read its status flags"))?;
        // SAFETY: sets O_NONBLOCK and FD_CLOEXEC on a descriptor the tap owns.
        cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, status | libc::O_NONBLOCK) })
            .map_err(setup("make it non-blocking"))?;
        // SAFETY: as above.
        cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) })
            .map_err(setup("make it close-on-exec"))?;
        let tap = Self { fd: owned, name };
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    fn set_vnet_hdr_len(&self) -> Result<(), TapError> {
        let len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, valid for the call.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) }).map_err(
            |source| TapError::Setup {
                name: self.name.clone(),
                what: "set its virtio-net header size",
                source,
            },
        )?;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Backend for Tap {
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }

    fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        // SAFETY: the kernel reads `frame.len()` bytes from `frame`.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }

    fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        cvt(unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        })
        .map(drop)
    }
}
