//! The VM-wide KVM state: the in-kernel PICs and IOAPIC, the PIT and the KVM clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::{StateBytes, StateError};

/// The TSS address the VMM gives KVM_SET_TSS_ADDR at creation (three pages below the
/// 4 GiB boundary, in the hole under the IOAPIC/LAPIC). KVM does not report it back, so a
/// restored VM must be created with the same value (only Intel VMX without unrestricted guest
/// uses it; these machines are AMD). The identity-map address (KVM_SET_IDENTITY_MAP_ADDR) is
/// never set: KVM's default, one page below the TSS, is used.
pub const TSS_ADDRESS: u64 = 0xfffb_d000;

/// What KVM_SET_CLOCK should do with the time that passed between capture and restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockRestore {
    /// The guest's clock continues from the saved value, as if no time had passed (a
    /// snapshot restored later; the guest corrects its wall clock itself, e.g. over NTP).
    Frozen,
    /// The guest's clock is advanced by the host wall-clock time elapsed since the capture
    /// for live migration between hosts whose clocks are synchronized. KVM does it
    /// (KVM_CLOCK_REALTIME) if the source's KVM_GET_CLOCK paired the clock with the host's
    /// wall-clock time, which it does only on hosts with a stable TSC (not on these nested
    /// machines); otherwise the elapsed time is computed from [`VmState::realtime_ns`].
    AdvanceByRealtime,
}

/// Everything KVM holds for the VM as a whole (x86_64, in-kernel irqchip and PIT).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// KVM_GET_IRQCHIP, chip 0: the master 8259.
    #[serde(deserialize_with = "super::exact::de")]
    pub pic_master: kvm_irqchip,
    /// KVM_GET_IRQCHIP, chip 1: the slave 8259.
    #[serde(deserialize_with = "super::exact::de")]
    pub pic_slave: kvm_irqchip,
    /// KVM_GET_IRQCHIP, chip 2: the IOAPIC (redirection table, IRR).
    #[serde(deserialize_with = "super::exact::de")]
    pub ioapic: kvm_irqchip,
    /// KVM_GET_PIT2: the three channels and the HPET-legacy / speaker flags.
    #[serde(deserialize_with = "super::exact::de")]
    pub pit: kvm_pit_state2,
    /// KVM_GET_CLOCK: kvmclock's value in ns, and with KVM_CLOCK_REALTIME in `flags` the
    /// host's wall-clock time at that moment.
    #[serde(deserialize_with = "super::exact::de")]
    pub clock: kvm_clock_data,
    /// The host's CLOCK_REALTIME in ns since the epoch, read right after KVM_GET_CLOCK: the
    /// capture time for [`ClockRestore::AdvanceByRealtime`] when KVM gave none.
    pub realtime_ns: u64,
}

/// CLOCK_REALTIME in ns since the epoch (0 if the clock is before it).
fn realtime_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl StateBytes for VmState {
    const WHAT: &'static str = "VM state";
}

fn vm_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Vm { ioctl, source }
}

fn get_chip(vm: &VmFd, chip_id: u32, ioctl: &'static str) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(vm_err(ioctl))?;
    Ok(chip)
}

impl VmState {
    /// Captures the VM's state. Call it with every vCPU stopped (after their states are
    /// captured), so that no vCPU changes the irqchip meanwhile and the clock is read at
    /// the moment the guest stopped.
    pub fn capture(vm: &VmFd) -> Result<Self, StateError> {
        let pic_master = get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?;
        let pic_slave = get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?;
        let ioapic = get_chip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?;
        let pit = vm.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?;
        let clock = vm.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?;
        let realtime_ns = realtime_now_ns();
        Ok(VmState {
            realtime_ns,
            pic_master,
            pic_slave,
            ioapic,
            pit,
            clock,
        })
    }

    /// Loads the state into `vm`, which must have been created like the source (TSS address,
    /// KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2) and whose vCPUs have not run yet. Restore this
    /// before the vCPUs' states (Firecracker's order): an interrupt the restored PIT or
    /// IOAPIC raises meanwhile lands in a LAPIC whose restore then replaces it with the
    /// saved pending state, rather than in a restored LAPIC as a spurious extra.
    pub fn restore(&self, vm: &VmFd, clock_mode: ClockRestore) -> Result<(), StateError> {
        // The chip ids inside the saved structs are forced: a corrupt id would otherwise
        // load one chip's state into another.
        let chips = [
            (
                &self.pic_master,
                KVM_IRQCHIP_PIC_MASTER,
                "KVM_SET_IRQCHIP (PIC master)",
            ),
            (
                &self.pic_slave,
                KVM_IRQCHIP_PIC_SLAVE,
                "KVM_SET_IRQCHIP (PIC slave)",
            ),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC, "KVM_SET_IRQCHIP (IOAPIC)"),
        ];
        for (chip, chip_id, ioctl) in chips {
            let chip = kvm_irqchip { chip_id, ..*chip };
            vm.set_irqchip(&chip).map_err(vm_err(ioctl))?;
        }
        vm.set_pit2(&self.pit).map_err(vm_err("KVM_SET_PIT2"))?;
        vm.set_clock(&self.clock_to_set(clock_mode, realtime_now_ns()))
            .map_err(vm_err("KVM_SET_CLOCK"))
    }

    /// The `kvm_clock_data` for KVM_SET_CLOCK at host wall-clock time `now_ns`.
    /// KVM_GET_CLOCK's flags describe the reading (KVM_CLOCK_TSC_STABLE, KVM_CLOCK_HOST_TSC,
    /// KVM_CLOCK_REALTIME); on KVM_SET_CLOCK only KVM_CLOCK_REALTIME means something (KVM
    /// adds the wall-clock time elapsed since `realtime`), and kernels before 5.16 reject any
    /// flag, so every other flag is cleared.
    pub fn clock_to_set(&self, mode: ClockRestore, now_ns: u64) -> kvm_clock_data {
        let mut data = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        if mode == ClockRestore::AdvanceByRealtime {
            if self.clock.flags & KVM_CLOCK_REALTIME != 0 {
                data.flags = KVM_CLOCK_REALTIME;
                data.realtime = self.clock.realtime;
            } else {
                data.clock = data
                    .clock
                    .saturating_add(now_ns.saturating_sub(self.realtime_ns));
            }
        }
        data
    }
}
