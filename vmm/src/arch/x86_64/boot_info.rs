//! The boot information a kernel reads at entry: the e820 memory map, and either the Linux
//! "zero page" (`boot_params`) or the PVH `hvm_start_info` with its module list.

use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::layout::*;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// An initrd (or other module) placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedRange {
    pub addr: GuestAddress,
    pub size: u64,
}

/// What the boot information describes.
pub struct BootInfo {
    pub mem_size: u64,
    pub cmdline_size: usize,
    pub initrd: Option<LoadedRange>,
}

#[derive(Debug, thiserror::Error)]
pub enum BootInfoError {
    #[error("cannot write the boot information to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// The RAM ranges the guest may use, as (start, size).
pub fn e820_ram(mem_size: u64) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    for (start, size) in ram_ranges(mem_size) {
        let start = start.max(HIMEM_START);
        let end = if start == HIMEM_START {
            size
        } else {
            start + size
        };
        if end > start {
            map.push((start, end - start));
        }
    }
    map
}

/// Writes the Linux zero page for the 64-bit boot protocol. `header` is the bzImage's setup
/// header, or `None` for an ELF vmlinux.
pub fn write_zero_page<M: GuestMemory>(
    mem: &M,
    info: &BootInfo,
    header: Option<setup_header>,
) -> Result<(), BootInfoError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline_size as u32;
    if let Some(initrd) = info.initrd {
        params.hdr.ramdisk_image = initrd.addr.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let ram = e820_ram(info.mem_size);
    for (slot, (addr, size)) in params.e820_table.iter_mut().zip(&ram) {
        slot.addr = *addr;
        slot.size = *size;
        slot.type_ = E820_RAM;
    }
    params.e820_entries = ram.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

/// Writes `hvm_start_info`, its memory map and (with an initrd) its module list for PVH.
pub fn write_pvh_start_info<M: GuestMemory>(mem: &M, info: &BootInfo) -> Result<(), BootInfoError> {
    let ram = e820_ram(info.mem_size);
    for (i, (addr, size)) in ram.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: E820_RAM,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))?;
    }
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: ram.len() as u32,
        ..Default::default()
    };
    if let Some(initrd) = info.initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr.raw_value(),
            size: initrd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))?;
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(start_info, GuestAddress(PVH_INFO_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn e820_skips_the_legacy_hole_and_the_mmio_hole() {
        assert_eq!(
            e820_ram(256 << 20),
            vec![(0, EBDA_START), (HIMEM_START, (256 << 20) - HIMEM_START)]
        );
        let big = e820_ram(5 << 30);
        assert_eq!(big.len(), 3);
        assert_eq!(big[1], (HIMEM_START, MMIO_HOLE_START - HIMEM_START));
        assert_eq!(big[2], (1 << 32, (5 << 30) - MMIO_HOLE_START));
    }

    #[test]
    fn zero_page_and_start_info_are_written() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let info = BootInfo {
            mem_size: 64 << 20,
            cmdline_size: 12,
            initrd: Some(LoadedRange {
                addr: GuestAddress(0x20_0000),
                size: 4096,
            }),
        };
        write_zero_page(&mem, &info, None).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.hdr.ramdisk_image }, 0x20_0000);
        assert_eq!(params.e820_entries, 2);

        write_pvh_start_info(&mem, &info).unwrap();
        let si: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(si.magic, XEN_HVM_START_MAGIC);
        assert_eq!((si.nr_modules, si.memmap_entries), (1, 2));
    }
}
