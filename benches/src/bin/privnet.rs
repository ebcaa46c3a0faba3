//! Private-network benchmark on the test bed (a KVM host inside QEMU): two nodes on one bed
//! (two node agents in two network namespaces, `e2e_tests::agent_bed::TWO_NODES`), one owner's
//! private network over both, and iperf3 and ping from Debian's packages inside the VMs
//! (packed into the guests' flist with their libraries). One boot measures:
//!
//! - **across**: VM to VM across the nodes (virtio-net, each node's network bridge and
//!   WireGuard between the nodes);
//! - **same node**: VM to VM on one node's network bridge (virtio-net only);
//! - **namespaces**: the two nodes' network namespaces to each other over the same WireGuard
//!   link with no VM (the kernel's path alone, the floor the VMs stand on).
//!
//! Each case: TCP throughput client->server and server->client (`iperf3 -t S`, the receiver's
//! rate) and the ping round trip (100 pings 20 ms apart, the average). With `--repeat N` each
//! case runs N times and the medians are printed. The vmm is the shipped release build
//! (`VMM_BIN`), the agent and flist release builds.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use benches::{iperf3_receiver_rate, median, ping_average_ms, vmm};
use clap::Parser;
use e2e_tests::agent_bed::{self, NETWORK_MODULES};
use e2e_tests::Testbed;

#[derive(Parser)]
struct Args {
    /// Seconds of each iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// How many times each case is measured; medians are reported.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
}

const PROGRESS: &str = "privnet-bench-progress:";
const IPERF: &str = "/usr/bin/iperf3";
const PING: &str = "/usr/bin/ping";

/// Shell run by a client (a VM's entrypoint or a namespace): waits for the server, then prints
/// `== CASE to|from|ping` before each measurement.
fn client_commands(case: &str, server: &str, seconds: u32, repeat: u32) -> String {
    // Every client is bounded: a VM that stops answering ends its run, not the benchmark.
    let limit = seconds * 4 + 30;
    format!(
        "i=0; until {PING} -c 1 -W 1 {server} > /dev/null 2>&1; do i=$((i+1)); [ $i -gt 240 ] && break; done; \
         r=0; while [ $r -lt {repeat} ]; do r=$((r+1)); \
         echo '== {case} to'; timeout {limit} {IPERF} -c {server} -t {seconds} -f M --connect-timeout 5000; \
         echo '== {case} from'; timeout {limit} {IPERF} -c {server} -t {seconds} -f M -R --connect-timeout 5000; \
         echo '== {case} ping'; timeout {limit} {PING} -c 100 -i 0.02 -q {server}; done; echo '== {case} done'"
    )
}

/// A VM workload of the user's network, as JSON.
fn vm(name: &str, command: &str) -> String {
    serde_json::json!({
        "type": "vm", "name": name, "image": "/srv/root.flist", "vcpus": 1,
        "memory_mib": 256, "rootfs_mib": 64,
        "interfaces": [{"network": "net"}],
        "entrypoint": "/bin/sh",
        "args": ["-c", format!("{command}; while true; do sleep 1; done")],
    })
    .to_string()
}

fn script(seconds: u32, repeat: u32) -> String {
    let server = vm("srv", &format!("ip addr; {IPERF} -s"));
    let across = vm(
        "cli",
        &client_commands("across", "10.20.1.2", seconds, repeat),
    );
    let near = vm(
        "near",
        &client_commands("same-node", "10.20.1.2", seconds, repeat),
    );
    let namespaces = client_commands("namespaces", "10.20.2.1", seconds, repeat);
    format!(
        r#"{setup}
progress() {{ echo "{PROGRESS} $*" > /dev/console; }}
progress "two nodes up"
cat > /srv/srv.json <<'VMJSON'
{server}
VMJSON
cat > /srv/cli.json <<'VMJSON'
{across}
VMJSON
cat > /srv/near.json <<'VMJSON'
{near}
VMJSON
deployment() {{ echo "{{\"twin_id\": $TWIN, \"deployment_id\": $1, \"version\": ${{3:-1}}, \"workloads\": [$2]}}"; }}
deployment 1 "$(net @NODE_PRIVATE@), $(cat /srv/srv.json)" > /srv/da.json
deployment 1 "$(net @PEER_PRIVATE@), $(cat /srv/cli.json)" > /srv/db.json
$A deploy /srv/da.json $KA > /dev/null || fail "deploy on a"
$A deploy /srv/db.json $KB > /dev/null || fail "deploy on b"
progress "measuring across the nodes"
wait_for "$A logs cli $KB | grep -q '== across done'" 900
$A logs cli $KB | sed 's/^/OUT /'
$A rm 1 $KB > /dev/null || fail "rm on b"
# The same deployment on node A, updated with a second VM (a VM joins only a network its own
# deployment declares).
deployment 1 "$(net @NODE_PRIVATE@), $(cat /srv/srv.json), $(cat /srv/near.json)" 2 > /srv/dn.json
$A deploy /srv/dn.json $KA > /dev/null || fail "deploy near"
progress "measuring on one node"
wait_for "$A logs near $KA | grep -q '== same-node done'" 900
$A logs near $KA | sed 's/^/OUT /'
# The kernel's path alone: node B's network namespace is deployed again (no VM), and node A's
# namespace talks to it over WireGuard.
deployment 3 "$(net @PEER_PRIVATE@)" > /srv/db2.json
$A deploy /srv/db2.json $KB > /dev/null || fail "deploy the network on b"
NSA=/run/netns/$(ls /run/netns); NSB=/run/netns-b/$(ls /run/netns-b)
nsenter --net=$NSB {IPERF} -s -D || fail "iperf3 server in node b's network namespace"
progress "measuring the namespaces"
cat > /srv/ns-client.sh <<'NSCLIENT'
{namespaces}
NSCLIENT
nsenter --net=$NSA sh /srv/ns-client.sh 2>&1 | sed 's/^/OUT /'
progress "done"
echo privnet-bench-done
"#,
        setup = agent_bed::TWO_NODES,
    )
}

#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    to: f64,
    from: f64,
    rtt_ms: f64,
}

/// Every case's samples, in the order of `CASES`.
fn parse(output: &str) -> Vec<(&'static str, Vec<Sample>)> {
    let mut rows: Vec<(&'static str, Vec<Sample>)> =
        CASES.iter().map(|(c, _)| (*c, Vec::new())).collect();
    let mut current: Option<(usize, &str)> = None;
    for line in output.lines() {
        let line = line.strip_prefix("OUT ").unwrap_or(line);
        if let Some(marker) = line.trim().strip_prefix("== ") {
            let mut parts = marker.split_whitespace();
            let (Some(case), Some(what)) = (parts.next(), parts.next()) else {
                continue;
            };
            current = CASES
                .iter()
                .position(|(c, _)| *c == case)
                .map(|i| (i, what));
            if let Some((i, "to")) = current {
                rows[i].1.push(Sample::default());
            }
            continue;
        }
        let Some((i, what)) = current else { continue };
        let Some(sample) = rows[i].1.last_mut() else {
            continue;
        };
        match what {
            "to" => {
                if let Some(v) = iperf3_receiver_rate(line) {
                    sample.to = v;
                }
            }
            "from" => {
                if let Some(v) = iperf3_receiver_rate(line) {
                    sample.from = v;
                }
            }
            "ping" => {
                if let Some(v) = ping_average_ms(line) {
                    sample.rtt_ms = v;
                }
            }
            _ => {}
        }
    }
    rows
}

const CASES: &[(&str, &str)] = &[
    ("across", "VM to VM across two nodes (WireGuard)"),
    ("same-node", "VM to VM on one node"),
    ("namespaces", "namespace to namespace, WireGuard, no VM"),
];

fn main() -> Result<()> {
    let args = Args::parse();
    let vmm = vmm()?;
    let programs = [PathBuf::from(IPERF), PathBuf::from(PING)];
    for p in &programs {
        if !p.is_file() {
            bail!(
                "{} is missing (Debian packages iperf3 and iputils-ping; scripts/setup.sh)",
                p.display()
            );
        }
    }
    let repeat = args.repeat.max(1);
    let job = agent_bed::agent_job(
        "privnet-bench",
        &script(args.seconds, repeat),
        &vmm,
        "release",
        &programs,
    )?
    .timeout(Duration::from_secs(1800 + 120 * u64::from(repeat)));
    let mut bed = Testbed::from_system()?.with_modules(NETWORK_MODULES)?;
    bed.echo_console = Some(PROGRESS.to_string());
    eprintln!("privnet bench: booting the test bed; progress follows");
    let out = bed.run(&job)?;
    if out.status != 0 || !out.output.contains("privnet-bench-done") {
        bail!(
            "the benchmark failed on the test bed (status {}):\n{}\n{}",
            out.status,
            out.output,
            out.console
        );
    }
    let rows = parse(&out.output);
    println!(
        "TCP (iperf3, {} s each way) and ping over a private network; medians of {repeat}, one test-bed boot",
        args.seconds
    );
    println!(
        "{:<44} {:>16} {:>16} {:>12}",
        "", "client->server", "server->client", "ping avg"
    );
    let mut medians = Vec::new();
    for ((_, label), (_, samples)) in CASES.iter().zip(&rows) {
        // A run that printed no summary left its field at 0: not a sample.
        let pick =
            |f: fn(&Sample) -> f64| median(samples.iter().map(f).filter(|v| *v > 0.0).collect());
        let m = Sample {
            to: pick(|s| s.to),
            from: pick(|s| s.from),
            rtt_ms: pick(|s| s.rtt_ms),
        };
        println!(
            "{label:<44} {:>10.1} MiB/s {:>10.1} MiB/s {:>9.3} ms",
            m.to, m.from, m.rtt_ms
        );
        medians.push(m);
    }
    let across = medians.first().context("no cases")?;
    for (i, (_, label)) in CASES.iter().enumerate().skip(1) {
        let m = medians[i];
        println!(
            "across relative to {label}: throughput {:.2}x / {:.2}x, round trip {:.2}x",
            across.to / m.to,
            across.from / m.from,
            across.rtt_ms / m.rtt_ms
        );
    }
    if medians.iter().any(|m| m.to.is_nan() || m.rtt_ms.is_nan()) {
        bail!("a case has no result:\n{}", out.output);
    }
    println!("(measured on the test bed: a KVM host inside QEMU TCG; compare the ratios)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_iperf3_and_ping_summaries_per_case() {
        let output = "OUT == across to\n\
            OUT [  5]   0.00-5.00   sec  60.1 MBytes  12.0 MBytes/sec                  sender\n\
            OUT [  5]   0.00-5.04   sec  59.8 MBytes  11.9 MBytes/sec                  receiver\n\
            OUT == across from\n\
            OUT [  5]   0.00-5.04   sec  40.0 MBytes  8.00 MBytes/sec                  receiver\n\
            OUT == across ping\n\
            OUT rtt min/avg/max/mdev = 0.301/0.412/0.803/0.081 ms\n\
            == namespaces to\n\
            [  5]   0.00-5.00   sec  100 MBytes  20.0 MBytes/sec                  receiver\n";
        let rows = parse(output);
        assert_eq!(rows[0].1.len(), 1);
        let s = rows[0].1[0];
        assert_eq!((s.to, s.from, s.rtt_ms), (11.9, 8.0, 0.412));
        assert!(rows[1].1.is_empty());
        assert_eq!(rows[2].1[0].to, 20.0);
    }
}
