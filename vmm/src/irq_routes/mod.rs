//! KVM interrupt routing for devices with MSI/MSI-X: [`KvmRoutes`] implements
//! [`InterruptRoutes`] with KVM GSI routing and irqfds, and [`IntxRoutes`] (the INTx of
//! passed-through functions) with irqfds that have a resample eventfd, on IOAPIC pins 16-23
//! ([`pci_intx_gsi`]).
//!
//! `KVM_SET_GSI_ROUTING` replaces the VM's whole routing table, so this module keeps a copy
//! of it: KVM's default routes for the legacy interrupt controllers (the ones
//! `KVM_CREATE_IRQCHIP` installs, which the serial ports and the i8042 rely on) plus one
//! MSI route per programmed device vector, and commits the whole table on every change.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::pci::msix::{InterruptRoutes, RouteError};
use devices::vfio::IntxRoutes;
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use resources::alloc::IdAllocator;
use vmm_sys_util::eventfd::EventFd;

/// Number of IOAPIC pins; GSIs below this are the legacy interrupts.
pub const IOAPIC_PINS: u32 = 24;
/// First IOAPIC pin (GSI) for the INTx of PCI functions: pins 0-15 are the ISA interrupts.
pub const FIRST_PCI_INTX_GSI: u32 = 16;
/// IOAPIC pins (GSIs) for the INTx of PCI functions: 16-23.
pub const PCI_INTX_GSIS: u32 = IOAPIC_PINS - FIRST_PCI_INTX_GSI;

/// The GSI (IOAPIC pin) of interrupt pin `pin` (1-4: INTA-INTD) of the function in slot
/// `slot` of bus 0: the PCI swizzle `(slot + pin - 1) mod 8` over pins 16-23, so the
/// functions of neighbouring slots get different lines and eight slots share none.
pub fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    let lane = u32::from(slot) + u32::from(pin.saturating_sub(1));
    FIRST_PCI_INTX_GSI + lane % PCI_INTX_GSIS
}

/// First GSI handed to MSI/MSI-X vectors.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;
/// Last GSI handed out (KVM accepts GSIs below `KVM_MAX_IRQ_ROUTES`, 4096 on x86; a
/// smaller range keeps the committed table small).
pub const LAST_MSI_GSI: u32 = 1023;

/// Why the routing table could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IrqRoutesError {
    /// The GSI allocator refused its range (a programming error in the constants).
    #[error("cannot manage GSIs {FIRST_MSI_GSI}..={LAST_MSI_GSI}: {0}")]
    Allocator(#[from] resources::alloc::IdAllocError),
    /// KVM refused the initial (default) routing table.
    #[error("KVM refused the default interrupt routing table: {0}")]
    Kvm(io::Error),
}

struct State {
    gsis: IdAllocator,
    /// MSI routes by GSI.
    msi: BTreeMap<u32, kvm_irq_routing_entry>,
}

/// The VM's interrupt routing: GSI allocation, the routing table, irqfds.
pub struct KvmRoutes {
    vm: Arc<VmFd>,
    state: Mutex<State>,
}

/// The routes `KVM_CREATE_IRQCHIP` installs: PIC master pins 0-7 for GSIs 0-7, PIC slave
/// pins 0-7 for GSIs 8-15, and IOAPIC pin N for GSI N (0-23).
pub fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut routes = Vec::with_capacity(16 + IOAPIC_PINS as usize);
    for gsi in 0..16 {
        let (chip, pin) = if gsi < 8 {
            (KVM_IRQCHIP_PIC_MASTER, gsi)
        } else {
            (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
        };
        routes.push(irqchip(gsi, chip, pin));
    }
    for gsi in 0..IOAPIC_PINS {
        routes.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    routes
}

fn msi_route(gsi: u32, addr: u64, data: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = addr as u32;
    e.u.msi.address_hi = (addr >> 32) as u32;
    e.u.msi.data = data;
    e
}

fn errno_to_io(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl KvmRoutes {
    /// Routing for `vm`, which must have an in-kernel irqchip. Commits the default table
    /// once, so a VM whose table cannot be set fails at start-up, not at the first MSI.
    pub fn new(vm: Arc<VmFd>) -> Result<Self, IrqRoutesError> {
        let routes = KvmRoutes {
            vm,
            state: Mutex::new(State {
                gsis: IdAllocator::new(FIRST_MSI_GSI, LAST_MSI_GSI)?,
                msi: BTreeMap::new(),
            }),
        };
        routes
            .commit(&routes.lock().msi)
            .map_err(IrqRoutesError::Kvm)?;
        Ok(routes)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change is applied to the map only after KVM accepted it, so a panic while
        // holding the lock cannot leave the copy and KVM's table apart.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The MSI routes currently committed, as `(gsi, address, data)` (for tests).
    #[cfg(test)]
    pub fn msi_routes(&self) -> Vec<(u32, u64, u32)> {
        self.lock()
            .msi
            .values()
            .map(|e| {
                // SAFETY: every entry in `msi` was built by `msi_route`, which sets the
                // `msi` member of the union.
                let m = unsafe { e.u.msi };
                (
                    e.gsi,
                    u64::from(m.address_hi) << 32 | u64::from(m.address_lo),
                    m.data,
                )
            })
            .collect()
    }

    /// Hands the default routes plus `msi` to KVM.
    fn commit(&self, msi: &BTreeMap<u32, kvm_irq_routing_entry>) -> io::Result<()> {
        let mut entries = default_routes();
        entries.extend(msi.values().copied());
        let table = KvmIrqRouting::from_entries(&entries).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} routing entries do not fit: {e:?}", entries.len()),
            )
        })?;
        self.vm.set_gsi_routing(&table).map_err(errno_to_io)
    }
}

impl InterruptRoutes for KvmRoutes {
    fn allocate_gsis(&self, owner: &str, count: usize) -> Result<Vec<u32>, RouteError> {
        let mut st = self.lock();
        let mut got = Vec::with_capacity(count);
        for _ in 0..count {
            match st.gsis.allocate() {
                Ok(gsi) => got.push(gsi),
                Err(e) => {
                    for gsi in got {
                        // Just allocated, so freeing cannot fail.
                        let _ = st.gsis.free(gsi);
                    }
                    return Err(RouteError::NoGsi {
                        owner: owner.to_string(),
                        count,
                        reason: e.to_string(),
                    });
                }
            }
        }
        Ok(got)
    }

    fn set_msi_route(&self, gsi: u32, addr: u64, data: u32) -> Result<(), RouteError> {
        let mut st = self.lock();
        let mut next = st.msi.clone();
        next.insert(gsi, msi_route(gsi, addr, data));
        self.commit(&next).map_err(|source| RouteError::Kvm {
            op: "set the MSI route",
            gsi,
            source,
        })?;
        st.msi = next;
        Ok(())
    }

    fn enable(&self, gsi: u32, eventfd: &EventFd) -> Result<(), RouteError> {
        self.vm
            .register_irqfd(eventfd, gsi)
            .map_err(|e| RouteError::Kvm {
                op: "register the irqfd",
                gsi,
                source: errno_to_io(e),
            })
    }

    fn disable(&self, gsi: u32, eventfd: &EventFd) -> Result<(), RouteError> {
        self.vm
            .unregister_irqfd(eventfd, gsi)
            .map_err(|e| RouteError::Kvm {
                op: "remove the irqfd",
                gsi,
                source: errno_to_io(e),
            })
    }
}

/// INTx: level-triggered lines through irqfds with a resample eventfd. KVM asserts the GSI
/// when `trigger` is signalled, keeps it asserted until the guest's EOI, then deasserts it
/// and signals `resample`. The GSIs are IOAPIC pins, always in the table
/// ([`default_routes`]).
impl IntxRoutes for KvmRoutes {
    fn enable_level(
        &self,
        gsi: u32,
        trigger: &EventFd,
        resample: &EventFd,
    ) -> Result<(), RouteError> {
        self.vm
            .register_irqfd_with_resample(trigger, resample, gsi)
            .map_err(|e| RouteError::Kvm {
                op: "register the level-triggered (resample) irqfd",
                gsi,
                source: errno_to_io(e),
            })
    }

    fn disable_level(&self, gsi: u32, trigger: &EventFd) -> Result<(), RouteError> {
        self.vm
            .unregister_irqfd(trigger, gsi)
            .map_err(|e| RouteError::Kvm {
                op: "remove the level-triggered irqfd",
                gsi,
                source: errno_to_io(e),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intx_swizzles_slots_over_pins_16_to_23() {
        assert_eq!(pci_intx_gsi(1, 1), 17);
        assert_eq!(pci_intx_gsi(2, 1), 18);
        assert_eq!(pci_intx_gsi(1, 2), 18, "INTB of slot 1 is INTA of slot 2");
        assert_eq!(pci_intx_gsi(7, 1), 23);
        assert_eq!(pci_intx_gsi(8, 1), 16, "wraps after eight");
        assert_eq!(pci_intx_gsi(31, 4), 16 + (31 + 3) % 8);
        for slot in 0..32 {
            for pin in 1..=4 {
                let gsi = pci_intx_gsi(slot, pin);
                assert!((16..24).contains(&gsi), "{slot}/{pin}: {gsi}");
            }
        }
    }

    fn vm_with_irqchip() -> Option<Arc<VmFd>> {
        let kvm = kvm_ioctls::Kvm::new().ok()?;
        let vm = kvm.create_vm().ok()?;
        vm.create_irq_chip().ok()?;
        Some(Arc::new(vm))
    }

    #[test]
    fn default_table_matches_kvm() {
        let routes = default_routes();
        assert_eq!(routes.len(), 40);
        // GSI 2: PIC master pin 2 and IOAPIC pin 2.
        let two: Vec<_> = routes
            .iter()
            .filter(|e| e.gsi == 2)
            // SAFETY: default routes are all irqchip routes.
            .map(|e| unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) })
            .collect();
        assert_eq!(
            two,
            vec![(KVM_IRQCHIP_PIC_MASTER, 2), (KVM_IRQCHIP_IOAPIC, 2)]
        );
    }

    #[test]
    fn allocate_route_enable_disable_on_kvm() {
        let Some(vm) = vm_with_irqchip() else {
            eprintln!("skipped: no usable /dev/kvm");
            return;
        };
        let routes = KvmRoutes::new(vm).unwrap();
        let gsis = routes.allocate_gsis("dev0", 3).unwrap();
        assert_eq!(gsis, vec![24, 25, 26]);
        assert_eq!(routes.allocate_gsis("dev1", 1).unwrap(), vec![27]);
        routes.set_msi_route(24, 0xfee0_0000, 0x41).unwrap();
        routes.set_msi_route(24, 0xfee0_1000, 0x42).unwrap();
        routes.set_msi_route(25, 0xfee0_0000, 0x43).unwrap();
        assert_eq!(
            routes.msi_routes(),
            vec![(24, 0xfee0_1000, 0x42), (25, 0xfee0_0000, 0x43)]
        );
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        routes.enable(24, &fd).unwrap();
        // The same eventfd twice is refused by KVM, with a message naming the GSI.
        let e = routes.enable(24, &fd).unwrap_err();
        assert!(e.to_string().contains("GSI 24"), "{e}");
        routes.disable(24, &fd).unwrap();
        routes.enable(24, &fd).unwrap();
        routes.disable(24, &fd).unwrap();
    }

    /// The IOAPIC's interrupt request register (its asserted lines).
    fn ioapic_irr(vm: &VmFd) -> u32 {
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).unwrap();
        // SAFETY: KVM filled the `ioapic` member for chip KVM_IRQCHIP_IOAPIC.
        unsafe { chip.chip.ioapic.irr }
    }

    /// Waits up to 2 s for `cond` on the IOAPIC's IRR (irqfds inject from a kernel work
    /// queue, so not at once).
    fn wait_irr(vm: &VmFd, cond: impl Fn(u32) -> bool) -> u32 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let irr = ioapic_irr(vm);
            if cond(irr) || std::time::Instant::now() > deadline {
                return irr;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    #[test]
    fn intx_holds_its_line_asserted_until_the_irqfd_goes() {
        let Some(vm) = vm_with_irqchip() else {
            eprintln!("skipped: no usable /dev/kvm");
            return;
        };
        let routes = KvmRoutes::new(vm.clone()).unwrap();
        let (trigger, resample) = (
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        );
        routes.enable_level(17, &trigger, &resample).unwrap();
        assert_eq!(ioapic_irr(&vm) & 1 << 17, 0);
        trigger.write(1).unwrap();
        assert_ne!(wait_irr(&vm, |irr| irr & 1 << 17 != 0) & 1 << 17, 0);
        // A level line stays asserted (a plain irqfd pulses it: asserts and deasserts at
        // once), until the guest's EOI or until the irqfd goes.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_ne!(ioapic_irr(&vm) & 1 << 17, 0, "still asserted");
        routes.disable_level(17, &trigger).unwrap();
        assert_eq!(wait_irr(&vm, |irr| irr & 1 << 17 == 0) & 1 << 17, 0);
    }

    #[test]
    fn a_plain_irqfd_only_pulses_the_line() {
        // The counterpart of the test above: what `enable_level` must not be.
        let Some(vm) = vm_with_irqchip() else {
            eprintln!("skipped: no usable /dev/kvm");
            return;
        };
        let routes = KvmRoutes::new(vm.clone()).unwrap();
        let trigger = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        routes.enable(18, &trigger).unwrap();
        trigger.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(ioapic_irr(&vm) & 1 << 18, 0);
        routes.disable(18, &trigger).unwrap();
    }

    #[test]
    fn gsis_run_out_cleanly() {
        let Some(vm) = vm_with_irqchip() else {
            eprintln!("skipped: no usable /dev/kvm");
            return;
        };
        let routes = KvmRoutes::new(vm).unwrap();
        let all = (LAST_MSI_GSI - FIRST_MSI_GSI + 1) as usize;
        let e = routes.allocate_gsis("big", all + 1).unwrap_err();
        assert!(e.to_string().contains("big"), "{e}");
        // Nothing was kept from the failed request.
        assert_eq!(routes.allocate_gsis("all", all).unwrap().len(), all);
    }
}

#[cfg(test)]
mod intx_kvm_tests;
