//! virtio-vsock: stream sockets between the guest and host programs, on Firecracker's host
//! convention. The vmm listens on a host unix socket (`uds_path`); a host program connects
//! and writes `CONNECT <port>\n` to reach the guest's port, and is answered `OK <host port>\n`.
//! The guest's connections to the host (cid 2) port P reach the unix socket `<uds_path>_P`.
//! `packet` owns the header and its checks, `connection` one stream's state and credit,
//! `worker` the thread and its epoll loop over the queues and sockets, `device` the virtio
//! device (config space, activation, reset, the listening socket's file).

mod connection;
mod device;
mod packet;
#[cfg(test)]
mod tests;
mod worker;

pub use device::{SocketFile, VsockDevice, VsockError};
pub use worker::{MAX_CONNECTIONS, MAX_HANDSHAKES};
