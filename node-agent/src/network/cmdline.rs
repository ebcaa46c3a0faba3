//! The guest's network configuration on its kernel command line, in the guest init's format:
//! `gridnode.ip=<ifname>,<addr>/<prefix>` and `gridnode.route=<ifname>,<dest>/<prefix>|default,<gateway>`
//! (both repeatable, IPv4 or IPv6), `gridnode.dns=<addr>` (repeatable); guest interfaces are
//! eth0, eth1, ... in spec order.
//!
//! Kept apart so it can be swapped for the `vm-spec` helper that produces the same format once
//! the vmm's virtio-net branch lands: the types here have the names and fields of
//! `vm_spec::net::{GuestNetConfig, InterfaceAddress, RouteSpec}` there, so the swap is a
//! `pub use` of those in place of this file's definitions.

/// Most name servers the guest init takes.
pub const MAX_DNS: usize = 3;

use std::net::IpAddr;

/// An address of a guest interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub ifname: String,
    pub addr: IpAddr,
    pub prefix: u8,
}

/// A route of the guest: `dest` None is the default route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub ifname: String,
    pub dest: Option<(IpAddr, u8)>,
    pub gateway: IpAddr,
}

/// What the guest init configures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestNetConfig {
    pub addresses: Vec<InterfaceAddress>,
    pub routes: Vec<RouteSpec>,
    pub dns: Vec<IpAddr>,
}

impl GuestNetConfig {
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.routes.is_empty() && self.dns.is_empty()
    }

    /// The kernel command-line parameters, space separated (empty when there is nothing).
    pub fn to_cmdline(&self) -> String {
        let mut out: Vec<String> = Vec::new();
        for a in &self.addresses {
            out.push(format!("gridnode.ip={},{}/{}", a.ifname, a.addr, a.prefix));
        }
        for r in &self.routes {
            let dest = match r.dest {
                Some((addr, prefix)) => format!("{addr}/{prefix}"),
                None => "default".to_string(),
            };
            out.push(format!("gridnode.route={},{dest},{}", r.ifname, r.gateway));
        }
        for d in &self.dns {
            out.push(format!("gridnode.dns={d}"));
        }
        out.join(" ")
    }
}

/// Appends `params` to a command line.
pub fn append(cmdline: &str, params: &str) -> String {
    match (cmdline.trim().is_empty(), params.is_empty()) {
        (_, true) => cmdline.to_string(),
        (true, false) => params.to_string(),
        (false, false) => format!("{} {params}", cmdline.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_guest_init_format() {
        let c = GuestNetConfig {
            addresses: vec![
                InterfaceAddress {
                    ifname: "eth0".into(),
                    addr: "10.249.0.2".parse().unwrap(),
                    prefix: 16,
                },
                InterfaceAddress {
                    ifname: "eth0".into(),
                    addr: "fd12:3456:789a::2".parse().unwrap(),
                    prefix: 64,
                },
                InterfaceAddress {
                    ifname: "eth1".into(),
                    addr: "10.20.1.2".parse().unwrap(),
                    prefix: 24,
                },
            ],
            routes: vec![
                RouteSpec {
                    ifname: "eth0".into(),
                    dest: None,
                    gateway: "10.249.0.1".parse().unwrap(),
                },
                RouteSpec {
                    ifname: "eth1".into(),
                    dest: Some(("10.20.0.0".parse().unwrap(), 16)),
                    gateway: "10.20.1.1".parse().unwrap(),
                },
            ],
            dns: vec![
                "1.1.1.1".parse().unwrap(),
                "2606:4700:4700::1111".parse().unwrap(),
            ],
        };
        assert_eq!(
            c.to_cmdline(),
            "gridnode.ip=eth0,10.249.0.2/16 gridnode.ip=eth0,fd12:3456:789a::2/64 \
             gridnode.ip=eth1,10.20.1.2/24 gridnode.route=eth0,default,10.249.0.1 \
             gridnode.route=eth1,10.20.0.0/16,10.20.1.1 gridnode.dns=1.1.1.1 \
             gridnode.dns=2606:4700:4700::1111"
        );
        assert_eq!(GuestNetConfig::default().to_cmdline(), "");
        assert_eq!(append("quiet", ""), "quiet");
        assert_eq!(append("", "a=b"), "a=b");
        assert_eq!(append("quiet ", "a=b"), "quiet a=b");
    }
}
