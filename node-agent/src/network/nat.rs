//! The node's NAT and port forwards in nftables: one table, `inet gridnode`, that the agent
//! owns whole and never shares with the operator's rules. It is written from the desired
//! state in one nfnetlink batch (`add table; delete table; add table; chains; rules`), which
//! the kernel applies atomically: no moment without NAT, no half-written ruleset, nothing of
//! another table touched. Connections already tracked keep their translation across a rewrite.
//!
//! Chains: `prerouting` (nat, dstnat priority) holds one DNAT rule per port forward
//! (`iifname <uplink> <proto> dport <host_port> dnat ip to <vm>:<vm_port>`); `postrouting`
//! (nat, srcnat priority) masquerades the node's private IPv4 range and its IPv6 ULA /64 out of
//! the uplink; `forward` (filter) accepts established traffic, the bridge's traffic to the
//! uplink and each forwarded port, so a node whose other rules forward nothing still forwards
//! what the agent set up (an operator's drop in another table still wins: that is theirs), and
//! drops any other traffic into or out of the NAT bridge; `input` (filter) lets VMs reach the
//! node itself only with answers, ICMP and IPv6 neighbour discovery.
//!
//! Anti-spoofing: a second table, `netdev gridnode`, in the same batch, has one chain per tap
//! on the NAT bridge, on the tap's ingress (every frame the VM sends, before the bridge sees
//! it). A frame passes only with the VM's own MAC as its source and, by type: IPv4 from the
//! VM's address; ARP whose sender is the VM's MAC and address; IPv6 from the VM's ULA address,
//! a link-local address or `::` (duplicate address detection). Everything else (other types,
//! VLAN tags) is dropped. So a VM cannot take another VM's address on the bridge and draw its
//! traffic (the node's ARP cache, its port forwards) to itself.
//!
//! Encoding: the nf_tables netlink messages are built here on a raw `NETLINK_NETFILTER`
//! socket (a few hundred lines we own). Considered: `rustables` (pure-Rust netlink, but
//! GPL-3.0, which this Apache-2.0 project cannot link without changing its licence),
//! `nftnl`/`mnl` (bindings to libnftnl and libmnl: C libraries on every node image), the
//! `nftables` crate (drives the `nft` binary through JSON: a process and its libraries per
//! change, and its JSON differs between nft versions).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::ipam::Ipv4Net;
use super::naming::NFT_TABLE;
use super::NetError;
use crate::deployment::Protocol;

/// What the NAT is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatConfig {
    /// The node's uplink interface.
    pub uplink: String,
    /// The NAT bridge.
    pub bridge: String,
    pub v4_range: Ipv4Net,
    /// The ULA /64 masqueraded too (None: IPv4 only).
    pub v6_prefix: Option<Ipv6Addr>,
}

/// A tap on the NAT bridge and the addresses its VM may send from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct GuardedTap {
    pub name: String,
    pub mac: [u8; 6],
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
}

/// One port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Forward {
    pub protocol: Protocol,
    pub host_port: u16,
    pub vm_addr: Ipv4Addr,
    pub vm_port: u16,
}

// --- netlink and nf_tables constants (linux/netlink.h, linux/netfilter/nf_tables.h) ---
const NETLINK_NETFILTER: i32 = 12;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_NETDEV: u8 = 5;
const NFPROTO_IPV6: u8 = 10;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_HOOK_DEV: u16 = 3;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;

const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_FORWARD: u32 = 2;
const NF_INET_POST_ROUTING: u32 = 4;
const NF_NETDEV_INGRESS: u32 = 0;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_PAYLOAD_LL_HEADER: u32 = 0;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CT_STATE: u32 = 0;
const NFT_NAT_DNAT: u32 = 1;
/// `ct state established,related` bits (NF_CT_STATE_BIT of IP_CT_ESTABLISHED and RELATED).
const CT_ESTABLISHED_RELATED: u32 = 0b110;

/// One nf_tables expression.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    Meta {
        key: u32,
        dreg: u32,
    },
    Cmp {
        sreg: u32,
        op: u32,
        data: Vec<u8>,
    },
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    Bitwise {
        sreg: u32,
        dreg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    Immediate {
        dreg: u32,
        data: Vec<u8>,
    },
    Accept,
    Drop,
    Ct {
        key: u32,
        dreg: u32,
    },
    Dnat4 {
        addr_reg: u32,
        proto_reg: u32,
    },
    Masq,
}

/// Builds netlink attributes into a byte buffer.
#[derive(Default)]
struct Buf(Vec<u8>);

impl Buf {
    fn align(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = (4 + data.len()) as u16;
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.align();
    }

    fn str(&mut self, ty: u16, s: &str) {
        let mut d = s.as_bytes().to_vec();
        d.push(0);
        self.attr(ty, &d);
    }

    fn u32be(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Buf)) {
        let start = self.0.len();
        self.0.extend_from_slice(&[0, 0]);
        self.0.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        f(self);
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.align();
    }

    fn data_value(&mut self, ty: u16, v: &[u8]) {
        self.nest(ty, |b| b.attr(NFTA_DATA_VALUE, v));
    }
}

/// A batch of nfnetlink messages.
struct Batch {
    buf: Vec<u8>,
    seq: u32,
    /// The family of the tables, chains and rules that follow (`inet` first).
    family: u8,
    /// Messages that ask for an acknowledgement, with what each does (for errors).
    acked: Vec<(u32, String)>,
}

impl Batch {
    fn new() -> Self {
        let mut b = Self {
            buf: Vec::new(),
            seq: 1,
            family: NFPROTO_INET,
            acked: Vec::new(),
        };
        b.raw(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            |_| {},
        );
        b
    }

    fn raw(
        &mut self,
        ty: u16,
        flags: u16,
        family: u8,
        res_id: u16,
        body: impl FnOnce(&mut Buf),
    ) -> u32 {
        let seq = self.seq;
        self.seq += 1;
        let mut b = Buf::default();
        body(&mut b);
        let len = (16 + 4 + b.0.len()) as u32;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.push(family);
        self.buf.push(0);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        self.buf.extend_from_slice(&b.0);
        seq
    }

    fn msg(&mut self, cmd: u16, flags: u16, what: String, body: impl FnOnce(&mut Buf)) {
        let seq = self.raw(
            (NFNL_SUBSYS_NFTABLES << 8) | cmd,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            self.family,
            0,
            body,
        );
        self.acked.push((seq, what));
    }

    fn family_name(&self) -> &'static str {
        match self.family {
            NFPROTO_NETDEV => "netdev",
            _ => "inet",
        }
    }

    fn table(&mut self, cmd: u16, flags: u16) {
        let family = self.family_name();
        let what = match cmd {
            NFT_MSG_DELTABLE => format!("deleting table {family} {NFT_TABLE}"),
            _ => format!("adding table {family} {NFT_TABLE}"),
        };
        self.msg(cmd, flags, what, |b| b.str(NFTA_TABLE_NAME, NFT_TABLE));
    }

    fn chain(&mut self, name: &str, kind: &str, hook: u32, priority: i32) {
        self.chain_on(name, kind, hook, priority, None);
    }

    /// A base chain; `device`: the device of a netdev family hook.
    fn chain_on(&mut self, name: &str, kind: &str, hook: u32, priority: i32, device: Option<&str>) {
        let family = self.family_name();
        self.msg(
            NFT_MSG_NEWCHAIN,
            NLM_F_CREATE,
            format!("adding chain {family} {name} (is nf_tables with {family} {kind} chains available?)"),
            |b| {
                b.str(NFTA_CHAIN_TABLE, NFT_TABLE);
                b.str(NFTA_CHAIN_NAME, name);
                b.nest(NFTA_CHAIN_HOOK, |h| {
                    h.u32be(NFTA_HOOK_HOOKNUM, hook);
                    h.u32be(NFTA_HOOK_PRIORITY, priority as u32);
                    if let Some(dev) = device {
                        h.str(NFTA_HOOK_DEV, dev);
                    }
                });
                b.u32be(NFTA_CHAIN_POLICY, NF_ACCEPT);
                b.str(NFTA_CHAIN_TYPE, kind);
            },
        );
    }

    fn rule(&mut self, chain: &str, what: String, exprs: &[Expr]) {
        self.msg(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, what, |b| {
            b.str(NFTA_RULE_TABLE, NFT_TABLE);
            b.str(NFTA_RULE_CHAIN, chain);
            b.nest(NFTA_RULE_EXPRESSIONS, |list| {
                for e in exprs {
                    list.nest(NFTA_LIST_ELEM, |el| encode_expr(el, e));
                }
            });
        });
    }

    fn finish(mut self) -> (Vec<u8>, Vec<(u32, String)>) {
        self.raw(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            |_| {},
        );
        (self.buf, self.acked)
    }
}

fn encode_expr(b: &mut Buf, e: &Expr) {
    let name = match e {
        Expr::Meta { .. } => "meta",
        Expr::Cmp { .. } => "cmp",
        Expr::Payload { .. } => "payload",
        Expr::Bitwise { .. } => "bitwise",
        Expr::Immediate { .. } | Expr::Accept | Expr::Drop => "immediate",
        Expr::Ct { .. } => "ct",
        Expr::Dnat4 { .. } => "nat",
        Expr::Masq => "masq",
    };
    b.str(NFTA_EXPR_NAME, name);
    b.nest(NFTA_EXPR_DATA, |d| match e {
        Expr::Meta { key, dreg } => {
            d.u32be(2, *key);
            d.u32be(1, *dreg);
        }
        Expr::Cmp { sreg, op, data } => {
            d.u32be(1, *sreg);
            d.u32be(2, *op);
            d.data_value(3, data);
        }
        Expr::Payload {
            base,
            offset,
            len,
            dreg,
        } => {
            d.u32be(1, *dreg);
            d.u32be(2, *base);
            d.u32be(3, *offset);
            d.u32be(4, *len);
        }
        Expr::Bitwise {
            sreg,
            dreg,
            mask,
            xor,
        } => {
            d.u32be(1, *sreg);
            d.u32be(2, *dreg);
            d.u32be(3, mask.len() as u32);
            d.data_value(4, mask);
            d.data_value(5, xor);
        }
        Expr::Immediate { dreg, data } => {
            d.u32be(1, *dreg);
            d.data_value(2, data);
        }
        Expr::Accept | Expr::Drop => {
            let code = if matches!(e, Expr::Accept) {
                NF_ACCEPT
            } else {
                NF_DROP
            };
            d.u32be(1, NFT_REG_VERDICT);
            d.nest(2, |v| {
                v.nest(NFTA_DATA_VERDICT, |c| c.u32be(NFTA_VERDICT_CODE, code))
            });
        }
        Expr::Ct { key, dreg } => {
            d.u32be(1, *dreg);
            d.u32be(2, *key);
        }
        Expr::Dnat4 {
            addr_reg,
            proto_reg,
        } => {
            d.u32be(1, NFT_NAT_DNAT);
            d.u32be(2, u32::from(NFPROTO_IPV4));
            d.u32be(3, *addr_reg);
            d.u32be(5, *proto_reg);
        }
        Expr::Masq => {}
    });
}

// --- rule building blocks ---

fn ifname_data(name: &str) -> Vec<u8> {
    let mut d = name.as_bytes().to_vec();
    d.push(0);
    d
}

fn meta_eq(key: u32, data: Vec<u8>) -> [Expr; 2] {
    [
        Expr::Meta {
            key,
            dreg: NFT_REG_1,
        },
        Expr::Cmp {
            sreg: NFT_REG_1,
            op: NFT_CMP_EQ,
            data,
        },
    ]
}

fn proto_num(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    }
}

fn dport_eq(port: u16) -> [Expr; 2] {
    [
        Expr::Payload {
            base: NFT_PAYLOAD_TRANSPORT_HEADER,
            offset: 2,
            len: 2,
            dreg: NFT_REG_1,
        },
        Expr::Cmp {
            sreg: NFT_REG_1,
            op: NFT_CMP_EQ,
            data: port.to_be_bytes().to_vec(),
        },
    ]
}

/// `ip saddr/daddr in net` (offset 12: source, 16: destination).
fn ip4_in(offset: u32, net: Ipv4Net) -> Vec<Expr> {
    let mut v = vec![Expr::Payload {
        base: NFT_PAYLOAD_NETWORK_HEADER,
        offset,
        len: 4,
        dreg: NFT_REG_1,
    }];
    if net.prefix() < 32 {
        v.push(Expr::Bitwise {
            sreg: NFT_REG_1,
            dreg: NFT_REG_1,
            mask: net.mask().to_be_bytes().to_vec(),
            xor: vec![0; 4],
        });
    }
    v.push(Expr::Cmp {
        sreg: NFT_REG_1,
        op: NFT_CMP_EQ,
        data: net.addr().octets().to_vec(),
    });
    v
}

/// `ip6 saddr in prefix/64`.
fn ip6_saddr_in64(prefix: Ipv6Addr) -> Vec<Expr> {
    vec![
        Expr::Payload {
            base: NFT_PAYLOAD_NETWORK_HEADER,
            offset: 8,
            len: 8,
            dreg: NFT_REG_1,
        },
        Expr::Cmp {
            sreg: NFT_REG_1,
            op: NFT_CMP_EQ,
            data: prefix.octets()[..8].to_vec(),
        },
    ]
}

/// `payload base[offset..offset + value.len()] == value` (or `!=`).
fn payload_cmp(base: u32, offset: u32, op: u32, value: &[u8]) -> [Expr; 2] {
    [
        Expr::Payload {
            base,
            offset,
            len: value.len() as u32,
            dreg: NFT_REG_1,
        },
        Expr::Cmp {
            sreg: NFT_REG_1,
            op,
            data: value.to_vec(),
        },
    ]
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;

fn ether_type(t: u16) -> [Expr; 2] {
    payload_cmp(NFT_PAYLOAD_LL_HEADER, 12, NFT_CMP_EQ, &t.to_be_bytes())
}

/// The anti-spoofing chain of one tap (see the module's comment), in the netdev table.
fn guard_tap(b: &mut Batch, tap: &GuardedTap) {
    b.chain_on(&tap.name, "filter", NF_NETDEV_INGRESS, 0, Some(&tap.name));
    let nh = NFT_PAYLOAD_NETWORK_HEADER;
    let mut rule = |what: String, exprs: Vec<Expr>| b.rule(&tap.name, what, &exprs);
    let mut other_mac = payload_cmp(NFT_PAYLOAD_LL_HEADER, 6, NFT_CMP_NEQ, &tap.mac).to_vec();
    other_mac.push(Expr::Drop);
    rule(
        format!("dropping frames of another MAC from {}", tap.name),
        other_mac,
    );
    let mut v4 = ether_type(ETHERTYPE_IPV4).to_vec();
    v4.extend(payload_cmp(nh, 12, NFT_CMP_EQ, &tap.v4.octets()));
    v4.push(Expr::Accept);
    rule(
        format!("accepting IPv4 from {} on {}", tap.v4, tap.name),
        v4,
    );
    let mut arp = ether_type(ETHERTYPE_ARP).to_vec();
    arp.extend(payload_cmp(nh, 8, NFT_CMP_EQ, &tap.mac));
    arp.extend(payload_cmp(nh, 14, NFT_CMP_EQ, &tap.v4.octets()));
    arp.push(Expr::Accept);
    rule(format!("accepting ARP of {} on {}", tap.v4, tap.name), arp);
    let mut v6_sources: Vec<Vec<Expr>> = Vec::new();
    if let Some(v6) = tap.v6 {
        v6_sources.push(payload_cmp(nh, 8, NFT_CMP_EQ, &v6.octets()).to_vec());
    }
    v6_sources.push(payload_cmp(nh, 8, NFT_CMP_EQ, &[0; 16]).to_vec());
    v6_sources.push(vec![
        Expr::Payload {
            base: nh,
            offset: 8,
            len: 2,
            dreg: NFT_REG_1,
        },
        Expr::Bitwise {
            sreg: NFT_REG_1,
            dreg: NFT_REG_1,
            mask: vec![0xff, 0xc0],
            xor: vec![0; 2],
        },
        Expr::Cmp {
            sreg: NFT_REG_1,
            op: NFT_CMP_EQ,
            data: vec![0xfe, 0x80],
        },
    ]);
    for source in v6_sources {
        let mut v6 = ether_type(ETHERTYPE_IPV6).to_vec();
        v6.extend(source);
        v6.push(Expr::Accept);
        rule(format!("accepting IPv6 of {}", tap.name), v6);
    }
    rule(
        format!("dropping the rest from {}", tap.name),
        vec![Expr::Drop],
    );
}

fn ruleset(
    cfg: &NatConfig,
    forwards: &[Forward],
    taps: &[GuardedTap],
) -> (Vec<u8>, Vec<(u32, String)>) {
    let mut b = Batch::new();
    // Make sure the table exists, so deleting it cannot fail; then write it anew.
    b.table(NFT_MSG_NEWTABLE, NLM_F_CREATE);
    b.table(NFT_MSG_DELTABLE, 0);
    b.table(NFT_MSG_NEWTABLE, NLM_F_CREATE);
    b.chain("prerouting", "nat", NF_INET_PRE_ROUTING, -100);
    b.chain("postrouting", "nat", NF_INET_POST_ROUTING, 100);
    b.chain("forward", "filter", NF_INET_FORWARD, 0);
    b.chain("input", "filter", NF_INET_LOCAL_IN, 0);
    let ipv4 = meta_eq(NFT_META_NFPROTO, vec![NFPROTO_IPV4]);
    let ipv6 = meta_eq(NFT_META_NFPROTO, vec![NFPROTO_IPV6]);
    let from_uplink = meta_eq(NFT_META_IIFNAME, ifname_data(&cfg.uplink));
    let to_uplink = meta_eq(NFT_META_OIFNAME, ifname_data(&cfg.uplink));
    let from_bridge = meta_eq(NFT_META_IIFNAME, ifname_data(&cfg.bridge));
    let to_bridge = meta_eq(NFT_META_OIFNAME, ifname_data(&cfg.bridge));

    let mut masq4: Vec<Expr> = ipv4.to_vec();
    masq4.extend(to_uplink.clone());
    masq4.extend(ip4_in(12, cfg.v4_range));
    masq4.push(Expr::Masq);
    b.rule(
        "postrouting",
        format!("masquerading {} out of {}", cfg.v4_range, cfg.uplink),
        &masq4,
    );
    if let Some(p) = cfg.v6_prefix {
        let mut masq6: Vec<Expr> = ipv6.to_vec();
        masq6.extend(to_uplink.clone());
        masq6.extend(ip6_saddr_in64(p));
        masq6.push(Expr::Masq);
        b.rule(
            "postrouting",
            format!("masquerading {p}/64 out of {}", cfg.uplink),
            &masq6,
        );
    }

    let established = vec![
        Expr::Ct {
            key: NFT_CT_STATE,
            dreg: NFT_REG_1,
        },
        Expr::Bitwise {
            sreg: NFT_REG_1,
            dreg: NFT_REG_1,
            mask: CT_ESTABLISHED_RELATED.to_ne_bytes().to_vec(),
            xor: vec![0; 4],
        },
        Expr::Cmp {
            sreg: NFT_REG_1,
            op: NFT_CMP_NEQ,
            data: vec![0; 4],
        },
        Expr::Accept,
    ];
    b.rule(
        "forward",
        "accepting established traffic".into(),
        &established,
    );
    // The node itself answers VMs only for what they started, ICMP and IPv6 neighbour
    // discovery: its services (the agent's API, SSH) are not theirs.
    let mut from_vms_established = from_bridge.to_vec();
    from_vms_established.extend(established.iter().cloned());
    b.rule(
        "input",
        "accepting established traffic from VMs".into(),
        &from_vms_established,
    );
    for proto in [1u8, 58] {
        let mut icmp = from_bridge.to_vec();
        icmp.extend(meta_eq(NFT_META_L4PROTO, vec![proto]));
        icmp.push(Expr::Accept);
        b.rule(
            "input",
            format!("accepting ICMP (protocol {proto}) from VMs"),
            &icmp,
        );
    }
    let mut from_vms_drop = from_bridge.to_vec();
    from_vms_drop.push(Expr::Drop);
    b.rule(
        "input",
        "dropping the rest from VMs to the node".into(),
        &from_vms_drop,
    );
    let mut outbound: Vec<Expr> = from_bridge.to_vec();
    outbound.extend(to_uplink);
    outbound.push(Expr::Accept);
    b.rule(
        "forward",
        format!("forwarding {} to {}", cfg.bridge, cfg.uplink),
        &outbound,
    );

    for f in forwards {
        let l4 = meta_eq(NFT_META_L4PROTO, vec![proto_num(f.protocol)]);
        let mut dnat: Vec<Expr> = ipv4.to_vec();
        dnat.extend(from_uplink.clone());
        dnat.extend(l4.clone());
        dnat.extend(dport_eq(f.host_port));
        dnat.push(Expr::Immediate {
            dreg: NFT_REG_1,
            data: f.vm_addr.octets().to_vec(),
        });
        dnat.push(Expr::Immediate {
            dreg: NFT_REG_2,
            data: f.vm_port.to_be_bytes().to_vec(),
        });
        dnat.push(Expr::Dnat4 {
            addr_reg: NFT_REG_1,
            proto_reg: NFT_REG_2,
        });
        b.rule(
            "prerouting",
            format!(
                "forwarding {}/{} to {}:{}",
                f.host_port, f.protocol, f.vm_addr, f.vm_port
            ),
            &dnat,
        );
        let mut accept: Vec<Expr> = ipv4.to_vec();
        accept.extend(to_bridge.clone());
        accept.extend(l4);
        accept.extend(ip4_in(
            16,
            Ipv4Net::new(f.vm_addr, 32).unwrap_or(cfg.v4_range),
        ));
        accept.extend(dport_eq(f.vm_port));
        accept.push(Expr::Accept);
        b.rule(
            "forward",
            format!(
                "accepting forwarded {}:{}/{}",
                f.vm_addr, f.vm_port, f.protocol
            ),
            &accept,
        );
    }
    // Nothing else crosses the NAT bridge: VMs reach only the uplink, and only forwarded ports
    // and answers reach them (never the operator's other networks, nor anyone routing to the
    // private range through the node).
    let mut drop_in = from_bridge.to_vec();
    drop_in.push(Expr::Drop);
    b.rule(
        "forward",
        format!("dropping other traffic from {}", cfg.bridge),
        &drop_in,
    );
    let mut drop_out = to_bridge.to_vec();
    drop_out.push(Expr::Drop);
    b.rule(
        "forward",
        format!("dropping other traffic to {}", cfg.bridge),
        &drop_out,
    );

    b.family = NFPROTO_NETDEV;
    b.table(NFT_MSG_NEWTABLE, NLM_F_CREATE);
    b.table(NFT_MSG_DELTABLE, 0);
    b.table(NFT_MSG_NEWTABLE, NLM_F_CREATE);
    for tap in taps {
        guard_tap(&mut b, tap);
    }
    b.finish()
}

/// A received netlink message.
struct NlMsg {
    ty: u16,
    flags: u16,
    seq: u32,
    payload: Vec<u8>,
}

/// A `NETLINK_NETFILTER` socket in the calling thread's namespace.
struct Socket(OwnedFd);

impl Socket {
    fn open() -> Result<Self, NetError> {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(NetError::io(
                "opening a netfilter netlink socket",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fd was just opened and is owned here.
        let s = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a timeval of the right size.
        unsafe {
            libc::setsockopt(
                s.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        Ok(s)
    }

    fn send(&self, buf: &[u8]) -> Result<(), NetError> {
        // SAFETY: sending from a valid buffer; the kernel is the default destination.
        let n = unsafe { libc::send(self.0.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if n < 0 || n as usize != buf.len() {
            return Err(NetError::io(
                "sending to nf_tables",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Receives one datagram and splits it into its messages.
    fn recv(&self) -> Result<Vec<NlMsg>, NetError> {
        let mut buf = vec![0u8; 1 << 16];
        // SAFETY: receiving into a buffer we own, of the given length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(NetError::io(
                "receiving from nf_tables",
                std::io::Error::last_os_error(),
            ));
        }
        let mut out = Vec::new();
        let mut off = 0usize;
        let n = n as usize;
        while off + 16 <= n {
            let len =
                u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
            if len < 16 || off + len > n {
                break;
            }
            let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            let flags = u16::from_ne_bytes([buf[off + 6], buf[off + 7]]);
            let seq =
                u32::from_ne_bytes([buf[off + 8], buf[off + 9], buf[off + 10], buf[off + 11]]);
            out.push(NlMsg {
                ty,
                flags,
                seq,
                payload: buf[off + 16..off + len].to_vec(),
            });
            off += (len + 3) & !3;
        }
        Ok(out)
    }
}

fn errno_of(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
}

/// Sends a batch and waits for the acknowledgement of every message in it.
fn run_batch(batch: (Vec<u8>, Vec<(u32, String)>)) -> Result<(), NetError> {
    let (buf, acked) = batch;
    let sock = Socket::open()?;
    sock.send(&buf)?;
    let mut pending: std::collections::BTreeMap<u32, String> = acked.into_iter().collect();
    while !pending.is_empty() {
        for NlMsg {
            ty, seq, payload, ..
        } in sock.recv()?
        {
            if ty != NLMSG_ERROR {
                continue;
            }
            let what = pending
                .remove(&seq)
                .unwrap_or_else(|| format!("message {seq}"));
            let errno = errno_of(&payload);
            if errno != 0 {
                return Err(NetError::Nft(format!(
                    "{what}: {}",
                    std::io::Error::from_raw_os_error(-errno)
                )));
            }
        }
    }
    Ok(())
}

/// Writes the tables from the desired state, atomically (`taps`: the NAT bridge's taps, each
/// guarded against spoofing; they must exist).
pub fn apply(cfg: &NatConfig, forwards: &[Forward], taps: &[GuardedTap]) -> Result<(), NetError> {
    run_batch(ruleset(cfg, forwards, taps))
}

/// Removes the tables (nothing when they do not exist).
pub fn remove() -> Result<(), NetError> {
    let mut b = Batch::new();
    for family in [NFPROTO_INET, NFPROTO_NETDEV] {
        b.family = family;
        b.table(NFT_MSG_NEWTABLE, NLM_F_CREATE);
        b.table(NFT_MSG_DELTABLE, 0);
    }
    run_batch(b.finish())
}

/// Every nftables table of the calling thread's namespace, as `(family, name)`.
pub fn list_tables() -> Result<Vec<(u8, String)>, NetError> {
    let sock = Socket::open()?;
    let mut b = Batch::new();
    b.buf.clear();
    b.raw(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
        NLM_F_REQUEST | NLM_F_DUMP,
        0,
        0,
        |_| {},
    );
    sock.send(&b.buf)?;
    let mut out = Vec::new();
    loop {
        for NlMsg {
            ty, flags, payload, ..
        } in sock.recv()?
        {
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = errno_of(&payload);
                    if errno != 0 {
                        return Err(NetError::Nft(format!(
                            "listing tables: {}",
                            std::io::Error::from_raw_os_error(-errno)
                        )));
                    }
                    return Ok(out);
                }
                t if t == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE && payload.len() >= 4 => {
                    let family = payload[0];
                    if let Some(name) = attr_str(&payload[4..], NFTA_TABLE_NAME) {
                        out.push((family, name));
                    }
                    if flags & NLM_F_MULTI == 0 {
                        return Ok(out);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Whether either of the agent's tables exists.
pub fn table_exists() -> Result<bool, NetError> {
    Ok(list_tables()?
        .iter()
        .any(|(f, n)| (*f == NFPROTO_INET || *f == NFPROTO_NETDEV) && n == NFT_TABLE))
}

fn attr_str(mut attrs: &[u8], want: u16) -> Option<String> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]) & !NLA_F_NESTED;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if ty == want {
            let v = &attrs[4..len];
            let v = v.split(|b| *b == 0).next().unwrap_or(v);
            return Some(String::from_utf8_lossy(v).into_owned());
        }
        let step = (len + 3) & !3;
        attrs = attrs.get(step..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the messages of a batch: every length must add up.
    /// (type, flags, body after the nfgenmsg header, family).
    fn messages(buf: &[u8]) -> Vec<(u16, u16, Vec<u8>, u8)> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < buf.len() {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
            assert!(
                len >= 20 && off + len <= buf.len() && len.is_multiple_of(4),
                "length {len}"
            );
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
            let flags = u16::from_ne_bytes(buf[off + 6..off + 8].try_into().unwrap());
            out.push((ty, flags, buf[off + 20..off + len].to_vec(), buf[off + 16]));
            off += len;
        }
        out
    }

    #[test]
    fn the_batch_rewrites_only_our_table_with_one_rule_pair_per_forward() {
        let cfg = NatConfig {
            uplink: "eth0".into(),
            bridge: "gn-br0".into(),
            v4_range: "10.249.0.0/16".parse().unwrap(),
            v6_prefix: Some("fd00:1:2:3::".parse().unwrap()),
        };
        let fw = [
            Forward {
                protocol: Protocol::Tcp,
                host_port: 8080,
                vm_addr: Ipv4Addr::new(10, 249, 0, 2),
                vm_port: 80,
            },
            Forward {
                protocol: Protocol::Udp,
                host_port: 5353,
                vm_addr: Ipv4Addr::new(10, 249, 0, 3),
                vm_port: 53,
            },
        ];
        let taps = [GuardedTap {
            name: "gn-t0123456789".into(),
            mac: [2, 0, 0, 0, 0, 1],
            v4: Ipv4Addr::new(10, 249, 0, 2),
            v6: Some("fd00:1:2:3::2".parse().unwrap()),
        }];
        let (buf, acked) = ruleset(&cfg, &fw, &taps);
        let msgs = messages(&buf);
        assert_eq!(msgs.first().unwrap().0, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(msgs.last().unwrap().0, NFNL_MSG_BATCH_END);
        let kinds: Vec<u16> = msgs[1..msgs.len() - 1].iter().map(|m| m.0 & 0xff).collect();
        // 3 table messages, 4 chains, 2 masquerades, 4 forward-chain rules, 4 input rules,
        // 2 per forward.
        assert_eq!(&kinds[..7], &[0, 2, 0, 3, 3, 3, 3]);
        // Then the netdev table: 3 table messages, a chain per tap with 7 rules (another
        // MAC, IPv4, ARP, 3 IPv6 sources, the rest).
        assert_eq!(
            kinds.iter().filter(|k| **k == NFT_MSG_NEWRULE).count(),
            2 + 4 + 4 + 2 * 2 + 7
        );
        let families: Vec<u8> = msgs[1..msgs.len() - 1].iter().map(|m| m.3).collect();
        let netdev_from = families.iter().position(|f| *f == NFPROTO_NETDEV).unwrap();
        assert!(families[..netdev_from].iter().all(|f| *f == NFPROTO_INET));
        assert!(families[netdev_from..].iter().all(|f| *f == NFPROTO_NETDEV));
        assert_eq!(&kinds[netdev_from..netdev_from + 4], &[0, 2, 0, 3]);
        assert_eq!(acked.len(), msgs.len() - 2);
        // Every message names only the gridnode table.
        for (_, _, body, _) in &msgs[1..msgs.len() - 1] {
            assert_eq!(attr_str(body, 1).as_deref(), Some(NFT_TABLE));
        }
        assert!(acked
            .iter()
            .any(|(_, w)| w.contains("8080/tcp to 10.249.0.2:80")));
    }

    #[test]
    fn masks_and_nesting_are_encoded() {
        let v = ip4_in(12, "10.249.0.0/16".parse().unwrap());
        assert_eq!(
            v[1],
            Expr::Bitwise {
                sreg: 1,
                dreg: 1,
                mask: vec![255, 255, 0, 0],
                xor: vec![0; 4]
            }
        );
        // A host address needs no mask.
        assert_eq!(ip4_in(16, "10.249.0.2/32".parse().unwrap()).len(), 2);
        let mut b = Buf::default();
        b.nest(7, |n| n.u32be(1, 5));
        assert_eq!(b.0.len(), 12);
        assert_eq!(u16::from_ne_bytes([b.0[0], b.0[1]]), 12);
        assert_eq!(u16::from_ne_bytes([b.0[2], b.0[3]]), 7 | NLA_F_NESTED);
    }
}
