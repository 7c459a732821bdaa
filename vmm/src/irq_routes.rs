//! KVM interrupt routing for devices with MSI/MSI-X: [`KvmRoutes`] implements
//! [`InterruptRoutes`] with KVM GSI routing and irqfds.
//!
//! `KVM_SET_GSI_ROUTING` replaces the VM's whole routing table, so this module keeps a copy
//! of it: KVM's default routes for the legacy interrupt controllers (the ones
//! `KVM_CREATE_IRQCHIP` installs, which the serial ports and the i8042 rely on) plus one
//! MSI route per programmed device vector, and commits the whole table on every change.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::pci::msix::{InterruptRoutes, RouteError};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use resources::alloc::IdAllocator;
use vmm_sys_util::eventfd::EventFd;

/// Number of IOAPIC pins; GSIs below this are the legacy interrupts.
pub const IOAPIC_PINS: u32 = 24;
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

#[cfg(test)]
mod tests {
    use super::*;

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
