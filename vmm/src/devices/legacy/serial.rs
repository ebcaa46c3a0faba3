//! COM1: a 16550 UART (vm-superio) whose interrupt is an irqfd and whose output goes to the
//! configured sink (stdout, a file, or nowhere).

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// Port I/O base and IRQ of COM1.
pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// Raises a guest interrupt by signalling an eventfd registered as an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialOut = Box<dyn Write + Send>;

/// How much guest output is held before it is written out regardless of line ends.
const LINE_BUFFER_LIMIT: usize = 4096;

/// Collects the guest's output bytes (the UART hands them over one at a time and flushes after
/// each) and writes whole lines, so a boot log costs a write per line, not per byte. Partial
/// lines (prompts) are written by [`SerialDevice::flush`], which the VMM calls periodically.
pub struct LineBuffered {
    out: SerialOut,
    pending: Vec<u8>,
}

impl LineBuffered {
    fn new(out: SerialOut) -> Self {
        Self {
            out,
            pending: Vec::with_capacity(LINE_BUFFER_LIMIT),
        }
    }

    fn write_pending(&mut self) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            let result = self
                .out
                .write_all(&self.pending)
                .and_then(|_| self.out.flush());
            self.pending.clear();
            result?;
        }
        Ok(())
    }
}

impl Write for LineBuffered {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.pending.len() >= LINE_BUFFER_LIMIT {
            self.write_pending()?;
        }
        Ok(buf.len())
    }

    /// Called by the UART after every byte: a no-op, see [`SerialDevice::flush`].
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The COM1 device.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, LineBuffered>,
}

impl SerialDevice {
    pub fn new(interrupt: EventFd, out: SerialOut) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(interrupt), LineBuffered::new(out)),
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

    /// Writes out any partial line the guest has printed.
    pub fn flush(&mut self) {
        if let Err(e) = self.uart.writer_mut().write_pending() {
            tracing::debug!("serial output failed: {e}");
        }
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
                tracing::debug!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

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

    #[test]
    fn transmit_reaches_the_sink_and_input_raises_an_interrupt() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(Shared(buf.clone())));
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert!(buf.lock().unwrap().is_empty(), "a partial line waits");
        dev.flush();
        assert_eq!(&*buf.lock().unwrap(), b"hi");
        for b in b"!\nnext" {
            dev.write(0, &[*b]);
        }
        assert_eq!(
            &*buf.lock().unwrap(),
            b"hi!\n",
            "a line end writes the line"
        );
        dev.write(1, &[1]); // IER: data-available interrupt
        assert_eq!(dev.enqueue_input(b"x"), 1);
        assert!(irq.read().unwrap() >= 1);
        let mut d = [0u8];
        dev.read(0, &mut d);
        assert_eq!(d[0], b'x');
    }
}
