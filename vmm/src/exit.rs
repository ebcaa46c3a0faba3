//! How a VM ends: the first reason reported (by a device or a vCPU) wins, and the main thread
//! waiting on the exit eventfd turns it into the VMM's exit status.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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
}

impl VmExit {
    /// The VMM's process exit status for this end.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::GuestStatus(status) => i32::from(*status),
            VmExit::GuestReset | VmExit::GuestShutdown => 0,
            VmExit::Fault(_) => 1,
        }
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
    pub fn wait(&self) -> VmExit {
        loop {
            if let Some(reason) = crate::devices::bus::lock(&self.inner.reason).clone() {
                return reason;
            }
            if let Err(e) = self.inner.event.read() {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return VmExit::Fault(format!("waiting for the VM to end failed: {e}"));
                }
            }
        }
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
    fn booted_is_recorded_once() {
        let s = ExitSignal::new(Instant::now()).unwrap();
        assert!(s.booted_after().is_none());
        s.booted();
        let first = s.booted_after().unwrap();
        s.booted();
        assert_eq!(s.booted_after().unwrap(), first);
    }
}
