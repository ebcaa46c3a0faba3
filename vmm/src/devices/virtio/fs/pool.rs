//! The threads that serve a virtio-fs device's queues, one per queue. They are started before
//! the vCPUs run (by the builder, through `VirtioDevice::start_workers`), so a vCPU never
//! creates a thread: each pool thread enters a filesystem context of its own (umask 0, as the
//! passthrough backend needs), installs the virtio-fs seccomp filter, and only then waits for
//! work. An activation hands each thread its queue ([`QueueWorker`]), which it serves until the
//! device's stop event fires (a reset); then it waits for the next activation. A reset's end
//! of the FUSE session (which may re-open the share's root) runs on a pool thread too, under
//! the same filter, never on the vCPU. Dropping the pool ends the threads once they are idle.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuse_backend_rs::api::filesystem::FileSystem;

use super::worker::QueueWorker;
use crate::devices::log_limit::error_limited;
use crate::seccomp::ThreadFilter;

/// How many of the pool's threads are serving a queue.
#[derive(Default)]
struct Busy {
    count: Mutex<usize>,
    idle: Condvar,
}

impl Busy {
    fn add(&self, n: usize) {
        if let Ok(mut count) = self.count.lock() {
            *count += n;
        }
    }

    fn done(&self) {
        if let Ok(mut count) = self.count.lock() {
            *count = count.saturating_sub(1);
            self.idle.notify_all();
        }
    }

    /// Waits until no thread is serving, at most `timeout`; whether they all stopped.
    fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(mut count) = self.count.lock() else {
            return false;
        };
        while *count > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.idle.wait_timeout(count, left) {
                Ok((next, _)) => count = next,
                Err(_) => return false,
            }
        }
        true
    }

    fn serving(&self) -> usize {
        self.count.lock().map(|c| *c).unwrap_or(0)
    }
}

/// What a pool thread is asked to do.
enum Job<F: FileSystem + Send + Sync + 'static> {
    /// Serve a queue until the stop event.
    Serve(QueueWorker<F>),
    /// End the guest's FUSE session with the filesystem (after a reset).
    Destroy(Arc<F>),
}

pub(super) struct WorkerPool<F: FileSystem + Send + Sync + 'static> {
    jobs: Vec<Sender<Job<F>>>,
    _threads: Vec<JoinHandle<()>>,
    busy: Arc<Busy>,
}

impl<F: FileSystem + Send + Sync + 'static> WorkerPool<F> {
    /// Starts `queues` threads for device `tag`, each under `filter` when given.
    pub fn start(
        tag: &str,
        queues: usize,
        filter: Option<Arc<ThreadFilter>>,
    ) -> std::io::Result<Self> {
        let busy = Arc::new(Busy::default());
        let mut jobs = Vec::with_capacity(queues);
        let mut threads = Vec::with_capacity(queues);
        for index in 0..queues {
            let (tx, rx) = mpsc::channel();
            let (tag, filter, busy) = (tag.to_string(), filter.clone(), busy.clone());
            let thread = std::thread::Builder::new()
                .name(format!("fs-{tag}-q{index}"))
                .spawn(move || serve(&tag, index, rx, filter.as_deref(), &busy))?;
            jobs.push(tx);
            threads.push(thread);
        }
        Ok(Self {
            jobs,
            _threads: threads,
            busy,
        })
    }

    /// Hands each queue's worker to its thread; false when a thread is gone (it could not
    /// set itself up: its error was logged).
    pub fn activate(&self, workers: Vec<QueueWorker<F>>) -> bool {
        if workers.len() != self.jobs.len() {
            return false;
        }
        self.busy.add(workers.len());
        let mut all = true;
        for (job, worker) in self.jobs.iter().zip(workers) {
            if job.send(Job::Serve(worker)).is_err() {
                self.busy.done();
                all = false;
            }
        }
        all
    }

    /// Ends the FUSE session of `fs` on a pool thread and waits for it, at most `timeout`.
    pub fn destroy(&self, fs: Arc<F>, timeout: Duration) -> bool {
        let Some(job) = self.jobs.first() else {
            return false;
        };
        self.busy.add(1);
        if job.send(Job::Destroy(fs)).is_err() {
            self.busy.done();
            return false;
        }
        self.busy.wait_idle(timeout)
    }

    /// Waits for the threads to finish serving (after the stop event), at most `timeout`.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        self.busy.wait_idle(timeout)
    }

    /// How many threads are still serving a queue.
    pub fn serving(&self) -> usize {
        self.busy.serving()
    }
}

fn serve<F: FileSystem + Send + Sync + 'static>(
    tag: &str,
    index: usize,
    jobs: Receiver<Job<F>>,
    filter: Option<&ThreadFilter>,
    busy: &Busy,
) {
    if let Err(e) = super::enter_fs_context() {
        error_limited!("virtio-fs {tag} queue {index}: cannot make a filesystem context: {e}");
        return;
    }
    if let Some(filter) = filter {
        if let Err(e) = crate::seccomp::apply_to_current_thread(filter) {
            error_limited!(
                "virtio-fs {tag} queue {index}: not serving without its seccomp filter: {e}"
            );
            return;
        }
    }
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Serve(worker) => worker.run(),
            Job::Destroy(fs) => fs.destroy(),
        }
        busy.done();
    }
}
