//! Prometheus metrics of the agent (`GET /metrics`): workloads by state, capacity used and
//! total, registration and uptime-report status, and a deploy latency histogram.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::capacity::Resources;
use crate::state::{VmRecord, VmState};

/// Upper bounds (seconds) of the deploy latency buckets.
const BUCKETS: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

#[derive(Default)]
pub struct Metrics {
    deploy_buckets: [AtomicU64; BUCKETS.len()],
    deploy_count: AtomicU64,
    deploy_sum_ms: AtomicU64,
    /// 1 when the node is registered.
    pub registered: AtomicU64,
    pub registration_errors: AtomicU64,
    pub uptime_reports_sent: AtomicU64,
    pub uptime_report_errors: AtomicU64,
    /// Unix seconds of the last accepted uptime report.
    pub last_uptime_report: AtomicI64,
    /// The registrar's last error of each task talking to it (`registration`, `uptime
    /// report`, `contract check`, `contract resources`), each cleared by that task's next
    /// success: the node's health as the API shows it.
    pub registrar_errors: std::sync::Mutex<std::collections::BTreeMap<&'static str, String>>,
    /// Contract resource reports in a block, and failed attempts.
    pub resource_reports_sent: AtomicU64,
    pub resource_report_errors: AtomicU64,
}

impl Metrics {
    /// Sets (`Some`) or clears (`None`) the registrar error of one task (`source`).
    pub fn set_registrar_error(&self, source: &'static str, e: Option<String>) {
        if let Ok(mut g) = self.registrar_errors.lock() {
            match e {
                Some(e) => {
                    g.insert(source, e);
                }
                None => {
                    g.remove(source);
                }
            }
        }
    }

    /// Every task's current error, `source: error`, joined by `; ` (`None`: all is well).
    pub fn registrar_error(&self) -> Option<String> {
        let g = self.registrar_errors.lock().ok()?;
        if g.is_empty() {
            return None;
        }
        Some(
            g.iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }

    pub fn observe_deploy(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.deploy_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.deploy_count.fetch_add(1, Ordering::Relaxed);
        self.deploy_sum_ms
            .fetch_add(d.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn render(
        &self,
        vms: &[VmRecord],
        used: Resources,
        total: Resources,
        pending_uptime: usize,
    ) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP gridnode_workloads VMs by state.\n# TYPE gridnode_workloads gauge"
        );
        for state in [
            VmState::Starting,
            VmState::Running,
            VmState::Restarting,
            VmState::Exited,
            VmState::Failed,
        ] {
            let n = vms.iter().filter(|v| v.state == state).count();
            let name = serde_json::to_value(state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let _ = writeln!(out, "gridnode_workloads{{state=\"{name}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP gridnode_capacity Capacity offered (total) and used by deployments.\n# TYPE gridnode_capacity gauge");
        for (res, u, t) in [
            ("cru", used.cru, total.cru),
            ("mru", used.mru, total.mru),
            ("sru", used.sru, total.sru),
            ("hru", used.hru, total.hru),
        ] {
            let _ = writeln!(
                out,
                "gridnode_capacity{{resource=\"{res}\",kind=\"used\"}} {u}"
            );
            let _ = writeln!(
                out,
                "gridnode_capacity{{resource=\"{res}\",kind=\"total\"}} {t}"
            );
        }
        let g = |o: &mut String, name: &str, help: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        g(
            &mut out,
            "gridnode_registered",
            "1 when the node is registered.",
            self.registered.load(Ordering::Relaxed).to_string(),
        );
        g(
            &mut out,
            "gridnode_registration_errors_total",
            "Failed registration attempts.",
            self.registration_errors.load(Ordering::Relaxed).to_string(),
        );
        g(
            &mut out,
            "gridnode_uptime_reports_sent_total",
            "Uptime reports accepted.",
            self.uptime_reports_sent.load(Ordering::Relaxed).to_string(),
        );
        g(
            &mut out,
            "gridnode_uptime_report_errors_total",
            "Failed uptime report attempts.",
            self.uptime_report_errors
                .load(Ordering::Relaxed)
                .to_string(),
        );
        g(
            &mut out,
            "gridnode_resource_reports_sent_total",
            "Contract resource reports in a block.",
            self.resource_reports_sent
                .load(Ordering::Relaxed)
                .to_string(),
        );
        g(
            &mut out,
            "gridnode_resource_report_errors_total",
            "Failed contract resource report attempts.",
            self.resource_report_errors
                .load(Ordering::Relaxed)
                .to_string(),
        );
        g(
            &mut out,
            "gridnode_uptime_reports_pending",
            "Uptime reports waiting to be sent.",
            pending_uptime.to_string(),
        );
        g(
            &mut out,
            "gridnode_last_uptime_report_timestamp_seconds",
            "When the last report was accepted.",
            self.last_uptime_report.load(Ordering::Relaxed).to_string(),
        );
        let _ = writeln!(out, "# HELP gridnode_deploy_seconds Deploy latency (request to VMs started).\n# TYPE gridnode_deploy_seconds histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "gridnode_deploy_seconds_bucket{{le=\"{b}\"}} {}",
                self.deploy_buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.deploy_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "gridnode_deploy_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "gridnode_deploy_seconds_sum {}",
            self.deploy_sum_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
        let _ = writeln!(out, "gridnode_deploy_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.observe_deploy(Duration::from_millis(300));
        m.observe_deploy(Duration::from_secs(20));
        let text = m.render(&[], Resources::default(), Resources::default(), 0);
        assert!(text.contains("gridnode_deploy_seconds_bucket{le=\"0.25\"} 0"));
        assert!(text.contains("gridnode_deploy_seconds_bucket{le=\"0.5\"} 1"));
        assert!(text.contains("gridnode_deploy_seconds_bucket{le=\"30\"} 2"));
        assert!(text.contains("gridnode_deploy_seconds_count 2"));
    }
}
