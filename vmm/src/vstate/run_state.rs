//! The vCPUs' run state machine, shared by the vCPU threads and the code that pauses them (the
//! control API): `Running` -> `Paused` (every vCPU parked outside `KVM_RUN`) -> `Running`, and
//! the kick that gets a vCPU out of `KVM_RUN` at once, plus the vCPUs' exit counters.
//!
//! A kick is a real-time signal sent to the vCPU's thread. Its handler sets `immediate_exit`
//! in the thread's own `kvm_run` (through a thread-local pointer), so a kick that lands just
//! before the thread enters `KVM_RUN` is not lost: KVM returns EINTR at once. The vCPU then
//! looks at the wanted state before running again.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::devices::bus::lock;

/// The signal that kicks a vCPU out of `KVM_RUN` (the first real-time signal; the C library
/// keeps the ones below SIGRTMIN for itself).
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

thread_local! {
    /// The calling vCPU thread's `kvm_run` mapping (null on other threads).
    static KVM_RUN: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Records the current thread's `kvm_run`, for the kick handler. The mapping must stay valid
/// for as long as the thread runs (it lives as long as the thread's `VcpuFd`, which the thread
/// owns until it ends).
pub fn register_kvm_run(run: *mut kvm_bindings::kvm_run) {
    KVM_RUN.with(|cell| cell.set(run));
}

extern "C" fn on_kick(_signal: libc::c_int) {
    // Only reads a thread-local Cell (const-initialised: no lazy init, no allocation) and
    // writes one byte; both are async-signal-safe.
    let run = KVM_RUN.with(|cell| cell.get());
    if !run.is_null() {
        // SAFETY: `run` is this thread's kvm_run mapping (register_kvm_run); a volatile
        // one-byte write of the field KVM reads on entry.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler (process-wide, once, before any vCPU thread starts). Without
/// SA_RESTART, so a blocking call the signal interrupts returns EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler is well-formed.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_kick as *const () as usize;
        action.sa_flags = 0;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Why a vCPU left `KVM_RUN`, as counted for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    Shutdown,
    SystemEvent,
    InternalError,
    FailEntry,
    /// KVM_RUN returned EINTR/EAGAIN: a kick or another signal.
    Interrupted,
    Other,
}

impl ExitReason {
    pub const ALL: [ExitReason; 11] = [
        ExitReason::IoIn,
        ExitReason::IoOut,
        ExitReason::MmioRead,
        ExitReason::MmioWrite,
        ExitReason::Hlt,
        ExitReason::Shutdown,
        ExitReason::SystemEvent,
        ExitReason::InternalError,
        ExitReason::FailEntry,
        ExitReason::Interrupted,
        ExitReason::Other,
    ];

    /// The label in metrics.
    pub fn name(self) -> &'static str {
        match self {
            ExitReason::IoIn => "io_in",
            ExitReason::IoOut => "io_out",
            ExitReason::MmioRead => "mmio_read",
            ExitReason::MmioWrite => "mmio_write",
            ExitReason::Hlt => "hlt",
            ExitReason::Shutdown => "shutdown",
            ExitReason::SystemEvent => "system_event",
            ExitReason::InternalError => "internal_error",
            ExitReason::FailEntry => "fail_entry",
            ExitReason::Interrupted => "interrupted",
            ExitReason::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One vCPU's exit counters.
#[derive(Debug, Default)]
pub struct ExitCounters {
    counts: [AtomicU64; ExitReason::ALL.len()],
}

impl ExitCounters {
    pub fn count(&self, reason: ExitReason) {
        self.counts[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, reason: ExitReason) -> u64 {
        self.counts[reason.index()].load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RunStateError {
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("the VM is ending")]
    Ending,
    #[error("{parked} of {running} vCPUs parked within {waited:?}")]
    Timeout {
        parked: usize,
        running: usize,
        waited: Duration,
    },
}

#[derive(Debug)]
struct Parking {
    /// vCPU threads that are running (started and not ended).
    running: usize,
    /// Of those, the ones parked.
    parked: usize,
    ending: bool,
}

/// The shared run state of all vCPUs of a VM.
#[derive(Debug)]
pub struct RunState {
    /// Fast check on every exit: is a pause (or the end) wanted?
    stop_wanted: AtomicBool,
    paused: AtomicBool,
    parking: Mutex<Parking>,
    changed: Condvar,
    exits: Vec<ExitCounters>,
}

impl RunState {
    pub fn new(vcpus: usize) -> Self {
        Self {
            stop_wanted: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            parking: Mutex::new(Parking {
                running: 0,
                parked: 0,
                ending: false,
            }),
            changed: Condvar::new(),
            exits: (0..vcpus).map(|_| ExitCounters::default()).collect(),
        }
    }

    /// The exit counters of vCPU `index` (`None` past the VM's vCPUs).
    pub fn exits(&self, index: usize) -> Option<&ExitCounters> {
        self.exits.get(index)
    }

    pub fn vcpu_count(&self) -> usize {
        self.exits.len()
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// A vCPU thread calls this before its first run...
    pub fn vcpu_started(&self) {
        lock(&self.parking).running += 1;
    }

    /// ...and this when it ends.
    pub fn vcpu_ended(&self) {
        let mut parking = lock(&self.parking);
        parking.running = parking.running.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Called by a vCPU between runs: returns at once unless a pause is wanted, else parks
    /// until resumed. Returns false when the VM is ending (the vCPU must stop).
    pub fn checkpoint(&self) -> bool {
        if !self.stop_wanted.load(Ordering::SeqCst) {
            return true;
        }
        let mut parking = lock(&self.parking);
        parking.parked += 1;
        self.changed.notify_all();
        while self.paused.load(Ordering::SeqCst) && !parking.ending {
            parking = self
                .changed
                .wait(parking)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        parking.parked -= 1;
        !parking.ending
    }

    /// Asks every vCPU to park; `kick` gets each out of KVM_RUN. Returns once all running
    /// vCPUs are parked, or an error after `timeout` (the VM then stays paused: vCPUs park as
    /// they come out).
    pub fn pause(&self, kick: impl Fn(), timeout: Duration) -> Result<(), RunStateError> {
        {
            let parking = lock(&self.parking);
            if parking.ending {
                return Err(RunStateError::Ending);
            }
            if self.paused.swap(true, Ordering::SeqCst) {
                return Err(RunStateError::AlreadyPaused);
            }
            self.stop_wanted.store(true, Ordering::SeqCst);
        }
        kick();
        let start = Instant::now();
        let mut parking = lock(&self.parking);
        while parking.parked < parking.running && !parking.ending {
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(RunStateError::Timeout {
                    parked: parking.parked,
                    running: parking.running,
                    waited,
                });
            }
            parking = self
                .changed
                .wait_timeout(parking, timeout - waited)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
        if parking.ending {
            return Err(RunStateError::Ending);
        }
        Ok(())
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) -> Result<(), RunStateError> {
        let parking = lock(&self.parking);
        if parking.ending {
            return Err(RunStateError::Ending);
        }
        if !self.paused.swap(false, Ordering::SeqCst) {
            return Err(RunStateError::NotPaused);
        }
        self.stop_wanted.store(false, Ordering::SeqCst);
        self.changed.notify_all();
        Ok(())
    }

    /// The VM is ending: parked vCPUs are released to stop, running ones stop at their next
    /// checkpoint (after `kick`).
    pub fn end(&self, kick: impl Fn()) {
        {
            let mut parking = lock(&self.parking);
            parking.ending = true;
            self.stop_wanted.store(true, Ordering::SeqCst);
            self.changed.notify_all();
        }
        kick();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// vCPU stand-ins: threads that loop over the checkpoint like a vCPU between runs.
    fn spawn_vcpus(state: &Arc<RunState>, n: usize) -> Vec<std::thread::JoinHandle<u64>> {
        (0..n)
            .map(|_| {
                let state = state.clone();
                state.vcpu_started();
                std::thread::spawn(move || {
                    let mut loops = 0u64;
                    while state.checkpoint() {
                        loops += 1;
                        std::thread::yield_now();
                    }
                    state.vcpu_ended();
                    loops
                })
            })
            .collect()
    }

    #[test]
    fn pause_parks_every_vcpu_and_resume_releases_them() {
        let state = Arc::new(RunState::new(3));
        let threads = spawn_vcpus(&state, 3);
        state.pause(|| {}, Duration::from_secs(10)).unwrap();
        assert!(state.is_paused());
        assert_eq!(lock(&state.parking).parked, 3);
        assert_eq!(
            state.pause(|| {}, Duration::from_secs(1)),
            Err(RunStateError::AlreadyPaused)
        );
        state.resume().unwrap();
        assert_eq!(state.resume(), Err(RunStateError::NotPaused));
        state.pause(|| {}, Duration::from_secs(10)).unwrap();
        // Ending releases parked vCPUs, which then stop.
        state.end(|| {});
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(lock(&state.parking).running, 0);
        assert_eq!(state.resume(), Err(RunStateError::Ending));
    }

    #[test]
    fn a_vcpu_that_never_comes_out_times_the_pause_out() {
        let state = RunState::new(1);
        state.vcpu_started();
        let err = state.pause(|| {}, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(
            err,
            RunStateError::Timeout {
                parked: 0,
                running: 1,
                ..
            }
        ));
    }

    #[test]
    fn exits_are_counted_per_vcpu_and_reason() {
        let state = RunState::new(2);
        state.exits(1).unwrap().count(ExitReason::MmioWrite);
        state.exits(1).unwrap().count(ExitReason::MmioWrite);
        assert_eq!(state.exits(1).unwrap().get(ExitReason::MmioWrite), 2);
        assert_eq!(state.exits(0).unwrap().get(ExitReason::MmioWrite), 0);
        assert!(state.exits(2).is_none());
    }
}
