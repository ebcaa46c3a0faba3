//! The guest-report ports through which a guest says it has booted (port 0x600, any write)
//! and reports its exit status (port 0x601, one byte), which ends the VM.

use crate::devices::bus::BusDevice;

pub const GUEST_REPORT_BASE: u64 = 0x600;
pub const GUEST_REPORT_LEN: u64 = 2;
const BOOTED_OFFSET: u64 = 0;
const EXIT_STATUS_OFFSET: u64 = 1;

/// What the VMM does with the guest's reports.
pub trait GuestReportHandler: Send {
    fn booted(&self);
    fn exited(&self, status: u8);
}

pub struct GuestReport<H: GuestReportHandler> {
    handler: H,
}

impl<H: GuestReportHandler> GuestReport<H> {
    pub fn new(handler: H) -> Self {
        Self { handler }
    }
}

impl<H: GuestReportHandler> BusDevice for GuestReport<H> {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            BOOTED_OFFSET => self.handler.booted(),
            EXIT_STATUS_OFFSET => self.handler.exited(data.first().copied().unwrap_or(0)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<String>>>);
    impl GuestReportHandler for Log {
        fn booted(&self) {
            self.0.lock().unwrap().push("booted".into());
        }
        fn exited(&self, status: u8) {
            self.0.lock().unwrap().push(format!("exit {status}"));
        }
    }

    #[test]
    fn booted_then_exit_status() {
        let log = Log::default();
        let mut dev = GuestReport::new(log.clone());
        dev.write(0, &[1]);
        dev.write(1, &[42]);
        assert_eq!(*log.0.lock().unwrap(), vec!["booted", "exit 42"]);
    }
}
