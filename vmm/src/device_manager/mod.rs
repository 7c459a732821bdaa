//! The VM's devices, owned in one place: the bus every exit is dispatched through, the
//! legacy devices (COM1, COM2, the i8042 and its reset line), the PCI root with its host
//! bridge, and the passed-through functions with the mediators they use.
//!
//! Their state goes into the stream through [`devices::Persist`] and the passed-through
//! functions' own migration (`snapshot::save` / `snapshot::restore`).

use std::sync::{Arc, Mutex};

use devices::legacy::{SerialPort, I8042};
use devices::pci::{HostBridge, PciRoot};
use devices::trigger::EventFdTrigger;
use devices::Bus;
use kvm_ioctls::VmFd;
use resources::memslots::MemSlots;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::config::device::DeviceSpec;
use crate::console;
mod passthrough;
pub mod setup;

use crate::event_loop::SerialInput;
use crate::irq_routes::KvmRoutes;
use crate::serial_config::SerialConfig;
use crate::vm::{kvm_err, os_err, VmError};
pub use passthrough::{DeviceStats, PciPassthrough};
use setup::DeviceContext;

/// Serial ports: COM1 at 0x3f8 (IRQ 4), COM2 at 0x2f8 (IRQ 3).
const SERIAL_PORTS: [(&str, u16, u32); 2] = [("serial0", 0x3f8, 4), ("serial1", 0x2f8, 3)];

/// What the devices are built with.
pub struct DeviceConfig<'a> {
    /// COM1 and COM2's host sides.
    pub serials: [&'a SerialConfig; 2],
    /// The `--device` functions, checked and named.
    pub passthrough: &'a [DeviceSpec],
    /// Guest RAM size, which decides where the 64-bit BAR window starts.
    pub mem_size: u64,
}

/// The devices the VMM emulates itself, whose state goes into the stream through
/// [`devices::Persist`]: handles shared with the machine the API and migration use.
#[derive(Clone)]
pub struct Emulated {
    /// COM1 and COM2.
    pub serials: Vec<Arc<SerialPort>>,
    /// The i8042 controller.
    pub i8042: Arc<I8042>,
    /// The PCI root (its configuration address latch).
    pub pci: Arc<PciRoot>,
    /// The host bridge at 00:00.0 (its command register).
    pub host_bridge: Arc<Mutex<HostBridge>>,
}

/// The VM's devices. Fields drop in order: the passed-through functions (their BAR slots
/// and mappings) first, then the bus holding the PCI root, then the mediators (a mediator
/// outlives the devices that use it).
pub struct DeviceManager {
    /// The passed-through functions, shared with the control API and migration.
    pub passthrough: Arc<Vec<PciPassthrough>>,
    /// The port-I/O and MMIO bus.
    pub bus: Arc<Bus>,
    /// The legacy devices and the PCI root.
    pub emulated: Emulated,
    /// COM1 and COM2's host input, for the event loop.
    serial_inputs: Vec<SerialInput>,
    /// The i8042's reset line, for the event loop.
    reset: Option<EventFd>,
    /// Interrupt routing (the passed-through functions hold it too).
    _routes: Arc<KvmRoutes>,
    /// The mediators `vfio-mediated` devices choose from.
    _mediators: mediate::Registry,
}

impl DeviceManager {
    /// Builds every device of the VM and registers it on the bus: the legacy devices, the
    /// PCI root and host bridge, then each `--device` function (in the order given, so a
    /// restored VM gets the same slots and INTx lines).
    pub fn new(
        vm: &Arc<VmFd>,
        mem: &GuestMemoryMmap,
        memslots: &Arc<MemSlots>,
        cfg: &DeviceConfig<'_>,
    ) -> Result<Self, VmError> {
        let bus = Arc::new(Bus::new());
        let mut serial_inputs = Vec::new();
        let mut serials = Vec::new();
        for ((name, base, gsi), scfg) in SERIAL_PORTS.iter().zip(cfg.serials) {
            let irq =
                EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("create a serial IRQ eventfd"))?;
            vm.register_irqfd(&irq, *gsi)
                .map_err(kvm_err("register a serial irqfd"))?;
            let (out, source) = console::connect(scfg)?;
            let port = Arc::new(
                SerialPort::new(EventFdTrigger::new(irq), out)
                    .map_err(os_err("create a serial port"))?,
            );
            bus.register_pio(name, *base, 8, port.clone())?;
            serials.push(port.clone());
            serial_inputs.push(SerialInput::new(name, port, source));
        }
        let reset = EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("create the reset eventfd"))?;
        let reset_trigger = EventFdTrigger::new(
            reset
                .try_clone()
                .map_err(os_err("clone the reset eventfd"))?,
        );
        let mut i8042_irqs = Vec::new();
        for gsi in [1, 12] {
            let irq =
                EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("create an i8042 IRQ eventfd"))?;
            vm.register_irqfd(&irq, gsi)
                .map_err(kvm_err("register an i8042 irqfd"))?;
            i8042_irqs.push(EventFdTrigger::new(irq));
        }
        let aux_irq = i8042_irqs.pop().expect("two IRQs");
        let kbd_irq = i8042_irqs.pop().expect("two IRQs");
        let i8042 = Arc::new(I8042::new(reset_trigger).with_irqs(kbd_irq, aux_irq));
        bus.register_pio("i8042", devices::legacy::i8042::DATA_PORT, 1, i8042.clone())?;
        bus.register_pio(
            "i8042",
            devices::legacy::i8042::COMMAND_PORT,
            1,
            i8042.clone(),
        )?;
        let pci = Arc::new(PciRoot::new());
        let host_bridge = Arc::new(Mutex::new(HostBridge::new()));
        pci.add(0, 0, host_bridge.clone())?;
        let routes = Arc::new(KvmRoutes::new(vm.clone())?);
        let mediators = mediate::Registry::with_bundled();
        let passthrough = setup::add_devices(
            cfg.passthrough,
            &DeviceContext {
                vm,
                bus: &bus,
                memslots,
                routes: &routes,
                pci: &pci,
                mem,
                mem_size: cfg.mem_size,
                timeout: vfio_user::DEFAULT_TIMEOUT,
                mediators: &mediators,
            },
        )?;
        bus.register_pio(
            "pci-config",
            devices::pci::root::CONFIG_ADDRESS_PORT,
            devices::pci::root::CONFIG_PORTS,
            pci.clone(),
        )?;
        Ok(DeviceManager {
            passthrough: Arc::new(passthrough),
            bus,
            emulated: Emulated {
                serials,
                i8042,
                pci,
                host_bridge,
            },
            serial_inputs,
            reset: Some(reset),
            _routes: routes,
            _mediators: mediators,
        })
    }

    /// The INTx lines of the passed-through functions, for a booted guest's MP table.
    pub fn mptable_intx(&self) -> Vec<crate::boot::mptable::PciIntx> {
        setup::mptable_intx(&self.passthrough)
    }

    /// The host input of the serial ports and the reset line, for the event loop (once).
    pub fn take_event_sources(&mut self) -> (Vec<SerialInput>, Option<EventFd>) {
        (std::mem::take(&mut self.serial_inputs), self.reset.take())
    }
}
