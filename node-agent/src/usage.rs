//! Reports what each node contract's deployment uses on this node to the registrar
//! (`smartContractModule.reportContractResources` on TF Chain, which bills the contract's
//! compute and storage units by it), in the background: workloads never wait for it.
//!
//! As Zero-OS nodes do, on change and on a timer: when a deployment is admitted or updated the
//! contracts whose usage changed are reported at once, and every interval all of them. What is
//! reported is derived from the node's deployments, so nothing is queued that could be lost: a
//! report that could not be sent (chain down, refused) is retried with backoff until the
//! chain has it, and after an agent restart everything is reported again. Success means the
//! extrinsic is in a block (with an `UpdatedUsedResources` event per contract the chain took).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::capacity::Resources;
use crate::engine::Engine;
use crate::identity::KeyPair;
use crate::registrar::{ContractUsage, RegistrarError};

/// Longest wait between two attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often to look again while the node is not registered yet.
const UNREGISTERED_POLL: Duration = Duration::from_secs(2);

pub struct ResourceReporter {
    pub engine: Arc<Engine>,
    /// The node's key (the chain takes reports from the node's account only).
    pub key: KeyPair,
    /// Every contract is reported again this often.
    pub interval: Duration,
    /// What the chain has, as far as this agent knows: contract -> usage last taken.
    sent: BTreeMap<u64, Resources>,
}

/// What one pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    /// The node has no node id yet (not registered): nothing sent.
    NotRegistered,
    /// The usage of `taken` is in a block (possibly none: nothing had changed); the chain
    /// skipped `skipped`, contracts it does not hold (cancelled and removed, or not there
    /// yet after the chain was reset), which are sent again later.
    Reported {
        taken: Vec<ContractUsage>,
        skipped: Vec<u64>,
    },
}

impl ResourceReporter {
    pub fn new(engine: Arc<Engine>, key: KeyPair, interval: Duration) -> Self {
        Self {
            engine,
            key,
            interval,
            sent: BTreeMap::new(),
        }
    }

    /// One pass: reports the usage of every contract whose usage differs from what the chain
    /// was last told (every contract with `all`). On an error nothing is marked sent, so the
    /// next pass sends it again.
    pub async fn report(&mut self, all: bool) -> Result<Pass, RegistrarError> {
        let registered = self
            .engine
            .store
            .meta("node_id")
            .map_err(|e| RegistrarError::Store(format!("{e:#}")))?
            .is_some();
        if !registered {
            return Ok(Pass::NotRegistered);
        }
        let usage = self
            .engine
            .contract_usage()
            .map_err(|e| RegistrarError::Store(format!("{e:#}")))?;
        // Contracts whose deployment is gone are forgotten (the chain drops their resources
        // when the contract is cancelled).
        self.sent
            .retain(|id, _| usage.iter().any(|u| u.contract_id == *id));
        let due: Vec<ContractUsage> = usage
            .into_iter()
            .filter(|u| all || self.sent.get(&u.contract_id) != Some(&u.used))
            .collect();
        if due.is_empty() {
            return Ok(Pass::Reported {
                taken: due,
                skipped: Vec::new(),
            });
        }
        let t0 = Instant::now();
        let taken = match self
            .engine
            .registrar
            .report_contract_resources(&self.key, &due)
            .await
        {
            Ok(taken) => taken,
            // One contract the chain refuses (one no longer on this node) must not hold back
            // the others: each on its own, then the first refusal is the error.
            Err(RegistrarError::Refused(m)) if due.len() > 1 => {
                warn!("contract resources report refused ({m}); reporting each contract alone");
                let mut taken = Vec::new();
                let mut first_err = None;
                for u in &due {
                    match self
                        .engine
                        .registrar
                        .report_contract_resources(&self.key, std::slice::from_ref(u))
                        .await
                    {
                        Ok(t) => taken.extend(t),
                        Err(e) => {
                            warn!(contract = u.contract_id, "resources report failed: {e}");
                            first_err.get_or_insert(e);
                        }
                    }
                }
                if let Some(e) = first_err {
                    self.mark(&due, &taken);
                    return Err(e);
                }
                taken
            }
            Err(e) => return Err(e),
        };
        self.mark(&due, &taken);
        let (taken, skipped): (Vec<ContractUsage>, Vec<ContractUsage>) = due
            .into_iter()
            .partition(|u| taken.contains(&u.contract_id));
        let skipped: Vec<u64> = skipped.iter().map(|u| u.contract_id).collect();
        for id in &skipped {
            // The chain does not hold the contract: cancelled (the contract poll removes its
            // deployment) or, after a chain reset, not there yet. Sent again later.
            warn!(
                contract = id,
                "the chain took no resources report for this contract (not on the chain); retrying later"
            );
        }
        info!(
            contracts = taken.len(),
            ms = t0.elapsed().as_millis() as u64,
            "contract resources reported"
        );
        Ok(Pass::Reported { taken, skipped })
    }

    /// Marks the contracts the registrar took as sent.
    fn mark(&mut self, due: &[ContractUsage], taken: &[u64]) {
        for u in due {
            if taken.contains(&u.contract_id) {
                self.sent.insert(u.contract_id, u.used);
            }
        }
        self.engine
            .metrics
            .resource_reports_sent
            .fetch_add(taken.len() as u64, Ordering::Relaxed);
    }

    /// Runs forever: a full report at start and every interval, the changed contracts as soon
    /// as a deployment is admitted or updated, and retries with backoff after failures.
    pub async fn run(mut self) {
        let metrics = self.engine.metrics.clone();
        let mut next_full = tokio::time::Instant::now();
        let mut backoff = Duration::from_secs(1);
        loop {
            let full = tokio::time::Instant::now() >= next_full;
            match self.report(full).await {
                Ok(Pass::NotRegistered) => {
                    debug!("contract resources: the node is not registered yet");
                    tokio::time::sleep(UNREGISTERED_POLL).await;
                }
                Ok(Pass::Reported { skipped, .. }) => {
                    if full {
                        next_full = tokio::time::Instant::now() + self.interval;
                    }
                    metrics.set_registrar_error("contract resources", None);
                    // Skipped contracts are tried again with backoff (until the contract poll
                    // removes a cancelled one's deployment), the others on change or timer.
                    let wake = if skipped.is_empty() {
                        backoff = Duration::from_secs(1);
                        next_full
                    } else {
                        let at = tokio::time::Instant::now() + backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        at.min(next_full)
                    };
                    tokio::select! {
                        _ = self.engine.usage_changed.notified() => {}
                        _ = tokio::time::sleep_until(wake) => {}
                    }
                }
                Err(e) => {
                    metrics
                        .resource_report_errors
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(
                        "contract resources report failed (kept, retrying in {} s): {e}",
                        backoff.as_secs()
                    );
                    metrics.set_registrar_error("contract resources", Some(e.to_string()));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}
