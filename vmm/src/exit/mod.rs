//! How a VM ends: the first reason reported (by a device or a vCPU) wins, and the main thread
//! waiting on the exit eventfd turns it into the VMM's exit status. How the vmm itself ends
//! when one of its threads fails (a panic, a seccomp trap): [`fatal`]. The record of every
//! end: [`record`].

pub mod fatal;
pub mod record;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vm_spec::api::{rfc3339_utc, ExitKind, ExitRecord};

use vmm_sys_util::eventfd::EventFd;

use crate::devices::legacy::guest_report::GuestReportHandler;

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reported an exit status through the guest-report port.
    GuestStatus(u8),
    /// The guest asked for a reset (i8042, `reboot`), or shut down through KVM's system event.
    GuestReset,
    /// The guest shut down through KVM's system event.
    GuestShutdown,
    /// A fatal guest fault (triple fault, KVM internal error, failed entry), with details.
    Fault(String),
    /// Ended by its operator (a `kill` action, a shutdown the guest did not finish in time),
    /// with why.
    Killed(String),
    /// The guest's kernel panicked (and then reset), with the reason it printed.
    GuestPanic(String),
}

impl VmExit {
    /// The VMM's process exit status for this end.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::GuestStatus(status) => i32::from(*status),
            VmExit::GuestReset | VmExit::GuestShutdown => 0,
            VmExit::Fault(_) => 1,
            VmExit::Killed(_) => KILLED_STATUS,
            VmExit::GuestPanic(_) => GUEST_PANIC_STATUS,
        }
    }

    /// The exit record of this end.
    pub fn record(&self) -> ExitRecord {
        let (kind, reason) = match self {
            VmExit::GuestStatus(status) => (
                ExitKind::GuestStatus,
                format!("the guest exited with status {status}"),
            ),
            VmExit::GuestReset => (ExitKind::GuestReset, "the guest reset".to_string()),
            VmExit::GuestShutdown => (ExitKind::GuestReset, "the guest powered off".to_string()),
            VmExit::Fault(details) => (ExitKind::GuestFault, format!("guest fault: {details}")),
            VmExit::Killed(why) => (ExitKind::Killed, why.clone()),
            VmExit::GuestPanic(why) => (ExitKind::GuestPanic, format!("guest kernel panic: {why}")),
        };
        new_record(self.exit_code(), kind, reason)
    }
}

/// The vmm's status when its operator ended the VM (as a process killed by SIGKILL).
pub const KILLED_STATUS: i32 = 137;
/// The vmm's status when the guest's kernel panicked.
pub const GUEST_PANIC_STATUS: i32 = 3;
/// The vmm's status when the VM could not be started.
pub const START_FAILED_STATUS: i32 = 2;

/// An exit record stamped now.
pub fn new_record(status: i32, kind: ExitKind, reason: String) -> ExitRecord {
    let at_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    ExitRecord {
        status,
        reason,
        kind,
        at: rfc3339_utc(at_unix_ms),
        at_unix_ms,
    }
}

/// Shared by devices and vCPU threads to end the VM.
#[derive(Clone)]
pub struct ExitSignal {
    inner: Arc<Inner>,
}

struct Inner {
    reason: Mutex<Option<VmExit>>,
    event: EventFd,
    started: Instant,
    booted_after: OnceLock<Duration>,
}

impl ExitSignal {
    pub fn new(started: Instant) -> std::io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                reason: Mutex::new(None),
                event: EventFd::new(0)?,
                started,
                booted_after: OnceLock::new(),
            }),
        })
    }

    /// Records `reason` unless another one was recorded first, and wakes the waiter.
    pub fn end(&self, reason: VmExit) {
        let mut slot = crate::devices::bus::lock(&self.inner.reason);
        if slot.is_none() {
            *slot = Some(reason);
            let _ = self.inner.event.write(1);
        }
    }

    /// Blocks until the VM ends and returns why.
    ///
    /// Called by the main thread. When another thread hands it the vmm's own end (a panic,
    /// a seccomp trap: [`fatal`]), this writes that end's record and ends the process.
    pub fn wait(&self) -> VmExit {
        use std::os::fd::AsRawFd;
        loop {
            if let Some(end) = fatal::pending() {
                fatal::finish(end);
            }
            if let Some(reason) = crate::devices::bus::lock(&self.inner.reason).clone() {
                fatal::main_took_end();
                return reason;
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.inner.event.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    // A negative descriptor is ignored by poll.
                    fd: fatal::wake_fd().unwrap_or(-1),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll reads and writes the two entries of the local array.
            if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return VmExit::Fault(format!("waiting for the VM to end failed: {e}"));
                }
                continue;
            }
            if fds[0].revents & libc::POLLIN != 0 {
                if let Err(e) = self.inner.event.read() {
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return VmExit::Fault(format!("waiting for the VM to end failed: {e}"));
                    }
                }
            }
        }
    }

    /// Whether the VM's end has been recorded.
    pub fn has_ended(&self) -> bool {
        crate::devices::bus::lock(&self.inner.reason).is_some()
    }

    /// When the vmm started.
    pub fn started(&self) -> Instant {
        self.inner.started
    }

    /// Time from VMM start to the guest's "booted" report, if it came.
    pub fn booted_after(&self) -> Option<Duration> {
        self.inner.booted_after.get().copied()
    }
}

impl GuestReportHandler for ExitSignal {
    fn booted(&self) {
        let elapsed = self.inner.started.elapsed();
        if self.inner.booted_after.set(elapsed).is_ok() {
            tracing::info!(
                "guest booted {:.3} ms after VMM start",
                elapsed.as_secs_f64() * 1000.0
            );
        }
    }

    fn exited(&self, status: u8) {
        self.end(VmExit::GuestStatus(status));
    }
}

impl vm_superio::Trigger for ExitSignal {
    type E = std::convert::Infallible;

    /// The i8042 reset line.
    fn trigger(&self) -> Result<(), Self::E> {
        self.end(VmExit::GuestReset);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new(Instant::now()).unwrap();
        s.exited(7);
        s.end(VmExit::GuestReset);
        assert_eq!(s.wait(), VmExit::GuestStatus(7));
        assert_eq!(s.wait().exit_code(), 7);
    }

    #[test]
    fn every_end_has_its_record() {
        let record = VmExit::Killed("killed through the control API".into()).record();
        assert_eq!(
            (record.status, record.kind),
            (KILLED_STATUS, ExitKind::Killed)
        );
        assert_eq!(VmExit::GuestStatus(3).record().status, 3);
        assert_eq!(VmExit::GuestReset.record().kind, ExitKind::GuestReset);
        assert_eq!(
            VmExit::GuestPanic("x".into()).record().status,
            GUEST_PANIC_STATUS
        );
    }

    #[test]
    fn booted_is_recorded_once() {
        let s = ExitSignal::new(Instant::now()).unwrap();
        assert!(s.booted_after().is_none());
        s.booted();
        let first = s.booted_after().unwrap();
        s.booted();
        assert_eq!(s.booted_after().unwrap(), first);
    }
}
