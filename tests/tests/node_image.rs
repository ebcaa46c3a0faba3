//! The node image (scripts/node-image.sh) booted under QEMU with nested SVM, as a laptop would
//! boot it with KVM: the agent is PID 1, formats the fresh state disk and registers with its
//! embedded registrar; from outside (the host, through QEMU's port forward to the agent's TCP
//! API) a user registers a twin and deploys a signed flist workload from the image's demo
//! store, whose output is read through the API. The node is then powered off hard and booted
//! again with the same state disk: the deployment starts again and its workload finds its
//! earlier write on its volume.

use std::time::Duration;

use e2e_tests::node::{AgentCli, Node, NodeImage, REGISTERED};
use e2e_tests::{artifacts, qemu, skip_if_missing, Error};

/// The workload counts its runs in a file on its volume and makes it durable with a plain
/// `sync` (syncfs of the volume: the vmm answers FUSE_SYNCFS by syncing the node's filesystem),
/// so the write survives the hard power-off that follows.
fn deployment(twin: u32) -> String {
    let script =
        "n=$(cat /data/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > /data/count; sync; \
                  echo workload-run-$n; while true; do sleep 1; done";
    serde_like_json(twin, script)
}

/// The deployment document (JSON written by hand: the tests crate has no serde).
fn serde_like_json(twin: u32, script: &str) -> String {
    let script = script.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        r#"{{"twin_id": {twin}, "deployment_id": 1, "version": 1, "workloads": [
  {{"type": "vm", "name": "counter", "image": "/usr/share/gridnode/demo/root.flist",
    "vcpus": 1, "memory_mib": 128, "rootfs_mib": 64, "restart": "always",
    "volumes": [{{"name": "data", "size_mib": 16, "mount": "/data"}}],
    "entrypoint": "/bin/sh", "args": ["-c", "{script}"]}}]}}"#
    )
}

fn wait_registered(node: &mut Node, boot: &str) -> Result<Duration, Error> {
    let t = node.wait_for_console(REGISTERED, Duration::from_secs(600))?;
    eprintln!(
        "{boot}: node boot to registered: {:.1} s (QEMU TCG, nested SVM)",
        t.as_secs_f64()
    );
    Ok(t)
}

#[test]
fn node_image_boots_registers_deploys_and_keeps_state_across_reboots() -> Result<(), Error> {
    let test = "node_image_boots_registers_deploys_and_keeps_state_across_reboots";
    if skip_if_missing(test, qemu::qemu_binary())?.is_none() {
        return Ok(());
    }
    let image = NodeImage::build()?;
    let scratch = artifacts::target_dir().join("e2e-scratch").join(test);
    std::fs::remove_dir_all(&scratch).ok();
    std::fs::create_dir_all(&scratch).map_err(|source| Error::Io {
        context: format!("creating {}", scratch.display()),
        source,
    })?;
    let disk = scratch.join("state.img");
    let f = std::fs::File::create(&disk).and_then(|f| f.set_len(4 << 30).map(|_| f));
    drop(f.map_err(|source| Error::Io {
        context: format!("creating {}", disk.display()),
        source,
    })?);

    // First boot: a fresh disk.
    let mut node = Node::boot(&image, &disk, 2, 4096)?;
    wait_registered(&mut node, "first boot")?;
    let console = node.console();
    assert!(
        console.contains("formatting the state disk"),
        "no first-boot format:\n{console}"
    );
    assert!(console.contains("network configured"), "{console}");

    let cli = AgentCli::new(&node, scratch.join("user.key"));
    let twin = cli.register_twin(&node, Duration::from_secs(60))?;
    eprintln!("twin {twin}");

    // The TCP registrar serves twin creation and reads, not node or farm writes.
    let key = cli.key.display().to_string();
    let registrar = format!("{}/registrar", cli.agent);
    let refused = cli.run(&[
        "farm",
        "create",
        "--key",
        &key,
        "--name",
        "f",
        "--registrar",
        &registrar,
    ]);
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("reads and twin creation only")),
        "a farm was created over TCP: {refused:?}"
    );

    let doc = scratch.join("deployment.json");
    std::fs::write(&doc, deployment(twin)).map_err(|source| Error::Io {
        context: "writing the deployment".into(),
        source,
    })?;
    cli.signed(&["deploy", &doc.to_string_lossy()])
        .unwrap_or_else(|e| panic!("deploy: {e}\n--- node console\n{}", node.console()));
    let logs = wait_output(&cli, &node, "workload-run-1")?;
    eprintln!(
        "first boot: workload output read through the API: {}",
        logs.trim()
    );
    let ps = cli.signed(&["ps"]).unwrap_or_else(|e| panic!("ps: {e}"));
    eprintln!("{ps}");
    // The node's health view counts the running vmm's memory.
    let status = cli
        .signed(&["node"])
        .unwrap_or_else(|e| panic!("node: {e}"));
    assert!(
        status.contains("\"vmm_processes\": 1"),
        "the node status does not count the VM's vmm: {status}"
    );

    // Power off hard (the workload synced its write), then boot again with the same disk.
    std::thread::sleep(Duration::from_secs(3));
    let first = node.kill();
    let mut node = Node::boot(&image, &disk, 2, 4096)?;
    wait_registered(&mut node, "second boot")?;
    let console = node.console();
    assert!(
        !console.contains("formatting the state disk"),
        "the state disk was formatted again:\n{console}"
    );
    // The second boot's API has its own forwarded port; the twin key is the same.
    let cli = AgentCli::new(&node, cli.key.clone());
    let logs = wait_output(&cli, &node, "workload-run-2")?;
    eprintln!("second boot: workload output: {}", logs.trim());
    drop(first);
    Ok(())
}

/// Waits until the workload's logs (read through the API) hold `marker`.
fn wait_output(cli: &AgentCli, node: &Node, marker: &str) -> Result<String, Error> {
    cli.until(node, marker, Duration::from_secs(300), || {
        let out = cli.signed(&["logs", "counter"])?;
        Ok(out.contains(marker).then_some(out))
    })
}
