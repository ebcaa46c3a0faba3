//! The guest CPU in a VM spec: a named CPU template (a documented set of features hidden from
//! the guest, so that VMs see the same CPU on every host of a fleet) and per-bit overrides of
//! CPUID registers and MSRs. Only the form is checked here; whether the host can offer what an
//! override sets is checked by the vmm when the VM starts.
//!
//! A bit pattern is written most significant bit first, one character per bit: `0` clears the
//! bit, `1` sets it, `x` keeps the host's value. CPUID registers take 32 characters, MSRs 64.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Characters of a CPUID register's pattern.
pub const CPUID_BITS: usize = 32;
/// Characters of an MSR's pattern.
pub const MSR_BITS: usize = 64;

/// A named set of features hidden from the guest. The vmm documents what each hides
/// (vmm/src/arch/x86_64/cpu_template.rs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuTemplate {
    /// The host's KVM-supported CPU, unchanged.
    #[default]
    None,
    /// A baseline of x86-64-v3 features (AVX2, no AVX-512, no TSX, no SGX, ...) that every
    /// Intel host from Haswell and AMD host from Zen 1 offers.
    T2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuidRegister {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl std::fmt::Display for CpuidRegister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CpuidRegister::Eax => "EAX",
            CpuidRegister::Ebx => "EBX",
            CpuidRegister::Ecx => "ECX",
            CpuidRegister::Edx => "EDX",
        })
    }
}

/// The effect of a bit pattern: bits to set and bits to clear (never both for one bit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BitChange {
    pub set: u64,
    pub clear: u64,
}

impl BitChange {
    /// Parses a pattern of `width` characters, most significant bit first.
    pub fn parse(pattern: &str, width: usize) -> Result<Self, CpuSpecError> {
        let count = pattern.chars().count();
        if count != width {
            return Err(CpuSpecError::BitsLength {
                pattern: pattern.to_string(),
                expected: width,
                got: count,
            });
        }
        let mut change = BitChange::default();
        for (i, c) in pattern.chars().enumerate() {
            let bit = 1u64 << (width - 1 - i);
            match c {
                '0' => change.clear |= bit,
                '1' => change.set |= bit,
                'x' | 'X' => {}
                other => {
                    return Err(CpuSpecError::BitsChar {
                        pattern: pattern.to_string(),
                        found: other,
                        bit: width - 1 - i,
                    })
                }
            }
        }
        if change == BitChange::default() {
            return Err(CpuSpecError::NoEffect(pattern.to_string()));
        }
        Ok(change)
    }

    /// `value` with the change applied.
    pub fn apply(&self, value: u64) -> u64 {
        (value & !self.clear) | self.set
    }
}

/// A change to one CPUID register of one leaf (and subleaf).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidOverride {
    /// The leaf (EAX input): a number or a "0x..." string.
    #[serde(with = "number_or_hex")]
    pub leaf: u32,
    /// The subleaf (ECX input), 0 when omitted.
    #[serde(default, with = "number_or_hex")]
    pub subleaf: u32,
    pub register: CpuidRegister,
    /// 32 characters of `0`, `1`, `x`, most significant bit first.
    pub bits: String,
}

impl CpuidOverride {
    pub fn change(&self) -> Result<BitChange, CpuSpecError> {
        BitChange::parse(&self.bits, CPUID_BITS)
    }
}

/// A change to one MSR.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrOverride {
    /// The MSR's index: a number or a "0x..." string.
    #[serde(with = "number_or_hex")]
    pub addr: u32,
    /// 64 characters of `0`, `1`, `x`, most significant bit first.
    pub bits: String,
}

impl MsrOverride {
    pub fn change(&self) -> Result<BitChange, CpuSpecError> {
        BitChange::parse(&self.bits, MSR_BITS)
    }
}

/// The guest CPU: a template, then the overrides on top of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuSpec {
    #[serde(default)]
    pub template: CpuTemplate,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpuid: Vec<CpuidOverride>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub msrs: Vec<MsrOverride>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuSpecError {
    #[error("bit pattern {pattern:?} has {got} characters; it needs {expected} (one per bit, most significant first)")]
    BitsLength {
        pattern: String,
        expected: usize,
        got: usize,
    },
    #[error(
        "bit pattern {pattern:?} has {found:?} for bit {bit}; use 0 (clear), 1 (set) or x (keep)"
    )]
    BitsChar {
        pattern: String,
        found: char,
        bit: usize,
    },
    #[error("bit pattern {0:?} changes no bit (all x)")]
    NoEffect(String),
    #[error("CPUID leaf {leaf:#x} subleaf {subleaf:#x} {register} is overridden twice; merge the patterns")]
    DuplicateCpuid {
        leaf: u32,
        subleaf: u32,
        register: CpuidRegister,
    },
    #[error("MSR {0:#x} is overridden twice; merge the patterns")]
    DuplicateMsr(u32),
}

impl CpuSpec {
    /// Checks every pattern and that no register or MSR is named twice.
    pub fn validate(&self) -> Result<(), CpuSpecError> {
        let mut seen = std::collections::BTreeSet::new();
        for o in &self.cpuid {
            o.change()?;
            if !seen.insert((o.leaf, o.subleaf, o.register)) {
                return Err(CpuSpecError::DuplicateCpuid {
                    leaf: o.leaf,
                    subleaf: o.subleaf,
                    register: o.register,
                });
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for o in &self.msrs {
            o.change()?;
            if !seen.insert(o.addr) {
                return Err(CpuSpecError::DuplicateMsr(o.addr));
            }
        }
        Ok(())
    }

    /// True when the guest sees the host's CPU unchanged.
    pub fn is_default(&self) -> bool {
        *self == CpuSpec::default()
    }
}

/// A 32-bit number given in JSON as a number or as a "0x..." (or decimal) string; written
/// back as a hex string.
mod number_or_hex {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Number(u32),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Number(n) => Ok(n),
            Repr::Text(s) => {
                let t = s.trim();
                let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                    Some(hex) => u32::from_str_radix(hex, 16),
                    None => t.parse(),
                };
                parsed.map_err(|_| {
                    serde::de::Error::custom(format!(
                        "{s:?} is not a 32-bit number (write 7, \"7\" or \"0x7\")"
                    ))
                })
            }
        }
    }

    pub fn serialize<S: Serializer>(value: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{value:#x}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpuid(leaf: u32, register: CpuidRegister, bits: &str) -> CpuidOverride {
        CpuidOverride {
            leaf,
            subleaf: 0,
            register,
            bits: bits.into(),
        }
    }

    fn pattern_with(width: usize, bit: usize, c: char) -> String {
        (0..width)
            .map(|i| if width - 1 - i == bit { c } else { 'x' })
            .collect()
    }

    #[test]
    fn patterns_are_msb_first() {
        let change = BitChange::parse(&pattern_with(32, 24, '1'), 32).unwrap();
        assert_eq!(
            change,
            BitChange {
                set: 1 << 24,
                clear: 0
            }
        );
        let change = BitChange::parse(&pattern_with(64, 0, '0'), 64).unwrap();
        assert_eq!(change, BitChange { set: 0, clear: 1 });
        let mixed = format!("10{}", "x".repeat(30));
        let change = BitChange::parse(&mixed, 32).unwrap();
        assert_eq!(change.set, 1 << 31);
        assert_eq!(change.clear, 1 << 30);
        assert_eq!(change.apply(0x4000_0001), 0x8000_0001);
    }

    #[test]
    fn rule_pattern_length_matches_the_register() {
        let err = BitChange::parse("x1", 32).unwrap_err();
        assert_eq!(
            err,
            CpuSpecError::BitsLength {
                pattern: "x1".into(),
                expected: 32,
                got: 2
            }
        );
        // A CPUID-sized pattern is not an MSR pattern.
        let msr = MsrOverride {
            addr: 0x10,
            bits: pattern_with(32, 0, '1'),
        };
        assert!(matches!(
            msr.change(),
            Err(CpuSpecError::BitsLength { expected: 64, .. })
        ));
    }

    #[test]
    fn rule_pattern_characters_are_0_1_x() {
        let bad = pattern_with(32, 5, '?');
        assert_eq!(
            BitChange::parse(&bad, 32),
            Err(CpuSpecError::BitsChar {
                pattern: bad.clone(),
                found: '?',
                bit: 5
            })
        );
    }

    #[test]
    fn rule_a_pattern_changes_something() {
        let all_x = "x".repeat(32);
        assert_eq!(
            BitChange::parse(&all_x, 32),
            Err(CpuSpecError::NoEffect(all_x.clone()))
        );
    }

    #[test]
    fn rule_no_register_or_msr_twice() {
        let one = pattern_with(32, 1, '0');
        let spec = CpuSpec {
            template: CpuTemplate::T2,
            cpuid: vec![
                cpuid(7, CpuidRegister::Ebx, &one),
                cpuid(7, CpuidRegister::Ecx, &one),
                cpuid(7, CpuidRegister::Ebx, &pattern_with(32, 2, '0')),
            ],
            msrs: vec![],
        };
        assert_eq!(
            spec.validate(),
            Err(CpuSpecError::DuplicateCpuid {
                leaf: 7,
                subleaf: 0,
                register: CpuidRegister::Ebx
            })
        );
        let msr = MsrOverride {
            addr: 0x1a0,
            bits: pattern_with(64, 0, '1'),
        };
        let spec = CpuSpec {
            msrs: vec![msr.clone(), msr],
            ..CpuSpec::default()
        };
        assert_eq!(spec.validate(), Err(CpuSpecError::DuplicateMsr(0x1a0)));
    }

    #[test]
    fn json_form_with_hex_or_numbers() {
        let json = format!(
            r#"{{"template": "t2", "cpuid": [{{"leaf": "0x7", "subleaf": 0, "register": "ebx", "bits": "{}"}}, {{"leaf": 1, "register": "ecx", "bits": "{}"}}], "msrs": [{{"addr": "0x1a0", "bits": "{}"}}]}}"#,
            pattern_with(32, 29, '0'),
            pattern_with(32, 24, '0'),
            pattern_with(64, 0, '1'),
        );
        let spec: CpuSpec = serde_json::from_str(&json).unwrap();
        spec.validate().unwrap();
        assert_eq!(spec.template, CpuTemplate::T2);
        assert_eq!((spec.cpuid[0].leaf, spec.cpuid[1].leaf), (7, 1));
        assert_eq!(spec.cpuid[1].subleaf, 0);
        assert_eq!(spec.msrs[0].addr, 0x1a0);
        let back: CpuSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
        for bad in [
            r#"{"template": "t3"}"#,
            r#"{"cpuid": [{"leaf": "seven", "register": "ebx", "bits": ""}]}"#,
            r#"{"cpuid": [{"leaf": 7, "register": "esi", "bits": ""}]}"#,
            r#"{"msr": []}"#,
        ] {
            assert!(serde_json::from_str::<CpuSpec>(bad).is_err(), "{bad}");
        }
        let none: CpuSpec = serde_json::from_str(r#"{"template": "none"}"#).unwrap();
        assert!(none.is_default());
    }
}
