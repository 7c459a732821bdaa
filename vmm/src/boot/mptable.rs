//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs,
//! its IOAPIC and how ISA interrupts are wired. Linux scans the last KiB of base memory
//! (0x9FC00) for the floating pointer, which is where it goes.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Most vCPUs the table (which must fit in the 1 KiB below 640 KiB) describes here.
pub const MAX_CPUS: u8 = 32;
/// ISA interrupts routed through the IOAPIC (its pins 0-23).
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

/// Errors building the table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many vCPUs for the table.
    #[error("{0} vCPUs do not fit in the MP table (at most {MAX_CPUS})")]
    TooManyCpus(u8),
    /// Writing guest memory failed.
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The bytes of the table for `cpus` vCPUs (APIC ids 0..cpus), the floating pointer at
/// `base` and the configuration table right after it.
pub fn build(base: u64, cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        // Processor entry: type 0, enabled, id 0 is the bootstrap processor.
        let flags = 0x01 | if id == 0 { 0x02 } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU | APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus entry: ISA bus 0.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // IOAPIC entry.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(resources::layout::IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // I/O interrupt entries: ISA IRQ n -> IOAPIC pin n (type INT, conforming polarity/trigger).
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupt entries: ExtINT on LINT0, NMI on LINT1 of every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + 16;
    let mut table = Vec::new();
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"RUSTVMM ");
    table.extend_from_slice(b"MEDIATED-VMM");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(resources::layout::LAPIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(4); // spec revision
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0; 5]); // feature bytes: 0 = a configuration table is present
    mpf[10] = checksum(&mpf);

    let mut out = mpf;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the table for `cpus` vCPUs at [`resources::layout::EBDA_START`].
pub fn setup(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let base = resources::layout::EBDA_START;
    let bytes = build(base, cpus)?;
    debug_assert!(base + bytes.len() as u64 <= 0xA0000);
    mem.write_slice(&bytes, GuestAddress(base))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_layout() {
        for cpus in [1u8, 2, MAX_CPUS] {
            let t = build(0x9fc00, cpus).unwrap();
            assert!(
                0x9fc00 + t.len() <= 0xa0000,
                "{cpus} cpus overflow base memory"
            );
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(len, t.len() - 16);
            assert_eq!(t[16..].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            assert_eq!(u32::from_le_bytes([t[4], t[5], t[6], t[7]]), 0x9fc10);
            let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
            assert_eq!(count as usize, cpus as usize + 2 + 24 + 2);
            // exactly one bootstrap processor
            let bsp = (0..cpus as usize)
                .filter(|i| t[16 + 44 + i * 20 + 3] & 2 != 0)
                .count();
            assert_eq!(bsp, 1);
        }
    }

    #[test]
    fn cpu_count_is_checked() {
        assert!(build(0x9fc00, 0).is_err());
        assert!(build(0x9fc00, MAX_CPUS + 1).is_err());
    }
}
