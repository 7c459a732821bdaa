//! One vCPU's KVM state: capture ([`VcpuState::capture`]) and restore
//! ([`VcpuState::restore`]), in the orders Firecracker and Cloud Hypervisor use (see the
//! comments at each step for why).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::{StateBytes, StateError};

/// Size of the legacy `struct kvm_xsave` (KVM_GET_XSAVE without XSAVE2).
const KVM_XSAVE_LEGACY_SIZE: usize = std::mem::size_of::<kvm_xsave>();
/// `u32`s in the legacy `kvm_xsave` region.
const XSAVE_REGION_WORDS: usize = KVM_XSAVE_LEGACY_SIZE / 4;

/// TSC frequencies within this many parts per million count as equal (hosts calibrate their
/// TSC at boot, so the same CPU model reports slightly different values; QEMU's tolerance).
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// Architectural MSRs a guest can change that KVM handles but leaves out of
/// KVM_GET_MSR_INDEX_LIST (QEMU and Firecracker add them by hand): the MTRRs (default type,
/// the 11 fixed-range MSRs, KVM's 8 variable-range pairs), TSC_AUX (RDTSCP/RDPID) and
/// SPEC_CTRL. Each was checked to restore on this machine's KVM: one that reads but does not
/// write back (IA32_XSS reads as 0 here but KVM_SET_MSRS refuses it) must not be listed, or
/// every restore fails.
pub const EXTRA_MSRS: &[u32] = &[
    0x2ff, // IA32_MTRR_DEF_TYPE
    0x250, // IA32_MTRR_FIX64K_00000
    0x258, // IA32_MTRR_FIX16K_80000
    0x259, // IA32_MTRR_FIX16K_A0000
    0x268,
    0x269,
    0x26a,
    0x26b,
    0x26c,
    0x26d,
    0x26e,
    0x26f, // IA32_MTRR_FIX4K_*
    0x200,
    0x201,
    0x202,
    0x203,
    0x204,
    0x205,
    0x206,
    0x207, // IA32_MTRR_PHYSBASE/MASK 0-3
    0x208,
    0x209,
    0x20a,
    0x20b,
    0x20c,
    0x20d,
    0x20e,
    0x20f,       // IA32_MTRR_PHYSBASE/MASK 4-7
    0xc000_0103, // TSC_AUX
    0x48,        // IA32_SPEC_CTRL
];

/// What this host's KVM offers for saving and restoring vCPUs; probe once per VM.
#[derive(Clone, Debug)]
pub struct KvmCaps {
    /// KVM_GET_XSAVE / KVM_SET_XSAVE exist (KVM_CAP_XSAVE).
    pub xsave: bool,
    /// Bytes of the XSAVE area KVM reads and writes: KVM_CAP_XSAVE2, or the legacy 4096.
    pub xsave_size: usize,
    /// KVM_GET_XCRS / KVM_SET_XCRS exist (KVM_CAP_XCRS).
    pub xcrs: bool,
    /// KVM_GET_TSC_KHZ exists.
    pub get_tsc_khz: bool,
    /// KVM_SET_TSC_KHZ can scale the guest TSC (KVM_CAP_TSC_CONTROL).
    pub tsc_control: bool,
    /// KVM_GET_MSR_INDEX_LIST (the MSRs KVM says it saves and emulates) followed by those of
    /// [`EXTRA_MSRS`] it lacks. Not all of them can be read on a given vCPU (some depend on
    /// CPUID or host features); capture skips those.
    pub msr_indices: Vec<u32>,
}

impl KvmCaps {
    /// Asks KVM (through the VM, since KVM_CAP_XSAVE2 depends on the VM's permitted features).
    pub fn probe(kvm: &Kvm, vm: &VmFd) -> Result<Self, StateError> {
        let xsave = vm.check_extension(Cap::Xsave);
        let xsave2 = vm.check_extension_int(Cap::Xsave2);
        let xsave_size = usize::try_from(xsave2)
            .unwrap_or(0)
            .max(KVM_XSAVE_LEGACY_SIZE);
        let mut msr_indices = kvm
            .get_msr_index_list()
            .map_err(|source| StateError::Vm {
                ioctl: "KVM_GET_MSR_INDEX_LIST",
                source,
            })?
            .as_slice()
            .to_vec();
        for &extra in EXTRA_MSRS {
            if !msr_indices.contains(&extra) {
                msr_indices.push(extra);
            }
        }
        Ok(KvmCaps {
            xsave,
            xsave_size,
            xcrs: vm.check_extension(Cap::Xcrs),
            get_tsc_khz: vm.check_extension(Cap::GetTscKhz),
            tsc_control: vm.check_extension(Cap::TscControl),
            msr_indices,
        })
    }
}

/// One MSR (`kvm_msr_entry` without its padding).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    /// MSR number.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// One CPUID entry (`kvm_cpuid_entry2` without its padding).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// Leaf (EAX in).
    pub function: u32,
    /// Subleaf (ECX in), meaningful if `flags` has KVM_CPUID_FLAG_SIGNIFCANT_INDEX.
    pub index: u32,
    /// KVM_CPUID_FLAG_*.
    pub flags: u32,
    /// EAX out.
    pub eax: u32,
    /// EBX out.
    pub ebx: u32,
    /// ECX out.
    pub ecx: u32,
    /// EDX out.
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: &CpuidEntry) -> Self {
        kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        }
    }
}

/// The legacy FPU/SSE state (`kvm_fpu`, which kvm-bindings does not serialize).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers ST0-ST7 (80 bits each, in 16-byte slots).
    pub fpr: [[u8; 16]; 8],
    /// x87 control word.
    pub fcw: u16,
    /// x87 status word.
    pub fsw: u16,
    /// Abridged x87 tag word.
    pub ftwx: u8,
    /// Last x87 opcode.
    pub last_opcode: u16,
    /// Last x87 instruction pointer.
    pub last_ip: u64,
    /// Last x87 data pointer.
    pub last_dp: u64,
    /// XMM0-XMM15.
    pub xmm: [[u8; 16]; 16],
    /// SSE control and status.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM holds for one x86_64 vCPU.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU id (= initial APIC id), for error messages and matching on restore.
    pub id: u32,
    /// The CPUID the vCPU was given (KVM_GET_CPUID2), set again first on restore; the
    /// destination may compare it with what its KVM supports.
    pub cpuid: Vec<CpuidEntry>,
    /// KVM_GET_MP_STATE (runnable, halted, waiting for INIT/SIPI, ...).
    #[serde(deserialize_with = "super::exact::de")]
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP, RFLAGS.
    #[serde(deserialize_with = "super::exact::de")]
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers, EFER, APIC base, pending interrupt.
    #[serde(deserialize_with = "super::exact::de")]
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state (KVM_GET_FPU); restored when there is no XSAVE area. With XSAVE
    /// it is only the raw legacy area and may hold stale registers that XSAVE's XSTATE_BV
    /// marks as unused (KVM_SET_FPU does not set XSTATE_BV; seen on this machine), so the
    /// XSAVE area is the authoritative copy whenever there is one.
    pub fpu: FpuState,
    /// The XSAVE area as KVM gives it (`kvm_xsave` region then the XSAVE2 tail), if KVM has
    /// KVM_CAP_XSAVE. It includes the legacy FPU/SSE state.
    pub xsave: Option<Vec<u32>>,
    /// Extended control registers (XCR0), if KVM has KVM_CAP_XCRS.
    #[serde(deserialize_with = "super::exact::de_opt")]
    pub xcrs: Option<kvm_xcrs>,
    /// DR0-DR3, DR6, DR7.
    #[serde(deserialize_with = "super::exact::de")]
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers (the 1 KiB register page).
    #[serde(deserialize_with = "super::exact::de")]
    pub lapic: kvm_lapic_state,
    /// Every MSR in KVM_GET_MSR_INDEX_LIST that KVM_GET_MSRS could read on this vCPU,
    /// in that list's order (TSC, kvmclock, EFER, STAR/LSTAR, SYSENTER, PAT, MTRRs, TSC
    /// deadline, MISC_ENABLE, ...).
    pub msrs: Vec<MsrEntry>,
    /// Pending exception, interrupt, NMI, SMI state and interrupt shadow.
    #[serde(deserialize_with = "super::exact::de")]
    pub vcpu_events: kvm_vcpu_events,
    /// Guest TSC frequency (KVM_GET_TSC_KHZ), if KVM reports it.
    pub tsc_khz: Option<u32>,
}

impl StateBytes for VcpuState {
    const WHAT: &'static str = "vCPU state";
}

fn vcpu_err(vcpu: u32, ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Vcpu {
        vcpu,
        ioctl,
        source,
    }
}

/// Reads every MSR of `indices` that KVM_GET_MSRS can read on this vCPU.
///
/// KVM_GET_MSRS returns how many entries it read and stops at the first MSR it cannot read
/// (one that depends on a feature this vCPU's CPUID or the host lacks). That MSR is left
/// out and reading goes on after it, so a list with k unreadable MSRs costs about k+1
/// ioctls. Returns the values read and the MSRs skipped.
pub fn read_msrs(
    vcpu: &VcpuFd,
    id: u32,
    indices: &[u32],
) -> Result<(Vec<MsrEntry>, Vec<u32>), StateError> {
    let mut read = Vec::with_capacity(indices.len());
    let mut skipped = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msrs_from(id, &entries)?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(vcpu_err(id, "KVM_GET_MSRS"))?;
        let n = n.min(chunk.len());
        read.extend(msrs.as_slice()[..n].iter().map(|e| MsrEntry {
            index: e.index,
            data: e.data,
        }));
        let consumed = if n < chunk.len() {
            skipped.push(chunk[n]);
            n + 1
        } else {
            n
        };
        rest = &rest[consumed..];
    }
    Ok((read, skipped))
}

fn msrs_from(id: u32, entries: &[kvm_msr_entry]) -> Result<Msrs, StateError> {
    Msrs::from_entries(entries).map_err(|_| StateError::TooMany {
        vcpu: id,
        what: "MSRs",
        len: entries.len(),
        max: KVM_MAX_MSR_ENTRIES,
    })
}

/// Lets KVM finish an instruction whose exit the VMM has just handled, without running the
/// guest further: KVM_RUN with `immediate_exit` set, which completes pending I/O (the data
/// of an `in`, the RIP advance of an `out`, an MMIO read) and then returns EINTR.
///
/// Call it on a stopped vCPU before [`VcpuState::capture`]: until KVM_RUN is entered again
/// after a KVM_EXIT_IO or KVM_EXIT_MMIO, the vCPU's registers describe the instruction as not
/// yet done, and a restored guest would execute it a second time (KVM's API documentation,
/// `immediate_exit`). If the instruction needs another exit (e.g. the next round of a
/// `rep outs`), KVM returns that exit instead; this reports it as
/// [`StateError::NotQuiescent`] and the VMM must handle it and call this again.
pub fn complete_pending_io(vcpu: &mut VcpuFd, id: u32) -> Result<(), StateError> {
    vcpu.set_kvm_immediate_exit(1);
    let result = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(source) => Err(StateError::Vcpu {
            vcpu: id,
            ioctl: "KVM_RUN (immediate exit)",
            source,
        }),
        Ok(exit) => Err(StateError::NotQuiescent {
            vcpu: id,
            exit: format!("{exit:?}"),
        }),
    };
    vcpu.set_kvm_immediate_exit(0);
    result
}

impl VcpuState {
    /// Captures vCPU `id`'s state. The vCPU must not be running (its thread is out of
    /// KVM_RUN and stays out), every other vCPU of the VM should be stopped too (KVM's
    /// documentation: KVM_GET_VCPU_EVENTS is not consistent while other vCPUs run), and
    /// [`complete_pending_io`] should have been called after the last exit.
    pub fn capture(vcpu: &VcpuFd, id: u32, caps: &KvmCaps) -> Result<Self, StateError> {
        // Order (Firecracker's `save_state`, from QEMU):
        // - KVM_GET_MP_STATE first: it runs kvm_apic_accept_events(), which may process a
        //   pending INIT/SIPI and so change registers and the LAPIC; everything read after
        //   it sees the result.
        // - KVM_GET_LAPIC may also update LAPIC state (e.g. the timer current count) as it
        //   reads it; KVM_GET_MSRS then reads the TSC deadline consistent with it.
        // - KVM_GET_VCPU_EVENTS last: the other GETs may change what is pending.
        let mp_state = vcpu
            .get_mp_state()
            .map_err(vcpu_err(id, "KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(vcpu_err(id, "KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(vcpu_err(id, "KVM_GET_SREGS"))?;
        let fpu = FpuState::from(&vcpu.get_fpu().map_err(vcpu_err(id, "KVM_GET_FPU"))?);
        let xsave = if caps.xsave {
            Some(get_xsave(vcpu, id, caps.xsave_size)?)
        } else {
            None
        };
        let xcrs = if caps.xcrs {
            Some(vcpu.get_xcrs().map_err(vcpu_err(id, "KVM_GET_XCRS"))?)
        } else {
            None
        };
        let debug_regs = vcpu
            .get_debug_regs()
            .map_err(vcpu_err(id, "KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu.get_lapic().map_err(vcpu_err(id, "KVM_GET_LAPIC"))?;
        let (msrs, skipped) = read_msrs(vcpu, id, &caps.msr_indices)?;
        if !skipped.is_empty() {
            tracing::debug!(
                "vCPU {id}: {} MSRs not readable, not saved: {:x?}",
                skipped.len(),
                skipped
            );
        }
        let vcpu_events = vcpu
            .get_vcpu_events()
            .map_err(vcpu_err(id, "KVM_GET_VCPU_EVENTS"))?;
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(vcpu_err(id, "KVM_GET_CPUID2"))?
            .as_slice()
            .iter()
            .map(CpuidEntry::from)
            .collect();
        // Optional: a host with an unstable TSC has no frequency to report.
        let tsc_khz = if caps.get_tsc_khz {
            vcpu.get_tsc_khz().ok()
        } else {
            None
        };
        Ok(VcpuState {
            id,
            cpuid,
            mp_state,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Loads this state into `vcpu`, a vCPU created (KVM_CREATE_VCPU with the same id) in a
    /// VM that already has its irqchip, and that has not run yet.
    pub fn restore(&self, vcpu: &VcpuFd, caps: &KvmCaps) -> Result<(), StateError> {
        let id = self.id;
        // Order (Firecracker's `restore_state` and Cloud Hypervisor's `set_state`, both from
        // QEMU's kvm_arch_put_registers):
        // 1. CPUID first: it decides what the later SETs accept (the XCR0 bits, MSRs of
        //    CPUID-dependent features such as TSC_AUX or the kvmclock MSRs, the APIC mode),
        //    and KVM refuses a different CPUID once the vCPU has run.
        let cpuid: Vec<kvm_cpuid_entry2> = self.cpuid.iter().map(Into::into).collect();
        let cpuid = CpuId::from_entries(&cpuid).map_err(|_| StateError::TooMany {
            vcpu: id,
            what: "CPUID",
            len: self.cpuid.len(),
            max: KVM_MAX_CPUID_ENTRIES,
        })?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(vcpu_err(id, "KVM_SET_CPUID2"))?;
        // 2. TSC frequency before the IA32_TSC MSR: KVM turns a written TSC value into an
        //    offset using the vCPU's TSC ratio.
        self.restore_tsc_khz(vcpu, caps)?;
        // 3. MP state early (as Firecracker): it is independent of the registers, and some
        //    SETs look at whether the vCPU is the BSP and runnable.
        vcpu.set_mp_state(self.mp_state)
            .map_err(vcpu_err(id, "KVM_SET_MP_STATE"))?;
        // 4. Registers, then special registers. KVM_SET_REGS stores raw values (nothing in
        //    them depends on the mode SET_SREGS establishes) but clears any pending
        //    exception, so it must precede KVM_SET_VCPU_EVENTS; both orders of REGS/SREGS
        //    work, this is QEMU's and Firecracker's.
        vcpu.set_regs(&self.regs)
            .map_err(vcpu_err(id, "KVM_SET_REGS"))?;
        // KVM_SET_SREGS also sets the APIC base MSR (enabled, x2APIC mode), which the
        // LAPIC restore below interprets its registers by, and re-queues the pending
        // external interrupt of `interrupt_bitmap`.
        vcpu.set_sregs(&self.sregs)
            .map_err(vcpu_err(id, "KVM_SET_SREGS"))?;
        // 5. FPU/SSE/AVX: the XSAVE area if both sides have one (it includes the legacy FPU
        //    area), the legacy FPU state otherwise; then XCR0.
        self.restore_fpu(vcpu, caps)?;
        self.restore_xcrs(vcpu, caps)?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(vcpu_err(id, "KVM_SET_DEBUGREGS"))?;
        // 6. LAPIC after SREGS (APIC base and mode) and before the MSRs: KVM accepts the TSC
        //    deadline MSR only while the LVT timer is in TSC-deadline mode, and silently
        //    drops it otherwise.
        vcpu.set_lapic(&self.lapic)
            .map_err(vcpu_err(id, "KVM_SET_LAPIC"))?;
        // 7. MSRs.
        self.restore_msrs(vcpu)?;
        // 8. Events last: SET_REGS and SET_SREGS clear or replace pending exceptions and
        //    interrupts; this puts back exactly what was pending (exception, NMI, SMI,
        //    interrupt shadow).
        vcpu.set_vcpu_events(&self.vcpu_events)
            .map_err(vcpu_err(id, "KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    fn restore_tsc_khz(&self, vcpu: &VcpuFd, caps: &KvmCaps) -> Result<(), StateError> {
        let (Some(saved), true) = (self.tsc_khz, caps.get_tsc_khz) else {
            return Ok(());
        };
        let here = vcpu
            .get_tsc_khz()
            .map_err(vcpu_err(self.id, "KVM_GET_TSC_KHZ"))?;
        let diff = u64::from(saved.abs_diff(here));
        if diff * 1_000_000 <= u64::from(saved) * TSC_KHZ_TOLERANCE_PPM {
            return Ok(());
        }
        if !caps.tsc_control {
            return Err(StateError::TscFrequency {
                vcpu: self.id,
                saved,
                here,
            });
        }
        vcpu.set_tsc_khz(saved)
            .map_err(vcpu_err(self.id, "KVM_SET_TSC_KHZ"))
    }

    fn restore_fpu(&self, vcpu: &VcpuFd, caps: &KvmCaps) -> Result<(), StateError> {
        match (&self.xsave, caps.xsave) {
            (Some(area), true) => set_xsave(vcpu, self.id, area, caps.xsave_size),
            (area, _) => {
                // Without XSAVE on one side only the legacy state can move; that is all of it
                // unless the guest had enabled more than x87 and SSE in XCR0.
                if let Some(xcr0) = self.xcr0() {
                    if xcr0 & !0x3 != 0 {
                        return Err(StateError::NoXsave {
                            vcpu: self.id,
                            xcr0,
                        });
                    }
                }
                // The XSAVE area, where there is one, is the authoritative copy (see `fpu`).
                let fpu = area.as_deref().map_or(self.fpu, fpu_from_xsave);
                vcpu.set_fpu(&kvm_fpu::from(&fpu))
                    .map_err(vcpu_err(self.id, "KVM_SET_FPU"))
            }
        }
    }

    fn restore_xcrs(&self, vcpu: &VcpuFd, caps: &KvmCaps) -> Result<(), StateError> {
        match (&self.xcrs, caps.xcrs) {
            (Some(xcrs), true) => vcpu
                .set_xcrs(xcrs)
                .map_err(vcpu_err(self.id, "KVM_SET_XCRS")),
            // XCR0 = x87 only (or SSE) is every vCPU's reset value: nothing to carry.
            (Some(_), false) => match self.xcr0() {
                Some(xcr0) if xcr0 & !0x3 != 0 => Err(StateError::NoXsave {
                    vcpu: self.id,
                    xcr0,
                }),
                _ => Ok(()),
            },
            (None, _) => Ok(()),
        }
    }

    fn restore_msrs(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        let id = self.id;
        for chunk in self.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|e| kvm_msr_entry {
                    index: e.index,
                    data: e.data,
                    ..Default::default()
                })
                .collect();
            let msrs = msrs_from(id, &entries)?;
            let set = vcpu.set_msrs(&msrs).map_err(vcpu_err(id, "KVM_SET_MSRS"))?;
            // KVM stops at the first MSR it refuses (unknown here, or a value it rejects)
            // and returns how many it set: name that MSR rather than go on without it.
            if set < chunk.len() {
                return Err(StateError::MsrRejected {
                    vcpu: id,
                    index: chunk[set].index,
                    data: chunk[set].data,
                    set,
                    total: self.msrs.len(),
                });
            }
        }
        Ok(())
    }

    /// The saved XCR0, if XCRs were saved.
    pub fn xcr0(&self) -> Option<u64> {
        let xcrs = self.xcrs.as_ref()?;
        let n = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
        xcrs.xcrs[..n].iter().find(|x| x.xcr == 0).map(|x| x.value)
    }

    /// The saved value of one MSR.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|e| e.index == index).map(|e| e.data)
    }
}

/// The legacy FPU/SSE state in an XSAVE area (its first 512 bytes are the FXSAVE layout),
/// with the x87 and SSE registers in their initial state where XSTATE_BV says so.
pub fn fpu_from_xsave(area: &[u32]) -> FpuState {
    let mut bytes = [0u8; 576];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(area) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or_default());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or_default());
    let xstate_bv = u64_at(512);
    let mut fpu = FpuState {
        fcw: 0x37f,
        mxcsr: u32_at(24),
        ..Default::default()
    };
    if xstate_bv & 1 != 0 {
        fpu.fcw = u16_at(0);
        fpu.fsw = u16_at(2);
        fpu.ftwx = bytes[4];
        fpu.last_opcode = u16_at(6);
        fpu.last_ip = u64_at(8);
        fpu.last_dp = u64_at(16);
        for (i, r) in fpu.fpr.iter_mut().enumerate() {
            r.copy_from_slice(&bytes[32 + i * 16..48 + i * 16]);
        }
    }
    if xstate_bv & 2 != 0 {
        for (i, r) in fpu.xmm.iter_mut().enumerate() {
            r.copy_from_slice(&bytes[160 + i * 16..176 + i * 16]);
        }
    }
    fpu
}

/// Number of `u32`s after the legacy region in an XSAVE area of `size` bytes.
fn xsave_tail_words(size: usize) -> usize {
    size.saturating_sub(KVM_XSAVE_LEGACY_SIZE).div_ceil(4)
}

/// KVM_GET_XSAVE (or KVM_GET_XSAVE2 when KVM's area is larger than 4 KiB), as `u32`s.
fn get_xsave(vcpu: &VcpuFd, id: u32, size: usize) -> Result<Vec<u32>, StateError> {
    let tail = xsave_tail_words(size);
    if tail == 0 {
        let xsave = vcpu.get_xsave().map_err(vcpu_err(id, "KVM_GET_XSAVE"))?;
        return Ok(xsave.region.to_vec());
    }
    let mut xsave = Xsave::new(tail).map_err(|_| StateError::XsaveTooBig {
        vcpu: id,
        offset: size,
        size: KVM_XSAVE_LEGACY_SIZE,
    })?;
    // SAFETY: `xsave` holds the legacy region plus `tail` words, i.e. at least `size`
    // bytes, the size KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) reported for this VM; no XSTATE
    // feature is enabled dynamically (arch_prctl) by this process after that probe.
    unsafe { vcpu.get_xsave2(&mut xsave) }.map_err(vcpu_err(id, "KVM_GET_XSAVE2"))?;
    let mut out = xsave.as_fam_struct_ref().xsave.region.to_vec();
    out.extend_from_slice(xsave.as_slice());
    Ok(out)
}

/// KVM_SET_XSAVE with the area resized to the `size` bytes KVM uses here: padded with zeros
/// (state components the source did not have are in their initial state), or cut if the
/// part beyond is all zeros.
fn set_xsave(vcpu: &VcpuFd, id: u32, area: &[u32], size: usize) -> Result<(), StateError> {
    let words = XSAVE_REGION_WORDS + xsave_tail_words(size);
    if let Some(pos) = area.iter().skip(words).position(|&w| w != 0) {
        return Err(StateError::XsaveTooBig {
            vcpu: id,
            offset: (words + pos) * 4,
            size,
        });
    }
    let tail = words - XSAVE_REGION_WORDS;
    let mut region = [0u32; XSAVE_REGION_WORDS];
    let n = area.len().min(XSAVE_REGION_WORDS);
    region[..n].copy_from_slice(&area[..n]);
    if tail == 0 {
        let xsave = kvm_xsave {
            region,
            ..Default::default()
        };
        // SAFETY: KVM uses the legacy 4096-byte area here (KVM_CAP_XSAVE2 is at most that or
        // absent), which is exactly `kvm_xsave`'s size, so KVM reads nothing past it.
        return unsafe { vcpu.set_xsave(&xsave) }.map_err(vcpu_err(id, "KVM_SET_XSAVE"));
    }
    let mut xsave = Xsave::new(tail).map_err(|_| StateError::XsaveTooBig {
        vcpu: id,
        offset: size,
        size: KVM_XSAVE_LEGACY_SIZE,
    })?;
    // SAFETY: only the `region` array is written; the FAM length, which the wrapper relies on,
    // stays as `Xsave::new` set it.
    unsafe { xsave.as_mut_fam_struct() }.xsave.region = region;
    let rest = area.get(XSAVE_REGION_WORDS..).unwrap_or(&[]);
    let m = rest.len().min(tail);
    xsave.as_mut_slice()[..m].copy_from_slice(&rest[..m]);
    // SAFETY: `xsave` is the legacy region plus `tail` words, at least the `size` bytes
    // KVM_CAP_XSAVE2 reported for this VM, which is all KVM_SET_XSAVE reads.
    unsafe { vcpu.set_xsave2(&xsave) }.map_err(vcpu_err(id, "KVM_SET_XSAVE"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fpu_from_xsave_honours_xstate_bv() {
        let mut area = vec![0u32; 1024];
        area[0] = 0x0000_027f; // FCW 0x27f, FSW 0
        area[6] = 0x1f80; // MXCSR
        area[8] = 0xdead_beef; // ST0 low bits
        area[40] = 0x1234_5678; // XMM0 low bits
                                // XSTATE_BV = 0: both components in their initial state, MXCSR still taken.
        let fpu = fpu_from_xsave(&area);
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
        assert_eq!((fpu.fpr[0][0], fpu.xmm[0][0]), (0, 0));
        // x87 and SSE in use.
        area[128] = 0x3;
        let fpu = fpu_from_xsave(&area);
        assert_eq!(fpu.fcw, 0x27f);
        assert_eq!(fpu.fpr[0][..4], 0xdead_beef_u32.to_le_bytes());
        assert_eq!(fpu.xmm[0][..4], 0x1234_5678_u32.to_le_bytes());
        // A short area does not panic.
        assert_eq!(fpu_from_xsave(&[]).fcw, 0x37f);
    }

    #[test]
    fn fpu_state_round_trips_through_kvm_fpu() {
        let mut f = FpuState {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 0x1234,
            ..Default::default()
        };
        f.xmm[15] = [7; 16];
        f.fpr[7] = [9; 16];
        assert_eq!(FpuState::from(&kvm_fpu::from(&f)), f);
        let bytes = migration::encode_state(&f).unwrap();
        assert_eq!(migration::decode_state::<FpuState>(&bytes).unwrap(), f);
    }
}
