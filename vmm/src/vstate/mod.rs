//! KVM state wrappers: the VM, its guest memory, and its vCPUs.

pub mod memory;
pub mod run_state;
pub mod vcpu;
pub mod vm;
