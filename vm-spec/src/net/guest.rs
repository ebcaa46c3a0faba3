//! The guest's network configuration as the guest init reads it from the kernel command
//! line. The node agent produces it with [`GuestNetConfig::to_cmdline`]; the guest init
//! (guest-kernels/init, which includes this file as a module: it uses std and thiserror
//! only) parses it with [`GuestNetConfig::parse`] and applies it before the entrypoint runs.
//!
//! - `gridnode.ip=<ifname>,<addr>/<prefix>`: an address (IPv4 or IPv6) on an interface; the
//!   interface is brought up. Repeatable.
//! - `gridnode.route=<ifname>,<dest>/<prefix>,<gateway>`: a route through a gateway; `dest`
//!   may be `default` (the gateway's family decides which default). Repeatable.
//! - `gridnode.dns=<addr>`: a resolver, written to /etc/resolv.conf. Repeatable.
//!
//! Guest interfaces are named by the guest kernel in the order of the spec's `net` list
//! (eth0, eth1, ...); `lo` is always brought up. Every field is bounded and checked: the
//! command line is untrusted input to the guest init, which refuses it whole with a clear
//! error rather than apply part of it. Words after a standalone `--` (the entrypoint) are
//! never read.

use std::net::IpAddr;

pub const IP_PARAM: &str = "gridnode.ip=";
pub const ROUTE_PARAM: &str = "gridnode.route=";
pub const DNS_PARAM: &str = "gridnode.dns=";

/// Most addresses, routes and resolvers.
pub const MAX_ADDRESSES: usize = 32;
pub const MAX_ROUTES: usize = 32;
/// The C libraries read at most three `nameserver` lines.
pub const MAX_DNS: usize = 3;
/// Longest value of one parameter (an IPv6 route is under 100 bytes).
const MAX_VALUE_LEN: usize = 128;
/// Longest interface name: IFNAMSIZ less the NUL.
pub const MAX_IFNAME_LEN: usize = 15;

/// An address on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub ifname: String,
    pub addr: IpAddr,
    pub prefix: u8,
}

/// A route through `gateway`; `dest` `None` is the default route of the gateway's family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub ifname: String,
    pub dest: Option<(IpAddr, u8)>,
    pub gateway: IpAddr,
}

/// Everything the guest init configures on the network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestNetConfig {
    pub addresses: Vec<InterfaceAddress>,
    pub routes: Vec<RouteSpec>,
    pub dns: Vec<IpAddr>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuestNetError {
    #[error("{param}{value}: {why}")]
    Bad {
        param: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("more than {max} {what}")]
    TooMany { what: &'static str, max: usize },
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn max_prefix(addr: &IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// Whether the bits of `addr` past `prefix` are all zero.
fn is_network(addr: &IpAddr, prefix: u8) -> bool {
    let bits = match addr {
        IpAddr::V4(a) => u128::from(u32::from(*a)) << 96,
        IpAddr::V6(a) => u128::from(*a),
    };
    prefix >= 128 || bits << prefix == 0
}

fn usable_host(addr: &IpAddr) -> bool {
    !addr.is_unspecified() && !addr.is_multicast() && *addr != IpAddr::V4([255; 4].into())
}

fn parse_prefixed(text: &str) -> Result<(IpAddr, u8), &'static str> {
    let (addr, prefix) = text
        .split_once('/')
        .ok_or("an address needs a /prefix length")?;
    let addr: IpAddr = addr.parse().map_err(|_| "not an IPv4 or IPv6 address")?;
    // Digits only: "+8" or " 8" are not prefixes.
    if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err("the prefix length is not a number");
    }
    let prefix: u8 = prefix
        .parse()
        .map_err(|_| "the prefix length is not a number")?;
    if prefix > max_prefix(&addr) {
        return Err("the prefix length is longer than the address");
    }
    Ok((addr, prefix))
}

fn parse_ip(value: &str) -> Result<InterfaceAddress, &'static str> {
    let (ifname, prefixed) = value
        .split_once(',')
        .ok_or("expected <ifname>,<addr>/<prefix>")?;
    if !valid_ifname(ifname) {
        return Err("the interface name must be 1 to 15 letters, digits, '-', '_' or '.'");
    }
    let (addr, prefix) = parse_prefixed(prefixed)?;
    if !usable_host(&addr) {
        return Err("the address is unspecified, multicast or broadcast");
    }
    Ok(InterfaceAddress {
        ifname: ifname.to_string(),
        addr,
        prefix,
    })
}

fn parse_route(value: &str) -> Result<RouteSpec, &'static str> {
    let mut parts = value.split(',');
    let (Some(ifname), Some(dest), Some(gateway), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("expected <ifname>,<dest>/<prefix>|default,<gateway>");
    };
    if !valid_ifname(ifname) {
        return Err("the interface name must be 1 to 15 letters, digits, '-', '_' or '.'");
    }
    let gateway: IpAddr = gateway
        .parse()
        .map_err(|_| "the gateway is not an IPv4 or IPv6 address")?;
    if !usable_host(&gateway) {
        return Err("the gateway is unspecified, multicast or broadcast");
    }
    let dest = if dest == "default" {
        None
    } else {
        let (addr, prefix) = parse_prefixed(dest)?;
        if addr.is_ipv4() != gateway.is_ipv4() {
            return Err("the destination and the gateway are of different families");
        }
        if !is_network(&addr, prefix) {
            return Err("the destination has bits set past its prefix length");
        }
        Some((addr, prefix))
    };
    Ok(RouteSpec {
        ifname: ifname.to_string(),
        dest,
        gateway,
    })
}

fn parse_dns(value: &str) -> Result<IpAddr, &'static str> {
    let addr: IpAddr = value.parse().map_err(|_| "not an IPv4 or IPv6 address")?;
    if !usable_host(&addr) {
        return Err("the address is unspecified, multicast or broadcast");
    }
    Ok(addr)
}

impl GuestNetConfig {
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.routes.is_empty() && self.dns.is_empty()
    }

    /// Reads the configuration from a kernel command line: every `gridnode.ip=`,
    /// `gridnode.route=` and `gridnode.dns=` word before a standalone `--`; other words are
    /// ignored. Any malformed or out-of-bounds value refuses the whole configuration.
    pub fn parse(cmdline: &str) -> Result<Self, GuestNetError> {
        let mut config = Self::default();
        for word in cmdline.split_ascii_whitespace() {
            if word == "--" {
                break;
            }
            let (param, value) = if let Some(v) = word.strip_prefix(IP_PARAM) {
                (IP_PARAM, v)
            } else if let Some(v) = word.strip_prefix(ROUTE_PARAM) {
                (ROUTE_PARAM, v)
            } else if let Some(v) = word.strip_prefix(DNS_PARAM) {
                (DNS_PARAM, v)
            } else {
                continue;
            };
            let bad = |why: &'static str| GuestNetError::Bad {
                param,
                value: value.chars().take(MAX_VALUE_LEN).collect(),
                why,
            };
            if value.len() > MAX_VALUE_LEN {
                return Err(bad("the value is too long"));
            }
            match param {
                IP_PARAM => config.addresses.push(parse_ip(value).map_err(bad)?),
                ROUTE_PARAM => config.routes.push(parse_route(value).map_err(bad)?),
                _ => config.dns.push(parse_dns(value).map_err(bad)?),
            }
        }
        config.check_bounds()?;
        Ok(config)
    }

    fn check_bounds(&self) -> Result<(), GuestNetError> {
        for (what, len, max) in [
            ("addresses", self.addresses.len(), MAX_ADDRESSES),
            ("routes", self.routes.len(), MAX_ROUTES),
            ("resolvers", self.dns.len(), MAX_DNS),
        ] {
            if len > max {
                return Err(GuestNetError::TooMany { what, max });
            }
        }
        Ok(())
    }

    /// Checks every field as [`Self::parse`] would (for a configuration built in code).
    pub fn validate(&self) -> Result<(), GuestNetError> {
        let parsed = Self::parse(&self.to_cmdline())?;
        if parsed != *self {
            return Err(GuestNetError::Bad {
                param: IP_PARAM,
                value: String::new(),
                why: "the configuration does not survive the kernel command line",
            });
        }
        Ok(())
    }

    /// The kernel arguments (space separated) that give the guest init this configuration.
    pub fn to_cmdline(&self) -> String {
        let mut words = Vec::new();
        for a in &self.addresses {
            words.push(format!("{IP_PARAM}{},{}/{}", a.ifname, a.addr, a.prefix));
        }
        for r in &self.routes {
            let dest = match r.dest {
                Some((addr, prefix)) => format!("{addr}/{prefix}"),
                None => "default".to_string(),
            };
            words.push(format!("{ROUTE_PARAM}{},{dest},{}", r.ifname, r.gateway));
        }
        for d in &self.dns {
            words.push(format!("{DNS_PARAM}{d}"));
        }
        words.join(" ")
    }

    /// /etc/resolv.conf for the resolvers (empty when there are none).
    pub fn resolv_conf(&self) -> String {
        self.dns
            .iter()
            .map(|d| format!("nameserver {d}\n"))
            .collect()
    }

    /// The interfaces named, in first-seen order (each brought up), without `lo`.
    pub fn interfaces(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let names = self
            .addresses
            .iter()
            .map(|a| a.ifname.as_str())
            .chain(self.routes.iter().map(|r| r.ifname.as_str()));
        for name in names {
            if name != "lo" && !out.contains(&name) {
                out.push(name);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GuestNetConfig {
        GuestNetConfig {
            addresses: vec![
                InterfaceAddress {
                    ifname: "eth0".into(),
                    addr: "10.0.2.2".parse().unwrap(),
                    prefix: 24,
                },
                InterfaceAddress {
                    ifname: "eth0".into(),
                    addr: "fd00::2".parse().unwrap(),
                    prefix: 64,
                },
            ],
            routes: vec![
                RouteSpec {
                    ifname: "eth0".into(),
                    dest: None,
                    gateway: "10.0.2.1".parse().unwrap(),
                },
                RouteSpec {
                    ifname: "eth0".into(),
                    dest: Some(("fd01::".parse().unwrap(), 48)),
                    gateway: "fd00::1".parse().unwrap(),
                },
            ],
            dns: vec![
                "10.0.2.1".parse().unwrap(),
                "2606:4700::1111".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn round_trip() {
        let config = sample();
        let line = config.to_cmdline();
        assert_eq!(
            line,
            "gridnode.ip=eth0,10.0.2.2/24 gridnode.ip=eth0,fd00::2/64 \
             gridnode.route=eth0,default,10.0.2.1 gridnode.route=eth0,fd01::/48,fd00::1 \
             gridnode.dns=10.0.2.1 gridnode.dns=2606:4700::1111"
        );
        let full =
            format!("console=ttyS0 gridnode.state=/dev/vda {line} -- gridnode.ip=x,1.2.3.4/8");
        assert_eq!(GuestNetConfig::parse(&full), Ok(config.clone()));
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.interfaces(), vec!["eth0"]);
        assert_eq!(
            config.resolv_conf(),
            "nameserver 10.0.2.1\nnameserver 2606:4700::1111\n"
        );
        assert_eq!(
            GuestNetConfig::parse("console=ttyS0"),
            Ok(GuestNetConfig::default())
        );
    }

    #[test]
    fn malformed_values_are_refused_with_reasons() {
        for bad in [
            "gridnode.ip=eth0",
            "gridnode.ip=eth0,10.0.2.2",
            "gridnode.ip=eth0,10.0.2.2/33",
            "gridnode.ip=eth0,10.0.2.2/+8",
            "gridnode.ip=eth0,10.0.2.2/",
            "gridnode.ip=eth0,fd00::1/129",
            "gridnode.ip=eth0,10.0.2.999/24",
            "gridnode.ip=,10.0.2.2/24",
            "gridnode.ip=../x,10.0.2.2/24",
            "gridnode.ip=averyveryverylongname,10.0.2.2/24",
            "gridnode.ip=eth0,0.0.0.0/0",
            "gridnode.ip=eth0,224.0.0.1/4",
            "gridnode.route=eth0,default",
            "gridnode.route=eth0,default,10.0.2.1,extra",
            "gridnode.route=eth0,10.0.0.0/8,fd00::1",
            "gridnode.route=eth0,10.0.0.1/8,10.0.2.1",
            "gridnode.route=eth0,default,0.0.0.0",
            "gridnode.dns=resolver",
            "gridnode.dns=ff02::1",
        ] {
            let err = GuestNetConfig::parse(bad).expect_err(bad);
            assert!(matches!(err, GuestNetError::Bad { .. }), "{bad}: {err}");
            assert!(!err.to_string().is_empty());
        }
        let long = format!("gridnode.dns={}", "1".repeat(10_000));
        let err = GuestNetConfig::parse(&long).unwrap_err().to_string();
        assert!(err.len() < 400, "the error quotes a bounded value");
        let many = (0..4)
            .map(|i| format!("gridnode.dns=10.0.0.{i}"))
            .collect::<Vec<_>>();
        assert_eq!(
            GuestNetConfig::parse(&many.join(" ")),
            Err(GuestNetError::TooMany {
                what: "resolvers",
                max: MAX_DNS
            })
        );
    }

    #[test]
    fn network_check() {
        assert!(is_network(&"10.0.0.0".parse().unwrap(), 8));
        assert!(!is_network(&"10.0.0.1".parse().unwrap(), 31));
        assert!(is_network(&"10.0.0.1".parse().unwrap(), 32));
        assert!(is_network(&"0.0.0.0".parse().unwrap(), 0));
        assert!(is_network(&"fd00::".parse().unwrap(), 16));
        assert!(!is_network(&"fd00::1".parse().unwrap(), 64));
    }
}
