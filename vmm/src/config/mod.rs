//! User-facing VM configuration (the spec) and its validation, apart from the code that acts
//! on it.

pub mod fs;
pub mod node;
pub mod spec;

pub use fs::FsSpec;
pub use node::{ImageSettings, NodeConfig, NodeConfigError};

pub use spec::{BootProtocol, SerialOutput, SpecError, VmSpec};
