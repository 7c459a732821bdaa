//! The CPUID the guest sees: what KVM supports, with per-vCPU topology filled in and the
//! features removed that this machine's nested KVM cannot run in guest kernel mode (see
//! ../shared/kvm-here.md: XSAVE/XRSTOR, CLAC/STAC, POPCNT and others are not emulated).
//! The guest command line also carries `clearcpuid=` for these, since a guest may read
//! features through paths CPUID filtering does not reach.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// A feature bit to hide: (leaf, subleaf or None for all, register, bit).
#[derive(Clone, Copy, Debug)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

const HIDDEN: &[(u32, Reg, u32, &str)] = &[
    (1, Reg::Ecx, 1, "pclmulqdq"),
    (1, Reg::Ecx, 12, "fma"),
    // CMPXCHG16B: SLUB's lockless fast path uses it; the emulator cannot run it.
    (1, Reg::Ecx, 13, "cx16"),
    (1, Reg::Ecx, 22, "movbe"),
    (1, Reg::Ecx, 23, "popcnt"),
    (1, Reg::Ecx, 25, "aes"),
    (1, Reg::Ecx, 26, "xsave"),
    (1, Reg::Ecx, 27, "osxsave"),
    (1, Reg::Ecx, 28, "avx"),
    (1, Reg::Ecx, 29, "f16c"),
    (1, Reg::Ecx, 30, "rdrand"),
    (7, Reg::Ebx, 3, "bmi1"),
    (7, Reg::Ebx, 4, "hle"),
    (7, Reg::Ebx, 5, "avx2"),
    (7, Reg::Ebx, 7, "smep"),
    (7, Reg::Ebx, 8, "bmi2"),
    (7, Reg::Ebx, 9, "erms"),
    (7, Reg::Ebx, 11, "rtm"),
    (7, Reg::Ebx, 16, "avx512f"),
    (7, Reg::Ebx, 18, "rdseed"),
    (7, Reg::Ebx, 19, "adx"),
    (7, Reg::Ebx, 20, "smap"),
    (7, Reg::Ebx, 29, "sha_ni"),
    (7, Reg::Ecx, 2, "umip"),
    (7, Reg::Ecx, 3, "pku"),
    (7, Reg::Ecx, 4, "ospke"),
    (7, Reg::Ecx, 9, "vaes"),
    (7, Reg::Ecx, 10, "vpclmulqdq"),
    (7, Reg::Edx, 4, "fsrm"),
];

/// KVM_FEATURE_CLOCKSOURCE (0), NOP_IO_DELAY (1), CLOCKSOURCE2 (3), PV_EOI (6) and
/// CLOCKSOURCE_STABLE_BIT (24).
const KVM_PV_FEATURES_KEPT: u32 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 6) | (1 << 24);

/// Errors building the CPUID table.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read KVM's supported CPUID: {0}")]
    Supported(kvm_ioctls::Error),
}

/// KVM's supported CPUID, filtered for this machine (same for every vCPU).
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)?;
    for e in cpuid.as_mut_slice() {
        for &(leaf, reg, bit, _) in HIDDEN {
            if e.function == leaf && (leaf != 7 || e.index == 0) {
                let r = match reg {
                    Reg::Ebx => &mut e.ebx,
                    Reg::Ecx => &mut e.ecx,
                    Reg::Edx => &mut e.edx,
                };
                *r &= !(1 << bit);
            }
        }
        match e.function {
            // Leaf 7 EBX: every AVX-512 flag.
            7 if e.index == 0 => e.ebx &= !((1 << 17) | (1 << 21) | (0x1f << 26) | (1 << 31)),
            // XSAVE state enumeration: nothing, since XSAVE is hidden.
            0xd => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            // Running under a hypervisor.
            1 => e.ecx |= 1 << 31,
            // KVM paravirt features: only the clock (and the no-op I/O delay, PV EOI) stay.
            // A `vmcall` from emulated guest kernel code never completes on this nested KVM
            // (seen: the boot CPU stuck at the PV_SEND_IPI vmcall while bringing up CPU 1).
            // The other hypercall-based or host-cooperative features (PV TLB flush, steal
            // time, async PF, sched yield, ...) go too, as a precaution: they rely on the host
            // acting on shared state in ways this nested KVM has not been shown to do. The
            // guest falls back to the APIC for IPIs and TLB shootdowns.
            0x4000_0001 => e.eax &= KVM_PV_FEATURES_KEPT,
            _ => {}
        }
    }
    Ok(cpuid)
}

/// A copy of `base` with vCPU `id`'s topology (APIC id, logical processor count).
pub fn for_vcpu(base: &CpuId, id: u8, cpus: u8) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(cpus) << 16);
                if cpus > 1 {
                    e.edx |= 1 << 28; // HTT: the logical count field is valid
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            // AMD: number of cores - 1.
            0x8000_0008 => e.ecx = (e.ecx & !0xff) | u32::from(cpus - 1),
            _ => {}
        }
    }
    cpuid
}

/// The names of the features hidden from the guest (for the log).
pub fn hidden_names() -> Vec<&'static str> {
    HIDDEN.iter().map(|h| h.3).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filtered_cpuid_hides_what_the_emulator_cannot_run() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("no /dev/kvm: skipping");
            return;
        };
        let cpuid = supported(&kvm).unwrap();
        let leaf = |f: u32| {
            cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == f && e.index == 0)
                .copied()
        };
        let l1 = leaf(1).unwrap();
        assert_eq!(l1.ecx & (1 << 26), 0, "xsave");
        assert_eq!(l1.ecx & (1 << 23), 0, "popcnt");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
        if let Some(l7) = leaf(7) {
            assert_eq!(l7.ebx & (1 << 20), 0, "smap");
            assert_eq!(l7.ebx & (1 << 7), 0, "smep");
        }
        let v1 = for_vcpu(&cpuid, 1, 2);
        let l1 = v1.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 1);
        assert_eq!((l1.ebx >> 16) & 0xff, 2);
    }
}
