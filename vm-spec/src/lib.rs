//! The types shared by the vmm and the programs that drive it (the node agent, tests): the
//! micro-VM spec with its validation, and the control API's messages. This crate links no KVM
//! and no FUSE code, so the agent can build specs and talk to a vmm without either.

pub mod fs;
pub mod spec;

pub use fs::{FsSpec, FsSpecError, ShareSource};
pub use spec::{BootProtocol, GuestMount, SerialOutput, SpecError, VmSpec};
pub mod rate_limiter;
pub use rate_limiter::{RateLimiterError, RateLimiterSpec, TokenBucketSpec};
pub mod drive;
pub use drive::{DriveSpec, DriveSpecError, RngSpec};
pub mod api;
pub mod vsock;
pub use vsock::{VsockSpec, VsockSpecError};
pub mod cpu;
pub use cpu::{CpuSpec, CpuSpecError, CpuTemplate};
pub mod net;
pub use net::{MacAddr, NetRateLimiterSpec, NetSpec, NetSpecError};
