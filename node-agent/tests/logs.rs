//! `node-agent logs -f` across rotations of the console log and a restart of the VM, with the
//! real agent binary, its CLI, and a real vmm running the `chatter` test guest (it prints a
//! greeting, then dots without end) on this machine's /dev/kvm. The console log is kept
//! small so that it rotates many times while the follower reads.
//!
//! What the follower printed must be exactly what the guest wrote, run after run: its length
//! equals the vmm's own count of console bytes (`vmm_serial_bytes_total`, read while the VM
//! is paused, so the count is final), and it holds each run's greeting once, in order.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{block_on, built, running, vm_deployment, Node};
use e2e_tests::kvm_available;
use node_agent::client::{Client, Endpoint};
use node_agent::vmspec::{VmKey, VmPaths};

const GREETING: &str = "test-guest: hello from 64-bit entry";
/// Small enough that the chatter guest (about 10-20 KB/s here) fills it every few seconds,
/// large enough that the follower (which waits 500 ms when it is caught up) never falls two
/// rotations behind.
const CONSOLE_MAX_BYTES: u64 = 64 << 10;

/// The vmm's API: pauses the VM, then returns how many bytes its guest wrote to the console.
fn pause_and_count(api_sock: &Path) -> u64 {
    let vmm = Client::new(Endpoint::Unix(api_sock.to_path_buf()));
    let r = block_on(vmm.request(
        "PUT",
        "/vm/actions",
        Some(br#"{"action": "pause"}"#.to_vec()),
    ))
    .unwrap();
    assert!(r.ok(), "pause: {} {}", r.status, r.text());
    let m = block_on(vmm.request("GET", "/metrics", None)).unwrap();
    m.text()
        .lines()
        .find_map(|l| l.strip_prefix("vmm_serial_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no vmm_serial_bytes_total in:\n{}", m.text()))
}

/// Waits until the follower's output file holds `want` bytes (and no more come).
fn wait_len(out: &Path, want: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let len = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
        if len == want {
            // Nothing more may come: the VM is paused.
            std::thread::sleep(Duration::from_secs(1));
            let again = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
            assert_eq!(
                again, want,
                "{what}: the follower printed more than the guest wrote"
            );
            return;
        }
        assert!(
            len < want,
            "{what}: the follower printed {len} bytes, the guest wrote {want} (repeated output)"
        );
        assert!(
            Instant::now() < deadline,
            "{what}: the follower printed {len} bytes, the guest wrote {want} (skipped output)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the console log was started anew `n` times (a rotation by the vmm, or the
/// agent moving the last run aside): its size drops.
fn wait_rotations(console: &Path, n: usize) {
    let mut seen = 0;
    let mut last = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen < n {
        let len = std::fs::metadata(console).map(|m| m.len()).unwrap_or(0);
        if len < last {
            seen += 1;
        }
        last = len;
        assert!(
            Instant::now() < deadline,
            "the console log was started anew only {seen} times in 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn logs_follow_reads_every_byte_once_across_rotations_and_restarts() {
    if !kvm_available() {
        return;
    }
    let mut node = Node::new();
    let cfg_path = node.dir.path().join("agent.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["vmm"]["console_max_bytes"] = CONSOLE_MAX_BYTES.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    node.start(None);
    let (key, twin) = node.register();
    let key_file = node.dir.path().join("user.key");
    key.save_new(&key_file).unwrap();
    std::fs::write(node.dir.path().join("user.key.twin"), format!("{twin}\n")).unwrap();

    let mut d = vm_deployment(twin, 1, &node.image(), &["chat"]);
    d.sign(twin, &key);
    let r = node.call(
        &key,
        twin,
        "POST",
        "/deployments",
        Some(serde_json::to_vec(&d).unwrap()),
    );
    assert!(r.ok(), "{} {}", r.status, r.text());
    node.wait_until(&key, twin, "chat running", |s| running(s, &["chat"]));

    let out = node.dir.path().join("followed");
    let mut follower = Command::new(built("node-agent"))
        .args(["logs", "-f", "chat", "--key"])
        .arg(&key_file)
        .arg("--agent")
        .arg(node.sock())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let paths = VmPaths::new(
        &node.state(),
        &VmKey {
            twin_id: twin,
            deployment_id: 1,
            name: "chat".into(),
        },
    );

    // First run: several rotations while the follower reads.
    wait_rotations(&paths.console, 4);
    let first = pause_and_count(&paths.api_sock);
    wait_len(&out, first, "first run");

    // The vmm is killed; its restart policy (on-failure) starts the VM again, and the
    // follower goes on into the new run.
    let pid = node.vmms(twin, "chat");
    assert_eq!(pid.len(), 1, "{pid:?}");
    // SAFETY: a signal to the vmm this test's agent started.
    unsafe { libc::kill(pid[0], libc::SIGKILL) };
    node.wait_until(&key, twin, "chat restarted", |s| {
        running(s, &["chat"]) && s.vms[0].restarts >= 1
    });
    wait_rotations(&paths.console, 3);
    let second = pause_and_count(&paths.api_sock);
    wait_len(&out, first + second, "first and second run");

    let _ = follower.kill();
    let status = follower.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(
        !stderr.contains("rotated away"),
        "the follower lost output: {stderr}"
    );
    let text = String::from_utf8_lossy(&std::fs::read(&out).unwrap()).into_owned();
    let greetings: Vec<usize> = text.match_indices(GREETING).map(|(i, _)| i).collect();
    assert_eq!(
        greetings,
        vec![0, first as usize],
        "each run's greeting once, at its start"
    );
}
