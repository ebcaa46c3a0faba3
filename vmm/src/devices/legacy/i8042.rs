//! The i8042 keyboard controller, present so that a guest reboot (CPU reset through port 0x64,
//! `reboot=k`) reaches the VMM, which then ends the VM.

use vm_superio::{I8042Device, Trigger};

use crate::devices::bus::BusDevice;

/// The controller occupies ports 0x60..=0x64.
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

pub struct I8042<T: Trigger> {
    inner: I8042Device<T>,
}

impl<T: Trigger> I8042<T> {
    /// `reset` fires when the guest asks for a CPU reset.
    pub fn new(reset: T) -> Self {
        Self {
            inner: I8042Device::new(reset),
        }
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.inner.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.inner.write(offset, *value) {
                tracing::warn!("i8042 reset could not be signalled: {e:?}");
            }
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

    #[test]
    fn cpu_reset_command_fires_the_trigger() {
        let fired = Arc::new(AtomicBool::new(false));
        let mut dev = I8042::new(Flag(fired.clone()));
        dev.write(4, &[0xfe]);
        assert!(fired.load(Ordering::SeqCst));
    }
}
