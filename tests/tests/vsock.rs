//! The vmm's virtio-vsock device on the test bed: a Linux guest and host programs exchange
//! data over AF_VSOCK, both ways and in both directions of connection (host to guest through
//! the vmm's unix socket and `CONNECT <port>`, guest to host through `<uds>_<port>`), with
//! many connections at once and a large transfer, every byte checked by SHA-256
//! (guest-kernels/vsock-probe runs both ends).

use e2e_tests::{artifacts, microvm, skip_if_missing, Error, Job, Testbed};

/// Concurrent connections per direction, their size, and the large transfer's.
const CONNS: u32 = 16;
const SMALL: u64 = 1 << 20;
const LARGE: u64 = 64 << 20;
/// A run normally takes under a minute (about three under CI load).
const WATCHDOG_SECS: u64 = 420;

#[test]
fn vsock_carries_data_both_ways_in_both_connection_directions() -> Result<(), Error> {
    let test = "vsock_carries_data_both_ways_in_both_connection_directions";
    let Some(testbed) = skip_if_missing(test, Testbed::from_system())? else {
        return Ok(());
    };
    let Some(kernel) = skip_if_missing(test, artifacts::guest_kernel())? else {
        return Ok(());
    };
    let (initrd, probe) = microvm::probe_initramfs(test)?;

    let total = CONNS + 1;
    // The guest serves port 5000 for the host's connections while it connects to the host's
    // port 6000 (the unix socket /run/v.sock_6000).
    let guest = format!(
        "/bin/vsock-probe listen 5000 {total} > /tmp/listen.log 2>&1 & L=$!; \
         /bin/vsock-probe connect 2 6000 {CONNS} {SMALL} {LARGE}; C=$?; \
         wait $L; W=$?; cat /tmp/listen.log; echo guest-result connect=$C listen=$W"
    );
    // A stale socket at the path (as a killed vmm leaves) must not stop the vmm. A watchdog
    // ends a run that stalls (the clients give up after 120 s without progress, but a vmm
    // whose guest hangs would keep the job waiting), showing the vmm's state, its vsock
    // metrics and the guest's console first.
    let script = format!(
        "mkdir -p /run && /probe serve /run/v.sock_6000 {total} > /tmp/serve.log 2>&1 & S=$!\n\
         /probe serve /run/v.sock 0 > /dev/null 2>&1; test -S /run/v.sock && echo stale-socket-present\n\
         /vmm --kernel /guest/vmlinux --initrd /guest/initrd --memory 256 --api-sock /run/api.sock \
           --vsock cid=3,uds=/run/v.sock -- /bin/sh -c '{guest}' > /tmp/vmm.log 2>&1 & V=$!\n\
         (sleep {WATCHDOG_SECS}; echo watchdog-fired; /probe http-unix /run/api.sock /vm; echo; \
           /probe http-unix /run/api.sock /metrics | grep -i vsock; echo '--- guest console (end)'; \
           tail -c 6000 /tmp/vmm.log; kill $V; sleep 5; kill -9 $V) & D=$!\n\
         /probe connect-uds /run/v.sock 5000 {CONNS} {SMALL} {LARGE}; echo host-connect=$?\n\
         wait $V; echo vmm-status=$?\n\
         kill $D 2>/dev/null\n\
         sleep 1; kill $S 2>/dev/null; wait $S; echo host-serve=$?\n\
         cat /tmp/serve.log /tmp/vmm.log\n\
         test -e /run/v.sock && echo socket-left-behind\n\
         true\n"
    );
    let job = Job::new(script)
        .binary("/vmm", artifacts::vmm_binary()?)
        .file("/probe", &probe)
        .file("/guest/vmlinux", &kernel.vmlinux)
        .file("/guest/initrd", &initrd)
        .timeout(std::time::Duration::from_secs(WATCHDOG_SECS + 300));
    let mut out = testbed.run(&job)?;
    if out.output.lines().any(|l| l.trim() == "watchdog-fired") {
        // Seen once in CI: nothing moved for 15 minutes, the cause not recorded. The run's
        // diagnostics are printed; a second stall fails the test.
        eprintln!(
            "--- the run stalled; its output (vmm state, metrics, guest console) ---\n{}\n--- running it again in a fresh test bed ---",
            out.output
        );
        out = testbed.run(&job)?;
    }
    eprintln!("--- job output ---\n{}", out.output);
    let lines: Vec<&str> = out.output.lines().map(str::trim).collect();
    let has = |start: &str| lines.iter().any(|l| l.starts_with(start));
    assert!(!has("watchdog-fired"), "stalled twice:\n{}", out.output);
    for needle in [
        "stale-socket-present",
        "host-connect=0",
        "vmm-status=0",
        "host-serve=0",
        "guest-result connect=0 listen=0",
    ] {
        assert!(has(needle), "missing {needle:?}:\n{}", out.output);
    }
    // Two client runs (host and guest) and two servers report success.
    let clients = lines
        .iter()
        .filter(|l| {
            l.starts_with(&format!(
                "vsock-probe: {CONNS} concurrent connections of {SMALL} bytes ok"
            ))
        })
        .count();
    assert_eq!(clients, 2, "{}", out.output);
    let served = format!(
        "vsock-probe: served {total} connections, {} bytes each way",
        u64::from(CONNS) * SMALL + LARGE
    );
    let servers = lines.iter().filter(|l| l.starts_with(&served)).count();
    assert_eq!(servers, 2, "{}", out.output);
    assert!(!has("socket-left-behind"), "{}", out.output);
    assert!(!has("vsock-probe: error"), "{}", out.output);
    Ok(())
}
