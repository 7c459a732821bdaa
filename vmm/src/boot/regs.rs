//! vCPU state for entering a 64-bit kernel: GDT, identity page tables for the first GiB,
//! long-mode special registers, general registers, FPU, boot MSRs and the local APIC's
//! LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;
use resources::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Errors setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM vCPU ioctl failed.
    #[error("cannot {what} of vCPU: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("KVM set only {set} of {wanted} boot MSRs")]
    Msrs { set: usize, wanted: usize },
    /// Writing the GDT or page tables into guest memory failed.
    #[error("cannot write boot structures into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

const GDT: [u64; 4] = [
    0,                     // null
    0x00af_9b00_0000_ffff, // 64-bit code, DPL 0
    0x00cf_9300_0000_ffff, // data, DPL 0
    0x008f_8b00_0000_ffff, // 64-bit TSS (busy)
];

fn segment(entry: u64, index: u16) -> kvm_segment {
    let flags = (entry >> 40) & 0xf0ff;
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = (flags >> 15) & 1;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit: limit as u32,
        selector: index * 8,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: g as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and page tables identity-mapping the first GiB with 2 MiB
/// pages. Shared by all vCPUs; call once.
pub fn write_boot_structures(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))?;
    }
    Ok(())
}

/// Puts the bootstrap vCPU in 64-bit mode at `entry` with `rsi` pointing at the zero page.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("read special registers"))?;
    let code = segment(GDT[1], 1);
    let data = segment(GDT[2], 2);
    let tss = segment(GDT[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= 0x1 | 0x8000_0000; // PE | PG
    sregs.cr3 = PML4_START;
    sregs.cr4 |= 0x20; // PAE
    sregs.efer |= 0x100 | 0x400; // LME | LMA
    vcpu.set_sregs(&sregs)
        .map_err(kvm("set special registers"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("set registers"))?;
    Ok(())
}

/// FPU, boot MSRs and local APIC set-up done on every vCPU.
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set FPU state"))?;

    let entries = [
        (0x174, 0),               // IA32_SYSENTER_CS
        (0x175, 0),               // IA32_SYSENTER_ESP
        (0x176, 0),               // IA32_SYSENTER_EIP
        (0xc000_0081, 0),         // STAR
        (0xc000_0082, 0),         // LSTAR
        (0xc000_0083, 0),         // CSTAR
        (0xc000_0084, 0),         // SYSCALL_MASK
        (0xc000_0102, 0),         // KERNEL_GS_BASE
        (0x10, 0),                // TSC
        (0x1a0, 1),               // MISC_ENABLE: fast strings
        (0x2ff, (1 << 11) | 0x6), // MTRRdefType: enabled, write-back
    ];
    let msrs: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&msrs).expect("a fixed list far below the FAM limit");
    let set = vcpu.set_msrs(&msrs).map_err(kvm("set boot MSRs"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }

    // LINT0 delivers ExtINT (the PIC), LINT1 NMI, as firmware leaves them.
    let mut lapic = vcpu.get_lapic().map_err(kvm("read local APIC"))?;
    let mut set_lvt = |offset: usize, mode: u32| {
        let bytes: Vec<u8> = lapic.regs[offset..offset + 4]
            .iter()
            .map(|b| *b as u8)
            .collect();
        let v = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    };
    set_lvt(0x350, 0x7); // LINT0: ExtINT
    set_lvt(0x360, 0x4); // LINT1: NMI
    vcpu.set_lapic(&lapic).map_err(kvm("set local APIC"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let cs = segment(GDT[1], 1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.type_, cs.limit),
            (8, 1, 0, 1, 0xb, 0xffff_ffff)
        );
        let ds = segment(GDT[2], 2);
        assert_eq!((ds.selector, ds.db, ds.type_, ds.s), (16, 1, 3, 1));
        let tr = segment(GDT[3], 3);
        assert_eq!((tr.selector, tr.type_, tr.s), (24, 0xb, 0));
    }
}
