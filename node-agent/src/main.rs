//! `node-agent`: the daemon (`run`), PID 1 of the node image (`init`), the embedded registrar
//! served to other nodes (`registrar serve`), and a docker-like client of the agent's API.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tracing::{info, warn};

use node_agent::api::{self, ApiState, DeploymentStatus, NodeStatus};
use node_agent::auth::{ReplayGuard, Signer};
use node_agent::client::{Client, Endpoint};
use node_agent::config::AgentConfig;
use node_agent::deployment::Deployment;
use node_agent::engine::{DeployOutcome, Engine};
use node_agent::identity::{self, KeyPair};
use node_agent::metrics::Metrics;
use node_agent::registrar::local::LocalRegistrar;
use node_agent::registrar::remote::RemoteRegistrar;
use node_agent::registrar::tfchain::TfchainRegistrar;
use node_agent::registrar::{server, Registrar, Twin};
use node_agent::state::Store;
use node_agent::{capacity, init, uptime};

#[derive(Parser)]
#[command(
    name = "node-agent",
    version,
    args_override_self = true,
    about = "Grid node agent: identity, registration, signed deployments of micro-VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent daemon.
    Run(Box<RunArgs>),
    /// PID 1 of the node image: mounts, state disk, runs and restarts the daemon.
    Init {
        #[arg(long, default_value = "/var/lib/gridnode")]
        state_dir: PathBuf,
    },
    /// Print the node's id and public key (makes the key on first use).
    Identity {
        #[arg(long, default_value = "/var/lib/gridnode")]
        state_dir: PathBuf,
    },
    /// Make a twin (user) key file (a twin may also write its own: `sr25519:<secret URI>`).
    Keygen {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = identity::SignatureType::Ed25519)]
        scheme: identity::SignatureType,
    },
    /// Twins on a registrar.
    Twin {
        #[command(subcommand)]
        command: TwinCmd,
    },
    /// Farms on a registrar.
    Farm {
        #[command(subcommand)]
        command: FarmCmd,
    },
    /// Serve the embedded registrar to other nodes.
    Registrar {
        #[command(subcommand)]
        command: RegistrarCmd,
    },
    /// Create or update a deployment from a JSON file, signed with the owner's key.
    Deploy {
        file: PathBuf,
        #[command(flatten)]
        who: Who,
    },
    /// Add your signature to a deployment file (a co-signer of a multisig deployment),
    /// without submitting it: the owner's `deploy` then adds theirs and submits.
    Sign {
        file: PathBuf,
        /// The signer's key file.
        #[arg(long, env = "GRIDNODE_KEY")]
        key: PathBuf,
        /// The signer's twin id (default: from KEY.twin, written by `twin register`).
        #[arg(long)]
        twin: Option<u32>,
        /// Write the signed deployment here instead of back to FILE.
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
    /// List your deployments and their VMs.
    Ps {
        #[command(flatten)]
        who: Who,
    },
    /// A VM's console output (`NAME` or `DEPLOYMENT/NAME`).
    Logs {
        name: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        who: Who,
    },
    /// Delete a deployment (by id, or by the name of one of its VMs).
    Rm {
        target: String,
        #[command(flatten)]
        who: Who,
    },
    /// A deployment's document and VM states (by id, or by the name of one of its VMs).
    Inspect {
        target: String,
        #[command(flatten)]
        who: Who,
    },
    /// The node's capacity and health (the operator's view; over TCP, sign with a twin's key).
    Node {
        #[arg(
            long,
            env = "GRIDNODE_AGENT",
            default_value = "/var/lib/gridnode/agent.sock"
        )]
        agent: String,
        /// A twin's key file to sign the request with (needed over TCP).
        #[arg(long, env = "GRIDNODE_KEY")]
        key: Option<PathBuf>,
        /// The twin id (default: from KEY.twin).
        #[arg(long)]
        twin: Option<u32>,
    },
}

#[derive(Args)]
struct Who {
    /// The twin's key file.
    #[arg(long, env = "GRIDNODE_KEY")]
    key: PathBuf,
    /// The twin id (default: from KEY.twin, written by `twin register`).
    #[arg(long)]
    twin: Option<u32>,
    /// The agent: a unix socket path or http://host:port.
    #[arg(
        long,
        env = "GRIDNODE_AGENT",
        default_value = "/var/lib/gridnode/agent.sock"
    )]
    agent: String,
}

#[derive(Subcommand)]
enum TwinCmd {
    /// Register a key as a twin (prints the twin id and writes it to KEY.twin).
    Register {
        #[arg(long)]
        key: PathBuf,
        /// The registrar's URL (http://host:port), or the agent's socket whose embedded
        /// registrar to use.
        #[arg(long, env = "GRIDNODE_REGISTRAR")]
        registrar: String,
    },
}

#[derive(Subcommand)]
enum FarmCmd {
    /// Create a farm owned by a twin.
    Create {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, env = "GRIDNODE_REGISTRAR")]
        registrar: String,
    },
}

#[derive(Subcommand)]
enum RegistrarCmd {
    Serve {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long, default_value = "/var/lib/gridnode-registrar")]
        state_dir: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// JSON configuration; the flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The API on TCP (signed requests only).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// The API's unix socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// `local`, `tfchain` (TF Chain at --chain) or http://host:port of a registrar.
    #[arg(long)]
    registrar: Option<String>,
    /// A TF Chain endpoint (ws:// or wss://); repeat for failover. Implies
    /// `--registrar tfchain` when no registrar is given.
    #[arg(long = "chain")]
    chain: Vec<String>,
    /// Seconds between reads of the deployments' contracts on the chain.
    #[arg(long)]
    contract_poll: Option<u64>,
    #[arg(long)]
    farm_id: Option<u32>,
    #[arg(long)]
    vmm: Option<PathBuf>,
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long)]
    node_config: Option<PathBuf>,
    /// Seconds between uptime reports.
    #[arg(long)]
    uptime_interval: Option<u64>,
    /// What the node offers in place of the detected capacity minus the reserve, per
    /// resource: `cru=THREADS,mru=SIZE,sru=SIZE,hru=SIZE` (sizes in bytes or with a binary
    /// unit: 512M, 200G, 4T), e.g. `--capacity sru=200G` where TF Chain refuses the detected
    /// SSD (InvalidSRUInput: under its minimum of 100 GiB for a node).
    #[arg(long, value_name = "RES=AMOUNT,...")]
    capacity: Option<capacity::CapacityOverride>,
    /// Seconds between reports of what every node contract uses (TF Chain; changes are
    /// reported at once).
    #[arg(long)]
    resources_report: Option<u64>,
    /// vCPUs deployments may have per CPU thread (CPU over-commit; memory and disk never).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    cpu_allocation_ratio: Option<u32>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GRIDNODE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // No colours on the node's serial console (PID 1 and the agent it starts, which gets
        // NO_COLOR from it), nor when NO_COLOR is set.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::process::id() != 1
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
    // The node image's /init is this binary: as PID 1 it is `node-agent init`, whatever the
    // kernel passed as arguments.
    if std::process::id() == 1 {
        init::run(Path::new(DEFAULT_STATE_DIR));
    }
    let cli = Cli::parse();
    match &cli.command {
        Cmd::Init { state_dir } => init::run(state_dir),
        Cmd::Run(_) | Cmd::Registrar { .. } => {}
        // A client's output piped into `head` or `grep -q` ends it quietly, as for other
        // command-line tools (the daemons keep Rust's default: EPIPE as an error).
        // SAFETY: setting a signal disposition before any thread starts.
        _ => unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        },
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("node-agent: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("node-agent: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Run(args) => daemon(*args).await,
        Cmd::Init { .. } => unreachable!("handled before the runtime starts"),
        Cmd::Identity { state_dir } => {
            create_state_dir(&state_dir)?;
            let (key, _) = identity::load_or_create_node_key(&state_dir)?;
            let store = Store::open(&state_dir.join("agent.db"))?;
            let node = store
                .meta("node_id")?
                .unwrap_or_else(|| "unregistered".into());
            let twin = store
                .meta("twin_id")?
                .unwrap_or_else(|| "unregistered".into());
            println!(
                "node id:    {node}\ntwin id:    {twin}\npublic key: {}",
                key.public_hex()
            );
            Ok(())
        }
        Cmd::Keygen { out, scheme } => {
            let key = KeyPair::generate_with(scheme);
            key.save_new(&out)?;
            println!("{}", key.public_hex());
            Ok(())
        }
        Cmd::Twin {
            command: TwinCmd::Register { key, registrar },
        } => {
            let kp = KeyPair::load(&key)?;
            let twin = registrar_client(&registrar)?.create_twin(&kp).await?;
            std::fs::write(twin_file(&key), format!("{}\n", twin.id))?;
            println!("twin {} (key {})", twin.id, twin.public_key);
            Ok(())
        }
        Cmd::Farm {
            command:
                FarmCmd::Create {
                    key,
                    name,
                    registrar,
                },
        } => {
            let kp = KeyPair::load(&key)?;
            let reg = registrar_client(&registrar)?;
            let twin: Twin = reg
                .twin_by_key(&kp.public())
                .await?
                .context("the key is not a twin yet: run `twin register`")?;
            let farm = reg.create_farm(&kp, twin.id, &name).await?;
            println!("farm {} ({})", farm.id, farm.name);
            Ok(())
        }
        Cmd::Registrar {
            command: RegistrarCmd::Serve { listen, state_dir },
        } => {
            create_state_dir(&state_dir)?;
            let store = Arc::new(Store::open(&state_dir.join("registrar.db"))?);
            let state = Arc::new(server::ServerState {
                registrar: LocalRegistrar::new(store.clone()),
                replays: ReplayGuard::persistent(store),
            });
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listening on {listen}"))?;
            info!("registrar serving on {listen}");
            axum::serve(listener, server::router(state)).await?;
            Ok(())
        }
        Cmd::Deploy { file, who } => {
            let text =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let mut doc = Deployment::from_json(&text).map_err(anyhow::Error::msg)?;
            let (client, twin, key) = who.client()?;
            if doc.twin_id != twin {
                bail!(
                    "the deployment is owned by twin {}, the key is twin {twin}",
                    doc.twin_id
                );
            }
            doc.sign(twin, &key);
            let body = serde_json::to_vec(&doc)?;
            let exists = client
                .request("GET", &format!("/deployments/{}", doc.deployment_id), None)
                .await?
                .ok();
            let head = format!("deploying {} (version {})", doc.deployment_id, doc.version);
            let bar = spinner(head.clone());
            let path = format!("/deployments/{}", doc.deployment_id);
            let request = async {
                let client = client.clone().with_timeout(CHANGE_TIMEOUT);
                if exists {
                    client.request("PUT", &path, Some(body)).await
                } else {
                    client.request("POST", "/deployments", Some(body)).await
                }
            };
            // On a terminal, what each VM is doing (images fetched, vmm started, VM built),
            // read from the agent while the change runs.
            let watch = async {
                if bar.is_hidden() {
                    return std::future::pending::<()>().await;
                }
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    if let Ok(r) = client.request("GET", &path, None).await {
                        if let Ok(s) = r.json::<DeploymentStatus>() {
                            bar.set_message(progress_line(&head, doc.version, &s));
                        }
                    }
                }
            };
            let resp = tokio::select! {
                r = request => r?,
                () = watch => unreachable!("the watch never ends"),
            };
            bar.finish_and_clear();
            if !resp.ok() {
                bail!("deploy refused ({}): {}", resp.status, resp.error_message());
            }
            let out: DeployOutcome = resp.json()?;
            println!(
                "deployment {} version {}: started {:?}, unchanged {:?}",
                out.deployment_id, out.version, out.started, out.unchanged
            );
            for (name, why) in &out.failed {
                println!("  {name} failed: {why}");
            }
            Ok(())
        }
        Cmd::Sign {
            file,
            key,
            twin,
            out,
        } => {
            let text =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let mut doc = Deployment::from_json(&text).map_err(anyhow::Error::msg)?;
            doc.validate()
                .map_err(|e| anyhow::anyhow!("invalid deployment: {e}"))?;
            let kp = KeyPair::load(&key)?;
            let twin = twin_of(&key, twin)?;
            let asked = doc.twin_id == twin
                || doc
                    .signature_requirement
                    .as_ref()
                    .is_some_and(|r| r.requests.iter().any(|q| q.twin_id == twin));
            if !asked {
                bail!(
                    "twin {twin} is neither the owner of deployment {} nor one of its requested signers",
                    doc.deployment_id
                );
            }
            doc.sign(twin, &kp);
            let out = out.unwrap_or(file);
            let mut bytes = serde_json::to_vec_pretty(&doc)?;
            bytes.push(b'\n');
            node_agent::engine::write_atomic(&out, &bytes)?;
            let signers: Vec<String> = doc
                .signatures
                .iter()
                .map(|s| s.twin_id.to_string())
                .collect();
            println!(
                "deployment {} version {} signed by twin {twin} (hash {}); signatures of twins {}: {}",
                doc.deployment_id,
                doc.version,
                hex::encode(doc.signing_hash()),
                signers.join(", "),
                out.display()
            );
            Ok(())
        }
        Cmd::Ps { who } => {
            let (client, _, _) = who.client()?;
            let list: Vec<DeploymentStatus> = get_json(&client, "/deployments").await?;
            println!(
                "{:<12} {:<20} {:<11} {:<8} {:<9} REASON",
                "DEPLOYMENT", "NAME", "STATE", "PID", "RESTARTS"
            );
            for d in list {
                for vm in d.vms {
                    let pid = vm.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
                    let state = serde_json::to_value(vm.state)?
                        .as_str()
                        .unwrap_or("?")
                        .to_string();
                    println!(
                        "{:<12} {:<20} {:<11} {:<8} {:<9} {}",
                        d.deployment.deployment_id, vm.name, state, pid, vm.restarts, vm.reason
                    );
                }
            }
            Ok(())
        }
        Cmd::Logs { name, follow, who } => {
            let (client, _, _) = who.client()?;
            let (id, vm) = find_vm(&client, &name).await?;
            let mut cursor: Option<String> = None;
            loop {
                let path = match &cursor {
                    Some(c) => format!("/deployments/{id}/vms/{vm}/logs?cursor={c}"),
                    None => format!("/deployments/{id}/vms/{vm}/logs"),
                };
                let resp = client.request("GET", &path, None).await?;
                if !resp.ok() {
                    bail!("logs: {}", resp.error_message());
                }
                if resp.headers.contains_key(api::LOG_GAP) {
                    eprintln!(
                        "node-agent: [older output of {vm} was rotated away before it was read]"
                    );
                }
                use std::io::Write;
                std::io::stdout().write_all(&resp.body)?;
                std::io::stdout().flush()?;
                if !follow {
                    break;
                }
                let next = resp
                    .headers
                    .get(api::NEXT_CURSOR)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                if resp.body.is_empty() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                cursor = next.or(cursor);
            }
            Ok(())
        }
        Cmd::Rm { target, who } => {
            let (client, _, _) = who.client()?;
            let id = find_deployment(&client, &target).await?;
            let resp = client
                .with_timeout(CHANGE_TIMEOUT)
                .request("DELETE", &format!("/deployments/{id}"), None)
                .await?;
            if !resp.ok() {
                bail!("rm: {}", resp.error_message());
            }
            println!("deployment {id} deleted");
            Ok(())
        }
        Cmd::Inspect { target, who } => {
            let (client, _, _) = who.client()?;
            let id = find_deployment(&client, &target).await?;
            let d: DeploymentStatus = get_json(&client, &format!("/deployments/{id}")).await?;
            println!("{}", serde_json::to_string_pretty(&d)?);
            Ok(())
        }
        Cmd::Node { agent, key, twin } => {
            let client = match key {
                Some(key) => Who { key, twin, agent }.client()?.0,
                None => Client::new(Endpoint::parse(&agent)?),
            };
            let s: NodeStatus = get_json(&client, "/node").await?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(())
        }
    }
}

const DEFAULT_STATE_DIR: &str = "/var/lib/gridnode";

/// How long `deploy` and `rm` wait for the agent: a change stops VMs, each given its
/// shutdown grace (up to 10 minutes), and fetches images. The agent finishes the change
/// whether or not the client still waits.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

fn spinner(msg: String) -> indicatif::ProgressBar {
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_message(msg);
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// `head: web: fetching and checking its images, db: running`: each VM's step while the
/// change (at `version`) runs, else the state of its record.
fn progress_line(head: &str, version: u32, s: &DeploymentStatus) -> String {
    if s.deployment.version != version {
        return head.to_string();
    }
    let vms: Vec<String> = s
        .deployment
        .vms()
        .map(|vm| {
            let what = s.steps.get(&vm.name).cloned().unwrap_or_else(|| {
                s.vms
                    .iter()
                    .find(|r| r.name == vm.name)
                    .and_then(|r| serde_json::to_value(r.state).ok())
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_else(|| "waiting".into())
            });
            format!("{}: {what}", vm.name)
        })
        .collect();
    format!("{head}: {}", vms.join(", "))
}

fn twin_file(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".twin");
    PathBuf::from(s)
}

/// `--twin`, or the twin id `twin register` wrote beside the key.
fn twin_of(key: &Path, twin: Option<u32>) -> Result<u32> {
    match twin {
        Some(t) => Ok(t),
        None => std::fs::read_to_string(twin_file(key))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .with_context(|| {
                format!(
                    "no --twin and no {}: run `twin register` first",
                    twin_file(key).display()
                )
            }),
    }
}

impl Who {
    fn client(&self) -> Result<(Client, u32, KeyPair)> {
        let key = KeyPair::load(&self.key)?;
        let twin = twin_of(&self.key, self.twin)?;
        let client =
            Client::new(Endpoint::parse(&self.agent)?).signed(key.clone(), Signer::Twin(twin));
        Ok((client, twin, key))
    }
}

async fn get_json<T: serde::de::DeserializeOwned>(client: &Client, path: &str) -> Result<T> {
    let resp = client.request("GET", path, None).await?;
    if !resp.ok() {
        bail!("{path}: {} {}", resp.status, resp.error_message());
    }
    resp.json()
}

/// `ID/NAME` or a VM name unique among the caller's deployments.
async fn find_vm(client: &Client, target: &str) -> Result<(u64, String)> {
    if let Some((id, name)) = target.split_once('/') {
        return Ok((id.parse().context("deployment id")?, name.to_string()));
    }
    let list: Vec<DeploymentStatus> = get_json(client, "/deployments").await?;
    let hits: Vec<u64> = list
        .iter()
        .filter(|d| d.deployment.vm(target).is_some())
        .map(|d| d.deployment.deployment_id)
        .collect();
    match hits.as_slice() {
        [id] => Ok((*id, target.to_string())),
        [] => bail!("no VM named {target}"),
        _ => bail!("several deployments have a VM named {target}: use DEPLOYMENT/{target}"),
    }
}

async fn find_deployment(client: &Client, target: &str) -> Result<u64> {
    if let Ok(id) = target.parse() {
        return Ok(id);
    }
    Ok(find_vm(client, target).await?.0)
}

fn registrar_client(registrar: &str) -> Result<Box<dyn Registrar>> {
    if let Some(rest) = registrar.strip_prefix("http://") {
        // http://host:port/prefix: a registrar served under a path (an agent's TCP API
        // serves its embedded registrar under /registrar).
        return Ok(Box::new(match rest.trim_end_matches('/').split_once('/') {
            Some((host, prefix)) => {
                RemoteRegistrar::with_prefix(&format!("http://{host}"), &format!("/{prefix}"))?
            }
            None => RemoteRegistrar::new(registrar)?,
        }));
    }
    // An agent's socket: its embedded registrar, under /registrar.
    Ok(Box::new(RemoteRegistrar::with_prefix(
        registrar,
        "/registrar",
    )?))
}

fn create_state_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

async fn daemon(args: RunArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(p) => AgentConfig::load(p)?,
        None => AgentConfig::default(),
    };
    if let Some(v) = args.state_dir {
        config.state_dir = v;
    }
    if let Some(v) = args.listen {
        config.listen = Some(v);
    }
    if let Some(v) = args.socket {
        config.api_socket = Some(v);
    }
    if let Some(v) = &args.registrar {
        config.registrar = v.clone();
    }
    if let Some(v) = args.farm_id {
        config.farm_id = v;
    }
    if !args.chain.is_empty() {
        config.chain = args.chain;
        if args.registrar.is_none() {
            config.registrar = "tfchain".into();
        }
    }
    if let Some(v) = args.contract_poll {
        config.contract_poll_secs = v;
    }
    if let Some(v) = args.vmm {
        config.vmm.bin = Some(v);
    }
    if let Some(v) = args.kernel {
        config.vmm.kernel = v;
    }
    if let Some(v) = args.initrd {
        config.vmm.initrd = v;
    }
    if let Some(v) = args.node_config {
        config.vmm.node_config = Some(v);
    }
    if let Some(v) = args.uptime_interval {
        config.uptime_interval_secs = v;
    }
    if let Some(v) = args.cpu_allocation_ratio {
        config.cpu_allocation_ratio = v;
    }
    if let Some(v) = args.capacity {
        config.capacity = config.capacity.or(v);
    }
    if let Some(v) = args.resources_report {
        config.resources_report_secs = v;
    }
    create_state_dir(&config.state_dir)?;
    let (key, made) = identity::load_or_create_node_key(&config.state_dir)?;
    if made {
        info!(key = %key.public_hex(), "made the node key");
    }
    let store = Arc::new(Store::open(&config.state_dir.join("agent.db"))?);
    let registrar: Arc<dyn Registrar> = if config.registrar == "local" {
        Arc::new(LocalRegistrar::new(store.clone()))
    } else if config.registrar == "tfchain" {
        Arc::new(TfchainRegistrar::new(config.chain.clone())?)
    } else {
        Arc::new(RemoteRegistrar::new(&config.registrar)?)
    };
    let detected = capacity::detect(&config.state_dir);
    let total = config.offered(detected);
    if !config.capacity.is_empty() {
        let auto = detected.saturating_sub(config.reserve);
        info!(
            cru = ?config.capacity.cru,
            mru = ?config.capacity.mru,
            sru = ?config.capacity.sru,
            hru = ?config.capacity.hru,
            "the operator's capacity override (replaces the detected amounts)"
        );
        for (name, set, have) in [
            ("cru", config.capacity.cru, auto.cru),
            ("mru", config.capacity.mru, auto.mru),
            ("sru", config.capacity.sru, auto.sru),
            ("hru", config.capacity.hru, auto.hru),
        ] {
            if set.is_some_and(|v| v > have) {
                warn!(
                    "capacity override: the node offers more {name} than detected ({} > {have}); deployments are admitted up to the override",
                    set.unwrap_or_default()
                );
            }
        }
    }
    let metrics = Arc::new(Metrics::default());
    let mut engine = Engine::new(
        store.clone(),
        config.clone(),
        registrar.clone(),
        metrics.clone(),
        total,
    );
    if config.network.enabled {
        let net =
            node_agent::network::Network::new(config.network.clone(), key.public_hex().as_bytes())
                .context("the network configuration")?;
        info!(uplink = net.uplink(), nat_range = %config.network.nat_range, "networking enabled");
        engine = engine.with_network(Arc::new(net));
    }
    let engine = Arc::new(engine);
    info!(
        cru = total.cru,
        mru_mib = total.mru >> 20,
        sru_gib = total.sru >> 30,
        hru_gib = total.hru >> 30,
        "capacity offered"
    );

    // Workloads first: they need nothing from the network.
    engine.recover().await.context("recovering the state")?;
    let reg = uptime::Registration {
        config: config.clone(),
        key: key.clone(),
        registrar: registrar.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        capacity: total,
    };
    tokio::spawn(reg.run());
    let ticker = engine.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            ticker.tick().await;
        }
    });
    if registrar.requires_contracts() {
        let reporter = node_agent::usage::ResourceReporter::new(
            engine.clone(),
            key.clone(),
            Duration::from_secs(config.resources_report_secs.max(1)),
        );
        tokio::spawn(reporter.run());
        let poller = engine.clone();
        let every = Duration::from_secs(config.contract_poll_secs.max(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                poller.check_contracts().await;
            }
        });
    }

    let state = Arc::new(ApiState {
        engine: engine.clone(),
        node_key: key.public_hex(),
        replays: ReplayGuard::persistent(store.clone()),
    });
    let local_registrar = || {
        Arc::new(server::ServerState {
            registrar: LocalRegistrar::new(store.clone()),
            replays: ReplayGuard::persistent(store.clone()),
        })
    };
    let app = api::app(
        state.clone(),
        false,
        (config.registrar == "local").then(local_registrar),
    )
    .into_router();
    let sock = config.api_socket();
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)
        .with_context(|| format!("binding {}", sock.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    }
    info!(socket = %sock.display(), "API listening");
    let unix = tokio::spawn(async move { axum::serve(listener, app).await });
    if let Some(addr) = config.listen {
        let tcp_app = api::app(
            state,
            true,
            (config.registrar == "local" && config.tcp_registrar).then(local_registrar),
        )
        .into_router();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        info!(%addr, "API listening on TCP (signed requests only)");
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, tcp_app).await {
                warn!("TCP API ended: {e}");
            }
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = unix => { r??; }
        _ = term.recv() => { info!("SIGTERM: the agent stops; VMs keep running"); }
        _ = tokio::signal::ctrl_c() => { info!("interrupted: the agent stops; VMs keep running"); }
    }
    Ok(())
}
