//! Host networking for workloads: what a VM's interfaces are connected to on the node.
//!
//! - `public-nat`: one bridge per node ([`naming::NAT_BRIDGE`]) with the node's private IPv4
//!   range and an IPv6 ULA /64 derived from the node's key, masqueraded out of the uplink, with
//!   port forwards (DNAT) from the uplink ([`nat`]: the nftables table `inet gridnode`).
//! - private networks: each in a network namespace of its own ([`netns`]), named from the
//!   owner and a hash of the network's name, holding a bridge for this node's subnet and a
//!   WireGuard link ([`wireguard`]) whose peers are the network's other nodes. The link is made
//!   in the agent's namespace and moved in: its UDP socket stays where it was made, so it is
//!   reachable on the uplink while everything it carries stays inside the namespace. Nothing
//!   routes between namespaces, so owners' networks never reach each other.
//! - one tap per VM interface ([`links::create_tap`]), on the NAT bridge or in the network's
//!   namespace on its bridge; addresses come from [`ipam`] and stay in the database.
//!
//! The database is the desired state: [`Network::plan`] derives every object from the active
//! deployments (allocating and freeing addresses), and [`reconcile`] makes the kernel match it,
//! keeping what matches (a running vmm keeps its tap), making what is missing and removing
//! stale objects, after any change and at every start of the agent. [`check`] holds the
//! node-dependent validation of deployments (this node in a network, port conflicts).

pub mod check;
pub mod cmdline;
pub mod ipam;
pub mod links;
pub mod naming;
pub mod nat;
pub mod netns;
pub mod reconcile;
pub mod wireguard;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::deployment::{Deployment, VmWorkload, PUBLIC_NAT};
use crate::state::Store;
use cmdline::{GuestNetConfig, InterfaceAddress, RouteSpec};
use ipam::{IfaceKey, Ipv4Net};
use netns::{Ns, NsDir};

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("nftables: {0}")]
    Nft(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Ipam(#[from] ipam::IpamError),
}

impl NetError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        NetError::Io {
            context: context.into(),
            source,
        }
    }
}

/// The operator's network settings (`network` in the agent's config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Off: VMs get no interfaces, and deployments that ask for networking are refused.
    #[serde(default)]
    pub enabled: bool,
    /// The interface towards the outside (NAT, port forwards, WireGuard traffic).
    #[serde(default)]
    pub uplink: Option<String>,
    /// The node's private IPv4 range behind NAT (gateway: its host 1).
    #[serde(default = "default_nat_range")]
    pub nat_range: Ipv4Net,
    /// Give NAT interfaces an IPv6 ULA address too (masqueraded out of the uplink).
    #[serde(default = "default_true")]
    pub ipv6: bool,
    /// Name servers given to guests with a `public-nat` interface.
    #[serde(default = "default_dns")]
    pub dns: Vec<IpAddr>,
    /// Where the private networks' namespaces are kept.
    #[serde(default = "default_netns_dir")]
    pub netns_dir: PathBuf,
    /// Who may open VM taps (the vmm's user and group; root when unset).
    #[serde(default)]
    pub tap_owner: links::TapOwner,
    /// Ports of the node that port forwards and WireGuard may not take, besides the agent's
    /// API port (e.g. SSH).
    #[serde(default)]
    pub reserved_ports: Vec<u16>,
}

fn default_nat_range() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 249, 0, 0), 16)
        .unwrap_or_else(|_| unreachable!("a valid prefix"))
}
fn default_true() -> bool {
    true
}
fn default_dns() -> Vec<IpAddr> {
    vec![
        IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1)),
        IpAddr::V4(Ipv4Addr::new(9, 9, 9, 9)),
    ]
}
fn default_netns_dir() -> PathBuf {
    PathBuf::from(netns::DEFAULT_DIR)
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            uplink: None,
            nat_range: default_nat_range(),
            ipv6: true,
            dns: default_dns(),
            netns_dir: default_netns_dir(),
            tap_owner: links::TapOwner::default(),
            reserved_ports: vec![],
        }
    }
}

/// One VM interface as the vmm gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmAttachment {
    /// The device id in the spec (`net0`, ...).
    pub id: String,
    pub tap: String,
    /// The namespace the tap lives in (a private network's): the vmm, which stays in the
    /// node's namespace, gets the tap as an open fd instead of its name.
    pub netns: Option<PathBuf>,
    pub mac: [u8; 6],
}

/// Everything networking gives one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmNetwork {
    pub attachments: Vec<VmAttachment>,
    pub guest: GuestNetConfig,
}

impl VmNetwork {
    /// The taps the vmm inherits as open fds (those in private networks' namespaces), in the
    /// order of their fd numbers.
    pub fn inherited_taps(&self) -> impl Iterator<Item = (&std::path::Path, &str)> {
        self.attachments
            .iter()
            .filter_map(|a| a.netns.as_deref().map(|ns| (ns, a.tap.as_str())))
    }

    /// The spec's `net` entries: a tap on the NAT bridge by name, a tap in a private network's
    /// namespace as the fd `first_fd + n` (n: its place among those), the derived MAC.
    pub fn net_specs(&self, first_fd: i32) -> Vec<vm_spec::NetSpec> {
        let mut next_fd = first_fd;
        self.attachments
            .iter()
            .map(|a| {
                let (tap, fd) = match a.netns {
                    None => (Some(a.tap.clone()), None),
                    Some(_) => {
                        next_fd += 1;
                        (None, Some(next_fd - 1))
                    }
                };
                vm_spec::NetSpec {
                    id: a.id.clone(),
                    tap,
                    fd,
                    mac: Some(vm_spec::MacAddr(a.mac)),
                    rate_limiter: None,
                }
            })
            .collect()
    }
}

/// The node's networking.
pub struct Network {
    pub config: NetworkConfig,
    uplink: String,
    ula: Option<Ipv6Addr>,
    /// The namespace the node's own objects live in (the agent's; tests use another).
    host: Ns,
    nsdir: NsDir,
    /// This node's id on the grid (None: read from the database when needed).
    node_id: Option<u32>,
}

impl Network {
    /// `node_key`: the node's public key (its ULA prefix is derived from it).
    pub fn new(config: NetworkConfig, node_key: &[u8]) -> Result<Self, NetError> {
        let uplink = config
            .uplink
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| NetError::Invalid("network.uplink (the node's uplink interface) is required when networking is enabled".into()))?;
        if uplink.len() > 15 || uplink.contains(['/', ' ', '\0']) {
            return Err(NetError::Invalid(format!(
                "network.uplink {uplink:?} is not an interface name"
            )));
        }
        if config.dns.len() > cmdline::MAX_DNS {
            return Err(NetError::Invalid(format!(
                "network.dns has {} name servers; guests take at most {}",
                config.dns.len(),
                cmdline::MAX_DNS
            )));
        }
        let r = config.nat_range;
        if !(8..=28).contains(&r.prefix()) {
            return Err(NetError::Invalid(format!(
                "network.nat_range {r} must have a prefix length of 8-28"
            )));
        }
        Ok(Self {
            ula: config.ipv6.then(|| ipam::ula_prefix(node_key)),
            nsdir: NsDir::new(&config.netns_dir),
            uplink,
            config,
            host: Ns::Current,
            node_id: None,
        })
    }

    /// Runs the node's objects in another namespace (tests: a namespace stands in for a node).
    pub fn with_host_ns(mut self, host: Ns) -> Self {
        self.host = host;
        self
    }

    /// Sets the node id (otherwise read from the database).
    pub fn with_node_id(mut self, node_id: u32) -> Self {
        self.node_id = Some(node_id);
        self
    }

    pub fn uplink(&self) -> &str {
        &self.uplink
    }

    pub fn ula(&self) -> Option<Ipv6Addr> {
        self.ula
    }

    pub fn nsdir(&self) -> &NsDir {
        &self.nsdir
    }

    pub fn node_id(&self, store: &Store) -> Option<u32> {
        self.node_id.or_else(|| {
            store
                .meta("node_id")
                .ok()
                .flatten()
                .and_then(|v| v.parse().ok())
        })
    }

    /// The pool and prefix of a VM interface on `network` of deployment `doc`.
    fn pool_of(
        &self,
        doc: &Deployment,
        network: &str,
        node_id: Option<u32>,
    ) -> Result<(String, Ipv4Net), NetError> {
        if network == PUBLIC_NAT {
            return Ok((ipam::NAT_POOL.to_string(), self.config.nat_range));
        }
        let net = doc
            .network(network)
            .ok_or_else(|| NetError::Invalid(format!("no network {network} in the deployment")))?;
        let node_id = node_id.ok_or_else(|| {
            NetError::Invalid("the node has no node id yet (not registered)".into())
        })?;
        let me = net.node(node_id).ok_or_else(|| {
            NetError::Invalid(format!("network {network} does not include node {node_id}"))
        })?;
        Ok((ipam::network_pool(doc.twin_id, network), me.subnet))
    }

    /// Derives the desired objects from the active deployments, allocating the addresses of
    /// new interfaces and freeing those of interfaces that are gone. A VM whose interface
    /// cannot get an address is left out (its start fails with the reason).
    pub fn plan(&self, store: &Store) -> Result<reconcile::Desired, NetError> {
        let deployments = store
            .deployments(None)
            .map_err(|e| NetError::Invalid(format!("reading deployments: {e:#}")))?;
        let node_id = self.node_id(store);
        let mut desired = reconcile::Desired {
            nat: nat::NatConfig {
                uplink: self.uplink.clone(),
                bridge: naming::NAT_BRIDGE.to_string(),
                v4_range: self.config.nat_range,
                v6_prefix: self.ula,
            },
            tap_owner: self.config.tap_owner,
            ..Default::default()
        };
        // Free the addresses of interfaces that are gone first, so new ones can take them.
        let keep: BTreeSet<IfaceKey> = deployments
            .iter()
            .flat_map(|doc| {
                doc.vms().flat_map(move |vm| {
                    (0..vm.interfaces.len()).map(move |i| IfaceKey {
                        twin_id: doc.twin_id,
                        deployment_id: doc.deployment_id,
                        vm: vm.name.clone(),
                        iface: i as u32,
                    })
                })
            })
            .collect();
        let freed = ipam::release_all_but(store, &keep)?;
        if freed > 0 {
            tracing::info!(freed, "freed the addresses of removed interfaces");
        }
        for doc in &deployments {
            for net in doc.networks() {
                let Some(me) = node_id.and_then(|id| net.node(id)) else {
                    tracing::warn!(twin = doc.twin_id, deployment = doc.deployment_id, network = %net.name, "the network does not include this node; skipped");
                    continue;
                };
                let private =
                    wireguard::parse_key(&net.wireguard_private_key).map_err(NetError::Invalid)?;
                let peers = net
                    .nodes
                    .iter()
                    .filter(|n| n.node_id != me.node_id)
                    .filter_map(|n| {
                        Some(wireguard::Peer {
                            public_key: wireguard::parse_key(&n.wireguard_public_key).ok()?,
                            endpoint: n.endpoint,
                            allowed: vec![n.subnet],
                        })
                    })
                    .collect();
                desired.networks.push(reconcile::NetworkDesired {
                    netns: naming::netns_name(doc.twin_id, &net.name),
                    wg_name: naming::wg_name(doc.twin_id, &net.name),
                    subnet: me.subnet,
                    ip_range: net.ip_range,
                    wg: wireguard::DeviceConfig {
                        private_key: private,
                        listen_port: me.endpoint.map(|e| e.port()).unwrap_or(0),
                        peers,
                    },
                    taps: vec![],
                });
            }
            for vm in doc.vms() {
                for (i, iface) in vm.interfaces.iter().enumerate() {
                    let owner = IfaceKey {
                        twin_id: doc.twin_id,
                        deployment_id: doc.deployment_id,
                        vm: vm.name.clone(),
                        iface: i as u32,
                    };
                    let (pool, prefix) = match self.pool_of(doc, &iface.network, node_id) {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::warn!(vm = %vm.name, "interface {i}: {e}");
                            continue;
                        }
                    };
                    let host = match ipam::allocate(store, &pool, prefix, &owner, iface.ip) {
                        Ok(h) => h,
                        Err(e) => {
                            tracing::warn!(twin = doc.twin_id, deployment = doc.deployment_id, vm = %vm.name, "interface {i}: {e}");
                            continue;
                        }
                    };
                    let tap = naming::tap_name(doc.twin_id, doc.deployment_id, &vm.name, i as u32);
                    if iface.network == PUBLIC_NAT {
                        let Some(v4) = self.config.nat_range.host(host) else {
                            tracing::warn!(vm = %vm.name, "interface {i}: host {host} outside the NAT range");
                            continue;
                        };
                        desired.host_taps.push(nat::GuardedTap {
                            name: tap,
                            mac: naming::mac(doc.twin_id, doc.deployment_id, &vm.name, i as u32),
                            v4,
                            v6: self.ula.map(|ula| ipam::ula_host(ula, host)),
                        });
                        for f in &vm.port_forwards {
                            if let Some(vm_addr) = self.config.nat_range.host(host) {
                                desired.forwards.push(nat::Forward {
                                    protocol: f.protocol,
                                    host_port: f.host_port,
                                    vm_addr,
                                    vm_port: f.vm_port,
                                });
                            }
                        }
                    } else {
                        let ns = naming::netns_name(doc.twin_id, &iface.network);
                        if let Some(n) = desired.networks.iter_mut().find(|n| n.netns == ns) {
                            n.taps.push(tap);
                        }
                    }
                }
            }
        }
        desired.forwards.sort();
        desired.host_taps.sort();
        Ok(desired)
    }

    /// Makes the kernel match the database (after every change, and at start).
    pub async fn sync(&self, store: &Store) -> Result<reconcile::Report, NetError> {
        let desired = self.plan(store)?;
        reconcile::apply(
            self.host.clone(),
            self.nsdir.clone(),
            self.config.ipv6,
            desired,
        )
        .await
    }

    /// Removes everything the agent made (links, namespaces, the nftables table).
    pub async fn teardown_all(&self) -> Result<reconcile::Report, NetError> {
        reconcile::teardown_all(self.host.clone(), self.nsdir.clone()).await
    }

    /// The interfaces and guest configuration of a VM, from its allocated addresses.
    pub fn vm_network(
        &self,
        store: &Store,
        doc: &Deployment,
        vm: &VmWorkload,
    ) -> Result<VmNetwork, NetError> {
        let node_id = self.node_id(store);
        let allocs = ipam::allocations(store)?;
        let mut out = VmNetwork::default();
        for (i, iface) in vm.interfaces.iter().enumerate() {
            let owner = IfaceKey {
                twin_id: doc.twin_id,
                deployment_id: doc.deployment_id,
                vm: vm.name.clone(),
                iface: i as u32,
            };
            let (pool, prefix) = self.pool_of(doc, &iface.network, node_id)?;
            let host = allocs
                .iter()
                .find(|a| a.owner == owner && a.pool == pool)
                .map(|a| a.host)
                .ok_or_else(|| {
                    NetError::Invalid(format!(
                        "interface {i} (network {}) has no address (see the agent's log)",
                        iface.network
                    ))
                })?;
            let ifname = naming::guest_ifname(i);
            let addr = prefix
                .host(host)
                .ok_or_else(|| NetError::Invalid(format!("address {host} is outside {prefix}")))?;
            out.guest.addresses.push(InterfaceAddress {
                ifname: ifname.clone(),
                addr: IpAddr::V4(addr),
                prefix: prefix.prefix(),
            });
            let tap = naming::tap_name(doc.twin_id, doc.deployment_id, &vm.name, i as u32);
            let mac = naming::mac(doc.twin_id, doc.deployment_id, &vm.name, i as u32);
            if iface.network == PUBLIC_NAT {
                out.guest.routes.push(RouteSpec {
                    ifname: ifname.clone(),
                    dest: None,
                    gateway: IpAddr::V4(prefix.gateway()),
                });
                if let Some(ula) = self.ula {
                    out.guest.addresses.push(InterfaceAddress {
                        ifname: ifname.clone(),
                        addr: IpAddr::V6(ipam::ula_host(ula, host)),
                        prefix: 64,
                    });
                    out.guest.routes.push(RouteSpec {
                        ifname: ifname.clone(),
                        dest: None,
                        gateway: IpAddr::V6(ipam::ula_host(ula, 1)),
                    });
                }
                out.guest
                    .dns
                    .extend(self.config.dns.iter().take(cmdline::MAX_DNS).copied());
                out.attachments.push(VmAttachment {
                    id: format!("net{i}"),
                    tap,
                    netns: None,
                    mac,
                });
            } else {
                let range = doc
                    .network(&iface.network)
                    .map(|n| n.ip_range)
                    .unwrap_or(prefix);
                out.guest.routes.push(RouteSpec {
                    ifname,
                    dest: Some((IpAddr::V4(range.addr()), range.prefix())),
                    gateway: IpAddr::V4(prefix.gateway()),
                });
                out.attachments.push(VmAttachment {
                    id: format!("net{i}"),
                    tap,
                    netns: Some(
                        self.nsdir
                            .path(&naming::netns_name(doc.twin_id, &iface.network)),
                    ),
                    mac,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_entries_name_nat_taps_and_number_namespaced_ones() {
        let att = |id: &str, netns: Option<&str>| VmAttachment {
            id: id.into(),
            tap: format!("gn-t{id}"),
            netns: netns.map(PathBuf::from),
            mac: [2, 0, 0, 0, 0, 1],
        };
        let net = VmNetwork {
            attachments: vec![
                att("net0", Some("/run/netns/gn-1-a")),
                att("net1", None),
                att("net2", Some("/run/netns/gn-1-b")),
            ],
            guest: GuestNetConfig::default(),
        };
        let specs = net.net_specs(100);
        assert_eq!(
            specs
                .iter()
                .map(|s| (s.tap.clone(), s.fd))
                .collect::<Vec<_>>(),
            vec![
                (None, Some(100)),
                (Some("gn-tnet1".to_string()), None),
                (None, Some(101))
            ]
        );
        vm_spec::net::validate(&specs).unwrap_err(); // the same MAC twice is refused
        let taps: Vec<_> = net.inherited_taps().map(|(_, t)| t).collect();
        assert_eq!(taps, vec!["gn-tnet0", "gn-tnet2"]);
    }
}
