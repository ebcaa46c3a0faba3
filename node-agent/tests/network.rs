//! The node's networking against a real kernel: every "node", "VM" and "outside host" is a
//! network namespace made by the test (nothing of the machine's own network is touched), and
//! veth pairs stand in for the taps a vmm would hold. Proves: the NAT masquerades a VM's
//! traffic and port forwards reach it; create, restart and teardown leave exactly what they
//! should (links, namespaces and nftables tables listed before and after); reconciliation
//! removes stale objects and keeps matching ones in place; two nodes carry TCP between their
//! private subnets over WireGuard while another owner's network on the same node cannot
//! reach them.
//!
//! Needs root (CAP_NET_ADMIN, mounts) and a kernel with nf_tables (NAT, masquerade, ct),
//! bridges, veth and tun; skipped with a note otherwise. The WireGuard test runs on the test
//! bed (whose kernel has the module) when this machine's kernel has no WireGuard.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use node_agent::deployment::{
    Deployment, FailurePolicy, NetworkNode, NetworkWorkload, PortForward, Protocol, RestartPolicy,
    VmInterface, VmWorkload, Workload, PUBLIC_NAT,
};
use node_agent::network::ipam::{self, Ipv4Net};
use node_agent::network::links::{self, Links, TapOwner};
use node_agent::network::netns::{self, Ns, NsDir};
use node_agent::network::{naming, nat, wireguard, Network, NetworkConfig};
use node_agent::state::{OpKind, Store};

const IN_TESTBED: &str = "GRIDNODE_NET_TEST_IN_TESTBED";

/// Why this machine cannot run the tests, if it cannot.
fn unavailable() -> Option<String> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return Some("needs root (network namespaces, CAP_NET_ADMIN)".into());
    }
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return Some(format!("no temporary directory: {e}")),
    };
    let nsdir = NsDir::new(dir.path());
    if let Err(e) = nsdir.create("gn-probe") {
        return Some(format!("cannot make a network namespace: {e}"));
    }
    let probe = netns::block_in(Ns::Path(nsdir.path("gn-probe")), || async {
        nat::list_tables()?;
        let links = Links::connect()?;
        links.add_veth("p0", "p1").await?;
        links::create_tap("t0", TapOwner::default())?;
        Ok(())
    });
    let _ = nsdir.delete("gn-probe");
    probe
        .err()
        .map(|e| format!("this kernel lacks what the tests need: {e}"))
}

fn wireguard_here() -> bool {
    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    let nsdir = NsDir::new(dir.path());
    if nsdir.create("gn-probe").is_err() {
        return false;
    }
    let ok = netns::block_in(Ns::Path(nsdir.path("gn-probe")), || async {
        Links::connect()?.add_wireguard("gn-wprobe").await
    })
    .is_ok();
    let _ = nsdir.delete("gn-probe");
    ok
}

macro_rules! require_privileges {
    ($test:expr) => {
        if let Some(why) = unavailable() {
            eprintln!("skipping {}: {why}", $test);
            return;
        }
    };
}

/// Namespaces made by one test, removed when it ends.
struct Bed {
    _dir: tempfile::TempDir,
    /// The test's own namespaces (nodes, VMs, outside hosts).
    ns: NsDir,
    root: PathBuf,
}

impl Bed {
    fn new(names: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let ns = NsDir::new(root.join("test-ns"));
        for n in names {
            ns.create(n).unwrap();
        }
        Self {
            _dir: dir,
            ns,
            root,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.ns.path(name)
    }

    /// A directory for one node's private-network namespaces.
    fn agent_nsdir(&self, node: &str) -> PathBuf {
        self.root.join(format!("{node}-netns"))
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for dir in [
            self.ns.dir.clone(),
            self.root.join("a-netns"),
            self.root.join("b-netns"),
        ] {
            let d = NsDir::new(dir);
            if let Ok(entries) = std::fs::read_dir(&d.dir) {
                for e in entries.flatten() {
                    let _ = d.delete(&e.file_name().to_string_lossy());
                }
            }
        }
    }
}

/// Runs netlink work in namespace `path`.
fn nl<T: Send + 'static, Fut>(path: &Path, work: impl FnOnce() -> Fut + Send + 'static) -> T
where
    Fut: std::future::Future<Output = Result<T, node_agent::network::NetError>>,
{
    netns::block_in(Ns::Path(path.to_path_buf()), work).unwrap()
}

/// Runs plain code (sockets) in namespace `path`.
fn in_ns<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        netns::enter(&p).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// Moves link `name` of namespace `from` into namespace `to`.
fn move_link(from: &Path, name: &str, to: &Path) {
    let to = to.to_path_buf();
    let name = name.to_string();
    nl(from, move || async move {
        let f = std::fs::File::open(&to).unwrap();
        Links::connect()?.move_to_netns(&name, f.as_raw_fd()).await
    });
}

/// Gives link `name` in namespace `ns` an address, sets it up, and adds a route through it.
fn configure(
    ns: &Path,
    name: &str,
    addr: Ipv4Addr,
    prefix: u8,
    route: Option<(Ipv4Net, Ipv4Addr)>,
) {
    let name = name.to_string();
    nl(ns, move || async move {
        let links = Links::connect()?;
        let l = links.get(&name).await?.unwrap();
        links.ensure_address(l.index, addr.into(), prefix).await?;
        links.set_up(&name).await?;
        if let Some((dest, gw)) = route {
            links.ensure_route(dest, &name, Some(gw)).await?;
        }
        Ok(())
    })
}

/// Names of the links of a namespace.
fn link_names(ns: &Path) -> Vec<String> {
    let mut v: Vec<String> = nl(ns, || async { Links::connect()?.list().await })
        .into_iter()
        .map(|l| l.name)
        .collect();
    v.sort();
    v
}

fn link_isolated(ns: &Path, name: &str) -> Option<bool> {
    let name = name.to_string();
    nl(
        ns,
        move || async move { Links::connect()?.get(&name).await },
    )
    .and_then(|l| l.isolated)
}

fn link_index(ns: &Path, name: &str) -> Option<u32> {
    let name = name.to_string();
    nl(ns, move || async move {
        Ok(Links::connect()?.get(&name).await?.map(|l| l.index))
    })
}

fn tables(ns: &Path) -> Vec<(u8, String)> {
    nl(ns, || async { nat::list_tables() })
}

/// Accepts one connection on `addr` in namespace `ns` (in the background); the handle
/// returns the peer's address and what it sent.
fn serve_once(ns: &Path, addr: SocketAddr) -> std::thread::JoinHandle<(SocketAddr, String)> {
    let p = ns.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        netns::enter(&p).unwrap();
        let l = TcpListener::bind(addr).unwrap();
        tx.send(()).unwrap();
        let (mut s, peer) = l.accept().unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        (peer, buf)
    });
    rx.recv().unwrap();
    h
}

fn send(ns: &Path, to: SocketAddr, text: &'static str) -> std::io::Result<()> {
    in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.write_all(text.as_bytes())
    })
}

fn vm(name: &str, interfaces: Vec<VmInterface>, port_forwards: Vec<PortForward>) -> Workload {
    Workload::Vm(VmWorkload {
        name: name.into(),
        image: "/images/none.flist".into(),
        image_blake3: None,
        vcpus: 1,
        memory_mib: 64,
        rootfs_mib: 16,
        volumes: vec![],
        mounts: vec![],
        entrypoint: "/bin/true".into(),
        args: vec![],
        env: Default::default(),
        restart: RestartPolicy::Never,
        shutdown_grace_secs: 0,
        interfaces,
        port_forwards,
    })
}

fn deployment(twin_id: u32, deployment_id: u64, workloads: Vec<Workload>) -> Deployment {
    let d = Deployment {
        twin_id,
        deployment_id,
        version: 1,
        metadata: String::new(),
        workloads,
        signature_requirement: None,
        on_failure: FailurePolicy::Rollback,
        contract_id: None,
        signatures: vec![],
    };
    d.validate().unwrap();
    d
}

fn commit(store: &Store, d: &Deployment) {
    let op = store
        .begin_op(OpKind::Create, None, Some(d), (d.twin_id, d.deployment_id))
        .unwrap();
    store.end_op(op).unwrap();
}

fn remove(store: &Store, d: &Deployment) {
    let op = store
        .begin_op(OpKind::Delete, Some(d), None, (d.twin_id, d.deployment_id))
        .unwrap();
    store.end_op(op).unwrap();
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn node_network(bed: &Bed, node: &str, node_id: u32) -> Network {
    let cfg = NetworkConfig {
        enabled: true,
        uplink: Some("up0".into()),
        netns_dir: bed.agent_nsdir(node),
        ..Default::default()
    };
    Network::new(cfg, node.as_bytes())
        .unwrap()
        .with_host_ns(Ns::Path(bed.path(node)))
        .with_node_id(node_id)
}

/// Two namespaces joined by a veth: `up0` in `a` (192.0.2.1) and `peer0` in `b` (192.0.2.2).
fn wire(bed: &Bed, a: &str, b: &str) {
    nl(&bed.path(a), || async {
        Links::connect()?.add_veth("up0", "peer0").await
    });
    move_link(&bed.path(a), "peer0", &bed.path(b));
    configure(&bed.path(a), "up0", Ipv4Addr::new(192, 0, 2, 1), 24, None);
    configure(&bed.path(b), "peer0", Ipv4Addr::new(192, 0, 2, 2), 24, None);
}

/// A veth standing in for a VM's tap: one end on `bridge` in namespace `host`, the other in
/// namespace `vm` with the VM's address and a route to `dest` through `gw`.
fn stand_in_vm(
    host: &Path,
    bridge: &'static str,
    vm: &Path,
    addr: Ipv4Addr,
    prefix: u8,
    dest: Ipv4Net,
    gw: Ipv4Addr,
) {
    nl(host, move || async move {
        let l = Links::connect()?;
        l.add_veth("vmh", "vmg").await?;
        l.attach("vmh", bridge, false).await
    });
    move_link(host, "vmg", vm);
    configure(vm, "vmg", addr, prefix, Some((dest, gw)));
}

/// The hardware address of link `name` in namespace `ns` (SIOCGIFHWADDR).
fn hw_addr(ns: &Path, name: &'static str) -> [u8; 6] {
    in_ns(ns, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        // SAFETY: an ifreq is plain bytes; the ioctl writes at most its size.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *d = *s as libc::c_char;
        }
        // SAFETY: a valid socket and a valid ifreq the kernel fills.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
        assert_eq!(rc, 0, "SIOCGIFHWADDR {name}");
        // SAFETY: SIOCGIFHWADDR fills ifru_hwaddr.
        let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
        let mut mac = [0u8; 6];
        for (m, d) in mac.iter_mut().zip(data.iter()) {
            *m = *d as u8;
        }
        mac
    })
}

/// Sends one UDP datagram from `from` to `to` in namespace `ns`, and says whether `server`
/// (a socket in another namespace) got it within 2 s.
fn udp_arrives(ns: &Path, from: SocketAddr, to: SocketAddr, server: &std::net::UdpSocket) -> bool {
    let text = format!("from {from}");
    let sent = text.clone();
    in_ns(ns, move || {
        let s = std::net::UdpSocket::bind(from).unwrap();
        s.send_to(sent.as_bytes(), to).unwrap();
    });
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 64];
    loop {
        match server.recv_from(&mut buf) {
            Ok((n, _)) if buf[..n] == *text.as_bytes() => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

#[test]
fn a_vm_on_the_nat_bridge_cannot_send_from_an_address_not_its_own() {
    require_privileges!("a_vm_on_the_nat_bridge_cannot_send_from_an_address_not_its_own");
    let bed = Bed::new(&["a", "wan", "vm"]);
    let node = bed.path("a");
    wire(&bed, "a", "wan");
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db")).unwrap());
    let net = node_network(&bed, "a", 1);
    rt().block_on(net.sync(&store)).unwrap();
    // The stand-in VM has 10.249.0.2 and a second address it was not given.
    stand_in_vm(
        &node,
        naming::NAT_BRIDGE,
        &bed.path("vm"),
        Ipv4Addr::new(10, 249, 0, 2),
        16,
        "0.0.0.0/0".parse().unwrap(),
        Ipv4Addr::new(10, 249, 0, 1),
    );
    configure(
        &bed.path("vm"),
        "vmg",
        Ipv4Addr::new(10, 249, 0, 3),
        16,
        None,
    );
    let wan = bed.path("wan");
    let server = in_ns(&wan, || {
        std::net::UdpSocket::bind("192.0.2.2:9000").unwrap()
    });
    let to: SocketAddr = "192.0.2.2:9000".parse().unwrap();
    let own: SocketAddr = "10.249.0.2:0".parse().unwrap();
    let other: SocketAddr = "10.249.0.3:0".parse().unwrap();
    // Unguarded (as before this guard existed), both go out.
    assert!(udp_arrives(&bed.path("vm"), own, to, &server));
    assert!(udp_arrives(&bed.path("vm"), other, to, &server));
    // Guarded with its MAC and address, as the agent guards every tap on the bridge.
    let guard = nat::GuardedTap {
        name: "vmh".into(),
        mac: hw_addr(&bed.path("vm"), "vmg"),
        v4: Ipv4Addr::new(10, 249, 0, 2),
        v6: None,
    };
    let cfg = net.plan(&store).unwrap().nat;
    let taps = vec![guard.clone()];
    nl(&node, move || async move { nat::apply(&cfg, &[], &taps) });
    assert!(
        udp_arrives(&bed.path("vm"), own, to, &server),
        "its own address"
    );
    assert!(
        !udp_arrives(&bed.path("vm"), other, to, &server),
        "an address not its own went out"
    );
    // A guard with another MAC: nothing of the VM passes.
    let cfg = net.plan(&store).unwrap().nat;
    let taps = vec![nat::GuardedTap {
        mac: [2, 0, 0, 0, 0, 0x42],
        ..guard
    }];
    nl(&node, move || async move { nat::apply(&cfg, &[], &taps) });
    assert!(
        !udp_arrives(&bed.path("vm"), own, to, &server),
        "another MAC"
    );
    assert!(tables(&node).contains(&(5, naming::NFT_TABLE.to_string())));
    nl(&node, || async { Links::connect()?.delete("vmh").await });
    rt().block_on(net.teardown_all()).unwrap();
    assert!(tables(&node).is_empty());
}

#[test]
fn nat_masquerades_forwards_ports_and_teardown_leaves_nothing() {
    require_privileges!("nat_masquerades_forwards_ports_and_teardown_leaves_nothing");
    let bed = Bed::new(&["a", "wan", "vm"]);
    let node = bed.path("a");
    wire(&bed, "a", "wan");
    let links_before = link_names(&node);
    assert!(tables(&node).is_empty());

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db")).unwrap());
    let d = deployment(
        7,
        1,
        vec![vm(
            "web",
            vec![VmInterface {
                network: PUBLIC_NAT.into(),
                ip: None,
            }],
            vec![PortForward {
                protocol: Protocol::Tcp,
                host_port: 8080,
                vm_port: 80,
            }],
        )],
    );
    commit(&store, &d);
    let net = node_network(&bed, "a", 1);
    let report = rt().block_on(net.sync(&store)).unwrap();
    let tap = naming::tap_name(7, 1, "web", 0);
    assert!(
        report.created.contains(&naming::NAT_BRIDGE.to_string()),
        "{report:?}"
    );
    assert!(report.created.contains(&tap), "{report:?}");
    assert!(tables(&node).contains(&(1, naming::NFT_TABLE.to_string())));

    // What the VM is told.
    let vmnet = net.vm_network(&store, &d, d.vm("web").unwrap()).unwrap();
    assert_eq!(vmnet.attachments[0].tap, tap);
    assert_eq!(vmnet.attachments[0].netns, None);
    let cmdline = vmnet.guest.to_cmdline();
    assert!(
        cmdline.starts_with("gridnode.ip=eth0,10.249.0.2/16 gridnode.ip=eth0,fd"),
        "{cmdline}"
    );
    assert!(
        cmdline.contains("gridnode.route=eth0,default,10.249.0.1"),
        "{cmdline}"
    );

    // A veth stands in for the tap, with the VM's address.
    stand_in_vm(
        &node,
        naming::NAT_BRIDGE,
        &bed.path("vm"),
        Ipv4Addr::new(10, 249, 0, 2),
        16,
        "0.0.0.0/0".parse().unwrap(),
        Ipv4Addr::new(10, 249, 0, 1),
    );
    // Outbound: the outside host sees the node's uplink address.
    let server = serve_once(&bed.path("wan"), "192.0.2.2:9000".parse().unwrap());
    send(&bed.path("vm"), "192.0.2.2:9000".parse().unwrap(), "out").unwrap();
    let (peer, text) = server.join().unwrap();
    assert_eq!(
        (peer.ip().to_string().as_str(), text.as_str()),
        ("192.0.2.1", "out")
    );
    // Inbound: the uplink's port 8080 reaches the VM's port 80, from the real client.
    let server = serve_once(&bed.path("vm"), "0.0.0.0:80".parse().unwrap());
    send(&bed.path("wan"), "192.0.2.1:8080".parse().unwrap(), "in").unwrap();
    let (peer, text) = server.join().unwrap();
    assert_eq!(
        (peer.ip().to_string().as_str(), text.as_str()),
        ("192.0.2.2", "in")
    );
    // A port nobody forwards is not open.
    assert!(send(&bed.path("wan"), "192.0.2.1:8081".parse().unwrap(), "x").is_err());
    // The VM cannot reach the node's own services (on the gateway or the uplink address).
    let node_service = serve_once(&node, "0.0.0.0:7070".parse().unwrap());
    for target in ["10.249.0.1:7070", "192.0.2.1:7070"] {
        assert!(
            send(&bed.path("vm"), target.parse().unwrap(), "x").is_err(),
            "the VM reached the node at {target}"
        );
    }
    send(
        &bed.path("wan"),
        "192.0.2.1:7070".parse().unwrap(),
        "outside",
    )
    .unwrap();
    assert_eq!(node_service.join().unwrap().1, "outside");

    // The agent restarts: everything matches, nothing is made again, the tap is the same.
    let index = link_index(&node, &tap);
    let again = node_network(&bed, "a", 1);
    let report = rt().block_on(again.sync(&store)).unwrap();
    assert!(
        report.created.is_empty() && report.removed.is_empty(),
        "{report:?}"
    );
    assert_eq!(link_index(&node, &tap), index);
    // Still forwarding after the rewrite of the table.
    let server = serve_once(&bed.path("vm"), "0.0.0.0:80".parse().unwrap());
    send(&bed.path("wan"), "192.0.2.1:8080".parse().unwrap(), "again").unwrap();
    assert_eq!(server.join().unwrap().1, "again");

    // Delete: the tap and the address go; the forward is gone.
    remove(&store, &d);
    let report = rt().block_on(again.sync(&store)).unwrap();
    assert_eq!(report.removed, vec![tap.clone()]);
    assert!(ipam::allocations(&store).unwrap().is_empty());
    assert!(send(&bed.path("wan"), "192.0.2.1:8080".parse().unwrap(), "x").is_err());
    // Teardown: the node is as before (the stand-in aside).
    nl(&node, || async { Links::connect()?.delete("vmh").await });
    rt().block_on(again.teardown_all()).unwrap();
    assert_eq!(link_names(&node), links_before);
    assert!(tables(&node).is_empty());
}

#[test]
fn reconcile_removes_stale_objects_and_keeps_matching_ones() {
    require_privileges!("reconcile_removes_stale_objects_and_keeps_matching_ones");
    let bed = Bed::new(&["a", "wan"]);
    let node = bed.path("a");
    wire(&bed, "a", "wan");
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db")).unwrap());
    let nat_iface = || VmInterface {
        network: PUBLIC_NAT.into(),
        ip: None,
    };
    let d = deployment(
        7,
        1,
        vec![
            vm("a", vec![nat_iface()], vec![]),
            vm("b", vec![nat_iface()], vec![]),
        ],
    );
    commit(&store, &d);
    let net = node_network(&bed, "a", 1);
    rt().block_on(net.sync(&store)).unwrap();
    let tap_a = naming::tap_name(7, 1, "a", 0);
    let tap_b = naming::tap_name(7, 1, "b", 0);
    let index_a = link_index(&node, &tap_a).unwrap();

    // A crash leaves stale objects: a tap nobody wants, a namespace of a network that is
    // gone, an interface of ours detached; and b's tap vanished.
    nl(&node, || async {
        links::create_tap("gn-t0000000000", TapOwner::default())?;
        Links::connect()?
            .delete(&naming::tap_name(7, 1, "b", 0))
            .await
    });
    let agent_ns = NsDir::new(bed.agent_nsdir("a"));
    agent_ns.create("gn-9-deadbeef").unwrap();
    // b is deleted from the desired state meanwhile; c is added.
    remove(&store, &d);
    let d2 = deployment(
        7,
        1,
        vec![
            vm("a", vec![nat_iface()], vec![]),
            vm("c", vec![nat_iface()], vec![]),
        ],
    );
    let op = store
        .begin_op(OpKind::Update, None, Some(&d2), (7, 1))
        .unwrap();
    store.end_op(op).unwrap();

    let report = rt()
        .block_on(node_network(&bed, "a", 1).sync(&store))
        .unwrap();
    let tap_c = naming::tap_name(7, 1, "c", 0);
    assert_eq!(report.created, vec![tap_c.clone()], "{report:?}");
    let mut removed = report.removed.clone();
    removed.sort();
    assert_eq!(
        removed,
        vec!["gn-9-deadbeef".to_string(), "gn-t0000000000".to_string()]
    );
    let names = link_names(&node);
    assert!(names.contains(&tap_a) && names.contains(&tap_c) && !names.contains(&tap_b));
    assert_eq!(
        link_index(&node, &tap_a),
        Some(index_a),
        "a's tap was made again"
    );
    assert!(agent_ns.list().unwrap().is_empty());
    // a keeps its address, c gets b's old one (freed).
    let vm_a = net.vm_network(&store, &d2, d2.vm("a").unwrap()).unwrap();
    let vm_c = net.vm_network(&store, &d2, d2.vm("c").unwrap()).unwrap();
    assert!(vm_a.guest.to_cmdline().contains("10.249.0.2/16"));
    assert!(vm_c.guest.to_cmdline().contains("10.249.0.3/16"));
    rt().block_on(net.teardown_all()).unwrap();
    assert!(!link_names(&node).iter().any(|n| n.starts_with("gn-")));
}

#[test]
fn the_engine_gives_a_vm_its_network_and_takes_it_back() {
    use node_agent::capacity::Resources;
    use node_agent::config::AgentConfig;
    use node_agent::engine::{DeployError, Engine};
    use node_agent::identity::KeyPair;
    use node_agent::metrics::Metrics;
    use node_agent::registrar::local::LocalRegistrar;
    require_privileges!("the_engine_gives_a_vm_its_network_and_takes_it_back");
    let bed = Bed::new(&["a", "wan"]);
    let node = bed.path("a");
    wire(&bed, "a", "wan");
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("agent.db")).unwrap());
    let registrar = LocalRegistrar::new(store.clone());
    let keys = [KeyPair::generate(), KeyPair::generate()];
    let twins: Vec<u32> = keys
        .iter()
        .map(|k| registrar.add_twin(&k.public()).unwrap().id)
        .collect();
    let config = AgentConfig {
        state_dir: dir.path().into(),
        listen: Some("0.0.0.0:2021".parse().unwrap()),
        ..Default::default()
    };
    let capacity = Resources {
        cru: 4,
        mru: 4 << 30,
        sru: 100 << 30,
        hru: 0,
    };
    let engine = Engine::new(
        store.clone(),
        config,
        Arc::new(registrar),
        Arc::new(Metrics::default()),
        capacity,
    )
    .with_network(Arc::new(node_network(&bed, "a", 1)));
    let nat = || VmInterface {
        network: PUBLIC_NAT.into(),
        ip: None,
    };
    let forward = |port| PortForward {
        protocol: Protocol::Tcp,
        host_port: port,
        vm_port: 80,
    };
    let signed = |i: usize, policy: FailurePolicy, port: u16| {
        let mut d = deployment(
            twins[i],
            1,
            vec![vm("web", vec![nat()], vec![forward(port)])],
        );
        d.on_failure = policy;
        d.sign(twins[i], &keys[i]);
        d
    };
    let tap = naming::tap_name(twins[0], 1, "web", 0);
    let rt = rt();
    // The image does not exist: the VM cannot start, the deployment is rolled back, and its
    // tap, address and forward go with it.
    let err = rt
        .block_on(engine.deploy(twins[0], signed(0, FailurePolicy::Rollback, 8080)))
        .unwrap_err();
    assert!(matches!(err, DeployError::Failed(_)), "{err}");
    assert!(!link_names(&node).contains(&tap));
    assert!(ipam::allocations(&store).unwrap().is_empty());
    assert!(link_names(&node).contains(&naming::NAT_BRIDGE.to_string()));
    // Kept although its VM failed: the tap and the address stay.
    let outcome = rt
        .block_on(engine.deploy(twins[0], {
            let mut d = signed(0, FailurePolicy::Keep, 8080);
            d.version = 2;
            d.signatures.clear();
            d.sign(twins[0], &keys[0]);
            d
        }))
        .unwrap();
    assert!(outcome.failed.contains_key("web"));
    assert!(link_names(&node).contains(&tap));
    // Its port on the NAT bridge is isolated: it reaches the node, never another VM there.
    assert_eq!(link_isolated(&node, &tap), Some(true), "{tap}");
    assert_eq!(ipam::allocations(&store).unwrap().len(), 1);
    let doc = store.deployments(Some(twins[0])).unwrap().remove(0);
    let addrs = engine.vm_addresses(&doc);
    assert_eq!(addrs["web"][0], "eth0 10.249.0.2/16", "{addrs:?}");
    // Another twin cannot take the same port, nor the agent's.
    let err = rt
        .block_on(engine.deploy(twins[1], signed(1, FailurePolicy::Keep, 8080)))
        .unwrap_err();
    assert!(matches!(err, DeployError::Conflict(_)), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("deployment 1 of twin {}", twins[0])),
        "{err}"
    );
    let err = rt
        .block_on(engine.deploy(twins[1], signed(1, FailurePolicy::Keep, 2021)))
        .unwrap_err();
    assert!(err.to_string().contains("API"), "{err}");
    // Delete takes the tap and the address back.
    rt.block_on(engine.delete(twins[0], twins[0], 1)).unwrap();
    assert!(!link_names(&node).contains(&tap));
    assert!(ipam::allocations(&store).unwrap().is_empty());
    rt.block_on(node_network(&bed, "a", 1).teardown_all())
        .unwrap();
}

/// The network `net` of `twin` over nodes 1 (192.0.2.1:`port`, subnet x.y.1.0/24) and 2
/// (192.0.2.2:`port`, x.y.2.0/24) of `range`, as node `me` gets it, with one VM on it.
fn wg_deployment(
    twin: u32,
    port: u16,
    keys: &[([u8; 32], [u8; 32])],
    me: usize,
    range: &str,
    node_ids: &[u32],
) -> Deployment {
    let r: Ipv4Net = range.parse().unwrap();
    let o = r.addr().octets();
    let nodes = node_ids
        .iter()
        .enumerate()
        .map(|(i, id)| NetworkNode {
            node_id: *id,
            subnet: format!("{}.{}.{}.0/24", o[0], o[1], i + 1).parse().unwrap(),
            wireguard_public_key: wireguard::encode_key(&keys[i].1),
            endpoint: Some(format!("192.0.2.{}:{port}", i + 1).parse().unwrap()),
        })
        .collect();
    deployment(
        twin,
        1,
        vec![
            Workload::Network(NetworkWorkload {
                name: "net".into(),
                ip_range: r,
                nodes,
                wireguard_private_key: wireguard::encode_key(&keys[me].0),
            }),
            vm(
                "vm",
                vec![VmInterface {
                    network: "net".into(),
                    ip: None,
                }],
                vec![],
            ),
        ],
    )
}

#[test]
fn two_nodes_talk_over_wireguard_and_another_owner_cannot_reach_them() {
    let test = "two_nodes_talk_over_wireguard_and_another_owner_cannot_reach_them";
    require_privileges!(test);
    if !wireguard_here() {
        if std::env::var_os(IN_TESTBED).is_some() {
            panic!("the test bed's kernel has no WireGuard either");
        }
        run_on_testbed(test);
        return;
    }
    let bed = Bed::new(&["a", "b", "vma", "vmb", "vmc"]);
    wire(&bed, "a", "b");
    // Node b's uplink is its veth end; its agent is told so.
    let keys = [wireguard::generate_keypair(), wireguard::generate_keypair()];
    let on_a = wg_deployment(7, 51820, &keys, 0, "10.20.0.0/16", &[1, 2]);
    let on_b = wg_deployment(7, 51820, &keys, 1, "10.20.0.0/16", &[1, 2]);
    let dir = tempfile::tempdir().unwrap();
    let store_a = Store::open(&dir.path().join("a.db")).unwrap();
    let store_b = Store::open(&dir.path().join("b.db")).unwrap();
    commit(&store_a, &on_a);
    commit(&store_b, &on_b);
    // Another owner on node a: a network of its own (only node a), one VM.
    let other_keys = [wireguard::generate_keypair()];
    let other = wg_deployment(8, 51821, &other_keys, 0, "10.30.0.0/16", &[1]);
    commit(&store_a, &other);

    let net_a = node_network(&bed, "a", 1);
    let mut cfg_b = net_a.config.clone();
    cfg_b.uplink = Some("peer0".into());
    cfg_b.netns_dir = bed.agent_nsdir("b");
    let net_b = Network::new(cfg_b, b"b")
        .unwrap()
        .with_host_ns(Ns::Path(bed.path("b")))
        .with_node_id(2);
    rt().block_on(net_a.sync(&store_a)).unwrap();
    rt().block_on(net_b.sync(&store_b)).unwrap();

    let ns_a = NsDir::new(bed.agent_nsdir("a"));
    let ns_b = NsDir::new(bed.agent_nsdir("b"));
    let priv_a = ns_a.path(&naming::netns_name(7, "net"));
    let priv_b = ns_b.path(&naming::netns_name(7, "net"));
    let priv_c = ns_a.path(&naming::netns_name(8, "net"));
    let vm_net = |net: &Network, store: &Store, d: &Deployment| {
        net.vm_network(store, d, d.vm("vm").unwrap()).unwrap()
    };
    let a = vm_net(&net_a, &store_a, &on_a);
    assert_eq!(a.attachments[0].netns.as_deref(), Some(priv_a.as_path()));
    assert_eq!(
        a.guest.to_cmdline(),
        "gridnode.ip=eth0,10.20.1.2/24 gridnode.route=eth0,10.20.0.0/16,10.20.1.1"
    );
    // The taps are in the networks' namespaces, not the node's.
    assert!(link_names(&priv_a).contains(&a.attachments[0].tap));
    assert!(!link_names(&bed.path("a")).contains(&a.attachments[0].tap));
    assert!(link_names(&priv_a).contains(&naming::wg_name(7, "net")));
    // The vmm, outside the namespace, gets such a tap as an fd the agent opens in there.
    drop(links::open_tap(&priv_a, &a.attachments[0].tap).unwrap());

    let range: Ipv4Net = "10.20.0.0/16".parse().unwrap();
    stand_in_vm(
        &priv_a,
        naming::NETWORK_BRIDGE,
        &bed.path("vma"),
        Ipv4Addr::new(10, 20, 1, 2),
        24,
        range,
        Ipv4Addr::new(10, 20, 1, 1),
    );
    stand_in_vm(
        &priv_b,
        naming::NETWORK_BRIDGE,
        &bed.path("vmb"),
        Ipv4Addr::new(10, 20, 2, 2),
        24,
        range,
        Ipv4Addr::new(10, 20, 2, 1),
    );
    stand_in_vm(
        &priv_c,
        naming::NETWORK_BRIDGE,
        &bed.path("vmc"),
        Ipv4Addr::new(10, 30, 1, 2),
        24,
        "10.0.0.0/8".parse().unwrap(),
        Ipv4Addr::new(10, 30, 1, 1),
    );

    // a's VM reaches b's over WireGuard, unNATed; and back.
    let server = serve_once(&bed.path("vmb"), "10.20.2.2:7000".parse().unwrap());
    send(
        &bed.path("vma"),
        "10.20.2.2:7000".parse().unwrap(),
        "a-to-b",
    )
    .unwrap();
    let (peer, text) = server.join().unwrap();
    assert_eq!(
        (peer.ip().to_string().as_str(), text.as_str()),
        ("10.20.1.2", "a-to-b")
    );
    let server = serve_once(&bed.path("vma"), "10.20.1.2:7000".parse().unwrap());
    send(
        &bed.path("vmb"),
        "10.20.1.2:7000".parse().unwrap(),
        "b-to-a",
    )
    .unwrap();
    assert_eq!(server.join().unwrap().1, "b-to-a");

    // The other owner's VM, on the same node, reaches neither; nor does the node itself.
    for target in ["10.20.1.2:7000", "10.20.2.2:7000"] {
        let t: SocketAddr = target.parse().unwrap();
        let server = serve_once(
            &bed.path(if target.starts_with("10.20.1") {
                "vma"
            } else {
                "vmb"
            }),
            t,
        );
        assert!(
            send(&bed.path("vmc"), t, "c").is_err(),
            "owner 8 reached {target}"
        );
        assert!(
            send(&bed.path("a"), t, "node").is_err(),
            "node a reached {target}"
        );
        // Unblock the server.
        send(
            &bed.path(if target.starts_with("10.20.1") {
                "vma"
            } else {
                "vmb"
            }),
            t,
            "done",
        )
        .unwrap();
        assert_eq!(server.join().unwrap().1, "done");
    }

    // Restart keeps the tunnel's link (same index), and deletion removes the namespaces.
    let wg_index = link_index(&priv_a, &naming::wg_name(7, "net"));
    let report = rt()
        .block_on(node_network(&bed, "a", 1).sync(&store_a))
        .unwrap();
    assert!(
        report.created.is_empty() && report.removed.is_empty(),
        "{report:?}"
    );
    assert_eq!(link_index(&priv_a, &naming::wg_name(7, "net")), wg_index);
    remove(&store_a, &on_a);
    let report = rt().block_on(net_a.sync(&store_a)).unwrap();
    assert_eq!(
        report.removed,
        vec![naming::netns_name(7, "net")],
        "{report:?}"
    );
    assert_eq!(ns_a.list().unwrap(), vec![naming::netns_name(8, "net")]);
    rt().block_on(net_a.teardown_all()).unwrap();
    rt().block_on(net_b.teardown_all()).unwrap();
    assert!(ns_a.list().unwrap().is_empty() && ns_b.list().unwrap().is_empty());
    for n in ["a", "b"] {
        assert!(
            !link_names(&bed.path(n))
                .iter()
                .any(|l| l.starts_with("gn-")),
            "{n}"
        );
        assert!(tables(&bed.path(n)).is_empty());
    }
}

/// Runs `test` of this binary on the test bed, with the kernel modules it needs.
fn run_on_testbed(test: &str) {
    use e2e_tests::{skip_if_missing, Job, Testbed};
    let modules = [
        "wireguard",
        "nf_tables",
        "nft_chain_nat",
        "nft_nat",
        "nft_masq",
        "nft_ct",
        "veth",
        "bridge",
        "tun",
    ];
    let Some(bed) = skip_if_missing(
        test,
        Testbed::from_system().and_then(|t| t.with_modules(&modules)),
    )
    .unwrap() else {
        return;
    };
    let exe = std::env::current_exe().unwrap();
    let job = Job::new(format!(
        "{IN_TESTBED}=1 /net-tests --exact {test} --nocapture --test-threads 1"
    ))
    .binary("/net-tests", exe)
    .timeout(Duration::from_secs(300));
    let out = bed.run(&job).unwrap();
    println!("{}", out.output);
    assert_eq!(out.status, 0, "on the test bed:\n{}", out.output);
    assert!(out.output.contains("1 passed"), "{}", out.output);
}
