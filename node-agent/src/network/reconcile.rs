//! Desired against actual: lists what exists (links named `gn-*` in the node's namespace and
//! in each private network's, the namespaces named `gn-*`, the `inet gridnode` table), removes
//! what the desired state does not have, makes what is missing, and leaves alone what
//! matches. A tap that exists is never made again (a running vmm may hold it), so VMs keep
//! their connectivity across an agent crash and restart.

use std::os::fd::AsRawFd;

use tracing::{info, warn};

use super::ipam::Ipv4Net;
use super::links::{self, Links, TapOwner};
use super::naming::{NAT_BRIDGE, NETWORK_BRIDGE, PREFIX, TAP_PREFIX, WG_PREFIX};
use super::netns::{self, Ns, NsDir};
use super::{nat, wireguard, NetError};

/// Everything the node's networking should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub nat: nat::NatConfig,
    /// Taps on the NAT bridge, with the addresses their VMs may send from.
    pub host_taps: Vec<nat::GuardedTap>,
    pub forwards: Vec<nat::Forward>,
    pub networks: Vec<NetworkDesired>,
    pub tap_owner: TapOwner,
}

impl Default for Desired {
    fn default() -> Self {
        Self {
            nat: nat::NatConfig {
                uplink: String::new(),
                bridge: NAT_BRIDGE.into(),
                v4_range: Ipv4Net::new(std::net::Ipv4Addr::new(10, 249, 0, 0), 16)
                    .unwrap_or_else(|_| unreachable!("a valid prefix")),
                v6_prefix: None,
            },
            host_taps: vec![],
            forwards: vec![],
            networks: vec![],
            tap_owner: TapOwner::default(),
        }
    }
}

/// One private network on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkDesired {
    pub netns: String,
    pub wg_name: String,
    /// This node's subnet (the bridge gets its host 1).
    pub subnet: Ipv4Net,
    pub ip_range: Ipv4Net,
    pub wg: wireguard::DeviceConfig,
    /// Taps of VMs on this network (in the namespace).
    pub taps: Vec<String>,
}

/// What a pass changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub created: Vec<String>,
    pub removed: Vec<String>,
    /// Private networks (by namespace) that could not be set up, and why; the others are.
    pub failed: Vec<(String, String)>,
}

/// Makes the namespace `host` (the node's) and the private networks' namespaces match
/// `desired`.
pub async fn apply(
    host: Ns,
    nsdir: NsDir,
    ipv6: bool,
    desired: Desired,
) -> Result<Report, NetError> {
    netns::run_in(host, move || async move {
        let mut report = Report::default();
        let links = Links::connect()?;
        netns::set_sysctl("net/ipv4/ip_forward", "1")?;
        if ipv6 {
            // A forwarding host ignores router advertisements unless told otherwise: the
            // uplink keeps its SLAAC address and default route.
            let ra = format!("net/ipv6/conf/{}/accept_ra", desired.nat.uplink);
            if std::path::Path::new("/proc/sys").join(&ra).exists() {
                netns::set_sysctl(&ra, "2")?;
            }
            netns::set_sysctl("net/ipv6/conf/all/forwarding", "1")?;
        }
        // The NAT bridge, its taps, the table.
        let nat = &desired.nat;
        let mut addrs = vec![(
            std::net::IpAddr::V4(nat.v4_range.gateway()),
            nat.v4_range.prefix(),
        )];
        if let Some(p) = nat.v6_prefix {
            addrs.push((std::net::IpAddr::V6(super::ipam::ula_host(p, 1)), 64));
        }
        if links.get(NAT_BRIDGE).await?.is_none() {
            report.created.push(NAT_BRIDGE.to_string());
        }
        links.ensure_bridge(NAT_BRIDGE, &addrs).await?;
        let nat_taps: Vec<String> = desired.host_taps.iter().map(|t| t.name.clone()).collect();
        sync_taps(
            &links,
            NAT_BRIDGE,
            Isolation::Isolated,
            &nat_taps,
            desired.tap_owner,
            &mut report,
        )
        .await?;
        nat::apply(nat, &desired.forwards, &desired.host_taps)?;

        // WireGuard links left in this namespace by a crash before their move.
        for l in links.list().await? {
            if l.name.starts_with(WG_PREFIX) {
                links.delete(&l.name).await?;
                report.removed.push(l.name);
            }
        }
        // Namespaces of networks that are gone.
        let wanted: Vec<&str> = desired.networks.iter().map(|n| n.netns.as_str()).collect();
        for name in nsdir.list()? {
            if !wanted.contains(&name.as_str()) {
                nsdir.delete(&name)?;
                info!(netns = %name, "removed the namespace of a removed network");
                report.removed.push(name);
            }
        }
        for net in &desired.networks {
            if let Err(e) = sync_network(&links, &nsdir, net, desired.tap_owner, &mut report).await
            {
                warn!(netns = %net.netns, "setting up a private network: {e}");
                report.failed.push((net.netns.clone(), e.to_string()));
            }
        }
        Ok(report)
    })
    .await
}

/// Whether the taps of a bridge may reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isolation {
    /// The node's NAT bridge: taps of many owners, each reaching only the node.
    Isolated,
    /// A private network's bridge: one owner's VMs, which talk to each other.
    Open,
}

/// Taps on `bridge` in the calling thread's namespace: removes `gn-t*` taps not in `taps`,
/// makes the missing ones, attaches them all.
async fn sync_taps(
    links: &Links,
    bridge: &str,
    isolation: Isolation,
    taps: &[String],
    owner: TapOwner,
    report: &mut Report,
) -> Result<(), NetError> {
    let existing = links.list().await?;
    for l in &existing {
        if l.name.starts_with(TAP_PREFIX) && !taps.contains(&l.name) {
            links.delete(&l.name).await?;
            info!(tap = %l.name, "removed the tap of a removed interface");
            report.removed.push(l.name.clone());
        }
    }
    for tap in taps {
        if !existing.iter().any(|l| &l.name == tap) {
            links::create_tap(tap, owner)?;
            report.created.push(tap.clone());
        }
        links
            .attach(tap, bridge, isolation == Isolation::Isolated)
            .await?;
    }
    Ok(())
}

async fn sync_network(
    host_links: &Links,
    nsdir: &NsDir,
    net: &NetworkDesired,
    owner: TapOwner,
    report: &mut Report,
) -> Result<(), NetError> {
    if !nsdir.exists(&net.netns) {
        nsdir.create(&net.netns)?;
        report.created.push(net.netns.clone());
    }
    let ns_path = nsdir.path(&net.netns);
    let wg = net.wg_name.clone();
    let has_wg = {
        let wg = wg.clone();
        netns::run_in(Ns::Path(ns_path.clone()), move || async move {
            Ok(Links::connect()?.get(&wg).await?.is_some())
        })
        .await?
    };
    if !has_wg {
        // Made here, in the node's namespace, so its UDP socket is here; then moved in.
        host_links.add_wireguard(&wg).await?;
        let f = std::fs::File::open(&ns_path)
            .map_err(|e| NetError::io(format!("opening {}", ns_path.display()), e))?;
        if let Err(e) = host_links.move_to_netns(&wg, f.as_raw_fd()).await {
            let _ = host_links.delete(&wg).await;
            return Err(e);
        }
        report.created.push(wg.clone());
    }
    let net = net.clone();
    let inner = netns::run_in(Ns::Path(ns_path), move || async move {
        let mut report = Report::default();
        let links = Links::connect()?;
        netns::set_sysctl("net/ipv4/ip_forward", "1")?;
        let gw = (
            std::net::IpAddr::V4(net.subnet.gateway()),
            net.subnet.prefix(),
        );
        if links.get(NETWORK_BRIDGE).await?.is_none() {
            report
                .created
                .push(format!("{}/{NETWORK_BRIDGE}", net.netns));
        }
        links.ensure_bridge(NETWORK_BRIDGE, &[gw]).await?;
        wireguard::configure(&net.wg_name, &net.wg).await?;
        links.set_up(&net.wg_name).await?;
        links.ensure_route(net.ip_range, &net.wg_name, None).await?;
        sync_taps(
            &links,
            NETWORK_BRIDGE,
            Isolation::Open,
            &net.taps,
            owner,
            &mut report,
        )
        .await?;
        // Anything else of ours in there (a WireGuard link of an old name) goes.
        for l in links.list().await? {
            let ours = l.name.starts_with(PREFIX);
            let wanted =
                l.name == NETWORK_BRIDGE || l.name == net.wg_name || net.taps.contains(&l.name);
            if ours && !wanted {
                links.delete(&l.name).await?;
                report.removed.push(l.name);
            }
        }
        Ok(report)
    })
    .await?;
    report.created.extend(inner.created);
    report.removed.extend(inner.removed);
    Ok(())
}

/// Removes every `gn-*` link and namespace and the nftables table.
pub async fn teardown_all(host: Ns, nsdir: NsDir) -> Result<Report, NetError> {
    netns::run_in(host, move || async move {
        let mut report = Report::default();
        for name in nsdir.list()? {
            nsdir.delete(&name)?;
            report.removed.push(name);
        }
        let links = Links::connect()?;
        for l in links.list().await? {
            if l.name.starts_with(PREFIX) {
                if let Err(e) = links.delete(&l.name).await {
                    warn!("removing {}: {e}", l.name);
                }
                report.removed.push(l.name);
            }
        }
        if nat::table_exists()? {
            nat::remove()?;
            report
                .removed
                .push(format!("table inet {}", super::naming::NFT_TABLE));
        }
        Ok(report)
    })
    .await
}
