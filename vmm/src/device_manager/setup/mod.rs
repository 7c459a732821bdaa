//! Building the `--device` functions: connecting each backend, putting the function on
//! the PCI bus, placing its BARs as firmware would, and handing it guest RAM for DMA.
//!
//! The backends and their migrations live in `devices`, beside the device model that knows
//! only their trait: [`KernelVfio`] (`devices::vfio::kernel`) and [`VfioUserBackend`]
//! (`devices::vfio::user`). This module chooses one per `--device`, wraps it in a mediator
//! or [`TrapAll`](devices::vfio::TrapAll) as asked, and finds the device's migration.
//!
//! There is no firmware, so the VMM assigns the BARs and turns on memory decoding and bus
//! mastering (and I/O decoding for a function with I/O BARs); Linux keeps resources that
//! are already assigned. 32-bit BARs go into `[PCI_MMIO32_START, PCI_MMIO32_END)`, 64-bit
//! BARs above RAM from `high_mmio_start(mem)`, I/O BARs into ports
//! `[PCI_IO_START, PCI_IO_END)` (0xc000-0xffff); the E820 map lists RAM only, so neither
//! memory window is claimed by it.
//!
//! A function with INTx gets the IOAPIC pin of its slot and pin ([`pci_intx_gsi`]); the MP
//! table the guest reads lists each such routing ([`PciPassthrough::intx`]).

use std::sync::{Arc, Mutex};

use devices::pci::root::PciError;
use devices::pci::PciRoot;
use devices::vfio::kernel::KernelVfio;
use devices::vfio::user::VfioUserBackend;
use devices::vfio::{
    BackendError, BarDesc, BarKind, KernelVfioError, VfioBackend, VfioPciDevice, VfioPciError,
    VfioPciParams,
};
use devices::Bus;
use kvm_ioctls::VmFd;
use resources::alloc::{AddressAllocError, AddressAllocator, Policy};
use resources::layout::{
    high_mmio_start, HIGH_MMIO_SIZE, PCI_IO_END, PCI_IO_START, PCI_MMIO32_END, PCI_MMIO32_START,
};
use resources::memslots::MemSlots;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use mediate::{AttachContext, MediatorOptions, Registry, TrapHandle};

use crate::config::device::{DeviceKind, DeviceSpec};
use crate::device_manager::PciPassthrough;
use crate::irq_routes::{pci_intx_gsi, KvmRoutes};

/// First PCI slot for devices (slot 0 is the host bridge).
const FIRST_DEVICE_SLOT: u8 = 1;

/// Why a `--device` could not be set up. Every message names the device and includes the
/// underlying error's whole message, so the error is not a `source` (a `{:#}` chain would
/// repeat it).
#[derive(Debug, thiserror::Error)]
pub enum DeviceSetupError {
    /// The vfio-user server did not answer.
    #[error("device {device}: {error}")]
    Connect {
        /// The device, as given.
        device: String,
        /// The client's error.
        error: vfio_user::ClientError,
    },
    /// Kernel VFIO could not open the host function.
    #[error("device {device}: {error}")]
    Kernel {
        /// The device, as given.
        device: String,
        /// The backend's error.
        error: KernelVfioError,
    },
    /// The function could not be opened or programmed.
    #[error("device {device}: {error}")]
    Pci {
        /// The device, as given.
        device: String,
        /// The function's error (boxed: it is large).
        error: Box<VfioPciError>,
    },
    /// Every PCI slot is taken.
    #[error("device {device}: no free slot on PCI bus 0 (32 slots)")]
    NoSlot {
        /// The device, as given.
        device: String,
    },
    /// The PCI root refused the function.
    #[error("device {device}: {error}")]
    Slot {
        /// The device, as given.
        device: String,
        /// The root's error.
        error: PciError,
    },
    /// No room for a BAR in its window.
    #[error("device {device}: no room for BAR {index} ({size:#x} bytes): {error}")]
    Bar {
        /// The device, as given.
        device: String,
        /// The BAR.
        index: usize,
        /// Its size.
        size: u64,
        /// The allocator's error.
        error: AddressAllocError,
    },
    /// No mediator took the device, or the mediator failed to set it up.
    #[error("device {device}: {error}")]
    Mediator {
        /// The device, as given.
        device: String,
        /// The mediator's error.
        error: mediate::MediateError,
    },
    /// The device refused guest RAM for DMA.
    #[error("device {device}: cannot map guest RAM for DMA: {error}")]
    Dma {
        /// The device, as given.
        device: String,
        /// The backend's error.
        error: BackendError,
    },
    /// The BAR windows could not be managed (a layout error).
    #[error("cannot manage the PCI BAR windows: {0}")]
    Windows(AddressAllocError),
}

/// What the devices are built into.
pub struct DeviceContext<'a> {
    /// The VM.
    pub vm: &'a Arc<VmFd>,
    /// The bus BARs are registered on.
    pub bus: &'a Arc<Bus>,
    /// The VM's memory slots.
    pub memslots: &'a Arc<MemSlots>,
    /// Interrupt routing.
    pub routes: &'a Arc<KvmRoutes>,
    /// PCI bus 0.
    pub pci: &'a PciRoot,
    /// Guest RAM (one memfd), handed to the devices for DMA.
    pub mem: &'a GuestMemoryMmap,
    /// Guest RAM size, which decides where the 64-bit window starts.
    pub mem_size: u64,
    /// Deadline of each vfio-user request.
    pub timeout: std::time::Duration,
    /// The mediators `vfio-mediated` devices choose from.
    pub mediators: &'a Registry,
}

/// The windows BARs are allocated from: two of memory, one of ports.
pub struct BarWindows {
    low: AddressAllocator,
    high: AddressAllocator,
    io: AddressAllocator,
}

impl BarWindows {
    /// The 32-bit window below the IOAPIC, the 64-bit window above `mem_size` of RAM and
    /// the port window 0xc000-0xffff.
    pub fn new(mem_size: u64) -> Result<Self, AddressAllocError> {
        Ok(BarWindows {
            low: AddressAllocator::new(PCI_MMIO32_START, PCI_MMIO32_END - PCI_MMIO32_START)?,
            high: AddressAllocator::new(high_mmio_start(mem_size), HIGH_MMIO_SIZE)?,
            io: AddressAllocator::new(PCI_IO_START, PCI_IO_END - PCI_IO_START)?,
        })
    }

    /// An address for `bar` (a port for an I/O BAR), aligned to its size (a power of two,
    /// as BARs are); memory BARs at least to a page, so their pages can be mapped.
    pub fn allocate(&mut self, bar: &BarDesc) -> Result<u64, AddressAllocError> {
        let (window, align) = match bar.kind {
            BarKind::Io => (&mut self.io, bar.size),
            BarKind::Mem64 { .. } => (&mut self.high, bar.size.max(resources::layout::PAGE_SIZE)),
            BarKind::Mem32 { .. } => (&mut self.low, bar.size.max(resources::layout::PAGE_SIZE)),
        };
        Ok(window.allocate(bar.size, align, Policy::FirstFit)?.start)
    }
}

/// Connects the backend a device spec names.
fn open_backend(
    spec: &DeviceSpec,
    ctx: &DeviceContext<'_>,
    container: &mut Option<Arc<vfio_ioctls::VfioContainer>>,
    native: &mut Result<Arc<dyn devices::vfio::migration::DeviceMigration>, String>,
) -> Result<Arc<dyn VfioBackend>, DeviceSetupError> {
    let device = spec.to_string();
    match &spec.kind {
        DeviceKind::VfioUser { socket } => {
            let b = Arc::new(
                VfioUserBackend::connect(socket, ctx.timeout, ctx.mem).map_err(|error| {
                    DeviceSetupError::Connect {
                        device: device.clone(),
                        error,
                    }
                })?,
            );
            // A plain vfio-user device migrates through its server, if it offers that.
            if spec.mediation.is_none() {
                *native = b
                    .native_migration(ctx.mem)
                    .map_err(|error| DeviceSetupError::Connect { device, error })?
                    .ok_or_else(|| {
                        "its vfio-user server offers no migration (no migration device \
                         feature, no migration region)"
                            .to_string()
                    });
            }
            Ok(trap_all_unless(spec.mmap, b))
        }
        DeviceKind::Vfio { host } => {
            let kernel = |source| DeviceSetupError::Kernel {
                device: device.clone(),
                error: source,
            };
            let c = match container {
                Some(c) => c.clone(),
                None => container
                    .insert(KernelVfio::container(Some(ctx.vm)).map_err(kernel)?)
                    .clone(),
            };
            let b = KernelVfio::open(&host.sysfs_path(), c).map_err(kernel)?;
            // A plain host function migrates through the kernel's migration v2 uAPI, if its
            // driver offers it (untested against hardware here: no VFIO device).
            if spec.mediation.is_none() {
                match b.migration() {
                    Ok(Some(m)) => {
                        let ranges: Vec<_> = ctx
                            .mem
                            .iter()
                            .map(|r| devices::vfio::kernel::migration::IovaRange {
                                iova: r.start_addr().0,
                                length: r.len(),
                            })
                            .collect();
                        if let Err(e) = m.set_dma_ranges(&ranges) {
                            tracing::warn!("{device}: DMA dirty logging unavailable: {e}");
                        }
                        *native = Ok(Arc::new(m));
                    }
                    Ok(None) => {
                        tracing::info!("{device}: its driver offers no migration");
                        *native = Err("its kernel VFIO driver offers no migration".into());
                    }
                    Err(e) => {
                        tracing::warn!("{device}: cannot use its migration: {e}");
                        *native = Err(format!("its kernel VFIO migration is unusable: {e}"));
                    }
                }
            }
            Ok(trap_all_unless(spec.mmap, Arc::new(b)))
        }
    }
}

/// Builds every device in `specs`, in order, each at the next free PCI slot.
pub fn add_devices(
    specs: &[DeviceSpec],
    ctx: &DeviceContext<'_>,
) -> Result<Vec<PciPassthrough>, DeviceSetupError> {
    let mut windows = BarWindows::new(ctx.mem_size).map_err(DeviceSetupError::Windows)?;
    let mut container = None;
    let mut built = Vec::with_capacity(specs.len());
    for spec in specs {
        let device = spec.to_string();
        if let Some(m) = &spec.mediation {
            let selector = m.mediator.parse().unwrap_or(mediate::Selector::Auto);
            ctx.mediators
                .check(&selector)
                .map_err(|error| DeviceSetupError::Mediator {
                    device: device.clone(),
                    error,
                })?;
        }
        // Set by open_backend for plain devices; a mediated one migrates through its mediator.
        let mut native = Err("its migration was not probed".to_string());
        let mut backend = open_backend(spec, ctx, &mut container, &mut native)?;
        let mut mediated = None;
        if let Some(m) = &spec.mediation {
            let options = MediatorOptions {
                pf: m.pf.clone(),
                trap: m.trap.clone(),
                named: false,
            };
            let selector = m.mediator.parse().unwrap_or(mediate::Selector::Auto);
            let b = ctx
                .mediators
                .open(&selector, &spec.kind.address(), &options, backend)
                .map_err(|error| DeviceSetupError::Mediator {
                    device: device.clone(),
                    error,
                })?;
            backend = b.clone();
            mediated = Some(b);
        }
        let pci_err = |source| DeviceSetupError::Pci {
            device: device.clone(),
            error: Box::new(source),
        };
        let dev = VfioPciDevice::new(VfioPciParams {
            name: spec.id.clone(),
            backend: backend.clone(),
            bus: ctx.bus.clone(),
            memslots: ctx.memslots.clone(),
            routes: ctx.routes.clone(),
        })
        .map_err(pci_err)?;
        if let Some(m) = &mediated {
            m.handle().attach(AttachContext {
                traps: TrapHandle::new(&dev),
                memory: Arc::new(GuestRam(ctx.mem.clone())),
            });
        }
        let bars = dev.bars();
        for bar in &bars {
            let addr = windows
                .allocate(bar)
                .map_err(|source| DeviceSetupError::Bar {
                    device: device.clone(),
                    index: bar.index,
                    size: bar.size,
                    error: source,
                })?;
            dev.program_bar(bar.index, addr).map_err(pci_err)?;
            tracing::debug!(
                "{}: BAR {} at {addr:#x} ({:#x} bytes)",
                spec.id,
                bar.index,
                bar.size
            );
        }
        // SAFETY: guest RAM stays mapped for the whole run: `vm::run` declares the memory
        // before the devices, so it is dropped after them; a vfio-user server maps the
        // memfd itself and loses it with the connection.
        unsafe { devices::vfio::backend::dma_map_guest_memory(backend.as_ref(), ctx.mem) }
            .map_err(|source| DeviceSetupError::Dma {
                device: device.clone(),
                error: source,
            })?;
        dev.enable_memory_and_bus_master();
        if bars.iter().any(|b| b.kind == BarKind::Io) {
            dev.enable_io_decoding();
        }
        let slot =
            ctx.pci
                .free_slot(FIRST_DEVICE_SLOT)
                .ok_or_else(|| DeviceSetupError::NoSlot {
                    device: device.clone(),
                })?;
        let intx = match dev.intx_pin() {
            Some(pin) => dev
                .wire_intx(pci_intx_gsi(slot, pin), ctx.routes.clone())
                .map_err(pci_err)?,
            None => None,
        };
        ctx.pci
            .add(slot, 0, Arc::new(Mutex::new(dev.clone())))
            .map_err(|source| DeviceSetupError::Slot {
                device: device.clone(),
                error: source,
            })?;
        match intx {
            Some(i) => tracing::info!(
                "{device} at PCI 00:{slot:02x}.0, MSI/MSI-X GSIs {:?}, INTx pin {} on GSI {}",
                dev.gsis(),
                i.pin,
                i.gsi
            ),
            None => tracing::info!(
                "{device} at PCI 00:{slot:02x}.0, MSI/MSI-X GSIs {:?}",
                dev.gsis()
            ),
        }
        let migration = match &mediated {
            Some(m) => m.migration().ok_or_else(|| {
                format!("its mediator {} has no migration region", m.mediator_name())
            }),
            None => native,
        };
        if let Err(why) = &migration {
            tracing::info!("{device} cannot migrate: {why}; snapshots and live migration of this VM will be refused");
        }
        let (migration, migration_blocker) = match migration {
            Ok(m) => (Some(m), None),
            Err(why) => (None, Some(why)),
        };
        built.push(PciPassthrough {
            id: spec.id.clone(),
            device: dev,
            mediated,
            migration,
            migration_blocker,
            slot,
            intx,
        });
    }
    Ok(built)
}

/// The INTx routing of the built functions, as the MP table lists it.
pub fn mptable_intx(devices: &[PciPassthrough]) -> Vec<crate::boot::mptable::PciIntx> {
    devices
        .iter()
        .filter_map(|d| {
            let intx = d.intx?;
            Some(crate::boot::mptable::PciIntx {
                slot: d.slot,
                pin: intx.pin,
                // Out of range, the table refuses it, naming the function's slot.
                ioapic_pin: u8::try_from(intx.gsi).unwrap_or(u8::MAX),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_go_to_their_windows_aligned() {
        let mut w = BarWindows::new(256 << 20).unwrap();
        let bar = |index, kind, size| BarDesc {
            index,
            kind,
            size,
            region_size: size,
        };
        let m32 = BarKind::Mem32 {
            prefetchable: false,
        };
        let m64 = BarKind::Mem64 { prefetchable: true };
        assert_eq!(w.allocate(&bar(0, m32, 0x1000)).unwrap(), PCI_MMIO32_START);
        assert_eq!(
            w.allocate(&bar(1, m32, 0x10_0000)).unwrap(),
            PCI_MMIO32_START + 0x10_0000
        );
        // Small BARs are page-aligned so their pages can be mapped.
        assert_eq!(
            w.allocate(&bar(2, m32, 0x100)).unwrap(),
            PCI_MMIO32_START + 0x1000
        );
        assert_eq!(w.allocate(&bar(3, m64, 1 << 30)).unwrap(), 4 << 30);
        let e = w.allocate(&bar(4, m32, 1 << 30)).unwrap_err();
        assert!(e.to_string().contains("no free part"), "{e}");
    }

    #[test]
    fn io_bars_go_to_the_port_window_aligned_to_their_size() {
        let mut w = BarWindows::new(256 << 20).unwrap();
        let io = |index, size| BarDesc {
            index,
            kind: BarKind::Io,
            size,
            region_size: size,
        };
        assert_eq!(w.allocate(&io(0, 8)).unwrap(), 0xc000);
        assert_eq!(w.allocate(&io(1, 0x100)).unwrap(), 0xc100);
        assert_eq!(w.allocate(&io(2, 0x20)).unwrap(), 0xc020);
        // The window holds 0x4000 ports: 64 BARs of 256 bytes, then it is full.
        let mut n = 0;
        while w.allocate(&io(3, 0x100)).is_ok() {
            n += 1;
        }
        assert_eq!(n, 62, "0xc000 and 0xc100 are partly taken");
        let e = w.allocate(&io(4, 0x100)).unwrap_err();
        assert!(e.to_string().contains("no free part"), "{e}");
        assert!(w.allocate(&io(5, 4)).is_ok(), "small holes remain usable");
    }
}

#[cfg(test)]
mod kvm_tests;

/// Guest RAM as mediators read it.
struct GuestRam(GuestMemoryMmap);

impl mediate::GuestMemory for GuestRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use vm_memory::{Bytes, GuestAddress};
        self.0
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| std::io::Error::other(format!("guest memory at {gpa:#x}: {e}")))
    }
}

/// `backend` as it is, or wrapped so that none of its BAR areas is mapped (`mmap=off`).
fn trap_all_unless<B: VfioBackend + 'static>(mmap: bool, backend: Arc<B>) -> Arc<dyn VfioBackend> {
    if mmap {
        backend
    } else {
        Arc::new(devices::vfio::TrapAll(backend))
    }
}
