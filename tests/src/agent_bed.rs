//! A test bed that runs node agents: the guests' root image, the agent's networking modules,
//! and the shell that makes two nodes on one bed (two agents in two network namespaces, one
//! registrar), shared by the networking tests and the private-network benchmark.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::{artifacts, microvm, Job};

/// RFC 7748's X25519 test keys, base64 (node A has Alice's, node B Bob's). Scripts name them
/// `@NODE_PRIVATE@`, `@NODE_PUBLIC@`, `@PEER_PRIVATE@`, `@PEER_PUBLIC@`.
pub const NODE_PRIVATE: &str = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=";
pub const NODE_PUBLIC: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
pub const PEER_PRIVATE: &str = "XasIfmJKikt54X+Lg4AO5m87sSkmGLb9HC+LJ/+I4Os=";
pub const PEER_PUBLIC: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";

/// The modules of the test bed's kernel that the agent's networking uses.
pub const NETWORK_MODULES: &[&str] = &[
    "tun",
    "veth",
    "bridge",
    "wireguard",
    "nf_tables",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_ct",
];

/// Shell that packs the guests' root (`/srv/root.flist`, store `/srv/store`): busybox with
/// the applets the tests use, and `programs` (host programs the job carries at their host
/// paths, with their libraries), and writes the vmm's node configuration `/srv/node.json`.
fn guest_root(programs: &[PathBuf]) -> Result<String> {
    let mut files = Vec::new();
    for p in programs {
        files.push(p.clone());
        files.extend(crate::shared_libraries(p)?);
    }
    let copies: String = files
        .iter()
        .map(|f| {
            let f = f.display();
            format!("mkdir -p \"/srv/rootfs$(dirname {f})\" && cp {f} \"/srv/rootfs{f}\" || fail_root {f}\n")
        })
        .collect();
    Ok(format!(
        r#"
set -u
fail_root() {{ echo "FAIL: copying $1 into the guests' root"; exit 1; }}
mkdir -p /srv/rootfs/bin /srv/rootfs/etc /srv/rootfs/proc /srv/rootfs/dev /srv/rootfs/tmp /srv/rootfs/sys /srv/rootfs/run
cp /bin/busybox /srv/rootfs/bin/busybox
for a in sh cat echo sleep ip ping nc sed timeout; do ln -s busybox /srv/rootfs/bin/$a; done
{copies}/flist pack /srv/rootfs -o /srv/root.flist --store dir:///srv/store > /dev/null || {{ echo "FAIL: pack"; exit 1; }}
echo '{{"image_cache": "/srv/cache", "stores": ["dir:///srv/store"]}}' > /srv/node.json
chmod 600 /srv/node.json
"#
    ))
}

/// A job that runs `script` after packing the guests' root, with the vmm `vmm`, the agent and
/// flist of `profile` (`debug` or `release`), the guest kernel and a busybox guest initramfs,
/// and `programs` (in the job and in the guests' root at their host paths). The script's
/// `@NODE_PRIVATE@`-style names are replaced by the keys above.
pub fn agent_job(
    name: &str,
    script: &str,
    vmm: &Path,
    profile: &str,
    programs: &[PathBuf],
) -> Result<Job> {
    let kernel = artifacts::guest_kernel()?;
    let init = artifacts::guest_init()?;
    let scratch = crate::artifacts::scratch_dir(name)?;
    let initrd = scratch.join("initrd.cpio");
    microvm::guest_initramfs(&init, Path::new("/bin/busybox"))?.write_file(&initrd)?;
    let target = artifacts::target_dir().join(profile);
    let script = script
        .replace("@NODE_PRIVATE@", NODE_PRIVATE)
        .replace("@NODE_PUBLIC@", NODE_PUBLIC)
        .replace("@PEER_PRIVATE@", PEER_PRIVATE)
        .replace("@PEER_PUBLIC@", PEER_PUBLIC);
    let mut job = Job::new(format!("{}{script}", guest_root(programs)?))
        .binary("/vmm", vmm)
        .binary("/flist", target.join("flist"))
        .binary("/node-agent", target.join("node-agent"))
        .file("/guest/vmlinux", &kernel.vmlinux)
        .file("/guest/initrd", &initrd);
    for p in programs {
        job = job.binary(&p.to_string_lossy(), p);
    }
    Ok(job)
}

/// Shell that makes two nodes on the test bed. Node A is the bed's own namespace, node B a
/// namespace of its own joined to A by a veth (A's uplink `up0` 192.0.2.1, B's `veth0`
/// 192.0.2.3). A registrar served at 192.0.2.1:7000 holds farm 1, both nodes, and two user
/// twins: `$TWIN` (key /srv/user.key) and `$OTHER` (/srv/other.key). Defines `fail`,
/// `wait_for SHELL SECONDS`, `links [PREFIX]` (a namespace's link names), `$A` (the agent
/// CLI), `$B` (the prefix that runs a command in node B's namespace), `$KA`/`$KB` (the user's
/// flags for node A's and node B's agent), `$KC` (the other twin's for node A), `$NODEA`,
/// `$NODEB`, `$LINKS_A`/`$LINKS_B` (each node's links before any deployment) and
/// `net PRIVATE_KEY` (the user's network `net`, 10.20.0.0/16, subnet 10.20.1.0/24 on A and
/// 10.20.2.0/24 on B, as the node with that WireGuard key deploys it).
pub const TWO_NODES: &str = r#"
fail() {
  echo "FAIL: $*"
  for f in /srv/reg.log /srv/a.log /srv/b.log; do echo "--- $f"; tail -n 40 $f; done
  for f in /srv/a/vms/*/*/*/console.log /srv/b/vms/*/*/*/console.log /srv/a/vms/*/*/*/vmm.log /srv/b/vms/*/*/*/vmm.log; do echo "--- $f"; tail -n 30 "$f"; done
  exit 1
}
wait_for() { i=0; while ! sh -c "$1" >/dev/null 2>&1; do i=$((i+1)); if [ $i -gt $2 ]; then fail "timeout: $1"; fi; sleep 1; done; }
A=/node-agent
REG=http://192.0.2.1:7000
KA="--key /srv/user.key --agent /srv/a/agent.sock"
KB="--key /srv/user.key --agent /srv/b/agent.sock"
KC="--key /srv/other.key --agent /srv/a/agent.sock"
links() { ${1:-} ip -o link | sed 's/^[0-9]*: \([^:@]*\).*/\1/' | sort | tr '\n' ' '; }

unshare -n sleep 100000 & NB=$!
sleep 1
B="nsenter -t $NB -n"
ip link add up0 type veth && ip link set veth0 netns $NB || fail "veth"
ip addr add 192.0.2.1/24 dev up0 && ip link set up0 up && ip link set lo up || fail "node a's uplink"
$B ip addr add 192.0.2.3/24 dev veth0 && $B ip link set veth0 up && $B ip link set lo up || fail "node b's uplink"
echo '{"image_cache": "/srv/cache-b", "stores": ["dir:///srv/store"]}' > /srv/node-b.json
chmod 600 /srv/node-b.json
mkdir -p /srv/reg /run/netns-b
$A registrar serve --listen 192.0.2.1:7000 --state-dir /srv/reg > /srv/reg.log 2>&1 &
$A keygen --out /srv/farmer.key > /dev/null
wait_for "$A twin register --key /srv/farmer.key --registrar $REG" 30
$A farm create --key /srv/farmer.key --name farm-1 --registrar $REG || fail "farm"
for n in a b; do
  if [ $n = a ]; then UP=up0; NS=/run/netns; NC=/srv/node.json; else UP=veth0; NS=/run/netns-b; NC=/srv/node-b.json; fi
  cat > /srv/$n.json <<JSON
{"state_dir": "/srv/$n", "registrar": "$REG", "farm_id": 1, "uptime_interval_secs": 5,
 "reserve": {"cru": 0, "mru": 0, "sru": 0, "hru": 0},
 "network": {"enabled": true, "uplink": "$UP", "netns_dir": "$NS"},
 "vmm": {"bin": "/vmm", "kernel": "/guest/vmlinux", "initrd": "/guest/initrd",
         "node_config": "$NC", "cmdline": "quiet", "console_max_bytes": 65536}}
JSON
done
GRIDNODE_LOG=info $A run --config /srv/a.json >> /srv/a.log 2>&1 &
GRIDNODE_LOG=info $B $A run --config /srv/b.json >> /srv/b.log 2>&1 &
for n in a b; do
  wait_for "$A node --agent /srv/$n/agent.sock | grep -q '\"registered\": true'" 90
done
NODEA=$($A node --agent /srv/a/agent.sock | sed -n 's/.*"node_id": \([0-9]*\).*/\1/p')
NODEB=$($A node --agent /srv/b/agent.sock | sed -n 's/.*"node_id": \([0-9]*\).*/\1/p')
[ -n "$NODEA" ] && [ -n "$NODEB" ] && [ "$NODEA" != "$NODEB" ] && echo two-nodes-registered-1 || fail "node ids '$NODEA' '$NODEB'"
LINKS_A=$(links); LINKS_B=$(links "$B")
echo "links before: a: $LINKS_A; b: $LINKS_B"
case "$LINKS_A" in *gn-br0*up0*) ;; *) fail "node a's links not listed: $LINKS_A" ;; esac

$A keygen --out /srv/user.key > /dev/null
$A twin register --key /srv/user.key --registrar $REG > /dev/null || fail "twin register"
TWIN=$(cat /srv/user.key.twin)
$A keygen --out /srv/other.key > /dev/null
$A twin register --key /srv/other.key --registrar $REG > /dev/null || fail "twin register (other)"
OTHER=$(cat /srv/other.key.twin)
net() { # this node's WireGuard private key
  echo '{"type": "network", "name": "net", "ip_range": "10.20.0.0/16",
  "nodes": [{"node_id": '$NODEA', "subnet": "10.20.1.0/24", "wireguard_public_key": "@NODE_PUBLIC@", "endpoint": "192.0.2.1:51820"},
            {"node_id": '$NODEB', "subnet": "10.20.2.0/24", "wireguard_public_key": "@PEER_PUBLIC@", "endpoint": "192.0.2.3:51820"}],
  "wireguard_private_key": "'$1'"}'
}
"#;
