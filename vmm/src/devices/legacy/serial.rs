//! COM1: a 16550 UART (vm-superio) whose interrupt is an irqfd, and the path its output takes to
//! the configured sink (stdout, a size-capped rotating file, or nowhere).
//!
//! The guest's output never blocks a vCPU and never grows without bound: the vCPU thread only
//! appends to a bounded in-memory buffer ([`OUTPUT_BUFFER_CAPACITY`]); a writer thread
//! ([`SerialWriter`]) drains it to the sink, whole lines as they complete and partial lines
//! (prompts) after [`FLUSH_INTERVAL`]. When the sink is slower than the guest (a pipe nobody
//! reads) the buffer fills and further bytes are dropped and counted. Before the VMM exits,
//! [`SerialWriter::drain`] writes out what is buffered. A file sink ([`LogFile`]) is capped:
//! when full it is renamed to `PATH.1` (replacing the previous one) and a new file is started.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::{lock, BusDevice};
use crate::devices::legacy::panic_watch::PanicWatch;
use crate::devices::log_limit::debug_limited;

/// Port I/O base and IRQ of COM1.
pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// Guest output held in memory while the sink catches up; beyond it bytes are dropped.
pub const OUTPUT_BUFFER_CAPACITY: usize = 64 * 1024;
/// How much output without a line end wakes the writer regardless.
const LINE_BUFFER_LIMIT: usize = 4096;
/// How long a partial line (a prompt) waits before it is written out.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// How long [`SerialWriter::drain`] waits for a sink at exit (a pipe nobody reads never drains).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Mode of a serial log file the VMM creates (the process umask may be 0).
pub const LOG_FILE_MODE: u32 = 0o640;

/// Raises a guest interrupt by signalling an eventfd registered as an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the writer thread sends the guest's output.
pub type SerialOut = Box<dyn Write + Send>;

struct OutState {
    pending: Vec<u8>,
    /// Bytes accepted into `pending`, ever.
    appended: u64,
    /// Bytes the writer has taken out of `pending` and written (or failed to write), ever.
    written: u64,
    /// The writer should write out what is pending now.
    wake: bool,
    closed: bool,
    writer_alive: bool,
}

struct Shared {
    state: Mutex<OutState>,
    /// Wakes the writer thread.
    to_writer: Condvar,
    /// Signalled by the writer after each write.
    written: Condvar,
    capacity: usize,
    dropped: AtomicU64,
    /// Every byte the guest wrote, kept or dropped (metrics).
    from_guest: Arc<AtomicU64>,
    /// The reason of a kernel panic the guest printed.
    panic: Arc<std::sync::OnceLock<String>>,
}

/// The vCPU side of the output path: what the UART writes into. Never blocks on I/O.
pub struct OutputBuffer {
    shared: Arc<Shared>,
    panic: PanicWatch,
}

impl Write for OutputBuffer {
    /// Accepts what fits in the buffer; the rest is dropped and counted (never an error, so
    /// the UART carries on).
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.panic.feed(buf);
        let shared = &self.shared;
        shared
            .from_guest
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        let mut st = lock(&shared.state);
        let was_empty = st.pending.is_empty();
        let room = shared.capacity.saturating_sub(st.pending.len());
        let taken = &buf[..room.min(buf.len())];
        st.pending.extend_from_slice(taken);
        st.appended += taken.len() as u64;
        let dropped = buf.len() - taken.len();
        if dropped > 0 {
            shared.dropped.fetch_add(dropped as u64, Ordering::Relaxed);
        }
        if taken.contains(&b'\n') || st.pending.len() >= LINE_BUFFER_LIMIT {
            if !st.wake {
                st.wake = true;
                shared.to_writer.notify_one();
            }
        } else if was_empty && !taken.is_empty() {
            // Starts the writer's partial-line clock.
            shared.to_writer.notify_one();
        }
        Ok(buf.len())
    }

    /// Called by the UART after every byte: a no-op, the writer thread decides when to write.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The writer thread that drains an [`OutputBuffer`] into the sink.
pub struct SerialWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Marks the writer gone however its thread ends, so nobody waits for it.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        lock(&self.0.state).writer_alive = false;
        self.0.written.notify_all();
    }
}

impl SerialWriter {
    /// Starts the writer thread for `sink` with the default buffer size.
    pub fn spawn(sink: SerialOut) -> std::io::Result<(OutputBuffer, SerialWriter)> {
        Self::with_capacity(sink, OUTPUT_BUFFER_CAPACITY, None)
    }

    /// Starts the writer thread, which installs `filter` before it writes anything.
    pub fn spawn_confined(
        sink: SerialOut,
        filter: Arc<crate::seccomp::ThreadFilter>,
    ) -> std::io::Result<(OutputBuffer, SerialWriter)> {
        Self::with_capacity(sink, OUTPUT_BUFFER_CAPACITY, Some(filter))
    }

    pub fn with_capacity(
        sink: SerialOut,
        capacity: usize,
        filter: Option<Arc<crate::seccomp::ThreadFilter>>,
    ) -> std::io::Result<(OutputBuffer, SerialWriter)> {
        let panic = PanicWatch::default();
        let shared = Arc::new(Shared {
            state: Mutex::new(OutState {
                pending: Vec::with_capacity(capacity.min(LINE_BUFFER_LIMIT)),
                appended: 0,
                written: 0,
                wake: false,
                closed: false,
                writer_alive: true,
            }),
            to_writer: Condvar::new(),
            written: Condvar::new(),
            capacity,
            dropped: AtomicU64::new(0),
            from_guest: Arc::default(),
            panic: panic.seen(),
        });
        let guard = AliveGuard(shared.clone());
        let thread = std::thread::Builder::new()
            .name("serial-out".into())
            .spawn(move || {
                if let Some(filter) = filter {
                    if let Err(e) = crate::seccomp::apply_to_current_thread(&filter) {
                        tracing::error!("serial-out: not writing without its seccomp filter: {e}");
                        return;
                    }
                }
                writer_loop(guard, sink)
            })?;
        Ok((
            OutputBuffer {
                shared: shared.clone(),
                panic,
            },
            SerialWriter {
                shared,
                thread: Some(thread),
            },
        ))
    }

    /// Guest output bytes dropped because the buffer was full.
    /// The reason of the kernel panic the guest printed on its console, if it did.
    pub fn guest_panic(&self) -> Option<String> {
        self.shared.panic.get().cloned()
    }

    /// The count of bytes the guest wrote to the console (kept or dropped).
    pub fn guest_bytes(&self) -> Arc<AtomicU64> {
        self.shared.from_guest.clone()
    }

    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Writes out everything buffered so far, waiting at most `timeout` for the sink; returns
    /// whether it all got out.
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        let target = st.appended;
        st.wake = true;
        self.shared.to_writer.notify_one();
        while st.written < target {
            let now = Instant::now();
            if !st.writer_alive || now >= deadline {
                return false;
            }
            st = self
                .shared
                .written
                .wait_timeout(st, deadline - now)
                .map_or_else(|p| p.into_inner().0, |(g, _)| g);
        }
        true
    }

    /// Drains (see [`drain`](Self::drain)) and stops the writer thread; the thread is joined
    /// only when the sink took everything (a blocked sink would block the join too).
    pub fn finish(&mut self, timeout: Duration) -> bool {
        let drained = self.drain(timeout);
        lock(&self.shared.state).closed = true;
        self.shared.to_writer.notify_one();
        if drained {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
        drained
    }
}

impl Drop for SerialWriter {
    fn drop(&mut self) {
        self.finish(DRAIN_TIMEOUT);
    }
}

fn writer_loop(guard: AliveGuard, mut sink: SerialOut) {
    let shared = &guard.0;
    let mut chunk = Vec::new();
    loop {
        let closed = {
            let mut st = lock(&shared.state);
            while !st.wake && !st.closed {
                if st.pending.is_empty() {
                    st = shared.to_writer.wait(st).unwrap_or_else(|p| p.into_inner());
                    continue;
                }
                let (g, timeout) = shared
                    .to_writer
                    .wait_timeout(st, FLUSH_INTERVAL)
                    .unwrap_or_else(|p| p.into_inner());
                st = g;
                if timeout.timed_out() {
                    break;
                }
            }
            st.wake = false;
            std::mem::swap(&mut chunk, &mut st.pending);
            st.closed
        };
        if !chunk.is_empty() {
            if let Err(e) = sink.write_all(&chunk).and_then(|()| sink.flush()) {
                debug_limited!("serial output failed: {e}");
            }
        }
        let mut st = lock(&shared.state);
        st.written += chunk.len() as u64;
        chunk.clear();
        shared.written.notify_all();
        if closed && st.pending.is_empty() {
            return;
        }
    }
}

/// A serial log file of at most `max_bytes`: when full it becomes `PATH.1` (replacing any
/// previous one) and a new `PATH` is started, so the console never takes more than twice
/// `max_bytes` of disk. Files are created with mode [`LOG_FILE_MODE`].
pub struct LogFile {
    path: PathBuf,
    rotated: PathBuf,
    max_bytes: u64,
    file: File,
    written: u64,
}

impl LogFile {
    /// Creates (or truncates) `path`.
    pub fn create(path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        if max_bytes == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a serial log must be allowed at least one byte",
            ));
        }
        let mut rotated = path.as_os_str().to_owned();
        rotated.push(".1");
        Ok(Self {
            path: path.to_path_buf(),
            rotated: rotated.into(),
            max_bytes,
            file: Self::open(path)?,
            written: 0,
        })
    }

    fn open(path: &Path) -> std::io::Result<File> {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(LOG_FILE_MODE)
            .open(path)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        match std::fs::rename(&self.path, &self.rotated) {
            // Removed from under us: start a new one all the same.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
        self.file = Self::open(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.written >= self.max_bytes {
            self.rotate()?;
        }
        let room = usize::try_from(self.max_bytes - self.written).unwrap_or(usize::MAX);
        let n = self.file.write(&buf[..room.min(buf.len())])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// The COM1 device.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, OutputBuffer>,
}

impl SerialDevice {
    pub fn new(interrupt: EventFd, out: OutputBuffer) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(interrupt), out),
        }
    }

    /// Queues host input (stdin) for the guest; returns how many bytes the FIFO took.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(offset, *value) {
                debug_limited!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::mpsc;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn get(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
        /// Waits (at most 2 s) until the sink holds `want`.
        fn wait_for(&self, want: &[u8]) -> Vec<u8> {
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.get() != want && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.get()
        }
    }

    /// A sink whose writes block until the test lets them through (a pipe nobody reads).
    struct Blocked {
        release: mpsc::Receiver<()>,
        got: Shared,
    }
    impl Write for Blocked {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _ = self.release.recv();
            self.got.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn device(sink: SerialOut) -> (SerialDevice, SerialWriter, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (out, writer) = SerialWriter::spawn(sink).unwrap();
        (
            SerialDevice::new(irq.try_clone().unwrap(), out),
            writer,
            irq,
        )
    }

    fn print(dev: &mut SerialDevice, bytes: &[u8]) {
        for b in bytes {
            dev.write(0, &[*b]);
        }
    }

    #[test]
    fn transmit_reaches_the_sink_and_input_raises_an_interrupt() {
        let buf = Shared::default();
        let (mut dev, writer, irq) = device(Box::new(buf.clone()));
        print(&mut dev, b"hi!\n");
        assert_eq!(
            buf.wait_for(b"hi!\n"),
            b"hi!\n",
            "a line end writes the line"
        );
        print(&mut dev, b"prompt$ ");
        assert_eq!(
            buf.wait_for(b"hi!\nprompt$ "),
            b"hi!\nprompt$ ",
            "a partial line is written after the flush interval"
        );
        dev.write(1, &[1]); // IER: data-available interrupt
        assert_eq!(dev.enqueue_input(b"x"), 1);
        assert!(irq.read().unwrap() >= 1);
        let mut d = [0u8];
        dev.read(0, &mut d);
        assert_eq!(d[0], b'x');
        assert_eq!(writer.dropped(), 0);
    }

    #[test]
    fn drain_writes_everything_before_it_returns() {
        let buf = Shared::default();
        let (mut dev, writer, _irq) = device(Box::new(buf.clone()));
        print(&mut dev, b"line\nno end");
        assert!(writer.drain(Duration::from_secs(5)));
        assert_eq!(buf.get(), b"line\nno end");
    }

    #[test]
    fn a_sink_that_never_takes_output_does_not_block_the_guest() {
        let (release, rx) = mpsc::channel();
        let got = Shared::default();
        let (mut dev, mut writer, _irq) = device(Box::new(Blocked {
            release: rx,
            got: got.clone(),
        }));
        // 1 MiB of lines while the sink is stuck: the vCPU side must return at once.
        let started = Instant::now();
        let line = [b'x'; 63].iter().chain(b"\n").copied().collect::<Vec<u8>>();
        for _ in 0..(1 << 20) / line.len() {
            print(&mut dev, &line);
        }
        assert!(started.elapsed() < Duration::from_secs(30));
        let dropped = writer.dropped();
        // At most the buffer plus the chunk the writer holds got through.
        assert!(
            dropped >= (1 << 20) - 2 * OUTPUT_BUFFER_CAPACITY as u64,
            "only {dropped} bytes dropped"
        );
        assert!(
            !writer.drain(Duration::from_millis(100)),
            "the sink is stuck"
        );
        drop(release);
        assert!(writer.finish(Duration::from_secs(5)));
        assert_eq!(got.get().len() as u64, (1 << 20) - dropped);
    }

    #[test]
    fn log_file_is_capped_rotated_and_created_0640() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = LogFile::create(&path, 10).unwrap();
        log.write_all(b"0123456789abcdefghijklmno").unwrap();
        log.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"klmno");
        assert_eq!(
            std::fs::read(dir.path().join("console.log.1")).unwrap(),
            b"abcdefghij"
        );
        for p in [path.clone(), dir.path().join("console.log.1")] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, LOG_FILE_MODE & !current_umask(), "{}", p.display());
        }
        assert!(LogFile::create(&path, 0).is_err());
    }

    fn current_umask() -> u32 {
        // SAFETY: umask only swaps the process's mask; it is restored at once.
        let mask = unsafe { libc::umask(0o022) };
        unsafe { libc::umask(mask) };
        mask as u32
    }
}
