//! A purpose-built micro-VM monitor on the rust-vmm crates.
//!
//! The path a VM takes: [`config::VmSpec`] (JSON or CLI flags) -> [`builder::build`] (KVM VM,
//! guest memory, kernel, devices, vCPUs) -> [`builder::RunningVm::wait`] -> [`exit::VmExit`].

pub mod api;
pub mod arch;
pub mod boot;
pub mod builder;
pub mod caps;
pub mod config;
pub mod control;
pub mod device_manager;
pub mod devices;
pub mod exit;
pub mod fs_backends;
#[doc(hidden)]
pub mod fuzzing;
pub mod rate_limiter;
pub mod seccomp;
pub mod stdin;
pub mod test_fault;
pub mod vstate;
