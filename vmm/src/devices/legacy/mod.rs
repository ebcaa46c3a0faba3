//! Legacy port-I/O devices: COM1, the i8042 reset path and the guest-report ports.

pub mod guest_report;
pub mod i8042;
pub mod panic_watch;
pub mod serial;
