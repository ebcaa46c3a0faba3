//! The main job: start a node, make a twin key and register it, deploy a signed workload whose
//! root is an flist packed from a small tree (a static busybox), and print its output read back
//! through the agent's API.
//!
//! By default the node is the node image (scripts/node-image.sh: a kernel and an initramfs
//! whose PID 1 is the agent) booted under QEMU with nested SVM, as on the test bed, with a
//! fresh state disk; this host talks to its agent over TCP through QEMU's port forward, as a
//! user talks to a node on the grid. With `--direct` (a real KVM host) the agent runs as a
//! process here instead and packs the tree itself. Arguments, if any, are the workload's
//! command.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e_tests::node::{AgentCli, Node, NodeImage, REGISTERED};
use e2e_tests::{artifacts, microvm};

/// The node's side, for `sh`: the paths come from the environment (`VMM`, `FLIST`, `AGENT`,
/// `KERNEL`, `INITRD`, `BUSYBOX`, `W` a scratch directory).
const SCRIPT: &str = r#"
set -eu
say() { echo "demo: $*" >&2; }
mkdir -p "$W/rootfs/bin" "$W/rootfs/etc" "$W/rootfs/proc" "$W/rootfs/dev" "$W/rootfs/tmp" "$W/rootfs/sys" "$W/rootfs/run"
cp "$BUSYBOX" "$W/rootfs/bin/busybox"
for a in sh echo uname nproc cat ls; do ln -sf busybox "$W/rootfs/bin/$a"; done
echo "an flist root" > "$W/rootfs/etc/motd"
"$FLIST" pack "$W/rootfs" -o "$W/demo.flist" --store "dir://$W/store" > /dev/null
say "packed the root tree into $W/demo.flist"
printf '{"image_cache": "%s", "stores": ["dir://%s"]}' "$W/cache" "$W/store" > "$W/node.json"
chmod 600 "$W/node.json"
printf '{"state_dir": "%s", "registrar": "local", "reserve": {"cru": 0, "mru": 0, "sru": 0, "hru": 0},
 "vmm": {"bin": "%s", "kernel": "%s", "initrd": "%s", "node_config": "%s", "cmdline": "quiet"}}' \
  "$W/state" "$VMM" "$KERNEL" "$INITRD" "$W/node.json" > "$W/agent.json"
GRIDNODE_LOG=warn "$AGENT" run --config "$W/agent.json" > "$W/agent.log" 2>&1 &
AGENT_PID=$!
trap 'kill $AGENT_PID 2>/dev/null || true' EXIT
i=0; until "$AGENT" node --agent "$W/state/agent.sock" > /dev/null 2>&1; do i=$((i+1)); [ $i -lt 100 ] || { cat "$W/agent.log"; exit 1; }; sleep 0.2; done
say "node agent up: $("$AGENT" identity --state-dir "$W/state" | grep 'public key')"
"$AGENT" keygen --out "$W/twin.key" > /dev/null
say "$("$AGENT" twin register --key "$W/twin.key" --registrar "$W/state/agent.sock")"
TWIN=$(cat "$W/twin.key.twin")
sed "s/__TWIN__/$TWIN/" "$W/deployment.template.json" > "$W/deployment.json"
K="--key $W/twin.key --agent $W/state/agent.sock"
"$AGENT" deploy "$W/deployment.json" $K >&2
i=0; until "$AGENT" ps $K | grep -Eq ' (exited|failed) '; do i=$((i+1)); [ $i -lt 600 ] || break; sleep 0.5; done
"$AGENT" ps $K >&2
say "the workload's output, read through the agent's API:"
"$AGENT" logs demo $K | grep -v '^init: '
"$AGENT" rm 1 $K > /dev/null
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let direct = args.first().is_some_and(|a| a == "--direct");
    if direct {
        args.remove(0);
    }
    if args.first().is_some_and(|a| a == "--") {
        args.remove(0);
    }
    if args.is_empty() {
        args = vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo \"hello from a micro-VM: $(uname -sr), $(nproc) vCPUs, $(cat /etc/motd)\"".into(),
        ];
    }
    let deployment = serde_json::json!({
        "twin_id": "__TWIN__",
        "deployment_id": 1,
        "version": 1,
        "workloads": [{
            "type": "vm", "name": "demo", "image": "__IMAGE__", "vcpus": 2, "memory_mib": 256,
            "rootfs_mib": 64, "restart": "never", "entrypoint": args[0], "args": &args[1..],
        }],
    })
    .to_string()
    .replace("\"__TWIN__\"", "__TWIN__");

    if !direct {
        return on_node_image(&deployment);
    }
    let kernel = artifacts::guest_kernel()?;
    let init = artifacts::guest_init()?;
    let vmm = artifacts::vmm_binary()?;
    let target = artifacts::target_dir();
    let release = vmm.parent().unwrap_or(Path::new("."));
    let agent = release.join("node-agent");
    let flist = release.join("flist");
    let initrd = target.join("demo-initrd.cpio");
    microvm::guest_initramfs(&init, Path::new("/bin/busybox"))?.write_file(&initrd)?;

    let work = tempfile::tempdir()?;
    let w = work.path();
    std::fs::write(
        w.join("deployment.template.json"),
        deployment.replace("__IMAGE__", &w.join("demo.flist").display().to_string()),
    )?;
    let status = Command::new("sh")
        .arg("-c")
        .arg(SCRIPT)
        .env("W", w)
        .env("VMM", &vmm)
        .env("FLIST", &flist)
        .env("AGENT", &agent)
        .env("KERNEL", &kernel.vmlinux)
        .env("INITRD", &initrd)
        .env("BUSYBOX", "/bin/busybox")
        .status()?;
    std::process::exit(status.code().unwrap_or(1));
}

/// Boots the node image with a fresh state disk and deploys `deployment` to it from here.
fn on_node_image(deployment: &str) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("demo: building the node image (scripts/node-image.sh)...");
    let image = NodeImage::build()?;
    let work = tempfile::tempdir()?;
    let disk = work.path().join("state.img");
    std::fs::File::create(&disk)?.set_len(4 << 30)?;
    eprintln!(
        "demo: booting the node image under QEMU (nested SVM, so the node has a real /dev/kvm)..."
    );
    let mut node = Node::boot(&image, &disk, 2, 4096)?;
    let registered = node.wait_for_console(REGISTERED, Duration::from_secs(900))?;
    eprintln!(
        "demo: the node's PID 1 is the agent; it formatted its state disk and registered in {:.1} s",
        registered.as_secs_f64()
    );
    let cli = AgentCli::new(&node, work.path().join("twin.key"));
    let twin = cli.register_twin(&node, Duration::from_secs(60))?;
    eprintln!("demo: registered this host's new key as twin {twin} on the node's registrar");
    let doc = work.path().join("deployment.json");
    std::fs::write(
        &doc,
        deployment
            .replace("__TWIN__", &twin.to_string())
            .replace("__IMAGE__", "/usr/share/gridnode/demo/root.flist"),
    )?;
    eprintln!("demo: deploying a signed workload whose root is the image's demo flist");
    eprint!("{}", cli.signed(&["deploy", &doc.display().to_string()])?);
    let ps = cli.until(
        &node,
        "the workload's end",
        Duration::from_secs(900),
        || {
            let ps = cli.signed(&["ps"])?;
            Ok(ps
                .lines()
                .any(|l| l.contains(" exited ") || l.contains(" failed "))
                .then_some(ps))
        },
    )?;
    eprint!("{ps}");
    eprintln!("demo: the workload's output, read through the agent's API:");
    let logs = cli.signed(&["logs", "demo"])?;
    for line in logs.lines().filter(|l| !l.starts_with("init: ")) {
        println!("{line}");
    }
    cli.signed(&["rm", "1"])?;
    drop(node);
    Ok(())
}
