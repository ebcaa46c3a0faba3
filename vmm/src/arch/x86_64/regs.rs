//! Initial vCPU registers for the two entry protocols: the 64-bit Linux boot protocol (long
//! mode, identity-mapped first GiB) and PVH (32-bit protected mode, paging off).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::gdt::{kvm_segment_from_gdt, LONG_MODE_GDT, PROTECTED_MODE_GDT};
use super::layout::*;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the guest is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit Linux boot protocol: long mode, rsi = zero page.
    LinuxLongMode,
    /// PVH: 32-bit protected mode, ebx = `hvm_start_info`.
    Pvh,
}

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write boot structures (GDT, page tables) to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM refused the initial {what} of the vCPU: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// Writes the GDT, IDT and (for long mode) the identity page tables into guest memory.
pub fn write_boot_tables<M: GuestMemory>(mem: &M, mode: EntryMode) -> Result<(), RegsError> {
    let gdt = match mode {
        EntryMode::LinuxLongMode => &LONG_MODE_GDT,
        EntryMode::Pvh => &PROTECTED_MODE_GDT,
    };
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + (i as u64) * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    if mode == EntryMode::LinuxLongMode {
        // PML4[0] -> PDPT, PDPT[0] -> PD, PD maps 512 x 2 MiB = the first GiB.
        mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
        mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
        for i in 0..512u64 {
            mem.write_obj(
                (i << 21) | 0x83,
                GuestAddress(PDE_START).unchecked_add(i * 8),
            )?;
        }
    }
    Ok(())
}

/// The special registers (segments, control registers, EFER) for `mode`.
pub fn boot_sregs(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    let gdt = match mode {
        EntryMode::LinuxLongMode => &LONG_MODE_GDT,
        EntryMode::Pvh => &PROTECTED_MODE_GDT,
    };
    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    let tss = kvm_segment_from_gdt(gdt[3], 3);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match mode {
        EntryMode::LinuxLongMode => {
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// The general registers at entry: instruction pointer, stack and the boot-info pointer.
pub fn boot_regs(entry: GuestAddress, mode: EntryMode) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        ..Default::default()
    };
    match mode {
        EntryMode::LinuxLongMode => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        EntryMode::Pvh => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// Sets the FPU, special and general registers of a vCPU for the chosen entry.
pub fn setup_registers(
    vcpu: &VcpuFd,
    entry: GuestAddress,
    mode: EntryMode,
) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU state"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    vcpu.set_sregs(&boot_sregs(sregs, mode))
        .map_err(kvm("special registers"))?;
    vcpu.set_regs(&boot_regs(entry, mode))
        .map_err(kvm("general registers"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem, EntryMode::LinuxLongMode).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
    }

    #[test]
    fn long_mode_sregs() {
        let s = boot_sregs(kvm_sregs::default(), EntryMode::LinuxLongMode);
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.cs.l, 1);
    }

    #[test]
    fn pvh_sregs_have_paging_off() {
        let s = boot_sregs(kvm_sregs::default(), EntryMode::Pvh);
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.efer, 0);
        assert_eq!(s.cs.db, 1);
        let r = boot_regs(GuestAddress(0x100_0000), EntryMode::Pvh);
        assert_eq!((r.rip, r.rbx), (0x100_0000, PVH_INFO_START));
    }
}
