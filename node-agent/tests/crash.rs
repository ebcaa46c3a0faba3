//! The agent's state machine at every crash point, with the real agent binary driving real vmm
//! processes on this machine's /dev/kvm (the freestanding `chatter` test guest as the VM's
//! kernel, an flist image made by the real `flist` binary as its root share).
//!
//! For each crash point the agent is started with `GRIDNODE_CRASH_AT=<point>` and aborts there
//! in the middle of a deploy (or a delete); started again without it, it must finish or roll
//! back what it was doing: the deployment ends at one version, with exactly one vmm per VM,
//! no files of removed workloads, and an empty journal. The points are those listed at
//! `crash_point` in engine.rs, rollbacks included.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{block_on, not_an_flist, running, vm_deployment, vm_mut, Node};
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
/// agent finishes it (the removed VM's files too, when the crash came after the op ended and
/// before they were deleted); the unchanged VM kept its process throughout.
#[test]
fn an_interrupted_update_is_finished_and_leaves_unchanged_vms_alone() {
    if !kvm_available() {
        return;
    }
    for point in [
        "after-journal",
        "after-spawn",
        "before-op-end",
        "before-cleanup",
    ] {
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

/// Crash right after a delete was journaled, and after it ended but before the deployment's
/// files were deleted: the restarted agent finishes the delete, files included.
#[test]
fn an_interrupted_delete_is_finished() {
    if !kvm_available() {
        return;
    }
    for point in ["after-journal", "before-cleanup"] {
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
        node.start(Some(point));
        let resp = block_on(
            node.client(&key, twin)
                .request("DELETE", "/deployments/1", None),
        );
        if let Ok(r) = &resp {
            panic!(
                "{point}: the request should have been cut off by the crash point, got {} {}",
                r.status,
                r.text()
            );
        }
        node.wait_crashed();
        node.start(None);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !node.vmms(twin, "x").is_empty()
            || node.state().join(format!("vms/{twin}/1")).exists()
        {
            assert!(
                Instant::now() < deadline,
                "{point}: the delete was not finished"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let resp = block_on(
            node.client(&key, twin)
                .request("GET", "/deployments/1", None),
        )
        .unwrap();
        assert_eq!(resp.status, 404, "{point}");
        assert!(journal_is_empty(&node), "{point}");
    }
}

/// Crash while rolling back a change whose new VM cannot start (its image is not an flist;
/// the owner chose rollback): once a workload failed, before anything was rolled back
/// (the change is replayed at start: it must fail and be rolled back again, not be kept
/// because the failed VM's record matches its spec), and halfway (the documents restored,
/// the VMs not yet). Either way the restarted agent ends the rollback: a rolled-back create
/// leaves no VM, no files and no deployment; a rolled-back update leaves the old version
/// running, the unchanged VM in its process, and nothing of the new VM.
#[test]
fn an_interrupted_rollback_is_finished() {
    if !kvm_available() {
        return;
    }
    for point in ["before-rollback", "mid-rollback"] {
        // A create of {x, bad}.
        let mut node = Node::new();
        node.start(Some(point));
        let (key, twin) = node.register();
        let bad = node.dir.path().join("bad.flist");
        not_an_flist(&bad);
        let mut d = vm_deployment(twin, 1, &node.image(), &["x", "bad"]);
        vm_mut(&mut d, "bad").image = bad.display().to_string();
        d.sign(twin, &key);
        let resp = block_on(node.client(&key, twin).request(
            "POST",
            "/deployments",
            Some(serde_json::to_vec(&d).unwrap()),
        ));
        if let Ok(r) = &resp {
            panic!("{point}: create not cut off: {} {}", r.status, r.text());
        }
        node.wait_crashed();
        node.start(None);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = node.call(&key, twin, "GET", "/deployments/1", None);
            let done = r.status == 404
                && node.vmms(twin, "x").is_empty()
                && node.vmms(twin, "bad").is_empty()
                && !node.state().join(format!("vms/{twin}/1")).exists();
            if done {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{point}: the create was not rolled back: {} {}",
                r.status,
                r.text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(journal_is_empty(&node), "{point}");

        // An update of {keep} to {keep, bad}.
        let resp = node.call(
            &key,
            twin,
            "POST",
            "/deployments",
            Some(deployment(twin, 2, &node.image(), &["keep"], &key)),
        );
        assert!(resp.ok(), "{point}: {}", resp.text());
        let keep_pid = node.vmms(twin, "keep");
        assert_eq!(keep_pid.len(), 1, "{point}");
        node.stop();
        node.start(Some(point));
        let mut d = vm_deployment(twin, 3, &node.image(), &["keep", "bad"]);
        vm_mut(&mut d, "bad").image = bad.display().to_string();
        d.sign(twin, &key);
        let resp = block_on(node.client(&key, twin).request(
            "PUT",
            "/deployments/1",
            Some(serde_json::to_vec(&d).unwrap()),
        ));
        if let Ok(r) = &resp {
            panic!("{point}: update not cut off: {} {}", r.status, r.text());
        }
        node.wait_crashed();
        node.start(None);
        let s = node.wait_until(&key, twin, point, |s| {
            s.deployment.version == 2 && running(s, &["keep"])
        });
        assert_eq!(s.vms.len(), 1, "{point}: {:?}", s.vms);
        assert_eq!(
            node.vmms(twin, "keep"),
            keep_pid,
            "{point}: the unchanged VM was restarted"
        );
        assert!(node.vmms(twin, "bad").is_empty(), "{point}");
        assert!(
            !node.state().join(format!("vms/{twin}/1/bad")).exists(),
            "{point}: the failed VM's files are left"
        );
        assert!(journal_is_empty(&node), "{point}");
    }
}
