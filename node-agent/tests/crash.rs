//! The agent's state machine at every crash point, with the real agent binary driving real vmm
//! processes on this machine's /dev/kvm (the freestanding `chatter` test guest as the VM's
//! kernel, an flist image made by the real `flist` binary as its root share).
//!
//! For each crash point the agent is started with `GRIDNODE_CRASH_AT=<point>` and aborts there
//! in the middle of a deploy (or a delete); started again without it, it must finish or roll
//! back what it was doing: the deployment ends at one version, with exactly one vmm per VM,
//! and an empty journal.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{block_on, running, vm_deployment, Node};
use e2e_tests::kvm_available;
use node_agent::identity::KeyPair;
use node_agent::state::Store;

fn deployment(twin: u32, version: u32, image: &Path, names: &[&str], key: &KeyPair) -> Vec<u8> {
    let mut d = vm_deployment(twin, version, image, names);
    d.sign(twin, key);
    serde_json::to_vec(&d).unwrap()
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
        let (key, twin) = node.register();
        let image = node.image();
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
        let s = node.wait_until(&key, twin, point, |s| running(s, &["x", "y"]));
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
        let (key, twin) = node.register();
        let image = node.image();
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
        let s = node.wait_until(&key, twin, point, |s| {
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
    let (key, twin) = node.register();
    let image = node.image();
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
