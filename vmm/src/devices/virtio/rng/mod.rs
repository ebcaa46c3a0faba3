//! virtio-rng (entropy device): the guest's hwrng, filled from the host's getrandom(2), at
//! most [`MAX_REQUEST_BYTES`] per request and within the device's rate limits; one queue
//! served by a worker thread of its own under a seccomp filter.

mod device;
#[cfg(test)]
mod tests;
mod worker;

pub use device::{RngDevice, RngError};
pub use worker::MAX_REQUEST_BYTES;
