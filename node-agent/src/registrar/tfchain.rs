//! TF Chain as the registrar: twins, farms and nodes in `tfgridModule`, node contracts in
//! `smartContractModule`, reached with subxt over WebSocket.
//!
//! Calls and storage are dynamic: their names and types come from the metadata the chain
//! serves when the client connects (metadata v14 and later), never from a file of ours. The
//! node's ed25519 key is its chain account (`MultiSignature::Ed25519`, the account id is the
//! public key); a user twin's key may be sr25519 too (`MultiSignature::Sr25519`). Several
//! endpoints: a call that cannot reach the current one, or gets an answer that is not a
//! chain's (not WebSocket, not JSON-RPC, data that does not decode as the metadata says),
//! drops its connection and the next call connects to the next endpoint in turn; callers
//! (registration, the uptime queue, the contract poll) retry with their own backoff. Every
//! error names the endpoint.
//!
//! A write succeeds only once its extrinsic is in a block and did not fail (its events are
//! read); a dispatch error is named by the pallet and error from the metadata
//! (`TfgridModule::FarmNotExists`), a transaction the pool refuses (no funds for fees, bad
//! nonce) is a refusal (no funds names the account), a lost connection or a timeout is
//! `Unreachable` (transient), an answer that is not a chain's is `Garbage`.
//!
//! What a node says of itself is bounded as the runtime bounds it ([`as_stored`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use subxt::dynamic::{At, Value};
use subxt::tx::TxStatus;
use subxt::utils::{AccountId32, MultiSignature};
use subxt::{OnlineClient, PolkadotConfig};
use tracing::{info, warn};

use super::*;
use crate::identity::SignatureType;

pub type Client = OnlineClient<PolkadotConfig>;
pub type DynamicCall = subxt::tx::DynamicPayload;

/// Pallet names in the runtime's metadata.
pub const TFGRID: &str = "TfgridModule";
pub const CONTRACTS: &str = "SmartContractModule";

/// How long one connection attempt, one read, or one extrinsic (submit to in-block) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(20);
const TX_TIMEOUT: Duration = Duration::from_secs(60);

/// Contracts per `reportContractResources` extrinsic.
const RESOURCE_REPORT_BATCH: usize = 64;

/// The terms and conditions the node accepts before it makes its twin.
pub const TC_LINK: &str = "https://library.threefold.me/info/legal/#/";
pub const TC_HASH: &str = "gridnode-node-agent";

/// Signs extrinsics with a key of ours (the node's ed25519 key, or a user twin's ed25519 or
/// sr25519 key): the signature is the `MultiSignature` variant of the key's scheme.
pub struct ChainSigner<'a>(pub &'a KeyPair);

impl subxt::tx::Signer<PolkadotConfig> for ChainSigner<'_> {
    fn account_id(&self) -> AccountId32 {
        AccountId32(self.0.public().to_bytes())
    }
    fn sign(&self, signer_payload: &[u8]) -> MultiSignature {
        let sig = self.0.sign(signer_payload);
        match self.0.scheme() {
            SignatureType::Ed25519 => MultiSignature::Ed25519(sig),
            SignatureType::Sr25519 => MultiSignature::Sr25519(sig),
        }
    }
}

/// The chain account of a key (its public key, whatever its scheme).
pub fn account_of(key: &PublicKey) -> AccountId32 {
    AccountId32(key.to_bytes())
}

/// State of a contract on the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContractState {
    Created,
    /// Cancelled by its owner or ended by the chain (the variant's cause).
    Deleted(String),
    /// Out of funds since this block: the chain cancels it when the grace period ends.
    GracePeriod(u64),
}

/// A node contract as the chain holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeContract {
    pub contract_id: u64,
    pub twin_id: TwinId,
    pub node_id: NodeId,
    pub deployment_hash: [u8; 32],
    pub state: ContractState,
}

pub struct TfchainRegistrar {
    urls: Vec<String>,
    /// The connected client, if any (dropped when a call finds the connection gone).
    conn: tokio::sync::Mutex<Option<(usize, Client)>>,
    /// Endpoint to try first at the next connect.
    next: AtomicUsize,
    /// One extrinsic at a time, submit to in-block: the node's tasks (registration, uptime,
    /// contract resources) sign with the same account, and two submitted at once could take
    /// the same nonce (one of them then refused by the pool).
    tx_lock: tokio::sync::Mutex<()>,
}

impl TfchainRegistrar {
    /// A registrar over these endpoints (`ws://` or `wss://`); connects on first use.
    pub fn new(urls: Vec<String>) -> anyhow::Result<Self> {
        if urls.is_empty() {
            anyhow::bail!("the tfchain registrar needs at least one chain endpoint (--chain URL)");
        }
        for u in &urls {
            if !(u.starts_with("ws://") || u.starts_with("wss://")) {
                anyhow::bail!("chain endpoint {u} is not a ws:// or wss:// URL");
            }
        }
        Ok(Self {
            urls,
            conn: tokio::sync::Mutex::new(None),
            next: AtomicUsize::new(0),
            tx_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.urls
    }

    /// The connected client: the current one, or a new connection to the endpoints in turn
    /// (starting after the last one that failed).
    pub async fn client(&self) -> Result<Client, RegistrarError> {
        self.connection().await.map(|(_, c)| c)
    }

    /// The connected client and the index of its endpoint. An endpoint that cannot be
    /// reached, or answers what is not a chain's JSON-RPC (the connection makes a few calls:
    /// metadata, genesis hash, runtime version), is logged by name and the next one is tried.
    async fn connection(&self) -> Result<(usize, Client), RegistrarError> {
        let mut conn = self.conn.lock().await;
        if let Some((idx, c)) = conn.as_ref() {
            return Ok((*idx, c.clone()));
        }
        let start = self.next.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..self.urls.len() {
            let idx = (start + i) % self.urls.len();
            let url = &self.urls[idx];
            let attempt = async {
                if url.starts_with("wss://") {
                    Client::from_url(url).await
                } else {
                    Client::from_insecure_url(url).await
                }
            };
            let err = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(Ok(c)) => {
                    let v = c.runtime_version();
                    info!(
                        endpoint = %url,
                        spec_version = v.spec_version,
                        "connected to the chain"
                    );
                    *conn = Some((idx, c.clone()));
                    self.next.store(idx, Ordering::Relaxed);
                    return Ok((idx, c));
                }
                Ok(Err(e)) => classify(&format!("{url}: connecting"), e),
                Err(_) => RegistrarError::Unreachable(format!(
                    "{url}: connecting: no answer in {CONNECT_TIMEOUT:?}"
                )),
            };
            warn!("chain endpoint unusable: {err}");
            errors.push(match err {
                RegistrarError::Unreachable(m)
                | RegistrarError::Garbage(m)
                | RegistrarError::Refused(m) => m,
                e => e.to_string(),
            });
        }
        self.next
            .store((start + 1) % self.urls.len(), Ordering::Relaxed);
        Err(RegistrarError::Unreachable(format!(
            "no usable chain endpoint: {}",
            errors.join("; ")
        )))
    }

    /// Forgets the connection to endpoint `idx` after it failed (transport or garbage): the
    /// next call connects again, starting with the next endpoint. A connection made since
    /// (to another endpoint) is kept.
    async fn reset(&self, idx: usize) {
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_some_and(|(i, _)| *i == idx) {
            conn.take();
            warn!(endpoint = %self.urls[idx], "dropping the chain connection; failing over");
            self.next
                .store((idx + 1) % self.urls.len(), Ordering::Relaxed);
        }
    }

    /// Maps a subxt error of a call through endpoint `idx`, dropping that connection when the
    /// endpoint failed: a transport failure, or an answer that is not what a chain answers
    /// (another endpoint may answer well).
    async fn fail(&self, idx: usize, what: &str, e: subxt::Error) -> RegistrarError {
        let err = classify(what, e);
        if err.is_transient() || matches!(err, RegistrarError::Garbage(_)) {
            self.reset(idx).await;
        }
        err
    }

    /// Reads one storage value (`None` when the key holds nothing).
    pub async fn storage(
        &self,
        pallet: &str,
        entry: &str,
        keys: Vec<Value>,
    ) -> Result<Option<Value<u32>>, RegistrarError> {
        let (idx, api) = self.connection().await?;
        let addr = subxt::dynamic::storage(pallet, entry, keys);
        let what = format!("{}: reading {pallet}.{entry}", self.urls[idx]);
        let read = async {
            let thunk = api.storage().at_latest().await?.fetch(&addr).await?;
            Ok::<_, subxt::Error>(thunk)
        };
        let thunk = match tokio::time::timeout(READ_TIMEOUT, read).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(self.fail(idx, &what, e).await),
            Err(_) => {
                self.reset(idx).await;
                return Err(RegistrarError::Unreachable(format!(
                    "{what}: no answer in {READ_TIMEOUT:?}"
                )));
            }
        };
        match thunk {
            None => Ok(None),
            Some(t) => match t.to_value() {
                Ok(v) => Ok(Some(v)),
                Err(e) => {
                    self.reset(idx).await;
                    Err(RegistrarError::Garbage(format!(
                        "{what}: the value does not decode as the chain's metadata says: {e}"
                    )))
                }
            },
        }
    }

    /// Signs `call` with `key`, submits it and waits until it is in a block; returns the
    /// events of the extrinsic (a dispatch error is an error).
    pub async fn submit(
        &self,
        key: &KeyPair,
        call: &DynamicCall,
    ) -> Result<subxt::blocks::ExtrinsicEvents<PolkadotConfig>, RegistrarError> {
        self.submit_signed(&ChainSigner(key), call).await
    }

    /// [`Self::submit`] with any signer (sr25519 dev accounts in tests).
    pub async fn submit_signed<S: subxt::tx::Signer<PolkadotConfig> + Send + Sync>(
        &self,
        signer: &S,
        call: &DynamicCall,
    ) -> Result<subxt::blocks::ExtrinsicEvents<PolkadotConfig>, RegistrarError> {
        let _one = self.tx_lock.lock().await;
        let (idx, api) = self.connection().await?;
        let what = format!("{}: {}", self.urls[idx], call_name(call));
        let run = async {
            let mut progress = api
                .tx()
                .sign_and_submit_then_watch_default(call, signer)
                .await?;
            while let Some(status) = progress.next().await {
                match status? {
                    TxStatus::InBestBlock(b) | TxStatus::InFinalizedBlock(b) => {
                        return b.wait_for_success().await.map(Ok);
                    }
                    TxStatus::Error { message } | TxStatus::Invalid { message } => {
                        return Ok(Err((false, message)))
                    }
                    TxStatus::Dropped { message } => return Ok(Err((true, message))),
                    _ => {}
                }
            }
            Ok(Err((
                true,
                "the status stream ended before the transaction was in a block".to_string(),
            )))
        };
        match tokio::time::timeout(TX_TIMEOUT, run).await {
            Ok(Ok(Ok(events))) => Ok(events),
            Ok(Ok(Err((false, message)))) => Err(RegistrarError::Refused(format!(
                "{what}: transaction not included: {message}"
            ))),
            Ok(Ok(Err((true, message)))) => {
                // Dropped, or the connection went away while waiting: worth retrying.
                self.reset(idx).await;
                Err(RegistrarError::Unreachable(format!("{what}: {message}")))
            }
            Ok(Err(e)) => match self.fail(idx, &what, e).await {
                RegistrarError::Refused(m) if m.contains(NO_FUNDS) => {
                    Err(RegistrarError::Refused(m.replace(
                        NO_FUNDS,
                        &format!(
                            " (account {} has no funds for fees: fund it)",
                            signer.account_id()
                        ),
                    )))
                }
                err => Err(err),
            },
            Err(_) => {
                self.reset(idx).await;
                Err(RegistrarError::Unreachable(format!(
                    "{what}: not in a block after {TX_TIMEOUT:?}"
                )))
            }
        }
    }

    /// The twin id of a chain account.
    pub async fn twin_id_of(
        &self,
        account: &AccountId32,
    ) -> Result<Option<TwinId>, RegistrarError> {
        let v = self
            .storage(
                TFGRID,
                "TwinIdByAccountID",
                vec![Value::from_bytes(account.0)],
            )
            .await?;
        v.map(|v| {
            num(&v)
                .map(|n| n as u32)
                .ok_or_else(|| garbage("TwinIdByAccountID", &v))
        })
        .transpose()
    }

    /// A node contract (`None`: no contract with that id, which is also what a cancelled
    /// contract becomes once the chain has billed and removed it).
    pub async fn node_contract(&self, id: u64) -> Result<Option<NodeContract>, RegistrarError> {
        let Some(v) = self
            .storage(CONTRACTS, "Contracts", vec![Value::u128(id.into())])
            .await?
        else {
            return Ok(None);
        };
        parse_contract(&v).map(Some)
    }

    /// What the node of a contract last reported it uses (`NodeContractResources`; `None`:
    /// nothing reported, or the contract is gone).
    pub async fn contract_resources(&self, id: u64) -> Result<Option<Resources>, RegistrarError> {
        let Some(v) = self
            .storage(
                CONTRACTS,
                "NodeContractResources",
                vec![Value::u128(id.into())],
            )
            .await?
        else {
            return Ok(None);
        };
        v.at("used")
            .and_then(parse_resources)
            .map(Some)
            .ok_or_else(|| garbage("NodeContractResources", &v))
    }

    /// Chain time (`Timestamp.Now`), unix seconds.
    pub async fn chain_time(&self) -> Result<Option<i64>, RegistrarError> {
        let v = self.storage("Timestamp", "Now", vec![]).await?;
        Ok(v.and_then(|v| num(&v)).map(|ms| (ms / 1000) as i64))
    }

    async fn node_id_by_twin(&self, twin: TwinId) -> Result<Option<NodeId>, RegistrarError> {
        let v = self
            .storage(TFGRID, "NodeIdByTwinID", vec![Value::u128(twin.into())])
            .await?;
        Ok(v.and_then(|v| num(&v))
            .map(|n| n as u32)
            .filter(|&n| n != 0))
    }

    async fn node(&self, id: NodeId) -> Result<Option<Node>, RegistrarError> {
        let Some(v) = self
            .storage(TFGRID, "Nodes", vec![Value::u128(id.into())])
            .await?
        else {
            return Ok(None);
        };
        parse_node(&v).map(Some)
    }
}

impl TfchainRegistrar {
    /// Sends an uptime report; done once it is in a block with its `NodeUptimeReported` event,
    /// whose fields it returns (`None`: the event is there but not in the shape this runtime
    /// gives it, `(node_id, timestamp, uptime)`).
    ///
    /// The chain takes a report only with a timestamp hint within 60 s of its clock, and the
    /// grid's minting compares the uptime with the chain's time of the report (the event's
    /// timestamp), so a report is brought to the time it is sent: the uptime it had plus the
    /// time it waited in the queue (chain down; by the node's clock, as when it was queued),
    /// never more than the host's uptime now (after a reboot); the hint is now (the chain's
    /// time when the node's clock is more than 30 s off it).
    pub async fn send_uptime(
        &self,
        key: &KeyPair,
        report: &UptimeReport,
    ) -> Result<Option<UptimeReported>, RegistrarError> {
        let node_now = crate::auth::now_unix();
        let mut hint = node_now;
        if let Ok(Some(chain_now)) = self.chain_time().await {
            if (chain_now - node_now).abs() > 30 {
                warn!(
                    "the node's clock is {} s off the chain's: using the chain's time",
                    node_now - chain_now
                );
                hint = chain_now;
            }
        }
        let uptime = uptime_when_sent(report, node_now, crate::uptime::host_uptime().ok());
        let events = self
            .submit(key, &report_uptime_v2(uptime, hint.max(0) as u64))
            .await?;
        let Some(event) = events
            .iter()
            .flatten()
            .find(|e| e.pallet_name() == TFGRID && e.variant_name() == "NodeUptimeReported")
        else {
            return Err(RegistrarError::Unreachable(
                "reportUptimeV2 is in a block but without a NodeUptimeReported event".into(),
            ));
        };
        Ok(event
            .field_values()
            .ok()
            .and_then(|v| UptimeReported::from_fields(&v)))
    }
}

/// The uptime a report carries when it is sent at `now` (the node's clock, as the report's
/// timestamp): the uptime it had plus the time it waited in the queue, never more than the
/// host's uptime now (`host`; after a reboot the queued uptime no longer holds).
pub fn uptime_when_sent(report: &UptimeReport, now: i64, host: Option<u64>) -> u64 {
    let waited = u64::try_from(now.saturating_sub(report.timestamp)).unwrap_or(0);
    let uptime = report.uptime.saturating_add(waited);
    host.map_or(uptime, |h| uptime.min(h))
}

/// A `NodeUptimeReported(node_id, timestamp, uptime)` event: the node, the chain's time of the
/// report (unix seconds) and the uptime it reported (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UptimeReported {
    pub node_id: NodeId,
    pub timestamp: u64,
    pub uptime: u64,
}

impl UptimeReported {
    /// From the event's fields (three numbers, in that order).
    pub fn from_fields(v: &subxt::ext::scale_value::Composite<u32>) -> Option<Self> {
        let f: Vec<u128> = v.values().map(num).collect::<Option<_>>()?;
        let [node_id, timestamp, uptime] = f.as_slice() else {
            return None;
        };
        Some(Self {
            node_id: u32::try_from(*node_id).ok()?,
            timestamp: u64::try_from(*timestamp).ok()?,
            uptime: u64::try_from(*uptime).ok()?,
        })
    }
}

/// The runtime's bounds on what a node says of itself (spec 144, `pallet-tfgrid`): interfaces
/// and addresses per interface, the lengths of an interface's name and address, and of a
/// serial number.
pub const MAX_INTERFACES: usize = 10;
pub const MAX_INTERFACE_IPS: usize = 10;
pub const MAX_SERIAL_NUMBER: usize = 128;

/// An interface name the runtime takes: 3 to 20 of `a-z 0-9 - _`.
fn valid_interface_name(name: &str) -> bool {
    (3..=20).contains(&name.len())
        && name
            .bytes()
            .all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_'))
}

/// A MAC address the runtime takes: six pairs of hex digits joined by `:`.
fn valid_mac(mac: &str) -> bool {
    mac.len() == 17
        && mac.split(':').count() == 6
        && mac
            .split(':')
            .all(|p| p.len() == 2 && p.bytes().all(|c| c.is_ascii_hexdigit()))
}

/// An interface address the runtime takes: an IPv4 or IPv6 address of 7 to 42 characters.
fn valid_ip(ip: &str) -> bool {
    (7..=42).contains(&ip.len()) && ip.parse::<std::net::IpAddr>().is_ok()
}

/// What a [`NodeInfo`] becomes on the chain: empty location fields take the chain's
/// defaults; interfaces the chain would refuse (name not 3-20 of `a-z0-9-_`, MAC not
/// `xx:xx:xx:xx:xx:xx`) are left out, and addresses it would refuse; at most 10 interfaces
/// of 10 addresses each; the serial number is cut at 128 bytes (on a character boundary).
pub fn as_stored(info: &NodeInfo) -> NodeInfo {
    let mut out = info.clone();
    let or = |s: &str, d: &str| {
        if s.is_empty() {
            d.to_string()
        } else {
            s.to_string()
        }
    };
    out.location.city = or(&info.location.city, "Unknown");
    out.location.country = or(&info.location.country, "Unknown");
    out.location.latitude = or(&info.location.latitude, "0");
    out.location.longitude = or(&info.location.longitude, "0");
    out.interfaces
        .retain(|i| valid_interface_name(&i.name) && valid_mac(&i.mac));
    out.interfaces.truncate(MAX_INTERFACES);
    for i in &mut out.interfaces {
        i.ips.retain(|ip| valid_ip(ip));
        i.ips.truncate(MAX_INTERFACE_IPS);
    }
    if out.serial_number.len() > MAX_SERIAL_NUMBER {
        let mut end = MAX_SERIAL_NUMBER;
        while !out.serial_number.is_char_boundary(end) {
            end -= 1;
        }
        out.serial_number.truncate(end);
    }
    out
}

// ---- calls (argument order and types as the runtime defines them; see the README of the
// test chain) ----

fn bytes(b: impl AsRef<[u8]>) -> Value {
    Value::from_bytes(b.as_ref())
}

fn option(v: Option<Value>) -> Value {
    match v {
        Some(v) => Value::unnamed_variant("Some", [v]),
        None => Value::unnamed_variant("None", []),
    }
}

pub fn user_accept_tc(link: &str, hash: &str) -> DynamicCall {
    subxt::dynamic::tx(TFGRID, "user_accept_tc", vec![bytes(link), bytes(hash)])
}

pub fn create_twin(relay: Option<&str>, pk: Option<&[u8]>) -> DynamicCall {
    subxt::dynamic::tx(
        TFGRID,
        "create_twin",
        vec![option(relay.map(bytes)), option(pk.map(bytes))],
    )
}

pub fn create_farm(name: &str) -> DynamicCall {
    subxt::dynamic::tx(
        TFGRID,
        "create_farm",
        vec![bytes(name), Value::unnamed_composite([])],
    )
}

fn resources_value(c: &Resources) -> Value {
    Value::named_composite([
        ("hru", Value::u128(c.hru.into())),
        ("sru", Value::u128(c.sru.into())),
        ("cru", Value::u128(c.cru.into())),
        ("mru", Value::u128(c.mru.into())),
    ])
}

fn node_args(info: &NodeInfo) -> Vec<Value> {
    let info = as_stored(info);
    let resources = resources_value(&info.capacity);
    let l = &info.location;
    let location = Value::named_composite([
        ("city", bytes(&l.city)),
        ("country", bytes(&l.country)),
        ("latitude", bytes(&l.latitude)),
        ("longitude", bytes(&l.longitude)),
    ]);
    let interfaces = Value::unnamed_composite(info.interfaces.iter().map(|i| {
        Value::named_composite([
            ("name", bytes(&i.name)),
            ("mac", bytes(&i.mac)),
            ("ips", Value::unnamed_composite(i.ips.iter().map(bytes))),
        ])
    }));
    let serial = (!info.serial_number.is_empty()).then(|| bytes(&info.serial_number));
    vec![
        Value::u128(info.farm_id.into()),
        resources,
        location,
        interfaces,
        Value::bool(info.secure_boot),
        Value::bool(info.virtualized),
        option(serial),
    ]
}

pub fn create_node(info: &NodeInfo) -> DynamicCall {
    subxt::dynamic::tx(TFGRID, "create_node", node_args(info))
}

pub fn update_node(node_id: NodeId, info: &NodeInfo) -> DynamicCall {
    let mut args = vec![Value::u128(node_id.into())];
    args.extend(node_args(info));
    subxt::dynamic::tx(TFGRID, "update_node", args)
}

pub fn report_uptime_v2(uptime: u64, timestamp_hint: u64) -> DynamicCall {
    subxt::dynamic::tx(
        TFGRID,
        "report_uptime_v2",
        vec![
            Value::u128(uptime.into()),
            Value::u128(timestamp_hint.into()),
        ],
    )
}

pub fn create_node_contract(node_id: NodeId, hash: [u8; 32], data: &[u8]) -> DynamicCall {
    subxt::dynamic::tx(
        CONTRACTS,
        "create_node_contract",
        vec![
            Value::u128(node_id.into()),
            bytes(hash),
            bytes(data),
            Value::u128(0),
            option(None),
        ],
    )
}

pub fn update_node_contract(contract_id: u64, hash: [u8; 32], data: &[u8]) -> DynamicCall {
    subxt::dynamic::tx(
        CONTRACTS,
        "update_node_contract",
        vec![Value::u128(contract_id.into()), bytes(hash), bytes(data)],
    )
}

/// `reportContractResources(Vec<{contract_id, used: {hru, sru, cru, mru}}>)`: amounts in the
/// runtime's units (threads and bytes, as `createNode`'s resources).
pub fn report_contract_resources(usage: &[ContractUsage]) -> DynamicCall {
    let items = usage.iter().map(|u| {
        Value::named_composite([
            ("contract_id", Value::u128(u.contract_id.into())),
            ("used", resources_value(&u.used)),
        ])
    });
    subxt::dynamic::tx(
        CONTRACTS,
        "report_contract_resources",
        vec![Value::unnamed_composite(items)],
    )
}

pub fn cancel_contract(contract_id: u64) -> DynamicCall {
    subxt::dynamic::tx(
        CONTRACTS,
        "cancel_contract",
        vec![Value::u128(contract_id.into())],
    )
}

/// `balances.transfer(dest, value)` (how the grid's activation service funds a new account).
pub fn transfer(dest: &AccountId32, amount: u128) -> DynamicCall {
    subxt::dynamic::tx(
        "Balances",
        "transfer",
        vec![
            Value::unnamed_variant("Id", [bytes(dest.0)]),
            Value::u128(amount),
        ],
    )
}

fn call_name(call: &DynamicCall) -> String {
    format!("{}.{}", call.pallet_name(), call.call_name())
}

// ---- errors ----

/// The runtime's minimum capacity of a node (spec 144, `tfchain_support::resources`: SSD 100
/// GiB, memory 2 GiB, 1 CPU thread; no HDD minimum).
pub const MIN_SRU: u64 = 100 << 30;
pub const MIN_MRU: u64 = 2 << 30;
pub const MIN_CRU: u64 = 1;

/// For a `createNode`/`updateNode` refused for its resources (`InvalidSRUInput`...): what
/// was offered, the runtime's minimum, and the fix (the operator's capacity override).
pub fn capacity_refusal(message: &str, offered: &Resources) -> Option<String> {
    let gib = |b: u64| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
    let (what, have, min, example) = if message.contains("InvalidSRUInput") {
        ("SSD (sru)", gib(offered.sru), gib(MIN_SRU), "sru=100G")
    } else if message.contains("InvalidMRUInput") {
        ("memory (mru)", gib(offered.mru), gib(MIN_MRU), "mru=2G")
    } else if message.contains("InvalidCRUInput") {
        (
            "CPU (cru)",
            offered.cru.to_string(),
            MIN_CRU.to_string(),
            "cru=1",
        )
    } else if message.contains("InvalidHRUInput") {
        ("HDD (hru)", gib(offered.hru), "?".into(), "hru=0")
    } else {
        return None;
    };
    Some(format!(
        "the chain refuses the node's {what} of {have}, below the runtime's minimum of {min} for a node; \
         set what the node offers with `node-agent run --capacity {example}` (or `\"capacity\"` in the \
         config), e.g. when the workloads' disks are elsewhere than the detected SSD"
    ))
}

/// What a refusal for want of fees says (the signer's account is named where it is known).
const NO_FUNDS: &str = " (the account has no funds for fees: fund it first)";

/// What the log and the health say of an endpoint that answers, but not as a chain does.
pub const NOT_CHAIN_DATA: &str = "the endpoint answered what is not this chain's data";
pub const NOT_JSON_RPC: &str = "the endpoint answered what is not JSON-RPC";
pub const NOT_WEBSOCKET: &str = "the endpoint does not speak WebSocket";

fn classify(what: &str, e: subxt::Error) -> RegistrarError {
    use subxt::error::{DispatchError, RpcError};
    match e {
        subxt::Error::Runtime(DispatchError::Module(m)) => {
            let name = m.details_string();
            RegistrarError::Refused(format!("{what}: the chain refused it: {name}"))
        }
        subxt::Error::Runtime(d) => {
            RegistrarError::Refused(format!("{what}: the chain refused it: {d}"))
        }
        subxt::Error::Rpc(RpcError::ClientError(
            r @ (subxt::ext::subxt_rpcs::Error::Deserialization(_)
            | subxt::ext::subxt_rpcs::Error::Decode(_)),
        )) => RegistrarError::Garbage(format!("{what}: {NOT_CHAIN_DATA}: {r}")),
        subxt::Error::Rpc(r) => {
            // subxt and its RPC client each add their prefix: keep one.
            let full = r.to_string();
            let mut msg = full.as_str();
            while let Some(rest) = ["RPC error: ", "client error: "]
                .iter()
                .find_map(|p| msg.strip_prefix(p))
            {
                msg = rest;
            }
            let msg = format!("RPC: {msg}");
            if msg.contains("Invalid Transaction") || msg.contains("1010") {
                let hint = if msg.contains("pay some fees")
                    || msg.contains("\"payment\"")
                    || msg.contains("balance too low")
                {
                    NO_FUNDS
                } else {
                    ""
                };
                RegistrarError::Refused(format!(
                    "{what}: the chain refused the transaction: {msg}{hint}"
                ))
            } else if msg.contains("Unparseable") || msg.contains("Parse error") {
                RegistrarError::Garbage(format!("{what}: {NOT_JSON_RPC}: {msg}"))
            } else if msg.contains("andshake") || msg.contains("HTTP") {
                RegistrarError::Garbage(format!("{what}: {NOT_WEBSOCKET}: {msg}"))
            } else {
                RegistrarError::Unreachable(format!("{what}: {msg}"))
            }
        }
        subxt::Error::Io(e) => RegistrarError::Unreachable(format!("{what}: {e}")),
        e @ (subxt::Error::Codec(_)
        | subxt::Error::Decode(_)
        | subxt::Error::Metadata(_)
        | subxt::Error::MetadataDecoding(_)
        | subxt::Error::Serialization(_)
        | subxt::Error::Block(_)
        | subxt::Error::Unknown(_)) => {
            RegistrarError::Garbage(format!("{what}: {NOT_CHAIN_DATA}: {e}"))
        }
        e @ subxt::Error::Encode(_) => {
            RegistrarError::Garbage(format!("{what}: the chain's metadata does not fit: {e}"))
        }
        e => RegistrarError::Unreachable(format!("{what}: {e}")),
    }
}

fn garbage(what: &str, v: &Value<u32>) -> RegistrarError {
    RegistrarError::Garbage(format!("{what}: unexpected value {v}"))
}

// ---- reading dynamic values ----

/// A number, through newtype wrappers.
pub fn num(v: &Value<u32>) -> Option<u128> {
    if let Some(n) = v.as_u128() {
        return Some(n);
    }
    match &v.value {
        subxt::ext::scale_value::ValueDef::Composite(c) if c.len() == 1 => {
            c.values().next().and_then(num)
        }
        _ => None,
    }
}

/// Bytes (a sequence of u8), through newtype wrappers (bounded vectors, names).
pub fn bytes_of(v: &Value<u32>) -> Option<Vec<u8>> {
    use subxt::ext::scale_value::ValueDef;
    match &v.value {
        ValueDef::Composite(c) => {
            let vals: Vec<&Value<u32>> = c.values().collect();
            if vals.len() == 1 && !matches!(vals[0].value, ValueDef::Primitive(_)) {
                return bytes_of(vals[0]);
            }
            vals.iter()
                .map(|x| x.as_u128().and_then(|n| u8::try_from(n).ok()))
                .collect()
        }
        _ => None,
    }
}

/// Every byte string (a non-empty sequence of numbers 0-255) in a value, in order, as text:
/// the items of a vector of names or addresses whatever wrappers hold them.
pub fn byte_strings(v: &Value<u32>, out: &mut Vec<String>) {
    use subxt::ext::scale_value::ValueDef;
    let children: Vec<&Value<u32>> = match &v.value {
        ValueDef::Composite(c) => c.values().collect(),
        ValueDef::Variant(var) => var.values.values().collect(),
        _ => return,
    };
    let bytes: Option<Vec<u8>> = children
        .iter()
        .map(|c| c.as_u128().and_then(|n| u8::try_from(n).ok()))
        .collect();
    match bytes {
        Some(b) if !b.is_empty() => out.push(String::from_utf8_lossy(&b).into_owned()),
        _ => children.into_iter().for_each(|c| byte_strings(c, out)),
    }
}

fn text(v: Option<&Value<u32>>) -> String {
    v.and_then(bytes_of)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn field_num(v: &Value<u32>, name: &str) -> Option<u128> {
    v.at(name).and_then(num)
}

fn variant(v: &Value<u32>) -> Option<(&str, &subxt::ext::scale_value::Composite<u32>)> {
    match &v.value {
        subxt::ext::scale_value::ValueDef::Variant(var) => Some((var.name.as_str(), &var.values)),
        _ => None,
    }
}

fn parse_resources(res: &Value<u32>) -> Option<Resources> {
    let f = |name| field_num(res, name).and_then(|n| u64::try_from(n).ok());
    Some(Resources {
        cru: f("cru")?,
        mru: f("mru")?,
        sru: f("sru")?,
        hru: f("hru")?,
    })
}

fn parse_node(v: &Value<u32>) -> Result<Node, RegistrarError> {
    let g = || garbage("Nodes", v);
    let capacity = v.at("resources").and_then(parse_resources).ok_or_else(g)?;
    let loc = v.at("location").ok_or_else(g)?;
    let location = crate::config::Location {
        city: text(loc.at("city")),
        country: text(loc.at("country")),
        latitude: text(loc.at("latitude")),
        longitude: text(loc.at("longitude")),
    };
    let mut interfaces = Vec::new();
    if let Some(subxt::ext::scale_value::ValueDef::Composite(c)) =
        v.at("interfaces").map(|i| &i.value)
    {
        for i in c.values() {
            // A bounded vector of addresses, each a byte string in its wrappers.
            let mut ips = Vec::new();
            if let Some(v) = i.at("ips") {
                byte_strings(v, &mut ips);
            }
            interfaces.push(Interface {
                name: text(i.at("name")),
                mac: text(i.at("mac")),
                ips,
            });
        }
    }
    let serial_number = match v.at("serial_number").and_then(variant) {
        Some(("Some", vals)) => text(vals.values().next()),
        _ => String::new(),
    };
    Ok(Node {
        id: field_num(v, "id").ok_or_else(g)? as u32,
        twin_id: field_num(v, "twin_id").ok_or_else(g)? as u32,
        info: NodeInfo {
            farm_id: field_num(v, "farm_id").ok_or_else(g)? as u32,
            capacity,
            location,
            interfaces,
            serial_number,
            virtualized: v
                .at("virtualized")
                .and_then(|b| b.as_bool())
                .unwrap_or(false),
            secure_boot: v
                .at("secure_boot")
                .and_then(|b| b.as_bool())
                .unwrap_or(false),
        },
    })
}

fn parse_contract(v: &Value<u32>) -> Result<NodeContract, RegistrarError> {
    let g = || garbage("Contracts", v);
    let state = match v.at("state").and_then(variant).ok_or_else(g)? {
        ("Created", _) => ContractState::Created,
        ("Deleted", vals) => ContractState::Deleted(
            vals.values()
                .next()
                .and_then(variant)
                .map(|(n, _)| n.to_string())
                .unwrap_or_default(),
        ),
        ("GracePeriod", vals) => {
            ContractState::GracePeriod(vals.values().next().and_then(num).unwrap_or(0) as u64)
        }
        _ => return Err(g()),
    };
    let (kind, data) = v.at("contract_type").and_then(variant).ok_or_else(g)?;
    if kind != "NodeContract" {
        return Err(RegistrarError::Refused(format!(
            "contract {} is a {kind}, not a node contract",
            field_num(v, "contract_id").unwrap_or(0)
        )));
    }
    let nc = data.values().next().ok_or_else(g)?;
    let hash: [u8; 32] = nc
        .at("deployment_hash")
        .and_then(bytes_of)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(g)?;
    Ok(NodeContract {
        contract_id: field_num(v, "contract_id").ok_or_else(g)? as u64,
        twin_id: field_num(v, "twin_id").ok_or_else(g)? as u32,
        node_id: field_num(nc, "node_id").ok_or_else(g)? as u32,
        deployment_hash: hash,
        state,
    })
}

/// The contracts whose resources the chain took: one `UpdatedUsedResources` per contract (a
/// contract it no longer holds is skipped without an error).
fn updated_resources(events: &subxt::blocks::ExtrinsicEvents<PolkadotConfig>) -> Vec<u64> {
    events
        .iter()
        .flatten()
        .filter(|e| e.pallet_name() == CONTRACTS && e.variant_name() == "UpdatedUsedResources")
        .filter_map(|e| {
            e.field_values()
                .ok()
                .and_then(|v| v.values().next().and_then(|r| field_num(r, "contract_id")))
        })
        .map(|id| id as u64)
        .collect()
}

/// Whether the extrinsic's events hold `pallet.event`.
pub fn has_event(
    events: &subxt::blocks::ExtrinsicEvents<PolkadotConfig>,
    pallet: &str,
    event: &str,
) -> bool {
    events
        .iter()
        .flatten()
        .any(|e| e.pallet_name() == pallet && e.variant_name() == event)
}

#[async_trait]
impl Registrar for TfchainRegistrar {
    async fn twin(&self, id: TwinId) -> Result<Option<Twin>, RegistrarError> {
        let Some(v) = self
            .storage(TFGRID, "Twins", vec![Value::u128(id.into())])
            .await?
        else {
            return Ok(None);
        };
        let account: [u8; 32] = v
            .at("account_id")
            .and_then(bytes_of)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| garbage("Twins", &v))?;
        Ok(Some(Twin {
            id,
            public_key: hex::encode(account),
        }))
    }

    async fn twin_by_key(&self, key: &PublicKey) -> Result<Option<Twin>, RegistrarError> {
        match self.twin_id_of(&account_of(key)).await? {
            Some(id) => self.twin(id).await,
            None => Ok(None),
        }
    }

    async fn create_twin(&self, key: &KeyPair) -> Result<Twin, RegistrarError> {
        if let Some(t) = self.twin_by_key(&key.public()).await? {
            return Ok(t);
        }
        self.submit(key, &user_accept_tc(TC_LINK, TC_HASH)).await?;
        self.submit(key, &create_twin(None, None)).await?;
        self.twin_by_key(&key.public())
            .await?
            .ok_or_else(|| RegistrarError::Garbage("createTwin succeeded but no twin".into()))
    }

    async fn farm(&self, id: FarmId) -> Result<Option<Farm>, RegistrarError> {
        let Some(v) = self
            .storage(TFGRID, "Farms", vec![Value::u128(id.into())])
            .await?
        else {
            return Ok(None);
        };
        Ok(Some(Farm {
            id,
            name: text(v.at("name")),
            owner_twin: field_num(&v, "twin_id").ok_or_else(|| garbage("Farms", &v))? as u32,
        }))
    }

    async fn create_farm(
        &self,
        owner: &KeyPair,
        owner_twin: TwinId,
        name: &str,
    ) -> Result<Farm, RegistrarError> {
        let events = self.submit(owner, &create_farm(name)).await?;
        for e in events.iter().flatten() {
            if e.pallet_name() == TFGRID && e.variant_name() == "FarmStored" {
                if let Ok(v) = e.field_values() {
                    let id = v
                        .values()
                        .next()
                        .and_then(|f| field_num(f, "id"))
                        .ok_or_else(|| RegistrarError::Garbage("FarmStored without id".into()))?;
                    return Ok(Farm {
                        id: id as u32,
                        name: name.into(),
                        owner_twin,
                    });
                }
            }
        }
        Err(RegistrarError::Garbage(
            "createFarm succeeded without a FarmStored event".into(),
        ))
    }

    async fn node_by_twin(&self, twin: TwinId) -> Result<Option<Node>, RegistrarError> {
        match self.node_id_by_twin(twin).await? {
            Some(id) => self.node(id).await,
            None => Ok(None),
        }
    }

    async fn register_node(
        &self,
        key: &KeyPair,
        twin: TwinId,
        info: &NodeInfo,
    ) -> Result<Node, RegistrarError> {
        let call = match self.node_id_by_twin(twin).await? {
            Some(id) => update_node(id, info),
            None => create_node(info),
        };
        match self.submit(key, &call).await {
            Err(RegistrarError::Refused(m)) if m.contains("FarmNotExists") => {
                return Err(RegistrarError::UnknownFarm(info.farm_id))
            }
            Err(RegistrarError::Refused(m)) => {
                return Err(RegistrarError::Refused(
                    match capacity_refusal(&m, &info.capacity) {
                        Some(why) => format!("{m}: {why}"),
                        None => m,
                    },
                ))
            }
            r => r?,
        };
        self.node_by_twin(twin)
            .await?
            .ok_or_else(|| RegistrarError::Garbage("the node was stored but is not found".into()))
    }

    fn as_stored(&self, info: &NodeInfo) -> NodeInfo {
        as_stored(info)
    }

    fn requires_contracts(&self) -> bool {
        true
    }

    async fn contract(&self, id: u64) -> Result<Option<NodeContract>, RegistrarError> {
        self.node_contract(id).await
    }

    async fn report_contract_resources(
        &self,
        key: &KeyPair,
        usage: &[ContractUsage],
    ) -> Result<Vec<u64>, RegistrarError> {
        let mut taken = Vec::new();
        for batch in usage.chunks(RESOURCE_REPORT_BATCH) {
            match self.submit(key, &report_contract_resources(batch)).await {
                Ok(events) => taken.extend(updated_resources(&events)),
                // The pallet refuses a whole report for one contract it does not take from
                // this node (another node's, not a node contract): the contracts go one by
                // one, and those refused are left out (named in the log); when none is
                // taken the refusal is the error.
                Err(RegistrarError::Refused(m)) if batch.len() > 1 => {
                    warn!(
                        "the chain refused a report of {} contracts ({m}); reporting them one by one",
                        batch.len()
                    );
                    let mut refused = None;
                    let before = taken.len();
                    for one in batch {
                        let call = report_contract_resources(std::slice::from_ref(one));
                        match self.submit(key, &call).await {
                            Ok(events) => taken.extend(updated_resources(&events)),
                            Err(RegistrarError::Refused(m)) => {
                                warn!(
                                    contract = one.contract_id,
                                    "the chain refuses this contract's resources report: {m}"
                                );
                                refused.get_or_insert(m);
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    if let (Some(m), true) = (refused, taken.len() == before) {
                        return Err(RegistrarError::Refused(m));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(taken)
    }

    async fn report_uptime(
        &self,
        key: &KeyPair,
        _twin: TwinId,
        node: NodeId,
        report: &UptimeReport,
    ) -> Result<(), RegistrarError> {
        match self.send_uptime(key, report).await? {
            Some(r) if r.node_id != node => warn!(
                "the chain took an uptime report for node {} (this node is {node})",
                r.node_id
            ),
            Some(r) => info!(
                node = r.node_id,
                uptime = r.uptime,
                timestamp = r.timestamp,
                "uptime report in a block"
            ),
            None => warn!("NodeUptimeReported has fields this agent does not read"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report sent when it is made carries its uptime; one that waited (the chain down)
    /// carries its uptime plus the wait, whatever the wait (the grid's minting compares the
    /// uptime with the chain's time of the report); never more than the host's uptime now.
    #[test]
    fn a_queued_report_carries_the_uptime_at_the_time_it_is_sent() {
        let r = UptimeReport {
            uptime: 1000,
            timestamp: 50_000,
        };
        assert_eq!(uptime_when_sent(&r, 50_000, Some(1000)), 1000);
        for waited in [1, 10, 29, 31, 600, 86_400] {
            assert_eq!(
                uptime_when_sent(&r, 50_000 + waited, Some(1_000_000)),
                1000 + waited as u64,
                "after {waited} s"
            );
        }
        // After a reboot: the host's uptime now.
        assert_eq!(uptime_when_sent(&r, 50_600, Some(120)), 120);
        // A clock that went back: no time waited.
        assert_eq!(uptime_when_sent(&r, 49_000, None), 1000);
        assert_eq!(
            uptime_when_sent(
                &UptimeReport {
                    uptime: u64::MAX,
                    timestamp: i64::MIN
                },
                i64::MAX,
                None
            ),
            u64::MAX
        );
    }
}
