//! The Intel MultiProcessor Specification 1.4 table: how the guest finds its vCPUs (one
//! processor entry per APIC id), the IOAPIC and the ISA interrupt routing.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const IOAPIC_IRQS: u8 = 24;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in an MP table (at most 254)")]
    TooManyCpus(u32),
    #[error("cannot write the MP table to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// The table entries (processors, ISA bus, IOAPIC, interrupt routing) and their count.
fn entries(vcpu_count: u8) -> (Vec<u8>, u16) {
    let mut out = Vec::new();
    let mut count = 0u16;
    for apic_id in 0..vcpu_count {
        let flags = CPU_ENABLED | if apic_id == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        out.extend_from_slice(&[ENTRY_PROCESSOR, apic_id, APIC_VERSION, flags]);
        out.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        out.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        count += 1;
    }
    out.extend_from_slice(&[ENTRY_BUS, 0]);
    out.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic_id = vcpu_count + 1;
    out.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    out.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_IRQS {
        // Type, flags (conforming polarity/trigger), source bus and IRQ, destination pin.
        out.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    out.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    out.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;
    (out, count)
}

/// The whole MP region (floating pointer followed by the configuration table) for a table
/// placed at `base`.
pub fn build(base: u64, vcpu_count: u32) -> Result<Vec<u8>, MpTableError> {
    let cpus = u8::try_from(vcpu_count)
        .ok()
        .filter(|c| *c <= 254)
        .ok_or(MpTableError::TooManyCpus(vcpu_count))?;
    let (body, entry_count) = entries(cpus);
    let table_len = HEADER_SIZE + body.len();

    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"GRIDNODE");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    table.extend_from_slice(&body);
    table[7] = checksum(&table);

    let table_addr = (base + FLOATING_POINTER_SIZE as u64) as u32;
    let mut fp = Vec::with_capacity(FLOATING_POINTER_SIZE);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, revision, checksum, features
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    Ok(fp)
}

/// Writes the MP table for `vcpu_count` vCPUs into the EBDA.
pub fn setup_mptable<M: GuestMemory>(mem: &M, vcpu_count: u32) -> Result<(), MpTableError> {
    let bytes = build(EBDA_START, vcpu_count)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_valid() {
        let bytes = build(EBDA_START, 4).unwrap();
        let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
        assert_eq!(sum(&bytes[..16]), 0);
        assert_eq!(&bytes[16..20], b"PCMP");
        let len = u16::from_le_bytes([bytes[20], bytes[21]]) as usize;
        assert_eq!(16 + len, bytes.len());
        assert_eq!(sum(&bytes[16..]), 0);
        let count = u16::from_le_bytes([bytes[16 + 34], bytes[16 + 35]]);
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
    }

    #[test]
    fn fits_in_the_ebda() {
        assert!(EBDA_START as usize + build(EBDA_START, 32).unwrap().len() <= 0xa0000);
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        assert!(matches!(
            build(EBDA_START, 300),
            Err(MpTableError::TooManyCpus(300))
        ));
    }
}
