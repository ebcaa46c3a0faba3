//! Emulated devices and the bus they sit on, and the rate limiter for the log lines a guest can
//! trigger. Devices know nothing of the CLI, the spec or the VM's run loop: they are wired up by
//! the builder.

pub mod bus;
pub mod legacy;
pub mod log_limit;
pub mod virtio;
