//! The TF Chain registrar against the real tfchain runtime (spec 144 under chopsticks, from
//! `../shared/tfchain`, started by each test on a free port and stopped after it): the SCALE
//! encoding of every call the node makes and the signing payload, registration (twin, node
//! with its capacity), a restart that finds the same ids, a capacity change, uptime reports,
//! clear errors (no funds, unknown farm, chain down), contracts deciding what the engine
//! admits and removes, and a chain stopped and restarted under a running agent.
//!
//! One test runs the agent's binary with VMs on this machine's /dev/kvm (the setup of
//! crash.rs, shared in `common`): a contract-backed deployment runs as a vmm process and the
//! contract's cancel removes it.
//!
//! Where ../shared/tfchain is missing the tests skip with a message, and fail where a chain is
//! required: in CI (`CI` set) or with `GRIDNODE_REQUIRE_TFCHAIN=1` (scripts/test.sh sets it).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use node_agent::api::{DeploymentStatus, NodeStatus};
use node_agent::capacity::Resources;
use node_agent::client::{Client, Endpoint};
use node_agent::config::AgentConfig;
use node_agent::deployment::{Deployment, FailurePolicy, Volume, Workload};
use node_agent::engine::{DeployError, Engine};
use node_agent::identity::{node_key_path, KeyPair};
use node_agent::metrics::Metrics;
use node_agent::registrar::tfchain::{self, ChainSigner, TfchainRegistrar};
use node_agent::registrar::{ContractUsage, Interface, Registrar, RegistrarError, UptimeReport};
use node_agent::state::Store;
use node_agent::uptime::{host_uptime, Registration};
use node_agent::usage::{Pass, ResourceReporter};
use subxt::dynamic::Value;

/// A chain under chopsticks, stopped (its process group) on drop.
struct Chain {
    child: Child,
    port: u16,
}

fn shared_tfchain() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/tfchain")
}

/// Whether a missing chain fails the test: in CI (`CI` set) and wherever
/// `GRIDNODE_REQUIRE_TFCHAIN` is set to anything but `0` or empty (scripts/test.sh sets it).
fn chain_required() -> bool {
    std::env::var_os("CI").is_some()
        || std::env::var("GRIDNODE_REQUIRE_TFCHAIN").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `None` (after a SKIP message) where ../shared/tfchain is missing, unless a chain is
/// required ([`chain_required`]): then the test fails, naming what is missing.
fn chain_or_skip(test: &str) -> Option<Chain> {
    if !shared_tfchain().join("start.sh").exists() {
        if chain_required() {
            panic!(
                "{test}: {} is missing; the TF Chain tests need ../shared/tfchain beside the \
                 clone (required here: CI or GRIDNODE_REQUIRE_TFCHAIN is set)",
                shared_tfchain().join("start.sh").display()
            );
        }
        eprintln!(
            "SKIP {test}: {} is missing",
            shared_tfchain().join("start.sh").display()
        );
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    Some(Chain::start(port))
}

impl Chain {
    fn start(port: u16) -> Chain {
        // One start at a time: the first one installs chopsticks into the cache, and two
        // installs at once would trip over each other.
        static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = STARTING.lock().unwrap_or_else(|e| e.into_inner());
        let mut child = Command::new("bash")
            .arg(shared_tfchain().join("start.sh"))
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("starting ../shared/tfchain/start.sh");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.contains("tfchain ready on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(600))
            .expect("the chain did not say it was ready");
        Chain { child, port }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return; // stopped already (its group id may be another's now)
        }
        // SAFETY: signalling the process group this test started.
        unsafe {
            libc::killpg(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        self.stop();
    }
}

/// 1 TFT has 7 decimals: 100 000 TFT.
const FUNDS: u128 = 100_000 * 10_000_000;

async fn fund(reg: &TfchainRegistrar, key: &KeyPair) {
    let alice = subxt_signer::sr25519::dev::alice();
    reg.submit_signed(
        &alice,
        &tfchain::transfer(&tfchain::account_of(&key.public()), FUNDS),
    )
    .await
    .expect("transfer from Alice");
}

/// A funded farmer twin with a farm; returns the farm id.
async fn farm(reg: &TfchainRegistrar, name: &str) -> u32 {
    let farmer = KeyPair::generate();
    fund(reg, &farmer).await;
    let twin = reg.create_twin(&farmer).await.unwrap();
    reg.create_farm(&farmer, twin.id, name).await.unwrap().id
}

fn capacity() -> Resources {
    Resources {
        cru: 4,
        mru: 8 << 30,
        sru: 200 << 30,
        hru: 0,
    }
}

fn registration(
    reg: Arc<TfchainRegistrar>,
    key: &KeyPair,
    store: Arc<Store>,
    farm_id: u32,
    capacity: Resources,
) -> Registration {
    Registration {
        config: AgentConfig {
            registrar: "tfchain".into(),
            farm_id,
            uptime_interval_secs: 2,
            ..Default::default()
        },
        key: key.clone(),
        registrar: reg,
        store,
        metrics: Arc::new(Metrics::default()),
        capacity,
    }
}

/// A node's side of a test: the registrar on the chain, a farm, the node's state store and
/// its funded key (not registered yet).
struct NodeSide {
    reg: Arc<TfchainRegistrar>,
    farm_id: u32,
    dir: tempfile::TempDir,
    store: Arc<Store>,
    node_key: KeyPair,
}

async fn node_side(chain: &Chain, farm_name: &str) -> NodeSide {
    let reg = Arc::new(TfchainRegistrar::new(vec![chain.url()]).unwrap());
    let farm_id = farm(&reg, farm_name).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("agent.db")).unwrap());
    let node_key = KeyPair::generate();
    fund(&reg, &node_key).await;
    NodeSide {
        reg,
        farm_id,
        dir,
        store,
        node_key,
    }
}

async fn nonce(reg: &TfchainRegistrar, key: &KeyPair) -> u64 {
    let api = reg.client().await.unwrap();
    api.tx()
        .account_nonce(&tfchain::account_of(&key.public()))
        .await
        .unwrap()
}

fn compact(n: u64, out: &mut Vec<u8>) {
    match n {
        0..=0x3f => out.push((n as u8) << 2),
        0x40..=0x3fff => out.extend_from_slice(&(((n as u16) << 2) | 1).to_le_bytes()),
        0x4000..=0x3fff_ffff => out.extend_from_slice(&(((n as u32) << 2) | 2).to_le_bytes()),
        _ => {
            let b = n.to_le_bytes();
            let len = 8 - b.iter().rev().take_while(|&&x| x == 0).count();
            out.push((((len - 4) as u8) << 2) | 3);
            out.extend_from_slice(&b[..len]);
        }
    }
}

fn vec_bytes(b: &[u8], out: &mut Vec<u8>) {
    compact(b.len() as u64, out);
    out.extend_from_slice(b);
}

#[tokio::test]
async fn call_encoding_and_signing_payload_match_the_chain() {
    let Some(chain) = chain_or_skip("call_encoding_and_signing_payload_match_the_chain") else {
        return;
    };
    let reg = TfchainRegistrar::new(vec![chain.url()]).unwrap();
    let api = reg.client().await.unwrap();
    let md = api.metadata();
    let index = |pallet: &str, call: &str| -> Vec<u8> {
        let p = md.pallet_by_name(pallet).unwrap();
        vec![p.index(), p.call_variant_by_name(call).unwrap().index]
    };
    let encoded = |c: &tfchain::DynamicCall| api.tx().call_data(c).unwrap();

    let info = node_agent::registrar::NodeInfo {
        farm_id: 3,
        capacity: capacity(),
        location: node_agent::config::Location {
            country: "Belgium".into(),
            city: "Ghent".into(),
            latitude: "51.05".into(),
            longitude: "3.72".into(),
        },
        interfaces: vec![node_agent::registrar::Interface {
            name: "eth0".into(),
            mac: "52:54:00:12:34:56".into(),
            ips: vec!["10.1.2.3".into(), "2001:db8::1".into()],
        }],
        serial_number: "SN1".into(),
        virtualized: true,
        secure_boot: true,
    };
    let node_body = |out: &mut Vec<u8>| {
        out.extend_from_slice(&3u32.to_le_bytes());
        let c = capacity();
        for v in [c.hru, c.sru, c.cru, c.mru] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for s in ["Ghent", "Belgium", "51.05", "3.72"] {
            vec_bytes(s.as_bytes(), out);
        }
        compact(1, out);
        vec_bytes(b"eth0", out);
        vec_bytes(b"52:54:00:12:34:56", out);
        compact(2, out);
        vec_bytes(b"10.1.2.3", out);
        vec_bytes(b"2001:db8::1", out);
        out.push(1); // secure_boot
        out.push(1); // virtualized
        out.push(1); // Some(serial)
        vec_bytes(b"SN1", out);
    };

    let mut cases: Vec<(&str, tfchain::DynamicCall, Vec<u8>)> = Vec::new();
    let mut e = index(tfchain::TFGRID, "user_accept_tc");
    vec_bytes(b"https://x", &mut e);
    vec_bytes(b"h", &mut e);
    cases.push(("userAcceptTc", tfchain::user_accept_tc("https://x", "h"), e));
    let mut e = index(tfchain::TFGRID, "create_twin");
    e.extend_from_slice(&[0, 0]);
    cases.push(("createTwin", tfchain::create_twin(None, None), e));
    let mut e = index(tfchain::TFGRID, "create_node");
    node_body(&mut e);
    cases.push(("createNode", tfchain::create_node(&info), e));
    let mut e = index(tfchain::TFGRID, "update_node");
    e.extend_from_slice(&9u32.to_le_bytes());
    node_body(&mut e);
    cases.push(("updateNode", tfchain::update_node(9, &info), e));
    let mut e = index(tfchain::TFGRID, "report_uptime_v2");
    e.extend_from_slice(&12345u64.to_le_bytes());
    e.extend_from_slice(&1_700_000_000u64.to_le_bytes());
    cases.push((
        "reportUptimeV2",
        tfchain::report_uptime_v2(12345, 1_700_000_000),
        e,
    ));
    let hash = [7u8; 32];
    let mut e = index(tfchain::CONTRACTS, "create_node_contract");
    e.extend_from_slice(&9u32.to_le_bytes());
    e.extend_from_slice(&hash);
    vec_bytes(b"d", &mut e);
    e.extend_from_slice(&0u32.to_le_bytes());
    e.push(0);
    cases.push((
        "createNodeContract",
        tfchain::create_node_contract(9, hash, b"d"),
        e,
    ));
    let mut e = index(tfchain::CONTRACTS, "update_node_contract");
    e.extend_from_slice(&5u64.to_le_bytes());
    e.extend_from_slice(&hash);
    vec_bytes(b"", &mut e);
    cases.push((
        "updateNodeContract",
        tfchain::update_node_contract(5, hash, b""),
        e,
    ));
    let mut e = index(tfchain::CONTRACTS, "cancel_contract");
    e.extend_from_slice(&5u64.to_le_bytes());
    cases.push(("cancelContract", tfchain::cancel_contract(5), e));
    let mut e = index(tfchain::CONTRACTS, "report_contract_resources");
    compact(2, &mut e);
    let usage = [
        ContractUsage {
            contract_id: 5,
            used: capacity(),
        },
        ContractUsage {
            contract_id: 70_000,
            used: Resources {
                cru: 1,
                mru: 256 << 20,
                sru: 0,
                hru: 3 << 30,
            },
        },
    ];
    for u in &usage {
        e.extend_from_slice(&u.contract_id.to_le_bytes());
        for v in [u.used.hru, u.used.sru, u.used.cru, u.used.mru] {
            e.extend_from_slice(&v.to_le_bytes());
        }
    }
    cases.push((
        "reportContractResources",
        tfchain::report_contract_resources(&usage),
        e,
    ));
    let mut e = index(tfchain::TFGRID, "create_farm");
    vec_bytes(b"f1", &mut e);
    compact(0, &mut e);
    cases.push(("createFarm", tfchain::create_farm("f1"), e));

    let key = KeyPair::from_seed([1; 32]);
    for (name, call, expect) in &cases {
        assert_eq!(&encoded(call), expect, "{name}: encoding");
        // The chain decodes the signed extrinsic and prices it (garbage would not decode).
        let signed = api
            .tx()
            .create_signed(
                call,
                &ChainSigner(&key),
                subxt::config::DefaultExtrinsicParamsBuilder::new().build(),
            )
            .await
            .unwrap();
        let fee = signed.partial_fee_estimate().await;
        assert!(fee.is_ok(), "{name}: the chain could not price it: {fee:?}");
    }

    // The signing payload: call data, then the extensions' values (era, nonce, tip), then
    // what they add implicitly (spec and tx versions, genesis hash, era's block hash), and
    // the signature is ed25519 over it (blake2-256 of it when longer than 256 bytes).
    let call = tfchain::report_uptime_v2(1, 2);
    let params = subxt::config::DefaultExtrinsicParamsBuilder::<subxt::PolkadotConfig>::new()
        .immortal()
        .nonce(3)
        .build();
    let mut partial = api
        .tx()
        .create_partial_offline(&call, params)
        .expect("partial");
    let payload = partial.signer_payload();
    let v = api.runtime_version();
    let mut expect = encoded(&call);
    expect.push(0); // immortal era
    compact(3, &mut expect); // nonce
    compact(0, &mut expect); // tip
    expect.extend_from_slice(&v.spec_version.to_le_bytes());
    expect.extend_from_slice(&v.transaction_version.to_le_bytes());
    expect.extend_from_slice(api.genesis_hash().as_ref());
    expect.extend_from_slice(api.genesis_hash().as_ref()); // immortal: genesis
    assert_eq!(payload, expect, "signing payload");
    let signed = partial.sign(&ChainSigner(&key));
    let bytes = signed.encoded();
    let sig_at = bytes
        .windows(64)
        .position(|w| w == key.sign(&payload))
        .expect("the extrinsic carries the ed25519 signature of the payload");
    // MultiSignature::Ed25519 is variant 0, right before the signature; the signer's
    // MultiAddress::Id (variant 0) and account (the public key) before that.
    assert_eq!(bytes[sig_at - 1], 0);
    assert_eq!(&bytes[sig_at - 33..sig_at - 1], key.public().as_bytes());

    // A payload over 256 bytes (a createNode with long fields) is signed as its blake2-256
    // hash, and the chain takes the signature (it prices the signed extrinsic).
    let mut long = info.clone();
    long.serial_number = "S".repeat(128);
    long.location.city = "C".repeat(58);
    let call = tfchain::create_node(&long);
    let params = subxt::config::DefaultExtrinsicParamsBuilder::<subxt::PolkadotConfig>::new()
        .immortal()
        .nonce(0)
        .build();
    let mut partial = api
        .tx()
        .create_partial_offline(&call, params)
        .expect("partial");
    let mut full = encoded(&call);
    full.push(0);
    compact(0, &mut full);
    compact(0, &mut full);
    full.extend_from_slice(&v.spec_version.to_le_bytes());
    full.extend_from_slice(&v.transaction_version.to_le_bytes());
    full.extend_from_slice(api.genesis_hash().as_ref());
    full.extend_from_slice(api.genesis_hash().as_ref());
    assert!(full.len() > 256, "{} bytes", full.len());
    let payload = partial.signer_payload();
    let hashed = blake2b_simd::Params::new()
        .hash_length(32)
        .hash(&full)
        .as_bytes()
        .to_vec();
    assert_eq!(
        payload, hashed,
        "a long payload is signed as its blake2-256 hash"
    );
    let signed = partial.sign(&ChainSigner(&key));
    assert!(
        signed.encoded().windows(64).any(|w| w == key.sign(&hashed)),
        "the extrinsic carries the signature of the hash"
    );
    let fee = signed.partial_fee_estimate().await;
    assert!(fee.is_ok(), "the chain could not price it: {fee:?}");
}

#[tokio::test]
async fn a_node_registers_finds_its_ids_updates_and_reports_uptime() {
    let Some(chain) = chain_or_skip("a_node_registers_finds_its_ids_updates_and_reports_uptime")
    else {
        return;
    };
    let reg = Arc::new(TfchainRegistrar::new(vec![chain.url()]).unwrap());
    let farm_id = farm(&reg, "farm_reg").await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("agent.db")).unwrap());
    let key = KeyPair::generate();

    // No funds: a clear refusal, nothing made.
    let err = registration(reg.clone(), &key, store.clone(), farm_id, capacity())
        .register()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RegistrarError::Refused(m) if m.contains("no funds")),
        "{err}"
    );
    fund(&reg, &key).await;

    // Unknown farm (after its twin is made).
    let err = registration(reg.clone(), &key, store.clone(), 999, capacity())
        .register()
        .await
        .unwrap_err();
    assert!(matches!(err, RegistrarError::UnknownFarm(999)), "{err}");

    // First registration: twin and node with the capacity given.
    let key = KeyPair::generate();
    fund(&reg, &key).await;
    let t0 = Instant::now();
    let (twin, node) = registration(reg.clone(), &key, store.clone(), farm_id, capacity())
        .register()
        .await
        .unwrap();
    let took = t0.elapsed();
    let extrinsics = nonce(&reg, &key).await;
    eprintln!(
        "BENCH registration: {} ms, {extrinsics} extrinsics (twin {twin}, node {node})",
        took.as_millis()
    );
    assert_eq!(extrinsics, 3, "userAcceptTc, createTwin, createNode");
    let on_chain = reg.node_by_twin(twin).await.unwrap().unwrap();
    assert_eq!(on_chain.id, node);
    assert_eq!(on_chain.info.capacity, capacity());
    assert_eq!(on_chain.info.farm_id, farm_id);
    // The chain holds what the node detected of this host: its physical interfaces with
    // their addresses (as iproute2 lists them), its serial number, virtualization and
    // Secure Boot.
    let detected = registration(reg.clone(), &key, store.clone(), farm_id, capacity())
        .node_info()
        .await;
    assert_eq!(on_chain.info, tfchain::as_stored(&detected));
    assert!(
        !detected.interfaces.is_empty(),
        "no physical interface found"
    );
    for i in &detected.interfaces {
        assert_eq!(i.ips, ip_addresses(&i.name), "{}", i.name);
    }
    assert_eq!(
        detected.virtualized,
        cpu_flags().contains(&"hypervisor".to_string())
    );
    if !std::path::Path::new("/sys/firmware/efi").exists() {
        assert!(
            !detected.secure_boot,
            "Secure Boot on a host booted without UEFI"
        );
    }

    // A restart finds the same ids and sends nothing.
    let again = registration(reg.clone(), &key, store.clone(), farm_id, capacity())
        .register()
        .await
        .unwrap();
    assert_eq!(again, (twin, node));
    assert_eq!(nonce(&reg, &key).await, 3, "a restart created something");

    // Capacity changed: one updateNode, same node.
    let mut more = capacity();
    more.cru = 8;
    let again = registration(reg.clone(), &key, store.clone(), farm_id, more)
        .register()
        .await
        .unwrap();
    assert_eq!(again, (twin, node));
    assert_eq!(nonce(&reg, &key).await, 4);
    assert_eq!(
        reg.node_by_twin(twin).await.unwrap().unwrap().info.capacity,
        more
    );

    // Location changed (the operator's config): one updateNode, the chain holds it.
    let mut moved = registration(reg.clone(), &key, store.clone(), farm_id, more);
    moved.config.location = node_agent::config::Location {
        country: "Belgium".into(),
        city: "Ghent".into(),
        latitude: "51.05".into(),
        longitude: "3.72".into(),
    };
    assert_eq!(moved.register().await.unwrap(), (twin, node));
    assert_eq!(
        nonce(&reg, &key).await,
        5,
        "one updateNode for the location"
    );
    assert_eq!(
        reg.node_by_twin(twin).await.unwrap().unwrap().info.location,
        moved.config.location
    );

    // Interfaces changed (an address more on the first, a new NIC with two): one updateNode;
    // the chain's `Nodes` holds every name, MAC and address; the same facts again send
    // nothing.
    let mut info = moved.node_info().await;
    if let Some(first) = info.interfaces.first_mut() {
        first.ips.push("198.51.100.9".into());
    }
    info.interfaces.push(Interface {
        name: "eth9".into(),
        mac: "52:54:00:ab:cd:ef".into(),
        ips: vec!["192.0.2.7".into(), "2001:db8::7".into()],
    });
    assert_eq!(moved.register_as(&info).await.unwrap(), (twin, node));
    assert_eq!(
        nonce(&reg, &key).await,
        6,
        "one updateNode for the interfaces"
    );
    let stored = reg.node_by_twin(twin).await.unwrap().unwrap();
    assert_eq!(stored.info, tfchain::as_stored(&info));
    assert_eq!(stored.info.interfaces, info.interfaces);
    let raw = reg
        .storage(tfchain::TFGRID, "Nodes", vec![Value::u128(node.into())])
        .await
        .unwrap()
        .unwrap();
    let mut held = Vec::new();
    tfchain::byte_strings(&raw, &mut held);
    for i in &info.interfaces {
        for text in std::iter::once(&i.name)
            .chain(std::iter::once(&i.mac))
            .chain(&i.ips)
        {
            assert!(held.contains(text), "{text} is not in Nodes: {held:?}");
        }
    }
    assert_eq!(moved.register_as(&info).await.unwrap(), (twin, node));
    assert_eq!(nonce(&reg, &key).await, 6, "the same facts sent again");

    // What the runtime would refuse is left out rather than failing the node: names with
    // other characters or lengths, MACs of another form, addresses that are none or have a
    // prefix, more than 10 interfaces or addresses, a serial number over 128 bytes.
    let odd = KeyPair::generate();
    fund(&reg, &odd).await;
    let odd_twin = reg.create_twin(&odd).await.unwrap().id;
    let mut hostile = info.clone();
    hostile.serial_number = "é".repeat(100);
    hostile.interfaces = ["Eth0", "e0", "br.100", "a-name-over-twenty-chars", "enp1s0"]
        .iter()
        .map(|n| Interface {
            name: n.to_string(),
            mac: "52:54:00:00:00:01".into(),
            ips: vec![],
        })
        .chain(
            ["5254.0012.3456", "zz:54:00:00:00:02", "52-54-00-00-00-03"]
                .iter()
                .map(|m| Interface {
                    name: "eth1".into(),
                    mac: m.to_string(),
                    ips: vec![],
                }),
        )
        .chain((0..12).map(|k| {
            Interface {
                name: format!("eth{}", k + 10),
                mac: format!("52:54:00:00:01:{k:02x}"),
                ips: ["10.0.0.1/24", "not-an-ip", "::1", "fe80::1%eth0"]
                    .iter()
                    .map(|s| s.to_string())
                    .chain((0..12).map(|j| format!("10.9.{k}.{j}")))
                    .collect(),
            }
        }))
        .collect();
    let kept = tfchain::as_stored(&hostile);
    assert_eq!(kept.serial_number.len(), 128);
    assert_eq!(kept.interfaces.len(), 10);
    assert_eq!(kept.interfaces[0].name, "enp1s0");
    assert!(kept.interfaces[1..]
        .iter()
        .all(|i| i.ips.len() == 10 && i.ips.iter().all(|ip| ip.starts_with("10.9."))));
    let n = reg.register_node(&odd, odd_twin, &hostile).await.unwrap();
    assert_eq!(n.info, kept);

    // Uptime: in a block with its NodeUptimeReported(node id, chain time, uptime) event,
    // whose fields say this node and the host's uptime (/proc/uptime, not the agent's).
    let send = |uptime: u64, timestamp: i64| {
        let (reg, key) = (reg.clone(), key.clone());
        async move {
            let event = reg
                .send_uptime(&key, &UptimeReport { uptime, timestamp })
                .await
                .unwrap()
                .expect("NodeUptimeReported(node_id, timestamp, uptime)");
            let seen = SeenUptime {
                block: 0,
                event,
                host_uptime: proc_uptime(),
                at: Instant::now(),
            };
            // The event's time is the chain's time of its block (the latest).
            assert_eq!(
                Some(event.timestamp as i64),
                reg.chain_time().await.unwrap(),
                "{event:?}"
            );
            seen
        }
    };
    let t0 = Instant::now();
    let fresh = send(host_uptime().unwrap(), node_agent::auth::now_unix()).await;
    eprintln!(
        "BENCH uptime report due -> in block with its event: {} ms",
        t0.elapsed().as_millis()
    );
    assert_eq!(fresh.event.node_id, node);
    assert_uptime_seen(&fresh);
    // A report that waited 10 minutes in the queue is brought to now and accepted: its uptime
    // is the host's now, and it grew by the time between the two reports (the minting rule).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let queued = send(
        host_uptime().unwrap() - 600,
        node_agent::auth::now_unix() - 600,
    )
    .await;
    assert_eq!(queued.event.node_id, node);
    assert_uptime_seen(&queued);
    assert_minting_rule(&fresh, &queued);
    // Through the Registrar trait (what the agent's uptime task calls).
    reg.report_uptime(
        &key,
        twin,
        node,
        &UptimeReport {
            uptime: host_uptime().unwrap(),
            timestamp: node_agent::auth::now_unix(),
        },
    )
    .await
    .unwrap();
    let up = host_uptime().unwrap();
    // A node the chain does not know cannot report: a refusal naming the reason.
    let stranger = KeyPair::generate();
    fund(&reg, &stranger).await;
    let err = reg
        .report_uptime(
            &stranger,
            0,
            0,
            &UptimeReport {
                uptime: up,
                timestamp: node_agent::auth::now_unix(),
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("TwinNotExists"), "{err}");

    // A chain that is down: unreachable (transient), on every endpoint.
    let down =
        TfchainRegistrar::new(vec!["ws://127.0.0.1:9".into(), "ws://127.0.0.1:1".into()]).unwrap();
    let err = down.twin(1).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    // Failover: a dead endpoint first, the live one second.
    let two = TfchainRegistrar::new(vec!["ws://127.0.0.1:9".into(), chain.url()]).unwrap();
    assert_eq!(
        two.twin(twin).await.unwrap().unwrap().public_key,
        key.public_hex()
    );
}

/// The addresses of interface `name` as `ip -o addr show dev NAME` lists them (no prefix
/// length, no IPv6 link-local), sorted.
fn ip_addresses(name: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "addr", "show", "dev", name])
        .output()
        .expect("iproute2's ip");
    assert!(out.status.success());
    let mut ips: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let family = f.nth(2)?;
            let addr = f.next()?.split('/').next()?.to_string();
            (family == "inet" || (family == "inet6" && !addr.starts_with("fe80:"))).then_some(addr)
        })
        .collect();
    ips.sort();
    ips
}

/// The CPU's flags (`/proc/cpuinfo`).
fn cpu_flags() -> Vec<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// The host's uptime now, with a fraction (`/proc/uptime`).
fn proc_uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Two reports of one node, as the test saw their blocks: the uptime grew by the time between
/// them (the grid's minting allows 60 s; here 5 s). The time is the test's clock when it
/// learned each block exists, not the events' timestamps: on a real chain a block comes every slot (6 s) and
/// its time is the wall clock's, but chopsticks adds one slot to the chain's time per block it
/// builds (at once, on each extrinsic), so its clock runs ahead of the wall clock.
fn assert_minting_rule(a: &SeenUptime, b: &SeenUptime) {
    let d_uptime = b.event.uptime as f64 - a.event.uptime as f64;
    let d_time = b.at.duration_since(a.at).as_secs_f64();
    assert!(
        (d_uptime - d_time).abs() <= 5.0,
        "uptime grew {d_uptime} s in {d_time:.1} s: {a:?} then {b:?}"
    );
}

/// A report as read from its block: the uptime is the host's when the test learned the block
/// exists (within 5 s).
fn assert_uptime_seen(e: &SeenUptime) {
    assert!(
        (e.event.uptime as f64 - e.host_uptime).abs() <= 5.0,
        "reported uptime {} s, the host's {:.1} s: {e:?}",
        e.event.uptime,
        e.host_uptime
    );
}

/// A `NodeUptimeReported` event as the test saw it: its block, its fields, and the host's
/// uptime and the test's clock when the test learned the block exists.
#[derive(Debug, Clone, Copy)]
struct SeenUptime {
    block: u64,
    event: tfchain::UptimeReported,
    host_uptime: f64,
    at: Instant,
}

fn deployment(twin_id: u32, id: u64, metadata: &str) -> Deployment {
    // No VM boots here (no image, no vmm): the workload is kept as failed, so an admitted
    // deployment stays in the node's state.
    common::unbootable_deployment(twin_id, id, 1, metadata, FailurePolicy::Keep)
}

/// A user twin (ed25519 key, funded) creates a node contract for `doc` on `node`.
async fn contract_for(reg: &TfchainRegistrar, user: &KeyPair, node: u32, doc: &Deployment) -> u64 {
    let hash = doc.contract_hash();
    reg.submit(user, &tfchain::create_node_contract(node, hash, b""))
        .await
        .unwrap();
    let v = reg
        .storage(
            tfchain::CONTRACTS,
            "ContractIDByNodeIDAndHash",
            vec![Value::u128(node.into()), Value::from_bytes(hash)],
        )
        .await
        .unwrap()
        .unwrap();
    tfchain::num(&v).unwrap() as u64
}

async fn user(reg: &TfchainRegistrar) -> (KeyPair, u32) {
    let k = KeyPair::generate();
    fund(reg, &k).await;
    let t = reg.create_twin(&k).await.unwrap();
    (k, t.id)
}

/// A dev account (`//Alice`, `//Bob`: sr25519, funded in the chain's genesis) as a twin: its
/// key (from the secret URI, as a key file holds it) and its twin id.
async fn dev_twin(reg: &TfchainRegistrar, uri: &str) -> (KeyPair, u32) {
    let k = KeyPair::parse(&format!("sr25519:{uri}")).unwrap();
    let t = reg.create_twin(&k).await.unwrap();
    assert_eq!(t.public_key, k.public_hex());
    (k, t.id)
}

fn engine(reg: Arc<TfchainRegistrar>, store: Arc<Store>, dir: &std::path::Path) -> Engine {
    Engine::new(
        store,
        AgentConfig {
            state_dir: dir.to_path_buf(),
            registrar: "tfchain".into(),
            ..Default::default()
        },
        reg,
        Arc::new(Metrics::default()),
        capacity(),
    )
}

fn forbidden(r: Result<impl std::fmt::Debug, DeployError>, why: &str) {
    match r {
        Err(DeployError::Forbidden(m)) => assert!(m.contains(why), "{m}"),
        other => panic!("expected a refusal ({why}), got {other:?}"),
    }
}

#[tokio::test]
async fn contracts_decide_what_the_node_runs() {
    let Some(chain) = chain_or_skip("contracts_decide_what_the_node_runs") else {
        return;
    };
    let NodeSide {
        reg,
        farm_id,
        dir,
        store,
        node_key,
    } = node_side(&chain, "farm_contracts").await;
    let (_, node) = registration(reg.clone(), &node_key, store.clone(), farm_id, capacity())
        .register()
        .await
        .unwrap();
    // Another node on the farm.
    let other_node_key = KeyPair::generate();
    fund(&reg, &other_node_key).await;
    let other_dir = tempfile::tempdir().unwrap();
    let other_store = Arc::new(Store::open(&other_dir.path().join("agent.db")).unwrap());
    let (_, other_node) = registration(
        reg.clone(),
        &other_node_key,
        other_store,
        farm_id,
        capacity(),
    )
    .register()
    .await
    .unwrap();
    let eng = engine(reg.clone(), store.clone(), dir.path());
    let (alice_k, alice) = user(&reg).await;
    let (bob_k, bob) = user(&reg).await;

    // Without a contract id: refused.
    let mut d = deployment(alice, 1, "no contract");
    d.sign(alice, &alice_k);
    match eng.deploy(alice, d).await {
        Err(DeployError::BadRequest(m)) => assert!(m.contains("contract_id"), "{m}"),
        other => panic!("{other:?}"),
    }

    // A contract holding the deployment's hash: admitted.
    let mut good = deployment(alice, 1, "good");
    let cid = contract_for(&reg, &alice_k, node, &good).await;
    good.contract_id = Some(cid);
    good.sign(alice, &alice_k);
    let out = eng.deploy(alice, good.clone()).await.unwrap();
    assert_eq!(out.deployment_id, 1);
    assert_eq!(store.deployments(None).unwrap().len(), 1);

    // Wrong hash: the contract is for another document.
    let mut wrong = deployment(alice, 2, "wrong");
    let other_doc = deployment(alice, 2, "what the contract says");
    wrong.contract_id = Some(contract_for(&reg, &alice_k, node, &other_doc).await);
    wrong.sign(alice, &alice_k);
    forbidden(eng.deploy(alice, wrong).await, "holds deployment hash");

    // A contract for another node.
    let mut elsewhere = deployment(alice, 3, "elsewhere");
    let elsewhere_cid = contract_for(&reg, &alice_k, other_node, &elsewhere).await;
    elsewhere.contract_id = Some(elsewhere_cid);
    elsewhere.sign(alice, &alice_k);
    forbidden(eng.deploy(alice, elsewhere).await, "is for node");

    // A resources report naming the other node's contract beside this node's own: the pallet
    // refuses the whole extrinsic for the one it will not take from this node; the node's
    // own contract is still taken (the contracts are then reported one by one).
    set_tft_price(&chain, 50).await;
    let used = Resources {
        cru: 1,
        mru: 1 << 30,
        sru: 2 << 30,
        hru: 0,
    };
    let taken = reg
        .report_contract_resources(
            &node_key,
            &[
                ContractUsage {
                    contract_id: cid,
                    used,
                },
                ContractUsage {
                    contract_id: elsewhere_cid,
                    used,
                },
            ],
        )
        .await
        .unwrap();
    assert_eq!(taken, vec![cid]);
    assert_eq!(reg.contract_resources(cid).await.unwrap(), Some(used));
    assert_eq!(reg.contract_resources(elsewhere_cid).await.unwrap(), None);
    // Alone, the other node's contract is an error naming the pallet's reason.
    let err = reg
        .report_contract_resources(
            &node_key,
            &[ContractUsage {
                contract_id: elsewhere_cid,
                used,
            }],
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("NodeNotAuthorizedToComputeReport"),
        "{err}"
    );

    // A cancelled contract.
    let mut cancelled = deployment(alice, 4, "cancelled");
    let c = contract_for(&reg, &alice_k, node, &cancelled).await;
    reg.submit(&alice_k, &tfchain::cancel_contract(c))
        .await
        .unwrap();
    cancelled.contract_id = Some(c);
    cancelled.sign(alice, &alice_k);
    forbidden(eng.deploy(alice, cancelled).await, "does not exist");

    // Signed by another twin: Bob's key under Alice's id (Alice's key on the chain is
    // her account), and Alice's deployment on Bob's contract.
    let mut forged = deployment(alice, 5, "forged");
    forged.contract_id = Some(contract_for(&reg, &alice_k, node, &forged).await);
    forged.sign(alice, &bob_k);
    forbidden(
        eng.deploy(alice, forged).await,
        "no valid signature of the owner",
    );
    let mut bobs = deployment(alice, 6, "bob pays");
    bobs.contract_id = Some(contract_for(&reg, &bob_k, node, &bobs).await);
    bobs.sign(alice, &alice_k);
    forbidden(eng.deploy(alice, bobs).await, "belongs to twin");
    let _ = bob;

    // An update needs the contract updated to the new hash first.
    let mut v2 = good.clone();
    v2.version = 2;
    v2.metadata = "good v2".into();
    v2.signatures.clear();
    v2.sign(alice, &alice_k);
    forbidden(eng.deploy(alice, v2.clone()).await, "updateNodeContract");
    reg.submit(
        &alice_k,
        &tfchain::update_node_contract(cid, v2.contract_hash(), b""),
    )
    .await
    .unwrap();
    assert_eq!(eng.deploy(alice, v2).await.unwrap().version, 2);

    // The contract poll keeps it while the contract is active, removes it once cancelled.
    eng.check_contracts().await;
    assert_eq!(store.deployments(None).unwrap().len(), 1);
    reg.submit(&alice_k, &tfchain::cancel_contract(cid))
        .await
        .unwrap();
    eng.check_contracts().await;
    assert!(store.deployments(None).unwrap().is_empty());
    assert!(store.vms(None).unwrap().is_empty());
}

/// Sets the TFT price (mUSD) the runtime bills with, as the chain's price oracle would
/// (chopsticks' `dev_setStorage`): the test chain's genesis has none, and billing a contract
/// with reported resources at a price of 0 panics in the runtime (division by zero in
/// `calculate_contract_cost_tft`), so that block is never built.
async fn set_tft_price(chain: &Chain, musd: u32) {
    let rpc = subxt::backend::rpc::RpcClient::from_insecure_url(chain.url())
        .await
        .expect("RPC client");
    let prices = serde_json::json!({
        "TFTPriceModule": {
            "TftPrice": musd,
            "AverageTftPrice": musd,
            "MinTftPrice": 10,
            "MaxTftPrice": 1000,
        }
    });
    let _: serde_json::Value = rpc
        .request(
            "dev_setStorage",
            subxt::ext::subxt_rpcs::rpc_params![prices],
        )
        .await
        .expect("dev_setStorage");
}

/// Waits (up to 120 s) until `f` gives `Some`.
async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t0 = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A deployment of one VM with 2 vCPUs, 512 MiB, a 64 MiB rootfs and a 1 GiB volume.
fn sized_deployment(twin_id: u32, id: u64, metadata: &str) -> Deployment {
    let mut d = deployment(twin_id, id, metadata);
    let Workload::Vm(vm) = &mut d.workloads[0] else {
        unreachable!()
    };
    vm.vcpus = 2;
    vm.memory_mib = 512;
    vm.rootfs_mib = 64;
    vm.volumes = vec![Volume {
        name: "data".into(),
        size_mib: 1024,
        mount: "/data".into(),
    }];
    d
}

/// What the chain must hold for [`sized_deployment`]: threads and bytes.
fn sized_usage() -> Resources {
    Resources {
        cru: 2,
        mru: 512 << 20,
        sru: (64 + 1024) << 20,
        hru: 0,
    }
}

#[tokio::test]
async fn contract_resources_are_reported_on_admission_update_and_timer() {
    let Some(chain) =
        chain_or_skip("contract_resources_are_reported_on_admission_update_and_timer")
    else {
        return;
    };
    let NodeSide {
        reg,
        farm_id,
        dir,
        store,
        node_key,
    } = node_side(&chain, "farm_resources").await;
    registration(reg.clone(), &node_key, store.clone(), farm_id, capacity())
        .register()
        .await
        .unwrap();
    let node: u32 = store.meta("node_id").unwrap().unwrap().parse().unwrap();
    let eng = Arc::new(engine(reg.clone(), store.clone(), dir.path()));
    // The agent's reporter, with a timer far away: what it sends here, it sends on change.
    let task = tokio::spawn(
        ResourceReporter::new(eng.clone(), node_key.clone(), Duration::from_secs(3600)).run(),
    );
    let (alice_k, alice) = user(&reg).await;

    // Admitted: the contract's resources are on the chain, in the runtime's units (bytes).
    let mut d = sized_deployment(alice, 1, "resources");
    let cid = contract_for(&reg, &alice_k, node, &d).await;
    d.contract_id = Some(cid);
    d.sign(alice, &alice_k);
    assert_eq!(reg.contract_resources(cid).await.unwrap(), None);
    eng.deploy(alice, d.clone()).await.unwrap();
    let t0 = Instant::now();
    let got = until(
        "the admitted deployment's resources on the chain",
        || async {
            reg.contract_resources(cid)
                .await
                .unwrap()
                .filter(|r| *r == sized_usage())
        },
    )
    .await;
    eprintln!(
        "BENCH deployment admitted -> its contract's resources in a block (read back): {} ms",
        t0.elapsed().as_millis()
    );
    assert_eq!(got, sized_usage());

    // Updated (2 GiB of memory, 4 vCPUs; the contract updated to the new hash first): the
    // new usage is reported at once.
    let mut v2 = d.clone();
    v2.version = 2;
    v2.metadata = "resources v2".into();
    let Workload::Vm(vm) = &mut v2.workloads[0] else {
        unreachable!()
    };
    vm.vcpus = 4;
    vm.memory_mib = 2048;
    v2.signatures.clear();
    v2.sign(alice, &alice_k);
    reg.submit(
        &alice_k,
        &tfchain::update_node_contract(cid, v2.contract_hash(), b""),
    )
    .await
    .unwrap();
    eng.deploy(alice, v2).await.unwrap();
    let bigger = Resources {
        cru: 4,
        mru: 2 << 30,
        ..sized_usage()
    };
    until("the updated usage on the chain", || async {
        reg.contract_resources(cid)
            .await
            .unwrap()
            .filter(|r| *r == bigger)
    })
    .await;
    // (The reporter counts a report once its extrinsic's events are back, which may be
    // after the storage already shows it.)
    until("both reports counted", || async {
        (eng.metrics.resource_reports_sent.load(Ordering::Relaxed) >= 2).then_some(())
    })
    .await;
    task.abort();
    assert!(eng.metrics.registrar_error().is_none());

    // One pass at a time: an agent that starts reports everything; then only what changed
    // (nothing); the timer's full pass everything again, each in a block.
    let mut r = ResourceReporter::new(eng.clone(), node_key.clone(), Duration::from_secs(3600));
    let t0 = Instant::now();
    let pass = r.report(false).await.unwrap();
    eprintln!(
        "BENCH reportContractResources (1 contract) submit -> in block with its event: {} ms",
        t0.elapsed().as_millis()
    );
    let one = vec![ContractUsage {
        contract_id: cid,
        used: bigger,
    }];
    let reported = |taken: Vec<ContractUsage>| Pass::Reported {
        taken,
        skipped: vec![],
    };
    assert_eq!(pass, reported(one.clone()));
    assert_eq!(r.report(false).await.unwrap(), reported(vec![]));
    assert_eq!(r.report(true).await.unwrap(), reported(one));

    // A contract cancelled on the chain (billed for the resources reported): its resources
    // are gone there, and the report the node still sends for it (its deployment not yet
    // removed) is skipped, not an error.
    set_tft_price(&chain, 50).await;
    reg.submit(&alice_k, &tfchain::cancel_contract(cid))
        .await
        .unwrap();
    assert_eq!(reg.contract_resources(cid).await.unwrap(), None);
    assert_eq!(
        r.report(true).await.unwrap(),
        Pass::Reported {
            taken: vec![],
            skipped: vec![cid]
        }
    );
    assert_eq!(reg.contract_resources(cid).await.unwrap(), None);

    // A node that is not registered yet sends nothing (and is not an error).
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = Arc::new(Store::open(&dir2.path().join("agent.db")).unwrap());
    let eng2 = Arc::new(engine(reg.clone(), store2, dir2.path()));
    let mut r2 = ResourceReporter::new(eng2, KeyPair::generate(), Duration::from_secs(3600));
    assert_eq!(r2.report(true).await.unwrap(), Pass::NotRegistered);
}

/// The chain is down when a deployment's usage is due: the report is kept (retried with
/// backoff, the error in the health) and reaches the chain once it is back. chopsticks keeps no
/// state, so the chain comes back from its genesis and the test makes again what the node had
/// (the same accounts in the same order get the same ids: node, twins, contract).
#[tokio::test]
async fn a_resources_report_the_chain_missed_is_sent_when_it_is_back() {
    let Some(mut chain) =
        chain_or_skip("a_resources_report_the_chain_missed_is_sent_when_it_is_back")
    else {
        return;
    };
    let reg = Arc::new(TfchainRegistrar::new(vec![chain.url()]).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("agent.db")).unwrap());
    let node_key = KeyPair::generate();
    let alice_k = KeyPair::generate();
    // The same setup on each chain: a farm, the node, Alice's twin and her contract.
    let setup = |d: Deployment| {
        let (reg, store, node_key, alice_k) = (
            reg.clone(),
            store.clone(),
            node_key.clone(),
            alice_k.clone(),
        );
        async move {
            let farm_id = farm(&reg, "farm_missed").await;
            fund(&reg, &node_key).await;
            let (_, node) = registration(reg.clone(), &node_key, store, farm_id, capacity())
                .register()
                .await
                .unwrap();
            fund(&reg, &alice_k).await;
            let alice = reg.create_twin(&alice_k).await.unwrap().id;
            let mut d = Deployment {
                twin_id: alice,
                ..d
            };
            let cid = contract_for(&reg, &alice_k, node, &d).await;
            d.contract_id = Some(cid);
            d.sign(alice, &alice_k);
            d
        }
    };
    let d = setup(sized_deployment(0, 1, "missed")).await;
    let cid = d.contract_id.unwrap();
    let eng = Arc::new(engine(reg.clone(), store.clone(), dir.path()));
    eng.deploy(d.twin_id, d.clone()).await.unwrap();

    // The chain goes away before the reporter sends it.
    chain.stop();
    let task = tokio::spawn(
        ResourceReporter::new(eng.clone(), node_key.clone(), Duration::from_secs(3600)).run(),
    );
    let health = until("the failed report in the health", || async {
        eng.metrics
            .registrar_error()
            .filter(|e| e.contains("contract resources"))
    })
    .await;
    eprintln!("health while the chain is down: {health}");
    assert!(eng.metrics.resource_report_errors.load(Ordering::Relaxed) >= 1);

    // Back (from genesis): the same node, twin and contract ids again; the kept report lands.
    let chain = Chain::start(chain.port);
    let t0 = Instant::now();
    let again = setup(sized_deployment(0, 1, "missed")).await;
    assert_eq!(
        again.contract_id,
        Some(cid),
        "the replayed setup got other ids"
    );
    assert_eq!(again.contract_hash(), d.contract_hash());
    until("the owed resources report on the chain", || async {
        reg.contract_resources(cid)
            .await
            .ok()
            .flatten()
            .filter(|r| *r == sized_usage())
    })
    .await;
    eprintln!(
        "BENCH chain back -> owed resources report in block: {} ms (includes remaking the node and contract)",
        t0.elapsed().as_millis()
    );
    until("the health clear again", || async {
        eng.metrics.registrar_error().is_none().then_some(())
    })
    .await;
    task.abort();
    drop(chain);
}

/// The agent's binary with `--capacity`: a node whose offered SSD is below the runtime's
/// minimum is refused with an error (log and health) that names the fix; with the override
/// the node registers and the chain holds exactly the capacity given.
#[tokio::test]
async fn the_operator_capacity_override_is_what_the_node_registers() {
    let Some(chain) = chain_or_skip("the_operator_capacity_override_is_what_the_node_registers")
    else {
        return;
    };
    let reg = TfchainRegistrar::new(vec![chain.url()]).unwrap();
    let farm_id = farm(&reg, "farm_override").await;
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate();
    key.save_new(&dir.path().join("node.key")).unwrap();
    fund(&reg, &key).await;
    let account = tfchain::account_of(&key.public());
    let run_agent = |capacity: &str, log: &str| {
        Command::new(env!("CARGO_BIN_EXE_node-agent"))
            .args(["run", "--state-dir"])
            .arg(dir.path())
            .args(["--chain", &chain.url(), "--farm-id", &farm_id.to_string()])
            .args(["--capacity", capacity])
            .env("NO_COLOR", "1")
            .stderr(std::fs::File::create(dir.path().join(log)).unwrap())
            .spawn()
            .unwrap()
    };
    let status = |sock: PathBuf| async move {
        let c = Client::new(Endpoint::Unix(sock));
        let resp = c.request("GET", "/node", None).await.ok()?;
        resp.json::<NodeStatus>().ok()
    };
    let sock = dir.path().join("agent.sock");

    // 50 GiB of SSD: the chain refuses it; the health and the log say why and how to fix it.
    let mut agent = run_agent("cru=2,mru=4G,sru=50G,hru=1T", "agent1.log");
    let err = until("the refusal in the health", || async {
        status(sock.clone())
            .await
            .and_then(|s| s.registrar_error)
            .filter(|e| e.contains("InvalidSRUInput"))
    })
    .await;
    let _ = agent.kill();
    let _ = agent.wait();
    eprintln!("health: {err}");
    assert!(err.contains("--capacity sru=100G"), "{err}");
    assert!(
        err.contains("50.0 GiB") && err.contains("100.0 GiB"),
        "{err}"
    );
    let log = std::fs::read_to_string(dir.path().join("agent1.log")).unwrap();
    assert!(log.contains("--capacity sru=100G"), "{log}");
    let twin = reg.twin_id_of(&account).await.unwrap().expect("its twin");
    assert!(reg.node_by_twin(twin).await.unwrap().is_none());

    // With the override: registered, with exactly that capacity.
    let mut agent = run_agent("cru=2,mru=4G,sru=150G,hru=1T", "agent2.log");
    let node = until("the node on the chain", || async {
        reg.node_by_twin(twin).await.unwrap()
    })
    .await;
    let s = until("registered in the health", || async {
        status(sock.clone()).await.filter(|s| s.registered)
    })
    .await;
    let _ = agent.kill();
    let _ = agent.wait();
    let want = Resources {
        cru: 2,
        mru: 4 << 30,
        sru: 150 << 30,
        hru: 1 << 40,
    };
    assert_eq!(node.info.capacity, want);
    assert_eq!(s.capacity_total, want);
    assert_eq!(s.node_id, Some(node.id));
    assert!(s.registrar_error.is_none(), "{:?}", s.registrar_error);
}

/// The agent's binary on the chain, its VMs on this machine's /dev/kvm (crash.rs's vmm setup:
/// the `chatter` test guest as kernel, an flist made by the real `flist` binary as root): a
/// user twin of a dev account (`//Bob`, sr25519, funded in the chain's genesis) makes a node
/// contract holding a deployment's hash; the CLI signs the deployment and its API requests
/// with Bob's key file (`sr25519://Bob`) and the deployment runs as a vmm process; the contract
/// cancelled on the chain, the agent's contract poll removes the deployment: the API no longer
/// lists it and its vmm process is gone.
#[tokio::test]
async fn a_contract_backed_deployment_runs_as_a_vm_until_its_contract_is_cancelled() {
    if !e2e_tests::kvm_available() {
        return;
    }
    let Some(chain) =
        chain_or_skip("a_contract_backed_deployment_runs_as_a_vm_until_its_contract_is_cancelled")
    else {
        return;
    };
    let reg = TfchainRegistrar::new(vec![chain.url()]).unwrap();
    // The contract gets resources reported (at admission) and is billed at its cancel: the
    // chain needs a TFT price for that (see set_tft_price).
    set_tft_price(&chain, 50).await;
    let farm_id = farm(&reg, "farm_vm").await;
    let mut node = common::Node::new();
    // The node's key, made here to fund its account before the agent starts.
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(node.state())
            .unwrap();
    }
    let node_key = KeyPair::generate();
    node_key.save_new(&node_key_path(&node.state())).unwrap();
    fund(&reg, &node_key).await;
    let args: Vec<String> = [
        "--registrar",
        "tfchain",
        "--chain",
        &chain.url(),
        "--farm-id",
        &farm_id.to_string(),
        // What the chain accepts for a node (this host's SSD may be under its minimum).
        "--capacity",
        "cru=2,mru=4G,sru=150G,hru=1T",
        "--contract-poll",
        "1",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    node.start_with(None, &args);
    let unsigned = Client::new(Endpoint::Unix(node.sock()));
    let status = until("the agent's node registered on the chain", || async {
        let resp = unsigned.request("GET", "/node", None).await.ok()?;
        resp.json::<NodeStatus>().ok().filter(|s| s.registered)
    })
    .await;
    let node_id = status.node_id.expect("a registered node has its id");

    // Bob's node contract holds the deployment's hash; the deployment names it.
    let (bob_k, bob) = dev_twin(&reg, "//Bob").await;
    let mut d = common::vm_deployment(bob, 1, &node.image(), &["vm"]);
    let cid = contract_for(&reg, &bob_k, node_id, &d).await;
    d.contract_id = Some(cid);
    // The CLI signs it (sr25519, the signature names its type) and sends it with signed
    // requests (a GET of the deployment, then the POST).
    let key_file = node.dir.path().join("bob.key");
    std::fs::write(&key_file, "sr25519://Bob\n").unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let doc_file = node.dir.path().join("deployment.json");
    std::fs::write(&doc_file, serde_json::to_vec(&d).unwrap()).unwrap();
    let t0 = Instant::now();
    let out = tokio::process::Command::new(common::built("node-agent"))
        .arg("deploy")
        .arg(&doc_file)
        .arg("--key")
        .arg(&key_file)
        .args(["--twin", &bob.to_string(), "--agent"])
        .arg(node.sock())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "node-agent deploy: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let api = node.client(&bob_k, bob);
    let stored: DeploymentStatus = api
        .request("GET", "/deployments/1", None)
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        stored.deployment.signatures[0].signature_type,
        node_agent::identity::SignatureType::Sr25519
    );
    let s = until("the VM running in the API with its vmm process", || async {
        let r = api.request("GET", "/deployments/1", None).await.ok()?;
        let s: DeploymentStatus = r.json().ok()?;
        (common::running(&s, &["vm"]) && node.vmms(bob, "vm").len() == 1).then_some(s)
    })
    .await;
    let deployed = t0.elapsed();
    assert_eq!(s.deployment.contract_id, Some(cid));
    assert_eq!(
        s.vms[0].pid,
        node.vmms(bob, "vm").first().copied(),
        "the API tracks the vmm that runs the VM"
    );
    // The agent reported what the contract uses (so its cancel bills it).
    until("the contract's resources reported on the chain", || async {
        reg.contract_resources(cid).await.ok().flatten()
    })
    .await;

    // Cancelled on the chain: the agent removes the deployment and its VM.
    let t1 = Instant::now();
    reg.submit(&bob_k, &tfchain::cancel_contract(cid))
        .await
        .unwrap();
    let in_block = t1.elapsed();
    let t2 = Instant::now();
    until(
        "the API to stop listing the deployment after its contract was cancelled",
        || async {
            let r = api.request("GET", "/deployments", None).await.ok()?;
            let list: Vec<DeploymentStatus> = r.json().ok()?;
            list.is_empty().then_some(())
        },
    )
    .await;
    until(
        "the VM's vmm process to end and its data to be removed after its contract was cancelled",
        || async {
            let data = node.state().join(format!("vms/{bob}/1"));
            (node.vmms(bob, "vm").is_empty() && !data.exists()).then_some(())
        },
    )
    .await;
    let gone = t2.elapsed();
    let r = api.request("GET", "/deployments/1", None).await.unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    eprintln!(
        "BENCH deploy (contract-backed, through the API) -> VM running with its vmm: {} ms",
        deployed.as_millis()
    );
    eprintln!(
        "BENCH cancelContract in block: {} ms; then -> deployment removed and its vmm gone (--contract-poll 1): {} ms",
        in_block.as_millis(),
        gone.as_millis()
    );
}

/// The agent's binary with a node account that has no funds and a farm id no farm has yet:
/// the log and the health say so (the account by its address, the farm by its id, and what
/// to do), the agent keeps answering its API and retries; once the account is funded it
/// makes its twin and stops at the unknown farm; once that farm exists it registers. Its
/// funds gone later, its uptime reports are kept and retried, named the same way, until it is
/// funded again.
#[tokio::test]
async fn an_unfunded_node_of_an_unknown_farm_says_why_and_registers_once_both_are_fixed() {
    let Some(chain) = chain_or_skip(
        "an_unfunded_node_of_an_unknown_farm_says_why_and_registers_once_both_are_fixed",
    ) else {
        return;
    };
    let reg = TfchainRegistrar::new(vec![chain.url()]).unwrap();
    // The farm the node names is the next one made (farm ids are given in turn).
    let first = farm(&reg, "farm_before").await;
    let farm_id = first + 1;
    assert!(reg.farm(farm_id).await.unwrap().is_none());
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate();
    key.save_new(&dir.path().join("node.key")).unwrap();
    let account = tfchain::account_of(&key.public());
    let log = dir.path().join("agent.log");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_node-agent"))
        .args(["run", "--state-dir"])
        .arg(dir.path())
        .args(["--chain", &chain.url(), "--farm-id", &farm_id.to_string()])
        .args(["--capacity", "cru=2,mru=4G,sru=150G,hru=1T"])
        .args(["--uptime-interval", "3"])
        .env("NO_COLOR", "1")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let sock = dir.path().join("agent.sock");
    let status = || async {
        let c = Client::new(Endpoint::Unix(sock.clone()));
        let resp = c.request("GET", "/node", None).await.ok()?;
        resp.json::<NodeStatus>().ok()
    };
    let failures = |what: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("registration failed") && l.contains(what))
            .count()
    };

    // No funds: named with the account, twice at least (it retries), nothing on the chain.
    let err = until("the health naming the unfunded account", || async {
        status()
            .await
            .and_then(|s| s.registrar_error)
            .filter(|e| e.contains("no funds") && e.contains(&account.to_string()))
    })
    .await;
    eprintln!("health, no funds: {err}");
    until("a retry of the unfunded registration", || async {
        (failures("no funds") >= 2).then_some(())
    })
    .await;
    assert!(agent.try_wait().unwrap().is_none(), "the agent ended");
    let s = status().await.expect("the agent answers");
    assert!(
        !s.registered && s.node_id.is_none(),
        "{}",
        serde_json::to_string(&s).unwrap()
    );
    assert!(reg.twin_id_of(&account).await.unwrap().is_none());

    // Funded: its twin is made; the farm is unknown, by its id, twice at least.
    fund(&reg, &key).await;
    let err = until("the health naming the unknown farm", || async {
        status()
            .await
            .and_then(|s| s.registrar_error)
            .filter(|e| e.contains(&format!("unknown farm {farm_id}")))
    })
    .await;
    eprintln!("health, unknown farm: {err}");
    assert!(err.contains("--farm-id"), "{err}");
    until("a retry with the unknown farm", || async {
        (failures(&format!("unknown farm {farm_id}")) >= 2).then_some(())
    })
    .await;
    assert!(agent.try_wait().unwrap().is_none(), "the agent ended");
    let twin = reg
        .twin_id_of(&account)
        .await
        .unwrap()
        .expect("the node's twin, made once funded");
    assert!(reg.node_by_twin(twin).await.unwrap().is_none());

    // The farm made: the node registers on it; the health clears.
    assert_eq!(farm(&reg, "farm_later").await, farm_id);
    let t0 = Instant::now();
    let s = until("registered in the health", || async {
        status()
            .await
            .filter(|s| s.registered && s.registrar_error.is_none())
    })
    .await;
    eprintln!(
        "registered {} ms after the farm was made",
        t0.elapsed().as_millis()
    );
    let node = reg.node_by_twin(twin).await.unwrap().expect("its node");
    assert_eq!(s.node_id, Some(node.id));
    assert_eq!(node.info.farm_id, farm_id);

    // Its funds gone later (all sent away): its uptime reports are refused for fees, named
    // with the account, kept and retried; funded again, the owed reports land.
    until("an uptime report sent", || async {
        status()
            .await
            .filter(|s| s.uptime_reports_pending == 0 && s.registrar_error.is_none())
            .map(|_| ())
    })
    .await;
    let drain = subxt::dynamic::tx(
        "Balances",
        "transfer_all",
        vec![
            Value::unnamed_variant(
                "Id",
                [Value::from_bytes(
                    subxt_signer::sr25519::dev::alice().public_key().0,
                )],
            ),
            Value::bool(false),
        ],
    );
    // The agent signs with the same account: a submission that takes its nonce is retried.
    until("the node's funds sent away", || async {
        reg.submit(&key, &drain).await.ok()
    })
    .await;
    let err = until("the health naming the unfunded account again", || async {
        status().await.and_then(|s| s.registrar_error).filter(|e| {
            e.contains("uptime report")
                && e.contains("no funds")
                && e.contains(&account.to_string())
        })
    })
    .await;
    eprintln!("health, funds gone: {err}");
    until("uptime reports kept", || async {
        status().await.filter(|s| s.uptime_reports_pending >= 2)
    })
    .await;
    assert!(agent.try_wait().unwrap().is_none(), "the agent ended");
    fund(&reg, &key).await;
    let t0 = Instant::now();
    until("the owed reports sent and the health clear", || async {
        status()
            .await
            .filter(|s| s.uptime_reports_pending == 0 && s.registrar_error.is_none())
            .map(|_| ())
    })
    .await;
    eprintln!(
        "owed uptime reports sent {} ms after funding again",
        t0.elapsed().as_millis()
    );
    let _ = agent.kill();
    let _ = agent.wait();
}

#[tokio::test]
async fn the_agent_keeps_workloads_while_the_chain_restarts_and_sends_what_it_owed() {
    let Some(mut chain) =
        chain_or_skip("the_agent_keeps_workloads_while_the_chain_restarts_and_sends_what_it_owed")
    else {
        return;
    };
    let NodeSide {
        reg,
        farm_id,
        dir,
        store,
        node_key,
    } = node_side(&chain, "farm_restart").await;
    let registration = registration(reg.clone(), &node_key, store.clone(), farm_id, capacity());
    let metrics = registration.metrics.clone();
    let eng = engine(reg.clone(), store.clone(), dir.path());
    let agent = tokio::spawn(registration.run());
    let wait = |what: &'static str, cond: Box<dyn Fn() -> bool>| async move {
        let t0 = Instant::now();
        while !cond() {
            assert!(t0.elapsed() < Duration::from_secs(120), "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let m = metrics.clone();
    wait(
        "first uptime report",
        Box::new(move || m.uptime_reports_sent.load(Ordering::Relaxed) >= 1),
    )
    .await;
    let node: u32 = store.meta("node_id").unwrap().unwrap().parse().unwrap();

    // A workload paid by a contract.
    let (alice_k, alice) = user(&reg).await;
    let mut d = deployment(alice, 1, "kept");
    d.contract_id = Some(contract_for(&reg, &alice_k, node, &d).await);
    d.sign(alice, &alice_k);
    eng.deploy(alice, d).await.unwrap();

    // The chain goes away: the workload stays, reports queue up, the health says why.
    chain.stop();
    eng.check_contracts().await;
    assert_eq!(store.deployments(None).unwrap().len(), 1);
    let s = store.clone();
    wait(
        "a report owed while the chain is down",
        Box::new(move || !s.pending_uptime().unwrap().is_empty()),
    )
    .await;
    let m = metrics.clone();
    wait(
        "the error in the health",
        Box::new(move || m.registrar_error().is_some()),
    )
    .await;
    eprintln!(
        "health while the chain is down: {:?}",
        metrics.registrar_error()
    );
    assert_eq!(store.deployments(None).unwrap().len(), 1);

    // The chain is back (a fresh chain from its genesis, as chopsticks keeps no state): the
    // node is funded again by the activation service, reconnects, registers again and
    // sends what it owed.
    let sent = metrics.uptime_reports_sent.load(Ordering::Relaxed);
    let mut chain = Chain::start(chain.port);
    let t0 = Instant::now();
    farm(&reg, "farm_restart").await;
    fund(&reg, &node_key).await;
    let s = store.clone();
    let m = metrics.clone();
    wait(
        "the owed report sent",
        Box::new(move || {
            s.pending_uptime().unwrap().is_empty()
                && m.uptime_reports_sent.load(Ordering::Relaxed) > sent
        }),
    )
    .await;
    eprintln!(
        "BENCH chain back -> owed report in block: {} ms",
        t0.elapsed().as_millis()
    );
    assert!(metrics.registrar_error().is_none());
    assert_eq!(store.deployments(None).unwrap().len(), 1);
    agent.abort();
    chain.stop();
}

/// A TCP proxy on a local port in front of the chain: `cut` closes its listener and every
/// connection through it (the chain is unreachable there: connections refused, the open ones
/// gone), `restore` listens on the same port again. Counts the connections it took.
struct Proxy {
    port: u16,
    target: u16,
    accept: Option<tokio::task::JoinHandle<()>>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl Proxy {
    async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut p = Proxy {
            port: listener.local_addr().unwrap().port(),
            target,
            accept: None,
            conns: Default::default(),
            accepted: Default::default(),
        };
        p.serve(listener);
        p
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (target, conns, accepted) = (self.target, self.conns.clone(), self.accepted.clone());
        self.accept = Some(tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::Relaxed);
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns.lock().unwrap().push(conn);
            }
        }));
    }

    /// Connections open through it now.
    fn live(&self) -> usize {
        let mut conns = self.conns.lock().unwrap();
        conns.retain(|c| !c.is_finished());
        conns.len()
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    fn cut(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    async fn restore(&mut self) {
        let t0 = Instant::now();
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(t0.elapsed() < Duration::from_secs(30), "rebinding: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        self.serve(listener);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// What a [`BadEndpoint`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Answer {
    /// The chain's answers, relayed message by message.
    Chain = 0,
    /// The chain's answers with every result (and subscription item) replaced by bytes that
    /// are no SCALE value of its type: a JSON-RPC peer that serves garbage data.
    BadResults = 1,
    /// A WebSocket peer that answers every message with text that is not JSON.
    NotJson = 2,
    /// Not even WebSocket: a line of nonsense on every connection, then it hangs up.
    Nonsense = 3,
}

/// A WebSocket endpoint in front of the chain (messages relayed one by one) that can be
/// switched to answer garbage ([`Answer`]); a switch takes effect at once on the open
/// connections too (`Nonsense` closes them).
struct BadEndpoint {
    port: u16,
    answer: Arc<std::sync::atomic::AtomicU8>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl BadEndpoint {
    async fn start(chain_port: u16) -> BadEndpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let answer = Arc::new(std::sync::atomic::AtomicU8::new(Answer::Chain as u8));
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Default::default();
        let (a, c) = (answer.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let a = a.clone();
                c.lock()
                    .unwrap()
                    .push(tokio::spawn(Self::serve(inbound, chain_port, a)));
            }
        });
        BadEndpoint {
            port,
            answer,
            conns,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    fn set(&self, a: Answer) {
        self.answer.store(a as u8, Ordering::Relaxed);
        if a == Answer::Nonsense {
            for c in self.conns.lock().unwrap().drain(..) {
                c.abort();
            }
        }
    }

    async fn serve(
        mut inbound: tokio::net::TcpStream,
        chain_port: u16,
        answer: Arc<std::sync::atomic::AtomicU8>,
    ) {
        use tokio::io::AsyncWriteExt;
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let now = || answer.load(Ordering::Relaxed);
        if now() == Answer::Nonsense as u8 {
            let _ = inbound
                .write_all(b"SSH-2.0-nothing-like-a-chain \x00\xff\r\n")
                .await;
            return;
        }
        let mut server = soketto::handshake::Server::new(inbound.compat());
        let Ok(req) = server.receive_request().await else {
            return;
        };
        let accept = soketto::handshake::server::Response::Accept {
            key: req.key(),
            protocol: None,
        };
        if server.send_response(&accept).await.is_err() {
            return;
        }
        let (to_node, mut from_node) = server.into_builder().finish();
        let to_node = Arc::new(tokio::sync::Mutex::new(to_node));
        let Ok(out) = tokio::net::TcpStream::connect(("127.0.0.1", chain_port)).await else {
            return;
        };
        let host = format!("127.0.0.1:{chain_port}");
        let mut client = soketto::handshake::Client::new(out.compat(), &host, "/");
        if !matches!(
            client.handshake().await,
            Ok(soketto::handshake::ServerResponse::Accepted { .. })
        ) {
            return;
        }
        let (mut to_chain, mut from_chain) = client.into_builder().finish();
        let back = to_node.clone();
        let answer2 = answer.clone();
        let down = tokio::spawn(async move {
            let mut msg = Vec::new();
            loop {
                msg.clear();
                if from_chain.receive_data(&mut msg).await.is_err() {
                    return;
                }
                let mut text = String::from_utf8_lossy(&msg).into_owned();
                if answer2.load(Ordering::Relaxed) == Answer::BadResults as u8 {
                    text = garble(&text);
                }
                let mut tx = back.lock().await;
                if tx.send_text_owned(text).await.is_err() || tx.flush().await.is_err() {
                    return;
                }
            }
        });
        let mut msg = Vec::new();
        loop {
            msg.clear();
            if from_node.receive_data(&mut msg).await.is_err() {
                break;
            }
            if now() == Answer::NotJson as u8 {
                let mut tx = to_node.lock().await;
                if tx.send_text("}{ not JSON-RPC at all").await.is_err()
                    || tx.flush().await.is_err()
                {
                    break;
                }
                continue;
            }
            let text = String::from_utf8_lossy(&msg).into_owned();
            if to_chain.send_text_owned(text).await.is_err() || to_chain.flush().await.is_err() {
                break;
            }
        }
        down.abort();
    }
}

/// A chain's JSON-RPC message with its result (or a subscription item's result) replaced by
/// `0xdeadbeef`: a hash, metadata, a storage value or a header that does not decode.
fn garble(text: &str) -> String {
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(text) else {
        return text.to_string();
    };
    let bad = serde_json::Value::String("0xdeadbeef".into());
    if let Some(r) = v.get_mut("result") {
        *r = bad;
    } else if let Some(r) = v.get_mut("params").and_then(|p| p.get_mut("result")) {
        *r = bad;
    }
    v.to_string()
}

impl Drop for BadEndpoint {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

/// Endpoints that answer garbage under the agent's binary with a VM running on this machine's
/// /dev/kvm (`--chain BAD --chain GOOD`, the good one down at first): the bad endpoint relays
/// the chain while the agent registers and Bob's VM starts, then answers in turn garbage
/// results (valid JSON-RPC, data that does not decode), text that is not JSON, and bytes
/// that are not WebSocket. Each time the health (and the log) names the bad endpoint and what
/// it answered, the VM keeps its vmm process and the contract poll keeps the deployment; then
/// the good endpoint comes up and the agent fails over to it: an uptime report lands, the
/// health clears, the VM is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answering_garbage_is_named_and_the_agent_fails_over_keeping_its_vm() {
    if !e2e_tests::kvm_available() {
        return;
    }
    let Some(chain) = chain_or_skip(
        "an_endpoint_answering_garbage_is_named_and_the_agent_fails_over_keeping_its_vm",
    ) else {
        return;
    };
    let reg = TfchainRegistrar::new(vec![chain.url()]).unwrap();
    set_tft_price(&chain, 50).await;
    let farm_id = farm(&reg, "farm_garbage").await;
    let watcher = UptimeWatcher::start(chain.url()).await;
    let bad = BadEndpoint::start(chain.port).await;
    let mut good = Proxy::start(chain.port).await;
    good.cut();
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("agent.log");
    let agent = VmAgent::start(
        &reg,
        farm_id,
        &[bad.url(), good.url()],
        &watcher,
        Some(log.clone()),
    )
    .await;

    for (answer, says) in [
        (Answer::BadResults, tfchain::NOT_CHAIN_DATA),
        (Answer::NotJson, tfchain::NOT_JSON_RPC),
        (Answer::Nonsense, tfchain::NOT_WEBSOCKET),
    ] {
        bad.set(answer);
        let t0 = Instant::now();
        let health = until(
            &format!("the health naming the bad endpoint ({answer:?})"),
            || async {
                agent
                    .status()
                    .await
                    .and_then(|s| s.registrar_error)
                    .filter(|e| e.contains(&bad.url()) && e.contains(says))
            },
        )
        .await;
        eprintln!(
            "health {} ms after the endpoint answers {answer:?}: {health}",
            t0.elapsed().as_millis()
        );
        agent.assert_vm_kept().await;
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("chain endpoint unusable") && l.contains(&bad.url())),
        "the log does not name the bad endpoint:\n{text}"
    );

    // The good endpoint comes up: the next report lands through it, the health clears.
    let seen = watcher.latest().await;
    good.restore().await;
    let up_at = Instant::now();
    let next = until("an uptime report through the good endpoint", || async {
        watcher
            .of(agent.node_id, seen + 1, u64::MAX)
            .first()
            .copied()
    })
    .await;
    assert!(
        good.live() > 0,
        "the report did not come through the good endpoint"
    );
    assert_uptime_seen(&next);
    until("the health clear", || async {
        agent
            .status()
            .await
            .filter(|s| s.registrar_error.is_none())
            .map(|_| ())
    })
    .await;
    eprintln!(
        "BENCH good endpoint up -> uptime report in a block through it: {} ms",
        next.at.duration_since(up_at).as_millis()
    );
    agent.assert_vm_kept().await;
}

/// Reads every block of the chain as it is made, straight from the chain (not through the
/// proxies), and keeps its `NodeUptimeReported` events. Ends with the chain.
struct UptimeWatcher {
    seen: Arc<std::sync::Mutex<Vec<SeenUptime>>>,
    /// The last block read.
    read: Arc<std::sync::atomic::AtomicU64>,
    rpc: subxt::backend::rpc::RpcClient,
}

/// The number of the chain's best block (`chain_getHeader`): blocks are read as soon as they
/// are made, not once finalized (chopsticks finalizes a block only when it builds the next).
async fn best_block(rpc: &subxt::backend::rpc::RpcClient) -> Option<u64> {
    let header: serde_json::Value = rpc
        .request("chain_getHeader", subxt::ext::subxt_rpcs::rpc_params![])
        .await
        .ok()?;
    let n = header.get("number")?.as_str()?.trim_start_matches("0x");
    u64::from_str_radix(n, 16).ok()
}

impl UptimeWatcher {
    async fn start(url: String) -> UptimeWatcher {
        let api = tfchain::Client::from_insecure_url(&url).await.unwrap();
        let rpc = subxt::backend::rpc::RpcClient::from_insecure_url(&url)
            .await
            .unwrap();
        let w = UptimeWatcher {
            seen: Default::default(),
            read: Default::default(),
            rpc: rpc.clone(),
        };
        let (seen, read) = (w.seen.clone(), w.read.clone());
        tokio::spawn(async move {
            let mut next = 1u64;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                // A failed read (a busy machine) is tried again; the watcher ends with the
                // test's runtime.
                let Some(latest) = best_block(&rpc).await else {
                    continue;
                };
                // The blocks up to `latest` exist by now: the host's uptime and the clock
                // here bound their making (later reads of their events may lag).
                let (host_uptime, at) = (proc_uptime(), Instant::now());
                while next <= latest {
                    let Ok(hash) = rpc
                        .request::<subxt::utils::H256>(
                            "chain_getBlockHash",
                            subxt::ext::subxt_rpcs::rpc_params![next],
                        )
                        .await
                    else {
                        break;
                    };
                    let Ok(events) = api.events().at(hash).await else {
                        break;
                    };
                    for e in events.iter().flatten() {
                        if e.pallet_name() == tfchain::TFGRID
                            && e.variant_name() == "NodeUptimeReported"
                        {
                            let event =
                                tfchain::UptimeReported::from_fields(&e.field_values().unwrap())
                                    .expect("NodeUptimeReported(node_id, timestamp, uptime)");
                            seen.lock().unwrap().push(SeenUptime {
                                block: next,
                                event,
                                host_uptime,
                                at,
                            });
                        }
                    }
                    read.store(next, Ordering::Relaxed);
                    next += 1;
                }
            }
        });
        w
    }

    /// The chain's latest block, once the watcher has read it.
    async fn latest(&self) -> u64 {
        let n = best_block(&self.rpc).await.expect("the chain's best block");
        until("the watcher to read the chain's latest block", || async {
            (self.read.load(Ordering::Relaxed) >= n).then_some(n)
        })
        .await
    }

    /// `node`'s reports in blocks `from..=to`.
    fn of(&self, node: u32, from: u64, to: u64) -> Vec<SeenUptime> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.event.node_id == node && (from..=to).contains(&e.block))
            .copied()
            .collect()
    }
}

/// The agent's binary on the chain's `endpoints` (`--chain` each, in that order; contract
/// poll every second, uptime every 4 s) with a VM on this machine's /dev/kvm: Bob's (dev
/// account `//Bob`, sr25519) deployment paid by his node contract, running in one vmm
/// process, an uptime report of the node in a block and the health clear. The agent's log
/// goes to `log` when given. Dropping it stops the agent and its VMs.
struct VmAgent {
    node: common::Node,
    node_id: u32,
    /// The VM's vmm process.
    pid: i32,
    bob: u32,
    bob_k: KeyPair,
}

impl VmAgent {
    async fn start(
        reg: &TfchainRegistrar,
        farm_id: u32,
        endpoints: &[String],
        watcher: &UptimeWatcher,
        log: Option<PathBuf>,
    ) -> VmAgent {
        let mut node = common::Node::new();
        if let Some(log) = log {
            node.log_to(log);
        }
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(node.state())
                .unwrap();
        }
        let node_key = KeyPair::generate();
        node_key.save_new(&node_key_path(&node.state())).unwrap();
        fund(reg, &node_key).await;
        let mut args: Vec<String> = vec!["--registrar".into(), "tfchain".into()];
        for e in endpoints {
            args.extend(["--chain".to_string(), e.clone()]);
        }
        args.extend(
            [
                "--farm-id",
                &farm_id.to_string(),
                "--capacity",
                "cru=2,mru=4G,sru=150G,hru=1T",
                "--contract-poll",
                "1",
                "--uptime-interval",
                "4",
            ]
            .iter()
            .map(|a| a.to_string()),
        );
        node.start_with(None, &args);
        let operator = Client::new(Endpoint::Unix(node.sock()));
        let status = || async {
            let resp = operator.request("GET", "/node", None).await.ok()?;
            resp.json::<NodeStatus>().ok()
        };
        let node_id = until("the agent's node registered on the chain", || async {
            status()
                .await
                .filter(|s| s.registered)
                .and_then(|s| s.node_id)
        })
        .await;

        // Bob's VM runs, paid by his contract.
        let (bob_k, bob) = dev_twin(reg, "//Bob").await;
        let mut d = common::vm_deployment(bob, 1, &node.image(), &["vm"]);
        d.contract_id = Some(contract_for(reg, &bob_k, node_id, &d).await);
        d.sign(bob, &bob_k);
        let api = node.client(&bob_k, bob);
        let resp = api
            .request(
                "POST",
                "/deployments",
                Some(serde_json::to_vec(&d).unwrap()),
            )
            .await
            .unwrap();
        assert!(resp.ok(), "deploy refused: {} {}", resp.status, resp.text());
        let pid = until("the VM running with its vmm process", || async {
            let r = api.request("GET", "/deployments/1", None).await.ok()?;
            let s: DeploymentStatus = r.json().ok()?;
            let vmms = node.vmms(bob, "vm");
            (common::running(&s, &["vm"]) && vmms.len() == 1 && s.vms[0].pid == Some(vmms[0]))
                .then_some(vmms[0])
        })
        .await;
        until("an uptime report of the node", || async {
            watcher.of(node_id, 0, u64::MAX).last().copied()
        })
        .await;
        until("the health clear", || async {
            status()
                .await
                .filter(|s| s.registrar_error.is_none())
                .map(|_| ())
        })
        .await;
        VmAgent {
            node,
            node_id,
            pid,
            bob,
            bob_k,
        }
    }

    /// The node's health as the operator's API gives it.
    async fn status(&self) -> Option<NodeStatus> {
        let operator = Client::new(Endpoint::Unix(self.node.sock()));
        let resp = operator.request("GET", "/node", None).await.ok()?;
        resp.json::<NodeStatus>().ok()
    }

    /// Bob's client of the agent's API.
    fn api(&self) -> Client {
        self.node.client(&self.bob_k, self.bob)
    }

    /// The VM runs in the vmm process it started in, and the agent says so.
    async fn assert_vm_kept(&self) {
        assert_eq!(
            self.node.vmms(self.bob, "vm"),
            vec![self.pid],
            "the VM's vmm process changed"
        );
        let s = self.status().await.expect("the agent answers");
        assert_eq!(s.workloads, 1, "the deployment is kept");
    }
}

/// The chain cut off under the agent's binary with a VM running on this machine's /dev/kvm,
/// through two TCP proxies in front of one chain (its two endpoints, `--chain A --chain B`):
///
/// - outage (both endpoints cut): the VM keeps running in the same vmm process, the contract
///   poll (every second) keeps the deployment, uptime reports queue up, the health names the
///   failing tasks, and a twin's signed API request is refused as unavailable (its key is on
///   the chain), not as unauthorized;
/// - restored: the queued reports land, each with its `NodeUptimeReported` event naming this
///   node and the host's uptime (/proc/uptime, ±5 s), the uptime growing with the chain time
///   between reports (the minting rule); the health clears; same VM process;
/// - failover: the endpoint the agent is connected through dies for good mid-run; the next
///   report lands through the other one, and the health is clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_keeps_its_vm_through_a_chain_outage_then_fails_over() {
    if !e2e_tests::kvm_available() {
        return;
    }
    let Some(chain) =
        chain_or_skip("the_agent_keeps_its_vm_through_a_chain_outage_then_fails_over")
    else {
        return;
    };
    let reg = TfchainRegistrar::new(vec![chain.url()]).unwrap();
    set_tft_price(&chain, 50).await;
    let farm_id = farm(&reg, "farm_outage").await;
    let watcher = UptimeWatcher::start(chain.url()).await;
    let mut proxies = [
        Proxy::start(chain.port).await,
        Proxy::start(chain.port).await,
    ];
    let agent = VmAgent::start(
        &reg,
        farm_id,
        &[proxies[0].url(), proxies[1].url()],
        &watcher,
        None,
    )
    .await;
    let (node_id, pid, bob) = (agent.node_id, agent.pid, agent.bob);
    let (node, api) = (&agent.node, agent.api());
    let status = || agent.status();
    let ours = |from: u64, to: u64| watcher.of(node_id, from, to);

    // Outage: both endpoints cut (what the agent had sent by then is in a block within a
    // moment: the chain makes a block for each extrinsic at once).
    for p in &mut proxies {
        p.cut();
    }
    let cut_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cut_block = watcher.latest().await;
    let before = *ours(0, cut_block).last().unwrap();
    let down = until(
        "reports queued and the health naming the uptime report and the contract check",
        || async {
            status().await.filter(|s| {
                s.uptime_reports_pending >= 2
                    && s.registrar_error.as_deref().is_some_and(|e| {
                        e.contains("uptime report") && e.contains("contract check")
                    })
            })
        },
    )
    .await;
    eprintln!(
        "health {} s into the outage: {:?} ({} reports queued)",
        cut_at.elapsed().as_secs(),
        down.registrar_error,
        down.uptime_reports_pending
    );
    assert_eq!(down.workloads, 1, "the contract poll kept the deployment");
    assert_eq!(
        node.vmms(bob, "vm"),
        vec![pid],
        "the VM's vmm process changed"
    );
    let r = api.request("GET", "/deployments/1", None).await.unwrap();
    assert_eq!(
        r.status,
        503,
        "a twin's request while its key cannot be read: {}",
        r.text()
    );
    assert_eq!(
        watcher.latest().await,
        cut_block,
        "something reached the chain while it was cut off"
    );

    // Restored: the queued reports land, the health clears, the VM is the same.
    let owed = status().await.unwrap().uptime_reports_pending;
    for p in &mut proxies {
        p.restore().await;
    }
    let restored_at = Instant::now();
    until("the queue empty and the health clear", || async {
        status()
            .await
            .filter(|s| s.uptime_reports_pending == 0 && s.registrar_error.is_none())
            .map(|_| ())
    })
    .await;
    let landed = ours(cut_block + 1, u64::MAX);
    assert!(
        landed.len() >= owed,
        "{owed} reports were owed, {} landed: {landed:?}",
        landed.len()
    );
    eprintln!(
        "BENCH chain back -> {} owed uptime reports in blocks: {} ms (first after {} ms)",
        landed.len(),
        restored_at.elapsed().as_millis(),
        landed[0].at.duration_since(restored_at).as_millis()
    );
    let mut prev = before;
    for e in &landed {
        assert_uptime_seen(e);
        assert_minting_rule(&prev, e);
        prev = *e;
    }
    assert_eq!(
        node.vmms(bob, "vm"),
        vec![pid],
        "the VM's vmm process changed"
    );
    let r = api.request("GET", "/deployments/1", None).await.unwrap();
    let s: DeploymentStatus = r.json().unwrap();
    assert!(
        common::running(&s, &["vm"]) && s.vms[0].pid == Some(pid),
        "{}",
        serde_json::to_string(&s).unwrap()
    );

    // Failover: the endpoint in use dies for good; the other one carries the next report.
    let in_use = until("the agent connected through one endpoint", || async {
        match (proxies[0].live() > 0, proxies[1].live() > 0) {
            (true, false) => Some(0),
            (false, true) => Some(1),
            _ => None,
        }
    })
    .await;
    let other = 1 - in_use;
    let accepted = proxies[other].accepted();
    proxies[in_use].cut();
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed_block = watcher.latest().await;
    let prev = *ours(0, killed_block).last().unwrap();
    let next = until("an uptime report through the other endpoint", || async {
        ours(killed_block + 1, u64::MAX).first().copied()
    })
    .await;
    assert!(
        proxies[other].accepted() > accepted && proxies[other].live() > 0,
        "the report did not come through endpoint {other}"
    );
    assert_uptime_seen(&next);
    assert_minting_rule(&prev, &next);
    eprintln!(
        "BENCH endpoint {in_use} killed -> next uptime report in a block through endpoint {other}: {} ms",
        next.at.duration_since(killed_at).as_millis()
    );
    until("the health clear after the failover", || async {
        status()
            .await
            .filter(|s| s.registrar_error.is_none())
            .map(|_| ())
    })
    .await;
    assert_eq!(
        node.vmms(bob, "vm"),
        vec![pid],
        "the VM's vmm process changed"
    );
}

/// Seconds since midnight of a log line's RFC 3339 timestamp (`2026-12-03T14:50:39.711939Z ...`).
fn log_time(line: &str) -> Option<f64> {
    let t = line
        .split_whitespace()
        .next()?
        .split('T')
        .nth(1)?
        .trim_end_matches('Z');
    let mut parts = t.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The agent's binary from start to registered on a fresh chain (with `--capacity`: this host's
/// own disk may be under the chain's minimum for a node), the extrinsics registration took,
/// its memory with the chain client, and how long its uptime reports take from due (the
/// agent's timer, `--uptime-interval 5`) to in a block with their event, from the agent's log
/// (`cargo test -p node-agent --test tfchain -- --ignored --nocapture bench_`;
/// GRIDNODE_AGENT_BIN=target/release/node-agent measures a release build).
#[tokio::test]
#[ignore = "benchmark"]
async fn bench_agent_start_to_registered() {
    let Some(chain) = chain_or_skip("bench_agent_start_to_registered") else {
        return;
    };
    let reg = TfchainRegistrar::new(vec![chain.url()]).unwrap();
    let farm_id = farm(&reg, "farm_bench").await;
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate();
    key.save_new(&dir.path().join("node.key")).unwrap();
    fund(&reg, &key).await;
    let bin = std::env::var("GRIDNODE_AGENT_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_node-agent").to_string());
    let log = dir.path().join("agent.log");
    let t0 = Instant::now();
    let mut agent = Command::new(&bin)
        .args(["run", "--state-dir"])
        .arg(dir.path())
        .args(["--chain", &chain.url(), "--farm-id", &farm_id.to_string()])
        .args(["--capacity", "cru=2,mru=4G,sru=150G,hru=1T"])
        .args(["--uptime-interval", "5"])
        .env("GRIDNODE_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let account = tfchain::account_of(&key.public());
    let rss = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let node = until("the agent's node on the chain", || async {
        let twin = reg.twin_id_of(&account).await.ok()??;
        reg.node_by_twin(twin).await.ok()?
    })
    .await;
    let took = t0.elapsed();
    let rss_registered = rss(agent.id());
    // Three more reports, 5 s apart.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let rss_later = rss(agent.id());
    let _ = agent.kill();
    let _ = agent.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let mut due = None;
    let mut latencies = Vec::new();
    for line in text.lines() {
        if line.contains("uptime report due") {
            due = log_time(line);
        } else if line.contains("uptime report in a block") {
            if let (Some(d), Some(t)) = (due.take(), log_time(line)) {
                latencies.push(((t - d).rem_euclid(86_400.0) * 1000.0).round() as u64);
            }
        }
    }
    let nonce = nonce(&reg, &key).await;
    let reports = text.matches("uptime report in a block").count() as u64;
    assert!(latencies.len() >= 3, "too few reports; log:\n{text}");
    eprintln!(
        "BENCH {bin}: start -> node {} on the chain: {} ms; registration: {} extrinsics; \
         RSS {rss_registered} KiB registered, {rss_later} KiB after {reports} uptime reports; \
         uptime report due -> in a block with its event (ms): {latencies:?}",
        node.id,
        took.as_millis(),
        nonce - reports,
    );
}
