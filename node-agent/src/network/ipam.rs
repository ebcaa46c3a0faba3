//! Addresses: IPv4 prefixes (parsing, containment, overlap, host numbering), the node's IPv6
//! ULA prefix, and the allocations of VM interfaces, kept in the agent's database (table
//! `net_addrs`) so they survive restarts and are freed when their workload goes.
//!
//! A pool is one IPv4 prefix: `nat` (the node's private range behind its NAT bridge) or
//! `net:<twin>:<network>` (this node's subnet of a private network). Host 0 is the network,
//! host 1 the gateway (the bridge), the last host the broadcast address; VMs get the lowest
//! free host from 2 on. A VM's IPv6 address on the NAT bridge is the ULA /64 plus the same
//! host number, so it needs no allocation of its own.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use rusqlite::{params, OptionalExtension};

use crate::state::Store;

/// An IPv4 prefix whose host bits are zero (`10.20.0.0/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, String> {
        if prefix > 32 {
            return Err(format!("prefix length {prefix} is more than 32"));
        }
        let net = Self { addr, prefix };
        if u32::from(addr) & !net.mask() != 0 {
            return Err(format!(
                "{addr}/{prefix} has host bits set (the network is {}/{prefix})",
                Ipv4Addr::from(u32::from(addr) & net.mask())
            ));
        }
        Ok(net)
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// Number of addresses.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    /// Whether `other` lies inside this prefix.
    pub fn contains_net(&self, other: &Ipv4Net) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }

    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.contains_net(other) || other.contains_net(self)
    }

    /// Host number `n` of the prefix (None past its end).
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        (u64::from(n) < self.size()).then(|| Ipv4Addr::from(u32::from(self.addr) + n))
    }

    /// The host number of `ip` in this prefix.
    pub fn host_number(&self, ip: Ipv4Addr) -> Option<u32> {
        self.contains(ip)
            .then(|| u32::from(ip) - u32::from(self.addr))
    }

    /// Host 1: the bridge's address, the VMs' gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr).wrapping_add(1))
    }

    /// Host numbers VMs may get: 2 to the one before the broadcast address.
    pub fn vm_hosts(&self) -> std::ops::Range<u32> {
        let last = self.size().saturating_sub(1).min(u64::from(u32::MAX)) as u32;
        2..last
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an IPv4 prefix like 10.20.0.0/16"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{s:?}: {a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| format!("{s:?}: {p:?} is not a prefix length"))?;
        Ipv4Net::new(addr, prefix)
    }
}

impl serde::Serialize for Ipv4Net {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Ipv4Net {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The node's IPv6 ULA /64 for its NAT bridge: `fd` + 40 bits of the hash of the node's
/// public key (RFC 4193's global id, here stable per node) + subnet 0.
pub fn ula_prefix(node_key: &[u8]) -> Ipv6Addr {
    let h = blake3::derive_key("gridnode network ula v1", node_key);
    let mut b = [0u8; 16];
    b[0] = 0xfd;
    b[1..6].copy_from_slice(&h[..5]);
    Ipv6Addr::from(b)
}

/// Host `n` of a /64.
pub fn ula_host(prefix: Ipv6Addr, n: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(prefix) | u128::from(n))
}

/// Whose an allocation is: one interface of one VM.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct IfaceKey {
    pub twin_id: u32,
    pub deployment_id: u64,
    pub vm: String,
    pub iface: u32,
}

/// One allocation as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub pool: String,
    pub host: u32,
    pub owner: IfaceKey,
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free address left in {pool} ({net})")]
    Exhausted { pool: String, net: Ipv4Net },
    #[error("address {ip} of {pool} is taken by {holder}")]
    Taken {
        pool: String,
        ip: Ipv4Addr,
        holder: String,
    },
    #[error(
        "address {ip} is not a VM address of {net} (not the network, gateway or broadcast address)"
    )]
    NotAHost { ip: Ipv4Addr, net: Ipv4Net },
    #[error("address database: {0:#}")]
    Db(#[from] anyhow::Error),
}

/// Name of the pool of the node's NAT range.
pub const NAT_POOL: &str = "nat";

/// Name of the pool of this node's subnet of a private network.
pub fn network_pool(twin_id: u32, network: &str) -> String {
    format!("net:{twin_id}:{network}")
}

/// The host number `owner` has in `pool`, allocating the lowest free one (or `wanted`, an
/// address the deployment chose) when it has none there yet.
pub fn allocate(
    store: &Store,
    pool: &str,
    net: Ipv4Net,
    owner: &IfaceKey,
    wanted: Option<Ipv4Addr>,
) -> Result<u32, IpamError> {
    let wanted_host = match wanted {
        Some(ip) => match net.host_number(ip).filter(|h| net.vm_hosts().contains(h)) {
            Some(h) => Some(h),
            None => return Err(IpamError::NotAHost { ip, net }),
        },
        None => None,
    };
    let pool_s = pool.to_string();
    let owner_c = owner.clone();
    let out = store.with_tx(move |tx| {
        let existing: Option<(String, u32)> = tx
            .query_row(
                "SELECT pool, host FROM net_addrs WHERE twin_id = ?1 AND deployment_id = ?2 AND vm = ?3 AND iface = ?4",
                params![owner_c.twin_id, owner_c.deployment_id as i64, owner_c.vm, owner_c.iface],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((p, h)) = existing {
            if p == pool_s && wanted_host.is_none_or(|w| w == h) {
                return Ok(Ok(h));
            }
            tx.execute(
                "DELETE FROM net_addrs WHERE twin_id = ?1 AND deployment_id = ?2 AND vm = ?3 AND iface = ?4",
                params![owner_c.twin_id, owner_c.deployment_id as i64, owner_c.vm, owner_c.iface],
            )?;
        }
        let used: BTreeSet<u32> = {
            let mut stmt = tx.prepare("SELECT host FROM net_addrs WHERE pool = ?1")?;
            let rows = stmt.query_map([&pool_s], |r| r.get::<_, u32>(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let host = match wanted_host {
            Some(h) if used.contains(&h) => {
                let holder: String = tx.query_row(
                    "SELECT twin_id || '/' || deployment_id || '/' || vm FROM net_addrs WHERE pool = ?1 AND host = ?2",
                    params![pool_s, h],
                    |r| r.get(0),
                )?;
                return Ok(Err((h, holder)));
            }
            Some(h) => h,
            None => match net.vm_hosts().find(|h| !used.contains(h)) {
                Some(h) => h,
                None => return Ok(Err((0, String::new()))),
            },
        };
        tx.execute(
            "INSERT INTO net_addrs(pool, host, twin_id, deployment_id, vm, iface) VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
            params![pool_s, host, owner_c.twin_id, owner_c.deployment_id as i64, owner_c.vm, owner_c.iface],
        )?;
        Ok(Ok(host))
    })?;
    match out {
        Ok(h) => Ok(h),
        Err((0, _)) => Err(IpamError::Exhausted {
            pool: pool.to_string(),
            net,
        }),
        Err((h, holder)) => Err(IpamError::Taken {
            pool: pool.to_string(),
            ip: net.host(h).unwrap_or(Ipv4Addr::UNSPECIFIED),
            holder,
        }),
    }
}

/// Every allocation.
pub fn allocations(store: &Store) -> Result<Vec<Allocation>, IpamError> {
    Ok(store.with_conn(|c| {
        let mut stmt = c.prepare(
            "SELECT pool, host, twin_id, deployment_id, vm, iface FROM net_addrs ORDER BY pool, host",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Allocation {
                pool: r.get(0)?,
                host: r.get(1)?,
                owner: IfaceKey {
                    twin_id: r.get(2)?,
                    deployment_id: r.get::<_, i64>(3)? as u64,
                    vm: r.get(4)?,
                    iface: r.get(5)?,
                },
            })
        })?;
        rows.collect()
    })?)
}

/// Frees every allocation whose owner is not in `keep`; returns how many were freed.
pub fn release_all_but(store: &Store, keep: &BTreeSet<IfaceKey>) -> Result<usize, IpamError> {
    let stale: Vec<IfaceKey> = allocations(store)?
        .into_iter()
        .map(|a| a.owner)
        .filter(|o| !keep.contains(o))
        .collect();
    for o in &stale {
        store.with_conn(|c| {
            c.execute(
                "DELETE FROM net_addrs WHERE twin_id = ?1 AND deployment_id = ?2 AND vm = ?3 AND iface = ?4",
                params![o.twin_id, o.deployment_id as i64, o.vm, o.iface],
            )
        })?;
    }
    Ok(stale.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn key(vm: &str, iface: u32) -> IfaceKey {
        IfaceKey {
            twin_id: 7,
            deployment_id: 1,
            vm: vm.into(),
            iface,
        }
    }

    #[test]
    fn prefixes_parse_contain_and_overlap() {
        let r = net("10.20.0.0/16");
        assert!(r.contains_net(&net("10.20.1.0/24")));
        assert!(!r.contains_net(&net("10.21.1.0/24")));
        assert!(!net("10.20.1.0/24").contains_net(&r));
        assert!(net("10.20.1.0/24").overlaps(&net("10.20.0.0/23")));
        assert!(!net("10.20.1.0/24").overlaps(&net("10.20.2.0/24")));
        assert_eq!(r.gateway(), Ipv4Addr::new(10, 20, 0, 1));
        assert_eq!(net("10.20.1.0/30").vm_hosts(), 2..3);
        assert!("10.20.1.1/24"
            .parse::<Ipv4Net>()
            .unwrap_err()
            .contains("host bits"));
        assert!("10.20.1.0".parse::<Ipv4Net>().is_err());
        assert!("10.20.1.0/33".parse::<Ipv4Net>().is_err());
        assert!("fd00::/64".parse::<Ipv4Net>().is_err());
        assert_eq!(net("0.0.0.0/0").mask(), 0);
    }

    #[test]
    fn ula_is_stable_per_node_and_a_ula() {
        let a = ula_prefix(b"node-a");
        assert_eq!(a, ula_prefix(b"node-a"));
        assert_ne!(a, ula_prefix(b"node-b"));
        assert_eq!(a.octets()[0], 0xfd);
        assert_eq!(&a.octets()[6..], &[0u8; 10]);
        assert_eq!(ula_host(a, 5).octets()[15], 5);
    }

    #[test]
    fn allocations_are_lowest_free_kept_across_reopen_and_freed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = Store::open(&path).unwrap();
        let n = net("10.249.0.0/29"); // hosts 2..=6
        assert_eq!(
            allocate(&store, NAT_POOL, n, &key("a", 0), None).unwrap(),
            2
        );
        assert_eq!(
            allocate(&store, NAT_POOL, n, &key("b", 0), None).unwrap(),
            3
        );
        // The same owner gets the same address again.
        assert_eq!(
            allocate(&store, NAT_POOL, n, &key("a", 0), None).unwrap(),
            2
        );
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(
            allocate(&store, NAT_POOL, n, &key("a", 0), None).unwrap(),
            2
        );
        // A chosen address, taken and free.
        let err = allocate(
            &store,
            NAT_POOL,
            n,
            &key("c", 0),
            Some(Ipv4Addr::new(10, 249, 0, 3)),
        )
        .unwrap_err();
        assert!(err.to_string().contains("7/1/b"), "{err}");
        assert_eq!(
            allocate(
                &store,
                NAT_POOL,
                n,
                &key("c", 0),
                Some(Ipv4Addr::new(10, 249, 0, 6))
            )
            .unwrap(),
            6
        );
        for bad in [Ipv4Addr::new(10, 249, 0, 1), Ipv4Addr::new(10, 249, 0, 7)] {
            assert!(matches!(
                allocate(&store, NAT_POOL, n, &key("d", 0), Some(bad)),
                Err(IpamError::NotAHost { .. })
            ));
        }
        assert_eq!(
            allocate(&store, NAT_POOL, n, &key("d", 0), None).unwrap(),
            4
        );
        assert_eq!(
            allocate(&store, NAT_POOL, n, &key("e", 0), None).unwrap(),
            5
        );
        assert!(matches!(
            allocate(&store, NAT_POOL, n, &key("f", 0), None),
            Err(IpamError::Exhausted { .. })
        ));
        // Another pool is independent.
        assert_eq!(
            allocate(&store, &network_pool(7, "x"), n, &key("f", 1), None).unwrap(),
            2
        );
        // Freed on delete: only a and f's second interface stay.
        let keep: BTreeSet<IfaceKey> = [key("a", 0), key("f", 1)].into_iter().collect();
        assert_eq!(release_all_but(&store, &keep).unwrap(), 4);
        assert_eq!(
            allocate(&store, NAT_POOL, n, &key("g", 0), None).unwrap(),
            3
        );
        assert_eq!(allocations(&store).unwrap().len(), 3);
    }
}
