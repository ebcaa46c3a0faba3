//! Registration of twins (users and nodes, by public key: ed25519 or sr25519, 32 bytes as a chain
//! account), farms and nodes, and nodes' uptime
//! reports, behind one trait so the embedded registrar, a registrar served by another node,
//! and TF Chain (its own issue) are interchangeable.
//!
//! Ids are u32 as on TF Chain; every write takes the key of the twin making it (the chain
//! backend signs its extrinsic with it; the HTTP client signs its request with it); an uptime
//! report carries the node's uptime and a timestamp.

pub mod local;
pub mod remote;
pub mod server;
pub mod tfchain;

pub use tfchain::{ContractState, NodeContract};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::capacity::Resources;
use crate::config::Location;
use crate::identity::{KeyPair, PublicKey};

pub type TwinId = u32;
pub type FarmId = u32;
pub type NodeId = u32;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Twin {
    pub id: TwinId,
    /// 64 hex digits: the twin's account (an ed25519 or sr25519 public key; its signatures
    /// name their scheme).
    pub public_key: String,
}

impl Twin {
    pub fn key(&self) -> Option<PublicKey> {
        crate::identity::parse_public_key(&self.public_key).ok()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Farm {
    pub id: FarmId,
    pub name: String,
    pub owner_twin: TwinId,
}

/// What a node tells the registrar about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    pub farm_id: FarmId,
    /// Total capacity offered (after the node's reserve).
    pub capacity: Resources,
    pub location: Location,
    pub interfaces: Vec<Interface>,
    pub serial_number: String,
    pub virtualized: bool,
    /// Booted with UEFI Secure Boot on.
    #[serde(default)]
    pub secure_boot: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// Its addresses (IPv4, and IPv6 but link-local), without prefix length.
    #[serde(default)]
    pub ips: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Node {
    pub id: NodeId,
    pub twin_id: TwinId,
    pub info: NodeInfo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UptimeReport {
    /// The host's uptime, seconds.
    pub uptime: u64,
    /// Unix seconds when the uptime was read.
    pub timestamp: i64,
}

/// What a node contract's deployment uses on this node (`reportContractResources`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ContractUsage {
    pub contract_id: u64,
    pub used: Resources,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistrarError {
    #[error("registrar unreachable: {0}")]
    Unreachable(String),
    #[error("registrar refused: {0}")]
    Refused(String),
    #[error("unknown farm {0}: no such farm on the registrar (create it, or set --farm-id to the farm of this node)")]
    UnknownFarm(FarmId),
    #[error("registrar answered garbage: {0}")]
    Garbage(String),
    #[error("registrar database: {0}")]
    Store(String),
}

impl RegistrarError {
    /// Worth retrying later (the registrar was down), as opposed to a refusal.
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistrarError::Unreachable(_))
    }
}

#[async_trait]
pub trait Registrar: Send + Sync {
    async fn twin(&self, id: TwinId) -> Result<Option<Twin>, RegistrarError>;
    async fn twin_by_key(&self, key: &PublicKey) -> Result<Option<Twin>, RegistrarError>;
    /// Registers `key` as a twin (returns the existing twin when it is one already).
    async fn create_twin(&self, key: &KeyPair) -> Result<Twin, RegistrarError>;
    async fn farm(&self, id: FarmId) -> Result<Option<Farm>, RegistrarError>;
    async fn create_farm(
        &self,
        owner: &KeyPair,
        owner_twin: TwinId,
        name: &str,
    ) -> Result<Farm, RegistrarError>;
    async fn node_by_twin(&self, twin: TwinId) -> Result<Option<Node>, RegistrarError>;
    /// Creates the node of `twin`, or updates it when it exists.
    async fn register_node(
        &self,
        key: &KeyPair,
        twin: TwinId,
        info: &NodeInfo,
    ) -> Result<Node, RegistrarError>;
    async fn report_uptime(
        &self,
        key: &KeyPair,
        twin: TwinId,
        node: NodeId,
        report: &UptimeReport,
    ) -> Result<(), RegistrarError>;

    /// What `info` becomes once stored (a registrar may fill defaults or leave out what it
    /// refuses), so a node compares like with like before updating itself.
    fn as_stored(&self, info: &NodeInfo) -> NodeInfo {
        info.clone()
    }

    /// Whether deployments must name a node contract this registrar holds (TF Chain).
    fn requires_contracts(&self) -> bool {
        false
    }

    /// Tells the registrar what each node contract's deployment uses on this node (signed by
    /// the node's key); returns the contracts it took (one it no longer holds is skipped).
    /// Registrars without contracts take nothing.
    async fn report_contract_resources(
        &self,
        _key: &KeyPair,
        _usage: &[ContractUsage],
    ) -> Result<Vec<u64>, RegistrarError> {
        Ok(Vec::new())
    }

    /// A node contract by id (`None`: no such contract, or it was removed).
    async fn contract(&self, id: u64) -> Result<Option<NodeContract>, RegistrarError> {
        Err(RegistrarError::Refused(format!(
            "this registrar keeps no contracts (asked for contract {id})"
        )))
    }
}
