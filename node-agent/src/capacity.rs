//! The node's capacity: CPU threads (cru), memory (mru), SSD (sru) and HDD (hru) bytes, read
//! from the host, minus the operator's reserve; and what deployments use of it.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::deployment::Deployment;

const MIB: u64 = 1 << 20;

/// Amounts in the grid's units: threads and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub cru: u64,
    pub mru: u64,
    pub sru: u64,
    pub hru: u64,
}

impl Resources {
    pub fn saturating_sub(self, o: Resources) -> Resources {
        Resources {
            cru: self.cru.saturating_sub(o.cru),
            mru: self.mru.saturating_sub(o.mru),
            sru: self.sru.saturating_sub(o.sru),
            hru: self.hru.saturating_sub(o.hru),
        }
    }

    pub fn saturating_add(self, o: Resources) -> Resources {
        Resources {
            cru: self.cru.saturating_add(o.cru),
            mru: self.mru.saturating_add(o.mru),
            sru: self.sru.saturating_add(o.sru),
            hru: self.hru.saturating_add(o.hru),
        }
    }

    /// The first resource in which `self` exceeds `limit`, named, with both amounts.
    pub fn exceeds(&self, limit: &Resources) -> Option<String> {
        let checks = [
            ("cru (vCPUs)", self.cru, limit.cru, 1),
            ("mru (memory MiB)", self.mru, limit.mru, MIB),
            ("sru (SSD MiB)", self.sru, limit.sru, MIB),
            ("hru (HDD MiB)", self.hru, limit.hru, MIB),
        ];
        checks
            .into_iter()
            .find(|(_, want, have, _)| want > have)
            .map(|(name, want, have, unit)| {
                format!("{name}: needs {}, {} free", want / unit, have / unit)
            })
    }
}

/// What the operator sets the node to offer, resource by resource, in place of the detected
/// amount minus the reserve (`--capacity sru=500G,hru=0`, or `capacity` in the config). For a
/// host whose detection is wrong for the grid, e.g. an SSD below TF Chain's minimum of 100 GiB
/// for a node (`createNode` fails with `InvalidSRUInput`) when the workloads' disks live
/// elsewhere. Memory and disks in bytes (the config takes a number or a size with a binary
/// unit, `8G`), CPU in threads. The engine admits deployments up to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CapacityOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cru: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "size_opt"
    )]
    pub mru: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "size_opt"
    )]
    pub sru: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "size_opt"
    )]
    pub hru: Option<u64>,
}

impl CapacityOverride {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// `offered` with the overridden resources replaced.
    pub fn apply(&self, offered: Resources) -> Resources {
        Resources {
            cru: self.cru.unwrap_or(offered.cru),
            mru: self.mru.unwrap_or(offered.mru),
            sru: self.sru.unwrap_or(offered.sru),
            hru: self.hru.unwrap_or(offered.hru),
        }
    }

    /// `self`, with the resources `other` sets taken from `other` (flags over the config).
    pub fn or(self, other: CapacityOverride) -> CapacityOverride {
        CapacityOverride {
            cru: other.cru.or(self.cru),
            mru: other.mru.or(self.mru),
            sru: other.sru.or(self.sru),
            hru: other.hru.or(self.hru),
        }
    }
}

impl std::str::FromStr for CapacityOverride {
    type Err = String;

    /// `RES=AMOUNT[,RES=AMOUNT...]`: `cru=4,mru=8G,sru=500G,hru=0`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = CapacityOverride::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, amount) = part.split_once('=').ok_or_else(|| {
                format!("`{part}`: expected RESOURCE=AMOUNT, e.g. sru=500G (resources: cru, mru, sru, hru)")
            })?;
            let (name, amount) = (name.trim(), amount.trim());
            let slot = match name {
                "cru" => &mut out.cru,
                "mru" => &mut out.mru,
                "sru" => &mut out.sru,
                "hru" => &mut out.hru,
                other => {
                    return Err(format!(
                        "unknown resource `{other}` (cru: CPU threads; mru, sru, hru: memory, SSD, HDD bytes)"
                    ))
                }
            };
            let value = if name == "cru" {
                amount
                    .parse()
                    .map_err(|_| format!("cru=`{amount}`: expected a number of CPU threads"))?
            } else {
                parse_size(amount).map_err(|e| format!("{name}=`{amount}`: {e}"))?
            };
            *slot = Some(value);
        }
        if out.is_empty() {
            return Err("no resource given: expected e.g. sru=500G,hru=0".into());
        }
        Ok(out)
    }
}

/// Bytes from `123`, `512M`, `8G`, `2T` (also `KiB`/`MiB`/`GiB`/`TiB`, `KB`...: all binary
/// units, as TF Chain counts a gigabyte as 1024^3 bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a number of bytes with an optional unit (K, M, G, T)".to_string())?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => return Err(format!("unknown unit `{other}` (K, M, G, T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| "too large".to_string())
}

fn size_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Option::<Size>::deserialize(d)? {
        None => Ok(None),
        Some(Size::Bytes(n)) => Ok(Some(n)),
        Some(Size::Text(t)) => parse_size(&t)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("`{t}`: {e}"))),
    }
}

/// What a deployment takes: vCPUs, memory, and its disks on SSD.
pub fn deployment_needs(d: &Deployment) -> Resources {
    d.vms().fold(Resources::default(), |acc, vm| {
        acc.saturating_add(Resources {
            cru: u64::from(vm.vcpus),
            mru: vm.memory_mib.saturating_mul(MIB),
            sru: vm.disk_mib().saturating_mul(MIB),
            hru: 0,
        })
    })
}

/// The host's capacity, before the reserve. Without physical disks (a node running from RAM,
/// a VM), SSD capacity is the size of the filesystem that holds `state_dir`, where the
/// workloads' layers and volumes live.
pub fn detect(state_dir: &Path) -> Resources {
    let mut r = detect_from(Path::new("/proc"), Path::new("/sys"));
    if r.sru == 0 && r.hru == 0 {
        r.sru = filesystem_bytes(state_dir).unwrap_or(0);
    }
    r
}

fn filesystem_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain old data, for which all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a statvfs buffer owned by this frame.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    (st.f_blocks as u64).checked_mul(st.f_frsize as u64)
}

pub fn detect_from(proc_root: &Path, sys_root: &Path) -> Resources {
    let cru = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let mru = fs::read_to_string(proc_root.join("meminfo"))
        .ok()
        .and_then(|t| meminfo_total(&t))
        .unwrap_or(0);
    let (sru, hru) = disks(&sys_root.join("block"));
    Resources { cru, mru, sru, hru }
}

fn meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Sums the sizes of whole physical disks by their rotational flag: (ssd, hdd) bytes. Virtual
/// devices (loop, ram, zram, device-mapper, md, optical, nbd) are not capacity.
fn disks(block: &Path) -> (u64, u64) {
    let Ok(entries) = fs::read_dir(block) else {
        return (0, 0);
    };
    let (mut ssd, mut hdd) = (0u64, 0u64);
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if ["loop", "ram", "zram", "dm-", "md", "sr", "nbd", "fd"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let dir = entry.path();
        let read = |f: &str| {
            fs::read_to_string(dir.join(f))
                .ok()
                .map(|s| s.trim().to_string())
        };
        let Some(sectors) = read("size").and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        let bytes = sectors.saturating_mul(512);
        if read("queue/rotational").as_deref() == Some("1") {
            hdd = hdd.saturating_add(bytes);
        } else {
            ssd = ssd.saturating_add(bytes);
        }
    }
    (ssd, hdd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_memory_and_disks_by_rotational_flag() {
        let root = tempfile::tempdir().unwrap();
        let proc_root = root.path().join("proc");
        let sys = root.path().join("sys");
        fs::create_dir_all(&proc_root).unwrap();
        fs::write(
            proc_root.join("meminfo"),
            "MemTotal:       2048 kB\nMemFree: 1 kB\n",
        )
        .unwrap();
        for (name, sectors, rot) in [
            ("sda", 2048, "1"),
            ("nvme0n1", 4096, "0"),
            ("loop0", 999, "0"),
        ] {
            let q = sys.join("block").join(name).join("queue");
            fs::create_dir_all(&q).unwrap();
            fs::write(
                sys.join("block").join(name).join("size"),
                format!("{sectors}\n"),
            )
            .unwrap();
            fs::write(q.join("rotational"), rot).unwrap();
        }
        let r = detect_from(&proc_root, &sys);
        assert_eq!(r.mru, 2048 * 1024);
        assert_eq!(r.hru, 2048 * 512);
        assert_eq!(r.sru, 4096 * 512);
        assert!(r.cru >= 1);
    }

    #[test]
    fn capacity_override_parses_flags_and_config() {
        let o: CapacityOverride = "sru=120G, hru=0,cru=2,mru=4096M".parse().unwrap();
        assert_eq!(
            o,
            CapacityOverride {
                cru: Some(2),
                mru: Some(4 << 30),
                sru: Some(120 << 30),
                hru: Some(0),
            }
        );
        let detected = Resources {
            cru: 8,
            mru: 16 << 30,
            sru: 50 << 30,
            hru: 1 << 40,
        };
        let only_sru: CapacityOverride = "sru=100GiB".parse().unwrap();
        assert_eq!(
            only_sru.apply(detected),
            Resources {
                sru: 100 << 30,
                ..detected
            }
        );
        assert_eq!(only_sru.or("cru=3".parse().unwrap()).cru, Some(3));
        for bad in ["", "sru", "xru=1", "sru=12Q", "cru=2G", "sru=-1"] {
            assert!(bad.parse::<CapacityOverride>().is_err(), "{bad}");
        }
        let c: CapacityOverride = serde_json::from_str(r#"{"sru": "200G", "hru": 0}"#).unwrap();
        assert_eq!((c.sru, c.hru, c.cru), (Some(200 << 30), Some(0), None));
        assert!(serde_json::from_str::<CapacityOverride>(r#"{"sru": "2X"}"#).is_err());
    }

    #[test]
    fn exceeding_names_the_resource() {
        let free = Resources {
            cru: 2,
            mru: 512 * MIB,
            sru: 0,
            hru: 0,
        };
        let want = Resources {
            cru: 1,
            mru: 1024 * MIB,
            sru: 0,
            hru: 0,
        };
        assert_eq!(
            want.exceeds(&free).unwrap(),
            "mru (memory MiB): needs 1024, 512 free"
        );
        assert!(Resources::default().exceeds(&free).is_none());
    }
}
