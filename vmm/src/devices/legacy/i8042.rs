//! The i8042 keyboard controller, enough of it for Linux to probe it at once (status, control
//! byte, self-tests, command acknowledgements), for a guest reboot (CPU reset through port
//! 0x64, `reboot=k`) to reach the VMM, which then ends the VM, and for the VMM to press
//! Ctrl-Alt-Del (a graceful shutdown request) with a keyboard interrupt (IRQ 1).
//!
//! A controller that never answers (as vm-superio's) makes the Linux driver wait out its
//! command timeout at every boot, so this one answers like the real part.
//!
//! The guest can issue commands without ever reading the answers: the output buffer holds at
//! most [`OUTPUT_CAPACITY`] bytes (as Firecracker's); answers past that are dropped and counted.

use std::collections::VecDeque;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// The controller occupies ports 0x60..=0x64.
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
/// The keyboard's interrupt line.
pub const KBD_IRQ: u32 = 1;

/// Ctrl, Alt, Delete pressed: scan code set 1 (what the guest reads when the controller
/// translates, the PC default) and set 2 (translation off).
const CTRL_ALT_DEL_SET1: [u8; 4] = [0x1d, 0x38, 0xe0, 0x53];
const CTRL_ALT_DEL_SET2: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
/// Set: the keyboard is not inhibited by the key lock (Linux warns "Keylock active" when clear).
const STATUS_KEYLOCK_OFF: u8 = 0x10;

const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_TRANSLATE: u8 = 0x40;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

/// Bytes the output buffer holds; answers beyond it are dropped.
pub const OUTPUT_CAPACITY: usize = 16;

const SELF_TEST_OK: u8 = 0x55;
const KBD_ACK: u8 = 0xfa;
const KBD_RESET_OK: u8 = 0xaa;
const KBD_CMD_RESET: u8 = 0xff;

/// What the next byte written to the data port means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    KeyboardCommand,
    ControlByte,
    OutputPort,
    AuxData,
}

pub struct I8042<T: Trigger> {
    reset: T,
    control: u8,
    output: VecDeque<u8>,
    pending: Pending,
    last_was_command: bool,
    dropped: u64,
    /// Raised when a keyboard byte waits for the guest (and the guest enabled the interrupt).
    interrupt: Option<EventFd>,
}

impl<T: Trigger> I8042<T> {
    /// `reset` fires when the guest asks for a CPU reset.
    pub fn new(reset: T) -> Self {
        Self {
            reset,
            control: CTR_KBD_INT | CTR_SYSTEM_FLAG | CTR_TRANSLATE,
            output: VecDeque::with_capacity(OUTPUT_CAPACITY),
            pending: Pending::KeyboardCommand,
            last_was_command: false,
            dropped: 0,
            interrupt: None,
        }
    }

    /// The controller with a keyboard interrupt (an irqfd on [`KBD_IRQ`]).
    pub fn with_interrupt(mut self, interrupt: EventFd) -> Self {
        self.interrupt = Some(interrupt);
        self
    }

    /// Presses Ctrl-Alt-Del (Linux with the Ctrl-Alt-Del reboot disabled sends SIGINT to its
    /// init). False when the output buffer has no room for the key codes.
    pub fn press_ctrl_alt_del(&mut self) -> bool {
        let codes = if self.control & CTR_TRANSLATE != 0 {
            CTRL_ALT_DEL_SET1
        } else {
            CTRL_ALT_DEL_SET2
        };
        if OUTPUT_CAPACITY - self.output.len() < codes.len() {
            return false;
        }
        self.output.extend(codes);
        self.raise_interrupt();
        true
    }

    fn raise_interrupt(&self) {
        if self.control & CTR_KBD_INT != 0 && !self.output.is_empty() {
            if let Some(interrupt) = &self.interrupt {
                let _ = interrupt.write(1);
            }
        }
    }

    /// Answer bytes dropped because the guest did not read the output buffer.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Queues an answer byte; drops (and counts) it when the buffer is full.
    fn push(&mut self, byte: u8) {
        if self.output.len() >= OUTPUT_CAPACITY {
            self.dropped = self.dropped.saturating_add(1);
            return;
        }
        self.output.push_back(byte);
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_SYSTEM_FLAG | STATUS_KEYLOCK_OFF;
        if !self.output.is_empty() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    fn command(&mut self, command: u8) {
        self.last_was_command = true;
        match command {
            CMD_READ_CTR => self.push(self.control),
            CMD_WRITE_CTR => self.pending = Pending::ControlByte,
            CMD_SELF_TEST => self.push(SELF_TEST_OK),
            CMD_KBD_TEST | CMD_AUX_TEST => self.push(0x00),
            CMD_KBD_DISABLE => self.control |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.control &= !CTR_KBD_DISABLED,
            CMD_READ_OUTPUT_PORT => self.push(0x01),
            CMD_WRITE_OUTPUT_PORT => self.pending = Pending::OutputPort,
            CMD_WRITE_AUX => self.pending = Pending::AuxData,
            CMD_RESET_CPU => {
                if let Err(e) = self.reset.trigger() {
                    tracing::warn!("i8042 reset could not be signalled: {e:?}");
                }
            }
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.last_was_command = false;
        match std::mem::replace(&mut self.pending, Pending::KeyboardCommand) {
            Pending::ControlByte => self.control = value,
            Pending::OutputPort | Pending::AuxData => {}
            Pending::KeyboardCommand => {
                self.push(KBD_ACK);
                if value == KBD_CMD_RESET {
                    self.push(KBD_RESET_OK);
                }
                // The keyboard's answers arrive by interrupt.
                self.raise_interrupt();
            }
        }
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => {
                let byte = self.output.pop_front().unwrap_or(0);
                // One byte per interrupt: the next one gets its own.
                self.raise_interrupt();
                byte
            }
            COMMAND_OFFSET => self.status(),
            _ => 0,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            DATA_OFFSET => self.data(value),
            COMMAND_OFFSET => self.command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    struct Flag(Arc<AtomicBool>);
    impl Trigger for Flag {
        type E = ();
        fn trigger(&self) -> Result<(), ()> {
            self.0.store(true, Ordering::SeqCst);
            Ok(())
        }
    }

    fn device() -> (I8042<Flag>, Arc<AtomicBool>) {
        let fired = Arc::new(AtomicBool::new(false));
        (I8042::new(Flag(fired.clone())), fired)
    }

    fn read(dev: &mut I8042<Flag>, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn cpu_reset_command_fires_the_trigger() {
        let (mut dev, fired) = device();
        dev.write(4, &[0xfe]);
        assert!(fired.load(Ordering::SeqCst));
    }

    #[test]
    fn control_byte_round_trips_as_linux_probes_it() {
        let (mut dev, fired) = device();
        assert_eq!(read(&mut dev, 4) & STATUS_OUTPUT_FULL, 0);
        assert_ne!(
            read(&mut dev, 4) & STATUS_KEYLOCK_OFF,
            0,
            "keylock reported"
        );
        dev.write(4, &[CMD_READ_CTR]);
        assert_ne!(read(&mut dev, 4) & STATUS_OUTPUT_FULL, 0);
        let ctr = read(&mut dev, 0);
        assert_eq!(ctr, CTR_KBD_INT | CTR_SYSTEM_FLAG | CTR_TRANSLATE);
        assert_eq!(read(&mut dev, 4) & STATUS_OUTPUT_FULL, 0);
        dev.write(4, &[CMD_WRITE_CTR]);
        dev.write(0, &[0x47]);
        dev.write(4, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, 0), 0x47);
        dev.write(4, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, 0), SELF_TEST_OK);
        dev.write(0, &[KBD_CMD_RESET]);
        assert_eq!(
            (read(&mut dev, 0), read(&mut dev, 0)),
            (KBD_ACK, KBD_RESET_OK)
        );
        assert!(!fired.load(Ordering::SeqCst));
    }

    #[test]
    fn ctrl_alt_del_is_pressed_in_the_guest_scan_code_set_with_an_interrupt() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let fired = Arc::new(AtomicBool::new(false));
        let mut dev = I8042::new(Flag(fired.clone())).with_interrupt(irq.try_clone().unwrap());
        assert!(dev.press_ctrl_alt_del());
        assert_eq!(irq.read().unwrap(), 1);
        let mut got = Vec::new();
        while read(&mut dev, 4) & STATUS_OUTPUT_FULL != 0 {
            got.push(read(&mut dev, 0));
        }
        assert_eq!(got, CTRL_ALT_DEL_SET1);
        // One interrupt per byte after the first, none once empty.
        assert_eq!(irq.read().unwrap(), 3);
        // Translation off: set 2 codes; interrupts off: none raised.
        dev.write(4, &[CMD_WRITE_CTR]);
        dev.write(0, &[CTR_SYSTEM_FLAG]);
        assert!(dev.press_ctrl_alt_del());
        assert!(
            irq.read().is_err(),
            "no interrupt while the guest disabled it"
        );
        let got: Vec<u8> = (0..4).map(|_| read(&mut dev, 0)).collect();
        assert_eq!(got, CTRL_ALT_DEL_SET2);
        // A full buffer takes no half key sequence.
        for _ in 0..OUTPUT_CAPACITY {
            dev.write(4, &[CMD_SELF_TEST]);
        }
        assert!(!dev.press_ctrl_alt_del());
        assert!(!fired.load(Ordering::SeqCst));
    }

    #[test]
    fn unread_answers_are_bounded_and_counted() {
        let (mut dev, _) = device();
        for _ in 0..1000 {
            dev.write(4, &[CMD_SELF_TEST]);
            dev.write(0, &[KBD_CMD_RESET]);
        }
        assert_eq!(dev.output.len(), OUTPUT_CAPACITY);
        assert_eq!(dev.dropped(), 3000 - OUTPUT_CAPACITY as u64);
        // The oldest answers are kept, in order.
        assert_eq!(read(&mut dev, 0), SELF_TEST_OK);
        assert_eq!(read(&mut dev, 0), KBD_ACK);
        assert_eq!(read(&mut dev, 0), KBD_RESET_OK);
    }
}
