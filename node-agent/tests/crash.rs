//! The agent's state machine at every crash point, with the real agent binary driving real vmm
//! processes on this machine's /dev/kvm (the freestanding `chatter` test guest as the VM's
//! kernel, an flist image made by the real `flist` binary as its root share).
//!
//! For each crash point the agent is started with `GRIDNODE_CRASH_AT=<point>` and aborts there
//! in the middle of a deploy (or a delete); started again without it, it must finish or roll
//! back what it was doing: the deployment ends at one version, with exactly one vmm per VM,
//! and an empty journal.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use node_agent::api::DeploymentStatus;
use node_agent::auth::Signer;
use node_agent::client::{Client, Endpoint};
use node_agent::deployment::{Deployment, FailurePolicy, RestartPolicy, VmWorkload, Workload};
use node_agent::identity::KeyPair;
use node_agent::state::{Store, VmState};

fn kvm_available() -> bool {
    if std::fs::File::open("/dev/kvm").is_ok() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "/dev/kvm is required for these tests in CI"
    );
    eprintln!("skipping: /dev/kvm is not available");
    false
}

/// Binaries built by `cargo build --workspace` (scripts/test.sh builds before testing).
fn built(name: &str) -> PathBuf {
    let path = e2e_tests::artifacts::target_dir().join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first",
        path.display()
    );
    path
}

struct Node {
    dir: tempfile::TempDir,
    agent: Option<Child>,
}

impl Node {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // An flist image of a small tree, its chunks in a dir store the node allows.
        std::fs::create_dir_all(root.join("tree/etc")).unwrap();
        std::fs::write(root.join("tree/etc/hello"), "hello").unwrap();
        let status = Command::new(built("flist"))
            .arg("pack")
            .arg(root.join("tree"))
            .arg("-o")
            .arg(root.join("root.flist"))
            .arg("--store")
            .arg(format!("dir://{}", root.join("store").display()))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let node_config = root.join("node.json");
        let cfg = serde_json::json!({ "image_cache": root.join("cache"), "stores": [format!("dir://{}", root.join("store").display())] });
        std::fs::write(&node_config, cfg.to_string()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&node_config, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(root.join("initrd"), vec![0u8; 4096]).unwrap();
        let guest = e2e_tests::artifacts::test_guest("chatter").unwrap();
        let agent_cfg = serde_json::json!({
            "state_dir": root.join("state"),
            "registrar": "local",
            "reserve": {"cru": 0, "mru": 0, "sru": 0, "hru": 0},
            "vmm": {"bin": built("vmm"), "kernel": guest, "initrd": root.join("initrd"),
                    "node_config": node_config, "cmdline": "", "console_max_bytes": 65536}
        });
        std::fs::write(root.join("agent.json"), agent_cfg.to_string()).unwrap();
        Self { dir, agent: None }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn sock(&self) -> PathBuf {
        self.state().join("agent.sock")
    }

    fn start(&mut self, crash_at: Option<&str>) {
        let _ = std::fs::remove_file(self.sock());
        let mut cmd = Command::new(built("node-agent"));
        cmd.arg("run")
            .arg("--config")
            .arg(self.dir.path().join("agent.json"));
        cmd.stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .env("GRIDNODE_LOG", "warn");
        if let Some(p) = crash_at {
            cmd.env("GRIDNODE_CRASH_AT", p);
        }
        self.agent = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.sock().exists() {
            assert!(
                Instant::now() < deadline,
                "the agent's socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the agent to end by itself (a crash point).
    fn wait_crashed(&mut self) {
        let mut child = self.agent.take().unwrap();
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "the agent should have aborted at its crash point"
        );
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn client(&self, key: &KeyPair, twin: u32) -> Client {
        Client::new(Endpoint::Unix(self.sock())).signed(key.clone(), Signer::Twin(twin))
    }

    /// The vmm processes running `name`'s spec.
    fn vmms(&self, twin: u32, name: &str) -> Vec<i32> {
        let spec = self.state().join(format!("vms/{twin}/1/{name}/spec.json"));
        let want = spec.as_os_str().as_encoded_bytes().to_vec();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'));
            if !zombie && cmdline.split(|&b| b == 0).any(|a| a == want.as_slice()) {
                out.push(pid);
            }
        }
        out
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        // Kill every vmm this node started.
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let state = self.state();
            if String::from_utf8_lossy(&cmdline).contains(&*state.to_string_lossy()) {
                // SAFETY: a plain signal to a vmm this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn vm(name: &str) -> Workload {
    Workload::Vm(VmWorkload {
        name: name.into(),
        image: String::new(),
        image_blake3: None,
        vcpus: 1,
        memory_mib: 64,
        rootfs_mib: 16,
        volumes: vec![],
        mounts: vec![],
        entrypoint: "/bin/true".into(),
        args: vec![],
        env: Default::default(),
        restart: RestartPolicy::OnFailure,
        shutdown_grace_secs: 0,
    })
}

fn deployment(twin: u32, version: u32, image: &Path, names: &[&str], key: &KeyPair) -> Vec<u8> {
    let mut d = Deployment {
        twin_id: twin,
        deployment_id: 1,
        version,
        metadata: String::new(),
        workloads: names
            .iter()
            .map(|n| {
                let Workload::Vm(mut v) = vm(n);
                v.image = image.display().to_string();
                Workload::Vm(v)
            })
            .collect(),
        signature_requirement: None,
        on_failure: FailurePolicy::Rollback,
        contract_id: None,
        signatures: vec![],
    };
    d.sign(twin, key);
    serde_json::to_vec(&d).unwrap()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Registers a twin through the agent's embedded registrar.
fn register(node: &Node) -> (KeyPair, u32) {
    let key = KeyPair::generate();
    let resp = block_on(
        Client::new(Endpoint::Unix(node.sock()))
            .signed(key.clone(), Signer::Key(key.public()))
            .request("POST", "/registrar/twins", Some(b"{}".to_vec())),
    )
    .unwrap();
    assert!(resp.ok(), "{}", resp.text());
    let twin: node_agent::registrar::Twin = resp.json().unwrap();
    (key, twin.id)
}

/// Polls the deployment until `check` holds.
fn wait_until(
    node: &Node,
    key: &KeyPair,
    twin: u32,
    what: &str,
    check: impl Fn(&DeploymentStatus) -> bool,
) -> DeploymentStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = block_on(
            node.client(key, twin)
                .request("GET", "/deployments/1", None),
        );
        if let Ok(r) = resp {
            if r.ok() {
                let s: DeploymentStatus = r.json().unwrap();
                if check(&s) {
                    return s;
                }
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn running(s: &DeploymentStatus, names: &[&str]) -> bool {
    s.vms.len() == names.len()
        && names.iter().all(|n| {
            s.vms
                .iter()
                .any(|v| v.name == *n && v.state == VmState::Running && v.pid.is_some())
        })
}

fn journal_is_empty(node: &Node) -> bool {
    Store::open(&node.state().join("agent.db"))
        .unwrap()
        .ops()
        .unwrap()
        .is_empty()
}

/// Crash while creating: after the journal write, after a vmm started (pid unrecorded), and
/// before the op ended. In each case the restarted agent finishes the create: one vmm per VM.
#[test]
fn an_interrupted_create_is_finished_without_starting_twice() {
    if !kvm_available() {
        return;
    }
    for point in ["after-journal", "after-spawn", "before-op-end"] {
        let mut node = Node::new();
        node.start(Some(point));
        let (key, twin) = register(&node);
        let image = node.dir.path().join("root.flist");
        let body = deployment(twin, 1, &image, &["x", "y"], &key);
        let resp = block_on(
            node.client(&key, twin)
                .request("POST", "/deployments", Some(body)),
        );
        if let Ok(r) = &resp {
            panic!(
                "the request should have been cut off by the crash point, got {} {}",
                r.status,
                r.text()
            );
        }
        node.wait_crashed();
        node.start(None);
        let s = wait_until(&node, &key, twin, point, |s| running(s, &["x", "y"]));
        assert_eq!(s.deployment.version, 1, "{point}");
        for name in ["x", "y"] {
            let pids = node.vmms(twin, name);
            assert_eq!(pids.len(), 1, "{point}: {name} runs in {pids:?}");
            let rec = s.vms.iter().find(|v| v.name == name).unwrap();
            assert_eq!(rec.pid, Some(pids[0]), "{point}: {name} is tracked");
        }
        assert!(
            journal_is_empty(&node),
            "{point}: the journal still has the op"
        );
    }
}

/// Crash in the middle of an update that replaces one VM and removes another: the restarted
/// agent finishes it; the unchanged VM kept its process throughout.
#[test]
fn an_interrupted_update_is_finished_and_leaves_unchanged_vms_alone() {
    if !kvm_available() {
        return;
    }
    for point in ["after-journal", "after-spawn", "before-op-end"] {
        let mut node = Node::new();
        node.start(None);
        let (key, twin) = register(&node);
        let image = node.dir.path().join("root.flist");
        let resp = block_on(node.client(&key, twin).request(
            "POST",
            "/deployments",
            Some(deployment(twin, 1, &image, &["keep", "gone"], &key)),
        ))
        .unwrap();
        assert!(resp.ok(), "{}", resp.text());
        let keep_pid = node.vmms(twin, "keep");
        assert_eq!(keep_pid.len(), 1);
        node.stop();
        node.start(Some(point));
        let body = deployment(twin, 2, &image, &["keep", "new"], &key);
        let resp = block_on(
            node.client(&key, twin)
                .request("PUT", "/deployments/1", Some(body)),
        );
        if let Ok(r) = &resp {
            panic!(
                "the request should have been cut off by the crash point, got {} {}",
                r.status,
                r.text()
            );
        }
        node.wait_crashed();
        node.start(None);
        let s = wait_until(&node, &key, twin, point, |s| {
            s.deployment.version == 2 && running(s, &["keep", "new"])
        });
        assert_eq!(
            node.vmms(twin, "keep"),
            keep_pid,
            "{point}: the unchanged VM was restarted"
        );
        assert_eq!(node.vmms(twin, "new").len(), 1, "{point}");
        assert!(
            node.vmms(twin, "gone").is_empty(),
            "{point}: the removed VM still runs"
        );
        assert!(
            !node.state().join(format!("vms/{twin}/1/gone")).exists(),
            "{point}: the removed VM's data is left"
        );
        assert_eq!(s.vms.len(), 2);
        assert!(journal_is_empty(&node), "{point}");
    }
}

/// Crash right after a delete was journaled: the restarted agent finishes the delete.
#[test]
fn an_interrupted_delete_is_finished() {
    if !kvm_available() {
        return;
    }
    let mut node = Node::new();
    node.start(None);
    let (key, twin) = register(&node);
    let image = node.dir.path().join("root.flist");
    let resp = block_on(node.client(&key, twin).request(
        "POST",
        "/deployments",
        Some(deployment(twin, 1, &image, &["x"], &key)),
    ))
    .unwrap();
    assert!(resp.ok(), "{}", resp.text());
    node.stop();
    node.start(Some("after-journal"));
    let resp = block_on(
        node.client(&key, twin)
            .request("DELETE", "/deployments/1", None),
    );
    if let Ok(r) = &resp {
        panic!(
            "the request should have been cut off by the crash point, got {} {}",
            r.status,
            r.text()
        );
    }
    node.wait_crashed();
    node.start(None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !node.vmms(twin, "x").is_empty() || node.state().join(format!("vms/{twin}/1")).exists() {
        assert!(Instant::now() < deadline, "the delete was not finished");
        std::thread::sleep(Duration::from_millis(200));
    }
    let resp = block_on(
        node.client(&key, twin)
            .request("GET", "/deployments/1", None),
    )
    .unwrap();
    assert_eq!(resp.status, 404);
    assert!(journal_is_empty(&node));
}
