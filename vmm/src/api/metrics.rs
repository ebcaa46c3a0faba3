//! `GET /metrics`: the VM's counters in Prometheus text format (version 0.0.4): vCPU exits by
//! reason, virtio requests/bytes/errors per device and transport, serial bytes, the vmm's
//! resident memory.

use std::fmt::Write;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use crate::control::VmControl;
use crate::devices::bus::lock;
use crate::vstate::run_state::ExitReason;

static STATM: OnceLock<File> = OnceLock::new();

/// Opens what the metrics read later from a thread that may no longer open files
/// (/proc/self/statm). Call before the controller thread's filter is in place.
pub fn prepare() {
    if let Ok(file) = File::open("/proc/self/statm") {
        let _ = STATM.set(file);
    }
}

/// Resident memory of the vmm process in bytes (guest memory it touched included).
pub fn rss_bytes() -> Option<u64> {
    let file = STATM.get()?;
    let mut buf = [0u8; 128];
    let n = file.read_at(&mut buf, 0).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Label values are device ids from the spec: escape what the format requires.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(control: &VmControl) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "vmm_uptime_seconds",
        "gauge",
        "seconds since the vmm started",
    );
    let _ = writeln!(
        out,
        "vmm_uptime_seconds {:.3}",
        control.exit().started().elapsed().as_secs_f64()
    );
    if let Some(booted) = control.exit().booted_after() {
        family(
            &mut out,
            "vmm_boot_seconds",
            "gauge",
            "seconds from the vmm's start to the guest's booted report",
        );
        let _ = writeln!(out, "vmm_boot_seconds {:.3}", booted.as_secs_f64());
    }
    if let Some(rss) = rss_bytes() {
        family(
            &mut out,
            "vmm_resident_memory_bytes",
            "gauge",
            "resident memory of the vmm process, guest memory it touched included",
        );
        let _ = writeln!(out, "vmm_resident_memory_bytes {rss}");
    }

    family(
        &mut out,
        "vmm_vcpu_exits_total",
        "counter",
        "vCPU exits from KVM_RUN by reason",
    );
    let state = control.run_state();
    for index in 0..state.vcpu_count() {
        let Some(exits) = state.exits(index) else {
            continue;
        };
        for reason in ExitReason::ALL {
            let _ = writeln!(
                out,
                "vmm_vcpu_exits_total{{vcpu=\"{index}\",reason=\"{}\"}} {}",
                reason.name(),
                exits.get(reason)
            );
        }
    }

    family(
        &mut out,
        "vmm_serial_bytes_total",
        "counter",
        "bytes the guest wrote to its serial console",
    );
    let _ = writeln!(
        out,
        "vmm_serial_bytes_total {}",
        control.legacy.serial_bytes.load(Ordering::Relaxed)
    );

    let mut device_lines: Vec<(String, String)> = Vec::new();
    for device in control.devices() {
        let labels = format!("device=\"{}\",kind=\"{}\"", label(&device.id), device.kind);
        if let Some(metrics) = &device.metrics {
            for (name, _help, value) in metrics.snapshot() {
                device_lines.push((
                    format!("vmm_virtio_{name}_total"),
                    format!("vmm_virtio_{name}_total{{{labels}}} {value}"),
                ));
            }
        }
        if let Some(extra) = &device.extra_metrics {
            for (name, _help, value) in extra.snapshot() {
                let kind = device.kind;
                device_lines.push((
                    format!("vmm_{kind}_{name}_total"),
                    format!("vmm_{kind}_{name}_total{{{labels}}} {value}"),
                ));
            }
        }
        let transport = lock(&device.transport).counters();
        for (name, value) in [
            ("bad_accesses", &transport.bad_accesses),
            ("refused_status", &transport.refused_status),
            ("refused_writes", &transport.refused_writes),
            ("failed_activations", &transport.failed_activations),
            ("resets", &transport.resets),
        ] {
            device_lines.push((
                format!("vmm_virtio_mmio_{name}_total"),
                format!(
                    "vmm_virtio_mmio_{name}_total{{{labels}}} {}",
                    value.load(Ordering::Relaxed)
                ),
            ));
        }
    }
    // Group each metric's lines under one HELP/TYPE, as the format wants.
    device_lines.sort_by(|a, b| a.0.cmp(&b.0));
    let mut current = String::new();
    for (name, line) in device_lines {
        if name != current {
            family(
                &mut out,
                &name,
                "counter",
                "virtio device counter (see the README)",
            );
            current = name;
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}
