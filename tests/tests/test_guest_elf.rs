//! The test guests are what the VMM's ELF loader expects: ELF64 x86-64, entry and a single
//! PT_LOAD at 1 MiB, and a PT_NOTE with the Xen PHYS32_ENTRY note only in the pvh variant.

use e2e_tests::{artifacts, Error};

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

struct Phdr {
    kind: u32,
    offset: u64,
    paddr: u64,
    vaddr: u64,
    filesz: u64,
}

/// Entry point and program headers of an ELF64 little-endian x86-64 file.
fn parse(b: &[u8]) -> Option<(u64, Vec<Phdr>)> {
    if b.get(..4)? != b"\x7fELF" || *b.get(4)? != 2 || u16_at(b, 18)? != 62 {
        return None;
    }
    let entry = u64_at(b, 24)?;
    let phoff = usize::try_from(u64_at(b, 32)?).ok()?;
    let phentsize = usize::from(u16_at(b, 54)?);
    let phnum = usize::from(u16_at(b, 56)?);
    let phdrs = (0..phnum)
        .map(|i| {
            let p = phoff + i * phentsize;
            Some(Phdr {
                kind: u32_at(b, p)?,
                offset: u64_at(b, p + 8)?,
                vaddr: u64_at(b, p + 16)?,
                paddr: u64_at(b, p + 24)?,
                filesz: u64_at(b, p + 32)?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some((entry, phdrs))
}

/// The PVH entry address from a Xen note (type 18) in a PT_NOTE segment.
fn pvh_entry(b: &[u8], note: &Phdr) -> Option<u32> {
    let start = usize::try_from(note.offset).ok()?;
    let end = start + usize::try_from(note.filesz).ok()?;
    let mut p = start;
    while p + 12 <= end {
        let namesz = usize::try_from(u32_at(b, p)?).ok()?;
        let descsz = usize::try_from(u32_at(b, p + 4)?).ok()?;
        let kind = u32_at(b, p + 8)?;
        let name = b.get(p + 12..p + 12 + namesz)?;
        let desc = p + 12 + namesz.next_multiple_of(4);
        if name == b"Xen\0" && kind == 18 {
            return u32_at(b, desc);
        }
        p = desc + descsz.next_multiple_of(4);
    }
    None
}

#[test]
fn test_guests_are_loadable_at_1mib() -> Result<(), Error> {
    for variant in artifacts::TEST_GUEST_VARIANTS {
        let path = artifacts::test_guest(variant)?;
        let bytes = std::fs::read(&path).map_err(|e| Error::Invalid(format!("{path:?}: {e}")))?;
        let (entry, phdrs) = parse(&bytes).ok_or_else(|| Error::BadFile {
            path: path.clone(),
            problem: "not an ELF64 x86-64 file".into(),
        })?;
        assert_eq!(entry, 0x10_0000, "{variant}: entry");
        let loads: Vec<&Phdr> = phdrs.iter().filter(|p| p.kind == PT_LOAD).collect();
        assert_eq!(loads.len(), 1, "{variant}: one PT_LOAD");
        assert_eq!(
            (loads[0].paddr, loads[0].vaddr),
            (0x10_0000, 0x10_0000),
            "{variant}"
        );
        let pvh = phdrs
            .iter()
            .filter(|p| p.kind == PT_NOTE)
            .find_map(|n| pvh_entry(&bytes, n));
        if *variant == "pvh" {
            let entry32 = pvh.unwrap_or(0);
            assert!(
                (0x10_0000..0x10_1000).contains(&entry32),
                "pvh entry {entry32:#x}"
            );
        } else {
            assert_eq!(pvh, None, "{variant} must not carry the PVH note");
        }
    }
    Ok(())
}
