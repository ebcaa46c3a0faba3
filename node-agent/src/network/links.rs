//! Links, addresses and routes of one network namespace over rtnetlink (the namespace of the
//! thread that made the [`Links`]), and persistent taps (made through `/dev/net/tun`: the
//! kernel makes tun/tap devices only that way). Every call is idempotent: what exists already
//! is kept as it is.

use std::fs::OpenOptions;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};

use futures::TryStreamExt;
use netlink_packet_route::link::{InfoBridgePort, InfoPortData};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, LinkWireguard, RouteMessageBuilder,
};

use super::ipam::Ipv4Net;
use super::NetError;

/// A link as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `bridge`, `tun`, `wireguard`, `veth`, ... (None for physical devices).
    pub kind: Option<String>,
    /// The bridge it is attached to.
    pub master: Option<u32>,
    pub up: bool,
    /// As a bridge port: whether it is isolated (see [`Links::attach`]).
    pub isolated: Option<bool>,
}

fn nl(what: impl Into<String>, e: rtnetlink::Error) -> NetError {
    NetError::Netlink(format!("{}: {e}", what.into()))
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

/// Netlink on the calling thread's namespace.
pub struct Links {
    handle: Handle,
}

impl Links {
    /// Opens a route netlink socket in the calling thread's namespace (needs a runtime).
    pub fn connect() -> Result<Self, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| NetError::io("opening a route netlink socket", e))?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn list(&self) -> Result<Vec<Link>, NetError> {
        let mut stream = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|e| nl("listing links", e))?
        {
            out.push(to_link(&msg));
        }
        Ok(out)
    }

    pub async fn get(&self, name: &str) -> Result<Option<Link>, NetError> {
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(to_link(&msg))),
            Ok(None) => Ok(None),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(nl(format!("reading link {name}"), e)),
        }
    }

    async fn index(&self, name: &str) -> Result<u32, NetError> {
        self.get(name)
            .await?
            .map(|l| l.index)
            .ok_or_else(|| NetError::Netlink(format!("link {name} does not exist")))
    }

    /// Makes bridge `name` unless it exists, gives it `addrs`, sets it up; returns its index.
    pub async fn ensure_bridge(&self, name: &str, addrs: &[(IpAddr, u8)]) -> Result<u32, NetError> {
        if self.get(name).await?.is_none() {
            self.handle
                .link()
                .add(LinkBridge::new(name).build())
                .execute()
                .await
                .map_err(|e| nl(format!("creating bridge {name}"), e))?;
        }
        let index = self.index(name).await?;
        for (addr, prefix) in addrs {
            self.ensure_address(index, *addr, *prefix).await?;
        }
        self.set_up(name).await?;
        Ok(index)
    }

    pub async fn ensure_address(
        &self,
        index: u32,
        addr: IpAddr,
        prefix: u8,
    ) -> Result<(), NetError> {
        match self
            .handle
            .address()
            .add(index, addr, prefix)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            Err(e) => Err(nl(format!("adding address {addr}/{prefix}"), e)),
        }
    }

    pub async fn set_up(&self, name: &str) -> Result<(), NetError> {
        let index = self.index(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| nl(format!("setting {name} up"), e))
    }

    /// Attaches `name` to the bridge `master` and sets it up (kept when already so). An
    /// `isolated` port reaches only the bridge itself (the node), never another isolated port
    /// (the kernel's bridge port flag `isolated`): the NAT bridge's taps belong to different
    /// owners, whose VMs must not talk to each other on it.
    pub async fn attach(&self, name: &str, master: &str, isolated: bool) -> Result<(), NetError> {
        let link = self
            .get(name)
            .await?
            .ok_or_else(|| NetError::Netlink(format!("link {name} does not exist")))?;
        let master_index = self.index(master).await?;
        if link.master != Some(master_index) {
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(link.index)
                        .controller(master_index)
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| nl(format!("attaching {name} to {master}"), e))?;
        }
        // Set every time (idempotent): a tap attached by an older agent gets the flag too.
        // A port's settings go in RTM_NEWLINK (RTM_SETLINK ignores them).
        self.handle
            .link()
            .set_port(
                LinkBridgePort::new(link.index)
                    .append_info_data(InfoBridgePort::Isolated(isolated))
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| nl(format!("setting the isolation of bridge port {name}"), e))?;
        if !link.up {
            self.set_up(name).await?;
        }
        Ok(())
    }

    /// Deletes link `name` (nothing when it does not exist).
    pub async fn delete(&self, name: &str) -> Result<(), NetError> {
        let Some(link) = self.get(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(()),
            Err(e) => Err(nl(format!("deleting link {name}"), e)),
        }
    }

    /// Moves link `name` into the namespace open at `ns_fd`.
    pub async fn move_to_netns(&self, name: &str, ns_fd: RawFd) -> Result<(), NetError> {
        let index = self.index(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).setns_by_fd(ns_fd).build())
            .execute()
            .await
            .map_err(|e| nl(format!("moving {name} to another namespace"), e))
    }

    pub async fn add_wireguard(&self, name: &str) -> Result<(), NetError> {
        self.handle
            .link()
            .add(LinkWireguard::new(name).build())
            .execute()
            .await
            .map_err(|e| {
                nl(
                    format!("creating WireGuard link {name} (is the wireguard module loaded?)"),
                    e,
                )
            })
    }

    /// A veth pair (tests stand them in for taps and uplinks).
    pub async fn add_veth(&self, name: &str, peer: &str) -> Result<(), NetError> {
        self.handle
            .link()
            .add(LinkVeth::new(name, peer).build())
            .execute()
            .await
            .map_err(|e| nl(format!("creating veth {name}"), e))
    }

    /// Adds (or replaces) the route to `dest` through link `dev`, with `gateway` if given.
    pub async fn ensure_route(
        &self,
        dest: Ipv4Net,
        dev: &str,
        gateway: Option<std::net::Ipv4Addr>,
    ) -> Result<(), NetError> {
        let index = self.index(dev).await?;
        let mut b = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
            .destination_prefix(dest.addr(), dest.prefix())
            .output_interface(index);
        if let Some(gw) = gateway {
            b = b.gateway(gw);
        }
        self.handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(|e| nl(format!("adding route {dest} dev {dev}"), e))
    }

    /// The addresses of link `index`.
    pub async fn addresses(&self, index: u32) -> Result<Vec<(IpAddr, u8)>, NetError> {
        use netlink_packet_route::address::AddressAttribute;
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut out = Vec::new();
        while let Some(m) = stream
            .try_next()
            .await
            .map_err(|e| nl("listing addresses", e))?
        {
            for a in &m.attributes {
                if let AddressAttribute::Address(ip) = a {
                    out.push((*ip, m.header.prefix_len));
                }
            }
        }
        Ok(out)
    }
}

fn to_link(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        master: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        isolated: None,
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Controller(m) => link.master = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => link.kind = Some(kind_name(k)),
                        LinkInfo::PortData(InfoPortData::BridgePort(port)) => {
                            for p in port {
                                if let InfoBridgePort::Isolated(v) = p {
                                    link.isolated = Some(*v);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Tun => "tun".into(),
        InfoKind::Veth => "veth".into(),
        InfoKind::Wireguard => "wireguard".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Owner of a tap: who may open it (the vmm's user and group).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TapOwner {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Makes the persistent tap `name` in the calling thread's namespace, owned by `owner`.
/// Never call it for a tap that exists: a vmm may hold it (check with [`Links::get`] first).
pub fn create_tap(name: &str, owner: TapOwner) -> Result<(), NetError> {
    if name.len() > 15 {
        return Err(NetError::Invalid(format!(
            "tap name {name} is longer than 15 bytes"
        )));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| NetError::io("opening /dev/net/tun", e))?;
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    let fd = f.as_raw_fd();
    let call = |req: libc::c_ulong, arg: libc::c_ulong, what: &str| -> Result<(), NetError> {
        // SAFETY: tun ioctls taking an integer argument, on an open /dev/net/tun fd.
        if unsafe { libc::ioctl(fd, req as _, arg) } != 0 {
            return Err(NetError::io(
                format!("{what} of tap {name}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    };
    // SAFETY: TUNSETIFF reads and writes the ifreq passed by pointer.
    if unsafe { libc::ioctl(fd, TUNSETIFF as _, &mut ifr) } != 0 {
        return Err(NetError::io(
            format!("creating tap {name}"),
            std::io::Error::last_os_error(),
        ));
    }
    if let Some(uid) = owner.uid {
        call(TUNSETOWNER, libc::c_ulong::from(uid), "setting the owner")?;
    }
    if let Some(gid) = owner.gid {
        call(TUNSETGROUP, libc::c_ulong::from(gid), "setting the group")?;
    }
    call(TUNSETPERSIST, 1, "making persistent")?;
    Ok(())
}

/// Opens the existing tap `name` of namespace `ns` as a queue the vmm can inherit (the same
/// flags it was made with). The namespace is entered on a thread of its own.
pub fn open_tap(ns: &std::path::Path, name: &str) -> Result<std::os::fd::OwnedFd, NetError> {
    let ns = ns.to_path_buf();
    let name = name.to_string();
    std::thread::spawn(move || -> Result<std::os::fd::OwnedFd, NetError> {
        super::netns::enter(&ns)?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| NetError::io("opening /dev/net/tun", e))?;
        // SAFETY: ifreq is plain data; zeroed is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes().take(15)) {
            *d = s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: TUNSETIFF reads and writes the ifreq passed by pointer.
        if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, &mut ifr) } != 0 {
            return Err(NetError::io(
                format!("opening tap {name} in {}", ns.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(std::os::fd::OwnedFd::from(f))
    })
    .join()
    .map_err(|_| NetError::Netlink("the tap thread panicked".into()))?
}
