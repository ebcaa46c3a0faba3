//! The guest's CPU as its spec asks for it: a named CPU template (features hidden from the
//! guest, so that VMs of a fleet see the same CPU on every host and can move between them) and
//! per-bit CPUID and MSR overrides. Both apply to what this host can offer (KVM's supported
//! CPUID, see [`crate::vstate::vm::Vm::supported_cpuid`]) and an override is checked against
//! it: asking for a bit the host cannot give fails at start with a message naming the bit,
//! instead of a guest that crashes on an instruction it was told exists.
//!
//! Order: supported set -> template (clears) -> overrides -> per-vCPU normalisation
//! ([`super::cpuid::vcpu_cpuid`]: APIC ids, topology, hypervisor bit), which wins over both.
//!
//! Templates:
//! - `none`: the host's CPU as KVM offers it.
//! - `t2`: an x86-64-v3 baseline (SSE4.2, AVX, AVX2, FMA, BMI1/2, MOVBE, F16C, ...), the
//!   features of every Intel host from Haswell and every AMD host from Zen 1. Hidden: AVX-512
//!   in all its parts, AMX, AVX-VNNI, TSX (HLE, RTM), MPX, SGX, Intel PT, PKU, LA57, SHA,
//!   GFNI/VAES/VPCLMULQDQ, RDPID, CLWB, the MOVDIR/ENQCMD/SERIALIZE/WAITPKG extensions, the
//!   compacted and supervisor XSAVE forms (XSAVEC, XSAVES, XGETBV1), the XSAVE state
//!   components of the hidden features (so the guest's XCR0 stays within the baseline), and
//!   the AMD-only SSE4A, misaligned SSE, XOP, FMA4, TBM, MONITORX, CLZERO and WBNOINVD.
//!   Features the baseline has are left as the host offers them: the template only hides.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use kvm_ioctls::VcpuFd;
use vm_spec::cpu::{BitChange, CpuSpec, CpuSpecError, CpuTemplate, CpuidRegister};

#[derive(Debug, thiserror::Error)]
pub enum CpuConfigError {
    #[error("cpu: {0}")]
    Spec(#[from] CpuSpecError),
    #[error("cpu override sets CPUID leaf {leaf:#x} subleaf {subleaf:#x} {register} bit {bit}, which this host's KVM does not support")]
    UnsupportedCpuidBit {
        leaf: u32,
        subleaf: u32,
        register: CpuidRegister,
        bit: u32,
    },
    #[error("cpu override sets bits of CPUID leaf {leaf:#x} subleaf {subleaf:#x}, a leaf this host's KVM does not offer")]
    MissingLeaf { leaf: u32, subleaf: u32 },
    #[error(
        "cpu override of MSR {0:#x}: this host's KVM does not let a VMM read and set that MSR"
    )]
    UnsupportedMsr(u32),
    #[error("cpu override of MSR {addr:#x}: this host's KVM refused the value {value:#x} (it sets a bit the host does not support)")]
    MsrRefused { addr: u32, value: u64 },
    #[error("cpu override of MSR {addr:#x}: this host's KVM took the value but the MSR reads back {got:#x} (bits {mask:#x} should be {wanted:#x})")]
    MsrNotKept {
        addr: u32,
        mask: u64,
        wanted: u64,
        got: u64,
    },
    #[error("cpu: KVM could not {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// Bits a template clears in one CPUID register.
struct Hide {
    leaf: u32,
    subleaf: u32,
    register: CpuidRegister,
    bits: u32,
}

const fn hide(leaf: u32, subleaf: u32, register: CpuidRegister, bits: u32) -> Hide {
    Hide {
        leaf,
        subleaf,
        register,
        bits,
    }
}

const fn bit(n: u32) -> u32 {
    1 << n
}

use CpuidRegister::{Eax, Ebx, Ecx, Edx};

/// `t2`: see the module comment. Bit numbers are those of the Intel SDM / AMD APM.
const T2: &[Hide] = &[
    // Leaf 7.0 EBX: SGX 2, HLE 4, RTM 11, RDT-M 12, MPX 14, RDT-A 15, AVX512F 16, AVX512DQ 17,
    // AVX512_IFMA 21, CLWB 24, Intel PT 25, AVX512PF 26, AVX512ER 27, AVX512CD 28, SHA 29,
    // AVX512BW 30, AVX512VL 31.
    hide(
        0x7,
        0,
        Ebx,
        bit(2)
            | bit(4)
            | bit(11)
            | bit(12)
            | bit(14)
            | bit(15)
            | bit(16)
            | bit(17)
            | bit(21)
            | bit(24)
            | bit(25)
            | bit(26)
            | bit(27)
            | bit(28)
            | bit(29)
            | bit(30)
            | bit(31),
    ),
    // Leaf 7.0 ECX: AVX512_VBMI 1, PKU 3, OSPKE 4, WAITPKG 5, AVX512_VBMI2 6, GFNI 8, VAES 9,
    // VPCLMULQDQ 10, AVX512_VNNI 11, AVX512_BITALG 12, AVX512_VPOPCNTDQ 14, LA57 16, RDPID 22,
    // MOVDIRI 27, MOVDIR64B 28, ENQCMD 29, SGX_LC 30.
    hide(
        0x7,
        0,
        Ecx,
        bit(1)
            | bit(3)
            | bit(4)
            | bit(5)
            | bit(6)
            | bit(8)
            | bit(9)
            | bit(10)
            | bit(11)
            | bit(12)
            | bit(14)
            | bit(16)
            | bit(22)
            | bit(27)
            | bit(28)
            | bit(29)
            | bit(30),
    ),
    // Leaf 7.0 EDX: AVX512_4VNNIW 2, AVX512_4FMAPS 3, AVX512_VP2INTERSECT 8, SERIALIZE 14,
    // TSXLDTRK 16, AMX_BF16 22, AVX512_FP16 23, AMX_TILE 24, AMX_INT8 25.
    hide(
        0x7,
        0,
        Edx,
        bit(2) | bit(3) | bit(8) | bit(14) | bit(16) | bit(22) | bit(23) | bit(24) | bit(25),
    ),
    // Leaf 7.1 EAX: AVX_VNNI 4, AVX512_BF16 5.
    hide(0x7, 1, Eax, bit(4) | bit(5)),
    // Leaf 0xd.0 EAX (XCR0 components): MPX 3-4, AVX-512 5-7, PKRU 9, AMX 17-18.
    hide(
        0xd,
        0,
        Eax,
        bit(3) | bit(4) | bit(5) | bit(6) | bit(7) | bit(9) | bit(17) | bit(18),
    ),
    // Leaf 0xd.1 EAX: XSAVEC 1, XGETBV1 2, XSAVES 3.
    hide(0xd, 1, Eax, bit(1) | bit(2) | bit(3)),
    // Leaf 0x8000_0001 ECX: SSE4A 6, MisAlignSse 7, XOP 11, FMA4 16, TBM 21, MONITORX 29.
    hide(
        0x8000_0001,
        0,
        Ecx,
        bit(6) | bit(7) | bit(11) | bit(16) | bit(21) | bit(29),
    ),
    // Leaf 0x8000_0008 EBX: CLZERO 0, WBNOINVD 9.
    hide(0x8000_0008, 0, Ebx, bit(0) | bit(9)),
];

fn template_hides(template: CpuTemplate) -> &'static [Hide] {
    match template {
        CpuTemplate::None => &[],
        CpuTemplate::T2 => T2,
    }
}

fn register_mut(entry: &mut kvm_cpuid_entry2, register: CpuidRegister) -> &mut u32 {
    match register {
        Eax => &mut entry.eax,
        Ebx => &mut entry.ebx,
        Ecx => &mut entry.ecx,
        Edx => &mut entry.edx,
    }
}

fn register(entry: &kvm_cpuid_entry2, register: CpuidRegister) -> u32 {
    match register {
        Eax => entry.eax,
        Ebx => entry.ebx,
        Ecx => entry.ecx,
        Edx => entry.edx,
    }
}

/// Whether `entry` answers CPUID(`leaf`, `subleaf`): the subleaf counts only for leaves that
/// have subleaves.
fn answers(entry: &kvm_cpuid_entry2, leaf: u32, subleaf: u32) -> bool {
    entry.function == leaf
        && (entry.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || entry.index == subleaf)
}

fn find(cpuid: &CpuId, leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid.as_slice().iter().find(|e| answers(e, leaf, subleaf))
}

/// Clears what `template` hides.
fn apply_template(cpuid: &mut CpuId, template: CpuTemplate) {
    for h in template_hides(template) {
        for entry in cpuid.as_mut_slice() {
            if answers(entry, h.leaf, h.subleaf) {
                *register_mut(entry, h.register) &= !h.bits;
            }
        }
    }
}

/// The guest CPUID: `supported` with `spec`'s template and CPUID overrides applied. A bit an
/// override sets must be in `supported` (a template's clears can be undone).
fn guest_cpuid(supported: &CpuId, spec: &CpuSpec) -> Result<CpuId, CpuConfigError> {
    let mut cpuid = supported.clone();
    apply_template(&mut cpuid, spec.template);
    for o in &spec.cpuid {
        let change = o.change()?;
        // Both widths are 32 bits: a CPUID pattern never has bits above 31.
        let (set, clear) = (change.set as u32, change.clear as u32);
        let Some(offered) = find(supported, o.leaf, o.subleaf) else {
            if set != 0 {
                return Err(CpuConfigError::MissingLeaf {
                    leaf: o.leaf,
                    subleaf: o.subleaf,
                });
            }
            continue;
        };
        let unsupported = set & !register(offered, o.register);
        if unsupported != 0 {
            return Err(CpuConfigError::UnsupportedCpuidBit {
                leaf: o.leaf,
                subleaf: o.subleaf,
                register: o.register,
                bit: 31 - unsupported.leading_zeros(),
            });
        }
        for entry in cpuid.as_mut_slice() {
            if answers(entry, o.leaf, o.subleaf) {
                let value = register_mut(entry, o.register);
                *value = (*value & !clear) | set;
            }
        }
    }
    Ok(cpuid)
}

/// The guest's CPU, checked against the host once, applied to each vCPU.
pub struct GuestCpu {
    /// The CPUID every vCPU starts from (normalised per vCPU afterwards).
    pub cpuid: CpuId,
    msrs: Vec<(u32, BitChange)>,
}

impl GuestCpu {
    /// `supported`: what the host can offer; `settable_msrs`: the MSRs KVM lets a VMM read and
    /// write (KVM_GET_MSR_INDEX_LIST and the feature MSRs).
    pub fn new(
        supported: &CpuId,
        settable_msrs: &[u32],
        spec: &CpuSpec,
    ) -> Result<Self, CpuConfigError> {
        spec.validate()?;
        let cpuid = guest_cpuid(supported, spec)?;
        let mut msrs = Vec::with_capacity(spec.msrs.len());
        for o in &spec.msrs {
            if !settable_msrs.contains(&o.addr) {
                return Err(CpuConfigError::UnsupportedMsr(o.addr));
            }
            msrs.push((o.addr, o.change()?));
        }
        Ok(Self { cpuid, msrs })
    }

    /// Applies the MSR overrides to a vCPU whose boot MSRs are set: each MSR is read, changed,
    /// written back and read again. KVM refuses values with bits the host does not support;
    /// a value KVM takes without keeping the overridden bits is refused here.
    pub fn apply_msrs(&self, fd: &VcpuFd) -> Result<(), CpuConfigError> {
        if self.msrs.is_empty() {
            return Ok(());
        }
        let kvm = |what: &'static str| move |source| CpuConfigError::Kvm { what, source };
        let entries: Vec<_> = self
            .msrs
            .iter()
            .map(|(index, _)| kvm_bindings::kvm_msr_entry {
                index: *index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| CpuConfigError::Kvm {
            what: "hold the MSR overrides",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(kvm("read the MSRs to override"))?;
        if let Some((addr, _)) = self.msrs.get(read) {
            return Err(CpuConfigError::UnsupportedMsr(*addr));
        }
        for (entry, (_, change)) in msrs.as_mut_slice().iter_mut().zip(&self.msrs) {
            entry.data = change.apply(entry.data);
        }
        let written = fd.set_msrs(&msrs).map_err(kvm("set the MSR overrides"))?;
        if let Some(refused) = msrs.as_slice().get(written) {
            return Err(CpuConfigError::MsrRefused {
                addr: refused.index,
                value: refused.data,
            });
        }
        let mut back = Msrs::from_entries(&entries).map_err(|_| CpuConfigError::Kvm {
            what: "hold the MSR overrides",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let read = fd
            .get_msrs(&mut back)
            .map_err(kvm("read the MSR overrides back"))?;
        if let Some((addr, _)) = self.msrs.get(read) {
            return Err(CpuConfigError::UnsupportedMsr(*addr));
        }
        for (entry, (addr, change)) in back.as_slice().iter().zip(&self.msrs) {
            let mask = change.set | change.clear;
            if entry.data & mask != change.set {
                return Err(CpuConfigError::MsrNotKept {
                    addr: *addr,
                    mask,
                    wanted: change.set,
                    got: entry.data,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_spec::cpu::{CpuidOverride, MsrOverride};

    const AVX512F: u32 = 1 << 16;
    const SHA: u32 = 1 << 29;
    const AVX2: u32 = 1 << 5;
    const AES: u32 = 1 << 25;
    const TSC_DEADLINE: u32 = 1 << 24;

    /// A host with AVX2, AVX-512F, SHA, AES and the TSC-deadline timer; leaf 7 has subleaves.
    fn host() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ecx: AES | TSC_DEADLINE,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 0,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ebx: AVX2 | AVX512F | SHA,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 1,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: 1 << 4,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    fn pattern(bit: u32, c: char) -> String {
        (0..32)
            .map(|i| if 31 - i == bit { c } else { 'x' })
            .collect()
    }

    fn over(leaf: u32, subleaf: u32, register: CpuidRegister, bit: u32, c: char) -> CpuidOverride {
        CpuidOverride {
            leaf,
            subleaf,
            register,
            bits: pattern(bit, c),
        }
    }

    fn spec(template: CpuTemplate, cpuid: Vec<CpuidOverride>) -> CpuSpec {
        CpuSpec {
            template,
            cpuid,
            msrs: vec![],
        }
    }

    fn entry(cpuid: &CpuId, leaf: u32, subleaf: u32) -> kvm_cpuid_entry2 {
        *find(cpuid, leaf, subleaf).unwrap()
    }

    #[test]
    fn template_none_is_the_host() {
        let g = GuestCpu::new(&host(), &[], &CpuSpec::default()).unwrap();
        assert_eq!(g.cpuid, host());
    }

    #[test]
    fn t2_hides_avx512_and_sha_but_keeps_the_baseline() {
        let g = GuestCpu::new(&host(), &[], &spec(CpuTemplate::T2, vec![])).unwrap();
        assert_eq!(entry(&g.cpuid, 7, 0).ebx, AVX2);
        assert_eq!(entry(&g.cpuid, 7, 1).eax, 0, "AVX-VNNI hidden in subleaf 1");
        assert_eq!(entry(&g.cpuid, 1, 0).ecx, AES | TSC_DEADLINE);
    }

    #[test]
    fn t2_never_sets_a_bit() {
        let mut all_ones = host();
        for e in all_ones.as_mut_slice() {
            (e.eax, e.ebx, e.ecx, e.edx) = (!0, !0, !0, !0);
        }
        let mut cpuid = all_ones.clone();
        apply_template(&mut cpuid, CpuTemplate::T2);
        for (before, after) in all_ones.as_slice().iter().zip(cpuid.as_slice()) {
            for r in [Eax, Ebx, Ecx, Edx] {
                assert_eq!(register(after, r) & !register(before, r), 0);
            }
        }
        assert_eq!(entry(&cpuid, 7, 0).ebx & AVX512F, 0);
    }

    #[test]
    fn overrides_clear_and_set_supported_bits_after_the_template() {
        let g = GuestCpu::new(
            &host(),
            &[],
            &spec(
                CpuTemplate::T2,
                vec![
                    over(1, 0, Ecx, 25, '0'),   // clear AES
                    over(7, 0, Ebx, 29, '1'),   // SHA back, though T2 hides it
                    over(7, 1, Eax, 4, '0'),    // subleaf 1 only
                    over(0x20, 0, Eax, 0, '0'), // clearing in an absent leaf: nothing to do
                ],
            ),
        )
        .unwrap();
        assert_eq!(entry(&g.cpuid, 1, 0).ecx, TSC_DEADLINE);
        assert_eq!(entry(&g.cpuid, 7, 0).ebx, AVX2 | SHA);
        assert_eq!(entry(&g.cpuid, 7, 1).eax, 0);
    }

    #[test]
    fn setting_an_unsupported_bit_is_refused_naming_it() {
        let err = GuestCpu::new(
            &host(),
            &[],
            &spec(CpuTemplate::None, vec![over(7, 0, Ecx, 9, '1')]),
        )
        .err()
        .unwrap();
        assert!(matches!(
            err,
            CpuConfigError::UnsupportedCpuidBit {
                leaf: 7,
                subleaf: 0,
                register: Ecx,
                bit: 9
            }
        ));
        assert_eq!(
            err.to_string(),
            "cpu override sets CPUID leaf 0x7 subleaf 0x0 ECX bit 9, which this host's KVM does not support"
        );
        let err = GuestCpu::new(
            &host(),
            &[],
            &spec(CpuTemplate::None, vec![over(0x20, 0, Eax, 0, '1')]),
        )
        .err()
        .unwrap();
        assert!(matches!(
            err,
            CpuConfigError::MissingLeaf {
                leaf: 0x20,
                subleaf: 0
            }
        ));
    }

    #[test]
    fn a_leaf_without_subleaves_answers_every_subleaf() {
        let g = GuestCpu::new(
            &host(),
            &[],
            &spec(CpuTemplate::None, vec![over(1, 3, Ecx, 25, '0')]),
        )
        .unwrap();
        assert_eq!(entry(&g.cpuid, 1, 0).ecx, TSC_DEADLINE);
    }

    #[test]
    fn msr_overrides_need_an_msr_kvm_lets_us_set() {
        let msr = MsrOverride {
            addr: 0x1a0,
            bits: format!("{}1", "x".repeat(63)),
        };
        let s = CpuSpec {
            msrs: vec![msr],
            ..CpuSpec::default()
        };
        let err = GuestCpu::new(&host(), &[0x10], &s).err().unwrap();
        assert!(matches!(err, CpuConfigError::UnsupportedMsr(0x1a0)));
        let g = GuestCpu::new(&host(), &[0x10, 0x1a0], &s).unwrap();
        assert_eq!(g.msrs, vec![(0x1a0, BitChange { set: 1, clear: 0 })]);
    }
}
