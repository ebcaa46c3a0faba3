//! Acting on a running VM: its state for `GET /vm`, the actions (graceful shutdown, kill,
//! pause, resume), run-time device changes and the metrics sources. Used by the control API
//! and by the vmm's signal handling; devices and vCPUs know nothing of it.
//!
//! A graceful shutdown presses Ctrl-Alt-Del on the guest's keyboard (the guest init turns it
//! into SIGTERM for the entrypoint and ends the VM when it exits, within the spec's grace
//! period); if the VM has not ended by the deadline (grace period plus a margin), it is ended
//! as killed.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_spec::api::{DeviceInfo, DevicePatch, RateLimiterPatch, VmAction, VmInfo, VmState};

use crate::devices::bus::lock;
use crate::devices::legacy::i8042::I8042;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::VirtioMetrics;
use crate::exit::{ExitSignal, VmExit};
use crate::vstate::run_state::{RunState, RunStateError};
use crate::vstate::vcpu::VcpuThread;

/// Longest wait for every vCPU to park on `pause`.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time past the guest's grace period before a shutdown becomes a kill.
pub const SHUTDOWN_MARGIN: Duration = Duration::from_secs(5);

/// A virtio device as the control plane sees it.
pub struct ControlledDevice {
    pub id: String,
    pub kind: &'static str,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub metrics: Option<Arc<VirtioMetrics>>,
    pub extra_metrics: Option<Arc<dyn crate::devices::virtio::metrics::ExtraMetrics>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActionError {
    #[error("cannot {action}: {source}")]
    RunState {
        action: &'static str,
        source: RunStateError,
    },
    #[error("the VM is already ending")]
    Ending,
    #[error("cannot pause the VM during a shutdown")]
    ShuttingDown,
    #[error("no device {0:?}")]
    UnknownDevice(String),
    #[error("device {id:?}: {message}")]
    Device { id: String, message: String },
    #[error("invalid rate limiter: {0}")]
    BadLimits(#[from] vm_spec::RateLimiterError),
}

/// Counters of the vmm's legacy devices, for metrics.
#[derive(Debug, Default)]
pub struct LegacyCounters {
    /// Bytes the guest wrote to its serial console.
    pub serial_bytes: Arc<AtomicU64>,
}

/// The control plane of one running VM.
pub struct VmControl {
    exit: ExitSignal,
    run_state: Arc<RunState>,
    vcpus: Vec<VcpuThread>,
    devices: Vec<ControlledDevice>,
    keyboard: Arc<Mutex<I8042<ExitSignal>>>,
    memory_mib: u64,
    shutdown_grace: Duration,
    shutdown_deadline: Mutex<Option<Instant>>,
    pub legacy: LegacyCounters,
}

impl VmControl {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        exit: ExitSignal,
        run_state: Arc<RunState>,
        vcpus: Vec<VcpuThread>,
        devices: Vec<ControlledDevice>,
        keyboard: Arc<Mutex<I8042<ExitSignal>>>,
        memory_mib: u64,
        shutdown_grace: Duration,
        legacy: LegacyCounters,
    ) -> Self {
        Self {
            exit,
            run_state,
            vcpus,
            devices,
            keyboard,
            memory_mib,
            shutdown_grace,
            shutdown_deadline: Mutex::new(None),
            legacy,
        }
    }

    pub fn exit(&self) -> &ExitSignal {
        &self.exit
    }

    pub fn run_state(&self) -> &RunState {
        &self.run_state
    }

    pub fn devices(&self) -> &[ControlledDevice] {
        &self.devices
    }

    fn kick_all(&self) {
        for vcpu in &self.vcpus {
            vcpu.kick();
        }
    }

    pub fn state(&self) -> VmState {
        if self.exit.has_ended() || lock(&self.shutdown_deadline).is_some() {
            VmState::Exiting
        } else if self.run_state.is_paused() {
            VmState::Paused
        } else if self.exit.booted_after().is_some() {
            VmState::Running
        } else {
            VmState::Booting
        }
    }

    pub fn info(&self) -> VmInfo {
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        VmInfo {
            state: self.state(),
            uptime_ms: millis(self.exit.started().elapsed()),
            booted_after_ms: self.exit.booted_after().map(millis),
            vcpus: u32::try_from(self.run_state.vcpu_count()).unwrap_or(u32::MAX),
            memory_mib: self.memory_mib,
            devices: self
                .devices
                .iter()
                .map(|d| DeviceInfo {
                    id: d.id.clone(),
                    kind: d.kind.to_string(),
                })
                .collect(),
        }
    }

    /// Carries out `action`.
    pub fn act(&self, action: VmAction) -> Result<(), ActionError> {
        if self.exit.has_ended() {
            return Err(ActionError::Ending);
        }
        match action {
            VmAction::Kill => {
                self.end(VmExit::Killed("killed through the control API".into()));
                Ok(())
            }
            VmAction::Pause => {
                if lock(&self.shutdown_deadline).is_some() {
                    return Err(ActionError::ShuttingDown);
                }
                self.run_state
                    .pause(|| self.kick_all(), PAUSE_TIMEOUT)
                    .map_err(|source| ActionError::RunState {
                        action: "pause",
                        source,
                    })
            }
            VmAction::Resume => self
                .run_state
                .resume()
                .map_err(|source| ActionError::RunState {
                    action: "resume",
                    source,
                }),
            VmAction::Shutdown => {
                self.shutdown();
                Ok(())
            }
        }
    }

    /// Asks the guest to power off (once; asking again changes nothing) and sets the
    /// deadline after which the VM is ended.
    pub fn shutdown(&self) {
        {
            let mut deadline = lock(&self.shutdown_deadline);
            if deadline.is_some() {
                return;
            }
            *deadline = Some(Instant::now() + self.shutdown_grace + SHUTDOWN_MARGIN);
        }
        // A paused guest cannot shut down.
        let _ = self.run_state.resume();
        let pressed = lock(&self.keyboard).press_ctrl_alt_del();
        tracing::info!(
            "shutdown: Ctrl-Alt-Del {}; the VM ends at the latest in {:?}",
            if pressed {
                "pressed"
            } else {
                "could not be queued"
            },
            self.shutdown_grace + SHUTDOWN_MARGIN
        );
    }

    /// When a requested shutdown turns into a kill.
    pub fn shutdown_deadline(&self) -> Option<Instant> {
        *lock(&self.shutdown_deadline)
    }

    /// Ends the shutdown that passed its deadline.
    pub fn shutdown_timed_out(&self) {
        self.end(VmExit::Killed(format!(
            "the guest did not shut down within {:?} of being asked to",
            self.shutdown_grace + SHUTDOWN_MARGIN
        )));
    }

    /// Ends the VM with `reason` and stops its vCPUs.
    pub fn end(&self, reason: VmExit) {
        self.exit.end(reason);
        self.stop_vcpus();
    }

    /// Stops every vCPU (the VM has ended).
    pub fn stop_vcpus(&self) {
        self.run_state.end(|| self.kick_all());
    }

    /// Applies `patch` to device `id`.
    pub fn patch_device(&self, id: &str, patch: &DevicePatch) -> Result<(), ActionError> {
        patch.rate_limiter.validate()?;
        let device = self
            .devices
            .iter()
            .find(|d| d.id == id)
            .ok_or_else(|| ActionError::UnknownDevice(id.to_string()))?;
        let mut transport = lock(&device.transport);
        match &patch.rate_limiter {
            RateLimiterPatch::Single(limits) => transport.set_rate_limiter(limits),
            RateLimiterPatch::RxTx(limits) => transport.set_rx_tx_rate_limiter(limits),
        }
        .map_err(|message| ActionError::Device {
            id: id.to_string(),
            message,
        })
    }
}
