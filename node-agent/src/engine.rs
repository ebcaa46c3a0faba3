//! Turns deployments into running VMs and keeps them so.
//!
//! Every change follows one path: verify (format, owner, signatures, version, capacity) ->
//! journal the intent and the new desired state in one transaction -> reconcile the VMs
//! toward it -> end the op (or roll back to the previous state, as the owner chose). The
//! commit point is the journal write: after a crash the op is found at start and finished,
//! or rolled back if it cannot be. Data of a removed workload is deleted only after its op
//! has ended, so a rollback finds it again.
//!
//! The supervisor tick (every second) watches recorded vmm processes (adopted ones included:
//! they need not be the agent's children), applies restart policies with backoff, and starts
//! VMs that should run but do not (after a node reboot, all of them). A VM that could not
//! start (its image missing, its vmm failing) is retried the same way, unless its policy is
//! `never`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::capacity::{self, Resources};
use crate::config::AgentConfig;
use crate::deployment::{Deployment, FailurePolicy, RestartPolicy, VmWorkload};
use crate::metrics::Metrics;
use crate::network::check::CheckError;
use crate::network::{Network, VmNetwork};
use crate::registrar::{ContractState, Registrar, RegistrarError};
use crate::state::{Op, OpKind, Store, VmRecord, VmState};
use crate::supervisor::{self, Proc};
use crate::vmspec::{self, VmKey, VmPaths};

/// How long a start may take before the VM counts as started (the vmm answering its API).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// A VM that ran this long before it ended starts its backoff again from 1 s.
const STABLE_SECS: i64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("over capacity: {0}")]
    Capacity(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

/// What a create or update did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct DeployOutcome {
    pub twin_id: u32,
    pub deployment_id: u64,
    pub version: u32,
    /// Workloads started or restarted by this change.
    pub started: Vec<String>,
    /// Workloads left running untouched.
    pub unchanged: Vec<String>,
    /// Workloads that could not start (only with `on_failure: keep`): kept with the reason,
    /// and retried per their restart policy.
    pub failed: BTreeMap<String, String>,
}

pub struct Engine {
    pub store: Arc<Store>,
    pub config: AgentConfig,
    pub registrar: Arc<dyn Registrar>,
    pub metrics: Arc<Metrics>,
    /// Capacity offered (detected minus reserve).
    pub capacity: Resources,
    /// One change at a time (deploys, deletes, the supervisor tick).
    lock: tokio::sync::Mutex<()>,
    pub started_at: AtomicI64,
    /// Notified when a deployment was admitted or updated (what contracts use changed).
    pub usage_changed: tokio::sync::Notify,
    /// The node's networking (None: disabled, VMs have no interfaces).
    pub network: Option<Arc<Network>>,
    /// What each VM being prepared or started is doing (its image fetched and checked, its
    /// vmm started, its boot awaited), so a client can show a change's progress.
    steps: std::sync::Mutex<BTreeMap<VmKey, String>>,
}

fn now() -> i64 {
    crate::auth::now_unix()
}

/// Crash injection for the crash-recovery tests: with `GRIDNODE_CRASH_AT=<point>` in its
/// environment the agent aborts (as `kill -9` would stop it) when it reaches that point.
/// Points: `after-journal` (intent written, nothing started), `after-spawn` (a vmm started,
/// its pid not yet recorded), `before-op-end` (VMs started, the op not yet ended),
/// `before-rollback` (a workload failed to start, nothing rolled back yet), `mid-rollback`
/// (the previous documents restored, the VMs not yet), `before-cleanup` (the op ended, the
/// files of removed workloads not yet deleted).
fn crash_point(point: &str) {
    if std::env::var("GRIDNODE_CRASH_AT").is_ok_and(|p| p == point) {
        eprintln!("node-agent: crash point {point} reached, aborting");
        std::process::abort();
    }
}

impl Engine {
    pub fn new(
        store: Arc<Store>,
        config: AgentConfig,
        registrar: Arc<dyn Registrar>,
        metrics: Arc<Metrics>,
        capacity: Resources,
    ) -> Self {
        Self {
            store,
            config,
            registrar,
            metrics,
            capacity,
            lock: tokio::sync::Mutex::new(()),
            started_at: AtomicI64::new(now()),
            usage_changed: tokio::sync::Notify::new(),
            network: None,
            steps: Default::default(),
        }
    }

    /// Records what a VM is doing until the returned guard is dropped.
    fn step(&self, key: &VmKey, what: &str) -> StepsCleared<'_> {
        self.set_step(key, what);
        StepsCleared {
            engine: self,
            twin_id: key.twin_id,
            deployment_id: key.deployment_id,
            name: Some(key.name.clone()),
        }
    }

    fn set_step(&self, key: &VmKey, what: &str) {
        if let Ok(mut steps) = self.steps.lock() {
            steps.insert(key.clone(), what.to_string());
        }
    }

    /// What the VMs of one deployment are doing now, by name (empty when no change runs).
    pub fn steps(&self, twin_id: u32, deployment_id: u64) -> BTreeMap<String, String> {
        let Ok(steps) = self.steps.lock() else {
            return BTreeMap::new();
        };
        steps
            .iter()
            .filter(|(k, _)| (k.twin_id, k.deployment_id) == (twin_id, deployment_id))
            .map(|(k, v)| (k.name.clone(), v.clone()))
            .collect()
    }

    /// Gives VMs interfaces through `network`.
    pub fn with_network(mut self, network: Arc<Network>) -> Self {
        self.network = Some(network);
        self
    }

    /// The node-dependent checks of a deployment's networking (ports, this node in its
    /// networks, networking enabled).
    fn check_network(&self, doc: &Deployment, target: (u32, u64)) -> Result<(), DeployError> {
        let others: Vec<Deployment> = self
            .store
            .deployments(None)?
            .into_iter()
            .filter(|d| (d.twin_id, d.deployment_id) != target)
            .collect();
        let node_id = match &self.network {
            Some(n) => n.node_id(&self.store),
            None => self.store.meta("node_id")?.and_then(|v| v.parse().ok()),
        };
        let config = match &self.network {
            Some(n) => n.config.clone(),
            None => crate::network::NetworkConfig::default(),
        };
        let api_port = self.config.listen.map(|l| l.port());
        crate::network::check::check_deployment(&config, api_port, node_id, doc, &others).map_err(
            |e| match e {
                CheckError::Invalid(m) => {
                    DeployError::BadRequest(format!("invalid deployment: {m}"))
                }
                CheckError::Conflict(m) => DeployError::Conflict(m),
                CheckError::Unavailable(m) => DeployError::Unavailable(m),
            },
        )
    }

    /// Makes the node's networking match the committed state; the error says why not.
    async fn sync_network(&self) -> Result<crate::network::reconcile::Report, String> {
        let Some(net) = &self.network else {
            return Ok(Default::default());
        };
        match net.sync(&self.store).await {
            Ok(report) => {
                if !report.created.is_empty() || !report.removed.is_empty() {
                    info!(created = ?report.created, removed = ?report.removed, "network reconciled");
                }
                Ok(report)
            }
            Err(e) => {
                warn!("network: {e}");
                Err(format!("the node's networking failed: {e}"))
            }
        }
    }

    /// The addresses of each VM of `doc` that has interfaces: `eth0 10.249.0.2/16`, ...
    pub fn vm_addresses(&self, doc: &Deployment) -> BTreeMap<String, Vec<String>> {
        doc.vms()
            .filter_map(|vm| {
                let net = self.vm_network(doc, vm).ok().flatten()?;
                let list = net
                    .guest
                    .addresses
                    .iter()
                    .map(|a| format!("{} {}/{}", a.ifname, a.addr, a.prefix))
                    .collect();
                Some((vm.name.clone(), list))
            })
            .collect()
    }

    /// A VM's interfaces and guest network configuration (None without interfaces).
    fn vm_network(&self, doc: &Deployment, vm: &VmWorkload) -> Result<Option<VmNetwork>, String> {
        if vm.interfaces.is_empty() {
            return Ok(None);
        }
        let Some(net) = &self.network else {
            return Err("the node's networking is disabled".into());
        };
        net.vm_network(&self.store, doc, vm)
            .map(Some)
            .map_err(|e| format!("network: {e}"))
    }

    fn state_dir(&self) -> &Path {
        &self.config.state_dir
    }

    /// Capacity used by active deployments, except `skip`.
    pub fn used(&self, skip: Option<(u32, u64)>) -> Result<Resources> {
        Ok(self
            .store
            .deployments(None)?
            .iter()
            .filter(|d| Some((d.twin_id, d.deployment_id)) != skip)
            .fold(Resources::default(), |acc, d| {
                acc.saturating_add(self.needs(d))
            }))
    }

    /// What a deployment takes of this node: its disks on SSD, or on HDD when the node has
    /// no SSD capacity.
    pub fn needs(&self, d: &Deployment) -> Resources {
        let mut needs = capacity::deployment_needs(d);
        if self.capacity.sru == 0 {
            needs.hru = needs.hru.saturating_add(std::mem::take(&mut needs.sru));
        }
        needs
    }

    /// What each active deployment paid by a node contract uses of this node, by contract
    /// (what the node reports to the chain): its vCPUs, memory bytes, and disk bytes (rootfs
    /// and volumes) on SSD, or on HDD when the node has no SSD capacity.
    pub fn contract_usage(&self) -> Result<Vec<crate::registrar::ContractUsage>> {
        let mut by_contract: BTreeMap<u64, Resources> = BTreeMap::new();
        for d in self.store.deployments(None)? {
            if let Some(id) = d.contract_id {
                let used = by_contract.entry(id).or_default();
                *used = used.saturating_add(self.needs(&d));
            }
        }
        Ok(by_contract
            .into_iter()
            .map(|(contract_id, used)| crate::registrar::ContractUsage { contract_id, used })
            .collect())
    }

    /// Creates or updates a deployment (`caller` is the twin that signed the request).
    pub async fn deploy(&self, caller: u32, doc: Deployment) -> Result<DeployOutcome, DeployError> {
        let t0 = Instant::now();
        if caller != doc.twin_id {
            return Err(DeployError::Forbidden(format!(
                "twin {caller} cannot deploy for twin {} (only the owner can)",
                doc.twin_id
            )));
        }
        doc.validate()
            .map_err(|e| DeployError::BadRequest(format!("invalid deployment: {e}")))?;
        let keys = self.signer_keys(&doc).await?;
        self.check_contract(&doc).await?;
        let _guard = self.lock.lock().await;
        let target = (doc.twin_id, doc.deployment_id);
        let existing = self.store.deployment(target.0, target.1)?;
        if let Some(row) = existing.as_ref().filter(|r| !r.deleted) {
            if row.doc.contract_id != doc.contract_id {
                return Err(DeployError::Conflict(format!(
                    "deployment {} is paid by contract {:?}; an update cannot move it to contract {:?}",
                    doc.deployment_id, row.doc.contract_id, doc.contract_id
                )));
            }
        }
        let (kind, prev) = match &existing {
            Some(row) if !row.deleted => {
                if doc.version <= row.doc.version {
                    return Err(DeployError::Conflict(format!(
                        "version {} is not higher than the current {} (stale or replayed)",
                        doc.version, row.doc.version
                    )));
                }
                (OpKind::Update, Some(row.doc.clone()))
            }
            Some(row) => {
                if doc.version <= row.doc.version {
                    return Err(DeployError::Conflict(format!(
                        "deployment {} was deleted at version {}; a new one needs a higher version (replayed?)",
                        doc.deployment_id, row.doc.version
                    )));
                }
                (OpKind::Create, None)
            }
            None => (OpKind::Create, None),
        };
        let key_of = |id: u32| keys.get(&id).copied();
        doc.check_signatures(prev.as_ref(), &key_of)
            .map_err(DeployError::Forbidden)?;
        self.check_network(&doc, target)?;
        let mut offered = self.capacity;
        offered.cru = offered
            .cru
            .saturating_mul(u64::from(self.config.cpu_allocation_ratio.max(1)));
        let free = offered.saturating_sub(self.used(Some(target))?);
        if let Some(why) = self.needs(&doc).exceeds(&free) {
            return Err(DeployError::Capacity(why));
        }
        let op_id = self
            .store
            .begin_op(kind, prev.as_ref(), Some(&doc), target)?;
        crash_point("after-journal");
        let op = Op {
            id: op_id,
            twin_id: target.0,
            deployment_id: target.1,
            kind,
            prev,
            new: Some(doc.clone()),
        };
        let outcome = self.apply(&op).await;
        self.metrics.observe_deploy(t0.elapsed());
        outcome
    }

    /// Runs a journaled create/update to its end: reconcile, then end or roll back.
    async fn apply(&self, op: &Op) -> Result<DeployOutcome, DeployError> {
        let Some(doc) = &op.new else {
            return Err(DeployError::Internal(anyhow::anyhow!(
                "op {} has no document",
                op.id
            )));
        };
        let rollback = doc.on_failure == FailurePolicy::Rollback;
        let report = self
            .reconcile(
                op.twin_id,
                op.deployment_id,
                Some(doc),
                op.prev.as_ref(),
                rollback,
            )
            .await;
        if !report.failed.is_empty() && rollback {
            let reasons: Vec<String> = report
                .failed
                .iter()
                .map(|(n, r)| format!("{n}: {r}"))
                .collect();
            warn!(
                twin = op.twin_id,
                deployment = op.deployment_id,
                "rolling back: {}",
                reasons.join("; ")
            );
            crash_point("before-rollback");
            self.store.roll_back_op(op)?;
            crash_point("mid-rollback");
            self.reconcile(
                op.twin_id,
                op.deployment_id,
                op.prev.as_ref(),
                Some(doc),
                false,
            )
            .await;
            self.collect_garbage(op.twin_id, op.deployment_id)?;
            return Err(DeployError::Failed(format!(
                "workload {} could not start; the deployment was rolled back{}",
                reasons.join("; "),
                if op.prev.is_some() {
                    " to its previous version"
                } else {
                    ""
                }
            )));
        }
        crash_point("before-op-end");
        self.store.end_op(op.id)?;
        self.usage_changed.notify_one();
        crash_point("before-cleanup");
        self.collect_garbage(op.twin_id, op.deployment_id)?;
        info!(
            twin = op.twin_id,
            deployment = op.deployment_id,
            version = doc.version,
            "deployed"
        );
        Ok(DeployOutcome {
            twin_id: op.twin_id,
            deployment_id: op.deployment_id,
            version: doc.version,
            started: report.started,
            unchanged: report.unchanged,
            failed: report.failed,
        })
    }

    /// With a registrar that holds contracts (TF Chain): the deployment's node contract must
    /// exist, be active, be for this node and the deployment's owner, and hold the
    /// deployment's hash ([`Deployment::contract_hash`]).
    async fn check_contract(&self, doc: &Deployment) -> Result<(), DeployError> {
        if !self.registrar.requires_contracts() {
            return Ok(());
        }
        let Some(id) = doc.contract_id else {
            return Err(DeployError::BadRequest(
                "this node runs only what a node contract on TF Chain pays for: the deployment needs a contract_id".into(),
            ));
        };
        let node_id: Option<u32> = self.store.meta("node_id")?.and_then(|v| v.parse().ok());
        let Some(node_id) = node_id else {
            return Err(DeployError::Unavailable(
                "the node is not registered on the chain yet; try again later".into(),
            ));
        };
        let c = match self.registrar.contract(id).await {
            Ok(Some(c)) => c,
            Ok(None) => {
                return Err(DeployError::Forbidden(format!(
                    "contract {id} does not exist on the chain (never created, or cancelled and removed)"
                )))
            }
            Err(RegistrarError::Refused(m)) => return Err(DeployError::Forbidden(m)),
            Err(e) => {
                return Err(DeployError::Unavailable(format!(
                    "cannot read contract {id} from the chain: {e}"
                )))
            }
        };
        if c.state != ContractState::Created {
            return Err(DeployError::Forbidden(format!(
                "contract {id} is not active on the chain (state {:?})",
                c.state
            )));
        }
        if c.node_id != node_id {
            return Err(DeployError::Forbidden(format!(
                "contract {id} is for node {}, this is node {node_id}",
                c.node_id
            )));
        }
        if c.twin_id != doc.twin_id {
            return Err(DeployError::Forbidden(format!(
                "contract {id} belongs to twin {}, the deployment to twin {}",
                c.twin_id, doc.twin_id
            )));
        }
        let hash = doc.contract_hash();
        if c.deployment_hash != hash {
            return Err(DeployError::Forbidden(format!(
                "contract {id} holds deployment hash {}, this deployment's hash is {} (a changed deployment needs updateNodeContract with its new hash first)",
                hex::encode(c.deployment_hash),
                hex::encode(hash)
            )));
        }
        Ok(())
    }

    /// Reads the contracts of the node's deployments and removes the deployments whose
    /// contract was cancelled (or is gone). A chain that cannot be read changes nothing.
    pub async fn check_contracts(&self) {
        if !self.registrar.requires_contracts() {
            return;
        }
        let Ok(deployments) = self.store.deployments(None) else {
            return;
        };
        for d in deployments {
            let Some(id) = d.contract_id else { continue };
            let gone = match self.registrar.contract(id).await {
                Ok(Some(c)) => match c.state {
                    ContractState::Deleted(cause) => Some(format!("cancelled ({cause})")),
                    _ => None,
                },
                Ok(None) => Some("no longer on the chain (cancelled)".to_string()),
                Err(e) => {
                    warn!("cannot read contract {id}: {e}; keeping its deployment");
                    self.metrics
                        .set_registrar_error("contract check", Some(e.to_string()));
                    return;
                }
            };
            if let Some(why) = gone {
                info!(
                    twin = d.twin_id,
                    deployment = d.deployment_id,
                    contract = id,
                    "contract {why}: removing the deployment"
                );
                if let Err(e) = self.delete(d.twin_id, d.twin_id, d.deployment_id).await {
                    warn!(contract = id, "removing the deployment failed: {e}");
                }
            }
        }
        self.metrics.set_registrar_error("contract check", None);
    }

    /// The public keys of every twin that signed or is asked to sign.
    async fn signer_keys(
        &self,
        doc: &Deployment,
    ) -> Result<HashMap<u32, crate::identity::PublicKey>, DeployError> {
        let mut ids: BTreeSet<u32> = doc.signatures.iter().map(|s| s.twin_id).collect();
        ids.insert(doc.twin_id);
        let mut keys = HashMap::new();
        for id in ids {
            match self.registrar.twin(id).await {
                Ok(Some(t)) => {
                    if let Some(k) = t.key() {
                        keys.insert(id, k);
                    }
                }
                Ok(None) if id == doc.twin_id => {
                    return Err(DeployError::Forbidden(format!(
                        "unknown twin {id} (not on the registrar)"
                    )))
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(DeployError::Unavailable(format!(
                        "cannot verify signatures: {e}"
                    )))
                }
            }
        }
        Ok(keys)
    }

    pub async fn delete(
        &self,
        caller: u32,
        twin_id: u32,
        deployment_id: u64,
    ) -> Result<(), DeployError> {
        if caller != twin_id {
            return Err(DeployError::Forbidden(format!(
                "twin {caller} cannot delete twin {twin_id}'s deployment"
            )));
        }
        let _guard = self.lock.lock().await;
        let row = self.store.deployment(twin_id, deployment_id)?;
        let Some(row) = row.filter(|r| !r.deleted) else {
            return Err(DeployError::NotFound(format!(
                "no deployment {deployment_id} of twin {twin_id}"
            )));
        };
        let op_id = self.store.begin_op(
            OpKind::Delete,
            Some(&row.doc),
            None,
            (twin_id, deployment_id),
        )?;
        crash_point("after-journal");
        self.finish_delete(op_id, twin_id, deployment_id).await?;
        Ok(())
    }

    async fn finish_delete(&self, op_id: i64, twin_id: u32, deployment_id: u64) -> Result<()> {
        let last = self
            .store
            .deployment(twin_id, deployment_id)?
            .map(|r| r.doc);
        self.reconcile(twin_id, deployment_id, None, last.as_ref(), false)
            .await;
        self.store.end_op(op_id)?;
        crash_point("before-cleanup");
        self.collect_garbage(twin_id, deployment_id)?;
        info!(twin = twin_id, deployment = deployment_id, "deleted");
        Ok(())
    }

    /// Removes the files of workloads the committed state no longer has (after an op ended).
    fn collect_garbage(&self, twin_id: u32, deployment_id: u64) -> Result<()> {
        let dir = vmspec::deployment_dir(self.state_dir(), twin_id, deployment_id);
        let desired = self
            .store
            .deployment(twin_id, deployment_id)?
            .filter(|r| !r.deleted)
            .map(|r| r.doc);
        let Some(doc) = desired else {
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            }
            return Ok(());
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if doc.vm(&name).is_none() {
                let _ = std::fs::remove_dir_all(entry.path());
            } else if let Some(vm) = doc.vm(&name) {
                // Volumes the workload no longer declares.
                let vols = entry.path().join("volumes");
                if let Ok(vs) = std::fs::read_dir(&vols) {
                    for v in vs.flatten() {
                        let vname = v.file_name().to_string_lossy().into_owned();
                        if !vm.volumes.iter().any(|x| x.name == vname) {
                            let _ = std::fs::remove_dir_all(v.path());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes the VMs of one deployment match `desired` (None: no VMs). Stops what is not
    /// desired, starts what is missing or changed, leaves unchanged VMs alone. `running` is
    /// the document the VMs that run now were started from.
    ///
    /// Every VM is prepared (images fetched and checked, spec written) before any is started
    /// or replaced, and new VMs start before running ones are replaced. With `abort` (a
    /// change the owner wants rolled back when a workload cannot start) it stops at the first
    /// failure, so the rollback has as little as possible to undo: a VM whose image cannot
    /// be had touches nothing, a new VM that cannot start leaves the running ones alone.
    /// Without it, a VM that cannot start is kept and retried per its restart policy.
    async fn reconcile(
        &self,
        twin_id: u32,
        deployment_id: u64,
        desired: Option<&Deployment>,
        running: Option<&Deployment>,
        abort: bool,
    ) -> Report {
        // However it ends, no VM of this deployment is being prepared or started after it.
        let _steps = StepsCleared {
            engine: self,
            twin_id,
            deployment_id,
            name: None,
        };
        let mut report = Report::default();
        let records = self
            .store
            .vms(Some((twin_id, deployment_id)))
            .unwrap_or_default();
        // VMs no longer desired stop together (each may take its shutdown grace).
        let removed: Vec<&VmRecord> = records
            .iter()
            .filter(|rec| desired.and_then(|d| d.vm(&rec.name)).is_none())
            .collect();
        futures::future::join_all(removed.iter().map(|rec| self.stop_vm(rec, running))).await;
        for rec in removed {
            let _ = self.store.remove_vm(twin_id, deployment_id, &rec.name);
        }
        // Taps of removed VMs go, those of new ones come, before any VM starts.
        let network = self.sync_network().await;
        let Some(doc) = desired else { return report };
        for n in doc.networks() {
            let netns = crate::network::naming::netns_name(twin_id, &n.name);
            let failed = match &network {
                Err(reason) => Some(reason.clone()),
                Ok(r) => r
                    .failed
                    .iter()
                    .find(|(ns, _)| *ns == netns)
                    .map(|(_, why)| format!("network {}: {why}", n.name)),
            };
            if let Some(reason) = failed {
                report.failed.insert(n.name.clone(), reason);
            }
        }
        if abort && !report.failed.is_empty() {
            return report;
        }
        // Prepare every VM first.
        let mut plan = Vec::new();
        for vm in doc.vms() {
            let key = VmKey {
                twin_id,
                deployment_id,
                name: vm.name.clone(),
            };
            let rec = records.iter().find(|r| r.name == vm.name);
            let vmnet = self.vm_network(doc, vm);
            let prepared = match &vmnet {
                Ok(net) => self
                    .prepare(&key, vm, net.clone())
                    .await
                    .map_err(|e| format!("{e:#}")),
                Err(reason) => Err(reason.clone()),
            };
            if let (Err(reason), Some(rec)) = (&prepared, rec) {
                // A VM that runs what is still desired keeps running when its image cannot
                // be had now (a cache removed, a URL down): it needs no new start.
                let unchanged = running.and_then(|d| d.vm(&vm.name)) == Some(vm);
                if unchanged && self.live(rec).is_some() {
                    warn!(vm = %key, "left running as it is: {reason}");
                    report.unchanged.push(vm.name.clone());
                    continue;
                }
            }
            let live = rec.and_then(|r| self.live(r)).is_some();
            plan.push((vm, key, rec, vmnet.ok().flatten(), prepared, live));
        }
        if abort && plan.iter().any(|p| p.4.is_err()) {
            for (vm, _, _, _, prepared, _) in &plan {
                if let Err(reason) = prepared {
                    report.failed.insert(vm.name.clone(), reason.clone());
                }
            }
            return report;
        }
        // New VMs (nothing running to replace) first, then the ones that replace a process.
        plan.sort_by_key(|p| p.5);
        for (vm, key, rec, vmnet, prepared, _) in plan {
            let (paths, spec_hash) = match prepared {
                Ok(p) => p,
                Err(reason) => {
                    // What runs is not what is desired, and what is desired cannot be built.
                    if let Some(rec) = rec {
                        self.stop_vm(rec, running).await;
                    }
                    self.start_failed(&key, rec, "", &reason, 0, vm.restart);
                    report.failed.insert(vm.name.clone(), reason);
                    continue;
                }
            };
            if let Some(rec) = rec.filter(|r| r.spec_hash == spec_hash) {
                // Same spec: leave it to the supervisor (running, restarting, or ended by its
                // policy), unless its start was never recorded, or this change is the one
                // that started it and the start failed (the change is being replayed after a
                // crash, and the owner wants it rolled back then).
                let changed_here = running.and_then(|d| d.vm(&vm.name)) != Some(vm);
                let start_failed = matches!(rec.state, VmState::Restarting | VmState::Failed)
                    && !rec.reason.is_empty()
                    && self.live(rec).is_none();
                if abort && changed_here && start_failed {
                    report.failed.insert(vm.name.clone(), rec.reason.clone());
                    break;
                }
                if rec.state == VmState::Starting && rec.pid.is_none() {
                    if let Some(p) = supervisor::find_by_spec(&paths.spec) {
                        self.record_running(&key, &spec_hash, p, rec.restarts);
                        report.unchanged.push(vm.name.clone());
                        continue;
                    }
                } else {
                    report.unchanged.push(vm.name.clone());
                    continue;
                }
            }
            if let Some(rec) = rec {
                self.stop_vm(rec, running).await;
            }
            match self
                .start_vm(&key, &paths, &spec_hash, 0, vmnet.as_ref(), vm.restart)
                .await
            {
                Ok(()) => report.started.push(vm.name.clone()),
                Err(reason) => {
                    report.failed.insert(vm.name.clone(), reason);
                    if abort {
                        break;
                    }
                }
            }
        }
        report
    }

    /// Whether a failed VM is retried: it failed to start and its policy restarts (a VM
    /// that ended is marked failed only under a policy that does not).
    fn retries_failed(&self, rec: &VmRecord) -> bool {
        self.store
            .deployment(rec.twin_id, rec.deployment_id)
            .ok()
            .flatten()
            .filter(|r| !r.deleted)
            .and_then(|r| r.doc.vm(&rec.name).map(|vm| vm.restart))
            .is_some_and(|p| supervisor::should_restart(p, None))
    }

    /// The process of a VM record, if it still runs.
    fn live(&self, rec: &VmRecord) -> Option<Proc> {
        match (rec.pid, rec.pid_start) {
            (Some(pid), Some(start)) => Some(Proc { pid, start }).filter(Proc::alive),
            _ => {
                let key = VmKey {
                    twin_id: rec.twin_id,
                    deployment_id: rec.deployment_id,
                    name: rec.name.clone(),
                };
                supervisor::find_by_spec(&VmPaths::new(self.state_dir(), &key).spec)
            }
        }
    }

    /// Fetches images, writes the spec; returns the VM's paths and spec hash.
    async fn prepare(
        &self,
        key: &VmKey,
        vm: &VmWorkload,
        net: Option<VmNetwork>,
    ) -> Result<(VmPaths, String)> {
        let fetch = |image: &str| image.starts_with("http://") || image.starts_with("https://");
        let step = if std::iter::once(&vm.image)
            .chain(vm.mounts.iter().map(|m| &m.image))
            .any(|i| fetch(i))
        {
            "fetching and checking its images"
        } else {
            "checking its images"
        };
        let _step = self.step(key, step);
        let state_dir = self.state_dir().to_path_buf();
        let config = self.config.clone();
        let vm = vm.clone();
        let key = key.clone();
        tokio::task::spawn_blocking(move || -> Result<(VmPaths, String)> {
            let paths = VmPaths::new(&state_dir, &key);
            paths.create()?;
            let root = vmspec::resolve_image(&state_dir, &vm.image, vm.image_blake3.as_deref())?;
            let mounts = vm
                .mounts
                .iter()
                .map(|m| vmspec::resolve_image(&state_dir, &m.image, m.image_blake3.as_deref()))
                .collect::<Result<Vec<PathBuf>>>()?;
            let spec = vmspec::build(&config, &vm, &paths, &root, &mounts, net.as_ref())?;
            let hash = vmspec::spec_hash(&spec);
            write_atomic(&paths.spec, &serde_json::to_vec_pretty(&spec)?)?;
            Ok((paths, hash))
        })
        .await
        .map_err(|e| anyhow::anyhow!("preparing the VM: {e}"))?
    }

    /// Starts a VM's vmm: the record (state `starting`) is written before the process exists,
    /// so a crash in between is found at start by the spec path.
    async fn start_vm(
        &self,
        key: &VmKey,
        paths: &VmPaths,
        spec_hash: &str,
        restarts: u32,
        net: Option<&VmNetwork>,
        policy: RestartPolicy,
    ) -> Result<(), String> {
        // How the VM's previous run ended stays readable until this one ends.
        let last_exit = self.store.vm(key).ok().flatten().and_then(|r| r.last_exit);
        let mut rec = VmRecord {
            twin_id: key.twin_id,
            deployment_id: key.deployment_id,
            name: key.name.clone(),
            spec_hash: spec_hash.to_string(),
            state: VmState::Starting,
            reason: String::new(),
            pid: None,
            pid_start: None,
            restarts,
            next_start_at: 0,
            last_exit,
            started_at: Some(now()),
        };
        self.store.put_vm(&rec).map_err(|e| format!("{e:#}"))?;
        let _ = std::fs::remove_file(&paths.api_sock);
        let _step = self.step(key, "starting its vmm");
        // Taps in private networks' namespaces, opened here for the vmm to inherit.
        let fds = net
            .into_iter()
            .flat_map(|n| n.inherited_taps())
            .map(|(ns, tap)| crate::network::links::open_tap(ns, tap))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("network: {e}"));
        let spawned = fds.and_then(|fds| {
            supervisor::spawn_with_fds(
                &self.config.vmm_bin(),
                self.config.vmm.node_config.as_deref(),
                paths,
                fds,
            )
        });
        let proc_ = match spawned {
            Ok(p) => p,
            Err(e) => {
                let reason = format!("{e:#}");
                self.start_failed(key, Some(&rec), spec_hash, &reason, restarts, policy);
                return Err(reason);
            }
        };
        crash_point("after-spawn");
        rec.pid = Some(proc_.pid);
        rec.pid_start = Some(proc_.start);
        self.store.put_vm(&rec).map_err(|e| format!("{e:#}"))?;
        self.set_step(
            key,
            "building the VM (its vmm opens the images and fetches their first chunks)",
        );
        match supervisor::wait_started(paths, proc_, START_TIMEOUT).await {
            Ok(()) => {
                rec.state = VmState::Running;
                self.store.put_vm(&rec).map_err(|e| format!("{e:#}"))?;
                info!(vm = %key, pid = proc_.pid, "started");
                Ok(())
            }
            Err(reason) => {
                supervisor::reap_children();
                if let Ok(exit) = std::fs::read_to_string(&paths.exit_record) {
                    rec.last_exit = Some(exit);
                }
                self.start_failed(key, Some(&rec), spec_hash, &reason, restarts, policy);
                Err(reason)
            }
        }
    }

    fn record_running(&self, key: &VmKey, spec_hash: &str, p: Proc, restarts: u32) {
        let rec = VmRecord {
            twin_id: key.twin_id,
            deployment_id: key.deployment_id,
            name: key.name.clone(),
            spec_hash: spec_hash.to_string(),
            state: VmState::Running,
            reason: String::new(),
            pid: Some(p.pid),
            pid_start: Some(p.start),
            restarts,
            next_start_at: 0,
            last_exit: None,
            started_at: Some(now()),
        };
        let _ = self.store.put_vm(&rec);
    }

    /// Records a start that failed (`restarts`: restarts done before it): with a restart
    /// policy the VM is retried after its backoff, as a VM that ended is; with `never` it
    /// stays failed. Either way the record says why.
    fn start_failed(
        &self,
        key: &VmKey,
        rec: Option<&VmRecord>,
        spec_hash: &str,
        reason: &str,
        restarts: u32,
        policy: RestartPolicy,
    ) {
        let mut r = rec.cloned().unwrap_or(VmRecord {
            twin_id: key.twin_id,
            deployment_id: key.deployment_id,
            name: key.name.clone(),
            spec_hash: String::new(),
            state: VmState::Failed,
            reason: String::new(),
            pid: None,
            pid_start: None,
            restarts: 0,
            next_start_at: 0,
            last_exit: None,
            started_at: None,
        });
        // An empty hash (the spec could not be built) matches no spec: the next reconcile
        // starts the VM whatever it runs.
        r.spec_hash = spec_hash.to_string();
        r.reason = reason.to_string();
        r.pid = None;
        r.pid_start = None;
        r.restarts = restarts;
        if supervisor::should_restart(policy, None) {
            r.state = VmState::Restarting;
            r.next_start_at =
                now() + supervisor::backoff_secs(restarts).min(supervisor::MAX_BACKOFF_SECS);
            warn!(vm = %key, "could not start ({reason}); retrying in {} s", r.next_start_at - now());
        } else {
            r.state = VmState::Failed;
            warn!(vm = %key, "could not start: {reason}");
        }
        let _ = self.store.put_vm(&r);
    }

    /// Stops a VM's vmm: a graceful shutdown, killed only after the guest had its workload's
    /// shutdown grace and the vmm its own deadline (it ends the VM itself then, recording
    /// why). How the VM ended is kept in its record (`last_exit`).
    async fn stop_vm(&self, rec: &VmRecord, running: Option<&Deployment>) {
        let key = VmKey {
            twin_id: rec.twin_id,
            deployment_id: rec.deployment_id,
            name: rec.name.clone(),
        };
        let paths = VmPaths::new(self.state_dir(), &key);
        let proc_ = match (rec.pid, rec.pid_start) {
            (Some(pid), Some(start)) => Some(Proc { pid, start }),
            _ => supervisor::find_by_spec(&paths.spec),
        };
        let Some(p) = proc_ else { return };
        let grace = stop_deadline(&paths, running.and_then(|d| d.vm(&rec.name)));
        let killed = supervisor::stop(&paths, p, grace).await;
        if killed {
            warn!(vm = %key, "the vmm did not end within {} s of a shutdown: killed", grace.as_secs());
        } else {
            info!(vm = %key, "stopped");
        }
        if let Ok(exit) = std::fs::read_to_string(&paths.exit_record) {
            let _ = self.store.set_last_exit(&key, &exit);
        }
    }

    /// After a start of the agent: finish or roll back interrupted ops, notice a node reboot,
    /// and bring every deployment to its desired state (adopting running vmm processes).
    pub async fn recover(&self) -> Result<()> {
        let boot_id =
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let boot_id = boot_id.trim();
        let last = self.store.meta("boot_id")?;
        if last.as_deref() != Some(boot_id) {
            // A new boot: no vmm of the last one survives; start again every VM that was
            // meant to run (not those ended by their policy), and retry at once those whose
            // start failed.
            for mut rec in self.store.vms(None)? {
                if last.is_some() {
                    // Output the vmm wrote but the power cut lost reads as zeros.
                    let key = VmKey {
                        twin_id: rec.twin_id,
                        deployment_id: rec.deployment_id,
                        name: rec.name.clone(),
                    };
                    let console = VmPaths::new(self.state_dir(), &key).console;
                    match crate::console::drop_lost_tail(&console) {
                        Ok(0) => {}
                        Ok(n) => {
                            info!(vm = %key, "{n} bytes of console output lost in the power cut")
                        }
                        Err(e) => warn!(vm = %key, "console log: {e:#}"),
                    }
                }
                let retried = rec.state == VmState::Failed && self.retries_failed(&rec);
                if retried
                    || matches!(
                        rec.state,
                        VmState::Running | VmState::Starting | VmState::Restarting
                    )
                {
                    rec.state = VmState::Restarting;
                    rec.pid = None;
                    rec.pid_start = None;
                    rec.next_start_at = 0;
                    rec.restarts = 0;
                    self.store.put_vm(&rec)?;
                }
            }
            self.store.set_meta("boot_id", boot_id)?;
            if last.is_some() {
                info!("the node rebooted: starting every deployment again");
            }
        }
        let _guard = self.lock.lock().await;
        // The node's networking as the database has it (stale objects of a crash removed,
        // running VMs' taps kept), before any VM starts.
        if let Err(e) = self.sync_network().await {
            warn!("{e}");
        }
        for op in self.store.ops()? {
            info!(op = op.id, kind = ?op.kind, twin = op.twin_id, deployment = op.deployment_id, "finishing an interrupted operation");
            match op.kind {
                OpKind::Delete => {
                    self.finish_delete(op.id, op.twin_id, op.deployment_id)
                        .await?
                }
                OpKind::Create | OpKind::Update => {
                    if let Err(e) = self.apply(&op).await {
                        warn!(op = op.id, "interrupted operation ended: {e}");
                    }
                }
            }
        }
        for d in self.store.deployments(None)? {
            let report = self
                .reconcile(d.twin_id, d.deployment_id, Some(&d), Some(&d), false)
                .await;
            for (name, reason) in report.failed {
                warn!(twin = d.twin_id, deployment = d.deployment_id, vm = %name, "could not start: {reason}");
            }
        }
        // VM records of deployments that no longer exist (a crash between the op and cleanup).
        let active: BTreeSet<(u32, u64)> = self
            .store
            .deployments(None)?
            .iter()
            .map(|d| (d.twin_id, d.deployment_id))
            .collect();
        for rec in self.store.vms(None)? {
            if !active.contains(&(rec.twin_id, rec.deployment_id)) {
                let last = self
                    .store
                    .deployment(rec.twin_id, rec.deployment_id)?
                    .map(|r| r.doc);
                self.stop_vm(&rec, last.as_ref()).await;
                self.store
                    .remove_vm(rec.twin_id, rec.deployment_id, &rec.name)?;
                self.collect_garbage(rec.twin_id, rec.deployment_id)?;
            }
        }
        self.collect_all_garbage()
    }

    /// Removes the files of workloads the committed state no longer has, in every deployment
    /// directory on disk but those of ops still in the journal (a crash between an op's end
    /// and its cleanup leaves such files behind).
    fn collect_all_garbage(&self) -> Result<()> {
        let pending: BTreeSet<(u32, u64)> = self
            .store
            .ops()?
            .iter()
            .map(|o| (o.twin_id, o.deployment_id))
            .collect();
        let Ok(twins) = std::fs::read_dir(self.state_dir().join("vms")) else {
            return Ok(());
        };
        let number = |e: &std::fs::DirEntry| e.file_name().to_str()?.parse::<u64>().ok();
        for t in twins.flatten() {
            let Some(twin) = number(&t).and_then(|n| u32::try_from(n).ok()) else {
                continue;
            };
            let Ok(deployments) = std::fs::read_dir(t.path()) else {
                continue;
            };
            for d in deployments.flatten() {
                match number(&d) {
                    Some(id) if !pending.contains(&(twin, id)) => self.collect_garbage(twin, id)?,
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// One supervisor pass: notice ended VMs, apply restart policies, start due restarts.
    pub async fn tick(&self) {
        let _guard = self.lock.lock().await;
        supervisor::reap_children();
        let Ok(records) = self.store.vms(None) else {
            return;
        };
        let t = now();
        for mut rec in records {
            let key = VmKey {
                twin_id: rec.twin_id,
                deployment_id: rec.deployment_id,
                name: rec.name.clone(),
            };
            let paths = VmPaths::new(self.state_dir(), &key);
            let Some(doc) = self
                .store
                .deployment(rec.twin_id, rec.deployment_id)
                .ok()
                .flatten()
                .filter(|r| !r.deleted)
            else {
                continue;
            };
            let Some(vm) = doc.doc.vm(&rec.name).cloned() else {
                continue;
            };
            match rec.state {
                VmState::Running | VmState::Starting => {
                    let alive = match (rec.pid, rec.pid_start) {
                        (Some(pid), Some(start)) => Proc { pid, start }.alive(),
                        _ => supervisor::find_by_spec(&paths.spec).is_some(),
                    };
                    if alive {
                        continue;
                    }
                    let exit = supervisor::read_exit(&paths);
                    let reason = supervisor::end_reason(&paths);
                    rec.last_exit = std::fs::read_to_string(&paths.exit_record).ok();
                    rec.pid = None;
                    rec.pid_start = None;
                    if rec.started_at.is_some_and(|s| t - s >= STABLE_SECS) {
                        rec.restarts = 0;
                    }
                    if supervisor::should_restart(vm.restart, exit.as_ref()) {
                        rec.state = VmState::Restarting;
                        rec.next_start_at = t + supervisor::backoff_secs(rec.restarts)
                            .min(supervisor::MAX_BACKOFF_SECS);
                        rec.reason = reason.clone();
                        info!(vm = %key, "ended ({reason}); restarting in {} s", rec.next_start_at - t);
                    } else if supervisor::clean_exit(exit.as_ref()) {
                        rec.state = VmState::Exited;
                        rec.reason = reason;
                        info!(vm = %key, "exited");
                    } else {
                        rec.state = VmState::Failed;
                        rec.reason = reason.clone();
                        warn!(vm = %key, "failed: {reason}");
                    }
                    let _ = self.store.put_vm(&rec);
                }
                VmState::Restarting | VmState::Failed
                    if t >= rec.next_start_at
                        && (rec.state == VmState::Restarting
                            || supervisor::should_restart(vm.restart, None)) =>
                {
                    // Due for a restart, or failed to start under a policy that retries.
                    let restarts = rec.restarts.saturating_add(1);
                    let vmnet = self.vm_network(&doc.doc, &vm);
                    let prepared = match &vmnet {
                        Ok(net) => self.prepare(&key, &vm, net.clone()).await,
                        Err(reason) => Err(anyhow::anyhow!(reason.clone())),
                    };
                    let vmnet = vmnet.ok().flatten();
                    // A failure is recorded with its backoff (or as final, by policy).
                    match prepared {
                        Ok((paths, hash)) => {
                            let _ = self
                                .start_vm(&key, &paths, &hash, restarts, vmnet.as_ref(), vm.restart)
                                .await;
                        }
                        Err(e) => {
                            let reason = format!("{e:#}");
                            self.start_failed(&key, Some(&rec), "", &reason, restarts, vm.restart);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// What the vmm is given beyond the guest's shutdown grace before it ends the VM itself
/// (the vmm's margin, 5 s), plus time to write its exit record and exit.
const STOP_SLACK_SECS: u64 = 10;

/// How long a stopping vmm is waited for before it is killed: the shutdown grace of the spec
/// it was started from (its spec file) or of its workload, the longer, plus
/// [`STOP_SLACK_SECS`].
fn stop_deadline(paths: &VmPaths, workload: Option<&VmWorkload>) -> Duration {
    let from_spec = std::fs::read(&paths.spec)
        .ok()
        .and_then(|b| serde_json::from_slice::<vm_spec::VmSpec>(&b).ok())
        .map(|s| s.shutdown_grace_secs);
    let from_workload = workload.map(|w| w.shutdown_grace_secs);
    let grace = from_spec
        .into_iter()
        .chain(from_workload)
        .max()
        .unwrap_or(vm_spec::spec::DEFAULT_SHUTDOWN_GRACE_SECS)
        .min(vm_spec::spec::MAX_SHUTDOWN_GRACE_SECS);
    Duration::from_secs(u64::from(grace) + STOP_SLACK_SECS)
}

/// When dropped, clears the steps of one VM (`name`) or of every VM of a deployment.
struct StepsCleared<'a> {
    engine: &'a Engine,
    twin_id: u32,
    deployment_id: u64,
    name: Option<String>,
}

impl Drop for StepsCleared<'_> {
    fn drop(&mut self) {
        if let Ok(mut steps) = self.engine.steps.lock() {
            steps.retain(|k, _| {
                (k.twin_id, k.deployment_id) != (self.twin_id, self.deployment_id)
                    || self.name.as_ref().is_some_and(|n| *n != k.name)
            });
        }
    }
}

#[derive(Debug, Default)]
struct Report {
    started: Vec<String>,
    unchanged: Vec<String>,
    failed: BTreeMap<String, String>,
}

/// Writes a file through a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
