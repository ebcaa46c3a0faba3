//! The node image (scripts/node-image.sh) booted under QEMU with nested SVM, as a laptop would
//! boot it with KVM: PID 1 is `node-agent init`, which loads the modules, formats the fresh
//! state disk and runs the agent daemon as its child (restarting it when it dies); the agent
//! registers with its embedded registrar. From outside (the host, through QEMU's port forward
//! to the agent's TCP API) a user registers a twin and deploys a signed flist deployment of two
//! VMs from the image's demo store, whose output is read through the API.
//!
//! One node, booted twice on the same state disk, runs the whole sequence (each boot is a
//! software-emulated boot), every step failing with its name:
//! - first boot: deploy; refusals (a request signed with another twin's key, over capacity,
//!   a replayed version, unsigned / badly signed / malformed raw HTTP requests, the owner's
//!   document submitted by another twin, a document signed with another key in the owner's
//!   name or altered after the owner signed it) change nothing; another twin cannot read the
//!   logs, see or delete the deployment, the owner can; an update changes one VM, which is
//!   replaced and whose new version's output is seen (its volume kept), and leaves the other
//!   running in the same vmm, not started again;
//! - `kill -9` from outside: the magic SysRq `i` on the serial console (the node booted with
//!   `sysrq_always_enabled`) SIGKILLs every process but PID 1, the agent and the vmms alike;
//!   PID 1 starts the agent again, which starts the VMs again (volumes kept, one vmm each);
//! - the node powered off hard and booted again with `GRIDNODE_CRASH_AT=after-spawn` on the
//!   kernel command line (the kernel hands it to PID 1's environment, the agent inherits it):
//!   the agent, restarting the deployment, aborts right after spawning a vmm, so the agent
//!   alone dies while its VMs run (see [`agent_killed_after_spawn`]); PID 1 starts it again
//!   and it adopts the running vmms: each workload ran once, the state is the same;
//! - delete: the VMs are gone, the API says so, and (read on the powered-off state disk) the
//!   deployment's directory is gone.

use std::time::Duration;

use e2e_tests::node::{state_disk_has, AgentCli, Node, NodeImage, REGISTERED};
use e2e_tests::{artifacts, qemu, skip_if_missing, Error};

/// A workload's script: it counts its runs in a file on its volume and makes the count durable
/// with a plain `sync` (syncfs of the volume: the vmm answers FUSE_SYNCFS by syncing the
/// node's filesystem), so the write survives the hard power-off that follows; it prints
/// `<label>-run-<n>`.
fn counting_script(label: &str) -> String {
    format!(
        "n=$(cat /data/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > /data/count; sync; \
         echo {label}-run-$n; while true; do sleep 1; done"
    )
}

/// The deployment: VM `counter` prints `workload-v<version>-run-<n>` (so every version changes
/// it) and VM `keeper` prints `keeper-run-<n>` (the same in every version: an update must leave
/// it running).
fn deployment(twin: u32, version: u32, memory_mib: u32) -> String {
    deployment_json(
        twin,
        &[
            vm_json(
                "counter",
                memory_mib,
                &counting_script(&format!("workload-v{version}")),
            ),
            vm_json("keeper", 128, &counting_script("keeper")),
        ],
        version,
    )
}

/// One VM workload of the demo image (JSON written by hand: the tests crate has no serde).
fn vm_json(name: &str, memory_mib: u32, script: &str) -> String {
    let script = script.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        r#"  {{"type": "vm", "name": "{name}", "image": "/usr/share/gridnode/demo/root.flist",
    "vcpus": 1, "memory_mib": {memory_mib}, "rootfs_mib": 64, "restart": "always",
    "volumes": [{{"name": "data", "size_mib": 16, "mount": "/data"}}],
    "entrypoint": "/bin/sh", "args": ["-c", "{script}"]}}"#
    )
}

/// The deployment document of `workloads`.
fn deployment_json(twin: u32, workloads: &[String], version: u32) -> String {
    format!(
        r#"{{"twin_id": {twin}, "deployment_id": 1, "version": {version}, "workloads": [
{}]}}"#,
        workloads.join(",\n")
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

fn write(path: &std::path::Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(|source| Error::Io {
        context: format!("writing {}", path.display()),
        source,
    })
}

/// The state of the owner's deployment as the API shows it: the document's version and each
/// VM's `ps` line (state, vmm pid, restarts), to show that a refused request changed nothing.
#[derive(Debug, PartialEq)]
struct Snapshot {
    version: String,
    counter: String,
    keeper: String,
}

fn snapshot(cli: &AgentCli, step: &str) -> Result<Snapshot, Error> {
    let inspect = cli
        .signed(&["inspect", "1"])
        .map_err(|e| Error::Invalid(format!("{step}: inspect 1: {e}")))?;
    let version = inspect
        .lines()
        .find(|l| l.trim_start().starts_with("\"version\""))
        .map(|l| l.trim().to_string())
        .ok_or_else(|| Error::Invalid(format!("{step}: inspect shows no version: {inspect}")))?;
    let ps = cli
        .signed(&["ps"])
        .map_err(|e| Error::Invalid(format!("{step}: ps: {e}")))?;
    Ok(Snapshot {
        version,
        counter: vm_line(&ps, "counter", step)?,
        keeper: vm_line(&ps, "keeper", step)?,
    })
}

/// `ps`'s one line of VM `name` (deployment, name, state, pid, restarts), whitespace
/// normalised; fails unless it is listed exactly once and runs.
fn vm_line(ps: &str, name: &str, step: &str) -> Result<String, Error> {
    let lines: Vec<String> = ps
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(name))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let [line] = lines.as_slice() else {
        return Err(Error::Invalid(format!(
            "{step}: ps lists VM {name} {} times, not once:\n{ps}",
            lines.len()
        )));
    };
    if line.split_whitespace().nth(2) != Some("running") {
        return Err(Error::Invalid(format!(
            "{step}: the VM {name} does not run: {line}"
        )));
    }
    Ok(line.clone())
}

fn vmm_pid(line: &str) -> &str {
    line.split_whitespace().nth(3).unwrap_or("")
}

/// The node's status (`node`) holds `needle`.
fn status_has(cli: &AgentCli, node: &Node, step: &str, needle: &str) -> Result<(), Error> {
    cli.until(node, step, Duration::from_secs(30), || {
        let s = cli.signed(&["node"])?;
        Ok(s.contains(needle).then_some(()))
    })
}

#[test]
fn node_image_deploys_updates_refuses_survives_an_agent_crash_and_deletes() -> Result<(), Error> {
    let test = "node_image_deploys_updates_refuses_survives_an_agent_crash_and_deletes";
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
    // `sysrq_always_enabled`: the console's SysRq may signal processes (see below).
    let mut node = Node::boot_with(&image, &disk, 2, 4096, "sysrq_always_enabled")?;
    wait_registered(&mut node, "first boot")?;
    let console = node.console();
    assert!(
        console.contains("formatting the state disk"),
        "no first-boot format:\n{console}"
    );
    assert!(console.contains("network configured"), "{console}");

    let cli = AgentCli::new(&node, scratch.join("user.key"));
    let twin = cli.register_twin(&node, Duration::from_secs(60))?;
    let other = AgentCli::new(&node, scratch.join("other.key"));
    let other_twin = other.register_twin(&node, Duration::from_secs(60))?;
    eprintln!("twin {twin}, other twin {other_twin}");

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

    let d1 = scratch.join("d1.json");
    write(&d1, &deployment(twin, 1, 128))?;
    let d1s = d1.to_string_lossy().into_owned();
    cli.signed(&["deploy", &d1s])
        .unwrap_or_else(|e| panic!("deploy: {e}\n--- node console\n{}", node.console()));
    let logs = wait_output(&cli, &node, "counter", "workload-v1-run-1")?;
    eprintln!(
        "first boot: workload output read through the API: {}",
        logs.trim()
    );
    wait_output(&cli, &node, "keeper", "keeper-run-1")?;
    // The node's health view counts the running vmms' memory.
    status_has(&cli, &node, "deploy: two vmms", "\"vmm_processes\": 2")?;
    let before = snapshot(&cli, "deploy")?;
    eprintln!("deployed: {before:?}");

    // Refusals through the node's API: each names its reason and changes nothing.
    let d2big = scratch.join("d2-big.json");
    write(&d2big, &deployment(twin, 2, 500_000))?;
    let d2bigs = d2big.to_string_lossy().into_owned();
    let d2 = scratch.join("d2.json");
    write(&d2, &deployment(twin, 2, 128))?;
    let d2s = d2.to_string_lossy().into_owned();
    let other_key = other.key.to_string_lossy().into_owned();
    let twin_s = twin.to_string();
    let refusals: [(&str, &str, Vec<&str>); 3] = [
        (
            "a version signed with another twin's key",
            "signature does not match",
            vec![
                "deploy", &d2s, "--key", &other_key, "--twin", &twin_s, "--agent", &cli.agent,
            ],
        ),
        (
            "an over-capacity version",
            "over capacity",
            vec!["deploy", &d2bigs, "--key", &key, "--agent", &cli.agent],
        ),
        (
            "a replayed version",
            "not higher than the current",
            vec!["deploy", &d1s, "--key", &key, "--agent", &cli.agent],
        ),
    ];
    for (what, reason, args) in refusals {
        match cli.run(&args) {
            Ok(out) => panic!("refusal: {what} was accepted: {out}"),
            Err(e) if e.contains(reason) => eprintln!("refused {what}: {}", e.trim()),
            Err(e) => panic!("refusal: {what} refused for another reason (want {reason:?}): {e}"),
        }
    }
    // Raw requests the CLI never sends: unsigned, badly signed (well-formed headers, a
    // signature that is not the twin's), malformed headers, and a twin that does not exist.
    let body = deployment(twin, 2, 128);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().to_string())
        .unwrap_or_default();
    let nonce = "0123456789abcdef0123456789abcdef";
    let zero_sig = "00".repeat(64);
    let headers = |signer: String| -> Vec<(&'static str, String)> {
        vec![
            ("X-Grid-Signer", signer),
            ("X-Grid-Timestamp", now.clone()),
            ("X-Grid-Nonce", nonce.to_string()),
            ("X-Grid-Signature", zero_sig.clone()),
        ]
    };
    let raw = [
        (
            "an unsigned deployment",
            "POST",
            "/deployments",
            vec![],
            401,
            "request is not signed",
        ),
        (
            "an unsigned logs read",
            "GET",
            "/deployments/1/vms/counter/logs",
            vec![],
            401,
            "request is not signed",
        ),
        (
            "a deployment with a bad request signature",
            "PUT",
            "/deployments/1",
            headers(format!("twin:{twin}")),
            401,
            "signature does not match",
        ),
        (
            "a deployment with malformed signature headers",
            "POST",
            "/deployments",
            headers("twin:not-a-number".into()),
            401,
            "malformed signature headers",
        ),
        (
            "a deployment signed by an unknown twin",
            "POST",
            "/deployments",
            headers("twin:4000000".into()),
            401,
            "unknown twin 4000000",
        ),
    ];
    for (what, method, path, headers, status, reason) in raw {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let body = if method == "GET" {
            &b""[..]
        } else {
            body.as_bytes()
        };
        let a = node.http(method, path, &h, body)?;
        assert!(
            a.status == status && a.body.contains(reason),
            "refusal: {what}: want {status} {reason:?}, got {} {}",
            a.status,
            a.body
        );
        eprintln!("refused {what}: {} {}", a.status, a.body.trim());
    }
    // Signed documents the CLI would not send, in requests signed as the agent's client
    // signs them (checked first: the owner reads the deployment that way).
    let d = cli.raw_signed(&node, "GET", "/deployments/1", b"")?;
    assert!(
        d.status == 200 && d.body.contains("\"counter\""),
        "a raw signed request of the owner: {} {}",
        d.status,
        d.body
    );
    let signed_doc = |name: &str, doc: &str, key: &str, as_twin: u32| -> Result<String, Error> {
        let path = scratch.join(name);
        write(&path, doc)?;
        let p = path.to_string_lossy().into_owned();
        cli.run(&["sign", &p, "--key", key, "--twin", &as_twin.to_string()])
            .map_err(|e| Error::Invalid(format!("sign {name}: {e}")))?;
        std::fs::read_to_string(&path).map_err(|source| Error::Io {
            context: format!("reading {}", path.display()),
            source,
        })
    };
    // A new deployment of the owner's, signed by the owner, submitted by another twin.
    let owners_d2 = signed_doc(
        "owner-new.json",
        &deployment(twin, 1, 128).replace("\"deployment_id\": 1", "\"deployment_id\": 2"),
        &key,
        twin,
    )?;
    // Version 2, signed by the owner.
    let owners_v2 = signed_doc("owner-v2.json", &deployment(twin, 2, 128), &key, twin)?;
    // Version 2 signed with another twin's key in the owner's name.
    let forged = signed_doc("forged.json", &deployment(twin, 2, 128), &other_key, twin)?;
    // Version 2 signed by the owner, then altered.
    let altered = signed_doc("altered.json", &deployment(twin, 2, 128), &key, twin)?
        .replace("workload-v2", "workload-vX");
    for (what, by, method, path, doc, status, reason) in [
        (
            "the owner's deployment submitted by another twin",
            &other,
            "POST",
            "/deployments",
            &owners_d2,
            403,
            format!("twin {other_twin} cannot deploy for twin {twin} (only the owner can)"),
        ),
        (
            "an update submitted by another twin",
            &other,
            "PUT",
            "/deployments/1",
            &owners_v2,
            404,
            format!("no deployment 1 of twin {other_twin}"),
        ),
        (
            "a version signed with another twin's key as the owner's",
            &cli,
            "PUT",
            "/deployments/1",
            &forged,
            403,
            format!("no valid signature of the owner twin {twin}"),
        ),
        (
            "a version altered after the owner signed it",
            &cli,
            "PUT",
            "/deployments/1",
            &altered,
            403,
            format!("no valid signature of the owner twin {twin}"),
        ),
    ] {
        let a = by.raw_signed(&node, method, path, doc.as_bytes())?;
        assert!(
            a.status == status && a.body.contains(&reason),
            "refusal: {what}: want {status} {reason:?}, got {} {}",
            a.status,
            a.body
        );
        eprintln!("refused {what}: {} {}", a.status, a.body.trim());
    }
    let after = snapshot(&cli, "after the refusals")?;
    assert_eq!(before, after, "a refused request changed the deployment");

    // Another twin sees nothing of the deployment and cannot delete it; the owner reads it.
    for (what, args, reason) in [
        (
            "read the logs",
            vec!["logs", "1/counter"],
            "has no VM counter in deployment 1",
        ),
        ("inspect", vec!["inspect", "1"], "no deployment 1"),
        ("delete", vec!["rm", "1"], "no deployment 1"),
    ] {
        match other.signed(&args) {
            Ok(out) => panic!("another twin could {what} the deployment: {out}"),
            Err(e) if e.contains(reason) => eprintln!("another twin cannot {what}: {}", e.trim()),
            Err(e) => {
                panic!("another twin: {what} refused for another reason (want {reason:?}): {e}")
            }
        }
    }
    let ps = other
        .signed(&["ps"])
        .unwrap_or_else(|e| panic!("another twin's ps: {e}"));
    assert!(
        !ps.contains("counter"),
        "another twin's ps lists the VM: {ps}"
    );
    let owner_logs = cli
        .signed(&["logs", "1/counter"])
        .unwrap_or_else(|e| panic!("the owner's logs after the other twin's tries: {e}"));
    assert!(
        owner_logs.contains("workload-v1-run-1"),
        "the owner's logs: {owner_logs}"
    );
    assert_eq!(
        before,
        snapshot(&cli, "after the other twin's tries")?,
        "another twin changed the deployment"
    );

    // Update: version 2 replaces VM `counter` (a new vmm), its output is seen, its volume
    // kept; VM `keeper`, unchanged, runs on in the same vmm, not started again.
    let out = cli.signed(&["deploy", &d2s]).unwrap_or_else(|e| {
        panic!(
            "update to version 2: {e}\n--- node console\n{}",
            node.console()
        )
    });
    eprintln!("update: {}", out.trim());
    wait_output(&cli, &node, "counter", "workload-v2-run-2")?;
    let updated = snapshot(&cli, "update")?;
    assert!(
        updated.version.starts_with("\"version\": 2"),
        "update: the version is not 2: {updated:?}"
    );
    assert_ne!(
        vmm_pid(&updated.counter),
        vmm_pid(&before.counter),
        "update: the changed VM was not replaced: {updated:?}"
    );
    assert_eq!(
        updated.keeper, before.keeper,
        "update: the unchanged VM was touched (its vmm pid or restarts changed)"
    );
    let keeper_logs = cli
        .signed(&["logs", "keeper"])
        .unwrap_or_else(|e| panic!("update: the unchanged VM's logs: {e}"));
    assert!(
        keeper_logs.contains("keeper-run-1") && !keeper_logs.contains("keeper-run-2"),
        "update: the unchanged VM started again:\n{keeper_logs}"
    );
    eprintln!("update: the unchanged VM kept running: {}", updated.keeper);
    status_has(
        &cli,
        &node,
        "update: the old vmm gone",
        "\"vmm_processes\": 2",
    )?;

    // kill -9 from outside: SysRq `i` on the serial console sends SIGKILL to every process
    // but PID 1, the agent and the VMs' vmms alike. PID 1 starts the agent again; the agent
    // finds the vmms gone and starts the VMs again by their policy; each finds its volume.
    node.serial_sysrq(b'i')?;
    node.wait_for_console("the agent ended (wait status 9)", Duration::from_secs(60))?;
    wait_output(&cli, &node, "counter", "workload-v2-run-3")?;
    wait_output(&cli, &node, "keeper", "keeper-run-2")?;
    status_has(&cli, &node, "kill -9: two vmms", "\"vmm_processes\": 2")?;
    let killed = snapshot(&cli, "kill -9")?;
    assert_eq!(killed.version, updated.version, "kill -9: {killed:?}");
    for (vm, now, then) in [
        ("counter", &killed.counter, &updated.counter),
        ("keeper", &killed.keeper, &updated.keeper),
    ] {
        assert_ne!(
            vmm_pid(now),
            vmm_pid(then),
            "kill -9: VM {vm} runs in the vmm that was killed? {killed:?}"
        );
    }
    let console = node.console();
    for line in console.lines().filter(|l| {
        ["sysrq", "the agent ended", "starting the agent"]
            .iter()
            .any(|k| l.contains(k))
    }) {
        eprintln!("first boot console: {}", line.trim());
    }
    eprintln!("after kill -9 of the agent and the vmms: {killed:?}");

    // Power off hard (the workloads synced their writes).
    std::thread::sleep(Duration::from_secs(6));
    node.kill();
    let vm_dir = format!("/vms/{twin}/1/counter");
    assert!(
        state_disk_has(&disk, &vm_dir)?,
        "the VM's directory {vm_dir} is not on the state disk"
    );

    // Second boot, the same disk; the agent aborts right after it spawns a vmm. It starts the
    // two VMs together, so it dies once (both spawned before the abort, or the second never)
    // or twice (a restarted agent adopts the first VM's vmm and spawns the second's); either
    // way each VM must run exactly once.
    let mut node = Node::boot_with(&image, &disk, 2, 4096, &agent_killed_after_spawn())?;
    wait_registered(&mut node, "second boot")?;
    let console = node.console();
    assert!(
        !console.contains("formatting the state disk"),
        "the state disk was formatted again:\n{console}"
    );
    // The second boot's API has its own forwarded port; the twin key is the same.
    let cli = AgentCli::new(&node, cli.key.clone());
    node.wait_for_console("crash point after-spawn reached", Duration::from_secs(300))?;
    // Wait status 6: ended by SIGABRT, no exit of its own (no destructor, no flush).
    node.wait_for_console("the agent ended (wait status 6)", Duration::from_secs(30))?;
    let logs = wait_output(&cli, &node, "counter", "workload-v2-run-4")?;
    eprintln!("second boot: workload output: {}", logs.trim());
    let keeper_logs = wait_output(&cli, &node, "keeper", "keeper-run-3")?;
    // The last run's output the power cut lost is gone, not read back as zeros.
    for logs in [&logs, &keeper_logs] {
        assert!(
            !logs.contains('\0'),
            "second boot: the logs hold zero bytes: {logs:?}"
        );
    }
    // Long enough for a second start to show (the VM prints within seconds).
    std::thread::sleep(Duration::from_secs(10));
    let console = node.console();
    let crashes = console.matches("crash point after-spawn reached").count();
    assert!(
        (1..=2).contains(&crashes),
        "the agent crashed {crashes} times, not once per VM at most (it started a VM again?):\n{console}"
    );
    assert_eq!(
        console.matches("starting the agent").count(),
        crashes + 1,
        "PID 1 did not start the agent once more per crash ({crashes}):\n{console}"
    );
    eprintln!("second boot: the agent crashed {crashes} time(s) right after spawning a vmm");
    for line in console.lines().filter(|l| {
        [
            "crash point",
            "the agent ended",
            "starting the agent",
            "node_agent::engine",
            "node_agent::supervisor",
            "power cut",
        ]
        .iter()
        .any(|k| l.contains(k))
    }) {
        eprintln!("second boot console: {}", line.trim());
    }
    for (vm, twice) in [("counter", "workload-v2-run-5"), ("keeper", "keeper-run-4")] {
        let logs = cli
            .signed(&["logs", vm])
            .unwrap_or_else(|e| panic!("logs of {vm} after the crash: {e}"));
        assert!(
            !logs.contains(twice),
            "VM {vm} ran twice after the agent's crash:\n{logs}"
        );
    }
    status_has(
        &cli,
        &node,
        "after the crash: two vmms",
        "\"vmm_processes\": 2",
    )?;
    // Each VM listed once, running (the snapshot checks both).
    let adopted = snapshot(&cli, "after the crash")?;
    assert_eq!(
        adopted.version, updated.version,
        "after the crash: {adopted:?}"
    );
    eprintln!("after the agent's crash: {adopted:?}");

    // Delete: the VMs are gone, and the API says so.
    cli.signed(&["rm", "1"])
        .unwrap_or_else(|e| panic!("rm 1: {e}\n--- node console\n{}", node.console()));
    let ps = cli
        .signed(&["ps"])
        .unwrap_or_else(|e| panic!("ps after rm: {e}"));
    assert!(
        !ps.contains("counter") && !ps.contains("keeper"),
        "delete: ps still lists a VM: {ps}"
    );
    for (args, reason) in [
        (vec!["inspect", "1"], "no deployment 1"),
        (
            vec!["logs", "1/counter"],
            "has no VM counter in deployment 1",
        ),
    ] {
        match cli.signed(&args) {
            Ok(out) => panic!("delete: {args:?} still answers: {out}"),
            Err(e) => assert!(e.contains(reason), "delete: {args:?}: {e}"),
        }
    }
    status_has(&cli, &node, "delete: no vmm", "\"vmm_processes\": 0")?;
    status_has(&cli, &node, "delete: no workloads", "\"workloads\": 0")?;
    // Let ext4 commit the removal (5 s journal interval), then read the powered-off disk.
    std::thread::sleep(Duration::from_secs(7));
    node.kill();
    assert!(
        !state_disk_has(&disk, &format!("/vms/{twin}/1"))?,
        "delete: the deployment's directory is still on the state disk"
    );
    Ok(())
}

/// The kernel command line that makes the agent abort right after it spawns a vmm.
///
/// SysRq `i` kills every process but PID 1, so the vmms die with the agent. To end the agent
/// alone while its VM runs, as `kill -9 <agent pid>` would: PID 1 is `node-agent init`, which
/// runs the agent daemon as its child (and starts it again when it ends), but the image has no
/// shell, no ssh and no console login, the agent's API has no call that ends the agent, and
/// QEMU's monitor reaches the machine (reset, NMI, keys), not one process. The agent's
/// crash-injection hook (`GRIDNODE_CRASH_AT`, used by the agent tests) aborts the process
/// (SIGABRT: no destructor, no flush, as `kill -9`). Linux hands an unknown `NAME=value`
/// kernel parameter (no dot in the name) to PID 1's environment, and the agent inherits it:
/// every start of a vmm in this boot aborts the agent once it is spawned, so the test makes
/// the starts the agent must make (the deployment's VMs after the reboot) the crashes, and
/// nothing in the rest of the boot starts a vmm.
fn agent_killed_after_spawn() -> String {
    "GRIDNODE_CRASH_AT=after-spawn".to_string()
}

/// Waits until VM `vm`'s logs (read through the API) hold `marker`.
fn wait_output(cli: &AgentCli, node: &Node, vm: &str, marker: &str) -> Result<String, Error> {
    cli.until(node, marker, Duration::from_secs(300), || {
        let out = cli.signed(&["logs", vm])?;
        Ok(out.contains(marker).then_some(out))
    })
}
