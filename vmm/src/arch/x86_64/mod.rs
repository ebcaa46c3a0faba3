//! x86_64 boot-protocol details kept out of the generic VMM code: memory layout, boot
//! information (e820, zero page, PVH start info), MP table, CPUID (and CPU templates),
//! MSRs, LAPIC, registers.

pub mod boot_info;
pub mod cpu_template;
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msrs;
pub mod regs;
