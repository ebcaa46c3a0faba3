//! Node agent benchmark on the node image (scripts/node-image.sh), booted under QEMU with nested
//! SVM as on the test bed, driven from this host over the agent's TCP API as a user would:
//! - node image boot to registered (QEMU start to the agent's "registered" line);
//! - deploy latency, the median of `--deploys` deployments one after another, in parts:
//!   the signed deploy request until it returns (verified, journalled, image opened, vmm
//!   started), until the guest init reports `booted` in the VM's log, and until the
//!   entrypoint's first output, both read through the API (polled every 100 ms);
//! - the agent's and the vmm processes' resident memory, idle and with `--vms` idle VMs
//!   (`GET /node`);
//! - delete latency of one VM;
//! - density (`--density`): idle VMs deployed until the agent's admission refuses one, with the
//!   node's available memory then. A deployment that does not run within `--deploy-timeout-secs`
//!   ends the count too (a node of nested TCG saturated by its idle guests' timers can stop
//!   answering before memory runs out), with the end of the node's console.
//!
//! The results up to the density are printed before it starts.
//!
//! Absolute times are those of nested TCG (the node's CPU is emulated): compare the parts with
//! each other. Progress goes to stderr as the run goes on.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use benches::median;
use clap::Parser;
use e2e_tests::node::{AgentCli, Node, NodeImage, REGISTERED};

#[derive(Parser)]
struct Args {
    /// Deployments timed for the latency medians.
    #[arg(long, default_value_t = 10)]
    deploys: u32,
    /// Idle VMs running when the "with VMs" memory is read (includes the timed ones).
    #[arg(long, default_value_t = 20)]
    vms: u32,
    /// Go on deploying idle VMs until the agent refuses one (capacity), at most this many in all.
    #[arg(long, default_value_t = 0)]
    density: u32,
    /// Memory of each VM (MiB).
    #[arg(long, default_value_t = 64)]
    vm_mib: u32,
    /// The node's memory (MiB) and CPUs.
    #[arg(long, default_value_t = 4096)]
    node_mib: u32,
    #[arg(long, default_value_t = 2)]
    node_cpus: u32,
    /// The agent's CPU over-commit (vCPUs per CPU thread).
    #[arg(long, default_value_t = 64)]
    cpu_ratio: u32,
    /// How long one deployment may take, request to entrypoint output.
    #[arg(long, default_value_t = 600)]
    deploy_timeout_secs: u64,
}

/// One timed deployment.
#[derive(Clone, Copy)]
struct Deploy {
    request: Duration,
    booted: Duration,
    entrypoint: Duration,
}

/// `node-agent node` (signed): the node's status as JSON.
fn status(cli: &AgentCli) -> Result<serde_json::Value> {
    let text = cli.signed(&["node"]).map_err(|e| anyhow!("node: {e}"))?;
    serde_json::from_str(&text).context("the node's status is not JSON")
}

/// The last lines of the node's console, to show why it failed.
fn console_tail(node: &Node) -> String {
    let console = node.console();
    let lines: Vec<&str> = console.lines().collect();
    format!(
        "--- the node's console, last lines:\n{}",
        lines[lines.len().saturating_sub(60)..].join("\n")
    )
}

fn mib(status: &serde_json::Value, field: &str) -> f64 {
    status["memory"][field].as_f64().unwrap_or(f64::NAN) / (1024.0 * 1024.0)
}

/// Writes deployment `id`: one idle VM whose entrypoint prints a marker (built by the shell,
/// so the command line itself never contains it) and sleeps.
fn write_deployment(dir: &Path, twin: u32, id: u32, vm_mib: u32) -> Result<String> {
    let doc = serde_json::json!({
        "twin_id": twin, "deployment_id": id, "version": 1,
        "workloads": [{
            "type": "vm", "name": format!("v{id}"), "image": "/usr/share/gridnode/demo/root.flist",
            "vcpus": 1, "memory_mib": vm_mib, "rootfs_mib": 16, "restart": "never",
            "entrypoint": "/bin/sh", "args": ["-c", "echo up-$((40+2)); while true; do sleep 1000; done"],
        }],
    });
    let path = dir.join(format!("d{id}.json"));
    std::fs::write(&path, doc.to_string())?;
    Ok(path.display().to_string())
}

/// Deploys `id` and waits for its entrypoint's output, all within `timeout`; Err(message) when
/// the agent refused it or the request did not end in time.
fn deploy(
    cli: &AgentCli,
    node: &Node,
    dir: &Path,
    (twin, id, vm_mib): (u32, u32, u32),
    timeout: Duration,
) -> Result<std::result::Result<Deploy, String>> {
    let doc = write_deployment(dir, twin, id, vm_mib)?;
    let start = Instant::now();
    if let Err(e) = cli.signed_within(&["deploy", &doc], timeout) {
        return Ok(Err(e));
    }
    let request = start.elapsed();
    let name = format!("{id}/v{id}");
    let mut booted = None;
    let entrypoint = cli.until_every(
        node,
        &format!("VM {name}'s entrypoint output"),
        timeout.saturating_sub(start.elapsed()),
        Duration::from_millis(100),
        || {
            let logs = cli.signed(&["logs", &name])?;
            if booted.is_none() && logs.contains("init: booted") {
                booted = Some(start.elapsed());
            }
            Ok(logs.contains("up-42").then(|| start.elapsed()))
        },
    )?;
    Ok(Ok(Deploy {
        request,
        booted: booted.unwrap_or(entrypoint),
        entrypoint,
    }))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.vms < args.deploys {
        bail!(
            "--vms ({}) must be at least --deploys ({})",
            args.vms,
            args.deploys
        );
    }
    eprintln!("bench-agent: building the node image");
    let image = NodeImage::build()?;
    let work = tempfile::tempdir()?;
    let disk = work.path().join("state.img");
    std::fs::File::create(&disk)?.set_len(16 << 30)?;
    eprintln!(
        "bench-agent: booting the node ({} MiB, {} CPUs, QEMU TCG with nested SVM)",
        args.node_mib, args.node_cpus
    );
    // Idle VMs need little CPU: the operator's over-commit of CPU lets many share the node's
    // threads (memory is never over-committed, so memory bounds the density).
    let mut node = Node::boot_with(
        &image,
        &disk,
        args.node_cpus,
        args.node_mib,
        &format!("gridnode.args=--cpu-allocation-ratio,{}", args.cpu_ratio),
    )?;
    let registered = node.wait_for_console(REGISTERED, Duration::from_secs(900))?;
    eprintln!(
        "bench-agent: registered {:.1} s after boot",
        registered.as_secs_f64()
    );
    let cli = AgentCli::new(&node, work.path().join("twin.key"));
    let twin = cli.register_twin(&node, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(2));
    let idle = status(&cli)?;

    let timeout = Duration::from_secs(args.deploy_timeout_secs);
    let mut timed = Vec::new();
    let mut id = 0;
    while id < args.vms {
        id += 1;
        let d = deploy(&cli, &node, work.path(), (twin, id, args.vm_mib), timeout)?
            .map_err(|e| anyhow!("deployment {id} failed: {e}\n{}", console_tail(&node)))?;
        eprintln!(
            "bench-agent: VM {id}: request {:.0} ms, booted {:.0} ms, entrypoint {:.0} ms",
            d.request.as_secs_f64() * 1e3,
            d.booted.as_secs_f64() * 1e3,
            d.entrypoint.as_secs_f64() * 1e3
        );
        if id <= args.deploys {
            timed.push(d);
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let loaded = status(&cli)?;
    let start = Instant::now();
    cli.signed(&["rm", "1"]).map_err(|e| anyhow!("rm 1: {e}"))?;
    let delete = start.elapsed();

    let ms = |f: fn(&Deploy) -> Duration| {
        median(timed.iter().map(|d| f(d).as_secs_f64() * 1e3).collect())
    };
    println!(
        "node agent on the node image ({} MiB, {} CPUs, nested TCG; compare parts, not absolute times):",
        args.node_mib, args.node_cpus
    );
    println!(
        "  node boot -> registered              {:>8.0} ms",
        registered.as_secs_f64() * 1e3
    );
    println!(
        "  deploy request -> accepted, vmm up   {:>8.0} ms (median of {})",
        ms(|d| d.request),
        timed.len()
    );
    println!(
        "  deploy request -> guest init booted  {:>8.0} ms (median)",
        ms(|d| d.booted)
    );
    println!(
        "  deploy request -> entrypoint output  {:>8.0} ms (median)",
        ms(|d| d.entrypoint)
    );
    println!(
        "  delete of one VM                     {:>8.0} ms",
        delete.as_secs_f64() * 1e3
    );
    println!(
        "  agent RSS idle                       {:>8.1} MiB",
        mib(&idle, "agent_rss_bytes")
    );
    println!(
        "  agent RSS with {:>3} VMs               {:>8.1} MiB",
        args.vms,
        mib(&loaded, "agent_rss_bytes")
    );
    let vmms = loaded["memory"]["vmm_processes"]
        .as_f64()
        .unwrap_or(f64::NAN);
    println!(
        "  vmm RSS per idle {} MiB VM            {:>8.1} MiB ({} vmm processes)",
        args.vm_mib,
        mib(&loaded, "vmm_rss_bytes") / vmms,
        vmms
    );
    println!(
        "  node memory available idle / {:>3} VMs {:>6.0} / {:.0} MiB of {:.0}",
        args.vms,
        mib(&idle, "available_bytes"),
        mib(&loaded, "available_bytes"),
        mib(&idle, "total_bytes")
    );

    if args.density > args.vms {
        let ended = loop {
            if id >= args.density {
                break format!("(stopped at --density {})", args.density);
            }
            id += 1;
            match deploy(&cli, &node, work.path(), (twin, id, args.vm_mib), timeout)? {
                Ok(d) => eprintln!(
                    "bench-agent: VM {id} running (entrypoint {:.0} ms)",
                    d.entrypoint.as_secs_f64() * 1e3
                ),
                Err(e) => break e.trim().to_string(),
            }
        };
        std::thread::sleep(Duration::from_secs(3));
        match status(&cli) {
            Ok(s) => println!(
                "  density: {} idle {} MiB VMs running, {:.0} MiB available; the next: {ended}",
                s["memory"]["vmm_processes"],
                args.vm_mib,
                mib(&s, "available_bytes")
            ),
            Err(e) => println!(
                "  density: the node stopped answering after {} deployments ({ended}; {e:#})\n{}",
                id - 1,
                console_tail(&node)
            ),
        }
    }
    drop(node);
    Ok(())
}
