//! Networking of VMs through the node agent on the test bed (a real KVM host inside QEMU):
//! a signed deployment of a private network and two VMs, one on the node's NAT bridge and the
//! network, one on the network only. The guests are configured by their init from the kernel
//! command line the agent wrote; the second VM reaches the first over the private network's
//! bridge inside its namespace (its tap passed to the vmm as an fd); the first reaches a host
//! outside (a namespace behind the node's uplink) through the NAT, and that host reaches it
//! through a port forward; the node reaches the first over the NAT bridge, and not the private
//! network; the agent killed with -9 comes back
//! without touching the running VM's tap (same interface index, traffic still flows); delete
//! removes the taps, the network's namespace and the port forward.

use e2e_tests::agent_bed::{self, NETWORK_MODULES};
use e2e_tests::{artifacts, skip_if_missing, Error, Testbed};

/// Runs `script` on a test bed with the agent (debug build), the vmm, flist and a busybox
/// guest, and checks that its output has every one of `needles`.
fn run_agent_job(test: &str, script: &str, needles: &[&str]) -> Result<(), Error> {
    let Some(testbed) = skip_if_missing(test, Testbed::from_system())? else {
        return Ok(());
    };
    let testbed = testbed.with_modules(NETWORK_MODULES)?;
    if skip_if_missing(test, artifacts::guest_kernel())?.is_none() {
        return Ok(());
    }
    let job = agent_bed::agent_job(test, script, &artifacts::vmm_binary()?, "debug", &[])?
        .timeout(std::time::Duration::from_secs(900));
    let out = testbed.run(&job)?;
    eprintln!("--- job output ---\n{}", out.output);
    for needle in needles {
        assert!(
            out.output.contains(needle),
            "missing {needle:?}:\n{}",
            out.output
        );
    }
    Ok(())
}

const SCRIPT: &str = r#"
fail() {
  echo "FAIL: $*"; echo "--- agent log"; tail -n 60 /srv/agent.log
  for f in /srv/state/vms/*/*/*/console.log /srv/state/vms/*/*/*/vmm.log; do echo "--- $f"; tail -n 30 "$f"; done
  exit 1
}
wait_for() { i=0; while ! sh -c "$1" >/dev/null 2>&1; do i=$((i+1)); if [ $i -gt $2 ]; then fail "timeout: $1"; fi; sleep 1; done; }
A=/node-agent
K="--key /srv/user.key --agent /srv/state/agent.sock"

# The uplink: a veth whose other end is in a namespace standing in for the outside world.
unshare -n sleep 100000 & WAN=$!
sleep 1
W="nsenter -t $WAN -n"
ip link add up0 type veth && ip link set veth0 netns $WAN || fail "veth"
ip addr add 192.0.2.1/24 dev up0 && ip link set up0 up || fail "uplink"
$W ip addr add 192.0.2.2/24 dev veth0 && $W ip link set veth0 up && $W ip link set lo up || fail "outside"
# The outside serves port 9000: a VM's connection can only come back if it was masqueraded
# (the outside has no route to the node's private range).
$W sh -c 'nc -l -p 9000 > /srv/wan.got' &
echo '{"state_dir": "/srv/state", "registrar": "local", "uptime_interval_secs": 5,
 "reserve": {"cru": 0, "mru": 0, "sru": 0, "hru": 0},
 "network": {"enabled": true, "uplink": "up0"},
 "vmm": {"bin": "/vmm", "kernel": "/guest/vmlinux", "initrd": "/guest/initrd",
         "node_config": "/srv/node.json", "cmdline": "quiet", "console_max_bytes": 65536}}' > /srv/agent.json
start_agent() { GRIDNODE_LOG=info $A run --config /srv/agent.json >> /srv/agent.log 2>&1 & AGENT=$!; wait_for "test -S /srv/state/agent.sock && $A node --agent /srv/state/agent.sock" 30; }
start_agent
[ -d /sys/class/net/gn-br0 ] && echo nat-bridge-up-1 || fail "no NAT bridge at start"

$A keygen --out /srv/user.key > /dev/null
$A twin register --key /srv/user.key --registrar /srv/state/agent.sock || fail "twin register"
TWIN=$(cat /srv/user.key.twin)
wait_for "$A node --agent /srv/state/agent.sock | grep -q '\"registered\": true'" 60
NODE=$($A node --agent /srv/state/agent.sock | sed -n 's/.*"node_id": \([0-9]*\).*/\1/p')
[ -n "$NODE" ] || fail "no node id"

cat > /srv/d1.json <<JSON
{"twin_id": $TWIN, "deployment_id": 1, "version": 1, "workloads": [
 {"type": "network", "name": "net", "ip_range": "10.20.0.0/16",
  "nodes": [{"node_id": $NODE, "subnet": "10.20.1.0/24", "wireguard_public_key": "@NODE_PUBLIC@", "endpoint": "192.0.2.1:51820"},
            {"node_id": 4242, "subnet": "10.20.2.0/24", "wireguard_public_key": "@PEER_PUBLIC@", "endpoint": "192.0.2.99:51820"}],
  "wireguard_private_key": "@NODE_PRIVATE@"},
 {"type": "vm", "name": "a", "image": "/srv/root.flist", "vcpus": 1, "memory_mib": 128, "rootfs_mib": 64,
  "interfaces": [{"network": "public-nat"}, {"network": "net"}],
  "port_forwards": [{"protocol": "tcp", "host_port": 8080, "vm_port": 80}],
  "entrypoint": "/bin/sh", "args": ["-c", "(while true; do nc -l -p 80 | sed s/^/a-got-/; done) & ip addr; ip route; ping -c 1 -W 5 10.249.0.1 > /dev/null && echo a-pinged-gateway; echo from-a-via-nat | timeout 5 nc 192.0.2.2 9000; echo a-up; wait"]},
 {"type": "vm", "name": "b", "image": "/srv/root.flist", "vcpus": 1, "memory_mib": 128, "rootfs_mib": 64,
  "interfaces": [{"network": "net", "ip": "10.20.1.50"}],
  "entrypoint": "/bin/sh", "args": ["-c", "ip addr; i=0; until ping -c 1 -W 1 10.20.1.2 > /dev/null 2>&1; do i=\$((i+1)); [ \$i -gt 120 ] && break; done; for t in 1 2 3 4 5 6; do echo from-b | timeout 5 nc 10.20.1.2 80 && break; sleep 2; done; echo b-sent; while true; do sleep 1; done"]}
]}
JSON
$A deploy /srv/d1.json $K && echo deploy-ok-2 || fail "deploy"
wait_for "$A logs a $K | grep -q a-up" 180
$A logs a $K | grep -q 'inet 10.249.0.2/16' && $A logs a $K | grep -q 'inet 10.20.1.2/24' && echo a-configured-3 || fail "a's addresses: $($A logs a $K)"
$A logs a $K | grep -q a-pinged-gateway && echo a-reached-gateway-4 || fail "a did not reach its gateway"
wait_for "$A logs a $K | grep -q a-got-from-b" 240
echo b-reached-a-over-the-network-5
# The node reaches a on the NAT bridge, not on the private network.
# (a serves one connection at a time: a send is tried again until it got through.)
wait_for "echo from-host | timeout 5 nc 10.249.0.2 80; $A logs a $K | grep -q a-got-from-host" 30
echo node-reached-a-6
ping -c 1 -W 2 10.20.1.2 > /dev/null 2>&1 && fail "the node reached the private network" || echo private-network-closed-7
# Outbound through the NAT, inbound through the port forward.
wait_for "grep -q from-a-via-nat /srv/wan.got" 30
echo a-reached-the-outside-masqueraded-7b
wait_for "echo from-wan | $W timeout 5 nc 192.0.2.1 8080; $A logs a $K | grep -q a-got-from-wan" 30
echo port-forward-7c
NS=$(ls /run/netns)
[ "$(echo $NS | wc -w)" = 1 ] && echo one-namespace-8 || fail "namespaces: $NS"
[ -d /sys/class/net/gn-br0 ] && [ "$(ls /sys/class/net | grep -c '^gn-t')" = 1 ] && echo one-nat-tap-9 || fail "taps: $(ls /sys/class/net)"

# The agent killed with -9: a keeps its tap and its traffic.
TAP=$(ls /sys/class/net | grep '^gn-t')
IDX=$(cat /sys/class/net/$TAP/ifindex)
kill -9 $AGENT; wait $AGENT 2>/dev/null
start_agent
sleep 3
[ "$(cat /sys/class/net/$TAP/ifindex)" = "$IDX" ] && echo tap-kept-10 || fail "tap $TAP was made again"
wait_for "echo from-host-again | timeout 5 nc 10.249.0.2 80; $A logs a $K | grep -q a-got-from-host-again" 30
echo traffic-after-restart-11

# Delete: taps and the namespace go, the node's bridge stays.
$A rm 1 $K || fail rm
[ "$(ls /sys/class/net | grep -c '^gn-t')" = 0 ] && echo taps-gone-12 || fail "taps left: $(ls /sys/class/net)"
[ -z "$(ls /run/netns)" ] && echo namespace-gone-13 || fail "namespaces left: $(ls /run/netns)"
# Without the forward, the node's own port 8080 gets the connection.
nc -l -p 8080 > /srv/node.got & sleep 1
wait_for "echo from-wan-after-delete | $W timeout 5 nc 192.0.2.1 8080; grep -q from-wan-after-delete /srv/node.got" 10
echo forward-gone-14
echo network-e2e-done
"#;

#[test]
fn vms_get_nat_and_a_private_network_through_the_agent() -> Result<(), Error> {
    run_agent_job(
        "vms_get_nat_and_a_private_network_through_the_agent",
        SCRIPT,
        &[
            "nat-bridge-up-1",
            "deploy-ok-2",
            "a-configured-3",
            "a-reached-gateway-4",
            "b-reached-a-over-the-network-5",
            "node-reached-a-6",
            "private-network-closed-7",
            "a-reached-the-outside-masqueraded-7b",
            "port-forward-7c",
            "one-namespace-8",
            "one-nat-tap-9",
            "tap-kept-10",
            "traffic-after-restart-11",
            "taps-gone-12",
            "namespace-gone-13",
            "forward-gone-14",
            "network-e2e-done",
        ],
    )
}

/// Two nodes on one test bed ([`agent_bed::TWO_NODES`]). One owner deploys a private network over both nodes and a
/// VM on each (a on A, b on B), which exchange TCP over WireGuard between the nodes. Another
/// owner's VM c on node A, on the NAT bridge and on a private network of its own with the same
/// range, reaches the node but neither of the first owner's VMs: not a on the NAT bridge (its
/// tap is an isolated bridge port), not a through the node (the node forwards nothing between
/// VMs on the bridge), not b (its network does not route to the owner's); nor can it send as a
/// (a's address on c's interface: the node never answers, the tap's guard drops the frames). After every
/// deployment is deleted each node's links and namespaces are what they were before.
const TWO_NODES_CHECKS: &str = r#"
# Each VM serves port 80, waits until it reaches the other over the network, and sends to it.
vm() { # name, interfaces, the other's address
  echo '{"type": "vm", "name": "'$1'", "image": "/srv/root.flist", "vcpus": 1, "memory_mib": 128, "rootfs_mib": 64,
  "interfaces": '$2', "entrypoint": "/bin/sh", "args": ["-c",
  "(while true; do nc -l -p 80 | sed s/^/'$1'-got-/; done) & ip addr; echo '$1'-up; i=0; until ping -c 1 -W 1 '$3' > /dev/null 2>&1; do i=$((i+1)); [ $i -gt 240 ] && break; done; for t in 1 2 3 4 5 6 7 8 9 10; do echo from-'$1' | timeout 5 nc '$3' 80 && break; sleep 2; done; echo '$1'-sent; wait"]}'
}
echo "{\"twin_id\": $TWIN, \"deployment_id\": 1, \"version\": 1, \"workloads\": [$(net @NODE_PRIVATE@), $(vm a '[{"network": "public-nat"}, {"network": "net"}]' 10.20.2.2)]}" > /srv/da.json
echo "{\"twin_id\": $TWIN, \"deployment_id\": 1, \"version\": 1, \"workloads\": [$(net @PEER_PRIVATE@), $(vm b '[{"network": "net"}]' 10.20.1.2)]}" > /srv/db.json
$A deploy /srv/da.json $KA > /dev/null || fail "deploy on a"
$A deploy /srv/db.json $KB > /dev/null || fail "deploy on b"
echo deployed-on-both-2
wait_for "$A logs a $KA | grep -q a-up" 240
wait_for "$A logs b $KB | grep -q b-up" 240
$A logs a $KA | grep -q 'inet 10.20.1.2/24' && $A logs b $KB | grep -q 'inet 10.20.2.2/24' && echo addresses-3 || fail "addresses: $($A logs a $KA) $($A logs b $KB)"
wait_for "$A logs a $KA | grep -q a-got-from-b" 300
echo b-on-node-b-reached-a-on-node-a-4
wait_for "$A logs b $KB | grep -q b-got-from-a" 300
echo a-on-node-a-reached-b-on-node-b-5

# Another owner on node A: the NAT bridge and a network of the same range of its own.
C_SCRIPT='i=0; until ping -c 1 -W 1 10.249.0.1 > /dev/null 2>&1; do i=$((i+1)); [ $i -gt 120 ] && break; done; ping -c 1 -W 2 10.249.0.1 > /dev/null && echo c-reached-its-gateway; if echo from-c-bridge | timeout 5 nc 10.249.0.2 80; then echo c-REACHED-a-on-the-bridge; else echo c-kept-from-a-on-the-bridge; fi; ip route add 10.249.0.2/32 via 10.249.0.1 && if echo from-c-routed | timeout 5 nc 10.249.0.2 80; then echo c-REACHED-a-through-the-node; else echo c-kept-from-a-through-the-node; fi; if echo from-c-net | timeout 5 nc 10.20.2.2 80; then echo c-REACHED-b; else echo c-kept-from-b; fi; ip addr add 10.249.0.2/32 dev eth0 && if ping -c 3 -W 2 -I 10.249.0.2 10.249.0.1 > /dev/null; then echo c-SPOOFED-a; else echo c-could-not-spoof-a; fi; ip addr del 10.249.0.2/32 dev eth0; echo c-done; while true; do sleep 1; done'
cat > /srv/dc.json <<JSON
{"twin_id": $OTHER, "deployment_id": 1, "version": 1, "workloads": [
 {"type": "network", "name": "net", "ip_range": "10.20.0.0/16",
  "nodes": [{"node_id": $NODEA, "subnet": "10.20.1.0/24", "wireguard_public_key": "@PEER_PUBLIC@", "endpoint": "192.0.2.1:51821"}],
  "wireguard_private_key": "@PEER_PRIVATE@"},
 {"type": "vm", "name": "c", "image": "/srv/root.flist", "vcpus": 1, "memory_mib": 128, "rootfs_mib": 64,
  "interfaces": [{"network": "public-nat"}, {"network": "net"}],
  "entrypoint": "/bin/sh", "args": ["-c", "$C_SCRIPT"]}
]}
JSON
$A deploy /srv/dc.json $KC > /dev/null || fail "deploy of the other owner"
wait_for "$A logs c $KC | grep -q c-done" 300
$A logs c $KC | grep -q c-reached-its-gateway && echo other-owner-vm-up-6 || fail "c never reached its gateway: $($A logs c $KC)"
$A logs c $KC | grep -q c-kept-from-a-on-the-bridge && echo other-owner-kept-off-the-bridge-7 || fail "c: $($A logs c $KC)"
$A logs c $KC | grep -q c-kept-from-a-through-the-node && echo other-owner-kept-off-the-node-8 || fail "c: $($A logs c $KC)"
$A logs c $KC | grep -q c-kept-from-b && echo other-owner-kept-off-the-network-9 || fail "c: $($A logs c $KC)"
$A logs c $KC | grep -q c-could-not-spoof-a && echo other-owner-cannot-send-as-a-9b || fail "c: $($A logs c $KC)"
$A logs a $KA | grep -q from-c && fail "a got c's traffic: $($A logs a $KA)"
echo a-got-nothing-from-c-10

$A rm 1 $KA > /dev/null && $A rm 1 $KB > /dev/null && $A rm 1 $KC > /dev/null || fail "rm"
[ "$(links)" = "$LINKS_A" ] && echo node-a-links-as-before-11 || fail "node a's links: $(links), before: $LINKS_A"
[ "$(links "$B")" = "$LINKS_B" ] && echo node-b-links-as-before-12 || fail "node b's links: $(links "$B"), before: $LINKS_B"
[ -z "$(ls /run/netns)" ] && [ -z "$(ls /run/netns-b)" ] && echo namespaces-gone-13 || fail "namespaces left: $(ls /run/netns /run/netns-b)"
echo two-nodes-done
"#;

#[test]
fn two_nodes_carry_one_owners_private_network_and_keep_another_owner_out() -> Result<(), Error> {
    run_agent_job(
        "two_nodes_carry_one_owners_private_network_and_keep_another_owner_out",
        &format!("{}{TWO_NODES_CHECKS}", agent_bed::TWO_NODES),
        &[
            "two-nodes-registered-1",
            "deployed-on-both-2",
            "addresses-3",
            "b-on-node-b-reached-a-on-node-a-4",
            "a-on-node-a-reached-b-on-node-b-5",
            "other-owner-vm-up-6",
            "other-owner-kept-off-the-bridge-7",
            "other-owner-kept-off-the-node-8",
            "other-owner-kept-off-the-network-9",
            "other-owner-cannot-send-as-a-9b",
            "a-got-nothing-from-c-10",
            "node-a-links-as-before-11",
            "node-b-links-as-before-12",
            "namespaces-gone-13",
            "two-nodes-done",
        ],
    )
}
