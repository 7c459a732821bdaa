//! The x86_64 guest physical address layout.
//!
//! Everything the VMM places at a fixed guest physical address is named here,
//! together with the helpers that split guest RAM around the 32-bit MMIO hole
//! and describe it to the guest through the E820 map.
//!
//! ```text
//! 0x0000_0000  RAM (boot GDT/IDT, zero page, stack, page tables, command line)
//! 0x0009_fc00  EBDA / MP table (not RAM in the E820 map)
//! 0x0010_0000  RAM (kernel and the rest of low memory)
//! 0xc000_0000  32-bit MMIO hole: PCI BARs, then IOAPIC and LAPIC
//! 0x1_0000_0000 RAM above 4 GiB (if the guest has more than 3 GiB)
//! high_mmio_start(ram)  64-bit PCI BARs (64 GiB)
//! ```
//!
//! Port I/O space (16 bits) holds the legacy devices at their ISA ports (PIT, i8042, the
//! serial ports, the PCI configuration mechanism at 0xCF8) and, from [`PCI_IO_START`] to
//! the top, the window for PCI I/O BARs:
//!
//! ```text
//! 0x0000-0x0cff  legacy ISA devices, PCI configuration ports 0xcf8-0xcff
//! 0xc000-0xffff  PCI I/O BARs
//! ```

/// Size of a page of guest memory (4 KiB).
pub const PAGE_SIZE: u64 = 0x1000;

/// One gibibyte.
const GIB: u64 = 1 << 30;

/// Where the boot GDT is written.
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the boot IDT is written.
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (Linux `boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The PML4 page of the identity-mapped boot page tables.
pub const PML4_START: u64 = 0x9000;
/// The PDPTE page of the boot page tables.
pub const PDPTE_START: u64 = 0xa000;
/// The PDE page of the boot page tables.
pub const PDE_START: u64 = 0xb000;
/// Where the kernel command line is written.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest kernel command line, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: u64 = 0x10000;
/// Start of the Extended BIOS Data Area; low RAM in the E820 map ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the MP table is written (at the start of the EBDA).
pub const MPTABLE_START: u64 = EBDA_START;
/// Start of RAM above the legacy 640 KiB - 1 MiB region.
pub const HIGH_RAM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole (3 GiB); low RAM never reaches past it.
pub const MMIO32_HOLE_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO hole (4 GiB); RAM resumes here.
pub const MMIO32_HOLE_END: u64 = 0x1_0000_0000;
/// Start of the window for 32-bit PCI BARs.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
/// End (exclusive) of the window for 32-bit PCI BARs.
pub const PCI_MMIO32_END: u64 = 0xfec0_0000;
/// Base address of the IOAPIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Size of the IOAPIC register window.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Base address of the local APIC.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Size of the local APIC register window.
pub const LAPIC_SIZE: u64 = 0x1000;
/// Size of the window for 64-bit PCI BARs that starts at [`high_mmio_start`].
pub const HIGH_MMIO_SIZE: u64 = 64 * GIB;

/// First port of the window for PCI I/O BARs (above every legacy ISA port and the PCI
/// configuration ports, as PC firmware places them).
pub const PCI_IO_START: u64 = 0xc000;
/// End (exclusive) of the window for PCI I/O BARs: the top of the 16-bit port space.
pub const PCI_IO_END: u64 = 0x1_0000;
/// Largest I/O BAR (PCI Local Bus 3.0, 6.2.5.1: a function must not claim more than 256
/// bytes per I/O BAR).
pub const PCI_IO_BAR_MAX: u64 = 0x100;

// The fixed pieces must not overlap; checked at compile time.
const _: () = {
    assert!(ZERO_PAGE_START + PAGE_SIZE <= BOOT_STACK_POINTER);
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(PDE_START + PAGE_SIZE <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE <= EBDA_START);
    assert!(EBDA_START < HIGH_RAM_START);
    assert!(PCI_MMIO32_START >= MMIO32_HOLE_START && PCI_MMIO32_END <= IOAPIC_START);
    assert!(IOAPIC_START + IOAPIC_SIZE <= LAPIC_START);
    assert!(LAPIC_START + LAPIC_SIZE <= MMIO32_HOLE_END);
    assert!(PCI_IO_START > 0xcff && PCI_IO_END <= 0x1_0000);
    assert!(PCI_IO_BAR_MAX <= PCI_IO_END - PCI_IO_START);
};

/// First address of the 64-bit MMIO window for a guest with `ram_size` bytes
/// of RAM: the first 1 GiB boundary at or above the end of the RAM placed
/// above 4 GiB, or 4 GiB itself when all RAM fits below the hole.
pub fn high_mmio_start(ram_size: u64) -> u64 {
    let high_ram_end = ram_regions(ram_size)
        .last()
        .map(|&(gpa, len)| gpa + len)
        .filter(|&end| end > MMIO32_HOLE_END)
        .unwrap_or(MMIO32_HOLE_END);
    // Only an absurd RAM size reaching the last GiB of the address space can
    // fail to round up; the last GiB boundary is the best answer there.
    high_ram_end
        .checked_next_multiple_of(GIB)
        .unwrap_or(u64::MAX - GIB + 1)
}

/// The guest physical ranges, as `(gpa, len)`, that hold `size` bytes of RAM:
/// up to 3 GiB from address 0, and whatever is left from 4 GiB upwards.
///
/// A `size` of 0 gives no regions. The high region is clamped so that it does
/// not wrap around the 64-bit address space.
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO32_HOLE_START);
    let high = (size - low).min(u64::MAX - MMIO32_HOLE_END);
    let mut regions = Vec::with_capacity(2);
    if low > 0 {
        regions.push((0, low));
    }
    if high > 0 {
        regions.push((MMIO32_HOLE_END, high));
    }
    regions
}

/// The type of an E820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM.
    Ram,
    /// Reserved: the guest must not use it as RAM.
    Reserved,
}

impl E820Kind {
    /// The value of this type in the `type` field of a Linux `boot_e820_entry`.
    pub fn as_raw(self) -> u32 {
        match self {
            E820Kind::Ram => 1,
            E820Kind::Reserved => 2,
        }
    }
}

/// One entry of the E820 memory map handed to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest physical address of the entry.
    pub addr: u64,
    /// Length of the entry in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Kind,
}

/// The E820 map for a guest with `size` bytes of RAM: RAM below the EBDA, RAM
/// from 1 MiB to the end of low RAM, and RAM above 4 GiB if there is any.
///
/// The EBDA..1 MiB gap and the MMIO hole are left out rather than reported as
/// reserved: anything not listed is not RAM to the guest.
pub fn e820_entries(size: u64) -> Vec<E820Entry> {
    let ram = |addr, size| E820Entry {
        addr,
        size,
        kind: E820Kind::Ram,
    };
    let mut entries = Vec::with_capacity(3);
    for (gpa, len) in ram_regions(size) {
        if gpa == 0 {
            entries.push(ram(0, len.min(EBDA_START)));
            if len > HIGH_RAM_START {
                entries.push(ram(HIGH_RAM_START, len - HIGH_RAM_START));
            }
        } else {
            entries.push(ram(gpa, len));
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn ram(addr: u64, size: u64) -> E820Entry {
        E820Entry {
            addr,
            size,
            kind: E820Kind::Ram,
        }
    }

    #[test]
    fn layout_256_mib() {
        let size = 256 * MIB;
        assert_eq!(ram_regions(size), vec![(0, size)]);
        assert_eq!(
            e820_entries(size),
            vec![
                ram(0, EBDA_START),
                ram(HIGH_RAM_START, size - HIGH_RAM_START)
            ]
        );
        assert_eq!(high_mmio_start(size), 4 * GIB);
    }

    #[test]
    fn layout_exactly_3_gib() {
        let size = 3 * GIB;
        assert_eq!(ram_regions(size), vec![(0, 3 * GIB)]);
        assert_eq!(
            e820_entries(size),
            vec![
                ram(0, EBDA_START),
                ram(HIGH_RAM_START, MMIO32_HOLE_START - HIGH_RAM_START)
            ]
        );
        assert_eq!(high_mmio_start(size), 4 * GIB);
    }

    #[test]
    fn layout_5_gib() {
        let size = 5 * GIB;
        assert_eq!(ram_regions(size), vec![(0, 3 * GIB), (4 * GIB, 2 * GIB)]);
        assert_eq!(
            e820_entries(size),
            vec![
                ram(0, EBDA_START),
                ram(HIGH_RAM_START, MMIO32_HOLE_START - HIGH_RAM_START),
                ram(4 * GIB, 2 * GIB),
            ]
        );
        assert_eq!(high_mmio_start(size), 6 * GIB);
    }

    #[test]
    fn high_mmio_starts_on_the_next_gib_boundary() {
        assert_eq!(high_mmio_start(3 * GIB + 1), 5 * GIB);
        assert_eq!(high_mmio_start(4 * GIB + 512 * MIB), 6 * GIB);
    }

    #[test]
    fn tiny_and_empty_guests() {
        assert!(ram_regions(0).is_empty());
        assert!(e820_entries(0).is_empty());
        assert_eq!(e820_entries(512 * 1024), vec![ram(0, 512 * 1024)]);
        assert_eq!(e820_entries(MIB), vec![ram(0, EBDA_START)]);
    }

    #[test]
    fn e820_raw_types() {
        assert_eq!(E820Kind::Ram.as_raw(), 1);
        assert_eq!(E820Kind::Reserved.as_raw(), 2);
    }
}
