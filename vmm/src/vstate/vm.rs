//! The KVM VM: opening /dev/kvm with clear errors, the in-kernel irqchip and PIT, and the CPUID
//! KVM supports (with the features it emulates without listing them).

use std::path::Path;

use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::arch::x86_64::cpuid::{add_emulated_features, complete_topology_leaf};
use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0} does not exist: this host offers no KVM (load kvm_intel or kvm_amd, or enable virtualization in the firmware)")]
    NoKvm(String),
    #[error("no permission to open {0}: run as root or add the user to the group that owns it (usually kvm)")]
    KvmPermission(String),
    #[error("cannot open {path}: {source}")]
    KvmOpen {
        path: String,
        source: kvm_ioctls::Error,
    },
    #[error("KVM API version {0} is not the supported version 12")]
    KvmApiVersion(i32),
    #[error("KVM could not {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// An open KVM VM with its irqchip.
pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    /// What the guest's CPUID may offer: KVM's supported set and the features KVM emulates
    /// without listing them there.
    pub supported_cpuid: CpuId,
}

impl Vm {
    /// Opens `kvm_path` (normally /dev/kvm), creates the VM, the irqchip and the PIT.
    pub fn new(kvm_path: &Path) -> Result<Self, VmError> {
        let shown = kvm_path.display().to_string();
        let cpath =
            std::ffi::CString::new(shown.clone()).map_err(|_| VmError::NoKvm(shown.clone()))?;
        let kvm = Kvm::new_with_path(&cpath).map_err(|source| match source.errno() {
            libc::ENOENT => VmError::NoKvm(shown.clone()),
            libc::EACCES | libc::EPERM => VmError::KvmPermission(shown.clone()),
            _ => VmError::KvmOpen {
                path: shown.clone(),
                source,
            },
        })?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::KvmApiVersion(version));
        }
        let fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("set the TSS address"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("set the identity map address"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(kvm_err("create the in-kernel PIT"))?;
        let mut supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("report its supported CPUID"))?;
        add_emulated_features(
            &mut supported_cpuid,
            kvm.check_extension(Cap::TscDeadlineTimer),
        );
        if !complete_topology_leaf(&mut supported_cpuid) {
            tracing::warn!("no room to add the core level of CPUID leaf 0xb");
        }
        Ok(Self {
            kvm,
            fd,
            supported_cpuid,
        })
    }

    /// The most vCPUs this host's KVM allows.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }
}
