//! How the agent keeps, retries, stops and rolls back VMs, with the real agent binary driving
//! real vmm processes on this machine's /dev/kvm (the freestanding `chatter` test guest as the
//! VMs' kernel, an flist image made by the real `flist` binary as their root share), as in
//! crash.rs.
//!
//! A VM "cannot start" here in the two ways a node sees: its image file is missing (the agent
//! cannot build its spec) or is not an flist (the vmm fails to build the VM and exits).

mod common;

use common::{not_an_flist, running, vm_deployment, vm_mut, Node};
use e2e_tests::kvm_available;
use node_agent::deployment::{Deployment, FailurePolicy, RestartPolicy};
use node_agent::engine::DeployOutcome;
use node_agent::identity::KeyPair;
use node_agent::state::{Store, VmRecord, VmState};

fn signed(mut d: Deployment, key: &KeyPair) -> Vec<u8> {
    d.sign(d.twin_id, key);
    serde_json::to_vec(&d).unwrap()
}

fn record<'a>(s: &'a node_agent::api::DeploymentStatus, name: &str) -> &'a VmRecord {
    s.vms
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no record of {name}: {:?}", s.vms))
}

/// A deployment kept (`on_failure: keep`) with two VMs whose first start fails: the one with
/// `restart: always` is retried with backoff and runs once its image is good; the one with
/// `restart: never` stays failed with its reason.
#[test]
fn a_vm_that_fails_its_first_start_is_retried_per_its_policy() {
    if !kvm_available() {
        return;
    }
    let mut node = Node::new();
    node.start(None);
    let (key, twin) = node.register();
    let later = node.dir.path().join("later.flist");
    not_an_flist(&later);
    let mut d = vm_deployment(twin, 1, &later, &["retried", "never"]);
    d.on_failure = FailurePolicy::Keep;
    vm_mut(&mut d, "retried").restart = RestartPolicy::Always;
    vm_mut(&mut d, "never").restart = RestartPolicy::Never;
    let resp = node.call(&key, twin, "POST", "/deployments", Some(signed(d, &key)));
    assert_eq!(resp.status, 201, "{}", resp.text());
    let out: DeployOutcome = resp.json().unwrap();
    assert!(
        out.failed.contains_key("retried") && out.failed.contains_key("never"),
        "{out:?}"
    );
    let s = node.status(&key, twin);
    let never = record(&s, "never");
    assert_eq!(never.state, VmState::Failed, "{never:?}");
    assert!(!never.reason.is_empty(), "{never:?}");
    let retried = record(&s, "retried");
    assert_ne!(retried.state, VmState::Running, "{retried:?}");
    assert!(!retried.reason.is_empty(), "{retried:?}");
    // It keeps being retried (with backoff) while its image is bad...
    node.wait_until(&key, twin, "a second failed start", |s| {
        record(s, "retried").restarts >= 1
    });
    // ...and starts once the image is good.
    std::fs::copy(node.image(), &later).unwrap();
    let s = node.wait_until(&key, twin, "the retried VM running", |s| {
        let r = record(s, "retried");
        r.state == VmState::Running && r.pid.is_some()
    });
    assert_eq!(node.vmms(twin, "retried").len(), 1);
    assert_eq!(
        record(&s, "retried").pid,
        Some(node.vmms(twin, "retried")[0])
    );
    let never = record(&s, "never");
    assert_eq!(never.state, VmState::Failed, "{never:?}");
    assert!(node.vmms(twin, "never").is_empty());
}

/// After a node reboot the agent starts every VM again; one whose image is not there yet
/// (an image disk not mounted, a store not reachable) is retried until it is, and runs.
#[test]
fn a_vm_that_cannot_start_after_a_reboot_is_retried_until_it_runs() {
    if !kvm_available() {
        return;
    }
    let mut node = Node::new();
    node.start(None);
    let (key, twin) = node.register();
    let image = node.image();
    let d = vm_deployment(twin, 1, &image, &["x"]);
    let resp = node.call(&key, twin, "POST", "/deployments", Some(signed(d, &key)));
    assert!(resp.ok(), "{}", resp.text());
    assert_eq!(node.vmms(twin, "x").len(), 1);

    // Power off: the agent and its VMs end; the next start is on a new boot.
    node.stop();
    for pid in node.vmms(twin, "x") {
        // SAFETY: a plain signal to a vmm this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !node.vmms(twin, "x").is_empty() {
        assert!(std::time::Instant::now() < deadline, "the vmm did not end");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Store::open(&node.state().join("agent.db"))
        .unwrap()
        .set_meta("boot_id", "an earlier boot")
        .unwrap();
    let away = node.dir.path().join("root.flist.away");
    std::fs::rename(&image, &away).unwrap();

    node.start(None);
    let s = node.wait_until(&key, twin, "a failed start after the reboot", |s| {
        let r = record(s, "x");
        r.state != VmState::Running && r.reason.contains("root.flist")
    });
    assert!(node.vmms(twin, "x").is_empty(), "{:?}", s.vms);
    std::fs::rename(&away, &image).unwrap();
    let s = node.wait_until(&key, twin, "the VM running again", |s| running(s, &["x"]));
    assert_eq!(node.vmms(twin, "x").len(), 1);
    assert_eq!(record(&s, "x").pid, Some(node.vmms(twin, "x")[0]));
}

/// Replacing a VM (an update that changes it) stops it gracefully and waits for its workload's
/// `shutdown_grace_secs`: the guest here never shuts down, so the vmm ends the VM itself once
/// the grace and its margin are over, and records why; that record is the VM's `last_exit`.
/// An agent that kills the vmm before that leaves no exit record.
#[test]
fn a_stop_gives_the_workload_its_shutdown_grace() {
    if !kvm_available() {
        return;
    }
    let mut node = Node::new();
    node.start(None);
    let (key, twin) = node.register();
    let mut d = vm_deployment(twin, 1, &node.image(), &["x"]);
    vm_mut(&mut d, "x").shutdown_grace_secs = 20;
    let resp = node.call(
        &key,
        twin,
        "POST",
        "/deployments",
        Some(signed(d.clone(), &key)),
    );
    assert!(resp.ok(), "{}", resp.text());
    let first = node.vmms(twin, "x");
    assert_eq!(first.len(), 1);

    d.version = 2;
    vm_mut(&mut d, "x").env.insert("RUN".into(), "2".into());
    let resp = node.call(&key, twin, "PUT", "/deployments/1", Some(signed(d, &key)));
    assert!(resp.ok(), "{}", resp.text());
    let out: DeployOutcome = resp.json().unwrap();
    assert_eq!(out.started, ["x"]);
    let s = node.status(&key, twin);
    let x = record(&s, "x");
    assert_eq!(x.state, VmState::Running);
    assert_ne!(node.vmms(twin, "x"), first);
    let exit = x
        .last_exit
        .as_deref()
        .expect("the replaced VM's exit record (the vmm was killed before it could end the VM)");
    // The vmm's own deadline: the grace (20 s) and its margin (5 s).
    assert!(exit.contains("did not shut down within 25s"), "{exit}");
}

/// A delete whose client stops waiting (its VM takes its 20 s grace) still runs to its end:
/// the VM stops, its files go, the journal is empty, without a restart of the agent.
#[test]
fn a_change_finishes_when_its_client_goes_away() {
    if !kvm_available() {
        return;
    }
    let mut node = Node::new();
    node.start(None);
    let (key, twin) = node.register();
    let mut d = vm_deployment(twin, 1, &node.image(), &["x"]);
    vm_mut(&mut d, "x").shutdown_grace_secs = 20;
    let resp = node.call(&key, twin, "POST", "/deployments", Some(signed(d, &key)));
    assert!(resp.ok(), "{}", resp.text());
    assert_eq!(node.vmms(twin, "x").len(), 1);
    let gone = common::block_on(
        node.client(&key, twin)
            .with_timeout(std::time::Duration::from_secs(2))
            .request("DELETE", "/deployments/1", None),
    );
    assert!(
        gone.is_err(),
        "the delete answered before the VM's grace: {}",
        gone.map(|r| r.text()).unwrap_or_default()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let dir = node.state().join(format!("vms/{twin}/1"));
    while !node.vmms(twin, "x").is_empty() || dir.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the delete was not finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let resp = node.call(&key, twin, "GET", "/deployments/1", None);
    assert_eq!(resp.status, 404, "{}", resp.text());
    let store = Store::open(&node.state().join("agent.db")).unwrap();
    assert!(store.ops().unwrap().is_empty());
    assert!(store.vms(None).unwrap().is_empty());
}

/// A new deployment of two VMs whose second cannot start after the first has started
/// (`on_failure: rollback`): the first is stopped and its files removed, a tombstone at the
/// version is left, and the journal is empty.
#[test]
fn a_create_whose_second_vm_fails_is_rolled_back_entirely() {
    if !kvm_available() {
        return;
    }
    let mut node = Node::new();
    node.start(None);
    let (key, twin) = node.register();
    let bad = node.dir.path().join("bad.flist");
    not_an_flist(&bad);
    let mut d = vm_deployment(twin, 1, &node.image(), &["first", "second"]);
    vm_mut(&mut d, "second").image = bad.display().to_string();
    assert_eq!(d.on_failure, FailurePolicy::Rollback);

    // Watch the first VM's vmm come (and go) while the deploy runs.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        let spec = node.state().join(format!("vms/{twin}/1/first/spec.json"));
        std::thread::spawn(move || {
            let mut seen = false;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                seen |= common::processes_running(&spec) > 0;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            seen
        })
    };
    let resp = node.call(&key, twin, "POST", "/deployments", Some(signed(d, &key)));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let first_ran = watcher.join().unwrap();
    assert_eq!(resp.status, 422, "{}", resp.text());
    let why = resp.error_message();
    assert!(
        why.contains("second") && why.contains("not an flist") && why.contains("rolled back"),
        "{why}"
    );
    assert!(first_ran, "the first VM never started");
    assert!(
        node.vmms(twin, "first").is_empty(),
        "the first VM still runs"
    );
    assert!(node.vmms(twin, "second").is_empty());
    assert!(
        !node.state().join(format!("vms/{twin}/1")).exists(),
        "the deployment's files are left"
    );
    let resp = node.call(&key, twin, "GET", "/deployments/1", None);
    assert_eq!(resp.status, 404, "{}", resp.text());
    let store = Store::open(&node.state().join("agent.db")).unwrap();
    assert!(store.ops().unwrap().is_empty());
    assert!(store.vms(None).unwrap().is_empty());
    let row = store.deployment(twin, 1).unwrap().expect("a tombstone");
    assert!(row.deleted);
    assert_eq!(row.doc.version, 1);
}

/// Updates of a running deployment {a, b} that cannot be carried out are rolled back to the
/// old VMs, which keep running as before, with their data:
/// - a new VM that cannot start: a and b keep their processes (new VMs start first);
/// - b changed to an image that is missing: nothing is touched (all VMs are prepared first);
/// - b changed to an image the vmm refuses: b is started again from its old spec, with the
///   files of its writable layer; a keeps its process.
#[test]
fn a_failed_update_is_rolled_back_to_the_old_vms() {
    if !kvm_available() {
        return;
    }
    let mut node = Node::new();
    // Three 1-vCPU VMs at once on a host that may have two threads.
    node.start_with(None, &["--cpu-allocation-ratio".into(), "4".into()]);
    let (key, twin) = node.register();
    let bad = node.dir.path().join("bad.flist");
    not_an_flist(&bad);
    let v1 = vm_deployment(twin, 1, &node.image(), &["a", "b"]);
    let resp = node.call(
        &key,
        twin,
        "POST",
        "/deployments",
        Some(signed(v1.clone(), &key)),
    );
    assert!(resp.ok(), "{}", resp.text());
    let before = node.status(&key, twin);
    let (a, b) = (node.vmms(twin, "a"), node.vmms(twin, "b"));
    assert_eq!((a.len(), b.len()), (1, 1));
    // A file in b's writable layer (what its guest wrote to its root).
    let marker = node
        .state()
        .join(format!("vms/{twin}/1/b/layer/upper/written-by-b"));
    std::fs::write(&marker, b"kept").unwrap();

    let check_rolled_back = |what: &str, resp: node_agent::client::Response, b_same: bool| {
        assert_eq!(resp.status, 422, "{what}: {}", resp.text());
        assert!(
            resp.error_message()
                .contains("rolled back to its previous version"),
            "{what}: {}",
            resp.text()
        );
        let s = node.status(&key, twin);
        assert_eq!(s.deployment, {
            let mut d = v1.clone();
            d.sign(twin, &key);
            d
        });
        assert!(running(&s, &["a", "b"]), "{what}: {:?}", s.vms);
        for name in ["a", "b"] {
            assert_eq!(
                record(&s, name).spec_hash,
                record(&before, name).spec_hash,
                "{what}: {name} does not run its old spec"
            );
            assert_eq!(node.vmms(twin, name).len(), 1, "{what}: {name}");
        }
        assert_eq!(node.vmms(twin, "a"), a, "{what}: a was restarted");
        if b_same {
            assert_eq!(node.vmms(twin, "b"), b, "{what}: b was restarted");
        }
        assert!(node.vmms(twin, "c").is_empty(), "{what}");
        assert!(
            !node.state().join(format!("vms/{twin}/1/c")).exists(),
            "{what}: the new VM's files are left"
        );
        assert_eq!(std::fs::read(&marker).unwrap(), b"kept", "{what}");
        let store = Store::open(&node.state().join("agent.db")).unwrap();
        assert!(store.ops().unwrap().is_empty(), "{what}");
    };

    // A new VM c that cannot start, and b changed.
    let mut v2 = vm_deployment(twin, 2, &node.image(), &["a", "b", "c"]);
    vm_mut(&mut v2, "b").env.insert("RUN".into(), "2".into());
    vm_mut(&mut v2, "c").image = bad.display().to_string();
    let resp = node.call(&key, twin, "PUT", "/deployments/1", Some(signed(v2, &key)));
    check_rolled_back("a new VM fails", resp, true);

    // b changed to an image that is not there.
    let mut v3 = vm_deployment(twin, 3, &node.image(), &["a", "b"]);
    vm_mut(&mut v3, "b").image = node.dir.path().join("missing.flist").display().to_string();
    let resp = node.call(&key, twin, "PUT", "/deployments/1", Some(signed(v3, &key)));
    check_rolled_back("b's image is missing", resp, true);

    // b changed to an image the vmm refuses: b's old vmm was stopped for it.
    let mut v4 = vm_deployment(twin, 4, &node.image(), &["a", "b"]);
    vm_mut(&mut v4, "b").image = bad.display().to_string();
    let resp = node.call(&key, twin, "PUT", "/deployments/1", Some(signed(v4, &key)));
    check_rolled_back("b's new vmm fails", resp, false);
}

/// After a node reboot the deployments start again with the registrar unreachable: starting
/// workloads needs nothing from the network. The node registers with a registrar served by
/// `node-agent registrar serve` (another process); the owner deploys through it; then the node
/// powers off, the registrar goes down, and the node boots: its VM runs again while the
/// registration keeps failing.
#[test]
fn after_a_reboot_vms_start_with_the_registrar_down() {
    use node_agent::registrar::Registrar;
    if !kvm_available() {
        return;
    }
    let mut node = Node::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut registrar = std::process::Command::new(common::built("node-agent"))
        .args([
            "registrar",
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--state-dir")
        .arg(node.dir.path().join("registrar"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let remote = node_agent::registrar::remote::RemoteRegistrar::new(&url).unwrap();
    let farmer = KeyPair::generate();
    let user = KeyPair::generate();
    let (farmer_twin, twin) = common::block_on(async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let farmer_twin = loop {
            match remote.create_twin(&farmer).await {
                Ok(t) => break t.id,
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "registrar: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        };
        remote
            .create_farm(&farmer, farmer_twin, "farm-1")
            .await
            .unwrap();
        (farmer_twin, remote.create_twin(&user).await.unwrap().id)
    });
    assert_ne!(farmer_twin, twin);
    let cfg_path = node.dir.path().join("agent.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["registrar"] = url.clone().into();
    cfg["farm_id"] = 1.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    node.start(None);
    let d = vm_deployment(twin, 1, &node.image(), &["x"]);
    let resp = node.call(&user, twin, "POST", "/deployments", Some(signed(d, &user)));
    assert!(resp.ok(), "{}", resp.text());
    assert_eq!(node.vmms(twin, "x").len(), 1);

    // Power off (the agent and its VM end), the registrar goes down, a new boot.
    node.stop();
    for pid in node.vmms(twin, "x") {
        // SAFETY: a plain signal to a vmm this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = registrar.kill();
    let _ = registrar.wait();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !node.vmms(twin, "x").is_empty() {
        assert!(std::time::Instant::now() < deadline, "the vmm did not end");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Store::open(&node.state().join("agent.db"))
        .unwrap()
        .set_meta("boot_id", "an earlier boot")
        .unwrap();
    node.start(None);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while node.vmms(twin, "x").len() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the VM did not start again without the registrar"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The operator's view: the registration is what fails.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let status = common::block_on(
            node_agent::client::Client::new(node_agent::client::Endpoint::Unix(node.sock()))
                .request("GET", "/node", None),
        )
        .unwrap();
        let status: serde_json::Value = status.json().unwrap();
        let error = status["registrar_error"].as_str().unwrap_or_default();
        if error.contains("registration") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no registration error in the health: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
