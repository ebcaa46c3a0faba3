//! The node agent on the test bed (a real KVM host inside QEMU), driving real vmm processes
//! that boot the project's guest kernel with an flist root: a signed deployment of two VMs
//! runs their entrypoints and their output is read through the API; an update changes one VM
//! and leaves the other running; the agent killed with -9 while VMs run comes back and still
//! tracks them (no second vmm); a VM whose vmm dies is restarted by its policy and finds its
//! volume's data, and `logs -f` follows it from the last run into the new one; the agent
//! crashing in the middle of a deploy finishes it after restart without starting anything
//! twice; another twin cannot read the logs; a replayed, an over-capacity and a forged
//! deployment are refused with their reason and change nothing; delete removes the VMs and
//! their data.

use e2e_tests::{artifacts, microvm, skip_if_missing, Error, Job, Testbed};

const SCRIPT: &str = r#"
set -u
fail() { echo "FAIL: $*"; echo "--- agent log"; tail -n 40 /srv/agent.log; exit 1; }
wait_for() { i=0; while ! sh -c "$1" >/dev/null 2>&1; do i=$((i+1)); if [ $i -gt $2 ]; then fail "timeout: $1"; fi; sleep 1; done; }
A=/node-agent
K="--key /srv/user.key --agent /srv/state/agent.sock"

mkdir -p /srv/rootfs/bin /srv/rootfs/etc /srv/rootfs/proc /srv/rootfs/dev /srv/rootfs/tmp /srv/rootfs/sys /srv/rootfs/run
cp /bin/busybox /srv/rootfs/bin/busybox
for a in sh cat echo sleep; do ln -s busybox /srv/rootfs/bin/$a; done
/flist pack /srv/rootfs -o /srv/root.flist --store dir:///srv/store > /dev/null || fail pack
echo '{"image_cache": "/srv/cache", "stores": ["dir:///srv/store"]}' > /srv/node.json
chmod 600 /srv/node.json
echo '{"state_dir": "/srv/state", "registrar": "local", "uptime_interval_secs": 5,
 "reserve": {"cru": 0, "mru": 0, "sru": 0, "hru": 0},
 "vmm": {"bin": "/vmm", "kernel": "/guest/vmlinux", "initrd": "/guest/initrd",
         "node_config": "/srv/node.json", "cmdline": "quiet", "console_max_bytes": 65536}}' > /srv/agent.json
start_agent() { GRIDNODE_LOG=info "$@" $A run --config /srv/agent.json >> /srv/agent.log 2>&1 & AGENT=$!; wait_for "test -S /srv/state/agent.sock && $A node --agent /srv/state/agent.sock" 30; }
start_agent env

$A keygen --out /srv/user.key > /dev/null
$A twin register --key /srv/user.key --registrar /srv/state/agent.sock || fail "twin register"
TWIN=$(cat /srv/user.key.twin)
# deployment VERSION SECOND-WORKLOAD: VM a (always restarted, a volume) and another VM.
deployment() {
  printf '%s' "{\"twin_id\": $TWIN, \"deployment_id\": 1, \"version\": $1, \"workloads\": [
  {\"type\": \"vm\", \"name\": \"a\", \"image\": \"/srv/root.flist\", \"vcpus\": 1, \"memory_mib\": 128, \"rootfs_mib\": 64,
   \"volumes\": [{\"name\": \"data\", \"size_mib\": 16, \"mount\": \"/data\"}], \"restart\": \"always\",
   \"entrypoint\": \"/bin/sh\", \"args\": [\"-c\", \"n=\$(cat /data/count 2>/dev/null || echo 0); n=\$((n+1)); echo \$n > /data/count; echo a-run-\$n; while true; do sleep 1; done\"]}, $2]}"
}
vm_b() {
  printf '%s' "{\"type\": \"vm\", \"name\": \"b\", \"image\": \"/srv/root.flist\", \"vcpus\": 1, \"memory_mib\": 128, \"rootfs_mib\": 64,
   \"env\": {\"GREETING\": \"$1\"}, \"restart\": \"on-failure\",
   \"entrypoint\": \"/bin/sh\", \"args\": [\"-c\", \"echo b-says-\$GREETING; while true; do sleep 1; done\"]}"
}
vmm_pid() { for p in /proc/[0-9]*; do if tr '\0' ' ' < $p/cmdline 2>/dev/null | grep -q "^/vmm --config /srv/state/vms/$TWIN/1/$1/spec.json"; then echo ${p#/proc/}; fi; done; }
vmm_count() { vmm_pid $1 | wc -l; }

deployment 1 "$(vm_b v1)" > /srv/d1.json
$A deploy /srv/d1.json $K && echo deploy-v$((0+1))-ok || fail "deploy v1"
wait_for "$A logs a $K | grep -q a-run-1" 120
wait_for "$A logs b $K | grep -q b-says-v1" 120
echo logs-v$((0+1))-ok
PA=$(vmm_pid a); PB=$(vmm_pid b)
$A ps $K

# Update: only b changes.
deployment 2 "$(vm_b v2)" > /srv/d2.json
$A deploy /srv/d2.json $K || fail "deploy v2"
wait_for "$A logs b $K | grep -q b-says-v2" 120
[ "$(vmm_pid a)" = "$PA" ] && echo a-kept-$((1+1)) || fail "a was restarted by an update of b"
[ "$(vmm_pid b)" != "$PB" ] && echo b-replaced-$((1+1)) || fail "b was not replaced"

# The agent killed with -9 while VMs run: they keep running and are adopted.
kill -9 $AGENT; wait $AGENT 2>/dev/null
kill -0 $PA && echo a-survived-agent-$((2+1)) || fail "a died with the agent"
start_agent env
sleep 3
[ "$(vmm_count a)" = 1 ] && [ "$(vmm_pid a)" = "$PA" ] && echo adopted-$((3+1)) || fail "a not adopted: $(vmm_pid a)"
$A ps $K | grep -E "^1 +a +running +$PA " > /dev/null && echo ps-tracks-$((4+1)) || { $A ps $K; fail "ps does not track a"; }

# The vmm of a dies: restarted by policy, finds its volume's data. A follower of its logs
# started before goes on into the new run; the last run's output stays readable.
$A logs -f a $K > /srv/follow.log 2>&1 & FOLLOW=$!
kill -9 $PA
wait_for "$A logs a $K | grep -q a-run-2" 120
echo restarted-with-data-$((5+1))
wait_for "grep -q a-run-2 /srv/follow.log" 30
kill $FOLLOW
RUNS=$(grep -o 'a-run-[0-9]' /srv/follow.log | tr '\n' ' ')
[ "$RUNS" = "a-run-1 a-run-2 " ] && echo followed-across-restart-$((5+1)) || { cat /srv/follow.log; fail "logs -f across the restart saw: $RUNS"; }
$A logs a $K | grep -q a-run-1 && echo previous-run-kept-$((5+1)) || fail "the previous run's output is gone"

# Crash in the middle of a deploy (b removed, c added; c's vmm started, its pid not recorded).
kill -9 $AGENT; wait $AGENT 2>/dev/null
start_agent env GRIDNODE_CRASH_AT=after-spawn
deployment 3 '{"type": "vm", "name": "c", "image": "/srv/root.flist", "vcpus": 1, "memory_mib": 128, "rootfs_mib": 64, "entrypoint": "/bin/sh", "args": ["-c", "echo c-up-$((3*3)); while true; do sleep 1; done"]}' > /srv/d3.json
$A deploy /srv/d3.json $K && fail "the deploy should have crashed the agent"
wait $AGENT 2>/dev/null
[ "$(vmm_count c)" = 1 ] && echo crashed-mid-deploy-$((6+1)) || fail "c vmm count $(vmm_count c)"
start_agent env
wait_for "$A logs c $K | grep -q c-up-9" 120
sleep 2
[ "$(vmm_count c)" = 1 ] && echo c-started-once-$((7+1)) || fail "c started $(vmm_count c) times"
[ "$(vmm_count b)" = 0 ] && [ ! -e /srv/state/vms/$TWIN/1/b ] && echo b-removed-$((7+1)) || fail "b left behind"
$A inspect 1 $K | grep -q '"version": 3' && echo deploy-finished-$((8+1)) || fail "version 3 not committed"

# Another twin cannot read the logs.
$A keygen --out /srv/other.key > /dev/null
$A twin register --key /srv/other.key --registrar /srv/state/agent.sock > /dev/null

# Refused changes name their reason and change nothing (same document, same vmm of c).
state() { $A inspect 1 $K | grep -v '"next_start_at"' | md5sum; }
BEFORE=$(state); PC=$(vmm_pid c)
refused() { # WHAT EXPECTED-REASON DEPLOY-ARGS...
  what=$1; want=$2; shift 2
  out=$($A deploy "$@" 2>&1) && fail "$what deployment accepted: $out"
  echo "$out" | grep -q "$want" || fail "$what deployment refused for another reason: $out"
  [ "$(state)" = "$BEFORE" ] && [ "$(vmm_pid c)" = "$PC" ] || fail "the $what deployment changed something"
  echo "refused-$what: $out"
}
refused replayed "not higher than the current" /srv/d3.json $K
sed 's/"version": 3/"version": 4/; s/"memory_mib": 128/"memory_mib": 500000/' /srv/d3.json > /srv/d4-big.json
refused over-capacity "over capacity" /srv/d4-big.json $K
sed 's/"version": 3/"version": 4/' /srv/d3.json > /srv/d4.json
refused forged "signature does not match" /srv/d4.json --key /srv/other.key --twin $TWIN --agent /srv/state/agent.sock
echo refusals-changed-nothing-$((9+1))
$A logs 1/a --key /srv/other.key --agent /srv/state/agent.sock 2>&1 | grep -q "has no VM a" && echo other-refused-$((9+1)) || fail "another twin read the logs"

# Delete removes the VMs and their data.
$A rm 1 $K || fail rm
[ "$(vmm_count a)$(vmm_count b)$(vmm_count c)" = 000 ] && echo vms-gone-$((10+1)) || fail "VMs left: $(vmm_count a)$(vmm_count b)$(vmm_count c)"
[ ! -e /srv/state/vms/$TWIN/1 ] && echo data-gone-$((11+1)) || fail "data left"
$A node --agent /srv/state/agent.sock | grep -q '"registered": true' && echo registered-$((12+1)) || fail "not registered"
echo agent-e2e-done
"#;

#[test]
fn agent_deploys_updates_survives_crashes_and_deletes() -> Result<(), Error> {
    let test = "agent_deploys_updates_survives_crashes_and_deletes";
    let Some(testbed) = skip_if_missing(test, Testbed::from_system())? else {
        return Ok(());
    };
    let Some(kernel) = skip_if_missing(test, artifacts::guest_kernel())? else {
        return Ok(());
    };
    let init = artifacts::guest_init()?;
    let scratch = artifacts::scratch_dir(test)?;
    let initrd = scratch.join("initrd.cpio");
    microvm::guest_initramfs(&init, std::path::Path::new("/bin/busybox"))?.write_file(&initrd)?;
    let target = artifacts::target_dir();
    let job = Job::new(SCRIPT)
        .binary("/vmm", artifacts::vmm_binary()?)
        .binary("/flist", target.join("debug/flist"))
        .binary("/node-agent", target.join("debug/node-agent"))
        .file("/guest/vmlinux", &kernel.vmlinux)
        .file("/guest/initrd", &initrd)
        .timeout(std::time::Duration::from_secs(1200));
    let out = testbed.run(&job)?;
    eprintln!("--- job output ---\n{}", out.output);
    for needle in [
        "deploy-v1-ok",
        "logs-v1-ok",
        "a-kept-2",
        "b-replaced-2",
        "a-survived-agent-3",
        "adopted-4",
        "ps-tracks-5",
        "restarted-with-data-6",
        "followed-across-restart-6",
        "previous-run-kept-6",
        "crashed-mid-deploy-7",
        "c-started-once-8",
        "b-removed-8",
        "deploy-finished-9",
        "other-refused-10",
        "refused-replayed",
        "refused-over-capacity",
        "refused-forged",
        "refusals-changed-nothing-10",
        "vms-gone-11",
        "data-gone-12",
        "registered-13",
        "agent-e2e-done",
    ] {
        assert!(
            out.output.contains(needle),
            "missing {needle:?}:\n{}",
            out.output
        );
    }
    Ok(())
}
