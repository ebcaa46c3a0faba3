//! Guest memory: allocation by the address map and registration with KVM.
//!
//! Guest RAM is mapped at 2 MiB-aligned host addresses and marked for transparent huge pages
//! (as QEMU does), so that KVM can back the guest with 2 MiB pages: a guest that first touches
//! its memory (the kernel unpacking its initramfs at boot) takes one nested page fault per
//! 2 MiB instead of one per 4 KiB. The mappings live as long as the vmm process (one VM per
//! process): they are not unmapped when the `GuestMemoryMmap` is dropped.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::{GuestRegionMmap, MmapRegion};
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::ram_ranges;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map { mib: u64, source: std::io::Error },
    #[error("cannot place guest memory at {start:#x}: {reason}")]
    Region { start: u64, reason: String },
    #[error("KVM refused guest memory slot {slot}: {source}")]
    Register {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// The huge-page size the host addresses of guest RAM are aligned to.
const HUGE_PAGE: usize = 2 << 20;

const PAGE: usize = 4096;

/// An anonymous private mapping of `len` bytes starting at a [`HUGE_PAGE`]-aligned address,
/// advised for transparent huge pages (a host without them just keeps small pages), between
/// two inaccessible guard pages (as Firecracker's regions). The guard page below also keeps
/// the next mapping the kernel places under this one (a thread stack) off a 2 MiB boundary,
/// where it would be given a huge page of its own.
fn map_aligned(len: usize) -> std::io::Result<*mut u8> {
    let reserve = len
        .checked_add(HUGE_PAGE + 2 * PAGE)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a new anonymous mapping at an address the kernel picks: no existing memory is
    // touched. The result is checked.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = base as usize;
    let aligned = (start + PAGE + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
    let (head, tail) = (aligned - PAGE, aligned + len + PAGE);
    // SAFETY: all three ranges lie in the reservation made above: the unused head and tail
    // are unmapped, [head, aligned) and [aligned + len, tail) stay as PROT_NONE guards, and
    // [aligned, aligned + len) becomes the guest's RAM.
    let made_accessible = unsafe {
        if head > start {
            libc::munmap(base, head - start);
        }
        if start + reserve > tail {
            libc::munmap(tail as *mut libc::c_void, start + reserve - tail);
        }
        libc::mprotect(
            aligned as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    };
    if made_accessible != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: advice on the range this function just mapped.
    if unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) } != 0 {
        tracing::debug!(
            "no transparent huge pages for guest memory: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(aligned as *mut u8)
}

/// Allocates `size` bytes of guest RAM around the MMIO hole.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(size) {
        let len = len as usize;
        let addr = map_aligned(len).map_err(|source| MemoryError::Map {
            mib: size >> 20,
            source,
        })?;
        // SAFETY: `addr` is the start of a live mapping of `len` bytes made above for this
        // region alone; it is never unmapped (see the module comment).
        let region = unsafe {
            MmapRegion::build_raw(
                addr,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
        }
        .map_err(|e| MemoryError::Region {
            start,
            reason: e.to_string(),
        })?;
        let region = GuestRegionMmap::new(region, GuestAddress(start)).ok_or_else(|| {
            MemoryError::Region {
                start,
                reason: "the region wraps around the address space".into(),
            }
        })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Region {
        start: 0,
        reason: e.to_string(),
    })
}

/// Total RAM bytes.
pub fn ram_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Tells KVM about every memory region.
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = region.as_ptr() as u64;
        let desc = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host,
            flags: 0,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which outlives the VM (the builder
        // keeps both in the running VM), and the slots do not overlap.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn guest_ram_is_huge_page_aligned_and_usable() {
        let mem = create_guest_memory(6 << 20).unwrap();
        assert_eq!(ram_size(&mem), 6 << 20);
        for region in mem.iter() {
            assert_eq!(region.as_ptr() as usize % HUGE_PAGE, 0);
        }
        let last = GuestAddress((6 << 20) - 8);
        mem.write_obj(0x1122_3344_5566_7788u64, last).unwrap();
        mem.write_obj(0xaau8, GuestAddress(0)).unwrap();
        assert_eq!(mem.read_obj::<u64>(last).unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 0xaa);
        assert!(mem.write_obj(0u8, GuestAddress(6 << 20)).is_err());
    }
}
