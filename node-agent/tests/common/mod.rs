//! What the tests running the real agent binary with real vmm processes on this machine's
//! /dev/kvm share (crash.rs, tfchain.rs): a node directory with an flist image made by the
//! real `flist` binary, the freestanding `chatter` test guest as the VMs' kernel, the agent
//! started on it, and the vmm processes it runs.

// Each test file uses part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use node_agent::api::DeploymentStatus;
use node_agent::auth::Signer;
use node_agent::client::{Client, Endpoint};
use node_agent::deployment::{Deployment, FailurePolicy, RestartPolicy, VmWorkload, Workload};
use node_agent::identity::KeyPair;
use node_agent::state::VmState;

/// Binaries built by `cargo build --workspace` (scripts/test.sh builds before testing).
pub fn built(name: &str) -> PathBuf {
    let path = e2e_tests::artifacts::target_dir().join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first",
        path.display()
    );
    path
}

/// A node's directory (its agent's config, state, image and store) and its agent process;
/// dropping it stops the agent and kills every vmm it started.
pub struct Node {
    pub dir: tempfile::TempDir,
    agent: Option<Child>,
    /// Where the agent's log (stderr) goes, when not to the test's stderr.
    log: Option<PathBuf>,
}

impl Node {
    /// The agent's config: the local registrar, no reserve, VMs on the real `vmm` with the
    /// `chatter` test guest as their kernel and an flist image (`root.flist`) of a small tree,
    /// its chunks in a dir store the node allows.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
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
        Self {
            dir,
            agent: None,
            log: None,
        }
    }

    /// The agent's log (its stderr, warnings and errors) goes to `path` (appended to) from
    /// the next start on.
    pub fn log_to(&mut self, path: PathBuf) {
        self.log = Some(path);
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn sock(&self) -> PathBuf {
        self.state().join("agent.sock")
    }

    /// The flist image VMs boot with.
    pub fn image(&self) -> PathBuf {
        self.dir.path().join("root.flist")
    }

    /// Starts the agent (`GRIDNODE_CRASH_AT=<point>` when given) and waits for its socket.
    pub fn start(&mut self, crash_at: Option<&str>) {
        self.start_with(crash_at, &[]);
    }

    /// [`Self::start`] with more flags for `node-agent run` (they override the config).
    pub fn start_with(&mut self, crash_at: Option<&str>, args: &[String]) {
        let _ = std::fs::remove_file(self.sock());
        let mut cmd = Command::new(built("node-agent"));
        cmd.arg("run")
            .arg("--config")
            .arg(self.dir.path().join("agent.json"))
            .args(args);
        let stderr = match &self.log {
            Some(p) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .unwrap(),
            ),
            None => Stdio::inherit(),
        };
        cmd.stdout(Stdio::null())
            .stderr(stderr)
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
    pub fn wait_crashed(&mut self) {
        let mut child = self.agent.take().unwrap();
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "the agent should have aborted at its crash point"
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn client(&self, key: &KeyPair, twin: u32) -> Client {
        Client::new(Endpoint::Unix(self.sock())).signed(key.clone(), Signer::Twin(twin))
    }

    /// Registers a new twin through the agent's embedded registrar.
    pub fn register(&self) -> (KeyPair, u32) {
        let key = KeyPair::generate();
        let resp = block_on(
            Client::new(Endpoint::Unix(self.sock()))
                .signed(key.clone(), Signer::Key(key.public()))
                .request("POST", "/registrar/twins", Some(b"{}".to_vec())),
        )
        .unwrap();
        assert!(resp.ok(), "{}", resp.text());
        let twin: node_agent::registrar::Twin = resp.json().unwrap();
        (key, twin.id)
    }

    /// A request signed by `twin`; panics when there is no answer.
    pub fn call(
        &self,
        key: &KeyPair,
        twin: u32,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> node_agent::client::Response {
        block_on(self.client(key, twin).request(method, path, body))
            .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"))
    }

    /// Deployment 1 of `twin` as the agent has it.
    pub fn status(&self, key: &KeyPair, twin: u32) -> DeploymentStatus {
        let resp = self.call(key, twin, "GET", "/deployments/1", None);
        assert!(resp.ok(), "{} {}", resp.status, resp.text());
        resp.json().unwrap()
    }

    /// Polls deployment 1 of `twin` until `check` holds (60 s at most).
    pub fn wait_until(
        &self,
        key: &KeyPair,
        twin: u32,
        what: &str,
        check: impl Fn(&DeploymentStatus) -> bool,
    ) -> DeploymentStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        loop {
            let resp = block_on(
                self.client(key, twin)
                    .request("GET", "/deployments/1", None),
            );
            if let Ok(r) = resp {
                if r.ok() {
                    let s: DeploymentStatus = r.json().unwrap();
                    if check(&s) {
                        return s;
                    }
                    last = Some(s);
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last seen: {}",
                last.map(|s| serde_json::to_string_pretty(&s.vms).unwrap_or_default())
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The vmm processes running `name`'s spec (deployment 1 of `twin`).
    pub fn vmms(&self, twin: u32, name: &str) -> Vec<i32> {
        vmms_of(&self.state().join(format!("vms/{twin}/1/{name}/spec.json")))
    }
}

/// How many live processes run with `spec` on their command line.
pub fn processes_running(spec: &Path) -> usize {
    vmms_of(spec).len()
}

/// The live (not zombie) processes with `spec` on their command line.
fn vmms_of(spec: &Path) -> Vec<i32> {
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

/// Runs a future to its end on a runtime of its own.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn vm(name: &str, image: &Path) -> Workload {
    Workload::Vm(VmWorkload {
        name: name.into(),
        image: image.display().to_string(),
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
        interfaces: vec![],
        port_forwards: vec![],
    })
}

/// Deployment 1 of `twin` at `version`: one small VM per name booting `image`, unsigned.
pub fn vm_deployment(twin: u32, version: u32, image: &Path, names: &[&str]) -> Deployment {
    Deployment {
        twin_id: twin,
        deployment_id: 1,
        version,
        metadata: String::new(),
        workloads: names.iter().map(|n| vm(n, image)).collect(),
        signature_requirement: None,
        on_failure: FailurePolicy::Rollback,
        contract_id: None,
        signatures: vec![],
    }
}

/// Whether exactly the VMs `names` are running, each with its process.
pub fn running(s: &DeploymentStatus, names: &[&str]) -> bool {
    s.vms.len() == names.len()
        && names.iter().all(|n| {
            s.vms
                .iter()
                .any(|v| v.name == *n && v.state == VmState::Running && v.pid.is_some())
        })
}

/// A deployment of one VM (`web`) that never boots (its image does not exist): enough for
/// admission, signature, contract and state checks without a vmm.
pub fn unbootable_deployment(
    twin_id: u32,
    deployment_id: u64,
    version: u32,
    metadata: &str,
    on_failure: FailurePolicy,
) -> Deployment {
    Deployment {
        twin_id,
        deployment_id,
        version,
        metadata: metadata.into(),
        workloads: vec![Workload::Vm(VmWorkload {
            name: "web".into(),
            image: "/nonexistent/image.flist".into(),
            image_blake3: None,
            vcpus: 1,
            memory_mib: 256,
            rootfs_mib: 64,
            volumes: vec![],
            mounts: vec![],
            entrypoint: "/bin/true".into(),
            args: vec![],
            env: Default::default(),
            restart: RestartPolicy::Never,
            shutdown_grace_secs: 0,
            interfaces: vec![],
            port_forwards: vec![],
        })],
        signature_requirement: None,
        on_failure,
        contract_id: None,
        signatures: vec![],
    }
}

/// The VM workload `name` of `d`.
pub fn vm_mut<'a>(d: &'a mut Deployment, name: &str) -> &'a mut VmWorkload {
    d.workloads
        .iter_mut()
        .find_map(|w| match w {
            Workload::Vm(vm) if vm.name == name => Some(vm),
            _ => None,
        })
        .unwrap()
}

/// A file that is not an flist: the vmm refuses it and ends at start.
pub fn not_an_flist(path: &Path) {
    std::fs::write(path, b"this is not an flist image").unwrap();
}
