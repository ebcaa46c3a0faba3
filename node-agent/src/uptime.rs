//! Registration and uptime reports, in the background: workloads never wait for them.
//!
//! At start and whenever capacity, location or interfaces change (checked at every pass, a
//! minute apart at most while the registrar answers), the node (re-)registers: its key becomes a twin, the twin's node is created or updated on the
//! farm with what it detects of the host (physical interfaces with their addresses, serial
//! number, virtualization, Secure Boot). Every interval an uptime
//! report (the host's uptime, not the agent's) is queued in the database and the queue is sent
//! oldest first; a report that could not be sent stays queued and is retried with backoff,
//! never dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::capacity::Resources;
use crate::config::AgentConfig;
use crate::identity::KeyPair;
use crate::metrics::Metrics;
use crate::registrar::{Interface, NodeInfo, Registrar, RegistrarError, UptimeReport};
use crate::state::Store;

pub struct Registration {
    pub config: AgentConfig,
    pub key: KeyPair,
    pub registrar: Arc<dyn Registrar>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub capacity: Resources,
}

/// The host's uptime in seconds (`/proc/uptime`).
pub fn host_uptime() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/uptime")?;
    let secs: f64 = text
        .split_whitespace()
        .next()
        .context("empty /proc/uptime")?
        .parse()?;
    Ok(secs as u64)
}

/// Physical network interfaces (those backed by a device), by name and MAC, with their
/// addresses (IPv4, and IPv6 but link-local; read over rtnetlink), sorted.
pub async fn interfaces() -> Vec<Interface> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return out;
    };
    let links = match crate::network::links::Links::connect() {
        Ok(l) => Some(l),
        Err(e) => {
            warn!("cannot read the interfaces' addresses: {e}");
            None
        }
    };
    for e in entries.flatten() {
        let p = e.path();
        if !p.join("device").exists() {
            continue;
        }
        let read = |f: &str| {
            std::fs::read_to_string(p.join(f))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let mut ips = Vec::new();
        if let (Some(links), Ok(index)) = (&links, read("ifindex").parse::<u32>()) {
            match links.addresses(index).await {
                Ok(addrs) => ips.extend(
                    addrs
                        .into_iter()
                        .filter(|(ip, _)| match ip {
                            std::net::IpAddr::V4(_) => true,
                            std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
                        })
                        .map(|(ip, _)| ip.to_string()),
                ),
                Err(e) => warn!("cannot read the addresses of interface {index}: {e}"),
            }
        }
        ips.sort();
        ips.dedup();
        out.push(Interface {
            name: e.file_name().to_string_lossy().into_owned(),
            mac: read("address"),
            ips,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The system's serial number as its firmware gives it (DMI `product_serial`; empty when
/// there is none or it cannot be read).
pub fn serial_number() -> String {
    std::fs::read_to_string("/sys/class/dmi/id/product_serial")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Whether the host runs under a hypervisor (Xen's `/sys/hypervisor`, or the CPU's
/// `hypervisor` flag).
pub fn virtualized() -> bool {
    std::path::Path::new("/sys/hypervisor/type").exists()
        || std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| {
                c.lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|f| f == "hypervisor"))
            })
            .unwrap_or(false)
}

/// Whether the host booted with UEFI Secure Boot on: the `SecureBoot` variable of the EFI
/// global namespace is 1 (efivarfs: 4 bytes of attributes, then the value). A host booted
/// without UEFI has no such variable.
pub fn secure_boot() -> bool {
    const VAR: &str = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";
    std::fs::read(VAR).is_ok_and(|b| b.len() == 5 && b[4] == 1)
}

impl Registration {
    /// What the node says of itself: its farm, capacity and location as configured, and what
    /// it detects of the host.
    pub async fn node_info(&self) -> NodeInfo {
        NodeInfo {
            farm_id: self.config.farm_id,
            capacity: self.capacity,
            location: self.config.location.clone(),
            interfaces: interfaces().await,
            serial_number: serial_number(),
            virtualized: virtualized(),
            secure_boot: secure_boot(),
        }
    }

    /// Registers (or updates) the node with what it detects now; returns (twin id, node id).
    pub async fn register(&self) -> Result<(u32, u32), RegistrarError> {
        self.register_as(&self.node_info().await).await
    }

    /// Registers the node with `info`, or updates it when the registrar holds something else
    /// (capacity, location, interfaces...); returns (twin id, node id).
    pub async fn register_as(&self, info: &NodeInfo) -> Result<(u32, u32), RegistrarError> {
        let twin = match self.registrar.twin_by_key(&self.key.public()).await? {
            Some(t) => t,
            None => self.registrar.create_twin(&self.key).await?,
        };
        if self.registrar.farm(self.config.farm_id).await?.is_none() {
            if self.config.registrar == "local" {
                self.registrar
                    .create_farm(&self.key, twin.id, &format!("farm-{}", self.config.farm_id))
                    .await?;
            } else {
                return Err(RegistrarError::UnknownFarm(self.config.farm_id));
            }
        }
        let existing = self.registrar.node_by_twin(twin.id).await?;
        let node = match existing {
            Some(n) if n.info == self.registrar.as_stored(info) => n,
            _ => {
                self.registrar
                    .register_node(&self.key, twin.id, info)
                    .await?
            }
        };
        let _ = self.store.set_meta("twin_id", &twin.id.to_string());
        let _ = self.store.set_meta("node_id", &node.id.to_string());
        Ok((twin.id, node.id))
    }

    /// Sends queued uptime reports, oldest first; stops at the first failure.
    async fn flush_uptime(&self, twin: u32, node: u32) -> Result<(), RegistrarError> {
        let pending = self
            .store
            .pending_uptime()
            .map_err(|e| RegistrarError::Store(format!("{e:#}")))?;
        for (id, uptime, timestamp) in pending {
            self.registrar
                .report_uptime(&self.key, twin, node, &UptimeReport { uptime, timestamp })
                .await?;
            let _ = self.store.uptime_sent(id);
            self.metrics
                .uptime_reports_sent
                .fetch_add(1, Ordering::Relaxed);
            self.metrics
                .last_uptime_report
                .store(timestamp, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Runs forever: register (retrying with backoff), then report uptime every interval.
    pub async fn run(self) {
        let interval = Duration::from_secs(self.config.uptime_interval_secs.max(1));
        let mut backoff = Duration::from_secs(1);
        let mut ids: Option<(u32, u32)> = None;
        let mut last_info: Option<NodeInfo> = None;
        let mut next_report = tokio::time::Instant::now();
        loop {
            let info = self.node_info().await;
            if ids.is_none() || last_info.as_ref() != Some(&info) {
                match self.register_as(&info).await {
                    Ok(got) => {
                        if ids.is_none() {
                            info!(twin = got.0, node = got.1, "registered");
                        } else {
                            info!(
                                "registration updated (capacity, location or interfaces changed)"
                            );
                        }
                        ids = Some(got);
                        last_info = Some(info);
                        self.metrics.set_registrar_error("registration", None);
                        self.metrics.registered.store(1, Ordering::Relaxed);
                        backoff = Duration::from_secs(1);
                    }
                    Err(e) => {
                        self.metrics
                            .registration_errors
                            .fetch_add(1, Ordering::Relaxed);
                        warn!(
                            "registration failed (retrying in {} s): {e}",
                            backoff.as_secs()
                        );
                        self.metrics
                            .set_registrar_error("registration", Some(e.to_string()));
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(300));
                        continue;
                    }
                }
            }
            let Some((twin, node)) = ids else { continue };
            if tokio::time::Instant::now() >= next_report {
                match host_uptime() {
                    Ok(up) => {
                        info!(uptime = up, "uptime report due");
                        if let Err(e) = self.store.queue_uptime(up, crate::auth::now_unix()) {
                            warn!("cannot queue the uptime report: {e:#}");
                        }
                    }
                    Err(e) => warn!("cannot read the host's uptime: {e:#}"),
                }
                next_report += interval;
            }
            match self.flush_uptime(twin, node).await {
                Ok(()) => {
                    backoff = Duration::from_secs(1);
                    self.metrics.set_registrar_error("uptime report", None);
                    let wait = next_report.saturating_duration_since(tokio::time::Instant::now());
                    tokio::time::sleep(wait.min(Duration::from_secs(60))).await;
                }
                Err(e) => {
                    self.metrics
                        .uptime_report_errors
                        .fetch_add(1, Ordering::Relaxed);
                    // The registrar no longer knows the node (a chain reset to its genesis):
                    // register again, the queued reports wait for it.
                    let msg = e.to_string();
                    if msg.contains("TwinNotExists") || msg.contains("NodeNotExists") {
                        warn!("the registrar lost this node: registering again");
                        ids = None;
                    }
                    warn!(
                        "uptime report failed (kept, retrying in {} s): {e}",
                        backoff.as_secs()
                    );
                    self.metrics
                        .set_registrar_error("uptime report", Some(e.to_string()));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(300));
                }
            }
        }
    }
}
