//! What the node's memory is spent on, for the operator's health view (`GET /node`) and the
//! metrics: the host's total and available memory, the agent's own resident set, and the sum of
//! the resident sets of the vmm processes the agent runs (a VM's guest memory as far as the
//! guest touched it, plus the vmm's own overhead).

use std::fs;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::state::VmRecord;
use crate::supervisor::Proc;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeMemory {
    /// `MemTotal` of the host.
    pub total_bytes: u64,
    /// `MemAvailable` of the host.
    pub available_bytes: u64,
    /// The agent's resident set.
    pub agent_rss_bytes: u64,
    /// The resident sets of the agent's live vmm processes, summed.
    pub vmm_rss_bytes: u64,
    /// How many vmm processes that sum covers.
    pub vmm_processes: u64,
}

/// A `Name:   N kB` field of a /proc file, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib.saturating_mul(1024))
}

fn rss_of(pid: &str) -> Option<u64> {
    kib_field(
        &fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        "VmRSS",
    )
}

impl NodeMemory {
    /// Measures now; a VM record counts when its recorded process is still that process.
    pub fn measure(vms: &[VmRecord]) -> Self {
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mut m = NodeMemory {
            total_bytes: kib_field(&meminfo, "MemTotal").unwrap_or(0),
            available_bytes: kib_field(&meminfo, "MemAvailable").unwrap_or(0),
            agent_rss_bytes: rss_of("self").unwrap_or(0),
            ..Default::default()
        };
        for vm in vms {
            let (Some(pid), Some(start)) = (vm.pid, vm.pid_start) else {
                continue;
            };
            if Proc::of(pid) != Some(Proc { pid, start }) {
                continue;
            }
            if let Some(rss) = rss_of(&pid.to_string()) {
                m.vmm_rss_bytes = m.vmm_rss_bytes.saturating_add(rss);
                m.vmm_processes += 1;
            }
        }
        m
    }

    /// Appends the Prometheus lines.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let lines = [
            (
                "gridnode_node_memory_total_bytes",
                "The host's memory.",
                self.total_bytes,
            ),
            (
                "gridnode_node_memory_available_bytes",
                "The host's available memory (MemAvailable).",
                self.available_bytes,
            ),
            (
                "process_resident_memory_bytes",
                "The agent's resident set.",
                self.agent_rss_bytes,
            ),
            (
                "gridnode_vmm_resident_bytes",
                "The resident sets of the agent's vmm processes, summed.",
                self.vmm_rss_bytes,
            ),
            (
                "gridnode_vmm_processes",
                "Live vmm processes of the agent.",
                self.vmm_processes,
            ),
        ];
        for (name, help, value) in lines {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_parse_in_bytes_and_garbage_is_none() {
        let t = "MemTotal:       16384 kB\nMemFree: 1 kB\nMemAvailable:    2048 kB\n";
        assert_eq!(kib_field(t, "MemTotal"), Some(16384 * 1024));
        assert_eq!(kib_field(t, "MemAvailable"), Some(2048 * 1024));
        assert_eq!(kib_field(t, "Mem"), None);
        assert_eq!(kib_field("MemTotal: lots kB", "MemTotal"), None);
    }

    #[test]
    fn the_agent_measures_itself_and_skips_dead_or_reused_pids() {
        let me = std::process::id() as i32;
        let start = Proc::of(me).map(|p| p.start);
        let rec = |pid, start| VmRecord {
            twin_id: 1,
            deployment_id: 1,
            name: "vm".into(),
            spec_hash: String::new(),
            state: crate::state::VmState::Running,
            reason: String::new(),
            pid: Some(pid),
            pid_start: start,
            restarts: 0,
            next_start_at: 0,
            last_exit: None,
            started_at: None,
        };
        let m = NodeMemory::measure(&[
            rec(me, start),
            rec(me, start.map(|s| s + 1)),
            rec(i32::MAX, Some(1)),
        ]);
        assert!(m.total_bytes > 0 && m.available_bytes > 0);
        assert!(m.agent_rss_bytes > 0);
        assert_eq!(m.vmm_processes, 1, "{m:?}");
        assert!(m.vmm_rss_bytes > 0, "{m:?}");
        let mut text = String::new();
        m.render(&mut text);
        assert!(text.contains("gridnode_vmm_processes 1\n"), "{text}");
    }
}
