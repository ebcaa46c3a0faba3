//! The guest's network configuration on its kernel command line, in the guest init's format
//! (the types and the rendering are `vm-spec`'s, shared with the guest init that parses them):
//! `gridnode.ip=<ifname>,<addr>/<prefix>` and
//! `gridnode.route=<ifname>,<dest>/<prefix>|default,<gateway>` (both repeatable, IPv4 or
//! IPv6), `gridnode.dns=<addr>` (repeatable, at most [`MAX_DNS`]); guest interfaces are eth0,
//! eth1, ... in spec order.

pub use vm_spec::net::guest::{GuestNetConfig, InterfaceAddress, RouteSpec, MAX_DNS};

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
        let text = c.to_cmdline();
        assert_eq!(
            text,
            "gridnode.ip=eth0,10.249.0.2/16 gridnode.ip=eth0,fd12:3456:789a::2/64 \
             gridnode.ip=eth1,10.20.1.2/24 gridnode.route=eth0,default,10.249.0.1 \
             gridnode.route=eth1,10.20.0.0/16,10.20.1.1 gridnode.dns=1.1.1.1 \
             gridnode.dns=2606:4700:4700::1111"
        );
        // What the guest init reads back is what the agent meant.
        assert_eq!(GuestNetConfig::parse(&text).unwrap(), c);
        assert_eq!(GuestNetConfig::default().to_cmdline(), "");
        assert_eq!(append("quiet", ""), "quiet");
        assert_eq!(append("", "a=b"), "a=b");
        assert_eq!(append("quiet ", "a=b"), "quiet a=b");
    }
}
