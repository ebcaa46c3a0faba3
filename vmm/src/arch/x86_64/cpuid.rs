//! CPUID for each vCPU: KVM's supported set plus the features KVM emulates but does not list
//! (the TSC-deadline timer), normalised so that every vCPU reports its own APIC id and one
//! consistent topology (one socket, `vcpu_count` cores, one thread per core).
//!
//! The TSC-deadline bit matters for boot time: without it Linux calibrates the LAPIC timer
//! against another clock at every boot (about a quarter of a second).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_PDCM: u32 = 1 << 15;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Bits needed to number `count` items.
fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

fn normalise_entry(entry: &mut kvm_cpuid_entry2, apic_id: u32, vcpu_count: u32) {
    match entry.function {
        LEAF_FEATURES => {
            // EBX: [31:24] initial APIC id, [23:16] logical processors, [15:8] CLFLUSH size.
            entry.ebx = (apic_id << 24) | ((vcpu_count & 0xff) << 16) | (8 << 8);
            entry.ecx |= ECX_HYPERVISOR;
            // No performance-monitoring or debug capability MSR is offered (see leaf 0xa).
            entry.ecx &= !ECX_PDCM;
            if vcpu_count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        // An entry without a cache type (all of it on AMD, where the leaf is reserved) stays 0.
        LEAF_CACHE_PARAMS if entry.eax & 0x1f != 0 => {
            // EAX[31:26]: cores per package - 1; [25:14]: threads sharing this cache - 1.
            let cache_level = (entry.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { vcpu_count - 1 } else { 0 };
            entry.eax &= 0x3fff;
            entry.eax |= ((vcpu_count - 1) << 26) | (sharing << 14);
        }
        LEAF_PMU => {
            // No virtual PMU is offered.
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
            entry.edx = apic_id;
            match entry.index {
                // SMT level: one thread per core.
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = 1 << 8;
                }
                // Core level: all vCPUs in one package.
                1 => {
                    entry.eax = bits_for(vcpu_count);
                    entry.ebx = vcpu_count;
                    entry.ecx = (2 << 8) | 1;
                }
                index => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = index;
                }
            }
        }
        LEAF_AMD_SIZE_IDS => {
            // ECX[15:12]: APIC id size; [7:0]: cores - 1.
            entry.ecx = (bits_for(vcpu_count) << 12) | (vcpu_count - 1);
        }
        LEAF_AMD_CACHE_TOPOLOGY if entry.eax & 0x1f != 0 => {
            // EAX[25:14]: threads sharing this cache - 1: the L3 is shared by every vCPU,
            // L1 and L2 by the one thread of a core.
            let cache_level = (entry.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { vcpu_count - 1 } else { 0 };
            entry.eax = (entry.eax & !(0xfff << 14)) | (sharing << 14);
        }
        LEAF_AMD_EXT_APIC_ID => {
            entry.eax = apic_id;
            entry.ebx = apic_id & 0xff;
            entry.ecx = 0;
        }
        _ => {}
    }
}

/// Adds to KVM's supported set what KVM emulates without listing it there: the LAPIC's
/// TSC-deadline mode when the host's KVM has `KVM_CAP_TSC_DEADLINE_TIMER`.
pub fn add_emulated_features(supported: &mut CpuId, tsc_deadline_timer: bool) {
    for entry in supported.as_mut_slice() {
        if entry.function == LEAF_FEATURES && tsc_deadline_timer {
            entry.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

/// Adds the core level (subleaf 1) of the extended topology leaf 0xb when KVM's set has the
/// leaf without it (KVM copies the host's levels): without it Linux finds no core level and
/// puts every vCPU in a package of its own (and then, on AMD, distrusts the TSC). The values
/// are filled per vCPU by [`vcpu_cpuid`]. Returns false when the list has no room left.
pub fn complete_topology_leaf(supported: &mut CpuId) -> bool {
    let entries = supported.as_slice();
    let has_leaf = entries.iter().any(|e| e.function == LEAF_EXT_TOPOLOGY);
    let has_core_level = entries
        .iter()
        .any(|e| e.function == LEAF_EXT_TOPOLOGY && e.index == 1);
    if !has_leaf || has_core_level {
        return true;
    }
    supported
        .push(kvm_cpuid_entry2 {
            function: LEAF_EXT_TOPOLOGY,
            index: 1,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            ..Default::default()
        })
        .is_ok()
}

/// The CPUID of vCPU `vcpu_index` (its APIC id) among `vcpu_count`.
pub fn vcpu_cpuid(supported: &CpuId, vcpu_index: u32, vcpu_count: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        normalise_entry(entry, vcpu_index, vcpu_count);
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: LEAF_FEATURES,
                ebx: 0xffff_ffff,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_EXT_TOPOLOGY,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_CACHE_PARAMS,
                eax: (3 << 5) | 0x1f,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn each_vcpu_reports_its_apic_id_and_the_topology() {
        let cpuid = vcpu_cpuid(&sample(), 3, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!((e[1].eax, e[1].ebx, e[1].edx), (2, 4, 3));
        assert_eq!(e[2].eax >> 26, 3);
        assert_eq!((e[2].eax >> 14) & 0xfff, 3);
    }

    #[test]
    fn tsc_deadline_is_added_only_when_kvm_emulates_it() {
        let mut cpuid = sample();
        add_emulated_features(&mut cpuid, false);
        assert_eq!(cpuid.as_slice()[0].ecx & ECX_TSC_DEADLINE, 0);
        add_emulated_features(&mut cpuid, true);
        assert_ne!(cpuid.as_slice()[0].ecx & ECX_TSC_DEADLINE, 0);
        // Other leaves are untouched.
        assert_eq!(cpuid.as_slice()[1].ecx, 0);
        let normalised = vcpu_cpuid(&cpuid, 0, 1);
        assert_ne!(normalised.as_slice()[0].ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn the_core_level_of_leaf_0xb_is_added_and_filled() {
        let mut cpuid = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: LEAF_EXT_TOPOLOGY,
            index: 0,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            ..Default::default()
        }])
        .unwrap();
        assert!(complete_topology_leaf(&mut cpuid));
        assert!(complete_topology_leaf(&mut cpuid), "idempotent");
        assert_eq!(cpuid.as_slice().len(), 2);
        let cpuid = vcpu_cpuid(&cpuid, 1, 2);
        let core = cpuid.as_slice()[1];
        assert_eq!(
            (core.index, core.eax, core.ebx, core.ecx, core.edx),
            (1, 1, 2, 0x201, 1)
        );
        // Without leaf 0xb nothing is added.
        let mut no_leaf = CpuId::from_entries(&[kvm_cpuid_entry2::default()]).unwrap();
        assert!(complete_topology_leaf(&mut no_leaf));
        assert_eq!(no_leaf.as_slice().len(), 1);
    }

    #[test]
    fn cache_leaves_report_sharing_and_empty_ones_stay_empty() {
        let l3 = |function| kvm_cpuid_entry2 {
            function,
            eax: (3 << 5) | 3 | (7 << 14),
            ..Default::default()
        };
        let cpuid = CpuId::from_entries(&[
            l3(LEAF_AMD_CACHE_TOPOLOGY),
            kvm_cpuid_entry2 {
                function: LEAF_CACHE_PARAMS,
                ..Default::default()
            },
        ])
        .unwrap();
        let cpuid = vcpu_cpuid(&cpuid, 0, 4);
        assert_eq!((cpuid.as_slice()[0].eax >> 14) & 0xfff, 3);
        assert_eq!(cpuid.as_slice()[0].eax & 0x3fff, (3 << 5) | 3);
        assert_eq!(cpuid.as_slice()[1].eax, 0, "AMD's reserved leaf 4 stays 0");
    }

    #[test]
    fn pdcm_is_hidden_with_the_pmu() {
        let mut cpuid = sample();
        cpuid.as_mut_slice()[0].ecx |= ECX_PDCM;
        let normalised = vcpu_cpuid(&cpuid, 0, 1);
        assert_eq!(normalised.as_slice()[0].ecx & ECX_PDCM, 0);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(32), 5);
    }
}
