//! The node image (scripts/node-image.sh) booted under QEMU with nested SVM, as a laptop would
//! boot it with KVM: the agent is PID 1, formats the fresh state disk and registers with its
//! embedded registrar; from outside (the host, through QEMU's port forward to the agent's TCP
//! API) a user registers a twin and deploys a signed flist workload from the image's demo
//! store, whose output is read through the API. The node is then powered off hard and booted
//! again with the same state disk: the deployment starts again and its workload finds its
//! earlier write on its volume.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e_tests::node::{Node, NodeImage};
use e2e_tests::{artifacts, qemu, skip_if_missing, Error};

/// What the agent logs once the node is registered.
const REGISTERED: &str = "node_agent::uptime: registered";

struct Cli {
    bin: PathBuf,
    key: PathBuf,
}

impl Cli {
    /// Runs `node-agent ARGS`; Ok(stdout) on success, Err(stdout+stderr) otherwise.
    fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.bin)
            .args(args)
            .output()
            .map_err(|e| format!("running {}: {e}", self.bin.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    fn signed(&self, node: &Node, args: &[&str]) -> Result<String, String> {
        let agent = format!("http://127.0.0.1:{}", node.api_port);
        let key = self.key.to_string_lossy().into_owned();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--key", &key, "--agent", &agent]);
        self.run(&all)
    }

    /// Retries `f` every second until it succeeds or `timeout` passes.
    fn until(
        node: &Node,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Result<String, String>,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match f() {
                Ok(out) => return out,
                Err(e) if Instant::now() >= deadline => panic!(
                    "{what}: not done within {timeout:?}: {e}\n--- node console\n{}",
                    node.console()
                ),
                Err(_) => std::thread::sleep(Duration::from_secs(1)),
            }
        }
    }
}

/// The workload counts its runs in a file on its volume. `sync FILE` is an fsync of that file,
/// which reaches the node's disk; a plain `sync` (syncfs) does not on a virtio-fs volume (the
/// vmm's FUSE server has no SYNCFS), so data written just before a power cut would be lost.
fn deployment(twin: u32) -> String {
    let script = "n=$(cat /data/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > /data/count; sync /data/count; \
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
    let cli = Cli {
        bin: artifacts::target_dir().join("release/node-agent"),
        key: scratch.join("user.key"),
    };

    // First boot: a fresh disk.
    let mut node = Node::boot(&image, &disk, 2, 4096)?;
    wait_registered(&mut node, "first boot")?;
    let console = node.console();
    assert!(
        console.contains("formatting the state disk"),
        "no first-boot format:\n{console}"
    );
    assert!(console.contains("network configured"), "{console}");

    cli.run(&["keygen", "--out", &cli.key.to_string_lossy()])
        .unwrap_or_else(|e| panic!("keygen: {e}"));
    let registrar = format!("http://127.0.0.1:{}/registrar", node.api_port);
    let out = Cli::until(&node, "twin register", Duration::from_secs(60), || {
        cli.run(&[
            "twin",
            "register",
            "--key",
            &cli.key.to_string_lossy(),
            "--registrar",
            &registrar,
        ])
    });
    eprintln!("{}", out.trim());
    let twin: u32 = std::fs::read_to_string(twin_file(&cli.key))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .expect("twin register wrote KEY.twin");

    // The TCP registrar serves twin creation and reads, not node or farm writes.
    let refused = cli.run(&[
        "farm",
        "create",
        "--key",
        &cli.key.to_string_lossy(),
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
    cli.signed(&node, &["deploy", &doc.to_string_lossy()])
        .unwrap_or_else(|e| panic!("deploy: {e}\n--- node console\n{}", node.console()));
    let logs = Cli::until(
        &node,
        "first run's output",
        Duration::from_secs(300),
        || {
            let out = cli.signed(&node, &["logs", "counter"])?;
            if out.contains("workload-run-1") {
                Ok(out)
            } else {
                Err(format!("logs so far: {out}"))
            }
        },
    );
    eprintln!(
        "first boot: workload output read through the API: {}",
        logs.trim()
    );
    let ps = cli
        .signed(&node, &["ps"])
        .unwrap_or_else(|e| panic!("ps: {e}"));
    eprintln!("{ps}");

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
    let logs = Cli::until(
        &node,
        "second run's output",
        Duration::from_secs(300),
        || {
            let out = cli.signed(&node, &["logs", "counter"])?;
            if out.contains("workload-run-2") {
                Ok(out)
            } else {
                Err(format!("logs so far: {out}"))
            }
        },
    );
    eprintln!("second boot: workload output: {}", logs.trim());
    drop(first);
    Ok(())
}

fn twin_file(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".twin");
    PathBuf::from(s)
}
