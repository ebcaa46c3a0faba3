//! The guest's network, set up before the entrypoint runs: `lo` is always brought up; the
//! interfaces, addresses (IPv4 and IPv6), routes and resolvers given on the kernel command
//! line (`gridnode.ip=`, `gridnode.route=`, `gridnode.dns=`; the format and its parser live
//! in vm-spec, `net/guest.rs`, included here as a module) are applied through rtnetlink
//! requests built below (the syscalls are in `netlink`). Interfaces are named by the guest
//! kernel: eth0, eth1, ... in the order of the VM spec's `net` list.

#[path = "../../../vm-spec/src/net/guest.rs"]
#[allow(dead_code)]
mod guest;

use std::net::IpAddr;
use std::time::{Duration, Instant};

pub use guest::GuestNetConfig;

use crate::netlink::{interface_index, RouteSocket};

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// No duplicate address detection: an IPv6 address is usable at once (the VM's addresses
/// are assigned by the node).
const IFA_F_NODAD: u8 = 0x02;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;
const IFF_UP: u32 = 1;

/// How long an interface named on the command line may take to appear.
const INTERFACE_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network configuration on the kernel command line: {0}")]
    Config(#[from] guest::GuestNetError),
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("no network interface {0:?} (interfaces are eth0, eth1, ... in the spec's order)")]
    NoInterface(String),
    #[error("{what}: {source}")]
    Request {
        what: String,
        source: std::io::Error,
    },
}

fn family(addr: &IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

fn octets(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// A netlink request: header, fixed part, attributes.
struct Message {
    buf: Vec<u8>,
}

impl Message {
    fn new(kind: u16, flags: u16, seq: u32, fixed: &[u8]) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(fixed);
        Self { buf }
    }

    fn attr(mut self, kind: u16, data: &[u8]) -> Self {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// The error code of the acknowledgement of request `seq` in `reply`: `Some(0)` for success,
/// `Some(-errno)` for a failure, `None` when the reply holds none.
fn ack_of(reply: &[u8], seq: u32) -> Option<i32> {
    let mut at = 0usize;
    while at + 16 <= reply.len() {
        let word = |o: usize| {
            reply
                .get(at + o..at + o + 4)
                .and_then(|b| b.try_into().ok())
        };
        let len = u32::from_ne_bytes(word(0)?) as usize;
        let kind = u16::from_ne_bytes(reply.get(at + 4..at + 6)?.try_into().ok()?);
        let msg_seq = u32::from_ne_bytes(word(8)?);
        if len < 16 {
            return None;
        }
        if kind == NLMSG_ERROR && msg_seq == seq {
            return Some(i32::from_ne_bytes(word(16)?));
        }
        at += len.next_multiple_of(4);
    }
    None
}

struct Rtnl {
    socket: RouteSocket,
    seq: u32,
}

impl Rtnl {
    fn request(&mut self, what: impl Fn() -> String, message: Message) -> Result<(), NetError> {
        let seq = self.seq;
        let failed = |source| NetError::Request {
            what: what(),
            source,
        };
        self.socket.send(&message.finish()).map_err(failed)?;
        let mut reply = vec![0u8; 8192];
        loop {
            let n = self.socket.recv(&mut reply).map_err(failed)?;
            match ack_of(&reply[..n], seq) {
                Some(0) => return Ok(()),
                Some(code) => {
                    return Err(failed(std::io::Error::from_raw_os_error(
                        code.saturating_neg(),
                    )))
                }
                None => continue,
            }
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn link_up(&mut self, name: &str, index: u32) -> Result<(), NetError> {
        let mut ifinfo = [0u8; 16];
        ifinfo[0] = libc::AF_UNSPEC as u8;
        ifinfo[4..8].copy_from_slice(&index.to_ne_bytes());
        ifinfo[8..12].copy_from_slice(&IFF_UP.to_ne_bytes());
        ifinfo[12..16].copy_from_slice(&IFF_UP.to_ne_bytes());
        let seq = self.next_seq();
        let message = Message::new(RTM_NEWLINK, 0, seq, &ifinfo);
        self.request(|| format!("bringing {name} up"), message)
    }

    fn add_address(&mut self, a: &guest::InterfaceAddress, index: u32) -> Result<(), NetError> {
        let mut ifaddr = [0u8; 8];
        ifaddr[0] = family(&a.addr);
        ifaddr[1] = a.prefix;
        ifaddr[2] = if a.addr.is_ipv6() { IFA_F_NODAD } else { 0 };
        ifaddr[3] = RT_SCOPE_UNIVERSE;
        ifaddr[4..8].copy_from_slice(&index.to_ne_bytes());
        let addr = octets(&a.addr);
        let seq = self.next_seq();
        let message = Message::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, seq, &ifaddr)
            .attr(IFA_LOCAL, &addr)
            .attr(IFA_ADDRESS, &addr);
        self.request(
            || format!("adding {}/{} to {}", a.addr, a.prefix, a.ifname),
            message,
        )
    }

    fn add_route(&mut self, r: &guest::RouteSpec, index: u32) -> Result<(), NetError> {
        let mut rtmsg = [0u8; 12];
        rtmsg[0] = family(&r.gateway);
        rtmsg[1] = r.dest.map(|(_, prefix)| prefix).unwrap_or(0);
        rtmsg[4] = RT_TABLE_MAIN;
        rtmsg[5] = RTPROT_BOOT;
        rtmsg[6] = RT_SCOPE_UNIVERSE;
        rtmsg[7] = RTN_UNICAST;
        let seq = self.next_seq();
        let mut message = Message::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, seq, &rtmsg);
        if let Some((dest, _)) = &r.dest {
            message = message.attr(RTA_DST, &octets(dest));
        }
        let message = message
            .attr(RTA_GATEWAY, &octets(&r.gateway))
            .attr(RTA_OIF, &index.to_ne_bytes());
        let dest = r
            .dest
            .map(|(a, p)| format!("{a}/{p}"))
            .unwrap_or_else(|| "default".into());
        self.request(
            || format!("adding the route {dest} via {} on {}", r.gateway, r.ifname),
            message,
        )
    }
}

/// The index of `name`, waiting a little for the kernel to have made it.
fn wait_for_interface(name: &str) -> Result<u32, NetError> {
    let deadline = Instant::now() + INTERFACE_WAIT;
    loop {
        if let Some(index) = interface_index(name) {
            return Ok(index);
        }
        if Instant::now() > deadline {
            return Err(NetError::NoInterface(name.to_string()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads the configuration from `cmdline` and applies it (lo first). Refuses a malformed
/// configuration whole, before touching anything but lo.
pub fn configure(cmdline: &str) -> Result<GuestNetConfig, NetError> {
    let parsed = GuestNetConfig::parse(cmdline);
    let mut rtnl = Rtnl {
        socket: RouteSocket::open().map_err(NetError::Socket)?,
        seq: 0,
    };
    if let Some(lo) = interface_index("lo") {
        rtnl.link_up("lo", lo)?;
    }
    let config = parsed?;
    for name in config.interfaces() {
        let index = wait_for_interface(name)?;
        rtnl.link_up(name, index)?;
    }
    for a in &config.addresses {
        let index = wait_for_interface(&a.ifname)?;
        rtnl.add_address(a, index)?;
    }
    for r in &config.routes {
        let index = wait_for_interface(&r.ifname)?;
        rtnl.add_route(r, index)?;
    }
    Ok(config)
}

/// Writes /etc/resolv.conf for the configuration's resolvers; skipped (with a log line) when
/// the root is read-only.
pub fn write_resolv_conf(config: &GuestNetConfig) {
    if config.dns.is_empty() {
        return;
    }
    let written = std::fs::create_dir_all("/etc")
        .and_then(|()| std::fs::write("/etc/resolv.conf", config.resolv_conf()));
    match written {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
            crate::console::log("the root filesystem is read-only: /etc/resolv.conf not written")
        }
        Err(e) => crate::console::log(&format!("cannot write /etc/resolv.conf: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_laid_out_as_netlink_wants() {
        let m = Message::new(RTM_NEWADDR, NLM_F_CREATE, 7, &[1, 2, 3, 4, 5, 6, 7, 8])
            .attr(IFA_LOCAL, &[10, 0, 2, 2])
            .attr(RTA_DST, &[1, 2, 3])
            .finish();
        assert_eq!(m.len(), 16 + 8 + 8 + 8);
        assert_eq!(u32::from_ne_bytes(m[..4].try_into().unwrap()), 40);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), RTM_NEWADDR);
        assert_eq!(
            u16::from_ne_bytes(m[6..8].try_into().unwrap()),
            NLM_F_CREATE | NLM_F_REQUEST | NLM_F_ACK
        );
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(&m[24..32], &[8, 0, 2, 0, 10, 0, 2, 2]);
        assert_eq!(&m[32..40], &[7, 0, 1, 0, 1, 2, 3, 0], "padded to 4 bytes");
    }

    #[test]
    fn acknowledgements_are_found_by_sequence() {
        let ack = |seq: u32, code: i32| {
            let mut m = Vec::new();
            m.extend_from_slice(&36u32.to_ne_bytes());
            m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&seq.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(&code.to_ne_bytes());
            m.extend_from_slice(&[0u8; 16]);
            m
        };
        let mut two = ack(3, -17);
        two.extend_from_slice(&ack(4, 0));
        assert_eq!(ack_of(&two, 3), Some(-17));
        assert_eq!(ack_of(&two, 4), Some(0));
        assert_eq!(ack_of(&two, 5), None);
        assert_eq!(ack_of(&two[..18], 3), None, "truncated");
        assert_eq!(ack_of(&[0u8; 40], 0), None, "a zero length stops the walk");
    }
}
