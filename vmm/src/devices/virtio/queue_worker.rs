//! What single-queue devices (block, rng) share to serve their queue off the vCPU threads:
//! - [`WorkerThread`]: a thread started before the vCPUs run, which installs its seccomp
//!   filter first and then runs what each activation hands it, reporting when it is done;
//! - [`serve`]: the event loop of an activated queue: it waits (never spins) for the driver's
//!   notification, the device's stop event (a reset), the rate limiter's timer (a throttled
//!   queue resumes when tokens are back) or a change of the limits, and hands the queue to the
//!   device's [`QueueServer`].

use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::devices::log_limit::error_limited;
use crate::devices::virtio::{ActivateError, VirtioInterrupt};
use crate::rate_limiter::SharedRateLimiter;
use crate::seccomp::ThreadFilter;

type Job = Box<dyn FnOnce() + Send>;

/// A device's worker thread.
pub struct WorkerThread {
    jobs: Sender<Job>,
    done: Receiver<()>,
    /// Jobs handed over and not yet reported done.
    running: usize,
    _thread: JoinHandle<()>,
}

impl WorkerThread {
    /// Starts thread `name`, which installs `filter` (when given) before anything else; a
    /// thread that cannot install it logs why and ends (the next [`Self::run`] then fails).
    pub fn start(name: String, filter: Option<Arc<ThreadFilter>>) -> std::io::Result<Self> {
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        let shown = name.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            if let Some(filter) = filter {
                if let Err(e) = crate::seccomp::apply_to_current_thread(&filter) {
                    error_limited!("{shown}: not serving without its seccomp filter: {e}");
                    return;
                }
            }
            while let Ok(job) = job_rx.recv() {
                job();
                if done_tx.send(()).is_err() {
                    return;
                }
            }
        })?;
        Ok(Self {
            jobs,
            done,
            running: 0,
            _thread: thread,
        })
    }

    /// Hands `job` to the thread; false when the thread is gone.
    pub fn run(&mut self, job: impl FnOnce() + Send + 'static) -> bool {
        if self.jobs.send(Box::new(job)).is_err() {
            return false;
        }
        self.running += 1;
        true
    }

    /// Waits at most `timeout` for the jobs handed over to finish; whether they all did.
    pub fn wait_done(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.running > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.done.recv_timeout(left) {
                Ok(()) => self.running -= 1,
                // A thread that ended (it could not set itself up) runs nothing any more.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.running = 0;
                    return true;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => return false,
            }
        }
        true
    }
}

/// What a throttled or idle queue waits on, made before the vCPUs run (no thread makes
/// descriptors once it is confined).
pub struct QueueEvents {
    /// The driver's notifications of the queue.
    pub queue: EventFd,
    /// Signalled on reset: the worker returns.
    pub stop: EventFd,
    /// Armed while the rate limiter holds requests back.
    pub timer: Arc<Mutex<TimerFd>>,
    pub limiter: SharedRateLimiter,
}

/// What one pass over the queue did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// The driver must be interrupted (used buffers were added and it wants to know).
    pub notify: bool,
    /// The rate limiter held the next request back for this long (it stays in the queue).
    pub throttled_for: Option<Duration>,
}

/// What became of one request (descriptor chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Returned to the driver with this many bytes written.
    Used(u32),
    /// Held back by the rate limiter for this long (it stays available in the queue).
    Throttled(Duration),
}

/// One pass over `queue`: every available chain goes through `handle` and is returned to the
/// driver, until the queue is empty (notifications back on) or a chain is throttled (it stays
/// available and notifications stay off until the timer).
pub fn serve_chains(
    queue: &mut virtio_queue::Queue,
    mem: &vm_memory::GuestMemoryMmap,
    mut handle: impl FnMut(virtio_queue::DescriptorChain<&vm_memory::GuestMemoryMmap>) -> Outcome,
) -> Result<Served, virtio_queue::Error> {
    use virtio_queue::{QueueOwnedT, QueueT};
    let mut served = Served::default();
    let mut used_any = false;
    'queue: loop {
        queue.disable_notification(mem)?;
        while let Some(chain) = queue.iter(mem)?.next() {
            let head = chain.head_index();
            match handle(chain) {
                Outcome::Used(len) => {
                    queue.add_used(mem, head, len)?;
                    used_any = true;
                }
                Outcome::Throttled(wait) => {
                    queue.go_to_previous_position();
                    served.throttled_for = Some(wait);
                    break 'queue;
                }
            }
        }
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    served.notify = used_any && queue.needs_notification(mem)?;
    Ok(served)
}

/// A device's handling of its queue.
pub trait QueueServer {
    /// Serves the available chains until the queue is empty or the rate limiter says wait.
    fn serve_queue(&mut self) -> Result<Served, virtio_queue::Error>;
}

/// Serves `server`'s queue until the stop event fires or the queue breaks.
pub fn serve(
    name: &str,
    server: &mut impl QueueServer,
    events: &QueueEvents,
    interrupt: &VirtioInterrupt,
) {
    let mut throttled = false;
    // Chains may be waiting since before the activation (the driver notified already).
    let mut ready = true;
    loop {
        if ready && !throttled {
            match server.serve_queue() {
                Ok(served) => {
                    if served.notify {
                        interrupt.signal_used_queue();
                    }
                    if let Some(wait) = served.throttled_for {
                        throttled = arm(name, &events.timer, wait);
                        if !throttled {
                            return;
                        }
                    }
                }
                Err(e) => {
                    error_limited!("{name}: queue error, the worker stops: {e:?}");
                    return;
                }
            }
        }
        let mut pfds =
            [events.queue.as_raw_fd(), events.stop.as_raw_fd(), -1, -1].map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        if let Ok(timer) = events.timer.lock() {
            pfds[2].fd = timer.as_raw_fd();
        }
        pfds[3].fd = events.limiter.changed().as_raw_fd();
        // SAFETY: `pfds` is a valid array of four pollfds for the duration of the call
        // (a negative fd is ignored by poll).
        let ret = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if ret < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            error_limited!("{name}: poll failed, the worker stops: {err}");
            return;
        }
        if pfds[1].revents != 0 {
            return;
        }
        ready = false;
        if pfds[0].revents != 0 {
            let _ = events.queue.read();
            ready = true;
        }
        if pfds[2].revents != 0 {
            if let Ok(mut timer) = events.timer.lock() {
                let _ = timer.wait();
            }
            throttled = false;
            ready = true;
        }
        if pfds[3].revents != 0 {
            let _ = events.limiter.changed().read();
            // New limits: what was held back may pass now.
            throttled = false;
            ready = true;
        }
    }
}

fn arm(name: &str, timer: &Mutex<TimerFd>, wait: Duration) -> bool {
    let armed = timer
        .lock()
        .map_err(|_| "lock poisoned".to_string())
        .and_then(|mut t| t.reset(wait, None).map_err(|e| e.to_string()));
    match armed {
        Ok(()) => true,
        Err(e) => {
            error_limited!("{name}: cannot arm the rate limiter's timer, the worker stops: {e}");
            false
        }
    }
}

/// How long a reset waits for a worker to finish the request it is serving.
pub const WORKER_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The queue-serving side of a single-queue device: its worker thread, the events the worker
/// waits on, the rate limiter it shares with the device, and the stop event of the current
/// activation.
pub struct SingleQueueWorker {
    name: String,
    kind: crate::seccomp::ThreadKind,
    /// Whether the worker installs its seccomp filter (always, outside unit tests).
    seccomp: bool,
    thread: Option<WorkerThread>,
    stop: Option<EventFd>,
    timer: Arc<Mutex<TimerFd>>,
    limiter: SharedRateLimiter,
    stop_timeout: Duration,
}

impl SingleQueueWorker {
    /// `name` names the thread and the log lines; `kind` chooses its seccomp filter. The
    /// timer and the limiter's event are made now, before any thread is confined.
    pub fn new(
        name: String,
        kind: crate::seccomp::ThreadKind,
        limits: Option<&vm_spec::RateLimiterSpec>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            name,
            kind,
            seccomp: true,
            thread: None,
            stop: None,
            timer: Arc::new(Mutex::new(TimerFd::new()?)),
            limiter: SharedRateLimiter::new(limits)?,
            stop_timeout: WORKER_STOP_TIMEOUT,
        })
    }

    pub fn limiter(&self) -> &SharedRateLimiter {
        &self.limiter
    }

    /// Starts the thread (once).
    pub fn start(&mut self) -> Result<&mut WorkerThread, ActivateError> {
        if self.thread.is_none() {
            let filter = if self.seccomp {
                let filter = crate::seccomp::filter(self.kind, crate::seccomp::Violation::Trap)
                    .map_err(|e| ActivateError::Device(e.to_string()))?;
                Some(Arc::new(filter))
            } else {
                None
            };
            let thread =
                WorkerThread::start(self.name.clone(), filter).map_err(ActivateError::Worker)?;
            self.thread = Some(thread);
        }
        self.thread
            .as_mut()
            .ok_or_else(|| ActivateError::Device("no worker thread".into()))
    }

    /// Hands the activated queue (served by `server`) to the worker.
    pub fn activate<S: QueueServer + Send + 'static>(
        &mut self,
        mut server: S,
        queue_event: EventFd,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.stop.is_some() {
            return Err(ActivateError::Device(format!(
                "{} activated twice without a reset",
                self.name
            )));
        }
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let events = QueueEvents {
            queue: queue_event,
            stop: stop.try_clone().map_err(ActivateError::Worker)?,
            timer: self.timer.clone(),
            limiter: self.limiter.clone(),
        };
        let name = self.name.clone();
        let started = self.start()?.run(move || {
            serve(&name, &mut server, &events, &interrupt);
        });
        self.stop = Some(stop);
        if !started {
            self.stop();
            return Err(ActivateError::Device(format!(
                "the {} worker is gone (see its error)",
                self.name
            )));
        }
        Ok(())
    }

    /// Signals the stop event and waits for the worker; false when it is still serving after
    /// the timeout (the event stays set, so it stops when it can).
    pub fn stop(&mut self) -> bool {
        let Some(stop) = &self.stop else {
            return true;
        };
        if let Err(e) = stop.write(1) {
            error_limited!("{}: cannot stop the worker: {e}", self.name);
            return false;
        }
        if let Some(thread) = &mut self.thread {
            if !thread.wait_done(self.stop_timeout) {
                error_limited!(
                    "{}: the worker did not stop within {:?}",
                    self.name,
                    self.stop_timeout
                );
                return false;
            }
        }
        self.stop = None;
        true
    }

    /// Whether a queue is being served (activated and not reset).
    pub fn active(&self) -> bool {
        self.stop.is_some()
    }

    /// Without the seccomp filter, for unit tests that cannot install one.
    #[cfg(test)]
    pub fn without_seccomp(&mut self) {
        self.seccomp = false;
    }
}

impl Drop for SingleQueueWorker {
    fn drop(&mut self) {
        self.stop();
    }
}
