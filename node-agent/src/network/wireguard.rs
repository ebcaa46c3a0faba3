//! Kernel WireGuard: key parsing (base64 of 32 bytes, as `wg` prints them) and the device's
//! configuration (private key, listen port, peers with their allowed IPs and endpoints) over
//! generic netlink (the `wireguard` family), from whichever network namespace the calling
//! thread is in. The link itself is made with rtnetlink ([`super::links`]).

use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use futures::StreamExt;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardDeviceFlags, WireguardMessage, WireguardPeer, WireguardPeerAttribute,
    WireguardPeerFlags,
};

use super::ipam::Ipv4Net;
use super::NetError;

/// Seconds between keepalives to peers (keeps NAT mappings on the way open).
pub const KEEPALIVE_SECS: u16 = 25;

/// Parses a WireGuard key: base64 (standard, padded) of exactly 32 bytes.
pub fn parse_key(text: &str) -> Result<[u8; 32], String> {
    if text.len() != 44 {
        return Err(format!(
            "a WireGuard key is 44 characters of base64, this one has {}",
            text.len()
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("not base64: {e}"))?;
    bytes
        .try_into()
        .map_err(|_| "does not decode to 32 bytes".to_string())
}

pub fn encode_key(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// The public key of a private key.
pub fn public_key(private: &[u8; 32]) -> [u8; 32] {
    let secret = x25519_dalek::StaticSecret::from(*private);
    *x25519_dalek::PublicKey::from(&secret).as_bytes()
}

/// A new private key and its public key (tests and tools).
pub fn generate_keypair() -> ([u8; 32], [u8; 32]) {
    let secret = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
    (
        secret.to_bytes(),
        *x25519_dalek::PublicKey::from(&secret).as_bytes(),
    )
}

/// One peer of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub public_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    pub allowed: Vec<Ipv4Net>,
}

/// What a device is set to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub private_key: [u8; 32],
    pub listen_port: u16,
    pub peers: Vec<Peer>,
}

/// Sets the device `ifname` (in the calling thread's namespace) to `config`, replacing its
/// peers: applying the same config again changes nothing a running tunnel notices.
pub async fn configure(ifname: &str, config: &DeviceConfig) -> Result<(), NetError> {
    let (conn, mut handle, _) = genetlink::new_connection()
        .map_err(|e| NetError::io("opening a generic netlink socket", e))?;
    tokio::spawn(conn);
    let peers = config
        .peers
        .iter()
        .map(|p| {
            let mut attrs = vec![
                WireguardPeerAttribute::PublicKey(p.public_key),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
                WireguardPeerAttribute::PersistentKeepalive(KEEPALIVE_SECS),
                WireguardPeerAttribute::AllowedIps(
                    p.allowed
                        .iter()
                        .map(|n| {
                            WireguardAllowedIp(vec![
                                WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
                                WireguardAllowedIpAttr::IpAddr(IpAddr::V4(n.addr())),
                                WireguardAllowedIpAttr::Cidr(n.prefix()),
                            ])
                        })
                        .collect(),
                ),
            ];
            if let Some(ep) = p.endpoint {
                attrs.push(WireguardPeerAttribute::Endpoint(ep));
            }
            WireguardPeer(attrs)
        })
        .collect();
    let msg = WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes: vec![
            WireguardAttribute::IfName(ifname.to_string()),
            WireguardAttribute::PrivateKey(config.private_key),
            WireguardAttribute::ListenPort(config.listen_port),
            WireguardAttribute::Flags(WireguardDeviceFlags::ReplacePeers),
            WireguardAttribute::Peers(peers),
        ],
    };
    let mut nl = NetlinkMessage::from(GenlMessage::from_payload(msg));
    nl.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut replies = handle
        .request(nl)
        .await
        .map_err(|e| NetError::Netlink(format!("configuring WireGuard link {ifname}: {e}")))?;
    while let Some(reply) = replies.next().await {
        let reply = reply
            .map_err(|e| NetError::Netlink(format!("configuring WireGuard link {ifname}: {e}")))?;
        if let NetlinkPayload::Error(e) = reply.payload {
            if e.code.is_some() {
                return Err(NetError::Netlink(format!(
                    "configuring WireGuard link {ifname}: {}",
                    e.to_io()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_strictly_and_public_keys_derive() {
        let (private, public) = generate_keypair();
        assert_eq!(public_key(&private), public);
        let text = encode_key(&private);
        assert_eq!(parse_key(&text).unwrap(), private);
        assert!(parse_key("abc").unwrap_err().contains("44"));
        assert!(parse_key(&"!".repeat(44)).unwrap_err().contains("base64"));
        // 44 characters of base64 that decode to 33 bytes do not exist; 43 + '=' is 32.
        assert!(parse_key(&format!("{}==", &text[..42])).is_err());
        // The RFC 7748 test vector (Alice).
        let alice = hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
            .unwrap();
        let alice: [u8; 32] = alice.try_into().unwrap();
        assert_eq!(
            hex::encode(public_key(&alice)),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }
}
