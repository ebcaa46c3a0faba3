//! Legacy port-I/O devices: COM1, the i8042 reset path, the CMOS real-time clock and the
//! guest-report ports.

pub mod cmos;
pub mod guest_report;
pub mod i8042;
pub mod panic_watch;
pub mod serial;
