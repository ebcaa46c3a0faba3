//! Names and hardware addresses of what the agent creates: every kernel object it owns starts
//! with `gn-`, so reconciliation can tell its objects from the operator's. Names the tenant
//! writes (network names) never reach the kernel: they are hashed into short ids, so a name
//! cannot be too long for IFNAMSIZ (15 bytes), collide with the node's own interfaces, or carry
//! odd characters into a path under the namespace directory.

/// Prefix of every link, namespace and the nftables table the agent owns.
pub const PREFIX: &str = "gn-";
/// The node's NAT bridge (in the agent's namespace).
pub const NAT_BRIDGE: &str = "gn-br0";
/// The bridge of a private network's subnet, inside the network's namespace.
pub const NETWORK_BRIDGE: &str = "gn-br";
/// The nftables table (family `inet`) holding the NAT and port forwards.
pub const NFT_TABLE: &str = "gridnode";
/// Prefix of VM taps.
pub const TAP_PREFIX: &str = "gn-t";
/// Prefix of WireGuard links.
pub const WG_PREFIX: &str = "gn-w";

fn short_hash(context: &str, parts: &str, hex_len: usize) -> String {
    let h = blake3::derive_key(context, parts.as_bytes());
    hex::encode(h)[..hex_len].to_string()
}

/// The tap of interface `iface` of a VM: `gn-t` + 10 hex digits (14 bytes).
pub fn tap_name(twin_id: u32, deployment_id: u64, vm: &str, iface: u32) -> String {
    format!(
        "{TAP_PREFIX}{}",
        short_hash(
            "gridnode tap name v1",
            &format!("{twin_id}/{deployment_id}/{vm}/{iface}"),
            10
        )
    )
}

/// The namespace of a private network: `gn-<owner twin>-<8 hex digits of the name>`.
pub fn netns_name(twin_id: u32, network: &str) -> String {
    format!(
        "{PREFIX}{twin_id}-{}",
        short_hash("gridnode netns name v1", &format!("{twin_id}/{network}"), 8)
    )
}

/// The WireGuard link of a private network: `gn-w` + 10 hex digits. It is created in the
/// agent's namespace (so it needs a node-wide unique name) and moved into the network's.
pub fn wg_name(twin_id: u32, network: &str) -> String {
    format!(
        "{WG_PREFIX}{}",
        short_hash("gridnode wg name v1", &format!("{twin_id}/{network}"), 10)
    )
}

/// The MAC of a VM interface: locally administered, unicast, derived from the same key as the
/// tap's name, so a VM keeps its MAC across restarts of the VM and of the agent.
pub fn mac(twin_id: u32, deployment_id: u64, vm: &str, iface: u32) -> [u8; 6] {
    let h = blake3::derive_key(
        "gridnode vm mac v1",
        format!("{twin_id}/{deployment_id}/{vm}/{iface}").as_bytes(),
    );
    let mut m = [0u8; 6];
    m.copy_from_slice(&h[..6]);
    m[0] = (m[0] & 0xfc) | 0x02;
    m
}

/// The guest's name of its `n`th interface (spec order).
pub fn guest_ifname(n: usize) -> String {
    format!("eth{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz_are_stable_and_hide_tenant_input() {
        let hostile = "x".repeat(48) + "/../../etc;rm -rf";
        for name in [
            tap_name(u32::MAX, u64::MAX, &hostile, 9),
            wg_name(u32::MAX, &hostile),
            NAT_BRIDGE.to_string(),
            NETWORK_BRIDGE.to_string(),
        ] {
            assert!(name.len() <= 15, "{name}");
            assert!(name.starts_with(PREFIX));
            assert!(name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        }
        let ns = netns_name(u32::MAX, &hostile);
        assert_eq!(ns.len(), "gn-4294967295-".len() + 8);
        assert!(!ns.contains('/') && !ns.contains('.'));
        assert_eq!(tap_name(1, 2, "web", 0), tap_name(1, 2, "web", 0));
        assert_ne!(tap_name(1, 2, "web", 0), tap_name(1, 2, "web", 1));
        assert_ne!(tap_name(1, 2, "web", 0), tap_name(1, 3, "web", 0));
        // Two owners with the same network name get different namespaces and links.
        assert_ne!(netns_name(1, "net"), netns_name(2, "net"));
        assert_ne!(wg_name(1, "net"), wg_name(2, "net"));
    }

    #[test]
    fn macs_are_local_unicast_and_stable() {
        let m = mac(1, 2, "web", 0);
        assert_eq!(m[0] & 0x01, 0, "unicast");
        assert_eq!(m[0] & 0x02, 0x02, "locally administered");
        assert_eq!(m, mac(1, 2, "web", 0));
        assert_ne!(m, mac(1, 2, "web", 1));
        assert!(vm_spec::MacAddr(m).is_valid_unicast());
    }
}
