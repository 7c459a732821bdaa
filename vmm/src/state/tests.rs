//! Save and restore against the real KVM: a small real-mode guest runs, is captured, and
//! continues in a second VM. Each test skips itself if /dev/kvm cannot be opened.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::vcpu::{complete_pending_io, read_msrs, KvmCaps, MsrEntry, VcpuState};
use super::vm::{ClockRestore, VmState, TSS_ADDRESS};
use super::{StateBytes, StateError};
use crate::boot::cpuid;

/// `u32` index of XMM3 in the XSAVE legacy area (byte 160 + 3 * 16).
const XMM3_WORD: usize = 52;
/// `u32` index of XSTATE_BV (byte 512).
const XSTATE_BV_WORD: usize = 128;

/// XMM3 as the vCPU has it: from XSAVE if KVM has it (the authoritative view), else FPU.
fn xmm3(vcpu: &VcpuFd, caps: &KvmCaps) -> [u8; 16] {
    if caps.xsave {
        let x = vcpu.get_xsave().unwrap();
        let mut out = [0u8; 16];
        for i in 0..4 {
            out[i * 4..i * 4 + 4].copy_from_slice(&x.region[XMM3_WORD + i].to_le_bytes());
        }
        out
    } else {
        vcpu.get_fpu().unwrap().xmm[3]
    }
}

const MEM_SIZE: usize = 0x10000;
const CODE_ADDR: usize = 0x1000;
/// The port the test guest reports its counter on.
const PORT: u16 = 0x10;

/// Real-mode code at 0x1000: mask the PIC (in-kernel, no exit), program PIT channel 0
/// (in-kernel), then loop: `inc ebx; mov ax, bx; out 0x10, al; jmp loop`.
const CODE: &[u8] = &[
    0xb0, 0xfb, // mov al, 0xfb
    0xe6, 0x21, // out 0x21, al      PIC master IMR
    0xb0, 0x34, // mov al, 0x34
    0xe6, 0x43, // out 0x43, al      PIT: channel 0, lo/hi, mode 2
    0xb0, 0x34, // mov al, 0x34
    0xe6, 0x40, // out 0x40, al      count low
    0xb0, 0x12, // mov al, 0x12
    0xe6, 0x40, // out 0x40, al      count high
    0x66, 0x43, // loop (0x1010): inc ebx
    0x89, 0xd8, // mov ax, bx
    0xe6, 0x10, // out 0x10, al
    0xeb, 0xf8, // jmp loop
];
/// RIP of the `out 0x10` and of the `jmp` after it.
const OUT_RIP: u64 = 0x1014;
const JMP_RIP: u64 = 0x1016;

/// Anonymous memory mapped as guest RAM at 0.
struct GuestRam {
    ptr: *mut u8,
}

impl GuestRam {
    fn new() -> GuestRam {
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap guest RAM");
        GuestRam { ptr: ptr.cast() }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live mapping of MEM_SIZE bytes owned by `self`; the guest may
        // write it concurrently only while a vCPU runs, which needs `&mut` on the vCPU, not
        // on this.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, MEM_SIZE) }
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`, after the VM using it was dropped (the
        // VM fields come first in `TestVm`, so they drop first).
        unsafe { libc::munmap(self.ptr.cast(), MEM_SIZE) };
    }
}

/// A VM set up as `vm::run` does (TSS, irqchip, PIT2), with 64 KiB of RAM.
struct TestVm {
    vcpu: Option<VcpuFd>,
    vm: VmFd,
    ram: GuestRam,
}

fn kvm() -> Option<Kvm> {
    match Kvm::new() {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("no /dev/kvm ({e}): skipping");
            None
        }
    }
}

fn new_vm(kvm: &Kvm, ram_contents: Option<&[u8]>) -> TestVm {
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(TSS_ADDRESS as usize).unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .unwrap();
    let mut ram = GuestRam::new();
    match ram_contents {
        Some(src) => ram.bytes().copy_from_slice(src),
        None => ram.bytes()[CODE_ADDR..CODE_ADDR + CODE.len()].copy_from_slice(CODE),
    }
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: ram.ptr as u64,
        flags: 0,
    };
    // SAFETY: the region is the live mapping in `ram`, which outlives the VM (field order in
    // `TestVm`), and no other slot exists.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    TestVm {
        vcpu: None,
        vm,
        ram,
    }
}

/// vCPU 0 as the VMM sets it up (filtered CPUID), then put in real mode at CODE_ADDR.
fn boot_vcpu(kvm: &Kvm, t: &mut TestVm) {
    let vcpu = t.vm.create_vcpu(0).unwrap();
    let base = cpuid::supported(kvm).unwrap();
    vcpu.set_cpuid2(&cpuid::for_vcpu(&base, 0, 1)).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip: CODE_ADDR as u64,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).unwrap();
    t.vcpu = Some(vcpu);
}

/// Runs until `n` writes to PORT; returns their values. Other port writes (none expected)
/// and any other exit fail the test.
fn run_outs(vcpu: &mut VcpuFd, n: usize) -> Vec<u8> {
    let mut seen = Vec::new();
    while seen.len() < n {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(PORT, data) => seen.push(data[0]),
            other => panic!("unexpected exit {other:?}"),
        }
    }
    seen
}

fn caps(kvm: &Kvm, vm: &VmFd) -> KvmCaps {
    KvmCaps::probe(kvm, vm).unwrap()
}

/// MSRs set to non-default values before the capture.
const MARKED_MSRS: &[(u32, u64)] = &[
    (0x174, 0x1234),                      // SYSENTER_CS
    (0xc000_0082, 0xffff_ffff_8100_0000), // LSTAR
    (0x2ff, 0xc06),                       // MTRR_DEF_TYPE: enabled, fixed enabled, WB
    (0x200, 0x6),                         // MTRR_PHYSBASE0: WB at 0
    (0x4b56_4d01, 0x8001),                // KVM_SYSTEM_TIME_NEW: pvclock at 0x8000, on
];

const XMM3: [u8; 16] = *b"0123456789abcdef";

/// Sets recognisable values in places the guest code does not touch, so that their
/// transfer can be checked: XMM3, some MSRs (kvmclock on), DR0.
fn mark_state(vcpu: &VcpuFd, caps: &KvmCaps) {
    if caps.xsave {
        // Through XSAVE with XSTATE_BV's SSE bit: KVM_SET_FPU writes the legacy area but
        // leaves XSTATE_BV alone, so with XSAVE the value would count as unused (init) state.
        let mut xsave = vcpu.get_xsave().unwrap();
        for (i, w) in XMM3.chunks(4).enumerate() {
            xsave.region[XMM3_WORD + i] = u32::from_le_bytes(w.try_into().unwrap());
        }
        xsave.region[XSTATE_BV_WORD] |= 0x3;
        // SAFETY: KvmCaps reported a 4096-byte XSAVE area here (asserted by the caller
        // through `caps.xsave_size`), the size of `kvm_xsave`.
        assert_eq!(caps.xsave_size, 4096);
        unsafe { vcpu.set_xsave(&xsave) }.unwrap();
    } else {
        let mut fpu = vcpu.get_fpu().unwrap();
        fpu.xmm[3] = XMM3;
        vcpu.set_fpu(&fpu).unwrap();
    }
    let entries: Vec<kvm_bindings::kvm_msr_entry> = MARKED_MSRS
        .iter()
        .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = kvm_bindings::Msrs::from_entries(&entries).unwrap();
    assert_eq!(vcpu.set_msrs(&msrs).unwrap(), MARKED_MSRS.len());
    let mut dregs = vcpu.get_debug_regs().unwrap();
    dregs.db[0] = 0x5000;
    vcpu.set_debug_regs(&dregs).unwrap();
}

/// Source VM: runs 5 iterations, completes the last `out`, captures (through bytes).
fn run_and_capture(kvm: &Kvm) -> (TestVm, VcpuState, VmState) {
    let mut src = new_vm(kvm, None);
    boot_vcpu(kvm, &mut src);
    let caps = caps(kvm, &src.vm);
    let vcpu = src.vcpu.as_mut().unwrap();
    mark_state(vcpu, &caps);
    assert_eq!(run_outs(vcpu, 5), [1, 2, 3, 4, 5]);
    complete_pending_io(vcpu, 0).unwrap();
    let v = VcpuState::capture(vcpu, 0, &caps).unwrap();
    let m = VmState::capture(&src.vm).unwrap();
    let v = VcpuState::from_bytes(&v.to_bytes().unwrap()).unwrap();
    let m = VmState::from_bytes(&m.to_bytes().unwrap()).unwrap();
    (src, v, m)
}

/// Destination VM: same RAM, VM state, then vCPU 0 with its state.
fn restore_into(kvm: &Kvm, src: &mut TestVm, v: &VcpuState, m: &VmState) -> TestVm {
    let ram = src.ram.bytes().to_vec();
    let mut dst = new_vm(kvm, Some(&ram));
    m.restore(&dst.vm, ClockRestore::Frozen).unwrap();
    let vcpu = dst.vm.create_vcpu(u64::from(v.id)).unwrap();
    v.restore(&vcpu, &caps(kvm, &dst.vm)).unwrap();
    dst.vcpu = Some(vcpu);
    dst
}

#[test]
fn guest_continues_in_a_second_vm() {
    let Some(kvm) = kvm() else { return };
    let (mut src, v, m) = run_and_capture(&kvm);
    assert_eq!(v.regs.rbx, 5);
    assert_eq!(v.regs.rip, JMP_RIP, "the last out is complete");

    let mut dst = restore_into(&kvm, &mut src, &v, &m);
    let vcpu = dst.vcpu.as_mut().unwrap();
    // What the guest itself set up came along: PIC mask, PIT channel 0 count.
    let mut pic = kvm_bindings::kvm_irqchip {
        chip_id: KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    dst.vm.get_irqchip(&mut pic).unwrap();
    // SAFETY: chip 0 is a PIC, so the union holds `pic`.
    assert_eq!(unsafe { pic.chip.pic }.imr, 0xfb);
    assert_eq!(dst.vm.get_pit2().unwrap().channels[0].count, 0x1234);
    // And what the VMM had set.
    assert_eq!(xmm3(vcpu, &caps(&kvm, &dst.vm)), XMM3);
    assert_eq!(vcpu.get_debug_regs().unwrap().db[0], 0x5000);
    let indices: Vec<u32> = MARKED_MSRS.iter().map(|m| m.0).collect();
    let (msrs, _) = read_msrs(vcpu, 0, &indices).unwrap();
    let msrs: Vec<(u32, u64)> = msrs.iter().map(|e| (e.index, e.data)).collect();
    assert_eq!(msrs, MARKED_MSRS);

    // The guest continues where it stopped.
    assert_eq!(run_outs(vcpu, 3), [6, 7, 8]);
    assert_eq!(vcpu.get_regs().unwrap().rbx, 8);
    // The source can go on too (a failed migration resumes it).
    assert_eq!(run_outs(src.vcpu.as_mut().unwrap(), 1), [6]);
}

#[test]
fn every_saved_msr_reads_back_after_restore() {
    let Some(kvm) = kvm() else { return };
    let (mut src, v, m) = run_and_capture(&kvm);
    let dst = restore_into(&kvm, &mut src, &v, &m);
    let indices: Vec<u32> = v.msrs.iter().map(|e| e.index).collect();
    let (back, skipped) = read_msrs(dst.vcpu.as_ref().unwrap(), 0, &indices).unwrap();
    assert!(skipped.is_empty(), "unreadable after restore: {skipped:x?}");
    // The TSC has moved on; everything else is as saved.
    let differ: Vec<(u32, u64, u64)> = v
        .msrs
        .iter()
        .zip(&back)
        .filter(|(a, b)| a.data != b.data && a.index != 0x10)
        .map(|(a, b)| (a.index, a.data, b.data))
        .collect();
    assert!(
        differ.is_empty(),
        "MSRs differ (index, saved, now): {differ:x?}"
    );
    let tsc = |s: &[MsrEntry]| s.iter().find(|e| e.index == 0x10).map(|e| e.data);
    assert!(tsc(&back) >= tsc(&v.msrs), "TSC went backwards");
}

#[test]
fn completing_the_exit_does_not_run_the_guest() {
    let Some(kvm) = kvm() else { return };
    let mut src = new_vm(&kvm, None);
    boot_vcpu(&kvm, &mut src);
    let vcpu = src.vcpu.as_mut().unwrap();
    assert_eq!(run_outs(vcpu, 2), [1, 2]);
    let at_exit = vcpu.get_regs().unwrap();
    complete_pending_io(vcpu, 0).unwrap();
    let after = vcpu.get_regs().unwrap();
    assert_eq!(after.rbx, 2, "no further iteration ran");
    assert_eq!(after.rip, JMP_RIP, "the out is complete");
    // Upstream KVM leaves RIP at the `out` until the next KVM_RUN; this nested KVM has
    // already moved it (the instruction emulator completes the `out` before exiting).
    eprintln!(
        "RIP at the out exit: {:#x} ({})",
        at_exit.rip,
        if at_exit.rip == OUT_RIP {
            "not yet completed"
        } else {
            "already completed"
        }
    );
    assert!(at_exit.rip == OUT_RIP || at_exit.rip == JMP_RIP);
    // A second call has nothing to complete and still runs no guest code.
    complete_pending_io(vcpu, 0).unwrap();
    assert_eq!(vcpu.get_regs().unwrap().rip, JMP_RIP);
    assert_eq!(run_outs(vcpu, 1), [3]);
}

#[test]
fn kvm_clock_is_restored_frozen_or_advanced() {
    let Some(kvm) = kvm() else { return };
    let a = new_vm(&kvm, None);
    let m = VmState::capture(&a.vm).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));

    let b = new_vm(&kvm, None);
    m.restore(&b.vm, ClockRestore::Frozen).unwrap();
    let now = b.vm.get_clock().unwrap().clock;
    assert!(now >= m.clock.clock, "clock went backwards");
    assert!(
        now - m.clock.clock < 40_000_000,
        "frozen clock advanced by the sleep"
    );

    // Advanced by the wall-clock time since the capture: by KVM if it paired the clock with
    // the wall clock (KVM_CLOCK_REALTIME), else by VmState::realtime_ns.
    eprintln!(
        "KVM_GET_CLOCK flags {:#x} (REALTIME {})",
        m.clock.flags,
        m.clock.flags & KVM_CLOCK_REALTIME != 0
    );
    let c = new_vm(&kvm, None);
    m.restore(&c.vm, ClockRestore::AdvanceByRealtime).unwrap();
    let now = c.vm.get_clock().unwrap().clock;
    let advanced = now - m.clock.clock;
    assert!(
        advanced >= 50_000_000,
        "not advanced by the sleep: {advanced} ns"
    );
    assert!(advanced < 5_000_000_000, "advanced too far: {advanced} ns");
}

#[test]
fn ioapic_and_pit_state_round_trip() {
    let Some(kvm) = kvm() else { return };
    let a = new_vm(&kvm, None);
    let mut ioapic = kvm_bindings::kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    a.vm.get_irqchip(&mut ioapic).unwrap();
    // SAFETY: chip 2 is the IOAPIC, so the union holds `ioapic`; writing a plain-data field.
    unsafe {
        ioapic.chip.ioapic.redirtbl[5].bits = 0x0000_0000_0001_0035;
        ioapic.chip.ioapic.id = 3;
    }
    a.vm.set_irqchip(&ioapic).unwrap();
    let mut pit = a.vm.get_pit2().unwrap();
    pit.channels[2].count = 0x4321;
    pit.channels[2].mode = 3;
    a.vm.set_pit2(&pit).unwrap();
    let m = VmState::from_bytes(&VmState::capture(&a.vm).unwrap().to_bytes().unwrap()).unwrap();

    let b = new_vm(&kvm, None);
    m.restore(&b.vm, ClockRestore::Frozen).unwrap();
    let mut back = kvm_bindings::kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    b.vm.get_irqchip(&mut back).unwrap();
    // SAFETY: chip 2 is the IOAPIC.
    let (bits, id) = unsafe { (back.chip.ioapic.redirtbl[5].bits, back.chip.ioapic.id) };
    assert_eq!((bits, id), (0x1_0035, 3));
    let pit = b.vm.get_pit2().unwrap();
    assert_eq!((pit.channels[2].count, pit.channels[2].mode), (0x4321, 3));
}

#[test]
fn states_round_trip_through_bytes() {
    let Some(kvm) = kvm() else { return };
    let (_src, v, m) = run_and_capture(&kvm);
    let vb = v.to_bytes().unwrap();
    assert_eq!(VcpuState::from_bytes(&vb).unwrap().to_bytes().unwrap(), vb);
    let mb = m.to_bytes().unwrap();
    assert_eq!(VmState::from_bytes(&mb).unwrap().to_bytes().unwrap(), mb);
    let v2 = VcpuState::from_bytes(&vb).unwrap();
    assert_eq!(v2.cpuid, v.cpuid);
    assert_eq!(v2.msrs, v.msrs);
    assert_eq!(v2.fpu, v.fpu);
    assert_eq!(v2.xsave, v.xsave);
    assert_eq!(v2.regs.rbx, 5);
    eprintln!(
        "encoded sizes: vCPU state {} bytes ({} MSRs, {} CPUID entries, XSAVE {:?} words), \
         VM state {} bytes",
        vb.len(),
        v.msrs.len(),
        v.cpuid.len(),
        v.xsave.as_ref().map(Vec::len),
        mb.len()
    );
}

#[test]
fn what_kvm_here_saves() {
    let Some(kvm) = kvm() else { return };
    let mut t = new_vm(&kvm, None);
    boot_vcpu(&kvm, &mut t);
    let caps = caps(&kvm, &t.vm);
    let (read, skipped) = read_msrs(t.vcpu.as_ref().unwrap(), 0, &caps.msr_indices).unwrap();
    eprintln!("MSRs: {:x?}", caps.msr_indices);
    eprintln!(
        "caps: xsave {} (area {} bytes), xcrs {}, get_tsc_khz {}, tsc_control {}",
        caps.xsave, caps.xsave_size, caps.xcrs, caps.get_tsc_khz, caps.tsc_control
    );
    eprintln!(
        "MSR index list: {} entries, {} readable, not readable: {:x?}",
        caps.msr_indices.len(),
        read.len(),
        skipped
    );
    let v = VcpuState::capture(t.vcpu.as_ref().unwrap(), 0, &caps).unwrap();
    eprintln!(
        "xcr0 {:x?}, tsc_khz {:?}, mp_state {}",
        v.xcr0(),
        v.tsc_khz,
        v.mp_state.mp_state
    );
    // The MSRs a restored Linux guest cannot do without (EFER and the FS/GS bases travel
    // in the special registers).
    for (index, name) in [
        (0x10, "TSC"),
        (0xc000_0081, "STAR"),
        (0xc000_0082, "LSTAR"),
        (0xc000_0102, "KERNEL_GS_BASE"),
        (0x277, "PAT"),
        (0x4b56_4d01, "KVM_SYSTEM_TIME_NEW"),
        (0x4b56_4d00, "KVM_WALL_CLOCK_NEW"),
        (0x6e0, "TSC_DEADLINE"),
        (0x2ff, "MTRR_DEF_TYPE"),
    ] {
        assert!(v.msr(index).is_some(), "{name} ({index:#x}) not saved");
    }
    assert_eq!(read.len() + skipped.len(), caps.msr_indices.len());
}

#[test]
fn garbage_and_mismatched_state_give_clear_errors() {
    let Some(kvm) = kvm() else { return };
    let (mut src, v, m) = run_and_capture(&kvm);

    // Bytes that are not a state.
    let e = VcpuState::from_bytes(b"\x00garbage").unwrap_err();
    assert!(matches!(e, StateError::Decode { .. }), "{e}");
    let mut truncated = v.to_bytes().unwrap();
    truncated.truncate(truncated.len() / 2);
    let e = VcpuState::from_bytes(&truncated).unwrap_err();
    assert!(e.to_string().starts_with("cannot decode vCPU state"), "{e}");
    let e = VmState::from_bytes(&v.to_bytes().unwrap()).unwrap_err();
    assert!(
        matches!(
            e,
            StateError::Decode {
                what: "VM state",
                ..
            }
        ),
        "{e}"
    );

    let ram = src.ram.bytes().to_vec();
    let restore = |state: &VcpuState| -> StateError {
        let dst = new_vm(&kvm, Some(&ram));
        let vcpu = dst.vm.create_vcpu(0).unwrap();
        state.restore(&vcpu, &caps(&kvm, &dst.vm)).unwrap_err()
    };

    // An MSR this KVM does not know.
    let mut bad = v.clone();
    bad.msrs.insert(
        3,
        MsrEntry {
            index: 0xdead_beef,
            data: 1,
        },
    );
    let e = restore(&bad);
    assert!(
        matches!(
            e,
            StateError::MsrRejected {
                vcpu: 0,
                index: 0xdead_beef,
                set: 3,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("0xdeadbeef"), "{e}");

    // Special registers KVM refuses (CR0.PG without CR0.PE).
    let mut bad = v.clone();
    bad.sregs.cr0 = 0x8000_0000;
    let e = restore(&bad);
    assert_eq!(
        e.to_string().split(':').next().unwrap(),
        "vCPU 0",
        "names the vCPU: {e}"
    );
    assert!(
        matches!(
            e,
            StateError::Vcpu {
                ioctl: "KVM_SET_SREGS",
                ..
            }
        ),
        "{e}"
    );

    // A CPUID list longer than KVM takes.
    let mut bad = v.clone();
    bad.cpuid = vec![Default::default(); 300];
    let e = restore(&bad);
    assert!(
        matches!(e, StateError::TooMany { what: "CPUID", .. }),
        "{e}"
    );

    // Debug registers with reserved bits set.
    let mut bad = v.clone();
    bad.debug_regs.dr7 = 1 << 40;
    let e = restore(&bad);
    assert!(
        matches!(
            e,
            StateError::Vcpu {
                ioctl: "KVM_SET_DEBUGREGS",
                ..
            }
        ),
        "{e}"
    );

    // An XSAVE area with state beyond what KVM here holds.
    if let Some(area) = &v.xsave {
        let mut bad = v.clone();
        let mut big = area.clone();
        big.resize(area.len().max(1024) + 4096, 0);
        *big.last_mut().unwrap() = 1;
        bad.xsave = Some(big);
        let e = restore(&bad);
        assert!(matches!(e, StateError::XsaveTooBig { .. }), "{e}");
    }

    // A VM without an in-kernel irqchip cannot take irqchip state.
    let bare = kvm.create_vm().unwrap();
    let e = m.restore(&bare, ClockRestore::Frozen).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("VM: KVM_SET_IRQCHIP (PIC master) failed"),
        "{e}"
    );
}

#[test]
fn restores_onto_a_kvm_without_xsave_through_the_legacy_fpu() {
    let Some(kvm) = kvm() else { return };
    let (mut src, v, m) = run_and_capture(&kvm);
    let ram = src.ram.bytes().to_vec();
    let mut dst = new_vm(&kvm, Some(&ram));
    m.restore(&dst.vm, ClockRestore::Frozen).unwrap();
    let vcpu = dst.vm.create_vcpu(0).unwrap();
    let real = caps(&kvm, &dst.vm);
    let no_xsave = KvmCaps {
        xsave: false,
        xcrs: false,
        ..real.clone()
    };
    v.restore(&vcpu, &no_xsave).unwrap();
    assert_eq!(xmm3(&vcpu, &no_xsave), XMM3, "KVM_GET_FPU view");
    dst.vcpu = Some(vcpu);
    let vcpu = dst.vcpu.as_mut().unwrap();
    assert_eq!(run_outs(vcpu, 1), [6]);
}
