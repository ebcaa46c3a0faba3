//! One serving thread's end of a host FUSE connection: a duplicate of the `/dev/fuse`
//! descriptor, waited on through the thread's own epoll set where it is registered
//! `EPOLLEXCLUSIVE`, so a new request wakes one idle thread, not all of them (fuse-backend-rs's
//! own channel registers it plainly: with 4 threads, each request woke 4 threads, 3 of which
//! found nothing to read). A shared eventfd, registered plainly, wakes them all to stop.
//!
//! The epoll and eventfd calls are the only `unsafe` here, each on descriptors this module
//! owns.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const DEVICE: u64 = 1;
const STOP: u64 = 2;

/// Wakes every [`Channel`] made with it so it returns `None`; shared by a mount's threads.
pub struct StopSignal(OwnedFd);

impl StopSignal {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; the result is checked before it is owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Raises the signal (it stays raised: the eventfd is never read).
    pub fn raise(&self) -> io::Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to the eventfd this owns.
        let n = unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A serving thread's descriptor of the FUSE connection and its wait set.
pub struct Channel {
    device: File,
    epoll: OwnedFd,
}

impl Channel {
    /// A channel on `device` (the session's `/dev/fuse`, non-blocking) that also wakes on `stop`.
    pub fn new(device: &File, stop: &StopSignal) -> io::Result<Self> {
        let device = device.try_clone()?;
        // SAFETY: epoll_create1 takes no pointers; the result is checked before it is owned.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `epoll` is a new descriptor nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        let exclusive = (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32;
        add(&epoll, device.as_raw_fd(), exclusive, DEVICE)?;
        add(&epoll, stop.0.as_raw_fd(), libc::EPOLLIN as u32, STOP)?;
        Ok(Self { device, epoll })
    }

    /// The descriptor replies are written to.
    pub fn device_fd(&self) -> RawFd {
        self.device.as_raw_fd()
    }

    /// Waits for the next request and reads it into `buf`: its length, or `None` once the
    /// filesystem is unmounted (the kernel ends the connection) or the stop signal is raised.
    pub fn next_request(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            let mut events = [libc::epoll_event { events: 0, u64: 0 }; 2];
            // SAFETY: the kernel writes at most `events.len()` entries into the live array.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    -1,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let ready = &events[..n as usize];
            if ready.iter().any(|e| e.u64 == STOP) {
                return Ok(None);
            }
            match self.device.read(buf) {
                Ok(len) => return Ok(Some(len)),
                Err(e) => match e.raw_os_error() {
                    // Another thread took it, or the request was interrupted: wait again.
                    Some(libc::EAGAIN | libc::EINTR | libc::ENOENT) => continue,
                    Some(libc::ENODEV) => return Ok(None),
                    _ => return Err(e),
                },
            }
        }
    }
}

fn add(epoll: &OwnedFd, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: token };
    // SAFETY: registers `fd` in the epoll set this owns, with a live local event.
    let r = unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &raw mut event) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
