//! The agent's configuration (`--config FILE`, JSON), kept apart from the code that acts on it.
//! Command-line flags override its fields.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::capacity::{CapacityOverride, Resources};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Where the node key, the database, workloads' layers, volumes and logs live.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The API's unix socket (default `<state_dir>/agent.sock`).
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// The API on TCP (every request signed by a twin).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Serve the embedded registrar's reads and twin creation on the TCP API too (under
    /// `/registrar`), so users reach a standalone node from outside.
    #[serde(default)]
    pub tcp_registrar: bool,
    /// `local` (the embedded registrar, in the agent's database), `tfchain` (TF Chain, at
    /// the endpoints of `chain`) or the URL of a registrar served by another node
    /// (`http://host:port`).
    #[serde(default = "default_registrar")]
    pub registrar: String,
    /// With `registrar: "tfchain"`: the chain's WebSocket endpoints (`ws://` or `wss://`),
    /// tried in turn (failover).
    #[serde(default)]
    pub chain: Vec<String>,
    /// With a registrar that holds contracts (TF Chain): seconds between reads of the
    /// contracts of the node's deployments (a cancelled contract removes its deployment).
    #[serde(default = "default_contract_poll")]
    pub contract_poll_secs: u64,
    /// The farm this node belongs to (created on the embedded registrar when missing).
    #[serde(default = "default_farm")]
    pub farm_id: u32,
    /// Kept back for the node itself.
    #[serde(default = "default_reserve")]
    pub reserve: Resources,
    /// What the node offers, resource by resource, in place of the detected capacity minus
    /// the reserve (e.g. `{"sru": "200G"}` where TF Chain refuses the detected SSD as below
    /// its minimum for a node).
    #[serde(default, skip_serializing_if = "CapacityOverride::is_empty")]
    pub capacity: CapacityOverride,
    /// With a registrar that holds contracts (TF Chain): seconds between reports of what
    /// every contract uses (changes are reported at once).
    #[serde(default = "default_resources_report")]
    pub resources_report_secs: u64,
    /// vCPUs deployments may have per CPU thread (1: no over-commit of CPU; memory and disk
    /// are never over-committed).
    #[serde(default = "default_cpu_ratio")]
    pub cpu_allocation_ratio: u32,
    #[serde(default)]
    pub location: Location,
    /// Seconds between uptime reports.
    #[serde(default = "default_uptime_interval")]
    pub uptime_interval_secs: u64,
    #[serde(default)]
    pub vmm: VmmConfig,
    /// Host networking for workloads (off by default: VMs then have no interfaces).
    #[serde(default)]
    pub network: crate::network::NetworkConfig,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Location {
    #[serde(default)]
    pub country: String,
    #[serde(default)]
    pub city: String,
    /// Decimal degrees as text (the chain stores them as text too).
    #[serde(default)]
    pub latitude: String,
    #[serde(default)]
    pub longitude: String,
}

/// What the agent needs to start a micro-VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmConfig {
    /// The vmm binary (default: `vmm` beside the agent's binary).
    #[serde(default)]
    pub bin: Option<PathBuf>,
    /// Guest kernel (vmlinux or bzImage).
    #[serde(default = "default_kernel")]
    pub kernel: PathBuf,
    /// Guest initramfs holding the guest init.
    #[serde(default = "default_initrd")]
    pub initrd: PathBuf,
    /// The vmm's node configuration (store allowlist, chunk cache), passed to every vmm.
    #[serde(default)]
    pub node_config: Option<PathBuf>,
    /// Extra kernel command line for every guest.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Console log bytes kept per VM (plus one rotated file).
    #[serde(default = "default_console_bytes")]
    pub console_max_bytes: u64,
}

impl Default for VmmConfig {
    fn default() -> Self {
        Self {
            bin: None,
            kernel: default_kernel(),
            initrd: default_initrd(),
            node_config: None,
            cmdline: default_cmdline(),
            console_max_bytes: default_console_bytes(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/gridnode")
}
fn default_registrar() -> String {
    "local".into()
}
fn default_contract_poll() -> u64 {
    60
}
fn default_resources_report() -> u64 {
    10 * 60
}
fn default_farm() -> u32 {
    1
}
fn default_reserve() -> Resources {
    Resources {
        cru: 0,
        mru: 256 << 20,
        sru: 1 << 30,
        hru: 0,
    }
}
fn default_cpu_ratio() -> u32 {
    1
}
fn default_uptime_interval() -> u64 {
    40 * 60
}
fn default_kernel() -> PathBuf {
    PathBuf::from("/usr/lib/gridnode/vmlinux")
}
fn default_initrd() -> PathBuf {
    PathBuf::from("/usr/lib/gridnode/initrd.cpio")
}
fn default_cmdline() -> String {
    "quiet".into()
}
fn default_console_bytes() -> u64 {
    1 << 20
}

impl Default for AgentConfig {
    fn default() -> Self {
        // Every field has a serde default, so an empty object is the default configuration.
        serde_json::from_str("{}").unwrap_or_else(|_| unreachable!("all fields have defaults"))
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read(path).with_context(|| format!("reading config {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("config {}", path.display()))
    }

    /// What the node offers: `detected` minus the reserve, with the operator's overrides.
    pub fn offered(&self, detected: Resources) -> Resources {
        self.capacity.apply(detected.saturating_sub(self.reserve))
    }

    pub fn api_socket(&self) -> PathBuf {
        self.api_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("agent.sock"))
    }

    pub fn vmm_bin(&self) -> PathBuf {
        if let Some(bin) = &self.vmm.bin {
            return bin.clone();
        }
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("vmm")))
            .unwrap_or_else(|| PathBuf::from("/usr/bin/vmm"))
    }
}
