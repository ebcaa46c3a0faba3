//! The checks of a deployment's networking that depend on the node: networking enabled, this
//! node in each network exactly once with a key pair that matches, subnets clear of the NAT
//! range, ports free (the agent's own, the operator's reserved ones, other deployments'
//! forwards and WireGuard ports), network names unique per owner. The format alone is checked
//! by [`crate::deployment`].

use std::collections::BTreeMap;

use crate::deployment::{Deployment, Protocol};

use super::{wireguard, NetworkConfig};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    /// The deployment cannot be run on this node as written.
    #[error("{0}")]
    Invalid(String),
    /// It conflicts with another deployment on the node.
    #[error("{0}")]
    Conflict(String),
    /// The node cannot decide yet (not registered).
    #[error("{0}")]
    Unavailable(String),
}

/// What holds a port of the node.
fn holder(d: &Deployment, what: &str) -> String {
    format!(
        "{what} of deployment {} of twin {}",
        d.deployment_id, d.twin_id
    )
}

/// The node's ports a deployment takes: (protocol, port) -> what takes it.
fn ports_of(d: &Deployment, node_id: Option<u32>) -> Vec<((Protocol, u16), String)> {
    let mut out = Vec::new();
    for vm in d.vms() {
        for f in &vm.port_forwards {
            out.push((
                (f.protocol, f.host_port),
                holder(d, &format!("a port forward of workload {}", vm.name)),
            ));
        }
    }
    if let Some(id) = node_id {
        for net in d.networks() {
            if let Some(port) = net.node(id).and_then(|n| n.endpoint).map(|e| e.port()) {
                out.push((
                    (Protocol::Udp, port),
                    holder(d, &format!("the WireGuard port of network {}", net.name)),
                ));
            }
        }
    }
    out
}

/// Checks `doc` against the node (`api_port`: the agent's TCP API port) and the other active
/// deployments (`others`, without `doc`'s own current version).
pub fn check_deployment(
    config: &NetworkConfig,
    api_port: Option<u16>,
    node_id: Option<u32>,
    doc: &Deployment,
    others: &[Deployment],
) -> Result<(), CheckError> {
    if !doc.uses_network() {
        return Ok(());
    }
    if !config.enabled {
        return Err(CheckError::Invalid(
            "this node does not offer networking (its operator has not enabled it): the deployment has interfaces or networks".into(),
        ));
    }
    for net in doc.networks() {
        let Some(id) = node_id else {
            return Err(CheckError::Unavailable(
                "the node is not registered yet (it has no node id to find itself in the network); try again later".into(),
            ));
        };
        let Some(me) = net.node(id) else {
            return Err(CheckError::Invalid(format!(
                "network {} does not list this node (node {id})",
                net.name
            )));
        };
        let private = wireguard::parse_key(&net.wireguard_private_key).map_err(|e| {
            CheckError::Invalid(format!("network {}: wireguard_private_key: {e}", net.name))
        })?;
        let expected = wireguard::encode_key(&wireguard::public_key(&private));
        if expected != me.wireguard_public_key {
            return Err(CheckError::Invalid(format!(
                "network {}: wireguard_private_key does not belong to node {id}'s wireguard_public_key (its public key is {expected})",
                net.name
            )));
        }
        if me.endpoint.is_none() {
            return Err(CheckError::Invalid(format!(
                "network {}: node {id} (this node) needs an endpoint: its port is where it listens",
                net.name
            )));
        }
        if me.subnet.overlaps(&config.nat_range) {
            return Err(CheckError::Invalid(format!(
                "network {}: this node's subnet {} overlaps the node's NAT range {}",
                net.name, me.subnet, config.nat_range
            )));
        }
        for o in others.iter().filter(|o| o.twin_id == doc.twin_id) {
            if o.network(&net.name).is_some() {
                return Err(CheckError::Conflict(format!(
                    "network {} is already deployed on this node by deployment {} of twin {} (one network name per owner and node)",
                    net.name, o.deployment_id, o.twin_id
                )));
            }
        }
    }
    let mut taken: BTreeMap<(Protocol, u16), String> = BTreeMap::new();
    if let Some(p) = api_port {
        taken.insert((Protocol::Tcp, p), "the node agent's API".into());
    }
    for p in &config.reserved_ports {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            taken.insert((proto, *p), "the node's operator (reserved_ports)".into());
        }
    }
    for o in others {
        for (k, v) in ports_of(o, node_id) {
            taken.entry(k).or_insert(v);
        }
    }
    let mut mine: BTreeMap<(Protocol, u16), String> = BTreeMap::new();
    for (k, v) in ports_of(doc, node_id) {
        if let Some(by) = taken.get(&k) {
            return Err(CheckError::Conflict(format!(
                "port {}/{} of the node is taken by {by}",
                k.1, k.0
            )));
        }
        if let Some(by) = mine.get(&k) {
            return Err(CheckError::Invalid(format!(
                "port {}/{} of the node is used twice in the deployment: by {by} and by {v}",
                k.1, k.0
            )));
        }
        mine.insert(k, v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deployment::tests::sample;
    use crate::deployment::{
        NetworkNode, NetworkWorkload, PortForward, VmInterface, Workload, PUBLIC_NAT,
    };

    fn enabled() -> NetworkConfig {
        NetworkConfig {
            enabled: true,
            uplink: Some("eth0".into()),
            reserved_ports: vec![22],
            ..Default::default()
        }
    }

    fn with_forward(twin: u32, id: u64, port: u16) -> Deployment {
        let mut d = sample(twin, 1);
        d.deployment_id = id;
        let Workload::Vm(vm) = &mut d.workloads[0] else {
            unreachable!()
        };
        vm.interfaces = vec![VmInterface {
            network: PUBLIC_NAT.into(),
            ip: None,
        }];
        vm.port_forwards = vec![PortForward {
            protocol: Protocol::Tcp,
            host_port: port,
            vm_port: 80,
        }];
        d
    }

    pub(crate) fn network(node_ids: &[u32], me: u32) -> (NetworkWorkload, [u8; 32]) {
        let mut private = [0u8; 32];
        let nodes = node_ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let (sk, pk) = wireguard::generate_keypair();
                if *id == me {
                    private = sk;
                }
                NetworkNode {
                    node_id: *id,
                    subnet: format!("10.20.{}.0/24", i + 1).parse().unwrap(),
                    wireguard_public_key: wireguard::encode_key(&pk),
                    endpoint: Some(format!("192.0.2.{}:51820", i + 1).parse().unwrap()),
                }
            })
            .collect();
        (
            NetworkWorkload {
                name: "net".into(),
                ip_range: "10.20.0.0/16".parse().unwrap(),
                nodes,
                wireguard_private_key: wireguard::encode_key(&private),
            },
            private,
        )
    }

    #[test]
    fn networking_must_be_enabled() {
        let d = with_forward(1, 1, 8080);
        let err = check_deployment(&NetworkConfig::default(), None, None, &d, &[]).unwrap_err();
        assert!(
            err.to_string().contains("does not offer networking"),
            "{err}"
        );
        // A deployment without networking passes either way.
        check_deployment(&NetworkConfig::default(), None, None, &sample(1, 1), &[]).unwrap();
    }

    #[test]
    fn port_conflicts_name_the_holder() {
        let cfg = enabled();
        let a = with_forward(1, 1, 8080);
        check_deployment(&cfg, Some(7070), None, &a, &[]).unwrap();
        let b = with_forward(2, 5, 8080);
        let err =
            check_deployment(&cfg, Some(7070), None, &b, std::slice::from_ref(&a)).unwrap_err();
        assert!(matches!(err, CheckError::Conflict(_)));
        assert!(
            err.to_string()
                .contains("workload web of deployment 1 of twin 1"),
            "{err}"
        );
        let err = check_deployment(&cfg, Some(8080), None, &a, &[]).unwrap_err();
        assert!(err.to_string().contains("API"), "{err}");
        let err = check_deployment(&cfg, None, None, &with_forward(1, 1, 22), &[]).unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
        // The same port over UDP is another port.
        let mut c = with_forward(3, 1, 8080);
        let Workload::Vm(vm) = &mut c.workloads[0] else {
            unreachable!()
        };
        vm.port_forwards[0].protocol = Protocol::Udp;
        check_deployment(&cfg, None, None, &c, &[a]).unwrap();
    }

    #[test]
    fn this_node_must_be_in_the_network_with_its_key() {
        let cfg = enabled();
        let (net, _) = network(&[1, 2, 3], 2);
        let mut d = sample(9, 1);
        d.workloads.push(Workload::Network(net.clone()));
        d.validate().unwrap();
        check_deployment(&cfg, None, Some(2), &d, &[]).unwrap();
        let err = check_deployment(&cfg, None, Some(4), &d, &[]).unwrap_err();
        assert!(
            err.to_string().contains("does not list this node (node 4)"),
            "{err}"
        );
        assert!(matches!(
            check_deployment(&cfg, None, None, &d, &[]),
            Err(CheckError::Unavailable(_))
        ));
        // Node 1's key is not node 2's.
        let err = check_deployment(&cfg, None, Some(1), &d, &[]).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
        // The WireGuard port conflicts with a UDP forward of another deployment.
        let mut other = with_forward(4, 1, 1);
        let Workload::Vm(vm) = &mut other.workloads[0] else {
            unreachable!()
        };
        vm.port_forwards[0] = PortForward {
            protocol: Protocol::Udp,
            host_port: 51820,
            vm_port: 53,
        };
        let err = check_deployment(&cfg, None, Some(2), &d, &[other]).unwrap_err();
        assert!(err.to_string().contains("port 51820/udp"), "{err}");
        // The same owner cannot deploy the same network name twice on a node.
        let mut again = d.clone();
        again.deployment_id = 2;
        let err = check_deployment(&cfg, None, Some(2), &again, &[d]).unwrap_err();
        assert!(err.to_string().contains("already deployed"), "{err}");
    }
}
