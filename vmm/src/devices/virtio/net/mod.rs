//! virtio-net over a host tap device: the guest's Ethernet interface. The tap (made by the
//! caller, passed by name or as an inherited descriptor) is opened in IFF_VNET_HDR mode
//! before the vmm confines itself; checksum and segmentation offloads are negotiated with the
//! guest and set on the tap accordingly; received frames may span several buffers (mergeable
//! receive buffers); each direction has a token-bucket rate limiter. One worker thread per
//! interface (its own epoll loop and seccomp filter: I/O on its tap only).
//! `tap` owns the `unsafe` tap calls, `worker` the queues and the event loop, `device` the
//! virtio device (features, config space, activation, reset).

mod device;
mod tap;
#[cfg(test)]
mod tests;
mod worker;

pub use device::{NetDevice, NetError, VNET_HDR_LEN};
pub use tap::{Backend, Tap, TapError};
pub use worker::NetMetrics;
