//! The virtio-vsock device: its configuration space (the guest's context id), features, the
//! host unix socket it listens on (bound when the device is made; a stale socket file left by
//! a killed vmm is replaced, anything else at the path is an error), and its worker thread:
//! started by `start_workers` before the vCPUs run, handed each activation's queues, and
//! stopped on reset (the reset returns once the worker has dropped the queues and every
//! connection). The thread itself lives as long as the device: a thread started later, from a
//! vCPU, would inherit the vCPU's seccomp filter, which forbids sockets.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::worker::{connect_nonblocking, Command, Muxer, Session, SessionEnd, WorkerConfig};
use crate::devices::log_limit::error_limited;
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, VirtioDevice, VirtioMetrics, TYPE_VSOCK,
    VIRTIO_F_VERSION_1,
};

const QUEUE_SIZE: u16 = 256;
/// rx, tx, event.
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// How long a reset waits for the worker to drop the queues.
const WORKER_STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock uds_path {0}: something other than a unix socket is there; not replaced")]
    NotASocket(PathBuf),
    #[error("vsock uds_path {0}: another process listens on it")]
    InUse(PathBuf),
    #[error("vsock uds_path {path}: cannot {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("vsock guest cid {0} is reserved")]
    Cid(u32),
}

/// The socket file the device made: removed when the vmm ends, only if it is still the one
/// made (same device and inode), never another process's.
#[derive(Clone, Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file if it is still the socket made; returns whether it did.
    pub fn remove(&self) -> bool {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                std::fs::remove_file(&self.path).is_ok()
            }
            _ => false,
        }
    }
}

/// Binds the listening socket at `path`: a socket file nobody listens on (left by a killed
/// vmm) is replaced; any other file, or a live socket, is an error.
fn bind_listener(path: &Path) -> Result<(UnixListener, SocketFile), VsockError> {
    let io = |what| {
        move |source| VsockError::Io {
            path: path.to_owned(),
            what,
            source,
        }
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // Without waiting: a listener with a full backlog is live too.
            match connect_nonblocking(path) {
                Ok(_) => return Err(VsockError::InUse(path.to_owned())),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(VsockError::InUse(path.to_owned()))
                }
                Err(_) => {}
            }
            tracing::info!("vsock: removing the stale socket {}", path.display());
            std::fs::remove_file(path).map_err(io("remove the stale socket"))?;
        }
        Ok(_) => return Err(VsockError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect it")(e)),
    }
    let listener = UnixListener::bind(path).map_err(io("listen on it"))?;
    listener
        .set_nonblocking(true)
        .map_err(io("make it non-blocking"))?;
    let m = std::fs::symlink_metadata(path).map_err(io("inspect it"))?;
    Ok((
        listener,
        SocketFile {
            path: path.to_owned(),
            dev: m.dev(),
            ino: m.ino(),
        },
    ))
}

/// The worker thread and the channels to it.
struct WorkerHandle {
    commands: Sender<Command>,
    wake: EventFd,
    stopped: Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    fn send(&self, command: Command) -> bool {
        self.commands.send(command).is_ok() && self.wake.write(1).is_ok()
    }
}

pub struct VsockDevice {
    guest_cid: u64,
    config: [u8; 8],
    acked_features: u64,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    socket_file: SocketFile,
    worker: Option<WorkerHandle>,
    active: bool,
    /// Whether the worker installs its seccomp filter (always, outside unit tests).
    seccomp: bool,
    metrics: Arc<VirtioMetrics>,
}

impl VsockDevice {
    /// The device for guest `guest_cid`, listening on `uds_path` for host programs.
    pub fn new(guest_cid: u32, uds_path: &Path) -> Result<Self, VsockError> {
        if guest_cid < 3 || guest_cid == u32::MAX {
            return Err(VsockError::Cid(guest_cid));
        }
        let (listener, socket_file) = bind_listener(uds_path)?;
        let guest_cid = u64::from(guest_cid);
        Ok(Self {
            guest_cid,
            config: guest_cid.to_le_bytes(),
            acked_features: 0,
            uds_path: uds_path.to_owned(),
            listener: Arc::new(listener),
            socket_file,
            worker: None,
            active: false,
            seccomp: true,
            metrics: Arc::new(VirtioMetrics::default()),
        })
    }

    /// The socket file to remove when the vmm ends.
    pub fn socket_file(&self) -> SocketFile {
        self.socket_file.clone()
    }

    /// Drops every connection and posts a transport reset event to the guest (which then
    /// drops its connections and reads its cid again).
    pub fn transport_reset(&self) -> bool {
        self.active
            && self
                .worker
                .as_ref()
                .is_some_and(|w| w.send(Command::TransportReset))
    }

    fn spawn_worker(&mut self) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Ok(());
        }
        let filter = if self.seccomp {
            Some(
                crate::seccomp::filter(
                    crate::seccomp::ThreadKind::VsockWorker,
                    crate::seccomp::Violation::Trap,
                )
                .map_err(|e| ActivateError::Device(e.to_string()))?,
            )
        } else {
            None
        };
        let cfg = WorkerConfig {
            guest_cid: self.guest_cid,
            uds_path: self.uds_path.clone(),
            listener: self.listener.clone(),
            metrics: self.metrics.clone(),
        };
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let thread_wake = wake.try_clone().map_err(ActivateError::Worker)?;
        let (commands, thread_commands) = mpsc::channel();
        let (thread_stopped, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vsock".into())
            .spawn(move || {
                if let Some(filter) = filter {
                    if let Err(e) = crate::seccomp::apply_to_current_thread(&filter) {
                        error_limited!("vsock: cannot install the worker's seccomp filter: {e}");
                        return;
                    }
                }
                worker_main(cfg, thread_commands, thread_wake, thread_stopped);
            })
            .map_err(ActivateError::Worker)?;
        self.worker = Some(WorkerHandle {
            commands,
            wake,
            stopped,
            thread: Some(thread),
        });
        Ok(())
    }

    /// Stops the worker's session and waits for it; false when it did not stop in time.
    fn stop_session(&mut self, timeout: Duration) -> bool {
        if !self.active {
            return true;
        }
        let Some(worker) = &self.worker else {
            self.active = false;
            return true;
        };
        if !worker.send(Command::Stop) {
            // The thread is gone: nothing serves the queues.
            self.active = false;
            return true;
        }
        match worker.stopped.recv_timeout(timeout) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                self.active = false;
                true
            }
            Err(RecvTimeoutError::Timeout) => {
                error_limited!("vsock: the worker did not stop within {timeout:?}");
                false
            }
        }
    }
}

/// The worker thread: serves one session per activation until told to end.
fn worker_main(cfg: WorkerConfig, commands: Receiver<Command>, wake: EventFd, stopped: Sender<()>) {
    loop {
        let end = match commands.recv() {
            Ok(Command::Activate(session)) => match Muxer::new(cfg.clone(), session) {
                Ok(muxer) => muxer.run(&commands, &wake),
                Err(e) => {
                    error_limited!("vsock: cannot serve the device: {e}");
                    SessionEnd::Stopped
                }
            },
            Ok(Command::Stop) => SessionEnd::Stopped,
            Ok(Command::TransportReset) => continue,
            Ok(Command::Exit) | Err(_) => return,
        };
        let _ = wake.read();
        match end {
            SessionEnd::Stopped => {
                if stopped.send(()).is_err() {
                    return;
                }
            }
            SessionEnd::Exit => return,
        }
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.send(Command::Exit);
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
        self.socket_file.remove();
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The guest cid is read-only.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            queue_events,
            interrupt,
        } = activation;
        if queues.len() != QUEUE_SIZES.len() || queue_events.len() != queues.len() {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                needed: QUEUE_SIZES.len(),
            });
        }
        if self.active {
            return Err(ActivateError::Device(
                "vsock device activated twice without a reset".into(),
            ));
        }
        let Some(worker) = &self.worker else {
            return Err(ActivateError::Device(
                "vsock worker not started before the vCPUs".into(),
            ));
        };
        let session = Session {
            mem,
            queues,
            events: queue_events,
            interrupt,
        };
        if !worker.send(Command::Activate(session)) {
            return Err(ActivateError::Device("the vsock worker is gone".into()));
        }
        self.active = true;
        Ok(())
    }

    fn start_workers(&mut self) -> Result<(), ActivateError> {
        self.spawn_worker()
    }

    fn reset(&mut self) -> bool {
        if !self.stop_session(WORKER_STOP_TIMEOUT) {
            return false;
        }
        self.acked_features = 0;
        true
    }

    fn metrics(&self) -> Option<Arc<VirtioMetrics>> {
        Some(self.metrics.clone())
    }
}

#[cfg(test)]
impl VsockDevice {
    /// The device without the worker's seccomp filter, for tests that cannot install one.
    pub fn without_seccomp(mut self) -> Self {
        self.seccomp = false;
        self
    }

    pub fn is_active(&self) -> bool {
        self.active
    }
}
