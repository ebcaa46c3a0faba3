//! Deployments: what a twin (the owner) asks a node to run, signed with the owner's key.
//!
//! A deployment is `{twin_id, deployment_id, version, metadata, workloads, ...}`; each workload
//! has a `type`: `vm` (a micro-VM, with its network interfaces and port forwards) or `network`
//! (a private network of the owner spanning nodes over WireGuard, which the deployment's VMs
//! join by name). The
//! signature covers the [`crate::canonical`] hash of the deployment with `signatures` set to
//! `[]`. This module owns the format, its bounds, and the signature rules; it does not act.
//!
//! Each signature names its scheme (`signature_type`: `ed25519`, the default, or `sr25519`, as
//! in Zero-OS) and is checked against the signer twin's key (its chain account) with it.
//!
//! Signature rules: the owner twin's signature is always required; a `signature_requirement`
//! (Zero-OS style: twins with weights and a quorum) adds co-signers; on an update the previous
//! version's requirement must also be met, so co-signers cannot be dropped by one party.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::canonical;
use crate::identity::{self, KeyPair, PublicKey, SignatureType};
use crate::network::ipam::Ipv4Net;
use crate::network::wireguard;

/// Domain string signed before the canonical hash.
pub const SIGNING_DOMAIN: &[u8] = b"gridnode/deployment/v1\n";

pub const MAX_WORKLOADS: usize = 64;
pub const MAX_METADATA_BYTES: usize = 4096;
pub const MAX_NAME_BYTES: usize = 48;
pub const MAX_ARGS: usize = 256;
pub const MAX_ARG_BYTES: usize = 4096;
pub const MAX_ENV: usize = 128;
pub const MAX_VOLUMES: usize = 16;
pub const MAX_MOUNTS: usize = 16;
pub const MAX_URL_BYTES: usize = 2048;
pub const MAX_SIGNERS: usize = 16;
pub const MAX_VCPUS: u32 = 32;
pub const MIN_MEMORY_MIB: u64 = 64;
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Largest volume or root-layer size (16 TiB in MiB).
pub const MAX_DISK_MIB: u64 = 16 << 20;
/// The network name a VM interface gives to join the node's NAT bridge.
pub const PUBLIC_NAT: &str = "public-nat";
pub const MAX_INTERFACES: usize = 4;
pub const MAX_PORT_FORWARDS: usize = 32;
pub const MAX_NETWORK_NODES: usize = 64;
/// Shortest and longest prefix of a private network's range, and longest of a node's subnet
/// (a /29 leaves the gateway and five VMs).
pub const MIN_RANGE_PREFIX: u8 = 8;
pub const MAX_SUBNET_PREFIX: u8 = 29;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// The owner.
    pub twin_id: u32,
    /// Chosen by the owner; unique per owner.
    pub deployment_id: u64,
    /// Strictly higher on every update (and after a delete, for a new create with the same id).
    pub version: u32,
    #[serde(default)]
    pub metadata: String,
    pub workloads: Vec<Workload>,
    /// Co-signers (optional): the owner's signature is always required besides.
    #[serde(default)]
    pub signature_requirement: Option<SignatureRequirement>,
    /// What happens when a workload cannot be started: roll the deployment back to what it
    /// was (the default), or keep what started and mark the rest failed.
    #[serde(default)]
    pub on_failure: FailurePolicy,
    /// The node contract on TF Chain that pays for this deployment (required by a node whose
    /// registrar is the chain). The contract holds [`Deployment::contract_hash`]; the owner's
    /// signature covers the contract id too. Absent, it is not part of the encoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract_id: Option<u64>,
    #[serde(default)]
    pub signatures: Vec<DeploymentSignature>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    #[default]
    Rollback,
    Keep,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignatureRequirement {
    pub requests: Vec<SignatureRequest>,
    pub weight_required: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignatureRequest {
    pub twin_id: u32,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSignature {
    pub twin_id: u32,
    /// 128 hex digits.
    pub signature: String,
    /// The scheme of the signature (the signer's key): `ed25519` (the default, left out of
    /// the JSON) or `sr25519`.
    #[serde(default, skip_serializing_if = "SignatureType::is_default")]
    pub signature_type: SignatureType,
}

/// One workload; `type` selects the kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Workload {
    Vm(VmWorkload),
    Network(NetworkWorkload),
}

impl Workload {
    pub fn name(&self) -> &str {
        match self {
            Workload::Vm(vm) => &vm.name,
            Workload::Network(n) => &n.name,
        }
    }
}

/// A private network of the owner: one IPv4 range, one subnet of it per node, the nodes
/// joined by WireGuard. Every node of the network gets the same document (with its own
/// private key) and sets up its part: a namespace with a bridge for its subnet and a
/// WireGuard link whose peers are the other nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkWorkload {
    /// The name VM interfaces use to join (`network: NAME`); unique per owner on a node.
    pub name: String,
    /// The whole network's IPv4 range, e.g. `10.20.0.0/16`.
    #[schema(value_type = String)]
    pub ip_range: Ipv4Net,
    /// Every node of the network (this one exactly once), each with its subnet of the range.
    pub nodes: Vec<NetworkNode>,
    /// This node's WireGuard private key (base64 of 32 bytes), chosen by the deployer as in
    /// Zero-OS; its public key must be this node's `wireguard_public_key`.
    pub wireguard_private_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkNode {
    pub node_id: u32,
    /// This node's part of the range, e.g. `10.20.1.0/24` (gateway: its host 1).
    #[schema(value_type = String)]
    pub subnet: Ipv4Net,
    /// Base64 of 32 bytes.
    pub wireguard_public_key: String,
    /// Where the node's WireGuard listens (`ip:port`). Required for this node (the port is
    /// the one it listens on); a peer without one is reached only after it reached us.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub endpoint: Option<SocketAddr>,
}

/// A network interface of a VM, in order (the guest sees eth0, eth1, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmInterface {
    /// `public-nat` (the node's NAT bridge, with outbound NAT and port forwards) or the name
    /// of a network workload of the same deployment.
    pub network: String,
    /// The address in this node's subnet of a private network (default: the lowest free one).
    /// Not allowed on `public-nat`: the node allocates those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub ip: Option<Ipv4Addr>,
}

/// A port of the node's uplink forwarded to the VM's `public-nat` address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    pub protocol: Protocol,
    pub host_port: u16,
    pub vm_port: u16,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmWorkload {
    pub name: String,
    /// The root image: an flist file path on the node or an `http(s)://` URL of one.
    pub image: String,
    /// BLAKE3 (64 hex digits) the image file must have.
    #[serde(default)]
    pub image_blake3: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Size limit of the root image's writable layer (kept on the node), MiB.
    #[serde(default = "default_rootfs_mib")]
    pub rootfs_mib: u64,
    #[serde(default)]
    pub volumes: Vec<Volume>,
    /// Extra read-only flists mounted in the guest.
    #[serde(default)]
    pub mounts: Vec<FlistMount>,
    /// argv[0] of the entrypoint (an absolute path in the image).
    pub entrypoint: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// On stop, seconds between SIGTERM to the entrypoint and SIGKILL (default 10).
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u32,
    /// Network interfaces (none by default). Left out of the encoding when empty, so the
    /// hashes of deployments written before networking existed do not change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<VmInterface>,
    /// Ports of the node forwarded to this VM (needs a `public-nat` interface).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_forwards: Vec<PortForward>,
}

/// Longest shutdown grace a workload may ask for.
pub const MAX_GRACE_SECS: u32 = 600;

fn default_grace() -> u32 {
    10
}

fn default_rootfs_mib() -> u64 {
    1024
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub name: String,
    pub size_mib: u64,
    /// Absolute path in the guest.
    pub mount: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlistMount {
    pub image: String,
    #[serde(default)]
    pub image_blake3: Option<String>,
    pub mount: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    #[default]
    OnFailure,
    Never,
}

/// Why a deployment is malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("{what}: {detail}")]
    Field { what: String, detail: String },
    #[error("deployment has no workloads")]
    NoWorkloads,
    #[error("deployment has {0} workloads (at most {MAX_WORKLOADS})")]
    TooManyWorkloads(usize),
    #[error("two workloads are named {0:?}")]
    DuplicateWorkload(String),
}

fn field(what: impl Into<String>, detail: impl Into<String>) -> FormatError {
    FormatError::Field {
        what: what.into(),
        detail: detail.into(),
    }
}

/// Names of workloads and volumes: 1-48 of `a-z 0-9 -`, not starting with `-`.
pub fn check_name(what: &str, name: &str) -> Result<(), FormatError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(field(
            what,
            format!("{name:?} is not 1-{MAX_NAME_BYTES} of a-z, 0-9, '-' (not starting with '-')"),
        ))
    }
}

fn check_image(what: &str, image: &str, blake3: &Option<String>) -> Result<(), FormatError> {
    if image.is_empty() || image.len() > MAX_URL_BYTES {
        return Err(field(
            what,
            format!("image must be 1-{MAX_URL_BYTES} bytes"),
        ));
    }
    let is_url = image.starts_with("http://") || image.starts_with("https://");
    if !is_url && !image.starts_with('/') {
        return Err(field(
            what,
            format!("image {image:?} is neither an absolute path nor an http(s) URL"),
        ));
    }
    if image.contains(['\n', '\0']) {
        return Err(field(what, "image contains a newline or NUL"));
    }
    if let Some(h) = blake3 {
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(field(what, "image_blake3 is not 64 hex digits"));
        }
    }
    Ok(())
}

fn check_mount_point(
    what: &str,
    mount: &str,
    seen: &mut BTreeSet<String>,
) -> Result<(), FormatError> {
    let ok = mount.starts_with('/')
        && mount.len() > 1
        && mount.len() <= 256
        && !mount.split('/').any(|c| c == ".." || c == ".")
        && !mount.contains("//")
        && !mount.ends_with('/')
        && mount
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b',' && b != b':');
    if !ok {
        return Err(field(
            what,
            format!("mount point {mount:?} must be a normalized absolute path (no '..', ',', ':', spaces)"),
        ));
    }
    if !seen.insert(mount.to_string()) {
        return Err(field(what, format!("mount point {mount} is used twice")));
    }
    Ok(())
}

impl VmWorkload {
    pub fn validate(&self) -> Result<(), FormatError> {
        let w = format!("workload {}", self.name);
        check_name("workload name", &self.name)?;
        check_image(&w, &self.image, &self.image_blake3)?;
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(field(
                &w,
                format!("vcpus {} is not 1-{MAX_VCPUS}", self.vcpus),
            ));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(field(
                &w,
                format!(
                    "memory_mib {} is not {MIN_MEMORY_MIB}-{MAX_MEMORY_MIB}",
                    self.memory_mib
                ),
            ));
        }
        if self.rootfs_mib == 0 || self.rootfs_mib > MAX_DISK_MIB {
            return Err(field(
                &w,
                format!("rootfs_mib {} is not 1-{MAX_DISK_MIB}", self.rootfs_mib),
            ));
        }
        if self.shutdown_grace_secs > MAX_GRACE_SECS {
            return Err(field(
                &w,
                format!("shutdown_grace_secs is more than {MAX_GRACE_SECS}"),
            ));
        }
        if !self.entrypoint.starts_with('/') || self.entrypoint.len() > MAX_ARG_BYTES {
            return Err(field(
                &w,
                "entrypoint must be an absolute path in the image",
            ));
        }
        if self.args.len() > MAX_ARGS || self.args.iter().any(|a| a.len() > MAX_ARG_BYTES) {
            return Err(field(
                &w,
                format!("at most {MAX_ARGS} args of {MAX_ARG_BYTES} bytes"),
            ));
        }
        if self.env.len() > MAX_ENV {
            return Err(field(
                &w,
                format!("at most {MAX_ENV} environment variables"),
            ));
        }
        for (k, v) in &self.env {
            let ok = !k.is_empty()
                && k.len() <= 128
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !k.as_bytes()[0].is_ascii_digit();
            if !ok || v.len() > MAX_ARG_BYTES {
                return Err(field(
                    &w,
                    format!("environment variable {k:?} is not a valid name or too long"),
                ));
            }
        }
        if self.volumes.len() > MAX_VOLUMES || self.mounts.len() > MAX_MOUNTS {
            return Err(field(
                &w,
                format!("at most {MAX_VOLUMES} volumes and {MAX_MOUNTS} mounts"),
            ));
        }
        let mut points = BTreeSet::new();
        let mut names = BTreeSet::new();
        for v in &self.volumes {
            check_name(&format!("{w}: volume name"), &v.name)?;
            if !names.insert(&v.name) {
                return Err(field(&w, format!("two volumes are named {}", v.name)));
            }
            if v.size_mib == 0 || v.size_mib > MAX_DISK_MIB {
                return Err(field(
                    &w,
                    format!("volume {} size_mib is not 1-{MAX_DISK_MIB}", v.name),
                ));
            }
            check_mount_point(&w, &v.mount, &mut points)?;
        }
        for m in &self.mounts {
            check_image(&w, &m.image, &m.image_blake3)?;
            check_mount_point(&w, &m.mount, &mut points)?;
        }
        self.validate_network(&w)
    }

    /// Interfaces and port forwards on their own; the networks they name are checked by
    /// [`Deployment::validate`].
    fn validate_network(&self, w: &str) -> Result<(), FormatError> {
        if self.interfaces.len() > MAX_INTERFACES {
            return Err(field(w, format!("at most {MAX_INTERFACES} interfaces")));
        }
        let mut joined = BTreeSet::new();
        for (i, iface) in self.interfaces.iter().enumerate() {
            if iface.network != PUBLIC_NAT {
                check_name(&format!("{w}: interface {i} network"), &iface.network)?;
            } else if iface.ip.is_some() {
                return Err(field(
                    w,
                    format!("interface {i}: a {PUBLIC_NAT} address is chosen by the node, not the deployment"),
                ));
            }
            if !joined.insert(iface.network.as_str()) {
                return Err(field(
                    w,
                    format!("two interfaces join network {}", iface.network),
                ));
            }
        }
        if self.port_forwards.len() > MAX_PORT_FORWARDS {
            return Err(field(
                w,
                format!("at most {MAX_PORT_FORWARDS} port forwards"),
            ));
        }
        if !self.port_forwards.is_empty() && !joined.contains(PUBLIC_NAT) {
            return Err(field(
                w,
                format!("port forwards need an interface on {PUBLIC_NAT}"),
            ));
        }
        let mut ports = BTreeSet::new();
        for f in &self.port_forwards {
            if f.host_port == 0 || f.vm_port == 0 {
                return Err(field(w, "port forward ports must be 1-65535"));
            }
            if !ports.insert((f.protocol, f.host_port)) {
                return Err(field(
                    w,
                    format!(
                        "host port {}/{} is forwarded twice",
                        f.host_port, f.protocol
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Disk the workload takes on the node (root layer limit + volumes), MiB.
    pub fn disk_mib(&self) -> u64 {
        self.volumes
            .iter()
            .fold(self.rootfs_mib, |acc, v| acc.saturating_add(v.size_mib))
    }
}

impl NetworkWorkload {
    pub fn validate(&self) -> Result<(), FormatError> {
        let w = format!("network {}", self.name);
        check_name("network name", &self.name)?;
        if self.name == PUBLIC_NAT {
            return Err(field(
                &w,
                format!("{PUBLIC_NAT} is reserved for the node's NAT"),
            ));
        }
        let range = self.ip_range;
        if !(MIN_RANGE_PREFIX..=MAX_SUBNET_PREFIX).contains(&range.prefix()) {
            return Err(field(
                &w,
                format!("ip_range {range} must have a prefix length of {MIN_RANGE_PREFIX}-{MAX_SUBNET_PREFIX}"),
            ));
        }
        if self.nodes.is_empty() || self.nodes.len() > MAX_NETWORK_NODES {
            return Err(field(&w, format!("needs 1-{MAX_NETWORK_NODES} nodes")));
        }
        wireguard::parse_key(&self.wireguard_private_key)
            .map_err(|e| field(&w, format!("wireguard_private_key: {e}")))?;
        let mut ids = BTreeSet::new();
        let mut keys = BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if !ids.insert(n.node_id) {
                return Err(field(&w, format!("node {} is listed twice", n.node_id)));
            }
            let key = wireguard::parse_key(&n.wireguard_public_key)
                .map_err(|e| field(&w, format!("node {}: wireguard_public_key: {e}", n.node_id)))?;
            if !keys.insert(key) {
                return Err(field(
                    &w,
                    format!(
                        "node {}: its WireGuard key is another node's too",
                        n.node_id
                    ),
                ));
            }
            if !range.contains_net(&n.subnet) {
                return Err(field(
                    &w,
                    format!(
                        "node {}: subnet {} is not inside ip_range {range}",
                        n.node_id, n.subnet
                    ),
                ));
            }
            if n.subnet.prefix() > MAX_SUBNET_PREFIX {
                return Err(field(
                    &w,
                    format!(
                        "node {}: subnet {} is smaller than a /{MAX_SUBNET_PREFIX}",
                        n.node_id, n.subnet
                    ),
                ));
            }
            if n.subnet == range {
                return Err(field(
                    &w,
                    format!(
                        "node {}: subnet {} is the whole ip_range (each node needs its own part)",
                        n.node_id, n.subnet
                    ),
                ));
            }
            if let Some(other) = self.nodes[..i]
                .iter()
                .find(|o| o.subnet.overlaps(&n.subnet))
            {
                return Err(field(
                    &w,
                    format!(
                        "node {}: subnet {} overlaps node {}'s subnet {}",
                        n.node_id, n.subnet, other.node_id, other.subnet
                    ),
                ));
            }
            if let Some(ep) = n.endpoint {
                if ep.port() == 0 || ep.ip().is_unspecified() {
                    return Err(field(
                        &w,
                        format!(
                            "node {}: endpoint {ep} needs an address and a port",
                            n.node_id
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// This node's entry.
    pub fn node(&self, node_id: u32) -> Option<&NetworkNode> {
        self.nodes.iter().find(|n| n.node_id == node_id)
    }
}

impl Deployment {
    /// Parses and validates; the error names what is wrong.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let d: Deployment =
            serde_json::from_slice(bytes).map_err(|e| format!("malformed deployment: {e}"))?;
        d.validate()
            .map_err(|e| format!("invalid deployment: {e}"))?;
        Ok(d)
    }

    pub fn validate(&self) -> Result<(), FormatError> {
        if self.workloads.is_empty() {
            return Err(FormatError::NoWorkloads);
        }
        if self.workloads.len() > MAX_WORKLOADS {
            return Err(FormatError::TooManyWorkloads(self.workloads.len()));
        }
        if self.metadata.len() > MAX_METADATA_BYTES {
            return Err(field(
                "metadata",
                format!("longer than {MAX_METADATA_BYTES} bytes"),
            ));
        }
        let mut names = BTreeSet::new();
        for w in &self.workloads {
            match w {
                Workload::Vm(vm) => vm.validate()?,
                Workload::Network(n) => n.validate()?,
            }
            if !names.insert(w.name()) {
                return Err(FormatError::DuplicateWorkload(w.name().to_string()));
            }
        }
        for vm in self.vms() {
            for iface in &vm.interfaces {
                if iface.network == PUBLIC_NAT {
                    continue;
                }
                let Some(net) = self.network(&iface.network) else {
                    return Err(field(
                        format!("workload {}", vm.name),
                        format!(
                            "interface on network {:?}: no network workload of that name in this deployment",
                            iface.network
                        ),
                    ));
                };
                if let Some(ip) = iface.ip {
                    if !net.ip_range.contains(ip) {
                        return Err(field(
                            format!("workload {}", vm.name),
                            format!(
                                "address {ip} is not in network {}'s ip_range {}",
                                net.name, net.ip_range
                            ),
                        ));
                    }
                }
            }
        }
        if self.signatures.len() > MAX_SIGNERS {
            return Err(field("signatures", format!("more than {MAX_SIGNERS}")));
        }
        if let Some(req) = &self.signature_requirement {
            if req.requests.is_empty() || req.requests.len() > MAX_SIGNERS {
                return Err(field(
                    "signature_requirement",
                    format!("needs 1-{MAX_SIGNERS} requests"),
                ));
            }
            if req.weight_required == 0 {
                return Err(field(
                    "signature_requirement",
                    "weight_required must be at least 1",
                ));
            }
            let total: u64 = req.requests.iter().map(|r| u64::from(r.weight)).sum();
            if total < u64::from(req.weight_required) {
                return Err(field(
                    "signature_requirement",
                    "weight_required exceeds the sum of the weights",
                ));
            }
        }
        Ok(())
    }

    /// The canonical hash the signatures cover.
    pub fn signing_hash(&self) -> [u8; 32] {
        let mut unsigned = self.clone();
        unsigned.signatures.clear();
        // A typed deployment has no floats, so its canonical encoding cannot fail.
        canonical::hash(&unsigned).unwrap_or([0; 32])
    }

    /// The hash a node contract holds (`deployment_hash`, 32 bytes): the canonical hash of
    /// the deployment without signatures and without `contract_id` (the contract is created
    /// before its id is known).
    pub fn contract_hash(&self) -> [u8; 32] {
        let mut doc = self.clone();
        doc.signatures.clear();
        doc.contract_id = None;
        canonical::hash(&doc).unwrap_or([0; 32])
    }

    fn signing_message(&self) -> Vec<u8> {
        let mut msg = SIGNING_DOMAIN.to_vec();
        msg.extend_from_slice(&self.signing_hash());
        msg
    }

    /// Adds (or replaces) `twin_id`'s signature.
    pub fn sign(&mut self, twin_id: u32, key: &KeyPair) {
        let sig = hex::encode(key.sign(&self.signing_message()));
        self.signatures.retain(|s| s.twin_id != twin_id);
        self.signatures.push(DeploymentSignature {
            twin_id,
            signature: sig,
            signature_type: key.scheme(),
        });
    }

    /// The twins whose signatures are valid (each with the scheme it names), given a way to
    /// find a twin's key.
    pub fn valid_signers(&self, key_of: &dyn Fn(u32) -> Option<PublicKey>) -> BTreeSet<u32> {
        let msg = self.signing_message();
        self.signatures
            .iter()
            .filter(|s| {
                let Some(key) = key_of(s.twin_id) else {
                    return false;
                };
                let Ok(sig) = hex::decode(&s.signature) else {
                    return false;
                };
                identity::verify(&key, s.signature_type, &msg, &sig)
            })
            .map(|s| s.twin_id)
            .collect()
    }

    /// Checks the signature rules (module doc) for this document, and for the version it
    /// replaces when it is an update.
    pub fn check_signatures(
        &self,
        previous: Option<&Deployment>,
        key_of: &dyn Fn(u32) -> Option<PublicKey>,
    ) -> Result<(), String> {
        if self.signatures.is_empty() {
            return Err("deployment is not signed".into());
        }
        let valid = self.valid_signers(key_of);
        if !valid.contains(&self.twin_id) {
            return Err(format!(
                "no valid signature of the owner twin {} (signatures do not match the deployment or the registered keys)",
                self.twin_id
            ));
        }
        for (which, doc) in [("this", Some(self)), ("the previous", previous)] {
            let Some(req) = doc.and_then(|d| d.signature_requirement.as_ref()) else {
                continue;
            };
            let weight: u64 = req
                .requests
                .iter()
                .filter(|r| valid.contains(&r.twin_id))
                .map(|r| u64::from(r.weight))
                .sum();
            if weight < u64::from(req.weight_required) {
                return Err(format!(
                    "signatures weigh {weight}, {which} version's signature requirement needs {}",
                    req.weight_required
                ));
            }
        }
        Ok(())
    }

    pub fn vm(&self, name: &str) -> Option<&VmWorkload> {
        self.workloads.iter().find_map(|w| match w {
            Workload::Vm(vm) if vm.name == name => Some(vm),
            _ => None,
        })
    }

    pub fn vms(&self) -> impl Iterator<Item = &VmWorkload> {
        self.workloads.iter().filter_map(|w| match w {
            Workload::Vm(vm) => Some(vm),
            _ => None,
        })
    }

    pub fn network(&self, name: &str) -> Option<&NetworkWorkload> {
        self.networks().find(|n| n.name == name)
    }

    pub fn networks(&self) -> impl Iterator<Item = &NetworkWorkload> {
        self.workloads.iter().filter_map(|w| match w {
            Workload::Network(n) => Some(n),
            _ => None,
        })
    }

    /// Whether the deployment needs the node's networking.
    pub fn uses_network(&self) -> bool {
        self.networks().next().is_some() || self.vms().any(|vm| !vm.interfaces.is_empty())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample(twin_id: u32, version: u32) -> Deployment {
        Deployment {
            twin_id,
            deployment_id: 1,
            version,
            metadata: "test".into(),
            workloads: vec![Workload::Vm(VmWorkload {
                name: "web".into(),
                image: "/images/alpine.flist".into(),
                image_blake3: None,
                vcpus: 1,
                memory_mib: 128,
                rootfs_mib: 256,
                volumes: vec![Volume {
                    name: "data".into(),
                    size_mib: 100,
                    mount: "/data".into(),
                }],
                mounts: vec![],
                entrypoint: "/bin/sh".into(),
                args: vec!["-c".into(), "echo hi".into()],
                env: BTreeMap::new(),
                restart: RestartPolicy::Never,
                shutdown_grace_secs: 10,
                interfaces: vec![],
                port_forwards: vec![],
            })],
            signature_requirement: None,
            on_failure: FailurePolicy::Rollback,
            contract_id: None,
            signatures: vec![],
        }
    }

    #[test]
    fn json_field_order_and_whitespace_keep_the_hash() {
        let d = sample(1, 0);
        let compact = serde_json::to_string(&d).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&compact).unwrap();
        // Re-serialize pretty (different whitespace); serde_json's map sorts keys, so also
        // build a reordered text by hand.
        let pretty = serde_json::to_string_pretty(&v).unwrap();
        let reordered = format!(
            "{{\"workloads\": {}, \"version\": 0, \"twin_id\": 1, \"metadata\": \"test\", \"deployment_id\": 1}}",
            serde_json::to_string(&v["workloads"]).unwrap()
        );
        let h = d.signing_hash();
        for text in [compact.as_str(), pretty.as_str(), reordered.as_str()] {
            assert_eq!(
                Deployment::from_json(text.as_bytes())
                    .unwrap()
                    .signing_hash(),
                h,
                "{text}"
            );
        }
        v["workloads"][0]["memory_mib"] = 129.into();
        let changed: Deployment = serde_json::from_value(v).unwrap();
        assert_ne!(changed.signing_hash(), h);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused_with_a_reason() {
        let mut v = serde_json::to_value(sample(1, 0)).unwrap();
        v["surprise"] = 1.into();
        let err = Deployment::from_json(v.to_string().as_bytes()).unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
        let mut d = sample(1, 0);
        let Workload::Vm(vm) = &mut d.workloads[0] else {
            unreachable!()
        };
        vm.volumes[0].mount = "/data/../etc".into();
        assert!(d
            .validate()
            .unwrap_err()
            .to_string()
            .contains("mount point"));
        let mut d = sample(1, 0);
        d.workloads.push(d.workloads[0].clone());
        assert_eq!(
            d.validate(),
            Err(FormatError::DuplicateWorkload("web".into()))
        );
        let mut d = sample(1, 0);
        let Workload::Vm(vm) = &mut d.workloads[0] else {
            unreachable!()
        };
        vm.vcpus = 0;
        assert!(d.validate().unwrap_err().to_string().contains("vcpus"));
    }

    fn with_network() -> Deployment {
        let key = |_| wireguard::encode_key(&wireguard::generate_keypair().1);
        let mut d = sample(1, 0);
        let Workload::Vm(vm) = &mut d.workloads[0] else {
            unreachable!()
        };
        vm.interfaces = vec![
            VmInterface {
                network: PUBLIC_NAT.into(),
                ip: None,
            },
            VmInterface {
                network: "net".into(),
                ip: Some(Ipv4Addr::new(10, 20, 1, 5)),
            },
        ];
        vm.port_forwards = vec![PortForward {
            protocol: Protocol::Tcp,
            host_port: 8080,
            vm_port: 80,
        }];
        d.workloads.push(Workload::Network(NetworkWorkload {
            name: "net".into(),
            ip_range: "10.20.0.0/16".parse().unwrap(),
            nodes: (1..=3)
                .map(|i| NetworkNode {
                    node_id: i,
                    subnet: format!("10.20.{i}.0/24").parse().unwrap(),
                    wireguard_public_key: key(i),
                    endpoint: Some(format!("192.0.2.{i}:51820").parse().unwrap()),
                })
                .collect(),
            wireguard_private_key: key(0),
        }));
        d
    }

    fn net_mut(d: &mut Deployment) -> &mut NetworkWorkload {
        match &mut d.workloads[1] {
            Workload::Network(n) => n,
            _ => unreachable!(),
        }
    }

    fn vm_mut(d: &mut Deployment) -> &mut VmWorkload {
        match &mut d.workloads[0] {
            Workload::Vm(vm) => vm,
            _ => unreachable!(),
        }
    }

    fn refused(d: &Deployment, needle: &str) {
        let err = d.validate().unwrap_err().to_string();
        assert!(err.contains(needle), "{err:?} does not say {needle:?}");
    }

    #[test]
    fn network_workloads_and_interfaces_are_validated_strictly() {
        let d = with_network();
        d.validate().unwrap();
        // The JSON round-trips, with the types' text forms.
        let text = serde_json::to_string(&d).unwrap();
        assert!(text.contains(r#""ip_range":"10.20.0.0/16""#), "{text}");
        assert_eq!(Deployment::from_json(text.as_bytes()).unwrap(), d);
        assert!(
            Deployment::from_json(text.replace("10.20.0.0/16", "10.20.0.1/16").as_bytes())
                .unwrap_err()
                .contains("host bits")
        );

        let mut x = with_network();
        net_mut(&mut x).nodes[1].subnet = "10.21.2.0/24".parse().unwrap();
        refused(&x, "not inside ip_range 10.20.0.0/16");
        let mut x = with_network();
        net_mut(&mut x).nodes[1].subnet = "10.20.0.0/23".parse().unwrap();
        refused(&x, "overlaps node 1's subnet 10.20.1.0/24");
        let mut x = with_network();
        net_mut(&mut x).nodes[2].node_id = 1;
        refused(&x, "node 1 is listed twice");
        let mut x = with_network();
        net_mut(&mut x).nodes[0].wireguard_public_key = "not a key".into();
        refused(&x, "node 1: wireguard_public_key");
        let mut x = with_network();
        let k = net_mut(&mut x).nodes[0].wireguard_public_key.clone();
        net_mut(&mut x).nodes[1].wireguard_public_key = k;
        refused(&x, "another node's too");
        let mut x = with_network();
        net_mut(&mut x).wireguard_private_key = "A".repeat(43);
        refused(&x, "wireguard_private_key");
        let mut x = with_network();
        net_mut(&mut x).ip_range = "10.20.1.0/30".parse().unwrap();
        refused(&x, "prefix length");
        let mut x = with_network();
        net_mut(&mut x).nodes[0].subnet = "10.20.0.0/16".parse().unwrap();
        refused(&x, "is the whole ip_range");
        let mut x = with_network();
        net_mut(&mut x).nodes[0].endpoint = Some("0.0.0.0:51820".parse().unwrap());
        refused(&x, "needs an address and a port");
        let mut x = with_network();
        net_mut(&mut x).name = PUBLIC_NAT.into();
        vm_mut(&mut x).interfaces.pop();
        refused(&x, "reserved");

        let mut x = with_network();
        vm_mut(&mut x).interfaces[1].network = "other".into();
        refused(&x, "no network workload of that name");
        let mut x = with_network();
        vm_mut(&mut x).interfaces[1].ip = Some(Ipv4Addr::new(10, 30, 1, 5));
        refused(&x, "not in network net's ip_range");
        let mut x = with_network();
        vm_mut(&mut x).interfaces[0].ip = Some(Ipv4Addr::new(10, 249, 0, 5));
        refused(&x, "chosen by the node");
        let mut x = with_network();
        vm_mut(&mut x).interfaces[1].network = PUBLIC_NAT.into();
        vm_mut(&mut x).interfaces[1].ip = None;
        refused(&x, "two interfaces join network public-nat");
        let mut x = with_network();
        vm_mut(&mut x).interfaces.remove(0);
        refused(&x, "port forwards need an interface on public-nat");
        let mut x = with_network();
        vm_mut(&mut x).port_forwards[0].vm_port = 0;
        refused(&x, "1-65535");
        let mut x = with_network();
        let f = vm_mut(&mut x).port_forwards[0];
        vm_mut(&mut x).port_forwards.push(f);
        refused(&x, "host port 8080/tcp is forwarded twice");
        // A network name that could not be a workload name is refused, not hashed.
        let mut x = with_network();
        net_mut(&mut x).name = "../../etc".into();
        refused(&x, "network name");
    }

    #[test]
    fn a_vm_without_networking_hashes_as_before() {
        // The fields are left out of the encoding when empty: documents signed before the
        // networking existed keep their hash and signatures.
        let d = sample(1, 0);
        let v = serde_json::to_value(&d).unwrap();
        let vm = v["workloads"][0].as_object().unwrap();
        assert!(!vm.contains_key("interfaces") && !vm.contains_key("port_forwards"));
        assert!(!d.uses_network());
        assert!(with_network().uses_network());
    }

    #[test]
    fn owner_signature_is_required_and_checked() {
        let owner = KeyPair::generate();
        let other = KeyPair::generate();
        let keys = |id: u32| match id {
            1 => Some(owner.public()),
            2 => Some(other.public()),
            _ => None,
        };
        let mut d = sample(1, 0);
        assert_eq!(
            d.check_signatures(None, &keys).unwrap_err(),
            "deployment is not signed"
        );
        d.sign(2, &other);
        assert!(d
            .check_signatures(None, &keys)
            .unwrap_err()
            .contains("owner twin 1"));
        d.sign(1, &owner);
        d.check_signatures(None, &keys).unwrap();
        // Forged: the content changes after signing.
        d.metadata = "changed".into();
        assert!(d
            .check_signatures(None, &keys)
            .unwrap_err()
            .contains("owner twin 1"));
        // Signed by the wrong key under the owner's id.
        let mut d = sample(1, 0);
        d.sign(1, &other);
        assert!(d.check_signatures(None, &keys).is_err());
    }

    #[test]
    fn multisig_quorum_of_this_and_the_previous_version() {
        let k: Vec<KeyPair> = (0..4).map(|_| KeyPair::generate()).collect();
        let keys = |id: u32| k.get(id as usize).map(|kp| kp.public());
        let mut d = sample(0, 0);
        d.signature_requirement = Some(SignatureRequirement {
            requests: vec![
                SignatureRequest {
                    twin_id: 0,
                    weight: 1,
                },
                SignatureRequest {
                    twin_id: 1,
                    weight: 1,
                },
                SignatureRequest {
                    twin_id: 2,
                    weight: 1,
                },
            ],
            weight_required: 2,
        });
        d.sign(0, &k[0]);
        assert!(d
            .check_signatures(None, &keys)
            .unwrap_err()
            .contains("weigh 1"));
        // A signature of a twin that is not in the requirement does not count.
        d.sign(3, &k[3]);
        assert!(d.check_signatures(None, &keys).is_err());
        d.sign(2, &k[2]);
        d.check_signatures(None, &keys).unwrap();
        // An update that drops the requirement still needs the previous quorum.
        let mut next = sample(0, 1);
        next.sign(0, &k[0]);
        assert!(next
            .check_signatures(Some(&d), &keys)
            .unwrap_err()
            .contains("previous"));
        next.sign(1, &k[1]);
        next.check_signatures(Some(&d), &keys).unwrap();
    }

    /// A twin whose chain account is sr25519 (the dev account //Bob) signs; the signature
    /// names its scheme, and is checked with it. Mixed co-signers count together.
    #[test]
    fn sr25519_signatures_verify_with_the_scheme_they_name() {
        let bob = KeyPair::parse("sr25519://Bob").unwrap();
        let ed = KeyPair::generate();
        let keys = |id: u32| match id {
            1 => Some(bob.public()),
            2 => Some(ed.public()),
            _ => None,
        };
        let mut d = sample(1, 0);
        d.sign(1, &bob);
        d.check_signatures(None, &keys).unwrap();
        let text = serde_json::to_string(&d).unwrap();
        assert!(text.contains(r#""signature_type":"sr25519""#), "{text}");
        assert_eq!(Deployment::from_json(text.as_bytes()).unwrap(), d);
        // Without its type the signature is read as ed25519: not the owner's.
        let untyped = text.replace(r#","signature_type":"sr25519""#, "");
        let d2 = Deployment::from_json(untyped.as_bytes()).unwrap();
        assert!(d2
            .check_signatures(None, &keys)
            .unwrap_err()
            .contains("owner twin 1"));
        // An unknown scheme is a malformed document.
        let odd = text.replace(
            r#""signature_type":"sr25519""#,
            r#""signature_type":"ecdsa""#,
        );
        assert!(Deployment::from_json(odd.as_bytes()).is_err());
        // ed25519 signatures keep their JSON (no signature_type).
        let mut e = sample(2, 0);
        e.sign(2, &ed);
        assert!(!serde_json::to_string(&e)
            .unwrap()
            .contains("signature_type"));
        e.check_signatures(None, &keys).unwrap();

        // A quorum of an sr25519 and an ed25519 co-signer.
        let mut m = sample(1, 0);
        m.signature_requirement = Some(SignatureRequirement {
            requests: vec![
                SignatureRequest {
                    twin_id: 1,
                    weight: 1,
                },
                SignatureRequest {
                    twin_id: 2,
                    weight: 1,
                },
            ],
            weight_required: 2,
        });
        m.sign(1, &bob);
        assert!(m.check_signatures(None, &keys).is_err());
        m.sign(2, &ed);
        m.check_signatures(None, &keys).unwrap();
    }
}
