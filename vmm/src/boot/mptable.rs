//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs,
//! its IOAPIC and how ISA and PCI interrupts are wired. Linux scans the last KiB of base
//! memory (0x9FC00) for the floating pointer, which is where it goes.
//!
//! Buses: PCI bus 0 is MP bus 0 (Linux matches a PCI function's bus number against the MP
//! bus id when it looks up the function's interrupt), the ISA bus is MP bus 1. ISA IRQs
//! 0-15 go to IOAPIC pins 0-15; each [`PciIntx`] (a function with INTx) is one I/O interrupt
//! entry for bus 0, its slot and pin, level-triggered and active high, to its IOAPIC pin
//! (16-23).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Most vCPUs the table (which must fit in the 1 KiB below 640 KiB) describes here.
pub const MAX_CPUS: u8 = 32;
/// ISA IRQs routed through the IOAPIC (to its pins 0-15).
const ISA_IRQS: u8 = 16;
/// IOAPIC pins.
const IOAPIC_PINS: u8 = 24;
/// MP bus id of PCI bus 0.
const PCI_BUS_ID: u8 = 0;
/// MP bus id of the ISA bus.
const ISA_BUS_ID: u8 = 1;
/// I/O interrupt flags of a PCI interrupt: active high (bits 1:0 = 01), level-triggered
/// (bits 3:2 = 11). KVM's IOAPIC ignores the polarity; the trigger mode must be level.
const PCI_IRQ_FLAGS: u16 = 0x000d;
/// Bytes below 640 KiB from the table's start.
const ROOM: usize = 0xa0000 - resources::layout::MPTABLE_START as usize;

/// The INTx routing of one PCI function on bus 0, as the MP table describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIntx {
    /// Slot (device number), 0-31.
    pub slot: u8,
    /// Interrupt pin, 1-4 (INTA-INTD).
    pub pin: u8,
    /// The IOAPIC pin it is wired to.
    pub ioapic_pin: u8,
}
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

/// Errors building the table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many vCPUs for the table.
    #[error("{0} vCPUs do not fit in the MP table (at most {MAX_CPUS})")]
    TooManyCpus(u8),
    /// A PCI interrupt the table cannot describe.
    #[error("the MP table cannot route INTx of PCI 00:{:02x} pin {} to IOAPIC pin {}: {reason}", .intx.slot, .intx.pin, .intx.ioapic_pin)]
    BadPciIntx {
        /// The routing asked for.
        intx: PciIntx,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The table would not fit below 640 KiB.
    #[error("the MP table of {len} bytes does not fit the {ROOM} bytes below 640 KiB")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// Writing guest memory failed.
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The bytes of the table for `cpus` vCPUs (APIC ids 0..cpus) and the PCI interrupts
/// `pci`: the floating pointer at `base` and the configuration table right after it.
pub fn build(base: u64, cpus: u8, pci: &[PciIntx]) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    for &intx in pci {
        let reason = if intx.slot > 31 {
            Some("the slot is not 0-31")
        } else if !(1..=4).contains(&intx.pin) {
            Some("the pin is not INTA-INTD (1-4)")
        } else if !(ISA_IRQS..IOAPIC_PINS).contains(&intx.ioapic_pin) {
            Some("PCI interrupts go to IOAPIC pins 16-23")
        } else if pci
            .iter()
            .filter(|o| (o.slot, o.pin) == (intx.slot, intx.pin))
            .count()
            > 1
        {
            Some("the slot and pin are listed twice")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(MptableError::BadPciIntx { intx, reason });
        }
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
    // Bus entries: PCI bus 0, then the ISA bus.
    entries.extend_from_slice(&[1, PCI_BUS_ID]);
    entries.extend_from_slice(b"PCI   ");
    entries.extend_from_slice(&[1, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 2;
    // IOAPIC entry.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(resources::layout::IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // I/O interrupt entries: ISA IRQ n -> IOAPIC pin n (type INT, conforming polarity and
    // trigger: edge, active high on ISA).
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&[3, 0, 0, 0, ISA_BUS_ID, irq, ioapic_id, irq]);
        count += 1;
    }
    // PCI interrupts: source bus IRQ = slot << 2 | (pin - 1).
    for i in pci {
        let [lo, hi] = PCI_IRQ_FLAGS.to_le_bytes();
        let source = i.slot << 2 | (i.pin - 1);
        entries.extend_from_slice(&[3, 0, lo, hi, PCI_BUS_ID, source, ioapic_id, i.ioapic_pin]);
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
    if out.len() > ROOM {
        return Err(MptableError::TooLarge { len: out.len() });
    }
    Ok(out)
}

/// Writes the table for `cpus` vCPUs and the PCI interrupts `pci` at
/// [`resources::layout::MPTABLE_START`].
pub fn setup(mem: &GuestMemoryMmap, cpus: u8, pci: &[PciIntx]) -> Result<(), MptableError> {
    let base = resources::layout::MPTABLE_START;
    let bytes = build(base, cpus, pci)?;
    mem.write_slice(&bytes, GuestAddress(base))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entries of the configuration table in `t`, each as its bytes.
    fn entries(t: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut at = 16 + 44;
        while at < t.len() {
            let len = if t[at] == 0 { 20 } else { 8 };
            out.push(&t[at..at + len]);
            at += len;
        }
        out
    }

    #[test]
    fn checksums_and_layout() {
        let pci = [PciIntx {
            slot: 1,
            pin: 1,
            ioapic_pin: 17,
        }];
        for (cpus, pci) in [(1u8, &pci[..]), (2, &[]), (MAX_CPUS, &pci[..])] {
            let t = build(0x9fc00, cpus, pci).unwrap();
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
            // CPUs, two buses, the IOAPIC, ISA IRQs 0-15, the PCI interrupts, LINT0/1.
            assert_eq!(count as usize, cpus as usize + 3 + 16 + pci.len() + 2);
            assert_eq!(entries(&t).len(), count as usize);
            // exactly one bootstrap processor
            let bsp = (0..cpus as usize)
                .filter(|i| t[16 + 44 + i * 20 + 3] & 2 != 0)
                .count();
            assert_eq!(bsp, 1);
        }
    }

    #[test]
    fn pci_bus_0_is_mp_bus_0_and_its_interrupts_are_level_on_their_ioapic_pins() {
        let pci = [
            PciIntx {
                slot: 1,
                pin: 1,
                ioapic_pin: 17,
            },
            PciIntx {
                slot: 3,
                pin: 2,
                ioapic_pin: 20,
            },
        ];
        let t = build(0x9fc00, 2, &pci).unwrap();
        let e = entries(&t);
        let buses: Vec<(u8, &[u8])> = e
            .iter()
            .filter(|e| e[0] == 1)
            .map(|e| (e[1], &e[2..8]))
            .collect();
        assert_eq!(buses, vec![(0, &b"PCI   "[..]), (1, &b"ISA   "[..])]);
        let ioapic_id = 2; // after the two CPUs
        let ints: Vec<&[u8]> = e.iter().filter(|e| e[0] == 3).copied().collect();
        assert_eq!(ints.len(), 18);
        for (irq, entry) in ints[..16].iter().enumerate() {
            let irq = irq as u8;
            assert_eq!(
                *entry,
                &[3, 0, 0, 0, 1, irq, ioapic_id, irq][..],
                "ISA IRQ {irq}"
            );
        }
        // INT, flags 0x000d (level, active high), bus 0, (slot << 2) | (pin - 1).
        assert_eq!(ints[16], &[3, 0, 0x0d, 0, 0, 1 << 2, ioapic_id, 17][..]);
        assert_eq!(ints[17], &[3, 0, 0x0d, 0, 0, 3 << 2 | 1, ioapic_id, 20][..]);
        assert!(
            !ints.iter().any(|e| e[4] == 1 && e[5] >= 16),
            "no ISA IRQ 16-23: those pins are PCI's"
        );
    }

    #[test]
    fn cpu_count_is_checked() {
        assert!(build(0x9fc00, 0, &[]).is_err());
        assert!(build(0x9fc00, MAX_CPUS + 1, &[]).is_err());
    }

    #[test]
    fn pci_interrupts_the_table_cannot_describe_are_refused() {
        let ok = PciIntx {
            slot: 1,
            pin: 1,
            ioapic_pin: 17,
        };
        for (bad, what) in [
            (PciIntx { slot: 32, ..ok }, "slot"),
            (PciIntx { pin: 0, ..ok }, "pin"),
            (PciIntx { pin: 5, ..ok }, "pin"),
            (
                PciIntx {
                    ioapic_pin: 4,
                    ..ok
                },
                "16-23",
            ),
            (
                PciIntx {
                    ioapic_pin: 24,
                    ..ok
                },
                "16-23",
            ),
        ] {
            let e = build(0x9fc00, 1, &[bad]).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
        let e = build(0x9fc00, 1, &[ok, ok]).unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
        // 32 CPUs leave room for 19 PCI interrupts below 640 KiB.
        let many: Vec<PciIntx> = (1..=20)
            .map(|slot| PciIntx {
                slot,
                pin: 1,
                ioapic_pin: 16 + slot % 8,
            })
            .collect();
        assert!(build(0x9fc00, MAX_CPUS, &many[..19]).is_ok());
        let e = build(0x9fc00, MAX_CPUS, &many).unwrap_err();
        assert!(matches!(e, MptableError::TooLarge { len: 1028 }), "{e}");
    }
}
