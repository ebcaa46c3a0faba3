//! VM configuration apart from the code that acts on it: the per-VM spec (its types live in
//! the `vm-spec` crate, shared with the agent) and the node's configuration (image cache,
//! store allowlist, fetcher), which only the vmm reads.

pub mod node;

pub use node::{ImageSettings, NodeConfig, NodeConfigError};
pub use vm_spec::{fs, spec};
pub use vm_spec::{BootProtocol, FsSpec, SerialOutput, SpecError, VmSpec};
