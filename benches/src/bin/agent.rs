//! Node agent benchmark on the test bed (a KVM host inside QEMU): agent start to API up and to
//! registered (embedded registrar), deploy latency (request to the VM built; request to the
//! entrypoint's first output, read through the API) as the median of 10 deployments, agent RSS
//! idle and with 20 VMs, vmm RSS per idle VM, and delete latency. Absolute times are those of
//! nested TCG: compare the parts with each other.

use anyhow::{bail, Result};
use benches::sibling;
use clap::Parser;
use e2e_tests::{artifacts, microvm, Job, Testbed};

#[derive(Parser)]
struct Args {
    /// VMs deployed for the latency median (the RSS figure is taken with twice as many).
    #[arg(long, default_value_t = 10)]
    deploys: u32,
}

const SCRIPT: &str = r#"
set -eu
cs() { cut -d' ' -f1 /proc/uptime | tr -d .; }
mkdir -p /srv/rootfs/bin /srv/rootfs/etc /srv/rootfs/proc /srv/rootfs/dev /srv/rootfs/tmp /srv/rootfs/sys /srv/rootfs/run
cp /bin/busybox /srv/rootfs/bin/busybox
for a in sh echo sleep; do ln -s busybox /srv/rootfs/bin/$a; done
/flist pack /srv/rootfs -o /srv/root.flist --store dir:///srv/store > /dev/null
echo '{"image_cache": "/srv/cache", "stores": ["dir:///srv/store"]}' > /srv/node.json; chmod 600 /srv/node.json
echo '{"state_dir": "/srv/state", "registrar": "local", "cpu_allocation_ratio": 16,
 "reserve": {"cru": 0, "mru": 0, "sru": 0, "hru": 0},
 "vmm": {"bin": "/vmm", "kernel": "/guest/vmlinux", "initrd": "/guest/initrd", "node_config": "/srv/node.json", "cmdline": "quiet"}}' > /srv/agent.json
A=/node-agent
T0=$(cs)
GRIDNODE_LOG=warn $A run --config /srv/agent.json > /srv/agent.log 2>&1 &
AGENT=$!
until $A node --agent /srv/state/agent.sock > /dev/null 2>&1; do sleep 0.05; done
echo "api-up-cs $(( $(cs) - T0 ))"
until $A node --agent /srv/state/agent.sock | grep -q '"registered": true'; do sleep 0.05; done
echo "registered-cs $(( $(cs) - T0 ))"
sleep 2
echo "agent-rss-idle-kib $(grep VmRSS /proc/$AGENT/status | tr -s ' ' | cut -d' ' -f2)"
$A keygen --out /srv/k > /dev/null; $A twin register --key /srv/k --registrar /srv/state/agent.sock > /dev/null
TWIN=$(cat /srv/k.twin)
K="--key /srv/k --agent /srv/state/agent.sock"
i=1
while [ $i -le $((2 * DEPLOYS)) ]; do
  echo "{\"twin_id\": $TWIN, \"deployment_id\": $i, \"version\": 1, \"workloads\": [{\"type\": \"vm\", \"name\": \"v$i\",
   \"image\": \"/srv/root.flist\", \"vcpus\": 1, \"memory_mib\": 64, \"rootfs_mib\": 16, \"restart\": \"never\",
   \"entrypoint\": \"/bin/sh\", \"args\": [\"-c\", \"echo up-\$((40+2)); sleep 100000\"]}]}" > /srv/d$i.json
  S=$(cs)
  $A deploy /srv/d$i.json $K > /dev/null
  D=$(cs)
  until $A logs $i/v$i $K | grep -q up-42; do sleep 0.02; done
  E=$(cs)
  if [ $i -le $DEPLOYS ]; then echo "deploy-cs $((D - S)) entry-cs $((E - S))"; fi
  i=$((i+1))
done
sleep 3
echo "agent-rss-vms-kib $(grep VmRSS /proc/$AGENT/status | tr -s ' ' | cut -d' ' -f2) vms $((2 * DEPLOYS))"
for p in /proc/[0-9]*; do
  if tr '\0' ' ' < $p/cmdline 2>/dev/null | grep -q '^/vmm --config'; then
    echo "vmm-rss-kib $(grep VmRSS $p/status | tr -s ' ' | cut -d' ' -f2)"
  fi
done
S=$(cs)
$A rm 1 $K > /dev/null
echo "delete-cs $(( $(cs) - S ))"
"#;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let kernel = artifacts::guest_kernel()?;
    let init = artifacts::guest_init()?;
    let initrd = artifacts::target_dir().join("bench-agent-initrd.cpio");
    microvm::guest_initramfs(&init, std::path::Path::new("/bin/busybox"))?.write_file(&initrd)?;
    let job = Job::new(format!("DEPLOYS={}\n{SCRIPT}", args.deploys))
        .binary("/vmm", sibling("vmm")?)
        .binary("/flist", sibling("flist")?)
        .binary("/node-agent", sibling("node-agent")?)
        .file("/guest/vmlinux", &kernel.vmlinux)
        .file("/guest/initrd", &initrd)
        .timeout(std::time::Duration::from_secs(1800));
    let out = Testbed::from_system()?.run(&job)?;
    if out.status != 0 {
        bail!(
            "the benchmark failed (status {}):\n{}\n{}",
            out.status,
            out.output,
            out.console
        );
    }
    let words: Vec<Vec<&str>> = out
        .output
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let values = |key: &str| -> Vec<f64> {
        words
            .iter()
            .flat_map(|w| {
                w.windows(2)
                    .filter(|p| p[0] == key)
                    .filter_map(|p| p[1].parse().ok())
                    .collect::<Vec<f64>>()
            })
            .collect()
    };
    let ms = |key: &str| median(values(key)) * 10.0;
    println!("node agent on the test bed ({} deploys):", args.deploys);
    println!(
        "  agent start -> API up            {:>8.0} ms",
        ms("api-up-cs")
    );
    println!(
        "  agent start -> registered        {:>8.0} ms",
        ms("registered-cs")
    );
    println!(
        "  deploy request -> VM built       {:>8.0} ms (median)",
        ms("deploy-cs")
    );
    println!(
        "  deploy request -> entrypoint out {:>8.0} ms (median)",
        ms("entry-cs")
    );
    println!(
        "  delete of one VM                 {:>8.0} ms",
        ms("delete-cs")
    );
    println!(
        "  agent RSS idle                   {:>8.0} KiB",
        median(values("agent-rss-idle-kib"))
    );
    println!(
        "  agent RSS with {} VMs            {:>8.0} KiB",
        2 * args.deploys,
        median(values("agent-rss-vms-kib"))
    );
    println!(
        "  vmm RSS per idle VM (median)     {:>8.0} KiB",
        median(values("vmm-rss-kib"))
    );
    println!("(nested TCG: compare the parts, not the absolute times)");
    Ok(())
}
