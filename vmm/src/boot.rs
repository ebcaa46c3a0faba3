//! Loading what the guest boots into guest memory: the kernel (ELF vmlinux with or without a
//! PVH note, or bzImage), the initrd, the command line, and the boot information that points
//! at them.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::arch::x86_64::boot_info::{self, BootInfo, LoadedRange};
use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_HOLE_START};
use crate::arch::x86_64::regs::EntryMode;
use crate::config::BootProtocol;

const PAGE_SIZE: u64 = 4096;
/// The 64-bit entry of a bzImage's protected-mode kernel is 0x200 past its load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelFormat::Elf => "ELF",
            KernelFormat::BzImage => "bzImage",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "kernel {0} is neither an ELF vmlinux nor a bzImage (no ELF magic, no 'HdrS' boot header)"
    )]
    UnknownKernelFormat(PathBuf),
    #[error("kernel {0} has no PVH entry note, but the spec asks for the PVH boot protocol")]
    NoPvhEntry(PathBuf),
    #[error("cannot load {format} kernel {path}: {source} (is the file truncated, or larger than guest memory?)")]
    KernelLoad {
        format: KernelFormat,
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel ({available} bytes free below {limit:#x}); give the VM more memory")]
    InitrdDoesNotFit {
        path: PathBuf,
        size: u64,
        available: u64,
        limit: u64,
    },
    #[error("kernel command line is {0} bytes; at most {max} fit", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error(transparent)]
    BootInfo(#[from] boot_info::BootInfoError),
}

/// Where and how the loaded kernel is entered.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub entry: GuestAddress,
    pub mode: EntryMode,
    pub end: u64,
    setup_header: Option<setup_header>,
}

fn read_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> BootError + 'a {
    move |source| BootError::Read {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Tells an ELF from a bzImage by their magic numbers.
pub fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let mut head = [0u8; 0x206];
    let mut filled = 0;
    while filled < head.len() {
        match file
            .read(&mut head[filled..])
            .map_err(read_err("kernel", path))?
        {
            0 => break,
            n => filled += n,
        }
    }
    file.seek(SeekFrom::Start(0))
        .map_err(read_err("kernel", path))?;
    if filled >= 4 && head[..4] == *b"\x7fELF" {
        Ok(KernelFormat::Elf)
    } else if filled >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(KernelFormat::BzImage)
    } else {
        Err(BootError::UnknownKernelFormat(path.to_path_buf()))
    }
}

/// Loads the kernel at `path` and decides how it is entered.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    protocol: BootProtocol,
) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(read_err("kernel", path))?;
    let format = detect_format(&mut file, path)?;
    let load_err = |source| BootError::KernelLoad {
        format,
        path: path.to_path_buf(),
        source,
    };
    match format {
        KernelFormat::Elf => {
            let result = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let pvh_entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => Some(addr),
                _ => None,
            };
            let (entry, mode) = match (protocol, pvh_entry) {
                (BootProtocol::Auto | BootProtocol::Pvh, Some(addr)) => (addr, EntryMode::Pvh),
                (BootProtocol::Pvh, None) => return Err(BootError::NoPvhEntry(path.to_path_buf())),
                _ => (result.kernel_load, EntryMode::LinuxLongMode),
            };
            Ok(LoadedKernel {
                format,
                entry,
                mode,
                end: result.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            Ok(LoadedKernel {
                format,
                entry: result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                mode: EntryMode::LinuxLongMode,
                end: result.kernel_end,
                setup_header: result.setup_header,
            })
        }
    }
}

/// Places the initrd at the top of RAM below the MMIO hole, above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<LoadedRange, BootError> {
    let mut file = File::open(path).map_err(read_err("initrd", path))?;
    let size = file
        .seek(SeekFrom::End(0))
        .and_then(|s| file.seek(SeekFrom::Start(0)).map(|_| s))
        .map_err(read_err("initrd", path))?;
    let limit = mem
        .last_addr()
        .raw_value()
        .saturating_add(1)
        .min(MMIO_HOLE_START);
    let floor = kernel_end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let available = limit.saturating_sub(floor);
    if size > available {
        return Err(BootError::InitrdDoesNotFit {
            path: path.to_path_buf(),
            size,
            available,
            limit,
        });
    }
    let addr = GuestAddress((limit - size) & !(PAGE_SIZE - 1));
    mem.read_exact_volatile_from(addr, &mut file, size as usize)
        .map_err(|e| BootError::Read {
            what: "initrd",
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(LoadedRange { addr, size })
}

/// Writes the command line and the boot information for the kernel's entry protocol.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &str,
    initrd: Option<LoadedRange>,
) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    let cmdline = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let info = BootInfo {
        mem_size: crate::vstate::memory::ram_size(mem),
        cmdline_size: cmdline
            .as_cstring()
            .map(|c| c.as_bytes_with_nul().len())
            .map_err(|e| BootError::Cmdline(e.to_string()))?,
        initrd,
    };
    match kernel.mode {
        EntryMode::LinuxLongMode => boot_info::write_zero_page(mem, &info, kernel.setup_header)?,
        EntryMode::Pvh => boot_info::write_pvh_start_info(mem, &info)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap()
    }

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn unknown_format_is_named() {
        let f = file_with(b"#!/bin/sh\necho not a kernel\n");
        let err = load_kernel(&mem(), f.path(), BootProtocol::Auto).unwrap_err();
        assert!(
            err.to_string()
                .contains("neither an ELF vmlinux nor a bzImage"),
            "{err}"
        );
    }

    #[test]
    fn truncated_elf_is_an_error() {
        let mut elf = [0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[5] = 1; // little endian
        let f = file_with(&elf[..40]);
        let err = load_kernel(&mem(), f.path(), BootProtocol::Auto).unwrap_err();
        assert!(
            matches!(
                err,
                BootError::KernelLoad {
                    format: KernelFormat::Elf,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn truncated_bzimage_is_an_error() {
        let mut img = vec![0u8; 0x300];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        let f = file_with(&img);
        let err = load_kernel(&mem(), f.path(), BootProtocol::Auto).unwrap_err();
        assert!(
            matches!(
                err,
                BootError::KernelLoad {
                    format: KernelFormat::BzImage,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn missing_kernel_is_named() {
        let err = load_kernel(
            &mem(),
            Path::new("/nonexistent/vmlinux"),
            BootProtocol::Auto,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn initrd_goes_to_the_top_and_must_fit() {
        let m = mem();
        let f = file_with(&[7u8; 10000]);
        let r = load_initrd(&m, f.path(), 2 << 20).unwrap();
        assert_eq!(r.size, 10000);
        assert!(r.addr.raw_value() + r.size <= 32 << 20);
        assert_eq!(r.addr.raw_value() % PAGE_SIZE, 0);
        let err = load_initrd(&m, f.path(), 32 << 20).unwrap_err();
        assert!(matches!(err, BootError::InitrdDoesNotFit { .. }), "{err}");
    }
}
