//! The guest physical address map: where the VMM puts boot structures, where RAM ends and the
//! MMIO hole begins. Every fixed guest address used by the boot path lives here.

/// Start of the kernel's high memory: kernels are loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x0010_0000;

/// GDT and IDT used for the 64-bit entry.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;

/// PVH `hvm_start_info`, its module list (initrd) right after it, and its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6100;

/// The Linux "zero page" (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;

/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Identity-mapping page tables for the 64-bit entry (first 1 GiB, 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;

/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// The kernel's COMMAND_LINE_SIZE on x86 (including the terminating NUL).
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// The MP table sits in the EBDA, just below 640 KiB; RAM under 1 MiB stops here.
pub const EBDA_START: u64 = 0x9_fc00;

/// Guest RAM below 4 GiB stops at the MMIO hole; the rest of RAM continues above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_SIZE: u64 = 0x4000_0000;
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;

/// Where virtio-mmio devices are placed, inside the hole and below the IOAPIC/LAPIC.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;

/// IOAPIC and local APIC default addresses.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;

/// KVM needs three pages for the TSS and one for the identity map, inside the hole.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// The guest RAM ranges for `mem_size` bytes of memory: below the hole, then above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (FIRST_ADDR_PAST_32BITS, mem_size - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![(0, MMIO_HOLE_START), (1 << 32, (4 << 30) - MMIO_HOLE_START)]
        );
        let total: u64 = r.iter().map(|(_, s)| s).sum();
        assert_eq!(total, 4 << 30);
    }
}
