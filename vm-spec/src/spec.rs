//! The micro-VM spec: the user-facing description of a VM (JSON file or CLI flags), its
//! validation, and how it renders the guest kernel command line. Nothing here touches KVM.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cpu::{CpuSpec, CpuSpecError};
use crate::drive::{DriveSpec, DriveSpecError, RngSpec};
use crate::fs::{FsSpec, FsSpecError};
use crate::net::{NetSpec, NetSpecError};
use crate::vsock::{VsockSpec, VsockSpecError};

pub const MIN_VCPUS: u32 = 1;
pub const MAX_VCPUS: u32 = 32;
pub const MIN_MEMORY_MIB: u64 = 16;
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 256;

/// Kernel arguments every guest gets: serial console, reboot through the i8042 (which ends the
/// VM), no PCI probing, no modules.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodules i8042.noaux i8042.nomux i8042.dumbkbd";

/// Linux hands /init at most 32 argv and 32 envp entries (it adds "init", HOME and TERM).
const MAX_INIT_ARGS: usize = 31;
const MAX_INIT_ENVS: usize = 30;

/// The cap of a serial file given as `{"file": PATH}` (it rotates to `PATH.1` when full).
pub const DEFAULT_SERIAL_FILE_MAX_BYTES: u64 = 64 << 20;

/// Where the guest's serial console goes. In JSON: `"stdout"`, `"off"`, `{"file": PATH}` (a
/// log of at most [`DEFAULT_SERIAL_FILE_MAX_BYTES`]) or `{"log": PATH, "max_bytes": N}`. A log
/// file that reaches its cap is renamed to `PATH.1` (replacing the previous one) and started
/// afresh, so the console takes at most twice the cap on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SerialRepr", into = "SerialRepr")]
pub enum SerialOutput {
    #[default]
    Stdout,
    Off,
    File(PathBuf),
    Log {
        path: PathBuf,
        max_bytes: u64,
    },
}

impl SerialOutput {
    /// The log file and its cap, when the output goes to a file.
    pub fn log_file(&self) -> Option<(&std::path::Path, u64)> {
        match self {
            SerialOutput::File(path) => Some((path, DEFAULT_SERIAL_FILE_MAX_BYTES)),
            SerialOutput::Log { path, max_bytes } => Some((path, *max_bytes)),
            SerialOutput::Stdout | SerialOutput::Off => None,
        }
    }
}

/// The JSON forms of [`SerialOutput`].
#[derive(Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "serial must be \"stdout\", \"off\", {\"file\": PATH} or {\"log\": PATH, \"max_bytes\": N}"
)]
enum SerialRepr {
    Named(SerialName),
    File(SerialFileRepr),
    Log(SerialLogRepr),
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum SerialName {
    Stdout,
    Off,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SerialFileRepr {
    file: PathBuf,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SerialLogRepr {
    log: PathBuf,
    max_bytes: u64,
}

impl TryFrom<SerialRepr> for SerialOutput {
    type Error = String;

    fn try_from(repr: SerialRepr) -> Result<Self, String> {
        Ok(match repr {
            SerialRepr::Named(SerialName::Stdout) => SerialOutput::Stdout,
            SerialRepr::Named(SerialName::Off) => SerialOutput::Off,
            SerialRepr::File(f) => SerialOutput::File(f.file),
            SerialRepr::Log(SerialLogRepr { max_bytes: 0, .. }) => {
                return Err("serial log max_bytes must be at least 1".into())
            }
            SerialRepr::Log(l) => SerialOutput::Log {
                path: l.log,
                max_bytes: l.max_bytes,
            },
        })
    }
}

impl From<SerialOutput> for SerialRepr {
    fn from(out: SerialOutput) -> Self {
        match out {
            SerialOutput::Stdout => SerialRepr::Named(SerialName::Stdout),
            SerialOutput::Off => SerialRepr::Named(SerialName::Off),
            SerialOutput::File(file) => SerialRepr::File(SerialFileRepr { file }),
            SerialOutput::Log { path, max_bytes } => SerialRepr::Log(SerialLogRepr {
                log: path,
                max_bytes,
            }),
        }
    }
}

/// Which entry protocol an ELF kernel is booted with. bzImages always use the 64-bit Linux
/// boot protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// PVH when the ELF carries the PVH note, else the 64-bit Linux boot protocol.
    #[default]
    Auto,
    /// The 64-bit Linux boot protocol, even when a PVH note is present.
    Linux,
    /// PVH; an ELF without the note is an error.
    Pvh,
}

/// A micro-VM: CPUs, memory, what it boots and what its init runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// ELF vmlinux (PVH entry used when the ELF carries the note) or bzImage.
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Extra kernel arguments, appended to the base ones.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cmdline: String,
    /// The program (and its arguments) the guest init runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// Environment of the entrypoint.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub serial: SerialOutput,
    #[serde(default)]
    pub boot_protocol: BootProtocol,
    /// Filesystems shared over virtio-fs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fs: Vec<FsSpec>,
    /// The tag of the share the guest init mounts as its root before running the entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// The local chunk cache shared by every image (default: /var/cache/gridnode/chunks).
    /// Kept for compatibility: the node configuration's `image_cache` takes precedence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_cache: Option<PathBuf>,
    /// Block devices (virtio-blk) over raw image files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<DriveSpec>,
    /// The entropy device (virtio-rng), when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngSpec>,
    /// The control API's unix socket (HTTP/1.1 + JSON), created 0600; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_sock: Option<PathBuf>,
    /// Where the vmm writes, atomically, how and when the VM ended (`{status, reason, kind,
    /// at}`), for whatever reason it ends; a record of an earlier run is removed at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_record: Option<PathBuf>,
    /// On a graceful shutdown (SIGTERM, the API's `shutdown`), how long the guest init gives
    /// the entrypoint between SIGTERM and SIGKILL; the vmm ends the VM if it is still running
    /// a few seconds after that.
    #[serde(default = "default_shutdown_grace_secs")]
    pub shutdown_grace_secs: u32,
    /// The virtio-vsock device (guest context id and host unix socket), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockSpec>,
    /// Network interfaces (virtio-net over host tap devices); the guest names them eth0,
    /// eth1, ... in this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetSpec>,
    /// The guest CPU: a CPU template and CPUID/MSR bit overrides (default: the host's).
    #[serde(default, skip_serializing_if = "CpuSpec::is_default")]
    pub cpu: CpuSpec,
    /// Shares (other than the root) the guest init mounts, by tag, before the entrypoint runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<GuestMount>,
}

/// A share the guest init mounts at `path` (absolute, normalized; created when missing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestMount {
    pub tag: String,
    pub path: String,
}

/// Most guest mounts.
pub const MAX_GUEST_MOUNTS: usize = 32;
/// The guest init's parameter for a mount: `gridinit.mount=TAG:PATH` (PATH percent-encoded).
pub const MOUNT_PARAM: &str = "gridinit.mount";

/// Seconds between SIGTERM and SIGKILL on a graceful shutdown, by default and at most.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u32 = 10;
pub const MAX_SHUTDOWN_GRACE_SECS: u32 = 3600;
/// The guest init's parameter for the grace period (given when not the default).
pub const GRACE_PARAM: &str = "gridinit.grace";

fn default_shutdown_grace_secs() -> u32 {
    DEFAULT_SHUTDOWN_GRACE_SECS
}

/// Kernel arguments through which the guest init learns its root tag and environment; the
/// entrypoint follows a standalone `--`. Values and argv words are percent-encoded (see
/// [`encode_word`]); guest-kernels/init/src/cmdline.rs decodes them.
pub const ROOT_TAG_PARAM: &str = "gridinit.root";
pub const ENV_PARAM: &str = "gridinit.env";

fn default_vcpus() -> u32 {
    DEFAULT_VCPUS
}

fn default_memory_mib() -> u64 {
    DEFAULT_MEMORY_MIB
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("vcpus must be between {MIN_VCPUS} and {MAX_VCPUS}, got {0}")]
    VcpusOutOfRange(u32),
    #[error("memory must be at least {MIN_MEMORY_MIB} MiB, got {0} MiB")]
    MemoryTooSmall(u64),
    #[error("memory of {0} MiB is too large to address")]
    MemoryTooLarge(u64),
    #[error("environment variable name {0:?} is invalid (use letters, digits and _; no '.', '=' or spaces)")]
    BadEnvName(String),
    #[error("{what} {value:?} cannot be passed on the kernel command line (it contains a control character, or a NUL)")]
    Unquotable { what: &'static str, value: String },
    #[error("the entrypoint has {0} words; the kernel passes at most {MAX_INIT_ARGS} to init")]
    TooManyArgs(usize),
    #[error("{0} environment variables given; the kernel passes at most {MAX_INIT_ENVS} to init")]
    TooManyEnvs(usize),
    #[error(transparent)]
    Fs(#[from] FsSpecError),
    #[error("the kernel command line has a ` -- `; give the entrypoint as the spec's entrypoint instead")]
    CmdlineHasInitArgs,
    #[error(transparent)]
    Drive(#[from] DriveSpecError),
    #[error("shutdown_grace_secs must be at most {MAX_SHUTDOWN_GRACE_SECS}, got {0}")]
    GraceTooLong(u32),
    #[error("{what} must be a non-empty path")]
    EmptyPath { what: &'static str },
    #[error(transparent)]
    Vsock(#[from] VsockSpecError),
    #[error(transparent)]
    Net(#[from] NetSpecError),
    #[error("cpu: {0}")]
    Cpu(#[from] CpuSpecError),
    #[error("guest mount {0}")]
    BadMount(String),
}

impl VmSpec {
    /// A spec with defaults for everything but the kernel.
    pub fn new(kernel: PathBuf) -> Self {
        Self {
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            kernel,
            initrd: None,
            cmdline: String::new(),
            entrypoint: Vec::new(),
            env: BTreeMap::new(),
            serial: SerialOutput::Stdout,
            boot_protocol: BootProtocol::Auto,
            fs: Vec::new(),
            root: None,
            image_cache: None,
            drives: Vec::new(),
            rng: None,
            api_sock: None,
            exit_record: None,
            shutdown_grace_secs: DEFAULT_SHUTDOWN_GRACE_SECS,
            vsock: None,
            net: Vec::new(),
            cpu: CpuSpec::default(),
            mounts: Vec::new(),
        }
    }

    /// Checks everything that does not depend on the host.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !(MIN_VCPUS..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(SpecError::VcpusOutOfRange(self.vcpus));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(SpecError::MemoryTooSmall(self.memory_mib));
        }
        if self.memory_mib.checked_mul(1 << 20).is_none() || self.memory_mib > (1 << 30) {
            return Err(SpecError::MemoryTooLarge(self.memory_mib));
        }
        if self.entrypoint.len() > MAX_INIT_ARGS {
            return Err(SpecError::TooManyArgs(self.entrypoint.len()));
        }
        if self.env.len() > MAX_INIT_ENVS {
            return Err(SpecError::TooManyEnvs(self.env.len()));
        }
        if self.cmdline.split_whitespace().any(|w| w == "--") {
            return Err(SpecError::CmdlineHasInitArgs);
        }
        check_quotable("kernel argument", &self.cmdline)?;
        if self.shutdown_grace_secs > MAX_SHUTDOWN_GRACE_SECS {
            return Err(SpecError::GraceTooLong(self.shutdown_grace_secs));
        }
        for (what, path) in [
            ("api_sock", &self.api_sock),
            ("exit_record", &self.exit_record),
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(SpecError::EmptyPath { what });
            }
        }
        crate::fs::validate(&self.fs, self.root.as_deref())?;
        self.validate_mounts()?;
        crate::drive::validate(&self.drives, self.rng.as_ref())?;
        // Devices are attached under one namespace: shares' tags, drive ids, "rng", "vsock".
        for drive in &self.drives {
            if crate::drive::RESERVED_IDS.contains(&drive.id.as_str())
                || self.fs.iter().any(|s| s.tag == drive.id)
            {
                return Err(DriveSpecError::DuplicateId(drive.id.clone()).into());
            }
        }
        for (name, value) in &self.env {
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err(SpecError::BadEnvName(name.clone()));
            }
            check_no_nul("environment value", value)?;
        }
        for arg in &self.entrypoint {
            check_no_nul("entrypoint argument", arg)?;
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        crate::net::validate(&self.net)?;
        for net in &self.net {
            if crate::drive::RESERVED_IDS.contains(&net.id.as_str())
                || self.fs.iter().any(|s| s.tag == net.id)
                || self.drives.iter().any(|d| d.id == net.id)
            {
                return Err(NetSpecError::DuplicateId(net.id.clone()).into());
            }
        }
        self.cpu.validate()?;
        Ok(())
    }

    fn validate_mounts(&self) -> Result<(), SpecError> {
        if self.mounts.len() > MAX_GUEST_MOUNTS {
            return Err(SpecError::BadMount(format!(
                "list: more than {MAX_GUEST_MOUNTS}"
            )));
        }
        let mut paths = std::collections::BTreeSet::new();
        for m in &self.mounts {
            let bad = |why: &str| Err(SpecError::BadMount(format!("{}:{}: {why}", m.tag, m.path)));
            if !self.fs.iter().any(|s| s.tag == m.tag) {
                return bad("no share has this tag");
            }
            if self.root.as_deref() == Some(m.tag.as_str()) {
                return bad("the root share is mounted as the root");
            }
            let normalized = m.path.starts_with('/')
                && m.path.len() > 1
                && m.path.len() <= 1024
                && !m.path.ends_with('/')
                && !m.path.contains("//")
                && !m.path.split('/').any(|c| c == "." || c == "..")
                && !m.path.contains('\0');
            if !normalized {
                return bad("the path must be absolute and normalized (no '.', '..', '//')");
            }
            if !paths.insert(m.path.as_str()) {
                return bad("two mounts at one path");
            }
        }
        Ok(())
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// The full guest kernel command line; `device_args` (virtio-mmio devices) come before
    /// the user's arguments.
    pub fn kernel_cmdline(&self, device_args: &[String]) -> String {
        let mut words = vec![BASE_CMDLINE.to_string()];
        words.extend(device_args.iter().cloned());
        if let Some(root) = &self.root {
            words.push(format!("{ROOT_TAG_PARAM}={root}"));
        }
        if self.shutdown_grace_secs != DEFAULT_SHUTDOWN_GRACE_SECS {
            words.push(format!("{GRACE_PARAM}={}", self.shutdown_grace_secs));
        }
        for m in &self.mounts {
            words.push(format!("{MOUNT_PARAM}={}:{}", m.tag, encode_word(&m.path)));
        }
        if !self.cmdline.trim().is_empty() {
            words.push(self.cmdline.trim().to_string());
        }
        for (name, value) in &self.env {
            words.push(format!("{ENV_PARAM}={name}={}", encode_word(value)));
        }
        if !self.entrypoint.is_empty() {
            words.push("--".to_string());
            words.extend(self.entrypoint.iter().map(|a| encode_word(a)));
        }
        words.join(" ")
    }
}

fn check_no_nul(what: &'static str, value: &str) -> Result<(), SpecError> {
    if value.contains('\0') {
        return Err(SpecError::Unquotable {
            what,
            value: value.to_string(),
        });
    }
    Ok(())
}

fn check_quotable(what: &'static str, value: &str) -> Result<(), SpecError> {
    if value.chars().any(|c| c.is_control()) {
        return Err(SpecError::Unquotable {
            what,
            value: value.to_string(),
        });
    }
    Ok(())
}

/// Percent-encodes what the kernel's command-line parser would split or strip (white space,
/// double quotes), `%` itself, control characters and non-ASCII bytes; the empty word is `%00`.
pub fn encode_word(word: &str) -> String {
    if word.is_empty() {
        return "%00".to_string();
    }
    let mut out = String::with_capacity(word.len());
    for b in word.bytes() {
        if b.is_ascii_graphic() && b != b'"' && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec::new("/k".into())
    }

    #[test]
    fn json_defaults_and_serial_forms() {
        let s: VmSpec = serde_json::from_str(r#"{"kernel": "/k"}"#).unwrap();
        assert_eq!(s, spec());
        let s: VmSpec =
            serde_json::from_str(r#"{"kernel": "/k", "serial": {"file": "/tmp/x"}}"#).unwrap();
        assert_eq!(s.serial, SerialOutput::File("/tmp/x".into()));
        let s: VmSpec = serde_json::from_str(r#"{"kernel": "/k", "serial": "off"}"#).unwrap();
        assert_eq!(s.serial, SerialOutput::Off);
        let s: VmSpec = serde_json::from_str(
            r#"{"kernel": "/k", "serial": {"log": "/tmp/c.log", "max_bytes": 4096}}"#,
        )
        .unwrap();
        let log = SerialOutput::Log {
            path: "/tmp/c.log".into(),
            max_bytes: 4096,
        };
        assert_eq!(s.serial, log);
        let back: VmSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back.serial, log, "round trip");
        for bad in [
            r#"{"log": "/tmp/c.log", "max_bytes": 0}"#,
            r#"{"log": "/tmp/c.log"}"#,
            r#"{"file": "/tmp/x", "max": 1}"#,
            r#""tty""#,
        ] {
            let json = format!(r#"{{"kernel": "/k", "serial": {bad}}}"#);
            assert!(serde_json::from_str::<VmSpec>(&json).is_err(), "{bad}");
        }
        let err = serde_json::from_str::<VmSpec>(r#"{"kernel": "/k", "vcpu": 2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `vcpu`"), "{err}");
    }

    #[test]
    fn ranges_are_enforced() {
        let mut s = spec();
        s.vcpus = 0;
        assert_eq!(s.validate(), Err(SpecError::VcpusOutOfRange(0)));
        s.vcpus = 33;
        assert_eq!(s.validate(), Err(SpecError::VcpusOutOfRange(33)));
        s.vcpus = 32;
        s.memory_mib = 8;
        assert_eq!(s.validate(), Err(SpecError::MemoryTooSmall(8)));
        s.memory_mib = u64::MAX;
        assert_eq!(s.validate(), Err(SpecError::MemoryTooLarge(u64::MAX)));
    }

    #[test]
    fn supervision_fields_are_checked_and_the_grace_reaches_the_guest() {
        let s: VmSpec = serde_json::from_str(
            r#"{"kernel": "/k", "api_sock": "/run/vm.sock", "exit_record": "/run/vm.exit",
                "shutdown_grace_secs": 30}"#,
        )
        .unwrap();
        assert_eq!(s.validate(), Ok(()));
        assert!(s.kernel_cmdline(&[]).contains(" gridinit.grace=30"));
        assert!(!spec().kernel_cmdline(&[]).contains("gridinit.grace"));
        let mut s = spec();
        s.shutdown_grace_secs = MAX_SHUTDOWN_GRACE_SECS + 1;
        assert_eq!(
            s.validate(),
            Err(SpecError::GraceTooLong(MAX_SHUTDOWN_GRACE_SECS + 1))
        );
        let mut s = spec();
        s.api_sock = Some(PathBuf::new());
        assert_eq!(s.validate(), Err(SpecError::EmptyPath { what: "api_sock" }));
        let mut s = spec();
        s.exit_record = Some(PathBuf::new());
        assert_eq!(
            s.validate(),
            Err(SpecError::EmptyPath {
                what: "exit_record"
            })
        );
    }

    #[test]
    fn cmdline_carries_env_and_quoted_entrypoint() {
        let mut s = spec();
        s.cmdline = "quiet".into();
        s.env.insert("GREETING".into(), "hello world".into());
        s.entrypoint = vec!["/bin/sh".into(), "-c".into(), "echo hi; exit 3".into()];
        s.validate().unwrap();
        assert_eq!(
            s.kernel_cmdline(&[]),
            format!(
                "{BASE_CMDLINE} quiet gridinit.env=GREETING=hello%20world -- /bin/sh -c echo%20hi;%20exit%203"
            )
        );
        assert_eq!(encode_word("say \"100%\"\n"), "say%20%22100%25%22%0A");
        assert_eq!(encode_word(""), "%00");
    }

    #[test]
    fn unrepresentable_words_are_rejected() {
        let mut s = spec();
        s.entrypoint = vec!["nul\0inside".into()];
        assert!(matches!(s.validate(), Err(SpecError::Unquotable { .. })));
        let mut s = spec();
        s.env.insert("a.b".into(), "1".into());
        assert_eq!(s.validate(), Err(SpecError::BadEnvName("a.b".into())));
        let mut s = spec();
        s.cmdline = "foo -- bar".into();
        assert_eq!(s.validate(), Err(SpecError::CmdlineHasInitArgs));
    }

    #[test]
    fn drives_and_rng_in_json_are_validated() {
        let s: VmSpec = serde_json::from_str(
            r#"{"kernel": "/k", "drives": [{"id": "data", "path": "/d.img", "readonly": true}], "rng": {}}"#,
        )
        .unwrap();
        assert!(s.drives[0].readonly);
        assert_eq!(s.rng, Some(RngSpec::default()));
        s.validate().unwrap();
        let mut twice = s.clone();
        twice.drives.push(s.drives[0].clone());
        assert_eq!(
            twice.validate(),
            Err(SpecError::Drive(DriveSpecError::DuplicateId("data".into())))
        );
        let back: VmSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        let mut clash = s.clone();
        clash.fs.push("tag=data,dir=/srv".parse().unwrap());
        assert_eq!(
            clash.validate(),
            Err(SpecError::Drive(DriveSpecError::DuplicateId("data".into())))
        );
        for taken in ["rng", "vsock"] {
            let mut reserved = s.clone();
            reserved.drives[0].id = taken.into();
            assert_eq!(
                reserved.validate(),
                Err(SpecError::Drive(DriveSpecError::DuplicateId(taken.into())))
            );
        }
    }

    #[test]
    fn vsock_is_validated_with_the_spec() {
        let s: VmSpec = serde_json::from_str(
            r#"{"kernel": "/k", "vsock": {"guest_cid": 2, "uds_path": "/run/v.sock"}}"#,
        )
        .unwrap();
        assert_eq!(
            s.validate(),
            Err(SpecError::Vsock(VsockSpecError::ReservedCid(2)))
        );
        let s: VmSpec = serde_json::from_str(
            r#"{"kernel": "/k", "vsock": {"guest_cid": 3, "uds_path": "/run/v.sock"}}"#,
        )
        .unwrap();
        s.validate().unwrap();
        let back: VmSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s, "round trip");
    }

    #[test]
    fn net_interfaces_share_the_device_namespace() {
        let s: VmSpec = serde_json::from_str(
            r#"{"kernel": "/k", "net": [{"id": "net0", "tap": "tap0", "mac": "02:00:00:00:00:01"}],
                "drives": [{"id": "data", "path": "/d.img"}]}"#,
        )
        .unwrap();
        assert_eq!(s.validate(), Ok(()));
        for taken in ["data", "rng", "vsock"] {
            let mut clash = s.clone();
            clash.net[0].id = taken.into();
            assert_eq!(
                clash.validate(),
                Err(SpecError::Net(NetSpecError::DuplicateId(taken.into())))
            );
        }
        let mut bad = s.clone();
        bad.net[0].tap = None;
        assert!(matches!(bad.validate(), Err(SpecError::Net(_))));
        assert!(serde_json::from_str::<VmSpec>(r#"{"kernel": "/k", "nets": []}"#).is_err());
    }

    #[test]
    fn cpu_section_is_part_of_the_spec_and_validated() {
        let s: VmSpec = serde_json::from_str(
            r#"{"kernel": "/k", "cpu": {"template": "t2", "cpuid": [{"leaf": 1, "register": "ecx", "bits": "1"}]}}"#,
        )
        .unwrap();
        assert_eq!(s.cpu.template, crate::CpuTemplate::T2);
        assert!(matches!(
            s.validate(),
            Err(SpecError::Cpu(CpuSpecError::BitsLength { got: 1, .. }))
        ));
        // The default CPU is left out of the JSON form.
        assert!(!serde_json::to_string(&spec()).unwrap().contains("\"cpu\""));
    }

    #[test]
    fn guest_mounts_are_checked_and_reach_the_cmdline() {
        let mut s = spec();
        s.fs = vec![
            crate::FsSpec::image("root", "/i.flist"),
            crate::FsSpec::dir("vol0", "/srv/v", false),
        ];
        s.root = Some("root".into());
        s.mounts = vec![GuestMount {
            tag: "vol0".into(),
            path: "/data dir".into(),
        }];
        s.validate().unwrap();
        assert!(s
            .kernel_cmdline(&[])
            .contains("gridinit.mount=vol0:/data%20dir"));
        for (tag, path) in [
            ("nope", "/x"),
            ("root", "/x"),
            ("vol0", "x"),
            ("vol0", "/a/../b"),
            ("vol0", "/a/"),
        ] {
            s.mounts = vec![GuestMount {
                tag: tag.into(),
                path: path.into(),
            }];
            assert!(
                matches!(s.validate(), Err(SpecError::BadMount(_))),
                "{tag}:{path}"
            );
        }
        s.mounts = vec![
            GuestMount {
                tag: "vol0".into(),
                path: "/x".into(),
            },
            GuestMount {
                tag: "vol0".into(),
                path: "/x".into(),
            },
        ];
        assert!(s.validate().is_err());
    }
}
