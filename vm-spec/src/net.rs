//! Network interfaces (virtio-net over a host tap device): their spec, the CLI form, and
//! validation. The tap is made by the caller (the node agent) and handed over by name
//! (`tap`) or as an inherited descriptor (`fd`); the vmm opens it before it confines itself.
//! The guest's addresses, routes and resolvers are the guest init's business: see
//! [`guest`] (the `gridnode.ip=`/`gridnode.route=`/`gridnode.dns=` kernel arguments).

pub mod guest;

use serde::{Deserialize, Serialize};

pub use guest::{GuestNetConfig, GuestNetError, InterfaceAddress, RouteSpec};

use crate::rate_limiter::{RateLimiterError, RateLimiterSpec};

/// Most network interfaces of one VM.
pub const MAX_NET_DEVICES: usize = 8;
/// Longest interface id (it names the device in the control API and its worker thread).
pub const MAX_NET_ID_LEN: usize = 32;
/// Longest tap name: IFNAMSIZ (16) less the NUL.
pub const MAX_TAP_NAME_LEN: usize = 15;

/// A MAC address, written `02:00:0a:00:02:02` in the spec and on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Unicast (bit 0 of the first byte clear) and not all zeros.
    pub fn is_valid_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl std::str::FromStr for MacAddr {
    type Err = NetSpecError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || NetSpecError::BadMac(text.chars().take(64).collect());
        let mut out = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A network interface's limits, per direction: `rx` is host-to-guest (frames the device
/// reads from the tap), `tx` guest-to-host. Each a bytes bucket and a frames (`ops`) bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRateLimiterSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx: Option<RateLimiterSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx: Option<RateLimiterSpec>,
}

impl NetRateLimiterSpec {
    pub fn validate(&self) -> Result<(), RateLimiterError> {
        for limits in [&self.rx, &self.tx].into_iter().flatten() {
            limits.validate()?;
        }
        Ok(())
    }
}

/// One virtio-net interface over a host tap device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    /// The interface's name in the spec and the control API: letters, digits, `-`, `_`.
    pub id: String,
    /// The host tap device, opened by name (exactly one of `tap` and `fd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// A tap queue descriptor the vmm inherits, opened by its parent with
    /// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (for a vmm in a network namespace of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    /// The guest's MAC address (VIRTIO_NET_F_MAC); the guest picks a random one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<NetRateLimiterSpec>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetSpecError {
    #[error("net id {0:?} must be 1 to {MAX_NET_ID_LEN} letters, digits, '-' or '_'")]
    BadId(String),
    #[error("net id {0:?} is used twice (by an interface, a drive, a share's tag, \"rng\" or \"vsock\")")]
    DuplicateId(String),
    #[error("net {0:?}: give exactly one of tap=NAME and fd=N")]
    TapOrFd(String),
    #[error("net {id:?}: tap name {name:?} must be 1 to {MAX_TAP_NAME_LEN} letters, digits, '-', '_' or '.'")]
    BadTap { id: String, name: String },
    #[error("net {id:?}: fd {fd} is not an inherited descriptor (3 or more)")]
    BadFd { id: String, fd: i32 },
    #[error("MAC address {0:?} must be six hex bytes separated by ':' (02:00:0a:00:02:02)")]
    BadMac(String),
    #[error("net {id:?}: MAC {mac} is multicast or all zeros")]
    MacNotUnicast { id: String, mac: MacAddr },
    #[error("net {0:?}: its MAC is used by another interface")]
    DuplicateMac(String),
    #[error("net {id:?}: {source}")]
    RateLimiter {
        id: String,
        source: RateLimiterError,
    },
    #[error("{0} network interfaces given; at most {MAX_NET_DEVICES}")]
    TooMany(usize),
    #[error("--net takes id=ID,tap=NAME|fd=N[,mac=MAC], not {0:?}")]
    BadFlag(String),
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_NET_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `name` is a safe interface name (also used for the guest's interface names).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TAP_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl NetSpec {
    pub fn validate(&self) -> Result<(), NetSpecError> {
        let id = &self.id;
        if !valid_id(id) {
            return Err(NetSpecError::BadId(id.clone()));
        }
        match (&self.tap, self.fd) {
            (Some(name), None) => {
                if !valid_ifname(name) {
                    return Err(NetSpecError::BadTap {
                        id: id.clone(),
                        name: name.clone(),
                    });
                }
            }
            (None, Some(fd)) => {
                if fd < 3 {
                    return Err(NetSpecError::BadFd { id: id.clone(), fd });
                }
            }
            _ => return Err(NetSpecError::TapOrFd(id.clone())),
        }
        if let Some(mac) = self.mac.filter(|m| !m.is_valid_unicast()) {
            return Err(NetSpecError::MacNotUnicast {
                id: id.clone(),
                mac,
            });
        }
        if let Some(limits) = &self.rate_limiter {
            limits
                .validate()
                .map_err(|source| NetSpecError::RateLimiter {
                    id: id.clone(),
                    source,
                })?;
        }
        Ok(())
    }
}

/// Checks every interface, and that ids and MACs are unique among them (the spec checks ids
/// against the other devices).
pub fn validate(nets: &[NetSpec]) -> Result<(), NetSpecError> {
    if nets.len() > MAX_NET_DEVICES {
        return Err(NetSpecError::TooMany(nets.len()));
    }
    for (i, net) in nets.iter().enumerate() {
        net.validate()?;
        let earlier = &nets[..i];
        if earlier.iter().any(|n| n.id == net.id) {
            return Err(NetSpecError::DuplicateId(net.id.clone()));
        }
        if net.mac.is_some() && earlier.iter().any(|n| n.mac == net.mac) {
            return Err(NetSpecError::DuplicateMac(net.id.clone()));
        }
    }
    Ok(())
}

impl std::str::FromStr for NetSpec {
    type Err = NetSpecError;

    /// Parses the CLI form `id=ID,tap=NAME|fd=N[,mac=MAC]`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || NetSpecError::BadFlag(text.chars().take(200).collect());
        let mut net = NetSpec::default();
        for part in text.split(',') {
            match part.split_once('=') {
                Some(("id", v)) if net.id.is_empty() => net.id = v.to_string(),
                Some(("tap", v)) if net.tap.is_none() => net.tap = Some(v.to_string()),
                Some(("fd", v)) if net.fd.is_none() => net.fd = Some(v.parse().map_err(|_| bad())?),
                Some(("mac", v)) if net.mac.is_none() => net.mac = Some(v.parse()?),
                _ => return Err(bad()),
            }
        }
        if net.id.is_empty() {
            return Err(bad());
        }
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limiter::TokenBucketSpec;

    fn tap(id: &str, name: &str) -> NetSpec {
        NetSpec {
            id: id.into(),
            tap: Some(name.into()),
            ..Default::default()
        }
    }

    #[test]
    fn cli_form() {
        let n: NetSpec = "id=net0,tap=tap0,mac=02:00:0A:00:02:02".parse().unwrap();
        assert_eq!(n.id, "net0");
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(n.mac, Some(MacAddr([2, 0, 10, 0, 2, 2])));
        assert_eq!(n.mac.unwrap().to_string(), "02:00:0a:00:02:02");
        let n: NetSpec = "id=n,fd=7".parse().unwrap();
        assert_eq!(n.fd, Some(7));
        assert_eq!(n.validate(), Ok(()));
        for bad in [
            "tap=tap0",
            "id=a,tap=t,tap=u",
            "id=a,fd=x",
            "id=a,mac=02:00:00:00:00",
            "id=a,mac=02:00:00:00:00:00:00",
            "id=a,mac=2:0:0:0:0:1",
            "id=a,tap=t,bogus=1",
            "id=a,tap=t,ro",
        ] {
            assert!(bad.parse::<NetSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn json_form_is_strict() {
        let n: NetSpec = serde_json::from_str(
            r#"{"id": "net0", "tap": "tap0", "mac": "02:00:00:00:00:01",
                "rate_limiter": {"rx": {"bandwidth": {"size": 1000, "refill_time_ms": 100}},
                                 "tx": {"ops": {"size": 10, "refill_time_ms": 1000}}}}"#,
        )
        .unwrap();
        assert_eq!(n.validate(), Ok(()));
        let limits = n.rate_limiter.unwrap();
        assert_eq!(limits.rx.unwrap().bandwidth.unwrap().size, 1000);
        assert_eq!(limits.tx.unwrap().ops.unwrap().size, 10);
        let back: NetSpec = serde_json::from_str(&serde_json::to_string(&n).unwrap()).unwrap();
        assert_eq!(back, n);
        for bad in [
            r#"{"id": "n", "tap": "t", "mtu": 9000}"#,
            r#"{"id": "n", "tap": "t", "mac": "zz:00:00:00:00:01"}"#,
            r#"{"id": "n", "tap": "t", "rate_limiter": {"bandwidth": {"size": 1, "refill_time_ms": 1}}}"#,
        ] {
            assert!(serde_json::from_str::<NetSpec>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation() {
        assert_eq!(validate(&[tap("a", "tap0"), tap("b", "tap1")]), Ok(()));
        assert!(matches!(
            validate(&[tap("a", "tap0"), tap("a", "tap1")]),
            Err(NetSpecError::DuplicateId(_))
        ));
        for name in ["", "x".repeat(16).as_str(), "a/b", "..", "t p"] {
            assert!(
                matches!(tap("a", name).validate(), Err(NetSpecError::BadTap { .. })),
                "{name:?}"
            );
        }
        let mut both = tap("a", "t");
        both.fd = Some(4);
        assert_eq!(both.validate(), Err(NetSpecError::TapOrFd("a".into())));
        let neither = NetSpec {
            id: "a".into(),
            ..Default::default()
        };
        assert_eq!(neither.validate(), Err(NetSpecError::TapOrFd("a".into())));
        let stdin = NetSpec {
            id: "a".into(),
            fd: Some(0),
            ..Default::default()
        };
        assert!(matches!(stdin.validate(), Err(NetSpecError::BadFd { .. })));
        let mut multicast = tap("a", "t");
        multicast.mac = Some(MacAddr([1, 0, 0, 0, 0, 1]));
        assert!(matches!(
            multicast.validate(),
            Err(NetSpecError::MacNotUnicast { .. })
        ));
        let mut m1 = tap("a", "t0");
        m1.mac = Some(MacAddr([2, 0, 0, 0, 0, 1]));
        let mut m2 = tap("b", "t1");
        m2.mac = m1.mac;
        assert_eq!(
            validate(&[m1, m2]),
            Err(NetSpecError::DuplicateMac("b".into()))
        );
        let mut limited = tap("a", "t");
        limited.rate_limiter = Some(NetRateLimiterSpec {
            rx: None,
            tx: Some(RateLimiterSpec {
                bandwidth: Some(TokenBucketSpec {
                    size: 0,
                    refill_time_ms: 1,
                    one_time_burst: None,
                }),
                ops: None,
            }),
        });
        assert!(matches!(
            limited.validate(),
            Err(NetSpecError::RateLimiter { .. })
        ));
        let many: Vec<NetSpec> = (0..9).map(|i| tap(&format!("n{i}"), "t")).collect();
        assert_eq!(validate(&many), Err(NetSpecError::TooMany(9)));
    }
}
